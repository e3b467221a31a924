//! The controller's state as the gRPC stream carries it, and the updates between versions.

use std::collections::BTreeMap;

use crate::model::gatewayapi::RouteKind;
use crate::model::istio::IstioObject;
use crate::model::{Snapshot, TargetPort};
use crate::proto;

/// Everything the controller serves, at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub version: u64,
    pub workloads: BTreeMap<String, proto::Workload>,
    pub services: BTreeMap<String, proto::Service>,
    pub nodes: BTreeMap<String, proto::Node>,
    pub configs: BTreeMap<String, proto::Config>,
    pub settings: proto::MeshSettings,
    /// Workload certificate lifetime from the MeshConfig (the controller's flag otherwise).
    pub cert_ttl: Option<std::time::Duration>,
    pub trust_bundle_pem: String,
    pub trust_domain: String,
    /// When this version was built (Unix ms), sent with every update for the nodes' lag.
    pub built_unix_ms: u64,
}

/// A config for the stream: uid `<prefix>/<ns>/<name>`, the tagged JSON of a validated spec.
fn config(prefix: &str, kind: &str, o: &IstioObject) -> Option<(String, proto::Config)> {
    let uid = format!("{prefix}/{}", o.key);
    // The tagged JSON (`{"kind":…,"spec":…}`) of a validated spec.
    let spec_json = match serde_json::to_string(&o.spec) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(object = %uid, error = %e, "cannot encode; not served");
            return None;
        }
    };
    let c = proto::Config {
        uid: uid.clone(),
        kind: kind.to_string(),
        namespace: o.key.namespace.clone(),
        name: o.key.name.clone(),
        spec_json,
    };
    Some((uid, c))
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl View {
    /// Builds the served objects from a snapshot (the version is set by the caller).
    pub fn from_snapshot(snap: &Snapshot, trust_bundle_pem: &str, trust_domain: &str) -> View {
        let workloads = snap
            .pods
            .values()
            .map(|p| {
                let uid = p.key.to_string();
                let w = proto::Workload {
                    uid: uid.clone(),
                    namespace: p.key.namespace.clone(),
                    name: p.key.name.clone(),
                    service_account: p.service_account.clone(),
                    node: p.node.clone().unwrap_or_default(),
                    ips: p.ips.iter().map(ToString::to_string).collect(),
                    meshed: snap.is_meshed(p),
                    dataplane: proto::Dataplane::from(snap.dataplane(p)) as i32,
                    netns: p
                        .annotations
                        .get(crate::model::NETNS_ANNOTATION)
                        .cloned()
                        .unwrap_or_default(),
                    labels: p.labels.clone().into_iter().collect(),
                    pod_uid: p.uid.clone().unwrap_or_default(),
                    ready: p.ready,
                };
                (uid, w)
            })
            .collect();
        let services = snap
            .services
            .values()
            .map(|s| {
                let uid = s.key.to_string();
                let svc = proto::Service {
                    uid: uid.clone(),
                    namespace: s.key.namespace.clone(),
                    name: s.key.name.clone(),
                    cluster_ip: s.cluster_ip.map(|i| i.to_string()).unwrap_or_default(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| proto::ServicePort {
                            name: p.name.clone().unwrap_or_default(),
                            port: u32::from(p.port),
                            target_port: match &p.target_port {
                                Some(TargetPort::Number(n)) => u32::from(*n),
                                None => u32::from(p.port),
                                Some(TargetPort::Name(_)) => 0,
                            },
                            target_port_name: match &p.target_port {
                                Some(TargetPort::Name(n)) => n.clone(),
                                _ => String::new(),
                            },
                            protocol: p.protocol.clone(),
                            app_protocol: p.app_protocol.clone().unwrap_or_default(),
                        })
                        .collect(),
                    selector: s.selector.clone().into_iter().collect(),
                };
                (uid, svc)
            })
            .collect();
        let nodes = snap
            .nodes
            .values()
            .map(|n| {
                let node = proto::Node {
                    name: n.name.clone(),
                    ip: n.ip.map(|i| i.to_string()).unwrap_or_default(),
                };
                (n.name.clone(), node)
            })
            .collect();
        let http_routes = snap
            .http_routes
            .values()
            .map(|o| ("HTTPRoute", "HTTPRoute", o));
        let mut configs: BTreeMap<String, proto::Config> = snap
            .istio
            .values()
            .map(|o| (o.spec.kind().as_str(), o.spec.kind().as_str(), o))
            .chain(http_routes)
            .filter_map(|(prefix, kind, o)| config(prefix, kind, o))
            .collect();
        // The Gateway API, resolved: sidenode's Gateways in the Istio form (an Istio Gateway
        // of the same name keeps its key), the routes bound to them as VirtualServices.
        let gw = super::gateway::resolve(snap);
        for o in &gw.gateways {
            if let Some((uid, c)) = config("Gateway", "Gateway", o) {
                if configs.contains_key(&uid) {
                    tracing::warn!(
                        gateway = %o.key,
                        "an Istio Gateway and a Gateway API Gateway share this name; the Istio one is served"
                    );
                    continue;
                }
                configs.insert(uid, c);
            }
        }
        for (kind, o) in &gw.routes {
            let prefix = match kind {
                RouteKind::Http => "GatewayHTTPRoute",
                RouteKind::Tls => "GatewayTLSRoute",
            };
            if let Some((uid, c)) = config(prefix, kind.as_str(), o) {
                configs.insert(uid, c);
            }
        }
        let mc = snap.mesh_config();
        let settings = proto::MeshSettings {
            exclude_ports: mc
                .map(|m| m.exclude_ports.iter().map(|p| u32::from(*p)).collect())
                .unwrap_or_default(),
            exclude_cidrs: mc
                .map(|m| m.exclude_cidrs.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            tunnel_protocol: mc
                .and_then(|m| m.tunnel_protocol.clone())
                .unwrap_or_default(),
        };
        View {
            version: 0,
            workloads,
            services,
            nodes,
            configs,
            settings,
            cert_ttl: mc.and_then(|m| m.cert_ttl),
            trust_bundle_pem: trust_bundle_pem.to_string(),
            trust_domain: trust_domain.to_string(),
            built_unix_ms: unix_ms(),
        }
    }

    /// Same objects (versions aside)?
    pub fn same_content(&self, other: &View) -> bool {
        self.workloads == other.workloads
            && self.services == other.services
            && self.nodes == other.nodes
            && self.configs == other.configs
            && self.settings == other.settings
            && self.cert_ttl == other.cert_ttl
            && self.trust_bundle_pem == other.trust_bundle_pem
    }

    /// The full snapshot update.
    pub fn snapshot(&self) -> proto::StateUpdate {
        proto::StateUpdate {
            version: self.version,
            snapshot: true,
            workloads: self.workloads.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            nodes: self.nodes.values().cloned().collect(),
            configs: self.configs.values().cloned().collect(),
            settings: Some(self.settings.clone()),
            trust_bundle_pem: self.trust_bundle_pem.clone(),
            trust_domain: self.trust_domain.clone(),
            built_unix_ms: self.built_unix_ms,
            ..Default::default()
        }
    }

    /// The incremental update from `old` to `self`.
    pub fn delta_from(&self, old: &View) -> proto::StateUpdate {
        fn diff<T: Clone + PartialEq>(
            old: &BTreeMap<String, T>,
            new: &BTreeMap<String, T>,
        ) -> (Vec<T>, Vec<String>) {
            let changed = new
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(*v))
                .map(|(_, v)| v.clone())
                .collect();
            let removed = old
                .keys()
                .filter(|k| !new.contains_key(*k))
                .cloned()
                .collect();
            (changed, removed)
        }
        let (workloads, removed_workloads) = diff(&old.workloads, &self.workloads);
        let (services, removed_services) = diff(&old.services, &self.services);
        let (nodes, removed_nodes) = diff(&old.nodes, &self.nodes);
        let (configs, removed_configs) = diff(&old.configs, &self.configs);
        proto::StateUpdate {
            version: self.version,
            snapshot: false,
            workloads,
            removed_workloads,
            services,
            removed_services,
            nodes,
            removed_nodes,
            configs,
            removed_configs,
            settings: Some(self.settings.clone()),
            trust_bundle_pem: self.trust_bundle_pem.clone(),
            trust_domain: self.trust_domain.clone(),
            built_unix_ms: self.built_unix_ms,
        }
    }
}
