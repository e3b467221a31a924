//! Prometheus metrics of this process (served on the metrics port, `/metrics`).

use std::sync::OnceLock;

use prometheus::{IntCounterVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub hbone_refused: IntCounterVec,
    /// Proxy hand-overs (`proxy::handover`) this process took part in, by role: `taken` (it
    /// took the listening sockets over). The process that gives them away hands over its
    /// metrics port too, so it counts nothing a scrape could see.
    pub handovers: IntCounterVec,
    pub conns_refused: IntCounterVec,
    /// HBONE/TCP tunnel connections by which TLS carries their bytes after the handshake:
    /// `path="kernel"` (kTLS, `proxy::hbone::ktls`) or `path="userspace"` (rustls).
    pub hbone_tls: IntCounterVec,
    pub hbone_tls_retired: IntCounterVec,
}

/// A counter family registered in `registry` (a static definition: creating it cannot fail).
fn counter_in(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|_| unreachable!("static metric definition"));
    let _ = registry.register(Box::new(c.clone()));
    c
}

/// A counter family registered in the proxy's registry ([`metrics`]).
pub fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    counter_in(&metrics().registry, name, help, labels)
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let registry = Registry::new();
        let hbone_refused = counter_in(
            &registry,
            "sidenode_hbone_refused_total",
            "HBONE tunnels refused, by direction, transport (h2, quic, none) and reason",
            &["direction", "transport", "reason"],
        );
        let handovers = counter_in(
            &registry,
            "sidenode_proxy_handovers_total",
            "Listening-socket hand-overs this proxy took part in, by role (taken)",
            &["role"],
        );
        let conns_refused = counter_in(
            &registry,
            "sidenode_connections_refused_total",
            "Connections and tunnels refused by a proxy resource limit, by direction and \
             reason (proxy_limit, source_limit, no_orig_dst)",
            &["direction", "reason"],
        );
        let hbone_tls = counter_in(
            &registry,
            "sidenode_hbone_tls_connections_total",
            "HBONE/TCP connections by direction and the TLS path after the handshake (kernel, userspace)",
            &["direction", "path"],
        );
        let hbone_tls_retired = counter_in(
            &registry,
            "sidenode_hbone_tls_retired_total",
            "kernel-TLS HBONE connections retired before their peer must re-key, by direction and reason (record_limit)",
            &["direction", "reason"],
        );
        Metrics {
            registry,
            hbone_refused,
            handovers,
            conns_refused,
            hbone_tls,
            hbone_tls_retired,
        }
    })
}

/// One HBONE tunnel refused (`proxy::hbone::count_refusal` names the labels).
pub fn count_refusal(direction: &str, transport: &str, reason: &str) {
    metrics()
        .hbone_refused
        .with_label_values(&[direction, transport, reason])
        .inc();
}

/// One HBONE/TCP connection set up, by `direction` (outbound, inbound) and TLS `path`
/// (kernel, userspace).
pub fn count_hbone_tls(direction: &str, path: &str) {
    metrics()
        .hbone_tls
        .with_label_values(&[direction, path])
        .inc();
}

/// A kernel-TLS HBONE connection retired (`proxy::hbone::ktls`).
pub fn count_hbone_tls_retired(direction: &str, reason: &str) {
    metrics()
        .hbone_tls_retired
        .with_label_values(&[direction, reason])
        .inc();
}

/// A connection refused by a resource limit (`proxy::connlimit`) or because the kernel had no
/// original destination for it (`reason="no_orig_dst"`).
pub fn count_conn_refused(direction: &str, reason: &str) {
    metrics()
        .conns_refused
        .with_label_values(&[direction, reason])
        .inc();
}

/// The descriptions of a collector's metric families: `((name, help), label names)` each.
pub fn descs(families: &[((&str, &str), &[&str])]) -> Vec<prometheus::core::Desc> {
    families
        .iter()
        .filter_map(|((name, help), labels)| {
            prometheus::core::Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
            .ok()
        })
        .collect()
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut out = String::new();
    let enc = prometheus::TextEncoder::new();
    let _ = enc.encode_utf8(&metrics().registry.gather(), &mut out);
    out
}

/// Serves `/metrics` on `addr` (HTTP/1.1).
pub async fn serve(addr: std::net::SocketAddr) -> std::io::Result<()> {
    serve_listener(
        tokio::net::TcpListener::bind(addr).await?,
        std::future::pending(),
    )
    .await
}

/// Serves `/metrics` on a listening socket until `stop` completes (the proxy stops when a
/// successor took the socket over, `proxy::handover`).
pub async fn serve_listener(
    l: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    if let Ok(addr) = l.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    tokio::pin!(stop);
    loop {
        let (s, _) = tokio::select! {
            a = l.accept() => a?,
            _ = &mut stop => return Ok(()),
        };
        tokio::spawn(async move {
            let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let (code, body) = if req.uri().path() == "/metrics" {
                    (200, render())
                } else {
                    (404, "not found\n".to_string())
                };
                let mut r =
                    hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                *r.status_mut() =
                    hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
                Ok::<_, std::convert::Infallible>(r)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}
