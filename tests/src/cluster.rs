//! The simulated cluster: network namespaces for a fabric, nodes and pods; cgroup v2 folders
//! per node and pod; a fresh bpffs; config YAML the agents watch; and per node a `mesh-node
//! agent` and `mesh-node proxy` running in the node's namespace.
//!
//! Layout (prefix `P`, node `i` 1-based, pod `j` 1-based):
//! - netns `P-net` (bridge `br0`), `P-node<i>` (`eth0` = 198.18.0.i/24), `P-n<i>p<j>`
//!   (`eth0` = 198.19.i.(j+1)/32, default via 169.254.1.1 which the node answers by proxy ARP);
//! - cgroups `<cgroup2>/P/node<i>/pod<j>`;
//! - state `/run/sidenode-P/`: `cluster.json`, `config/`, `logs/<node>-{agent,proxy}.log`,
//!   `bpffs/` (a bpffs mount; node i's pins live under `bpffs/node<i>`).
//! - mesh mode ([`ClusterOpts::mesh`]): `br0` in `P-net` also has 198.18.0.254/24, where a
//!   `mesh-node controller` listens on port 15012 (state `controller/`, node tokens
//!   `tokens/node<i>`, log `logs/controller.log`); `config/nodes.yaml` has the Node objects.
//!
//! Everything is found again by prefix, so [`Cluster::down`] cleans up after a crash too.

mod agents;
pub mod gateway;
mod kube;
mod net;
mod procs;
mod yaml;

pub use agents::CONTROLLER;
pub use gateway::{
    GATEWAY, GATEWAY_LABELS, GATEWAY_NAMESPACE, GATEWAY_POD, GATEWAY_READY, GATEWAY_SA,
    GatewayStatus, OutsideStatus,
};
pub use kube::{AGENT_SA, SYSTEM_NS, TOKEN_AUDIENCE};

pub use net::{
    CONTROLLER_IP, CONTROLLER_PORT, GATEWAY_CLUSTER_IP, GATEWAY_OUTSIDE_IP, OUTSIDE_IP, netns_path,
    node_ip, node_ip6, pod_ip, pod_ip6,
};
pub use procs::{cgroup2_mount, pid_alive};
pub use yaml::{MODE_LABEL, NETNS_ANNOTATION, PodObject, namespaces_yaml, nodes_yaml, pods_yaml};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// Namespace whose pods are enrolled (labelled `sidenode.io/dataplane-mode: enabled`).
pub const MESH_NS: &str = "mesh";
/// Namespace whose pods are not enrolled.
pub const PLAIN_NS: &str = "plain";
/// How long `up`/restarts wait for `agent ready` / `proxy ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterOpts {
    /// ≤ 6 chars of `[a-z0-9]`; every namespace, folder and mount carries it.
    pub prefix: String,
    pub nodes: usize,
    /// Pods per node.
    pub pods: usize,
    /// The `mesh-node` binary.
    pub mesh_node: PathBuf,
    /// Start an agent and a proxy on every node.
    pub start_agents: bool,
    /// Mesh mode: run a `mesh-node controller` in `<prefix>-net` (198.18.0.254:15012) and
    /// start agents and proxies against it (HBONE, certificates) instead of `--config`.
    #[serde(default)]
    pub mesh: bool,
    /// The controller's `--cert-ttl` (e.g. `20s`); its default when `None`. Mesh mode only.
    #[serde(default)]
    pub cert_ttl: Option<String>,
    /// Extra arguments for every agent (e.g. `--exclude-ports 9000`).
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// Extra arguments for every proxy (e.g. `--otlp-endpoint http://198.18.0.254:4317`).
    #[serde(default)]
    pub proxy_args: Vec<String>,
    /// Kubernetes mode (implies `mesh`): a real kube-apiserver in `<prefix>-net` holds the
    /// objects, the controller reads it (`--kubernetes`), agents find pods' namespaces by UID
    /// and present projected service-account tokens. See `cluster/kube.rs`.
    #[serde(default)]
    pub kube: bool,
    /// Agents answer the CNI plugin on `<state>/cni/<node>.sock` (`--cni-socket`).
    #[serde(default)]
    pub cni: bool,
    /// The ingress gateway and the outside namespace (mesh mode, not Kubernetes mode); see
    /// [`gateway`]. With `start_agents`, `mesh-node gateway` is started too.
    #[serde(default)]
    pub gateway: bool,
    /// Extra arguments for `mesh-node gateway`.
    #[serde(default)]
    pub gateway_args: Vec<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            prefix: "sn".into(),
            nodes: 2,
            pods: 2,
            mesh_node: PathBuf::from("mesh-node"),
            start_agents: true,
            mesh: false,
            cert_ttl: None,
            agent_args: Vec::new(),
            proxy_args: Vec::new(),
            kube: false,
            cni: false,
            gateway: false,
            gateway_args: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub ip: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodStatus {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    pub ip: String,
    pub cgroup: PathBuf,
    /// The pod's IPv6 address (the cluster is dual-stack).
    #[serde(default)]
    pub ip6: String,
}

/// What `cargo xtask cluster status --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub config_dir: PathBuf,
    /// Node i's pins are under `<bpffs>/node<i>`.
    pub bpffs: PathBuf,
    /// The ingress gateway ([`ClusterOpts::gateway`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    /// The outside namespace, which reaches only the gateway ([`ClusterOpts::gateway`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside: Option<OutsideStatus>,
}

/// `cluster.json`: the status plus what is needed to manage and tear down.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    status: Status,
    opts: ClusterOpts,
    cgroup_root: PathBuf,
    /// `"<node>-agent"` / `"<node>-proxy"` / `"controller"` → pid.
    pids: BTreeMap<String, u32>,
}

pub struct Cluster {
    pub opts: ClusterOpts,
    pub state_dir: PathBuf,
    /// `<cgroup2 mount>/<prefix>`.
    pub cgroup_root: PathBuf,
    status: Status,
    pids: BTreeMap<String, u32>,
    children: HashMap<String, Child>,
    namespaces: BTreeMap<String, bool>,
    opt_out: BTreeSet<String>,
    extra_pods: Vec<PodObject>,
    /// Pods added by [`Cluster::add_pod`] whose Pod object the test writes itself.
    no_object: BTreeSet<String>,
    /// Kubernetes mode: the apiserver (stopped on drop).
    kube: Option<crate::kube::KubeEnv>,
}

pub fn state_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/sidenode-{prefix}"))
}

fn check_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 6
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("cluster prefix {prefix:?} must be 1-6 chars of [a-z0-9]");
    }
    Ok(())
}

impl Cluster {
    /// Create everything; on failure, tear down what was made and return the error.
    pub fn up(opts: ClusterOpts) -> Result<Cluster> {
        check_prefix(&opts.prefix)?;
        if !(1..=250).contains(&opts.nodes) || !(1..=250).contains(&opts.pods) {
            bail!("nodes and pods must be 1..=250");
        }
        if opts.gateway && !(opts.mesh || opts.kube) {
            bail!("the gateway needs mesh or Kubernetes mode (ClusterOpts::mesh or kube)");
        }

        let sd = state_dir(&opts.prefix);
        let taken = net::list_netns()?
            .iter()
            .any(|n| n.starts_with(&format!("{}-", opts.prefix)));
        if sd.exists() || taken {
            bail!(
                "a cluster with prefix {:?} exists ({} or netns {}-*); run `cargo xtask cluster down --prefix {}` first",
                opts.prefix,
                sd.display(),
                opts.prefix,
                opts.prefix
            );
        }
        let prefix = opts.prefix.clone();
        match Self::build(opts) {
            Ok(c) => Ok(c),
            Err(e) => {
                Self::down(&prefix);
                Err(e.context(format!("bringing up cluster {prefix}")))
            }
        }
    }

    fn build(opts: ClusterOpts) -> Result<Cluster> {
        let p = opts.prefix.clone();
        let state_dir = state_dir(&p);
        let cgroup_root = cgroup2_mount()?.join(&p);
        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        for i in 1..=opts.nodes {
            let node = format!("node{i}");
            nodes.push(NodeStatus {
                name: node.clone(),
                netns: format!("{p}-node{i}"),
                ip: node_ip(i),
            });
            for j in 1..=opts.pods {
                let namespace = if j < opts.pods || opts.pods == 1 {
                    MESH_NS
                } else {
                    PLAIN_NS
                };
                pods.push(PodStatus {
                    name: format!("{node}-pod{j}"),
                    namespace: namespace.into(),
                    node: node.clone(),
                    netns: format!("{p}-n{i}p{j}"),
                    ip: pod_ip(i, j),
                    cgroup: cgroup_root.join(&node).join(format!("pod{j}")),
                    ip6: pod_ip6(i, j),
                });
            }
        }
        let status = Status {
            nodes,
            pods,
            config_dir: state_dir.join("config"),
            bpffs: state_dir.join("bpffs"),
            gateway: None,
            outside: None,
        };
        let mut c = Cluster {
            opts,
            state_dir,
            cgroup_root,
            status,
            pids: BTreeMap::new(),
            children: HashMap::new(),
            namespaces: [(MESH_NS.to_string(), true), (PLAIN_NS.to_string(), false)].into(),
            opt_out: BTreeSet::new(),
            extra_pods: Vec::new(),
            no_object: BTreeSet::new(),
            kube: None,
        };
        if c.opts.kube {
            c.opts.mesh = true;
        }
        for d in ["config", "logs", "bpffs", "tmp"] {
            let dir = c.state_dir.join(d);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        c.save()?;
        net::run(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&c.status.bpffs),
        )?;
        let net_ns = format!("{p}-net");
        net::setup_fabric(&net_ns)?;
        let n = c.opts.nodes;
        for (i, node) in c.status.nodes.iter().enumerate() {
            net::setup_node(&net_ns, &node.netns, i + 1, n)?;
            let bpf_dir = c.status.bpffs.join(&node.name);
            std::fs::create_dir_all(&bpf_dir)
                .with_context(|| format!("creating {}", bpf_dir.display()))?;
        }
        if c.opts.mesh {
            net::setup_controller_addr(&net_ns, n)?;
            c.write_tokens()?;
            c.write_config_file("nodes.yaml", &yaml::nodes_yaml(n))?;
        }
        if c.opts.gateway {
            let (gw, out) = c.gateway_status();
            c.status.gateway = Some(gw);
            c.status.outside = Some(out);
            c.save()?;
        }
        if c.opts.kube {
            c.setup_kube()?;
        }
        for pod in &c.status.pods {
            let node_idx = c.node_index(&pod.node)?;
            let node_ns = c.status.nodes[node_idx - 1].netns.clone();
            let j: usize = pod
                .name
                .rsplit("pod")
                .next()
                .and_then(|s| s.parse().ok())
                .context("pod index")?;
            net::setup_pod(&node_ns, &pod.netns, node_idx, j)?;
            std::fs::create_dir_all(&pod.cgroup)
                .with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
        }
        if c.opts.kube {
            c.start_pause_processes()?;
        }
        if c.opts.gateway {
            c.setup_gateway()?;
        }
        c.write_namespaces()?;
        for node in c.node_names() {
            c.write_node_pods(&node)?;
        }
        if c.opts.start_agents {
            c.start_node_processes()?;
        }
        Ok(c)
    }

    /// Re-open a running cluster from its `cluster.json`.
    /// Starts the controller (in mesh mode) and waits for it, then every node's agent and
    /// proxy, and waits until all are ready. `up` does this unless `start_agents` is off.
    pub fn start_node_processes(&mut self) -> Result<()> {
        if self.opts.mesh {
            self.start_controller()?;
            self.wait_for_log(
                "controller",
                "controller",
                "controller ready",
                READY_TIMEOUT,
            )?;
        }
        for node in self.node_names() {
            self.start_process(&node, "agent")?;
            self.start_process(&node, "proxy")?;
        }
        for node in self.node_names() {
            self.wait_for_log(&node, "agent", "agent ready", READY_TIMEOUT)?;
            self.wait_for_log(&node, "proxy", "proxy ready", READY_TIMEOUT)?;
        }
        if self.opts.gateway {
            self.start_gateway()?;
            self.wait_for_log(GATEWAY, GATEWAY, GATEWAY_READY, READY_TIMEOUT)?;
        }
        Ok(())
    }

    pub fn load(prefix: &str) -> Result<Cluster> {
        check_prefix(prefix)?;
        let sd = state_dir(prefix);
        let path = sd.join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is cluster {prefix} up?)", path.display()))?;
        let st: StateFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Cluster {
            opts: st.opts,
            state_dir: sd,
            cgroup_root: st.cgroup_root,
            status: st.status,
            pids: st.pids,
            children: HashMap::new(),
            namespaces: [(MESH_NS.to_string(), true), (PLAIN_NS.to_string(), false)].into(),
            opt_out: BTreeSet::new(),
            extra_pods: Vec::new(),
            no_object: BTreeSet::new(),
            // The apiserver keeps running; this handle does not own it (`down` stops it).
            kube: None,
        })
    }

    fn save(&self) -> Result<()> {
        let st = StateFile {
            status: self.status.clone(),
            opts: self.opts.clone(),
            cgroup_root: self.cgroup_root.clone(),
            pids: self.pids.clone(),
        };
        let text = serde_json::to_string_pretty(&st)?;
        yaml::write_atomic(
            &self.state_dir,
            &self.state_dir.join("tmp"),
            "cluster.json",
            &text,
        )
    }

    /// Tear down everything with this prefix. Idempotent; never fails on "already gone".
    pub fn down(prefix: &str) {
        if check_prefix(prefix).is_err() {
            return;
        }
        let sd = state_dir(prefix);
        // 0. a Kubernetes-mode apiserver (its own stop, then the netns sweep below).
        crate::kube::stop_leftover(prefix);
        // 1. agents and proxies from the state file (only if they still look like mesh-node).
        if let Ok(text) = std::fs::read_to_string(sd.join("cluster.json"))
            && let Ok(st) = serde_json::from_str::<StateFile>(&text)
        {
            let pids: Vec<u32> = st
                .pids
                .values()
                .copied()
                .filter(|p| procs::cmdline(*p).contains("mesh-node"))
                .collect();
            for p in &pids {
                procs::signal(*p, libc::SIGKILL);
            }
            procs::wait_gone(&pids, Duration::from_secs(5));
        }
        // 2. anything still inside our namespaces.
        let ours: Vec<String> = net::list_netns()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .collect();
        let mut pids = Vec::new();
        for ns in &ours {
            pids.extend(net::netns_pids(ns));
        }
        let me = std::process::id();
        pids.retain(|p| *p != me);
        for p in &pids {
            procs::signal(*p, libc::SIGKILL);
        }
        procs::wait_gone(&pids, Duration::from_secs(5));
        // 3. anything in our cgroups, then the folders.
        if let Ok(root) = cgroup2_mount() {
            let cg = root.join(prefix);
            procs::kill_cgroup_tree(&cg);
            procs::rmdir_cgroup_tree(&cg);
        }
        // 4. bpffs (pinned maps and links go with it).
        let bpffs = sd.join("bpffs");
        for _ in 0..10 {
            if !procs::is_mounted(&bpffs) {
                break;
            }
            let _ = Command::new("umount").arg(&bpffs).output();
            if procs::is_mounted(&bpffs) {
                let _ = Command::new("umount").arg("-l").arg(&bpffs).output();
            }
        }
        // 5. namespaces, then the state folder.
        for ns in &ours {
            net::del_netns(ns);
        }
        if !procs::is_mounted(&bpffs) {
            let _ = std::fs::remove_dir_all(&sd);
        }
    }

    /// Kill the processes this handle started (reaping them), then [`Cluster::down`].
    pub fn shutdown(&mut self) {
        for (_, mut child) in self.children.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Self::down(&self.opts.prefix);
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn status_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(&self.status)?)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.status.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn node(&self, name: &str) -> Result<&NodeStatus> {
        self.status
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> Result<&PodStatus> {
        self.status
            .pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))
    }

    fn node_index(&self, name: &str) -> Result<usize> {
        name.strip_prefix("node")
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad node name {name}"))
    }

    /// `<state>/bpffs/<node>`: where this node's agent pins.
    pub fn node_bpffs(&self, node: &str) -> PathBuf {
        self.status.bpffs.join(node)
    }

    /// `<cgroup root>/<node>`: where this node's capture programs attach.
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.cgroup_root.join(node)
    }

    /// `logs/<node>-<kind>.log`; the controller's (kind `"controller"`) is
    /// `logs/controller.log`, the gateway's (kind `"gateway"`) `logs/gateway.log`.
    pub fn log_path(&self, node: &str, kind: &str) -> PathBuf {
        if kind == "controller" {
            return self.controller_log_path();
        }
        if kind == GATEWAY {
            return self.gateway_log_path();
        }
        self.state_dir
            .join("logs")
            .join(format!("{node}-{kind}.log"))
    }

    // ---- mesh mode paths ---------------------------------------------------------------------

    /// `<state>/controller`: the controller's `--state-dir` (its CA: `root-cert.pem`,
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`).
    pub fn controller_state_dir(&self) -> PathBuf {
        self.state_dir.join("controller")
    }

    /// `<state>/controller/root-cert.pem`: what agents and proxies trust for the controller.
    pub fn controller_ca(&self) -> PathBuf {
        self.controller_state_dir().join("root-cert.pem")
    }

    /// `<state>/tokens`: the controller's `--node-tokens` folder.
    pub fn tokens_dir(&self) -> PathBuf {
        self.state_dir.join("tokens")
    }

    /// `<state>/tokens/<node>`: the node's bootstrap token file.
    pub fn token_path(&self, node: &str) -> PathBuf {
        self.tokens_dir().join(node)
    }

    /// `198.18.0.254:15012`.
    pub fn controller_addr(&self) -> String {
        format!("{CONTROLLER_IP}:{CONTROLLER_PORT}")
    }

    /// Every panic in the cluster's process logs (`logs/*`): the log's name, the
    /// `panicked at` line and the message under it.
    pub fn panics(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("logs")) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in dir.flatten() {
            let Ok(text) = std::fs::read(entry.path()) else {
                continue;
            };
            let text = String::from_utf8_lossy(&text);
            let mut lines = text.lines();
            while let Some(line) = lines.next() {
                if line.contains("panicked at ") {
                    let message = lines.next().unwrap_or_default();
                    found.push(format!(
                        "{}: {line} {message}",
                        entry.file_name().to_string_lossy()
                    ));
                }
            }
        }
        found
    }

    /// `<state>/logs/controller.log`.
    pub fn controller_log_path(&self) -> PathBuf {
        self.state_dir.join("logs").join("controller.log")
    }

    /// The fabric namespace `<prefix>-net` (where the controller runs).
    pub fn fabric_netns(&self) -> String {
        format!("{}-net", self.opts.prefix)
    }

    /// One random token per node in `tokens/` (mode 0600).
    fn write_tokens(&self) -> Result<()> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let dir = self.tokens_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod {}", dir.display()))?;
        let mut rnd = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
        for node in self.node_names() {
            let mut b = [0u8; 24];
            rnd.read_exact(&mut b).context("reading /dev/urandom")?;
            let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let path = self.token_path(&node);
            std::fs::write(&path, format!("{token}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod {}", path.display()))?;
        }
        Ok(())
    }

    // ---- config ------------------------------------------------------------------------------

    /// Write a file into the config folder atomically.
    pub fn write_config_file(&self, name: &str, yaml: &str) -> Result<()> {
        yaml::write_atomic(
            &self.status.config_dir,
            &self.state_dir.join("tmp"),
            name,
            yaml,
        )
    }

    /// Remove a config file; fine if it is not there.
    pub fn remove_config_file(&self, name: &str) -> Result<()> {
        let path = self.status.config_dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Label (or unlabel) a namespace with `sidenode.io/dataplane-mode: enabled`.
    pub fn set_namespace_enabled(&mut self, ns: &str, enabled: bool) -> Result<()> {
        self.namespaces.insert(ns.to_string(), enabled);
        if self.opts.kube {
            return self.kube_label_namespace(ns, enabled);
        }
        self.write_namespaces()
    }

    fn write_namespaces(&self) -> Result<()> {
        self.write_config_file("namespaces.yaml", &namespaces_yaml(&self.namespaces))
    }

    /// Label a pod `sidenode.io/dataplane-mode: none` (opt out) or drop that label; rewrites
    /// its node's file.
    pub fn set_pod_opt_out(&mut self, pod: &str, opt_out: bool) -> Result<()> {
        let node = self.pod(pod)?.node.clone();
        if opt_out {
            self.opt_out.insert(pod.to_string());
        } else {
            self.opt_out.remove(pod);
        }
        self.write_node_pods(&node)
    }

    /// Add a Pod object to its node's file (for example one whose netns is the node's own).
    pub fn add_pod_object(&mut self, pod: PodObject) -> Result<()> {
        let node = pod.node.clone();
        self.extra_pods.push(pod);
        self.write_node_pods(&node)
    }

    /// The Pod objects of a node, as they are (or will be) written to `<node>.yaml`.
    pub fn pod_objects(&self, node: &str) -> Vec<PodObject> {
        let mut out: Vec<PodObject> = self
            .status
            .pods
            .iter()
            .filter(|p| p.node == node && !self.no_object.contains(&p.name))
            .map(|p| PodObject {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                node: p.node.clone(),
                ip: p.ip.clone(),
                ip6: Some(p.ip6.clone()).filter(|s| !s.is_empty()),
                netns_path: netns_path(&p.netns),
                service_account: format!("sa-{}", p.name),
                labels: if self.opt_out.contains(&p.name) {
                    [(MODE_LABEL.to_string(), "none".to_string())].into()
                } else {
                    BTreeMap::new()
                },
            })
            .collect();
        out.extend(self.extra_pods.iter().filter(|p| p.node == node).cloned());
        out
    }

    /// `<state>/cni/<node>.sock`: the node agent's CNI socket ([`ClusterOpts::cni`]).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.state_dir.join("cni").join(format!("{node}.sock"))
    }

    /// A new pod on `node` (the next index): its netns, veth and address as for the others,
    /// and a cgroup folder. With `write_object` its Pod object goes into `<node>.yaml` (with the
    /// netns annotation); without, the test writes the object itself (e.g. without the
    /// annotation, so only the CNI plugin can tell the agent where the pod is). Returns its
    /// name. Removed with the cluster (prefix).
    pub fn add_pod(&mut self, node: &str, namespace: &str, write_object: bool) -> Result<String> {
        let i = self.node_index(node)?;
        let node_ns = self.node(node)?.netns.clone();
        let j = self.status.pods.iter().filter(|p| p.node == node).count() + 1;
        let name = format!("{node}-pod{j}");
        if self.opts.gateway && pod_ip(i, j) == GATEWAY_CLUSTER_IP {
            bail!("{node} cannot have a pod {j}: {GATEWAY_CLUSTER_IP} is the gateway's");
        }
        let pod = PodStatus {
            name: name.clone(),
            namespace: namespace.into(),
            node: node.into(),
            netns: format!("{}-n{i}p{j}", self.opts.prefix),
            ip: pod_ip(i, j),
            cgroup: self.cgroup_root.join(node).join(format!("pod{j}")),
            ip6: pod_ip6(i, j),
        };
        net::setup_pod(&node_ns, &pod.netns, i, j)?;
        std::fs::create_dir_all(&pod.cgroup)
            .with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
        self.status.pods.push(pod);
        if !write_object {
            self.no_object.insert(name.clone());
        }
        self.save()?;
        self.write_node_pods(node)?;
        Ok(name)
    }

    /// Rewrite `<node>.yaml` from [`Cluster::pod_objects`].
    pub fn write_node_pods(&self, node: &str) -> Result<()> {
        self.write_config_file(&format!("{node}.yaml"), &pods_yaml(&self.pod_objects(node)))
    }

    /// A command that runs in the pod: it joins the pod's cgroup and netns before exec.
    pub fn pod_command(&self, pod: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        let p = self.pod(pod)?;
        let fd = procs::open_netns(&netns_path(&p.netns))?;
        let mut cmd = Command::new(program);
        procs::enter_in_child(&mut cmd, fd, Some(&p.cgroup.join("cgroup.procs")))?;
        Ok(cmd)
    }

    /// A command that runs in the node's netns (no cgroup).
    pub fn node_command(&self, node: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        let n = self.node(node)?;
        let fd = procs::open_netns(&netns_path(&n.netns))?;
        let mut cmd = Command::new(program);
        procs::enter_in_child(&mut cmd, fd, None)?;
        Ok(cmd)
    }

    /// A command that runs in the fabric netns `<prefix>-net` (no cgroup): it reaches every
    /// node (198.18.0.0/24 on `br0`) and, in mesh mode, every pod.
    pub fn fabric_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let fd = procs::open_netns(&netns_path(&self.fabric_netns()))?;
        let mut cmd = Command::new(program);
        procs::enter_in_child(&mut cmd, fd, None)?;
        Ok(cmd)
    }

    /// `mesh-node maps --bpffs <bpffs>/<node> --json`, parsed.
    pub fn maps_json(&self, node: &str) -> Result<serde_json::Value> {
        let out = Command::new(&self.opts.mesh_node)
            .arg("maps")
            .arg("--bpffs")
            .arg(self.node_bpffs(node))
            .arg("--json")
            .output()
            .context("running mesh-node maps")?;
        if !out.status.success() {
            bail!(
                "mesh-node maps failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parsing mesh-node maps --json output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A cluster torn down when dropped (also when a test panics). Dropping it fails the test
/// (panics) when a sidenode process of the cluster panicked, unless the owner reported the
/// panics itself ([`TestCluster::panics_reported`]).
pub struct TestCluster(pub Cluster, bool);

impl TestCluster {
    pub fn up(opts: ClusterOpts) -> Result<TestCluster> {
        Ok(TestCluster(Cluster::up(opts)?, false))
    }

    /// The owner reports the processes' panics ([`Cluster::panics`]) its own way (the soak's
    /// report): dropping the cluster no longer panics for them.
    pub fn panics_reported(&mut self) {
        self.1 = true;
    }
}

impl std::ops::Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::env::var_os("SIDENODE_KEEP_CLUSTER").is_some() {
            eprintln!(
                "SIDENODE_KEEP_CLUSTER set: leaving cluster {} up",
                self.0.opts.prefix
            );
            return;
        }
        let panics = self.0.panics();
        self.0.shutdown();
        // A sidenode process that panicked has a defect, whatever the test checked: fail the
        // test (unless it is failing already) with what the logs say.
        if !panics.is_empty() && !self.1 && !std::thread::panicking() {
            panic!(
                "a sidenode process of cluster {} panicked during the test:\n{}",
                self.0.opts.prefix,
                panics.join("\n")
            );
        }
    }
}

/// A random-ish prefix `t` + 4 hex chars (pid, time and a counter hashed).
pub fn unique_prefix(first: char) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{first}{:04x}", h.finish() & 0xffff)
}

/// Path-ish helper for docs and the xtask: where a cluster's state lives.
pub fn cluster_exists(prefix: &str) -> bool {
    Path::new(&state_dir(prefix)).join("cluster.json").exists()
}
