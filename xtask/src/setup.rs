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
    // tests/tests/prometheus.rs scrapes the node proxies with a real Prometheus (2.42 in
    // Debian 12; it also brings `promtool`). Installed without starting its service (below).
    "prometheus",
];

/// Packages whose maintainer scripts start and enable a system service on install; the
/// tests run their own instance, so setup stops and disables the system one.
const SERVICES: &[&str] = &["prometheus"];

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
    // Debian's maintainer scripts ask policy-rc.d before starting a service (invoke-rc.d,
    // deb-systemd-invoke): exit 101 = "not allowed". Only added if there is none (a
    // container usually has one already), removed afterwards.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let added_policy = !policy.exists() && write_deny_policy(policy).is_ok();
    let result = run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    );
    if added_policy {
        let _ = std::fs::remove_file(policy);
    }
    result?;
    for svc in SERVICES.iter().filter(|s| missing.contains(*s)) {
        no_system_service(svc);
    }
    Ok(())
}

fn write_deny_policy(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, "#!/bin/sh\n# added by cargo xtask setup\nexit 101\n")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// Stops and disables a service a package just installed (systemd and sysv links), in
/// case policy-rc.d did not keep it from starting. Best effort: quiet, never fails.
fn no_system_service(svc: &str) {
    let quiet = |cmd: &mut Command| {
        let _ = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    quiet(Command::new("systemctl").args(["stop", svc]));
    quiet(Command::new("systemctl").args(["disable", svc]));
    quiet(Command::new("update-rc.d").args([svc, "disable"]));
    quiet(Command::new("invoke-rc.d").args(["--force", svc, "stop"]));
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
