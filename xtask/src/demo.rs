//! `cargo xtask demo`: a 2-node cluster, one connection from an enrolled pod (captured by the
//! node proxy) and one from a pod that is not enrolled (untouched), narrated.

use anyhow::{Context, Result};
use sidenode_tests::cluster::{Cluster, ClusterOpts, TestCluster};
use sidenode_tests::workload::{Server, Session};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PREFIX: &str = "sndemo";

pub fn run() -> Result<()> {
    let mesh_node = crate::mesh_node_bin();
    let testpod = mesh_node.with_file_name("testpod");
    for bin in [&mesh_node, &testpod] {
        if !bin.exists() {
            anyhow::bail!("{} not found; build the workspace first", bin.display());
        }
    }
    // A leftover demo from an interrupted run would block `up`.
    Cluster::down(PREFIX);
    say(
        "Bringing up a simulated cluster: 2 nodes, 2 pods each, a controller (CA + state stream), and an agent and a proxy per node.",
    );
    // TestCluster tears everything down when it goes out of scope, also on error.
    let cluster = TestCluster::up(ClusterOpts {
        prefix: PREFIX.into(),
        nodes: 2,
        pods: 2,
        mesh_node: mesh_node.clone(),
        start_agents: true,
        mesh: true,
        ..Default::default()
    })?;
    let res = steps(&cluster, &mesh_node, &testpod);
    say("Tearing the cluster down.");
    drop(cluster);
    res
}

fn say(s: &str) {
    println!("\n==> {s}");
}

fn steps(c: &Cluster, mesh_node: &Path, testpod: &Path) -> Result<()> {
    for p in &c.status().pods {
        println!(
            "  {:<10} ns={:<6} ip={:<11} {}",
            p.name,
            p.namespace,
            p.ip,
            if p.namespace == "mesh" {
                "(enrolled)"
            } else {
                "(not enrolled)"
            }
        );
    }
    let server_pod = "node2-pod1";
    let server_ip = c.pod(server_pod)?.ip.clone();
    let target = format!("{server_ip}:8080");
    say(&format!(
        "Starting an echo server in {server_pod} ({target}); it greets each connection with the peer address it sees."
    ));
    let _server = Server::start(c, testpod, server_pod, &[8080])?;
    // node2's proxy opens its HBONE listener inside the server pod once it has the state.
    let log = c.log_path("node2", "proxy");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("HBONE listener open pod=mesh/node2-pod1")
    {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("node2's proxy did not open the HBONE listener of {server_pod}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let client = "node1-pod1";
    say(&format!(
        "Opening a connection from {client} ({}, namespace mesh, enrolled) to {target}.",
        c.pod(client)?.ip
    ));
    let mut s = Session::open(c, testpod, client, &target)?;
    say(&format!(
        "While it is open, the node1 maps (`mesh-node maps --bpffs {}`):",
        c.node_bpffs("node1").display()
    ));
    let out = Command::new(mesh_node)
        .arg("maps")
        .arg("--bpffs")
        .arg(c.node_bpffs("node1"))
        .output()
        .context("running mesh-node maps")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!("(the enrolled workloads, and an original-destination entry pointing at {target})");
    say("Sending a line through it.");
    println!("  echo: {}", s.echo("hello through the mesh")?);
    println!("  server said: {}", s.hello);
    println!(
        "  The server saw peer={} — the client pod's address, with a port of node2's proxy: node1's proxy\n  captured the connection and carried it to node2 in an HBONE tunnel (HTTP/2 CONNECT over mutual\n  TLS 1.3), and node2's proxy connected to the pod from inside its namespace with the client's\n  address (as ztunnel does). The logs below show the tunnel.",
        s.server_peer
    );
    s.close()?;
    std::thread::sleep(Duration::from_millis(500));
    say(
        "node1's proxy log: the connection went out as HBONE, with both SPIFFE identities checked:",
    );
    print_matching(&c.log_path("node1", "proxy"), &target);
    say(
        "node2's proxy log: the tunnel arrived on the pod's 15008 listener, from the proven identity:",
    );
    print_matching(&c.log_path("node2", "proxy"), "inbound connection closed");

    let plain = "node1-pod2";
    say(&format!(
        "Now the same from {plain} ({}, namespace plain, not enrolled).",
        c.pod(plain)?.ip
    ));
    let mut s = Session::open(c, testpod, plain, &target)?;
    println!("  echo: {}", s.echo("hello, directly")?);
    println!("  server said: {}", s.hello);
    println!(
        "  The server saw peer={} — the pod's own address and port: the connection went straight,\n  untouched (no proxy log line for it).",
        s.server_peer
    );
    s.close()?;
    Ok(())
}

fn print_matching(log: &Path, needle: &str) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut any = false;
    for l in text.lines().filter(|l| l.contains(needle)) {
        println!("  {l}");
        any = true;
    }
    if !any {
        println!("  (no line mentions {needle} yet)");
    }
}
