//! A real two-node Kubernetes 1.20 cluster for tests: kube-apiserver, controller-manager and
//! scheduler in the network namespace `<prefix>-net` (on 198.18.0.254), and per node a network
//! namespace `<prefix>-n<i>` (198.18.0.<i>, pods in 198.19.<i>.0/24, bridge CNI) holding
//! containerd + kubelet + kube-proxy in mount and PID namespaces of their own. Built and run by
//! `deploy/kube-testenv.sh real-up` / `real-down` (installed by `cargo xtask setup`, which runs
//! `kube-testenv.sh install --node`); the `mesh-node` and workload images are built from this
//! checkout's binaries at every start.
//!
//! ```no_run
//! # use sidenode_tests::realnode::RealCluster;
//! let c = RealCluster::up("r1234", 2)?;      // nodes Ready, images imported
//! c.deploy_mesh()?;                           // overlays/testenv, DaemonSet + controller Ready
//! c.kubectl(&["get", "pods", "-A"])?;         // kubectl runs inside <prefix>-net
//! # anyhow::Ok(())
//! ```
//!
//! Everything lives in [`real_env_dir`] (`/var/tmp/sidenode-real-<prefix>/`); [`RealCluster`]
//! tears it all down on drop (also after a panic): every node process is killed with its PID
//! namespace, the cgroups, network namespaces, the folder and the host folders the script had
//! to create are removed.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Images the environment builds (`deploy/kube-testenv.sh real-up`).
pub const MESH_IMAGE: &str = "docker.io/sidenode/mesh-node:testenv";
/// busybox-static + `testpod` at /usr/local/bin/testpod; entrypoint /bin/sh.
pub const WORKLOAD_IMAGE: &str = "docker.io/sidenode/testpod:testenv";
/// The overlay `deploy_mesh` applies.
pub const OVERLAY: &str = "deploy/kubernetes/overlays/testenv";
/// The mesh's namespace.
pub const MESH_NS: &str = "sidenode-system";

/// Where the environment with this prefix keeps its state.
pub fn real_env_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/var/tmp/sidenode-real-{prefix}"))
}

/// A path of the repository (`rel` from its root).
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Tears down an environment left by a crashed run (a no-op when there is none).
pub fn down_leftover(prefix: &str) {
    down_dir(&real_env_dir(prefix));
}

fn down_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let script = crate::kube::testenv_script();
    match Command::new("bash")
        .arg(&script)
        .arg("real-down")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "kube-testenv real-down {}: {}: {}",
            dir.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("kube-testenv real-down {}: {e}", dir.display()),
    }
}

/// The file in an environment's folder naming the process that owns it (a test; `detached`
/// for `cargo xtask cluster up --real`).
const OWNER: &str = "owner";

/// Tears down every `/var/tmp/sidenode-real-*` environment whose owning test process is gone
/// (a run killed before its drop guard could act). Environments of live tests and detached
/// ones (`cargo xtask cluster up --real`) are left alone.
pub fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir("/var/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(prefix) = name.to_str().and_then(|n| n.strip_prefix("sidenode-real-")) else {
            continue;
        };
        let dir = e.path();
        let owner = std::fs::read_to_string(dir.join(OWNER)).unwrap_or_default();
        let orphan = match owner.trim().parse::<u32>() {
            Ok(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            // No owner file: a real-up that died half-way, or one run by hand; only if its
            // node processes are all gone too (real-down is safe on a live one, but not ours).
            Err(_) => owner.trim() != "detached" && !any_node_alive(&dir),
        };
        if orphan {
            eprintln!(
                "realnode: removing the orphaned environment {prefix} ({})",
                dir.display()
            );
            down_dir(&dir);
        }
    }
}

fn any_node_alive(dir: &Path) -> bool {
    let Ok(nodes) = std::fs::read_to_string(dir.join("nodes")) else {
        return false;
    };
    nodes.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    })
}

/// A running real cluster; torn down on drop.
#[derive(Debug)]
pub struct RealCluster {
    pub prefix: String,
    pub dir: PathBuf,
    pub nodes: usize,
    /// Admin kubeconfig (use it from inside `<prefix>-net` or a node namespace).
    pub kubeconfig: PathBuf,
    stopped: bool,
}

impl RealCluster {
    /// Brings up `nodes` real nodes (a leftover with this prefix is removed first) with images
    /// built from `mesh-node` ([`crate::workload::mesh_node_path`]) and `testpod` (the binary
    /// next to it). Returns once every node is Ready.
    pub fn up(prefix: &str, nodes: usize) -> Result<RealCluster> {
        let mesh_node = crate::workload::mesh_node_path();
        let testpod = mesh_node.with_file_name("testpod");
        Self::up_with(prefix, nodes, &mesh_node, &testpod)
    }

    /// [`RealCluster::up`] with the binaries given.
    pub fn up_with(
        prefix: &str,
        nodes: usize,
        mesh_node: &Path,
        testpod: &Path,
    ) -> Result<RealCluster> {
        sweep_orphans();
        let dir = real_env_dir(prefix);
        down_dir(&dir);
        let c = RealCluster {
            prefix: prefix.to_string(),
            kubeconfig: dir.join("api/kubeconfig"),
            dir,
            nodes,
            stopped: false,
        };
        std::fs::create_dir_all(&c.dir)
            .and_then(|()| std::fs::write(c.dir.join(OWNER), std::process::id().to_string()))
            .with_context(|| format!("writing {}", c.dir.join(OWNER).display()))?;
        let script = crate::kube::testenv_script();
        let out = Command::new("bash")
            .arg(&script)
            .arg("real-up")
            .arg(&c.dir)
            .args(["--prefix", prefix, "--nodes", &nodes.to_string()])
            .arg("--mesh-node")
            .arg(mesh_node)
            .arg("--testpod")
            .arg(testpod)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} real-up", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} real-up {}: {}\n{}",
                script.display(),
                c.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(c)
    }

    /// Node `i`'s name (1-based): `<prefix>-n<i>`, also its network namespace's name and its
    /// kubelet's cgroup root.
    pub fn node_name(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    /// Node `i`'s address (its kubelet's InternalIP and the proxy's address).
    pub fn node_ip(&self, i: usize) -> String {
        format!("198.18.0.{i}")
    }

    /// Node `i`'s network namespace file.
    pub fn node_netns(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.node_name(i)))
    }

    /// The namespace of the API server and of the routes between nodes.
    pub fn fabric_netns(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}-net", self.prefix))
    }

    /// Node `i`'s log folder (containerd.log, kubelet.log, kube-proxy.log, init.log).
    pub fn node_logs(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}/logs"))
    }

    /// `program` run inside node `i`'s network namespace (e.g. curl to its proxy's metrics).
    pub fn node_command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_netns(i).display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// kubectl inside `<prefix>-net` (from the machine's own namespace the test addresses
    /// route out of the machine).
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.fabric_netns().display()))
            .args(["--", "kubectl", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// kubectl's stdout, or an error naming the command with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        crate::kube::run_kubectl(self.kubectl_command(args), args)
    }

    /// [`RealCluster::kubectl`] with `stdin` (for `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        crate::kube::run_kubectl_stdin(self.kubectl_command(args), args, stdin)
    }

    /// `kubectl apply -f -` of a YAML stream.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml).map(|_| ())
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&a)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl {}: not JSON", a.join(" ")))
    }

    /// `kubectl exec -n NS POD -c CONTAINER -- CMD...`: stdout.
    pub fn exec(&self, ns: &str, pod: &str, container: &str, cmd: &[&str]) -> Result<String> {
        let mut a = vec!["exec", "-n", ns, pod, "-c", container, "--"];
        a.extend_from_slice(cmd);
        self.kubectl(&a)
    }

    /// Polls `f` every 200 ms until `Ok(Some(v))`, or fails after `timeout` with the last error.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        crate::kube::poll(what, timeout, Duration::from_millis(200), f)
    }

    /// Applies [`OVERLAY`] and waits until the controller Deployment and the node DaemonSet
    /// (one pod per node) are Ready.
    pub fn deploy_mesh(&self) -> Result<()> {
        let overlay = repo_path(OVERLAY);
        self.kubectl(&["apply", "-k", &overlay.to_string_lossy()])?;
        self.wait_mesh_ready(Duration::from_secs(120))
    }

    /// Waits until the controller has a Ready replica and the DaemonSet has every node's pod
    /// updated and Ready.
    pub fn wait_mesh_ready(&self, timeout: Duration) -> Result<()> {
        let nodes = self.nodes as i64;
        self.wait_for("controller and node DaemonSet Ready", timeout, || {
            let d = self.get_json(&["-n", MESH_NS, "deployment", "sidenode-controller"])?;
            let ds = self.get_json(&["-n", MESH_NS, "daemonset", "sidenode-node"])?;
            let st = &ds["status"];
            let n = |v: &serde_json::Value| v.as_i64().unwrap_or(-1);
            let ds_ok = n(&st["desiredNumberScheduled"]) == nodes
                && n(&st["numberReady"]) == nodes
                && n(&st["updatedNumberScheduled"]) == nodes
                && n(&st["observedGeneration"]) == n(&ds["metadata"]["generation"]);
            Ok((n(&d["status"]["readyReplicas"]) >= 1 && ds_ok).then_some(()))
        })
    }

    /// The DaemonSet pod on node `i`.
    pub fn node_pod(&self, i: usize) -> Result<String> {
        let node = self.node_name(i);
        let v = self.get_json(&[
            "-n",
            MESH_NS,
            "pods",
            "-l",
            "app.kubernetes.io/name=sidenode-node",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ])?;
        let items = v["items"].as_array().context("pods: no items")?;
        let running: Vec<&serde_json::Value> = items
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        match running.as_slice() {
            [p] => p["metadata"]["name"]
                .as_str()
                .map(str::to_string)
                .context("pod without a name"),
            other => bail!("{} sidenode-node pods on {node}", other.len()),
        }
    }

    /// `mesh-node maps --json` in the agent container on node `i`.
    pub fn maps_json(&self, i: usize) -> Result<serde_json::Value> {
        let pod = self.node_pod(i)?;
        let out = self.exec(MESH_NS, &pod, "agent", &["mesh-node", "maps", "--json"])?;
        serde_json::from_str(&out).context("mesh-node maps --json: not JSON")
    }

    /// Node `i`'s proxy metrics (`GET <node ip>:15020/metrics`, from inside the node).
    pub fn proxy_metrics(&self, i: usize) -> Result<String> {
        let url = format!("http://{}:15020/metrics", self.node_ip(i));
        let out = self
            .node_command(i, "curl")
            .args(["-fsS", "--max-time", "5", &url])
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!(
                "curl {url}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).context("metrics: not UTF-8")
    }

    /// Leaves the cluster running past this handle (`cargo xtask cluster up --real`; `down`
    /// removes it with [`down_leftover`]).
    pub fn detach(mut self) {
        if let Err(e) = std::fs::write(self.dir.join(OWNER), "detached") {
            eprintln!("writing {}: {e}", self.dir.join(OWNER).display());
        }
        self.stopped = true;
    }

    /// Tears everything down. Idempotent; also run on drop.
    pub fn down(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if std::env::var_os("SIDENODE_KEEP_REAL").is_some() {
            let _ = std::fs::write(self.dir.join(OWNER), "detached");
            eprintln!(
                "SIDENODE_KEEP_REAL set: leaving {} (tear down with `cargo xtask cluster down --real --prefix {}`)",
                self.dir.display(),
                self.prefix
            );
            return;
        }
        down_dir(&self.dir);
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        self.down();
    }
}
