//! Responses the proxy makes itself, rather than passes on: Envoy's local reply texts, marked
//! with their response flags for the request's metrics and access log. Used by the HTTP path
//! (`http`) and by per-request policy on inbound tunnels (`authz::l7`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Body type of requests and responses the proxy passes on.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// A response made by the proxy itself (Envoy's local reply texts), marked with its response
/// flag for the request's metrics and access log.
pub fn local(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.extensions_mut()
        .insert(crate::telemetry::request::ResponseFlags(
            crate::telemetry::request::local_reply_flags(status.as_u16(), body),
        ));
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

/// The answer to a request over a `RateLimitPolicy` limit: `429` with `retry-after` (Envoy's
/// local rate limit).
pub fn rate_limited(l: &crate::proxy::ratelimit::Limited) -> Response<Body> {
    let mut r = local(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(l.retry_after.as_secs_f64().ceil() as u64),
    );
    r.headers_mut()
        .insert("x-sidenode-ratelimited", HeaderValue::from_static("true"));
    r
}
