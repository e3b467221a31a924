//! Which ports carry HTTP, by Istio's protocol selection: read by routing (HTTP-aware
//! services), authorization and rate limits (per-request checks) and telemetry (request
//! metrics), so it lives with the state they all read.

use super::NodeState;
use crate::proto;

/// Is this service port HTTP, by Istio's rules: `appProtocol` `http`, `http2`, `grpc`,
/// `kubernetes.io/h2c`; else (no or an unknown `appProtocol`) a name `http`, `http2`, `grpc`
/// or starting with `http-`, `http2-`, `grpc-`.
pub fn is_http_port(p: &proto::ServicePort) -> bool {
    let app = p.app_protocol.to_ascii_lowercase();
    match app.as_str() {
        "http" | "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" | "h2c" => return true,
        "tcp" | "tls" | "https" | "udp" | "mongo" | "redis" | "mysql" | "kubernetes.io/ws"
        | "kubernetes.io/wss" => return false,
        _ => {}
    }
    let name = p.name.to_ascii_lowercase();
    matches!(name.as_str(), "http" | "http2" | "grpc")
        || ["http-", "http2-", "grpc-"]
            .iter()
            .any(|pre| name.starts_with(pre))
}

/// Is `port` of pod `w` the target of an HTTP service port?
pub fn is_http_pod_port(st: &NodeState, w: &proto::Workload, port: u16) -> bool {
    st.services
        .values()
        .filter(|s| s.namespace == w.namespace && !s.selector.is_empty())
        .filter(|s| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .flat_map(|s| &s.ports)
        .filter(|p| is_http_port(p))
        .any(|p| {
            let target = if p.target_port == 0 && p.target_port_name.is_empty() {
                p.port
            } else {
                p.target_port
            };
            target == u32::from(port)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_ports_by_istio_rules() {
        let port = |name: &str, app: &str| proto::ServicePort {
            name: name.into(),
            app_protocol: app.into(),
            port: 80,
            target_port: 8080,
            ..Default::default()
        };
        for (n, a) in [
            ("http", ""),
            ("http2", ""),
            ("grpc", ""),
            ("http-web", ""),
            ("HTTP2-x", ""),
            ("grpc-api", ""),
            ("tcp", "http"),
            ("", "kubernetes.io/h2c"),
            ("x", "grpc"),
            ("http", "unknown-proto"),
        ] {
            assert!(is_http_port(&port(n, a)), "{n}/{a}");
        }
        for (n, a) in [
            ("tcp", ""),
            ("", ""),
            ("httpx", ""),
            ("web-http", ""),
            ("http", "tcp"),
            ("https", ""),
        ] {
            assert!(!is_http_port(&port(n, a)), "{n}/{a}");
        }
    }
}
