//! Services as the node proxy sees them: which Service a host name or a VIP names, and which
//! pods are a service's endpoints.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::proto;
use crate::state::NodeState;

/// The cluster DNS domain in fully qualified service names (`name.ns.svc.cluster.local`). Not
/// the trust domain: the two are configured apart in Kubernetes and usually differ.
pub use crate::model::CLUSTER_DOMAIN;

/// `(namespace, name)` of the Service a host names, a short name being relative to `ns` (the
/// namespace of the object that wrote it): `reviews`, `reviews.ns`, `reviews.ns.svc`,
/// `reviews.ns.svc.cluster.local`. Anything else (wildcards, external names) names none.
pub fn parse_host<'a>(host: &'a str, ns: &'a str) -> Option<(&'a str, &'a str)> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    if parts.iter().any(|p| p.is_empty() || p.contains('*')) {
        return None;
    }
    let (name, namespace) = match parts.as_slice() {
        [name] => (*name, ns),
        [name, n] | [name, n, "svc"] => (*name, *n),
        [name, n, "svc", rest @ ..] if rest.join(".") == CLUSTER_DOMAIN => (*name, *n),
        _ => return None,
    };
    Some((namespace, name))
}

/// The Service `host` names, relative to namespace `ns`.
pub fn service_for_host<'s>(st: &'s NodeState, host: &str, ns: &str) -> Option<&'s proto::Service> {
    let (sns, name) = parse_host(host, ns)?;
    st.services.get(&format!("{sns}/{name}"))
}

/// The Service whose cluster IP is `ip` (headless services have none).
pub fn service_by_vip(st: &NodeState, ip: IpAddr) -> Option<&proto::Service> {
    st.by_vip.get(&ip).and_then(|uid| st.services.get(uid))
}

/// Every `want` label is among `have`.
pub fn labels_match<'a>(
    want: impl IntoIterator<Item = (&'a String, &'a String)>,
    have: &HashMap<String, String>,
) -> bool {
    want.into_iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The service port answering on `port`.
pub fn service_port(svc: &proto::Service, port: u16) -> Option<&proto::ServicePort> {
    svc.ports.iter().find(|p| p.port == u32::from(port))
}

/// Why a service port has no usable target port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPortError {
    /// `targetPort` names a container port; the state carries no container ports.
    Named(String),
    Invalid(u32),
}

/// The numeric target port of a service port.
pub fn target_port(p: &proto::ServicePort) -> Result<u16, TargetPortError> {
    if !p.target_port_name.is_empty() {
        return Err(TargetPortError::Named(p.target_port_name.clone()));
    }
    match u16::try_from(p.target_port) {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(TargetPortError::Invalid(p.target_port)),
    }
}

/// One endpoint: a pod and the address a connection goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Workload uid (`namespace/name`).
    pub workload: String,
    pub addr: SocketAddr,
}

/// The endpoints of `svc` (in a stable order, by workload uid): pods of the service's namespace
/// whose labels match its selector (and `subset`'s labels), ready, with an address of the
/// family of `family` (the connection's original destination), at `port`. A service without a
/// selector has no endpoints (as in Kubernetes, where they would be managed by hand).
pub fn endpoints(
    st: &NodeState,
    svc: &proto::Service,
    subset: Option<&crate::model::Labels>,
    family: IpAddr,
    port: u16,
) -> Vec<Endpoint> {
    if svc.selector.is_empty() {
        return Vec::new();
    }
    st.workloads
        .values()
        .filter(|w| w.namespace == svc.namespace && w.ready)
        .filter(|w| labels_match(&svc.selector, &w.labels))
        .filter(|w| subset.is_none_or(|s| labels_match(s, &w.labels)))
        .filter_map(|w| {
            let ip = w
                .ips
                .iter()
                .filter_map(|i| i.parse::<IpAddr>().ok())
                .find(|i| i.is_ipv4() == family.is_ipv4())?;
            Some(Endpoint {
                workload: w.uid.clone(),
                addr: SocketAddr::new(ip, port),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_forms() {
        for h in [
            "reviews",
            "reviews.shop",
            "reviews.shop.svc",
            "reviews.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local.",
        ] {
            let ns = if h == "reviews" { "shop" } else { "other" };
            assert_eq!(parse_host(h, ns), Some(("shop", "reviews")), "{h}");
        }
        assert_eq!(parse_host("reviews.shop.svc.example.org", "x"), None);
        assert_eq!(parse_host("*.shop.svc.cluster.local", "x"), None);
        assert_eq!(parse_host("reviews.shop.other", "x"), None);
        assert_eq!(parse_host("", "x"), None);
    }

    #[test]
    fn named_target_port_is_unresolvable() {
        let p = proto::ServicePort {
            port: 80,
            target_port: 0,
            target_port_name: "http".into(),
            ..Default::default()
        };
        assert_eq!(target_port(&p), Err(TargetPortError::Named("http".into())));
        let p = proto::ServicePort {
            port: 80,
            target_port: 9080,
            ..Default::default()
        };
        assert_eq!(target_port(&p), Ok(9080));
    }
}
