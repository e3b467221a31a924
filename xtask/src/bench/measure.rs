//! One path's measurements in one round: one stream (with the proxies' CPU time), request/
//! response unpinned and with every process of the path pinned to one CPU, and new
//! connections (pinned) in batches with TIME_WAIT drained between them, with the tunnel pool
//! warm and (paths through a tunnel) cold.

use super::util::{Output, checked, cpu_seconds, json_line, output, percentile};
use super::{Env, PIN_CPU, Route};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

/// One path's measurements in one round.
pub struct Sample {
    pub throughput_bps: f64,
    /// Bytes the iperf3 server received.
    pub bytes: f64,
    /// utime + stime of the path's proxies (node proxies or Envoys) over the iperf3 run.
    pub proxy_cpu_s: Option<f64>,
    pub rr_pinned: Value,
    pub rr_unpinned: Value,
    pub connlat: Value,
    /// New connections with node1's tunnel pool forgotten before each (`Null`: not measured).
    pub connlat_cold: Value,
}

impl Sample {
    pub fn cpu_s_per_gb(&self) -> Option<f64> {
        self.proxy_cpu_s
            .filter(|_| self.bytes > 0.0)
            .map(|s| s / (self.bytes / 1e9))
    }

    pub fn json(&self) -> Value {
        json!({
            "throughput_bps": self.throughput_bps,
            "bytes": self.bytes,
            "proxy_cpu_seconds": self.proxy_cpu_s,
            "proxy_cpu_seconds_per_gb": self.cpu_s_per_gb(),
            "rr_pinned": self.rr_pinned,
            "rr_unpinned": self.rr_unpinned,
            "connlat_pinned": self.connlat,
            "connlat_cold_pinned": self.connlat_cold,
        })
    }
}

pub fn measure(e: &Env, path: Route) -> Result<Sample> {
    let (throughput_bps, bytes, proxy_cpu_s) = stream(e, path)?;
    let rr_unpinned = rr(e, path, false).context("rr, unpinned")?;
    let (rr_pinned, connlat, connlat_cold) = {
        let _pinned = Pinned::new(e.path_pids(path)?, &e.all_cpus)?;
        let rr_pinned = rr(e, path, true).context("rr, pinned")?;
        let connlat = connlat(e, path).context("connlat, pinned")?;
        let cold = if path.tunnelled() {
            connlat_cold(e, path).context("connlat with a cold pool, pinned")?
        } else {
            Value::Null
        };
        (rr_pinned, connlat, cold)
    };
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
        bytes,
        proxy_cpu_s,
        rr_pinned,
        rr_unpinned,
        connlat,
        connlat_cold,
    })
}

/// New connections, each with node1's tunnel pool empty: `POST /pool/forget` on node1's
/// proxy, then one `testpod connlat` connection (connect, HELLO, one echo, close), so each
/// dials a new tunnel (TCP + TLS + HTTP/2, or QUIC + HTTP/3) before its CONNECT. From the
/// second connection on, what was forgotten must be exactly the one tunnel of the previous
/// connection, of the path's transport (so the figure is that transport's, with no fallback).
fn connlat_cold(e: &Env, path: Route) -> Result<Value> {
    let to = e.echo_target(path)?;
    drain_time_wait(e, path)?;
    let mut samples: Vec<f64> = Vec::with_capacity(e.p.cold_count);
    let (mut errors, mut first_error) = (0u64, Value::Null);
    let quic = path.tunnel_protocol() == "quic";
    let (mut i, mut prev_ok) = (0, false);
    while i < e.p.cold_count {
        let (h2, q) = e.forget_pool()?;
        let (mine, other) = if quic { (q, h2) } else { (h2, q) };
        if i > 0 && (other > 0 || mine > 1 || (mine == 0 && prev_ok)) {
            bail!(
                "{} path: node1's pool held {h2} HTTP/2 and {q} QUIC connections after one new connection; expected one {} tunnel",
                path.name(),
                path.tunnel_protocol()
            );
        }
        let mut cmd = client_command(e, path, true)?;
        cmd.args(["connlat", "--to", &to])
            .args(["--count", "1", "--warmup", "0"])
            .args(["--size", &e.p.rr_size.to_string()])
            .args(["--fin", "--samples"]);
        let v = json_line(
            output(cmd, Duration::from_secs(30), "testpod connlat")?,
            "connlat",
        )?;
        let got: Vec<f64> = v
            .get("samples_us")
            .and_then(Value::as_array)
            .context("testpod connlat: no samples_us")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        errors += v.get("errors").and_then(Value::as_u64).unwrap_or(0);
        if first_error.is_null() {
            first_error = v.get("first_error").cloned().unwrap_or(Value::Null);
        }
        if got.is_empty() && errors > 3 {
            bail!(
                "testpod connlat with a cold pool: {errors} connections failed; first: {first_error}"
            );
        }
        prev_ok = !got.is_empty();
        samples.extend(got);
        i += 1;
    }
    Ok(json!({
        "count": samples.len(),
        "p50_us": percentile(&samples, 50),
        "p90_us": percentile(&samples, 90),
        "p99_us": percentile(&samples, 99),
        "errors": errors,
        "first_error": first_error,
        "how": "POST /pool/forget on node1's proxy before each connection",
    }))
}

/// One long stream, unpinned: bits/s, bytes received, the proxies' CPU-seconds.
fn stream(e: &Env, path: Route) -> Result<(f64, f64, Option<f64>)> {
    let client = path.client();
    let (ip, port) = e.iperf_target(path)?;
    let proxies = e.proxies(path);
    let cpu = |pids: &[(String, u32)]| -> Result<f64> {
        pids.iter()
            .map(|(_, pid)| cpu_seconds(*pid, e.clk_tck))
            .sum::<Result<f64>>()
    };
    let cpu_before = cpu(&proxies)?;
    let mut cmd = e.c.pod_command(client, "iperf3")?;
    cmd.args(["-c", &ip, "-p", &port.to_string()])
        .args(["-t", &e.p.iperf_secs.to_string(), "-J"])
        .args(["--connect-timeout", "3000"]);
    let out = output(
        cmd,
        Duration::from_secs(u64::from(e.p.iperf_secs) + 30),
        "iperf3",
    )?;
    let cpu_after = cpu(&proxies)?;
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
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 output has no end.sum_received.bits_per_second")?;
    let bytes = v
        .pointer("/end/sum_received/bytes")
        .and_then(Value::as_f64)
        .context("iperf3 output has no end.sum_received.bytes")?;
    let cpu_s = (!proxies.is_empty()).then_some(cpu_after - cpu_before);
    Ok((bps, bytes, cpu_s))
}

/// `testpod rr` on one kept connection; the client under `taskset` when `pinned`.
fn rr(e: &Env, path: Route, pinned: bool) -> Result<Value> {
    let to = e.echo_target(path)?;
    let mut cmd = client_command(e, path, pinned)?;
    cmd.args(["rr", "--to", &to])
        .args(["--count", &e.p.rr_count.to_string()])
        .args(["--size", &e.p.rr_size.to_string()])
        .args(["--warmup", &e.p.rr_warmup.to_string()]);
    json_line(output(cmd, Duration::from_secs(120), "testpod rr")?, "rr")
}

/// `testpod` in the client pod, under `taskset -c PIN_CPU` when pinned.
fn client_command(e: &Env, path: Route, pinned: bool) -> Result<Command> {
    if pinned {
        let mut cmd = e.c.pod_command(path.client(), "taskset")?;
        cmd.args(["-c", PIN_CPU]).arg(e.testpod);
        Ok(cmd)
    } else {
        e.c.pod_command(path.client(), e.testpod)
    }
}

/// New connections (connect, HELLO, one `rr_size` echo, ordinary close) in batches of
/// `conn_batch`, TIME_WAIT drained in every namespace of the path before each batch;
/// percentiles over all batches' samples.
fn connlat(e: &Env, path: Route) -> Result<Value> {
    let to = e.echo_target(path)?;
    let mut samples: Vec<f64> = Vec::with_capacity(e.p.conn_count);
    let (mut errors, mut first_error) = (0u64, Value::Null);
    let (mut batches, mut max_drain, mut waited, mut found) =
        (0usize, Duration::ZERO, 0usize, 0usize);
    while samples.len() < e.p.conn_count {
        let drained = drain_time_wait(e, path)?;
        max_drain = max_drain.max(drained.took);
        waited += usize::from(drained.waited);
        found += drained.found;
        let n = e.p.conn_batch.min(e.p.conn_count - samples.len());
        let mut cmd = client_command(e, path, true)?;
        cmd.args(["connlat", "--to", &to])
            .args(["--count", &n.to_string()])
            .args(["--warmup", &e.p.conn_warmup.to_string()])
            .args(["--size", &e.p.rr_size.to_string()])
            .args(["--fin", "--samples"]);
        let v = json_line(
            output(cmd, Duration::from_secs(180), "testpod connlat")?,
            "connlat",
        )?;
        let got: Vec<f64> = v
            .get("samples_us")
            .and_then(Value::as_array)
            .context("testpod connlat: no samples_us (an older testpod?)")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        if got.is_empty() {
            bail!("testpod connlat: no connection succeeded: {v}");
        }
        samples.extend(got);
        errors += v.get("errors").and_then(Value::as_u64).unwrap_or(0);
        if first_error.is_null() {
            first_error = v.get("first_error").cloned().unwrap_or(Value::Null);
        }
        batches += 1;
    }
    Ok(json!({
        "count": samples.len(),
        "p50_us": percentile(&samples, 50),
        "p90_us": percentile(&samples, 90),
        "p99_us": percentile(&samples, 99),
        "errors": errors,
        "first_error": first_error,
        "batches": batches,
        "drain_max_ms": max_drain.as_secs_f64() * 1e3,
        "drains_that_waited": waited,
        "time_wait_drained": found,
    }))
}

struct Drained {
    took: Duration,
    /// TIME_WAIT sockets found (and destroyed or waited out).
    found: usize,
    /// `ss -K` left some: waited for them to expire.
    waited: bool,
}

/// Empties TIME_WAIT in every network namespace of the path (client pod, server pod, both
/// nodes): counts them (`ss -Htan state time-wait`), destroys them (`ss -K state time-wait`:
/// SOCK_DESTROY, which this kernel supports for TIME_WAIT sockets), counts again and, if some
/// are left, waits until they expire (at most 70 s; Linux keeps them 60 s).
fn drain_time_wait(e: &Env, path: Route) -> Result<Drained> {
    let t0 = Instant::now();
    let spaces = e.netns_of(path);
    let count = || -> Result<usize> {
        let mut n = 0;
        for s in &spaces {
            let mut cmd = e.command_in(s, "ss")?;
            cmd.args(["-Htan", "state", "time-wait"]);
            let o: Output = checked(cmd, Duration::from_secs(10), "ss")?;
            n += o.stdout.lines().filter(|l| !l.trim().is_empty()).count();
        }
        Ok(n)
    };
    let found = count()?;
    if found == 0 {
        return Ok(Drained {
            took: t0.elapsed(),
            found,
            waited: false,
        });
    }
    for s in &spaces {
        let mut cmd = e.command_in(s, "ss")?;
        cmd.args(["-K", "state", "time-wait"]);
        let _ = output(cmd, Duration::from_secs(10), "ss -K")?;
    }
    let mut left = count()?;
    let waited = left > 0;
    while left > 0 {
        if t0.elapsed() > Duration::from_secs(70) {
            bail!("{left} TIME_WAIT sockets still there after 70 s");
        }
        std::thread::sleep(Duration::from_millis(500));
        left = count()?;
    }
    Ok(Drained {
        took: t0.elapsed(),
        found,
        waited,
    })
}

/// The processes of a path pinned to `PIN_CPU` (every thread: `taskset -a -p`); back on
/// every online CPU when dropped.
pub struct Pinned {
    pids: Vec<u32>,
    all: String,
}

impl Pinned {
    pub fn new(pids: Vec<u32>, all: &str) -> Result<Pinned> {
        let mut p = Pinned {
            pids: Vec::new(),
            all: all.to_string(),
        };
        for pid in pids {
            taskset(pid, PIN_CPU)?;
            p.pids.push(pid);
        }
        Ok(p)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for pid in &self.pids {
            if let Err(e) = taskset(*pid, &self.all) {
                eprintln!("warning: unpinning {pid}: {e:#}");
            }
        }
    }
}

/// `taskset -a -p -c <cpus> <pid>`, retried (a thread may exit while it walks them).
fn taskset(pid: u32, cpus: &str) -> Result<()> {
    let mut last = None;
    for _ in 0..3 {
        let mut cmd = Command::new("taskset");
        cmd.args(["-a", "-p", "-c", cpus, &pid.to_string()]);
        match checked(cmd, Duration::from_secs(10), "taskset") {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("taskset")))
        .with_context(|| format!("pinning pid {pid} to CPUs {cpus}"))
}
