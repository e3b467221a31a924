//! End-to-end tests of the client's address kept on the last leg: a meshed destination pod
//! sees the client pod's IP (IPv4 and IPv6, across nodes through HBONE and on the same node) as
//! its peer, with a port of the proxy's; the pod's namespace carries the mark rule and
//! `tcp_fwmark_accept` only while it is meshed; STRICT mTLS still admits these connections; and
//! `--keep-client-address=false` brings back the node's address. The tunnels themselves leave
//! from the source pod's address (`--tunnel-from-pod`, ztunnel's in-pod mode): the
//! destination's HBONE listener sees the client pod as the TCP peer; `false` brings back the
//! node's address there too. Mesh mode, file config.
//! Run as root: `cargo test -p sidenode-tests --test client_address`.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use sidenode_tests::cluster::{Cluster, pod_ip, pod_ip6};
use sidenode_tests::workload::{Server, dial};
use std::process::Command;
use std::time::Duration;

const CLIENT: &str = "node1-pod1";
/// Meshed servers: another node (through HBONE) and the client's node (same-node path).
const REMOTE: &str = "node2-pod1";
const LOCAL: &str = "node1-pod2";
const RULE: &str = "fwmark 0x80000539 lookup 1337";

fn netns_of(c: &Cluster, pod: &str) -> Result<String> {
    Ok(c.pod(pod)?.netns.clone())
}

/// `ip rule` (and `ip -6 rule`) inside the pod's namespace.
fn rules(c: &Cluster, pod: &str, v6: bool) -> Result<String> {
    let ns = netns_of(c, pod)?;
    let mut cmd = Command::new("ip");
    if v6 {
        cmd.arg("-6");
    }
    let out = cmd.args(["-n", &ns, "rule", "show"]).output()?;
    ensure!(out.status.success(), "ip rule in {ns}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fwmark_accept(c: &Cluster, pod: &str) -> Result<String> {
    sysctl(c, pod, "ipv4/tcp_fwmark_accept")
}

/// A sysctl under /proc/sys/net as the pod's namespace has it.
fn sysctl(c: &Cluster, pod: &str, name: &str) -> Result<String> {
    let ns = netns_of(c, pod)?;
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .arg("cat")
        .arg(format!("/proc/sys/net/{name}"))
        .output()?;
    ensure!(out.status.success(), "sysctl in {ns}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The peers of the established connections to the pod's HBONE listener (`podIP:15008`), as
/// the kernel of the pod's namespace has them.
fn tunnel_peers(c: &Cluster, pod: &str) -> Result<Vec<std::net::IpAddr>> {
    let ns = netns_of(c, pod)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "ss", "-Htn", "state", "established"])
        .arg("( sport = :15008 )")
        .output()?;
    ensure!(out.status.success(), "ss in {ns}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // Columns: Recv-Q Send-Q Local Peer.
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|peer| {
            let a: std::net::SocketAddr = peer
                .parse()
                .with_context(|| format!("peer {peer:?} in {text}"))?;
            Ok(a.ip().to_canonical())
        })
        .collect()
}

/// One connection from the client to `target`; the server's peer must be the client's IP
/// with another port (a proxy connected, from the client's address).
fn sees_client(c: &Cluster, target: &str, client_ip: &str) -> Result<()> {
    let r = dial_one(c, CLIENT, target)?;
    ensure!(r.through_proxy(), "not through a proxy: {r:?}");
    let peer = r.server_peer.as_deref().context("no server peer")?;
    let seen: std::net::SocketAddr = peer.parse().context("server peer")?;
    ensure!(
        seen.ip().to_string() == client_ip,
        "{target}: the server saw {peer}, not the client {client_ip}: {r:?}"
    );
    Ok(())
}

#[test]
fn meshed_pods_see_their_clients_address() -> Result<()> {
    let _g = serial();
    // Three pods per node: pod1 and pod2 meshed, pod3 plain.
    let mut c = mesh_cluster(3, None)?;
    let _remote = Server::start(&c, &testpod(), REMOTE, &[8080])?;
    let _local = Server::start(&c, &testpod(), LOCAL, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node1", "mesh", LOCAL)?;
    wait_enrolled(&c, "node2", "mesh", REMOTE)?;
    wait_hbone_listener(&c, REMOTE)?;
    wait_hbone_listener(&c, LOCAL)?;

    // The destination pods' namespaces are set up; the client's own too (it is meshed).
    for pod in [REMOTE, LOCAL, CLIENT] {
        ensure!(rules(&c, pod, false)?.contains(RULE), "{pod}: no IPv4 rule");
        ensure!(rules(&c, pod, true)?.contains(RULE), "{pod}: no IPv6 rule");
        ensure!(fwmark_accept(&c, pod)? == "1", "{pod}: tcp_fwmark_accept");
        ensure!(
            sysctl(&c, pod, "ipv4/fwmark_reflect")? == "1",
            "{pod}: fwmark_reflect"
        );
    }

    let client4 = pod_ip(1, 1);
    let client6 = pod_ip6(1, 1);
    // Across nodes, through HBONE: IPv4 and IPv6.
    sees_client(&c, &format!("{}:8080", pod_ip(2, 1)), &client4)?;
    sees_client(&c, &format!("[{}]:8080", pod_ip6(2, 1)), &client6)?;
    // On the same node (no tunnel).
    sees_client(&c, &format!("{}:8080", pod_ip(1, 2)), &client4)?;
    sees_client(&c, &format!("[{}]:8080", pod_ip6(1, 2)), &client6)?;
    // Many at once (each its own transparent socket).
    let many = dial(
        &c,
        &testpod(),
        CLIENT,
        &[format!("{}:8080", pod_ip(2, 1))],
        20,
        10,
        0,
    )?;
    ensure!(many.len() == 20, "{many:?}");
    for r in &many {
        ensure!(
            r.echo_ok && r.through_proxy() && r.server_peer.as_deref().map(ip_of) == Some(&client4),
            "{r:?}"
        );
    }

    // The tunnel itself came from the client pod's address (dialled inside its namespace),
    // not from node 1's: the destination's listener has it as the TCP peer.
    // (The IPv6 connection went through the pod's IPv6 listener, from the client's IPv6.)
    let peers = tunnel_peers(&c, REMOTE)?;
    let seen: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
    ensure!(
        seen.contains(&client4)
            && seen.contains(&client6)
            && seen.iter().all(|p| *p == client4 || *p == client6),
        "tunnels to {REMOTE} came from {peers:?}, not from the client pod {client4} / {client6}"
    );

    // The proxy's logs still name the original client address and the tunnel.
    wait_log_all(
        &c,
        "node2",
        "proxy",
        0,
        &["connection complete", &format!("src.addr={client4}:")],
        Duration::from_secs(5),
    )?;

    // Out of the mesh: the set-up goes with the pod's listener.
    c.set_pod_opt_out(REMOTE, true)?;
    let gone = wait_until(Duration::from_secs(10), || {
        Ok(!rules(&c, REMOTE, false)?.contains(RULE) && !rules(&c, REMOTE, true)?.contains(RULE))
    })?;
    ensure!(
        gone,
        "rules left in {REMOTE}: {}",
        rules(&c, REMOTE, false)?
    );
    ensure!(
        fwmark_accept(&c, REMOTE)? == "0" && sysctl(&c, REMOTE, "ipv6/fwmark_reflect")? == "0",
        "sysctls not restored"
    );
    // Back in: set up again, and the client's address is seen again.
    c.set_pod_opt_out(REMOTE, false)?;
    let back = wait_until(Duration::from_secs(10), || {
        Ok(rules(&c, REMOTE, false)?.contains(RULE))
    })?;
    ensure!(back, "no rule after re-enrolling {REMOTE}");
    let again = wait_until(Duration::from_secs(10), || {
        Ok(sees_client(&c, &format!("{}:8080", pod_ip(2, 1)), &client4).is_ok())
    })?;
    ensure!(again, "client address not kept after re-enrolling");
    Ok(())
}

const STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: mesh
spec:
  mtls:
    mode: STRICT
"#;

#[test]
fn strict_mtls_admits_the_proxys_connection_from_the_clients_address() -> Result<()> {
    let _g = serial();
    // node1-pod2 is a plain (unenrolled) pod.
    let c = mesh_cluster(2, None)?;
    let _remote = Server::start(&c, &testpod(), REMOTE, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", REMOTE)?;
    wait_hbone_listener(&c, REMOTE)?;
    c.write_config_file("strict.yaml", STRICT)?;
    let target = format!("{}:8080", pod_ip(2, 1));
    // The kernel's STRICT check drops a plaintext SYN from another pod, yet lets the proxy's
    // (marked) connection from that same pod's address through.
    let dropped = wait_until(Duration::from_secs(10), || {
        let r = dial(
            &c,
            &testpod(),
            "node1-pod2",
            std::slice::from_ref(&target),
            1,
            1,
            0,
        )?;
        Ok(r.iter().all(|x| !x.echo_ok))
    })?;
    ensure!(
        dropped,
        "a plaintext connection from an unenrolled pod passed STRICT"
    );
    sees_client(&c, &target, &pod_ip(1, 1))?;
    Ok(())
}

#[test]
fn keep_client_address_and_tunnel_from_pod_off_use_the_nodes_address() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster_with_proxy_args(
        2,
        &["--keep-client-address=false", "--tunnel-from-pod=false"],
    )?;
    let _remote = Server::start(&c, &testpod(), REMOTE, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", REMOTE)?;
    wait_hbone_listener(&c, REMOTE)?;
    let r = dial_one(&c, CLIENT, &format!("{}:8080", pod_ip(2, 1)))?;
    let peer = r.server_peer.as_deref().context("no server peer")?;
    ensure!(ip_of(peer) != pod_ip(1, 1), "client address kept: {r:?}");
    // The tunnel came from node 1's address, not the client pod's.
    let peers = tunnel_peers(&c, REMOTE)?;
    ensure!(
        !peers.is_empty() && peers.iter().all(|p| p.to_string() != pod_ip(1, 1)),
        "with --tunnel-from-pod=false the tunnels to {REMOTE} came from {peers:?}"
    );
    ensure!(
        !rules(&c, REMOTE, false)?.contains(RULE),
        "rule set up although off"
    );
    Ok(())
}
