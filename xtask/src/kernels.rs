//! `cargo xtask kernels`: the kernel-facing end-to-end tests under Debian's own kernels
//! (5.10, 6.1, 6.12), each booted with qemu (TCG: no KVM needed) from an initramfs that holds
//! busybox, iproute2, `mesh-node`, `testpod`, the test binaries and the shared libraries they
//! need. Results come back over the serial console; a table kernel × test is printed and
//! written as JSON to `target/kernels/results.json`.
//!
//! Downloads (`apt-get download` against a sources list of our own, so the host's apt state
//! is untouched) and the initramfs parts are cached in `<cache>/kernels/` (`$SIDENODE_CACHE`,
//! by default `~/.cache/sidenode`): about 85 MB of packages, 40 MB of kernels and modules,
//! apt lists (~50 MB) and one initramfs (~135 MB) rebuilt only when a binary changed; about 300 MB in all. The Debian archive is the
//! only network used, and only when a kernel is not cached yet (or with `--refresh`).

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run_cmd, setup, workspace_root};

/// A kernel of the matrix: the name used on the command line, and the package to find.
pub struct KernelSpec {
    pub name: &'static str,
    /// `apt-cache search --names-only` regex of the image package.
    pub package: &'static str,
    /// Where it comes from (for the docs and messages).
    pub suite: &'static str,
    /// A kernel sidenode does not support: the feature the agent must name when it refuses
    /// to start there. A test that fails with that one-line refusal is the expected result
    /// (`refused`); any other failure is a failure.
    pub refused_for: Option<&'static str>,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        package: r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64-unsigned$",
        suite: "bullseye",
        refused_for: Some("SO_NETNS_COOKIE"),
    },
    KernelSpec {
        name: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
        suite: "bookworm",
        refused_for: None,
    },
    KernelSpec {
        name: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+(deb12|bpo)-cloud-amd64-unsigned$",
        suite: "bookworm(-backports)",
        refused_for: None,
    },
];

/// One end-to-end test run inside the VM.
pub struct VmTest {
    /// The row name in the table.
    pub id: &'static str,
    /// The test binary (`tests/tests/<bin>.rs`).
    pub bin: &'static str,
    /// The exact test name.
    pub filter: &'static str,
    /// Host tools it needs besides ip/nsenter (copied in when the host has them; skipped
    /// with a reason otherwise).
    pub tools: &'static [&'static str],
    /// Run in CI (`--ci`).
    pub ci: bool,
}

pub const TESTS: &[VmTest] = &[
    VmTest {
        id: "capture",
        bin: "capture",
        filter: "enrolled_pod_is_captured_plain_is_not_and_unenroll_stops_capture",
        tools: &[],
        ci: true,
    },
    VmTest {
        id: "capture-ipv6",
        bin: "capture",
        filter: "ipv6_connections_are_captured_too",
        tools: &[],
        ci: false,
    },
    VmTest {
        id: "original-destination",
        bin: "capture",
        filter: "original_destination_right_for_200_concurrent_connections",
        tools: &[],
        ci: false,
    },
    VmTest {
        id: "program-replace",
        bin: "capture",
        filter: "agent_with_another_object_replaces_the_programs_in_place_without_a_gap",
        tools: &[],
        ci: false,
    },
    VmTest {
        id: "strict",
        bin: "peer_auth",
        filter: "strict_drops_plaintext_keeps_mesh_traffic_and_lifts_on_removal",
        tools: &[],
        ci: false,
    },
    VmTest {
        id: "same-node",
        bin: "same_node",
        filter: "same_node_http_meets_the_destination_l7_policy_without_a_tunnel",
        tools: &[],
        ci: false,
    },
    VmTest {
        id: "hbone",
        bin: "hbone",
        filter: "meshed_traffic_is_encrypted_on_the_wire",
        tools: &["tcpdump"],
        ci: false,
    },
    VmTest {
        id: "ktls",
        bin: "ktls",
        filter: "tunnels_use_kernel_tls_and_interoperate_with_userspace_tls",
        tools: &["tcpdump", "curl"],
        ci: false,
    },
    VmTest {
        id: "sockmap",
        bin: "splice",
        filter: "spliced_legs_carry_every_byte_in_order",
        tools: &[],
        ci: false,
    },
    VmTest {
        id: "ztunnel-wire",
        bin: "ztunnel_wire",
        filter: "ztunnel_client_to_sidenode",
        tools: &["openssl", "curl"],
        ci: false,
    },
    VmTest {
        id: "ztunnel-wire-out",
        bin: "ztunnel_wire",
        filter: "sidenode_client_to_ztunnel",
        tools: &["openssl", "curl"],
        ci: false,
    },
    VmTest {
        id: "hbone-ipv6",
        bin: "hbone",
        filter: "ipv6_destination_of_a_meshed_pod_goes_through_its_tunnel",
        tools: &[],
        ci: true,
    },
];

pub struct Opts {
    /// `5.10`, `6.1`, `6.12` or `all`.
    pub kernel: String,
    /// Test ids (comma-separated), `all`, or `ci`.
    pub tests: String,
    pub refresh: bool,
    pub no_build: bool,
    /// Seconds a test may take inside the VM.
    pub test_timeout: u64,
    pub memory_mb: u32,
    pub cpus: u32,
}

impl Opts {
    /// What `cargo xtask test` runs: the CI subset on every kernel, with the binaries the
    /// test run just built.
    pub fn ci() -> Opts {
        Opts {
            kernel: "all".into(),
            tests: "ci".into(),
            refresh: false,
            no_build: false,
            test_timeout: 600,
            memory_mb: 2048,
            cpus: 2,
        }
    }
}

/// The outcome of one test on one kernel.
#[derive(Clone, Debug)]
enum Outcome {
    Pass(f64),
    Fail(f64, String),
    Skipped(String),
    /// On an unsupported kernel: the agent refused to start with the expected one line.
    Refused(f64, String),
}

impl Outcome {
    fn cell(&self) -> String {
        match self {
            Outcome::Pass(s) => format!("pass {s:.0}s"),
            Outcome::Fail(s, _) => format!("FAIL {s:.0}s"),
            Outcome::Skipped(_) => "skipped".into(),
            Outcome::Refused(..) => "refused".into(),
        }
    }
    fn json(&self) -> serde_json::Value {
        match self {
            Outcome::Pass(s) => serde_json::json!({"result": "pass", "seconds": s}),
            Outcome::Fail(s, why) => {
                serde_json::json!({"result": "fail", "seconds": s, "reason": why})
            }
            Outcome::Skipped(why) => serde_json::json!({"result": "skipped", "reason": why}),
            Outcome::Refused(s, why) => {
                serde_json::json!({"result": "refused", "seconds": s, "reason": why})
            }
        }
    }
}

pub fn cache() -> PathBuf {
    setup::cache_dir().join("kernels")
}

pub fn run(o: Opts) -> Result<bool> {
    let started = Instant::now();
    let kernels: Vec<&KernelSpec> = if o.kernel == "all" {
        KERNELS.iter().collect()
    } else {
        let k = KERNELS
            .iter()
            .find(|k| k.name == o.kernel)
            .with_context(|| {
                format!(
                    "unknown kernel `{}`: one of {}, or all",
                    o.kernel,
                    KERNELS
                        .iter()
                        .map(|k| k.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        vec![k]
    };
    let tests: Vec<&VmTest> = match o.tests.as_str() {
        "all" => TESTS.iter().collect(),
        "ci" => TESTS.iter().filter(|t| t.ci).collect(),
        list => list
            .split(',')
            .map(|id| {
                TESTS.iter().find(|t| t.id == id.trim()).with_context(|| {
                    format!(
                        "unknown test `{id}`: one of {}, all or ci",
                        TESTS.iter().map(|t| t.id).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    for tool in ["qemu-system-x86_64", "apt-get", "dpkg-deb", "xz", "strip"] {
        if which(tool).is_none() {
            bail!("{tool} not found: run `cargo xtask setup` (installs qemu-system-x86)");
        }
    }
    let cache = cache();
    std::fs::create_dir_all(cache.join("debs"))?;
    let out_dir = workspace_root().join("target/kernels");
    std::fs::create_dir_all(&out_dir)?;

    // 1. Binaries.
    let bins = test_binaries(&tests, o.no_build)?;
    // 2. Packages (cached).
    let apt = Apt::new(&cache)?;
    let busybox_deb = apt.fetch(r"^busybox-static$", o.refresh)?;
    let mut images = Vec::new();
    for k in &kernels {
        let deb = apt
            .fetch(k.package, o.refresh)
            .with_context(|| format!("kernel {} ({})", k.name, k.suite))?;
        images.push((k, unpack_kernel(&cache, &deb)?));
    }
    let prep = started.elapsed();
    // 3. The common initramfs part (cached).
    let (common, skipped) = common_initramfs(&cache, &busybox_deb, &bins, &tests)?;

    // 4. Boot each kernel.
    let mut results: BTreeMap<&str, BTreeMap<&str, Outcome>> = BTreeMap::new();
    let mut boots = Vec::new();
    let mut releases = BTreeMap::new();
    for (k, img) in &images {
        let initrd = kernel_initramfs(&cache, &common, img)?;
        let run_ids: Vec<&str> = tests
            .iter()
            .filter(|t| !skipped.contains_key(t.id))
            .map(|t| t.id)
            .collect();
        let log = out_dir.join(format!("{}.log", k.name));
        eprintln!(
            "kernels: booting {} ({}) with tests {} (serial log {})",
            k.name,
            img.release,
            run_ids.join(","),
            log.display()
        );
        let t0 = Instant::now();
        let mut booted = boot(img, &initrd, &run_ids, &o, &log);
        // A guest that dies before its userspace starts (no release line on the console) ran
        // no test: qemu's TCG emulation sometimes crashes an early boot (an Oops in
        // `sched_clock_cpu` on Debian's 6.12, one boot in tens). That says nothing about the
        // tests, so such a boot is tried once more; its log is kept beside the second one's.
        if matches!(&booted, Ok(out) if !out.contains_key("__release")) {
            let first = log.with_extension("boot1.log");
            let _ = std::fs::rename(&log, &first);
            eprintln!(
                "kernels: {} died before userspace (log {}); booting it once more",
                k.name,
                first.display()
            );
            booted = boot(img, &initrd, &run_ids, &o, &log);
        }
        // The per-kernel archive is the common one plus a few modules: not worth keeping.
        let _ = std::fs::remove_file(&initrd);
        let mut outcomes = booted?;
        boots.push((k.name, t0.elapsed()));
        if let Some(r) = outcomes.remove("__release") {
            releases.insert(k.name, r);
        }
        let row = results.entry(k.name).or_default();
        for t in &tests {
            let out = if let Some(why) = skipped.get(t.id) {
                Outcome::Skipped(why.clone())
            } else {
                match outcomes.remove(t.id) {
                    Some(Outcome::Fail(secs, why)) if expected_refusal(k, &why) => {
                        Outcome::Refused(secs, why)
                    }
                    Some(o) => o,
                    None => Outcome::Fail(
                        0.0,
                        "no result on the serial console (VM died or timed out; see the log)"
                            .into(),
                    ),
                }
            };
            row.insert(t.id, out);
        }
    }

    // 5. Report.
    let mut ok = true;
    let w = tests.iter().map(|t| t.id.len()).max().unwrap_or(4).max(4);
    print!("{:w$}", "test");
    for (k, _) in &images {
        print!("  {:>12}", k.name);
    }
    println!();
    for t in &tests {
        print!("{:w$}", t.id);
        for (k, _) in &images {
            let cell = results[k.name][t.id].cell();
            print!("  {cell:>12}");
        }
        println!();
    }
    for (k, _) in &images {
        for t in &tests {
            match &results[k.name][t.id] {
                Outcome::Fail(_, why) => {
                    ok = false;
                    println!("{} {}: FAIL: {why}", k.name, t.id);
                }
                Outcome::Skipped(why) => println!("{} {}: skipped: {why}", k.name, t.id),
                Outcome::Refused(_, why) => {
                    println!("{} {}: refused as expected: {why}", k.name, t.id)
                }
                Outcome::Pass(_) => {}
            }
        }
    }
    let total = started.elapsed();
    for (k, d) in &boots {
        println!("{k}: {:.0} s in the VM", d.as_secs_f64());
    }
    println!(
        "preparation (build, downloads, unpacking) {:.0} s; total {:.0} s",
        prep.as_secs_f64(),
        total.as_secs_f64()
    );
    let json = serde_json::json!({
        "kernels": images.iter().map(|(k, img)| serde_json::json!({
            "name": k.name,
            "package": img.package,
            "release": releases.get(k.name).and_then(|o| match o { Outcome::Skipped(r) => Some(r.clone()), _ => None }),
            "results": results[k.name].iter().map(|(t, o)| (t.to_string(), o.json())).collect::<serde_json::Map<_, _>>(),
            "vm_seconds": boots.iter().find(|(n, _)| *n == k.name).map(|(_, d)| d.as_secs_f64()),
        })).collect::<Vec<_>>(),
        "total_seconds": total.as_secs_f64(),
    });
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("results: {}", path.display());
    Ok(ok)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The binaries the VM needs: `mesh-node`, `testpod` and one executable per test file.
struct Bins {
    mesh_node: PathBuf,
    testpod: PathBuf,
    /// test file name → executable.
    tests: BTreeMap<String, PathBuf>,
}

fn test_binaries(tests: &[&VmTest], no_build: bool) -> Result<Bins> {
    let root = workspace_root();
    if !no_build {
        run_cmd(Command::new(env!("CARGO")).current_dir(&root).args([
            "build",
            "-p",
            "mesh-node",
            "--bin",
            "mesh-node",
        ]))?;
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(&root).args([
        "test",
        "-p",
        "sidenode-tests",
        "--no-run",
        "--message-format=json",
    ]);
    let mut files: Vec<&str> = tests.iter().map(|t| t.bin).collect();
    files.sort();
    files.dedup();
    for f in &files {
        cmd.args(["--test", f]);
    }
    if no_build {
        cmd.arg("--offline");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed: {}", out.status);
    }
    let mut found = BTreeMap::new();
    let mut testpod = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (
            v["executable"].as_str(),
            v["target"]["name"].as_str().map(str::to_string),
        ) else {
            continue;
        };
        let kinds = v["target"]["kind"].to_string();
        if kinds.contains("\"test\"") {
            found.insert(name, PathBuf::from(exe));
        } else if name == "testpod" {
            testpod = Some(PathBuf::from(exe));
        }
    }
    let testpod = testpod
        .or_else(|| Some(crate::mesh_node_bin().with_file_name("testpod")))
        .filter(|p| p.exists())
        .context("testpod not built (cargo build -p sidenode-tests --bin testpod)")?;
    for f in &files {
        if !found.contains_key(*f) {
            bail!("cargo did not report the test binary of tests/tests/{f}.rs");
        }
    }
    let mesh_node = crate::mesh_node_bin();
    if !mesh_node.exists() {
        bail!(
            "{} not found: cargo build -p mesh-node",
            mesh_node.display()
        );
    }
    Ok(Bins {
        mesh_node,
        testpod,
        tests: found,
    })
}

/// `apt-get` with a sources list, lists and package cache of our own.
struct Apt {
    dir: PathBuf,
    debs: PathBuf,
}

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye-updates main
";

impl Apt {
    fn new(cache: &Path) -> Result<Apt> {
        let dir = cache.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let sources = dir.join("sources.list");
        if std::fs::read_to_string(&sources).ok().as_deref() != Some(SOURCES) {
            std::fs::write(&sources, SOURCES)?;
            // Other suites: the lists must be fetched again.
            let _ = std::fs::remove_file(dir.join("updated"));
        }
        Ok(Apt {
            debs: cache.join("debs"),
            dir,
        })
    }

    fn cmd(&self, program: &str) -> Command {
        let d = &self.dir;
        let mut c = Command::new(program);
        for (k, v) in [
            ("Dir::Etc::SourceList", d.join("sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::State::Lists", d.join("lists")),
            ("Dir::Cache", d.join("cache")),
            ("Dir::State::status", "/dev/null".into()),
            ("APT::Sandbox::User", "root".into()),
        ] {
            c.arg("-o").arg(format!("{k}={}", v.display()));
        }
        c
    }

    fn update(&self) -> Result<()> {
        eprintln!(
            "kernels: apt-get update (own sources list in {})",
            self.dir.display()
        );
        let out = self
            .cmd("apt-get")
            .args(["-q", "update"])
            .output()
            .context("apt-get update")?;
        if !out.status.success() {
            bail!(
                "apt-get update failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::write(self.dir.join("updated"), "")?;
        Ok(())
    }

    /// The newest package matching `regex` as a cached `.deb`: taken from the cache when one
    /// is there (no network), downloaded otherwise (newest first, older ones when a mirror
    /// does not have it).
    fn fetch(&self, regex: &str, refresh: bool) -> Result<PathBuf> {
        if !refresh && let Some(p) = self.cached(regex)? {
            return Ok(p);
        }
        if refresh || !self.dir.join("updated").exists() {
            self.update()?;
        }
        let out = self
            .cmd("apt-cache")
            .args(["search", "--names-only", regex])
            .output()
            .context("apt-cache search")?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(str::to_string)
            .collect();
        names.sort_by_key(|n| version_key(n));
        names.dedup();
        if names.is_empty() {
            bail!("no package matching {regex} in the Debian archive (sources: {SOURCES})");
        }
        let mut errors = Vec::new();
        for name in names.iter().rev() {
            eprintln!("kernels: apt-get download {name}");
            let out = self
                .cmd("apt-get")
                .current_dir(&self.debs)
                .args(["-q", "download", name])
                .output()
                .context("apt-get download")?;
            if out.status.success()
                && let Some(p) = self.cached(regex)?
            {
                return Ok(p);
            }
            errors.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        bail!("could not download {regex}: {}", errors.join("; "))
    }

    /// The newest cached `.deb` whose package name matches `regex` (`name_version_arch.deb`).
    fn cached(&self, regex: &str) -> Result<Option<PathBuf>> {
        let mut found: Vec<(Vec<u64>, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&self.debs)? {
            let p = e?.path();
            let Some(file) = p.file_name().and_then(|f| f.to_str()) else {
                continue;
            };
            let Some(name) = file.strip_suffix(".deb").and_then(|f| f.split('_').next()) else {
                continue;
            };
            if regex_match(regex, name) {
                found.push((version_key(name), p.clone()));
            }
        }
        found.sort();
        Ok(found.pop().map(|(_, p)| p))
    }
}

/// The numbers in a package name, for ordering (`6.1.0-57` after `6.1.0-9`).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Enough of a regex for [`KERNELS`]' patterns: `^…$` with `\.`, `[0-9]+` and `(a|b)`.
/// Matched with a tiny backtracking matcher rather than a dependency.
fn regex_match(re: &str, s: &str) -> bool {
    let re = re.trim_start_matches('^').trim_end_matches('$');
    fn m(re: &[u8], s: &[u8]) -> bool {
        if re.is_empty() {
            return s.is_empty();
        }
        if re.starts_with(b"[0-9]+") {
            let rest = &re[6..];
            let mut i = 0;
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
                if m(rest, &s[i..]) {
                    return true;
                }
            }
            return false;
        }
        if re[0] == b'(' {
            let Some(close) = re.iter().position(|c| *c == b')') else {
                return false;
            };
            let rest = &re[close + 1..];
            return re[1..close]
                .split(|c| *c == b'|')
                .any(|alt| s.starts_with(alt) && m(rest, &s[alt.len()..]));
        }
        let (lit, skip) = if re[0] == b'\\' && re.len() > 1 {
            (re[1], 2)
        } else {
            (re[0], 1)
        };
        !s.is_empty() && s[0] == lit && m(&re[skip..], &s[1..])
    }
    m(re.as_bytes(), s.as_bytes())
}

/// A kernel unpacked from its package: the image and the modules the tests need.
struct KernelImage {
    package: String,
    release: String,
    vmlinuz: PathBuf,
    /// Modules in load order (dependencies first), uncompressed.
    modules: Vec<PathBuf>,
}

/// Modules the tests need that Debian's cloud kernels build as modules (`tls`: the TLS ULP
/// for the `ktls` test, with the AES-GCM pieces it asks the crypto API for at `TLS_TX`/`TLS_RX`
/// time — loaded on demand through modprobe on a real system, which the VM has not; a kernel
/// without one skips it).
const MODULES: &[&str] = &["veth", "bridge", "tls", "gcm", "ghash_generic", "ctr"];

fn unpack_kernel(cache: &Path, deb: &Path) -> Result<KernelImage> {
    let package = deb
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.split('_').next())
        .context("package file name")?
        .to_string();
    // The module set is part of the folder's name: a new module unpacks the kernel again
    // (from the cached package) instead of reusing a folder without it.
    let dir = cache
        .join("kernel")
        .join(format!("{package}+{}", MODULES.join("+")));
    let done = dir.join("ready");
    if !done.exists() {
        let tmp = cache.join("kernel").join(format!(
            "{package}+{}.tmp.{}",
            MODULES.join("+"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("modules"))?;
        let boot = tmp.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("no vmlinuz in {}", deb.display()))?;
        let release = vmlinuz
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix("vmlinuz-"))
            .context("vmlinuz name")?
            .to_string();
        std::fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
        let mods = tmp.join("lib/modules").join(&release);
        let index = module_index(&mods)?;
        let order = module_order(&index, MODULES)?;
        let mut list = String::new();
        for (i, rel) in order.iter().enumerate() {
            let src = rel.clone();
            let base = rel
                .file_name()
                .and_then(|f| f.to_str())
                .context("module name")?;
            let name = base
                .trim_end_matches(".xz")
                .trim_end_matches(".zst")
                .to_string();
            let dst = dir.join("modules").join(format!("{i:02}-{name}"));
            std::fs::write(&dst, read_module(&src)?)?;
            list.push_str(&format!("{i:02}-{name}\n"));
        }
        std::fs::write(dir.join("release"), &release)?;
        std::fs::write(dir.join("modules.list"), list)?;
        std::fs::remove_dir_all(&tmp)?;
        std::fs::write(&done, "")?;
    }
    let release = std::fs::read_to_string(dir.join("release"))?;
    let modules = std::fs::read_to_string(dir.join("modules.list"))?
        .lines()
        .map(|l| dir.join("modules").join(l))
        .collect();
    Ok(KernelImage {
        package,
        release,
        vmlinuz: dir.join("vmlinuz"),
        modules,
    })
}

/// Every module file under `dir`, by module name (`-` read as `_`, as the kernel does).
fn module_index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(f) = p.file_name().and_then(|f| f.to_str())
                && let Some((name, _)) = f.split_once(".ko")
            {
                index.insert(name.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(index)
}

/// The `depends=` of a module's `.modinfo` (read from the file, decompressing if needed).
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let data = read_module(path)?;
    let key = b"depends=";
    let Some(at) = data.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let rest = &data[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect())
}

/// A module's bytes, uncompressed.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("{tool} -dc {name}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {name}: {}", out.status);
    }
    Ok(out.stdout)
}

/// The module files to load for `wanted`, dependencies first, each once (modules not in the
/// index are built in: nothing to load).
fn module_order(index: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    fn visit(
        index: &BTreeMap<String, PathBuf>,
        name: &str,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        if depth > 16 {
            bail!("module dependencies of {name} loop");
        }
        let Some(p) = index.get(name) else {
            return Ok(());
        };
        if order.contains(p) {
            return Ok(());
        }
        for d in module_depends(p)? {
            visit(index, &d, order, depth + 1)?;
        }
        order.push(p.clone());
        Ok(())
    }
    let mut order = Vec::new();
    for w in wanted {
        visit(index, w, &mut order, 0)?;
    }
    Ok(order)
}

/// The init of the VM: mounts, modules, then each test named on the kernel command line
/// (`sn.tests=a,b`), with markers the host parses.
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=0
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /sys/fs/cgroup /sys/fs/bpf /tmp /run /var /root
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /run/netns
ln -s /run /var/run
ln -s /proc/self/fd /dev/fd 2>/dev/null
ip link set lo up
echo "SNK-RELEASE $(uname -r)"
for m in $(cat /kmod/list); do
  insmod /kmod/$m || echo "SNK-MODULE-FAILED $m"
done
TESTS=$(sed -n 's/.* sn\.tests=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
TIMEOUT=$(sed -n 's/.* sn\.timeout=\([0-9]*\).*/\1/p' /proc/cmdline)
for id in $TESTS; do
  line=$(grep "^$id " /sn/tests)
  set -- $line
  start=$(cut -d' ' -f1 /proc/uptime)
  echo "SNK-START $id"
  timeout -s KILL ${TIMEOUT:-900} /sn/bin/$2 --exact $3 --test-threads=1 --nocapture >/tmp/out 2>&1
  rc=$?
  end=$(cut -d' ' -f1 /proc/uptime)
  sed 's/^/SNK-OUT /' /tmp/out | tail -n 60
  echo "SNK-END $id $rc $start $end"
done
echo "SNK-DONE"
sync
poweroff -f
"#;

/// Copies `src` into the staging root at `dst` (relative to the root), with its libraries
/// (ldd) and, for ELF executables, without debug info.
fn stage_binary(root: &Path, src: &Path, dst: &Path, strip: bool) -> Result<()> {
    let to = root.join(dst.strip_prefix("/").unwrap_or(dst));
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p)?;
    }
    if strip {
        run_cmd(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&to)
                .arg(src),
        )?;
    } else {
        std::fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
    }
    let out = Command::new("ldd").arg(src).output().context("ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`.
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if !path.starts_with('/') {
            continue;
        }
        let lib = Path::new(path);
        let at = root.join(path.trim_start_matches('/'));
        if at.exists() {
            continue;
        }
        if let Some(p) = at.parent() {
            std::fs::create_dir_all(p)?;
        }
        // Resolve symlinks: copy the file under the name the loader asks for.
        std::fs::copy(lib, &at).with_context(|| format!("copying {path}"))?;
    }
    Ok(())
}

/// The part of the initramfs every kernel shares: busybox, tools, binaries, libraries, init.
/// Cached under a key of its inputs; returns the archive and the tests skipped for a missing
/// tool.
fn common_initramfs(
    cache: &Path,
    busybox_deb: &Path,
    bins: &Bins,
    tests: &[&VmTest],
) -> Result<(PathBuf, BTreeMap<&'static str, String>)> {
    let mut skipped = BTreeMap::new();
    let mut tools: Vec<(&str, PathBuf)> = Vec::new();
    for tool in ["ip", "nsenter"] {
        let p = which(tool).with_context(|| format!("{tool} not found on this host"))?;
        tools.push((tool, p));
    }
    for t in tests {
        for tool in t.tools {
            match which(tool) {
                Some(p) => {
                    if !tools.iter().any(|(n, _)| n == tool) {
                        tools.push((tool, p));
                    }
                }
                None => {
                    skipped.insert(
                        t.id,
                        format!("needs {tool}, which this host lacks (cargo xtask setup)"),
                    );
                }
            }
        }
    }
    let mut inputs: Vec<PathBuf> = vec![
        busybox_deb.to_path_buf(),
        bins.mesh_node.clone(),
        bins.testpod.clone(),
    ];
    inputs.extend(bins.tests.values().cloned());
    inputs.extend(tools.iter().map(|(_, p)| p.clone()));
    let mut key = INIT.to_string();
    for p in &inputs {
        let m = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        key.push_str(&format!(
            "{}:{}:{:?}\n",
            p.display(),
            m.len(),
            m.modified().ok()
        ));
    }
    for t in tests {
        key.push_str(&format!("{} {} {}\n", t.id, t.bin, t.filter));
    }
    // Bumped when what is staged besides the binaries changes (e.g. openssl.cnf).
    key.push_str("layout 2\n");
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    };
    let dir = cache.join("initramfs");
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join(format!("common-{hash:016x}.cpio"));
    if archive.exists() {
        return Ok((archive, skipped));
    }
    // Only the newest is kept.
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("common-"))
        {
            let _ = std::fs::remove_file(p);
        }
    }
    let t0 = Instant::now();
    let root = dir.join("staging");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    // busybox and its applets.
    let bb = dir.join("busybox.tmp");
    let _ = std::fs::remove_dir_all(&bb);
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(busybox_deb).arg(&bb))?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "sn/bin", "etc", "kmod",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(bb.join("bin/busybox"), root.join("bin/busybox"))?;
    std::fs::remove_dir_all(&bb)?;
    let list = Command::new(root.join("bin/busybox"))
        .arg("--list-full")
        .output()
        .context("busybox --list-full")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let at = root.join(applet);
        if applet.is_empty() || at.exists() {
            continue;
        }
        if let Some(p) = at.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &at)?;
    }
    // Host tools replace busybox's applets of the same name (iproute2's ip, util-linux's
    // nsenter: the harness uses options busybox lacks).
    for (name, p) in &tools {
        for d in ["bin", "sbin", "usr/bin", "usr/sbin"] {
            let _ = std::fs::remove_file(root.join(d).join(name));
        }
        stage_binary(&root, p, &Path::new("/usr/bin").join(name), false)?;
    }
    // mesh-node and testpod where the tests look for them (paths compiled into the test
    // binaries), the tests under /sn/bin.
    stage_binary(&root, &bins.mesh_node, &bins.mesh_node, true)?;
    stage_binary(&root, &bins.testpod, &bins.testpod, true)?;
    let mut table = String::new();
    for t in tests {
        if skipped.contains_key(t.id) {
            continue;
        }
        let exe = &bins.tests[t.bin];
        let dst = Path::new("/sn/bin").join(t.bin);
        if !root.join(dst.strip_prefix("/")?).exists() {
            stage_binary(&root, exe, &dst, true)?;
        }
        table.push_str(&format!("{} {} {}\n", t.id, t.bin, t.filter));
    }
    std::fs::write(root.join("sn/tests"), table)?;
    // tcpdump drops to its own user after opening the capture.
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:101:101::/nonexistent:/bin/false\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\ntcpdump:x:101:\n")?;
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files\n")?;
    // `openssl req` (the ztunnel-wire test's certificates) reads its configuration file.
    let cnf = Path::new("/usr/lib/ssl/openssl.cnf");
    if cnf.exists() && root.join("usr/bin/openssl").exists() {
        std::fs::create_dir_all(root.join("usr/lib/ssl"))?;
        std::fs::copy(cnf, root.join("usr/lib/ssl/openssl.cnf"))?;
    }
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    }
    let tmp = archive.with_extension("tmp");
    cpio::write_tree(&root, &tmp)?;
    std::fs::rename(&tmp, &archive)?;
    std::fs::remove_dir_all(&root)?;
    eprintln!(
        "kernels: initramfs {} ({} MB) built in {:.0} s",
        archive.display(),
        std::fs::metadata(&archive)?.len() >> 20,
        t0.elapsed().as_secs_f64()
    );
    Ok((archive, skipped))
}

/// The common part followed by the kernel's modules (the kernel unpacks concatenated
/// archives in order).
fn kernel_initramfs(cache: &Path, common: &Path, img: &KernelImage) -> Result<PathBuf> {
    let out = cache
        .join("initramfs")
        .join(format!("{}.cpio", img.package));
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut list = String::new();
    for m in &img.modules {
        let name = m.file_name().and_then(|f| f.to_str()).context("module")?;
        entries.push((format!("kmod/{name}"), std::fs::read(m)?));
        list.push_str(name);
        list.push('\n');
    }
    entries.push(("kmod/list".into(), list.into_bytes()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
    std::io::copy(&mut std::fs::File::open(common)?, &mut f)?;
    cpio::write_files(&mut f, &entries)?;
    f.flush()?;
    Ok(out)
}

/// Boots `img` and runs `tests`; outcomes by test id (and `__release`: the kernel's `uname -r`
/// as a `Skipped` text, a small abuse to carry it back).
fn boot(
    img: &KernelImage,
    initrd: &Path,
    tests: &[&str],
    o: &Opts,
    log: &Path,
) -> Result<BTreeMap<String, Outcome>> {
    let append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init sn.tests={} sn.timeout={}",
        tests.join(","),
        o.test_timeout
    );
    // `cx16=off`: Debian 12's qemu 7.2 TCG mis-emulates `cmpxchg16b` with a segment prefix
    // (EFLAGS come back holding a pointer), which 6.12's SLUB fast path (`this_cpu_cmpxchg128`)
    // uses on every allocation: about one boot in three double-faulted in
    // `kmem_cache_alloc_noprof` (CI run of 43d9d17). Without CX16 the kernel takes SLUB's
    // locked path; 12 of 12 boots passed (also with `la57=off` or `thread=single` it did not).
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max,cx16=off",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-m", &o.memory_mb.to_string()])
        .args(["-smp", &o.cpus.to_string()])
        .arg("-kernel")
        .arg(&img.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let pid = child.id();
    // The whole boot's deadline: every test's timeout plus boot and slack.
    let limit = Duration::from_secs(o.test_timeout * tests.len() as u64 + 300);
    let watchdog = std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: kill(pid, 0) only checks the process exists.
            if unsafe { libc_kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        // SAFETY: our own child's pid.
        unsafe { libc_kill(pid as i32, 9) };
    });
    let stdout = child.stdout.take().context("qemu stdout")?;
    let mut logf = std::fs::File::create(log)?;
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line?;
        logf.write_all(&line)?;
        logf.write_all(b"\n")?;
        let line = String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_string();
        // Markers may follow kernel output on the same line.
        let Some(at) = line.find("SNK-") else {
            continue;
        };
        let m = &line[at..];
        if let Some(r) = m.strip_prefix("SNK-RELEASE ") {
            out.insert("__release".into(), Outcome::Skipped(r.trim().into()));
            eprintln!("kernels: {} booted ({})", img.package, r.trim());
        } else if let Some(mname) = m.strip_prefix("SNK-MODULE-FAILED ") {
            eprintln!("kernels: insmod {mname} failed");
        } else if let Some(id) = m.strip_prefix("SNK-START ") {
            eprintln!("kernels: {} {} ...", img.package, id.trim());
            current = Some((id.trim().to_string(), Vec::new()));
        } else if let Some(o) = m.strip_prefix("SNK-OUT ") {
            if let Some((_, lines)) = current.as_mut() {
                lines.push(o.to_string());
            }
        } else if let Some(end) = m.strip_prefix("SNK-END ") {
            let f: Vec<&str> = end.split_whitespace().collect();
            let (Some(id), Some(rc)) = (f.first(), f.get(1)) else {
                continue;
            };
            let secs = match (
                f.get(2).and_then(|s| s.parse::<f64>().ok()),
                f.get(3).and_then(|s| s.parse::<f64>().ok()),
            ) {
                (Some(a), Some(b)) => b - a,
                _ => 0.0,
            };
            let lines = current.take().map(|(_, l)| l).unwrap_or_default();
            let outcome = if *rc == "0" && lines.iter().any(|l| l.contains("1 passed")) {
                Outcome::Pass(secs)
            } else {
                Outcome::Fail(secs, failure_reason(rc, &lines))
            };
            eprintln!("kernels: {} {} -> {}", img.package, id, outcome.cell());
            out.insert(id.to_string(), outcome);
        } else if m.starts_with("SNK-DONE") {
            break;
        }
    }
    let _ = child.wait();
    let _ = watchdog.join();
    Ok(out)
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// One line on why a test failed: the test's own error, a panic message, or the exit code.
/// Did a test on an unsupported kernel fail only because the agent refused to start, naming
/// the missing feature (the clear refusal of `kernel::probe`)?
fn expected_refusal(k: &KernelSpec, why: &str) -> bool {
    k.refused_for
        .is_some_and(|feature| why.contains("lacks") && why.contains(feature))
}

fn failure_reason(rc: &str, lines: &[String]) -> String {
    if rc == "137" {
        return "killed after the per-test timeout (--test-timeout)".into();
    }
    // The agent's refusal on an unsupported kernel (`kernel::probe`) is the root cause of
    // whatever the test reports: name it. Else libtest prints `test NAME ... ` and then the
    // test's `Error: …` on the same line.
    let pick = lines
        .iter()
        .find(|l| l.contains("this kernel (") && l.contains(" lacks "))
        .map(|l| l.as_str())
        .or_else(|| {
            lines
                .iter()
                .find_map(|l| l.find("Error: ").map(|at| &l[at..]))
        })
        .or_else(|| {
            lines
                .iter()
                .find(|l| l.contains("panicked at"))
                .map(|l| l.as_str())
        })
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.as_str())
        });
    match pick {
        Some(l) => {
            let l = l.trim();
            let mut s: String = l.chars().take(300).collect();
            if l.len() > s.len() {
                s.push('…');
            }
            format!("exit {rc}: {s}")
        }
        None => format!("exit {rc}, no output"),
    }
}

/// A minimal `newc` cpio writer (what the kernel's initramfs unpacker reads).
mod cpio {
    use anyhow::{Context, Result};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn header(w: &mut impl Write, ino: u32, mode: u32, size: u32, name: &str) -> Result<()> {
        let namesize = name.len() + 1;
        write!(
            w,
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
            0, 0, 1, 0, 0, 0, 0, 0, 0
        )?;
        w.write_all(name.as_bytes())?;
        w.write_all(&[0])?;
        pad(w, 110 + namesize)?;
        Ok(())
    }

    fn pad(w: &mut impl Write, len: usize) -> Result<()> {
        let n = (4 - len % 4) % 4;
        w.write_all(&[0u8; 3][..n])?;
        Ok(())
    }

    fn entry(w: &mut impl Write, ino: u32, mode: u32, name: &str, data: &[u8]) -> Result<()> {
        header(w, ino, mode, data.len() as u32, name)?;
        w.write_all(data)?;
        pad(w, data.len())
    }

    fn trailer(w: &mut impl Write) -> Result<()> {
        header(w, 0, 0, 0, "TRAILER!!!")
    }

    /// Every file, folder and symlink under `root`, as an archive at `out`.
    pub fn write_tree(root: &Path, out: &Path) -> Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
        let mut ino = 1u32;
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let rel = p
                    .strip_prefix(root)
                    .context("path under root")?
                    .to_string_lossy()
                    .to_string();
                let m = std::fs::symlink_metadata(&p)?;
                ino += 1;
                if m.file_type().is_symlink() {
                    let target = std::fs::read_link(&p)?;
                    entry(
                        &mut w,
                        ino,
                        0o120777,
                        &rel,
                        target.to_string_lossy().as_bytes(),
                    )?;
                } else if m.is_dir() {
                    entry(&mut w, ino, 0o040755, &rel, &[])?;
                    stack.push(p);
                } else {
                    let data = std::fs::read(&p)?;
                    entry(&mut w, ino, 0o100000 | (m.mode() & 0o7777), &rel, &data)?;
                }
            }
        }
        trailer(&mut w)?;
        w.flush()?;
        Ok(())
    }

    /// Regular files (parent folders must exist in an earlier archive or be listed first).
    pub fn write_files(w: &mut impl Write, files: &[(String, Vec<u8>)]) -> Result<()> {
        entry(w, 900_000, 0o040755, "kmod", &[])?;
        for (i, (name, data)) in files.iter().enumerate() {
            entry(w, 900_001 + i as u32, 0o100644, name, data)?;
        }
        trailer(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_patterns_match_the_archive_names() {
        let k = |n: &str| KERNELS.iter().find(|k| k.name == n).expect("test").package;
        assert!(regex_match(
            k("5.10"),
            "linux-image-5.10.0-32-cloud-amd64-unsigned"
        ));
        assert!(!regex_match(
            k("5.10"),
            "linux-image-5.10.0-32-cloud-amd64-dbg"
        ));
        assert!(regex_match(
            k("6.1"),
            "linux-image-6.1.0-57-cloud-amd64-unsigned"
        ));
        assert!(!regex_match(
            k("6.1"),
            "linux-image-6.1.0-0.deb11.48-cloud-amd64-unsigned"
        ));
        assert!(regex_match(
            k("6.12"),
            "linux-image-6.12.118+deb12-cloud-amd64-unsigned"
        ));
        assert!(!regex_match(
            k("6.12"),
            "linux-image-6.1.0-57-cloud-amd64-unsigned"
        ));
        assert!(regex_match(r"^busybox-static$", "busybox-static"));
        assert!(version_key("linux-image-6.1.0-57-x") > version_key("linux-image-6.1.0-9-x"));
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let t = std::env::temp_dir().join(format!("sn-kmod-{}", std::process::id()));
        std::fs::create_dir_all(t.join("net")).expect("test");
        let module = |name: &str, depends: &str| {
            let body = format!("\0license=GPL\0depends={depends}\0name={name}\0");
            std::fs::write(t.join("net").join(format!("{name}.ko")), body).expect("test");
        };
        module("veth", "");
        module("bridge", "stp,llc");
        module("stp", "llc");
        module("llc", "");
        let index = module_index(&t).expect("test");
        let order = module_order(&index, &["veth", "bridge", "tls"]).expect("test");
        let names: Vec<_> = order
            .iter()
            .map(|p| {
                p.file_name()
                    .expect("test")
                    .to_str()
                    .expect("test")
                    .to_string()
            })
            .collect();
        std::fs::remove_dir_all(&t).expect("test");
        assert_eq!(names, ["veth.ko", "llc.ko", "stp.ko", "bridge.ko"]);
    }

    #[test]
    fn only_the_named_refusal_on_an_unsupported_kernel_is_expected() {
        let old = &KERNELS[0];
        assert_eq!(old.name, "5.10");
        let refusal = "exit 1: Error: agent exited: this kernel (Linux 5.10.0-32-cloud-amd64) \
                       lacks SO_NETNS_COOKIE socket option (pod enrollment) (Linux >= 5.14)";
        assert!(expected_refusal(old, refusal));
        assert!(!expected_refusal(
            old,
            "exit 101: Error: timed out waiting for agent ready"
        ));
        assert!(!expected_refusal(&KERNELS[1], refusal), "6.1 is supported");
    }

    #[test]
    fn failure_reasons_name_the_error() {
        let lines = vec![
            "running 1 test".to_string(),
            "Error: the agent refused: this kernel lacks X (Linux >= 5.7)".to_string(),
            "test t ... FAILED".to_string(),
        ];
        assert!(failure_reason("101", &lines).contains("lacks X"));
        assert!(failure_reason("137", &lines).contains("timeout"));
    }
}
