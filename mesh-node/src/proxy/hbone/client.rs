//! Opening a tunnel: reuse or dial the pooled HTTP/2 connection, send `CONNECT`, and hand back
//! the stream as an ordinary byte pipe.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::pool::{Pool, PoolKey, Sender};
use super::{CONNECTION_WINDOW, MAX_FRAME, Refusal, STREAM_WINDOW};
use crate::identity::Identity;
use crate::identity::manager::WorkloadCert;
use crate::proxy::socket::connect_marked;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr} refused ({}): {source}", reason.as_str())]
    Tls {
        addr: SocketAddr,
        reason: Refusal,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS settings: {0}")]
    Config(#[from] rustls::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] hyper::Error),
    #[error("CONNECT answered {0}")]
    Status(StatusCode),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

/// What a tunnel carries besides the bytes.
pub struct TunnelRequest<'a> {
    pub cert: &'a WorkloadCert,
    pub dst_identity: Identity,
    /// `podIP:15008`.
    pub tunnel_addr: SocketAddr,
    /// The original destination (`:authority`).
    pub target: SocketAddr,
    pub client_ip: IpAddr,
    pub baggage: String,
    /// W3C `traceparent` of the connection's span (`telemetry::trace`), sent on the `CONNECT`.
    pub traceparent: Option<http::HeaderValue>,
}

pub async fn open(
    pool: &Pool,
    req: TunnelRequest<'_>,
    connect_timeout: Duration,
) -> Result<TokioIo<Upgraded>, TunnelError> {
    let key = PoolKey {
        src: req.cert.identity.clone(),
        src_generation: req.cert.generation,
        dst: req.tunnel_addr,
        dst_identity: req.dst_identity.clone(),
    };
    let mut sender = match pool.ready(&key) {
        Some(s) => s,
        None => {
            let lock = pool.dial_lock(&key);
            let _one_dialer = lock.lock().await;
            match pool.ready(&key) {
                Some(s) => s,
                None => {
                    let s = dial(
                        req.cert,
                        &req.dst_identity,
                        req.tunnel_addr,
                        connect_timeout,
                    )
                    .await?;
                    pool.insert(key, s.clone());
                    s
                }
            }
        }
    };
    sender.ready().await?;
    let mut connect = Request::builder()
        .method(Method::CONNECT)
        .uri(req.target.to_string())
        .header("forwarded", format!("for={}", forwarded_for(req.client_ip)))
        .header("baggage", req.baggage);
    if let Some(tp) = req.traceparent {
        connect = connect.header(crate::telemetry::trace::TRACEPARENT, tp);
    }
    let connect = connect.body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(connect).await?;
    if resp.status() != StatusCode::OK {
        return Err(TunnelError::Status(resp.status()));
    }
    Ok(TokioIo::new(hyper::upgrade::on(resp).await?))
}

/// RFC 7239 `for=` value (IPv6 quoted and bracketed).
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

async fn dial(
    cert: &WorkloadCert,
    dst_identity: &Identity,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Sender, TunnelError> {
    let tcp = connect_marked(addr, timeout)
        .await
        .map_err(|source| TunnelError::Connect { addr, source })?;
    let connector = TlsConnector::from(cert.client_config(dst_identity.clone())?);
    let tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|source| TunnelError::Tls {
            addr,
            reason: Refusal::of_tls(&source),
            source,
        })?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(TokioIo::new(tls))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%addr, error = %e, "HBONE connection ended");
        }
    });
    Ok(sender)
}
