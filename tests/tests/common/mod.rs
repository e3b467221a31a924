//! Shared helpers for the e2e tests.
#![allow(dead_code)]

pub mod tcpdump;
use anyhow::{Context, Result, bail};
use sidenode_tests::cluster::{Cluster, ClusterOpts, TestCluster, unique_prefix};
use sidenode_tests::workload::{DialResult, dial, mesh_node_path};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
#[allow(unused_imports)]
pub use tcpdump::{Capture, contains};

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the sidenode e2e tests need root (network namespaces, cgroups, bpffs, eBPF); run them as root"
    );
}

pub fn testpod() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_testpod"))
}

/// A 2-node cluster with `pods` pods per node and agents running, torn down on drop.
pub fn cluster(pods: usize) -> Result<TestCluster> {
    cluster_with(pods, Vec::new())
}

/// As [`cluster`], with extra agent arguments.
pub fn cluster_with(pods: usize, agent_args: Vec<String>) -> Result<TestCluster> {
    up('t', pods, |o| o.agent_args = agent_args)
}

/// A 2-node cluster with agents running and a unique prefix starting with `first`; `tune`
/// adjusts the options. Torn down on drop.
fn up(first: char, pods: usize, tune: impl FnOnce(&mut ClusterOpts)) -> Result<TestCluster> {
    require_root();
    let mesh_node = mesh_node_path();
    if !mesh_node.exists() {
        bail!(
            "{} not found: build mesh-node (`cargo build -p mesh-node`) or set SIDENODE_MESH_NODE",
            mesh_node.display()
        );
    }
    let mut opts = ClusterOpts {
        prefix: unique_prefix(first),
        nodes: 2,
        pods,
        mesh_node,
        start_agents: true,
        ..Default::default()
    };
    tune(&mut opts);
    TestCluster::up(opts)
}

/// The IP part of `ip:port`.
pub fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(addr)
}

/// Poll `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
    let end = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(true);
        }
        if Instant::now() > end {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `(namespace, pod)` of every enrolled workload in a node's maps.
pub fn enrolled(c: &Cluster, node: &str) -> Result<BTreeSet<(String, String)>> {
    let v = c.maps_json(node)?;
    let list = v["enrolled"]
        .as_array()
        .with_context(|| format!("maps --json has no enrolled array: {v}"))?;
    Ok(list
        .iter()
        .map(|e| {
            (
                e["namespace"].as_str().unwrap_or_default().to_string(),
                e["pod"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Wait (10 s) until `pod` in `ns` shows up in the node's enrolled set.
pub fn wait_enrolled(c: &Cluster, node: &str, ns: &str, pod: &str) -> Result<()> {
    let key = (ns.to_string(), pod.to_string());
    let mut last = BTreeSet::new();
    let ok = wait_until(Duration::from_secs(10), || {
        last = enrolled(c, node).unwrap_or_default();
        Ok(last.contains(&key))
    })?;
    if !ok {
        bail!("{ns}/{pod} not enrolled on {node} within 10 s; enrolled: {last:?}");
    }
    Ok(())
}

/// One connection from `pod` to `target`.
pub fn dial_one(c: &Cluster, pod: &str, target: &str) -> Result<DialResult> {
    let mut r = dial(c, &testpod(), pod, &[target.to_string()], 1, 1, 0)?;
    let one = r.pop().context("empty dial report")?;
    if !one.echo_ok {
        bail!("connection {pod} -> {target} failed: {one:?}");
    }
    Ok(one)
}

/// How one connection attempt that a test expects to either work or be refused ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The echo round trip worked.
    Echoed,
    /// Reset or closed by the peer (the client's proxy, which took the connection) before the
    /// server's HELLO, possibly before `connect` returned: the mesh refused it. Not a refused
    /// `connect` (nothing listening) nor a timeout.
    Refused,
    /// Reset or closed after the server's HELLO: a connection that was open when something
    /// changed (e.g. closed by a policy change), not a refusal of a new one.
    Closed,
}

/// testpod's read timeout (`READ_TIMEOUT` in `src/bin/testpod.rs`): a read that waited this
/// long is a hang.
const TESTPOD_READ_TIMEOUT_MS: u64 = 5000;

/// Did the peer reset or close the connection (rather than a read timeout, a refused
/// `connect`, an echo mismatch)? testpod reports an EOF before HELLO as
/// `unexpected greeting ""`; a reset that arrives while `connect` returns as
/// `connect: Connection reset by peer`. A read can also end in EAGAIN when the peer resets
/// (seen on this kernel for refused connections, within milliseconds): that counts only when
/// it came well before testpod's read timeout, which is what a hang ends in.
fn reset_or_eof(r: &DialResult) -> bool {
    let err = r.error.as_deref().unwrap_or_default();
    let early_eagain = err.starts_with("reading HELLO: Resource temporarily unavailable")
        && r.elapsed_ms < TESTPOD_READ_TIMEOUT_MS - 1000;
    early_eagain
        || err.contains("Connection reset by peer")
        || err.contains("Broken pipe")
        || err == "unexpected greeting \"\""
        || (err.starts_with("echo mismatch: sent") && err.ends_with("got \"\""))
}

/// Classifies one [`DialResult`]; anything that is neither an echo nor a reset/close by the
/// peer (a read timeout, i.e. a hang; a refused or timed-out `connect`; garbage) is an error,
/// so a harness or network fault never passes for a refusal.
pub fn outcome(r: &DialResult) -> Result<Outcome> {
    if r.echo_ok {
        return Ok(Outcome::Echoed);
    }
    if !reset_or_eof(r) {
        bail!(
            "connection to {} neither echoed nor was reset/closed by the peer: {r:?}",
            r.target
        );
    }
    Ok(if r.server_local.is_some() {
        Outcome::Closed
    } else {
        Outcome::Refused
    })
}

/// One connection `pod` → `target`, classified by [`outcome`].
pub fn try_connect(c: &Cluster, pod: &str, target: &str) -> Result<Outcome> {
    let r = dial(c, &testpod(), pod, &[target.to_string()], 1, 1, 0)?;
    outcome(r.first().context("empty dial report")?)
}

/// Was the connection captured, i.e. did the server see the client node's proxy address?
pub fn was_captured(c: &Cluster, client_pod: &str, r: &DialResult) -> Result<bool> {
    let node = &c.pod(client_pod)?.node;
    let proxy_ip = &c.node(node)?.ip;
    let pod_ip = &c.pod(client_pod)?.ip;
    let peer = r.server_peer.as_deref().context("no server_peer")?;
    if ip_of(peer) == proxy_ip {
        Ok(true)
    } else if ip_of(peer) == pod_ip {
        Ok(false)
    } else {
        bail!("server saw neither the pod {pod_ip} nor the proxy {proxy_ip}: {r:?}")
    }
}

/// Assert one new connection from `pod` to `target` is captured (or not).
pub fn expect_captured(c: &Cluster, pod: &str, target: &str, captured: bool) -> Result<()> {
    let r = dial_one(c, pod, target)?;
    if was_captured(c, pod, &r)? != captured {
        bail!(
            "connection {pod} -> {target} expected {}captured, got {r:?}",
            if captured { "" } else { "not " }
        );
    }
    if r.server_local.as_deref() != Some(target) {
        bail!("server_local is not the original destination {target}: {r:?}");
    }
    Ok(())
}

/// Within `timeout`, new connections from `pod` reach the state `captured`; returns how long
/// it took.
pub fn wait_captured(
    c: &Cluster,
    pod: &str,
    target: &str,
    captured: bool,
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = None;
    let ok = wait_until(timeout, || {
        let r = dial_one(c, pod, target)?;
        let got = was_captured(c, pod, &r)?;
        last = Some(r);
        Ok(got == captured)
    })?;
    if !ok {
        bail!(
            "new connections {pod} -> {target} not {}captured within {timeout:?}; last: {last:?}",
            if captured { "" } else { "un" }
        );
    }
    Ok(start.elapsed())
}

/// Wait for a log line (written after `offset`) containing every needle.
pub fn wait_log_all(
    c: &Cluster,
    node: &str,
    kind: &str,
    offset: u64,
    needles: &[&str],
    timeout: Duration,
) -> Result<String> {
    let path = c.log_path(node, kind);
    let mut found = None;
    wait_until(timeout, || {
        let bytes = std::fs::read(&path).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
        let text = String::from_utf8_lossy(&bytes[start..]);
        found = text
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string);
        Ok(found.is_some())
    })?;
    found.with_context(|| {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        format!(
            "no line with {needles:?} in {} within {timeout:?}; last lines:\n{}",
            path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

/// A 2-node cluster in mesh mode (controller, HBONE), `pods` pods per node, torn down on drop.
pub fn mesh_cluster(pods: usize, cert_ttl: Option<&str>) -> Result<TestCluster> {
    up('m', pods, |o| {
        o.mesh = true;
        o.cert_ttl = cert_ttl.map(str::to_string);
    })
}

/// A mesh-mode cluster whose proxies get `proxy_args` too (e.g. `--log-format json`).
pub fn mesh_cluster_with_proxy_args(pods: usize, proxy_args: &[&str]) -> Result<TestCluster> {
    up('m', pods, |o| {
        o.mesh = true;
        o.proxy_args = proxy_args.iter().map(|a| a.to_string()).collect();
    })
}

/// A mesh-mode cluster whose agents get `agent_args` too (e.g. `--splice`).
pub fn mesh_cluster_with_agent_args(pods: usize, agent_args: &[&str]) -> Result<TestCluster> {
    up('m', pods, |o| {
        o.mesh = true;
        o.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    })
}

/// A mesh-mode cluster with the ingress gateway (`mesh-node gateway` in its own namespace,
/// ready) and the outside namespace (`Cluster::curl_outside`, `Cluster::run_outside`);
/// `gateway_args` go to the gateway. Gateway objects and TLS Secrets
/// (`Cluster::write_tls_secret`, `sidenode_tests::tls::TestCa`) are written into the config
/// folder with `Cluster::write_config_file` and take effect live.
pub fn gateway_cluster(pods: usize, gateway_args: &[&str]) -> Result<TestCluster> {
    up('w', pods, |o| {
        o.mesh = true;
        o.gateway = true;
        o.gateway_args = gateway_args.iter().map(|a| a.to_string()).collect();
    })
}

/// Wait (10 s) until the pod's node proxy has opened the pod's HBONE listener.
pub fn wait_hbone_listener(c: &Cluster, pod: &str) -> Result<()> {
    let p = c.pod(pod)?;
    wait_log_all(
        c,
        &p.node,
        "proxy",
        0,
        &[
            "HBONE listener open",
            &format!("pod={}/{pod}", p.namespace),
            &format!("addr={}:15008", p.ip),
        ],
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// Hex of `n` random bytes.
pub fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The text of the node proxy's metrics page (`curl` from inside the node's netns).
pub fn proxy_metrics(c: &Cluster, node: &str) -> Result<String> {
    let ip = c.node(node)?.ip.clone();
    let out = c
        .node_command(node, "curl")?
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{ip}:15020/metrics"))
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl http://{ip}:15020/metrics failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the sample `name{...}` whose labels include every `k="v"` of `labels`;
/// 0 when there is no such sample (counters appear on first increment).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (lbls, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            labels
                .iter()
                .all(|(k, v)| {
                    lbls.split(',')
                        .any(|kv| kv.trim() == format!("{k}=\"{v}\""))
                })
                .then(|| value.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

/// One cluster at a time within a test binary: each runs a controller, two agents and two
/// proxies, and the machine has two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rewrites every node's pod file with extra labels per pod.
pub fn label_pods(c: &Cluster, labels: &[(&str, &[(&str, &str)])]) -> Result<()> {
    let labels: std::collections::BTreeMap<&str, &[(&str, &str)]> =
        labels.iter().copied().collect();
    for node in c.node_names() {
        let docs: Vec<String> = c
            .pod_objects(&node)
            .into_iter()
            .map(|mut p| {
                if let Some(extra) = labels.get(p.name.as_str()) {
                    for (k, v) in *extra {
                        p.labels.insert(k.to_string(), v.to_string());
                    }
                }
                p.to_yaml()
            })
            .collect();
        c.write_config_file(&format!("{node}.yaml"), &docs.join("---\n"))?;
    }
    Ok(())
}

/// A `testpod http-serve` process on port 9080 in `pod` (answering with `name`); killed on
/// drop.
pub struct HttpServer {
    child: std::process::Child,
}

impl HttpServer {
    pub fn start(c: &Cluster, pod: &str, name: &str, extra: &[&str]) -> Result<HttpServer> {
        let mut args = vec!["http-serve", "--port", "9080", "--name", name];
        args.extend_from_slice(extra);
        Self::spawn(c, pod, &args)
    }

    /// Any `testpod` server mode started with `args`; ready once it prints `serving`.
    pub fn spawn(c: &Cluster, pod: &str, args: &[&str]) -> Result<HttpServer> {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut cmd = c.pod_command(pod, testpod())?;
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting testpod")?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "serving" => Ok(HttpServer { child }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("testpod {args:?} in {pod} did not start: {other:?}")
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `testpod http-get`'s report (one JSON line).
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
pub struct HttpReport {
    pub count: usize,
    pub statuses: std::collections::BTreeMap<String, usize>,
    pub bodies: std::collections::BTreeMap<String, usize>,
    pub peers: std::collections::BTreeMap<String, usize>,
    pub errors: usize,
    pub first_error: Option<String>,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub connections: usize,
}

#[allow(dead_code)]
impl HttpReport {
    pub fn status(&self, s: &str) -> usize {
        self.statuses.get(s).copied().unwrap_or(0)
    }
    pub fn body(&self, b: &str) -> usize {
        self.bodies.get(b).copied().unwrap_or(0)
    }
}

/// `n` requests `method path` with `headers` (`K:V`) from `pod` to `url`, on one keep-alive
/// connection (`testpod http-get`).
#[allow(dead_code)]
pub fn http_get(
    c: &Cluster,
    pod: &str,
    url: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    n: usize,
) -> Result<HttpReport> {
    let mut cmd = c.pod_command(pod, testpod())?;
    cmd.args(["http-get", "--url", url, "--count", &n.to_string()])
        .args(["--method", method, "--path", path]);
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().context("running testpod http-get")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "http-get printed no report ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    serde_json::from_str(line).with_context(|| format!("parsing {line}"))
}
