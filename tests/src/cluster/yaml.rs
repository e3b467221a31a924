//! The config objects the agents read: Namespaces and Pods, rendered as YAML by hand (every
//! scalar is JSON-quoted, which is valid YAML) and written atomically.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The label that enrolls a namespace (value `enabled`) or opts a pod out (value `none`).
pub const MODE_LABEL: &str = "sidenode.io/dataplane-mode";
/// The annotation naming a pod's network namespace file.
pub const NETNS_ANNOTATION: &str = "sidenode.io/netns";

/// One Pod object as written into `config/node<i>.yaml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodObject {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: String,
    /// A second address for `status.podIPs` (dual-stack).
    pub ip6: Option<String>,
    /// Path of the netns file (`/var/run/netns/<name>`), written as the `sidenode.io/netns`
    /// annotation.
    pub netns_path: String,
    pub service_account: String,
    /// Extra labels besides `app: <name>` (for example `sidenode.io/dataplane-mode: none`).
    pub labels: BTreeMap<String, String>,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

impl PodObject {
    /// The object as one YAML document (no `---`).
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        out.push_str("apiVersion: v1\nkind: Pod\nmetadata:\n");
        out.push_str(&format!("  name: {}\n", q(&self.name)));
        out.push_str(&format!("  namespace: {}\n", q(&self.namespace)));
        out.push_str("  labels:\n");
        // `app: <pod name>` unless the extra labels set `app` themselves (a key written twice
        // makes the document invalid YAML).
        if !self.labels.contains_key("app") {
            out.push_str(&format!("    app: {}\n", q(&self.name)));
        }
        for (k, v) in &self.labels {
            out.push_str(&format!("    {}: {}\n", q(k), q(v)));
        }
        out.push_str("  annotations:\n");
        out.push_str(&format!(
            "    {}: {}\n",
            q(NETNS_ANNOTATION),
            q(&self.netns_path)
        ));
        out.push_str("spec:\n");
        out.push_str(&format!("  nodeName: {}\n", q(&self.node)));
        out.push_str(&format!(
            "  serviceAccountName: {}\n",
            q(&self.service_account)
        ));
        out.push_str("status:\n");
        out.push_str(&format!("  podIP: {}\n", q(&self.ip)));
        out.push_str(&format!("  podIPs:\n  - ip: {}\n", q(&self.ip)));
        if let Some(ip6) = &self.ip6 {
            out.push_str(&format!("  - ip: {}\n", q(ip6)));
        }
        out
    }
}

impl PodObject {
    /// The object as one YAML document with a `Ready` condition of `ready` (a pod written
    /// without conditions counts as ready).
    pub fn to_yaml_with_ready(&self, ready: bool) -> String {
        let status = if ready { "True" } else { "False" };
        format!(
            "{}  conditions:\n  - type: \"Ready\"\n    status: \"{status}\"\n",
            self.to_yaml()
        )
    }
}

/// Several pods as one multi-document YAML file.
pub fn pods_yaml(pods: &[PodObject]) -> String {
    pods.iter()
        .map(PodObject::to_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `namespaces.yaml`: each namespace, labelled `sidenode.io/dataplane-mode: enabled` when on.
pub fn namespaces_yaml(namespaces: &BTreeMap<String, bool>) -> String {
    namespaces
        .iter()
        .map(|(name, enabled)| {
            let mut doc = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n",
                q(name)
            );
            if *enabled {
                doc.push_str(&format!("  labels:\n    {}: \"enabled\"\n", q(MODE_LABEL)));
            }
            doc
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `nodes.yaml`: a Node object per node (`node<i>` with InternalIP 198.18.0.i), which the
/// controller needs in mesh mode.
pub fn nodes_yaml(nodes: usize) -> String {
    (1..=nodes)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n",
                q(&format!("node{i}")),
                q(&super::node_ip(i))
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Write `contents` to `dir/name` atomically: a uniquely named temp file in `tmp_dir` (same
/// file system, outside the watched folder), then rename.
pub fn write_atomic(dir: &Path, tmp_dir: &Path, name: &str, contents: &str) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    let n = N.fetch_add(1, Ordering::Relaxed);
    let tmp = tmp_dir.join(format!("{name}.{}.{n}", std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    let dst = dir.join(name);
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    Ok(())
}
