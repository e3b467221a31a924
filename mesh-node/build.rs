//! Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` and hands the object to
//! the agent, which embeds it. The eBPF crate is compiled with Debian's `rustc-web` (which ships
//! a prebuilt `core` for the bpf targets) and linked by `bpf-linker`: the route that works on
//! machines without `rust-src` (docs/development.md). `cargo xtask setup` installs both.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const BPF_RUSTC: &str = "/usr/bin/rustc";

fn main() {
    println!("cargo:rerun-if-changed=proto/sidenode.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/sidenode.proto"], &["proto"])
        .expect("compiling proto/sidenode.proto (needs protoc: `cargo xtask setup`)");
    build_ebpf();
}

fn build_ebpf() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("mesh-node sits in the workspace")
        .to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for dir in [
        "mesh-ebpf/src",
        "mesh-ebpf/Cargo.toml",
        "mesh-common/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=SIDENODE_EBPF_OBJECT");

    // An operator may hand a prebuilt object (for example in a container build stage).
    if let Some(obj) = env::var_os("SIDENODE_EBPF_OBJECT") {
        println!(
            "cargo:rustc-env=SIDENODE_EBPF_OBJECT={}",
            PathBuf::from(obj).display()
        );
        return;
    }
    if !PathBuf::from(BPF_RUSTC).exists() {
        panic!(
            "building the eBPF programs needs Debian's rustc-web at {BPF_RUSTC} and bpf-linker: \
             run `cargo xtask setup` first"
        );
    }

    let target_dir = out.join("ebpf-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--package", "mesh-ebpf", "--profile", "bpf"])
        .args(["--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1");
    // Variables of the outer build that must not leak into the inner one.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOC",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    // Make sure bpf-linker from `cargo install` is found.
    if let Some(home) = env::var_os("CARGO_HOME")
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string()))
    {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![PathBuf::from(home).join("bin")];
        dirs.extend(env::split_paths(&path));
        if let Ok(joined) = env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
    }
    let status = cmd.status().expect("running cargo for mesh-ebpf");
    if !status.success() {
        panic!(
            "building mesh-ebpf for bpfel-unknown-none failed ({status}); run `cargo xtask setup`"
        );
    }
    let obj = target_dir
        .join("bpfel-unknown-none")
        .join("bpf")
        .join("mesh-ebpf");
    println!("cargo:rustc-env=SIDENODE_EBPF_OBJECT={}", obj.display());
}
