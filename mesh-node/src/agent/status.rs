//! The pod status annotation (`--pod-status`): every pod the agent enrolled carries
//! `sidenode.io/redirection: enabled` (Istio ambient: `ambient.istio.io/redirection`); a pod it
//! un-enrolled loses it. With `--advertise-hbone` the same patch also sets Istio's label
//! `networking.istio.io/tunnel: http` (and removes it with the annotation), so istiod reports
//! the pod to ztunnel as a native HBONE destination (docs/migrating-from-ambient.md).
//!
//! Runs in its own task, fed by a watch channel the agent fills after each reconcile, so a slow
//! or absent API server never delays enrollment. A pod is patched only when its state changed;
//! a failed patch is retried on the next reconcile (and every few seconds). Each patch carries
//! the pod's `metadata.uid`, which the API server treats as a precondition (as kubelet does for
//! pod status): a pod deleted and created again under the same name is never touched by a
//! patch meant for the old one.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::model::{
    ISTIO_TUNNEL_HTTP, ISTIO_TUNNEL_LABEL, ObjKey, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED,
};

/// The enrolled pods: key → Kubernetes UID (empty when unknown).
pub type Enrolled = BTreeMap<ObjKey, String>;

/// How often failed patches are tried again without a reconcile.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct StatusConfig {
    /// Kubeconfig file; without it `KUBECONFIG`, `~/.kube/config` or the in-cluster account.
    pub kubeconfig: Option<PathBuf>,
    /// Also set Istio's `networking.istio.io/tunnel: http` label on enrolled pods (and remove
    /// it with the annotation): ztunnel then reaches them over HBONE at `podIP:15008`.
    pub advertise_hbone: bool,
}

/// Starts the status task for `node`; send it the enrolled pods after every reconcile.
pub fn spawn(cfg: StatusConfig, node: String) -> watch::Sender<Enrolled> {
    let (tx, rx) = watch::channel(Enrolled::new());
    tokio::spawn(run(cfg, node, rx));
    tx
}

/// The merge patch that sets (`enabled`) or removes the annotation on the pod `uid`, and with
/// `advertise` Istio's tunnel label in the same write: label and annotation are never seen
/// apart, which is how the classification (`model::Snapshot::dataplane`) tells sidenode's own
/// advertised pods from Istio's.
pub fn patch_json(uid: &str, enabled: bool, advertise: bool) -> Value {
    let set = |v: &str| {
        if enabled {
            Value::String(v.to_string())
        } else {
            Value::Null
        }
    };
    let mut meta = json!({ "annotations": { REDIRECTION_ANNOTATION: set(REDIRECTION_ENABLED) } });
    if advertise {
        meta["labels"] = json!({ ISTIO_TUNNEL_LABEL: set(ISTIO_TUNNEL_HTTP) });
    }
    if !uid.is_empty() {
        meta["uid"] = Value::String(uid.to_string());
    }
    json!({ "metadata": meta })
}

/// What to patch to go from `done` (pods that carry the annotation) to `want`: (pod, uid,
/// enabled).
pub fn plan(want: &Enrolled, done: &Enrolled) -> Vec<(ObjKey, String, bool)> {
    let mut out = Vec::new();
    for (key, uid) in done {
        if !want.contains_key(key) {
            out.push((key.clone(), uid.clone(), false));
        }
    }
    for (key, uid) in want {
        if done.get(key) != Some(uid) {
            out.push((key.clone(), uid.clone(), true));
        }
    }
    out
}

pub(crate) async fn client(cfg: &StatusConfig) -> Result<kube::Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config, in-cluster)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// The pods of `node` that carry the annotation already (from an earlier run of the agent),
/// less those that lack the tunnel label when `advertise` is on (an earlier run without the
/// flag): while enrolled they are patched again, so they gain it.
async fn annotated(
    client: &kube::Client,
    node: &str,
    advertise: bool,
    want: &Enrolled,
) -> Result<Enrolled> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .context("listing this node's pods")?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|p| {
            let meta = p.metadata;
            meta.annotations.as_ref()?.get(REDIRECTION_ANNOTATION)?;
            let labelled = meta
                .labels
                .as_ref()
                .and_then(|l| l.get(ISTIO_TUNNEL_LABEL))
                .is_some_and(|v| v == ISTIO_TUNNEL_HTTP);
            let key = ObjKey {
                namespace: meta.namespace?,
                name: meta.name?,
            };
            if advertise && !labelled && want.contains_key(&key) {
                return None;
            }
            Some((key, meta.uid.unwrap_or_default()))
        })
        .collect())
}

async fn run(cfg: StatusConfig, node: String, mut rx: watch::Receiver<Enrolled>) {
    let mut client_: Option<kube::Client> = None;
    // What the pods carry, as far as we know; None until read from the API server.
    let mut done: Option<Enrolled> = None;
    let mut reported = String::new();
    loop {
        let want = rx.borrow_and_update().clone();
        let ok = step(&cfg, &node, &mut client_, &mut done, &want).await;
        match ok {
            Ok(true) => reported.clear(),
            Ok(false) => {}
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != reported {
                    warn!(error = %msg, "pod status: will try again");
                    reported = msg;
                }
            }
        }
        let pending = done.as_ref().is_none_or(|d| !plan(&want, d).is_empty());
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if pending => {}
        }
    }
}

/// One round: connect if needed, learn what is annotated, patch the differences. Ok(true) when
/// everything is in step.
async fn step(
    cfg: &StatusConfig,
    node: &str,
    client_: &mut Option<kube::Client>,
    done: &mut Option<Enrolled>,
    want: &Enrolled,
) -> Result<bool> {
    if client_.is_none() {
        *client_ = Some(client(cfg).await?);
    }
    let client = client_.as_ref().expect("set above");
    if done.is_none() {
        *done = Some(annotated(client, node, cfg.advertise_hbone, want).await?);
    }
    let done = done.as_mut().expect("set above");
    let mut failed = None;
    for (key, uid, enabled) in plan(want, done) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &key.namespace);
        let r = pods
            .patch(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(patch_json(&uid, enabled, cfg.advertise_hbone)),
            )
            .await;
        match r {
            Ok(_) => {
                debug!(pod = %key, enabled, "pod status annotation written");
                if enabled {
                    done.insert(key, uid);
                } else {
                    done.remove(&key);
                }
            }
            // Gone, or another pod under the same name now: nothing of ours to remove.
            Err(kube::Error::Api(s)) if !enabled && (s.is_not_found() || s.is_conflict()) => {
                done.remove(&key);
            }
            Err(e) => {
                let action = if enabled { "setting" } else { "removing" };
                failed.get_or_insert_with(|| {
                    format!("{action} {REDIRECTION_ANNOTATION} on pod {key}: {e}")
                });
            }
        }
    }
    match failed {
        Some(f) => Err(anyhow::anyhow!(f)),
        None => {
            if !want.is_empty() || !done.is_empty() {
                info!(annotated = done.len(), "pod status in step");
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ObjKey {
        ObjKey {
            namespace: "mesh".into(),
            name: n.into(),
        }
    }

    #[test]
    fn patch_sets_or_removes_the_annotation_with_a_uid_precondition() {
        assert_eq!(
            patch_json("u1", true, false),
            json!({"metadata": {"uid": "u1", "annotations": {"sidenode.io/redirection": "enabled"}}})
        );
        assert_eq!(
            patch_json("u1", false, false),
            json!({"metadata": {"uid": "u1", "annotations": {"sidenode.io/redirection": null}}})
        );
        assert_eq!(
            patch_json("", true, false),
            json!({"metadata": {"annotations": {"sidenode.io/redirection": "enabled"}}})
        );
    }

    #[test]
    fn advertising_writes_and_removes_the_tunnel_label_with_the_annotation() {
        assert_eq!(
            patch_json("u1", true, true),
            json!({"metadata": {"uid": "u1",
                "annotations": {"sidenode.io/redirection": "enabled"},
                "labels": {"networking.istio.io/tunnel": "http"}}})
        );
        assert_eq!(
            patch_json("u1", false, true),
            json!({"metadata": {"uid": "u1",
                "annotations": {"sidenode.io/redirection": null},
                "labels": {"networking.istio.io/tunnel": null}}})
        );
    }

    /// What the advertising patch leaves on a pod is never read back as an Istio pod: no
    /// loop where sidenode tunnels to its own advertised pods as if ztunnel served them.
    #[test]
    fn an_advertised_pod_is_never_classed_as_istios() {
        use crate::model::{Dataplane, Namespace, Object, Origin, Pod, Snapshot};
        let patch = patch_json("u1", true, true);
        let map = |v: &Value| -> crate::model::Labels {
            v.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        };
        let pod = Pod {
            key: key("web"),
            uid: Some("u1".into()),
            ready: true,
            node: Some("node1".into()),
            ip: std::net::IpAddr::from([10, 0, 0, 1]),
            ips: vec![std::net::IpAddr::from([10, 0, 0, 1])],
            service_account: "default".into(),
            host_network: false,
            labels: map(&patch["metadata"]["labels"]),
            annotations: map(&patch["metadata"]["annotations"]),
            origin: Origin::default(),
        };
        assert!(pod.istio_native_tunnel() && pod.sidenode_redirected());
        for (enabled, want) in [(true, Dataplane::Sidenode), (false, Dataplane::None)] {
            let mut snap = Snapshot::default();
            snap.insert(Object::Namespace(Namespace {
                name: pod.key.namespace.clone(),
                labels: if enabled {
                    [("sidenode.io/dataplane-mode".into(), "enabled".into())].into()
                } else {
                    Default::default()
                },
                origin: Origin::default(),
            }));
            assert_eq!(snap.dataplane(&pod), want, "namespace enabled: {enabled}");
        }
    }

    #[test]
    fn plan_patches_only_what_changed() {
        let want: Enrolled = [(key("a"), "1".into()), (key("b"), "2".into())].into();
        let done: Enrolled = [(key("a"), "1".into()), (key("c"), "3".into())].into();
        assert_eq!(
            plan(&want, &done),
            vec![(key("c"), "3".into(), false), (key("b"), "2".into(), true)]
        );
        assert!(plan(&want, &want).is_empty());
        // Same name, new pod: annotate the new one.
        let recreated: Enrolled = [(key("a"), "9".into()), (key("b"), "2".into())].into();
        assert_eq!(plan(&recreated, &want), vec![(key("a"), "9".into(), true)]);
    }
}
