//! `mesh-node doctor` on a real kernel and a simulated cluster: a healthy node (exit 0, every
//! check ok), then each failure it claims to detect, one after the other on one mesh cluster
//! (certificates live 30 s there, so one expires soon after the controller is stopped):
//! pins missing, a pod whose network namespace cannot be found, the agent down, the controller
//! down, an expired certificate. Each asserts the named check fails with a fix line and the
//! exit code is 1.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::Value;
use sidenode_tests::cluster::{Cluster, PodObject};
use sidenode_tests::workload::mesh_node_path;
use std::collections::BTreeMap;
use std::time::Duration;

/// `mesh-node doctor --json` in `node`'s network namespace, against `bpffs`: exit code and
/// report.
fn doctor_at(c: &Cluster, node: &str, bpffs: &std::path::Path) -> Result<(i32, Value)> {
    let out = c
        .node_command(node, mesh_node_path())?
        .arg("doctor")
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--cgroup-root")
        .arg(c.node_cgroup(node))
        // Certificates live 30 s here (renewed at 15 s): warn only when nearly expired.
        .args(["--cert-warn", "5s", "--json"])
        .output()
        .context("running mesh-node doctor")?;
    let code = out.status.code().context("doctor killed by a signal")?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "doctor printed no JSON report (exit {code}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, report))
}

fn doctor(c: &Cluster, node: &str) -> Result<(i32, Value)> {
    doctor_at(c, node, &c.node_bpffs(node))
}

/// The check named `name` in a report.
fn check<'a>(report: &'a Value, name: &str) -> Result<&'a Value> {
    report["checks"]
        .as_array()
        .context("no checks array")?
        .iter()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no check {name} in {report:#}"))
}

/// The named check failed, with a detail and a fix line, and the exit code says so.
fn expect_fail(code: i32, report: &Value, name: &str) -> Result<()> {
    let c = check(report, name)?;
    ensure!(
        c["status"] == "fail",
        "check {name} should fail: {c}\n{report:#}"
    );
    let fix = c["fix"].as_str().unwrap_or_default();
    ensure!(
        !fix.is_empty(),
        "check {name} failed without a fix line: {c}"
    );
    ensure!(
        !fix.contains('\n') && !c["detail"].as_str().unwrap_or("\n").contains('\n'),
        "detail and fix are one line each: {c}"
    );
    ensure!(
        code == 1,
        "exit code {code} with a failed check: {report:#}"
    );
    ensure!(
        report["healthy"] == false,
        "report says healthy: {report:#}"
    );
    Ok(())
}

/// Runs the doctor until `name` fails (the proxy needs a moment to notice some failures), at
/// most `timeout`; returns the last run.
fn wait_fail(c: &Cluster, node: &str, name: &str, timeout: Duration) -> Result<(i32, Value)> {
    let mut last = None;
    wait_until(timeout, || {
        let (code, r) = doctor(c, node)?;
        let failed = check(&r, name)?["status"] == "fail";
        last = Some((code, r));
        Ok(failed)
    })?;
    let (code, r) = last.context("the doctor never ran")?;
    expect_fail(code, &r, name)?;
    Ok((code, r))
}

#[test]
fn doctor_finds_a_healthy_node_then_each_failure() -> Result<()> {
    let _turn = serial();
    let mut c = mesh_cluster(2, Some("30s"))?;
    wait_hbone_listener(&c, "node1-pod1")?;
    wait_hbone_listener(&c, "node2-pod1")?;

    // 1. Healthy: every check ok, exit 0; the text form says so too.
    let (code, r) = doctor(&c, "node1")?;
    let not_ok: Vec<&Value> = r["checks"]
        .as_array()
        .context("checks")?
        .iter()
        .filter(|c| c["status"] != "ok")
        .collect();
    ensure!(
        not_ok.is_empty() && code == 0 && r["healthy"] == true,
        "a healthy node: exit {code}, not ok: {not_ok:#?}"
    );
    ensure!(r["node"] == "node1", "{r:#}");
    for name in [
        "capabilities",
        "kernel",
        "btf",
        "program-types",
        "map-types",
        "helpers",
        "cgroup2",
        "bpffs",
        "pins",
        "attachments",
        "agent",
        "proxy",
        "controller",
        "certificates",
        "enrollment",
    ] {
        check(&r, name)?;
    }
    let attach = check(&r, "attachments")?["detail"]
        .as_str()
        .unwrap_or_default();
    let cg = c.node_cgroup("node1");
    ensure!(
        attach.contains(&cg.display().to_string()) && attach.contains("sn_connect4"),
        "attachments should name the node's cgroup {}: {attach}",
        cg.display()
    );
    let enrollment = check(&r, "enrollment")?["detail"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        enrollment.contains("1 of 1 meshed pods"),
        "node1 has one meshed pod: {enrollment}"
    );
    let text = c
        .node_command("node1", mesh_node_path())?
        .arg("doctor")
        .arg("--bpffs")
        .arg(c.node_bpffs("node1"))
        .arg("--cgroup-root")
        .arg(c.node_cgroup("node1"))
        .args(["--cert-warn", "5s"])
        .output()?;
    let out = String::from_utf8_lossy(&text.stdout);
    eprintln!("{out}");
    ensure!(
        text.status.success() && out.starts_with("CHECK") && out.contains("node node1: healthy"),
        "text report: {out}"
    );

    // 2. Pins missing: a doctor pointed at an empty folder of the bpffs.
    let empty = c.state_dir.join("bpffs").join("empty");
    std::fs::create_dir_all(&empty)?;
    let (code, r) = doctor_at(&c, "node1", &empty)?;
    ensure!(check(&r, "bpffs")?["status"] == "ok", "{r:#}");
    expect_fail(code, &r, "pins")?;
    let pins = check(&r, "pins")?;
    ensure!(
        pins["detail"]
            .as_str()
            .is_some_and(|d| d.contains("nothing is installed"))
            && pins["fix"].as_str().is_some_and(|f| f.contains("agent")),
        "{pins}"
    );
    expect_fail(code, &r, "agent")?;

    // 3. A meshed pod whose netns annotation names a namespace that does not exist.
    let ghost = PodObject {
        name: "node1-ghost".into(),
        namespace: "mesh".into(),
        node: "node1".into(),
        ip: "198.19.1.99".into(),
        ip6: None,
        netns_path: format!("/var/run/netns/{}-nonexistent", c.opts.prefix),
        service_account: "sa-node1-ghost".into(),
        labels: BTreeMap::new(),
    };
    c.write_config_file("ghost.yaml", &ghost.to_yaml())?;
    let mut last = None;
    wait_until(Duration::from_secs(20), || {
        let (code, r) = doctor(&c, "node1")?;
        let e = check(&r, "enrollment")?;
        let named = e["status"] == "fail"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("mesh/node1-ghost ("));
        last = Some((code, r));
        Ok(named)
    })?;
    let (code, r) = last.context("no doctor run")?;
    expect_fail(code, &r, "enrollment")?;
    let e = check(&r, "enrollment")?;
    let detail = e["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("1 of 2 meshed pods")
            && detail.contains("mesh/node1-ghost (")
            && detail.contains("nonexistent"),
        "the enrollment check names the pod and its netns: {detail}"
    );
    ensure!(
        e["fix"]
            .as_str()
            .is_some_and(|f| f.contains("sidenode.io/netns")),
        "{e}"
    );
    c.remove_config_file("ghost.yaml")?;
    let ok = wait_until(Duration::from_secs(20), || {
        Ok(check(&doctor(&c, "node1")?.1, "enrollment")?["status"] == "ok")
    })?;
    ensure!(ok, "enrollment ok again once the pod is gone");

    // 4. The agent down (node2): the doctor sees its lock released at once.
    c.kill_process("node2", "agent", libc::SIGKILL)?;
    let (code, r) = doctor(&c, "node2")?;
    expect_fail(code, &r, "agent")?;
    ensure!(
        check(&r, "agent")?["fix"]
            .as_str()
            .is_some_and(|f| f.contains("start the agent")),
        "{r:#}"
    );
    // Its pins stay: capture goes on.
    ensure!(check(&r, "pins")?["status"] == "ok", "{r:#}");

    // 5. The controller down: node1's proxy notices its state stream is gone.
    c.kill_controller(libc::SIGKILL)?;
    let (_, r) = wait_fail(&c, "node1", "controller", Duration::from_secs(20))?;
    let ctl = check(&r, "controller")?;
    ensure!(
        ctl["detail"]
            .as_str()
            .is_some_and(|d| d.contains("state stream to the controller is down")),
        "{ctl}"
    );

    // 6. With the controller away the proxy cannot renew: node1's certificate expires.
    let (_, r) = wait_fail(&c, "node1", "certificates", Duration::from_secs(60))?;
    let certs = check(&r, "certificates")?;
    let detail = certs["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1 expired"),
        "{certs}"
    );
    ensure!(
        certs["fix"]
            .as_str()
            .is_some_and(|f| f.contains("controller")),
        "{certs}"
    );
    if check(&r, "controller")?["status"] != "fail" {
        bail!("the controller is still down: {r:#}");
    }
    Ok(())
}
