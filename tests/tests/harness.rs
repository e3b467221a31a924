//! The simulated cluster alone (no agents): addressing, routing across nodes, pod cgroups,
//! and a teardown that leaves nothing behind. Needs root, not mesh-node.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use sidenode_tests::cluster::{Cluster, ClusterOpts, TestCluster, cgroup2_mount, unique_prefix};
use sidenode_tests::workload::{Server, dial};

#[test]
fn cluster_routes_pods_across_nodes_and_cleans_up() -> Result<()> {
    require_root();
    let prefix = unique_prefix('h');
    let c = TestCluster::up(ClusterOpts {
        prefix: prefix.clone(),
        nodes: 2,
        pods: 2,
        mesh_node: "/nonexistent/mesh-node".into(),
        start_agents: false,
        ..Default::default()
    })?;
    let st = c.status().clone();
    ensure!(st.nodes.len() == 2 && st.pods.len() == 4, "status: {st:?}");
    ensure!(
        c.pod("node1-pod2")?.namespace == "plain",
        "last pod should be plain"
    );

    let srv = Server::start(&c, &testpod(), "node2-pod1", &[8080])?;
    // The server runs in the pod's cgroup.
    let procs = std::fs::read_to_string(c.pod("node2-pod1")?.cgroup.join("cgroup.procs"))?;
    ensure!(!procs.trim().is_empty(), "server is not in the pod cgroup");
    let targets = vec!["198.19.2.2:8080".to_string()];
    for client in ["node1-pod1", "node1-pod2", "node2-pod2"] {
        let r = dial(&c, &testpod(), client, &targets, 4, 2, 0)?;
        let ip = c.pod(client)?.ip.clone();
        for x in &r {
            ensure!(x.echo_ok, "{client}: {x:?}");
            ensure!(
                x.server_peer.as_deref().map(ip_of) == Some(ip.as_str()),
                "{x:?}"
            );
        }
    }
    // Node to node, over the bridge.
    let out = c
        .node_command("node1", "ip")?
        .args(["-o", "addr", "show", "dev", "eth0"])
        .output()
        .context("ip addr in node1")?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("198.18.0.1/24"));
    drop(srv);
    drop(c);

    let left: Vec<String> = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())?
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    ensure!(left.is_empty(), "netns left: {left:?}");
    ensure!(
        !cgroup2_mount()?.join(&prefix).exists(),
        "cgroup folder left"
    );
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    ensure!(
        !mounts.contains(&format!("sidenode-{prefix}")),
        "bpffs still mounted"
    );
    ensure!(
        !std::path::Path::new(&format!("/run/sidenode-{prefix}")).exists(),
        "state dir left"
    );
    // Down again is harmless.
    Cluster::down(&prefix);
    Ok(())
}

/// Agent/proxy management with a stand-in `mesh-node` (a shell script that prints its
/// readiness line): start, readiness, kill, restart, teardown of everything.
#[test]
fn agents_start_restart_and_are_torn_down() -> Result<()> {
    require_root();
    let prefix = unique_prefix('h');
    let dir = std::env::temp_dir().join(format!("sidenode-fake-{prefix}"));
    std::fs::create_dir_all(&dir)?;
    let fake = dir.join("mesh-node");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"$1 args: $*\"\necho \"$1 ready\"\nwhile :; do sleep 1; done\n",
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut c = TestCluster::up(ClusterOpts {
        prefix: prefix.clone(),
        nodes: 2,
        pods: 1,
        mesh_node: fake.clone(),
        start_agents: true,
        ..Default::default()
    })?;
    let line = c.wait_for_log("node2", "agent", "args:", std::time::Duration::from_secs(1))?;
    ensure!(
        line.contains("--cgroup-root") && line.contains("--proxy-ip 198.18.0.2"),
        "{line}"
    );
    ensure!(c.is_alive("node1", "agent") && c.is_alive("node1", "proxy"));
    let old = c.pid("node1", "agent").context("pid")?;
    c.kill_process("node1", "agent", libc::SIGKILL)?;
    ensure!(!c.is_alive("node1", "agent"));
    c.restart_process("node1", "agent")?;
    ensure!(c.is_alive("node1", "agent") && c.pid("node1", "agent") != Some(old));
    let pids: Vec<u32> = ["agent", "proxy"]
        .iter()
        .flat_map(|k| c.node_names().into_iter().filter_map(|n| c.pid(&n, k)))
        .collect();
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(100));
    for p in pids {
        ensure!(
            !sidenode_tests::cluster::pid_alive(p),
            "pid {p} still alive"
        );
    }
    ensure!(!std::path::Path::new(&format!("/run/sidenode-{prefix}")).exists());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
