//! `cargo xtask soak [--minutes N] [--json]`: a simulated mesh cluster (2 nodes, 6 meshed
//! pods, controller) under sustained mixed load while a fault schedule runs; counts what was
//! lost and tells what a fault or a policy was meant to cut from what it was not. See
//! docs/operations.md ("Soak").
//!
//! Pods (per node `i`, the other node `o`):
//! - `node<i>-pod1`: the client, `testpod soak-load` (`sidenode_tests::soak`): new connections
//!   to `node<o>-pod2`/`-pod3` port 8080 (one in ten to port 9090, the policy's port), idle
//!   connections to both on 8080, streams to `node<o>-pod2:8080`, HTTP/1.1 and h2c to the
//!   Service `web`;
//! - `node<i>-pod2`: `testpod soak-serve` on 8080 and 9090, and `testpod http-serve` on 9080
//!   (`web` subset `v<i>`);
//! - `node<i>-pod3`: `testpod soak-serve` on 8080 and 9090 (`node2-pod3` is the pod killed and
//!   replaced);
//! - `node<i>-pod4`: namespace `plain`, not enrolled (unused).
//!
//! The fault schedule scales with the run length `T`; see [`Schedule`].

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidenode_tests::cluster::{
    CONTROLLER, Cluster, ClusterOpts, PodObject, READY_TIMEOUT, TestCluster, pid_alive, pod_ip,
    pods_yaml, unique_prefix,
};
use sidenode_tests::soak::{Failure, LoadReport, now_ms};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVICE_IP: &str = "198.18.128.10";
const ECHO_PORT: u16 = 8080;
/// The port the AuthorizationPolicy denies while it is in force.
const POLICY_PORT: u16 = 9090;
const HTTP_PORT: u16 = 9080;
/// The destination pod killed and replaced.
const KILLED_POD: &str = "node2-pod3";
/// How often the AuthorizationPolicy is added or removed, and the VirtualService flipped.
const CONFIG_PERIOD: Duration = Duration::from_secs(5);
/// After a fault ends, failures it caused may still surface this long (a connection cut at
/// the end of a window is reported by a read that times out after 5 s).
const GRACE_MS: u64 = 6_000;

pub struct Opts {
    pub minutes: f64,
    pub json: bool,
    /// New connections per second across the cluster.
    pub rate: u64,
    /// Idle keep-alive connections across the cluster.
    pub idle: usize,
    /// Long-lived streams across the cluster.
    pub streams: usize,
    /// HTTP requests per second per protocol per client.
    pub http_rate: u64,
    /// Run the binaries of target/release (else target/debug).
    pub release: bool,
}

impl Opts {
    /// The CI smoke test of `cargo xtask test`: one minute, scaled down to what the debug
    /// build sustains on 2 shared vCPUs and to the HBONE pool's 100 concurrent tunnels per
    /// (source pod, destination pod) (docs/operations.md, "Soak").
    pub fn smoke() -> Self {
        Opts {
            minutes: 1.0,
            json: false,
            rate: 100,
            idle: 100,
            streams: 8,
            http_rate: 20,
            release: false,
        }
    }
}

/// The proxies' `--pool-idle-timeout` (default 5 min): short, so that the pooled connections
/// the load opened are closed before the "after" sample, and so that pooled connections are
/// retired and dialled anew all through the run.
const POOL_IDLE: &str = "20s";
/// From the end of the load to the "after" sample: past the pool's idle timeout (checked every
/// quarter of it) and the proxy's heap trim (every 10 s, `kernel::heap`).
const AFTER_LOAD: Duration = Duration::from_secs(20 + 5 + 12);

/// When each fault happens, as offsets from the start of the load.
struct Schedule {
    total: Duration,
    agent_kill: Duration,
    proxy_upgrade: [(Duration, &'static str); 2],
    /// The "minute 5" sample, from which a process's RSS growth is measured (issue 17's
    /// "between minute 5 and the end"); a sixth of a shorter run. After node2's hand-over, so
    /// that node2's proxy lives from this sample to the end, through node1's hand-over.
    steady: Duration,
    ebpf_upgrade: Duration,
    controller_kill: Duration,
    controller_down: Duration,
    pod_kill: Duration,
    pod_down: Duration,
    cert_ttl: Duration,
}

impl Schedule {
    fn new(total: Duration) -> Self {
        let at = |f: f64| total.mul_f64(f);
        // "Several minutes" on a long run, a fifth of a short one.
        let controller_down = at(0.2).min(Duration::from_secs(300));
        Schedule {
            total,
            agent_kill: at(0.05),
            // node2's before the steady sample, node1's late: node2's proxy is then measured
            // from minute 5 to the end across node1's hand-over, which re-opens every tunnel
            // into node2 (the case that once grew node2's proxy by a third).
            proxy_upgrade: [
                (at(0.10).min(Duration::from_secs(180)), "node2"),
                (at(0.85), "node1"),
            ],
            steady: at(1.0 / 6.0).min(Duration::from_secs(300)),
            ebpf_upgrade: at(0.30),
            controller_kill: at(0.40),
            controller_down,
            pod_kill: at(0.70),
            pod_down: Duration::from_secs(3),
            // Renewal comes at half-life; with the controller down for D, a certificate renewed
            // just before it went away must outlive D: TTL = 3 D (and at least 30 s).
            cert_ttl: (controller_down * 3).max(Duration::from_secs(30)),
        }
    }
}

/// A window in which failures of some connections were meant.
#[derive(Clone, Debug)]
struct Window {
    cause: String,
    from_ms: u64,
    to_ms: u64,
    /// Which failures: a target IP, a target port, or every one (`None`, `None`).
    ip: Option<String>,
    port: Option<u16>,
    /// Kinds of failure it explains (empty: all).
    kinds: Vec<&'static str>,
}

impl Window {
    fn explains(&self, f: &Failure) -> bool {
        if f.t_ms < self.from_ms || f.t_ms > self.to_ms + GRACE_MS {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&f.kind.as_str()) {
            return false;
        }
        let (ip, port) = f.target.rsplit_once(':').unwrap_or((f.target.as_str(), ""));
        if self.ip.as_deref().is_some_and(|w| w != ip) {
            return false;
        }
        if self.port.is_some_and(|w| w.to_string() != port) {
            return false;
        }
        true
    }
}

/// One fault as it happened.
#[derive(Clone, Debug)]
struct Event {
    at_s: f64,
    what: String,
    took_ms: u64,
}

struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raise RLIMIT_NOFILE (soft and hard) so the cluster's processes, started from here, can hold
/// the idle connections; returns the limit in force.
fn raise_nofile(want: u64) -> Result<u64> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if cur.rlim_cur >= want {
        return Ok(cur.rlim_cur);
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(cur.rlim_max),
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return Ok(want);
    }
    // Not allowed to raise the hard limit: the soft one up to it.
    let new = libc::rlimit {
        rlim_cur: cur.rlim_max,
        rlim_max: cur.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(cur.rlim_max)
}

/// Does this `mesh-node proxy` offer `--takeover` (the hitless hand-over)?
fn takeover_supported(mesh_node: &Path) -> Result<bool> {
    let out = Command::new(mesh_node)
        .args(["proxy", "--help"])
        .output()
        .with_context(|| format!("running {} proxy --help", mesh_node.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("--takeover"))
}

/// Upgrade a node's proxy: a new proxy with the same command line plus `--takeover` beside the
/// old one, which hands over its listeners and drains (when `mesh-node proxy` has
/// `--takeover`); otherwise the old one is killed (SIGKILL) and a new one started. Returns
/// the window of failures it was meant to cause.
fn upgrade_proxy(c: &mut Cluster, node: &str, takeover: bool) -> Result<Window> {
    let from_ms = now_ms();
    if takeover {
        let offset = c.log_len(node, "proxy");
        // The harness keeps the old process as `<node>-proxy-old` and starts the new one
        // with the same command line plus `--takeover`.
        let old = c.start_successor_proxy(node, &["--takeover"])?;
        c.wait_for_log_after(node, "proxy", offset, "proxy ready", READY_TIMEOUT)?;
        // The old one drains its connections (bounded) and exits.
        c.wait_old_proxy_exit(node, Duration::from_secs(120))
            .with_context(|| format!("{node}: the old proxy (pid {old}) after the takeover"))?;
        // A hand-over refuses nothing: only connections still open when the old proxy's
        // drain ended may be cut.
        Ok(Window {
            cause: format!("{node} proxy upgrade (--takeover): drained"),
            from_ms,
            to_ms: now_ms(),
            ip: None,
            port: None,
            kinds: vec!["stream", "idle", "http1", "h2"],
        })
    } else {
        c.kill_process(node, "proxy", libc::SIGKILL)?;
        let offset = c.log_len(node, "proxy");
        c.start_process(node, "proxy")?;
        c.wait_for_log_after(node, "proxy", offset, "proxy ready", READY_TIMEOUT)?;
        Ok(Window {
            cause: format!("{node} proxy upgrade (kill + restart, no --takeover)"),
            from_ms,
            to_ms: now_ms(),
            ip: None,
            port: None,
            kinds: Vec::new(),
        })
    }
}

/// `testpod` of the build the cluster runs (next to its `mesh-node`).
fn testpod_bin(c: &Cluster) -> PathBuf {
    c.opts.mesh_node.with_file_name("testpod")
}

/// Starts `testpod` with `args` in a pod, its stderr appended to `log`; its stdout is returned
/// to be read.
fn spawn_testpod(
    c: &Cluster,
    pod: &str,
    args: &[impl AsRef<std::ffi::OsStr> + std::fmt::Debug],
    log: &Path,
) -> Result<(std::process::Child, std::process::ChildStdout)> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut child = c
        .pod_command(pod, testpod_bin(c))?
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("starting testpod {args:?} in {pod}"))?;
    let out = child.stdout.take().context("testpod stdout")?;
    Ok((child, out))
}

/// Start a `testpod` server mode in a pod and wait for its `serving` line.
fn start_server(c: &Cluster, pod: &str, args: &[&str], log: &Path) -> Result<Proc> {
    let (mut child, out) = spawn_testpod(c, pod, args, log)?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .context("reading the server's first line")?;
    if line.trim() != "serving" {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "testpod {args:?} in {pod} did not start: {line:?} (see {})",
            log.display()
        );
    }
    Ok(Proc {
        name: format!("{pod} {}", args.first().copied().unwrap_or("")),
        child,
    })
}

fn soak_serve(c: &Cluster, pod: &str, logs: &Path) -> Result<Proc> {
    start_server(
        c,
        pod,
        &[
            "soak-serve",
            "--port",
            &ECHO_PORT.to_string(),
            "--port",
            &POLICY_PORT.to_string(),
        ],
        &logs.join(format!("{pod}-soak-serve.log")),
    )
}

fn web_yaml(w1: u32, w2: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: mesh
spec:
  clusterIP: {SERVICE_IP}
  selector:
    svc: web
  ports:
  - name: http
    port: 80
    targetPort: {HTTP_PORT}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: mesh
spec:
  host: web.mesh.svc.cluster.local
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: mesh
spec:
  hosts:
  - web
  http:
  - route:
    - destination:
        host: web
        subset: v1
      weight: {w1}
    - destination:
        host: web
        subset: v2
      weight: {w2}
"#
    )
}

const POLICY_YAML: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: soak-deny\n  namespace: mesh\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9090\"]\n";

/// Labels `svc: web`, `version: v<i>` on `node<i>-pod2`.
fn label_web_pods(c: &Cluster) -> Result<()> {
    for (i, node) in c.node_names().iter().enumerate() {
        let pods: Vec<PodObject> = c
            .pod_objects(node)
            .into_iter()
            .map(|mut p| {
                if p.name == format!("{node}-pod2") {
                    p.labels.insert("svc".into(), "web".into());
                    p.labels.insert("version".into(), format!("v{}", i + 1));
                }
                p
            })
            .collect();
        c.write_config_file(&format!("{node}.yaml"), &pods_yaml(&pods))?;
    }
    Ok(())
}

/// Wait until `f` holds (every 250 ms), up to `timeout`.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + timeout;
    let mut last = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() > end {
            match last {
                Some(e) => bail!("{what}: not within {timeout:?}: {e:#}"),
                None => bail!("{what}: not within {timeout:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Everything the load will use answers (through the mesh) before the load starts.
fn preflight(c: &Cluster) -> Result<()> {
    for (client, other) in [("node1-pod1", 2), ("node2-pod1", 1)] {
        for j in [2, 3] {
            let to = format!("{}:{ECHO_PORT}", pod_ip(other, j));
            wait_for(
                &format!("{client} -> {to}"),
                Duration::from_secs(30),
                || {
                    let out = c
                        .pod_command(client, testpod_bin(c))?
                        .args(["dial", "--to", &to, "--conns", "1"])
                        .output()
                        .context("running testpod dial")?;
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    if v["results"][0]["echo_ok"] == json!(true) {
                        return Ok(true);
                    }
                    bail!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                },
            )?;
        }
        let url = format!("http://{SERVICE_IP}:80");
        wait_for(
            &format!("{client} -> {url} (web)"),
            Duration::from_secs(30),
            || {
                let out = c
                    .pod_command(client, testpod_bin(c))?
                    .args(["http-get", "--url", &url, "--count", "4"])
                    .output()
                    .context("running testpod http-get")?;
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                if v["statuses"]["200"] == json!(4) {
                    return Ok(true);
                }
                bail!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            },
        )?;
    }
    Ok(())
}

/// VmRSS (kB), open fds and tasks of a process.
fn proc_stats(pid: u32) -> Value {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .ok();
    json!({
        "pid": pid,
        "rss_kb": field("VmRSS:"),
        "fds": fds,
        "tasks": field("Threads:"),
    })
}

fn sample(c: &Cluster) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(p) = c.pid(CONTROLLER, CONTROLLER).filter(|p| pid_alive(*p)) {
        m.insert("controller".into(), proc_stats(p));
    }
    for node in c.node_names() {
        for kind in ["agent", "proxy"] {
            if let Some(p) = c.pid(&node, kind).filter(|p| pid_alive(*p)) {
                m.insert(format!("{node}-{kind}"), proc_stats(p));
            }
        }
    }
    Value::Object(m)
}

fn load_args(client: &str, other: usize, o: &Opts, seconds: u64, clients: usize) -> Vec<String> {
    let echo = |j: usize, port: u16| format!("{}:{port}", pod_ip(other, j));
    let mut a = vec![
        "soak-load".to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--rate".into(),
        (o.rate / clients as u64).to_string(),
    ];
    // Nine in ten new connections to port 8080 of pods 2 and 3, one in ten to the policy's
    // port.
    for n in 0..10 {
        let t = if n == 9 {
            echo(2 + (other % 2), POLICY_PORT)
        } else {
            echo(2 + n % 2, ECHO_PORT)
        };
        a.extend(["--conn-to".into(), t]);
    }
    a.extend([
        "--stream-to".into(),
        echo(2, ECHO_PORT),
        "--streams".into(),
        (o.streams / clients).to_string(),
        "--idle-to".into(),
        echo(2, ECHO_PORT),
        "--idle-to".into(),
        echo(3, ECHO_PORT),
        "--idle".into(),
        (o.idle / clients).to_string(),
        "--http-to".into(),
        format!("{SERVICE_IP}:80"),
        "--http-rate".into(),
        o.http_rate.to_string(),
    ]);
    let _ = client;
    a
}

/// Start the load in a client pod; its report is read by a thread.
fn start_load(
    c: &Cluster,
    client: &str,
    args: &[String],
    log: &Path,
    started: std::sync::mpsc::Sender<bool>,
) -> Result<(Proc, std::thread::JoinHandle<Result<String>>)> {
    let (child, out) = spawn_testpod(c, client, args, log)?;
    let mut out = BufReader::new(out);
    let log = log.to_path_buf();
    let who = client.to_string();
    let reader = std::thread::spawn(move || -> Result<String> {
        // `started <ms>`: the idle connections are open, the timed load begins.
        let mut first = String::new();
        out.read_line(&mut first)
            .context("reading the load's first line")?;
        let ok = first.starts_with("started ");
        let _ = started.send(ok);
        if !ok {
            bail!(
                "soak-load in {who} did not start: {first:?} (see {})",
                log.display()
            );
        }
        let mut s = String::new();
        out.read_to_string(&mut s)
            .context("reading the load report")?;
        Ok(s)
    });
    Ok((
        Proc {
            name: format!("{client} soak-load"),
            child,
        },
        reader,
    ))
}

pub fn run(o: Opts) -> Result<()> {
    if !(0.5..=24.0 * 60.0).contains(&o.minutes) {
        bail!("--minutes must be between 0.5 and 1440, not {}", o.minutes);
    }
    let mesh_node = if o.release {
        crate::mesh_node_bin()
            .parent()
            .and_then(Path::parent)
            .map(|t| t.join("release").join("mesh-node"))
            .context("the target directory of mesh-node")?
    } else {
        crate::mesh_node_bin()
    };
    for b in [mesh_node.clone(), mesh_node.with_file_name("testpod")] {
        if !b.exists() {
            bail!("{} not found: run `cargo xtask build` first", b.display());
        }
    }
    // Per idle connection: the client, two proxies and the server each hold a socket.
    let nofile = raise_nofile((o.idle as u64 + 20_000).max(65_536))?;
    let takeover = takeover_supported(&mesh_node)?;
    let total = Duration::from_secs_f64(o.minutes * 60.0);
    let sched = Schedule::new(total);
    let prefix = unique_prefix('k');
    let ttl = format!("{}s", sched.cert_ttl.as_secs());
    eprintln!(
        "soak: cluster {prefix}, {:.1} min, proxy upgrade by {}, cert TTL {ttl}, RLIMIT_NOFILE {nofile}",
        o.minutes,
        if takeover {
            "--takeover"
        } else {
            "kill + restart"
        }
    );
    let mut c = TestCluster::up(ClusterOpts {
        prefix: prefix.clone(),
        nodes: 2,
        pods: 4,
        mesh_node: mesh_node.clone(),
        start_agents: true,
        mesh: true,
        cert_ttl: Some(ttl.clone()),
        proxy_args: vec!["--pool-idle-timeout".into(), POOL_IDLE.into()],
        ..ClusterOpts::default()
    })?;
    let out_dir = crate::workspace_root().join("target").join("soak");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let logs = c.state_dir.join("logs");
    let result = soak(&mut c, &o, &sched, takeover, nofile, &logs);
    // Keep the logs of a run that went wrong.
    let kept = out_dir.join("logs");
    let _ = std::fs::remove_dir_all(&kept);
    let _ = Command::new("cp").arg("-r").arg(&logs).arg(&kept).status();
    let mut report = result?;
    // A panic in any sidenode process is a defect even when no connection noticed it.
    let panics = c.panics();
    c.panics_reported();
    report["process_panics"] = json!(panics);
    let text = serde_json::to_string_pretty(&report)?;
    let path = out_dir.join("latest.json");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let table = table(&report);
    if o.json {
        eprintln!("{table}");
        println!("{text}");
    } else {
        println!("{table}");
    }
    eprintln!(
        "soak: JSON in {}, logs in {}",
        path.display(),
        kept.display()
    );
    let unexpected = report["failures"]["unexpected"].as_u64().unwrap_or(0);
    let corrupted = report["bytes"]["corrupted"].as_u64().unwrap_or(0);
    if unexpected > 0 || corrupted > 0 || !panics.is_empty() {
        bail!(
            "soak failed: {unexpected} unexpected failures, {corrupted} bytes corrupted, {} process panics: {panics:?}",
            panics.len()
        );
    }
    Ok(())
}

fn soak(
    c: &mut Cluster,
    o: &Opts,
    sched: &Schedule,
    takeover: bool,
    nofile: u64,
    logs: &Path,
) -> Result<Value> {
    label_web_pods(c)?;
    c.write_config_file("web.yaml", &web_yaml(100, 0))?;
    let mut servers = Vec::new();
    let mut killed_server = None;
    for i in 1..=2 {
        for j in [2, 3] {
            let pod = format!("node{i}-pod{j}");
            let p = soak_serve(c, &pod, logs)?;
            if pod == KILLED_POD {
                killed_server = Some(p);
            } else {
                servers.push(p);
            }
        }
        let pod = format!("node{i}-pod2");
        servers.push(start_server(
            c,
            &pod,
            &[
                "http-serve",
                "--port",
                &HTTP_PORT.to_string(),
                "--name",
                &format!("v{i}"),
            ],
            &logs.join(format!("{pod}-http-serve.log")),
        )?);
    }
    preflight(c)?;

    let secs = sched.total.as_secs().max(1);
    let mut stats = BTreeMap::new();
    // When each sample taken during the load was taken (seconds from its start).
    let mut sampled_at: BTreeMap<&'static str, f64> = BTreeMap::new();
    stats.insert("start", sample(c));
    let mut loads = Vec::new();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    for (i, client) in ["node1-pod1", "node2-pod1"].iter().enumerate() {
        let other = 2 - i;
        let args = load_args(client, other, o, secs, 2);
        loads.push(start_load(
            c,
            client,
            &args,
            &logs.join(format!("{client}-load.log")),
            started_tx.clone(),
        )?);
    }
    // Both clients have opened their idle connections.
    for _ in 0..loads.len() {
        match started_rx.recv_timeout(Duration::from_secs(240)) {
            Ok(true) => {}
            Ok(false) | Err(_) => bail!("a soak-load did not start (see {})", logs.display()),
        }
    }
    stats.insert("idle_open", sample(c));
    let t0 = Instant::now();
    let start_ms = now_ms();
    let commit = commit();
    let mut windows: Vec<Window> = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    let record = |events: &mut Vec<Event>, what: String, started: Instant| {
        events.push(Event {
            at_s: started.duration_since(t0).as_secs_f64(),
            what,
            took_ms: started.elapsed().as_millis() as u64,
        });
    };

    // The fault schedule.
    let mut next_config = CONFIG_PERIOD;
    let mut policy_on: Option<u64> = None;
    let mut weights_v1 = true;
    let (mut agent_done, mut ebpf_done, mut ctl_killed, mut ctl_back, mut pod_killed, mut pod_back) =
        (false, false, false, false, false, false);
    let mut upgrades_done = [false, false];
    let mut middle_done = false;
    let mut steady_done = false;
    let mut end_sampled = false;
    let mut pod_kill_ms = 0;
    let mut ctl_kill_at = Instant::now();
    let mut config_changes = (0u64, 0u64);
    let mut faults_failed = Vec::new();
    while t0.elapsed() < sched.total {
        let now = t0.elapsed();
        let started = Instant::now();
        if now >= next_config {
            next_config += CONFIG_PERIOD;
            weights_v1 = !weights_v1;
            let (w1, w2) = if weights_v1 { (100, 0) } else { (0, 100) };
            c.write_config_file("web.yaml", &web_yaml(w1, w2))?;
            config_changes.0 += 1;
            match policy_on.take() {
                None => {
                    c.write_config_file("soak-policy.yaml", POLICY_YAML)?;
                    policy_on = Some(now_ms());
                }
                Some(from_ms) => {
                    c.remove_config_file("soak-policy.yaml")?;
                    windows.push(Window {
                        cause: "denied by the AuthorizationPolicy".into(),
                        from_ms,
                        to_ms: now_ms(),
                        ip: None,
                        port: Some(POLICY_PORT),
                        kinds: Vec::new(),
                    });
                }
            }
            config_changes.1 += 1;
        }
        if !agent_done && now >= sched.agent_kill {
            agent_done = true;
            let r = (|| -> Result<()> {
                c.kill_process("node2", "agent", libc::SIGKILL)?;
                let offset = c.log_len("node2", "agent");
                c.start_process("node2", "agent")?;
                c.wait_for_log_after("node2", "agent", offset, "agent ready", READY_TIMEOUT)?;
                Ok(())
            })();
            if let Err(e) = r {
                faults_failed.push(format!("node2 agent SIGKILL + restart: {e:#}"));
            }
            record(&mut events, "node2 agent SIGKILL + restart".into(), started);
        }
        for (k, (at, node)) in sched.proxy_upgrade.iter().enumerate() {
            if !upgrades_done[k] && now >= *at {
                upgrades_done[k] = true;
                let before = if *node == "node1" {
                    "before_node1_upgrade"
                } else {
                    "before_node2_upgrade"
                };
                take_sample(c, before, &mut stats, &mut sampled_at, t0);
                let started = Instant::now();
                match upgrade_proxy(c, node, takeover) {
                    Ok(w) => {
                        record(&mut events, w.cause.clone(), started);
                        windows.push(w);
                    }
                    Err(e) => faults_failed.push(format!("{node} proxy upgrade: {e:#}")),
                }
            }
        }
        if !ebpf_done && now >= sched.ebpf_upgrade {
            ebpf_done = true;
            let r = (|| -> Result<()> {
                let offset = c.log_len("node1", "agent");
                c.kill_process("node1", "agent", libc::SIGTERM)?;
                let saved = std::mem::take(&mut c.opts.agent_args);
                c.opts.agent_args = vec!["--ebpf-build-id".into(), format!("{}", now_ms())];
                let r = c.restart_process("node1", "agent");
                c.opts.agent_args = saved;
                r?;
                c.wait_for_log_after(
                    "node1",
                    "agent",
                    offset,
                    "replaced the pinned programs in place",
                    Duration::from_secs(5),
                )?;
                Ok(())
            })();
            if let Err(e) = r {
                faults_failed.push(format!("node1 agent upgrade (new eBPF object): {e:#}"));
            }
            record(
                &mut events,
                "node1 agent upgrade with a new eBPF object (in place)".into(),
                started,
            );
        }
        if !ctl_killed && now >= sched.controller_kill {
            ctl_killed = true;
            ctl_kill_at = Instant::now();
            if let Err(e) = c.kill_controller(libc::SIGKILL) {
                faults_failed.push(format!("controller SIGKILL: {e:#}"));
            }
            record(&mut events, "controller SIGKILL".into(), started);
        }
        if ctl_killed && !ctl_back && ctl_kill_at.elapsed() >= sched.controller_down {
            ctl_back = true;
            if let Err(e) = c.restart_controller() {
                faults_failed.push(format!("controller restart: {e:#}"));
            }
            record(
                &mut events,
                format!(
                    "controller back after {:.0} s",
                    sched.controller_down.as_secs_f64()
                ),
                started,
            );
        }
        if !pod_killed && now >= sched.pod_kill {
            pod_killed = true;
            pod_kill_ms = now_ms();
            drop(killed_server.take());
            record(&mut events, format!("{KILLED_POD} killed"), started);
        }
        if pod_killed && !pod_back && now >= sched.pod_kill + sched.pod_down {
            pod_back = true;
            match soak_serve(c, KILLED_POD, logs) {
                Ok(p) => killed_server = Some(p),
                Err(e) => faults_failed.push(format!("{KILLED_POD} replacement: {e:#}")),
            }
            windows.push(Window {
                cause: format!("connections to the killed pod {KILLED_POD}"),
                from_ms: pod_kill_ms,
                to_ms: now_ms(),
                ip: Some(c.pod(KILLED_POD)?.ip.clone()),
                port: None,
                kinds: Vec::new(),
            });
            record(&mut events, format!("{KILLED_POD} replaced"), started);
        }
        if !steady_done && now >= sched.steady {
            steady_done = true;
            take_sample(c, "minute5", &mut stats, &mut sampled_at, t0);
        }
        if !middle_done && now >= sched.total / 2 {
            middle_done = true;
            take_sample(c, "middle", &mut stats, &mut sampled_at, t0);
        }
        if !end_sampled && now + Duration::from_secs(2) >= sched.total {
            end_sampled = true;
            take_sample(c, "end", &mut stats, &mut sampled_at, t0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !end_sampled {
        take_sample(c, "end", &mut stats, &mut sampled_at, t0);
    }
    if let Some(from_ms) = policy_on.take() {
        windows.push(Window {
            cause: "denied by the AuthorizationPolicy".into(),
            from_ms,
            to_ms: u64::MAX - GRACE_MS,
            ip: None,
            port: Some(POLICY_PORT),
            kinds: Vec::new(),
        });
    }
    if ctl_killed && !ctl_back {
        c.restart_controller()
            .context("bringing the controller back")?;
    }
    let mut reports = Vec::new();
    for (proc, reader) in loads {
        let mut proc = proc;
        let status = proc.child.wait().context("waiting for the load")?;
        let out = reader
            .join()
            .map_err(|_| anyhow::anyhow!("load reader panicked"))??;
        let line = out.lines().last().unwrap_or_default();
        let r: LoadReport = serde_json::from_str(line)
            .with_context(|| format!("{} ({status}) printed no report: {out:?}", proc.name))?;
        reports.push(r);
    }
    // Past the proxy's heap trim (every 10 s, `kernel::heap`): what it keeps, not what it
    // has not returned yet.
    // And past the pool's idle timeout (`POOL_IDLE`): the tunnels' pooled connections are
    // closed, so open fds are back to the start's unless something leaked.
    std::thread::sleep(AFTER_LOAD);
    stats.insert("after", sample(c));
    drop(servers);
    drop(killed_server);
    Ok(summarize(
        &reports,
        &windows,
        &events,
        &stats,
        &sampled_at,
        &faults_failed,
        SummaryCtx {
            o,
            sched,
            takeover,
            nofile,
            start_ms,
            config_changes,
            cert_renewals: count_renewals(c),
            commit: commit.clone(),
        },
    ))
}

/// `certificate renewed` lines in the proxies' logs.
fn count_renewals(c: &Cluster) -> u64 {
    c.node_names()
        .iter()
        .map(|n| {
            std::fs::read_to_string(c.log_path(n, "proxy"))
                .map(|s| s.matches("certificate renewed").count() as u64)
                .unwrap_or(0)
        })
        .sum()
}

struct SummaryCtx<'a> {
    o: &'a Opts,
    sched: &'a Schedule,
    takeover: bool,
    nofile: u64,
    start_ms: u64,
    config_changes: (u64, u64),
    cert_renewals: u64,
    /// HEAD when the soak started (the code that ran).
    commit: String,
}

/// Shorten an error to its kind (the last `: ` part, without addresses and numbers).
fn error_kind(e: &str) -> String {
    let last = e.rsplit(": ").next().unwrap_or(e);
    last.split(" (os error")
        .next()
        .unwrap_or(last)
        .trim()
        .to_string()
}

fn summarize(
    reports: &[LoadReport],
    windows: &[Window],
    events: &[Event],
    stats: &BTreeMap<&str, Value>,
    sampled_at: &BTreeMap<&'static str, f64>,
    faults_failed: &[String],
    x: SummaryCtx,
) -> Value {
    let sum = |f: &dyn Fn(&LoadReport) -> u64| reports.iter().map(f).sum::<u64>();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected_samples = Vec::new();
    let mut by_kind: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for f in reports.iter().flat_map(|r| &r.failures) {
        let e = by_kind.entry(f.kind.clone()).or_default();
        match windows.iter().find(|w| w.explains(f)) {
            Some(w) => {
                e.0 += 1;
                *expected.entry(w.cause.clone()).or_default() += 1;
            }
            None => {
                e.1 += 1;
                *unexpected
                    .entry(format!("{}: {}", f.kind, error_kind(&f.error)))
                    .or_default() += 1;
                if unexpected_samples.len() < 2_000 {
                    unexpected_samples.push(json!({
                        "at_s": (f.t_ms.saturating_sub(x.start_ms)) as f64 / 1000.0,
                        "kind": f.kind,
                        "target": f.target,
                        "error": f.error,
                    }));
                }
            }
        }
    }
    let unlisted = sum(&|r| r.failures_unlisted);
    let n_expected: u64 = expected.values().sum();
    // Failures past the listing cap cannot be classified: counted as unexpected.
    let n_unexpected: u64 = unexpected.values().sum::<u64>() + unlisted;
    let mut status: BTreeMap<String, u64> = BTreeMap::new();
    for r in reports {
        for (k, v) in &r.http_status {
            *status.entry(k.clone()).or_default() += v;
        }
    }
    // Per minute: the two clients' samples merged by count-weighted... kept per client.
    let minutes: Vec<Value> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| json!({ "client": format!("node{}-pod1", i + 1), "minutes": r.minutes }))
        .collect();
    // RSS growth from the middle to the end of the load, for processes not restarted between.
    let mut growth = serde_json::Map::new();
    if let (Some(mid), Some(end)) = (stats.get("middle"), stats.get("end")) {
        for (p, e) in end.as_object().into_iter().flatten() {
            let v = rss_growth_pct(&mid[p.as_str()], e).map_or(Value::Null, |g| json!(g));
            growth.insert(p.clone(), v);
        }
    }
    let secs = x.sched.total.as_secs_f64();
    let attempted = sum(&|r| r.conn_attempted);
    json!({
        "machine": machine(),
        "commit": x.commit,
        "build": if x.o.release { "release" } else { "debug" },
        "minutes": x.o.minutes,
        "settings": {
            "rate_target_per_s": x.o.rate,
            "idle_target": x.o.idle,
            "streams": x.o.streams,
            "http_rate_per_protocol_per_client": x.o.http_rate,
            "cert_ttl_s": x.sched.cert_ttl.as_secs(),
            "pool_idle_timeout": POOL_IDLE,
            "after_sample_s": AFTER_LOAD.as_secs(),
            "controller_down_s": x.sched.controller_down.as_secs(),
            "proxy_upgrade": if x.takeover { "--takeover" } else { "kill + restart (no --takeover in mesh-node proxy)" },
            "rlimit_nofile": x.nofile,
        },
        "connections": {
            "attempted": attempted,
            "completed": sum(&|r| r.conn_completed),
            "failed": attempted.saturating_sub(sum(&|r| r.conn_completed)),
            "skipped_generator_saturated": sum(&|r| r.conn_skipped),
            "sustained_per_s": attempted as f64 / secs,
        },
        "streams": {
            "connections": sum(&|r| r.stream_connections),
        },
        "bytes": {
            "verified": sum(&|r| r.stream_bytes_verified),
            "corrupted": sum(&|r| r.stream_bytes_corrupted),
        },
        "idle": {
            "wanted": sum(&|r| r.idle_wanted),
            "opened": sum(&|r| r.idle_opened),
            "open_at_end": sum(&|r| r.idle_open_at_end),
            "held_to_end": sum(&|r| r.idle_held),
        },
        "http": {
            "http1_attempted": sum(&|r| r.http1_attempted),
            "h2_attempted": sum(&|r| r.h2_attempted),
            "status": status,
        },
        "failures": {
            "expected": n_expected,
            "expected_by_cause": expected,
            "unexpected": n_unexpected,
            "unexpected_by_kind": unexpected,
            "unlisted": unlisted,
            "by_kind_expected_unexpected": by_kind,
            "unexpected_samples": unexpected_samples,
        },
        "latency_per_minute": minutes,
        "faults": events.iter().map(|e| json!({"at_s": e.at_s, "what": e.what, "took_ms": e.took_ms})).collect::<Vec<_>>(),
        "faults_that_failed": faults_failed,
        "config_changes": {"virtualservice_flips": x.config_changes.0, "policy_changes": x.config_changes.1},
        "certificate_renewals": x.cert_renewals,
        "processes": stats,
        "rss_growth_middle_to_end_pct": growth,
        "rss_growth_from_minute5": rss_growth_from_minute5(stats, sampled_at),
    })
}

/// RSS growth (%) of one process between two of its samples; `None` unless both samples are
/// of the same process (same pid) and have an RSS.
fn rss_growth_pct(from: &Value, to: &Value) -> Option<f64> {
    if from["pid"].is_null() || from["pid"] != to["pid"] {
        return None;
    }
    let (a, b) = (from["rss_kb"].as_f64()?, to["rss_kb"].as_f64()?);
    (a > 0.0).then(|| (b - a) / a * 100.0)
}

/// A sample taken during the load (`sample`), with when it was taken (seconds from `t0`).
fn take_sample(
    c: &Cluster,
    name: &'static str,
    stats: &mut BTreeMap<&'static str, Value>,
    sampled_at: &mut BTreeMap<&'static str, f64>,
    t0: Instant,
) {
    stats.insert(name, sample(c));
    sampled_at.insert(name, t0.elapsed().as_secs_f64());
}

/// Each process's RSS growth from the "minute 5" sample to the last sample of the *same*
/// process (same pid) taken after it: the end of the load, or, for a proxy replaced by a
/// hand-over later on, the sample just before its hand-over. `{process: {pct, from_s, to,
/// to_s}}`; a process without a later sample of itself is left out.
fn rss_growth_from_minute5(
    stats: &BTreeMap<&str, Value>,
    sampled_at: &BTreeMap<&'static str, f64>,
) -> Value {
    let mut out = serde_json::Map::new();
    let (Some(from), Some(&from_s)) = (stats.get("minute5"), sampled_at.get("minute5")) else {
        return Value::Object(out);
    };
    for (p, f) in from.as_object().into_iter().flatten() {
        let later = sampled_at
            .iter()
            .filter(|(k, t)| **k != "minute5" && **t > from_s)
            .filter_map(|(k, t)| {
                let to = &stats.get(k)?[p.as_str()];
                (to["pid"] == f["pid"]).then(|| (*k, *t, rss_growth_pct(f, to)))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((to, to_s, Some(pct))) = later {
            out.insert(
                p.clone(),
                json!({"pct": pct, "from_s": from_s, "to": to, "to_s": to_s}),
            );
        }
    }
    Value::Object(out)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} vCPU {model}, Linux {}", kernel.trim())
}

fn commit() -> String {
    Command::new("git")
        .current_dir(crate::workspace_root())
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let g = |p: &str| r.pointer(p).cloned().unwrap_or(Value::Null);
    let _ = writeln!(
        s,
        "soak: {} min on {} (commit {}, {} build)",
        g("/minutes"),
        g("/machine").as_str().unwrap_or(""),
        g("/commit").as_str().unwrap_or(""),
        g("/build").as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "proxy upgrade: {}",
        g("/settings/proxy_upgrade").as_str().unwrap_or("")
    );
    let _ = writeln!(s, "\n{:<44} {:>14}", "measure", "value");
    for (name, p) in [
        ("new connections attempted", "/connections/attempted"),
        ("new connections completed", "/connections/completed"),
        ("new connections failed", "/connections/failed"),
        (
            "sustained new connections / s",
            "/connections/sustained_per_s",
        ),
        (
            "ticks skipped (generator saturated)",
            "/connections/skipped_generator_saturated",
        ),
        ("stream connections", "/streams/connections"),
        ("stream bytes verified", "/bytes/verified"),
        ("stream bytes corrupted", "/bytes/corrupted"),
        ("idle connections wanted", "/idle/wanted"),
        ("idle connections open at the end", "/idle/open_at_end"),
        ("idle connections echoing at the end", "/idle/held_to_end"),
        ("HTTP/1.1 requests", "/http/http1_attempted"),
        ("h2 requests", "/http/h2_attempted"),
        ("failures meant by a fault or policy", "/failures/expected"),
        ("failures NOT meant (unexpected)", "/failures/unexpected"),
        (
            "VirtualService flips",
            "/config_changes/virtualservice_flips",
        ),
        (
            "AuthorizationPolicy changes",
            "/config_changes/policy_changes",
        ),
        ("certificate renewals (proxies)", "/certificate_renewals"),
    ] {
        let v = g(p);
        let v = match v.as_f64() {
            Some(f) if v.is_f64() => format!("{f:.1}"),
            _ => v.to_string(),
        };
        let _ = writeln!(s, "{name:<44} {v:>14}");
    }
    let _ = writeln!(s, "\nrequest statuses: {}", g("/http/status"));
    let _ = writeln!(
        s,
        "meant failures by cause: {}",
        g("/failures/expected_by_cause")
    );
    let _ = writeln!(
        s,
        "unexpected failures by kind: {}",
        g("/failures/unexpected_by_kind")
    );
    let _ = writeln!(
        s,
        "failures by kind [meant, unexpected]: {}",
        g("/failures/by_kind_expected_unexpected")
    );
    let panics = g("/process_panics");
    let _ = writeln!(
        s,
        "sidenode process panics: {}",
        panics.as_array().map_or(0, Vec::len)
    );
    if let Some(list) = panics.as_array().filter(|l| !l.is_empty()) {
        for p in list {
            let _ = writeln!(s, "  {}", p.as_str().unwrap_or_default());
        }
    }
    if let Some(list) = g("/faults_that_failed")
        .as_array()
        .filter(|l| !l.is_empty())
    {
        let _ = writeln!(s, "faults that could not be applied: {list:?}");
    }
    let _ = writeln!(s, "\nlatency per minute (ms), per client:");
    let _ = writeln!(
        s,
        "{:<12} {:>4} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "client", "min", "conns", "conn p50", "conn p99", "reqs", "req p50", "req p99"
    );
    for c in g("/latency_per_minute")
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        for m in c["minutes"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                s,
                "{:<12} {:>4} {:>8} {:>9.2} {:>9.2} {:>8} {:>9.2} {:>9.2}",
                c["client"].as_str().unwrap_or(""),
                m["minute"],
                m["conn_count"],
                m["conn_p50_ms"].as_f64().unwrap_or(0.0),
                m["conn_p99_ms"].as_f64().unwrap_or(0.0),
                m["http_count"],
                m["http_p50_ms"].as_f64().unwrap_or(0.0),
                m["http_p99_ms"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let _ = writeln!(s, "\nprocesses: RSS MiB / fds / tasks");
    let _ = writeln!(
        s,
        "{:<16} {:>18} {:>18} {:>18} {:>18} {:>18}",
        "process", "start", "idle open", "minute 5", "end", "after"
    );
    let procs: Vec<String> = g("/processes/start")
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for p in procs {
        let cell = |when: &str| {
            let v = g(&format!("/processes/{when}/{p}"));
            if v.is_null() {
                return "-".to_string();
            }
            format!(
                "{:.1}/{}/{}",
                v["rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                v["fds"],
                v["tasks"]
            )
        };
        let _ = writeln!(
            s,
            "{p:<16} {:>18} {:>18} {:>18} {:>18} {:>18}",
            cell("start"),
            cell("idle_open"),
            cell("minute5"),
            cell("end"),
            cell("after")
        );
    }
    let _ = writeln!(
        s,
        "RSS growth from minute 5 (same process, to its last sample):"
    );
    for (p, v) in g("/rss_growth_from_minute5")
        .as_object()
        .cloned()
        .unwrap_or_default()
    {
        let _ = writeln!(
            s,
            "  {p:<16} {:+.1} % ({:.0} s -> {} at {:.0} s)",
            v["pct"].as_f64().unwrap_or(0.0),
            v["from_s"].as_f64().unwrap_or(0.0),
            v["to"].as_str().unwrap_or(""),
            v["to_s"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(s, "\nfaults:");
    for f in g("/faults").as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            s,
            "  {:>7.1} s  {} ({} ms)",
            f["at_s"].as_f64().unwrap_or(0.0),
            f["what"].as_str().unwrap_or(""),
            f["took_ms"]
        );
    }
    if let Some(list) = g("/failures/unexpected_samples")
        .as_array()
        .filter(|l| !l.is_empty())
    {
        let _ = writeln!(s, "\nfirst unexpected failures (up to 2000 in the JSON):");
        for f in list.iter().take(20) {
            let _ = writeln!(s, "  {f}");
        }
    }
    s
}
