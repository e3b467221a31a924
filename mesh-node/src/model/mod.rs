//! The one internal vocabulary: namespaces, pods and services as the mesh sees them, whatever
//! source they came from (a folder of YAML today, the Kubernetes API later).

#![forbid(unsafe_code)]

pub mod fields;
pub mod gateway;
pub mod gatewayapi;
pub mod istio;
pub mod ratelimit;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// Namespace (and pod) label that turns the mesh on (`enabled`) or a pod out of it (`none`).
/// The cluster's DNS domain (service hosts are `<name>.<namespace>.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

pub const DATAPLANE_MODE_LABEL: &str = "sidenode.io/dataplane-mode";
pub const DATAPLANE_ENABLED: &str = "enabled";
pub const DATAPLANE_NONE: &str = "none";
/// Standalone mode: the path of a pod's network namespace.
pub const NETNS_ANNOTATION: &str = "sidenode.io/netns";
/// Set by the agent on every pod it enrolled (`enabled`), removed when it un-enrolls one
/// (Istio ambient: `ambient.istio.io/redirection`).
pub const REDIRECTION_ANNOTATION: &str = "sidenode.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";
/// Set to `enabled` by Istio's CNI on every pod ztunnel captures (Istio ambient). Such a pod is
/// an HBONE destination served by ztunnel, never one of sidenode's.
pub const ISTIO_AMBIENT_REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Istio's label for a workload that receives HBONE itself (a comma-separated list of tunnel
/// types; `http` = HBONE): istiod then reports it with `TunnelProtocol: HBONE` and
/// `native_tunnel` (`model.SupportsTunnel` in Istio). sidenode's agent may set it on the pods
/// it enrolls (`--advertise-hbone`), so Istio's ztunnel reaches them over HBONE.
pub const ISTIO_TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
pub const ISTIO_TUNNEL_HTTP: &str = "http";

pub type Labels = BTreeMap<String, String>;

/// Where an object was read from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl Origin {
    /// An object read from the Kubernetes API (no file, no line).
    pub fn kubernetes(what: String) -> Origin {
        Origin {
            file: PathBuf::from(what),
            line: 0,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

/// `namespace/name` identity of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub origin: Origin,
}

impl Namespace {
    /// Is the mesh turned on for this namespace?
    pub fn mesh_enabled(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_ENABLED)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjKey,
    /// `metadata.uid` (Kubernetes source); finds the pod's cgroup and network namespace.
    pub uid: Option<String>,
    /// The `Ready` condition (true when the source has no conditions).
    pub ready: bool,
    pub node: Option<String>,
    /// `status.podIP`.
    pub ip: IpAddr,
    /// `status.podIPs` (includes `ip`).
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub host_network: bool,
    pub labels: Labels,
    pub annotations: Labels,
    pub origin: Origin,
}

impl Pod {
    /// The pod asked to stay out of the mesh.
    pub fn opted_out(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_NONE)
    }

    /// Istio's CNI redirected it to ztunnel (`ambient.istio.io/redirection: enabled`).
    pub fn istio_ambient_redirected(&self) -> bool {
        self.annotations
            .get(ISTIO_AMBIENT_REDIRECTION_ANNOTATION)
            .map(String::as_str)
            == Some(REDIRECTION_ENABLED)
    }

    /// It carries Istio's native-tunnel label with `http` among its values (the same test as
    /// Istio's `model.SupportsTunnel(labels, model.TunnelHTTP)`).
    pub fn istio_native_tunnel(&self) -> bool {
        self.labels
            .get(ISTIO_TUNNEL_LABEL)
            .is_some_and(|v| v.split(',').any(|t| t == ISTIO_TUNNEL_HTTP))
    }

    /// sidenode's agent enrolled it and wrote its status (`sidenode.io/redirection: enabled`).
    /// The agent writes its advertised tunnel label in the same patch as this annotation and
    /// removes both together, so a tunnel label next to this annotation is sidenode's own.
    pub fn sidenode_redirected(&self) -> bool {
        self.annotations
            .get(REDIRECTION_ANNOTATION)
            .map(String::as_str)
            == Some(REDIRECTION_ENABLED)
    }
}

/// Which data plane carries a pod's inbound traffic, as sidenode sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// Not in any mesh sidenode knows of: reached directly.
    None,
    /// sidenode's: captured (`SN_ENROLLED`) and served by sidenode's own `podIP:15008`.
    Sidenode,
    /// Istio's (ztunnel in ambient mode, or a workload that serves HBONE itself): reached
    /// over HBONE at `podIP:15008`; sidenode never captures it nor listens for it.
    Istio,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: Option<TargetPort>,
    pub protocol: String,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjKey,
    /// `None` for headless services.
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: Labels,
    pub origin: Origin,
}

/// A node of the cluster; its `InternalIP` is where its proxy is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub ip: Option<IpAddr>,
    pub origin: Origin,
}

/// A ServiceAccount: the identity pods run as (`spiffe://<td>/ns/<ns>/sa/<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub key: ObjKey,
    pub origin: Origin,
}

/// sidenode's own cluster-wide settings (`sidenode.io/v1alpha1` `MeshConfig`; the one named
/// [`MESH_CONFIG_NAME`] is in force).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MeshConfig {
    pub name: String,
    /// Destination ports never captured (added to each agent's `--exclude-ports`).
    pub exclude_ports: Vec<u16>,
    /// Destination networks never captured (added to each agent's `--exclude-cidrs`).
    pub exclude_cidrs: Vec<ipnet::IpNet>,
    /// Workload certificate lifetime (replaces the controller's `--cert-ttl`).
    pub cert_ttl: Option<std::time::Duration>,
    /// Transport of new HBONE tunnels (`spec.tunnelProtocol`: `h2`, the default, or `quic`).
    pub tunnel_protocol: Option<String>,
    pub origin: Origin,
}

pub const MESH_CONFIG_NAME: &str = "default";

/// Every object of one kind the mesh reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    Node(Node),
    ServiceAccount(ServiceAccount),
    Istio(istio::IstioObject),
    /// A Gateway API HTTPRoute: the VirtualService it means for its Service parents and/or
    /// for its Gateway parents.
    HttpRoute(Box<gatewayapi::HttpRouteObject>),
    /// A Gateway API TLSRoute attached to Gateways.
    TlsRoute(gatewayapi::GatewayRoute),
    GatewayClass(gatewayapi::GatewayClass),
    /// A Gateway API `Gateway` (an Istio one is an [`Object::Istio`]).
    ApiGateway(gatewayapi::ApiGateway),
    ReferenceGrant(gatewayapi::ReferenceGrant),
    MeshConfig(MeshConfig),
}

/// A whole, consistent view of the cluster's objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjKey, Pod>,
    pub services: BTreeMap<ObjKey, Service>,
    pub nodes: BTreeMap<String, Node>,
    pub service_accounts: BTreeMap<ObjKey, ServiceAccount>,
    pub istio: BTreeMap<(istio::IstioKind, ObjKey), istio::IstioObject>,
    pub mesh_configs: BTreeMap<String, MeshConfig>,
    /// HTTPRoutes attached to Services (GAMMA), as VirtualServices.
    pub http_routes: BTreeMap<ObjKey, istio::IstioObject>,
    /// HTTPRoutes and TLSRoutes attached to Gateways (resolved by the controller).
    pub gateway_routes: BTreeMap<(gatewayapi::RouteKind, ObjKey), gatewayapi::GatewayRoute>,
    pub gateway_classes: BTreeMap<String, gatewayapi::GatewayClass>,
    pub api_gateways: BTreeMap<ObjKey, gatewayapi::ApiGateway>,
    pub reference_grants: BTreeMap<ObjKey, gatewayapi::ReferenceGrant>,
}

impl Snapshot {
    /// Puts an object in (replacing the one with the same kind and name).
    pub fn insert(&mut self, obj: Object) {
        match obj {
            Object::Namespace(n) => {
                self.namespaces.insert(n.name.clone(), n);
            }
            Object::Pod(p) => {
                self.pods.insert(p.key.clone(), p);
            }
            Object::Service(s) => {
                self.services.insert(s.key.clone(), s);
            }
            Object::Node(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Object::ServiceAccount(sa) => {
                self.service_accounts.insert(sa.key.clone(), sa);
            }
            Object::Istio(o) => {
                self.istio.insert((o.spec.kind(), o.key.clone()), o);
            }
            Object::HttpRoute(r) => {
                let r = *r;
                if let Some(m) = r.mesh {
                    self.http_routes.insert(r.key.clone(), m);
                }
                if let Some(g) = r.gateway {
                    self.gateway_routes.insert((g.kind, g.key.clone()), g);
                }
            }
            Object::TlsRoute(r) => {
                self.gateway_routes.insert((r.kind, r.key.clone()), r);
            }
            Object::GatewayClass(c) => {
                self.gateway_classes.insert(c.name.clone(), c);
            }
            Object::ApiGateway(g) => {
                self.api_gateways.insert(g.key.clone(), g);
            }
            Object::ReferenceGrant(g) => {
                self.reference_grants.insert(g.key.clone(), g);
            }
            Object::MeshConfig(m) => {
                self.mesh_configs.insert(m.name.clone(), m);
            }
        }
    }

    pub fn namespace_enabled(&self, ns: &str) -> bool {
        self.namespaces.get(ns).is_some_and(Namespace::mesh_enabled)
    }

    /// The mesh-wide settings in force (the `default` MeshConfig, or none).
    pub fn mesh_config(&self) -> Option<&MeshConfig> {
        self.mesh_configs.get(MESH_CONFIG_NAME)
    }

    /// Is this pod part of sidenode's mesh (captured, with sidenode's HBONE listener)?
    pub fn is_meshed(&self, pod: &Pod) -> bool {
        self.dataplane(pod) == Dataplane::Sidenode
    }

    /// Which data plane serves `pod`. The one place this rule lives (the YAML folder, the
    /// Kubernetes source and the CNI lookup all come through here):
    ///
    /// 1. a `hostNetwork` pod is in no mesh;
    /// 2. a pod Istio's CNI redirected to ztunnel is Istio's, even in a namespace sidenode
    ///    meshes: Istio ambient wins and sidenode steps aside;
    /// 3. a pod of a namespace with sidenode on that did not opt out is sidenode's (whatever
    ///    tunnel label it carries: the agent may have put it there to advertise it to Istio);
    /// 4. a pod with Istio's native-tunnel label is Istio's, unless the label is sidenode's own
    ///    advertisement left on a pod leaving sidenode's mesh (it still carries the agent's
    ///    status annotation, removed in the same patch as the label): then it is in none.
    pub fn dataplane(&self, pod: &Pod) -> Dataplane {
        if pod.host_network {
            Dataplane::None
        } else if pod.istio_ambient_redirected() {
            Dataplane::Istio
        } else if self.namespace_enabled(&pod.key.namespace) && !pod.opted_out() {
            Dataplane::Sidenode
        } else if pod.istio_native_tunnel() && !pod.sidenode_redirected() {
            Dataplane::Istio
        } else {
            Dataplane::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(ns_enabled: bool) -> Snapshot {
        let mut s = Snapshot::default();
        let mut labels = Labels::new();
        if ns_enabled {
            labels.insert(DATAPLANE_MODE_LABEL.into(), DATAPLANE_ENABLED.into());
        }
        s.insert(Object::Namespace(Namespace {
            name: "shop".into(),
            labels,
            origin: Origin::default(),
        }));
        s
    }

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Pod {
            key: ObjKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            uid: None,
            ready: true,
            node: Some("node1".into()),
            ip: std::net::IpAddr::from([10, 0, 0, 1]),
            ips: vec![std::net::IpAddr::from([10, 0, 0, 1])],
            service_account: "default".into(),
            host_network: false,
            labels: map(labels),
            annotations: map(annotations),
            origin: Origin::default(),
        }
    }

    const AMBIENT: (&str, &str) = (ISTIO_AMBIENT_REDIRECTION_ANNOTATION, "enabled");
    const TUNNEL: (&str, &str) = (ISTIO_TUNNEL_LABEL, "http");
    const OURS: (&str, &str) = (REDIRECTION_ANNOTATION, "enabled");

    #[test]
    fn neither_follows_the_namespace_label() {
        assert_eq!(snap(true).dataplane(&pod(&[], &[])), Dataplane::Sidenode);
        assert_eq!(snap(false).dataplane(&pod(&[], &[])), Dataplane::None);
        let opted_out = pod(&[(DATAPLANE_MODE_LABEL, DATAPLANE_NONE)], &[]);
        assert_eq!(snap(true).dataplane(&opted_out), Dataplane::None);
    }

    #[test]
    fn the_ambient_annotation_wins_over_sidenodes_namespace_label() {
        for enabled in [true, false] {
            let s = snap(enabled);
            let p = pod(&[], &[AMBIENT]);
            assert_eq!(s.dataplane(&p), Dataplane::Istio, "namespace on: {enabled}");
            assert!(!s.is_meshed(&p));
        }
        // Other values are not Istio's "redirected".
        let p = pod(&[], &[(ISTIO_AMBIENT_REDIRECTION_ANNOTATION, "disabled")]);
        assert_eq!(snap(false).dataplane(&p), Dataplane::None);
    }

    #[test]
    fn istios_tunnel_label_outside_sidenodes_mesh_is_istio() {
        assert_eq!(
            snap(false).dataplane(&pod(&[TUNNEL], &[])),
            Dataplane::Istio
        );
        // A comma-separated list, as Istio's SupportsTunnel reads it.
        let list = pod(&[(ISTIO_TUNNEL_LABEL, "h3,http")], &[]);
        assert_eq!(snap(false).dataplane(&list), Dataplane::Istio);
        let other = pod(&[(ISTIO_TUNNEL_LABEL, "https")], &[]);
        assert_eq!(snap(false).dataplane(&other), Dataplane::None);
    }

    #[test]
    fn both_marks_are_istio() {
        let p = pod(&[TUNNEL], &[AMBIENT]);
        assert_eq!(snap(true).dataplane(&p), Dataplane::Istio);
        assert_eq!(snap(false).dataplane(&p), Dataplane::Istio);
    }

    #[test]
    fn sidenodes_own_advertised_label_is_never_istio() {
        // Enrolled and advertised: still sidenode's.
        let p = pod(&[TUNNEL], &[OURS]);
        assert_eq!(snap(true).dataplane(&p), Dataplane::Sidenode);
        // The namespace left sidenode's mesh before the agent removed label and annotation:
        // not Istio's (nothing of Istio's listens there), so reached directly.
        assert_eq!(snap(false).dataplane(&p), Dataplane::None);
        // Opted out, same.
        let p = pod(&[TUNNEL, (DATAPLANE_MODE_LABEL, DATAPLANE_NONE)], &[OURS]);
        assert_eq!(snap(true).dataplane(&p), Dataplane::None);
    }

    #[test]
    fn host_network_is_in_no_mesh() {
        let mut p = pod(&[TUNNEL], &[AMBIENT]);
        p.host_network = true;
        assert_eq!(snap(true).dataplane(&p), Dataplane::None);
    }
}
