//! Kubernetes mode ([`ClusterOpts::kube`]): the simulated cluster's objects live in a real
//! kube-apiserver (see [`crate::kube`]) instead of the config folder.
//!
//! The apiserver and its etcd run inside the fabric namespace `<prefix>-net`, the apiserver on
//! 198.18.0.254 (next to the controller), so nodes reach it as a real cluster's nodes would.
//! There is no kubelet: the harness creates the Namespaces, the agents' ServiceAccount, the
//! Nodes, one agent Pod per node (its projected token is what the node's agent and proxy
//! present to the controller), and the application Pods — with no `sidenode.io/netns`
//! annotation — then patches their status (IP, Ready) as a kubelet would. Each pod's cgroup is
//! named as kubelet's cgroupfs driver names it (`<node cgroup>/kubepods/besteffort/pod<uid>`)
//! and holds a `sleep infinity` "pause" process in the pod's netns, so the agent can find the
//! pod's network namespace from its UID alone.

use super::gateway::GATEWAY_NODE;
use super::{Cluster, GATEWAY_NAMESPACE, GATEWAY_POD, GATEWAY_SA, net, netns_path};
use crate::kube::KubeEnv;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The controller's namespace and the agents' service account there.
pub const SYSTEM_NS: &str = "sidenode-system";
pub const AGENT_SA: &str = "sidenode-agent";
/// Audience of the agents' tokens (the controller's `--token-audience` default).
pub const TOKEN_AUDIENCE: &str = "sidenode";

impl Cluster {
    /// The kube-apiserver of a Kubernetes-mode cluster.
    pub fn kube(&self) -> Result<&KubeEnv> {
        self.kube
            .as_ref()
            .context("not a Kubernetes-mode cluster (ClusterOpts::kube)")
    }

    /// Keep the apiserver running after this handle is dropped (`Cluster::down` stops it).
    pub fn detach_kube(&mut self) {
        if let Some(k) = self.kube.take() {
            k.detach();
        }
    }

    /// `kubectl` against the cluster's apiserver.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kube()?.kubectl(args)
    }

    /// The admin kubeconfig (server 198.18.0.254, reachable from the fabric and the nodes).
    pub fn kubeconfig(&self) -> Result<PathBuf> {
        Ok(self.kube()?.kubeconfig.clone())
    }

    /// Starts the apiserver and creates every object; rewrites the pods' cgroup paths and the
    /// node tokens. Runs before the pods' cgroups are created.
    pub(super) fn setup_kube(&mut self) -> Result<()> {
        let fabric = self.fabric_netns();
        net::ip_ns(&fabric, &["link", "set", "lo", "up"])?;
        let env = KubeEnv::start_in(
            &self.opts.prefix,
            Some(std::path::Path::new(&netns_path(&fabric))),
            net::CONTROLLER_IP,
        )?;
        self.kube = Some(env);

        let mut items = vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": AGENT_SA, "namespace": SYSTEM_NS}}),
        ];
        for (ns, enabled) in &self.namespaces {
            items.push(namespace_json(ns, *enabled));
        }
        for node in self.node_names() {
            items.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
            items.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": agent_pod(&node), "namespace": SYSTEM_NS,
                             "labels": {"app": "sidenode-node"}},
                "spec": {"nodeName": node, "hostNetwork": true,
                         "serviceAccountName": AGENT_SA,
                         "containers": [{"name": "agent", "image": "sidenode/mesh-node"}]}
            }));
        }
        for node in self.node_names() {
            for p in self.pod_objects(&node) {
                items.push(self.pod_json(&p.name)?);
            }
        }
        if self.opts.gateway {
            items.extend(gateway_objects());
        }
        self.kube()?.apply(&list(items))?;

        // Status, as the kubelet would write it.
        for (i, node) in self.node_names().iter().enumerate() {
            let st = json!({"status": {"addresses": [
                {"type": "InternalIP", "address": net::node_ip(i + 1)},
                {"type": "InternalIP", "address": net::node_ip6(i + 1)}]}});
            self.patch_status("node", None, node, &st)?;
        }
        let pods: Vec<(String, String)> = self
            .status
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.namespace.clone()))
            .collect();
        for (name, ns) in &pods {
            self.set_pod_ready(name, ns, true)?;
        }
        if self.opts.gateway {
            let ip = self.gateway()?.cluster_ip.clone();
            let node = self.node_index(GATEWAY_NODE)?;
            let st = json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "hostIP": net::node_ip(node),
                "conditions": [{"type": "Ready", "status": "True"}]}});
            self.patch_status("pod", Some(GATEWAY_NAMESPACE), GATEWAY_POD, &st)?;
        }

        // UIDs → kubelet-style cgroup folders.
        let uids = self.pod_uids()?;
        let root = self.cgroup_root.clone();
        for p in &mut self.status.pods {
            let uid = uids
                .get(&(p.namespace.clone(), p.name.clone()))
                .with_context(|| format!("no uid for pod {}/{}", p.namespace, p.name))?;
            p.cgroup = root
                .join(&p.node)
                .join("kubepods")
                .join("besteffort")
                .join(format!("pod{uid}"));
        }

        // Each node's agent and proxy present a token bound to the node's agent pod.
        for node in self.node_names() {
            let token = self.kubectl(&[
                "create",
                "token",
                AGENT_SA,
                "-n",
                SYSTEM_NS,
                "--audience",
                TOKEN_AUDIENCE,
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                &agent_pod(&node),
                "--duration",
                "2h",
            ])?;
            write_secret(&self.token_path(&node), token.trim())?;
        }
        // The gateway presents a token of its own ServiceAccount, bound to its Pod (as the
        // Deployment's projected token).
        if self.opts.gateway {
            let token = self.kubectl(&[
                "create",
                "token",
                GATEWAY_SA,
                "-n",
                GATEWAY_NAMESPACE,
                "--audience",
                TOKEN_AUDIENCE,
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                GATEWAY_POD,
                "--duration",
                "2h",
            ])?;
            write_secret(&self.gateway_token_path(), token.trim())?;
        }
        self.save()
    }

    /// A pod's object as a kubelet-less cluster holds it: labels, node, service account, no
    /// netns annotation.
    fn pod_json(&self, name: &str) -> Result<Value> {
        let node = self.pod(name)?.node.clone();
        let p = self
            .pod_objects(&node)
            .into_iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod object {name}"))?;
        let mut labels: BTreeMap<String, String> = p.labels.clone();
        labels.insert("app".into(), p.name.clone());
        Ok(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": labels},
            "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                     "containers": [{"name": "app", "image": "testpod"}]}
        }))
    }

    /// Patch a pod's status: Running with its addresses, Ready or not.
    pub fn set_pod_ready(&self, pod: &str, namespace: &str, ready: bool) -> Result<()> {
        let p = self.pod(pod)?;
        let mut ips = vec![json!({"ip": p.ip})];
        if !p.ip6.is_empty() {
            ips.push(json!({"ip": p.ip6}));
        }
        let status = if ready { "True" } else { "False" };
        let st = json!({"status": {
            "phase": "Running", "podIP": p.ip, "podIPs": ips,
            "hostIP": net::node_ip(self.node_index(&p.node)?),
            "conditions": [{"type": "Ready", "status": status}]}});
        self.patch_status("pod", Some(namespace), pod, &st)
    }

    fn patch_status(&self, kind: &str, ns: Option<&str>, name: &str, patch: &Value) -> Result<()> {
        let patch = patch.to_string();
        let mut args = vec![
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
        ];
        args.push(&patch);
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.kubectl(&args)?;
        Ok(())
    }

    /// `(namespace, name)` → `metadata.uid` of every pod.
    pub fn pod_uids(&self) -> Result<BTreeMap<(String, String), String>> {
        let out = self.kubectl(&["get", "pods", "-A", "-o", "json"])?;
        let v: Value = serde_json::from_str(&out).context("kubectl get pods -o json")?;
        let mut m = BTreeMap::new();
        for item in v["items"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let meta = &item["metadata"];
            if let (Some(ns), Some(name), Some(uid)) = (
                meta["namespace"].as_str(),
                meta["name"].as_str(),
                meta["uid"].as_str(),
            ) {
                m.insert((ns.to_string(), name.to_string()), uid.to_string());
            }
        }
        Ok(m)
    }

    /// One pod annotation (`None` when absent).
    pub fn pod_annotation(&self, pod: &str, key: &str) -> Result<Option<String>> {
        let ns = self.pod(pod)?.namespace.clone();
        let out = self.kubectl(&["get", "pod", pod, "-n", &ns, "-o", "json"])?;
        let v: Value = serde_json::from_str(&out).context("kubectl get pod -o json")?;
        Ok(v["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string))
    }

    /// Starts one `sleep infinity` per pod in its netns and cgroup (the pod sandbox).
    pub(super) fn start_pause_processes(&mut self) -> Result<()> {
        let names: Vec<String> = self.status.pods.iter().map(|p| p.name.clone()).collect();
        for name in names {
            let mut cmd = self.pod_command(&name, "sleep")?;
            cmd.arg("infinity")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let child = cmd
                .spawn()
                .with_context(|| format!("starting pause of {name}"))?;
            let key = format!("{name}-pause");
            self.pids.insert(key.clone(), child.id());
            self.children.insert(key, child);
        }
        self.save()
    }

    /// Kubernetes mode: label (or unlabel) a namespace through the API.
    pub(super) fn kube_label_namespace(&self, ns: &str, enabled: bool) -> Result<()> {
        let label = if enabled {
            format!("{}=enabled", super::MODE_LABEL)
        } else {
            format!("{}-", super::MODE_LABEL)
        };
        self.kubectl(&["label", "namespace", ns, &label, "--overwrite"])?;
        Ok(())
    }

    /// Wait until `f` holds, polling every 100 ms.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let last = f();
            if matches!(last, Ok(true)) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                match last {
                    Err(e) => return Err(e.context(format!("waiting for {what}"))),
                    _ => bail!("waiting for {what}: not after {timeout:?}"),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The gateway's Namespace (not enrolled), ServiceAccount and Pod (node 1, its labels).
fn gateway_objects() -> Vec<Value> {
    vec![
        namespace_json(GATEWAY_NAMESPACE, false),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": GATEWAY_SA, "namespace": GATEWAY_NAMESPACE}}),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": GATEWAY_POD, "namespace": GATEWAY_NAMESPACE,
                         "labels": super::gateway::gateway_labels()},
            "spec": {"nodeName": GATEWAY_NODE, "serviceAccountName": GATEWAY_SA,
                     "containers": [{"name": "gateway", "image": "sidenode/mesh-node"}]}
        }),
    ]
}

fn agent_pod(node: &str) -> String {
    format!("sidenode-{node}")
}

fn namespace_json(ns: &str, enabled: bool) -> Value {
    let labels: BTreeMap<&str, &str> = if enabled {
        [(super::MODE_LABEL, "enabled")].into()
    } else {
        BTreeMap::new()
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
}

fn list(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, format!("{text}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}
