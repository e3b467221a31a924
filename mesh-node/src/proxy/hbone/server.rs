//! Serving tunnels on one pod's HBONE listener: each `CONNECT` names a destination of this pod;
//! the proxy connects to it and splices the stream.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{Instrument, info, info_span, warn};

use super::{CONNECTION_WINDOW, MAX_FRAME, MAX_STREAMS, Refusal, STREAM_WINDOW, count_refusal};
use crate::identity::Identity;
use crate::proxy::COPY_BUF;
use crate::proxy::socket::connect_marked;

/// What the listener knows of its pod and its caller.
pub struct Conn {
    pub pod: String,
    pub pod_ips: Vec<IpAddr>,
    pub peer: SocketAddr,
    pub peer_identity: Identity,
    pub connect_timeout: Duration,
}

pub async fn serve<IO>(io: IO, conn: Arc<Conn>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn).await) }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "HBONE connection ended");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

async fn handle(req: Request<Incoming>, conn: Arc<Conn>) -> Response<Empty<Bytes>> {
    if req.method() != Method::CONNECT {
        count_refusal("inbound", Refusal::BadRequest);
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        count_refusal("inbound", Refusal::BadRequest);
        warn!(uri = %req.uri(), "CONNECT without an ip:port authority");
        return status(StatusCode::BAD_REQUEST);
    };
    if !conn.pod_ips.contains(&target.ip()) {
        // A tunnel to this pod may reach only this pod.
        count_refusal("inbound", Refusal::BadRequest);
        warn!(%target, pod = %conn.pod, "CONNECT to an address this pod does not have");
        return status(StatusCode::BAD_REQUEST);
    }
    let client = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("for="))
        .unwrap_or("")
        .trim_matches('"')
        .to_string();
    let span = info_span!("inbound", src_identity = %conn.peer_identity, %target, client = %client);
    let upstream = match connect_marked(target, conn.connect_timeout)
        .instrument(span.clone())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            count_refusal("inbound", Refusal::Unreachable);
            span.in_scope(|| warn!(error = %e, "destination unreachable"));
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let conn2 = conn.clone();
    tokio::spawn(
        async move {
            let started = Instant::now();
            let mut upstream = upstream;
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    let mut tunnel = TokioIo::new(up);
                    match tokio::io::copy_bidirectional_with_sizes(&mut tunnel, &mut upstream, COPY_BUF, COPY_BUF).await {
                        Ok((from_client, to_client)) => info!(
                            pod = %conn2.pod,
                            bytes_received = from_client,
                            bytes_sent = to_client,
                            duration_ms = started.elapsed().as_millis() as u64,
                            "inbound connection closed"
                        ),
                        Err(e) => info!(pod = %conn2.pod, error = %e, "inbound connection closed with error"),
                    }
                }
                Err(e) => warn!(error = %e, "CONNECT upgrade failed"),
            }
        }
        .instrument(span),
    );
    status(StatusCode::OK)
}
