//! VirtualService HTTP request matching (`proxy::route::http::request_matches`) with arbitrary
//! match rules (regexes included), paths and headers: never panics.
//!
//! Input: the first line is an `HTTPMatchRequest` as JSON; the rest is a request head
//! (`METHOD PATH`, then `name: value` lines).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::model::istio::HttpMatchRequest;
use mesh_node::proxy::route::Source;
use mesh_node::proxy::route::http::{RequestInfo, request_matches, string_matches, uri_matches};
use std::collections::HashMap;
use std::net::SocketAddr;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (rule, head) = text.split_once('\n').unwrap_or((&text, ""));
    let Ok(m) = serde_json::from_str::<HttpMatchRequest>(rule) else {
        return;
    };
    let mut lines = head.split('\n').map(|l| l.trim_end_matches('\r'));
    let first = lines.next().unwrap_or("");
    let (method, path) = first.split_once(' ').unwrap_or((first, "/"));
    let path = path.split(' ').next().unwrap_or("/");
    let mut headers = http::HeaderMap::new();
    for l in lines {
        let Some((n, v)) = l.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(n.trim().as_bytes()),
            http::HeaderValue::from_str(v.trim()),
        ) {
            headers.append(n, v);
        }
    }
    let labels: HashMap<String, String> = [("app".to_string(), "fuzz".to_string())].into();
    let src = Source {
        namespace: "fuzz",
        labels: Some(&labels),
    };
    let dst: SocketAddr = ([198, 19, 2, 2], 8080).into();
    let req = RequestInfo {
        method,
        path,
        headers: &headers,
    };
    let _ = request_matches(&m, &src, dst, &req);
    if let Some(u) = &m.uri {
        let _ = uri_matches(u, path);
        let _ = string_matches(u, method);
    }
});
