//! The Kubernetes API as a configuration source: one watch per kind (Namespaces, Pods,
//! Services, ServiceAccounts, Nodes, and the Istio kinds when their CRDs are installed), each
//! object converted by the same code that reads the YAML folder (`config::parse::convert`), kept
//! in a store from which the controller builds the same `Snapshot` a folder gives.
//!
//! Like the folder, it keeps the last good version of every object: an object that no longer
//! converts (an invalid VirtualService, say) stays in force in its previous version, and the
//! error names the object and field once. Pods without an address yet (Pending) or finished
//! (Succeeded/Failed) are not part of the mesh's state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::config::ConfigError;
use crate::config::parse::{API_GATEWAY_KIND, JsonObject, ObjId, convert};
use crate::config::watch::Scan;
use crate::model::gatewayapi;
use crate::model::istio::IstioKind;
use crate::model::{Object, Origin, Snapshot};

/// Kinds the controller cannot serve without: the first view waits for their initial list.
const CORE_KINDS: [&str; 5] = ["Namespace", "Node", "Pod", "Service", "ServiceAccount"];

#[derive(Default)]
struct Store {
    objects: BTreeMap<ObjId, Object>,
    errors: BTreeMap<ObjId, ConfigError>,
    changed: bool,
    new_errors: Vec<ConfigError>,
    /// Kinds whose initial list is in.
    synced: BTreeSet<String>,
}

#[derive(Clone)]
pub struct KubeSource {
    store: Arc<Mutex<Store>>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

impl KubeSource {
    /// Starts a watch per kind (tasks on the current runtime).
    pub fn start(client: Client) -> KubeSource {
        let src = KubeSource {
            store: Arc::default(),
        };
        let core = [
            ("Namespace", ApiResource::erase::<Namespace>(&())),
            ("Node", ApiResource::erase::<Node>(&())),
            ("Pod", ApiResource::erase::<Pod>(&())),
            ("Service", ApiResource::erase::<Service>(&())),
            ("ServiceAccount", ApiResource::erase::<ServiceAccount>(&())),
        ];
        for (kind, ar) in core {
            let (c, s) = (client.clone(), src.clone());
            tokio::spawn(async move { s.watch(c, ar, kind).await });
        }
        for kind in IstioKind::ALL {
            let (c, s) = (client.clone(), src.clone());
            tokio::spawn(async move {
                let versions: Vec<GroupVersionKind> = kind
                    .versions()
                    .iter()
                    .map(|v| GroupVersionKind::gvk(kind.group(), v, kind.as_str()))
                    .collect();
                s.watch_crd(c, kind.as_str(), kind.plural(), &versions)
                    .await
            });
        }
        let (c, s) = (client.clone(), src.clone());
        tokio::spawn(async move {
            let gvk = GroupVersionKind::gvk("sidenode.io", "v1alpha1", "MeshConfig");
            s.watch_crd(c, "MeshConfig", "meshconfigs", &[gvk]).await
        });
        // The Gateway API kinds: (the label objects are stored under, kind, plural, versions).
        let gateway_api: [(&'static str, &str, &str, &[&str]); 5] = [
            ("HTTPRoute", "HTTPRoute", "httproutes", &["v1", "v1beta1"]),
            ("TLSRoute", "TLSRoute", "tlsroutes", &["v1alpha2"]),
            (
                "GatewayClass",
                "GatewayClass",
                "gatewayclasses",
                &["v1", "v1beta1"],
            ),
            (API_GATEWAY_KIND, "Gateway", "gateways", &["v1", "v1beta1"]),
            (
                "ReferenceGrant",
                "ReferenceGrant",
                "referencegrants",
                &["v1", "v1beta1"],
            ),
        ];
        for (label, kind, plural, versions) in gateway_api {
            let (c, s) = (client.clone(), src.clone());
            let versions: Vec<GroupVersionKind> = versions
                .iter()
                .map(|v| GroupVersionKind::gvk(gatewayapi::GROUP, v, kind))
                .collect();
            tokio::spawn(async move { s.watch_crd(c, label, plural, &versions).await });
        }
        src
    }

    /// Has the initial list of every core kind arrived?
    pub fn synced(&self) -> bool {
        let st = lock(&self.store);
        CORE_KINDS.iter().all(|k| st.synced.contains(*k))
    }

    /// What changed since the last call (the same contract as the folder's scan).
    pub fn scan(&self) -> Scan {
        let mut st = lock(&self.store);
        Scan {
            changed: std::mem::take(&mut st.changed),
            new_errors: std::mem::take(&mut st.new_errors),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.store);
        let mut snap = Snapshot::default();
        for obj in st.objects.values() {
            snap.insert(obj.clone());
        }
        snap
    }

    /// Kinds of a CRD (Istio's, ours): the first served version of `versions`; while the CRD
    /// is not installed, look again every 3 s.
    async fn watch_crd(
        &self,
        client: Client,
        kind: &'static str,
        plural: &str,
        versions: &[GroupVersionKind],
    ) {
        let mut reported = false;
        loop {
            for gvk in versions {
                let ar = ApiResource::from_gvk_with_plural(gvk, plural);
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                match api.list(&ListParams::default().limit(1)).await {
                    Ok(_) => {
                        info!(kind, version = %gvk.version, group = %gvk.group, "watching");
                        return self.watch(client, ar, kind).await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => continue,
                    Err(e) => {
                        warn!(kind, error = %e, "listing");
                        break;
                    }
                }
            }
            if !reported {
                info!(
                    kind,
                    "CRD not installed; these objects are ignored until it is"
                );
                reported = true;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }

    /// Watches the objects of `ar`, stored under the label `kind` (the kind, or for a Gateway
    /// API `Gateway` [`API_GATEWAY_KIND`]).
    async fn watch(&self, client: Client, ar: ApiResource, kind: &'static str) {
        let api: Api<DynamicObject> = Api::all_with(client, &ar);
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut initial: Option<Vec<DynamicObject>> = None;
        let mut last_error = String::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => initial = Some(Vec::new()),
                Ok(Event::InitApply(o)) => initial.get_or_insert_with(Vec::new).push(o),
                Ok(Event::InitDone) => {
                    let objs = initial.take().unwrap_or_default();
                    info!(kind, objects = objs.len(), "initial list");
                    self.replace_kind(kind, &ar, objs);
                }
                Ok(Event::Apply(o)) => {
                    let mut st = lock(&self.store);
                    upsert(&mut st, kind, &ar, &o);
                }
                Ok(Event::Delete(o)) => {
                    let mut st = lock(&self.store);
                    let id = id_of(kind, &o);
                    st.errors.remove(&id);
                    if st.objects.remove(&id).is_some() {
                        st.changed = true;
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        warn!(kind, error = %msg, "watch failed; retrying with backoff (the last state stays in force)");
                        last_error = msg;
                    }
                }
            }
        }
    }

    /// A (re)list: objects of `kind` not in it are gone.
    fn replace_kind(&self, kind: &str, ar: &ApiResource, objs: Vec<DynamicObject>) {
        let mut st = lock(&self.store);
        let listed: BTreeSet<ObjId> = objs.iter().map(|o| id_of(kind, o)).collect();
        let before = st.objects.len();
        st.objects
            .retain(|id, _| id.kind != kind || listed.contains(id));
        st.errors
            .retain(|id, _| id.kind != kind || listed.contains(id));
        if st.objects.len() != before {
            st.changed = true;
        }
        for o in &objs {
            upsert(&mut st, kind, ar, o);
        }
        st.synced.insert(kind.to_string());
        st.changed = true;
    }
}

fn id_of(kind: &str, o: &DynamicObject) -> ObjId {
    ObjId {
        kind: kind.to_string(),
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone().unwrap_or_default(),
    }
}

/// A pod is part of the mesh's state once it has an address and until it finished.
fn pod_in_state(v: &serde_json::Value) -> bool {
    let status = &v["status"];
    let has_ip = status["podIP"].as_str().is_some_and(|s| !s.is_empty());
    let phase = status["phase"].as_str().unwrap_or("");
    has_ip && phase != "Succeeded" && phase != "Failed"
}

fn upsert(st: &mut Store, kind: &str, ar: &ApiResource, o: &DynamicObject) {
    let id = id_of(kind, o);
    let value = match serde_json::to_value(o) {
        Ok(v) => v,
        Err(e) => {
            warn!(object = %id, error = %e, "cannot read object");
            return;
        }
    };
    if kind == "Pod" && !pod_in_state(&value) {
        st.errors.remove(&id);
        if st.objects.remove(&id).is_some() {
            st.changed = true;
        }
        return;
    }
    let origin = Origin::kubernetes(format!("kubernetes {id}"));
    match convert(&ar.kind, &ar.api_version, &JsonObject(&value), origin) {
        // Not (or no longer) the mesh's, e.g. an HTTPRoute now attached only to a Gateway.
        None => {
            st.errors.remove(&id);
            if st.objects.remove(&id).is_some() {
                st.changed = true;
            }
        }
        Some(Ok(obj)) => {
            st.errors.remove(&id);
            if st.objects.get(&id) != Some(&obj) {
                st.objects.insert(id, obj);
                st.changed = true;
            }
        }
        Some(Err(e)) => {
            let err = ConfigError {
                file: PathBuf::from("kubernetes"),
                line: 0,
                object: Some(id.to_string()),
                field: e.field,
                message: e.message,
            };
            if st.errors.get(&id) != Some(&err) {
                st.new_errors.push(err.clone());
                st.errors.insert(id, err);
            }
            // The last good version (if any) stays in `objects`.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dyn_obj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).expect("dynamic object")
    }

    fn vs_resource() -> ApiResource {
        let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService");
        ApiResource::from_gvk_with_plural(&gvk, "virtualservices")
    }

    #[test]
    fn the_two_gateway_kinds_are_told_apart_by_their_group() {
        let mut st = Store::default();
        let istio = dyn_obj(serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": "web", "namespace": "edge"},
            "spec": {"selector": {"istio": "ingressgateway"},
                     "servers": [{"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"]}]}
        }));
        let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", "Gateway");
        upsert(
            &mut st,
            "Gateway",
            &ApiResource::from_gvk_with_plural(&gvk, "gateways"),
            &istio,
        );
        let api = dyn_obj(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "web", "namespace": "edge", "generation": 3},
            "spec": {"gatewayClassName": "sidenode",
                     "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}
        }));
        let gvk = GroupVersionKind::gvk(gatewayapi::GROUP, "v1", "Gateway");
        upsert(
            &mut st,
            API_GATEWAY_KIND,
            &ApiResource::from_gvk_with_plural(&gvk, "gateways"),
            &api,
        );
        assert!(st.new_errors.is_empty(), "{:?}", st.new_errors);
        assert_eq!(st.objects.len(), 2);
        let snap = {
            let mut s = Snapshot::default();
            for o in st.objects.values() {
                s.insert(o.clone());
            }
            s
        };
        assert_eq!(snap.istio.len(), 1);
        let gw = snap
            .api_gateways
            .values()
            .next()
            .expect("the Gateway API one");
        assert_eq!(gw.class_name, "sidenode");
        assert_eq!(gw.generation, 3);
        // Every object is stored under the id it reports.
        for (id, o) in &st.objects {
            assert_eq!(&o.id(), id);
        }
    }

    #[test]
    fn invalid_update_keeps_the_last_good_version() {
        let mut st = Store::default();
        let good = dyn_obj(serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "mesh"},
            "spec": {"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "reviews"}}]}]}
        }));
        let ar = vs_resource();
        upsert(&mut st, "VirtualService", &ar, &good);
        assert_eq!(st.objects.len(), 1);
        let bad = dyn_obj(serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "mesh"},
            "spec": {"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "reviews"}, "weight": "eighty"}]}]}
        }));
        upsert(&mut st, "VirtualService", &ar, &bad);
        assert_eq!(st.objects.len(), 1, "last good version stays");
        let e = &st.new_errors[0];
        assert_eq!(e.object.as_deref(), Some("VirtualService mesh/r"));
        assert_eq!(e.field.as_deref(), Some("spec.tcp[0].route[0].weight"));
    }

    #[test]
    fn pending_pods_are_not_in_the_state() {
        let mut st = Store::default();
        let pending = dyn_obj(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "mesh", "uid": "u1"},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Pending"}
        }));
        let ar = ApiResource::erase::<Pod>(&());
        upsert(&mut st, "Pod", &ar, &pending);
        assert!(st.objects.is_empty());
        assert!(st.new_errors.is_empty(), "pending is not an error");
        let running = dyn_obj(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "mesh", "uid": "u1"},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "198.19.1.2",
                       "conditions": [{"type": "Ready", "status": "False"}]}
        }));
        upsert(&mut st, "Pod", &ar, &running);
        let Some(Object::Pod(p)) = st.objects.values().next() else {
            panic!("pod expected")
        };
        assert_eq!(p.uid.as_deref(), Some("u1"));
        assert!(!p.ready);
    }
}
