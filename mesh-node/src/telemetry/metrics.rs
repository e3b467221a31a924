//! Prometheus metrics of this process (served on the metrics port, `/metrics`).

use std::sync::OnceLock;

use prometheus::{IntCounterVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub hbone_refused: IntCounterVec,
    pub conns_refused: IntCounterVec,
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let registry = Registry::new();
        let hbone_refused = IntCounterVec::new(
            Opts::new(
                "sidenode_hbone_refused_total",
                "HBONE tunnels refused, by direction and reason",
            ),
            &["direction", "reason"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let _ = registry.register(Box::new(hbone_refused.clone()));
        let conns_refused = IntCounterVec::new(
            Opts::new(
                "sidenode_connections_refused_total",
                "Connections and tunnels refused by a proxy resource limit, by direction and \
                 reason (proxy_limit, source_limit, no_orig_dst)",
            ),
            &["direction", "reason"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let _ = registry.register(Box::new(conns_refused.clone()));
        Metrics {
            registry,
            hbone_refused,
            conns_refused,
        }
    })
}

pub fn count_refusal(direction: &str, reason: crate::proxy::hbone::Refusal) {
    metrics()
        .hbone_refused
        .with_label_values(&[direction, reason.as_str()])
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

/// The text exposition of every metric.
pub fn render() -> String {
    let mut out = String::new();
    let enc = prometheus::TextEncoder::new();
    let _ = enc.encode_utf8(&metrics().registry.gather(), &mut out);
    out
}

/// Serves `/metrics` on `addr` (HTTP/1.1).
pub async fn serve(addr: std::net::SocketAddr) -> std::io::Result<()> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let l = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    loop {
        let (s, _) = l.accept().await?;
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
