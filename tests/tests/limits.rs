//! Resource limits that hold under attack, end to end on the simulated cluster (issue 17,
//! "bounded resources"):
//!
//! - concurrent connection limits of the node proxy: per source pod and per proxy for captured
//!   (outbound) connections, per peer identity for inbound tunnels — over a limit a new
//!   connection is refused at once (reset, or `503` to the `CONNECT`) and counted in
//!   `sidenode_connections_refused_total`; the others keep working and a place freed is
//!   taken again;
//! - a full original-destination map (`SN_ORIG_DST`, made tiny with the agent's
//!   `--orig-dst-max`): connections whose entry was evicted before the proxy read it are
//!   closed by the proxy and counted (`reason="no_orig_dst"`), never sent anywhere else; once
//!   entries are freed new connections work again.
//!
//! Run as root: `cargo build -p mesh-node && cargo test -p sidenode-tests --test limits`. The
//! tests take turns (`serial()`).

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{ClusterOpts, TestCluster, unique_prefix};
use sidenode_tests::openssl::run_ok;
use sidenode_tests::workload::{DialReport, Server, Session, mesh_node_path};
use std::process::Stdio;
use std::time::{Duration, Instant};

const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const TARGET2: &str = "198.19.2.2:8081";
const REFUSED: &str = "sidenode_connections_refused_total";

/// A 2-node cluster, 3 pods a node (pod1 and pod2 enrolled), with extra agent and proxy
/// arguments.
fn limited_cluster(mesh: bool, agent_args: &[&str], proxy_args: &[&str]) -> Result<TestCluster> {
    require_root();
    let mesh_node = mesh_node_path();
    if !mesh_node.exists() {
        bail!(
            "{} not found: build mesh-node (`cargo build -p mesh-node`)",
            mesh_node.display()
        );
    }
    TestCluster::up(ClusterOpts {
        prefix: unique_prefix('l'),
        nodes: 2,
        pods: 3,
        mesh_node,
        start_agents: true,
        mesh,
        agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        proxy_args: proxy_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
}

fn refused_count(c: &TestCluster, node: &str, direction: &str, reason: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, node)?,
        REFUSED,
        &[("direction", direction), ("reason", reason)],
    ))
}

/// A connection that must be refused: reset or closed by the proxy before the server's HELLO,
/// promptly (never queued).
fn expect_refused(c: &TestCluster, pod: &str, target: &str) -> Result<()> {
    let started = Instant::now();
    let got = try_connect(c, pod, target)?;
    let took = started.elapsed();
    ensure!(
        got == Outcome::Refused,
        "{pod} -> {target}: expected a refusal, got {got:?}"
    );
    ensure!(
        took < Duration::from_secs(3),
        "{pod} -> {target}: the refusal took {took:?} (queued?)"
    );
    Ok(())
}

fn open_sessions(c: &TestCluster, pod: &str, n: usize) -> Result<Vec<Session>> {
    (0..n)
        .map(|i| {
            let mut s = Session::open(c, &testpod(), pod, TARGET)
                .with_context(|| format!("session {i} from {pod}"))?;
            ensure!(s.through_proxy(), "session {i} from {pod} not captured");
            ensure!(s.echo("hi")? == "hi", "session {i} from {pod}: echo");
            Ok(s)
        })
        .collect()
}

#[test]
fn outbound_connection_limits_per_workload_and_per_proxy() -> Result<()> {
    let _turn = serial();
    let c = limited_cluster(
        false,
        &[],
        &[
            "--max-connections",
            "5",
            "--max-connections-per-workload",
            "3",
        ],
    )?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod2")?;

    // pod1 holds its 3; a 4th is refused at once and counted.
    let mut pod1 = open_sessions(&c, "node1-pod1", 3)?;
    let before = refused_count(&c, "node1", "outbound", "source_limit")?;
    expect_refused(&c, "node1-pod1", TARGET)?;
    let after = refused_count(&c, "node1", "outbound", "source_limit")?;
    ensure!(
        after >= before + 1.0,
        "{REFUSED}{{reason=\"source_limit\"}} went {before} -> {after}"
    );

    // Another pod is not held back by pod1: 2 more fill the proxy's 5 ...
    let pod2 = open_sessions(&c, "node1-pod2", 2)?;
    // ... and past them the proxy-wide limit refuses pod2 too.
    let before = refused_count(&c, "node1", "outbound", "proxy_limit")?;
    expect_refused(&c, "node1-pod2", TARGET)?;
    let after = refused_count(&c, "node1", "outbound", "proxy_limit")?;
    ensure!(
        after >= before + 1.0,
        "{REFUSED}{{reason=\"proxy_limit\"}} went {before} -> {after}"
    );

    // The held connections were untouched.
    for (i, s) in pod1.iter_mut().enumerate() {
        ensure!(
            s.echo("still")? == "still",
            "pod1 session {i} broke at the limit"
        );
    }
    // A place freed is taken again.
    pod1.pop().context("a pod1 session")?.close()?;
    let ok = wait_until(Duration::from_secs(5), || {
        Ok(try_connect(&c, "node1-pod1", TARGET)? == Outcome::Echoed)
    })?;
    ensure!(
        ok,
        "pod1 could not connect after one of its connections closed"
    );
    for s in pod1.into_iter().chain(pod2) {
        s.close()?;
    }
    // Not enrolled pods (never captured) never count.
    expect_captured(&c, "node1-pod3", TARGET, false)?;
    Ok(())
}

#[test]
fn inbound_tunnel_limit_per_identity_answers_503_and_recovers() -> Result<()> {
    let _turn = serial();
    let c = limited_cluster(true, &[], &["--max-inbound-tunnels-per-identity", "2"])?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;

    let mut held = open_sessions(&c, "node1-pod1", 2)?;
    let before = refused_count(&c, "node2", "inbound", "source_limit")?;
    expect_refused(&c, "node1-pod1", TARGET)?;
    let after = refused_count(&c, "node2", "inbound", "source_limit")?;
    ensure!(
        after >= before + 1.0,
        "node2 {REFUSED}{{direction=\"inbound\",reason=\"source_limit\"}} went {before} -> {after}"
    );
    for s in held.iter_mut() {
        ensure!(s.echo("still")? == "still", "a held tunnel broke");
    }
    held.pop().context("a session")?.close()?;
    let ok = wait_until(Duration::from_secs(5), || {
        Ok(try_connect(&c, "node1-pod1", TARGET)? == Outcome::Echoed)
    })?;
    ensure!(ok, "no new tunnel after one closed");
    for s in held {
        s.close()?;
    }
    Ok(())
}

fn signal(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) on a pid this test's cluster started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    ensure!(
        rc == 0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[test]
fn full_orig_dst_map_refuses_cleanly_never_misroutes() -> Result<()> {
    let _turn = serial();
    const MAP: usize = 8;
    const CONNS: usize = 40;
    let c = limited_cluster(false, &["--orig-dst-max", &MAP.to_string()], &[])?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080, 8081])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    let v = c.maps_json("node1")?;
    ensure!(v["orig_dst"].is_array(), "maps --json: no orig_dst: {v}");

    // A connection the proxy already took: its entry may be evicted, it keeps working.
    let mut early = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(early.through_proxy(), "first session not captured");

    // The proxy stops reading for a moment; CONNS connections are established by the kernel
    // meanwhile, so the 8-entry map overflows with entries the proxy has not read yet.
    let pid = c.pid("node1", "proxy").context("node1's proxy pid")?;
    let before = refused_count(&c, "node1", "outbound", "no_orig_dst")?;
    signal(pid, libc::SIGSTOP)?;
    let dial = c
        .pod_command("node1-pod1", testpod())?
        .args(["dial", "--to", TARGET, "--to", TARGET2])
        .args(["--conns", &CONNS.to_string()])
        .args(["--concurrency", &CONNS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid, libc::SIGCONT)?;
    let out = dial
        .context("starting testpod dial")?
        .wait_with_output()
        .context("testpod dial")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "no dial report; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let report: DialReport = serde_json::from_str(line)?;
    ensure!(report.results.len() == CONNS, "dial report: {line}");
    let (mut echoed, mut refused) = (0, 0);
    for r in &report.results {
        match outcome(r)? {
            Outcome::Echoed => {
                // Never mis-routed: each reached the destination it dialled.
                ensure!(
                    r.server_local.as_deref() == Some(r.target.as_str()),
                    "connection to {} reached {:?}",
                    r.target,
                    r.server_local
                );
                echoed += 1;
            }
            Outcome::Refused => refused += 1,
            Outcome::Closed => bail!("a connection was closed after its HELLO: {r:?}"),
        }
    }
    eprintln!("{CONNS} connections into a {MAP}-entry map: {echoed} echoed, {refused} refused");
    ensure!(
        refused >= CONNS - MAP - 1,
        "{refused} refused: the map holds {MAP} entries, so at least {} had theirs evicted",
        CONNS - MAP - 1
    );
    let after = refused_count(&c, "node1", "outbound", "no_orig_dst")?;
    ensure!(
        after - before == refused as f64,
        "{REFUSED}{{reason=\"no_orig_dst\"}} went {before} -> {after} for {refused} refused"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        0,
        &["no original destination recorded for this connection"],
        Duration::from_secs(5),
    )?;
    // The connection taken before the overflow still works.
    ensure!(early.echo("after")? == "after", "the early session broke");
    early.close()?;
    // Entries freed: new connections are captured and reach their destinations again.
    for target in [TARGET, TARGET2] {
        let r = dial_one(&c, "node1-pod1", target)?;
        ensure!(
            was_captured(&c, "node1-pod1", &r)?,
            "not captured afterwards: {r:?}"
        );
        ensure!(
            r.server_local.as_deref() == Some(target),
            "afterwards {target} reached {:?}",
            r.server_local
        );
    }
    Ok(())
}

/// 150 tunnels held at once from one pod to one destination (more than the 100 streams one
/// HTTP/2 or QUIC connection carries), each longer than testpod's 5 s read timeout: any tunnel
/// queued behind the first 100 would wait for its HELLO past that timeout. Returns the pooled
/// connections of `transport` on node1 afterwards.
fn many_tunnels_to_one_destination(c: &TestCluster, transport: &str) -> Result<f64> {
    let n = mesh_node::proxy::hbone::MAX_STREAMS as usize + 50;
    let results = sidenode_tests::workload::dial(
        c,
        &testpod(),
        "node1-pod1",
        &[TARGET.to_string()],
        n,
        n,
        6_000,
    )?;
    let failed: Vec<_> = results.iter().filter(|r| !r.echo_ok).collect();
    ensure!(
        failed.is_empty(),
        "{transport}: {} of {n} concurrent tunnels failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let pooled = metric_value(
        &proxy_metrics(c, "node1")?,
        "sidenode_hbone_pool_connections",
        &[("transport", transport)],
    );
    eprintln!("{n} concurrent tunnels; {pooled} pooled {transport} connections on node1");
    Ok(pooled)
}

/// A mesh cluster (proxies run with `proxy_args`) with an echo server on SERVER_POD:8080,
/// node1's pods 1 and 2 enrolled and the server's HBONE listener open: the pool tests' start.
fn pool_cluster(proxy_args: &[&str]) -> Result<(TestCluster, Server)> {
    let c = limited_cluster(true, &[], proxy_args)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod2")?;
    wait_hbone_listener(&c, SERVER_POD)?;
    Ok((c, srv))
}

#[test]
fn more_tunnels_than_one_connection_carries_are_not_queued() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = pool_cluster(&[])?;
    let h2 = many_tunnels_to_one_destination(&c, "h2")?;
    ensure!(h2 >= 2.0, "150 tunnels over {h2} HTTP/2 connections");

    // The same over QUIC (`tunnelProtocol: quic`), once node1 dials QUIC (seen from pod2).
    c.write_config_file(
        "meshconfig.yaml",
        "apiVersion: sidenode.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\n\
         spec:\n  tunnelProtocol: quic\n",
    )?;
    let ok = wait_until(Duration::from_secs(20), || {
        dial_one(&c, "node1-pod2", TARGET)?;
        Ok(metric_value(
            &proxy_metrics(&c, "node1")?,
            "sidenode_hbone_pool_connections",
            &[("transport", "quic")],
        ) >= 1.0)
    })?;
    ensure!(
        ok,
        "node1 never pooled a QUIC connection after tunnelProtocol: quic"
    );
    let quic = many_tunnels_to_one_destination(&c, "quic")?;
    // pod2's probe connection, and at least two for pod1's 150.
    ensure!(
        quic >= 3.0,
        "150 tunnels over {quic} QUIC connections (with pod2's)"
    );
    Ok(())
}

fn pooled_h2(c: &TestCluster) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, "node1")?,
        "sidenode_hbone_pool_connections",
        &[("transport", "h2")],
    ))
}

/// Pooled HBONE connections that carry no tunnel for `--pool-idle-timeout` are closed (those
/// a burst of 150 opened included), one carrying a long-lived tunnel stays, and a tunnel after
/// the reaping dials afresh.
#[test]
fn idle_pooled_connections_are_closed_busy_ones_stay() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = pool_cluster(&["--pool-idle-timeout", "2s"])?;

    // A long-lived tunnel from pod1: its connection must stay.
    let mut session = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(session.through_proxy(), "pod1's session not captured");
    ensure!(session.echo("first")? == "first", "pod1's session: echo");
    // A burst from pod2: 150 tunnels at once need two connections or more.
    let n = mesh_node::proxy::hbone::MAX_STREAMS as usize + 50;
    let burst = sidenode_tests::workload::dial(
        &c,
        &testpod(),
        "node1-pod2",
        &[TARGET.to_string()],
        n,
        n,
        500,
    )?;
    ensure!(
        burst.iter().all(|r| r.echo_ok),
        "the burst from pod2 had failures"
    );
    let after_burst = pooled_h2(&c)?;
    ensure!(
        after_burst >= 3.0,
        "pooled after the burst: {after_burst} (pod1's and at least two of pod2's)"
    );
    // pod2's connections go idle and are closed; pod1's stays while its tunnel is open.
    let reaped = wait_until(Duration::from_secs(20), || Ok(pooled_h2(&c)? == 1.0))?;
    ensure!(
        reaped,
        "pod2's idle connections never closed: {} pooled",
        pooled_h2(&c)?
    );
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        pooled_h2(&c)? == 1.0,
        "the connection of pod1's open tunnel was closed"
    );
    ensure!(
        session.echo("still")? == "still",
        "pod1's session after the reaping"
    );
    drop(session);
    let empty = wait_until(Duration::from_secs(20), || Ok(pooled_h2(&c)? == 0.0))?;
    ensure!(empty, "pod1's connection never closed once idle");
    // A new tunnel dials afresh.
    let r = dial_one(&c, "node1-pod1", TARGET)?;
    ensure!(r.echo_ok, "a tunnel after the pool emptied: {r:?}");
    ensure!(
        pooled_h2(&c)? == 1.0,
        "the new tunnel's connection is pooled"
    );

    // The same for QUIC (`tunnelProtocol: quic`): pod2's connection closes once idle.
    c.write_config_file(
        "meshconfig.yaml",
        "apiVersion: sidenode.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\n\
         spec:\n  tunnelProtocol: quic\n",
    )?;
    let pooled_quic = || -> Result<f64> {
        Ok(metric_value(
            &proxy_metrics(&c, "node1")?,
            "sidenode_hbone_pool_connections",
            &[("transport", "quic")],
        ))
    };
    let mut session = None;
    let dialled = wait_until(Duration::from_secs(20), || {
        let s = Session::open(&c, &testpod(), "node1-pod2", TARGET)?;
        session = Some(s);
        Ok(pooled_quic()? >= 1.0)
    })?;
    ensure!(dialled, "node1 never pooled a QUIC connection");
    let mut session = session.context("a QUIC session")?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        pooled_quic()? >= 1.0 && session.echo("quic")? == "quic",
        "the QUIC connection of an open tunnel was closed"
    );
    drop(session);
    let empty = wait_until(Duration::from_secs(20), || Ok(pooled_quic()? == 0.0))?;
    ensure!(
        empty,
        "idle QUIC connections never closed: {} pooled",
        pooled_quic()?
    );
    let r = dial_one(&c, "node1-pod2", TARGET)?;
    ensure!(r.echo_ok, "a tunnel after the QUIC pool emptied: {r:?}");
    Ok(())
}

/// HBONE (TCP 15008) connections established from `pod`'s namespace (its tunnels leave from
/// there).
fn tunnels_from(c: &TestCluster, pod: &str) -> Result<usize> {
    let listed =
        run_ok(
            c.pod_command(pod, "ss")?
                .args(["-Htn", "state", "established", "dport = :15008"]),
        )?;
    Ok(listed.lines().count())
}

/// A connection the pool forgot (admin `POST /pool/forget`) closes as soon as its last tunnel
/// ended, not after the idle timeout (five minutes here): the 150 connections the bench's
/// cold-pool measure forgets once stayed open and kept ~30 MB in each proxy.
#[test]
fn forgotten_pooled_connections_close_after_their_last_tunnel() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = pool_cluster(&[])?;

    // pod1 keeps a tunnel open; pod2's connection carries none once its dial ended.
    let mut session = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(session.through_proxy(), "pod1's session not captured");
    ensure!(
        dial_one(&c, "node1-pod2", TARGET)?.through_proxy(),
        "pod2 not captured"
    );
    ensure!(
        tunnels_from(&c, "node1-pod1")? == 1 && tunnels_from(&c, "node1-pod2")? == 1,
        "one HBONE connection from each pod expected: {} and {}",
        tunnels_from(&c, "node1-pod1")?,
        tunnels_from(&c, "node1-pod2")?
    );
    let body = run_ok(c.node_command("node1", "curl")?.args([
        "-sS",
        "-X",
        "POST",
        "http://127.0.0.1:15000/pool/forget",
    ]))?;
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("POST /pool/forget: {body}"))?;
    ensure!(
        v["forgotten"]["h2"] == 2,
        "POST /pool/forget should forget two HTTP/2 connections: {body}"
    );
    // pod2's connection carried nothing: it closes at once; pod1's goes on for its tunnel.
    let closed = wait_until(Duration::from_secs(5), || {
        Ok(tunnels_from(&c, "node1-pod2")? == 0)
    })?;
    ensure!(
        closed,
        "pod2's forgotten, unused HBONE connection is still open"
    );
    ensure!(
        session.echo("after forget")? == "after forget" && tunnels_from(&c, "node1-pod1")? == 1,
        "pod1's tunnel on its forgotten connection stopped working"
    );
    // A new tunnel from pod1 dials a new connection; the old one closes when its tunnel ends.
    ensure!(
        dial_one(&c, "node1-pod1", TARGET)?.echo_ok,
        "a new tunnel from pod1"
    );
    ensure!(
        tunnels_from(&c, "node1-pod1")? == 2,
        "pod1 should have its forgotten connection and a new one: {}",
        tunnels_from(&c, "node1-pod1")?
    );
    session.close()?;
    let closed = wait_until(Duration::from_secs(5), || {
        Ok(tunnels_from(&c, "node1-pod1")? == 1)
    })?;
    ensure!(
        closed,
        "pod1's forgotten connection outlived its last tunnel"
    );
    Ok(())
}
