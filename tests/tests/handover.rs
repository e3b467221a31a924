//! End-to-end tests of the node proxy's hitless upgrade (docs/operations.md): a new proxy
//! started beside the running one with `--takeover` takes its listening sockets over
//! (`mesh-node/src/proxy/handover.rs`), the old one drains and exits. Meanwhile pods keep
//! opening connections, pod to pod across nodes and on one node: none may be refused or fail;
//! sessions opened before the hand-over keep echoing verified data and close cleanly. Also:
//! SIGTERM without a successor drains. Mesh mode (controller, HBONE over HTTP/2), file config.
//! Run as root: `cargo build -p mesh-node && cargo test -p sidenode-tests --test handover`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::workload::{DialReport, DialResult, Server, Session, dial};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Serves 9080 on node 2.
const SERVER2: &str = "node2-pod1";
const SERVER2_ADDR: &str = "198.19.2.2:9080";
/// Serves 9080 on node 1.
const SERVER1: &str = "node1-pod2";
const SERVER1_ADDR: &str = "198.19.1.3:9080";
/// Clients.
const CLIENT1: &str = "node1-pod1";
const CLIENT2: &str = "node2-pod2";
/// Long enough for every session of a round to finish well inside it.
const DRAIN: &str = "20s";
const DRAIN_SECS: u64 = 20;

/// A `testpod dial` run repeated until told to stop, from one pod to some targets.
struct DialLoop {
    name: String,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Vec<DialResult>>>,
}

impl DialLoop {
    fn start(c: &sidenode_tests::cluster::Cluster, pod: &str, targets: &[&str]) -> Result<Self> {
        let mut cmd: Command = c.pod_command(pod, testpod())?;
        cmd.arg("dial");
        for t in targets {
            cmd.args(["--to", t]);
        }
        // Small runs back to back: a steady stream of new connections, a few at a time.
        cmd.args(["--conns", "20", "--concurrency", "2", "--hold-ms", "0"]);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = format!("{pod} -> {}", targets.join(","));
        let who = name.clone();
        let handle = std::thread::spawn(move || -> Result<Vec<DialResult>> {
            let mut all = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let out = cmd
                    .output()
                    .with_context(|| format!("running dial {who}"))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with('{'))
                    .with_context(|| {
                        format!(
                            "dial {who} printed no report ({}): {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr)
                        )
                    })?;
                let report: DialReport = serde_json::from_str(line)
                    .with_context(|| format!("parsing dial report {line}"))?;
                all.extend(report.results);
            }
            Ok(all)
        });
        Ok(DialLoop { name, stop, handle })
    }

    /// Stops the loop; every connection it made (none may have failed).
    fn finish(self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let results = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("dial loop {} panicked", self.name))??;
        let failed: Vec<&DialResult> = results
            .iter()
            .filter(|r| r.error.is_some() || !r.echo_ok || !r.through_proxy())
            .collect();
        if !failed.is_empty() {
            bail!(
                "{}: {} of {} connections failed, e.g. {:?}",
                self.name,
                failed.len(),
                results.len(),
                &failed[..failed.len().min(5)]
            );
        }
        Ok(results.len())
    }
}

/// Waits (10 s) until new connections `from` → `to` go through the proxies and echo.
fn wait_through_proxy(c: &sidenode_tests::cluster::Cluster, from: &str, to: &str) -> Result<()> {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let r = dial_one(c, from, to)?;
        let good = r.error.is_none() && r.echo_ok && r.through_proxy();
        last = Some(r);
        Ok(good)
    })?;
    ensure!(ok, "{from} -> {to} not through the proxies: {last:?}");
    Ok(())
}

/// Sends a random line through the session and checks the echo.
fn verified_echo(s: &mut Session, bytes: usize) -> Result<()> {
    let line = random_hex(bytes)?;
    let back = s.echo(&line)?;
    ensure!(
        back == line,
        "echo differs: sent {} bytes, got {} bytes",
        line.len(),
        back.len()
    );
    Ok(())
}

/// Hands `node`'s proxy over to a new one (`--takeover`) while sessions echo: waits for the
/// new one to say it took over, checks the sessions still move data, closes them, and waits
/// for the old proxy to exit (successfully, within the drain time).
fn hand_over(
    c: &mut sidenode_tests::cluster::Cluster,
    node: &str,
    sessions: Vec<Session>,
) -> Result<()> {
    let mut sessions = sessions;
    for s in &mut sessions {
        verified_echo(s, 2048).context("echo before the hand-over")?;
    }
    let offset = c.log_len(node, "proxy");
    let started = Instant::now();
    let old = c.start_successor_proxy(node, &["--takeover"])?;
    c.wait_for_log_after(
        node,
        "proxy",
        offset,
        &format!("from_pid={old}"),
        Duration::from_secs(30),
    )
    .context("the new proxy did not take over")?;
    c.wait_for_log_after(
        node,
        "proxy",
        offset,
        "proxy ready",
        Duration::from_secs(30),
    )?;
    eprintln!(
        "{node}: hand-over from pid {old} done after {:?}",
        started.elapsed()
    );
    // Established connections go on through the old (draining) proxy.
    for round in 0..5 {
        for s in &mut sessions {
            verified_echo(s, 4096).with_context(|| format!("echo {round} after the hand-over"))?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in sessions {
        s.close().context("closing a session after the hand-over")?;
    }
    let (status, waited) = c.wait_old_proxy_exit(node, Duration::from_secs(DRAIN_SECS + 5))?;
    ensure!(status.success(), "{node}: the old proxy exited {status}");
    eprintln!("{node}: old proxy exited {waited:?} after its sessions closed");
    ensure!(
        waited < Duration::from_secs(DRAIN_SECS),
        "{node}: the old proxy took {waited:?} to exit although its connections had closed"
    );
    Ok(())
}

#[test]
fn hand_over_refuses_nothing_and_keeps_connections() -> Result<()> {
    let _serial = serial();
    let mut c = mesh_cluster_with_proxy_args(3, &["--drain-timeout", DRAIN])?;
    let _s2 = Server::start(&c, &testpod(), SERVER2, &[9080])?;
    let _s1 = Server::start(&c, &testpod(), SERVER1, &[9080])?;
    for p in [SERVER1, SERVER2] {
        wait_hbone_listener(&c, p)?;
    }
    // Captured and meshed before the load starts.
    for (from, to) in [
        (CLIENT1, SERVER2_ADDR),
        (CLIENT1, SERVER1_ADDR),
        (CLIENT2, SERVER1_ADDR),
        (CLIENT2, SERVER2_ADDR),
    ] {
        wait_through_proxy(&c, from, to)?;
    }
    let loops = vec![
        // Across nodes, both ways, and on one node (node 2's pod to node 2's server).
        DialLoop::start(&c, CLIENT1, &[SERVER2_ADDR])?,
        DialLoop::start(&c, CLIENT2, &[SERVER1_ADDR, SERVER2_ADDR])?,
    ];
    std::thread::sleep(Duration::from_secs(1));

    let result = (|| -> Result<()> {
        // Node 2 (the destination of most tunnels), then node 1, then node 2 again: the
        // proxy that took over hands over in its turn.
        for node in ["node2", "node1", "node2"] {
            let sessions = vec![
                Session::open(&c, &testpod(), CLIENT1, SERVER2_ADDR)?,
                Session::open(&c, &testpod(), CLIENT1, SERVER1_ADDR)?,
                Session::open(&c, &testpod(), CLIENT2, SERVER2_ADDR)?,
            ];
            for s in &sessions {
                ensure!(s.through_proxy(), "session not captured: {}", s.hello);
            }
            hand_over(&mut c, node, sessions)?;
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    })();
    let mut total = 0;
    let mut failures = Vec::new();
    for l in loops {
        match l.finish() {
            Ok(n) => total += n,
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    result?;
    if !failures.is_empty() {
        bail!(
            "connections failed during the hand-overs: {}",
            failures.join("; ")
        );
    }
    eprintln!("{total} connections during three hand-overs, none failed");
    ensure!(total >= 100, "only {total} connections were attempted");

    // The new proxies serve on their own, and say what they did.
    for (from, to) in [
        (CLIENT1, SERVER2_ADDR),
        (CLIENT2, SERVER1_ADDR),
        (CLIENT2, SERVER2_ADDR),
    ] {
        let r = dial_one(&c, from, to)?;
        ensure!(
            r.error.is_none() && r.echo_ok && r.through_proxy(),
            "{from} -> {to} after the hand-overs: {r:?}"
        );
    }
    let m = proxy_metrics(&c, "node2")?;
    ensure!(
        metric_value(&m, "sidenode_proxy_handovers_total", &[("role", "taken")]) == 1.0,
        "node2's proxy does not count its hand-over: {m}"
    );
    Ok(())
}

#[test]
fn sigterm_stops_listening_and_drains_open_connections() -> Result<()> {
    let _serial = serial();
    let mut c = mesh_cluster_with_proxy_args(3, &["--drain-timeout", DRAIN])?;
    let _s2 = Server::start(&c, &testpod(), SERVER2, &[9080])?;
    wait_hbone_listener(&c, SERVER2)?;
    wait_through_proxy(&c, CLIENT1, SERVER2_ADDR)?;
    let mut s = Session::open(&c, &testpod(), CLIENT1, SERVER2_ADDR)?;
    ensure!(s.through_proxy(), "session not captured: {}", s.hello);
    verified_echo(&mut s, 1024)?;
    let offset = c.log_len("node2", "proxy");
    let pid = c.pid("node2", "proxy").context("node2's proxy")?;
    // SAFETY: kill has no memory preconditions; the pid is our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    c.wait_for_log_after(
        "node2",
        "proxy",
        offset,
        "proxy draining",
        Duration::from_secs(5),
    )?;
    // New tunnels to node 2's pod find no listener: the connection fails (it is not
    // delivered by anyone else)...
    let r = dial(
        &c,
        &testpod(),
        CLIENT1,
        &[SERVER2_ADDR.to_string()],
        1,
        1,
        0,
    )?;
    let r = r.first().context("no dial result")?;
    eprintln!("new connection while draining: {r:?}");
    if std::env::var_os("HANDOVER_DEBUG").is_some() {
        eprintln!("{}", std::fs::read_to_string(c.log_path("node1", "proxy"))?);
        eprintln!("{}", std::fs::read_to_string(c.log_path("node2", "proxy"))?);
    }
    ensure!(
        r.error.is_some() || !r.echo_ok,
        "a new connection was served by a draining proxy: {r:?}"
    );
    // Refused at once (the listener is closed), not left in a queue nobody serves.
    ensure!(
        r.elapsed_ms < 3000,
        "the refused connection hung for {} ms instead of being reset",
        r.elapsed_ms
    );
    // ...while the open one goes on until it closes.
    for _ in 0..5 {
        verified_echo(&mut s, 4096).context("echo while draining")?;
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        c.is_alive("node2", "proxy"),
        "the proxy exited before its connection closed"
    );
    let closed = Instant::now();
    s.close()?;
    c.wait_for_log_after(
        "node2",
        "proxy",
        offset,
        "proxy exiting",
        Duration::from_secs(DRAIN_SECS),
    )?;
    let waited = closed.elapsed();
    ensure!(
        waited < Duration::from_secs(DRAIN_SECS),
        "the proxy took {waited:?} to exit after its last connection closed"
    );
    let log = std::fs::read_to_string(c.log_path("node2", "proxy"))?;
    ensure!(
        log.contains("drained: every connection finished"),
        "the proxy did not drain cleanly"
    );
    Ok(())
}

/// HBONE over QUIC across a hand-over (docs/operations.md, "What happens to QUIC"): the old
/// proxy keeps its UDP sockets and QUIC connections through its drain, then closes them; the
/// new one binds UDP 15008 once it is free and serves QUIC again. New connections meanwhile
/// must not fail (a QUIC dial unanswered in the gap falls back to HTTP/2).
#[test]
fn quic_tunnels_survive_a_hand_over() -> Result<()> {
    let _serial = serial();
    let mut c = mesh_cluster_with_proxy_args(3, &["--drain-timeout", "5s"])?;
    let _s2 = Server::start(&c, &testpod(), SERVER2, &[9080])?;
    wait_hbone_listener(&c, SERVER2)?;
    wait_through_proxy(&c, CLIENT1, SERVER2_ADDR)?;
    let offset = c.log_len("node2", "proxy");
    c.write_config_file(
        "meshconfig.yaml",
        "apiVersion: sidenode.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\n\
         spec:\n  tunnelProtocol: quic\n",
    )?;
    let quic = wait_until(Duration::from_secs(20), || {
        wait_through_proxy(&c, CLIENT2, SERVER1_ADDR).ok();
        dial_one(&c, CLIENT1, SERVER2_ADDR)?;
        let log = std::fs::read_to_string(c.log_path("node2", "proxy"))?;
        Ok(log[offset as usize..].contains("HBONE/QUIC connection accepted"))
    })?;
    ensure!(quic, "node2 never accepted a QUIC connection");
    let dials = DialLoop::start(&c, CLIENT1, &[SERVER2_ADDR])?;
    std::thread::sleep(Duration::from_secs(1));
    let result = (|| -> Result<()> {
        let offset = c.log_len("node2", "proxy");
        let old = c.start_successor_proxy("node2", &["--takeover"])?;
        c.wait_for_log_after(
            "node2",
            "proxy",
            offset,
            &format!("from_pid={old}"),
            Duration::from_secs(30),
        )?;
        // QUIC keeps the old proxy for its whole drain (peers keep their pooled QUIC
        // connections to it): it exits at the deadline.
        let (status, waited) = c.wait_old_proxy_exit("node2", Duration::from_secs(15))?;
        ensure!(status.success(), "the old proxy exited {status}");
        eprintln!("old proxy exited {waited:?} after the hand-over");
        let after = c.log_len("node2", "proxy");
        c.wait_for_log_after(
            "node2",
            "proxy",
            offset,
            "HBONE/QUIC listener open pod=mesh/node2-pod1 addr=Some(198.19.2.2:15008)",
            Duration::from_secs(10),
        )?;
        // The new proxy serves QUIC again (after the fallback period of the clients that
        // fell back, or at once for those that did not).
        let back = wait_until(Duration::from_secs(5), || {
            let log = std::fs::read_to_string(c.log_path("node2", "proxy"))?;
            Ok(log[after as usize..].contains("HBONE/QUIC connection accepted"))
        })?;
        eprintln!("new QUIC connections to the new proxy within 5 s: {back}");
        Ok(())
    })();
    let total = dials.finish();
    if total.is_err() {
        let log = std::fs::read_to_string(c.log_path("node1", "proxy"))?;
        for l in log.lines().filter(|l| l.contains("WARN")).take(8) {
            eprintln!("node1: {l}");
        }
    }
    result?;
    let total = total?;
    eprintln!("{total} connections over QUIC across the hand-over, none failed");
    ensure!(total >= 50, "only {total} connections were attempted");
    Ok(())
}
