//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (its own workspace, never built
//! by `build` or `test`) for a while each and prints what libFuzzer did, as a table.
//!
//! The targets' checks live in `fuzz/checks/`; `cargo test` (so `cargo xtask test`) runs each
//! of them on its committed corpus and a fixed number of deterministic mutations of it
//! (`tests/tests/fuzz_corpus.rs`), with no cargo-fuzz or nightly needed.
//!
//! Needs `cargo-fuzz` (`cargo install cargo-fuzz`); libFuzzer's instrumentation needs nightly
//! flags, which the stable toolchain accepts with `RUSTC_BOOTSTRAP=1` (set here).

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::workspace_root;

pub const TARGETS: &[&str] = &[
    "config_yaml",
    "istio_json",
    "hbone_request",
    "forwarded",
    "http_route_match",
    "state_update",
    "spiffe_san",
];

/// What one run reported.
#[derive(Debug, Default, PartialEq)]
pub struct Stats {
    pub execs: Option<u64>,
    pub cov: Option<u64>,
    pub corpus: Option<u64>,
    pub crashed: bool,
    pub artifact: Option<String>,
}

/// Reads libFuzzer's output: `stat::number_of_executed_units: N` (with
/// `-print_final_stats=1`), else the last `#N DONE`/`#N pulse` line; `cov:` and `corp:` from
/// status lines; a crash from `==ERROR`/`panicked`/`Test unit written to`.
pub fn parse_output(text: &str) -> Stats {
    let mut s = Stats::default();
    let mut last_count = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            s.execs = v.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            if let Some(n) = words.next().and_then(|n| n.parse::<u64>().ok()) {
                last_count = Some(n);
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            for pair in words.windows(2) {
                match pair[0] {
                    "cov:" => s.cov = pair[1].parse().ok().or(s.cov),
                    "corp:" => {
                        s.corpus = pair[1]
                            .split('/')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .or(s.corpus)
                    }
                    _ => {}
                }
            }
        }
        if line.starts_with("==") && line.contains("ERROR: libFuzzer")
            || line.contains("ERROR: AddressSanitizer")
            || line.contains("panicked at")
        {
            s.crashed = true;
        }
        if let Some(p) = line.split("Test unit written to ").nth(1) {
            s.artifact = Some(p.trim().to_string());
            s.crashed = true;
        }
    }
    if s.execs.is_none() {
        s.execs = last_count;
    }
    s
}

pub fn run(seconds: u64, only: Option<&str>, sanitizer: &str) -> Result<()> {
    let root = workspace_root();
    let dir = root.join("fuzz");
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t}; targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let have = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        bail!("cargo-fuzz is not installed: `cargo install cargo-fuzz` (then run this again)");
    }
    let logs = dir.join("target").join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut rows = Vec::new();
    for t in &targets {
        // Build first (not timed), so every target gets its full run time.
        crate::run_cmd(&mut fuzz_cmd(&dir, "build", sanitizer, t))?;
        println!("fuzzing {t} for {seconds} s ...");
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let log = logs.join(format!("{t}.log"));
        let started = Instant::now();
        let status = run_logged(
            fuzz_cmd(&dir, "run", sanitizer, t)
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1"),
            &log,
        )?;
        let took = started.elapsed().as_secs_f64();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut stats = parse_output(&text);
        if !status {
            stats.crashed = true;
        }
        rows.push((t.to_string(), took, stats, log));
    }
    println!();
    println!(
        "{:<18} {:>8} {:>14} {:>10} {:>7} {:>7}  result",
        "target", "seconds", "execs", "execs/s", "cov", "corpus"
    );
    let mut failed = Vec::new();
    for (t, took, s, log) in &rows {
        let execs = s.execs.map_or("?".to_string(), |n| n.to_string());
        let rate = s.execs.map_or("?".to_string(), |n| {
            format!("{:.0}", n as f64 / took.max(1.0))
        });
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |n| n.to_string());
        let result = if s.crashed {
            failed.push(t.clone());
            format!(
                "CRASH {} (log {})",
                s.artifact.as_deref().unwrap_or("?"),
                log.display()
            )
        } else {
            "ok".to_string()
        };
        println!(
            "{t:<18} {took:>8.0} {execs:>14} {rate:>10} {:>7} {:>7}  {result}",
            opt(s.cov),
            opt(s.corpus)
        );
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo fuzz <sub> --sanitizer <sanitizer> <target>` in `fuzz/`.
fn fuzz_cmd(dir: &Path, sub: &str, sanitizer: &str, target: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(dir)
        .env("RUSTC_BOOTSTRAP", "1")
        // The root workspace's target directory is for the normal builds.
        .env_remove("CARGO_TARGET_DIR")
        .args(["fuzz", sub, "--sanitizer", sanitizer, target]);
    cmd
}

/// Runs `cmd` with its output (libFuzzer writes to stderr) into `log`, echoing the lines
/// that say something (start, new coverage every so often, the end, a crash).
fn run_logged(cmd: &mut Command, log: &Path) -> Result<bool> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz run")?;
    let mut file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let out = child.stdout.take();
    let echo = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(out) = out {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.push(l);
            }
        }
        lines
    });
    if let Some(err) = child.stderr.take() {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            writeln!(file, "{l}")?;
            if l.contains("INITED")
                || l.contains("DONE")
                || l.contains("panicked")
                || l.contains("ERROR")
                || l.contains("Test unit written")
                || l.starts_with("stat::number_of_executed_units")
                || l.starts_with("error")
            {
                println!("  {l}");
            }
        }
    }
    for l in echo.join().unwrap_or_default() {
        writeln!(file, "{l}")?;
    }
    Ok(child
        .wait()
        .context("waiting for cargo fuzz run")?
        .success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libfuzzer_output() {
        let text = "INFO: Seed: 1\n#2\tINITED cov: 120 ft: 130 corp: 4/300b exec/s: 0 rss: 40Mb\n\
                    #1048576\tpulse  cov: 900 ft: 1500 corp: 210/9Kb lim: 4096 exec/s: 17476 rss: 120Mb\n\
                    #1093000\tDONE   cov: 910 ft: 1520 corp: 214/9Kb lim: 4096 exec/s: 17926 rss: 121Mb\n\
                    Done 1093000 runs in 61 second(s)\n\
                    stat::number_of_executed_units: 1093001\nstat::average_exec_per_sec:     17918\n";
        let s = parse_output(text);
        assert_eq!(s.execs, Some(1_093_001));
        assert_eq!(s.cov, Some(910));
        assert_eq!(s.corpus, Some(214));
        assert!(!s.crashed);
        let crash = "#5\tNEW cov: 3 ft: 3 corp: 2/2b\nthread '<unnamed>' panicked at src/x.rs:1:1:\n\
                     ==123== ERROR: libFuzzer: deadly signal\n\
                     artifact_prefix='a/'; Test unit written to a/crash-abc\n";
        let s = parse_output(crash);
        assert!(s.crashed);
        assert_eq!(s.execs, Some(5));
        assert_eq!(s.artifact.as_deref(), Some("a/crash-abc"));
    }
}
