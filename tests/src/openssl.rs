//! Workload certificates made with `openssl` for tests that need a certificate the controller
//! would not issue (another CA, an expired one, a wrong identity): a key and CSR, the SPIFFE
//! extensions, and signing with the simulated cluster's real CA (`openssl ca`, which can set a
//! validity window in the past). Used by tests/tests/hbone.rs and tests/tests/quic.rs.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cluster::Cluster;

/// Runs `cmd`; its stdout, or an error with its status and output.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn openssl(dir: &Path, args: &[&str]) -> Result<String> {
    run_ok(Command::new("openssl").current_dir(dir).args(args))
}

/// A leaf key + CSR (`<name>.key`, `<name>.csr`).
pub fn new_csr(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/O=sidenode-test",
        ],
    )?;
    Ok(())
}

/// Extensions of a workload certificate for `identity`.
pub fn write_ext(dir: &Path, identity: &str) -> Result<()> {
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=URI:{identity}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth,serverAuth\n"
        ),
    )?;
    Ok(())
}

/// Sign `<name>.csr` with the cluster's real CA via `openssl ca` (which can set a validity
/// window in the past); `dates` is `Some((start, end))` in `YYYYMMDDHHMMSSZ` or `None` for
/// "now, one day".
pub fn sign_with_cluster_ca(
    c: &Cluster,
    dir: &Path,
    name: &str,
    dates: Option<(&str, &str)>,
) -> Result<()> {
    let db = dir.join(format!("ca-{name}"));
    std::fs::create_dir_all(db.join("new"))?;
    std::fs::write(db.join("index.txt"), "")?;
    std::fs::write(db.join("serial"), "1000\n")?;
    std::fs::write(
        db.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndir = {}\ndatabase = $dir/index.txt\n\
             new_certs_dir = $dir/new\nserial = $dir/serial\ndefault_md = sha256\n\
             default_days = 1\npolicy = p\ncopy_extensions = none\nunique_subject = no\n\
             [p]\norganizationName = optional\ncommonName = optional\n",
            db.display()
        ),
    )?;
    let sd = c.controller_state_dir();
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir)
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(db.join("ca.cnf"))
        .args([
            "-in",
            &format!("{name}.csr"),
            "-out",
            &format!("{name}.pem"),
        ])
        .arg("-cert")
        .arg(sd.join("ca-cert.pem"))
        .arg("-keyfile")
        .arg(sd.join("ca-key.pem"))
        .args(["-extfile", "leaf.ext"]);
    if let Some((start, end)) = dates {
        cmd.args(["-startdate", start, "-enddate", end]);
    }
    run_ok(&mut cmd)?;
    Ok(())
}
