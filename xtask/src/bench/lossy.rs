//! The lossy-network scenario (issue 16): a netem-like impairment on the node link (`eth0` of
//! both nodes' namespaces, so each direction is delayed and lossy), then `conns` connections at once
//! from the `mesh` client to its server: all between the same two pods, so they share one
//! tunnel (one TCP connection with HTTP/2, one QUIC connection with HTTP/3). Each connection
//! is a `testpod rr` (64 B request/response, unpinned); the figures are each connection's p50
//! and p99, summarised as the median over the connections and the worst connection. HTTP/2
//! and QUIC alternate in order every round.
//!
//! This kernel has no `sch_netem` (`CONFIG_NET_SCH_NETEM` is not set, `tc qdisc … netem`
//! answers "Specified qdisc kind is unknown"), so the impairment is built from what it has, in
//! each node's namespace only: `iptables -t mangle -A POSTROUTING -o eth0 -m statistic --mode
//! random --probability 0.01 -j DROP` (the loss), then `-j NFQUEUE --queue-num 0` for what is
//! left, and a delayer process in the node's namespace (`cargo xtask netem-delay`, the hidden
//! subcommand below, [`delay_queue`]) that takes each queued packet and accepts it 10 ms
//! after it arrived (polling every 200 µs, so up to 0.2 ms later).
use super::util::{Bg, checked, json_line, median, output};
use super::{Env, MESH_CLIENT, Route, Space};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

/// The node link's impairment, per direction (each node's `eth0` egress).
pub const NETEM: [&str; 4] = ["delay", "10ms", "loss", "1%"];
const DELAY: Duration = Duration::from_millis(10);
const LOSS: &str = "0.01";
const QUEUE: u16 = 0;
const LINK: &str = "eth0";
const NODES: [&str; 2] = ["node1", "node2"];
pub const PROTOCOLS: [&str; 2] = ["h2", "quic"];

/// Per protocol: medians over the rounds of (median p50, median p90, median p99, worst p99),
/// µs.
pub struct Lossy {
    pub json: Value,
    pub medians: BTreeMap<&'static str, [f64; 4]>,
}

/// The impairment on both nodes' `eth0`: iptables rules (loss, then the queue) and a delayer
/// process per node; rules and delayers removed on drop.
struct Netem<'a> {
    e: &'a Env<'a>,
    rules: Vec<&'static str>,
    delayers: Vec<Bg>,
}

fn rules(op: &str) -> [Vec<String>; 2] {
    let base = |v: &[&str]| -> Vec<String> {
        ["-t", "mangle", op, "POSTROUTING", "-o", LINK]
            .iter()
            .chain(v)
            .map(|s| s.to_string())
            .collect()
    };
    [
        base(&[
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            LOSS,
            "-j",
            "DROP",
        ]),
        base(&["-j", "NFQUEUE", "--queue-num", &QUEUE.to_string()]),
    ]
}

impl<'a> Netem<'a> {
    fn add(e: &'a Env<'a>) -> Result<Netem<'a>> {
        let mut n = Netem {
            e,
            rules: Vec::new(),
            delayers: Vec::new(),
        };
        let exe = std::env::current_exe().context("the xtask binary")?;
        let logs = e.c.state_dir.join("logs");
        for node in NODES {
            let mut cmd = e.c.node_command(node, &exe)?;
            cmd.args(["netem-delay", "--queue", &QUEUE.to_string()])
                .args(["--delay-us", &DELAY.as_micros().to_string()]);
            let bg = Bg::spawn(
                cmd,
                format!("netem-delay in {node}"),
                &logs.join(format!("{node}-netem-delay.log")),
            )?;
            n.delayers.push(bg);
        }
        // The delayers bind their queue before any packet is sent to it.
        std::thread::sleep(Duration::from_millis(300));
        for node in NODES {
            for r in rules("-A") {
                let mut cmd = e.command_in(&Space::Node(node), "iptables")?;
                cmd.args(&r);
                checked(cmd, Duration::from_secs(10), "iptables -A")
                    .with_context(|| format!("loss/delay rules on {node}'s {LINK}"))?;
            }
            n.rules.push(node);
        }
        Ok(n)
    }

    /// Fails if a delayer exited (its queue would drop every packet).
    fn check(&mut self) -> Result<()> {
        for d in &mut self.delayers {
            d.check_running()?;
        }
        Ok(())
    }
}

impl Drop for Netem<'_> {
    fn drop(&mut self) {
        for node in &self.rules {
            for r in rules("-D") {
                let res = self
                    .e
                    .command_in(&Space::Node(node), "iptables")
                    .and_then(|mut cmd| {
                        cmd.args(&r);
                        checked(cmd, Duration::from_secs(10), "iptables -D")
                    });
                if let Err(err) = res {
                    eprintln!("warning: removing the loss/delay rules from {node}: {err:#}");
                }
            }
        }
        // The delayers are killed when `delayers` drops (after the rules are gone).
    }
}

/// `cargo xtask netem-delay`: binds NFQUEUE `queue` in the current network namespace and
/// accepts every queued packet `delay` after it arrived, in arrival order. Runs until killed.
pub fn delay_queue(queue: u16, delay: Duration) -> Result<()> {
    let mut q = nfq::Queue::open().context("opening an NFQUEUE netlink socket")?;
    q.bind(queue)
        .with_context(|| format!("binding NFQUEUE {queue}"))?;
    // Metadata only: the verdict needs the packet id, not its bytes.
    q.set_copy_range(queue, 0).context("NFQUEUE copy range")?;
    q.set_queue_max_len(queue, 65_536)
        .context("NFQUEUE length")?;
    q.set_recv_gso(queue, true).context("NFQUEUE GSO")?;
    q.set_nonblocking(true);
    eprintln!("netem-delay: queue {queue}, delay {delay:?}");
    let mut held: std::collections::VecDeque<(std::time::Instant, nfq::Message)> =
        std::collections::VecDeque::new();
    loop {
        loop {
            match q.recv() {
                Ok(m) => held.push_back((std::time::Instant::now() + delay, m)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading NFQUEUE"),
            }
        }
        let now = std::time::Instant::now();
        while held.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, mut m)) = held.pop_front() {
                m.set_verdict(nfq::Verdict::Accept);
                q.verdict(m).context("NFQUEUE verdict")?;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn run(e: &Env) -> Result<Lossy> {
    let p = e.p;
    let route = Route::Mesh;
    let to = e.echo_target(route)?;
    println!(
        "lossy: netem {} on {LINK} of {} ({} connections at once {MESH_CLIENT} -> {to}, {} round trips each)",
        NETEM.join(" "),
        NODES.join(" and "),
        p.lossy_conns,
        p.lossy_count
    );
    let mut netem = Netem::add(e)?;
    let mut rounds = Vec::new();
    let mut per: BTreeMap<&'static str, Vec<[f64; 4]>> = BTreeMap::new();
    for r in 1..=p.rounds {
        let mut order = PROTOCOLS.to_vec();
        if r % 2 == 0 {
            order.reverse();
        }
        let mut by = serde_json::Map::new();
        for proto in &order {
            e.set_protocol(proto)?;
            let v = one(e, &to, proto).with_context(|| format!("round {r}, {proto}"))?;
            netem.check()?;
            let s = summary(&v);
            println!(
                "lossy round {r}/{} {proto:<5} p50 (median of conns) {:>7.0} µs  p90 median {:>7.0} µs  p99 median {:>7.0} µs  worst p99 {:>7.0} µs",
                p.rounds, s[0], s[1], s[2], s[3]
            );
            per.entry(proto).or_default().push(s);
            by.insert(
                (*proto).into(),
                json!({
                    "per_connection": v,
                    "p50_median_us": s[0],
                    "p90_median_us": s[1],
                    "p99_median_us": s[2],
                    "p99_max_us": s[3],
                }),
            );
        }
        rounds.push(json!({"round": r, "order": order, "protocols": by}));
    }
    drop(netem);
    let medians: BTreeMap<&'static str, [f64; 4]> = per
        .iter()
        .map(|(k, v)| {
            let col = |i: usize| median(&v.iter().map(|s| s[i]).collect::<Vec<_>>());
            (*k, [col(0), col(1), col(2), col(3)])
        })
        .collect();
    let json = json!({
        "netem": format!("{} (each node's {LINK} egress: both directions)", NETEM.join(" ")),
        "how": "no sch_netem in this kernel: iptables -t mangle POSTROUTING -o eth0 -m statistic --mode random --probability 0.01 -j DROP, then -j NFQUEUE to a delayer (cargo xtask netem-delay) accepting each packet 10 ms after it arrived; in both nodes' namespaces",
        "client": MESH_CLIENT,
        "server": route.server(),
        "connections": p.lossy_conns,
        "round_trips_per_connection": p.lossy_count,
        "size": p.rr_size,
        "method": "the connections start together (unpinned testpod rr processes) after one untimed connection opened the tunnel; they share it (checked: node1's pool then holds exactly one connection, of the protocol measured)",
        "rounds": rounds,
        "medians": medians.iter().map(|(k, s)| (k.to_string(), json!({
            "p50_median_us": s[0], "p90_median_us": s[1], "p99_median_us": s[2], "p99_max_us": s[3],
        }))).collect::<serde_json::Map<_, _>>(),
    });
    Ok(Lossy { json, medians })
}

/// One run: open the tunnel with an untimed connection, then `lossy_conns` `testpod rr` at
/// once; each one's report. Afterwards node1's pool must hold exactly one tunnel, of `proto`
/// (then forgotten, so the next run dials its own).
fn one(e: &Env, to: &str, proto: &str) -> Result<Vec<Value>> {
    let p = e.p;
    e.forget_pool()?;
    let mut warm = e.c.pod_command(MESH_CLIENT, e.testpod)?;
    warm.args(["rr", "--to", to, "--count", "5", "--size"])
        .arg(p.rr_size.to_string());
    json_line(
        output(warm, Duration::from_secs(60), "testpod rr")?,
        "rr (opening the tunnel)",
    )?;
    let mut children = Vec::new();
    for _ in 0..p.lossy_conns {
        let mut cmd = e.c.pod_command(MESH_CLIENT, e.testpod)?;
        cmd.args(["rr", "--to", to])
            .args(["--count", &p.lossy_count.to_string()])
            .args(["--size", &p.rr_size.to_string()])
            .args(["--warmup", "20"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        children.push(cmd.spawn().context("starting testpod rr")?);
    }
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for child in children {
        let o = child.wait_with_output().context("waiting for testpod rr")?;
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        match json_line(
            super::util::Output {
                ok: o.status.success(),
                status: o.status.to_string(),
                stdout,
                stderr,
            },
            "rr",
        ) {
            Ok(v) if o.status.success() => out.push(v),
            Ok(v) => failed.push(format!("{}: {v}", o.status)),
            Err(err) => failed.push(format!("{err:#}")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} connections failed; first: {}",
            failed.len(),
            p.lossy_conns,
            failed[0]
        );
    }
    let (h2, quic) = e.forget_pool()?;
    let (mine, other) = if proto == "quic" {
        (quic, h2)
    } else {
        (h2, quic)
    };
    if mine != 1 || other != 0 {
        bail!(
            "after the {proto} run node1's pool held {h2} HTTP/2 and {quic} QUIC connections; expected the one {proto} tunnel"
        );
    }
    Ok(out)
}

/// (median over connections of p50, of p90, of p99, worst p99), µs.
fn summary(v: &[Value]) -> [f64; 4] {
    let col = |k: &str| -> Vec<f64> {
        v.iter()
            .filter_map(|x| x.get(k).and_then(Value::as_f64))
            .collect()
    };
    let p99 = col("p99_us");
    [
        median(&col("p50_us")),
        median(&col("p90_us")),
        median(&p99),
        p99.iter().copied().fold(f64::NAN, f64::max),
    ]
}
