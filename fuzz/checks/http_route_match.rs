//! `http_route_match`: VirtualService HTTP request matching (`proxy::route::http`) with
//! arbitrary match rules (regexes included), paths and headers. Shared by the cargo-fuzz
//! target and the corpus test; a violated property panics.
//!
//! Properties: no panic; and wherever no regex decides, `request_matches` agrees with the
//! simple reference below (port, source labels, `uri` exact on the path without its query and
//! prefix on the whole path, `method`, every header present with its values joined by `,`;
//! `exact` before `prefix` before `regex`; a match with none set matches nothing).
//!
//! Input: the first line is an `HTTPMatchRequest` as JSON; the rest is a request head
//! (`METHOD PATH`, then `name: value` lines).

use mesh_node::model::istio::{HttpMatchRequest, StringMatch};
use mesh_node::proxy::route::Source;
use mesh_node::proxy::route::http::{RequestInfo, request_matches, string_matches, uri_matches};
use std::collections::HashMap;
use std::net::SocketAddr;

/// The reference for one `StringMatch`: `None` when a regex decides (not modelled here).
fn reference_string(m: &StringMatch, value: &str) -> Option<bool> {
    if let Some(e) = &m.exact {
        return Some(value == e);
    }
    if let Some(p) = &m.prefix {
        return Some(value.starts_with(p.as_str()));
    }
    if m.regex.is_some() {
        return None;
    }
    Some(false)
}

fn reference_uri(m: &StringMatch, path: &str) -> Option<bool> {
    let no_query = path.split('?').next().unwrap_or(path);
    match (&m.exact, &m.prefix) {
        (Some(e), _) => Some(no_query == e),
        (None, Some(p)) => Some(path.starts_with(p.as_str())),
        (None, None) => reference_string(m, no_query),
    }
}

/// Every condition, in no particular order: false if any is false, else `None` if a regex
/// decided one, else true.
fn reference(
    m: &HttpMatchRequest,
    labels: &HashMap<String, String>,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(String, String)],
) -> Option<bool> {
    let mut unknown = false;
    let mut all = |c: Option<bool>| -> bool {
        match c {
            Some(false) => false,
            Some(true) => true,
            None => {
                unknown = true;
                true
            }
        }
    };
    let ok = m.port.is_none_or(|p| p == u32::from(port))
        && m.source_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        && all(m
            .uri
            .as_ref()
            .map_or(Some(true), |u| reference_uri(u, path)))
        && all(m
            .method
            .as_ref()
            .map_or(Some(true), |s| reference_string(s, method)))
        && m.headers.iter().all(|(name, sm)| {
            let name = name.to_ascii_lowercase();
            let values: Vec<&str> = headers
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            !values.is_empty() && all(reference_string(sm, &values.join(",")))
        });
    if !ok {
        Some(false)
    } else if unknown {
        None
    } else {
        Some(true)
    }
}

pub fn run(data: &[u8]) {
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
    // What went into the map, as the matcher reads it back (lower-case names, in order).
    let mut seen: Vec<(String, String)> = Vec::new();
    for l in lines {
        let Some((n, v)) = l.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(n.trim().as_bytes()),
            http::HeaderValue::from_str(v.trim()),
        ) {
            if let Ok(s) = v.to_str() {
                seen.push((n.as_str().to_string(), s.to_string()));
            }
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
    let got = request_matches(&m, &src, dst, &req);
    assert_eq!(
        got,
        request_matches(&m, &src, dst, &req),
        "not deterministic"
    );
    if let Some(want) = reference(&m, &labels, dst.port(), method, path, &seen) {
        assert_eq!(
            got, want,
            "request_matches disagrees with the reference for {m:?} on {method} {path} {seen:?}"
        );
    }
    if let Some(u) = &m.uri {
        let got = uri_matches(u, path);
        if let Some(want) = reference_uri(u, path) {
            assert_eq!(got, want, "uri_matches {u:?} {path:?}");
        }
        let got = string_matches(u, method);
        if let Some(want) = reference_string(u, method) {
            assert_eq!(got, want, "string_matches {u:?} {method:?}");
        }
    }
}
