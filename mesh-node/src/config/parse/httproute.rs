//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io` v1/v1beta1) read as the
//! VirtualServices it means. Nothing below the controller knows HTTPRoute.
//!
//! - Service parents (the GAMMA mesh profile): each `parentRef` of kind Service becomes a host
//!   (its `port`, if set, a match condition), served by the node proxies.
//! - Gateway parents (a parentRef's kind defaults to `Gateway`): a VirtualService with
//!   `gateways: [ns/name]`, `hosts` = `spec.hostnames` (`*` without), served by the gateway;
//!   the controller checks the parents and cross-namespace backends (`ReferenceGrant`) first.
//!
//! A route with both kinds of parent means both. Each rule is an `http` route; `matches`
//! (path `Exact`/`PathPrefix`/`RegularExpression`, headers `Exact`/`RegularExpression`,
//! `method`) match requests; `backendRefs` (Services, with `port`) are destinations whose
//! relative weights (default 1) become percentages; `timeouts.request` the route's timeout. On
//! Gateway parents the filters `RequestRedirect`, `RequestHeaderModifier`,
//! `ResponseHeaderModifier` and `URLRewrite` become `redirect`, `headers` and `rewrite`.
//! What sidenode cannot honour (other filters, filters on Service parents, query-parameter
//! matches, cross-namespace backends on Service parents) is an error naming the field:
//! silently ignoring it would route differently than asked.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ObjError, RawMeta};
use crate::model::ObjKey;
use crate::model::gatewayapi::{GatewayRoute, RouteBackend, RouteKind, RouteParent, route_of};
use crate::model::istio::{
    HeaderOperations, Headers, HttpMatchRequest, HttpRedirect, HttpRewrite,
    HttpRoute as VsHttpRoute, RouteDestination, StringMatch, VirtualServiceSpec,
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
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ParentRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    section_name: Option<String>,
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
    filters: Vec<Filter>,
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
pub(super) struct BackendRef {
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

/// An `HTTPRouteFilter`: its `type` and the one member that goes with it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(rename = "type")]
    kind: String,
    request_redirect: Option<RedirectFilter>,
    request_header_modifier: Option<HeaderModifier>,
    response_header_modifier: Option<HeaderModifier>,
    #[serde(rename = "urlRewrite")]
    url_rewrite: Option<RewriteFilter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RedirectFilter {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifier>,
    port: Option<u32>,
    status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RewriteFilter {
    hostname: Option<String>,
    path: Option<PathModifier>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathModifier {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize, Default)]
struct HeaderModifier {
    #[serde(default)]
    set: Vec<HeaderValue>,
    #[serde(default)]
    add: Vec<HeaderValue>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
struct HeaderValue {
    name: String,
    value: String,
}

/// A parentRef names a Service only explicitly: its kind defaults to `Gateway`.
fn parent_is_service(p: &ParentRef) -> bool {
    p.kind.as_deref() == Some("Service")
        && matches!(p.group.as_deref(), None | Some("") | Some("core"))
}

fn parent_is_gateway(p: &ParentRef) -> bool {
    matches!(p.kind.as_deref(), None | Some("Gateway"))
        && matches!(
            p.group.as_deref(),
            None | Some(crate::model::gatewayapi::GROUP)
        )
}

/// The Gateway parents of a route in `namespace`, their namespaces resolved.
pub(super) fn gateway_parents(refs: &[ParentRef], namespace: &str) -> Vec<RouteParent> {
    refs.iter()
        .filter(|p| parent_is_gateway(p))
        .map(|p| RouteParent {
            gateway: ObjKey {
                namespace: p.namespace.clone().unwrap_or_else(|| namespace.to_string()),
                name: p.name.clone(),
            },
            section_name: p.section_name.clone(),
            port: p.port,
        })
        .collect()
}

/// A backendRef's kind defaults to `Service` (core group).
fn is_core_service(group: &Option<String>, kind: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some("core"))
        && matches!(kind.as_deref(), None | Some("Service"))
}

/// One rule's `backendRefs` (field path `rf`): its destinations and, for the controller's
/// checks, its backends. Cross-namespace backends only where `cross_namespace` (Gateway
/// parents: the controller checks the `ReferenceGrant`).
pub(super) fn backends(
    refs: &[BackendRef],
    namespace: &str,
    line: usize,
    rf: &str,
    rule: usize,
    cross_namespace: bool,
) -> Result<(Vec<RouteDestination>, Vec<RouteBackend>), ObjError> {
    let f = |field: String, msg: &str| ObjError::field(line, &field, msg);
    let mut out = Vec::new();
    for (j, b) in refs.iter().enumerate() {
        let bf = format!("{rf}.backendRefs[{j}]");
        if !is_core_service(&b.group, &b.kind) {
            return Err(f(
                format!("{bf}.kind"),
                "only Service backends are supported",
            ));
        }
        if b.name.is_empty() {
            return Err(f(format!("{bf}.name"), "missing"));
        }
        let ns = b.namespace.clone().unwrap_or_else(|| namespace.to_string());
        if ns != namespace && !cross_namespace {
            return Err(f(
                format!("{bf}.namespace"),
                "backends in other namespaces are supported only on Gateway parents",
            ));
        }
        if !b.filters.is_empty() {
            return Err(f(
                format!("{bf}.filters"),
                "backend filters are not supported by sidenode",
            ));
        }
        let Some(port) = b.port else {
            return Err(f(format!("{bf}.port"), "required for a Service backend"));
        };
        if port == 0 || port > 65535 {
            return Err(f(format!("{bf}.port"), "not a port (1-65535)"));
        }
        out.push(RouteBackend {
            rule,
            service: ObjKey {
                namespace: ns,
                name: b.name.clone(),
            },
            port,
            weight: b.weight.unwrap_or(1),
        });
    }
    if !out.is_empty() && out.iter().all(|b| b.weight == 0) {
        return Err(f(
            format!("{rf}.backendRefs"),
            "every backend has weight 0 (no request could be served)",
        ));
    }
    Ok((route_of(&out, namespace), out))
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

/// The `redirect`, `rewrite` and `headers` a rule's filters mean (Gateway parents only).
#[derive(Default)]
struct Filters {
    redirect: Option<HttpRedirect>,
    rewrite: Option<HttpRewrite>,
    headers: Option<Headers>,
}

fn header_ops(m: &HeaderModifier) -> HeaderOperations {
    HeaderOperations {
        set: m
            .set
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        add: m
            .add
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        remove: m.remove.clone(),
    }
}

fn filters(fs: &[Filter], line: usize, rf: &str) -> Result<Filters, ObjError> {
    let f = |field: String, msg: String| ObjError::field(line, &field, msg);
    let mut out = Filters::default();
    for (k, filter) in fs.iter().enumerate() {
        let ff = format!("{rf}.filters[{k}]");
        let missing = |member: &str| f(format!("{ff}.{member}"), "missing".into());
        match filter.kind.as_str() {
            "RequestRedirect" => {
                let r = filter
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                let uri = match &r.path {
                    None => None,
                    Some(p) if p.kind == "ReplaceFullPath" => Some(
                        p.replace_full_path
                            .clone()
                            .ok_or_else(|| missing("requestRedirect.path.replaceFullPath"))?,
                    ),
                    Some(p) => {
                        return Err(f(
                            format!("{ff}.requestRedirect.path.type"),
                            format!(
                                "`{}`: sidenode redirects to a whole path only (ReplaceFullPath)",
                                p.kind
                            ),
                        ));
                    }
                };
                out.redirect = Some(HttpRedirect {
                    uri,
                    authority: r.hostname.clone(),
                    scheme: r.scheme.clone(),
                    port: r.port,
                    redirect_code: r.status_code,
                });
            }
            "URLRewrite" => {
                let r = filter
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                let uri = match &r.path {
                    None => None,
                    Some(p) => Some(match p.kind.as_str() {
                        "ReplaceFullPath" => p
                            .replace_full_path
                            .clone()
                            .ok_or_else(|| missing("urlRewrite.path.replaceFullPath"))?,
                        "ReplacePrefixMatch" => p
                            .replace_prefix_match
                            .clone()
                            .ok_or_else(|| missing("urlRewrite.path.replacePrefixMatch"))?,
                        other => {
                            return Err(f(
                                format!("{ff}.urlRewrite.path.type"),
                                format!("`{other}` is not ReplaceFullPath or ReplacePrefixMatch"),
                            ));
                        }
                    }),
                };
                out.rewrite = Some(HttpRewrite {
                    uri,
                    authority: r.hostname.clone(),
                });
            }
            "RequestHeaderModifier" => {
                let m = filter
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                out.headers.get_or_insert_with(Headers::default).request = Some(header_ops(m));
            }
            "ResponseHeaderModifier" => {
                let m = filter
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                out.headers.get_or_insert_with(Headers::default).response = Some(header_ops(m));
            }
            other => {
                return Err(f(
                    format!("{ff}.type"),
                    format!(
                        "`{other}` is not supported by sidenode (RequestRedirect, URLRewrite, \
                         RequestHeaderModifier, ResponseHeaderModifier)"
                    ),
                ));
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(f(
            format!("{rf}.filters"),
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    Ok(out)
}

/// A rule's `matches` as Istio match requests (`port`, from a Service parent, on each).
fn matches(
    rule: &Rule,
    line: usize,
    rf: &str,
    port: Option<u32>,
) -> Result<Vec<HttpMatchRequest>, ObjError> {
    let f = |field: String, msg: String| ObjError::field(line, &field, msg);
    let mut out = Vec::new();
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
                            format!("`{other}` is not Exact, PathPrefix or RegularExpression"),
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
        out.push(HttpMatchRequest {
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
    if out.is_empty() && port.is_some() {
        out.push(HttpMatchRequest {
            port,
            ..Default::default()
        });
    }
    Ok(out)
}

impl RawHttpRoute {
    /// The VirtualService for its Service parents (GAMMA), if any.
    pub(super) fn mesh_virtual_service(
        &self,
        line: usize,
        namespace: &str,
    ) -> Result<Option<VirtualServiceSpec>, ObjError> {
        let f = |field: String, msg: String| ObjError::field(line, &field, msg);
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for p in &self.spec.parent_refs {
            if !parent_is_service(p) {
                continue; // a Gateway's route: see `gateway_route`
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
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let rf = format!("spec.rules[{i}]");
            if !rule.filters.is_empty() {
                return Err(f(
                    format!("{rf}.filters"),
                    "filters are not supported by sidenode on Service parents".into(),
                ));
            }
            let r#match = matches(rule, line, &rf, port)?;
            let (route, _) = backends(&rule.backend_refs, namespace, line, &rf, i, false)?;
            if route.is_empty() {
                return Err(f(format!("{rf}.backendRefs"), "no backend".into()));
            }
            http.push(VsHttpRoute {
                name: Some(format!("rule-{i}")),
                r#match,
                route,
                timeout: rule.timeouts.as_ref().and_then(|t| t.request.clone()),
                ..Default::default()
            });
        }
        Ok(Some(VirtualServiceSpec {
            hosts,
            http,
            ..Default::default()
        }))
    }

    /// The route for its Gateway parents, if any.
    pub(super) fn gateway_route(
        &self,
        origin: &crate::model::Origin,
        key: &ObjKey,
    ) -> Result<Option<GatewayRoute>, ObjError> {
        let line = origin.line;
        let f = |field: String, msg: String| ObjError::field(line, &field, msg);
        let parents = gateway_parents(&self.spec.parent_refs, &key.namespace);
        if parents.is_empty() {
            return Ok(None);
        }
        for (i, h) in self.spec.hostnames.iter().enumerate() {
            if h.is_empty() || h.contains('/') || h.contains(':') {
                return Err(f(
                    format!("spec.hostnames[{i}]"),
                    format!("`{h}` is not a host name"),
                ));
            }
        }
        let mut http = Vec::new();
        let mut all_backends = Vec::new();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let rf = format!("spec.rules[{i}]");
            let fl = filters(&rule.filters, line, &rf)?;
            let r#match = matches(rule, line, &rf, None)?;
            let (route, bs) = backends(&rule.backend_refs, &key.namespace, line, &rf, i, true)?;
            if fl.redirect.is_some() && !route.is_empty() {
                return Err(f(
                    format!("{rf}.backendRefs"),
                    "a rule with a RequestRedirect filter answers the redirect itself: it has no backendRefs".into(),
                ));
            }
            if fl.redirect.is_none() && route.is_empty() {
                return Err(f(format!("{rf}.backendRefs"), "no backend".into()));
            }
            all_backends.extend(bs);
            http.push(VsHttpRoute {
                name: Some(format!("rule-{i}")),
                r#match,
                route,
                timeout: rule.timeouts.as_ref().and_then(|t| t.request.clone()),
                redirect: fl.redirect,
                rewrite: fl.rewrite,
                headers: fl.headers,
                ..Default::default()
            });
        }
        let hosts = if self.spec.hostnames.is_empty() {
            vec!["*".to_string()]
        } else {
            self.spec.hostnames.clone()
        };
        Ok(Some(GatewayRoute {
            kind: RouteKind::Http,
            key: key.clone(),
            generation: self.metadata.generation.unwrap_or(0),
            spec: VirtualServiceSpec {
                hosts,
                gateways: parents.iter().map(|p| p.gateway.to_string()).collect(),
                http,
                ..Default::default()
            },
            parents,
            backends: all_backends,
            origin: origin.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_prefix_matches_whole_elements() {
        let re = regex::Regex::new(&format!("^(?:{})$", prefix_regex("/v2/"))).expect("regex");
        assert!(re.is_match("/v2"));
        assert!(re.is_match("/v2/reviews"));
        assert!(!re.is_match("/v2x"));
    }
}
