//! `AuthorizationPolicy` (security.istio.io) enforced by the destination's node proxy: a pure
//! evaluator over the node's state (this file), the registry of open inbound tunnels re-checked
//! when policies change (`registry`), and per-request enforcement on HTTP ports (`l7`).
//!
//! Which policies apply to a destination workload: those of its namespace and of the root
//! namespace (`--root-namespace`, default `istio-system`: mesh-wide) whose `selector.matchLabels`
//! are all among the workload's labels (no selector: every workload). Order, as Istio: any
//! matching DENY refuses; else if any ALLOW policy applies, one of their rules must match;
//! else allowed. AUDIT rules are only reported. CUSTOM is rejected by validation (ignored here).
//!
//! Rules: all of `from`, `to`, `when` must match; within `from`/`to` any entry; within a
//! `source`/`operation` every field set. Fields and `when` keys that need the HTTP request
//! (`methods`, `paths`, `hosts`, `request.*`) or that sidenode does not know cannot be
//! evaluated on a connection (L4): as Istio does, an ALLOW rule with such a field never matches
//! there (it cannot allow), while in DENY and AUDIT rules such fields are left out (the rest of
//! the rule still applies: fail closed).

pub mod l7;
pub mod registry;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use prometheus::IntCounterVec;

use crate::identity::Identity;
use crate::model::istio::{
    AuthorizationPolicySpec, AuthzAction, Condition, IstioSpec, Operation, Rule, Source,
};
use crate::proto;
use crate::state::NodeState;

pub use crate::policy::matching::{HttpRequest, host_matches, string_matches};
pub use crate::policy::{DEFAULT_ROOT_NAMESPACE, root_namespace};

/// The workload a connection or request goes to.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a HashMap<String, String>,
}

impl<'a> Target<'a> {
    pub fn of(w: &'a proto::Workload) -> Self {
        Target {
            namespace: &w.namespace,
            labels: &w.labels,
        }
    }
}

/// What is known of a connection (L4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The caller's principal as Istio writes it: the SPIFFE id without `spiffe://`.
    pub principal: Option<String>,
    pub namespace: Option<String>,
    /// The original client's address (HBONE `forwarded: for=`, else the peer's).
    pub ip: IpAddr,
    pub dest_ip: IpAddr,
    pub dest_port: u16,
}

impl Peer {
    pub fn new(identity: Option<&Identity>, ip: IpAddr, dest: std::net::SocketAddr) -> Self {
        Peer {
            principal: identity.map(|i| {
                format!(
                    "{}/ns/{}/sa/{}",
                    i.trust_domain, i.namespace, i.service_account
                )
            }),
            namespace: identity.map(|i| i.namespace.clone()),
            ip,
            dest_ip: dest.ip(),
            dest_port: dest.port(),
        }
    }
}

/// Why a connection or request was refused (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched.
    DenyPolicy,
    /// ALLOW policies apply and none of their rules matched.
    NoAllowMatch,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyPolicy => "deny_policy",
            DenyReason::NoAllowMatch => "no_allow_match",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// `None`: allowed.
    pub denied: Option<DenyReason>,
    /// The deciding policy (`namespace/name`): the DENY that matched, the ALLOW that allowed;
    /// for `NoAllowMatch`, the ALLOW policies that applied, joined by `,`.
    pub policy: Option<String>,
    /// AUDIT policies whose rules matched (`namespace/name`).
    pub audit: Vec<String>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.denied.is_none()
    }
}

/// One policy applying to a workload.
#[derive(Clone, Copy, Debug)]
pub struct Applied<'s> {
    /// `namespace/name`.
    pub name: &'s str,
    pub spec: &'s AuthorizationPolicySpec,
}

/// The policies applying to `target`, in a stable order (by `Kind/namespace/name`).
pub fn applicable<'s>(st: &'s NodeState, target: Target<'_>) -> Vec<Applied<'s>> {
    let root = root_namespace();
    st.configs
        .iter()
        .filter_map(|(uid, obj)| match &obj.spec {
            IstioSpec::AuthorizationPolicy(spec) => Some((uid, obj, spec)),
            _ => None,
        })
        .filter(|(_, obj, _)| obj.key.namespace == target.namespace || obj.key.namespace == root)
        .filter(|(_, _, spec)| {
            spec.selector
                .as_ref()
                .is_none_or(|s| s.selects(target.labels))
        })
        .map(|(uid, _, spec)| Applied {
            name: uid.split_once('/').map_or(uid.as_str(), |(_, rest)| rest),
            spec,
        })
        .collect()
}

/// Does any of these policies have a rule that needs the HTTP request?
pub fn needs_http(policies: &[Applied<'_>]) -> bool {
    policies
        .iter()
        .filter(|p| p.spec.action != AuthzAction::Custom)
        .any(|p| p.spec.rules.iter().any(rule_needs_http))
}

/// Evaluates a connection (`http` None) or a request against the applying policies.
pub fn evaluate(policies: &[Applied<'_>], peer: &Peer, http: Option<&HttpRequest<'_>>) -> Decision {
    let mut d = Decision::default();
    let matches = |p: &Applied<'_>| {
        p.spec
            .rules
            .iter()
            .any(|r| rule_matches(r, p.spec.action, peer, http))
    };
    for p in policies
        .iter()
        .filter(|p| p.spec.action == AuthzAction::Audit)
    {
        if matches(p) {
            d.audit.push(p.name.to_string());
        }
    }
    if let Some(p) = policies
        .iter()
        .filter(|p| p.spec.action == AuthzAction::Deny)
        .find(|p| matches(p))
    {
        d.denied = Some(DenyReason::DenyPolicy);
        d.policy = Some(p.name.to_string());
        return d;
    }
    let allows: Vec<&Applied<'_>> = policies
        .iter()
        .filter(|p| p.spec.action == AuthzAction::Allow)
        .collect();
    if allows.is_empty() {
        return d;
    }
    match allows.iter().find(|p| matches(p)) {
        Some(p) => d.policy = Some(p.name.to_string()),
        None => {
            d.denied = Some(DenyReason::NoAllowMatch);
            d.policy = Some(allows.iter().map(|p| p.name).collect::<Vec<_>>().join(","));
        }
    }
    d
}

/// The decision for `peer` reaching `pod` (workload uid): a connection (`http` None) or one
/// request on it.
pub fn check(st: &NodeState, pod: &str, peer: &Peer, http: Option<&HttpRequest<'_>>) -> Decision {
    let empty = HashMap::new();
    let target = match st.workloads.get(pod) {
        Some(w) => Target::of(w),
        None => Target {
            namespace: pod.split_once('/').map_or("", |(ns, _)| ns),
            labels: &empty,
        },
    };
    evaluate(&applicable(st, target), peer, http)
}

/// The decision for a connection (L4).
pub fn check_connection(st: &NodeState, pod: &str, peer: &Peer) -> Decision {
    check(st, pod, peer, None)
}

/// Are a tunnel's requests to be checked one by one? Yes when a policy applying to the pod has
/// a rule needing the HTTP request and `port` is the target of an HTTP port (by Istio's
/// protocol rules) of a Service selecting the pod.
pub fn per_request(st: &NodeState, pod: &str, port: u16) -> bool {
    let Some(w) = st.workloads.get(pod) else {
        return false;
    };
    needs_http(&applicable(st, Target::of(w)))
        && crate::state::protocol::is_http_pod_port(st, w, port)
}

// -------------------------------------------------------------------------------- rules

/// `Some(matched)`, or `None` when the field cannot be evaluated here (needs the HTTP request
/// on a connection, or is unknown to sidenode).
type Tri = Option<bool>;

fn rule_needs_http(r: &Rule) -> bool {
    r.to.iter().any(|t| op_needs_http(&t.operation))
        || r.when
            .iter()
            .any(|c| condition_is_l7(&c.key) || !known_key(&c.key))
}

fn op_needs_http(o: &Operation) -> bool {
    !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty())
}

fn condition_is_l7(key: &str) -> bool {
    key.starts_with("request.")
}

fn known_key(key: &str) -> bool {
    matches!(
        key,
        "source.ip"
            | "remote.ip"
            | "source.namespace"
            | "source.principal"
            | "destination.ip"
            | "destination.port"
    ) || header_key(key).is_some()
}

/// `request.headers[NAME]` → NAME.
fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?.strip_suffix(']')
}

/// Does the rule match? Fields that cannot be evaluated make an ALLOW rule fail and are left
/// out of DENY and AUDIT rules.
fn rule_matches(
    r: &Rule,
    action: AuthzAction,
    peer: &Peer,
    http: Option<&HttpRequest<'_>>,
) -> bool {
    let resolve = |t: Tri| t.unwrap_or(action != AuthzAction::Allow);
    if action == AuthzAction::Allow {
        // One field that cannot be evaluated drops the whole rule (Istio skips it).
        let unevaluable =
            (http.is_none() && rule_needs_http(r)) || r.when.iter().any(|c| !known_key(&c.key));
        if unevaluable {
            return false;
        }
    }
    let from = r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, peer));
    let to = r.to.is_empty()
        || r.to
            .iter()
            .any(|t| resolve(operation_matches(&t.operation, peer, http)));
    let when = r
        .when
        .iter()
        .all(|c| resolve(condition_matches(c, peer, http)));
    from && to && when
}

fn source_matches(s: &Source, peer: &Peer) -> bool {
    let principal = peer.principal.as_deref();
    let namespace = peer.namespace.as_deref();
    set_matches(&s.principals, &s.not_principals, |v| {
        principal.is_some_and(|p| principal_matches(v, p))
    }) && set_matches(&s.namespaces, &s.not_namespaces, |v| {
        namespace.is_some_and(|n| string_matches(v, n))
    }) && set_matches(&s.ip_blocks, &s.not_ip_blocks, |v| ip_matches(v, peer.ip))
}

/// `values` empty or one of them matches, and none of `not_values` matches.
fn set_matches(values: &[String], not_values: &[String], m: impl Fn(&str) -> bool) -> bool {
    (values.is_empty() || values.iter().any(|v| m(v))) && !not_values.iter().any(|v| m(v))
}

fn operation_matches(o: &Operation, peer: &Peer, http: Option<&HttpRequest<'_>>) -> Tri {
    let ports = set_matches(&o.ports, &o.not_ports, |v| {
        v.parse::<u16>().is_ok_and(|p| p == peer.dest_port)
    });
    if !ports {
        return Some(false);
    }
    if !op_needs_http(o) {
        return Some(true);
    }
    let h = http?;
    let path = h.path.split_once('?').map_or(h.path, |(p, _)| p);
    Some(
        set_matches(&o.methods, &o.not_methods, |v| string_matches(v, h.method))
            && set_matches(&o.paths, &o.not_paths, |v| string_matches(v, path))
            && set_matches(&o.hosts, &o.not_hosts, |v| host_matches(v, h.host)),
    )
}

fn condition_matches(c: &Condition, peer: &Peer, http: Option<&HttpRequest<'_>>) -> Tri {
    let key = c.key.as_str();
    let one = |v: &str| -> Tri {
        Some(match key {
            "source.ip" | "remote.ip" => ip_matches(v, peer.ip),
            "source.namespace" => peer
                .namespace
                .as_deref()
                .is_some_and(|n| string_matches(v, n)),
            "source.principal" => peer
                .principal
                .as_deref()
                .is_some_and(|p| principal_matches(v, p)),
            "destination.ip" => ip_matches(v, peer.dest_ip),
            "destination.port" => v.parse::<u16>().is_ok_and(|p| p == peer.dest_port),
            _ => {
                let name = header_key(key)?;
                let h = http?;
                let joined = header_value(h.headers, name)?;
                string_matches(v, &joined)
            }
        })
    };
    // A request header that is absent matches no value (and so every `notValues`).
    if let Some(name) = header_key(key) {
        let h = http?;
        if header_value(h.headers, name).is_none() {
            return Some(c.values.is_empty());
        }
    }
    let mut any = c.values.is_empty();
    for v in &c.values {
        if one(v)? {
            any = true;
            break;
        }
    }
    let mut none_not = true;
    for v in &c.not_values {
        if one(v)? {
            none_not = false;
            break;
        }
    }
    Some(any && none_not)
}

/// A header's values joined by `,` (Envoy's view of a repeated header).
fn header_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let vals: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

/// Principals as strings; a `spiffe://` written in the policy is accepted too.
fn principal_matches(pattern: &str, principal: &str) -> bool {
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    string_matches(pattern, principal)
}

/// An address or CIDR (`10.0.0.0/8`, `10.1.2.3`, `fd00::/8`) containing `ip`.
fn ip_matches(block: &str, ip: IpAddr) -> bool {
    if let Ok(net) = block.parse::<ipnet::IpNet>() {
        return net.contains(&ip);
    }
    block.parse::<IpAddr>().is_ok_and(|b| b == ip)
}

// ------------------------------------------------------------------------------ metrics

/// `sidenode_authz_denied_total{direction,layer,reason}`.
fn denied_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        crate::telemetry::metrics::counter(
            "sidenode_authz_denied_total",
            "Connections (layer l4) and requests (l7) refused by AuthorizationPolicy, and open connections closed by a policy change (reason policy_change)",
            &["direction", "layer", "reason"],
        )
    })
}

pub fn count_denied(layer: &str, reason: &str) {
    denied_total()
        .with_label_values(&["inbound", layer, reason])
        .inc();
}
