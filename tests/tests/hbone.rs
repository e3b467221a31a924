//! End-to-end tests of mesh mode (controller, certificates, HBONE tunnels) on the simulated
//! cluster. Run as root: `cargo test -p sidenode-tests --test hbone`. The tests take turns
//! (`serial()`: one cluster at a time); each has its own cluster (prefix `m....`), torn down
//! on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::openssl::{new_csr, openssl, sign_with_cluster_ca, write_ext};
use sidenode_tests::workload::{Server, Session, dial};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const CLIENT_POD: &str = "node1-pod1";
const HBONE_ADDR: &str = "198.19.2.2:15008";
const REFUSED: &str = "sidenode_hbone_refused_total";

/// Mesh cluster with a server on node2-pod1:8080, both meshed pods enrolled and the server's
/// HBONE listener open.
fn mesh_with_server(
    cert_ttl: Option<&str>,
) -> Result<(sidenode_tests::cluster::TestCluster, Server)> {
    let c = mesh_cluster(2, cert_ttl)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    Ok((c, srv))
}

/// The proxy line for the connection from `local` (the client's ip:port) with every needle.
fn wait_conn_line(c: &Cluster, local: &str, offset: u64, needles: &[&str]) -> Result<String> {
    let src = format!("src.addr={local}");
    let mut all = vec!["connection complete", src.as_str()];
    all.extend_from_slice(needles);
    wait_log_all(c, "node1", "proxy", offset, &all, Duration::from_secs(5))
}

// ---- tcpdump --------------------------------------------------------------------------------

/// `tcpdump -r FILE -nn FILTER` output lines.
fn pcap_lines(file: &Path, filter: &str) -> Result<Vec<String>> {
    let out = Command::new("tcpdump")
        .arg("-r")
        .arg(file)
        .args(["-nn", filter])
        .output()
        .context("running tcpdump -r")?;
    if !out.status.success() {
        bail!(
            "tcpdump -r {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn meshed_traffic_is_encrypted_on_the_wire() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server(None)?;
    let pcap = c.state_dir.join("node1-eth0.pcap");
    let cap = Capture::start(&c, "node1", &pcap, 0)?;
    let secret = format!("SIDENODE-SECRET-{}", random_hex(12)?);
    let offset = c.log_len("node1", "proxy");

    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(
        s.through_proxy(),
        "server saw the client's own socket, not a proxy: {}",
        s.hello
    );
    ensure!(
        s.server_local == TARGET,
        "server_local is not the original destination: {}",
        s.hello
    );
    for i in 0..3 {
        let line = format!("{secret}-{i}");
        ensure!(s.echo(&line)? == line, "echo mismatch");
    }
    s.close()?;
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "connection complete",
            &format!("dst.addr={TARGET}"),
            "transport=\"hbone\"",
            "src.identity=spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1",
            "dst.identity=spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1",
        ],
        Duration::from_secs(5),
    )?;
    // Let the last segments reach the capture.
    std::thread::sleep(Duration::from_millis(300));
    let bytes = cap.stop()?;

    ensure!(
        bytes.len() > 24,
        "the capture is empty ({} bytes)",
        bytes.len()
    );
    ensure!(
        !contains(&bytes, secret.as_bytes()),
        "the secret {secret} appears in clear text on node1's eth0"
    );
    let tunnel = pcap_lines(&pcap, "tcp port 15008")?;
    ensure!(
        !tunnel.is_empty(),
        "no packets to or from port 15008 on node1's eth0"
    );
    let app = pcap_lines(&pcap, "tcp port 8080")?;
    ensure!(
        app.is_empty(),
        "app-port packets on the wire (should be tunnelled):\n{}",
        app.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "capture: {} bytes, {} packets on port 15008, none on 8080, secret not seen",
        bytes.len(),
        tunnel.len()
    );
    Ok(())
}

// ---- openssl helpers ------------------------------------------------------------------------

struct SClient {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `openssl s_client` from node1's netns to node2-pod1's HBONE listener with a client cert.
fn s_client(c: &Cluster, dir: &Path, cert: &str, key: &str, extra: &[&str]) -> Result<SClient> {
    let out = c
        .node_command("node1", "timeout")?
        .current_dir(dir)
        .args(["10", "openssl", "s_client", "-connect", HBONE_ADDR])
        .args(["-alpn", "h2", "-cert", cert, "-key", key])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .context("running openssl s_client")?;
    Ok(SClient {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn refused(c: &Cluster, reason: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, "node2")?,
        REFUSED,
        &[("direction", "inbound"), ("reason", reason)],
    ))
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

/// Runs a handshake attempt against node2's listener and checks it was refused with `reason`:
/// a log line, and the refusal counter one higher.
fn expect_refused(
    c: &Cluster,
    reason: &str,
    attempt: impl FnOnce() -> Result<SClient>,
) -> Result<()> {
    let before = refused(c, reason)?;
    let offset = c.log_len("node2", "proxy");
    let tried = attempt()?;
    let line = wait_log_all(
        c,
        "node2",
        "proxy",
        offset,
        &["refused an HBONE client", &format!("reason=\"{reason}\"")],
        Duration::from_secs(5),
    )
    .with_context(|| format!("s_client said:\n{}\n{}", tried.stdout, tried.stderr))?;
    // The refusal is the listener's: s_client reached it (a TCP connection and a handshake
    // attempt), it did not fail to connect. That a CONNECT over such a
    // certificate gets nowhere is checked end to end in hostile.rs
    // (`client_certificates_the_listener_must_refuse_get_no_tunnel`).
    ensure!(
        tried.stdout.contains("CONNECTED("),
        "s_client never reached the listener:\n{}\n{}",
        tried.stdout,
        tried.stderr
    );
    eprintln!("{reason}: {line}");
    let after = refused(c, reason)?;
    ensure!(
        after >= before + 1.0,
        "{REFUSED}{{direction=\"inbound\",reason=\"{reason}\"}} went {before} -> {after}"
    );
    Ok(())
}

#[test]
fn hbone_listener_checks_client_identity() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server(None)?;
    // A first tunnel so node2's proxy has its certificate for node2-pod1.
    let r = dial_one(&c, CLIENT_POD, TARGET)?;
    ensure!(r.through_proxy(), "{r:?}");
    let dir = c.state_dir.join("openssl");
    std::fs::create_dir_all(&dir)?;
    let id = "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1";
    write_ext(&dir, id)?;
    let chain = c.controller_state_dir().join("cert-chain.pem");
    let chain = chain.to_string_lossy().to_string();
    let root = c.controller_ca().to_string_lossy().to_string();

    // Control: a current certificate from the cluster's CA is accepted, and the listener
    // presents node2-pod1's identity, chaining to the cluster root.
    new_csr(&dir, "good")?;
    sign_with_cluster_ca(&c, &dir, "good", None)?;
    let offset = c.log_len("node2", "proxy");
    let before_all = proxy_metrics(&c, "node2")?;
    let good = s_client(
        &c,
        &dir,
        "good.pem",
        "good.key",
        &[
            "-cert_chain",
            &chain,
            "-CAfile",
            &root,
            "-verify_return_error",
            "-showcerts",
        ],
    )?;
    ensure!(
        good.ok && good.stdout.contains("Verify return code: 0 (ok)"),
        "handshake with a valid client certificate failed:\n{}\n{}",
        good.stdout,
        good.stderr
    );
    let server_pem: String = {
        let s = &good.stdout;
        let a = s
            .find("-----BEGIN CERTIFICATE-----")
            .context("no server cert")?;
        let b = s[a..]
            .find("-----END CERTIFICATE-----")
            .context("no cert end")?
            + a;
        format!("{}-----END CERTIFICATE-----\n", &s[a..b])
    };
    std::fs::write(dir.join("server.pem"), server_pem)?;
    let san = openssl(
        &dir,
        &[
            "x509",
            "-in",
            "server.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    )?;
    ensure!(
        san.contains("URI:spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1"),
        "the HBONE listener of node2-pod1 presents {san}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let refusals = lines_after(&c, "node2", "proxy", offset, "refused an HBONE client");
    ensure!(
        refusals.is_empty(),
        "a valid client certificate was refused: {refusals:?}"
    );
    ensure!(
        metric_value(&proxy_metrics(&c, "node2")?, REFUSED, &[])
            == metric_value(&before_all, REFUSED, &[]),
        "refusal counters moved for a valid certificate"
    );

    // (a) A certificate from another CA, with a mesh identity in it: untrusted.
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
    expect_refused(&c, "untrusted", || {
        s_client(
            &c,
            &dir,
            "evil.pem",
            "evil.key",
            &["-cert_chain", "evil-ca.pem"],
        )
    })?;

    // (b) Signed by the real CA but expired: expired.
    new_csr(&dir, "expired")?;
    sign_with_cluster_ca(
        &c,
        &dir,
        "expired",
        Some(("20200101000000Z", "20200102000000Z")),
    )?;
    let dates = openssl(&dir, &["x509", "-in", "expired.pem", "-noout", "-enddate"])?;
    ensure!(dates.contains("2020"), "expired cert dates: {dates}");
    expect_refused(&c, "expired", || {
        s_client(
            &c,
            &dir,
            "expired.pem",
            "expired.key",
            &["-cert_chain", &chain],
        )
    })?;

    // The mesh path still works afterwards.
    let r = dial_one(&c, CLIENT_POD, TARGET)?;
    let local = r.local.clone().context("no local address")?;
    wait_conn_line(&c, &local, 0, &["transport=\"hbone\""])?;
    Ok(())
}

#[test]
fn certificate_rotation_under_continuous_traffic() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server(Some("20s"))?;
    let offset = c.log_len("node1", "proxy");
    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(s.through_proxy(), "{}", s.hello);
    let run_for = Duration::from_secs(25);
    let start = Instant::now();
    let (session_res, batches) = std::thread::scope(|sc| {
        let h = sc.spawn(|| -> Result<usize> {
            let mut n = 0;
            while start.elapsed() < run_for {
                let line = format!("tick-{n}");
                let got = s
                    .echo(&line)
                    .with_context(|| format!("long session broke after {:?}", start.elapsed()))?;
                ensure!(got == line, "session echo mismatch: {got:?} != {line:?}");
                n += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(n)
        });
        let mut batches = Vec::new();
        while start.elapsed() < run_for {
            let at = start.elapsed();
            // Renewals logged before this batch started.
            let renewed = lines_after(&c, "node1", "proxy", offset, "certificate renewed").len();
            let r = dial(&c, &testpod(), CLIENT_POD, &[TARGET.to_string()], 20, 5, 0);
            batches.push((at, renewed, r));
        }
        let session = h
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("session thread panicked")));
        (session, batches)
    });
    // The session echoed every tick (any failure ended the thread with an error); how many
    // ticks fit in the time is a speed figure.
    let ticks = session_res?;
    // Connections were made on both sides of a renewal: before the first, and after one.
    ensure!(
        batches.iter().any(|(_, renewed, _)| *renewed == 0)
            && batches.iter().any(|(_, renewed, _)| *renewed > 0),
        "no dial batch before the first renewal and after one: renewals seen per batch {:?}",
        batches.iter().map(|(_, n, _)| *n).collect::<Vec<_>>()
    );
    let mut total = 0;
    let mut bad = Vec::new();
    for (at, _, r) in batches {
        let r = r.with_context(|| format!("dial batch at {at:?}"))?;
        for x in r {
            total += 1;
            if !x.echo_ok || !x.through_proxy() {
                bad.push(format!("at {at:?}: {x:?}"));
            }
        }
    }
    ensure!(
        bad.is_empty(),
        "{} of {total} connections failed during rotation:\n{}",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    let renewed = lines_after(&c, "node1", "proxy", offset, "certificate renewed");
    ensure!(
        !renewed.is_empty(),
        "node1's proxy renewed no certificate in {run_for:?} with a 20 s lifetime"
    );
    ensure!(s.echo("last")? == "last", "session after rotation");
    s.close()?;
    eprintln!(
        "{total} connections and {ticks} session echoes ok; renewals on node1: {}",
        renewed.len()
    );
    // Renewal is at half-life (10 s here): one identity on node1, so about 2-3 renewals in
    // 25 s. Many more means certificates are re-fetched on every connection.
    ensure!(
        renewed.len() <= 8,
        "node1's proxy renewed {} times in {run_for:?} with a 20 s lifetime (half-life renewal \
         would be 2-3); first ones:\n{}",
        renewed.len(),
        renewed
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Secrets at rest: the CA key is private to its owner, and no key material reached a log
    // after many signings and renewals.
    let key_path = c.controller_state_dir().join("ca-key.pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_path)?.permissions());
    ensure!(
        mode & 0o777 == 0o600,
        "{} has mode {:o}",
        key_path.display(),
        mode & 0o777
    );
    let key_pem = std::fs::read_to_string(&key_path)?;
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for entry in std::fs::read_dir(c.controller_log_path().parent().context("logs dir")?)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        ensure!(
            !text.contains("PRIVATE KEY") && !text.contains(&key_body[..40.min(key_body.len())]),
            "{} contains key material",
            path.display()
        );
    }
    Ok(())
}

#[test]
fn controller_down_keeps_traffic_and_restart_resyncs() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server(None)?;
    let mut s = Session::open(&c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(s.echo("before")? == "before", "echo before");

    let offsets: Vec<(String, String, u64)> = ["node1", "node2"]
        .iter()
        .flat_map(|n| ["agent", "proxy"].map(|k| (n.to_string(), k.to_string())))
        .map(|(n, k)| {
            let o = c.log_len(&n, &k);
            (n, k, o)
        })
        .collect();
    c.kill_controller(libc::SIGKILL)?;
    ensure!(s.echo("controller dead")? == "controller dead", "echo");
    for (n, k, o) in &offsets {
        wait_log_all(
            &c,
            n,
            k,
            *o,
            &["state stream lost"],
            Duration::from_secs(15),
        )?;
    }
    // New connections between meshed pods still go through HBONE.
    for _ in 0..3 {
        let r = dial_one(&c, CLIENT_POD, TARGET)?;
        ensure!(r.through_proxy(), "{r:?}");
        let local = r.local.clone().context("no local address")?;
        wait_conn_line(&c, &local, 0, &["transport=\"hbone\""])?;
    }
    ensure!(s.echo("still")? == "still", "echo");

    let offsets: Vec<(String, String, u64)> = offsets
        .into_iter()
        .map(|(n, k, _)| {
            let o = c.log_len(&n, &k);
            (n, k, o)
        })
        .collect();
    let restarted = Instant::now();
    c.restart_controller()?;
    for (n, k, o) in &offsets {
        let line = wait_log_all(
            &c,
            n,
            k,
            *o,
            &["state stream synced", "resync=true"],
            Duration::from_secs(10),
        )?;
        eprintln!(
            "{n} {k} resynced {:?} after restart: {line}",
            restarted.elapsed()
        );
    }
    // The restarted controller drives the agents: enrolling namespace `plain` reaches node1.
    ensure!(
        !enrolled(&c, "node1")?.contains(&("plain".into(), "node1-pod2".into())),
        "plain/node1-pod2 enrolled before its namespace was"
    );
    c.set_namespace_enabled("plain", true)?;
    wait_enrolled(&c, "node1", "plain", "node1-pod2")?;
    wait_enrolled(&c, "node2", "plain", "node2-pod2")?;
    let r = dial_one(&c, CLIENT_POD, TARGET)?;
    let local = r.local.clone().context("no local address")?;
    wait_conn_line(&c, &local, 0, &["transport=\"hbone\""])?;
    ensure!(s.echo("after")? == "after", "echo after restart");
    s.close()?;
    Ok(())
}

#[test]
fn unmeshed_destination_goes_direct() -> Result<()> {
    let _turn = serial();
    let c = mesh_cluster(2, None)?;
    let _srv = Server::start(&c, &testpod(), "node2-pod2", &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    let target = "198.19.2.3:8080";
    let r = dial_one(&c, CLIENT_POD, target)?;
    ensure!(
        r.server_peer.as_deref().map(ip_of) == Some("198.18.0.1"),
        "server should see node1's proxy: {r:?}"
    );
    ensure!(r.server_local.as_deref() == Some(target), "{r:?}");
    let local = r.local.clone().context("no local address")?;
    let line = wait_conn_line(
        &c,
        &local,
        0,
        &[&format!("dst.addr={target}"), "transport=\"tcp\""],
    )?;
    ensure!(
        line.contains("dst.hbone_addr= ") && line.contains("security=\"none\""),
        "{line}"
    );
    Ok(())
}

#[test]
fn ipv6_destination_of_a_meshed_pod_goes_through_its_tunnel() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server(None)?;
    // node2-pod1's second address: the tunnel goes to the pod's listener of that family (as
    // ztunnel's does: it refuses a CONNECT naming an address of the other family), and the
    // CONNECT names the IPv6 destination.
    let pod6 = sidenode_tests::cluster::pod_ip6(2, 1);
    let target = format!("[{pod6}]:8080");
    let r = dial_one(&c, CLIENT_POD, &target)?;
    ensure!(r.echo_ok, "{r:?}");
    ensure!(r.server_local.as_deref() == Some(target.as_str()), "{r:?}");
    let local = r.local.clone().context("no local address")?;
    let line = wait_conn_line(
        &c,
        &local,
        0,
        &[
            &format!("dst.addr={target}"),
            &format!("dst.hbone_addr=[{pod6}]:15008 "),
            "transport=\"hbone\"",
        ],
    )?;
    eprintln!("{line}");
    Ok(())
}

#[test]
fn destination_proxy_down_fails_fast() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server(None)?;
    // Works first (and warms any tunnel pool to node2).
    let r = dial_one(&c, CLIENT_POD, TARGET)?;
    let local = r.local.clone().context("no local address")?;
    wait_conn_line(&c, &local, 0, &["transport=\"hbone\""])?;

    c.kill_process("node2", "proxy", libc::SIGKILL)?;
    let offset = c.log_len("node1", "proxy");
    // A prompt reset, not a hang: a reset before the server's HELLO (testpod's read timeout
    // would be an error in `outcome`), and before the proxy's own connect timeout (measured in
    // the pod), i.e. not node1's proxy giving up on a connect that nobody answered.
    let limit = mesh_node::defaults::CONNECT_TIMEOUT;
    for attempt in 0..2 {
        let mut r = dial(&c, &testpod(), CLIENT_POD, &[TARGET.to_string()], 1, 1, 0)?;
        let one = r.pop().context("empty dial report")?;
        eprintln!("attempt {attempt}: {one:?}");
        ensure!(
            outcome(&one)? == Outcome::Refused,
            "not refused with the destination proxy down (not tunnelled?): {one:?}"
        );
        ensure!(
            u128::from(one.elapsed_ms) < limit.as_millis(),
            "refused after {} ms, not before the {limit:?} connect timeout: {one:?}",
            one.elapsed_ms
        );
    }
    let line = wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &["tunnel refused", &format!("dst={TARGET}")],
        Duration::from_secs(5),
    )?;
    eprintln!("{line}");
    Ok(())
}
