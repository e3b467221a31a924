//! One HTTP request's telemetry: `istio_requests_total` and
//! `istio_request_duration_milliseconds` with Istio's labels, and one access-log line
//! (target `access`, message `request complete`). Reported by the source's node proxy
//! (`proxy::http`, `reporter="source"`) and, on HTTP ports it serves per request, by the
//! destination's (`proxy::authz::l7`, `reporter="destination"`).
//!
//! Responses the proxy makes itself carry their Envoy response flag in a [`ResponseFlags`]
//! extension (set by [`local_reply_flags`] from the reply's body, which is Envoy's text).

use std::time::Instant;

use http::Response;
use tracing::info;

use super::istio::{self, Labels};

/// The Envoy response flag of a response the proxy made itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseFlags(pub &'static str);

/// The flag for a local reply with this status and body (Envoy's local reply texts).
pub fn local_reply_flags(status: u16, body: &str) -> &'static str {
    match body.trim_end() {
        "fault filter abort" => "FI",
        "no healthy upstream" | "no destination" => "UH",
        "upstream request timeout" => "UT",
        "upstream overflow" => "UO",
        "no route" | "no service" => "NR",
        "RBAC: access denied" => "UAEX",
        "local_rate_limited" => "RL",
        "upstream connect error" | "upstream connect error or disconnect/reset before headers" => {
            "UF"
        }
        "no source identity" | "endpoint outside the mesh" => "UF",
        "bad request" | "bad request body" => "DPE",
        _ if status == 404 => "NR",
        _ => "-",
    }
}

/// The request's authority: `:authority` (HTTP/2, absolute URIs), else the `Host` header,
/// else empty.
pub fn authority<B>(req: &http::Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
        .unwrap_or("")
}

/// What the access-log line says about the request besides the labels.
pub struct RequestLog<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    /// The endpoint that answered (source side), if one did.
    pub upstream: Option<std::net::SocketAddr>,
    pub attempts: u32,
}

/// Counts a finished request and writes its access-log line.
pub fn done<B>(labels: &Labels, log: &RequestLog<'_>, resp: &Response<B>, started: Instant) {
    let status = resp.status().as_u16();
    let flags = resp
        .extensions()
        .get::<ResponseFlags>()
        .map_or("-", |f| f.0);
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok());
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    istio::request(labels, flags, status, grpc, ms);
    let id = |p: &str| {
        if p == istio::UNKNOWN {
            String::new()
        } else {
            format!("spiffe://{p}")
        }
    };
    info!(
        target: "access",
        direction = if labels.reporter == istio::Reporter::Source { "outbound" } else { "inbound" },
        protocol = %labels.protocol,
        method = log.method,
        path = log.path,
        authority = log.authority,
        status,
        flags,
        grpc_status = grpc.unwrap_or(""),
        "src.workload" = %labels.source.workload,
        "src.namespace" = %labels.source.namespace,
        "src.identity" = %id(&labels.source.principal),
        "dst.service" = %labels.service.as_ref().map_or(istio::UNKNOWN, |s| s.host.as_str()),
        "dst.workload" = %labels.destination.workload,
        "dst.namespace" = %labels.destination.namespace,
        "dst.identity" = %id(&labels.destination.principal),
        "dst.addr" = %log.upstream.map_or_else(String::new, |a| a.to_string()),
        attempts = log.attempts,
        duration_ms = ms.round() as u64,
        "request complete"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_replies_get_envoys_flags() {
        assert_eq!(local_reply_flags(503, "no healthy upstream\n"), "UH");
        assert_eq!(local_reply_flags(504, "upstream request timeout"), "UT");
        assert_eq!(local_reply_flags(418, "fault filter abort"), "FI");
        assert_eq!(local_reply_flags(404, ""), "NR");
        assert_eq!(local_reply_flags(403, "RBAC: access denied"), "UAEX");
        assert_eq!(local_reply_flags(429, "local_rate_limited"), "RL");
        assert_eq!(local_reply_flags(200, "anything"), "-");
    }
}
