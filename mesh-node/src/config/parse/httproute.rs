//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io` v1/v1beta1) attached to a Service — the
//! GAMMA mesh profile — read as the VirtualService it means. The node proxies then route it
//! with the same code as any VirtualService; nothing below the controller knows HTTPRoute.
//!
//! Mapping: each `parentRef` of kind Service becomes a host (its `port`, if set, a match
//! condition); each rule an `http` route; `matches` (path `Exact`/`PathPrefix`/
//! `RegularExpression`, headers `Exact`/`RegularExpression`, `method`) match requests;
//! `backendRefs` (Services of the route's namespace, with `port`) are destinations whose
//! relative weights (default 1) become percentages; `timeouts.request` the route's timeout.
//! A route with no Service parent (one for a Gateway) is not the mesh's and is skipped.
//! What sidenode cannot honour (filters, query-parameter matches, cross-namespace backends)
//! is an error naming the field: silently ignoring it would route differently than asked.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ObjError, RawMeta};
use crate::model::istio::{
    Destination, HttpMatchRequest, HttpRoute as VsHttpRoute, PortSelector, RouteDestination,
    StringMatch, VirtualServiceSpec,
};

#[derive(Deserialize)]
pub(super) struct RawHttpRoute {
    #[serde(default)]
    pub metadata: RawMeta,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParentRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    matches: Vec<Match>,
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
    #[serde(default)]
    filters: Vec<serde_json::Value>,
    timeouts: Option<Timeouts>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Match {
    path: Option<PathMatch>,
    #[serde(default)]
    headers: Vec<HeaderMatch>,
    method: Option<String>,
    #[serde(default)]
    query_params: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct PathMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct HeaderMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BackendRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u32>,
    weight: Option<u32>,
    #[serde(default)]
    filters: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Timeouts {
    request: Option<String>,
}

/// A parentRef names a Service only explicitly: its kind defaults to `Gateway`.
fn parent_is_service(p: &ParentRef) -> bool {
    p.kind.as_deref() == Some("Service")
        && matches!(p.group.as_deref(), None | Some("") | Some("core"))
}

/// A backendRef's kind defaults to `Service` (core group).
fn is_core_service(group: &Option<String>, kind: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some("core"))
        && matches!(kind.as_deref(), None | Some("Service"))
}

/// `PathPrefix` matches whole path elements: `/v2` matches `/v2` and `/v2/x`, not `/v2x`.
fn prefix_regex(value: &str) -> String {
    let trimmed = value.trim_end_matches('/');
    format!("{}(/.*)?", regex_escape(trimmed))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Relative weights → percentages totalling 100 (largest remainder); `None` for one backend.
fn percentages(weights: &[u32]) -> Vec<Option<i32>> {
    if weights.len() <= 1 {
        return vec![None; weights.len()];
    }
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let exact: Vec<(u64, u64)> = weights
        .iter()
        .map(|w| {
            let x = u64::from(*w) * 100;
            (x / total, x % total)
        })
        .collect();
    let mut out: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let mut left = 100 - out.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(exact[*i].1));
    for i in order {
        if left == 0 {
            break;
        }
        if weights[i] > 0 {
            out[i] += 1;
            left -= 1;
        }
    }
    out.into_iter()
        .map(|p| Some(i32::try_from(p).unwrap_or(100)))
        .collect()
}

impl RawHttpRoute {
    /// The VirtualService this route means, or `None` when it has no Service parent.
    pub(super) fn into_virtual_service(
        self,
        line: usize,
        namespace: &str,
    ) -> Result<Option<VirtualServiceSpec>, ObjError> {
        let f = |field: String, msg: String| ObjError::field(line, &field, msg);
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for p in &self.spec.parent_refs {
            if !parent_is_service(p) {
                continue; // a Gateway's route: not the mesh's
            }
            hosts.push(match &p.namespace {
                Some(ns) if ns != namespace => format!("{}.{ns}", p.name),
                _ => p.name.clone(),
            });
            ports.push(p.port);
        }
        if hosts.is_empty() {
            return Ok(None);
        }
        // A parent port narrows the route to that port (one port for all parents here).
        let port = if ports.iter().all(|p| *p == ports[0]) {
            ports[0]
        } else {
            None
        };
        let mut http = Vec::new();
        for (i, rule) in self.spec.rules.into_iter().enumerate() {
            let rf = format!("spec.rules[{i}]");
            if !rule.filters.is_empty() {
                return Err(f(
                    format!("{rf}.filters"),
                    "filters are not supported by sidenode".into(),
                ));
            }
            let mut matches = Vec::new();
            for (j, m) in rule.matches.iter().enumerate() {
                let mf = format!("{rf}.matches[{j}]");
                if !m.query_params.is_empty() {
                    return Err(f(
                        format!("{mf}.queryParams"),
                        "query parameter matches are not supported by sidenode".into(),
                    ));
                }
                let uri = match &m.path {
                    None => None,
                    Some(p) => {
                        let value = p.value.clone().unwrap_or_else(|| "/".into());
                        let kind = p.kind.as_deref().unwrap_or("PathPrefix");
                        Some(match kind {
                            "Exact" => StringMatch {
                                exact: Some(value),
                                ..Default::default()
                            },
                            "PathPrefix" if value == "/" => StringMatch {
                                prefix: Some(value),
                                ..Default::default()
                            },
                            "PathPrefix" => StringMatch {
                                regex: Some(prefix_regex(&value)),
                                ..Default::default()
                            },
                            "RegularExpression" => StringMatch {
                                regex: Some(value),
                                ..Default::default()
                            },
                            other => {
                                return Err(f(
                                    format!("{mf}.path.type"),
                                    format!(
                                        "`{other}` is not Exact, PathPrefix or RegularExpression"
                                    ),
                                ));
                            }
                        })
                    }
                };
                let mut headers = BTreeMap::new();
                for (k, h) in m.headers.iter().enumerate() {
                    let sm = match h.kind.as_deref().unwrap_or("Exact") {
                        "Exact" => StringMatch {
                            exact: Some(h.value.clone()),
                            ..Default::default()
                        },
                        "RegularExpression" => StringMatch {
                            regex: Some(h.value.clone()),
                            ..Default::default()
                        },
                        other => {
                            return Err(f(
                                format!("{mf}.headers[{k}].type"),
                                format!("`{other}` is not Exact or RegularExpression"),
                            ));
                        }
                    };
                    headers.insert(h.name.to_ascii_lowercase(), sm);
                }
                matches.push(HttpMatchRequest {
                    uri,
                    method: m.method.clone().map(|x| StringMatch {
                        exact: Some(x),
                        ..Default::default()
                    }),
                    headers,
                    port,
                    ..Default::default()
                });
            }
            if matches.is_empty() && port.is_some() {
                matches.push(HttpMatchRequest {
                    port,
                    ..Default::default()
                });
            }
            let mut dests = Vec::new();
            let mut weights = Vec::new();
            for (j, b) in rule.backend_refs.iter().enumerate() {
                let bf = format!("{rf}.backendRefs[{j}]");
                if !is_core_service(&b.group, &b.kind) {
                    return Err(f(
                        format!("{bf}.kind"),
                        "only Service backends are supported".into(),
                    ));
                }
                if b.namespace.as_deref().is_some_and(|ns| ns != namespace) {
                    return Err(f(
                        format!("{bf}.namespace"),
                        "backends in other namespaces (ReferenceGrant) are not supported".into(),
                    ));
                }
                if !b.filters.is_empty() {
                    return Err(f(
                        format!("{bf}.filters"),
                        "filters are not supported by sidenode".into(),
                    ));
                }
                let Some(port) = b.port else {
                    return Err(f(
                        format!("{bf}.port"),
                        "required for a Service backend".into(),
                    ));
                };
                weights.push(b.weight.unwrap_or(1));
                dests.push(Destination {
                    host: b.name.clone(),
                    subset: None,
                    port: Some(PortSelector { number: Some(port) }),
                });
            }
            let total: u32 = weights.iter().sum();
            if !dests.is_empty() && total == 0 {
                return Err(f(
                    format!("{rf}.backendRefs"),
                    "every backend has weight 0 (no request could be served)".into(),
                ));
            }
            let route = dests
                .into_iter()
                .zip(percentages(&weights))
                .filter(|(_, w)| *w != Some(0))
                .map(|(destination, weight)| RouteDestination {
                    destination,
                    weight,
                })
                .collect::<Vec<_>>();
            if route.is_empty() {
                return Err(f(format!("{rf}.backendRefs"), "no backend".into()));
            }
            http.push(VsHttpRoute {
                name: Some(format!("rule-{i}")),
                r#match: matches,
                route,
                timeout: rule.timeouts.and_then(|t| t.request),
                ..Default::default()
            });
        }
        Ok(Some(VirtualServiceSpec {
            hosts,
            http,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_weights_become_percentages() {
        assert_eq!(percentages(&[90, 10]), vec![Some(90), Some(10)]);
        assert_eq!(percentages(&[4, 1]), vec![Some(80), Some(20)]);
        assert_eq!(percentages(&[1, 1, 1]), vec![Some(34), Some(33), Some(33)]);
        assert_eq!(percentages(&[1, 0]), vec![Some(100), Some(0)]);
        assert_eq!(percentages(&[7]), vec![None]);
    }

    #[test]
    fn path_prefix_matches_whole_elements() {
        let re = regex::Regex::new(&format!("^(?:{})$", prefix_regex("/v2/"))).expect("regex");
        assert!(re.is_match("/v2"));
        assert!(re.is_match("/v2/reviews"));
        assert!(!re.is_match("/v2x"));
    }
}
