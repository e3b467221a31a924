//! One listening port of the gateway: accept (under the connection cap), then by the port's
//! plan either serve plain HTTP, or read the TLS ClientHello's server name without consuming
//! it and either terminate TLS with that server's certificate and serve HTTP, or pass the
//! connection through untouched to the backend a `tls` route names.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use super::{Gateway, PortPlan, ServerKind};
use crate::proxy::http::{self as proxy_http, Body, Conn, GatewayConn};
use crate::proxy::route::{self, Decision, Source};

pub async fn accept_loop(listener: TcpListener, port: u16, gw: Arc<Gateway>) {
    let configs = Arc::new(super::tls::Configs::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = gw.conns.clone().try_acquire_owned() else {
            warn!(%peer, limit = gw.cfg.limits.max_connections, "connection limit reached; closing");
            continue;
        };
        let gw = gw.clone();
        let configs = configs.clone();
        let span = info_span!("gateway", client = %peer, port);
        let tracker = gw.tracker.clone();
        tracker.spawn(
            async move {
                handle(stream, peer, port, gw, configs).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    gw: Arc<Gateway>,
    configs: Arc<super::tls::Configs>,
) {
    let Some(plan) = gw.plans.borrow().get(&port).cloned() else {
        return;
    };
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(gw.cfg.listen, port));
    let _ = stream.set_nodelay(true);
    if !plan.is_tls() {
        serve_http(stream, peer, local, plan, "http", gw).await;
        return;
    }
    let limit = gw.cfg.limits.handshake_timeout;
    let sni = match tokio::time::timeout(limit, peek_sni(&stream)).await {
        Ok(Ok(sni)) => sni,
        Ok(Err(e)) => {
            debug!(error = %e, "no TLS ClientHello");
            return;
        }
        Err(_) => {
            debug!("no TLS ClientHello before the handshake timeout");
            return;
        }
    };
    let host = sni.clone().unwrap_or_default().to_ascii_lowercase();
    let Some(server) = plan.server_for(&host) else {
        debug!(sni = %host, "no server for this name; closing");
        return;
    };
    match &server.kind {
        ServerKind::Passthrough => passthrough(stream, peer, port, &host, &plan, gw).await,
        ServerKind::Terminate { secret, tls13_only } => {
            let Some(ck) = gw.secrets.borrow().get(secret).cloned() else {
                warn!(%secret, sni = %host, "no usable certificate in this Secret; closing");
                return;
            };
            let cfg = match configs.get(secret, &ck, *tls13_only) {
                Ok(c) => c,
                Err(e) => {
                    warn!(%secret, error = %e, "TLS configuration failed");
                    return;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    return;
                }
            };
            serve_http(tls, peer, local, plan, "https", gw).await;
        }
        ServerKind::Http { .. } => {}
    }
}

/// The server name of the TLS ClientHello waiting on `s`, read with `MSG_PEEK` (nothing is
/// consumed: a passed-through connection reaches the backend whole).
async fn peek_sni(s: &TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(accepted.client_hello().server_name().map(str::to_string));
            }
            Ok(None) if n < buf.len() => {
                // The rest of the ClientHello is on its way.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "ClientHello larger than 16 KiB",
                ));
            }
            Err((e, _)) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
        }
    }
}

async fn passthrough(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    sni: &str,
    plan: &PortPlan,
    gw: Arc<Gateway>,
) {
    let st = gw.mesh.state.borrow().clone();
    let gateways: Vec<_> = plan
        .servers
        .iter()
        .filter(|s| {
            matches!(s.kind, ServerKind::Passthrough)
                && s.hosts
                    .iter()
                    .any(|h| crate::model::gateway::host_matches(h, sni))
        })
        .map(|s| &s.gateway)
        .collect();
    let source = Source {
        namespace: &gw.cfg.namespace,
        labels: st
            .workloads
            .get(&format!("{}/{}", gw.cfg.namespace, gw.cfg.pod))
            .map(|w| &w.labels),
    };
    let decision = route::tls::select_tls(
        &st,
        &gw.shared.balancer,
        Some(&gw.shared.health),
        &mut fastrand::Rng::new(),
        &source,
        &gateways,
        port,
        sni,
    );
    match decision {
        Decision::Endpoint(r) => {
            let vip = r.endpoint.addr;
            crate::proxy::outbound::carry_routed(
                stream,
                peer,
                vip,
                Some(gw.src),
                r,
                gw.shared.clone(),
            )
            .await;
        }
        Decision::Refuse { why, .. } => warn!(sni, "{why}; closing"),
        _ => debug!(sni, "no tls route for this name; closing"),
    }
}

/// Serves HTTP/1.1 and HTTP/2 on one client connection until it closes, is idle too long, or
/// is too slow to send its headers.
async fn serve_http<IO>(
    io: IO,
    peer: SocketAddr,
    local: SocketAddr,
    plan: Arc<PortPlan>,
    scheme: &'static str,
    gw: Arc<Gateway>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        peer,
        dst: local,
        src: Some(gw.src),
        mesh: gw.mesh.clone(),
        shared: gw.shared.clone(),
        gateway: Some(GatewayConn {
            port: plan.routes.clone(),
            scheme,
        }),
    });
    let started = Instant::now();
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
    });
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let (conn, plan, activity) = (conn.clone(), plan.clone(), activity.clone());
            async move {
                activity.in_flight.fetch_add(1, Ordering::Relaxed);
                let resp = respond(req, conn, &plan, scheme).await;
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                activity
                    .last_ms
                    .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let limits = &gw.cfg.limits;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let conn_fut = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn_fut);
    let idle = limits.idle_timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(idle));
    let mut closing = false;
    let drain = gw.drain.clone();
    loop {
        tokio::select! {
            _ = drain.cancelled(), if !closing => {
                conn_fut.as_mut().graceful_shutdown();
                closing = true;
            }
            r = conn_fut.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "client connection ended");
                }
                return;
            }
            _ = tick.tick(), if !closing => {
                let quiet = activity.in_flight.load(Ordering::Relaxed) == 0
                    && started.elapsed().saturating_sub(Duration::from_millis(
                        activity.last_ms.load(Ordering::Relaxed),
                    )) >= idle;
                if quiet {
                    debug!(idle_s = idle.as_secs(), "idle client connection closed");
                    conn_fut.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the connection started when the last request ended.
    last_ms: AtomicU64,
}

async fn respond(
    req: Request<Incoming>,
    conn: Arc<Conn>,
    plan: &PortPlan,
    scheme: &'static str,
) -> Response<Body> {
    if scheme == "http" {
        let host = proxy_http::request_host(&req);
        if let Some(s) = plan.server_for(&host)
            && matches!(
                s.kind,
                ServerKind::Http {
                    https_redirect: true
                }
            )
        {
            let r = crate::model::istio::HttpRedirect {
                scheme: Some("https".into()),
                ..Default::default()
            };
            let resp = proxy_http::redirect_response(&req, "http", &r);
            debug!(host, status = %StatusCode::MOVED_PERMANENTLY, "redirected to https");
            return resp;
        }
    }
    proxy_http::handle_request(req, conn).await
}
