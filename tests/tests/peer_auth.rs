//! End-to-end tests of `PeerAuthentication` (mesh mode, file config): STRICT enforced in the
//! kernel (`sn_strict_in` drops plaintext SYNs to the pod, mesh traffic through HBONE passes),
//! PERMISSIVE accepting both, port-level exceptions, DISABLE sending plaintext from the
//! source's proxy, and removal lifting the drop. Run as root:
//! `cargo test -p sidenode-tests --test peer_auth`. The tests take turns (one cluster at a
//! time); each has its own cluster (prefix `m....`), torn down on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{DialResult, Server, dial};
use std::time::Duration;

/// The server: meshed, on node 2.
const SERVER_POD: &str = "node2-pod1";
const SERVER_IP: &str = "198.19.2.2";
/// Its second address (the simulated pods are dual-stack).
const SERVER_IP6: &str = "fd00:198:19:2::2";
/// Meshed clients: on the other node and on the server's node.
const MESH_CLIENT: &str = "node1-pod1";
const MESH_CLIENT_SAME_NODE: &str = "node2-pod2";
/// Unenrolled clients (the last pod of each node is in the `plain` namespace): on the other
/// node and on the server's node.
const PLAIN_CLIENT: &str = "node1-pod3";
const PLAIN_CLIENT_SAME_NODE: &str = "node2-pod3";
const PLAIN_CLIENT_SAME_NODE_IP: &str = "198.19.2.4";

/// A mesh cluster, 3 pods per node (pod3 unenrolled), a server on node2-pod1 (8080, 9090),
/// the meshed pods enrolled and the server's HBONE listener open.
fn setup() -> Result<(sidenode_tests::cluster::TestCluster, Server)> {
    let c = mesh_cluster(3, None)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080, 9090])?;
    wait_enrolled(&c, "node1", "mesh", MESH_CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_enrolled(&c, "node2", "mesh", MESH_CLIENT_SAME_NODE)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    Ok((c, srv))
}

fn policy(name: &str, namespace: &str, selector_app: Option<&str>, body: &str) -> String {
    let selector = selector_app
        .map(|a| format!("  selector:\n    matchLabels:\n      app: {a}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{selector}{body}"
    )
}

/// One connection attempt (testpod's connect timeout is 3 s).
fn try_dial(c: &Cluster, pod: &str, target: &str) -> Result<DialResult> {
    let mut r = dial(c, &testpod(), pod, &[target.to_string()], 1, 1, 0)?;
    r.pop().context("empty dial report")
}

fn expect_ok(c: &Cluster, pod: &str, target: &str) -> Result<DialResult> {
    let r = try_dial(c, pod, target)?;
    ensure!(r.echo_ok, "{pod} -> {target} should work: {r:?}");
    Ok(r)
}

/// A plaintext connection `pod` → `target` (a pod of node 2) is dropped by node 2's kernel:
/// the SYN goes unanswered (testpod's `connect` times out; a refusal or reset would be
/// something else) and node 2's `strict_dropped` counter moves.
fn expect_dropped(c: &Cluster, pod: &str, target: &str) -> Result<()> {
    let before = strict_dropped(c, "node2")?;
    let r = try_dial(c, pod, target)?;
    let err = r.error.as_deref().unwrap_or_default();
    ensure!(
        !r.echo_ok && err.starts_with("connect:") && err.contains("timed out"),
        "{pod} -> {target} should be dropped (STRICT), i.e. its connect time out: {r:?}"
    );
    let after = strict_dropped(c, "node2")?;
    ensure!(
        after > before,
        "{pod} -> {target}: failed, but node2's strict_dropped did not move ({before} -> {after}): {r:?}"
    );
    Ok(())
}

/// `(ip, port, mode)` of the node's `SN_STRICT` entries.
fn strict_entries(c: &Cluster, node: &str) -> Result<Vec<(String, u64, String)>> {
    let v = c.maps_json(node)?;
    let list = v["strict"]
        .as_array()
        .with_context(|| format!("maps --json has no strict array: {v}"))?;
    Ok(list
        .iter()
        .map(|e| {
            (
                e["ip"].as_str().unwrap_or_default().to_string(),
                e["port"].as_u64().unwrap_or_default(),
                e["mode"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Wait (15 s) until node2's `SN_STRICT` holds exactly `want` (port, mode) for both of the
/// server's addresses.
fn wait_strict(c: &Cluster, want: &[(u64, &str)]) -> Result<()> {
    let want: Vec<(String, u64, String)> = [SERVER_IP, SERVER_IP6]
        .iter()
        .flat_map(|ip| {
            want.iter()
                .map(move |(p, m)| (ip.to_string(), *p, m.to_string()))
        })
        .collect();
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(15), || {
        last = strict_entries(c, "node2")?;
        Ok(last == want)
    })?;
    if !ok {
        bail!("SN_STRICT on node2 is {last:?}, wanted {want:?}");
    }
    Ok(())
}

fn strict_dropped(c: &Cluster, node: &str) -> Result<u64> {
    let v = c.maps_json(node)?;
    v["stats"]["strict_dropped"]
        .as_u64()
        .with_context(|| format!("no strict_dropped counter: {}", v["stats"]))
}

#[test]
fn strict_drops_plaintext_keeps_mesh_traffic_and_lifts_on_removal() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = setup()?;
    let target = format!("{SERVER_IP}:8080");
    let excepted = format!("{SERVER_IP}:9090");

    // Default PERMISSIVE: plaintext from an unenrolled pod is accepted.
    let r = expect_ok(&c, PLAIN_CLIENT_SAME_NODE, &target)?;
    ensure!(
        r.server_peer.as_deref().map(ip_of) == Some(PLAIN_CLIENT_SAME_NODE_IP),
        "plaintext should come straight from the client pod: {r:?}"
    );

    c.write_config_file(
        "peerauth.yaml",
        &policy(
            "server-strict",
            "mesh",
            Some(SERVER_POD),
            "  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: PERMISSIVE\n",
        ),
    )?;
    wait_strict(&c, &[(0, "STRICT"), (9090, "PERMISSIVE")])?;
    let dropped_before = strict_dropped(&c, "node2")?;

    // Plaintext from an unenrolled pod, on the same node and on another node: dropped.
    expect_dropped(&c, PLAIN_CLIENT_SAME_NODE, &target)?;
    expect_dropped(&c, PLAIN_CLIENT, &target)?;
    // IPv6 too.
    let target6 = format!("[{SERVER_IP6}]:8080");
    expect_dropped(&c, PLAIN_CLIENT, &target6)?;
    let dropped_after = strict_dropped(&c, "node2")?;
    ensure!(
        dropped_after > dropped_before,
        "strict_dropped did not move: {dropped_before} -> {dropped_after}"
    );

    // The PERMISSIVE port exception accepts plaintext.
    expect_ok(&c, PLAIN_CLIENT, &excepted)?;

    // Mesh traffic (HBONE to :15008, then the inbound proxy from the node's address) passes,
    // from another node and from the same node.
    for pod in [MESH_CLIENT, MESH_CLIENT_SAME_NODE] {
        let r = expect_ok(&c, pod, &target)?;
        ensure!(
            r.kept_client_address(),
            "mesh traffic should reach the server from node2's proxy, with the client's address: {r:?}"
        );
    }
    // Over IPv6 the inbound proxy connects from node2's IPv6 address.
    let r = expect_ok(&c, MESH_CLIENT, &target6)?;
    ensure!(
        r.kept_client_address(),
        "IPv6 mesh traffic should reach the server from node2's proxy, with the client's address: {r:?}"
    );
    let offset = 0;
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "connection complete",
            &format!("dst.addr={target}"),
            "transport=\"hbone\"",
        ],
        Duration::from_secs(5),
    )?;

    // Removing the policy lifts the drop.
    c.remove_config_file("peerauth.yaml")?;
    wait_strict(&c, &[])?;
    expect_ok(&c, PLAIN_CLIENT_SAME_NODE, &target)?;
    expect_ok(&c, PLAIN_CLIENT, &target)?;
    Ok(())
}

#[test]
fn disable_goes_plaintext_and_port_level_strict_on_a_permissive_workload() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = setup()?;
    let target = format!("{SERVER_IP}:8080");
    let strict_port = format!("{SERVER_IP}:9090");

    // Mesh-wide STRICT, namespace PERMISSIVE (wins over the mesh), the server's 9090 STRICT.
    let yaml = [
        policy(
            "default",
            "istio-system",
            None,
            "  mtls:\n    mode: STRICT\n",
        ),
        policy("ns", "mesh", None, "  mtls:\n    mode: PERMISSIVE\n"),
        policy(
            "server",
            "mesh",
            Some(SERVER_POD),
            "  portLevelMtls:\n    9090:\n      mode: STRICT\n",
        ),
    ]
    .join("---\n");
    c.write_config_file("peerauth.yaml", &yaml)?;
    wait_strict(&c, &[(9090, "STRICT")])?;
    // PERMISSIVE accepts plaintext and mesh traffic.
    expect_ok(&c, PLAIN_CLIENT, &target)?;
    let r = expect_ok(&c, MESH_CLIENT, &target)?;
    ensure!(
        r.kept_client_address(),
        "mesh traffic should come through node2's proxy, with the client's address: {r:?}"
    );
    // The STRICT port refuses plaintext, takes the mesh.
    expect_dropped(&c, PLAIN_CLIENT, &strict_port)?;
    expect_ok(&c, MESH_CLIENT, &strict_port)?;

    // DISABLE on the server: the client's proxy connects directly (plaintext), so the server
    // sees node1's address, and the proxy logs a TCP connection.
    c.write_config_file(
        "peerauth.yaml",
        &policy(
            "server",
            "mesh",
            Some(SERVER_POD),
            "  mtls:\n    mode: DISABLE\n",
        ),
    )?;
    wait_strict(&c, &[])?;
    let node1_ip = c.node("node1")?.ip.clone();
    let mut last = None;
    let plain = wait_until(Duration::from_secs(15), || {
        let r = expect_ok(&c, MESH_CLIENT, &target)?;
        let ok = r.server_peer.as_deref().map(ip_of) == Some(node1_ip.as_str());
        last = Some(r);
        Ok(ok)
    })?;
    ensure!(
        plain,
        "with DISABLE the server should see node1's proxy: {last:?}"
    );
    let local = last
        .and_then(|r| r.local)
        .context("no client local address")?;
    wait_log_all(
        &c,
        "node1",
        "proxy",
        0,
        &[
            "connection complete",
            &format!("src.addr={local}"),
            &format!("dst.addr={target}"),
            "transport=\"tcp\"",
        ],
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// An agent started on the pins of an older version (the capture programs pinned, no
/// `sn_strict_in`) keeps the pinned programs and attaches the missing one.
#[test]
fn agent_on_older_pins_attaches_the_strict_program() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = setup()?;
    let target = format!("{SERVER_IP}:8080");
    c.write_config_file(
        "peerauth.yaml",
        &policy(
            "server-strict",
            "mesh",
            Some(SERVER_POD),
            "  mtls:\n    mode: STRICT\n",
        ),
    )?;
    wait_strict(&c, &[(0, "STRICT")])?;
    expect_dropped(&c, PLAIN_CLIENT, &target)?;

    // The older set of pins: without the strict program's link (it detaches).
    let pin = c
        .node_bpffs("node2")
        .join("sidenode/links")
        .join("sn_strict_in");
    std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    expect_ok(&c, PLAIN_CLIENT, &target)?;

    let offset = c.log_len("node2", "agent");
    c.restart_process("node2", "agent")?;
    wait_log_all(
        &c,
        "node2",
        "agent",
        offset,
        &["attached the missing ones", "sn_strict_in"],
        Duration::from_secs(5),
    )?;
    ensure!(pin.exists(), "{} not pinned again", pin.display());
    expect_dropped(&c, PLAIN_CLIENT, &target)?;
    // Capture went on: the meshed client still goes through the mesh.
    let r = expect_ok(&c, MESH_CLIENT, &target)?;
    ensure!(
        r.kept_client_address(),
        "mesh traffic should come through node2's proxy, with the client's address: {r:?}"
    );
    Ok(())
}
