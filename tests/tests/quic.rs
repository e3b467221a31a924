//! End-to-end tests of HBONE over QUIC (`MeshConfig.spec.tunnelProtocol: quic`,
//! docs/architecture.md "Decision: HBONE over QUIC") on the simulated cluster: the tunnel is
//! UDP to 15008 only and encrypted, echo and checksummed 100 MB transfers both ways with
//! half-close, fallback to HTTP/2 when UDP 15008 is dropped at the destination node, and a
//! live switch back to `h2` leaving an established QUIC tunnel working, identities refused
//! over QUIC, certificate rotation, garbage/Initial floods, STRICT and AuthorizationPolicy
//! over QUIC; the HTTP path (requests routed by a VirtualService) over QUIC tunnels, its
//! fallback to HTTP/2, and its refused tunnels counted with `transport="quic"`. Run as root:
//! `cargo test -p sidenode-tests --test quic`. One cluster at a time (`serial()`).

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::openssl::{new_csr, openssl, run_ok, sign_with_cluster_ca, write_ext};
use sidenode_tests::workload::{Server, Session};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

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
    mesh_with_server_ttl(None)
}

/// [`mesh_with_server`] with workload certificates living `cert_ttl`.
fn mesh_with_server_ttl(
    cert_ttl: Option<&str>,
) -> Result<(sidenode_tests::cluster::TestCluster, Server)> {
    let c = mesh_cluster(3, cert_ttl)?;
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
    // node1's pool holds QUIC connections (CLIENT_POD's and PROBE_POD's), told from HTTP/2
    // ones by the transport label.
    let m = proxy_metrics(&c, "node1")?;
    let quic = metric_value(
        &m,
        "sidenode_hbone_pool_connections",
        &[("transport", "quic")],
    );
    let h2 = metric_value(
        &m,
        "sidenode_hbone_pool_connections",
        &[("transport", "h2")],
    );
    ensure!(
        quic >= 1.0,
        "sidenode_hbone_pool_connections{{transport=\"quic\"}} is {quic}"
    );
    eprintln!("pool: {quic} quic, {h2} h2");
    Ok(())
}

/// A destination that closes its socket while the client is still sending (iperf3's data
/// connection, closed by the server at the end of each test) makes the destination proxy's
/// write towards the pod fail with HTTP/3 data still arriving. The proxy stops the stream and
/// goes on; it once panicked there (h3-quinn's `stop_sending` while h3 had a read in flight).
#[test]
fn a_destination_closing_mid_flow_leaves_the_quic_listener_whole() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    switch_to_quic(&c)?;
    let mut server = c
        .pod_command(SERVER_POD, "iperf3")?
        .args(["-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let server_ip = ip_of(TARGET);
    let ready = wait_until(Duration::from_secs(10), || {
        let listening = run_ok(
            c.pod_command(SERVER_POD, "ss")?
                .args(["-Htln", "sport = :5201"]),
        )?;
        Ok(!listening.is_empty())
    });
    let mut outcome = ready.and_then(|up| {
        ensure!(up, "iperf3 -s on {SERVER_POD} never accepted a connection");
        for round in 0..3 {
            run_ok(
                c.pod_command(CLIENT_POD, "iperf3")?
                    .args(["-c", server_ip, "-p", "5201", "-t", "1", "-J"]),
            )
            .with_context(|| format!("iperf3 round {round} through a QUIC tunnel"))?;
        }
        Ok(())
    });
    let _ = server.kill();
    let _ = server.wait();
    if outcome.is_ok() {
        // The listener still carries new tunnels, byte for byte.
        outcome = transfer(&c, CLIENT_POD, TARGET, 8 * MB, 4);
    }
    outcome?;
    let panics = c.panics();
    ensure!(panics.is_empty(), "a proxy panicked: {panics:?}");
    Ok(())
}

/// quinn returns an ended stream's credit to the peer only once an eighth of the stream limit
/// has ended; with the limit at the pool's 100 tunnels per connection, the tunnels that ended
/// on a pooled connection could leave its 100th tunnel waiting for another one to end.
#[test]
fn a_reused_quic_connection_takes_a_full_set_of_tunnels() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    switch_to_quic(&c)?;
    // A few tunnels open and end on CLIENT_POD's pooled QUIC connection...
    for i in 0..10 {
        let r = dial_one(&c, CLIENT_POD, TARGET)?;
        ensure!(r.through_proxy() && r.echo_ok, "tunnel {i}: {r:?}");
    }
    // ... then as many at once as the pool places on one connection, all held open: each
    // must get its greeting (`testpod idle` waits 5 s for it), none may wait for another.
    let mut idle = c
        .pod_command(CLIENT_POD, testpod())?
        .args([
            "idle",
            "--to",
            TARGET,
            "--conns",
            "100",
            "--parallel",
            "100",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting testpod idle")?;
    let mut line = String::new();
    let read = idle
        .stdout
        .take()
        .context("testpod idle stdout")
        .and_then(|out| {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
                .context("reading testpod idle's report")
        });
    drop(idle.stdin.take());
    let _ = idle.wait();
    read?;
    let report: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("report {line:?}"))?;
    ensure!(
        report["open"] == 100,
        "100 tunnels at once on a reused QUIC connection: {report}"
    );
    let accepted = lines_after(&c, "node2", "proxy", 0, "HBONE/QUIC connection accepted");
    ensure!(
        accepted.iter().filter(|l| l.contains(CLIENT_IP)).count() == 1,
        "CLIENT_POD's tunnels did not share one QUIC connection: {accepted:?}"
    );
    Ok(())
}

/// Drops UDP to port 15008 in `node`'s namespace (iptables INPUT and FORWARD): its pods'
/// QUIC listeners never answer.
fn drop_udp_15008(c: &Cluster, node: &str) -> Result<()> {
    for chain in ["INPUT", "FORWARD"] {
        let out = c
            .node_command(node, "iptables")?
            .args(["-I", chain, "-p", "udp", "--dport", "15008", "-j", "DROP"])
            .output()
            .context("running iptables")?;
        ensure!(
            out.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn blocked_udp_falls_back_to_http2() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    // UDP 15008 dropped on the destination node before anything is sent over QUIC.
    drop_udp_15008(&c, "node2")?;
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
    // `mesh-node config connections` on both nodes tells the two tunnels apart.
    for node in ["node1", "node2"] {
        let out = c
            .node_command(node, sidenode_tests::workload::mesh_node_path())?
            .args(["config", "connections", "--json"])
            .output()
            .context("running mesh-node config connections")?;
        ensure!(
            out.status.success(),
            "mesh-node config connections on {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{}", String::from_utf8_lossy(&out.stdout)))?;
        let transports: Vec<&str> = list
            .as_array()
            .context("connections is not a list")?
            .iter()
            .filter(|c| c["dst_addr"] == TARGET)
            .filter_map(|c| c["transport"].as_str())
            .collect();
        ensure!(
            transports.contains(&"h2") && transports.contains(&"quic"),
            "{node}: open connections to {TARGET} by transport: {transports:?}"
        );
        let table = c
            .node_command(node, sidenode_tests::workload::mesh_node_path())?
            .args(["config", "connections"])
            .output()?;
        let table = String::from_utf8_lossy(&table.stdout).into_owned();
        ensure!(table.contains("TRANSPORT"), "{node}: {table}");
        eprintln!("{node}: {transports:?}\n{table}");
    }

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

// ---- openssl helpers ------------------------------------------------------------------------

const REFUSED: &str = "sidenode_hbone_refused_total";

/// node2's refusals of QUIC clients for `reason`.
fn refused(c: &Cluster, reason: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, "node2")?,
        REFUSED,
        &[
            ("direction", "inbound"),
            ("transport", "quic"),
            ("reason", reason),
        ],
    ))
}

/// A UDP socket made in node1's network namespace (it stays there).
fn udp_in_node1(c: &Cluster) -> Result<std::net::UdpSocket> {
    let path = format!("/var/run/netns/{}", c.node("node1")?.netns);
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (scoped, short-lived) thread only, with an open netns fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(std::net::UdpSocket::bind("0.0.0.0:0")?)
        })
        .join()
        .unwrap_or_else(|_| bail!("netns thread panicked"))
    })
}

/// A QUIC handshake (ALPN h3) from node1's namespace to node2-pod1's listener with the
/// mesh's own client configuration, `dir`'s `<name>.pem` (plus `extra_chain`) and
/// `<name>.key`, expecting `expected` from the listener. Ok when the connection is
/// established and still open a moment later (the listener closes a refused client's
/// connection as soon as it has checked the client's certificate).
fn quic_handshake(
    c: &Cluster,
    dir: &Path,
    name: &str,
    extra_chain: &Path,
    expected: &str,
) -> Result<std::result::Result<(), String>> {
    use mesh_node::identity::Identity;
    use mesh_node::identity::certs::certs_from_pem;
    use mesh_node::identity::tls::{client_config, roots_from_pem};
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let mut pem = std::fs::read_to_string(dir.join(format!("{name}.pem")))?;
    pem.push_str(&std::fs::read_to_string(extra_chain)?);
    let chain = certs_from_pem(&pem)?;
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key")))
        .map_err(|e| anyhow::anyhow!("{name}.key: {e}"))?;
    let roots = roots_from_pem(&std::fs::read_to_string(c.controller_ca())?)?;
    let tls = client_config(
        chain,
        key,
        roots,
        Identity::new("cluster.local", "mesh", expected),
    )?;
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow::anyhow!("QUIC client config: {e}"))?;
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let sock = udp_in_node1(c)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            sock,
            Arc::new(quinn::TokioRuntime),
        )?;
        let connecting = ep.connect_with(cfg, "198.19.2.2:15008".parse()?, "198.19.2.2")?;
        let conn = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
            Err(_) => bail!("QUIC handshake not answered in 10 s"),
            Ok(Err(e)) => return Ok(Err(e.to_string())),
            Ok(Ok(conn)) => conn,
        };
        // A refused client learns it when the listener closes the connection.
        match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
            Ok(e) => Ok(Err(e.to_string())),
            Err(_) => {
                conn.close(0u32.into(), b"done");
                Ok(Ok(()))
            }
        }
    })
}

#[test]
fn quic_listener_checks_identities_both_ways() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    // A first tunnel so node2's proxy has node2-pod1's certificate.
    switch_to_quic(&c)?;
    let dir = c.state_dir.join("openssl-quic");
    std::fs::create_dir_all(&dir)?;
    write_ext(&dir, "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1")?;
    let chain = c.controller_state_dir().join("cert-chain.pem");

    // Control: a current certificate from the cluster's CA is accepted.
    new_csr(&dir, "good")?;
    sign_with_cluster_ca(&c, &dir, "good", None)?;
    let offset = c.log_len("node2", "proxy");
    let good = quic_handshake(&c, &dir, "good", &chain, "sa-node2-pod1")?;
    ensure!(
        good.is_ok(),
        "a valid client certificate was refused over QUIC: {good:?}"
    );
    wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &[
            "HBONE/QUIC connection accepted",
            "src_identity=spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1",
        ],
        Duration::from_secs(5),
    )?;

    // The listener refuses, counts and logs: (a) another CA, (b) an expired certificate.
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "evil-ca.key",
            "-out",
            "evil-ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=evil root",
        ],
    )?;
    new_csr(&dir, "evil")?;
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "evil.csr",
            "-CA",
            "evil-ca.pem",
            "-CAkey",
            "evil-ca.key",
            "-CAcreateserial",
            "-out",
            "evil.pem",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
        ],
    )?;
    new_csr(&dir, "expired")?;
    sign_with_cluster_ca(
        &c,
        &dir,
        "expired",
        Some(("20200101000000Z", "20200102000000Z")),
    )?;
    for (name, extra, reason) in [
        ("evil", dir.join("evil-ca.pem"), "untrusted"),
        ("expired", chain.clone(), "expired"),
    ] {
        let before = refused(&c, reason)?;
        let offset = c.log_len("node2", "proxy");
        let got = quic_handshake(&c, &dir, name, &extra, "sa-node2-pod1")?;
        ensure!(got.is_err(), "{name}: the QUIC listener accepted it");
        let line = wait_log_all(
            &c,
            "node2",
            "proxy",
            offset,
            &[
                "refused an HBONE/QUIC client",
                &format!("reason=\"{reason}\""),
            ],
            Duration::from_secs(5),
        )?;
        let after = refused(&c, reason)?;
        ensure!(
            after >= before + 1.0,
            "{REFUSED}{{direction=\"inbound\",transport=\"quic\",reason=\"{reason}\"}} went {before} -> {after}"
        );
        eprintln!("{name}: client saw {got:?}; {line}");
    }

    // (c) The client side: a listener presenting another identity than expected is refused
    // by the mesh's verifier over QUIC too.
    let got = quic_handshake(&c, &dir, "good", &chain, "sa-someone-else")?;
    let Err(e) = got else {
        bail!("the client accepted a listener with the wrong identity");
    };
    ensure!(
        e.contains("wrong server identity"),
        "wrong identity refused as: {e}"
    );
    eprintln!("wrong identity: {e}");
    Ok(())
}

#[test]
fn certificate_rotation_under_continuous_quic_traffic_loses_nothing() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server_ttl(Some("20s"))?;
    switch_to_quic(&c)?;
    let offset1 = c.log_len("node1", "proxy");
    let offset2 = c.log_len("node2", "proxy");
    let accepted_before =
        lines_after(&c, "node2", "proxy", 0, "HBONE/QUIC connection accepted").len();
    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(s.through_proxy(), "{}", s.hello);
    // Until both proxies renewed their certificate (20 s lifetime: renewed at about half),
    // and a little after: one open QUIC tunnel echoing, new tunnels dialled all along.
    let (mut ticks, mut dials) = (0u32, 0u32);
    let renewed = |c: &Cluster| {
        !lines_after(c, "node1", "proxy", offset1, "certificate renewed").is_empty()
            && !lines_after(c, "node2", "proxy", offset2, "certificate renewed").is_empty()
    };
    let done = wait_until(Duration::from_secs(40), || {
        let line = format!("tick-{ticks}");
        ensure!(s.echo(&line)? == line, "echo mismatch at tick {ticks}");
        ticks += 1;
        let r = dial_one(&c, CLIENT_POD, TARGET)?;
        ensure!(r.through_proxy(), "dial {dials} failed: {r:?}");
        dials += 1;
        Ok(renewed(&c))
    })?;
    ensure!(done, "no certificate renewal on both nodes within 40 s");
    // After the renewal: the open tunnel still echoes, and new tunnels still open (on a new
    // QUIC connection: the pool key carries the certificate generation).
    for i in 0..5 {
        let line = format!("after-{i}");
        ensure!(s.echo(&line)? == line, "echo mismatch after the renewal");
        let r = dial_one(&c, CLIENT_POD, TARGET)?;
        ensure!(r.through_proxy(), "dial after the renewal failed: {r:?}");
    }
    s.close()?;
    let accepted_after =
        lines_after(&c, "node2", "proxy", 0, "HBONE/QUIC connection accepted").len();
    ensure!(
        accepted_after > accepted_before,
        "no new QUIC connection after the renewal ({accepted_before} -> {accepted_after})"
    );
    ensure!(
        lines_after(&c, "node1", "proxy", offset1, "tunnel refused").is_empty(),
        "tunnels refused during the rotation: {:?}",
        lines_after(&c, "node1", "proxy", offset1, "tunnel refused")
    );
    eprintln!(
        "{ticks} echoes and {dials} new tunnels across the renewal; QUIC connections accepted {accepted_before} -> {accepted_after}"
    );
    Ok(())
}

/// xorshift64: test bytes without a dependency.
fn noise(state: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = *state as u8;
    }
}

#[test]
fn garbage_and_initial_floods_do_not_disturb_the_listener() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    switch_to_quic(&c)?;
    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(s.echo("before")? == "before", "echo mismatch");
    let sock = udp_in_node1(&c)?;
    sock.connect("198.19.2.2:15008")?;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = [0u8; 1200];
    let (mut garbage, mut initials) = (0u32, 0u32);
    for round in 0..20 {
        // Garbage: random datagrams of random sizes.
        for _ in 0..500 {
            noise(&mut rng, &mut buf);
            let len = 1 + (buf[0] as usize * 4) % buf.len();
            if sock.send(&buf[..len]).is_ok() {
                garbage += 1;
            }
        }
        // Initial packets (QUIC v1 long header, fresh connection ids, 1200 bytes, payload
        // that does not decrypt), as a flood of new connection attempts.
        for _ in 0..500 {
            noise(&mut rng, &mut buf);
            buf[0] = 0xc0;
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = 8; // DCID length, 8 random bytes follow
            buf[14] = 8; // SCID length
            buf[23] = 0; // no token
            buf[24..26].copy_from_slice(&(0x4000u16 | 1174).to_be_bytes());
            if sock.send(&buf).is_ok() {
                initials += 1;
            }
        }
        // The open tunnel and new ones keep working during the flood.
        let line = format!("during-{round}");
        ensure!(s.echo(&line)? == line, "echo mismatch during the flood");
        let r = dial_one(&c, CLIENT_POD, TARGET)?;
        ensure!(
            r.through_proxy(),
            "new tunnel failed during the flood: {r:?}"
        );
    }
    ensure!(s.echo("after")? == "after", "echo mismatch after the flood");
    s.close()?;
    transfer(&c, CLIENT_POD, TARGET, 8 * MB, 2)?;
    // The proxy is the same process and still serves its admin API.
    proxy_metrics(&c, "node2")?;
    eprintln!(
        "{garbage} garbage datagrams and {initials} Initial packets sent to 198.19.2.2:15008; tunnels unaffected"
    );
    Ok(())
}

#[test]
fn strict_peer_authentication_admits_quic_tunnels() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    c.write_config_file(
        "peerauth.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server-strict\n  namespace: mesh\nspec:\n  selector:\n    matchLabels:\n      app: node2-pod1\n  mtls:\n    mode: STRICT\n",
    )?;
    // node2's kernel holds the STRICT entry for the server pod.
    let strict = wait_until(Duration::from_secs(15), || {
        let v = c.maps_json("node2")?;
        Ok(v["strict"].as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e["ip"] == "198.19.2.2" && e["mode"] == "STRICT")
        }))
    })?;
    ensure!(strict, "no STRICT entry for 198.19.2.2 in node2's maps");
    // Plaintext from the unenrolled pod is dropped (STRICT is in force)...
    let mut r = sidenode_tests::workload::dial(
        &c,
        &testpod(),
        "node1-pod3",
        &[TARGET.to_string()],
        1,
        1,
        0,
    )?;
    let r = r.pop().context("empty dial report")?;
    let err = r.error.as_deref().unwrap_or_default();
    ensure!(
        !r.echo_ok && err.starts_with("connect:") && err.contains("timed out"),
        "plaintext to a STRICT pod should be dropped (connect timed out): {r:?}"
    );
    // ...and QUIC tunnels to it pass (UDP 15008 is admitted as TCP 15008 is).
    switch_to_quic(&c)?;
    let offset = c.log_len("node2", "proxy");
    transfer(&c, CLIENT_POD, TARGET, 4 * MB, 2)?;
    let accepted = lines_after(
        &c,
        "node2",
        "proxy",
        offset,
        "HBONE/QUIC connection accepted",
    );
    ensure!(
        !accepted.is_empty(),
        "the transfer to the STRICT pod did not go over a new QUIC connection"
    );
    Ok(())
}

#[test]
fn authorization_policy_refuses_quic_tunnels() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    switch_to_quic(&c)?;
    ensure!(
        try_connect(&c, CLIENT_POD, TARGET)? == Outcome::Echoed,
        "no policy: refused"
    );
    c.write_config_file(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-8080\n  namespace: mesh\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"8080\"]\n",
    )?;
    let offset = c.log_len("node1", "proxy");
    let refused = wait_until(Duration::from_secs(15), || {
        Ok(try_connect(&c, CLIENT_POD, TARGET)? == Outcome::Refused)
    })?;
    ensure!(refused, "a DENY of port 8080 never refused the QUIC tunnel");
    // Refused by the destination over QUIC (401), counted as `denied` at the source.
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &["tunnel refused", "reason=\"denied\"", "transport=\"quic\""],
        Duration::from_secs(5),
    )?;
    let denied = metric_value(
        &proxy_metrics(&c, "node1")?,
        REFUSED,
        &[
            ("direction", "outbound"),
            ("transport", "quic"),
            ("reason", "denied"),
        ],
    );
    ensure!(
        denied >= 1.0,
        "{REFUSED}{{direction=\"outbound\",transport=\"quic\",reason=\"denied\"}} is {denied}"
    );
    c.remove_config_file("policy.yaml")?;
    let back = wait_until(Duration::from_secs(15), || {
        Ok(try_connect(&c, CLIENT_POD, TARGET)? == Outcome::Echoed)
    })?;
    ensure!(
        back,
        "the QUIC tunnel stayed refused after the policy was removed"
    );
    Ok(())
}

// ---- the HTTP path (VirtualService routes) over QUIC ----------------------------------------

/// `reviews` v2's pod (v1 is SERVER_POD, which also runs the echo server on 8080).
const V2_POD: &str = "node2-pod2";
const REVIEWS_URL: &str = "http://198.18.128.10:80";
const GREETER_URL: &str = "http://198.18.128.11:80";

/// `reviews` (an `http` port, subsets v1/v2; `end-user: jason` to v2, the rest to v1) and
/// `greeter` (a `grpc` port: HTTP/2 upstream, to v1's HTTP/2-only server on 9090).
const REVIEWS_YAML: &str = r#"apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: mesh}
spec:
  clusterIP: 198.18.128.10
  selector: {svc: reviews}
  ports: [{name: http, port: 80, targetPort: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: mesh}
spec:
  clusterIP: 198.18.128.11
  selector: {svc: reviews, version: v1}
  ports: [{name: grpc, port: 80, targetPort: 9090}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: mesh}
spec:
  host: reviews.mesh.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#;

/// A mesh cluster with the echo server on SERVER_POD:8080 (for [`switch_to_quic`]), and
/// `reviews` v1 (SERVER_POD) and v2 (V2_POD) serving HTTP/1.1 on 9080, v1 HTTP/2 on 9090;
/// every pod enrolled, both QUIC listeners open.
fn reviews_cluster() -> Result<(
    sidenode_tests::cluster::TestCluster,
    Server,
    Vec<HttpServer>,
)> {
    let c = mesh_cluster(3, None)?;
    label_pods(
        &c,
        &[
            (SERVER_POD, &[("svc", "reviews"), ("version", "v1")]),
            (V2_POD, &[("svc", "reviews"), ("version", "v2")]),
        ],
    )?;
    let echo = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    let http = vec![
        HttpServer::start(&c, SERVER_POD, "v1", &[])?,
        HttpServer::start(&c, V2_POD, "v2", &[])?,
        HttpServer::spawn(
            &c,
            SERVER_POD,
            &["h2-serve", "--port", "9090", "--name", "greeter-v1"],
        )?,
    ];
    for pod in [CLIENT_POD, PROBE_POD] {
        wait_enrolled(&c, "node1", "mesh", pod)?;
    }
    for pod in [SERVER_POD, V2_POD] {
        wait_enrolled(&c, "node2", "mesh", pod)?;
        wait_hbone_listener(&c, pod)?;
    }
    for addr in ["198.19.2.2:15008", "198.19.2.3:15008"] {
        wait_log_all(
            &c,
            "node2",
            "proxy",
            0,
            &["HBONE/QUIC listener open", addr],
            Duration::from_secs(10),
        )?;
    }
    Ok((c, echo, http))
}

/// `n` HTTP/1.1 requests from CLIENT_POD to `reviews` with `headers`, on one connection.
fn reviews_get(c: &Cluster, n: usize, headers: &[&str], path: &str) -> Result<HttpReport> {
    http_get(c, CLIENT_POD, REVIEWS_URL, "GET", path, headers, n)
}

/// Waits (20 s) until the VirtualService is in force: `jason` gets v2, the rest v1.
fn wait_routes(c: &Cluster) -> Result<()> {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(20), || {
        let jason = reviews_get(c, 3, &["end-user:jason"], "/")?;
        let other = reviews_get(c, 3, &[], "/")?;
        let done = jason.body("v2") == 3 && other.body("v1") == 3;
        last = Some((jason, other));
        Ok(done)
    })?;
    ensure!(ok, "the VirtualService never came into force: {last:?}");
    Ok(())
}

/// curl from CLIENT_POD with HTTP/2 prior knowledge (h2c); (success, body, stderr).
fn curl_h2c(c: &Cluster, args: &[&str]) -> Result<(bool, String, String)> {
    let out = c
        .pod_command(CLIENT_POD, "curl")?
        .args(["-sS", "--max-time", "10", "--http2-prior-knowledge"])
        .args(args)
        .output()
        .context("running curl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// HTTP/1.1 and h2c requests to both subsets, and an h2c gRPC-style request to `greeter`
/// (HTTP/2 upstream), every one answered by the endpoint the routes name; `secret` is in
/// every path.
fn http_requests_both_ways(c: &Cluster, secret: &str) -> Result<()> {
    let path = format!("/{secret}");
    let jason = reviews_get(c, 20, &["end-user:jason"], &path)?;
    ensure!(
        jason.status("200") == 20 && jason.body("v2") == 20,
        "HTTP/1.1 jason: wanted 20 v2: {jason:?}"
    );
    let other = reviews_get(c, 20, &[], &path)?;
    ensure!(
        other.status("200") == 20 && other.body("v1") == 20,
        "HTTP/1.1: wanted 20 v1: {other:?}"
    );
    let url = format!("{REVIEWS_URL}{path}");
    for (header, want) in [("end-user: jason", "v2"), ("end-user: bob", "v1")] {
        let (ok, body, err) = curl_h2c(c, &["-H", header, &url])?;
        ensure!(ok && body == want, "h2c with {header:?}: {body:?} {err}");
    }
    let grpc = format!("{GREETER_URL}/{secret}.Greeter/SayHello");
    let (ok, body, err) = curl_h2c(
        c,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "hello",
            &grpc,
        ],
    )?;
    ensure!(
        ok && body.contains("greeter-v1 HTTP/2.0"),
        "h2c to the grpc port (HTTP/2 upstream): {body:?} {err}"
    );
    Ok(())
}

#[test]
fn http_routes_ride_quic_tunnels() -> Result<()> {
    let _turn = serial();
    let (c, _echo, _http) = reviews_cluster()?;
    // QUIC in force on node1 before the first HTTP request: no pooled HTTP connection rides
    // an HTTP/2 tunnel.
    switch_to_quic(&c)?;
    c.write_config_file("reviews.yaml", REVIEWS_YAML)?;
    wait_routes(&c)?;

    let offset1 = c.log_len("node1", "proxy");
    let pcap = c.state_dir.join("node1-eth0-l7-quic.pcap");
    let cap = Capture::start(&c, "node1", &pcap, 0)?;
    let secret = format!("SIDENODE-L7-SECRET-{}", random_hex(12)?);
    http_requests_both_ways(&c, &secret)?;
    std::thread::sleep(Duration::from_millis(300));
    let bytes = cap.stop()?;
    ensure!(
        !contains(&bytes, secret.as_bytes()),
        "the request path {secret} appears in clear text on node1's eth0"
    );
    let udp = pcap_count(&pcap, &format!("udp port 15008 and host {CLIENT_IP}"))?;
    let tcp = pcap_count(&pcap, &format!("tcp port 15008 and host {CLIENT_IP}"))?;
    let app = pcap_count(&pcap, "port 9080 or port 9090")?;
    ensure!(
        udp > 0,
        "no UDP 15008 packets from {CLIENT_IP} on node1's eth0"
    );
    ensure!(
        tcp == 0,
        "{tcp} TCP 15008 packets from {CLIENT_IP} with tunnelProtocol: quic"
    );
    ensure!(
        app == 0,
        "{app} app-port packets on the wire (should be tunnelled)"
    );
    eprintln!(
        "HTTP path: {udp} UDP 15008 packets, no TCP 15008, none on 9080/9090, secret not seen"
    );

    // node1's request lines name the tunnel's transport: QUIC for every endpoint, never h2.
    for endpoint in ["198.19.2.2:9080", "198.19.2.3:9080", "198.19.2.2:9090"] {
        wait_log_all(
            &c,
            "node1",
            "proxy",
            offset1,
            &[
                "request done",
                &format!("endpoint={endpoint}"),
                "transport=\"quic\"",
                "status=200",
            ],
            Duration::from_secs(5),
        )?;
    }
    let h2 = lines_after(&c, "node1", "proxy", offset1, "transport=\"h2\"");
    ensure!(h2.is_empty(), "requests over HTTP/2 tunnels: {h2:?}");
    // ... and so do their access-log lines.
    let access = lines_after(&c, "node1", "proxy", offset1, "request complete");
    ensure!(
        access.iter().any(|l| l.contains(&secret)),
        "no access-log line for the requests: {access:?}"
    );
    for l in access.iter().filter(|l| l.contains(&secret)) {
        ensure!(
            l.contains("tunnel=\"quic\""),
            "access-log line without tunnel=\"quic\": {l}"
        );
    }
    // node2 accepted the client's own QUIC connections (its identity, not the probe's).
    let accepted: Vec<String> =
        lines_after(&c, "node2", "proxy", 0, "HBONE/QUIC connection accepted")
            .into_iter()
            .filter(|l| l.contains("sa-node1-pod1"))
            .collect();
    ensure!(
        !accepted.is_empty(),
        "node2 accepted no QUIC connection from {CLIENT_POD}'s identity"
    );
    // The pooled HTTP connections keep their tunnels open: node2 lists them as QUIC.
    let out = c
        .node_command("node2", sidenode_tests::workload::mesh_node_path())?
        .args(["config", "connections", "--json"])
        .output()
        .context("running mesh-node config connections")?;
    ensure!(
        out.status.success(),
        "mesh-node config connections on node2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}", String::from_utf8_lossy(&out.stdout)))?;
    let to_reviews: Vec<(String, String)> = list
        .as_array()
        .context("connections is not a list")?
        .iter()
        .filter(|c| c["dst_addr"].as_str().is_some_and(|a| a.ends_with(":9080")))
        .map(|c| {
            (
                c["dst_addr"].as_str().unwrap_or("").to_string(),
                c["transport"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    ensure!(
        !to_reviews.is_empty() && to_reviews.iter().all(|(_, t)| t == "quic"),
        "node2's open connections to the reviews pods by transport: {to_reviews:?}"
    );
    let m = proxy_metrics(&c, "node1")?;
    let quic = metric_value(
        &m,
        "sidenode_hbone_pool_connections",
        &[("transport", "quic")],
    );
    ensure!(
        quic >= 2.0,
        "sidenode_hbone_pool_connections{{transport=\"quic\"}} is {quic} (the probe's and the client's)"
    );
    eprintln!(
        "node2 accepted {} QUIC connection(s) from {CLIENT_POD}; open there: {to_reviews:?}",
        accepted.len()
    );
    Ok(())
}

#[test]
fn http_routes_fall_back_to_http2_when_udp_is_blocked() -> Result<()> {
    let _turn = serial();
    let (c, _echo, _http) = reviews_cluster()?;
    drop_udp_15008(&c, "node2")?;
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("meshconfig.yaml", &mesh_config("quic"))?;
    // The setting reaches node1: the probe's L4 connection to SERVER_POD falls back (and so
    // SERVER_POD is reached over HTTP/2 for a while, by every path).
    let fell_back = wait_until(Duration::from_secs(20), || {
        let r = dial_one(&c, PROBE_POD, TARGET)?;
        ensure!(
            r.through_proxy(),
            "probe failed while UDP 15008 is dropped: {r:?}"
        );
        Ok(!lines_after(&c, "node1", "proxy", offset, "no answer over QUIC").is_empty())
    })?;
    ensure!(fell_back, "node1 never tried QUIC (no fallback logged)");
    c.write_config_file("reviews.yaml", REVIEWS_YAML)?;
    let pcap = c.state_dir.join("node1-eth0-l7-fallback.pcap");
    let cap = Capture::start(&c, "node1", &pcap, 96)?;
    // V2_POD has not been tried over QUIC yet: the HTTP path tries it, falls back itself, and
    // every request is answered.
    wait_routes(&c)?;
    let secret = random_hex(8)?;
    http_requests_both_ways(&c, &secret)?;
    std::thread::sleep(Duration::from_millis(300));
    cap.stop()?;
    let fallback = wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &["no answer over QUIC", "dst=198.19.2.3:9080"],
        Duration::from_secs(5),
    )?;
    eprintln!("HTTP path fallback: {fallback}");
    for endpoint in ["198.19.2.2:9080", "198.19.2.3:9080", "198.19.2.2:9090"] {
        wait_log_all(
            &c,
            "node1",
            "proxy",
            offset,
            &[
                "request done",
                &format!("endpoint={endpoint}"),
                "transport=\"h2\"",
                "status=200",
            ],
            Duration::from_secs(5),
        )?;
    }
    let tcp = pcap_count(&pcap, &format!("tcp port 15008 and host {CLIENT_IP}"))?;
    ensure!(
        tcp > 0,
        "no TCP 15008 packets from {CLIENT_IP}: the requests did not ride HTTP/2 tunnels"
    );
    ensure!(
        lines_after(&c, "node2", "proxy", 0, "HBONE/QUIC connection accepted").is_empty(),
        "node2 accepted a QUIC connection although UDP 15008 is dropped"
    );
    Ok(())
}

#[test]
fn http_path_refusals_are_counted_with_transport_quic() -> Result<()> {
    let _turn = serial();
    let (c, _echo, _http) = reviews_cluster()?;
    // A DENY of port 9080 at L4 (no L7 attribute): the destination refuses the tunnel itself.
    c.write_config_file(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-9080\n  namespace: mesh\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9080\"]\n",
    )?;
    switch_to_quic(&c)?;
    let before = metric_value(
        &proxy_metrics(&c, "node1")?,
        REFUSED,
        &[
            ("direction", "outbound"),
            ("transport", "quic"),
            ("reason", "denied"),
        ],
    );
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("reviews.yaml", REVIEWS_YAML)?;
    // Every request is answered 403 by the source's proxy once the routes are in force.
    let mut last = None;
    let denied = wait_until(Duration::from_secs(20), || {
        let r = reviews_get(&c, 3, &["end-user:jason"], "/")?;
        let done = r.status("403") == 3;
        last = Some(r);
        Ok(done)
    })?;
    ensure!(
        denied,
        "requests to a denied port were not answered 403: {last:?}"
    );
    let line = wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "tunnel refused",
            "reason=\"denied\"",
            "transport=\"quic\"",
            "endpoint=198.19.2.3:9080",
        ],
        Duration::from_secs(5),
    )?;
    let after = metric_value(
        &proxy_metrics(&c, "node1")?,
        REFUSED,
        &[
            ("direction", "outbound"),
            ("transport", "quic"),
            ("reason", "denied"),
        ],
    );
    ensure!(
        after >= before + 1.0,
        "{REFUSED}{{direction=\"outbound\",transport=\"quic\",reason=\"denied\"}} went {before} -> {after}"
    );
    // The refusal came over QUIC (node2's listener answered it), not from a fallback.
    ensure!(
        lines_after(&c, "node1", "proxy", offset, "no answer over QUIC").is_empty(),
        "a fallback to HTTP/2 happened"
    );
    eprintln!("refused over QUIC: {line}; counted {before} -> {after}");
    // Lifted with the policy.
    c.remove_config_file("policy.yaml")?;
    let back = wait_until(Duration::from_secs(20), || {
        Ok(reviews_get(&c, 3, &["end-user:jason"], "/")?.body("v2") == 3)
    })?;
    ensure!(back, "requests stayed refused after the policy was removed");
    Ok(())
}
