//! HTTP-aware routing (VirtualService `http` routes) for service ports that speak HTTP. Pure
//! functions over [`NodeState`], as the L4 ones in `route`: which ports are HTTP, which route
//! and weighted destination a request takes ([`select`]), one endpoint for an attempt
//! ([`pick_endpoint`]), and the parsing of a route's `retries`. The proxy's `http` module
//! terminates the client's HTTP and acts on them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::model::ObjKey;
use crate::model::gateway::host_matches;
use crate::model::istio::{
    Headers, HttpFault, HttpMatchRequest, HttpRedirect, HttpRetry, HttpRewrite, HttpRoute,
    StringMatch, VirtualServiceSpec, parse_duration,
};
use crate::proxy::refusal::Refusal;
use crate::state::NodeState;
use crate::state::protocol::is_http_port;

use super::{Balancer, Decision, Source, balance, destination_rule_for, service};

/// Is `dst` a service VIP whose port is HTTP?
pub fn is_http_service_port(st: &NodeState, dst: SocketAddr) -> bool {
    service::service_by_vip(st, dst.ip())
        .and_then(|svc| service::service_port(svc, dst.port()))
        .is_some_and(is_http_port)
}

/// What routing needs of one HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// `:path` with its query string.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Where the attempts of a request go: a service, its port and subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The destination Service (`namespace/name`).
    pub service: String,
    pub port: u16,
    pub subset: Option<String>,
    /// The VirtualService that routed it (`namespace/name`) and the route's index.
    pub vs: Option<(String, usize)>,
    /// Namespace of the routing VirtualService (finds the DestinationRule).
    vs_namespace: Option<String>,
}

/// A route's behaviour besides its destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutePolicy {
    /// Whole request, until the response headers (`timeout`).
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<HttpFault>,
    pub rewrite: Option<HttpRewrite>,
    pub headers: Option<Headers>,
    /// The `uri.prefix` of the match that selected the route (what `rewrite.uri` and
    /// `redirect.uri` replace).
    pub matched_prefix: Option<String>,
}

/// What to do with one HTTP request to a service VIP.
#[derive(Clone, Debug, PartialEq)]
pub enum HttpDecision {
    NotService,
    /// A VirtualService applies but none of its `http` routes matches: 404 (Envoy's `NR`).
    NoMatch {
        service: String,
        vs: String,
    },
    /// A route naming an unknown host, subset or port: 503, logged with `why`.
    Refuse {
        service: String,
        reason: Refusal,
        why: String,
    },
    /// A gateway received a request for a host none of its servers on that port serves: 404.
    UnknownHost,
    /// A route answering with a redirect (`redirect`).
    Redirect {
        service: String,
        redirect: HttpRedirect,
    },
    /// A route whose only action is a fault (`abort`) and no destination.
    FaultOnly {
        service: String,
        policy: RoutePolicy,
    },
    Forward {
        plan: Plan,
        policy: RoutePolicy,
    },
}

/// The route and destination (service, port, subset) of one request from `src` to `orig_dst`.
pub fn select(
    st: &NodeState,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    orig_dst: SocketAddr,
    req: &RequestInfo<'_>,
) -> HttpDecision {
    let Some(svc) = service::service_by_vip(st, orig_dst.ip()) else {
        return HttpDecision::NotService;
    };
    let refuse = |why: String| HttpDecision::Refuse {
        service: svc.uid.clone(),
        reason: Refusal::NoRoute,
        why,
    };
    if service::service_port(svc, orig_dst.port()).is_none() {
        return refuse(format!(
            "service {} has no port {}",
            svc.uid,
            orig_dst.port()
        ));
    }
    let plain = |policy: RoutePolicy| HttpDecision::Forward {
        plan: Plan {
            service: svc.uid.clone(),
            port: orig_dst.port(),
            subset: None,
            vs: None,
            vs_namespace: None,
        },
        policy,
    };
    let Some((vs_key, vs)) = super::virtual_service_for(st, svc, src.namespace) else {
        return plain(RoutePolicy::default());
    };
    if vs.http.is_empty() {
        return plain(RoutePolicy::default());
    }
    route_in(
        st,
        rng,
        src,
        &svc.uid,
        vs_key,
        vs,
        orig_dst.port(),
        Some(orig_dst.port()),
        req,
    )
}

/// The gateway servers of one listening port: which Gateway (`namespace/name`) serves which
/// hosts there (`model::gateway::Server::hosts`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatewayPort {
    pub port: u16,
    pub servers: Vec<(ObjKey, Vec<String>)>,
}

impl GatewayPort {
    /// The Gateways serving `host` (no port, lower case) on this port.
    pub fn gateways_for(&self, host: &str) -> Vec<&ObjKey> {
        let mut out: Vec<&ObjKey> = self
            .servers
            .iter()
            .filter(|(_, hosts)| hosts.iter().any(|h| host_matches(h, host)))
            .map(|(k, _)| k)
            .collect();
        out.dedup();
        out
    }
}

/// The route and destination of a request that reached a gateway on `gw.port` for `host`:
/// the VirtualService bound to one of the Gateways serving that host (`gateways`), with a host
/// matching the request's, then its `http` routes as for the mesh ([`select`]).
/// `UnknownHost` when no server of the port serves the host, `NoMatch` when no route does.
pub fn select_gateway(
    st: &NodeState,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    gw: &GatewayPort,
    host: &str,
    req: &RequestInfo<'_>,
) -> HttpDecision {
    let gateways = gw.gateways_for(host);
    if gateways.is_empty() {
        return HttpDecision::UnknownHost;
    }
    let mut found: Vec<(&ObjKey, &VirtualServiceSpec)> =
        super::gateway_virtual_services(st, &gateways)
            .into_iter()
            .filter(|(_, vs)| vs.hosts.iter().any(|h| host_matches(h, host)))
            .collect();
    // The most specific host first (an exact name before a wildcard), then by name.
    found.sort_by_key(|(k, vs)| {
        let exact = vs.hosts.iter().any(|h| h.eq_ignore_ascii_case(host));
        (!exact, (*k).clone())
    });
    let Some((vs_key, vs)) = found.into_iter().find(|(_, vs)| !vs.http.is_empty()) else {
        return HttpDecision::NoMatch {
            service: String::new(),
            vs: String::new(),
        };
    };
    route_in(st, rng, src, "", vs_key, vs, gw.port, None, req)
}

/// The first `http` route of `vs` that matches the request, and its weighted destination.
/// `port` is the port the request came to (for `match.port`); `default_port` the destination
/// port when the route names none (the mesh: the VIP's port; a gateway: the service's port
/// when it has only one).
#[allow(clippy::too_many_arguments)]
fn route_in(
    st: &NodeState,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    service: &str,
    vs_key: &ObjKey,
    vs: &VirtualServiceSpec,
    port: u16,
    default_port: Option<u16>,
    req: &RequestInfo<'_>,
) -> HttpDecision {
    let refuse = |why: String| HttpDecision::Refuse {
        service: service.to_string(),
        reason: Refusal::NoRoute,
        why,
    };
    let at = SocketAddr::from(([0, 0, 0, 0], port));
    let Some((ri, r, m)) = vs.http.iter().enumerate().find_map(|(i, r)| {
        if r.r#match.is_empty() {
            return Some((i, r, None));
        }
        r.r#match
            .iter()
            .find(|m| request_matches(m, src, at, req))
            .map(|m| (i, r, Some(m)))
    }) else {
        return HttpDecision::NoMatch {
            service: service.to_string(),
            vs: vs_key.to_string(),
        };
    };
    let mut policy = route_policy(r);
    policy.matched_prefix = m
        .and_then(|m| m.uri.as_ref())
        .and_then(|u| u.prefix.clone());
    if let Some(redirect) = &r.redirect {
        return HttpDecision::Redirect {
            service: service.to_string(),
            redirect: redirect.clone(),
        };
    }
    if r.route.is_empty() {
        return HttpDecision::FaultOnly {
            service: service.to_string(),
            policy,
        };
    }
    let single = r.route.len() == 1;
    let weights: Vec<u32> = r
        .route
        .iter()
        .map(|d| match d.weight {
            None if single => 100,
            w => w.unwrap_or(0).clamp(0, 100).unsigned_abs(),
        })
        .collect();
    let Some(di) = balance::pick_weighted(&weights, rng) else {
        return refuse(format!(
            "VirtualService {vs_key}: spec.http[{ri}].route has no destination with weight"
        ));
    };
    let d = &r.route[di].destination;
    let field = format!("VirtualService {vs_key}: spec.http[{ri}].route[{di}].destination");
    let Some(dsvc) = service::service_for_host(st, &d.host, &vs_key.namespace) else {
        return refuse(format!("{field}.host `{}` names no known service", d.host));
    };
    let default_port =
        default_port.or_else(|| (dsvc.ports.len() == 1).then(|| dsvc.ports[0].port as u16));
    let port = match d.port.as_ref().and_then(|p| p.number) {
        Some(n) => match u16::try_from(n) {
            Ok(p) if service::service_port(dsvc, p).is_some() => p,
            _ => {
                return refuse(format!(
                    "{field}.port.number {n} is not a port of service {}",
                    dsvc.uid
                ));
            }
        },
        None => match default_port {
            Some(p) if service::service_port(dsvc, p).is_some() => p,
            Some(p) => {
                return refuse(format!(
                    "{field}: service {} has no port {p} (set port.number)",
                    dsvc.uid
                ));
            }
            None => {
                return refuse(format!(
                    "{field}: service {} has several ports (set port.number)",
                    dsvc.uid
                ));
            }
        },
    };
    if let Some(name) = &d.subset {
        let known = destination_rule_for(st, dsvc, &vs_key.namespace, src.namespace)
            .is_some_and(|(_, dr)| dr.subsets.iter().any(|s| &s.name == name));
        if !known {
            return refuse(format!(
                "{field}.subset `{name}` is not defined by a DestinationRule for service {}",
                dsvc.uid
            ));
        }
    }
    HttpDecision::Forward {
        plan: Plan {
            service: dsvc.uid.clone(),
            port,
            subset: d.subset.clone(),
            vs: Some((vs_key.to_string(), ri)),
            vs_namespace: Some(vs_key.namespace.clone()),
        },
        policy,
    }
}

/// One endpoint for an attempt of a request planned by [`select`].
pub fn pick_endpoint(
    st: &NodeState,
    lb: &Balancer,
    health: Option<&super::Health>,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    orig_dst: SocketAddr,
    plan: &Plan,
) -> Decision {
    let Some(svc) = st.services.get(&plan.service) else {
        return Decision::Refuse {
            service: plan.service.clone(),
            reason: Refusal::NoRoute,
            why: format!("service {} is gone", plan.service),
        };
    };
    let ctx_ns = plan.vs_namespace.as_deref().unwrap_or(src.namespace);
    let subset = match &plan.subset {
        None => None,
        Some(name) => {
            let found = destination_rule_for(st, svc, ctx_ns, src.namespace)
                .and_then(|(_, dr)| dr.subsets.iter().find(|s| &s.name == name).map(|s| (dr, s)));
            match found {
                Some(x) => Some(x),
                None => {
                    return Decision::Refuse {
                        service: svc.uid.clone(),
                        reason: Refusal::NoRoute,
                        why: format!(
                            "subset `{name}` is not defined by a DestinationRule for service {}",
                            svc.uid
                        ),
                    };
                }
            }
        }
    };
    let mut out = super::to_service(
        st,
        lb,
        health,
        rng,
        src,
        orig_dst,
        svc,
        plan.port,
        subset,
        plan.vs_namespace.as_deref(),
    );
    if let Decision::Endpoint(r) = &mut out {
        r.route = plan.vs.as_ref().map(|(k, _)| k.clone());
    }
    out
}

fn route_policy(r: &HttpRoute) -> RoutePolicy {
    RoutePolicy {
        timeout: r
            .timeout
            .as_deref()
            .and_then(parse_duration)
            .filter(|d| !d.is_zero()),
        retry: RetryPolicy::from_istio(r.retries.as_ref()),
        fault: r.fault.clone(),
        rewrite: r.rewrite.clone(),
        headers: r.headers.clone(),
        matched_prefix: None,
    }
}

/// Does an HTTP match entry accept this request? Every condition set must hold.
pub fn request_matches(
    m: &HttpMatchRequest,
    src: &Source<'_>,
    dst: SocketAddr,
    req: &RequestInfo<'_>,
) -> bool {
    if let Some(p) = m.port
        && p != u32::from(dst.port())
    {
        return false;
    }
    if !m.source_labels.is_empty()
        && !src
            .labels
            .is_some_and(|have| service::labels_match(&m.source_labels, have))
    {
        return false;
    }
    if let Some(u) = &m.uri
        && !uri_matches(u, req.path)
    {
        return false;
    }
    if let Some(meth) = &m.method
        && !string_matches(meth, req.method)
    {
        return false;
    }
    m.headers.iter().all(|(name, sm)| {
        let values: Vec<&str> = req
            .headers
            .get_all(name.to_ascii_lowercase().as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        // A header absent never matches; several values are matched joined by `,` (Envoy).
        !values.is_empty() && string_matches(sm, &values.join(","))
    })
}

/// Envoy's path matching: `exact` and `regex` on the path without its query string, `prefix`
/// on the whole `:path`.
pub fn uri_matches(m: &StringMatch, path: &str) -> bool {
    let no_query = path.split_once('?').map_or(path, |(p, _)| p);
    if let Some(e) = &m.exact {
        return no_query == e;
    }
    if let Some(p) = &m.prefix {
        return path.starts_with(p.as_str());
    }
    if let Some(r) = &m.regex {
        return full_regex(r).is_some_and(|re| re.is_match(no_query));
    }
    false
}

/// `exact`, `prefix` or `regex` (the whole value must match, as RE2 in Envoy).
pub fn string_matches(m: &StringMatch, value: &str) -> bool {
    if let Some(e) = &m.exact {
        return value == e;
    }
    if let Some(p) = &m.prefix {
        return value.starts_with(p.as_str());
    }
    if let Some(r) = &m.regex {
        return full_regex(r).is_some_and(|re| re.is_match(value));
    }
    false
}

/// The compiled, anchored form of `pattern` (cached; `None` when it does not compile).
fn full_regex(pattern: &str) -> Option<Arc<regex::Regex>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Arc<regex::Regex>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = c.get(pattern) {
        return r.clone();
    }
    let compiled = regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(Arc::new)
        .map_err(|e| tracing::warn!(pattern, error = %e, "VirtualService regex does not compile; it matches nothing"))
        .ok();
    if c.len() > 1024 {
        c.clear();
    }
    c.insert(pattern.to_string(), compiled.clone());
    compiled
}

/// Retries of a route (`retries`): how many, on what, each with what deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Istio's `attempts`).
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

impl Default for RetryPolicy {
    /// Without `retries`: 2 retries on `connect-failure` and `reset` (Istio also retries
    /// `refused-stream`, `unavailable`, `cancelled` and 503).
    fn default() -> Self {
        RetryPolicy {
            retries: 2,
            per_try_timeout: None,
            on: RetryOn {
                connect_failure: true,
                reset: true,
                ..Default::default()
            },
        }
    }
}

impl RetryPolicy {
    pub fn from_istio(r: Option<&HttpRetry>) -> RetryPolicy {
        let Some(r) = r else {
            return RetryPolicy::default();
        };
        RetryPolicy {
            retries: r.attempts.max(0).unsigned_abs(),
            per_try_timeout: r
                .per_try_timeout
                .as_deref()
                .and_then(parse_duration)
                .filter(|d| !d.is_zero()),
            // Istio's default `retryOn` when `retries` is given without one.
            on: RetryOn::parse(
                r.retry_on
                    .as_deref()
                    .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503"),
            ),
        }
    }
}

/// The conditions of `retryOn` that sidenode acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer, a reset or a per-try timeout.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504 or a per-try timeout.
    pub gateway_error: bool,
    /// `connect-failure`: the upstream connection (or tunnel) could not be opened.
    pub connect_failure: bool,
    /// `reset` (and `refused-stream`): the upstream closed before a response.
    pub reset: bool,
    /// Status codes named in the list (`retriable-status-codes` with numbers, or `503`).
    pub statuses: Vec<u16>,
    /// Entries not understood (ignored).
    pub unknown: Vec<String>,
}

/// Why an attempt failed, for [`RetryOn::retries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptFailure {
    Connect,
    Reset,
    PerTryTimeout,
    Status(u16),
}

impl RetryOn {
    /// A comma list as in Istio's `retryOn`.
    pub fn parse(s: &str) -> RetryOn {
        let mut out = RetryOn::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "5xx" => out.five_xx = true,
                "gateway-error" => out.gateway_error = true,
                "connect-failure" => out.connect_failure = true,
                "reset" | "refused-stream" => out.reset = true,
                "unavailable" | "cancelled" | "retriable-status-codes" => {}
                other => match other.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => out.statuses.push(code),
                    _ => out.unknown.push(other.to_string()),
                },
            }
        }
        out
    }

    /// Is an attempt that failed this way tried again?
    pub fn retries(&self, f: AttemptFailure) -> bool {
        match f {
            AttemptFailure::Connect => self.connect_failure || self.five_xx,
            AttemptFailure::Reset => self.reset || self.five_xx,
            AttemptFailure::PerTryTimeout => self.five_xx || self.gateway_error,
            AttemptFailure::Status(code) => {
                (self.five_xx && (500..=599).contains(&code))
                    || (self.gateway_error && matches!(code, 502..=504))
                    || self.statuses.contains(&code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    fn sm_exact(s: &str) -> StringMatch {
        StringMatch {
            exact: Some(s.into()),
            ..Default::default()
        }
    }
    fn sm_prefix(s: &str) -> StringMatch {
        StringMatch {
            prefix: Some(s.into()),
            ..Default::default()
        }
    }
    fn sm_regex(s: &str) -> StringMatch {
        StringMatch {
            regex: Some(s.into()),
            ..Default::default()
        }
    }

    #[test]
    fn uri_exact_prefix_regex() {
        assert!(uri_matches(&sm_exact("/a"), "/a"));
        assert!(uri_matches(&sm_exact("/a"), "/a?x=1"));
        assert!(!uri_matches(&sm_exact("/a"), "/ab"));
        assert!(uri_matches(&sm_prefix("/v2/"), "/v2/reviews"));
        assert!(!uri_matches(&sm_prefix("/v2/"), "/v2"));
        assert!(uri_matches(&sm_regex("/r/[0-9]+"), "/r/42"));
        assert!(uri_matches(&sm_regex("/r/[0-9]+"), "/r/42?q=a"));
        // Full match, not a search.
        assert!(!uri_matches(&sm_regex("/r/[0-9]+"), "/r/42/x"));
        assert!(!uri_matches(&sm_regex("[0-9]+"), "/r/42"));
        // An invalid regex matches nothing.
        assert!(!uri_matches(&sm_regex("(("), "(("));
        assert!(string_matches(&sm_regex("GET|HEAD"), "HEAD"));
        assert!(!string_matches(&sm_regex("GET|HEAD"), "GETX"));
    }

    fn headers(kv: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in kv {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn match_entries_need_every_condition() {
        let dst: SocketAddr = "10.96.0.10:80".parse().expect("addr");
        let labels: HashMap<String, String> =
            [("app".to_string(), "productpage".to_string())].into();
        let src = Source {
            namespace: "shop",
            labels: Some(&labels),
        };
        let h = headers(&[("end-user", "jason"), ("x-b", "1"), ("x-b", "2")]);
        let req = RequestInfo {
            method: "POST",
            path: "/v2/x",
            headers: &h,
        };
        let mut m = HttpMatchRequest {
            headers: [("End-User".to_string(), sm_exact("jason"))].into(),
            ..Default::default()
        };
        assert!(request_matches(&m, &src, dst, &req));
        m.headers.insert("x-b".into(), sm_exact("1,2"));
        assert!(request_matches(&m, &src, dst, &req));
        m.headers.insert("missing".into(), sm_regex(".*"));
        assert!(!request_matches(&m, &src, dst, &req), "absent header");
        m.headers.clear();
        m.method = Some(sm_exact("GET"));
        assert!(!request_matches(&m, &src, dst, &req));
        m.method = Some(sm_exact("POST"));
        m.uri = Some(sm_prefix("/v2/"));
        m.port = Some(80);
        assert!(request_matches(&m, &src, dst, &req));
        m.port = Some(8080);
        assert!(!request_matches(&m, &src, dst, &req));
        m.port = None;
        m.source_labels = [("app".to_string(), "other".to_string())].into();
        assert!(!request_matches(&m, &src, dst, &req));
        m.source_labels = [("app".to_string(), "productpage".to_string())].into();
        assert!(request_matches(&m, &src, dst, &req));
        let anon = Source {
            namespace: "shop",
            labels: None,
        };
        assert!(!request_matches(&m, &anon, dst, &req));
    }

    #[test]
    fn retry_on_parsing() {
        let r = RetryOn::parse("5xx, connect-failure,refused-stream,418,bogus");
        assert!(r.five_xx && r.connect_failure && r.reset && !r.gateway_error);
        assert_eq!(r.statuses, vec![418]);
        assert_eq!(r.unknown, vec!["bogus".to_string()]);
        assert!(r.retries(AttemptFailure::Status(500)));
        assert!(r.retries(AttemptFailure::Status(418)));
        assert!(!r.retries(AttemptFailure::Status(404)));
        let g = RetryOn::parse("gateway-error");
        assert!(g.retries(AttemptFailure::Status(503)));
        assert!(!g.retries(AttemptFailure::Status(500)));
        assert!(g.retries(AttemptFailure::PerTryTimeout));
        assert!(!g.retries(AttemptFailure::Connect));
        // Defaults: absent `retries` → 2 on connect failure and reset only.
        let d = RetryPolicy::from_istio(None);
        assert_eq!(d.retries, 2);
        assert!(d.on.retries(AttemptFailure::Connect) && d.on.retries(AttemptFailure::Reset));
        assert!(!d.on.retries(AttemptFailure::Status(503)));
        // `retries` without `retryOn`: Istio's list (503 included).
        let p = RetryPolicy::from_istio(Some(&HttpRetry {
            attempts: 3,
            per_try_timeout: Some("250ms".into()),
            retry_on: None,
        }));
        assert_eq!(p.retries, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(250)));
        assert!(p.on.retries(AttemptFailure::Status(503)));
        assert!(!p.on.retries(AttemptFailure::Status(500)));
    }

    fn state(vs_http: serde_json::Value) -> NodeState {
        let wl = |name: &str, ip: &str, version: &str| proto::Workload {
            uid: format!("shop/{name}"),
            namespace: "shop".into(),
            name: name.into(),
            service_account: "default".into(),
            ips: vec![ip.into()],
            meshed: true,
            ready: true,
            labels: [("app", "reviews"), ("version", version)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let config = |kind: &str, spec: serde_json::Value| proto::Config {
            uid: format!("{kind}/shop/reviews"),
            kind: kind.into(),
            namespace: "shop".into(),
            name: "reviews".into(),
            spec_json: serde_json::json!({"kind": kind, "spec": spec}).to_string(),
        };
        NodeState::default().apply(proto::StateUpdate {
            version: 1,
            snapshot: true,
            workloads: vec![wl("r1", "10.0.0.1", "v1"), wl("r2", "10.0.0.2", "v2")],
            services: vec![proto::Service {
                uid: "shop/reviews".into(),
                namespace: "shop".into(),
                name: "reviews".into(),
                cluster_ip: "10.96.0.10".into(),
                ports: vec![proto::ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: 9080,
                    ..Default::default()
                }],
                selector: [("app".to_string(), "reviews".to_string())].into(),
            }],
            configs: vec![
                config(
                    "DestinationRule",
                    serde_json::json!({"host": "reviews", "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}}]}),
                ),
                config(
                    "VirtualService",
                    serde_json::json!({"hosts": ["reviews"], "http": vs_http}),
                ),
            ],
            ..Default::default()
        })
    }

    fn subset_of(d: &HttpDecision) -> Option<&str> {
        match d {
            HttpDecision::Forward { plan, .. } => plan.subset.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn select_by_match_and_weight() {
        let st = state(serde_json::json!([
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}, {"uri": {"prefix": "/v2/"}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
             "timeout": "200ms", "retries": {"attempts": 3, "retryOn": "5xx"}},
            {"match": [{"method": {"exact": "DELETE"}}],
             "fault": {"abort": {"httpStatus": 418}}},
            {"match": [{"uri": {"regex": "/split(/.*)?"}}],
             "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                       {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]},
            {"match": [{"uri": {"exact": "/"}}],
             "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}
        ]));
        assert!(is_http_service_port(
            &st,
            "10.96.0.10:80".parse().expect("addr")
        ));
        let dst: SocketAddr = "10.96.0.10:80".parse().expect("addr");
        let src = Source {
            namespace: "shop",
            labels: None,
        };
        let mut rng = fastrand::Rng::with_seed(5);
        let none = http::HeaderMap::new();
        let jason = headers(&[("end-user", "jason")]);
        let req = |method, path, headers| RequestInfo {
            method,
            path,
            headers,
        };
        let d = select(&st, &mut rng, &src, dst, &req("GET", "/x", &jason));
        assert_eq!(subset_of(&d), Some("v2"));
        let HttpDecision::Forward { policy, plan } = &d else {
            panic!("{d:?}");
        };
        assert_eq!(policy.timeout, Some(Duration::from_millis(200)));
        assert_eq!(policy.retry.retries, 3);
        assert!(policy.retry.on.five_xx);
        assert_eq!(plan.vs, Some(("shop/reviews".to_string(), 0)));
        let d = select(&st, &mut rng, &src, dst, &req("GET", "/v2/reviews", &none));
        assert_eq!(subset_of(&d), Some("v2"));
        let d = select(&st, &mut rng, &src, dst, &req("GET", "/", &none));
        assert_eq!(subset_of(&d), Some("v1"));
        let d = select(&st, &mut rng, &src, dst, &req("DELETE", "/", &none));
        assert!(matches!(d, HttpDecision::FaultOnly { .. }), "{d:?}");
        // No route matches: Envoy's 404.
        let d = select(&st, &mut rng, &src, dst, &req("GET", "/nothing", &none));
        assert!(matches!(d, HttpDecision::NoMatch { .. }), "{d:?}");
        // 80/20 per request.
        let mut v1 = 0;
        for _ in 0..10_000 {
            let d = select(&st, &mut rng, &src, dst, &req("GET", "/split/a", &none));
            if subset_of(&d) == Some("v1") {
                v1 += 1;
            }
        }
        let share = f64::from(v1) / 100.0;
        assert!((77.0..=83.0).contains(&share), "v1 {share}%");
        // The endpoint of a plan is in its subset.
        let d = select(&st, &mut rng, &src, dst, &req("GET", "/", &none));
        let HttpDecision::Forward { plan, .. } = d else {
            panic!("not forwarded");
        };
        let lb = Balancer::default();
        for _ in 0..4 {
            match pick_endpoint(&st, &lb, None, &mut rng, &src, dst, &plan) {
                Decision::Endpoint(r) => {
                    assert_eq!(r.endpoint.addr, "10.0.0.1:9080".parse().expect("addr"));
                    assert_eq!(r.route.as_deref(), Some("shop/reviews"));
                }
                other => panic!("{other:?}"),
            }
        }
        // Not a VIP.
        let pod: SocketAddr = "10.0.0.1:9080".parse().expect("addr");
        assert_eq!(
            select(&st, &mut rng, &src, pod, &req("GET", "/", &none)),
            HttpDecision::NotService
        );
    }
}
