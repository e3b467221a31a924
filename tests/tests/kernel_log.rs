//! End-to-end test of the kernel programs' decision logs (aya-log): off by default; switched
//! on at run time for one pod, then for all, then off again, with `mesh-node log-level
//! --kernel` on a node's pins; the agent writes each record with the pod's name (captured,
//! recorded, not captured and why, dropped by STRICT). Capture mode, file config.
//! Run as root: `cargo test -p sidenode-tests --test kernel_log`.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{Server, dial, mesh_node_path};
use std::process::Command;
use std::time::Duration;

/// Node 2's first pod (meshed) serves 8080 and 9000 (an excluded port).
const TARGET: &str = "198.19.2.2:8080";
const EXCLUDED: &str = "198.19.2.2:9000";
const WAIT: Duration = Duration::from_secs(10);

/// `mesh-node log-level --kernel [setting] --bpffs <node's>`: its output.
fn kernel_log(c: &Cluster, node: &str, setting: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(mesh_node_path());
    cmd.args(["log-level", "--kernel", "--bpffs"])
        .arg(c.node_bpffs(node));
    if let Some(s) = setting {
        cmd.arg(s);
    }
    let out = cmd
        .output()
        .context("running mesh-node log-level --kernel")?;
    ensure!(
        out.status.success(),
        "log-level --kernel {setting:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One connection attempt, whatever its outcome.
fn attempt(c: &Cluster, pod: &str, target: &str) -> Result<()> {
    dial(c, &testpod(), pod, &[target.to_string()], 1, 1, 0)?;
    Ok(())
}

fn agent_log_since(c: &Cluster, node: &str, offset: u64) -> String {
    agent_log_between(c, node, offset, u64::MAX)
}

/// The agent's log between two offsets (`log_len` values).
fn agent_log_between(c: &Cluster, node: &str, from: u64, to: u64) -> String {
    let bytes = std::fs::read(c.log_path(node, "agent")).unwrap_or_default();
    let end = usize::try_from(to).unwrap_or(usize::MAX).min(bytes.len());
    let start = usize::try_from(from).unwrap_or(0).min(end);
    String::from_utf8_lossy(&bytes[start..end]).into_owned()
}

#[test]
fn kernel_decision_logs_follow_the_switch() -> Result<()> {
    let _turn = serial();
    // Three pods per node: pod1 and pod2 meshed, pod3 plain.
    let c = cluster_with(3, vec!["--exclude-ports".into(), "9000".into()])?;
    let _srv = Server::start(&c, &testpod(), "node2-pod1", &[8080, 9000])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod2")?;

    // Off by default: captured connections leave no kernel record.
    ensure!(kernel_log(&c, "node1", None)? == "kernel decision logs: off");
    let off = c.log_len("node1", "agent");
    expect_captured(&c, "node1-pod1", TARGET, true).context("logs off")?;

    // One pod: its decisions are logged with its name, the other pod's are not.
    let out = kernel_log(&c, "node1", Some("mesh/node1-pod1"))?;
    ensure!(out == "kernel decision logs: mesh/node1-pod1", "{out}");
    let one = c.log_len("node1", "agent");
    attempt(&c, "node1-pod2", TARGET)?;
    expect_captured(&c, "node1-pod1", TARGET, true).context("logs on for pod1")?;
    wait_log_all(
        &c,
        "node1",
        "agent",
        one,
        &[
            "captured: netns=",
            "pod=mesh/node1-pod1",
            "dst=198.19.2.2:8080",
        ],
        WAIT,
    )?;
    wait_log_all(
        &c,
        "node1",
        "agent",
        one,
        &[
            "recorded: netns=",
            "pod=mesh/node1-pod1",
            "dst=198.19.2.2:8080",
        ],
        WAIT,
    )?;
    expect_captured(&c, "node1-pod1", EXCLUDED, false)?;
    wait_log_all(
        &c,
        "node1",
        "agent",
        one,
        &[
            "not captured (excluded port)",
            "pod=mesh/node1-pod1",
            "dst=198.19.2.2:9000",
        ],
        WAIT,
    )?;
    // The records come in order: pod1's last one is there, so pod2's would be too.
    let text = agent_log_since(&c, "node1", one);
    ensure!(
        !text.contains("pod=mesh/node1-pod2"),
        "pod2 was logged while only pod1 was selected:\n{text}"
    );
    ensure!(
        !agent_log_between(&c, "node1", off, one).contains("captured: netns="),
        "a kernel record was written while the logs were off"
    );

    // Every pod.
    ensure!(kernel_log(&c, "node1", Some("all"))? == "kernel decision logs: every pod");
    let all = c.log_len("node1", "agent");
    expect_captured(&c, "node1-pod2", TARGET, true)?;
    wait_log_all(
        &c,
        "node1",
        "agent",
        all,
        &[
            "captured: netns=",
            "pod=mesh/node1-pod2",
            "dst=198.19.2.2:8080",
        ],
        WAIT,
    )?;

    // A STRICT drop on node 2 names the destination pod.
    c.write_config_file(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: mesh\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    kernel_log(&c, "node2", Some("all"))?;
    let strict = c.log_len("node2", "agent");
    let dropped = wait_until(WAIT, || {
        attempt(&c, "node1-pod3", TARGET)?;
        let text = agent_log_since(&c, "node2", strict);
        Ok(text.lines().any(|l| {
            l.contains("dropped by STRICT")
                && l.contains("pod=mesh/node2-pod1")
                && l.contains("src=198.19.1.4")
        }))
    })?;
    ensure!(
        dropped,
        "no STRICT drop logged on node 2:\n{}",
        agent_log_since(&c, "node2", strict)
    );

    // Off again (and STRICT gone, so node 1's plaintext connection gets through): the switch
    // says so, and captured connections leave no record.
    c.remove_config_file("strict.yaml")?;
    ensure!(kernel_log(&c, "node1", Some("off"))? == "kernel decision logs: off");
    let again = c.log_len("node1", "agent");
    wait_captured(&c, "node1-pod1", TARGET, true, WAIT).context("after STRICT is gone")?;
    std::thread::sleep(Duration::from_millis(500));
    let text = agent_log_since(&c, "node1", again);
    ensure!(
        !text.contains("captured: netns="),
        "kernel records after switching off:\n{text}"
    );

    // A pod that is not enrolled cannot be selected; the switch stays as it was.
    let out = Command::new(mesh_node_path())
        .args(["log-level", "--kernel", "--bpffs"])
        .arg(c.node_bpffs("node1"))
        .arg("plain/node1-pod3")
        .output()?;
    ensure!(
        !out.status.success(),
        "selecting an unenrolled pod succeeded"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr)
            .contains("not enrolled on this node: plain/node1-pod3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(kernel_log(&c, "node1", None)? == "kernel decision logs: off");
    Ok(())
}
