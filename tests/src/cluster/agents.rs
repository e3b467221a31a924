//! Starting, stopping and watching each node's `mesh-node agent` and `mesh-node proxy`, and in
//! mesh mode the cluster's `mesh-node controller`.
//!
//! Every method taking `(node, kind)` also accepts the controller as node `"controller"`, kind
//! `"controller"` (see [`CONTROLLER`]), and the ingress gateway as node `"gateway"`, kind
//! `"gateway"` (see [`GATEWAY`](super::GATEWAY)).

use super::{Cluster, GATEWAY, READY_TIMEOUT, netns_path, node_ip, pid_alive, procs};
use anyhow::{Context, Result, bail};
use std::fs::OpenOptions;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Node name and kind of the controller in the `(node, kind)` process API.
pub const CONTROLLER: &str = "controller";

fn check_kind(node: &str, kind: &str) -> Result<()> {
    if kind == CONTROLLER || kind == GATEWAY {
        if node != kind {
            bail!("the {kind} is addressed as node {kind:?}, not {node:?}");
        }
        return Ok(());
    }
    if kind != "agent" && kind != "proxy" {
        bail!(
            "process kind must be \"agent\", \"proxy\", \"controller\" or \"gateway\", not {kind:?}"
        );
    }
    Ok(())
}

/// The key of a process in `pids`: `<node>-<kind>`, or `controller`.
fn key(node: &str, kind: &str) -> String {
    if kind == CONTROLLER || kind == GATEWAY {
        kind.to_string()
    } else {
        format!("{node}-{kind}")
    }
}

impl Cluster {
    /// Start a node's `agent` or `proxy` in the node netns (or, for node and kind
    /// `"controller"`, the controller in the fabric netns), in its own session, logging to
    /// `logs/<node>-<kind>.log` (`logs/controller.log`). Does not wait for readiness.
    pub fn start_process(&mut self, node: &str, kind: &str) -> Result<()> {
        self.start_process_with(node, kind, &[])
    }

    /// [`Cluster::start_process`] with `extra` arguments after the usual ones.
    pub fn start_process_with(&mut self, node: &str, kind: &str, extra: &[&str]) -> Result<()> {
        check_kind(node, kind)?;
        if kind == CONTROLLER {
            return self.start_controller();
        }
        if kind == GATEWAY {
            return self.start_gateway();
        }
        let i = self.node_index(node)?;
        let netns = self.node(node)?.netns.clone();
        let bpffs = self.node_bpffs(node);
        std::fs::create_dir_all(&bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&netns)))
            .arg("--")
            .arg(&self.opts.mesh_node)
            .arg(kind)
            .args(["--node", node]);
        if kind == "agent" {
            if !self.opts.mesh {
                cmd.arg("--config").arg(&self.status.config_dir);
            }
            cmd.arg("--cgroup-root").arg(self.node_cgroup(node));
            if self.opts.cni {
                cmd.arg("--cni-socket").arg(self.cni_socket(node));
            }
            cmd.args(&self.opts.agent_args);
            if self.opts.kube {
                cmd.arg("--pod-status")
                    .arg("--kubeconfig")
                    .arg(self.kubeconfig()?);
            }
        } else {
            if self.opts.kube {
                cmd.arg("--cgroup-root").arg(self.node_cgroup(node));
            }
            cmd.args(&self.opts.proxy_args);
            // Every proxy serves a hand-over socket of its own node, so a successor can take
            // its listeners over (`start_successor_proxy`).
            cmd.arg("--handover-socket").arg(self.handover_socket(node));
            // The proxy runs below the node's cgroup root, as a DaemonSet pod runs below the
            // host's: its sockets are seen by the node's sockops program, which splices the
            // local legs (pod ↔ proxy) in the kernel.
            let cg = self.node_cgroup(node).join("node-proxy");
            std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
            procs::join_cgroup_in_child(&mut cmd, &cg.join("cgroup.procs"))?;
        }
        if self.opts.mesh {
            cmd.arg("--controller")
                .arg(self.controller_addr())
                .arg("--controller-ca")
                .arg(self.controller_ca())
                .arg("--token-file")
                .arg(self.token_path(node));
        }
        cmd.arg("--bpffs")
            .arg(&bpffs)
            .args(["--proxy-ip", &node_ip(i)])
            .args(["--proxy-ip6", &super::net::node_ip6(i)])
            .args(extra);
        self.spawn_logged(node, kind, cmd)
    }

    /// The node proxy's hand-over socket (`--handover-socket`), in the cluster's state folder.
    pub fn handover_socket(&self, node: &str) -> std::path::PathBuf {
        self.state_dir.join(format!("{node}-proxy-handover.sock"))
    }

    /// Starts a new proxy on `node` beside the running one, with the same flags plus `extra`
    /// (`--takeover` for a hand-over). From now on the new one is the node's `proxy`; the
    /// previous one is the node's "old proxy" ([`Cluster::wait_old_proxy_exit`]). Returns
    /// the previous one's pid. Does not wait for readiness.
    pub fn start_successor_proxy(&mut self, node: &str, extra: &[&str]) -> Result<u32> {
        let key = key(node, "proxy");
        let old_key = format!("{key}-old");
        if let Some(mut older) = self.children.remove(&old_key)
            && matches!(older.try_wait(), Ok(None))
        {
            self.children.insert(old_key.clone(), older);
            bail!("{node}: an earlier old proxy is still running");
        }
        let pid = self
            .pids
            .remove(&key)
            .with_context(|| format!("{key} was not started"))?;
        self.pids.insert(old_key.clone(), pid);
        if let Some(child) = self.children.remove(&key) {
            self.children.insert(old_key, child);
        }
        self.start_process_with(node, "proxy", extra)?;
        Ok(pid)
    }

    /// Waits (up to `timeout`) for the node's old proxy (see
    /// [`Cluster::start_successor_proxy`]) to exit; its exit status and how long the wait took.
    pub fn wait_old_proxy_exit(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, Duration)> {
        let old_key = format!("{}-old", key(node, "proxy"));
        let child = self
            .children
            .get_mut(&old_key)
            .with_context(|| format!("{node} has no old proxy"))?;
        let start = std::time::Instant::now();
        loop {
            if let Some(st) = child.try_wait().context("waiting for the old proxy")? {
                return Ok((st, start.elapsed()));
            }
            if start.elapsed() > timeout {
                bail!(
                    "{node}: the old proxy (pid {}) did not exit within {timeout:?}",
                    child.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start `mesh-node controller` in `<prefix>-net`, listening on 198.18.0.254:15012, with
    /// state in `controller/` and tokens from `tokens/`. Does not wait for `controller ready`.
    pub fn start_controller(&mut self) -> Result<()> {
        if !self.opts.mesh {
            bail!("the controller runs only in mesh mode (ClusterOpts::mesh)");
        }
        let sd = self.controller_state_dir();
        std::fs::create_dir_all(&sd).with_context(|| format!("creating {}", sd.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.fabric_netns())))
            .arg("--")
            .arg(&self.opts.mesh_node)
            .arg("controller")
            .arg("--state-dir")
            .arg(&sd)
            .arg("--listen")
            .arg(self.controller_addr());
        if self.opts.kube {
            cmd.arg("--kubernetes")
                .arg("--kubeconfig")
                .arg(self.kubeconfig()?)
                .args([
                    "--namespace",
                    super::SYSTEM_NS,
                    "--pod-name",
                    "controller-0",
                ])
                .args(["--lease-duration", "4s"]);
        } else {
            cmd.arg("--config")
                .arg(&self.status.config_dir)
                .arg("--node-tokens")
                .arg(self.tokens_dir());
        }
        if let Some(ttl) = &self.opts.cert_ttl {
            cmd.arg("--cert-ttl").arg(ttl);
        }
        self.spawn_logged(CONTROLLER, CONTROLLER, cmd)
    }

    /// SIGKILL (or another signal) the controller and wait for it to exit.
    pub fn kill_controller(&mut self, signal: i32) -> Result<()> {
        self.kill_process(CONTROLLER, CONTROLLER, signal)
    }

    /// Stop the controller if running, start it again (same CA and tokens), and wait for
    /// `controller ready` written after the restart.
    pub fn restart_controller(&mut self) -> Result<()> {
        self.restart_process(CONTROLLER, CONTROLLER)
    }

    pub(super) fn spawn_logged(&mut self, node: &str, kind: &str, mut cmd: Command) -> Result<()> {
        let log_path = self.log_path(node, kind);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log2 = log.try_clone().context("duplicating log fd")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        procs::new_session(&mut cmd);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {cmd:?} (mesh-node at {})",
                self.opts.mesh_node.display()
            )
        })?;
        let key = key(node, kind);
        self.pids.insert(key.clone(), child.id());
        self.children.insert(key, child);
        self.save()
    }

    /// The pid of a node's agent or proxy (or the controller), if started.
    pub fn pid(&self, node: &str, kind: &str) -> Option<u32> {
        self.pids.get(&key(node, kind)).copied()
    }

    pub fn is_alive(&mut self, node: &str, kind: &str) -> bool {
        let key = key(node, kind);
        if let Some(child) = self.children.get_mut(&key) {
            return matches!(child.try_wait(), Ok(None));
        }
        self.pids.get(&key).is_some_and(|p| pid_alive(*p))
    }

    /// Send `signal` to a node's agent or proxy (or the controller) and wait (10 s) for it to
    /// exit.
    pub fn kill_process(&mut self, node: &str, kind: &str, signal: i32) -> Result<()> {
        check_kind(node, kind)?;
        let key = key(node, kind);
        let pid = *self
            .pids
            .get(&key)
            .with_context(|| format!("{key} was not started"))?;
        procs::signal(pid, signal);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        if let Some(child) = self.children.get_mut(&key) {
            loop {
                if child.try_wait().context("waiting for child")?.is_some() {
                    break;
                }
                if std::time::Instant::now() > end {
                    bail!("{key} (pid {pid}) did not exit within 10 s after signal {signal}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.children.remove(&key);
        } else if !procs::wait_gone(&[pid], Duration::from_secs(10)) {
            bail!("{key} (pid {pid}) did not exit within 10 s after signal {signal}");
        }
        Ok(())
    }

    /// Stop (SIGTERM, then SIGKILL) if running, start again, and wait for `<kind> ready`
    /// written after the restart.
    pub fn restart_process(&mut self, node: &str, kind: &str) -> Result<()> {
        if self.is_alive(node, kind) && self.kill_process(node, kind, libc::SIGTERM).is_err() {
            self.kill_process(node, kind, libc::SIGKILL)?;
        }
        let offset = self.log_len(node, kind);
        self.start_process(node, kind)?;
        self.wait_for_log_after(node, kind, offset, &format!("{kind} ready"), READY_TIMEOUT)?;
        Ok(())
    }

    /// Current length of a log, to wait for lines written after this point.
    pub fn log_len(&self, node: &str, kind: &str) -> u64 {
        std::fs::metadata(self.log_path(node, kind))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Wait until the log has a line containing `needle`; returns the line. Fails early, with
    /// the log's tail, if the process has exited.
    pub fn wait_for_log(
        &mut self,
        node: &str,
        kind: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_log_after(node, kind, 0, needle, timeout)
    }

    /// Like [`Cluster::wait_for_log`], looking only at bytes from `offset` on.
    pub fn wait_for_log_after(
        &mut self,
        node: &str,
        kind: &str,
        offset: u64,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        check_kind(node, kind)?;
        let path = self.log_path(node, kind);
        procs::wait_for_file_line(&path, offset, needle, timeout, &mut || {
            self.is_alive(node, kind)
        })
        .with_context(|| format!("waiting for {node} {kind}"))
    }
}
