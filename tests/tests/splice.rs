//! End-to-end tests of the local legs spliced in the kernel (`SN_SPLICE` sockhash +
//! `sn_splice_msg`): the bytes a pod and its node proxy exchange skip TCP/IP and the veth, on
//! both nodes of a cross-node connection and on a same-node one. Checked: checksummed 100 MB
//! transfers both ways with half-close, many concurrent connections, a connection whose
//! sockhash entries are removed mid-life, the agent restarted mid-transfer, the destination's
//! policy closing a same-node connection and its telemetry, and `uninstall` taking everything
//! away; and with splicing off (the default) nothing joins the map. Mesh mode (controller),
//! file config. Run as root:
//! `cargo test -p sidenode-tests --test splice`. One cluster at a time (`serial()`).

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{Server, Session, dial};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Meshed client on node 1 (identity `sa-node1-pod1`).
const CLIENT: &str = "node1-pod1";
/// Meshed echo server on node 2 (cross-node).
const REMOTE_POD: &str = "node2-pod1";
const REMOTE: &str = "198.19.2.2:8080";
/// Meshed echo server on node 1 (same node as the client).
const LOCAL_POD: &str = "node1-pod2";
const LOCAL: &str = "198.19.1.3:8081";
const MB: u64 = 1 << 20;

/// A mesh cluster (agents with `agent_args`) with both echo servers up and every pod enrolled.
fn splice_cluster(
    agent_args: &[&str],
) -> Result<(sidenode_tests::cluster::TestCluster, Server, Server)> {
    let c = mesh_cluster_with_agent_args(3, agent_args)?;
    let remote = Server::start(&c, &testpod(), REMOTE_POD, &[8080])?;
    let local = Server::start(&c, &testpod(), LOCAL_POD, &[8081])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node1", "mesh", LOCAL_POD)?;
    wait_enrolled(&c, "node2", "mesh", REMOTE_POD)?;
    wait_hbone_listener(&c, REMOTE_POD)?;
    Ok((c, remote, local))
}

/// A kernel counter of a node (`mesh-node maps --json`).
fn stat(c: &Cluster, node: &str, name: &str) -> Result<u64> {
    let v = c.maps_json(node)?;
    v["stats"][name]
        .as_u64()
        .with_context(|| format!("no counter {name} in {node}'s maps: {v}"))
}

/// `testpod transfer` from `pod`: `conns` connections each sending `bytes` and checking the
/// echo. Fails unless every connection got back exactly what it sent.
fn transfer(c: &Cluster, pod: &str, to: &str, bytes: u64, conns: usize) -> Result<()> {
    let out = c
        .pod_command(pod, testpod())?
        .args(["transfer", "--to", to, "--bytes"])
        .arg(bytes.to_string())
        .args(["--conns", &conns.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running testpod transfer")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "testpod transfer {pod} -> {to} failed ({}): {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("transfer report {text}"))?;
    let ok = v["ok"].as_u64().context("transfer report without ok")?;
    ensure!(
        ok == conns as u64,
        "{pod} -> {to}: {ok} of {conns} connections got back exactly what they sent: {v}"
    );
    Ok(())
}

/// `n` connections from the client to `to`, each closed with a reset (SO_LINGER 0) after one
/// echo; fails unless every one worked.
fn resets(c: &Cluster, to: &str, n: usize) -> Result<()> {
    let out = c
        .pod_command(CLIENT, testpod())?
        .args([
            "connlat",
            "--to",
            to,
            "--count",
            &n.to_string(),
            "--size",
            "64",
        ])
        .stdin(Stdio::null())
        .output()
        .context("running testpod connlat")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("\"errors\":0"),
        "connlat {CLIENT} -> {to}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Bytes handed straight to peer sockets on each node while `f` ran.
fn spliced_during(c: &Cluster, f: impl FnOnce() -> Result<()>) -> Result<(u64, u64)> {
    let (a1, a2) = (
        stat(c, "node1", "splice_bytes")?,
        stat(c, "node2", "splice_bytes")?,
    );
    f()?;
    Ok((
        stat(c, "node1", "splice_bytes")? - a1,
        stat(c, "node2", "splice_bytes")? - a2,
    ))
}

#[test]
fn spliced_legs_carry_every_byte_in_order() -> Result<()> {
    let _g = serial();
    let (c, _remote, _local) = splice_cluster(&["--splice"])?;

    // Cross-node, 100 MB each way: node 1 splices the client's bytes to its proxy and the echo
    // back (≥ 200 MB); node 2 at least the server's echo to its proxy (the proxy's socket is
    // in the map before the pod's accepted one exists, so that direction never misses).
    let (n1, n2) = spliced_during(&c, || transfer(&c, CLIENT, REMOTE, 100 * MB, 1))?;
    ensure!(
        n1 >= 200 * MB,
        "node1 spliced only {n1} bytes of a 100 MB echo"
    );
    ensure!(
        n2 >= 100 * MB,
        "node2 spliced only {n2} bytes of a 100 MB echo"
    );
    // Same node, 100 MB each way: both legs on node 1 (≥ 400 MB: two legs, two directions).
    let (n1, _) = spliced_during(&c, || transfer(&c, CLIENT, LOCAL, 100 * MB, 1))?;
    ensure!(
        n1 >= 400 * MB,
        "node1 spliced only {n1} bytes of a same-node 100 MB echo"
    );
    // Many at once, both paths.
    transfer(&c, CLIENT, REMOTE, 4 * MB, 16)?;
    transfer(&c, CLIENT, LOCAL, 4 * MB, 16)?;

    // Resets: 200 connections each closed by the client with an RST (SO_LINGER 0) after one
    // echo, on both paths. Every connection must work, and every spliced socket of them —
    // the pod's and the proxy's, on both legs — must leave the map: the reset reached and
    // closed both ends of each leg.
    let proxy_pid = c.pid("node1", "proxy").context("no node1 proxy pid")?;
    let fds_before = open_fds(proxy_pid)?;
    for to in [REMOTE, LOCAL] {
        resets(&c, to, 200)?;
    }
    let client_ip = c.pod(CLIENT)?.ip.clone();
    let drained = wait_until(Duration::from_secs(10), || {
        Ok(splice_entries(&c, "node1")?.iter().all(|e| {
            !e["local"]
                .as_str()
                .is_some_and(|l| l.starts_with(&format!("{client_ip}:")))
                && !e["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("{client_ip}:")))
        }) && open_fds(proxy_pid)? <= fds_before)
    })?;
    ensure!(
        drained,
        "after 400 reset connections node1 still holds spliced sockets of the client or proxy fds \
         ({} now, {fds_before} before): {:?}",
        open_fds(proxy_pid)?,
        splice_entries(&c, "node1")?
    );

    // The agent killed and restarted mid-transfer: the pinned maps and programs carry on.
    let mut cmd = c.pod_command(CLIENT, testpod())?;
    cmd.args(["transfer", "--to", LOCAL, "--bytes"])
        .arg((300 * MB).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("starting a long transfer")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut c = c;
    c.kill_process("node1", "agent", libc::SIGKILL)?;
    c.restart_process("node1", "agent")?;
    let out = child
        .wait_with_output()
        .context("waiting for the transfer")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("\"ok\":1"),
        "transfer across an agent restart: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The 36 bytes of a `SpliceKey` (local, remote as IPv4-mapped addresses; ports host order).
fn splice_key_hex(local: SocketAddr, remote: SocketAddr) -> Vec<String> {
    let mut b = Vec::with_capacity(36);
    for a in [local.ip(), remote.ip()] {
        let v6 = match a {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        b.extend_from_slice(&v6.octets());
    }
    b.extend_from_slice(&local.port().to_ne_bytes());
    b.extend_from_slice(&remote.port().to_ne_bytes());
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn splice_entries(c: &Cluster, node: &str) -> Result<Vec<serde_json::Value>> {
    let v = c.maps_json(node)?;
    Ok(v["splice"]
        .as_array()
        .with_context(|| format!("no splice entries in {node}'s maps: {v}"))?
        .clone())
}

#[test]
fn missing_entries_fall_back_and_the_destination_policy_still_applies() -> Result<()> {
    let _g = serial();
    let (c, _remote, _local) = splice_cluster(&["--splice"])?;

    // A same-node connection: both legs spliced, shown by `mesh-node maps`.
    let mut s = Session::open(&c, &testpod(), CLIENT, LOCAL)?;
    ensure!(s.echo("one")? == "one", "first echo");
    // The client's own socket (the proxy's leg to the pod uses the client's IP too).
    let entries = splice_entries(&c, "node1")?;
    let leg: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["local"].as_str() == Some(s.client_local.as_str()))
        .collect();
    ensure!(
        leg.len() == 1 && leg[0]["side"] == "connecting" && leg[0]["path"] == "spliced",
        "the client's socket is not a spliced member: {entries:?}"
    );
    let local: SocketAddr = leg[0]["local"].as_str().unwrap_or("").parse()?;
    let remote: SocketAddr = leg[0]["remote"].as_str().unwrap_or("").parse()?;
    ensure!(
        entries
            .iter()
            .any(|e| e["local"] == remote.to_string() && e["remote"] == local.to_string()),
        "the proxy's accepted socket is not a member: {entries:?}"
    );

    // Both ends of the pod's leg taken out of the map while the connection is idle: the next
    // bytes take the normal path, and nothing is lost.
    let map = c
        .node_bpffs("node1")
        .join(mesh_common::PIN_MAPS)
        .join(mesh_common::SPLICE);
    for (l, r) in [(local, remote), (remote, local)] {
        let out = Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(&map)
            .arg("key")
            .arg("hex")
            .args(splice_key_hex(l, r))
            .output()
            .context("running bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool map delete {l} -> {r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let left = splice_entries(&c, "node1")?;
    ensure!(
        !left
            .iter()
            .any(|e| e["local"] == local.to_string() || e["local"] == remote.to_string()),
        "the removed entries are still listed: {left:?}"
    );
    // Only the other leg (proxy ↔ server pod) is still spliced: one message each way per
    // echo. Were the client's leg spliced too, there would be twice as many.
    let msgs_before = stat(&c, "node1", "splice_msgs")?;
    for i in 0..20 {
        let line = format!("after-removal-{i}");
        ensure!(s.echo(&line)? == line, "echo {i} after the entries went");
    }
    let msgs_after = stat(&c, "node1", "splice_msgs")?;
    ensure!(
        msgs_after - msgs_before <= 2 * 20,
        "{} messages were spliced for 20 echoes after the client leg's entries went",
        msgs_after - msgs_before
    );

    // The destination's telemetry for a same-node connection: reported by the destination,
    // authenticated as a tunnel would be.
    let m = proxy_metrics(&c, "node1")?;
    let opened = same_node_opened(&m);
    ensure!(
        opened >= 1.0,
        "no destination-reported connection for the same-node session"
    );

    // The destination's AuthorizationPolicy closes the open spliced connection and refuses
    // new ones.
    let denied_before = metric_value(
        &m,
        "sidenode_authz_denied_total",
        &[("direction", "inbound"), ("layer", "l4")],
    );
    c.write_config_file(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-pod1\n  namespace: mesh\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/mesh/sa/sa-node1-pod1\"]\n    to:\n    - operation:\n        ports: [\"8081\"]\n",
    )?;
    let closed = wait_until(Duration::from_secs(10), || Ok(s.echo("still?").is_err()))?;
    ensure!(
        closed,
        "the open same-node connection outlived the DENY policy"
    );
    let r = dial(&c, &testpod(), CLIENT, &[LOCAL.to_string()], 1, 1, 0)?;
    ensure!(
        r.first().is_some_and(|r| !r.echo_ok),
        "a new same-node connection passed the DENY policy: {:?}",
        r.first().map(|r| r.echo_ok)
    );
    let denied_after = metric_value(
        &proxy_metrics(&c, "node1")?,
        "sidenode_authz_denied_total",
        &[("direction", "inbound"), ("layer", "l4")],
    );
    ensure!(
        denied_after > denied_before,
        "the same-node refusal was not counted as an L4 denial"
    );
    drop(s);

    // `uninstall`: with node 1's agent and proxy stopped, the splice program and map go away
    // (node 2's, on the same kernel, stay).
    let prog_pin = c
        .node_bpffs("node1")
        .join(mesh_common::PIN_PROGS)
        .join(mesh_common::PROG_SPLICE_MSG);
    let prog_id = bpftool_id(&["prog", "show", "pinned"], &prog_pin)?;
    let map_id = bpftool_id(&["map", "show", "pinned"], &map)?;
    let mut c = c;
    c.kill_process("node1", "proxy", libc::SIGTERM)?;
    c.kill_process("node1", "agent", libc::SIGTERM)?;
    let out = Command::new(sidenode_tests::workload::mesh_node_path())
        .arg("uninstall")
        .arg("--bpffs")
        .arg(c.node_bpffs("node1"))
        .output()
        .context("running mesh-node uninstall")?;
    ensure!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = wait_until(Duration::from_secs(10), || {
        Ok(!exists(&["prog", "show", "id", &prog_id.to_string()])?
            && !exists(&["map", "show", "id", &map_id.to_string()])?)
    })?;
    ensure!(
        gone,
        "after uninstall, program {prog_id} or map {map_id} is still loaded"
    );
    Ok(())
}

#[test]
fn splicing_is_off_unless_asked_for() -> Result<()> {
    let _g = serial();
    let (c, _remote, _local) = splice_cluster(&[])?;
    transfer(&c, CLIENT, REMOTE, MB, 4)?;
    transfer(&c, CLIENT, LOCAL, MB, 4)?;
    // The same-node connections were still admitted and reported by the destination's side.
    let opened = same_node_opened(&proxy_metrics(&c, "node1")?);
    ensure!(
        opened >= 4.0,
        "{opened} destination-reported same-node connections, 4 made"
    );
    for node in ["node1", "node2"] {
        ensure!(
            stat(&c, node, "splice_joined")? == 0,
            "{node}: sockets joined SN_SPLICE without --splice"
        );
        ensure!(
            splice_entries(&c, node)?.is_empty(),
            "{node}: SN_SPLICE has entries without --splice"
        );
    }
    Ok(())
}

/// Without `--splice` a same-node connection's two sockets are joined by `splice(2)` in the
/// proxy (`proxy::zero_copy`): every byte arrives in order both ways (100 MB, half-close,
/// 16 at once), both reporters count exactly the bytes that moved, a reset client ends the
/// copy, and the destination's policy still closes an open connection.
#[test]
fn same_node_bytes_move_in_the_kernel_and_count_exactly() -> Result<()> {
    let _g = serial();
    let (c, _remote, _local) = splice_cluster(&[])?;
    let sel = |reporter: &'static str| {
        [
            ("reporter", reporter),
            ("destination_workload", LOCAL_POD),
            ("source_workload", CLIENT),
        ]
    };
    let bytes = |m: &str, name: &str, reporter: &'static str| metric_value(m, name, &sel(reporter));
    let before = proxy_metrics(&c, "node1")?;
    let (conns, payload) = (17u64, 100 * MB + 16 * 4 * MB);
    transfer(&c, CLIENT, LOCAL, 100 * MB, 1)?;
    transfer(&c, CLIENT, LOCAL, 4 * MB, 16)?;
    // Counters are published when a connection closes; the last close may trail the client.
    let mut last = String::new();
    let settled = wait_until(Duration::from_secs(10), || {
        last = proxy_metrics(&c, "node1")?;
        Ok(["source", "destination"].iter().all(|r| {
            bytes(&last, "istio_tcp_received_bytes_total", r)
                - bytes(&before, "istio_tcp_received_bytes_total", r)
                >= payload as f64
        }))
    })?;
    ensure!(settled, "the byte counters did not reach {payload}");
    for reporter in ["source", "destination"] {
        let received = bytes(&last, "istio_tcp_received_bytes_total", reporter)
            - bytes(&before, "istio_tcp_received_bytes_total", reporter);
        let sent = bytes(&last, "istio_tcp_sent_bytes_total", reporter)
            - bytes(&before, "istio_tcp_sent_bytes_total", reporter);
        ensure!(
            received == payload as f64,
            "{reporter}: {received} bytes counted received, the clients sent {payload}"
        );
        // Back: the echo plus one HELLO line (under 64 bytes) per connection.
        let hello = sent - payload as f64;
        ensure!(
            hello > 0.0 && hello < (64 * conns) as f64,
            "{reporter}: {sent} bytes counted sent for an echo of {payload} and {conns} greetings"
        );
    }
    // 200 connections closed by the client with a reset after one echo: each copy ends and
    // its sockets and pipes go (pipes back to the proxy's pool: its fds return to where the
    // transfers above left them).
    let proxy = c.pid("node1", "proxy").context("no node1 proxy pid")?;
    let fds = open_fds(proxy)?;
    resets(&c, LOCAL, 200)?;
    let back = wait_until(Duration::from_secs(10), || Ok(open_fds(proxy)? <= fds))?;
    ensure!(
        back,
        "the proxy holds {} fds after 200 reset connections (had {fds})",
        open_fds(proxy)?
    );
    // The destination's policy closes an open zero-copy connection.
    let mut s = Session::open(&c, &testpod(), CLIENT, LOCAL)?;
    ensure!(s.echo("one")? == "one", "first echo");
    c.write_config_file(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-pod1\n  namespace: mesh\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/mesh/sa/sa-node1-pod1\"]\n    to:\n    - operation:\n        ports: [\"8081\"]\n",
    )?;
    let closed = wait_until(Duration::from_secs(10), || Ok(s.echo("still?").is_err()))?;
    ensure!(
        closed,
        "the open same-node connection outlived the DENY policy"
    );
    Ok(())
}

/// Connections from the client to the same-node server that node1 reported as their
/// destination, authenticated as a tunnel would be (`metrics`: node1's page).
fn same_node_opened(metrics: &str) -> f64 {
    metric_value(
        metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", LOCAL_POD),
            ("source_workload", CLIENT),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing fds of {pid}"))?
        .count())
}

fn bpftool_id(args: &[&str], pin: &std::path::Path) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(args)
        .arg(pin)
        .arg("--json")
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?} {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["id"].as_u64().context("bpftool output without an id")
}

fn exists(args: &[&str]) -> Result<bool> {
    Ok(Command::new("bpftool")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running bpftool")?
        .success())
}
