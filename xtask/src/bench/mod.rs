//! `cargo xtask bench [--rounds N] [--quick]`: pod-to-pod across nodes, direct (a pod that is
//! not enrolled) against the mesh (an enrolled pod: captured by its node's proxy, carried to the
//! other node's proxy), side by side on one simulated 2-node cluster built from the release
//! binaries.
//!
//! Per round and path: one long TCP stream (`iperf3`), request/response latency on a kept-open
//! connection (`testpod rr`) and new-connection latency (`testpod connlat`); direct and mesh
//! alternate (their order flips every round). Before and after, the memory of the node
//! processes. Prints a table of medians against the targets and writes every value to
//! `target/bench/latest.json`.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidenode_tests::cluster::{CONTROLLER, Cluster, ClusterOpts, TestCluster};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PREFIX: &str = "snbnch";
const SERVER_POD: &str = "node2-pod1";
/// Not enrolled (namespace `plain`): its connections go straight to the server.
const DIRECT_CLIENT: &str = "node1-pod2";
/// Enrolled (namespace `mesh`): captured by node1's proxy, tunnelled to node2's.
const MESH_CLIENT: &str = "node1-pod1";
const ECHO_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
/// The CPU the latency clients are pinned to (an idle vCPU here halts; waking it adds noise).
const PIN_CPU: &str = "1";

// Targets for this 2-core machine (informational).
const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
const TARGET_RR_ADDED_P50_US: f64 = 20.0;
const TARGET_CONN_ADDED_P50_US: f64 = 300.0;
const TARGET_RSS_MB: f64 = 20.0;

struct Params {
    rounds: usize,
    quick: bool,
    iperf_secs: u32,
    rr_count: usize,
    rr_warmup: usize,
    rr_size: usize,
    conn_count: usize,
    conn_warmup: usize,
}

impl Params {
    fn new(rounds: usize, quick: bool) -> Self {
        Self {
            rounds: rounds.max(1),
            quick,
            iperf_secs: if quick { 2 } else { 5 },
            rr_count: if quick { 3_000 } else { 20_000 },
            rr_warmup: 200,
            rr_size: 64,
            conn_count: if quick { 500 } else { 2_000 },
            conn_warmup: 20,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Mesh,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Mesh => "mesh",
        }
    }
    fn client(self) -> &'static str {
        match self {
            Route::Direct => DIRECT_CLIENT,
            Route::Mesh => MESH_CLIENT,
        }
    }
}

/// One path's measurements in one round.
#[derive(Default)]
struct Sample {
    throughput_bps: f64,
    rr: Value,
    connlat: Value,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

pub fn run(rounds: usize, quick: bool) -> Result<()> {
    let params = Params::new(rounds, quick);
    let release = target_dir().join("release");
    let mesh_node = release.join("mesh-node");
    let testpod = release.join("testpod");
    for bin in [&mesh_node, &testpod] {
        if !bin.exists() {
            bail!("{} not found; build with --release first", bin.display());
        }
    }
    for tool in ["iperf3", "taskset", "ss"] {
        which(tool).with_context(|| format!("{tool} not found (run `cargo xtask setup`)"))?;
    }
    // A cluster left by an interrupted run would block `up`.
    Cluster::down(PREFIX);
    println!("bench: bringing up a 2-node mesh cluster ({PREFIX}) from the release binaries");
    let started = Instant::now();
    // TestCluster tears everything down when dropped, also on error.
    let mut cluster = TestCluster::up(ClusterOpts {
        prefix: PREFIX.into(),
        nodes: 2,
        pods: 2,
        mesh_node: mesh_node.clone(),
        start_agents: true,
        mesh: true,
        ..Default::default()
    })?;
    let res = bench(&mut cluster, &testpod, &params);
    if let Err(e) = &res {
        eprintln!("\nbench failed: {e:#}\n\nnode logs (last lines):");
        dump_logs(&cluster.state_dir.join("logs"));
    }
    println!(
        "bench: tearing the cluster down ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    drop(cluster);
    res
}

fn bench(c: &mut Cluster, testpod: &Path, p: &Params) -> Result<()> {
    for (pod, ns) in [
        (MESH_CLIENT, "mesh"),
        (DIRECT_CLIENT, "plain"),
        (SERVER_POD, "mesh"),
    ] {
        let got = &c.pod(pod)?.namespace;
        if got != ns {
            bail!("pod {pod} is in namespace {got}, the bench expects {ns}");
        }
    }
    let server_ip = c.pod(SERVER_POD)?.ip.clone();
    let echo = format!("{server_ip}:{ECHO_PORT}");

    // Idle memory: after startup, before any traffic.
    std::thread::sleep(Duration::from_secs(2));
    let mem_idle = memory(c);

    let _echo_server = Bg::echo_server(c, testpod, SERVER_POD, ECHO_PORT)?;
    let _iperf_server = Bg::iperf_server(c, SERVER_POD, IPERF_PORT)?;

    // Sanity: both paths work, and only the enrolled client is captured.
    let checks = sanity(c, testpod, &echo)?;

    let mut rounds: Vec<BTreeMap<&'static str, Sample>> = Vec::new();
    for r in 1..=p.rounds {
        let order = if r % 2 == 1 {
            [Route::Direct, Route::Mesh]
        } else {
            [Route::Mesh, Route::Direct]
        };
        let mut round = BTreeMap::new();
        for path in order {
            let s = measure(c, testpod, p, path, &server_ip, &echo)
                .with_context(|| format!("round {r}, {} path", path.name()))?;
            println!(
                "round {r}/{} {:<6}  iperf3 {:>6.2} Gbit/s   rr p50 {:>7.1} µs p99 {:>7.1} µs   connect p50 {:>7.1} µs p99 {:>7.1} µs",
                p.rounds,
                path.name(),
                s.throughput_bps / 1e9,
                num(&s.rr, "p50_us"),
                num(&s.rr, "p99_us"),
                num(&s.connlat, "p50_us"),
                num(&s.connlat, "p99_us"),
            );
            round.insert(path.name(), s);
        }
        rounds.push(round);
    }
    // Right after the load.
    let mem_after = memory(c);

    let report = Report::new(p, &rounds, &mem_idle, &mem_after);
    report.print();
    let json = report.to_json(p, &rounds, &mem_idle, &mem_after, &checks)?;
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("latest.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {}", out.display());
    Ok(())
}

// ---- measurements ---------------------------------------------------------------------------

fn measure(
    c: &Cluster,
    testpod: &Path,
    p: &Params,
    path: Route,
    server_ip: &str,
    echo: &str,
) -> Result<Sample> {
    let client = path.client();
    // 1. One long stream.
    let mut cmd = c.pod_command(client, "iperf3")?;
    cmd.args(["-c", server_ip, "-p", &IPERF_PORT.to_string()])
        .args(["-t", &p.iperf_secs.to_string(), "-J"])
        .args(["--connect-timeout", "3000"]);
    let out = output(
        cmd,
        Duration::from_secs(u64::from(p.iperf_secs) + 30),
        "iperf3",
    )?;
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| {
        format!(
            "parsing iperf3 -J output ({}): {} {}",
            out.status, out.stdout, out.stderr
        )
    })?;
    if let Some(err) = v.get("error") {
        bail!("iperf3 from {client}: {err}");
    }
    if !out.ok {
        bail!(
            "iperf3 from {client} failed ({}): {}",
            out.status,
            out.stderr
        );
    }
    let throughput_bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 output has no end.sum_received.bits_per_second")?;

    // 2. Request/response on one connection.
    let mut cmd = c.pod_command(client, "taskset")?;
    cmd.args(["-c", PIN_CPU])
        .arg(testpod)
        .args(["rr", "--to", echo])
        .args(["--count", &p.rr_count.to_string()])
        .args(["--size", &p.rr_size.to_string()])
        .args(["--warmup", &p.rr_warmup.to_string()]);
    let rr = json_line(output(cmd, Duration::from_secs(120), "testpod rr")?, "rr")?;

    // 3. New connections.
    let mut cmd = c.pod_command(client, "taskset")?;
    cmd.args(["-c", PIN_CPU])
        .arg(testpod)
        .args(["connlat", "--to", echo])
        .args(["--count", &p.conn_count.to_string()])
        .args(["--warmup", &p.conn_warmup.to_string()]);
    let connlat = json_line(
        output(cmd, Duration::from_secs(180), "testpod connlat")?,
        "connlat",
    )?;
    if let Some(n) = connlat.get("errors").and_then(Value::as_u64)
        && n > 0
    {
        eprintln!(
            "warning: {} path: {n} connections failed; first: {}",
            path.name(),
            connlat.get("first_error").unwrap_or(&Value::Null)
        );
    }
    Ok(Sample {
        throughput_bps,
        rr,
        connlat,
    })
}

/// One connection per path through `testpod dial`: what the server saw, whether node1's
/// capture counted it, and whether an HBONE connection (port 15008) is open on node1.
fn sanity(c: &Cluster, testpod: &Path, echo: &str) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for path in [Route::Direct, Route::Mesh] {
        let client = path.client();
        let before = captured(c)?;
        let mut cmd = c.pod_command(client, testpod)?;
        cmd.args(["dial", "--to", echo, "--conns", "3", "--concurrency", "1"]);
        let v = json_line(
            output(cmd, Duration::from_secs(30), "testpod dial")?,
            "dial",
        )?;
        let results = v
            .get("results")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(bad) = results
            .iter()
            .find(|r| r.get("echo_ok") != Some(&Value::Bool(true)))
        {
            bail!(
                "{} path: a test connection {client} -> {echo} failed: {bad}",
                path.name()
            );
        }
        let captured_delta = captured(c)?.saturating_sub(before);
        let peer = results
            .first()
            .and_then(|r| r.get("server_peer"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let hbone = hbone_conns(c, "node1");
        println!(
            "check {:<6} {client} ({}) -> {echo}: echo ok, server saw peer={peer}, node1 captured +{captured_delta}, node1 :15008 connections {}",
            path.name(),
            c.pod(client)?.ip,
            hbone.map_or("?".to_string(), |n| n.to_string())
        );
        match path {
            Route::Direct if captured_delta != 0 => {
                bail!("direct path was captured ({captured_delta} connects rewritten)")
            }
            Route::Mesh if captured_delta == 0 => {
                bail!("mesh path was not captured (node1 captured counter did not move)")
            }
            Route::Mesh if hbone == Some(0) => eprintln!(
                "warning: no connection to or from port 15008 on node1 after the mesh check: is the proxy tunnelling over HBONE?"
            ),
            _ => {}
        }
        out.insert(
            path.name().into(),
            json!({
                "client": client,
                "server_peer": peer,
                "captured_delta": captured_delta,
                "node1_hbone_conns": hbone,
            }),
        );
    }
    Ok(Value::Object(out))
}

fn captured(c: &Cluster) -> Result<u64> {
    let v = c.maps_json("node1")?;
    v.pointer("/stats/captured")
        .and_then(Value::as_u64)
        .context("mesh-node maps --json: no stats.captured")
}

/// Established TCP connections with port 15008 on either end, in the node's netns.
fn hbone_conns(c: &Cluster, node: &str) -> Option<usize> {
    let mut cmd = c.node_command(node, "ss").ok()?;
    cmd.args([
        "-Htn",
        "state",
        "established",
        "( sport = :15008 or dport = :15008 )",
    ]);
    let out = output(cmd, Duration::from_secs(10), "ss").ok()?;
    Some(out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
}

/// RSS of every node's agent and proxy, and of the controller.
fn memory(c: &Cluster) -> BTreeMap<String, Mem> {
    let mut out = BTreeMap::new();
    let mut procs: Vec<(String, String, String)> = c
        .node_names()
        .into_iter()
        .flat_map(|n| ["agent", "proxy"].map(|k| (n.clone(), k.to_string(), format!("{n}-{k}"))))
        .collect();
    procs.push((CONTROLLER.into(), CONTROLLER.into(), CONTROLLER.into()));
    for (node, kind, name) in procs {
        if let Some(pid) = c.pid(&node, &kind)
            && let Some(m) = Mem::read(pid)
        {
            out.insert(name, m);
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Mem {
    pid: u32,
    rss_kb: u64,
    hwm_kb: u64,
}

impl Mem {
    fn read(pid: u32) -> Option<Mem> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(Mem {
            pid,
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
        })
    }

    fn rss_mib(self) -> f64 {
        self.rss_kb as f64 / 1024.0
    }

    fn hwm_mib(self) -> f64 {
        self.hwm_kb as f64 / 1024.0
    }

    fn json(self) -> Value {
        json!({"pid": self.pid, "rss_kb": self.rss_kb, "hwm_kb": self.hwm_kb})
    }
}

// ---- report ---------------------------------------------------------------------------------

struct Row {
    metric: String,
    direct: Option<f64>,
    mesh: f64,
    /// `mesh − direct` or `mesh/direct`, formatted.
    diff: String,
    target: String,
    pass: Option<bool>,
}

struct Report {
    rows: Vec<Row>,
    medians: Value,
    targets: Value,
}

fn series(
    rounds: &[BTreeMap<&'static str, Sample>],
    path: &str,
    f: &dyn Fn(&Sample) -> f64,
) -> Vec<f64> {
    rounds.iter().filter_map(|r| r.get(path)).map(f).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Under the RSS target (decimal megabytes, as the target is stated).
fn rss_ok(m: Mem) -> bool {
    (m.rss_kb as f64 * 1024.0) < TARGET_RSS_MB * 1e6
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

impl Report {
    fn new(
        p: &Params,
        rounds: &[BTreeMap<&'static str, Sample>],
        idle: &BTreeMap<String, Mem>,
        after: &BTreeMap<String, Mem>,
    ) -> Report {
        let med = |path: &str, f: &dyn Fn(&Sample) -> f64| median(&series(rounds, path, f));
        let tp = |s: &Sample| s.throughput_bps / 1e9;
        let (tp_d, tp_m) = (med("direct", &tp), med("mesh", &tp));
        let lat = |which: &'static str, key: &'static str| {
            let f = move |s: &Sample| num(if which == "rr" { &s.rr } else { &s.connlat }, key);
            (med("direct", &f), med("mesh", &f))
        };
        let (rr50_d, rr50_m) = lat("rr", "p50_us");
        let (rr99_d, rr99_m) = lat("rr", "p99_us");
        let (cn50_d, cn50_m) = lat("connlat", "p50_us");
        let (cn99_d, cn99_m) = lat("connlat", "p99_us");
        let ratio = tp_m / tp_d;
        let mut rows = vec![
            Row {
                metric: format!("throughput, 1 stream ({} s), Gbit/s", p.iperf_secs),
                direct: Some(tp_d),
                mesh: tp_m,
                diff: format!("{:.0}% of direct", ratio * 100.0),
                target: format!("≥ {:.0}%", TARGET_THROUGHPUT_RATIO * 100.0),
                pass: Some(ratio >= TARGET_THROUGHPUT_RATIO),
            },
            Row {
                metric: format!("rr {} B p50, µs", p.rr_size),
                direct: Some(rr50_d),
                mesh: rr50_m,
                diff: format!("{:+.1} µs", rr50_m - rr50_d),
                target: format!("≤ +{TARGET_RR_ADDED_P50_US:.0} µs"),
                pass: Some(rr50_m - rr50_d <= TARGET_RR_ADDED_P50_US),
            },
            Row {
                metric: format!("rr {} B p99, µs", p.rr_size),
                direct: Some(rr99_d),
                mesh: rr99_m,
                diff: format!("{:+.1} µs", rr99_m - rr99_d),
                target: String::new(),
                pass: None,
            },
            Row {
                metric: "new conn → HELLO p50, µs".into(),
                direct: Some(cn50_d),
                mesh: cn50_m,
                diff: format!("{:+.1} µs", cn50_m - cn50_d),
                target: format!("≤ +{TARGET_CONN_ADDED_P50_US:.0} µs"),
                pass: Some(cn50_m - cn50_d <= TARGET_CONN_ADDED_P50_US),
            },
            Row {
                metric: "new conn → HELLO p99, µs".into(),
                direct: Some(cn99_d),
                mesh: cn99_m,
                diff: format!("{:+.1} µs", cn99_m - cn99_d),
                target: String::new(),
                pass: None,
            },
        ];
        let mut mem_targets = Vec::new();
        for (name, m) in after {
            let node1 = name.starts_with("node1-");
            let idle_mib = idle.get(name).map_or(f64::NAN, |m| m.rss_mib());
            let check = node1;
            rows.push(Row {
                metric: format!("{name} RSS, MiB (idle → after load)"),
                direct: None,
                mesh: m.rss_mib(),
                diff: format!("idle {idle_mib:.1}, peak {:.1}", m.hwm_mib()),
                target: if check {
                    format!("< {TARGET_RSS_MB:.0} MB")
                } else {
                    String::new()
                },
                pass: check.then_some(rss_ok(*m)),
            });
            if check {
                mem_targets.push(json!({
                    "process": name,
                    "rss_after_mib": m.rss_mib(),
                    "target_mb": TARGET_RSS_MB,
                    "pass": rss_ok(*m),
                }));
            }
        }
        let medians = json!({
            "throughput_gbps": {"direct": tp_d, "mesh": tp_m, "mesh_over_direct": ratio},
            "rr_p50_us": {"direct": rr50_d, "mesh": rr50_m, "added": rr50_m - rr50_d},
            "rr_p99_us": {"direct": rr99_d, "mesh": rr99_m, "added": rr99_m - rr99_d},
            "connlat_p50_us": {"direct": cn50_d, "mesh": cn50_m, "added": cn50_m - cn50_d},
            "connlat_p99_us": {"direct": cn99_d, "mesh": cn99_m, "added": cn99_m - cn99_d},
        });
        let targets = json!({
            "throughput_ratio": {"target_min": TARGET_THROUGHPUT_RATIO, "value": ratio, "pass": ratio >= TARGET_THROUGHPUT_RATIO},
            "rr_added_p50_us": {"target_max": TARGET_RR_ADDED_P50_US, "value": rr50_m - rr50_d, "pass": rr50_m - rr50_d <= TARGET_RR_ADDED_P50_US},
            "connlat_added_p50_us": {"target_max": TARGET_CONN_ADDED_P50_US, "value": cn50_m - cn50_d, "pass": cn50_m - cn50_d <= TARGET_CONN_ADDED_P50_US},
            "rss_after_load": mem_targets,
        });
        Report {
            rows,
            medians,
            targets,
        }
    }

    fn print(&self) {
        let w = self
            .rows
            .iter()
            .map(|r| r.metric.chars().count())
            .max()
            .unwrap_or(6);
        println!();
        println!(
            "{:<w$} | {:>13} | {:>13} | {:<26} | {:<10} | result",
            "metric", "direct median", "mesh median", "mesh−direct / ratio", "target"
        );
        println!("{}", "-".repeat(w + 86));
        for r in &self.rows {
            let fmt = |v: f64| {
                if v.abs() >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            };
            println!(
                "{:<w$} | {:>13} | {:>13} | {:<26} | {:<10} | {}",
                r.metric,
                r.direct.map_or("-".into(), fmt),
                fmt(r.mesh),
                r.diff,
                r.target,
                match r.pass {
                    Some(true) => "PASS",
                    Some(false) => "MISS",
                    None => "",
                }
            );
        }
    }

    fn to_json(
        &self,
        p: &Params,
        rounds: &[BTreeMap<&'static str, Sample>],
        idle: &BTreeMap<String, Mem>,
        after: &BTreeMap<String, Mem>,
        checks: &Value,
    ) -> Result<Value> {
        let rounds: Vec<Value> = rounds
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut o = serde_json::Map::new();
                o.insert("round".into(), json!(i + 1));
                o.insert(
                    "order".into(),
                    json!(if i % 2 == 0 {
                        ["direct", "mesh"]
                    } else {
                        ["mesh", "direct"]
                    }),
                );
                for (path, s) in r {
                    o.insert(
                        (*path).into(),
                        json!({
                            "throughput_bps": s.throughput_bps,
                            "rr": s.rr,
                            "connlat": s.connlat,
                        }),
                    );
                }
                Value::Object(o)
            })
            .collect();
        let mem = |m: &BTreeMap<String, Mem>| -> Value {
            m.iter().map(|(k, v)| (k.clone(), v.json())).collect()
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs();
        Ok(json!({
            "timestamp": rfc3339(now),
            "timestamp_unix": now,
            "git": git_describe(),
            "machine": machine(),
            "params": {
                "rounds": p.rounds,
                "quick": p.quick,
                "iperf3_seconds": p.iperf_secs,
                "rr_count": p.rr_count,
                "rr_warmup": p.rr_warmup,
                "rr_size": p.rr_size,
                "connlat_count": p.conn_count,
                "connlat_warmup": p.conn_warmup,
                "pinned_cpu": PIN_CPU,
                "server": SERVER_POD,
                "direct_client": DIRECT_CLIENT,
                "mesh_client": MESH_CLIENT,
                "binaries": "target/release",
            },
            "checks": checks,
            "rounds": rounds,
            "medians": self.medians,
            "memory": {"idle": mem(idle), "after_load": mem(after)},
            "targets": self.targets,
        }))
    }
}

// ---- helpers --------------------------------------------------------------------------------

/// A process in a pod, killed on drop.
struct Bg {
    child: Child,
    what: String,
}

impl Bg {
    /// `testpod serve` (stderr dropped: every reset connection of `connlat` would log a line).
    fn echo_server(c: &Cluster, testpod: &Path, pod: &str, port: u16) -> Result<Bg> {
        let mut cmd = c.pod_command(pod, testpod)?;
        cmd.args(["serve", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting testpod serve in {pod}"))?;
        let out = child.stdout.take().context("serve stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let bg = Bg {
            child,
            what: format!("testpod serve in {pod}"),
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "serving" => Ok(bg),
            other => bail!("{} did not start: {other:?}", bg.what),
        }
    }

    /// A persistent `iperf3 -s`; ready once the port listens in the pod.
    fn iperf_server(c: &Cluster, pod: &str, port: u16) -> Result<Bg> {
        let mut cmd = c.pod_command(pod, "iperf3")?;
        cmd.args(["-s", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting iperf3 -s in {pod}"))?;
        let mut bg = Bg {
            child,
            what: format!("iperf3 -s in {pod}"),
        };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = bg.child.try_wait().context("waiting for iperf3")? {
                bail!("{} exited: {st}", bg.what);
            }
            let mut ss = c.pod_command(pod, "ss")?;
            ss.args(["-Hltn", &format!("sport = :{port}")]);
            if let Ok(o) = output(ss, Duration::from_secs(5), "ss")
                && !o.stdout.trim().is_empty()
            {
                return Ok(bg);
            }
            if Instant::now() > end {
                bail!("{} is not listening after 10 s", bg.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Output {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Run to completion with a deadline (killed after `timeout`).
fn output(mut cmd: Command, timeout: Duration, what: &str) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            bail!("{what} did not finish within {timeout:?}; stdout: {o} stderr: {e}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        ok: status.success(),
        status: status.to_string(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The last JSON line a testpod mode printed.
fn json_line(out: Output, what: &str) -> Result<Value> {
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "testpod {what} printed no report ({}); stderr: {}",
                out.status,
                out.stderr.trim()
            )
        })?;
    serde_json::from_str(line).with_context(|| format!("parsing testpod {what} report {line}"))
}

fn which(tool: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .context("not on PATH")
}

fn dump_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} ({} lines)", f.display(), lines.len());
        for l in &lines[lines.len().saturating_sub(25)..] {
            eprintln!("  {l}");
        }
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let cmd_out = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": model,
        "kernel": cmd_out("uname", &["-r"]),
        "hostname": cmd_out("uname", &["-n"]),
    })
}

fn git_describe() -> Value {
    let out = Command::new("git")
        .current_dir(crate::workspace_root())
        .args(["describe", "--always", "--dirty"])
        .output();
    match out {
        Ok(o) if o.status.success() => json!(String::from_utf8_lossy(&o.stdout).trim()),
        _ => Value::Null,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (days to civil date: H. Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn timestamp_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
    }
}
