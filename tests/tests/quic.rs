//! End-to-end tests of HBONE over QUIC (`MeshConfig.spec.tunnelProtocol: quic`,
//! docs/architecture.md "Decision: HBONE over QUIC") on the simulated cluster: the tunnel is
//! UDP to 15008 only and encrypted, echo and checksummed 100 MB transfers both ways with
//! half-close, fallback to HTTP/2 when UDP 15008 is dropped at the destination node, and a
//! live switch back to `h2` leaving an established QUIC tunnel working. Run as root:
//! `cargo test -p sidenode-tests --test quic`. One cluster at a time (`serial()`).

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{Server, Session};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const CLIENT_POD: &str = "node1-pod1";
/// CLIENT_POD's address: tunnels leave from it (`--tunnel-from-pod`), so its packets on
/// node1's link are told from PROBE_POD's.
const CLIENT_IP: &str = "198.19.1.2";
/// Dials until a setting has reached node1, so that CLIENT_POD's pool stays empty until the
/// test's own connections.
const PROBE_POD: &str = "node1-pod2";
const MB: u64 = 1 << 20;

fn mesh_config(protocol: &str) -> String {
    format!(
        "apiVersion: sidenode.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\n\
         spec:\n  tunnelProtocol: {protocol}\n"
    )
}

/// Mesh cluster with an echo server on node2-pod1:8080, both pods enrolled, the server's
/// listeners open.
fn mesh_with_server() -> Result<(sidenode_tests::cluster::TestCluster, Server)> {
    let c = mesh_cluster(3, None)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node1", "mesh", PROBE_POD)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    wait_log_all(
        &c,
        "node2",
        "proxy",
        0,
        &["HBONE/QUIC listener open", "198.19.2.2:15008"],
        Duration::from_secs(10),
    )?;
    Ok((c, srv))
}

/// Writes `tunnelProtocol: quic` and dials from PROBE_POD until node2 accepts a QUIC
/// connection (the setting reached node1's proxy).
fn switch_to_quic(c: &Cluster) -> Result<()> {
    let offset = c.log_len("node2", "proxy");
    c.write_config_file("meshconfig.yaml", &mesh_config("quic"))?;
    let ok = wait_until(Duration::from_secs(20), || {
        let r = dial_one(c, PROBE_POD, TARGET)?;
        ensure!(r.through_proxy(), "{r:?}");
        Ok(!lines_after(
            c,
            "node2",
            "proxy",
            offset,
            "HBONE/QUIC connection accepted",
        )
        .is_empty())
    })?;
    ensure!(
        ok,
        "node2 never accepted a QUIC connection after tunnelProtocol: quic"
    );
    Ok(())
}

fn lines_after(c: &Cluster, node: &str, kind: &str, offset: u64, needle: &str) -> Vec<String> {
    let bytes = std::fs::read(c.log_path(node, kind)).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..])
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

// ---- tcpdump --------------------------------------------------------------------------------

struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// `tcpdump -i eth0 -s SNAP -w FILE` in the node's netns; returns once it is listening.
    fn start(c: &Cluster, node: &str, file: &Path, snap: u32) -> Result<Capture> {
        let mut child = c
            .node_command(node, "tcpdump")?
            .args(["-i", "eth0", "-n", "-U", "--immediate-mode", "-s"])
            .arg(snap.to_string())
            .arg("-w")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let err = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("tcpdump in {node} did not start listening: {e}");
                }
            }
        }
        Ok(Capture {
            child,
            file: file.to_path_buf(),
        })
    }

    /// SIGINT, wait, and return the pcap bytes.
    fn stop(mut self) -> Result<Vec<u8>> {
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("tcpdump did not exit after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Packets of a pcap file matching `filter`.
fn pcap_count(file: &Path, filter: &str) -> Result<usize> {
    let out = Command::new("tcpdump")
        .arg("-r")
        .arg(file)
        .args(["-nn", filter])
        .output()
        .context("running tcpdump -r")?;
    ensure!(
        out.status.success(),
        "tcpdump -r {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `testpod transfer`: `conns` connections each sending `bytes`, half-closing, and checking
/// the whole echo (FNV-1a). Fails unless every connection got back exactly what it sent.
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

#[test]
fn quic_tunnels_are_udp_only_encrypted_and_carry_every_byte() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    switch_to_quic(&c)?;

    // Echo, with a secret that must never appear on node1's link; whole packets captured.
    let pcap = c.state_dir.join("node1-eth0-quic.pcap");
    let cap = Capture::start(&c, "node1", &pcap, 0)?;
    let secret = format!("SIDENODE-SECRET-{}", random_hex(12)?);
    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(s.through_proxy(), "not through a proxy: {}", s.hello);
    ensure!(s.server_local == TARGET, "server_local: {}", s.hello);
    for i in 0..3 {
        let line = format!("{secret}-{i}");
        ensure!(s.echo(&line)? == line, "echo mismatch");
    }
    s.close()?;
    std::thread::sleep(Duration::from_millis(300));
    let bytes = cap.stop()?;
    ensure!(
        !contains(&bytes, secret.as_bytes()),
        "the secret {secret} appears in clear text on node1's eth0"
    );
    let udp = pcap_count(&pcap, &format!("udp port 15008 and host {CLIENT_IP}"))?;
    let tcp = pcap_count(&pcap, &format!("tcp port 15008 and host {CLIENT_IP}"))?;
    let app = pcap_count(&pcap, "port 8080")?;
    ensure!(udp > 0, "no UDP 15008 packets on node1's eth0");
    ensure!(
        tcp == 0,
        "{tcp} TCP 15008 packets on node1's eth0 with tunnelProtocol: quic"
    );
    ensure!(
        app == 0,
        "{app} app-port packets on the wire (should be tunnelled)"
    );
    eprintln!("echo: {udp} UDP 15008 packets, no TCP 15008, none on 8080, secret not seen");

    // 100 MB each way, checksummed, with half-close; headers only captured.
    let pcap = c.state_dir.join("node1-eth0-quic-bulk.pcap");
    let cap = Capture::start(&c, "node1", &pcap, 96)?;
    transfer(&c, CLIENT_POD, TARGET, 100 * MB, 1)?;
    // Several tunnels at once on the one pooled QUIC connection.
    transfer(&c, CLIENT_POD, TARGET, 4 * MB, 8)?;
    std::thread::sleep(Duration::from_millis(300));
    cap.stop()?;
    let udp = pcap_count(&pcap, &format!("udp port 15008 and host {CLIENT_IP}"))?;
    let tcp = pcap_count(&pcap, &format!("tcp port 15008 and host {CLIENT_IP}"))?;
    ensure!(udp > 0, "no UDP 15008 packets during the transfers");
    ensure!(tcp == 0, "{tcp} TCP 15008 packets during the transfers");
    eprintln!("transfers: {udp} UDP 15008 packets, no TCP 15008");
    Ok(())
}

#[test]
fn blocked_udp_falls_back_to_http2() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    // UDP 15008 dropped on the destination node before anything is sent over QUIC.
    let out = c
        .node_command("node2", "iptables")?
        .args(["-I", "INPUT", "-p", "udp", "--dport", "15008", "-j", "DROP"])
        .output()
        .context("running iptables")?;
    ensure!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c
        .node_command("node2", "iptables")?
        .args([
            "-I", "FORWARD", "-p", "udp", "--dport", "15008", "-j", "DROP",
        ])
        .output()
        .context("running iptables")?;
    ensure!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("meshconfig.yaml", &mesh_config("quic"))?;
    // The setting reaches node1 (a fallback is logged), and every connection meanwhile works.
    let fell_back = wait_until(Duration::from_secs(20), || {
        let r = dial_one(&c, CLIENT_POD, TARGET)?;
        ensure!(
            r.through_proxy(),
            "connection failed while UDP 15008 is dropped: {r:?}"
        );
        Ok(!lines_after(&c, "node1", "proxy", offset, "no answer over QUIC").is_empty())
    })?;
    ensure!(fell_back, "node1 never tried QUIC (no fallback logged)");
    let line = lines_after(&c, "node1", "proxy", offset, "no answer over QUIC");
    eprintln!("fallback: {}", line.join("\n"));
    // New connections after the fallback: HTTP/2 at once, the data intact.
    transfer(&c, CLIENT_POD, TARGET, 4 * MB, 4)?;
    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(
        s.echo("after fallback")? == "after fallback",
        "echo mismatch"
    );
    s.close()?;
    ensure!(
        lines_after(&c, "node2", "proxy", 0, "HBONE/QUIC connection accepted").is_empty(),
        "node2 accepted a QUIC connection although UDP 15008 is dropped"
    );
    Ok(())
}

#[test]
fn switching_protocols_live_keeps_open_tunnels() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    // An HTTP/2 tunnel open before the switch to QUIC.
    let mut over_h2 = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(over_h2.echo("h2 before")? == "h2 before", "echo mismatch");
    switch_to_quic(&c)?;
    // A QUIC tunnel open before the switch back to HTTP/2.
    let mut over_quic = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(
        over_quic.echo("quic before")? == "quic before",
        "echo mismatch"
    );
    ensure!(
        over_h2.echo("h2 after quic")? == "h2 after quic",
        "h2 tunnel broken by the switch to quic"
    );

    c.write_config_file("meshconfig.yaml", &mesh_config("h2"))?;
    // New connections go over TCP 15008 again: watch node1's link until a 1 MB transfer is
    // seen there (far more packets than the idle tunnels' keep-alives).
    let pcap = c.state_dir.join("node1-eth0-h2-again.pcap");
    let cap = Capture::start(&c, "node1", &pcap, 96)?;
    let back = wait_until(Duration::from_secs(20), || {
        transfer(&c, CLIENT_POD, TARGET, MB, 1)?;
        Ok(pcap_count(&pcap, &format!("tcp port 15008 and host {CLIENT_IP}"))? > 200)
    });
    cap.stop()?;
    ensure!(back?, "no new HTTP/2 tunnel after tunnelProtocol: h2");
    // Both tunnels opened before the switches still carry data.
    ensure!(
        over_quic.echo("quic after h2")? == "quic after h2",
        "quic tunnel broken by the switch to h2"
    );
    ensure!(
        over_h2.echo("h2 at the end")? == "h2 at the end",
        "h2 tunnel broken"
    );
    over_quic.close()?;
    over_h2.close()?;
    Ok(())
}
