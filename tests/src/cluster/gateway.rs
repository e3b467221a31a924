//! The ingress gateway of a mesh-mode cluster ([`ClusterOpts::gateway`](super::ClusterOpts)):
//! a network namespace `<prefix>-gw` wired like a pod of node 1 (its cluster address
//! [`GATEWAY_CLUSTER_IP`]), the objects the controller needs to know it as the pod
//! `istio-ingress/sidenode-gateway` (`config/gateway.yaml`), a `mesh-node gateway` running in
//! that namespace, and a namespace `<prefix>-out` ("outside") linked only to the gateway
//! ([`GATEWAY_OUTSIDE_IP`] ↔ [`OUTSIDE_IP`], no forwarding in the gateway). See
//! docs/gateway.md, "Simulated cluster".
//!
//! In Kubernetes mode ([`ClusterOpts::kube`](super::ClusterOpts)) the Namespace,
//! ServiceAccount and Pod are API objects instead (the Pod's status patched Running and Ready
//! with its address, as for the other pods), and the gateway presents a token of its own
//! ServiceAccount bound to its Pod (`tokens/gateway`), as the Deployment of
//! `deploy/kubernetes/components/gateway` does; Secrets still come from the config folder.
//!
//! In the `(node, kind)` process API the gateway is node `"gateway"`, kind `"gateway"` (see
//! [`GATEWAY`]); its log is `logs/gateway.log`.

use super::net::{self, GATEWAY_CLUSTER_IP, GATEWAY_OUTSIDE_IP, OUTSIDE_IP};
use super::{Cluster, PodObject, netns_path, procs};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::Command;

/// Node name and kind of the gateway in the `(node, kind)` process API.
pub const GATEWAY: &str = "gateway";
/// The gateway pod's namespace (not labelled for the mesh: its own connections are not
/// captured).
pub const GATEWAY_NAMESPACE: &str = "istio-ingress";
/// The gateway pod's name.
pub const GATEWAY_POD: &str = "sidenode-gateway";
/// Its ServiceAccount: identity `spiffe://cluster.local/ns/istio-ingress/sa/sidenode-gateway`.
pub const GATEWAY_SA: &str = "sidenode-gateway";
/// Its pod labels (what an Istio `Gateway.spec.selector` matches), as `--labels` takes them.
pub const GATEWAY_LABELS: &str = "istio=ingressgateway,app=sidenode-gateway";
/// The node the gateway pod is "scheduled" on: its certificate is requested with this node's
/// token.
pub const GATEWAY_NODE: &str = "node1";
/// The line `mesh-node gateway` logs once it serves (what `up` waits for).
pub const GATEWAY_READY: &str = "gateway ready";
/// The gateway's admin API, on the loopback of its namespace.
pub const GATEWAY_ADMIN: &str = "127.0.0.1:15000";
/// The gateway's Prometheus port, on [`GATEWAY_CLUSTER_IP`] (reachable from the fabric and
/// the pods; outside reaches it too, as it reaches every address of the gateway's own).
pub const GATEWAY_METRICS_PORT: u16 = 15020;
/// The config file with the gateway's Namespace, ServiceAccount and Pod.
pub const GATEWAY_CONFIG_FILE: &str = "gateway.yaml";

/// `"gateway"` in `cluster status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GatewayStatus {
    /// The gateway's network namespace (`<prefix>-gw`).
    pub netns: String,
    /// The address outside clients connect to ([`GATEWAY_OUTSIDE_IP`]).
    pub ip: String,
    /// The ports a Gateway's plain and TLS listeners conventionally use (the gateway binds
    /// whatever ports the Gateway objects declare).
    pub http_port: u16,
    pub https_port: u16,
    /// The gateway's address on the cluster network (like a pod of node 1): the source of its
    /// connections to backends, and where its metrics listen.
    pub cluster_ip: String,
    /// `istio-ingress/sidenode-gateway`.
    pub pod: String,
    /// `<cluster_ip>:15020`.
    pub metrics: String,
}

/// `"outside"` in `cluster status --json`: a client namespace that reaches only the gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutsideStatus {
    pub netns: String,
    pub ip: String,
}

/// The gateway's Namespace (no mesh label), ServiceAccount and Pod (node 1, its cluster
/// address, the netns annotation) as one YAML stream.
pub fn gateway_objects_yaml(gw_netns: &str) -> String {
    let pod = PodObject {
        name: GATEWAY_POD.into(),
        namespace: GATEWAY_NAMESPACE.into(),
        node: GATEWAY_NODE.into(),
        ip: GATEWAY_CLUSTER_IP.into(),
        ip6: None,
        netns_path: netns_path(gw_netns),
        service_account: GATEWAY_SA.into(),
        labels: gateway_labels(),
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{GATEWAY_NAMESPACE}\"\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: \"{GATEWAY_SA}\"\n  namespace: \"{GATEWAY_NAMESPACE}\"\n---\n{}",
        pod.to_yaml()
    )
}

/// [`GATEWAY_LABELS`] as a map.
pub fn gateway_labels() -> BTreeMap<String, String> {
    GATEWAY_LABELS
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Cluster {
    /// `<prefix>-gw`.
    pub fn gateway_netns(&self) -> String {
        format!("{}-gw", self.opts.prefix)
    }

    /// `<prefix>-out`.
    pub fn outside_netns(&self) -> String {
        format!("{}-out", self.opts.prefix)
    }

    /// The gateway's entry of the status (`None` without [`ClusterOpts::gateway`]).
    ///
    /// [`ClusterOpts::gateway`]: super::ClusterOpts::gateway
    pub fn gateway(&self) -> Result<&GatewayStatus> {
        self.status
            .gateway
            .as_ref()
            .context("this cluster has no gateway (ClusterOpts::gateway / --gateway)")
    }

    /// The outside namespace's entry of the status.
    pub fn outside(&self) -> Result<&OutsideStatus> {
        self.status
            .outside
            .as_ref()
            .context("this cluster has no outside namespace (ClusterOpts::gateway / --gateway)")
    }

    pub(super) fn gateway_status(&self) -> (GatewayStatus, OutsideStatus) {
        (
            GatewayStatus {
                netns: self.gateway_netns(),
                ip: GATEWAY_OUTSIDE_IP.into(),
                http_port: 80,
                https_port: 443,
                cluster_ip: GATEWAY_CLUSTER_IP.into(),
                pod: format!("{GATEWAY_NAMESPACE}/{GATEWAY_POD}"),
                metrics: format!("{GATEWAY_CLUSTER_IP}:{GATEWAY_METRICS_PORT}"),
            },
            OutsideStatus {
                netns: self.outside_netns(),
                ip: OUTSIDE_IP.into(),
            },
        )
    }

    /// Namespaces, veths and addresses of the gateway and outside, the gateway's cgroup folder,
    /// and `config/gateway.yaml`. Called by `up`, after node 1 exists.
    pub(super) fn setup_gateway(&self) -> Result<()> {
        let node_ns = self.node(GATEWAY_NODE)?.netns.clone();
        net::setup_gateway(&node_ns, &self.gateway_netns(), &self.outside_netns())?;
        let cg = self.gateway_cgroup();
        std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
        if self.opts.kube {
            // The objects are in the API server (`setup_kube`).
            return Ok(());
        }
        self.write_config_file(
            GATEWAY_CONFIG_FILE,
            &gateway_objects_yaml(&self.gateway_netns()),
        )
    }

    /// The token the gateway presents to the controller: node 1's token (standalone), or in
    /// Kubernetes mode `tokens/gateway`, a token of its own ServiceAccount bound to its Pod.
    pub fn gateway_token_path(&self) -> std::path::PathBuf {
        if self.opts.kube {
            self.tokens_dir().join(GATEWAY)
        } else {
            self.token_path(GATEWAY_NODE)
        }
    }

    /// `<cgroup root>/gateway`: the gateway process' cgroup (outside every node's subtree, so
    /// no node's capture programs see its sockets; killed with the cluster's cgroups).
    pub fn gateway_cgroup(&self) -> std::path::PathBuf {
        self.cgroup_root.join(GATEWAY)
    }

    /// `<state>/logs/gateway.log`.
    pub fn gateway_log_path(&self) -> std::path::PathBuf {
        self.state_dir.join("logs").join("gateway.log")
    }

    /// Start `mesh-node gateway` in the gateway's namespace (through `nsenter --net`, as the
    /// node processes: `ip netns exec` would also remount /sys in a mount namespace of its
    /// own), as the pod `istio-ingress/sidenode-gateway` with [`Cluster::gateway_token_path`],
    /// reading TLS Secrets from the config folder (in Kubernetes mode too). Does not wait for
    /// [`GATEWAY_READY`].
    pub fn start_gateway(&mut self) -> Result<()> {
        if !self.opts.gateway {
            bail!("this cluster has no gateway (ClusterOpts::gateway)");
        }
        let cluster_ip = self.gateway()?.cluster_ip.clone();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.gateway_netns())))
            .arg("--")
            .arg(&self.opts.mesh_node)
            .arg("gateway")
            .arg("--controller")
            .arg(self.controller_addr())
            .arg("--controller-ca")
            .arg(self.controller_ca())
            .arg("--token-file")
            .arg(self.gateway_token_path())
            .args(["--namespace", GATEWAY_NAMESPACE])
            .args(["--pod", GATEWAY_POD])
            .args(["--service-account", GATEWAY_SA])
            .args(["--labels", GATEWAY_LABELS])
            .arg("--secrets-dir")
            .arg(&self.status.config_dir)
            .args(["--admin", GATEWAY_ADMIN])
            .arg("--metrics")
            .arg(format!("{cluster_ip}:{GATEWAY_METRICS_PORT}"))
            .args(&self.opts.gateway_args);
        let cg = self.gateway_cgroup();
        std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
        procs::join_cgroup_in_child(&mut cmd, &cg.join("cgroup.procs"))?;
        self.spawn_logged(GATEWAY, GATEWAY, cmd)
    }

    /// A command that runs in the gateway's namespace (no cgroup).
    pub fn gateway_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let fd = procs::open_netns(&netns_path(&self.gateway()?.netns))?;
        let mut cmd = Command::new(program);
        procs::enter_in_child(&mut cmd, fd, None)?;
        Ok(cmd)
    }

    /// A command that runs in the outside namespace: it reaches the gateway's addresses
    /// ([`GatewayStatus::ip`]) and nothing else.
    pub fn outside_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let fd = procs::open_netns(&netns_path(&self.outside()?.netns))?;
        let mut cmd = Command::new(program);
        procs::enter_in_child(&mut cmd, fd, None)?;
        Ok(cmd)
    }

    /// Run `program args` in the outside namespace and return its output whatever its exit
    /// status (e.g. `curl`, whose exit code tells refused from reset from TLS failure).
    pub fn run_outside(&self, program: &str, args: &[&str]) -> Result<std::process::Output> {
        self.outside_command(program)?
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {program} {args:?} in the outside namespace"))
    }

    /// `curl -sS --max-time 10 <args>` in the outside namespace; stdout on success, an error
    /// with curl's exit code and stderr otherwise. For HTTPS through the gateway pass e.g.
    /// `--cacert <ca.pem> --resolve host:443:<gateway ip> https://host/path`.
    pub fn curl_outside(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        let out = self.run_outside("curl", &all)?;
        if !out.status.success() {
            bail!(
                "curl {} in the outside namespace failed ({}): {}",
                all.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
