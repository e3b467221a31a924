//! Istio's matching rules shared by the policies that read HTTP requests
//! (`AuthorizationPolicy` in `proxy::authz`, `RateLimitPolicy` in `proxy::ratelimit`): what is
//! known of a request, string and host patterns.

/// What is known of an HTTP request (L7).
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path, with its query string (matched without it).
    pub path: &'a str,
    /// `:authority` / `Host`.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Istio's string match: `*` (any non-empty... any value), `prefix*`, `*suffix`, or exact.
pub fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// Hosts match case-insensitively; a pattern without a port ignores the request's port.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    if string_matches(&pattern, &host) {
        return true;
    }
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => return false,
    };
    string_matches(&pattern, bare)
}
