//! End-to-end capture tests on the simulated cluster. Run as root:
//! `cargo test -p sidenode-tests --test capture` (needs `target/debug/mesh-node` or
//! `$SIDENODE_MESH_NODE`). The tests take turns (`serial()`: one cluster at a time, whatever
//! the number of test threads); each has its own cluster prefix, torn down on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{PodObject, netns_path};
use sidenode_tests::workload::{DialResult, Server, Session, dial};
use std::collections::BTreeMap;
use std::time::Duration;

const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";

#[test]
fn enrolled_pod_is_captured_plain_is_not_and_unenroll_stops_capture() -> Result<()> {
    let _turn = serial();
    let mut c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;

    // Captured: the server sees node1's proxy, the client keeps its own address.
    let r = dial_one(&c, "node1-pod1", TARGET)?;
    ensure!(was_captured(&c, "node1-pod1", &r)?, "not captured: {r:?}");
    ensure!(
        r.local.as_deref().map(ip_of) == Some("198.19.1.2"),
        "client local address is not the pod IP: {r:?}"
    );
    ensure!(
        r.server_local.as_deref() == Some(TARGET),
        "wrong destination: {r:?}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        0,
        &["connection complete", &format!("dst.addr={TARGET}")],
        Duration::from_secs(5),
    )?;

    // While a session is open, the orig-dst map has its entry.
    let mut s = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(
        ip_of(&s.server_peer) == "198.18.0.1",
        "session not captured: {}",
        s.hello
    );
    let v = c.maps_json("node1")?;
    let entries = v["orig_dst"]
        .as_array()
        .context("maps --json: no orig_dst")?;
    ensure!(
        entries
            .iter()
            .any(|e| e["dst"] == TARGET && e["pod"] == "node1-pod1" && e["namespace"] == "mesh"),
        "no orig_dst entry for {TARGET} from mesh/node1-pod1 while the session is open: {v}"
    );
    ensure!(s.echo("before")? == "before", "echo mismatch");

    // Not enrolled: untouched.
    expect_captured(&c, "node1-pod2", TARGET, false)?;

    // Un-enroll the namespace: new connections stop being captured within 2 s.
    c.set_namespace_enabled("mesh", false)?;
    let took = wait_captured(&c, "node1-pod1", TARGET, false, Duration::from_secs(2))?;
    eprintln!("capture stopped {took:?} after un-enrolling");
    // The established, captured connection keeps working.
    ensure!(s.echo("after")? == "after", "echo after un-enroll mismatch");
    s.close()?;
    Ok(())
}

#[test]
fn agent_sigkill_keeps_traffic_and_restart_adopts_state() -> Result<()> {
    let _turn = serial();
    let mut c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    let before = enrolled(&c, "node1")?;
    let mut s = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(
        ip_of(&s.server_peer) == "198.18.0.1",
        "session not captured: {}",
        s.hello
    );

    c.kill_process("node1", "agent", libc::SIGKILL)?;
    ensure!(
        s.echo("after kill")? == "after kill",
        "echo after agent kill"
    );
    expect_captured(&c, "node1-pod1", TARGET, true).context("new connection with agent dead")?;

    c.restart_process("node1", "agent")?;
    let took = wait_captured(&c, "node1-pod1", TARGET, true, Duration::from_secs(2))?;
    eprintln!("captured {took:?} after the agent was ready again");
    let after = enrolled(&c, "node1")?;
    ensure!(
        before == after,
        "enrolled set changed across agent restart: before {before:?}, after {after:?}"
    );
    ensure!(
        s.echo("after restart")? == "after restart",
        "echo after restart"
    );
    s.close()?;
    Ok(())
}

/// The program id behind a node's pinned link (`bpftool link show pinned`).
fn linked_program(c: &sidenode_tests::cluster::Cluster, node: &str, prog: &str) -> Result<u64> {
    let path = c.node_bpffs(node).join("sidenode/links").join(prog);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&path)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool link show {}: {out:?}",
        path.display()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["prog_id"]
        .as_u64()
        .with_context(|| format!("no prog_id in {v}"))
}

#[test]
fn agent_with_another_object_replaces_the_programs_in_place_without_a_gap() -> Result<()> {
    let _turn = serial();
    let mut c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    let mut s = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(
        ip_of(&s.server_peer) == "198.18.0.1",
        "session not captured: {}",
        s.hello
    );
    let progs = ["sn_connect4", "sn_connect6", "sn_sockops", "sn_strict_in"];
    let before: Vec<u64> = progs
        .iter()
        .map(|p| linked_program(&c, "node1", p))
        .collect::<Result<_>>()?;

    // Connections attempted all along, while the agent is replaced by one whose object
    // counts as another build: every one is captured and served.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let offset = c.log_len("node1", "agent");
    // A second handle on the same cluster for the dialing thread (this one restarts).
    let view = sidenode_tests::cluster::Cluster::load(&c.opts.prefix)?;
    let (attempted, failed) = std::thread::scope(|sc| -> Result<(usize, Vec<String>)> {
        let dialer = sc.spawn(|| {
            let (mut n, mut bad) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 20 {
                n += 1;
                match dial_one(&view, "node1-pod1", TARGET) {
                    Ok(r)
                        if r.echo_ok
                            && r.server_peer.as_deref().map(ip_of) == Some("198.18.0.1") => {}
                    Ok(r) => bad.push(format!("{r:?}")),
                    Err(e) => bad.push(format!("{e:#}")),
                }
            }
            (n, bad)
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut restart = || -> Result<()> {
            c.kill_process("node1", "agent", libc::SIGTERM)?;
            c.opts.agent_args = vec!["--ebpf-build-id".into(), "2".into()];
            c.restart_process("node1", "agent")
        };
        let restarted = restart();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = dialer
            .join()
            .map_err(|_| anyhow::anyhow!("dialer panicked"))?;
        restarted?;
        Ok(result)
    })?;
    ensure!(
        failed.is_empty(),
        "{} of {attempted} connections failed across the in-place upgrade: {failed:?}",
        failed.len()
    );
    wait_log_all(
        &c,
        "node1",
        "agent",
        offset,
        &["replaced the pinned programs in place"],
        Duration::from_secs(5),
    )?;
    let after: Vec<u64> = progs
        .iter()
        .map(|p| linked_program(&c, "node1", p))
        .collect::<Result<_>>()?;
    for ((p, b), a) in progs.iter().zip(&before).zip(&after) {
        ensure!(b != a, "{p}: still program {b} after the in-place upgrade");
    }
    // The established connection is untouched, and the maps were kept.
    ensure!(
        s.echo("after upgrade")? == "after upgrade",
        "echo after upgrade"
    );
    s.close()?;
    expect_captured(&c, "node1-pod1", TARGET, true).context("after the upgrade")?;

    // The same object again: adopted, nothing replaced.
    let offset = c.log_len("node1", "agent");
    c.restart_process("node1", "agent")?;
    wait_log_all(
        &c,
        "node1",
        "agent",
        offset,
        &["adopting pinned programs and maps"],
        Duration::from_secs(5),
    )?;
    ensure!(
        linked_program(&c, "node1", "sn_connect4")? == after[0],
        "the same object replaced the programs again"
    );
    eprintln!(
        "{attempted} connections across the upgrade, none failed; programs {before:?} -> {after:?}"
    );

    // Pins recorded with another map layout version: a newer object refuses to run over them,
    // saying why, and the installed programs go on capturing.
    let meta = c.node_bpffs("node1").join("sidenode/maps/SN_META");
    let out = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&meta)
        .args([
            "key", "0", "0", "0", "0", "value", "99", "0", "0", "0", "0", "0", "0", "0",
        ])
        .output()?;
    ensure!(out.status.success(), "bpftool map update: {out:?}");
    c.kill_process("node1", "agent", libc::SIGTERM)?;
    c.opts.agent_args = vec!["--ebpf-build-id".into(), "3".into()];
    let offset = c.log_len("node1", "agent");
    c.start_process("node1", "agent")?;
    wait_log_all(
        &c,
        "node1",
        "agent",
        offset,
        &[
            "the pinned maps have layout version 99, this agent's programs need 1",
            "map layout changed",
        ],
        Duration::from_secs(10),
    )?;
    ensure!(
        linked_program(&c, "node1", "sn_connect4")? == after[0],
        "programs replaced over pins of another layout"
    );
    expect_captured(&c, "node1-pod1", TARGET, true).context("after the refused upgrade")?;
    Ok(())
}

#[test]
fn original_destination_right_for_200_concurrent_connections() -> Result<()> {
    let _turn = serial();
    let c = cluster(3)?;
    // Servers on the plain pods (node<i>-pod3), two ports each; clients: all enrolled pods.
    let _s1 = Server::start(&c, &testpod(), "node1-pod3", &[8080, 8081])?;
    let _s2 = Server::start(&c, &testpod(), "node2-pod3", &[8080, 8081])?;
    let targets: Vec<String> = ["198.19.1.4", "198.19.2.4"]
        .iter()
        .flat_map(|ip| [format!("{ip}:8080"), format!("{ip}:8081")])
        .collect();
    let clients = ["node1-pod1", "node1-pod2", "node2-pod1", "node2-pod2"];
    for cl in clients {
        let node = &c.pod(cl)?.node;
        wait_enrolled(&c, node, "mesh", cl)?;
    }
    let per_client = 50;
    let results: Vec<(String, Result<Vec<DialResult>>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = clients
            .iter()
            .map(|cl| {
                let (c, targets) = (&c, &targets);
                let h =
                    sc.spawn(move || dial(c, &testpod(), cl, targets, per_client, per_client, 300));
                (cl.to_string(), h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(cl, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("dial thread panicked")));
                (cl, r)
            })
            .collect()
    });
    let mut bad = Vec::new();
    let mut total = 0;
    for (cl, r) in results {
        let r = r.with_context(|| format!("dial from {cl}"))?;
        let proxy_ip = c.node(&c.pod(&cl)?.node)?.ip.clone();
        for x in r {
            total += 1;
            let ok = x.echo_ok
                && x.server_local.as_deref() == Some(x.target.as_str())
                && x.server_peer.as_deref().map(ip_of) == Some(proxy_ip.as_str());
            if !ok {
                bad.push(format!("{cl}: {x:?}"));
            }
        }
    }
    ensure!(
        total == 4 * per_client,
        "expected {} results, got {total}",
        4 * per_client
    );
    if !bad.is_empty() {
        bail!(
            "{} of {total} connections wrong; first ones:\n{}",
            bad.len(),
            bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

#[test]
fn proxy_own_connections_are_not_captured() -> Result<()> {
    let _turn = serial();
    let mut c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    let node_ns = c.node("node1")?.netns.clone();
    // Enroll the node's own netns, where the proxy runs.
    c.add_pod_object(PodObject {
        name: "node1-host".into(),
        namespace: "mesh".into(),
        node: "node1".into(),
        ip: "198.18.0.1".into(),
        ip6: None,
        netns_path: netns_path(&node_ns),
        service_account: "sa-node1-host".into(),
        labels: BTreeMap::new(),
    })?;
    wait_enrolled(&c, "node1", "mesh", "node1-host")?;
    // Put the proxy into node1's cgroup folder, under the capture programs.
    let pid = c.pid("node1", "proxy").context("no proxy pid")?;
    let cg = c.node_cgroup("node1");
    if std::fs::write(cg.join("cgroup.procs"), pid.to_string()).is_err() {
        let sub = cg.join("proxy");
        std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        std::fs::write(sub.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving proxy {pid} into {}", sub.display()))?;
    }
    let r = dial_one(&c, "node1-pod1", TARGET)?;
    ensure!(was_captured(&c, "node1-pod1", &r)?, "not captured: {r:?}");
    let mut s = Session::open(&c, &testpod(), "node1-pod1", TARGET)?;
    ensure!(
        ip_of(&s.server_peer) == "198.18.0.1",
        "session not captured: {}",
        s.hello
    );
    ensure!(s.echo("loop-free")? == "loop-free", "echo mismatch");
    s.close()?;
    ensure!(c.is_alive("node1", "proxy"), "proxy died");
    Ok(())
}

#[test]
fn bad_config_is_reported_and_does_not_disturb_enrolled_pods() -> Result<()> {
    let _turn = serial();
    let mut c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    let before = enrolled(&c, "node1")?;
    let missing_ns = netns_path(&format!("{}-nope", c.opts.prefix));
    let pod = |extra_meta: &str, spec: &str, status: &str, netns: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n  namespace: mesh\n  annotations:\n    sidenode.io/netns: \"{netns}\"\n{extra_meta}spec:\n{spec}status:\n{status}"
        )
    };
    let good_netns = netns_path(&c.pod("node1-pod1")?.netns);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad-syntax.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n  namespace: [mesh\n".to_string(),
            "",
        ),
        (
            "bad-type.yaml",
            pod(
                "  labels: 5\n",
                "  nodeName: node1\n",
                "  podIP: 198.19.1.200\n",
                &good_netns,
            ),
            "labels",
        ),
        (
            "no-ip.yaml",
            pod("", "  nodeName: node1\n", "  phase: Running\n", &good_netns),
            "podIP",
        ),
        (
            "bad-netns.yaml",
            pod(
                "",
                "  nodeName: node1\n",
                "  podIP: 198.19.1.201\n",
                &missing_ns,
            ),
            "netns",
        ),
    ];
    for (file, yaml, problem) in cases {
        let offset = c.log_len("node1", "agent");
        c.write_config_file(file, &yaml)?;
        let stem = file.trim_end_matches(".yaml");
        let line = wait_log_all(
            &c,
            "node1",
            "agent",
            offset,
            &[stem, problem],
            Duration::from_secs(5),
        )
        .with_context(|| format!("agent did not report {file}"))?;
        eprintln!("{file}: {line}");
        let upper = line.to_uppercase();
        ensure!(
            upper.contains("ERROR") || upper.contains("WARN"),
            "{file}: report is not at error/warn level: {line}"
        );
        ensure!(c.is_alive("node1", "agent"), "{file}: agent died");
        let now = enrolled(&c, "node1")?;
        ensure!(
            before.is_subset(&now),
            "{file}: enrolled pods lost: before {before:?}, now {now:?}"
        );
        expect_captured(&c, "node1-pod1", TARGET, true).with_context(|| format!("after {file}"))?;
        c.remove_config_file(file)?;
    }
    Ok(())
}

#[test]
fn excluded_ports_and_cidrs_are_not_captured() -> Result<()> {
    let _turn = serial();
    let c = cluster_with(
        2,
        vec![
            "--exclude-ports".into(),
            "9000".into(),
            "--exclude-cidrs".into(),
            "198.19.2.3/32".into(),
        ],
    )?;
    let _s1 = Server::start(&c, &testpod(), "node2-pod1", &[8080, 9000])?;
    let _s2 = Server::start(&c, &testpod(), "node2-pod2", &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    expect_captured(&c, "node1-pod1", TARGET, true).context("ordinary port")?;
    expect_captured(&c, "node1-pod1", "198.19.2.2:9000", false).context("excluded port")?;
    expect_captured(&c, "node1-pod1", "198.19.2.3:8080", false).context("excluded CIDR")?;
    let v = c.maps_json("node1")?;
    ensure!(
        v["stats"]["excluded"].as_u64().unwrap_or(0) >= 2,
        "excluded counter: {v}"
    );
    Ok(())
}

#[test]
fn connection_without_original_destination_is_closed_and_logged() -> Result<()> {
    let _turn = serial();
    let c = cluster(2)?;
    let offset = c.log_len("node1", "proxy");
    // A pod that is not enrolled dials the proxy's outbound port itself: nothing was recorded
    // for it, so the proxy must not forward it anywhere.
    let r = dial(
        &c,
        &testpod(),
        "node1-pod2",
        &["198.18.0.1:15001".to_string()],
        1,
        1,
        0,
    )?;
    let r = r.first().context("no dial result")?;
    ensure!(
        !r.echo_ok && r.server_local.is_none(),
        "forwarded somewhere: {r:?}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &["no original destination recorded"],
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// The sockets `pid` holds open (its pooled splice pipes, kept on purpose, not counted).
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing fds of {pid}"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count())
}

#[test]
fn proxy_releases_its_sockets_after_connections_end() -> Result<()> {
    let _turn = serial();
    let c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    expect_captured(&c, "node1-pod1", TARGET, true)?;
    let pid = c.pid("node1", "proxy").context("no proxy pid")?;
    std::thread::sleep(Duration::from_millis(300));
    let baseline = open_fds(pid)?;
    let r = dial(
        &c,
        &testpod(),
        "node1-pod1",
        &[TARGET.to_string()],
        100,
        20,
        50,
    )?;
    ensure!(
        r.iter().all(|x| x.echo_ok),
        "some connections failed: {r:?}"
    );
    let back = wait_until(Duration::from_secs(5), || Ok(open_fds(pid)? <= baseline))?;
    ensure!(
        back,
        "proxy holds {} sockets after 100 finished connections (baseline {baseline})",
        open_fds(pid)?
    );
    Ok(())
}

#[test]
fn enrolling_a_namespace_captures_new_connections_and_keeps_established_ones() -> Result<()> {
    let _turn = serial();
    let mut c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    // node1-pod2 is in `plain`, not enrolled: its connection goes straight.
    let mut s = Session::open(&c, &testpod(), "node1-pod2", TARGET)?;
    ensure!(
        ip_of(&s.server_peer) == "198.19.1.3",
        "captured before enrolling: {}",
        s.hello
    );
    expect_captured(&c, "node1-pod2", TARGET, false)?;

    // Label the namespace: new connections are captured within 2 s, without restarting the pod.
    c.set_namespace_enabled("plain", true)?;
    let took = wait_captured(&c, "node1-pod2", TARGET, true, Duration::from_secs(2))?;
    eprintln!("captured {took:?} after enrolling");
    // The connection opened before keeps working, still direct.
    ensure!(
        s.echo("still here")? == "still here",
        "echo after enrolling"
    );
    s.close()?;
    Ok(())
}

#[test]
fn ipv6_connections_are_captured_too() -> Result<()> {
    let _turn = serial();
    use sidenode_tests::cluster::{node_ip6, pod_ip6};
    let c = cluster(2)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    let target = format!("[{}]:8080", pod_ip6(2, 1));
    let peer_ip = |r: &DialResult| -> Option<std::net::IpAddr> {
        r.server_peer
            .as_deref()?
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
    };
    // Enrolled: through node1's proxy, which reaches the server from node1's IPv6 address.
    let r = dial_one(&c, "node1-pod1", &target)?;
    ensure!(r.echo_ok, "{r:?}");
    ensure!(
        r.server_local.as_deref() == Some(target.as_str()),
        "wrong destination: {r:?}"
    );
    ensure!(
        peer_ip(&r) == Some(node_ip6(1).parse()?),
        "IPv6 connection from an enrolled pod not captured: {r:?}"
    );
    // Not enrolled: the server sees the pod's own IPv6 address.
    let r = dial_one(&c, "node1-pod2", &target)?;
    ensure!(
        r.echo_ok && peer_ip(&r) == Some(pod_ip6(1, 2).parse()?),
        "IPv6 connection from an unenrolled pod was touched: {r:?}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        0,
        &["connection complete", &format!("dst.addr={target}")],
        Duration::from_secs(5),
    )?;
    Ok(())
}
