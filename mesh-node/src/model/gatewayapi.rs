//! The Gateway API objects (`gateway.networking.k8s.io`) the controller resolves before
//! anything is distributed: `GatewayClass`, `Gateway`, `ReferenceGrant`, and the `HTTPRoute`s
//! and `TLSRoute`s attached to Gateways. They never leave the controller: it turns them into
//! the Istio form (`super::gateway::GatewaySpec`, VirtualServices) after checking classes and
//! `ReferenceGrant`s (`controller::gateway`), and writes their status back.

use super::istio::{Destination, IstioObject, PortSelector, RouteDestination, VirtualServiceSpec};
use super::{ObjKey, Origin};

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// Is `api_version` (`group/version`) one of the Gateway API's?
pub fn is_gateway_api(api_version: &str) -> bool {
    api_version
        .split_once('/')
        .is_some_and(|(group, _)| group == GROUP)
}

/// `GatewayClass` (cluster-scoped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayClass {
    pub name: String,
    pub controller_name: String,
    pub generation: i64,
    pub origin: Origin,
}

/// A Gateway API `Gateway`, as written (the controller converts it once its class and
/// references are checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiGateway {
    pub key: ObjKey,
    pub class_name: String,
    pub listeners: Vec<Listener>,
    pub generation: i64,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub hostname: Option<String>,
    pub port: u32,
    /// As written (`HTTP`, `HTTPS`, `TLS`, or something sidenode does not serve).
    pub protocol: String,
    pub tls: Option<ListenerTls>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    /// `Terminate` (the default) or `Passthrough`, as written.
    pub mode: String,
    pub certificate_refs: Vec<SecretRef>,
}

/// A `certificateRefs` entry, its namespace resolved (the Gateway's when not written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// `ReferenceGrant`: lets objects `from` other namespaces refer to objects (`to`) of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceGrant {
    pub key: ObjKey,
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Does this grant (which lives in the target's namespace) let a `from_kind` of
    /// `from_namespace` refer to the `to_kind` named `to_name`? Groups: `""` is the core group.
    pub fn permits(
        &self,
        from_group: &str,
        from_kind: &str,
        from_namespace: &str,
        to_group: &str,
        to_kind: &str,
        to_name: &str,
    ) -> bool {
        let from = self
            .from
            .iter()
            .any(|f| f.group == from_group && f.kind == from_kind && f.namespace == from_namespace);
        let to = self.to.iter().any(|t| {
            t.group == to_group
                && t.kind == to_kind
                && t.name.as_deref().is_none_or(|n| n == to_name)
        });
        from && to
    }
}

/// `HTTPRoute` or `TLSRoute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Http,
    Tls,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Tls => "TLSRoute",
        }
    }
}

/// A route attached to Gateways: the VirtualService it means (`gateways` = its Gateway
/// parents), and what the controller checks before distributing it.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayRoute {
    pub kind: RouteKind,
    pub key: ObjKey,
    pub generation: i64,
    /// The Gateway parentRefs (namespace resolved), in order.
    pub parents: Vec<RouteParent>,
    /// Every backendRef of every rule.
    pub backends: Vec<RouteBackend>,
    pub spec: VirtualServiceSpec,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteParent {
    pub gateway: ObjKey,
    pub section_name: Option<String>,
    pub port: Option<u32>,
}

/// One backendRef: which rule it serves (`spec.http[rule]` or `spec.tls[rule]`), its Service
/// and its relative weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteBackend {
    pub rule: usize,
    pub service: ObjKey,
    pub port: u32,
    pub weight: u32,
}

impl RouteBackend {
    /// The destination, named from the route's namespace (`name`, or `name.ns` for another).
    pub fn destination(&self, route_namespace: &str) -> Destination {
        let host = if self.service.namespace == route_namespace {
            self.service.name.clone()
        } else {
            format!("{}.{}", self.service.name, self.service.namespace)
        };
        Destination {
            host,
            subset: None,
            port: Some(PortSelector {
                number: Some(self.port),
            }),
        }
    }
}

/// A rule's destinations from its backends: relative weights become percentages, backends of
/// weight 0 are left out.
pub fn route_of<'a>(
    backends: impl IntoIterator<Item = &'a RouteBackend>,
    route_namespace: &str,
) -> Vec<RouteDestination> {
    let backends: Vec<&RouteBackend> = backends.into_iter().collect();
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    backends
        .iter()
        .zip(percentages(&weights))
        .filter(|(b, w)| *w != Some(0) && b.weight > 0)
        .map(|(b, weight)| RouteDestination {
            destination: b.destination(route_namespace),
            weight,
        })
        .collect()
}

/// A Gateway API `HTTPRoute`: the VirtualService it means for its Service parents (the GAMMA
/// mesh profile, served by the node proxies) and/or for its Gateway parents.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteObject {
    pub key: ObjKey,
    pub mesh: Option<IstioObject>,
    pub gateway: Option<GatewayRoute>,
}

/// Relative weights → percentages totalling 100 (largest remainder); `None` for one backend.
pub fn percentages(weights: &[u32]) -> Vec<Option<i32>> {
    if weights.len() <= 1 {
        return vec![None; weights.len()];
    }
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return vec![Some(0); weights.len()];
    }
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
    fn a_grant_names_source_and_target() {
        let g = ReferenceGrant {
            key: ObjKey {
                namespace: "certs".into(),
                name: "g".into(),
            },
            from: vec![GrantFrom {
                group: GROUP.into(),
                kind: "Gateway".into(),
                namespace: "edge".into(),
            }],
            to: vec![GrantTo {
                group: String::new(),
                kind: "Secret".into(),
                name: Some("web".into()),
            }],
            origin: Origin::default(),
        };
        assert!(g.permits(GROUP, "Gateway", "edge", "", "Secret", "web"));
        assert!(!g.permits(GROUP, "Gateway", "edge", "", "Secret", "other"));
        assert!(!g.permits(GROUP, "Gateway", "shop", "", "Secret", "web"));
        assert!(!g.permits(GROUP, "HTTPRoute", "edge", "", "Secret", "web"));
    }
}
