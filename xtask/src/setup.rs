//! Installs what the build and the tests need, and does nothing for what is already there.
//!
//! Rust eBPF is built with Debian's `rustc-web` (which ships a prebuilt `core` for the bpf
//! targets) and `bpf-linker` built against LLVM 22; see docs/development.md for why.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};

use crate::{run_cmd, workspace_root};

/// Debian packages: the eBPF compiler and its `core`, LLVM to build bpf-linker, and the tools
/// the simulated cluster and the tests use.
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "tcpdump",
    "iperf3",
    "protobuf-compiler",
    "openssl",
    "curl",
];

pub fn run() -> Result<()> {
    apt()?;
    bpf_linker()?;
    kube_testenv()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn bpf_linker() -> Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
    let path = std::env::var("PATH").unwrap_or_default();
    let status = Command::new(env!("CARGO"))
        .env("PATH", format!("/usr/lib/llvm-22/bin:{path}"))
        .args([
            "install",
            "--locked",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed: {status}");
    }
    Ok(())
}

/// The real kube-apiserver (1.20.2) and etcd the Kubernetes tests run against
/// (`sidenode_tests::kube`): `deploy/kube-testenv.sh install` installs its Debian packages and
/// builds the apiserver from Debian's source package once, cached under
/// `${SIDENODE_CACHE:-~/.cache/sidenode}/k8s-1.20.2/`. Idempotent; quiet when all is there.
fn kube_testenv() -> Result<()> {
    let script = workspace_root().join("deploy/kube-testenv.sh");
    let cache = std::env::var_os("SIDENODE_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/sidenode"))
        })
        .unwrap_or_else(|| "/root/.cache/sidenode".into())
        .join("k8s-1.20.2");
    let built = cache.join("bin/.complete").exists();
    if !built {
        eprintln!(
            "setup: kube-testenv: installing etcd and building kube-apiserver 1.20.2 for the \
             Kubernetes tests (6 to 13 minutes the first time; cached in {})",
            cache.display()
        );
        return run_cmd(Command::new("bash").arg(&script).arg("install"));
    }
    // Cached: still checks its packages (a fast no-op); output only if something fails.
    let out = Command::new("bash")
        .arg(&script)
        .arg("install")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} install", script.display()))?;
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("{} install failed: {}", script.display(), out.status);
    }
    Ok(())
}
