//! The node proxy's admin API: HTTP/1.1 on `127.0.0.1:15000` (`--admin`), as Envoy's and
//! ztunnel's admin ports. Read by `mesh-node config` and `mesh-node log-level`.
//!
//! - `GET /` — the endpoints;
//! - `GET /config_dump` — workloads, services (with endpoints), Istio and sidenode objects,
//!   mesh settings, and the certificates held, public parts only (`config_dump`); in mesh mode
//!   also whether the state stream to the controller is open and which local pods the proxy
//!   cannot serve, and why (read by `mesh-node doctor`);
//! - `GET /connections` — the open connections (`telemetry::conn`);
//! - `GET /healthz/ready` — `200 ready` once the proxy serves (listeners bound; in mesh mode the
//!   first state received), else `503` with the reason;
//! - `POST /pool/forget` — empty the HTTP/2 and QUIC tunnel pools: the next connections dial
//!   new tunnels, open ones finish (the benchmark's cold-pool measure);
//! - `GET /logging`, `POST /logging?level=LEVEL` or `?filter=DIRECTIVES` — the log filter, read
//!   or replaced at run time (`logging`).
//!
//! Bodies are JSON (`application/json`) but for `/healthz/ready` (plain text, for probes).
//!
//! The API has no authentication: anyone who reaches it can read the mesh's topology,
//! identities and policies, and change the log filter (turn access logs off, or flood the
//! disk with trace logs). Hence it binds loopback only, reachable by the node's own
//! processes (with `hostNetwork`, the node's; never a pod's, which has its own network
//! namespace); another address is refused unless `--admin-allow-remote` says it is wanted.
//! It never serves key material: certificates are shown from their public chain.

#![forbid(unsafe_code)]

pub mod config_dump;
pub mod logging;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::Full;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::proxy::status::Status;

/// Where the admin API listens.
#[derive(Clone, Debug)]
pub struct Settings {
    pub addr: SocketAddr,
    /// Allow a non-loopback `addr` (see the module documentation for why it is refused).
    pub allow_remote: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin API has no authentication and binds loopback only; {addr} is not a loopback \
         address (pass --admin-allow-remote to expose it anyway)"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("admin API: listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Refuses a non-loopback address unless allowed.
pub fn check_addr(s: &Settings) -> Result<(), AdminError> {
    if s.addr.ip().to_canonical().is_loopback() || s.allow_remote {
        Ok(())
    } else {
        Err(AdminError::NotLoopback { addr: s.addr })
    }
}

/// Checks the address and binds it.
pub fn bind(s: &Settings) -> Result<TcpListener, AdminError> {
    check_addr(s)?;
    let err = |source| AdminError::Bind {
        addr: s.addr,
        source,
    };
    let sock = match s.addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(s.addr).map_err(err)?;
    sock.listen(64).map_err(err)
}

/// The `/config_dump` document now.
pub fn config_dump(admin: &Status) -> config_dump::ConfigDump {
    let mesh = admin.mesh();
    let state = match (admin.mesh_mode(), mesh) {
        (false, _) => None,
        (true, Some(m)) => Some(m.state.borrow().clone()),
        (true, None) => Some(Arc::default()),
    };
    let certs = mesh.map(|m| m.certs.certificates()).unwrap_or_default();
    let mut dump = config_dump::build(admin.node(), state.as_deref(), &certs, SystemTime::now());
    if admin.mesh_mode() {
        dump.controller_connected = Some(crate::state::client::STREAM.connected());
        dump.unserved_pods = crate::proxy::inbound::unserved();
    }
    dump
}

/// An answer: status, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

pub const JSON: &str = "application/json";
pub const TEXT: &str = "text/plain; charset=utf-8";

impl Reply {
    pub fn json(status: StatusCode, v: &impl serde::Serialize) -> Reply {
        match serde_json::to_string_pretty(v) {
            Ok(mut body) => {
                body.push('\n');
                Reply {
                    status,
                    content_type: JSON,
                    body,
                }
            }
            Err(e) => Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("encoding JSON: {e}"),
            ),
        }
    }

    pub fn error(status: StatusCode, message: &str) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message }))
    }

    fn text(status: StatusCode, body: String) -> Reply {
        Reply {
            status,
            content_type: TEXT,
            body,
        }
    }
}

/// The endpoints, for `GET /`.
pub const ENDPOINTS: [(&str, &str); 6] = [
    (
        "GET /config_dump",
        "workloads, services (with endpoints), policies and routing objects, mesh settings, certificates (public parts only)",
    ),
    ("GET /connections", "open connections"),
    (
        "POST /pool/forget",
        "forget every pooled HBONE connection (HTTP/2 and QUIC): the next tunnels dial afresh; open tunnels finish on theirs",
    ),
    (
        "GET /healthz/ready",
        "200 `ready` when serving, else 503 and the reason",
    ),
    ("GET /logging", "the log filter in force"),
    (
        "POST /logging?level=LEVEL | ?filter=DIRECTIVES",
        "replace the log filter (RUST_LOG syntax, e.g. info,access=off,mesh_node::proxy=debug)",
    ),
];

/// Answers one request (everything but the transport).
pub fn route(admin: &Status, method: &Method, path: &str, query: Option<&str>) -> Reply {
    let path = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    let allowed: &[Method] = match path {
        "/logging" => &[Method::GET, Method::POST],
        "/" | "/config_dump" | "/connections" | "/healthz/ready" => &[Method::GET],
        "/pool/forget" => &[Method::POST],
        _ => {
            return Reply::error(
                StatusCode::NOT_FOUND,
                &format!("no endpoint {path}; see GET /"),
            );
        }
    };
    if !allowed.contains(method) {
        return Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} takes {}", names(allowed)),
        );
    }
    match path {
        "/" => Reply::json(
            StatusCode::OK,
            &serde_json::json!({
                "node": admin.node(),
                "endpoints": ENDPOINTS
                    .iter()
                    .map(|(e, what)| serde_json::json!({"endpoint": e, "what": what}))
                    .collect::<Vec<_>>(),
            }),
        ),
        "/config_dump" => Reply::json(StatusCode::OK, &config_dump(admin)),
        "/connections" => Reply::json(StatusCode::OK, &crate::telemetry::conn::open_connections()),
        "/pool/forget" => match admin.mesh() {
            Some(m) => Reply::json(
                StatusCode::OK,
                &serde_json::json!({
                    "forgotten": {"h2": m.pool.forget_all(), "quic": m.quic.forget_all()},
                }),
            ),
            None => Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no mesh side (plain mode, or not started yet): no tunnel pool",
            ),
        },
        "/healthz/ready" => match admin.readiness() {
            Ok(()) => Reply::text(StatusCode::OK, "ready\n".into()),
            Err(why) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => logging::handle(method, query),
    }
}

fn names(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How long a client has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, admin: Arc<Status>) {
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API listening");
    }
    // A successor took the port over (`proxy::handover`): it answers from now on.
    let mut stopping = crate::proxy::handover::handed_over();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::proxy::handover::until(&mut stopping) => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move {
                    let r = route(&admin, req.method(), req.uri().path(), req.uri().query());
                    debug!(method = %req.method(), path = req.uri().path(), status = r.status.as_u16(), "admin request");
                    let allow = (r.status == StatusCode::METHOD_NOT_ALLOWED).then(|| {
                        if req.uri().path().trim_end_matches('/') == "/logging" {
                            "GET, POST"
                        } else {
                            "GET"
                        }
                    });
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(r.body)));
                    *resp.status_mut() = r.status;
                    let h = resp.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(r.content_type),
                    );
                    h.insert(
                        header::CACHE_CONTROL,
                        header::HeaderValue::from_static("no-store"),
                    );
                    if let Some(a) = allow {
                        h.insert(header::ALLOW, header::HeaderValue::from_static(a));
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(admin: &Status, path: &str) -> Reply {
        route(admin, &Method::GET, path, None)
    }

    #[test]
    fn loopback_only_unless_allowed() {
        let s = |addr: &str, allow_remote| Settings {
            addr: addr.parse().expect("addr"),
            allow_remote,
        };
        assert!(check_addr(&s("127.0.0.1:15000", false)).is_ok());
        assert!(check_addr(&s("[::1]:15000", false)).is_ok());
        assert!(check_addr(&s("[::ffff:127.0.0.1]:15000", false)).is_ok());
        for bad in ["0.0.0.0:15000", "10.0.0.1:15000", "[::]:15000"] {
            let e = check_addr(&s(bad, false)).expect_err(bad);
            assert!(e.to_string().contains("--admin-allow-remote"), "{e}");
            assert!(check_addr(&s(bad, true)).is_ok());
        }
    }

    #[test]
    fn routes_methods_and_unknown_paths() {
        let admin = Status::new("node1", false);
        let r = get(&admin, "/");
        assert_eq!((r.status, r.content_type), (StatusCode::OK, JSON));
        assert!(r.body.contains("/config_dump") && r.body.contains("/logging"));
        assert_eq!(get(&admin, "/nope").status, StatusCode::NOT_FOUND);
        assert_eq!(get(&admin, "/config_dump/x").status, StatusCode::NOT_FOUND);
        assert_eq!(
            route(&admin, &Method::POST, "/config_dump", None).status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&admin, &Method::DELETE, "/logging", None).status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let r = get(&admin, "/connections");
        assert_eq!(r.status, StatusCode::OK);
        assert!(serde_json::from_str::<Vec<serde_json::Value>>(&r.body).is_ok());
        let r = get(&admin, "/config_dump/");
        assert_eq!(r.status, StatusCode::OK);
        let d: config_dump::ConfigDump = serde_json::from_str(&r.body).expect("dump");
        assert_eq!((d.node.as_str(), d.mode.as_str()), ("node1", "plain"));
        assert_eq!(d.controller_connected, None, "plain mode has no controller");
    }

    #[test]
    fn readiness_follows_the_phases() {
        let admin = Status::new("node1", false);
        let r = get(&admin, "/healthz/ready");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            r.body.contains("waiting for the agent's maps"),
            "{}",
            r.body
        );
        admin.set_serving();
        let r = get(&admin, "/healthz/ready");
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ready\n"));
        admin.set_draining();
        assert_eq!(
            get(&admin, "/healthz/ready").status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Mesh mode: serving is not enough without a state.
        let admin = Status::new("node1", true);
        admin.set_serving();
        let r = get(&admin, "/healthz/ready");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        let d: config_dump::ConfigDump =
            serde_json::from_str(&get(&admin, "/config_dump").body).expect("dump");
        assert_eq!((d.mode.as_str(), d.state_version), ("mesh", 0));
        assert!(
            d.controller_connected.is_some(),
            "mesh mode says whether it is connected"
        );
    }
}
