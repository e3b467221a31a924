//! `cargo xtask bench --gateway [--rounds N] [--quick]`: HTTPS requests through the sidenode
//! gateway (`mesh-node gateway`) and through an Envoy gateway, with the same certificate, the
//! same TLS settings and the same backend, in one simulated 2-node cluster, in one run. See
//! docs/performance.md ("Gateway").
//!
//! - Both gateways run in the plain pod `node1-pod4` (its netns and cgroup): sidenode on
//!   :8443 (an Istio `Gateway` + `VirtualService` + `kubernetes.io/tls` Secret in the config
//!   folder, `--secrets-dir`), Envoy on :9443 (TLS 1.2-1.3, ALPN h2 + http/1.1, the same
//!   ECDSA P-256 certificate, an HTTP connection manager routing every request to the backend).
//! - The backend is `testpod http-serve` in the meshed pod `node2-pod1`. sidenode reaches it
//!   the way it does in production: HBONE (mutual TLS 1.3) to node2's proxy, which hands the
//!   request to the pod. Envoy reaches it the way Istio's ingress gateway reaches a sidecar
//!   pod: mutual TLS 1.3 to an Envoy sidecar in the backend pod (on the pod's IP, a
//!   `tcp_proxy` to the server on 127.0.0.1). Both paths: gateway → mTLS across nodes → one
//!   proxy on the backend's node → the server. One worker thread per gateway and per proxy.
//! - The load generator (`h2load`, nghttp2) runs in the opted-out pod `node1-pod3`, with
//!   `--connect-to` the gateway pod and SNI/`:authority` `bench.example.com`.
//!
//! Per round, CPU mode (unpinned, then every process of the path on one CPU) and load
//! (HTTP/2 streams on kept connections; HTTP/1.1 keep-alive; a new TLS connection per
//! request), both gateways, the order flipped every round: requests/s, p50/p99 latency (from
//! h2load's per-request log), the gateway's CPU seconds (and per request) and its RSS.
//! Medians of the rounds go to a table and, with every value, to `target/bench/gateway.json`.

use super::envoy;
use super::measure::Pinned;
use super::report::table;
use super::util::{self, Bg, Mem, checked, cpu_seconds, dump_logs, median, output, percentile};
use super::{PIN_CPU, target_dir};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use sidenode_tests::cluster::{Cluster, ClusterOpts, TestCluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PREFIX: &str = "sngwb";
const PODS_PER_NODE: usize = 4;
/// Plain (namespace `plain`): both gateways.
const GW_POD: &str = "node1-pod4";
/// Opted out (`sidenode.io/dataplane-mode: none`): the load generator.
const CLIENT_POD: &str = "node1-pod3";
/// Meshed, on the other node: the backend (and Envoy's sidecar).
const BACKEND_POD: &str = "node2-pod1";
const BACKEND_PORT: u16 = 8080;
const SIDENODE_PORT: u16 = 8443;
const ENVOY_PORT: u16 = 9443;
/// Envoy's sidecar in the backend pod, on the pod IP (mutual TLS from the Envoy gateway).
const SIDECAR_PORT: u16 = envoy::B_ECHO_PORT;
const HOST: &str = "bench.example.com";
const SERVICE_IP: &str = "198.18.128.10";
const SECRET: &str = "bench-cert";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Gw {
    Sidenode,
    Envoy,
}

impl Gw {
    const ALL: [Gw; 2] = [Gw::Sidenode, Gw::Envoy];
    fn name(self) -> &'static str {
        match self {
            Gw::Sidenode => "sidenode",
            Gw::Envoy => "envoy",
        }
    }
    fn port(self) -> u16 {
        match self {
            Gw::Sidenode => SIDENODE_PORT,
            Gw::Envoy => ENVOY_PORT,
        }
    }
    /// The proxy between the gateway and the backend, on the backend's node.
    fn hop_name(self) -> &'static str {
        match self {
            Gw::Sidenode => "node2-proxy",
            Gw::Envoy => "envoy-sidecar",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    /// HTTP/2, several streams on each kept connection.
    H2,
    /// HTTP/1.1 keep-alive.
    H1,
    /// HTTP/1.1, `connection: close`: a new TCP + TLS connection per request.
    H1Close,
}

impl Load {
    const ALL: [Load; 3] = [Load::H2, Load::H1, Load::H1Close];
    fn name(self) -> &'static str {
        match self {
            Load::H2 => "h2",
            Load::H1 => "h1",
            Load::H1Close => "h1-new-conn",
        }
    }
    /// (clients, streams per client).
    fn shape(self) -> (u32, u32) {
        match self {
            Load::H2 => (4, 16),
            Load::H1 => (16, 1),
            Load::H1Close => (8, 1),
        }
    }
    fn describe(self) -> String {
        let (c, m) = self.shape();
        match self {
            Load::H2 => format!("HTTP/2, {c} connections × {m} concurrent streams"),
            Load::H1 => format!("HTTP/1.1 keep-alive, {c} connections"),
            Load::H1Close => {
                format!(
                    "HTTP/1.1 + connection: close (new TLS connection per request), {c} clients"
                )
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cpu {
    Unpinned,
    Pinned,
}

impl Cpu {
    const ALL: [Cpu; 2] = [Cpu::Unpinned, Cpu::Pinned];
    fn name(self) -> &'static str {
        match self {
            Cpu::Unpinned => "unpinned",
            Cpu::Pinned => "pinned",
        }
    }
}

struct Params {
    rounds: usize,
    quick: bool,
    secs: u32,
    warmup_secs: u32,
    /// Requests (= connections) per `h1-new-conn` run.
    new_conns: u32,
}

/// One h2load run.
#[derive(Clone, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Requests including the warm-up's (estimated at the timed part's rate), what the CPU
    /// time is divided by.
    requests_all: u64,
    /// TCP connections the backend pod accepted during the run (its netns' PassiveOpens).
    backend_conns: u64,
    failed: u64,
    non_2xx: u64,
    gw_cpu_s: f64,
    hop_cpu_s: f64,
    /// The backend server's CPU seconds over the run (to show it is not the bottleneck).
    backend_cpu_s: f64,
    gw_rss_kb: u64,
    gw_hwm_kb: u64,
    /// Requests in flight (clients × streams) / requests per second: the mean time a request
    /// takes end to end (Little's law); for new connections it includes connect + handshake,
    /// which h2load's per-request times leave out.
    mean_ms: f64,
    tls: Value,
}

impl Sample {
    fn gw_cpu_us_per_req(&self) -> f64 {
        per_req(self.gw_cpu_s, self.rps, self.requests_all)
    }
    fn hop_cpu_us_per_req(&self) -> f64 {
        per_req(self.hop_cpu_s, self.rps, self.requests_all)
    }
    /// TCP connections the backend accepted per request (1 = a new one for every request).
    fn backend_conns_per_req(&self) -> f64 {
        if self.requests_all == 0 {
            f64::NAN
        } else {
            self.backend_conns as f64 / self.requests_all as f64
        }
    }
    fn json(&self) -> Value {
        json!({
            "requests_per_s": nan_null(self.rps),
            "p50_ms": nan_null(self.p50_ms),
            "p99_ms": nan_null(self.p99_ms),
            "mean_in_flight_over_rps_ms": nan_null(self.mean_ms),
            "requests": self.requests,
            "requests_with_warmup": self.requests_all,
            "backend_tcp_accepts": self.backend_conns,
            "backend_tcp_accepts_per_request": nan_null(self.backend_conns_per_req()),
            "failed": self.failed,
            "non_2xx": self.non_2xx,
            "gateway_cpu_seconds": self.gw_cpu_s,
            "gateway_cpu_us_per_request": nan_null(self.gw_cpu_us_per_req()),
            "hop_cpu_seconds": self.hop_cpu_s,
            "hop_cpu_us_per_request": nan_null(self.hop_cpu_us_per_req()),
            "backend_cpu_seconds": self.backend_cpu_s,
            "backend_cpu_us_per_request": nan_null(per_req(self.backend_cpu_s, self.rps, self.requests_all)),
            "gateway_rss_kb": self.gw_rss_kb,
            "gateway_hwm_kb": self.gw_hwm_kb,
            "tls": self.tls,
        })
    }
}

fn per_req(cpu_s: f64, _rps: f64, requests: u64) -> f64 {
    if requests == 0 {
        f64::NAN
    } else {
        cpu_s * 1e6 / requests as f64
    }
}

fn nan_null(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

type Key = (Cpu, Load, Gw);
/// One round: the gateways' order, every run, the load average before it.
type RoundRuns = (Vec<&'static str>, Vec<(Key, Sample)>, String);

struct Env<'a> {
    c: &'a Cluster,
    dir: PathBuf,
    p: &'a Params,
    clk_tck: f64,
    all_cpus: String,
    gw_ip: String,
    backend_pid: u32,
    sidenode_pid: u32,
    envoy_pid: u32,
    sidecar_pid: u32,
    node2_proxy_pid: u32,
}

impl Env<'_> {
    fn gw_pid(&self, g: Gw) -> u32 {
        match g {
            Gw::Sidenode => self.sidenode_pid,
            Gw::Envoy => self.envoy_pid,
        }
    }
    fn hop_pid(&self, g: Gw) -> u32 {
        match g {
            Gw::Sidenode => self.node2_proxy_pid,
            Gw::Envoy => self.sidecar_pid,
        }
    }
}

pub fn run(rounds: usize, quick: bool) -> Result<()> {
    let p = Params {
        rounds: rounds.max(1),
        quick,
        secs: if quick { 3 } else { 8 },
        warmup_secs: 1,
        new_conns: if quick { 2_000 } else { 8_000 },
    };
    let release = target_dir().join("release");
    let mesh_node = release.join("mesh-node");
    let testpod = release.join("testpod");
    for bin in [&mesh_node, &testpod] {
        if !bin.exists() {
            bail!("{} not found; build with --release first", bin.display());
        }
    }
    let help = Command::new(&mesh_node)
        .args(["gateway", "--help"])
        .output()
        .with_context(|| format!("running {} gateway --help", mesh_node.display()))?;
    if !help.status.success() {
        bail!(
            "{} has no `gateway` subcommand: rebuild it (cargo build --release -p mesh-node)",
            mesh_node.display()
        );
    }
    for tool in ["h2load", "taskset", "openssl", "curl", "base64", "ss"] {
        util::which(tool).with_context(|| format!("{tool} not found (run `cargo xtask setup`)"))?;
    }
    let envoy_bin = crate::setup::envoy_bin();
    if crate::setup::envoy_version().is_none() {
        bail!(
            "{} does not run (run `cargo xtask setup`)",
            envoy_bin.display()
        );
    }
    Cluster::down(PREFIX);
    println!(
        "bench --gateway: bringing up a 2-node mesh cluster ({PREFIX}, {PODS_PER_NODE} pods per node) from the release binaries"
    );
    let started = Instant::now();
    let mut cluster = TestCluster::up(ClusterOpts {
        prefix: PREFIX.into(),
        nodes: 2,
        pods: PODS_PER_NODE,
        mesh_node: mesh_node.clone(),
        start_agents: false,
        mesh: true,
        ..Default::default()
    })?;
    let res = cluster
        .set_pod_opt_out(CLIENT_POD, true)
        .and_then(|()| cluster.start_node_processes())
        .and_then(|()| bench(&cluster, &mesh_node, &testpod, &envoy_bin, &p));
    if let Err(e) = &res {
        eprintln!("\nbench --gateway failed: {e:#}\n\nlogs (last lines):");
        dump_logs(&cluster.state_dir.join("logs"));
        dump_logs(&cluster.state_dir.join("gwbench"));
    }
    println!(
        "bench --gateway: tearing the cluster down ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    drop(cluster);
    res
}

fn bench(
    c: &Cluster,
    mesh_node: &Path,
    testpod: &Path,
    envoy_bin: &Path,
    p: &Params,
) -> Result<()> {
    for (pod, ns) in [(GW_POD, "plain"), (BACKEND_POD, "mesh")] {
        let got = &c.pod(pod)?.namespace;
        if got != ns {
            bail!("pod {pod} is in namespace {got}, the bench expects {ns}");
        }
    }
    let dir = c.state_dir.join("gwbench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // The sidecar pair's mTLS certificates (server.pem / client.pem / ca.pem) and the
    // gateway's certificate for bench.example.com (gw.pem / gw.key), all ECDSA P-256.
    envoy::certs(&dir)?;
    gateway_cert(&dir)?;
    let gw_ip = c.pod(GW_POD)?.ip.clone();
    let backend_ip = c.pod(BACKEND_POD)?.ip.clone();

    // The backend.
    let mut cmd = c.pod_command(BACKEND_POD, testpod)?;
    cmd.args([
        "http-serve",
        "--port",
        &BACKEND_PORT.to_string(),
        "--name",
        "backend",
    ]);
    let mut backend = Bg::spawn(
        cmd,
        format!("testpod http-serve in {BACKEND_POD}"),
        &dir.join("backend.log"),
    )?;
    backend.wait_listening(c, BACKEND_POD, &[BACKEND_PORT], Duration::from_secs(10))?;

    // The objects the sidenode gateway serves.
    c.write_config_file("gwbench.yaml", &objects_yaml(&dir)?)?;

    // The sidenode gateway.
    let mut cmd = c.pod_command(GW_POD, mesh_node)?;
    cmd.arg("gateway")
        .args(["--controller", &c.controller_addr()])
        .arg("--controller-ca")
        .arg(c.controller_ca())
        .arg("--token-file")
        .arg(c.token_path("node1"))
        .args(["--namespace", "plain", "--pod", GW_POD])
        .args(["--service-account", &format!("sa-{GW_POD}")])
        .arg("--secrets-dir")
        .arg(&c.status().config_dir)
        .args(["--admin", "127.0.0.1:15000"])
        .args(["--metrics", &format!("{gw_ip}:15020")]);
    let mut sidenode = Bg::spawn(
        cmd,
        format!("mesh-node gateway in {GW_POD}"),
        &dir.join("sidenode-gateway.log"),
    )?;
    sidenode.wait_listening(c, GW_POD, &[SIDENODE_PORT], Duration::from_secs(30))?;

    // Envoy: the sidecar in the backend pod, then the gateway.
    let sidecar_cfg = dir.join("envoy-sidecar.json");
    write_json(
        &sidecar_cfg,
        &json!({"static_resources": {
            "listeners": [envoy::b_listener("backend", &backend_ip, SIDECAR_PORT, &dir)],
            "clusters": [envoy::local_cluster("backend", BACKEND_PORT)],
        }}),
    )?;
    let gw_cfg = dir.join("envoy-gateway.json");
    write_json(&gw_cfg, &envoy_gateway_config(&dir, &backend_ip))?;
    let spawn_envoy = |pod: &str, name: &str, cfg: &Path| -> Result<Bg> {
        let mut cmd = c.pod_command(pod, envoy_bin)?;
        cmd.arg("-c")
            .arg(cfg)
            .args(["--concurrency", &envoy::CONCURRENCY.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warn"]);
        Bg::spawn(
            cmd,
            format!("Envoy {name} in {pod}"),
            &dir.join(format!("envoy-{name}.log")),
        )
    };
    let mut sidecar = spawn_envoy(BACKEND_POD, "sidecar", &sidecar_cfg)?;
    sidecar.wait_listening(c, BACKEND_POD, &[SIDECAR_PORT], Duration::from_secs(20))?;
    let mut envoy_gw = spawn_envoy(GW_POD, "gateway", &gw_cfg)?;
    envoy_gw.wait_listening(c, GW_POD, &[ENVOY_PORT], Duration::from_secs(20))?;
    let envoy_version = crate::setup::envoy_version().unwrap_or_else(|| "?".into());

    let env = Env {
        c,
        dir: dir.clone(),
        p,
        clk_tck: util::clk_tck(),
        all_cpus: util::online_cpus(),
        gw_ip,
        backend_pid: backend.pid(),
        sidenode_pid: sidenode.pid(),
        envoy_pid: envoy_gw.pid(),
        sidecar_pid: sidecar.pid(),
        node2_proxy_pid: c
            .pid("node2", "proxy")
            .context("node2's proxy is not running")?,
    };
    println!(
        "bench --gateway: sidenode gateway on {}:{SIDENODE_PORT} → HBONE → node2 proxy → {BACKEND_POD}:{BACKEND_PORT}; Envoy {envoy_version} gateway on {}:{ENVOY_PORT} → mTLS 1.3 → Envoy sidecar {backend_ip}:{SIDECAR_PORT} → 127.0.0.1:{BACKEND_PORT}; load from {CLIENT_POD}",
        env.gw_ip, env.gw_ip
    );
    std::thread::sleep(Duration::from_secs(1));
    let mem_idle = memory(&env);
    let checks = sanity(&env)?;

    let mut rounds: Vec<RoundRuns> = Vec::new();
    for r in 1..=p.rounds {
        let order: Vec<Gw> = if r % 2 == 1 {
            Gw::ALL.to_vec()
        } else {
            Gw::ALL.iter().rev().copied().collect()
        };
        let load = loadavg();
        println!(
            "round {r}/{}: order {order:?}, load average {load}",
            p.rounds
        );
        let mut samples = Vec::new();
        for cpu in Cpu::ALL {
            for l in Load::ALL {
                for g in &order {
                    let s = measure(&env, *g, l, cpu).with_context(|| {
                        format!("round {r}, {} {} {}", g.name(), l.name(), cpu.name())
                    })?;
                    println!(
                        "round {r}/{} {:<8} {:<11} {:<8} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  gw cpu {:>6.1} µs/req  {} cpu {:>6.1} µs/req  backend cpu {:>5.1} µs/req, {:.2} conns/req  rss {:>5.1} MB{}",
                        p.rounds,
                        cpu.name(),
                        l.name(),
                        g.name(),
                        s.rps,
                        s.p50_ms,
                        s.p99_ms,
                        s.gw_cpu_us_per_req(),
                        g.hop_name(),
                        s.hop_cpu_us_per_req(),
                        per_req(s.backend_cpu_s, s.rps, s.requests_all),
                        s.backend_conns_per_req(),
                        s.gw_rss_kb as f64 * 1024.0 / 1e6,
                        if s.failed + s.non_2xx > 0 {
                            format!("  FAILED {} non-2xx {}", s.failed, s.non_2xx)
                        } else {
                            String::new()
                        }
                    );
                    samples.push(((cpu, l, *g), s));
                }
            }
        }
        rounds.push((order.iter().map(|g| g.name()).collect(), samples, load));
    }
    let mem_after = memory(&env);

    // Medians.
    let med = |k: Key, f: fn(&Sample) -> f64| -> f64 {
        let v: Vec<f64> = rounds
            .iter()
            .flat_map(|(_, s, _)| s.iter().filter(|(kk, _)| *kk == k).map(|(_, s)| f(s)))
            .collect();
        median(&v)
    };
    let mut medians = Map::new();
    let mut targets = Vec::new();
    let mut rows = Vec::new();
    for cpu in Cpu::ALL {
        for l in Load::ALL {
            let k = |g| (cpu, l, g);
            let mut per = Map::new();
            for g in Gw::ALL {
                per.insert(
                    g.name().into(),
                    json!({
                        "requests_per_s": nan_null(med(k(g), |s| s.rps)),
                        "p50_ms": nan_null(med(k(g), |s| s.p50_ms)),
                        "p99_ms": nan_null(med(k(g), |s| s.p99_ms)),
                        "mean_in_flight_over_rps_ms": nan_null(med(k(g), |s| s.mean_ms)),
                        "gateway_cpu_seconds": nan_null(med(k(g), |s| s.gw_cpu_s)),
                        "gateway_cpu_us_per_request": nan_null(med(k(g), Sample::gw_cpu_us_per_req)),
                        "hop_cpu_us_per_request": nan_null(med(k(g), Sample::hop_cpu_us_per_req)),
                        "backend_cpu_us_per_request": nan_null(med(k(g), |s| per_req(s.backend_cpu_s, s.rps, s.requests_all))),
                        "backend_tcp_accepts_per_request": nan_null(med(k(g), Sample::backend_conns_per_req)),
                        "gateway_rss_kb": nan_null(med(k(g), |s| s.gw_rss_kb as f64)),
                    }),
                );
            }
            medians.insert(format!("{}/{}", cpu.name(), l.name()), Value::Object(per));
            let (sr, er) = (
                med(k(Gw::Sidenode), |s| s.rps),
                med(k(Gw::Envoy), |s| s.rps),
            );
            let (sp99, ep99) = (
                med(k(Gw::Sidenode), |s| s.p99_ms),
                med(k(Gw::Envoy), |s| s.p99_ms),
            );
            let met = sr >= er && sp99 <= ep99;
            targets.push(json!({
                "cpu": cpu.name(), "load": l.name(),
                "sidenode_rps_over_envoy": nan_null(sr / er),
                "sidenode_p99_minus_envoy_ms": nan_null(sp99 - ep99),
                "met": met,
            }));
            rows.push(vec![
                format!("{} {}", l.name(), cpu.name()),
                format!("{sr:.0}"),
                format!("{er:.0}"),
                format!("{:.2} ×", sr / er),
                format!("{:.3}", med(k(Gw::Sidenode), |s| s.p50_ms)),
                format!("{:.3}", med(k(Gw::Envoy), |s| s.p50_ms)),
                format!("{sp99:.3}"),
                format!("{ep99:.3}"),
                format!("{:.1}", med(k(Gw::Sidenode), Sample::gw_cpu_us_per_req)),
                format!("{:.1}", med(k(Gw::Envoy), Sample::gw_cpu_us_per_req)),
                format!(
                    "{:.1} / {:.1}",
                    med(k(Gw::Sidenode), Sample::hop_cpu_us_per_req),
                    med(k(Gw::Envoy), Sample::hop_cpu_us_per_req)
                ),
                if met { "met".into() } else { "missed".into() },
            ]);
        }
    }
    let header: Vec<String> = [
        "load, CPUs (medians)",
        "sn req/s",
        "envoy req/s",
        "sn/envoy",
        "sn p50 ms",
        "envoy p50",
        "sn p99 ms",
        "envoy p99",
        "sn gw CPU µs/req",
        "envoy gw",
        "hop µs/req sn/envoy",
        "target",
    ]
    .map(String::from)
    .to_vec();
    let mut text = format!(
        "\n{} round(s), {} s per run (+{} s warm-up); sn = sidenode gateway; target: sidenode ≥ Envoy's requests/s at ≤ Envoy's p99.\n\n",
        p.rounds, p.secs, p.warmup_secs
    );
    text.push_str(&table(&header, &rows));
    for l in Load::ALL {
        text.push_str(&format!("{}: {}\n", l.name(), l.describe()));
    }
    text.push_str(&format!(
        "pinned: h2load, the gateway, the proxy on the backend's node (node2's proxy / the Envoy sidecar) and the backend all on CPU {PIN_CPU}; unpinned: no affinity.\n\
         latency: h2load's per-request time from sending the request to the end of the response; for h1-new-conn it leaves out connect + TLS handshake (their cost is in req/s; JSON: mean_in_flight_over_rps_ms includes them).\n\
         gw CPU: utime+stime of the gateway process over the run / the run's requests (warm-up included); hop: the same for node2's proxy (sidenode) or the Envoy sidecar (envoy).\n"
    ));
    let mut mrows = Vec::new();
    for name in mem_after.keys() {
        let a = mem_after[name];
        mrows.push(vec![
            name.clone(),
            mem_idle
                .get(name)
                .map_or("-".into(), |m| format!("{:.1}", m.rss_mb())),
            format!("{:.1}", a.rss_mb()),
            format!("{:.1}", a.hwm_mb()),
        ]);
    }
    text.push_str(&format!(
        "\n{}",
        table(
            &[
                "process RSS, MB (10^6 B)".into(),
                "idle".into(),
                "after load".into(),
                "peak".into()
            ],
            &mrows
        )
    ));
    print!("{text}");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let mem = |m: &std::collections::BTreeMap<String, Mem>| -> Value {
        m.iter().map(|(k, v)| (k.clone(), v.json())).collect()
    };
    let rounds_json: Vec<Value> = rounds
        .iter()
        .enumerate()
        .map(|(i, (order, samples, load))| {
            let runs: Vec<Value> = samples
                .iter()
                .map(|((cpu, l, g), s)| {
                    let mut v = s.json();
                    v["cpu"] = json!(cpu.name());
                    v["load"] = json!(l.name());
                    v["gateway"] = json!(g.name());
                    v
                })
                .collect();
            json!({"round": i + 1, "order": order, "loadavg_before": load, "runs": runs})
        })
        .collect();
    let loads: Map<String, Value> = Load::ALL
        .iter()
        .map(|l| {
            let (c, m) = l.shape();
            (
                l.name().to_string(),
                json!({"describe": l.describe(), "clients": c, "streams_per_client": m}),
            )
        })
        .collect();
    let out = json!({
        "timestamp": util::rfc3339(now),
        "timestamp_unix": now,
        "git": util::git(),
        "machine": util::machine(),
        "loadavg_end": loadavg(),
        "params": {
            "rounds": p.rounds,
            "quick": p.quick,
            "seconds_per_run": p.secs,
            "warmup_seconds": p.warmup_secs,
            "new_conn_requests_per_run": p.new_conns,
            "pinned_cpu": PIN_CPU,
            "loads": loads,
            "load_generator": "h2load (nghttp2) -t 1 in node1-pod3, --connect-to the gateway pod, SNI and :authority bench.example.com",
            "backend": format!("testpod http-serve in {BACKEND_POD} (meshed, node2), 7-byte body"),
            "envoy_version": envoy_version,
            "envoy_concurrency": envoy::CONCURRENCY,
            "sidenode_worker_threads": 1,
            "binaries": "target/release",
        },
        "paths": {
            "sidenode": format!("h2load → TLS (rustls) mesh-node gateway {GW_POD}:{SIDENODE_PORT} → HBONE (mTLS 1.3) → node2 proxy → {BACKEND_POD}:{BACKEND_PORT}"),
            "envoy": format!("h2load → TLS (BoringSSL) Envoy gateway {GW_POD}:{ENVOY_PORT} → mTLS 1.3 → Envoy sidecar {BACKEND_POD}:{SIDECAR_PORT} (tcp_proxy) → 127.0.0.1:{BACKEND_PORT}"),
        },
        "method": {
            "latency": "h2load --log-file: every request of the timed part (after the warm-up), nearest-rank p50/p99 of its time from being sent to the end of the response (for h1-new-conn the TCP connect and TLS handshake come before and are NOT included: see mean_in_flight_over_rps_ms, which includes them)",
            "requests_per_s": "h2load's req/s over the timed part (-D)",
            "gateway_cpu": "utime+stime from /proc/<pid>/stat of the gateway before and after the h2load run, divided by the run's requests including the warm-up's (h2load does not count those: estimated as req/s × warm-up seconds)",
            "backend_tcp_accepts": "Tcp PassiveOpens of the backend pod's netns before and after the run",
            "rss": "VmRSS/VmHWM of the gateway after each run; idle = before any traffic",
            "pinned": "taskset -a -p of the gateway, the hop proxy and the backend, h2load under taskset -c",
        },
        "checks": checks,
        "rounds": rounds_json,
        "medians": medians,
        "targets": targets,
        "memory": {"idle": mem(&mem_idle), "after_load": mem(&mem_after)},
    });
    let bench_dir = target_dir().join("bench");
    std::fs::create_dir_all(&bench_dir)
        .with_context(|| format!("creating {}", bench_dir.display()))?;
    let path = bench_dir.join("gateway.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    drop((envoy_gw, sidecar, sidenode, backend));
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn write_json(p: &Path, v: &Value) -> Result<()> {
    std::fs::write(p, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", p.display()))
}

/// A self-signed ECDSA P-256 certificate for bench.example.com (`gw.pem`, `gw.key`).
fn gateway_cert(dir: &Path) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "gw.key",
        "-out",
        "gw.pem",
        "-days",
        "1",
        "-subj",
        &format!("/CN={HOST}"),
        "-addext",
        &format!("subjectAltName=DNS:{HOST}"),
    ]);
    checked(
        cmd,
        Duration::from_secs(30),
        "openssl req (gateway certificate)",
    )?;
    Ok(())
}

fn base64_file(p: &Path) -> Result<String> {
    let mut cmd = Command::new("base64");
    cmd.arg("-w0").arg(p);
    Ok(checked(cmd, Duration::from_secs(10), "base64")?
        .stdout
        .trim()
        .to_string())
}

/// The Secret, the backend's Service, the Istio Gateway and the VirtualService.
fn objects_yaml(dir: &Path) -> Result<String> {
    let crt = base64_file(&dir.join("gw.pem"))?;
    let key = base64_file(&dir.join("gw.key"))?;
    Ok(format!(
        r#"apiVersion: v1
kind: Secret
type: kubernetes.io/tls
metadata:
  name: {SECRET}
  namespace: plain
data:
  tls.crt: {crt}
  tls.key: {key}
---
apiVersion: v1
kind: Service
metadata:
  name: backend
  namespace: mesh
spec:
  clusterIP: {SERVICE_IP}
  selector:
    app: {BACKEND_POD}
  ports:
  - name: http
    port: 80
    targetPort: {BACKEND_PORT}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bench
  namespace: plain
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: {SIDENODE_PORT}
      name: https
      protocol: HTTPS
    hosts:
    - {HOST}
    tls:
      mode: SIMPLE
      credentialName: {SECRET}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench
  namespace: plain
spec:
  hosts:
  - {HOST}
  gateways:
  - plain/bench
  http:
  - route:
    - destination:
        host: backend.mesh.svc.cluster.local
        port:
          number: 80
"#
    ))
}

/// Envoy's gateway: TLS 1.2-1.3 with the gateway certificate, ALPN h2 and http/1.1, an HTTP
/// connection manager (no access log) routing bench.example.com to the backend through its
/// sidecar with mutual TLS 1.3 (as Istio's ingress gateway → a sidecar pod).
fn envoy_gateway_config(dir: &Path, backend_ip: &str) -> Value {
    let f = |n: &str| dir.join(n).display().to_string();
    json!({"static_resources": {
        "listeners": [{
            "name": "https",
            "address": envoy::socket_address("0.0.0.0", ENVOY_PORT),
            "filter_chains": [{
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": {
                            "tls_params": {
                                "tls_minimum_protocol_version": "TLSv1_2",
                                "tls_maximum_protocol_version": "TLSv1_3",
                            },
                            "alpn_protocols": ["h2", "http/1.1"],
                            "tls_certificates": [{
                                "certificate_chain": {"filename": f("gw.pem")},
                                "private_key": {"filename": f("gw.key")},
                            }],
                        },
                    },
                },
                "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "codec_type": "AUTO",
                        "route_config": {
                            "name": "bench",
                            "virtual_hosts": [{
                                "name": "bench",
                                "domains": [HOST, format!("{HOST}:*")],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                            }],
                        },
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }],
            }],
        }],
        "clusters": [envoy::a_cluster("backend", backend_ip, SIDECAR_PORT, dir)],
    }})
}

/// Both gateways answer through the backend; what the backend saw as the peer, and each
/// gateway's TLS (1.2 and 1.3 both offered, the protocol, cipher and ALPN negotiated).
fn sanity(e: &Env) -> Result<Value> {
    let mut out = Map::new();
    for g in Gw::ALL {
        let port = g.port();
        let mut per = Map::new();
        for http in ["--http1.1", "--http2"] {
            let mut cmd = e.c.pod_command(CLIENT_POD, "curl")?;
            cmd.args(["-sS", "-k", "--max-time", "10", "-D", "-", http])
                .args(["--resolve", &format!("{HOST}:{port}:{}", e.gw_ip)])
                .args(["-w", "\nhttp_version=%{http_version}\n"])
                .arg(format!("https://{HOST}:{port}/"));
            let o = output(cmd, Duration::from_secs(20), "curl")?;
            let text = o.stdout.clone();
            let status_ok = text
                .lines()
                .next()
                .is_some_and(|l| l.starts_with("HTTP/") && l.contains(" 200"));
            if !o.ok || !status_ok || !text.contains("backend") {
                bail!(
                    "{} gateway: curl {http} https://{HOST}:{port}/ did not get the backend's 200: {} {}",
                    g.name(),
                    text.trim(),
                    o.stderr.trim()
                );
            }
            let peer = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("x-testpod-peer:")
                        .map(|v| v.trim().to_string())
                })
                .unwrap_or_default();
            let version = text
                .lines()
                .find_map(|l| l.strip_prefix("http_version="))
                .unwrap_or("?")
                .to_string();
            println!(
                "check {:<8} curl {http}: 200 from the backend over HTTP/{version}, backend saw peer {peer}",
                g.name()
            );
            per.insert(
                http.trim_start_matches('-').into(),
                json!({"http_version": version, "backend_peer": peer}),
            );
        }
        for v in ["-tls1_2", "-tls1_3"] {
            let mut cmd = e.c.pod_command(CLIENT_POD, "openssl")?;
            cmd.args(["s_client", v, "-alpn", "h2,http/1.1"])
                .args(["-connect", &format!("{}:{port}", e.gw_ip)])
                .args(["-servername", HOST]);
            let o = output(cmd, Duration::from_secs(20), "openssl s_client")?;
            let text = format!("{}\n{}", o.stderr, o.stdout);
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
            let new = field("New,").unwrap_or_default();
            let mut parts = new.split(',').map(str::trim);
            let proto = parts.next().map(str::to_string);
            let cipher = parts
                .next()
                .and_then(|c| c.strip_prefix("Cipher is"))
                .map(|c| c.trim().to_string());
            let alpn = field("ALPN protocol:");
            let sig = field("Peer signature type:");
            println!(
                "check {:<8} openssl s_client {v}: {proto:?} {cipher:?} ALPN {alpn:?} signature {sig:?}",
                g.name()
            );
            per.insert(
                v.trim_start_matches('-').into(),
                json!({"protocol": proto, "ciphersuite": cipher, "alpn": alpn, "signature_type": sig}),
            );
        }
        out.insert(g.name().into(), Value::Object(per));
    }
    Ok(Value::Object(out))
}

fn measure(e: &Env, g: Gw, l: Load, cpu: Cpu) -> Result<Sample> {
    let _pinned = match cpu {
        Cpu::Pinned => Some(Pinned::new(
            vec![e.gw_pid(g), e.hop_pid(g), e.backend_pid],
            &e.all_cpus,
        )?),
        Cpu::Unpinned => None,
    };
    let log = e.dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let (clients, streams) = l.shape();
    let mut cmd = e.c.pod_command(CLIENT_POD, "taskset")?;
    cmd.args([
        "-c",
        if cpu == Cpu::Pinned {
            PIN_CPU
        } else {
            &e.all_cpus
        },
    ])
    .arg("h2load")
    .args([
        "-t",
        "1",
        "-c",
        &clients.to_string(),
        "-m",
        &streams.to_string(),
    ])
    .args(["--connect-to", &format!("{}:{}", e.gw_ip, g.port())])
    .arg(format!("--log-file={}", log.display()));
    match l {
        Load::H2 | Load::H1 => {
            cmd.args(["-D", &e.p.secs.to_string()])
                .args(["--warm-up-time", &e.p.warmup_secs.to_string()]);
            if l == Load::H1 {
                cmd.arg("--h1");
            }
        }
        Load::H1Close => {
            // A number of requests, not a duration: h2load 1.52 with -D and reconnecting
            // clients does not print its summary (it hangs once the clients stop).
            cmd.args(["--h1", "-H", "connection: close"])
                .args(["-n", &e.p.new_conns.to_string()]);
        }
    }
    cmd.arg(format!("https://{HOST}:{}/", g.port()));
    let (gw, hop) = (e.gw_pid(g), e.hop_pid(g));
    let opens0 = passive_opens(e.c, BACKEND_POD)?;
    let b0 = cpu_seconds(e.backend_pid, e.clk_tck)?;
    let cpu0 = (cpu_seconds(gw, e.clk_tck)?, cpu_seconds(hop, e.clk_tck)?);
    let timeout = Duration::from_secs(u64::from(e.p.secs + e.p.warmup_secs) + 60);
    let o = output(cmd, timeout, "h2load")?;
    let cpu1 = (cpu_seconds(gw, e.clk_tck)?, cpu_seconds(hop, e.clk_tck)?);
    let b1 = cpu_seconds(e.backend_pid, e.clk_tck)?;
    let opens1 = passive_opens(e.c, BACKEND_POD)?;
    if !o.ok {
        bail!("h2load failed ({}): {} {}", o.status, o.stdout, o.stderr);
    }
    let H2load {
        rps,
        done,
        failed,
        non_2xx,
        tls,
    } = parse_h2load(&o.stdout)?;
    if done == 0 {
        bail!("h2load completed no request: {}", o.stdout);
    }
    let (p50_ms, p99_ms, logged) = latencies(&log)?;
    // The CPU time covers the warm-up too (-D runs), whose requests h2load does not count:
    // estimated at the timed part's rate.
    let warmup_reqs = if l == Load::H1Close {
        0
    } else {
        (rps * f64::from(e.p.warmup_secs)).round() as u64
    };
    let _ = std::fs::remove_file(&log);
    let m = Mem::read(gw);
    Ok(Sample {
        rps,
        p50_ms,
        p99_ms,
        requests: done,
        requests_all: done.max(logged) + warmup_reqs,
        backend_conns: opens1.saturating_sub(opens0),
        failed,
        non_2xx,
        gw_cpu_s: cpu1.0 - cpu0.0,
        hop_cpu_s: cpu1.1 - cpu0.1,
        backend_cpu_s: b1 - b0,
        gw_rss_kb: m.map_or(0, |m| m.rss_kb),
        gw_hwm_kb: m.map_or(0, |m| m.hwm_kb),
        mean_ms: f64::from(clients * streams) / rps * 1000.0,
        tls,
    })
}

/// What h2load's summary says.
#[derive(Debug, PartialEq)]
struct H2load {
    rps: f64,
    done: u64,
    /// failed + errored + timeout.
    failed: u64,
    /// 3xx + 4xx + 5xx.
    non_2xx: u64,
    tls: Value,
}

fn parse_h2load(text: &str) -> Result<H2load> {
    let line = |prefix: &str| text.lines().find(|l| l.trim_start().starts_with(prefix));
    // finished in 8.00s, 12345.67 req/s, 1.23MB/s
    let rps = line("finished in")
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("h2load printed no req/s: {text}"))?;
    // requests: N total, N started, N done, N succeeded, F failed, E errored, T timeout
    let counts = |l: Option<&str>| -> Vec<(String, u64)> {
        l.and_then(|l| l.split_once(':'))
            .map(|(_, v)| {
                v.split(',')
                    .filter_map(|x| {
                        let mut it = x.split_whitespace();
                        let n = it.next()?.parse::<u64>().ok()?;
                        Some((it.next()?.to_string(), n))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let req = counts(line("requests:"));
    let get = |v: &[(String, u64)], k: &str| v.iter().find(|(n, _)| n == k).map_or(0, |x| x.1);
    let status = counts(line("status codes:"));
    let field = |k: &str| line(k).map(|l| l.trim()[k.len()..].trim().to_string());
    Ok(H2load {
        rps,
        done: get(&req, "done"),
        failed: get(&req, "failed") + get(&req, "errored") + get(&req, "timeout"),
        non_2xx: get(&status, "3xx") + get(&status, "4xx") + get(&status, "5xx"),
        tls: json!({
            "protocol": field("TLS Protocol:"),
            "cipher": field("Cipher:"),
            "server_temp_key": field("Server Temp Key:"),
            "alpn": field("Application protocol:"),
        }),
    })
}

/// p50 and p99 (ms) of the requests in h2load's log (start µs, status, duration µs; h2load
/// logs only the timed part, not the warm-up), and how many it holds.
fn latencies(log: &Path) -> Result<(f64, f64, u64)> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    Ok(log_latencies(&text))
}

fn log_latencies(text: &str) -> (f64, f64, u64) {
    let rows: Vec<(u64, f64)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let start = f.next()?.trim().parse::<u64>().ok()?;
            let _status = f.next()?;
            let dur = f.next()?.trim().parse::<f64>().ok()?;
            Some((start, dur))
        })
        .collect();
    let v: Vec<f64> = rows.iter().map(|r| r.1 / 1000.0).collect();
    (percentile(&v, 50), percentile(&v, 99), rows.len() as u64)
}

/// `Tcp: PassiveOpens` of the pod's netns (/proc/net/snmp read from inside it).
fn passive_opens(c: &Cluster, pod: &str) -> Result<u64> {
    let mut cmd = c.pod_command(pod, "cat")?;
    cmd.arg("/proc/net/snmp");
    let out = checked(cmd, Duration::from_secs(10), "cat /proc/net/snmp")?.stdout;
    let tcp: Vec<&str> = out.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (Some(names), Some(values)) = (tcp.first(), tcp.get(1)) else {
        bail!("/proc/net/snmp in {pod}: no Tcp lines");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "PassiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("/proc/net/snmp in {pod}: no Tcp PassiveOpens"))
}

/// RSS of both gateways, the Envoy sidecar and node2's proxy.
fn memory(e: &Env) -> std::collections::BTreeMap<String, Mem> {
    [
        ("sidenode-gateway", e.sidenode_pid),
        ("envoy-gateway", e.envoy_pid),
        ("envoy-sidecar", e.sidecar_pid),
        ("node2-proxy", e.node2_proxy_pid),
    ]
    .into_iter()
    .filter_map(|(n, pid)| Some((n.to_string(), Mem::read(pid)?)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "\
starting benchmark...
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2

finished in 8.00s, 5430.38 req/s, 1.2MB/s
requests: 43443 total, 43507 started, 43443 done, 43440 succeeded, 3 failed, 2 errored, 1 timeout
status codes: 43437 2xx, 0 3xx, 3 4xx, 0 5xx
";

    #[test]
    fn h2load_summary() {
        let h = parse_h2load(SUMMARY).expect("parses");
        assert_eq!(h.rps, 5430.38);
        assert_eq!(h.done, 43443);
        assert_eq!(h.failed, 6);
        assert_eq!(h.non_2xx, 3);
        assert_eq!(h.tls["cipher"], "TLS_AES_128_GCM_SHA256");
        assert_eq!(h.tls["alpn"], "h2");
        assert!(parse_h2load("nothing").is_err());
    }

    #[test]
    fn h2load_log_percentiles() {
        let log: String = (1..=100)
            .map(|i| format!("{}\t200\t{}\n", 1_000_000 + i, i * 1000))
            .collect();
        let (p50, p99, n) = log_latencies(&log);
        assert_eq!((p50, p99, n), (50.0, 99.0, 100));
    }
}
