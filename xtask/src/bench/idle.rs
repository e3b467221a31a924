//! `cargo xtask bench --idle N`: memory per connection. N idle connections from an enrolled
//! pod on node1 to an enrolled pod on node2, held open through the mesh (node1's proxy: the
//! outbound side, a captured connection and its share of the pooled HBONE connections;
//! node2's proxy: the inbound side, a tunnel stream and its connection to the pod). Reports
//! each proxy's RSS and open descriptors before, while the connections are held, and after
//! they closed, and the bytes per connection ((held − before) / N). With `--quic-only` the
//! tunnels are HTTP/3 streams over QUIC (`MeshConfig` `tunnelProtocol: quic`). Prints a table
//! and writes `target/bench/idle.json`. See docs/performance.md ("Memory per connection").

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidenode_tests::cluster::{Cluster, ClusterOpts, TestCluster};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::util::{self, Mem, dump_logs};

const PREFIX: &str = "snidle";
const CLIENT: &str = "node1-pod1";
const SERVER: &str = "node2-pod1";
const PORT: u16 = 8080;

/// Raises this process's open-files limit (children inherit it: the proxies and the pods'
/// processes) to what `n` connections need.
fn raise_nofile(n: usize) -> Result<u64> {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let want = ((4 * n + 20_000) as u64).min(nr_open);
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if l.rlim_cur < want {
            let mut raised = l;
            raised.rlim_cur = want;
            raised.rlim_max = l.rlim_max.max(want);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            } else {
                // Without CAP_SYS_RESOURCE (a container): up to the hard limit.
                l.rlim_cur = l.rlim_max;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
    }
    // Each proxy holds about one descriptor per connection plus the pooled tunnels; each side's
    // testpod one per connection.
    let need = (n + 2_000) as u64;
    if l.rlim_cur < need {
        bail!(
            "RLIMIT_NOFILE is {} (hard limit {}), {n} connections need about {need}",
            l.rlim_cur,
            l.rlim_max
        );
    }
    Ok(l.rlim_cur)
}

fn fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// One proxy's figures at one moment.
#[derive(Clone, Copy)]
struct Snap {
    rss_kb: u64,
    fds: usize,
}

fn snap(pid: u32) -> Result<Snap> {
    let m = Mem::read(pid).with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Snap {
        rss_kb: m.rss_kb,
        fds: fds(pid).unwrap_or(0),
    })
}

/// `testpod idle-serve` in `pod`, up once it says `serving`.
fn idle_server(c: &Cluster, testpod: &Path, pod: &str) -> Result<std::process::Child> {
    let mut cmd = c.pod_command(pod, testpod)?;
    cmd.args(["idle-serve", "--port", &PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting testpod idle-serve")?;
    let out = child.stdout.take().context("idle-serve stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "serving" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("testpod idle-serve did not start: {line:?}");
    }
    Ok(child)
}

/// `testpod idle` in the client pod: opens `n` connections, returns its report and the
/// process (holding them until its stdin closes).
fn hold(
    c: &Cluster,
    testpod: &Path,
    target: &str,
    n: usize,
    timeout: Duration,
) -> Result<(Value, std::process::Child)> {
    let mut cmd = c.pod_command(CLIENT, testpod)?;
    cmd.args(["idle", "--to", target, "--conns", &n.to_string()])
        .args(["--parallel", "64"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting testpod idle")?;
    let out = child.stdout.take().context("idle stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(timeout) {
        Ok(line) => {
            let v: Value = serde_json::from_str(line.trim())
                .with_context(|| format!("testpod idle report {line:?}"))?;
            Ok((v, child))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("testpod idle did not report within {timeout:?}")
        }
    }
}

/// Closes the held connections (stdin EOF) and waits for the process.
fn release(mut child: std::process::Child) -> Result<()> {
    drop(child.stdin.take());
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("testpod idle did not exit after its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(n: usize, quic: bool, mesh_node: &Path, testpod: &Path) -> Result<()> {
    if n == 0 {
        bail!("--idle wants at least 1 connection");
    }
    let nofile = raise_nofile(n)?;
    Cluster::down(PREFIX);
    let protocol = if quic { "quic" } else { "h2" };
    println!(
        "bench --idle: {n} idle connections {CLIENT} → {SERVER} through the mesh, HBONE over {protocol} (RLIMIT_NOFILE {nofile})"
    );
    let mut cluster = TestCluster::up(ClusterOpts {
        prefix: PREFIX.into(),
        nodes: 2,
        pods: 1,
        mesh_node: mesh_node.to_path_buf(),
        start_agents: true,
        mesh: true,
        ..Default::default()
    })?;
    let res = measure(&mut cluster, n, quic, testpod);
    if let Err(e) = &res {
        eprintln!("\nbench --idle failed: {e:#}\n\nlogs (last lines):");
        dump_logs(&cluster.state_dir.join("logs"));
    }
    drop(cluster);
    res
}

fn measure(c: &mut Cluster, n: usize, quic: bool, testpod: &Path) -> Result<()> {
    let target = format!("{}:{PORT}", c.pod(SERVER)?.ip);
    if quic {
        c.write_config_file(
            "meshconfig.yaml",
            "apiVersion: sidenode.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\n\
             spec:\n  tunnelProtocol: quic\n",
        )?;
    }
    let mut server = idle_server(c, testpod, SERVER)?;
    let res = (|| -> Result<Value> {
        // Warm up: until one connection goes through (enrolment, HBONE listener, certificates;
        // over QUIC once node2's proxy has accepted a QUIC connection), then a round of 100
        // so every lazily built piece exists before the baseline.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let (v, child) = hold(c, testpod, &target, 1, Duration::from_secs(20))?;
            release(child)?;
            let over_quic = || {
                std::fs::read_to_string(c.log_path("node2", "proxy"))
                    .is_ok_and(|l| l.contains("HBONE/QUIC connection accepted"))
            };
            if v["open"] == 1 && (!quic || over_quic()) {
                break;
            }
            if Instant::now() > end {
                bail!(
                    "no connection {CLIENT} → {target} within 60 s{}: {v}",
                    if quic { " over QUIC" } else { "" }
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let (_, warm) = hold(c, testpod, &target, 100, Duration::from_secs(60))?;
        release(warm)?;
        std::thread::sleep(Duration::from_secs(3));
        let out_pid = c.pid("node1", "proxy").context("node1 proxy pid")?;
        let in_pid = c.pid("node2", "proxy").context("node2 proxy pid")?;
        let before = (snap(out_pid)?, snap(in_pid)?);
        let started = Instant::now();
        let (report, child) = hold(
            c,
            testpod,
            &target,
            n,
            Duration::from_secs(120 + (n / 50) as u64),
        )?;
        let open = report["open"].as_u64().unwrap_or(0) as usize;
        let opened_s = started.elapsed().as_secs_f64();
        // Let allocations settle (buffers of the first bytes, pooled connections' windows).
        std::thread::sleep(Duration::from_secs(3));
        let held = (snap(out_pid)?, snap(in_pid)?);
        release(child)?;
        // Closing 10,000 connections takes the proxies a while: wait (≤ 60 s) until both are
        // back near their descriptors before (the pooled tunnel connections stay).
        let closing = Instant::now();
        let slack = n / 100 + 20;
        let after = loop {
            let a = (snap(out_pid)?, snap(in_pid)?);
            let settled = a.0.fds <= before.0.fds + slack && a.1.fds <= before.1.fds + slack;
            if settled || closing.elapsed() > Duration::from_secs(60) {
                break a;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let closed_in_s = closing.elapsed().as_secs_f64();
        // The proxy returns freed heap to the kernel every 10 s (`kernel::heap`): what it
        // keeps once that has run.
        std::thread::sleep(Duration::from_secs(12));
        let settled = (snap(out_pid)?, snap(in_pid)?);
        if open != n {
            bail!(
                "only {open} of {n} connections opened: {report} (proxy RSS held {} / {} kB)",
                held.0.rss_kb,
                held.1.rss_kb
            );
        }
        let side = |name: &str, b: Snap, h: Snap, a: Snap, s: Snap| {
            let per_conn = (h.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / n as f64;
            json!({
                "side": name,
                "rss_kb_before": b.rss_kb,
                "rss_kb_held": h.rss_kb,
                "rss_kb_after": a.rss_kb,
                "rss_kb_settled": s.rss_kb,
                "bytes_per_connection": per_conn.round(),
                "fds_before": b.fds,
                "fds_held": h.fds,
                "fds_after": a.fds,
            })
        };
        Ok(json!({
            "connections": n,
            "tunnel_protocol": if quic { "quic" } else { "h2" },
            "opened_in_s": opened_s,
            "closed_in_s": closed_in_s,
            "client_report": report,
            "proxies": [
                side("outbound (node1 proxy)", before.0, held.0, after.0, settled.0),
                side("inbound (node2 proxy)", before.1, held.1, after.1, settled.1),
            ],
        }))
    })();
    let _ = server.kill();
    let _ = server.wait();
    let result = res?;
    println!(
        "\n{n} idle connections opened in {:.1} s; after they closed, descriptors back in {:.1} s\n",
        result["opened_in_s"].as_f64().unwrap_or(0.0),
        result["closed_in_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<24} {:>12} {:>12} {:>12} {:>12} {:>10} {:>9} {:>9} {:>9}",
        "proxy",
        "RSS before",
        "RSS held",
        "RSS after",
        "RSS +12 s",
        "B/conn",
        "fds bef.",
        "fds held",
        "fds aft."
    );
    for p in result["proxies"].as_array().into_iter().flatten() {
        let u = |k: &str| p[k].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:>9} kB {:>9} kB {:>9} kB {:>9} kB {:>10.0} {:>9} {:>9} {:>9}",
            p["side"].as_str().unwrap_or(""),
            u("rss_kb_before"),
            u("rss_kb_held"),
            u("rss_kb_after"),
            u("rss_kb_settled"),
            p["bytes_per_connection"].as_f64().unwrap_or(0.0),
            u("fds_before"),
            u("fds_held"),
            u("fds_after"),
        );
    }
    let when = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let doc = json!({
        "bench": "idle",
        "when": util::rfc3339(when),
        "machine": util::machine(),
        "git": util::git(),
        "result": result,
    });
    let dir = super::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("idle.json");
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string_pretty(&doc)?)?;
    println!("\nJSON: {}", path.display());
    Ok(())
}
