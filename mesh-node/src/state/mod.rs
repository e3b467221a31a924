//! A node's copy of the controller's state: kept current by the state stream (`client`),
//! swapped atomically (`Arc`) so a connection sees one consistent version, and kept as it is
//! while the controller is away.

#![forbid(unsafe_code)]

pub mod client;
pub mod protocol;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::identity::Identity;
use crate::model::istio::{IstioObject, IstioSpec};
use crate::model::{ObjKey, Origin};
use crate::proto;

#[derive(Clone, Debug, Default)]
pub struct NodeState {
    pub version: u64,
    pub workloads: BTreeMap<String, proto::Workload>,
    pub services: BTreeMap<String, proto::Service>,
    pub nodes: BTreeMap<String, proto::Node>,
    /// Istio objects by `Kind/namespace/name`, decoded.
    pub configs: BTreeMap<String, IstioObject>,
    /// Mesh-wide settings (the `default` MeshConfig).
    pub settings: proto::MeshSettings,
    pub by_ip: HashMap<IpAddr, String>,
    /// Service cluster IP (VIP) → service uid; headless services have none.
    pub by_vip: HashMap<IpAddr, String>,
    pub trust_bundle_pem: String,
    pub trust_domain: String,
}

impl NodeState {
    /// Applies an update (a snapshot replaces everything).
    pub fn apply(&self, u: proto::StateUpdate) -> NodeState {
        let mut s = if u.snapshot {
            NodeState::default()
        } else {
            self.clone()
        };
        s.version = u.version;
        for uid in u.removed_workloads {
            s.workloads.remove(&uid);
        }
        for w in u.workloads {
            s.workloads.insert(w.uid.clone(), w);
        }
        for uid in u.removed_services {
            s.services.remove(&uid);
        }
        for svc in u.services {
            s.services.insert(svc.uid.clone(), svc);
        }
        for n in u.removed_nodes {
            s.nodes.remove(&n);
        }
        for n in u.nodes {
            s.nodes.insert(n.name.clone(), n);
        }
        for uid in u.removed_configs {
            s.configs.remove(&uid);
        }
        for c in u.configs {
            match serde_json::from_str::<IstioSpec>(&c.spec_json) {
                Ok(spec) => {
                    let obj = IstioObject {
                        key: ObjKey {
                            namespace: c.namespace,
                            name: c.name,
                        },
                        spec,
                        origin: Origin::kubernetes(format!("controller: {}", c.uid)),
                    };
                    s.configs.insert(c.uid, obj);
                }
                // A newer controller may send what this node cannot read: keep the last good.
                Err(e) => {
                    tracing::error!(object = %c.uid, error = %e, "undecodable config from the controller; keeping the previous version")
                }
            }
        }
        if let Some(settings) = u.settings {
            s.settings = settings;
        }
        if !u.trust_bundle_pem.is_empty() {
            s.trust_bundle_pem = u.trust_bundle_pem;
        }
        if !u.trust_domain.is_empty() {
            s.trust_domain = u.trust_domain;
        }
        s.by_ip = s
            .workloads
            .values()
            .flat_map(|w| {
                w.ips
                    .iter()
                    .filter_map(|ip| ip.parse().ok())
                    .map(move |ip: IpAddr| (ip, w.uid.clone()))
            })
            .collect();
        s.by_vip = s
            .services
            .values()
            .filter_map(|svc| Some((svc.cluster_ip.parse().ok()?, svc.uid.clone())))
            .collect();
        s
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&proto::Workload> {
        self.by_ip.get(&ip).and_then(|uid| self.workloads.get(uid))
    }

    pub fn identity_of(&self, w: &proto::Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
    }
}

pub type StateRx = watch::Receiver<Arc<NodeState>>;
