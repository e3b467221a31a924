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

/// Envoy's `isGrpcRequestHeaders`: a request is gRPC when its `content-type` starts with
/// `application/grpc`.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The `grpc_response_status` label as Envoy's stats filter fills it (`Grpc::Common::
/// getGrpcStatus`): empty for a request that is not gRPC; else the response's `grpc-status`,
/// else the gRPC status of the HTTP status (`httpToGrpcStatus`: 400 → 13, 401 → 16, 403 → 7,
/// 404 → 12, 429/502/503/504 → 14, others 2). One difference: the request is counted at its
/// response headers, so a `200` whose status comes in the trailers is written empty (Envoy,
/// counting at the stream's end, writes the trailer's value).
pub fn grpc_status(grpc: bool, status: u16, headers: &http::HeaderMap) -> String {
    if !grpc {
        return String::new();
    }
    if let Some(v) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        return v.to_string();
    }
    let code = match status {
        200 => return String::new(),
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    code.to_string()
}

/// What the access-log line says about the request besides the labels.
pub struct RequestLog<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    /// The endpoint that answered (source side), if one did.
    pub upstream: Option<std::net::SocketAddr>,
    pub attempts: u32,
    /// A gRPC request ([`is_grpc`]): `request_protocol` `grpc` and a `grpc_response_status`.
    pub grpc: bool,
    /// The transport of the HBONE tunnel the request went through (`h2`, `quic`); `None`:
    /// none (a direct or same-node connection, or no upstream).
    pub tunnel: Option<&'static str>,
}

/// Counts a finished request and writes its access-log line.
pub fn done<B>(labels: &Labels, log: &RequestLog<'_>, resp: &Response<B>, started: Instant) {
    let status = resp.status().as_u16();
    let flags = resp
        .extensions()
        .get::<ResponseFlags>()
        .map_or("-", |f| f.0);
    let grpc = grpc_status(log.grpc, status, resp.headers());
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    // A gRPC request on a port whose labels say `http` (the destination's per-request path).
    let grpc_labels;
    let labels = if log.grpc && labels.protocol != "grpc" {
        grpc_labels = Labels {
            protocol: "grpc".into(),
            ..labels.clone()
        };
        &grpc_labels
    } else {
        labels
    };
    istio::request(labels, flags, status, Some(&grpc), ms);
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
        grpc_status = %grpc,
        "src.workload" = %labels.source.workload,
        "src.namespace" = %labels.source.namespace,
        "src.identity" = %id(&labels.source.principal),
        "dst.service" = %labels.service.as_ref().map_or(istio::UNKNOWN, |s| s.host.as_str()),
        "dst.workload" = %labels.destination.workload,
        "dst.namespace" = %labels.destination.namespace,
        "dst.identity" = %id(&labels.destination.principal),
        "dst.addr" = %log.upstream.map_or_else(String::new, |a| a.to_string()),
        attempts = log.attempts,
        tunnel = log.tunnel.unwrap_or(""),
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

    #[test]
    fn grpc_status_is_filled_as_envoy_fills_it() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(false, 503, &h), "", "not gRPC: empty");
        assert_eq!(grpc_status(true, 200, &h), "", "in the trailers, not seen");
        assert_eq!(grpc_status(true, 503, &h), "14");
        assert_eq!(grpc_status(true, 403, &h), "7");
        assert_eq!(grpc_status(true, 500, &h), "2");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(true, 200, &h), "5", "trailers-only response");
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
    }
}
