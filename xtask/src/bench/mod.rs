//! `cargo xtask bench [--rounds N] [--quick]`: sidenode side by side with the direct path and
//! with an Envoy sidecar pair, in one simulated 2-node cluster built from the release binaries,
//! in one run. See docs/performance.md ("Method").
//!
//! Paths (the same `iperf3` and `testpod` clients and servers for all):
//! - `direct`: a plain (not enrolled) pod → a plain pod on the other node;
//! - `mesh`: an enrolled pod → an enrolled pod on the other node (capture → node proxy → HBONE
//!   → the other node's proxy), HBONE over HTTP/2 (`MeshConfig.spec.tunnelProtocol: h2`);
//! - `mesh-quic`: the same pods, HBONE over HTTP/3 over QUIC (`tunnelProtocol: quic`; the
//!   bench rewrites the MeshConfig before each path and waits until node1's proxy has it);
//! - `envoy`: the `direct` pods with an Envoy sidecar pair between them (mutual TLS 1.3,
//!   see [`envoy`]);
//! - `direct-local`: a plain pod → a plain pod on the same node;
//! - `mesh-local`: an enrolled pod → an enrolled pod on the same node.
//!
//! Per round and path (the order flips every round): one long TCP stream (`iperf3`) with the
//! CPU time of the path's proxies; request/response on a kept connection (`testpod rr`),
//! unpinned and with every process of the path pinned to one CPU; new connections
//! (`testpod connlat`: connect, HELLO, one echo, close), pinned, in batches with TIME_WAIT
//! drained before each, with the tunnel pool warm; for `mesh` and `mesh-quic` also with the
//! pool cold (node1's pool forgotten through its admin API, `POST /pool/forget`, before each
//! connection, so each one dials a new tunnel). Then the lossy scenario ([`lossy`]): `tc
//! netem` on both nodes' links, 16 connections at once over one tunnel, HTTP/2 vs QUIC. The memory of every agent, proxy and Envoy idle and after the load.
//! Prints a table of medians, the targets of issue 12 and of issue 16 (QUIC), and writes every
//! value to `target/bench/latest.json`. `--quic-only`: only `mesh` and `mesh-quic` and the
//! lossy scenario (no Envoy), JSON to `target/bench/latest-quic.json`.
//!
//! `cargo xtask bench --idle N` is another: memory per idle connection through the mesh; see
//! [`idle`] and docs/performance.md ("Memory per connection").
//!
//! `cargo xtask bench --gateway` is another bench: HTTPS through the sidenode gateway against an
//! Envoy gateway; see [`gateway`] and docs/performance.md ("Gateway").

mod envoy;
mod gateway;
mod idle;
mod lossy;
mod measure;
mod report;
mod util;

use anyhow::{Context, Result, bail};
use measure::measure;
use report::{Report, Round};
use serde_json::{Value, json};
use sidenode_tests::cluster::{CONTROLLER, Cluster, ClusterOpts, TestCluster};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use util::{Bg, Mem, dump_logs, json_line, output, which};

const PREFIX: &str = "snbnch";
/// Pods per node: 1-3 in namespace `mesh` (enrolled), 4 in `plain`; node1-pod3 is opted out
/// (label `sidenode.io/dataplane-mode: none`) to give node1 a second plain pod.
const PODS_PER_NODE: usize = 4;
/// Enrolled: the client of `mesh` and `mesh-local`.
const MESH_CLIENT: &str = "node1-pod1";
/// Enrolled, on the other node.
const MESH_SERVER: &str = "node2-pod1";
/// Enrolled, on the client's node.
const MESH_LOCAL_SERVER: &str = "node1-pod2";
/// Plain: the client of `direct`, `direct-local` and `envoy` (Envoy A runs here).
const PLAIN_CLIENT: &str = "node1-pod4";
/// Plain, on the other node (Envoy B runs here).
const PLAIN_SERVER: &str = "node2-pod4";
/// Not enrolled (opted out), on the client's node.
const PLAIN_LOCAL_SERVER: &str = "node1-pod3";
const ECHO_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
/// The CPU every process of a path is pinned to for the pinned figures.
pub const PIN_CPU: &str = "1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    Direct,
    Mesh,
    MeshQuic,
    Envoy,
    DirectLocal,
    MeshLocal,
}

impl Route {
    /// The table's column order; odd rounds run in this order, even rounds reversed.
    pub const ALL: [Route; 6] = [
        Route::Direct,
        Route::Mesh,
        Route::MeshQuic,
        Route::Envoy,
        Route::DirectLocal,
        Route::MeshLocal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Mesh => "mesh",
            Route::MeshQuic => "mesh-quic",
            Route::Envoy => "envoy",
            Route::DirectLocal => "direct-local",
            Route::MeshLocal => "mesh-local",
        }
    }

    pub fn client(self) -> &'static str {
        match self {
            Route::Mesh | Route::MeshQuic | Route::MeshLocal => MESH_CLIENT,
            Route::Direct | Route::Envoy | Route::DirectLocal => PLAIN_CLIENT,
        }
    }

    pub fn server(self) -> &'static str {
        match self {
            Route::Direct | Route::Envoy => PLAIN_SERVER,
            Route::Mesh | Route::MeshQuic => MESH_SERVER,
            Route::DirectLocal => PLAIN_LOCAL_SERVER,
            Route::MeshLocal => MESH_LOCAL_SERVER,
        }
    }

    /// What the path is compared with: the direct path between pods placed the same way.
    pub fn baseline(self) -> Option<Route> {
        match self {
            Route::Mesh | Route::MeshQuic | Route::Envoy => Some(Route::Direct),
            Route::MeshLocal => Some(Route::DirectLocal),
            Route::Direct | Route::DirectLocal => None,
        }
    }

    /// Through the node proxies (node1's capture must count its connections).
    fn meshed(self) -> bool {
        matches!(self, Route::Mesh | Route::MeshQuic | Route::MeshLocal)
    }

    /// The MeshConfig `tunnelProtocol` the path runs with (`h2` for every path but
    /// `mesh-quic`, so the other figures stay HTTP/2's).
    pub fn tunnel_protocol(self) -> &'static str {
        match self {
            Route::MeshQuic => "quic",
            _ => "h2",
        }
    }

    /// Crosses a tunnel between the nodes: new connections are also measured with a cold pool.
    pub fn tunnelled(self) -> bool {
        matches!(self, Route::Mesh | Route::MeshQuic)
    }
}

pub struct Params {
    pub rounds: usize,
    pub quick: bool,
    /// Agents run with `--splice`: the pod ↔ proxy legs are spliced in the kernel.
    pub splice: bool,
    pub iperf_secs: u32,
    pub rr_count: usize,
    pub rr_warmup: usize,
    pub rr_size: usize,
    pub conn_count: usize,
    /// New connections per batch (TIME_WAIT drained before each).
    pub conn_batch: usize,
    /// Untimed connections at the start of each batch.
    pub conn_warmup: usize,
    /// New connections with a cold pool (each after `POST /pool/forget`), per round and path.
    pub cold_count: usize,
    /// Only `mesh`, `mesh-quic` and the lossy scenario.
    pub quic_only: bool,
    /// The lossy scenario: connections at once, round trips per connection.
    pub lossy_conns: usize,
    pub lossy_count: usize,
}

impl Params {
    fn new(rounds: usize, quick: bool) -> Self {
        Self {
            rounds: rounds.max(1),
            quick,
            splice: false,
            iperf_secs: if quick { 2 } else { 5 },
            rr_count: if quick { 3_000 } else { 20_000 },
            rr_warmup: 200,
            rr_size: 64,
            conn_count: if quick { 500 } else { 2_000 },
            conn_batch: 250,
            conn_warmup: 10,
            cold_count: if quick { 40 } else { 150 },
            quic_only: false,
            lossy_conns: 16,
            lossy_count: if quick { 300 } else { 1_000 },
        }
    }

    /// The paths measured, in the table's order.
    pub fn routes(&self) -> Vec<Route> {
        if self.quic_only {
            vec![Route::Mesh, Route::MeshQuic]
        } else {
            Route::ALL.to_vec()
        }
    }
}

/// Where a command runs: a pod (its netns and cgroup) or a node's netns.
pub enum Space {
    Pod(&'static str),
    Node(&'static str),
}

/// Everything a measurement needs.
pub struct Env<'a> {
    pub c: &'a Cluster,
    pub testpod: &'a Path,
    pub p: &'a Params,
    pub clk_tck: f64,
    /// `/sys/devices/system/cpu/online`: where pinned processes go back to.
    pub all_cpus: String,
    /// Server pod → pids of its echo server and `iperf3 -s`.
    servers: BTreeMap<&'static str, Vec<u32>>,
    /// Envoy A and B (`None` with `--quic-only`).
    envoy_pids: Option<[u32; 2]>,
    /// The `tunnelProtocol` last written and seen by node1's proxy.
    protocol: std::cell::RefCell<Option<&'static str>>,
}

/// node1's proxy admin API, in node1's netns.
const ADMIN_URL: &str = "http://127.0.0.1:15000";

impl Env<'_> {
    /// `curl` to node1's proxy admin API; the JSON answer.
    pub fn admin(&self, method: &str, path: &str) -> Result<Value> {
        let mut cmd = self.c.node_command("node1", "curl")?;
        cmd.args(["-sS", "--fail-with-body", "--max-time", "5", "-X", method])
            .arg(format!("{ADMIN_URL}{path}"));
        let out = util::checked(cmd, Duration::from_secs(10), "curl (node1 admin API)")?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("node1 admin {method} {path}: not JSON: {}", out.stdout))
    }

    /// `POST /pool/forget` on node1's proxy: (HTTP/2, QUIC) connections it had pooled.
    pub fn forget_pool(&self) -> Result<(u64, u64)> {
        let v = self.admin("POST", "/pool/forget")?;
        let n = |k: &str| {
            v.pointer(&format!("/forgotten/{k}"))
                .and_then(Value::as_u64)
                .with_context(|| format!("POST /pool/forget: no forgotten.{k} in {v}"))
        };
        Ok((n("h2")?, n("quic")?))
    }

    /// Writes `MeshConfig.spec.tunnelProtocol` (unless already in force) and waits until
    /// node1's proxy reports it (`/config_dump` `settings.tunnel_protocol`).
    pub fn set_protocol(&self, proto: &'static str) -> Result<()> {
        if *self.protocol.borrow() == Some(proto) {
            return Ok(());
        }
        self.c.write_config_file(
            "meshconfig.yaml",
            &format!(
                "apiVersion: sidenode.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\n\
                 spec:\n  tunnelProtocol: {proto}\n"
            ),
        )?;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.admin("GET", "/config_dump")?;
            let got = v
                .pointer("/settings/tunnel_protocol")
                .and_then(Value::as_str);
            if got == Some(proto) {
                break;
            }
            if Instant::now() > end {
                bail!(
                    "node1's proxy still reports tunnel_protocol {got:?} 30 s after MeshConfig tunnelProtocol: {proto}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        *self.protocol.borrow_mut() = Some(proto);
        Ok(())
    }

    /// The proxies a path crosses (name, pid); their CPU time is the path's "proxy CPU".
    pub fn proxies(&self, path: Route) -> Vec<(String, u32)> {
        let node = |n: &str| {
            let pid = self.c.pid(n, "proxy");
            pid.map(|p| (format!("{n}-proxy"), p))
        };
        match path {
            Route::Mesh | Route::MeshQuic => [node("node1"), node("node2")]
                .into_iter()
                .flatten()
                .collect(),
            Route::MeshLocal => node("node1").into_iter().collect(),
            Route::Envoy => self
                .envoy_pids
                .map(|[a, b]| vec![("envoy-a".into(), a), ("envoy-b".into(), b)])
                .unwrap_or_default(),
            Route::Direct | Route::DirectLocal => Vec::new(),
        }
    }

    /// Every long-running process of a path: its servers and its proxies (the client is
    /// started under `taskset`).
    pub fn path_pids(&self, path: Route) -> Result<Vec<u32>> {
        let mut pids = self
            .servers
            .get(path.server())
            .cloned()
            .with_context(|| format!("no servers in {}", path.server()))?;
        pids.extend(self.proxies(path).into_iter().map(|(_, p)| p));
        Ok(pids)
    }

    /// `ip:port` of the echo server as the client dials it.
    pub fn echo_target(&self, path: Route) -> Result<String> {
        Ok(match path {
            Route::Envoy => format!("127.0.0.1:{}", envoy::A_ECHO_PORT),
            _ => format!("{}:{ECHO_PORT}", self.c.pod(path.server())?.ip),
        })
    }

    /// The iperf3 server as the client dials it.
    pub fn iperf_target(&self, path: Route) -> Result<(String, u16)> {
        Ok(match path {
            Route::Envoy => ("127.0.0.1".into(), envoy::A_IPERF_PORT),
            _ => (self.c.pod(path.server())?.ip.clone(), IPERF_PORT),
        })
    }

    /// The network namespaces a path's sockets live in: client pod, server pod, both nodes.
    pub fn netns_of(&self, path: Route) -> Vec<Space> {
        vec![
            Space::Pod(path.client()),
            Space::Pod(path.server()),
            Space::Node("node1"),
            Space::Node("node2"),
        ]
    }

    pub fn command_in(&self, s: &Space, program: &str) -> Result<Command> {
        match s {
            Space::Pod(p) => self.c.pod_command(p, program),
            Space::Node(n) => self.c.node_command(n, program),
        }
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

/// `cargo xtask bench --idle N` (over HBONE/QUIC with `quic`): see [`idle`]. The binaries of `target/release`, or of
/// `target/$SIDENODE_BENCH_PROFILE` (e.g. `debug`, with `--no-build`: a quick look, not a
/// figure to publish).
pub fn run_idle(n: usize, quic: bool) -> Result<()> {
    let profile = std::env::var("SIDENODE_BENCH_PROFILE").unwrap_or_else(|_| "release".into());
    let release = target_dir().join(profile);
    let (mesh_node, testpod) = (release.join("mesh-node"), release.join("testpod"));
    for bin in [&mesh_node, &testpod] {
        if !bin.exists() {
            bail!("{} not found; build with --release first", bin.display());
        }
    }
    idle::run(n, quic, &mesh_node, &testpod)
}

pub use lossy::delay_queue;

/// `cargo xtask bench --gateway`: see [`gateway`].
pub fn run_gateway(rounds: usize, quick: bool) -> Result<()> {
    gateway::run(rounds, quick)
}

pub fn run(rounds: usize, quick: bool, splice: bool, quic_only: bool) -> Result<()> {
    let params = Params {
        splice,
        quic_only,
        ..Params::new(rounds, quick)
    };
    let release = target_dir().join("release");
    let mesh_node = release.join("mesh-node");
    let testpod = release.join("testpod");
    for bin in [&mesh_node, &testpod] {
        if !bin.exists() {
            bail!("{} not found; build with --release first", bin.display());
        }
    }
    for tool in [
        "iperf3", "taskset", "ss", "openssl", "getconf", "curl", "tc",
    ] {
        which(tool).with_context(|| format!("{tool} not found (run `cargo xtask setup`)"))?;
    }
    let envoy = crate::setup::envoy_bin();
    if !quic_only && crate::setup::envoy_version().is_none() {
        bail!("{} does not run (run `cargo xtask setup`)", envoy.display());
    }
    // A cluster left by an interrupted run would block `up`.
    Cluster::down(PREFIX);
    println!(
        "bench: bringing up a 2-node mesh cluster ({PREFIX}, {PODS_PER_NODE} pods per node) from the release binaries; local legs spliced in the kernel: {}",
        if splice {
            "yes (agent --splice)"
        } else {
            "no (default)"
        }
    );
    let started = Instant::now();
    // TestCluster tears everything down when dropped, also on error: processes in its
    // namespaces and cgroups (servers, Envoys), namespaces, and its state folder (certs,
    // Envoy configs and logs).
    let mut cluster = TestCluster::up(ClusterOpts {
        prefix: PREFIX.into(),
        nodes: 2,
        pods: PODS_PER_NODE,
        mesh_node: mesh_node.clone(),
        start_agents: false,
        mesh: true,
        agent_args: if splice {
            vec!["--splice".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    })?;
    let res = start_mesh(&mut cluster).and_then(|()| bench(&cluster, &testpod, &envoy, &params));
    if let Err(e) = &res {
        eprintln!("\nbench failed: {e:#}\n\nlogs (last lines):");
        dump_logs(&cluster.state_dir.join("logs"));
        dump_logs(&cluster.state_dir.join("envoy"));
    }
    println!(
        "bench: tearing the cluster down ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    drop(cluster);
    res
}

/// Opts node1-pod3 out before any agent starts (so it is never enrolled), then the
/// controller, the agents and the proxies, as `Cluster::up` does.
fn start_mesh(c: &mut Cluster) -> Result<()> {
    c.set_pod_opt_out(PLAIN_LOCAL_SERVER, true)?;
    c.start_node_processes()
}

fn bench(c: &Cluster, testpod: &Path, envoy_bin: &Path, p: &Params) -> Result<()> {
    for (pod, ns) in [
        (MESH_CLIENT, "mesh"),
        (MESH_SERVER, "mesh"),
        (MESH_LOCAL_SERVER, "mesh"),
        (PLAIN_CLIENT, "plain"),
        (PLAIN_SERVER, "plain"),
        (PLAIN_LOCAL_SERVER, "mesh"),
    ] {
        let got = &c.pod(pod)?.namespace;
        if got != ns {
            bail!("pod {pod} is in namespace {got}, the bench expects {ns}");
        }
    }
    // The same servers in every server pod.
    let mut bg = Vec::new();
    let mut servers = BTreeMap::new();
    for pod in [
        PLAIN_SERVER,
        MESH_SERVER,
        PLAIN_LOCAL_SERVER,
        MESH_LOCAL_SERVER,
    ] {
        let echo = Bg::echo_server(c, testpod, pod, ECHO_PORT)?;
        let iperf = Bg::iperf_server(c, pod, IPERF_PORT)?;
        servers.insert(pod, vec![echo.pid(), iperf.pid()]);
        bg.push(echo);
        bg.push(iperf);
    }
    let pair = if p.quic_only {
        None
    } else {
        let pair = envoy::start(
            c,
            envoy_bin,
            PLAIN_CLIENT,
            PLAIN_SERVER,
            ECHO_PORT,
            IPERF_PORT,
        )?;
        println!(
            "bench: Envoy {} sidecar pair up ({PLAIN_CLIENT} 127.0.0.1 → mTLS 1.3 → {PLAIN_SERVER}), concurrency {}",
            pair.version,
            envoy::CONCURRENCY
        );
        Some(pair)
    };
    let env = Env {
        c,
        testpod,
        p,
        clk_tck: util::clk_tck(),
        all_cpus: util::online_cpus(),
        servers,
        envoy_pids: pair.as_ref().map(|p| [p.a.pid(), p.b.pid()]),
        protocol: std::cell::RefCell::new(None),
    };

    // Idle memory: after startup, before any traffic.
    std::thread::sleep(Duration::from_secs(2));
    let mem_idle = memory(&env);

    // Sanity: every path works, and node1 captures exactly the enrolled clients.
    let checks = sanity(&env)?;

    let mut rounds: Vec<Round> = Vec::new();
    let mut orders = Vec::new();
    for r in 1..=p.rounds {
        let mut order = p.routes();
        if r % 2 == 0 {
            order.reverse();
        }
        let mut round = Round::new();
        for path in &order {
            env.set_protocol(path.tunnel_protocol())?;
            let s =
                measure(&env, *path).with_context(|| format!("round {r}, {} path", path.name()))?;
            println!(
                "round {r}/{} {:<12} {:>6.2} Gbit/s  cpu/GB {:>5}  rr p50 pinned {:>6.1} unpinned {:>6.1} µs  conn p50 {:>6.1} p99 {:>6.1} µs  cold p50 {:>6.1} µs",
                p.rounds,
                path.name(),
                s.throughput_bps / 1e9,
                s.cpu_s_per_gb()
                    .map_or("-".to_string(), |v| format!("{v:.2}")),
                num(&s.rr_pinned, "p50_us"),
                num(&s.rr_unpinned, "p50_us"),
                num(&s.connlat, "p50_us"),
                num(&s.connlat, "p99_us"),
                num(&s.connlat_cold, "p50_us"),
            );
            round.insert(*path, s);
        }
        orders.push(order.iter().map(|r| r.name()).collect::<Vec<_>>());
        rounds.push(round);
    }
    // Right after the load, and once the proxies' heap trim (every 10 s, `kernel::heap`) has
    // run: what they keep.
    let mem_after = memory(&env);
    std::thread::sleep(Duration::from_secs(12));
    let mem_settled = memory(&env);

    let lossy = lossy::run(&env).context("lossy scenario")?;

    let report = Report::new(p, &rounds, &mem_idle, &mem_after, &mem_settled, &lossy);
    print!("{}", report.text);

    let rounds_json: Vec<Value> = rounds
        .iter()
        .zip(&orders)
        .enumerate()
        .map(|(i, (r, order))| {
            let paths: serde_json::Map<String, Value> = r
                .iter()
                .map(|(k, s)| (k.name().to_string(), s.json()))
                .collect();
            json!({"round": i + 1, "order": order, "paths": paths})
        })
        .collect();
    let mem = |m: &BTreeMap<String, Mem>| -> Value {
        m.iter().map(|(k, v)| (k.clone(), v.json())).collect()
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let paths: serde_json::Map<String, Value> = p
        .routes()
        .iter()
        .map(|r| {
            (
                r.name().to_string(),
                json!({
                    "client": r.client(),
                    "server": r.server(),
                    "baseline": r.baseline().map(Route::name),
                    "proxies": env.proxies(*r).into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    "pinned": pinned_names(&env, *r),
                    "tunnel_protocol": r.meshed().then(|| r.tunnel_protocol()),
                }),
            )
        })
        .collect();
    let json = json!({
        "timestamp": util::rfc3339(now),
        "timestamp_unix": now,
        "git": util::git(),
        "machine": util::machine(),
        "params": {
            "rounds": p.rounds,
            "quick": p.quick,
            "splice": p.splice,
            "quic_only": p.quic_only,
            "connlat_cold_count": p.cold_count,
            "lossy_conns": p.lossy_conns,
            "lossy_count": p.lossy_count,
            "iperf3_seconds": p.iperf_secs,
            "rr_count": p.rr_count,
            "rr_warmup": p.rr_warmup,
            "rr_size": p.rr_size,
            "connlat_count": p.conn_count,
            "connlat_batch": p.conn_batch,
            "connlat_warmup_per_batch": p.conn_warmup,
            "pinned_cpu": PIN_CPU,
            "binaries": "target/release",
            "envoy_version": pair.as_ref().map(|p| p.version.clone()),
            "envoy_concurrency": envoy::CONCURRENCY,
        },
        "method": {
            "pinned": "client under taskset -c PIN; its server (echo, iperf3 -s) and every proxy/Envoy of the path pinned with taskset -a -p (all threads)",
            "unpinned": "no affinity; on this VM an idle vCPU halts and a cross-CPU wake-up costs ~30 µs, so the unpinned figure mostly counts wake-ups",
            "throughput": "iperf3 -c, one stream, unpinned",
            "connlat": "testpod connlat --size rr_size --fin: connect, HELLO, one echo, close(); batches of connlat_batch with TIME_WAIT emptied before each in every netns of the path (ss -K state time-wait; waited out if any remain); the tunnel pool warm",
            "connlat_cold": "mesh and mesh-quic: before each of connlat_cold_count connections (pinned), POST /pool/forget on node1's proxy admin API (127.0.0.1:15000): the pool holds no tunnel, so the connection dials a new one (TCP + TLS 1.3 + HTTP/2, or QUIC + HTTP/3) before its CONNECT; what was forgotten is checked to be of the path's transport",
            "tunnel_protocol": "the bench writes MeshConfig spec.tunnelProtocol (h2 for every path but mesh-quic) and waits until node1's proxy reports it in /config_dump",
            "proxy_cpu": "utime+stime from /proc/<pid>/stat of the path's proxies before and after the iperf3 run, divided by the bytes iperf3 received",
            "rss": "VmRSS (and VmHWM as the peak) of each agent, proxy, the controller and both Envoys; idle = after startup before any traffic, after_load = after the last round, settled_12s = 12 s later (past the proxies' heap trim); anon_kb = RssAnon (RSS without the binary's shared code pages)",
        },
        "paths": paths,
        "checks": checks,
        "rounds": rounds_json,
        "medians": report.medians,
        "vs_baseline": report.vs_baseline,
        "memory": {"idle": mem(&mem_idle), "after_load": mem(&mem_after), "settled_12s": mem(&mem_settled)},
        "targets": report.targets,
        "quic": report.quic,
        "lossy": lossy.json,
    });
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(if p.quic_only {
        "latest-quic.json"
    } else if p.splice {
        "latest-splice.json"
    } else {
        "latest.json"
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {}", out.display());
    drop(pair);
    drop(bg);
    Ok(())
}

/// What the pinned measurements pin on a path (the client runs under `taskset`).
fn pinned_names(e: &Env, path: Route) -> Vec<String> {
    let server = path.server();
    let mut v = vec![
        format!("client in {} (taskset -c {PIN_CPU})", path.client()),
        format!("testpod serve in {server}"),
        format!("iperf3 -s in {server}"),
    ];
    v.extend(e.proxies(path).into_iter().map(|(n, _)| n));
    v
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// One connection per path through `testpod dial`: what the server saw, and whether node1's
/// capture counted it (it must for `mesh` and `mesh-local`, and must not for the others).
fn sanity(e: &Env) -> Result<Value> {
    let c = e.c;
    let mut out = serde_json::Map::new();
    for path in e.p.routes() {
        e.set_protocol(path.tunnel_protocol())?;
        let client = path.client();
        let to = e.echo_target(path)?;
        let before = captured(c)?;
        let mut cmd = c.pod_command(client, e.testpod)?;
        cmd.args(["dial", "--to", &to, "--conns", "3", "--concurrency", "1"]);
        let v = json_line(
            output(cmd, Duration::from_secs(30), "testpod dial")?,
            "dial",
        )?;
        let results = v
            .get("results")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if results.is_empty() {
            bail!(
                "{} path: testpod dial reported no connection: {v}",
                path.name()
            );
        }
        if let Some(bad) = results
            .iter()
            .find(|r| r.get("echo_ok") != Some(&Value::Bool(true)))
        {
            bail!(
                "{} path: a test connection {client} -> {to} failed: {bad}",
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
        // The proxy dials a pod's tunnels from the pod's own network namespace.
        let hbone = hbone_conns(c, client);
        println!(
            "check {:<12} {client} ({}) -> {to} ({}): echo ok, server saw peer={peer}, node1 captured +{captured_delta}, :15008 connections in {client} {}",
            path.name(),
            c.pod(client)?.ip,
            path.server(),
            hbone.map_or("?".to_string(), |n| n.to_string())
        );
        if path.meshed() && captured_delta == 0 {
            bail!(
                "{} path was not captured (node1's captured counter did not move)",
                path.name()
            );
        }
        if !path.meshed() && captured_delta != 0 {
            bail!(
                "{} path was captured ({captured_delta} connects rewritten)",
                path.name()
            );
        }
        let mut tls = Value::Null;
        if path == Route::Envoy {
            if !peer.starts_with("127.0.0.1:") {
                bail!("envoy path: the server saw {peer}, not Envoy B on 127.0.0.1");
            }
            tls = envoy::check_tls(c, client, path.server())?;
            println!("check {:<12} Envoy B's TLS: {tls}", path.name());
        }
        if path == Route::Mesh && hbone == Some(0) {
            eprintln!(
                "warning: no connection to port 15008 in {client}'s network namespace after the mesh check: is the proxy tunnelling over HBONE?"
            );
        }
        out.insert(
            path.name().into(),
            json!({
                "client": client,
                "server": path.server(),
                "to": to,
                "server_peer": peer,
                "captured_delta": captured_delta,
                "node1_hbone_conns": hbone,
                "envoy_tls": tls,
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

/// Established TCP connections with port 15008 on either end, in `pod`'s network namespace.
fn hbone_conns(c: &Cluster, pod: &str) -> Option<usize> {
    let mut cmd = c.pod_command(pod, "ss").ok()?;
    cmd.args([
        "-Htn",
        "state",
        "established",
        "( sport = :15008 or dport = :15008 )",
    ]);
    let out = output(cmd, Duration::from_secs(10), "ss").ok()?;
    Some(out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
}

/// RSS of every node's agent and proxy, the controller, and both Envoys.
fn memory(e: &Env) -> BTreeMap<String, Mem> {
    let c = e.c;
    let mut procs: Vec<(String, Option<u32>)> = c
        .node_names()
        .into_iter()
        .flat_map(|n| ["agent", "proxy"].map(|k| (format!("{n}-{k}"), c.pid(&n, k))))
        .collect();
    procs.push((CONTROLLER.into(), c.pid(CONTROLLER, CONTROLLER)));
    if let Some([a, b]) = e.envoy_pids {
        procs.push(("envoy-a".into(), Some(a)));
        procs.push(("envoy-b".into(), Some(b)));
    }
    procs
        .into_iter()
        .filter_map(|(name, pid)| Some((name, Mem::read(pid?)?)))
        .collect()
}
