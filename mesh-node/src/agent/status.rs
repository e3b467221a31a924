//! The pod status annotation (`--pod-status`): every pod the agent enrolled carries
//! `sidenode.io/redirection: enabled` (Istio ambient: `ambient.istio.io/redirection`); a pod it
//! un-enrolled loses it.
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

use crate::model::{ObjKey, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};

/// The enrolled pods: key → Kubernetes UID (empty when unknown).
pub type Enrolled = BTreeMap<ObjKey, String>;

/// How often failed patches are tried again without a reconcile.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct StatusConfig {
    /// Kubeconfig file; without it `KUBECONFIG`, `~/.kube/config` or the in-cluster account.
    pub kubeconfig: Option<PathBuf>,
}

/// Starts the status task for `node`; send it the enrolled pods after every reconcile.
pub fn spawn(cfg: StatusConfig, node: String) -> watch::Sender<Enrolled> {
    let (tx, rx) = watch::channel(Enrolled::new());
    tokio::spawn(run(cfg, node, rx));
    tx
}

/// The merge patch that sets (`enabled`) or removes the annotation on the pod `uid`.
pub fn patch_json(uid: &str, enabled: bool) -> Value {
    let value = if enabled {
        Value::String(REDIRECTION_ENABLED.to_string())
    } else {
        Value::Null
    };
    let mut meta = json!({ "annotations": { REDIRECTION_ANNOTATION: value } });
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

/// The pods of `node` that carry the annotation already (from an earlier run of the agent).
async fn annotated(client: &kube::Client, node: &str) -> Result<Enrolled> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .context("listing this node's pods")?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some()
        })
        .filter_map(|p| {
            Some((
                ObjKey {
                    namespace: p.metadata.namespace?,
                    name: p.metadata.name?,
                },
                p.metadata.uid.unwrap_or_default(),
            ))
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
        *done = Some(annotated(client, node).await?);
    }
    let done = done.as_mut().expect("set above");
    let mut failed = None;
    for (key, uid, enabled) in plan(want, done) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &key.namespace);
        let r = pods
            .patch(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(patch_json(&uid, enabled)),
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
            patch_json("u1", true),
            json!({"metadata": {"uid": "u1", "annotations": {"sidenode.io/redirection": "enabled"}}})
        );
        assert_eq!(
            patch_json("u1", false),
            json!({"metadata": {"uid": "u1", "annotations": {"sidenode.io/redirection": null}}})
        );
        assert_eq!(
            patch_json("", true),
            json!({"metadata": {"annotations": {"sidenode.io/redirection": "enabled"}}})
        );
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
