//! Where a captured connection goes when its original destination is a Service VIP
//! (`clusterIP:port`): Istio `VirtualService` TCP routes (match, weighted destinations,
//! subsets from `DestinationRule`s), then one ready endpoint chosen by the destination's load
//! balancing policy. Pure functions over [`NodeState`] plus the proxy's [`Balancer`]; the
//! connection handler (`proxy/outbound`) acts on the [`Decision`].
//!
//! - `service`: host names and VIPs → Services; a Service → its endpoints.
//! - `balance`: load balancing policies and their state.
//! - `policy`, `health`, `limits`: resilience (merged traffic policy, outlier detection,
//!   connection pool limits).

pub mod balance;
pub mod health;
pub mod http;
pub mod limits;
pub mod policy;
pub mod service;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::model::ObjKey;
use crate::model::istio::{
    DestinationRuleSpec, IstioObject, IstioSpec, L4Match, SimpleLb, Subset, TrafficPolicy,
    VirtualServiceSpec,
};
use crate::proto;
use crate::proxy::refusal::Refusal;
use crate::state::NodeState;

pub use balance::{Balancer, Policy};
pub use health::{Health, Outcome};
pub use limits::Limits;
pub use policy::Resilience;
pub use service::Endpoint;

/// The client side of a connection, as routing needs it.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The source workload's namespace (empty when unknown).
    pub namespace: &'a str,
    /// Its labels (from the state), `None` when unknown.
    pub labels: Option<&'a HashMap<String, String>>,
}

/// A connection to a service, sent to one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    /// The Service the connection goes to (`namespace/name`; after a route, its destination).
    pub service: String,
    pub subset: Option<String>,
    /// The VirtualService that routed it (`namespace/name`), if one did.
    pub route: Option<String>,
    pub policy: Policy,
    pub endpoint: Endpoint,
    /// The endpoint set (`namespace/name/subset`, like an Envoy cluster): the key of load
    /// balancing, outlier detection ([`Health::report`]) and connection limits ([`Limits`]).
    pub cluster: String,
    /// Resilience settings of the destination (subset policy merged into the rule's).
    pub resilience: Resilience,
    /// Every ready endpoint of the set, to pick another after a failed connect
    /// ([`health::select`] with the tried ones excluded).
    pub endpoints: Vec<Endpoint>,
}

/// What to do with a captured connection.
// One per connection, consumed at once: the size of `Routed` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The destination is not a service VIP: send it on as it is (pod IP or outside the mesh).
    NotService,
    Endpoint(Routed),
    /// `PASSTHROUGH` load balancing: connect to the original destination as it is.
    Passthrough {
        service: String,
    },
    /// Refuse (reset) the connection: `reason` is `no_endpoint` or `no_route`, `why` the log
    /// text naming the object and field at fault.
    Refuse {
        service: String,
        reason: Refusal,
        why: String,
    },
}

impl Decision {
    fn refuse(svc: &proto::Service, reason: Refusal, why: String) -> Decision {
        Decision::Refuse {
            service: svc.uid.clone(),
            reason,
            why,
        }
    }
}

/// Decides where a connection from `src` to `orig_dst` goes (no outlier detection: see
/// [`route_with`]).
pub fn route(
    st: &NodeState,
    lb: &Balancer,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    orig_dst: SocketAddr,
) -> Decision {
    route_with(st, lb, None, rng, src, orig_dst)
}

/// [`route`], skipping endpoints that `health` has ejected when the destination's policy has
/// an `outlierDetection`.
pub fn route_with(
    st: &NodeState,
    lb: &Balancer,
    health: Option<&Health>,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    orig_dst: SocketAddr,
) -> Decision {
    let Some(svc) = service::service_by_vip(st, orig_dst.ip()) else {
        return Decision::NotService;
    };
    if service::service_port(svc, orig_dst.port()).is_none() {
        return Decision::refuse(
            svc,
            Refusal::NoRoute,
            format!("service {} has no port {}", svc.uid, orig_dst.port()),
        );
    }
    let Some((vs_key, vs)) = virtual_service_for(st, svc, src.namespace) else {
        return to_service(
            st,
            lb,
            health,
            rng,
            src,
            orig_dst,
            svc,
            orig_dst.port(),
            None,
            None,
        );
    };
    let Some((ri, r)) =
        vs.tcp.iter().enumerate().find(|(_, r)| {
            r.r#match.is_empty() || r.r#match.iter().any(|m| matches(m, src, orig_dst))
        })
    else {
        // No TCP route applies: the service's own endpoints, as without the VirtualService.
        return to_service(
            st,
            lb,
            health,
            rng,
            src,
            orig_dst,
            svc,
            orig_dst.port(),
            None,
            None,
        );
    };
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
        return Decision::refuse(
            svc,
            Refusal::NoRoute,
            format!("VirtualService {vs_key}: spec.tcp[{ri}].route has no destination with weight"),
        );
    };
    let d = &r.route[di].destination;
    let field = format!("VirtualService {vs_key}: spec.tcp[{ri}].route[{di}].destination");
    let Some(dsvc) = service::service_for_host(st, &d.host, &vs_key.namespace) else {
        return Decision::refuse(
            svc,
            Refusal::NoRoute,
            format!("{field}.host `{}` names no known service", d.host),
        );
    };
    let port = match d.port.as_ref().and_then(|p| p.number) {
        Some(n) => match u16::try_from(n) {
            Ok(p) if service::service_port(dsvc, p).is_some() => p,
            _ => {
                return Decision::refuse(
                    svc,
                    Refusal::NoRoute,
                    format!(
                        "{field}.port.number {n} is not a port of service {}",
                        dsvc.uid
                    ),
                );
            }
        },
        None if service::service_port(dsvc, orig_dst.port()).is_some() => orig_dst.port(),
        None => {
            return Decision::refuse(
                svc,
                Refusal::NoRoute,
                format!(
                    "{field}: service {} has no port {} (set port.number)",
                    dsvc.uid,
                    orig_dst.port()
                ),
            );
        }
    };
    let subset = match &d.subset {
        None => None,
        Some(name) => {
            let found = destination_rule_for(st, dsvc, &vs_key.namespace, src.namespace)
                .and_then(|(_, dr)| dr.subsets.iter().find(|s| &s.name == name).map(|s| (dr, s)));
            match found {
                Some(x) => Some(x),
                None => {
                    return Decision::refuse(
                        svc,
                        Refusal::NoRoute,
                        format!(
                            "{field}.subset `{name}` is not defined by a DestinationRule for service {}",
                            dsvc.uid
                        ),
                    );
                }
            }
        }
    };
    let mut out = to_service(
        st,
        lb,
        health,
        rng,
        src,
        orig_dst,
        dsvc,
        port,
        subset,
        Some(&vs_key.namespace),
    );
    if let Decision::Endpoint(r) = &mut out {
        r.route = Some(vs_key.to_string());
    }
    out
}

/// One endpoint of `svc` at service port `port`, of `subset` when given.
#[allow(clippy::too_many_arguments)]
fn to_service(
    st: &NodeState,
    lb: &Balancer,
    health: Option<&Health>,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    orig_dst: SocketAddr,
    svc: &proto::Service,
    port: u16,
    subset: Option<(&DestinationRuleSpec, &Subset)>,
    vs_ns: Option<&str>,
) -> Decision {
    let dr = match subset {
        Some((dr, _)) => Some(dr),
        None => destination_rule_for(st, svc, vs_ns.unwrap_or(src.namespace), src.namespace)
            .map(|(_, dr)| dr),
    };
    let policy = subset
        .and_then(|(_, s)| lb_policy(s.traffic_policy.as_ref()))
        .or_else(|| dr.and_then(|dr| lb_policy(dr.traffic_policy.as_ref())))
        .unwrap_or_default();
    let resilience = Resilience::of(&policy::merge(
        dr.and_then(|dr| dr.traffic_policy.as_ref()),
        subset.and_then(|(_, s)| s.traffic_policy.as_ref()),
    ));
    if policy == Policy::Passthrough {
        return Decision::Passthrough {
            service: svc.uid.clone(),
        };
    }
    let sp = service::service_port(svc, port);
    let target = match sp.map(service::target_port) {
        Some(Ok(p)) => p,
        Some(Err(service::TargetPortError::Named(name))) => {
            return Decision::refuse(
                svc,
                Refusal::NoEndpoint,
                format!(
                    "service {} port {port} has the named targetPort `{name}`, which cannot be resolved (no container ports in the state)",
                    svc.uid
                ),
            );
        }
        Some(Err(service::TargetPortError::Invalid(n))) => {
            return Decision::refuse(
                svc,
                Refusal::NoEndpoint,
                format!("service {} port {port} has targetPort {n}", svc.uid),
            );
        }
        None => {
            return Decision::refuse(
                svc,
                Refusal::NoRoute,
                format!("service {} has no port {port}", svc.uid),
            );
        }
    };
    let subset_name = subset.map(|(_, s)| s.name.clone());
    let eps = service::endpoints(
        st,
        svc,
        subset.map(|(_, s)| &s.labels),
        orig_dst.ip(),
        target,
    );
    let key = format!("{}/{}", svc.uid, subset_name.as_deref().unwrap_or(""));
    let Some(i) = health::select(
        lb,
        health,
        resilience.outlier.as_ref(),
        &key,
        policy,
        &eps,
        &[],
        rng,
    ) else {
        let what = match &subset_name {
            Some(s) => format!("service {} subset {s}", svc.uid),
            None => format!("service {}", svc.uid),
        };
        return Decision::refuse(
            svc,
            Refusal::NoEndpoint,
            format!("{what} has no ready endpoint"),
        );
    };
    Decision::Endpoint(Routed {
        service: svc.uid.clone(),
        subset: subset_name,
        route: None,
        policy,
        endpoint: eps[i].clone(),
        cluster: key,
        resilience,
        endpoints: eps,
    })
}

fn lb_policy(tp: Option<&TrafficPolicy>) -> Option<Policy> {
    let simple: SimpleLb = tp?.load_balancer.as_ref()?.simple?;
    Policy::from_simple(simple)
}

/// Is an object of namespace `owner` with this `exportTo` visible from namespace `client`?
pub fn exported_to(export_to: &[String], owner: &str, client: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && owner == client) || e == client)
}

/// Does an L4 match entry accept this connection?
fn matches(m: &L4Match, src: &Source<'_>, dst: SocketAddr) -> bool {
    if let Some(p) = m.port
        && p != u32::from(dst.port())
    {
        return false;
    }
    if let Some(ns) = &m.source_namespace
        && ns != src.namespace
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
    if !m.destination_subnets.is_empty() {
        let ip = dst.ip();
        let inside = m.destination_subnets.iter().any(|s| {
            s.parse::<ipnet::IpNet>()
                .map(|n| n.contains(&ip))
                .or_else(|_| s.parse::<std::net::IpAddr>().map(|a| a == ip))
                .unwrap_or(false)
        });
        if !inside {
            return false;
        }
    }
    true
}

/// The VirtualService (applying to the mesh, exported to `client_ns`) with a host naming `svc`.
/// Several: one in the client's namespace first, then the service's, then by name.
fn virtual_service_for<'s>(
    st: &'s NodeState,
    svc: &proto::Service,
    client_ns: &str,
) -> Option<(&'s ObjKey, &'s VirtualServiceSpec)> {
    let mut found: Vec<(&ObjKey, &VirtualServiceSpec)> = st
        .configs
        .values()
        .filter_map(|o: &IstioObject| match &o.spec {
            IstioSpec::VirtualService(vs) => Some((&o.key, vs)),
            _ => None,
        })
        .filter(|(_, vs)| vs.applies_to_mesh())
        .filter(|(k, vs)| exported_to(&vs.export_to, &k.namespace, client_ns))
        .filter(|(k, vs)| {
            vs.hosts.iter().any(|h| {
                service::service_for_host(st, h, &k.namespace).is_some_and(|s| s.uid == svc.uid)
            })
        })
        .collect();
    found.sort_by_key(|(k, _)| {
        (
            k.namespace != client_ns,
            k.namespace != svc.namespace,
            (*k).clone(),
        )
    });
    found.into_iter().next()
}

/// The VirtualServices bound to one of `gateways` (`gateways: [ns/name]`), by name.
pub(crate) fn gateway_virtual_services<'s>(
    st: &'s NodeState,
    gateways: &[&ObjKey],
) -> Vec<(&'s ObjKey, &'s VirtualServiceSpec)> {
    let mut found: Vec<(&ObjKey, &VirtualServiceSpec)> = st
        .configs
        .values()
        .filter_map(|o| match &o.spec {
            IstioSpec::VirtualService(vs) => Some((&o.key, vs)),
            _ => None,
        })
        .filter(|(k, vs)| {
            gateways
                .iter()
                .any(|g| vs.applies_to_gateway(&k.namespace, g))
        })
        .collect();
    found.sort_by_key(|(k, _)| (*k).clone());
    found
}

/// The DestinationRule for `svc`: in namespace `ctx_ns` (the routing VirtualService's, or the
/// client's) first, else in the service's own namespace; exported to `client_ns`.
fn destination_rule_for<'s>(
    st: &'s NodeState,
    svc: &proto::Service,
    ctx_ns: &str,
    client_ns: &str,
) -> Option<(&'s ObjKey, &'s DestinationRuleSpec)> {
    let mut found: Vec<(&ObjKey, &DestinationRuleSpec)> = st
        .configs
        .values()
        .filter_map(|o| match &o.spec {
            IstioSpec::DestinationRule(dr) => Some((&o.key, dr)),
            _ => None,
        })
        .filter(|(k, _)| k.namespace == ctx_ns || k.namespace == svc.namespace)
        .filter(|(k, dr)| exported_to(&dr.export_to, &k.namespace, client_ns))
        .filter(|(k, dr)| {
            service::service_for_host(st, &dr.host, &k.namespace).is_some_and(|s| s.uid == svc.uid)
        })
        .collect();
    found.sort_by_key(|(k, _)| (k.namespace != ctx_ns, (*k).clone()));
    found.into_iter().next()
}

#[cfg(test)]
mod tests;
