//! A real Kubernetes API server for tests: etcd + kube-apiserver 1.20.2 on 127.0.0.1, run by
//! `deploy/kube-testenv.sh` (which builds and caches the binaries; `cargo xtask setup` runs its
//! `install`). No controller-manager, no scheduler, no kubelet: tests create the objects they
//! need (Nodes, Pods, their status) themselves.
//!
//! ```no_run
//! # use sidenode_tests::kube::KubeEnv;
//! let kube = KubeEnv::start("k1234")?;
//! kube.kubectl(&["get", "ns", "default"])?;
//! # anyhow::Ok(())
//! ```
//!
//! Everything lives in [`kube_env_dir`] (`/run/sidenode-kube-<prefix>/`: data, keys, logs,
//! `kubeconfig`, `env`, `pids`); [`KubeEnv::stop`] (also run on drop, so after a panic too) ends
//! the processes and removes the folder.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`KubeEnv::start`] waits for `/readyz` after the script returned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `deploy/kube-testenv.sh` in this checkout.
pub fn testenv_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kube-testenv.sh")
}

/// Where the environment with this prefix keeps its state: `/run/sidenode-kube-<prefix>`.
pub fn kube_env_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/sidenode-kube-{prefix}"))
}

/// Stops a [`KubeEnv`] left by a crashed run (processes ended, folder removed). A no-op when
/// there is none.
pub fn stop_leftover(prefix: &str) {
    stop_dir(&kube_env_dir(prefix));
}

fn stop_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if dir.join("pids").exists() {
        // The script ends only the processes it started (checked by command line).
        let out = Command::new("bash")
            .arg(testenv_script())
            .arg("stop")
            .arg(dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "kube-testenv stop {}: {}: {}",
                dir.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("kube-testenv stop {}: {e}", dir.display()),
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("removing {}: {e}", dir.display());
    }
}

/// A running etcd + kube-apiserver; stopped and removed on drop.
#[derive(Debug)]
pub struct KubeEnv {
    /// `/run/sidenode-kube-<prefix>`.
    pub dir: PathBuf,
    /// An admin (`system:masters`) kubeconfig for the server.
    pub kubeconfig: PathBuf,
    /// The network namespace it runs in (`None`: the test's own, on 127.0.0.1).
    pub netns: Option<PathBuf>,
    stopped: bool,
}

impl KubeEnv {
    /// Starts etcd + kube-apiserver in `/run/sidenode-kube-<prefix>/` (a folder left by a crash
    /// is stopped and removed first) and waits until `/readyz` answers `ok` (60 s at most).
    pub fn start(prefix: &str) -> Result<KubeEnv> {
        Self::start_in(prefix, None, "127.0.0.1")
    }

    /// [`KubeEnv::start`] inside the network namespace `netns` (a file such as
    /// `/var/run/netns/NAME`), with kube-apiserver on `address` (an address of that namespace)
    /// so the namespace's other members (a simulated cluster's nodes) reach it; etcd stays on
    /// the namespace's loopback. kubectl runs in the namespace too.
    pub fn start_in(prefix: &str, netns: Option<&Path>, address: &str) -> Result<KubeEnv> {
        let dir = kube_env_dir(prefix);
        stop_dir(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, Drop cleans up whatever the script managed to start.
        let env = KubeEnv {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            netns: netns.map(Path::to_path_buf),
            stopped: false,
        };
        let script = testenv_script();
        let mut cmd = env.in_netns("bash");
        let out = cmd
            .env("KTE_ADDRESS", address)
            .arg(&script)
            .arg("start")
            .arg(&env.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} start", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} start {}: {}\n{}",
                script.display(),
                env.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        env.wait_for("kube-apiserver /readyz", READY_TIMEOUT, || {
            let body = env.kubectl(&["get", "--raw", "/readyz"])?;
            Ok((body.trim() == "ok").then_some(()))
        })?;
        Ok(env)
    }

    /// `program`, run in the environment's network namespace.
    pub fn in_netns(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(program);
                cmd
            }
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.in_netns("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // Discovery cache per environment: another server on a reused port must not see it.
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// `kubectl --kubeconfig <kubeconfig> <args>`: its stdout, or an error naming the command
    /// with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run_kubectl(self.command(args), args)
    }

    /// [`KubeEnv::kubectl`] with `stdin` piped in (for `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        run_kubectl_stdin(self.command(args), args, stdin)
    }

    /// `kubectl apply --server-side --force-conflicts -f -` of a YAML stream.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            yaml,
        )?;
        Ok(())
    }

    /// Polls `f` every 100 ms until it returns `Ok(Some(v))`, or fails after `timeout` with the
    /// last error (or "still nothing") explained by `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        poll(what, timeout, Duration::from_millis(100), f)
    }

    /// Applies every CRD of `deploy/kubernetes/crds` (server-side) and waits until each is
    /// Established; returns their names.
    pub fn install_crds(&self) -> Result<Vec<String>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/crds");
        let applied = self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-o",
            "name",
            "-k",
            &dir.to_string_lossy(),
        ])?;
        let crds: Vec<String> = applied
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("customresourcedefinition.apiextensions.k8s.io/")
            })
            .map(str::to_string)
            .collect();
        anyhow::ensure!(!crds.is_empty(), "no CRD applied from {}", dir.display());
        for crd in &crds {
            self.wait_for(
                &format!("CRD {crd} Established"),
                Duration::from_secs(30),
                || {
                    let s = self.kubectl(&[
                        "get",
                        "crd",
                        crd,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                    ])?;
                    Ok((s.trim() == "True").then_some(()))
                },
            )?;
        }
        Ok(crds)
    }

    /// Leaves the server running past this handle (for `cargo xtask cluster up --kube`, whose
    /// `down` stops it with [`stop_leftover`]).
    pub fn detach(mut self) {
        self.stopped = true;
    }

    /// Stops the processes and removes the folder. Idempotent; also run on drop.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        stop_dir(&self.dir);
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a prepared kubectl command (`args` name it in errors): its stdout, or an error naming
/// the command with its stderr. Shared by [`KubeEnv`] and `realnode::RealCluster`.
/// Calls `f` every `interval` until it returns `Ok(Some(v))`, or fails after `timeout` with
/// the last error (or "not there") explained by `what`. The clusters' `wait_for`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            return Err(match last {
                Some(e) => e.context(format!("waiting for {what}: timed out after {timeout:?}")),
                None => anyhow::anyhow!("waiting for {what}: not there after {timeout:?}"),
            });
        }
        std::thread::sleep(interval);
    }
}

pub fn run_kubectl(mut cmd: Command, args: &[&str]) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running kubectl")?;
    finish(args, out)
}

/// [`run_kubectl`] with `stdin` piped in (for `apply -f -`).
pub fn run_kubectl_stdin(mut cmd: Command, args: &[&str], stdin: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    let mut pipe = child.stdin.take().context("kubectl stdin")?;
    let input = stdin.to_owned();
    // A writer thread: kubectl may answer before reading all of a large input.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().context("waiting for kubectl")?;
    let _ = writer.join();
    finish(args, out)
}

fn finish(args: &[&str], out: std::process::Output) -> Result<String> {
    if out.status.success() {
        return String::from_utf8(out.stdout).context("kubectl output is not UTF-8");
    }
    bail!(
        "kubectl {}: {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )
}
