//! Kernel TLS for HBONE/TCP tunnels (`--ktls`, docs/architecture.md). Run as root:
//! `cargo test -p sidenode-tests --test ktls`.
//!
//! On a kernel with the TLS ULP (`tls` module; under qemu: `cargo xtask kernels --tests
//! ktls`) both proxies move their tunnel connections to the kernel: echo and checksummed
//! transfers both ways, the secret never on the wire, `/proc/net/tls_stat` counters rising in
//! the namespaces holding the tunnel sockets (node1's for the outbound side, the server pod's
//! for its listener), `sidenode_hbone_tls_connections_total{path="kernel"}` counted; then
//! node2's proxy restarts with `--ktls off` and a kTLS client keeps talking to a userspace
//! server, and last node1's restarts with `--ktls off` and node2's with kernel TLS again: a
//! userspace client talking to a kTLS server (the records are the same either way). On a kernel without it (no `/proc/net/tls_stat`), `auto`
//! must fall back: the same traffic, counted as `path="userspace"` on both sides.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{Server, Session};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const CLIENT_POD: &str = "node1-pod1";
const TLS_METRIC: &str = "sidenode_hbone_tls_connections_total";
const MB: u64 = 1 << 20;

/// `/proc/net/tls_stat` of a namespace (`cat` run in it), or `None` without the TLS ULP.
fn tls_stat(mut cat: Command) -> Result<Option<BTreeMap<String, u64>>> {
    let out = cat
        .arg("/proc/net/tls_stat")
        .stdin(Stdio::null())
        .output()
        .context("running cat /proc/net/tls_stat")?;
    if !out.status.success() {
        return Ok(None);
    }
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split_whitespace();
        if let (Some(k), Some(v)) = (f.next(), f.next()) {
            m.insert(k.to_string(), v.parse::<u64>().unwrap_or(0));
        }
    }
    Ok(Some(m))
}

fn stat_of(c: &Cluster, node: Option<&str>, pod: Option<&str>) -> Result<BTreeMap<String, u64>> {
    let cmd = match (node, pod) {
        (Some(n), _) => c.node_command(n, "cat")?,
        (_, Some(p)) => c.pod_command(p, "cat")?,
        _ => bail!("neither node nor pod"),
    };
    tls_stat(cmd)?.context("/proc/net/tls_stat went away")
}

/// The proxies' lines about kernel TLS (the probe's verdict, setup failures).
fn ktls_lines(c: &Cluster) -> String {
    ["node1", "node2"]
        .iter()
        .flat_map(|n| {
            std::fs::read_to_string(c.log_path(n, "proxy"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("kernel TLS") || l.contains("TLS path"))
                .map(|l| format!("{n}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The sum of a node's and its pod's counters: outbound tunnel sockets live in the source
/// pod's namespace (`--tunnel-from-pod`, the default) or the proxy's.
fn add(a: BTreeMap<String, u64>, b: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut m = a;
    for (k, v) in b {
        *m.entry(k).or_insert(0) += v;
    }
    m
}

fn outbound_stat(c: &Cluster) -> Result<BTreeMap<String, u64>> {
    Ok(add(
        stat_of(c, Some("node1"), None)?,
        stat_of(c, None, Some(CLIENT_POD))?,
    ))
}

fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

const RETIRED_METRIC: &str = "sidenode_hbone_tls_retired_total";

fn tls_count(c: &Cluster, node: &str, direction: &str, path: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, node)?,
        TLS_METRIC,
        &[("direction", direction), ("path", path)],
    ))
}

/// Echo of three lines carrying `secret` over one captured connection.
fn echo(c: &Cluster, secret: &str) -> Result<()> {
    let mut s = Session::open(c, &testpod(), CLIENT_POD, TARGET)?;
    ensure!(s.through_proxy(), "not through a proxy: {}", s.hello);
    for i in 0..3 {
        let line = format!("{secret}-{i}");
        ensure!(s.echo(&line)? == line, "echo mismatch");
    }
    s.close()
}

/// `testpod transfer`: `conns` connections each sending `bytes`, half-closing, and checking
/// the whole echo (FNV-1a). Fails unless every connection got back exactly what it sent.
fn transfer(c: &Cluster, bytes: u64, conns: usize) -> Result<()> {
    let out = c
        .pod_command(CLIENT_POD, testpod())?
        .args(["transfer", "--to", TARGET, "--bytes"])
        .arg(bytes.to_string())
        .args(["--conns", &conns.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running testpod transfer")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "testpod transfer failed ({}): {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("transfer report {text}"))?;
    let ok = v["ok"].as_u64().context("transfer report without ok")?;
    ensure!(
        ok == conns as u64,
        "{ok} of {conns} connections got back exactly what they sent: {v}"
    );
    Ok(())
}

/// Echo (captured on node1's link: the secret must not appear, port 15008 must) and
/// checksummed transfers.
fn traffic(c: &Cluster, tag: &str) -> Result<()> {
    let pcap = c.state_dir.join(format!("node1-eth0-{tag}.pcap"));
    let cap = Capture::start(c, "node1", &pcap, 0)?;
    let secret = format!("SIDENODE-SECRET-{}", random_hex(12)?);
    echo(c, &secret)?;
    std::thread::sleep(Duration::from_millis(300));
    let bytes = cap.stop()?;
    ensure!(
        !contains(&bytes, secret.as_bytes()),
        "{tag}: the secret {secret} appears in clear text on node1's eth0"
    );
    ensure!(
        contains(&bytes, &15008u16.to_be_bytes()),
        "{tag}: no port-15008 packets captured"
    );
    transfer(c, 32 * MB, 1)?;
    transfer(c, 4 * MB, 4)?;
    eprintln!(
        "{tag}: echo encrypted on the wire ({} capture bytes), 32 MB + 4x4 MB echoed intact",
        bytes.len()
    );
    Ok(())
}

#[test]
fn tunnels_use_kernel_tls_and_interoperate_with_userspace_tls() -> Result<()> {
    let _turn = serial();
    let c = mesh_cluster(2, None)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;

    let Some(_) = tls_stat(c.node_command("node1", "cat")?)? else {
        // No TLS ULP: `auto` falls back to userspace TLS on both sides.
        traffic(&c, "fallback")?;
        let out = tls_count(&c, "node1", "outbound", "userspace")?;
        let inb = tls_count(&c, "node2", "inbound", "userspace")?;
        let kernel = tls_count(&c, "node1", "outbound", "kernel")?
            + tls_count(&c, "node2", "inbound", "kernel")?;
        ensure!(
            out >= 1.0,
            "node1: {TLS_METRIC} outbound userspace is {out}"
        );
        ensure!(inb >= 1.0, "node2: {TLS_METRIC} inbound userspace is {inb}");
        ensure!(
            kernel == 0.0,
            "{kernel} kernel-TLS connections without TLS ULP"
        );
        eprintln!(
            "no TLS ULP on this kernel (no /proc/net/tls_stat): fallback to userspace TLS \
             checked ({out} outbound, {inb} inbound connections)"
        );
        return Ok(());
    };
    let out0 = outbound_stat(&c)?;
    let in0 = stat_of(&c, None, Some(SERVER_POD))?;

    // 1. Both sides kTLS.
    traffic(&c, "ktls-both")?;
    let out1 = outbound_stat(&c)?;
    let in1 = stat_of(&c, None, Some(SERVER_POD))?;
    eprintln!("{}", ktls_lines(&c));
    eprintln!("node1+{CLIENT_POD} tls_stat before {out0:?}\nnode1 tls_stat after {out1:?}");
    eprintln!("{SERVER_POD} tls_stat before {in0:?}\n{SERVER_POD} tls_stat after {in1:?}");
    for (who, a, b) in [("node1+client pod", &out0, &out1), (SERVER_POD, &in0, &in1)] {
        for k in ["TlsTxSw", "TlsRxSw"] {
            ensure!(
                get(b, k) > get(a, k),
                "{who}: {k} did not rise ({} -> {})",
                get(a, k),
                get(b, k)
            );
        }
        ensure!(
            get(b, "TlsDecryptError") == get(a, "TlsDecryptError"),
            "{who}: TlsDecryptError rose"
        );
    }
    let k_out = tls_count(&c, "node1", "outbound", "kernel")?;
    let k_in = tls_count(&c, "node2", "inbound", "kernel")?;
    ensure!(
        k_out >= 1.0,
        "node1: {TLS_METRIC} outbound kernel is {k_out}"
    );
    ensure!(k_in >= 1.0, "node2: {TLS_METRIC} inbound kernel is {k_in}");

    // 2. node2's proxy forced to userspace TLS: a kTLS client and a rustls server.
    let mut c = c;
    restart_proxy(&mut c, "node2", &["--ktls", "off"])?;
    let out2 = outbound_stat(&c)?;
    traffic(&c, "ktls-client-userspace-server")?;
    let out3 = outbound_stat(&c)?;
    ensure!(
        get(&out3, "TlsTxSw") > get(&out1, "TlsTxSw"),
        "node1: no new kTLS session towards the userspace server"
    );
    ensure!(
        get(&out3, "TlsDecryptError") == get(&out2, "TlsDecryptError"),
        "node1: TlsDecryptError rose against the userspace server"
    );
    let u_in = tls_count(&c, "node2", "inbound", "userspace")?;
    let k_in = tls_count(&c, "node2", "inbound", "kernel")?;
    ensure!(
        u_in >= 1.0,
        "node2 (--ktls off): inbound userspace is {u_in}"
    );
    ensure!(k_in == 0.0, "node2 (--ktls off): inbound kernel is {k_in}");
    eprintln!("node1 tls_stat with a userspace server: {out3:?}");

    // 3. The other way round: node1's proxy on userspace TLS, node2's back on kernel TLS.
    restart_proxy(&mut c, "node2", &[])?;
    // Before node1's restart: its first tunnel to node2 (the warm-up) is counted too.
    let in4 = stat_of(&c, None, Some(SERVER_POD))?;
    restart_proxy(&mut c, "node1", &["--ktls", "off"])?;
    traffic(&c, "userspace-client-ktls-server")?;
    let in5 = stat_of(&c, None, Some(SERVER_POD))?;
    eprintln!("{SERVER_POD} tls_stat with a userspace client: {in4:?} -> {in5:?}");
    for k in ["TlsTxSw", "TlsRxSw"] {
        ensure!(
            get(&in5, k) > get(&in4, k),
            "{SERVER_POD}: {k} did not rise for a userspace client ({} -> {})",
            get(&in4, k),
            get(&in5, k)
        );
    }
    ensure!(
        get(&in5, "TlsDecryptError") == get(&in4, "TlsDecryptError"),
        "{SERVER_POD}: TlsDecryptError rose with a userspace client"
    );
    let u_out = tls_count(&c, "node1", "outbound", "userspace")?;
    let k_out = tls_count(&c, "node1", "outbound", "kernel")?;
    let k_in = tls_count(&c, "node2", "inbound", "kernel")?;
    ensure!(
        u_out >= 1.0 && k_out == 0.0,
        "node1 (--ktls off): outbound userspace {u_out}, kernel {k_out}"
    );
    ensure!(k_in >= 1.0, "node2: inbound kernel is {k_in}");

    // 4. A low record limit on both sides: each kTLS tunnel connection is retired soon after
    //    it starts carrying data (client: no new tunnels on it; server: GOAWAY), and the
    //    traffic after it goes over a new kTLS connection, intact.
    restart_proxy(&mut c, "node2", &["--ktls-record-limit", "64"])?;
    restart_proxy(&mut c, "node1", &["--ktls-record-limit", "64"])?;
    traffic(&c, "record-limit-1")?;
    let retired = |c: &Cluster| -> Result<f64> {
        Ok(metric_value(
            &proxy_metrics(c, "node1")?,
            RETIRED_METRIC,
            &[("direction", "outbound"), ("reason", "record_limit")],
        ) + metric_value(
            &proxy_metrics(c, "node2")?,
            RETIRED_METRIC,
            &[("direction", "inbound"), ("reason", "record_limit")],
        ))
    };
    let mut n = 0.0;
    let seen = wait_until(Duration::from_secs(10), || {
        n = retired(&c)?;
        Ok(n >= 1.0)
    })?;
    ensure!(
        seen,
        "no kTLS connection retired at a 64-record limit ({RETIRED_METRIC} = {n})"
    );
    let out6 = outbound_stat(&c)?;
    traffic(&c, "record-limit-2")?;
    let out7 = outbound_stat(&c)?;
    ensure!(
        get(&out7, "TlsTxSw") > get(&out6, "TlsTxSw"),
        "node1: no new kTLS connection after the retirement ({} -> {})",
        get(&out6, "TlsTxSw"),
        get(&out7, "TlsTxSw")
    );
    ensure!(
        get(&out7, "TlsDecryptError") == get(&out6, "TlsDecryptError"),
        "node1: TlsDecryptError rose across the retirement"
    );
    eprintln!("record limit: {n} retirement(s) counted; node1 tls_stat {out6:?} -> {out7:?}");
    Ok(())
}

/// Restarts `node`'s proxy with `args` and waits until a tunnel through it carries an echo
/// (pooled connections to the previous process may meet it closing).
fn restart_proxy(c: &mut Cluster, node: &str, args: &[&str]) -> Result<()> {
    let offset = c.log_len(node, "proxy");
    c.kill_process(node, "proxy", libc::SIGTERM)
        .or_else(|_| c.kill_process(node, "proxy", libc::SIGKILL))?;
    c.start_process_with(node, "proxy", args)?;
    c.wait_for_log_after(
        node,
        "proxy",
        offset,
        "proxy ready",
        Duration::from_secs(30),
    )?;
    wait_log_all(
        c,
        node,
        "proxy",
        offset,
        &["HBONE listener open"],
        Duration::from_secs(10),
    )?;
    let mut first = Ok(());
    let fresh = wait_until(Duration::from_secs(10), || {
        first = echo(c, "warm-up");
        Ok(first.is_ok())
    })?;
    ensure!(
        fresh,
        "no tunnel through {node}'s restarted proxy: {first:?}"
    );
    Ok(())
}
