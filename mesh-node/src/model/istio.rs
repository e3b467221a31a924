//! The Istio objects the mesh reads — `networking.istio.io` `VirtualService` and
//! `DestinationRule`, `security.istio.io` `AuthorizationPolicy` and `PeerAuthentication` — as
//! typed specs, with sidenode's own namespaced policy `sidenode.io` `RateLimitPolicy`
//! (`super::ratelimit`), which travels the same way. The same types read a YAML file, a Kubernetes object and the controller's state
//! stream (which carries the validated spec as JSON), so the schema is written once.
//!
//! Field names follow Istio's API (camelCase). Fields the mesh does not use are ignored, as
//! Kubernetes would keep them; a field the mesh uses must have the right type, and
//! [`IstioSpec::validate`] checks what types alone cannot (weights, durations, ports).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::fields::{WorkloadSelector, parse_duration};
use super::fields::{bad, check_port};
use super::{Labels, ObjKey, Origin};

/// API groups and the versions read (the first is preferred).
pub const NETWORKING_GROUP: &str = "networking.istio.io";
pub const SECURITY_GROUP: &str = "security.istio.io";
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// sidenode's own API group and its versions.
pub const SIDENODE_GROUP: &str = "sidenode.io";
pub const SIDENODE_VERSIONS: [&str; 1] = ["v1alpha1"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IstioKind {
    VirtualService,
    DestinationRule,
    AuthorizationPolicy,
    PeerAuthentication,
    /// `sidenode.io/v1alpha1`, not Istio's; see `model::ratelimit`.
    RateLimitPolicy,
    /// `networking.istio.io` `Gateway`: the listeners of an ingress gateway (`super::gateway`).
    /// A Gateway API `Gateway` of sidenode's class travels in this form too.
    Gateway,
}

impl IstioKind {
    pub const ALL: [IstioKind; 6] = [
        IstioKind::VirtualService,
        IstioKind::DestinationRule,
        IstioKind::AuthorizationPolicy,
        IstioKind::PeerAuthentication,
        IstioKind::RateLimitPolicy,
        IstioKind::Gateway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IstioKind::VirtualService => "VirtualService",
            IstioKind::DestinationRule => "DestinationRule",
            IstioKind::AuthorizationPolicy => "AuthorizationPolicy",
            IstioKind::PeerAuthentication => "PeerAuthentication",
            IstioKind::RateLimitPolicy => "RateLimitPolicy",
            IstioKind::Gateway => "Gateway",
        }
    }

    pub fn parse(kind: &str) -> Option<IstioKind> {
        IstioKind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    pub fn group(self) -> &'static str {
        match self {
            IstioKind::VirtualService | IstioKind::DestinationRule | IstioKind::Gateway => {
                NETWORKING_GROUP
            }
            IstioKind::AuthorizationPolicy | IstioKind::PeerAuthentication => SECURITY_GROUP,
            IstioKind::RateLimitPolicy => SIDENODE_GROUP,
        }
    }

    /// The API versions read, the preferred first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            IstioKind::RateLimitPolicy => &SIDENODE_VERSIONS,
            IstioKind::Gateway => &["v1", "v1beta1", "v1alpha3"],
            _ => &VERSIONS,
        }
    }

    /// The resource name in URLs (`virtualservices`).
    pub fn plural(self) -> &'static str {
        match self {
            IstioKind::VirtualService => "virtualservices",
            IstioKind::DestinationRule => "destinationrules",
            IstioKind::AuthorizationPolicy => "authorizationpolicies",
            IstioKind::PeerAuthentication => "peerauthentications",
            IstioKind::RateLimitPolicy => "ratelimitpolicies",
            IstioKind::Gateway => "gateways",
        }
    }
}

/// One Istio object: where it lives and its (validated) spec.
#[derive(Clone, Debug, PartialEq)]
pub struct IstioObject {
    pub key: ObjKey,
    pub spec: IstioSpec,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec")]
pub enum IstioSpec {
    VirtualService(VirtualServiceSpec),
    DestinationRule(DestinationRuleSpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    PeerAuthentication(PeerAuthenticationSpec),
    RateLimitPolicy(super::ratelimit::RateLimitPolicySpec),
    Gateway(super::gateway::GatewaySpec),
}

impl IstioSpec {
    pub fn kind(&self) -> IstioKind {
        match self {
            IstioSpec::VirtualService(_) => IstioKind::VirtualService,
            IstioSpec::DestinationRule(_) => IstioKind::DestinationRule,
            IstioSpec::AuthorizationPolicy(_) => IstioKind::AuthorizationPolicy,
            IstioSpec::PeerAuthentication(_) => IstioKind::PeerAuthentication,
            IstioSpec::RateLimitPolicy(_) => IstioKind::RateLimitPolicy,
            IstioSpec::Gateway(_) => IstioKind::Gateway,
        }
    }

    /// Checks beyond types. `Err((field, message))`, the field path relative to the object.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self {
            IstioSpec::VirtualService(vs) => vs.validate(),
            IstioSpec::DestinationRule(dr) => dr.validate(),
            IstioSpec::AuthorizationPolicy(ap) => ap.validate(),
            IstioSpec::PeerAuthentication(pa) => pa.validate(),
            IstioSpec::RateLimitPolicy(rl) => rl.validate(),
            IstioSpec::Gateway(gw) => gw.validate(),
        }
    }
}

fn check_duration(field: String, d: &Option<String>) -> Result<(), (String, String)> {
    match d {
        Some(s) if parse_duration(s).is_none() => bad(
            field,
            format!("`{s}` is not a duration (like `500ms`, `2s`, `1m`)"),
        ),
        _ => Ok(()),
    }
}

/// Weights of a route's destinations: each 0..=100; with several destinations they total 100.
fn check_weights(field: &str, weights: &[Option<i32>]) -> Result<(), (String, String)> {
    for (i, w) in weights.iter().enumerate() {
        if let Some(w) = w
            && !(0..=100).contains(w)
        {
            return bad(format!("{field}[{i}].weight"), format!("{w} is not 0-100"));
        }
    }
    if weights.len() > 1 {
        let total: i32 = weights.iter().map(|w| w.unwrap_or(0)).sum();
        if total != 100 {
            return bad(
                field,
                format!("weights add up to {total}; they must total 100"),
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ VirtualService

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// TLS routes by SNI, without terminating: a gateway's `PASSTHROUGH` servers.
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

impl VirtualServiceSpec {
    /// Bound to the mesh's proxies (no `gateways`, or `mesh` among them)?
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }

    /// Bound to the gateway `gateway` (`namespace/name`); `gateways` entries without a
    /// namespace name one in the VirtualService's own namespace (`vs_namespace`).
    pub fn applies_to_gateway(&self, vs_namespace: &str, gateway: &super::ObjKey) -> bool {
        self.gateways.iter().any(|g| match g.split_once('/') {
            Some((ns, name)) => ns == gateway.namespace && name == gateway.name,
            None => vs_namespace == gateway.namespace && g == &gateway.name,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(default, rename = "match")]
    pub r#match: Vec<TlsMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    /// Server names (`*.example.com` allowed); required.
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    pub port: Option<u32>,
}

impl VirtualServiceSpec {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.hosts.is_empty() {
            return bad("spec.hosts", "at least one host is required");
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if h.is_empty() {
                return bad(format!("spec.hosts[{i}]"), "empty host");
            }
        }
        for (i, r) in self.tcp.iter().enumerate() {
            let f = format!("spec.tcp[{i}]");
            if r.route.is_empty() {
                return bad(format!("{f}.route"), "at least one destination is required");
            }
            let w: Vec<_> = r.route.iter().map(|d| d.weight).collect();
            check_weights(&format!("{f}.route"), &w)?;
            for (j, d) in r.route.iter().enumerate() {
                d.destination
                    .validate(format!("{f}.route[{j}].destination"))?;
            }
            for (j, m) in r.r#match.iter().enumerate() {
                check_port(format!("{f}.match[{j}].port"), m.port)?;
            }
        }
        for (i, r) in self.tls.iter().enumerate() {
            let f = format!("spec.tls[{i}]");
            if r.r#match.is_empty() {
                return bad(
                    format!("{f}.match"),
                    "at least one match (sniHosts) is required",
                );
            }
            for (j, m) in r.r#match.iter().enumerate() {
                if m.sni_hosts.is_empty() {
                    return bad(
                        format!("{f}.match[{j}].sniHosts"),
                        "at least one server name is required",
                    );
                }
                for (k, h) in m.sni_hosts.iter().enumerate() {
                    if h.is_empty() || h.contains('/') || h.contains(':') {
                        return bad(
                            format!("{f}.match[{j}].sniHosts[{k}]"),
                            format!("`{h}` is not a server name"),
                        );
                    }
                }
                check_port(format!("{f}.match[{j}].port"), m.port)?;
            }
            if r.route.is_empty() {
                return bad(format!("{f}.route"), "at least one destination is required");
            }
            let w: Vec<_> = r.route.iter().map(|d| d.weight).collect();
            check_weights(&format!("{f}.route"), &w)?;
            for (j, d) in r.route.iter().enumerate() {
                d.destination
                    .validate(format!("{f}.route[{j}].destination"))?;
            }
        }
        for (i, r) in self.http.iter().enumerate() {
            let f = format!("spec.http[{i}]");
            if r.route.is_empty()
                && r.redirect.is_none()
                && r.fault.as_ref().and_then(|x| x.abort.as_ref()).is_none()
            {
                return bad(format!("{f}.route"), "at least one destination is required");
            }
            let w: Vec<_> = r.route.iter().map(|d| d.weight).collect();
            check_weights(&format!("{f}.route"), &w)?;
            for (j, d) in r.route.iter().enumerate() {
                d.destination
                    .validate(format!("{f}.route[{j}].destination"))?;
            }
            for (j, m) in r.r#match.iter().enumerate() {
                let mf = format!("{f}.match[{j}]");
                check_port(format!("{mf}.port"), m.port)?;
                for (name, sm) in [("uri", &m.uri), ("method", &m.method)] {
                    if let Some(sm) = sm {
                        sm.validate(format!("{mf}.{name}"))?;
                    }
                }
                for (h, sm) in &m.headers {
                    sm.validate(format!("{mf}.headers.{h}"))?;
                }
            }
            check_duration(format!("{f}.timeout"), &r.timeout)?;
            r.validate_gateway_fields(&f)?;
            if let Some(rt) = &r.retries {
                check_duration(format!("{f}.retries.perTryTimeout"), &rt.per_try_timeout)?;
                if rt.attempts < 0 {
                    return bad(format!("{f}.retries.attempts"), "must not be negative");
                }
            }
            if let Some(fault) = &r.fault {
                if let Some(d) = &fault.delay {
                    check_duration(format!("{f}.fault.delay.fixedDelay"), &d.fixed_delay)?;
                }
                if let Some(a) = &fault.abort
                    && !(200..=599).contains(&a.http_status)
                {
                    return bad(
                        format!("{f}.fault.abort.httpStatus"),
                        format!("{} is not an HTTP status (200-599)", a.http_status),
                    );
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub r#match: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    pub port: Option<u32>,
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    #[serde(default)]
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

impl Destination {
    fn validate(&self, field: String) -> Result<(), (String, String)> {
        if self.host.is_empty() {
            return bad(format!("{field}.host"), "missing");
        }
        check_port(
            format!("{field}.port.number"),
            self.port.as_ref().and_then(|p| p.number),
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortSelector {
    pub number: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub r#match: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    /// Answer with a redirect instead of routing (no `route` then).
    pub redirect: Option<HttpRedirect>,
    /// Rewrite the path prefix and/or the authority before forwarding.
    pub rewrite: Option<HttpRewrite>,
    /// Headers set, added or removed on the request and the response.
    pub headers: Option<Headers>,
}

impl HttpRoute {
    /// `redirect`, `rewrite` and `headers` (the route's field path is `f`).
    fn validate_gateway_fields(&self, f: &str) -> Result<(), (String, String)> {
        if let Some(rd) = &self.redirect {
            if !self.route.is_empty() {
                return bad(
                    format!("{f}.redirect"),
                    "a route answers with a redirect or forwards to `route`, not both",
                );
            }
            if self.rewrite.is_some() {
                return bad(
                    format!("{f}.rewrite"),
                    "a redirect is not forwarded: `rewrite` cannot go with `redirect`",
                );
            }
            if let Some(c) = rd.redirect_code
                && !matches!(c, 301 | 302 | 303 | 307 | 308)
            {
                return bad(
                    format!("{f}.redirect.redirectCode"),
                    format!("{c} is not a redirect status (301, 302, 303, 307 or 308)"),
                );
            }
            if let Some(sc) = &rd.scheme
                && !matches!(sc.as_str(), "http" | "https")
            {
                return bad(
                    format!("{f}.redirect.scheme"),
                    format!("`{sc}` is not http or https"),
                );
            }
            check_port(format!("{f}.redirect.port"), rd.port)?;
            if let Some(u) = &rd.uri
                && !u.starts_with('/')
            {
                return bad(format!("{f}.redirect.uri"), format!("`{u}` is not a path"));
            }
            if let Some(a) = &rd.authority
                && (a.is_empty() || a.contains('/'))
            {
                return bad(
                    format!("{f}.redirect.authority"),
                    format!("`{a}` is not a host name"),
                );
            }
        }
        if let Some(rw) = &self.rewrite {
            if let Some(u) = &rw.uri
                && !u.starts_with('/')
            {
                return bad(format!("{f}.rewrite.uri"), format!("`{u}` is not a path"));
            }
            if let Some(a) = &rw.authority
                && (a.is_empty() || a.contains('/'))
            {
                return bad(
                    format!("{f}.rewrite.authority"),
                    format!("`{a}` is not a host name"),
                );
            }
        }
        if let Some(h) = &self.headers {
            for (side, ops) in [("request", &h.request), ("response", &h.response)] {
                let Some(ops) = ops else { continue };
                let hf = format!("{f}.headers.{side}");
                for (op, names) in [
                    ("set", ops.set.keys().collect::<Vec<_>>()),
                    ("add", ops.add.keys().collect()),
                    ("remove", ops.remove.iter().collect()),
                ] {
                    for n in names {
                        if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                            return bad(
                                format!("{hf}.{op}"),
                                format!("`{n}` is not a valid header name"),
                            );
                        }
                        if n.starts_with(':') || n.eq_ignore_ascii_case("host") {
                            return bad(
                                format!("{hf}.{op}"),
                                format!(
                                    "`{n}` cannot be changed this way (use `rewrite.authority`)"
                                ),
                            );
                        }
                    }
                }
                for (op, values) in [("set", &ops.set), ("add", &ops.add)] {
                    for (n, v) in values {
                        if http::HeaderValue::from_str(v).is_err() {
                            return bad(format!("{hf}.{op}.{n}"), "not a valid header value");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `redirect`: a `301` (or `redirectCode`) to the same request with these parts replaced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    /// Replaces the whole path, whatever the match (Istio's `HTTPRedirect.uri`); the query
    /// string is kept unless `uri` has one.
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `http` or `https`.
    pub scheme: Option<String>,
    pub port: Option<u32>,
    pub redirect_code: Option<u16>,
}

/// `rewrite`: `uri` replaces the matched path prefix (or the whole path on an exact match);
/// `authority` replaces `Host`/`:authority`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: Labels,
}

/// Exactly one of `exact`, `prefix`, `regex`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

impl StringMatch {
    fn validate(&self, field: String) -> Result<(), (String, String)> {
        let set = [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if set != 1 {
            return bad(
                field,
                "exactly one of `exact`, `prefix`, `regex` is required",
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: i32,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default)]
    pub http_status: u16,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

// ----------------------------------------------------------------------------- DestinationRule

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

impl DestinationRuleSpec {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.host.is_empty() {
            return bad("spec.host", "missing");
        }
        if let Some(tp) = &self.traffic_policy {
            tp.validate("spec.trafficPolicy".into())?;
        }
        for (i, s) in self.subsets.iter().enumerate() {
            if s.name.is_empty() {
                return bad(format!("spec.subsets[{i}].name"), "missing");
            }
            if self.subsets[..i].iter().any(|o| o.name == s.name) {
                return bad(
                    format!("spec.subsets[{i}].name"),
                    format!("subset `{}` is defined twice", s.name),
                );
            }
            if let Some(tp) = &s.traffic_policy {
                tp.validate(format!("spec.subsets[{i}].trafficPolicy"))?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

impl TrafficPolicy {
    fn validate(&self, f: String) -> Result<(), (String, String)> {
        if let Some(cp) = &self.connection_pool
            && let Some(tcp) = &cp.tcp
        {
            check_duration(
                format!("{f}.connectionPool.tcp.connectTimeout"),
                &tcp.connect_timeout,
            )?;
        }
        if let Some(od) = &self.outlier_detection {
            check_duration(format!("{f}.outlierDetection.interval"), &od.interval)?;
            check_duration(
                format!("{f}.outlierDetection.baseEjectionTime"),
                &od.base_ejection_time,
            )?;
            if let Some(p) = od.max_ejection_percent
                && !(0..=100).contains(&p)
            {
                return bad(
                    format!("{f}.outlierDetection.maxEjectionPercent"),
                    format!("{p} is not 0-100"),
                );
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub simple: Option<SimpleLb>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    #[default]
    Unspecified,
    RoundRobin,
    Random,
    LeastRequest,
    /// Istio's deprecated alias of `LEAST_REQUEST`.
    LeastConn,
    Passthrough,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i32>,
}

// ------------------------------------------------------------------------- PeerAuthentication

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MtlsSetting>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u32, MtlsSetting>,
}

impl PeerAuthenticationSpec {
    fn validate(&self) -> Result<(), (String, String)> {
        for port in self.port_level_mtls.keys() {
            check_port(format!("spec.portLevelMtls.{port}"), Some(*port))?;
        }
        if !self.port_level_mtls.is_empty() && self.selector.is_none() {
            return bad(
                "spec.portLevelMtls",
                "port-level settings need a workload selector",
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MtlsSetting {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

// ------------------------------------------------------------------------ AuthorizationPolicy

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: AuthzAction,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicySpec {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.action == AuthzAction::Custom {
            return bad(
                "spec.action",
                "CUSTOM (external authorization) is not supported by sidenode",
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            for (j, t) in r.to.iter().enumerate() {
                for (k, p) in t
                    .operation
                    .ports
                    .iter()
                    .chain(&t.operation.not_ports)
                    .enumerate()
                {
                    if p.parse::<u16>().map_or(true, |n| n == 0) {
                        return bad(
                            format!("spec.rules[{i}].to[{j}].operation.ports[{k}]"),
                            format!("`{p}` is not a port"),
                        );
                    }
                }
            }
            for (j, s) in r.from.iter().enumerate() {
                for (k, b) in s
                    .source
                    .ip_blocks
                    .iter()
                    .chain(&s.source.not_ip_blocks)
                    .enumerate()
                {
                    let ok =
                        b.parse::<ipnet::IpNet>().is_ok() || b.parse::<std::net::IpAddr>().is_ok();
                    if !ok {
                        return bad(
                            format!("spec.rules[{i}].from[{j}].source.ipBlocks[{k}]"),
                            format!("`{b}` is not an address or CIDR"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("1.5s"),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration("100ms"),
            Some(std::time::Duration::from_millis(100))
        );
        assert_eq!(
            parse_duration("2m"),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5"), None);
    }

    #[test]
    fn weights_must_total_100() {
        let vs: VirtualServiceSpec = serde_json::from_value(serde_json::json!({
            "hosts": ["reviews"],
            "tcp": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 30}
            ]}]
        }))
        .expect("typed");
        let err = IstioSpec::VirtualService(vs)
            .validate()
            .expect_err("110 is wrong");
        assert_eq!(err.0, "spec.tcp[0].route");
        assert!(err.1.contains("110"), "{}", err.1);
    }

    #[test]
    fn spec_round_trips_through_json() {
        let dr = IstioSpec::DestinationRule(DestinationRuleSpec {
            host: "reviews".into(),
            subsets: vec![Subset {
                name: "v1".into(),
                labels: [("version".to_string(), "v1".to_string())].into(),
                traffic_policy: None,
            }],
            ..Default::default()
        });
        let json = serde_json::to_string(&dr).expect("serialize");
        let back: IstioSpec = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, dr);
    }
}
