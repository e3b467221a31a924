//! Per-request policy on an HBONE tunnel to an HTTP port: the destination's proxy serves
//! HTTP (HTTP/1.1, or h2c with prior knowledge) on the tunnel, checks every request against
//! the authorization policies in force at that moment, answers `403 RBAC: access denied` to
//! refused ones, then against the `RateLimitPolicy` request limits (`proxy::ratelimit`),
//! answering `429 local_rate_limited` with `retry-after` to those over the limit, and
//! passes the others to the pod over one connection of the same protocol (made again when the
//! pod closes it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{HttpRequest, Peer, check, count_denied};
use crate::proxy::reply::{Body, local, rate_limited};
use crate::proxy::socket::connect_marked;
use crate::state::StateRx;

/// One tunnel served per request.
pub struct Tunnel {
    /// The destination workload's uid.
    pub pod: String,
    /// The pod's address the requests go to.
    pub target: SocketAddr,
    pub peer: Peer,
    pub state: StateRx,
    pub connect_timeout: Duration,
    pub limiter: Arc<crate::proxy::ratelimit::Limiter>,
    /// Istio labels of the tunnel (destination reporter), for the requests' metrics.
    pub labels: crate::telemetry::istio::Labels,
    /// The tunnel's transport (`h2`, `quic`; `None`: a same-node connection), for the
    /// requests' access-log lines.
    pub transport: Option<&'static str>,
}

enum Sender {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

/// The connection to the pod: the one opened when the tunnel was accepted, then handshaken
/// for the protocol of the first request.
struct Upstream {
    fresh: Option<TcpStream>,
    sender: Option<Sender>,
}

pub async fn serve<IO>(io: IO, tunnel: Arc<Tunnel>, first: TcpStream)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upstream = Arc::new(Mutex::new(Upstream {
        fresh: Some(first),
        sender: None,
    }));
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let (tunnel, upstream) = (tunnel.clone(), upstream.clone());
        async move {
            // The `inbound` trace span, child of the request's `traceparent`; the pod gets
            // this span as its parent.
            let trace = crate::telemetry::trace::inbound_request(
                &mut req,
                &tunnel.pod,
                tunnel.target,
                tunnel.peer.ip,
                tunnel.peer.principal.as_deref(),
            );
            let resp = handle(req, &tunnel, &upstream).await;
            trace.http_status(resp.status().as_u16());
            Ok::<_, Infallible>(trace.end_with_body(resp))
        }
    });
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new());
    b.http2().timer(TokioTimer::new());
    if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
        debug!(error = %e, "HTTP on the tunnel ended");
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
];

fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

/// One request: policy, forwarding, then its metrics and access-log line.
async fn handle(req: Request<Incoming>, t: &Tunnel, up: &Mutex<Upstream>) -> Response<Body> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authority = crate::telemetry::request::authority(&req).to_string();
    let grpc = crate::telemetry::request::is_grpc(req.headers());
    let resp = respond(req, t, up).await;
    let log = crate::telemetry::request::RequestLog {
        method: method.as_str(),
        path: &path,
        authority: &authority,
        upstream: Some(t.target),
        attempts: 1,
        grpc,
        tunnel: t.transport,
    };
    crate::telemetry::request::done(&t.labels, &log, &resp, started);
    resp
}

async fn respond(req: Request<Incoming>, t: &Tunnel, up: &Mutex<Upstream>) -> Response<Body> {
    let (decision, limited) = {
        let st = t.state.borrow().clone();
        let host = crate::telemetry::request::authority(&req);
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let http = HttpRequest {
            method: req.method().as_str(),
            path,
            host,
            headers: req.headers(),
        };
        let decision = check(&st, &t.pod, &t.peer, Some(&http));
        // A denied request takes no token.
        let limited = match decision.denied {
            None => t
                .limiter
                .check_request(&st, &t.pod, t.target.port(), &http)
                .err(),
            Some(_) => None,
        };
        (decision, limited)
    };
    if !decision.audit.is_empty() {
        info!(
            method = %req.method(),
            path = %req.uri().path(),
            audit = %decision.audit.join(","),
            allowed = decision.allowed(),
            "authorization audit"
        );
    }
    if let Some(reason) = decision.denied {
        count_denied("l7", reason.as_str());
        info!(
            method = %req.method(),
            path = %req.uri().path(),
            reason = reason.as_str(),
            policy = decision.policy.as_deref().unwrap_or(""),
            "request denied by authorization policy"
        );
        return local(StatusCode::FORBIDDEN, "RBAC: access denied");
    }
    if let Some(l) = limited {
        info!(
            method = %req.method(),
            path = %req.uri().path(),
            policy = %l.policy,
            limit = %l.entry,
            "request over the rate limit"
        );
        return rate_limited(&l);
    }
    match forward(req, t, up).await {
        Ok(resp) => resp,
        Err(resp) => resp,
    }
}

async fn forward(
    req: Request<Incoming>,
    t: &Tunnel,
    up: &Mutex<Upstream>,
) -> Result<Response<Body>, Response<Body>> {
    let h2 = req.version() == Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if h2 {
        parts.uri = Uri::try_from(format!("http://{}{pq}", t.target))
            .map_err(|_| local(StatusCode::BAD_REQUEST, "bad request"))?;
        parts.version = Version::HTTP_2;
    } else {
        if !parts.headers.contains_key(header::HOST)
            && let Some(a) = parts.uri.authority().cloned()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        parts.uri = Uri::try_from(pq).map_err(|_| local(StatusCode::BAD_REQUEST, "bad request"))?;
        parts.version = Version::HTTP_11;
    }
    let req = Request::from_parts(parts, body);

    let mut guard = up.lock().await;
    let usable = match &guard.sender {
        Some(Sender::H1(s)) => !h2 && !s.is_closed(),
        Some(Sender::H2(s)) => h2 && !s.is_closed(),
        None => false,
    };
    if !usable {
        let tcp = match guard.fresh.take() {
            Some(s) => s,
            None => connect_marked(t.target, t.connect_timeout)
                .await
                .map_err(|e| {
                    warn!(target = %t.target, error = %e, "destination unreachable");
                    local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
                })?,
        };
        guard.sender = Some(handshake(tcp, h2).await.map_err(|e| {
            warn!(target = %t.target, error = %e, "HTTP handshake with the pod failed");
            local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
        })?);
    }
    let sent = match guard.sender.as_mut() {
        Some(Sender::H1(s)) => {
            let ready = s.ready().await;
            match ready {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        Some(Sender::H2(s)) => {
            let mut s = s.clone();
            drop(guard);
            s.send_request(req).await
        }
        None => return Err(local(StatusCode::SERVICE_UNAVAILABLE, "no upstream")),
    };
    match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        Err(e) => {
            warn!(target = %t.target, error = %e, "request to the pod failed");
            Err(local(StatusCode::BAD_GATEWAY, "upstream reset"))
        }
    }
}

async fn handshake(tcp: TcpStream, h2: bool) -> hyper::Result<Sender> {
    let io = TokioIo::new(tcp);
    if h2 {
        let (s, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H2(s))
    } else {
        let (s, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H1(s))
    }
}
