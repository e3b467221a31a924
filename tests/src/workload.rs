//! Driving the `testpod` program inside pods: servers, dial runs and long-lived sessions.

use crate::cluster::Cluster;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// One connection's outcome, as printed by `testpod dial`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DialResult {
    pub target: String,
    pub local: Option<String>,
    pub server_local: Option<String>,
    pub server_peer: Option<String>,
    pub echo_ok: bool,
    pub error: Option<String>,
    /// Milliseconds from the start of `connect` to the end, measured in the pod.
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl DialResult {
    /// The server's peer is not the client's own socket: a proxy connected on its behalf
    /// (it may use the client's IP, never its port).
    pub fn through_proxy(&self) -> bool {
        matches!((&self.local, &self.server_peer), (Some(l), Some(p)) if l != p)
    }

    /// Delivered by the destination's node proxy, which keeps the client's address: the
    /// server's peer is the client's IP with another port. (A proxy connecting from its own
    /// address, or a direct connection, is not this.)
    pub fn kept_client_address(&self) -> bool {
        let ip = |a: &str| a.parse::<std::net::SocketAddr>().ok().map(|s| s.ip());
        self.through_proxy()
            && matches!((&self.local, &self.server_peer), (Some(l), Some(p)) if ip(l).is_some() && ip(l) == ip(p))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DialReport {
    pub results: Vec<DialResult>,
}

/// The `local=` and `peer=` fields of a `HELLO local=.. peer=..` line.
pub fn parse_hello(line: &str) -> Option<(String, String)> {
    let mut local = None;
    let mut peer = None;
    for f in line.split_whitespace() {
        if let Some(v) = f.strip_prefix("local=") {
            local = Some(v.to_string());
        } else if let Some(v) = f.strip_prefix("peer=") {
            peer = Some(v.to_string());
        }
    }
    Some((local?, peer?))
}

/// Read lines from a child's stdout on a thread, so reads can time out.
struct LineReader {
    rx: mpsc::Receiver<String>,
}

impl LineReader {
    fn new(out: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { rx }
    }

    fn next(&self, timeout: Duration) -> Result<String> {
        self.rx
            .recv_timeout(timeout)
            .map_err(|e| anyhow::anyhow!("no output line within {timeout:?}: {e}"))
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// A `testpod serve` process; killed on drop.
pub struct Server {
    child: Child,
    pub pod: String,
}

impl Server {
    /// Start `testpod serve --port ..` in `pod` and wait for `serving`.
    pub fn start(cluster: &Cluster, testpod: &Path, pod: &str, ports: &[u16]) -> Result<Server> {
        let mut cmd = cluster.pod_command(pod, testpod)?;
        cmd.arg("serve");
        for p in ports {
            cmd.arg("--port").arg(p.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting testpod serve in {pod}"))?;
        let out = child.stdout.take().context("server stdout")?;
        let lines = LineReader::new(out);
        match lines.next(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "serving" => Ok(Server {
                child,
                pod: pod.to_string(),
            }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("testpod serve in {pod} did not start: {other:?}")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `testpod dial` from `pod` and parse its report.
pub fn dial(
    cluster: &Cluster,
    testpod: &Path,
    pod: &str,
    targets: &[String],
    conns: usize,
    concurrency: usize,
    hold_ms: u64,
) -> Result<Vec<DialResult>> {
    let mut cmd = cluster.pod_command(pod, testpod)?;
    cmd.arg("dial");
    for t in targets {
        cmd.arg("--to").arg(t);
    }
    cmd.args(["--conns", &conns.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--hold-ms", &hold_ms.to_string()]);
    let out = cmd
        .output()
        .with_context(|| format!("running testpod dial in {pod}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "testpod dial in {pod} printed no report ({}); stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let report: DialReport =
        serde_json::from_str(line).with_context(|| format!("parsing dial report {line}"))?;
    Ok(report.results)
}

/// One connection kept open by `testpod session`, driven through pipes.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: LineReader,
    /// The server's `HELLO local=.. peer=..` line.
    pub hello: String,
    pub server_local: String,
    pub server_peer: String,
    /// The client socket's own address (`client=`, added by `testpod session`).
    pub client_local: String,
}

impl Session {
    /// Connect from `pod` to `target` and read the server's HELLO.
    pub fn open(cluster: &Cluster, testpod: &Path, pod: &str, target: &str) -> Result<Session> {
        let mut cmd = cluster.pod_command(pod, testpod)?;
        cmd.args(["session", "--to", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting testpod session in {pod}"))?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().context("session stdout")?;
        let lines = LineReader::new(out);
        let hello = match lines.next(Duration::from_secs(10)) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "session {pod} -> {target}: {e}; stderr: {}",
                    stderr_of(&mut child)
                );
            }
        };
        let (server_local, server_peer) =
            parse_hello(&hello).with_context(|| format!("bad HELLO line {hello:?}"))?;
        let client_local = hello
            .split_whitespace()
            .find_map(|f| f.strip_prefix("client="))
            .unwrap_or_default()
            .to_string();
        Ok(Session {
            child,
            stdin,
            lines,
            hello,
            client_local,
            server_local,
            server_peer,
        })
    }

    /// The server's peer is not the client's own socket: a proxy connected on its behalf
    /// (it may use the client's IP, never its port).
    pub fn through_proxy(&self) -> bool {
        !self.client_local.is_empty() && self.server_peer != self.client_local
    }

    /// Send one line and return the echo (5 s timeout).
    pub fn echo(&mut self, line: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("session already closed")?;
        writeln!(stdin, "{line}").context("writing to session")?;
        stdin.flush().context("flushing session")?;
        self.lines
            .next(Duration::from_secs(5))
            .with_context(|| format!("echo of {line:?}"))
    }

    /// Close stdin and wait for a clean exit.
    pub fn close(mut self) -> Result<()> {
        self.stdin = None;
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().context("waiting for session")? {
                if !st.success() {
                    bail!("session exited {st}: {}", stderr_of(&mut self.child));
                }
                return Ok(());
            }
            if std::time::Instant::now() > end {
                bail!("session did not exit within 10 s after stdin closed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `mesh-node` binary for tests: `$SIDENODE_MESH_NODE` or `<workspace>/target/debug/mesh-node`
/// (also honouring `$CARGO_TARGET_DIR`).
pub fn mesh_node_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SIDENODE_MESH_NODE") {
        return PathBuf::from(p);
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    target.join("debug").join("mesh-node")
}
