//! Helpers of the benchmark: background processes in pods, commands with a deadline, process
//! memory, the machine, the commit, timestamps.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidenode_tests::cluster::Cluster;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process in a pod, killed on drop.
pub struct Bg {
    child: Child,
    pub what: String,
}

impl Bg {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `testpod serve` (stderr dropped: every reset connection of `connlat` would log a line).
    pub fn echo_server(c: &Cluster, testpod: &Path, pod: &str, port: u16) -> Result<Bg> {
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
    pub fn iperf_server(c: &Cluster, pod: &str, port: u16) -> Result<Bg> {
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
        bg.wait_listening(c, pod, &[port], Duration::from_secs(10))?;
        Ok(bg)
    }

    /// Any command (already set up to run in `pod`), its output to `log`.
    pub fn spawn(mut cmd: Command, what: String, log: &Path) -> Result<Bg> {
        let f =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let f2 = f.try_clone().context("cloning a log file handle")?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Bg { child, what })
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self
            .child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.what))?
        {
            bail!("{} exited: {st}", self.what);
        }
        Ok(())
    }

    /// Until every port listens (TCP) in the pod's netns; fails if the process exits first.
    pub fn wait_listening(
        &mut self,
        c: &Cluster,
        pod: &str,
        ports: &[u16],
        timeout: Duration,
    ) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?
            {
                bail!("{} exited: {st}", self.what);
            }
            let mut ss = c.pod_command(pod, "ss")?;
            ss.args(["-Hltn"]);
            if let Ok(o) = output(ss, Duration::from_secs(5), "ss") {
                let listening = |p: u16| {
                    o.stdout.lines().any(|l| {
                        l.split_whitespace()
                            .nth(3)
                            .is_some_and(|a| a.ends_with(&format!(":{p}")))
                    })
                };
                if ports.iter().all(|p| listening(*p)) {
                    return Ok(());
                }
            }
            if Instant::now() > end {
                bail!(
                    "{} is not listening on {ports:?} after {timeout:?}",
                    self.what
                );
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

pub struct Output {
    pub ok: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// Run to completion with a deadline (killed after `timeout`).
pub fn output(mut cmd: Command, timeout: Duration, what: &str) -> Result<Output> {
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
    // Polls from 1 ms up to every 50 ms: short commands return quickly, and a long
    // measurement is not disturbed by this process waking up often.
    let mut nap = Duration::from_millis(1);
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
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    };
    Ok(Output {
        ok: status.success(),
        status: status.to_string(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Run to completion, failing unless it exits 0.
pub fn checked(cmd: Command, timeout: Duration, what: &str) -> Result<Output> {
    let out = output(cmd, timeout, what)?;
    if !out.ok {
        bail!(
            "{what} failed ({}): {} {}",
            out.status,
            out.stdout.trim(),
            out.stderr.trim()
        );
    }
    Ok(out)
}

/// The last JSON line a testpod mode printed.
pub fn json_line(out: Output, what: &str) -> Result<Value> {
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

pub fn which(tool: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .context("not on PATH")
}

/// The last lines of every file in `dir`, to stderr.
pub fn dump_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        if !f.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} ({} lines)", f.display(), lines.len());
        for l in &lines[lines.len().saturating_sub(25)..] {
            eprintln!("  {l}");
        }
    }
}

#[derive(Clone, Copy)]
pub struct Mem {
    pub pid: u32,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// `RssAnon`: the process's own memory (heap, stacks), without the code pages it shares
    /// with every other process mapping the same binary (`RssFile`).
    pub anon_kb: u64,
}

impl Mem {
    pub fn read(pid: u32) -> Option<Mem> {
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
            anon_kb: field("RssAnon:")?,
        })
    }

    /// Decimal megabytes (as the targets are stated).
    pub fn rss_mb(self) -> f64 {
        self.rss_kb as f64 * 1024.0 / 1e6
    }

    pub fn hwm_mb(self) -> f64 {
        self.hwm_kb as f64 * 1024.0 / 1e6
    }

    pub fn anon_mb(self) -> f64 {
        self.anon_kb as f64 * 1024.0 / 1e6
    }

    pub fn json(self) -> Value {
        json!({"pid": self.pid, "rss_kb": self.rss_kb, "hwm_kb": self.hwm_kb, "anon_kb": self.anon_kb})
    }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32, clk_tck: f64) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name `(...)`: state is field 3, utime 14, stime 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .with_context(|| format!("{path}: no ')'"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .with_context(|| format!("{path}: field {} unreadable", i + 3))
    };
    Ok((field(11)? + field(12)?) / clk_tck)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails, Linux's USER_HZ).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// `/sys/devices/system/cpu/online` (e.g. `0-1`): what unpinned processes get back.
pub fn online_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            format!("0-{}", n.saturating_sub(1))
        })
}

pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile (as `testpod` computes them) of unsorted samples.
pub fn percentile(samples: &[f64], pct: usize) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (v.len() * pct).div_ceil(100).max(1);
    v[rank.min(v.len()) - 1]
}

pub fn machine() -> Value {
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
        "cpus_online": online_cpus(),
        "cpu_model": model,
        "kernel": cmd_out("uname", &["-r"]),
        "hostname": cmd_out("uname", &["-n"]),
    })
}

/// `{"describe": "<git describe --always --dirty>", "commit": "<HEAD>"}`.
pub fn git() -> Value {
    let run = |args: &[&str]| {
        Command::new("git")
            .current_dir(crate::workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "describe": run(&["describe", "--always", "--dirty"]),
        "commit": run(&["rev-parse", "HEAD"]),
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (days to civil date: H. Hinnant's algorithm).
pub fn rfc3339(secs: u64) -> String {
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
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50), 50.0);
        assert_eq!(percentile(&v, 99), 99.0);
        assert_eq!(percentile(&[7.0], 99), 7.0);
        assert!(percentile(&[], 50).is_nan());
    }

    #[test]
    fn timestamp_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
    }
}
