//! `cargo xtask`: the project's tasks. `setup` installs what the build needs (idempotent),
//! `build` builds everything (the eBPF object is built by mesh-node's build script), `test`
//! runs every test, `cluster` drives the simulated cluster, `demo` shows the capture path.

mod bench;
mod cluster;
mod demo;
mod fuzz;
mod kernels;
mod layers;
mod setup;
mod soak;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sidenode project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install Debian packages, bpf-linker, and Envoy for the benchmark (idempotent).
    Setup,
    /// Set up, then build the eBPF object and all binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, then run every test (needs root: real eBPF, netns, cgroups), then a
    /// one-minute soak (`soak --minutes 1`) as a smoke test.
    Test {
        /// Skip the one-minute soak.
        #[arg(long)]
        no_soak: bool,
        /// Skip the kernel matrix's CI subset (`kernels --tests ci`: capture and an HBONE
        /// tunnel under Debian's 5.10, 6.1 and 6.12 kernels in qemu, ~3 minutes).
        #[arg(long)]
        no_kernels: bool,
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Simulated cluster of network namespaces, veths, cgroups and agents.
    Cluster {
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
    /// Bring up a 2-node cluster, send traffic through the mesh, show it, clean up.
    Demo,
    /// Set up, build release, then measure pod-to-pod direct, through the mesh (across nodes
    /// and on one node) and through an Envoy sidecar pair, side by side.
    Bench {
        /// Rounds per path (the order of the paths flips every round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Shorter runs (2 s streams, fewer round trips and connections).
        #[arg(long)]
        quick: bool,
        /// Skip setup and the release build: use the binaries in target/release as they are.
        #[arg(long)]
        no_build: bool,
        /// Run the agents with `--splice` (pod ↔ proxy legs spliced in the kernel); the JSON
        /// goes to target/bench/latest-splice.json.
        #[arg(long)]
        splice: bool,
        /// Instead: HTTPS through the sidenode gateway vs an Envoy gateway (same certificate,
        /// TLS settings and backend); JSON to target/bench/gateway.json.
        #[arg(long, conflicts_with = "splice")]
        gateway: bool,
        /// Instead: hold N idle connections pod → pod through the mesh and report each
        /// proxy's memory per connection; JSON to target/bench/idle.json.
        #[arg(long, value_name = "N", conflicts_with_all = ["splice", "gateway"])]
        idle: Option<usize>,
        /// Only the HBONE transports: `mesh` (HTTP/2) and `mesh-quic` on the clean link, and the
        /// lossy-link scenario (no Envoy, no direct or same-node paths); JSON to
        /// target/bench/latest-quic.json. With --idle: the idle connections go over
        /// HBONE/QUIC.
        #[arg(long, conflicts_with = "gateway")]
        quic_only: bool,
    },
    /// Run the cargo-fuzz targets of `fuzz/` (needs `cargo install cargo-fuzz`), each for
    /// `--seconds`, and print executions per target.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (config_yaml, istio_json,
        /// hbone_request, forwarded, http_route_match, state_update, spiffe_san).
        #[arg(long)]
        target: Option<String>,
        /// cargo-fuzz sanitizer: address, leak, memory, thread or none.
        #[arg(long, default_value = "address")]
        sanitizer: String,
    },
    /// A simulated mesh cluster (2 nodes, 6 meshed pods) under sustained mixed load while
    /// faults run (agent kill, proxy upgrade, eBPF upgrade, controller down, certificate
    /// rotation, config churn, a pod killed); exits non-zero on any failure no fault or policy
    /// was meant to cause, or corrupted bytes. JSON to target/soak/latest.json.
    Soak {
        /// Length of the load (the fault schedule scales with it).
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Print the JSON report on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// New connections per second across the cluster (target).
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Idle keep-alive connections across the cluster.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Long-lived checksummed streams across the cluster.
        #[arg(long, default_value_t = 8)]
        streams: usize,
        /// HTTP requests per second per protocol (HTTP/1.1, h2) per client pod.
        #[arg(long, default_value_t = 20)]
        http_rate: u64,
        /// Build and run the release binaries (target/release) instead of the debug ones.
        #[arg(long)]
        release: bool,
        /// Skip setup and the build: use target/debug (target/release) as it is.
        #[arg(long)]
        no_build: bool,
    },
    /// (For the bench's lossy link) accept every packet of NFQUEUE `--queue` in this network
    /// namespace `--delay-us` after it arrived; runs until killed.
    #[command(hide = true)]
    NetemDelay {
        #[arg(long)]
        queue: u16,
        #[arg(long)]
        delay_us: u64,
    },
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu (TCG) and run the kernel-facing
    /// end-to-end tests inside each; print kernel × test → pass/fail/skipped (JSON to
    /// target/kernels/results.json). Downloads are cached in ~/.cache/sidenode/kernels.
    Kernels {
        /// 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Comma-separated test ids (capture, capture-ipv6, original-destination,
        /// program-replace, strict, same-node, hbone, hbone-ipv6, ktls), `all`, or `ci` (the CI subset).
        #[arg(long, default_value = "all")]
        tests: String,
        /// Look for newer kernel packages in the archive even when some are cached.
        #[arg(long)]
        refresh: bool,
        /// Use the binaries as they are (no cargo build).
        #[arg(long)]
        no_build: bool,
        /// Seconds one test may take inside the VM.
        #[arg(long, default_value_t = 900)]
        test_timeout: u64,
        /// The VM's memory (MiB).
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// The VM's CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
    /// Regenerate the generated docs (docs/cli.md from the CLI's definitions); a unit test
    /// fails while the committed copy differs.
    Docs,
    /// Check that mesh-node's modules point one way (no import cycle among the children of any
    /// folder) and print each folder's layers, bottom first.
    Layers,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Test {
            no_soak,
            no_kernels,
            args,
        } => {
            setup::run()?;
            build(false)?;
            let tests = test(&args);
            // The smoke soak and the kernel matrix run even when a test failed; every result
            // counts.
            let soaked = if no_soak {
                Ok(())
            } else {
                soak::run(soak::Opts::smoke())
            };
            let kernels = if no_kernels {
                Ok(true)
            } else {
                kernels::run(kernels::Opts::ci())
            };
            tests?;
            soaked?;
            if !kernels? {
                bail!("the kernel matrix (cargo xtask kernels --tests ci) failed");
            }
            Ok(())
        }
        Cmd::Soak {
            minutes,
            json,
            rate,
            idle,
            streams,
            http_rate,
            release,
            no_build,
        } => {
            if !no_build {
                setup::run()?;
                build(release)?;
            }
            soak::run(soak::Opts {
                minutes,
                json,
                rate,
                idle,
                streams,
                http_rate,
                release,
            })
        }
        Cmd::Cluster { cmd } => cluster::run(cmd),
        Cmd::Demo => {
            setup::run()?;
            build(false)?;
            demo::run()
        }
        Cmd::Bench {
            rounds,
            quick,
            no_build,
            splice,
            gateway,
            idle,
            quic_only,
        } => {
            if !no_build {
                setup::run()?;
                build(true)?;
            }
            if let Some(n) = idle {
                return bench::run_idle(n, quic_only);
            }
            if gateway {
                return bench::run_gateway(rounds, quick);
            }
            bench::run(rounds, quick, splice, quic_only)
        }
        Cmd::Fuzz {
            seconds,
            target,
            sanitizer,
        } => fuzz::run(seconds, target.as_deref(), &sanitizer),
        Cmd::Layers => layers::run(),
        Cmd::NetemDelay { queue, delay_us } => {
            bench::delay_queue(queue, std::time::Duration::from_micros(delay_us))
        }
        Cmd::Kernels {
            kernel,
            tests,
            refresh,
            no_build,
            test_timeout,
            memory,
            cpus,
        } => {
            let ok = kernels::run(kernels::Opts {
                kernel,
                tests,
                refresh,
                no_build,
                test_timeout,
                memory_mb: memory,
                cpus,
            })?;
            if !ok {
                bail!("some kernel tests failed");
            }
            Ok(())
        }
        Cmd::Docs => run_cmd(
            Command::new(env!("CARGO"))
                .current_dir(workspace_root())
                .env("SIDENODE_UPDATE_DOCS", "1")
                .args(["test", "-p", "mesh-node", "--lib", "cli::reference"]),
        ),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The `mesh-node` binary of a debug build.
pub fn mesh_node_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join("mesh-node")
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Builds the default members (all but mesh-ebpf, which mesh-node's build script builds for
/// the bpf target; `--workspace` would try to build it for the host).
fn build(release: bool) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args(["build", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)
}

/// Formatting and lints first (warnings are errors), then every test.
fn test(args: &[String]) -> Result<()> {
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["fmt", "--all", "--check"]),
    )?;
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        // Every test binary runs even after one fails, so the total counts them all. The fuzz
        // targets' checks run here too, briefly and deterministically, on their committed
        // corpus (tests/tests/fuzz_corpus.rs: no cargo-fuzz or nightly needed); the long
        // coverage-guided runs are `cargo xtask fuzz`.
        .args(["test", "--all-targets", "--no-fail-fast"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    // Pass the output through and add up every test binary's result line, so the run ends
    // with one total that counts all of them.
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(what), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("\ntotal: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}
