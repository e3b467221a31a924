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
    say("Bringing up a simulated cluster: 2 nodes, 2 pods each, an agent and a proxy per node.");
    // TestCluster tears everything down when it goes out of scope, also on error.
    let cluster = TestCluster::up(ClusterOpts {
        prefix: PREFIX.into(),
        nodes: 2,
        pods: 2,
        mesh_node: mesh_node.clone(),
        start_agents: true,
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
        "  The server saw peer={} — node1's proxy (198.18.0.1), not the pod: the connection was captured.",
        s.server_peer
    );
    s.close()?;
    std::thread::sleep(Duration::from_millis(500));
    say("node1's proxy log lines about this destination:");
    print_matching(&c.log_path("node1", "proxy"), &target);

    let plain = "node1-pod2";
    say(&format!(
        "Now the same from {plain} ({}, namespace plain, not enrolled).",
        c.pod(plain)?.ip
    ));
    let mut s = Session::open(c, testpod, plain, &target)?;
    println!("  echo: {}", s.echo("hello, directly")?);
    println!("  server said: {}", s.hello);
    println!(
        "  The server saw peer={} — the pod's own address: the connection went straight, untouched.",
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
