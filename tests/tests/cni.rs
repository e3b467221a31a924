//! The CNI plugin (`sidenode-cni`, docs/cni.md) on the simulated cluster. Run as root:
//! `cargo test -p sidenode-tests --test cni` (needs `target/debug/mesh-node` and
//! `target/debug/sidenode-cni`, or `$SIDENODE_MESH_NODE` with `sidenode-cni` next to it).
//!
//! The plugin is run exactly as a runtime runs a chained plugin: CNI_* in the environment,
//! the network configuration with a `prevResult` on stdin, in the host's namespaces. The
//! pod's Pod object has no netns annotation and its processes are not in a `pod<uid>`
//! cgroup, so the agent's reconcile cannot find its network namespace by itself: only the
//! plugin's `ADD` can enroll it. Nothing here touches the machine's /etc/cni or /opt/cni.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use serde_json::Value;
use sidenode_tests::cluster::{ClusterOpts, TestCluster, netns_path, unique_prefix};
use sidenode_tests::workload::{Server, mesh_node_path};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SERVER_POD: &str = "node2-pod2"; // plain namespace: the connection is captured, not tunnelled
const TARGET: &str = "198.19.2.3:8080";
const UID: &str = "6c3b9f1e-cafe-4bb1-9e0a-000000000013";

fn plugin_path() -> PathBuf {
    mesh_node_path().with_file_name("sidenode-cni")
}

fn cni_cluster() -> Result<TestCluster> {
    require_root();
    ensure!(
        plugin_path().exists(),
        "{} not found: `cargo build -p mesh-node --bins`",
        plugin_path().display()
    );
    TestCluster::up(ClusterOpts {
        prefix: unique_prefix('c'),
        nodes: 2,
        pods: 2,
        mesh_node: mesh_node_path(),
        start_agents: true,
        cni: true,
        ..Default::default()
    })
}

/// The Pod object a kubelet would have seen: no netns annotation, a UID.
fn pod_yaml(name: &str, ns: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"{name}\"\n  namespace: \"{ns}\"\n  uid: \"{UID}\"\n  labels:\n    app: \"{name}\"\nspec:\n  nodeName: \"node1\"\n  serviceAccountName: \"sa-cni\"\nstatus:\n  podIP: \"{ip}\"\n  podIPs:\n  - ip: \"{ip}\"\n"
    )
}

/// The network configuration a runtime hands the plugin: ours, with the bridge's result.
fn net_conf(socket: &Path, policy: &str, ip: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "sidenode-cni",
        "socket": socket,
        "timeoutMs": 4000,
        "failPolicy": policy,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": format!("{ip}/32"), "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        }
    })
    .to_string()
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// One plugin run as a runtime makes it.
fn run_plugin(command: &str, netns: &str, pod: &str, ns: &str, conf: &str) -> Result<Run> {
    run_plugin_uid(command, netns, pod, ns, UID, conf)
}

/// As [`run_plugin`], with the pod's UID.
fn run_plugin_uid(
    command: &str,
    netns: &str,
    pod: &str,
    ns: &str,
    uid: &str,
    conf: &str,
) -> Result<Run> {
    let start = Instant::now();
    let mut child = Command::new(plugin_path())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{pod}"))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/nonexistent")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=sandbox-{pod};K8S_POD_UID={uid}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sidenode-cni")?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(conf.as_bytes())
        .context("writing the network configuration")?;
    let out = child
        .wait_with_output()
        .context("waiting for sidenode-cni")?;
    Ok(Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    })
}

fn is_enrolled(c: &sidenode_tests::cluster::Cluster, ns: &str, pod: &str) -> Result<bool> {
    Ok(enrolled(c, "node1")?.contains(&(ns.to_string(), pod.to_string())))
}

#[test]
fn cni_add_enrolls_before_the_first_connect_del_removes_and_fail_policies() -> Result<()> {
    let _turn = serial();
    let mut c = cni_cluster()?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    let socket = c.cni_socket("node1");

    // A new meshed pod: its namespace exists (the runtime made it), nothing runs in it yet.
    let pod = c.add_pod("node1", "mesh", false)?;
    let ip = c.pod(&pod)?.ip.clone();
    let netns = netns_path(&c.pod(&pod)?.netns);
    let offset = c.log_len("node1", "agent");
    c.write_config_file("cni-pods.yaml", &pod_yaml(&pod, "mesh", &ip))?;
    // The agent has read the Pod object and cannot find the pod's namespace on its own.
    c.wait_for_log_after(
        "node1",
        "agent",
        offset,
        &format!("mesh/{pod}"),
        Duration::from_secs(10),
    )?;
    ensure!(
        !is_enrolled(&c, "mesh", &pod)?,
        "enrolled without the CNI plugin"
    );

    // ADD, exactly as the runtime chains it after the network plugin.
    let add = run_plugin(
        "ADD",
        &netns,
        &pod,
        "mesh",
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    let result: Value = serde_json::from_str(add.stdout.trim()).context("ADD result")?;
    ensure!(
        result["ips"][0]["address"] == format!("{ip}/32") && result["cniVersion"] == "1.0.0",
        "ADD did not pass prevResult through: {result}"
    );
    eprintln!("ADD took {:?}", add.took);
    // The pod's very first action: connect. Captured.
    let r = dial_one(&c, &pod, TARGET)?;
    ensure!(
        r.server_peer.as_deref().map(ip_of) == Some(c.node("node1")?.ip.as_str()),
        "the pod's first connection was not captured: {r:?}"
    );
    ensure!(
        is_enrolled(&c, "mesh", &pod)?,
        "not in SN_ENROLLED after ADD"
    );
    // The reconcile keeps it (same cookie through the CNI's namespace): no churn.
    let offset = c.log_len("node1", "agent");
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        is_enrolled(&c, "mesh", &pod)?,
        "the reconcile removed the CNI enrollment"
    );
    let log = std::fs::read_to_string(c.log_path("node1", "agent"))?;
    let later = log.get(offset as usize..).unwrap_or_default();
    ensure!(
        !later
            .lines()
            .any(|l| l.contains("enrolled") && l.contains(&format!("mesh/{pod}"))),
        "reconcile churn after the CNI enrollment: {later}"
    );

    // CHECK answers while the agent is up.
    let check = run_plugin(
        "CHECK",
        &netns,
        &pod,
        "mesh",
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(
        check.ok && check.stdout.trim().is_empty(),
        "CHECK: {} {}",
        check.stdout,
        check.stderr
    );

    // DEL removes the enrollment at once, and the reconcile does not bring it back.
    let del = run_plugin(
        "DEL",
        &netns,
        &pod,
        "mesh",
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(
        del.ok && del.stdout.trim().is_empty(),
        "DEL: {} {}",
        del.stdout,
        del.stderr
    );
    ensure!(!is_enrolled(&c, "mesh", &pod)?, "still enrolled after DEL");
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(!is_enrolled(&c, "mesh", &pod)?, "enrolled again after DEL");
    expect_captured(&c, &pod, TARGET, false)?;

    // A pod of a namespace without the mesh: answered not-meshed, not enrolled.
    let plain = c.add_pod("node1", "plain", false)?;
    let plain_ip = c.pod(&plain)?.ip.clone();
    c.write_config_file("cni-plain.yaml", &pod_yaml(&plain, "plain", &plain_ip))?;
    let plain_ns = netns_path(&c.pod(&plain)?.netns);
    // The agent's wait covers the state catching up with the new object.
    let add = run_plugin(
        "ADD",
        &plain_ns,
        &plain,
        "plain",
        &net_conf(&socket, "closed", &plain_ip),
    )?;
    ensure!(add.ok, "ADD (plain): {} {}", add.stdout, add.stderr);
    ensure!(
        add.stderr.contains("NotMeshed"),
        "ADD (plain) not answered not-meshed: {}",
        add.stderr
    );
    ensure!(
        !is_enrolled(&c, "plain", &plain)?,
        "a plain pod was enrolled"
    );

    // The agent down: fail-closed fails the ADD with a CNI error, fail-open lets the pod start.
    c.kill_process("node1", "agent", libc::SIGKILL)?;
    let closed = run_plugin(
        "ADD",
        &netns,
        &pod,
        "mesh",
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(!closed.ok, "fail-closed ADD succeeded with the agent down");
    let err: Value = serde_json::from_str(closed.stdout.trim()).context("CNI error JSON")?;
    ensure!(
        err["code"] == 11
            && err["msg"]
                .as_str()
                .is_some_and(|m| m.contains("node agent") && m.contains(&pod)),
        "unexpected CNI error: {err}"
    );
    let open = run_plugin("ADD", &netns, &pod, "mesh", &net_conf(&socket, "open", &ip))?;
    ensure!(
        open.ok,
        "fail-open ADD failed: {} {}",
        open.stdout,
        open.stderr
    );
    ensure!(
        open.stderr.contains("failPolicy open"),
        "fail-open did not log: {}",
        open.stderr
    );
    // DEL never fails, agent or not.
    let del = run_plugin(
        "DEL",
        &netns,
        &pod,
        "mesh",
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(del.ok, "DEL with the agent down failed: {}", del.stdout);
    Ok(())
}

/// `mesh-node cni install` / `uninstall` on temporary folders (never the machine's).
#[test]
fn installer_round_trip_on_temp_dirs() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sidenode-cni-{}", unique_prefix('i')));
    let conf = dir.join("net.d");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&conf)?;
    let result = (|| -> Result<()> {
        let bridge = r#"{"cniVersion":"0.4.0","name":"bridge-net","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.99.0.0/16"}}"#;
        std::fs::write(conf.join("10-bridge.conf"), bridge)?;
        let run = |args: &[&str]| -> Result<String> {
            let out = Command::new(mesh_node_path()).args(args).output()?;
            ensure!(
                out.status.success(),
                "mesh-node {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let (c, b) = (conf.to_string_lossy(), bin.to_string_lossy());
        let install = [
            "cni",
            "install",
            "--conf-dir",
            &c,
            "--bin-dir",
            &b,
            "--fail-policy",
            "closed",
            "--timeout-ms",
            "3000",
        ];
        run(&install)?;
        run(&install)?; // idempotent
        ensure!(bin.join("sidenode-cni").exists(), "binary not installed");
        let list: Value =
            serde_json::from_str(&std::fs::read_to_string(conf.join("10-bridge.conflist"))?)?;
        ensure!(
            list["plugins"][1]["type"] == "sidenode-cni"
                && list["plugins"][1]["failPolicy"] == "closed",
            "{list}"
        );
        ensure!(
            list["plugins"].as_array().map(Vec::len) == Some(2),
            "{list}"
        );
        ensure!(
            !conf.join("10-bridge.conf").exists(),
            "the .conf was not converted"
        );
        run(&["cni", "uninstall", "--conf-dir", &c, "--bin-dir", &b])?;
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(conf.join("10-bridge.conf"))?)?;
        ensure!(
            back == serde_json::from_str::<Value>(bridge)?,
            "not restored: {back}"
        );
        ensure!(!bin.join("sidenode-cni").exists(), "binary left");
        // `mesh-node uninstall --cni-conf-dir` does the same (here with an empty pin folder).
        run(&install)?;
        let pins = dir.join("bpffs");
        let p = pins.to_string_lossy();
        run(&[
            "uninstall",
            "--bpffs",
            &p,
            "--cni-conf-dir",
            &c,
            "--cni-bin-dir",
            &b,
        ])?;
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(conf.join("10-bridge.conf"))?)?;
        ensure!(
            back == serde_json::from_str::<Value>(bridge)?,
            "not restored by uninstall: {back}"
        );
        ensure!(
            !bin.join("sidenode-cni").exists() && !conf.join("10-bridge.conflist").exists(),
            "left after uninstall"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Kubernetes mode (real kube-apiserver, controller reading it): the controller's state has a
/// pod only once it has an address, after `ADD`; the agent reads the Pod and its Namespace
/// from the API instead, enrolls at once, and keeps the enrollment until the state has the pod.
#[test]
fn kubernetes_mode_new_pod_enrolled_from_the_api_at_add() -> Result<()> {
    let _turn = serial();
    require_root();
    let mut c = TestCluster::up(ClusterOpts {
        prefix: unique_prefix('c'),
        nodes: 2,
        pods: 2,
        mesh_node: mesh_node_path(),
        kube: true,
        mesh: true,
        cni: true,
        ..Default::default()
    })?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    let socket = c.cni_socket("node1");
    let pod = c.add_pod("node1", "mesh", false)?;
    let ip = c.pod(&pod)?.ip.clone();
    let netns = netns_path(&c.pod(&pod)?.netns);
    // The Pod as the scheduler left it: bound to node1, no status (no address yet).
    let obj = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": "mesh", "labels": {"app": pod}},
        "spec": {"nodeName": "node1", "serviceAccountName": "sa-node1-pod1",
                 "containers": [{"name": "app", "image": "testpod"}]}
    });
    let file = c.state_dir.join("tmp").join("cni-pod.json");
    std::fs::write(&file, obj.to_string())?;
    c.kubectl(&["create", "-f", &file.to_string_lossy()])?;
    let uid = c
        .pod_uids()?
        .get(&("mesh".to_string(), pod.clone()))
        .cloned()
        .context("no uid for the new pod")?;

    let add = run_plugin_uid(
        "ADD",
        &netns,
        &pod,
        "mesh",
        &uid,
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    ensure!(
        add.stderr.contains("Enrolled"),
        "ADD was not answered enrolled: {}",
        add.stderr
    );
    eprintln!("ADD took {:?}", add.took);
    let r = dial_one(&c, &pod, TARGET)?;
    ensure!(
        r.server_peer.as_deref().map(ip_of) == Some(c.node("node1")?.ip.as_str()),
        "the pod's first connection was not captured: {r:?}"
    );
    // Still enrolled while the state has no address for the pod, and after it has one.
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        is_enrolled(&c, "mesh", &pod)?,
        "the reconcile dropped the CNI enrollment"
    );
    c.set_pod_ready(&pod, "mesh", true)?;
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        is_enrolled(&c, "mesh", &pod)?,
        "not enrolled once the state has the pod"
    );
    expect_captured(&c, &pod, TARGET, true)?;
    let del = run_plugin_uid(
        "DEL",
        &netns,
        &pod,
        "mesh",
        &uid,
        &net_conf(&socket, "closed", &ip),
    )?;
    ensure!(del.ok, "DEL: {}", del.stdout);
    ensure!(!is_enrolled(&c, "mesh", &pod)?, "still enrolled after DEL");
    Ok(())
}

/// Chained after Debian's real `bridge` + `host-local` plugins (containernetworking-plugins),
/// as a runtime chains them: the bridge plugin runs in node 1's namespace (the test's own) and
/// wires a fresh pod namespace to a bridge there; its result is the `prevResult` of
/// `sidenode-cni`. The pod's subnet is not routed back from node 2, so the pod's first
/// connection only works if it was captured (the node proxy connects from the node's address).
#[test]
fn chained_after_the_real_bridge_plugin() -> Result<()> {
    let bridge = Path::new("/usr/lib/cni/bridge");
    if !bridge.exists() {
        eprintln!(
            "skipped: {} not installed (containernetworking-plugins)",
            bridge.display()
        );
        return Ok(());
    }
    let _turn = serial();
    let c = cni_cluster()?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    let socket = c.cni_socket("node1");
    let p = &c.opts.prefix;
    let pod_ns = format!("{p}-brpod");
    let sh = |args: &[&str]| -> Result<()> {
        let out = Command::new(args[0]).args(&args[1..]).output()?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    sh(&["ip", "netns", "add", &pod_ns])?;
    let netns = netns_path(&pod_ns);
    let node_ns = netns_path(&c.node("node1")?.netns);
    let ipam_dir = c.state_dir.join("tmp").join("ipam");
    let bridge_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "sn-bridge", "type": "bridge", "bridge": "snbr0",
        "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": ipam_dir,
                 "ranges": [[{"subnet": "10.251.0.0/24"}]],
                 "routes": [{"dst": "0.0.0.0/0"}]}
    });
    let container = format!("sandbox-{p}-br");
    let mut child = Command::new("nsenter")
        .arg(format!("--net={node_ns}"))
        .arg("--")
        .arg(bridge)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &container)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("bridge stdin")?
        .write_all(bridge_conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "bridge ADD: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let prev: Value = serde_json::from_slice(&out.stdout).context("bridge result")?;
    let ip = prev["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("bridge result has no address")?
        .to_string();

    // The Pod object (written now: the agent's wait covers the state catching up).
    let pod = "node1-br";
    c.write_config_file("cni-br.yaml", &pod_yaml(pod, "mesh", &ip))?;
    let mut conf: Value = serde_json::from_str(&net_conf(&socket, "closed", &ip))?;
    conf["prevResult"] = prev.clone();
    let add = run_plugin("ADD", &netns, pod, "mesh", &conf.to_string())?;
    ensure!(add.ok, "ADD: {} {}", add.stdout, add.stderr);
    let result: Value = serde_json::from_str(add.stdout.trim())?;
    ensure!(
        result["ips"] == prev["ips"] && result["interfaces"] == prev["interfaces"],
        "prevResult not passed through: {result}"
    );

    // The pod's process: joins a cgroup below node 1's, enters the namespace, connects.
    let cg = c.node_cgroup("node1").join("podbr");
    std::fs::create_dir_all(&cg)?;
    let script = format!(
        "echo $$ > {} && exec nsenter --net={netns} -- {} dial --to {TARGET} --conns 1 --concurrency 1 --hold-ms 0",
        cg.join("cgroup.procs").display(),
        testpod().display()
    );
    let out = Command::new("sh").args(["-c", &script]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "no dial report: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let report: sidenode_tests::workload::DialReport = serde_json::from_str(line)?;
    let r = report.results.first().context("empty dial report")?;
    ensure!(
        r.echo_ok && r.server_peer.as_deref().map(ip_of) == Some(c.node("node1")?.ip.as_str()),
        "the bridge pod's first connection was not captured: {r:?}"
    );
    eprintln!("bridge pod {ip}: {r:?}; ADD: {}", add.stderr.trim());
    let del = run_plugin("DEL", &netns, pod, "mesh", &conf.to_string())?;
    ensure!(del.ok, "DEL: {}", del.stdout);
    ensure!(!is_enrolled(&c, "mesh", pod)?, "still enrolled after DEL");
    Ok(())
}
