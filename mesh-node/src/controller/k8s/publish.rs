//! Leader-only work: publish the mesh's trust anchor as the ConfigMap `sidenode-ca-root-cert`
//! (key `root-cert.pem`) in every namespace, as istiod publishes `istio-ca-root-cert`. Agents
//! mount it to verify the controller; applications may use it to verify mesh certificates.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tracing::{info, warn};

pub const ROOT_CERT_CONFIGMAP: &str = "sidenode-ca-root-cert";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
const MANAGER: &str = "sidenode-controller";

pub struct Publisher {
    client: Client,
    /// What is known to be in place, by namespace.
    done: BTreeMap<String, String>,
}

impl Publisher {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            done: BTreeMap::new(),
        }
    }

    /// Forget what was published (after losing and regaining leadership, check again).
    pub fn reset(&mut self) {
        self.done.clear();
    }

    /// Makes sure every namespace has the ConfigMap with `root_pem`.
    pub async fn sync<'a>(&mut self, namespaces: impl Iterator<Item = &'a String>, root_pem: &str) {
        let namespaces: Vec<String> = namespaces.cloned().collect();
        self.done.retain(|ns, _| namespaces.contains(ns));
        for ns in namespaces {
            if self.done.get(&ns).map(String::as_str) == Some(root_pem) {
                continue;
            }
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CERT_CONFIGMAP.into()),
                    namespace: Some(ns.clone()),
                    labels: Some(
                        [(
                            "app.kubernetes.io/managed-by".to_string(),
                            MANAGER.to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                data: Some([(ROOT_CERT_KEY.to_string(), root_pem.to_string())].into()),
                ..Default::default()
            };
            let params = PatchParams::apply(MANAGER).force();
            match api
                .patch(ROOT_CERT_CONFIGMAP, &params, &Patch::Apply(&cm))
                .await
            {
                Ok(_) => {
                    info!(namespace = %ns, configmap = ROOT_CERT_CONFIGMAP, "published the root certificate");
                    self.done.insert(ns, root_pem.to_string());
                }
                // A namespace being deleted refuses new objects; try again next round.
                Err(e) => warn!(namespace = %ns, error = %e, "publishing the root certificate"),
            }
        }
    }
}
