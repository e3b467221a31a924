//! `mesh-node doctor`: is this node healthy, and if not, what to do. Each check has a name, a
//! status (`ok`, `warn`, `fail`, or `skipped` with why), a one-line detail and, when it is not
//! ok, a one-line fix. The exit code is 1 when any check fails. docs/troubleshooting.md lists
//! every check.
//!
//! Run it on the node (in its network namespace: the proxy's admin API listens on the node's
//! loopback) as root, or with CAP_BPF and CAP_NET_ADMIN: it opens sidenode's pinned maps and
//! links and loads tiny probe programs.
//!
//! Where each answer comes from:
//! - the kernel: `/proc/sys/kernel/osrelease`, `/sys/kernel/btf/vmlinux`, and real probes of
//!   the program, map and helper types the capture programs use (aya's feature probes);
//! - the mounts: `/proc/self/mountinfo` (cgroup2), `statfs` (bpffs at `--bpffs`);
//! - the pins: the names in `mesh-common`; each link's kernel info says which cgroup it is
//!   attached to (the cgroup id is its folder's inode on cgroup v2);
//! - the agent: its lock on `<bpffs>/sidenode` (held while it runs; `Pins::lock_agent`);
//! - the proxy: its admin API (`/healthz/ready`, `/config_dump`: the controller link, the state
//!   version, the certificates, the pods it cannot serve and why);
//! - enrollment: the meshed pods of this node in the proxy's state against `SN_ENROLLED`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::{Deserialize, Serialize};

use super::config::{AdminClientError, get_json, request};
use super::table::{human_secs, render};
use crate::admin::config_dump::ConfigDump;
use crate::defaults;
use crate::kernel::Pins;
use crate::kernel::inspect::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, cgroup_link, fs_magic};
use crate::kernel::maps::NodeMaps;

#[derive(Args)]
pub struct DoctorArgs {
    /// The bpffs folder the agent pins under (`<bpffs>/sidenode/...`; the agent's --bpffs).
    #[arg(long, default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// The cgroup folder the capture programs should be attached to (the agent's
    /// --cgroup-root): default the cgroup2 mount; a relative PATH is taken below it.
    #[arg(long, env = "SIDENODE_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// The node proxy's admin API (`mesh-node proxy --admin`).
    #[arg(long, default_value_t = defaults::ADMIN_ADDR)]
    admin: SocketAddr,
    /// Warn about a workload certificate that expires within this long (e.g. 1h, 30m, 20s).
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    cert_warn: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not run; the detail says why.
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skipped => "skipped",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// One line: what was found (for `skipped`, why it was not run).
    pub detail: String,
    /// One line: what to do (for `fail` and `warn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn skipped(name: &str, why: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            status: Status::Skipped,
            detail: why.into(),
            fix: None,
        }
    }
}

/// The whole answer (`--json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The node's name, as its proxy knows it (empty when the proxy did not answer).
    pub node: String,
    /// No check failed.
    pub healthy: bool,
    pub checks: Vec<Check>,
}

/// Check names, in the order they run (docs/troubleshooting.md has one section each).
pub const CAPABILITIES: &str = "capabilities";
pub const KERNEL: &str = "kernel";
pub const BTF: &str = "btf";
pub const PROGRAM_TYPES: &str = "program-types";
pub const MAP_TYPES: &str = "map-types";
pub const HELPERS: &str = "helpers";
pub const CGROUP2: &str = "cgroup2";
pub const BPFFS: &str = "bpffs";
pub const PINS: &str = "pins";
pub const ATTACHMENTS: &str = "attachments";
pub const AGENT: &str = "agent";
pub const PROXY: &str = "proxy";
pub const CONTROLLER: &str = "controller";
pub const CERTIFICATES: &str = "certificates";
pub const ENROLLMENT: &str = "enrollment";

use crate::kernel::probe::{MIN_KERNEL, kernel_version};

pub async fn run(a: DoctorArgs) -> Result<bool> {
    let report = diagnose(&a).await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(report.healthy)
}

/// Runs every check.
pub async fn diagnose(a: &DoctorArgs) -> Report {
    let mut checks = Vec::new();
    let caps = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| e.to_string())
        .and_then(|s| Caps::from_status(&s).ok_or_else(|| "no CapEff line".to_string()));
    let (cap_check, caps) = capabilities_check(caps);
    checks.push(cap_check);
    checks.push(kernel_check(
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|e| e.to_string()),
    ));
    checks.push(btf_check(Path::new("/sys/kernel/btf/vmlinux")));
    checks.extend(probe_checks(caps));

    let cgroup_mount = crate::kernel::mounts::cgroup2_mount();
    let cgroup_root = match &a.cgroup_root {
        Some(p) if p.is_absolute() => Some(p.clone()),
        Some(p) => cgroup_mount.as_ref().ok().map(|m| m.join(p)),
        None => cgroup_mount.as_ref().ok().cloned(),
    };
    checks.push(cgroup2_check(
        cgroup_mount.as_ref().map_err(|e| e.to_string()),
        cgroup_root.as_deref(),
    ));

    let pins = Pins::new(&a.bpffs);
    let bpffs = bpffs_check(&a.bpffs);
    let bpffs_ok = bpffs.status == Status::Ok;
    checks.push(bpffs);
    let can_read_pins = caps.is_none_or(|c| c.bpf);
    let maps = if !bpffs_ok {
        checks.push(Check::skipped(PINS, "no bpffs at --bpffs (see bpffs)"));
        checks.push(Check::skipped(
            ATTACHMENTS,
            "no bpffs at --bpffs (see bpffs)",
        ));
        None
    } else if !can_read_pins {
        let why = "reading pins needs CAP_BPF or CAP_SYS_ADMIN (see capabilities)";
        checks.push(Check::skipped(PINS, why));
        checks.push(Check::skipped(ATTACHMENTS, why));
        None
    } else {
        checks.push(pins_check(&pins));
        checks.push(attachments_check(
            &pins,
            cgroup_mount.as_deref().ok(),
            cgroup_root.as_deref(),
        ));
        NodeMaps::open(&pins).ok()
    };
    checks.push(agent_check(&pins, maps.as_ref()));

    let (proxy, dump) = proxy_checks(a.admin).await;
    checks.push(proxy);
    match &dump {
        Ok(d) => {
            checks.push(controller_check(d));
            checks.push(certificates_check(d, a.cert_warn));
            let enrolled = maps.as_ref().map(|m| {
                super::maps::read(m)
                    .enrolled
                    .into_iter()
                    .map(|e| (e.namespace, e.pod))
                    .collect::<BTreeSet<_>>()
            });
            checks.push(enrollment_check(d, enrolled.as_ref()));
        }
        Err(why) => {
            for name in [CONTROLLER, CERTIFICATES, ENROLLMENT] {
                checks.push(Check::skipped(name, why.clone()));
            }
        }
    }
    Report {
        node: dump.map(|d| d.node).unwrap_or_default(),
        healthy: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    }
}

/// The report as a table, then one fix line per check that is not ok.
pub fn text(r: &Report) -> String {
    let rows: Vec<Vec<String>> = r
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.status.as_str().to_string(),
                c.detail.clone(),
            ]
        })
        .collect();
    let mut out = render(&["CHECK", "STATUS", "DETAIL"], &rows);
    let fixes: Vec<&Check> = r.checks.iter().filter(|c| c.fix.is_some()).collect();
    if !fixes.is_empty() {
        out.push_str("\nTO FIX\n");
        for c in fixes {
            out.push_str(&format!(
                "{} ({}): {}\n",
                c.name,
                c.status.as_str(),
                c.fix.as_deref().unwrap_or_default()
            ));
        }
    }
    let failed = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    let node = if r.node.is_empty() {
        "this node".to_string()
    } else {
        format!("node {}", r.node)
    };
    if failed == 0 {
        out.push_str(&format!("\n{node}: healthy\n"));
    } else {
        out.push_str(&format!("\n{node}: {failed} check(s) failed\n"));
    }
    out
}

// ---- capabilities -------------------------------------------------------------------------

/// The effective capabilities that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// CAP_BPF or CAP_SYS_ADMIN: open pins, load programs and create maps.
    pub bpf: bool,
    /// CAP_NET_ADMIN or CAP_SYS_ADMIN: load networking program types (the probes).
    pub net: bool,
    pub names: [bool; 3],
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

impl Caps {
    /// From `/proc/<pid>/status` text (the `CapEff:` line, hex).
    pub fn from_status(status: &str) -> Option<Caps> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))?
            .trim();
        let eff = u64::from_str_radix(hex, 16).ok()?;
        let has = |bit: u32| eff & (1u64 << bit) != 0;
        let (bpf, sys, net) = (has(CAP_BPF), has(CAP_SYS_ADMIN), has(CAP_NET_ADMIN));
        Some(Caps {
            bpf: bpf || sys,
            net: net || sys,
            names: [bpf, sys, net],
        })
    }
}

fn capabilities_check(caps: Result<Caps, String>) -> (Check, Option<Caps>) {
    let caps = match caps {
        Ok(c) => c,
        Err(e) => {
            return (
                Check::warn(
                    CAPABILITIES,
                    format!("cannot read /proc/self/status: {e}"),
                    "run the doctor as root (it reads sidenode's pins and probes the kernel)",
                ),
                None,
            );
        }
    };
    let have: Vec<&str> = ["CAP_BPF", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
        .iter()
        .zip(caps.names)
        .filter(|(_, h)| *h)
        .map(|(n, _)| *n)
        .collect();
    let have = if have.is_empty() {
        "none of CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN".to_string()
    } else {
        have.join(", ")
    };
    let check = if caps.bpf && caps.net {
        Check::ok(
            CAPABILITIES,
            format!("{have}: enough to read pins and probe"),
        )
    } else {
        Check::warn(
            CAPABILITIES,
            format!(
                "{have}: the doctor reads sidenode's pins and loads probe programs, which needs \
                 CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN); those checks are skipped"
            ),
            "run the doctor as root on the node (or in the agent's container: kubectl exec)",
        )
    };
    (check, Some(caps))
}

// ---- kernel -------------------------------------------------------------------------------

fn kernel_check(release: Result<String, String>) -> Check {
    let release = match release {
        Ok(r) => r.trim().to_string(),
        Err(e) => {
            return Check::warn(
                KERNEL,
                format!("cannot read /proc/sys/kernel/osrelease: {e}"),
                "check `uname -r`: sidenode needs Linux >= 5.14",
            );
        }
    };
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Check::ok(KERNEL, format!("Linux {release}")),
        Some(_) => Check::warn(
            KERNEL,
            format!(
                "Linux {release} is older than {}.{}, the oldest sidenode is documented for; the \
                 probes below say what is missing",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            "upgrade the node's kernel to Linux >= 5.14",
        ),
        None => Check::warn(
            KERNEL,
            format!("cannot read a version in `{release}`"),
            "check `uname -r`: sidenode needs Linux >= 5.14",
        ),
    }
}

fn btf_check(path: &Path) -> Check {
    match std::fs::metadata(path) {
        Ok(m) => Check::ok(BTF, format!("{} ({} KiB)", path.display(), m.len() / 1024)),
        Err(e) => Check::warn(
            BTF,
            format!(
                "{}: {e}; the capture programs do not need it (no CO-RE relocations), BTF-based \
                 tools (bpftool, CO-RE programs) do",
                path.display()
            ),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)",
        ),
    }
}

/// Program, map and helper types, probed for real (each probe loads a trivial program or
/// creates a tiny map, then closes it).
fn probe_checks(caps: Option<Caps>) -> Vec<Check> {
    if let Some(c) = caps
        && !(c.bpf && c.net)
    {
        let why = "probing needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN (see capabilities)";
        return vec![
            Check::skipped(PROGRAM_TYPES, why),
            Check::skipped(MAP_TYPES, why),
            Check::skipped(HELPERS, why),
        ];
    }
    let f = crate::kernel::probe::probe();
    let family = |v: Vec<crate::kernel::probe::Probed>| -> Vec<(String, &'static str, Result<bool, String>)> {
        v.into_iter().map(|p| (p.name, p.since, p.supported)).collect()
    };
    let (programs, maps) = (family(f.programs), family(f.maps));
    // The agent's socket option is listed with the helpers: both are "can the agent use it".
    let mut helpers = family(f.helpers);
    helpers.extend(family(f.sockopts));
    vec![
        probe_check(PROGRAM_TYPES, "program types", &programs),
        probe_check(MAP_TYPES, "map types", &maps),
        probe_check(HELPERS, "helpers", &helpers),
    ]
}

/// One probe family: ok when every item is supported; names the missing ones and the kernel
/// that brought each.
pub fn probe_check(
    name: &str,
    what: &str,
    results: &[(String, &str, Result<bool, String>)],
) -> Check {
    let missing: Vec<String> = results
        .iter()
        .filter(|(_, _, r)| matches!(r, Ok(false)))
        .map(|(n, since, _)| format!("{n} (Linux >= {since})"))
        .collect();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|(n, _, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
        .collect();
    if !missing.is_empty() {
        let newest = results
            .iter()
            .filter(|(_, _, r)| matches!(r, Ok(false)))
            .filter_map(|(_, since, _)| kernel_version(since))
            .max()
            .unwrap_or(MIN_KERNEL)
            // Below the documented minimum, advise that.
            .max(MIN_KERNEL);
        return Check::fail(
            name,
            format!("this kernel lacks {}", missing.join(", ")),
            format!(
                "upgrade the node's kernel to Linux >= {}.{} (or enable the BPF options it was \
                 built without)",
                newest.0, newest.1
            ),
        );
    }
    if !errors.is_empty() {
        return Check::warn(
            name,
            format!("probe failed: {}", errors.join("; ")),
            "run the doctor as root; if it is, a security module (seccomp, lockdown) may block bpf()",
        );
    }
    let names: Vec<&str> = results.iter().map(|(n, _, _)| n.as_str()).collect();
    Check::ok(
        name,
        format!("{} {what} supported: {}", results.len(), names.join(", ")),
    )
}

// ---- mounts and pins ----------------------------------------------------------------------

fn cgroup2_check(mount: Result<&PathBuf, String>, root: Option<&Path>) -> Check {
    let mount = match mount {
        Ok(m) => m,
        Err(e) => {
            return Check::fail(
                CGROUP2,
                e,
                "boot the node with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount it: \
                 mount -t cgroup2 none /sys/fs/cgroup/unified",
            );
        }
    };
    let Some(root) = root else {
        return Check::fail(
            CGROUP2,
            "no cgroup folder to check",
            "pass --cgroup-root as the agent's",
        );
    };
    match fs_magic(root) {
        Ok(m) if m == CGROUP2_SUPER_MAGIC => Check::ok(
            CGROUP2,
            format!(
                "cgroup2 mounted at {}; capture root {}",
                mount.display(),
                root.display()
            ),
        ),
        Ok(_) => Check::fail(
            CGROUP2,
            format!("{} is not a cgroup v2 folder", root.display()),
            format!(
                "give the agent (and the doctor) a --cgroup-root inside {}",
                mount.display()
            ),
        ),
        Err(e) => Check::fail(
            CGROUP2,
            format!("{}: {e}", root.display()),
            format!(
                "give the agent (and the doctor) an existing --cgroup-root inside {}",
                mount.display()
            ),
        ),
    }
}

fn bpffs_check(bpffs: &Path) -> Check {
    match fs_magic(bpffs) {
        Ok(m) if m == BPF_FS_MAGIC => {
            Check::ok(BPFFS, format!("{} is on a bpffs", bpffs.display()))
        }
        Ok(_) => Check::fail(
            BPFFS,
            format!(
                "{} is not on a bpffs: pins there would not outlive the agent",
                bpffs.display()
            ),
            format!(
                "mesh-node mount-bpffs --bpffs {} (the DaemonSet's init container does it)",
                bpffs.display()
            ),
        ),
        Err(e) => Check::fail(
            BPFFS,
            format!("{}: {e}", bpffs.display()),
            format!(
                "mesh-node mount-bpffs --bpffs {} (or pass the agent's --bpffs)",
                bpffs.display()
            ),
        ),
    }
}

/// Every pin `mesh-common` names: the maps, the cgroup links and the `sk_msg` program.
fn pins_check(pins: &Pins) -> Check {
    let mut missing = Vec::new();
    for name in mesh_common::ALL_MAPS {
        if let Err(e) = aya::maps::MapData::from_pin(pins.map(name)) {
            missing.push(format!("maps/{name} ({})", short_error(&e)));
        }
    }
    for name in crate::kernel::load::PROGRAMS {
        if let Err(e) = cgroup_link(&pins.link(name)) {
            missing.push(format!("links/{name} ({e})"));
        }
    }
    let prog = pins.prog(mesh_common::PROG_SPLICE_MSG);
    if let Err(e) = std::fs::metadata(&prog) {
        missing.push(format!("progs/{} ({e})", mesh_common::PROG_SPLICE_MSG));
    }
    let total = mesh_common::ALL_MAPS.len() + crate::kernel::load::PROGRAMS.len() + 1;
    if missing.is_empty() {
        return Check::ok(
            PINS,
            format!("all {total} pins under {}", pins.root().display()),
        );
    }
    let detail = if missing.len() == total {
        format!(
            "none of the {total} pins under {}: nothing is installed on this bpffs",
            pins.root().display()
        )
    } else {
        format!(
            "{} of {total} pins under {} missing: {}",
            missing.len(),
            pins.root().display(),
            missing.join(", ")
        )
    };
    Check::fail(
        PINS,
        detail,
        format!(
            "(re)start the agent with --bpffs {}: it installs or completes the pins (if pins \
             are there but stale, `mesh-node uninstall` first)",
            pins.bpffs().display()
        ),
    )
}

fn short_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s = inner.to_string();
        src = inner.source();
    }
    s
}

/// Where each pinned link is attached: its cgroup id → the folder with that inode.
fn attachments_check(pins: &Pins, mount: Option<&Path>, root: Option<&Path>) -> Check {
    let root_ino = root
        .and_then(|r| std::fs::metadata(r).ok())
        .map(|m| m.ino());
    let mut at_root = Vec::new();
    let mut elsewhere = Vec::new();
    let mut missing = Vec::new();
    for name in crate::kernel::load::PROGRAMS {
        match cgroup_link(&pins.link(name)) {
            Ok(l) if Some(l.cgroup_id) == root_ino => at_root.push(name),
            Ok(l) => {
                let folder = mount
                    .and_then(|m| find_cgroup(m, l.cgroup_id))
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("cgroup id {} (folder not found)", l.cgroup_id));
                elsewhere.push(format!("{name} on {folder}"));
            }
            Err(e) => missing.push(format!("{name} ({e})")),
        }
    }
    let root_s = root
        .map(|r| r.display().to_string())
        .unwrap_or_else(|| "?".into());
    if missing.len() == crate::kernel::load::PROGRAMS.len() {
        return Check::skipped(ATTACHMENTS, "no link pin to read (see pins)");
    }
    if !missing.is_empty() {
        return Check::fail(
            ATTACHMENTS,
            format!(
                "not attached: {}; attached to {root_s}: {}",
                missing.join(", "),
                if at_root.is_empty() {
                    "none".to_string()
                } else {
                    at_root.join(", ")
                }
            ),
            format!(
                "(re)start the agent with --bpffs {}: it attaches the missing programs",
                pins.bpffs().display()
            ),
        );
    }
    if !elsewhere.is_empty() {
        return Check::warn(
            ATTACHMENTS,
            format!(
                "attached outside {root_s}: {} (pods outside that folder are not captured)",
                elsewhere.join(", ")
            ),
            "pass the doctor the agent's --cgroup-root; if it is the agent that is wrong, \
             `mesh-node uninstall` and start it with the right one",
        );
    }
    Check::ok(
        ATTACHMENTS,
        format!("{} attached to {root_s}", at_root.join(", ")),
    )
}

/// The folder below `mount` whose inode is `id` (a cgroup's id on cgroup v2); a bounded walk.
fn find_cgroup(mount: &Path, id: u64) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([mount.to_path_buf()]);
    let mut seen = 0usize;
    while let Some(dir) = queue.pop_front() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        seen += 1;
        if seen > 100_000 {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    None
}

// ---- agent and proxy ------------------------------------------------------------------------

fn agent_check(pins: &Pins, maps: Option<&NodeMaps>) -> Check {
    let fix = format!(
        "start the agent (on Kubernetes: `kubectl -n {} get pods -o wide` for this node's \
         sidenode-node pod, then `kubectl logs -c agent`; else `mesh-node agent --bpffs {} ...`) \
         and read its log; pinned programs keep capturing meanwhile, but pods are not enrolled \
         or released",
        defaults::CONTROLLER_NAMESPACE,
        pins.bpffs().display()
    );
    match pins.agent_running() {
        Ok(true) => {
            let counters = maps
                .map(|m| {
                    let stats = m.stats();
                    let get = |k: &str| stats.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
                    let enrolled = m.enrolled.keys().filter(Result::is_ok).count();
                    format!(
                        "; {enrolled} netns enrolled, {} connections captured so far",
                        get("captured")
                    )
                })
                .unwrap_or_default();
            Check::ok(
                AGENT,
                format!(
                    "running (holds its lock on {}){counters}",
                    pins.root().display()
                ),
            )
        }
        Ok(false) => Check::fail(
            AGENT,
            format!(
                "no agent runs on {} (nobody holds its lock)",
                pins.root().display()
            ),
            fix,
        ),
        Err(e) => Check::fail(
            AGENT,
            format!(
                "{}: {e}: no agent has installed anything here",
                pins.root().display()
            ),
            fix,
        ),
    }
}

/// The proxy's readiness, and its `/config_dump` (or why the checks built on it are skipped).
async fn proxy_checks(admin: SocketAddr) -> (Check, Result<ConfigDump, String>) {
    let fix = format!(
        "check the node proxy (`mesh-node proxy --admin {admin}`; on Kubernetes the \
         sidenode-node pod's proxy container) and its log; run the doctor on the node, where \
         its admin API listens"
    );
    let ready = request(admin, http::Method::GET, "/healthz/ready").await;
    let check = match &ready {
        Ok(_) => Check::ok(PROXY, format!("ready (admin API {admin})")),
        Err(AdminClientError::Status {
            status, message, ..
        }) => Check::fail(PROXY, format!("answers {status}: {message}"), fix.clone()),
        Err(e) => Check::fail(PROXY, e.to_string(), fix.clone()),
    };
    if let Err(AdminClientError::Connect { .. } | AdminClientError::Timeout { .. }) = ready {
        return (
            check,
            Err(format!(
                "the proxy's admin API at {admin} does not answer (see proxy)"
            )),
        );
    }
    let dump = get_json::<ConfigDump>(admin, "/config_dump")
        .await
        .map_err(|e| format!("no /config_dump: {e}"));
    (check, dump)
}

// ---- from /config_dump --------------------------------------------------------------------

pub fn controller_check(d: &ConfigDump) -> Check {
    if d.mode != "mesh" {
        return Check::skipped(
            CONTROLLER,
            "the proxy runs without a controller (plain mode)",
        );
    }
    let fix = format!(
        "check the controller (`kubectl -n {} get pods`, its log) and that this node reaches it \
         (the proxy's --controller, --controller-ca, --token-file); the proxy reconnects by \
         itself",
        defaults::CONTROLLER_NAMESPACE
    );
    match d.controller_connected {
        Some(false) => Check::fail(
            CONTROLLER,
            format!(
                "the proxy's state stream to the controller is down; it serves the last state \
                 (version {}) and cannot renew certificates",
                d.state_version
            ),
            fix,
        ),
        _ if d.state_version == 0 => {
            Check::fail(CONTROLLER, "no state received from the controller yet", fix)
        }
        Some(true) => Check::ok(
            CONTROLLER,
            format!(
                "connected; state version {} (trust domain {})",
                d.state_version, d.trust_domain
            ),
        ),
        None => Check::warn(
            CONTROLLER,
            format!(
                "state version {}; this proxy does not say whether it is connected (older \
                 version)",
                d.state_version
            ),
            "upgrade the node proxy",
        ),
    }
}

pub fn certificates_check(d: &ConfigDump, warn_within: Duration) -> Check {
    if d.mode != "mesh" {
        return Check::skipped(
            CERTIFICATES,
            "no certificates in plain mode (no controller)",
        );
    }
    let fix_renew = "the proxy renews certificates at half-life through the controller: make it \
                     reachable (see controller); they are renewed within seconds of it coming \
                     back";
    let expired: Vec<String> = d
        .certificates
        .iter()
        .filter(|c| c.expires_in_seconds <= 0)
        .map(|c| {
            format!(
                "{} expired {} ago ({})",
                c.identity,
                human_secs(c.expires_in_seconds.unsigned_abs()),
                c.not_after
            )
        })
        .collect();
    if !expired.is_empty() {
        return Check::fail(CERTIFICATES, expired.join("; "), fix_renew);
    }
    let warn_secs = i64::try_from(warn_within.as_secs()).unwrap_or(i64::MAX);
    let soon: Vec<String> = d
        .certificates
        .iter()
        .filter(|c| c.expires_in_seconds < warn_secs)
        .map(|c| {
            format!(
                "{} expires in {}",
                c.identity,
                human_secs(c.expires_in_seconds.unsigned_abs())
            )
        })
        .collect();
    if !soon.is_empty() {
        return Check::warn(
            CERTIFICATES,
            format!(
                "{} (under {})",
                soon.join("; "),
                human_secs(warn_within.as_secs())
            ),
            fix_renew,
        );
    }
    match d.certificates.iter().min_by_key(|c| c.expires_in_seconds) {
        Some(c) => Check::ok(
            CERTIFICATES,
            format!(
                "{} held; the next to expire: {} in {}",
                d.certificates.len(),
                c.identity,
                human_secs(c.expires_in_seconds.unsigned_abs())
            ),
        ),
        None => Check::ok(
            CERTIFICATES,
            "none held (fetched for this node's meshed pods as they are served)",
        ),
    }
}

/// This node's meshed pods in the proxy's state against the kernel's `SN_ENROLLED`
/// (`(namespace, pod)` pairs; `None` when the pins could not be read).
pub fn enrollment_check(d: &ConfigDump, enrolled: Option<&BTreeSet<(String, String)>>) -> Check {
    if d.mode != "mesh" {
        return Check::skipped(
            ENROLLMENT,
            "plain mode: the proxy has no list of this node's pods; compare `mesh-node maps` \
             with the config folder",
        );
    }
    let Some(enrolled) = enrolled else {
        return Check::skipped(ENROLLMENT, "SN_ENROLLED cannot be read (see pins)");
    };
    let local: Vec<_> = d
        .workloads
        .iter()
        .filter(|w| w.node == d.node && w.meshed)
        .collect();
    let mut not_enrolled = Vec::new();
    let mut unserved = Vec::new();
    let mut netns_problem = false;
    for w in &local {
        let key = (w.namespace.clone(), w.name.clone());
        let reason = d.unserved_pods.get(&w.uid);
        if reason.is_some_and(|r| r.contains("netns") || r.contains("namespace")) {
            netns_problem = true;
        }
        if !enrolled.contains(&key) {
            not_enrolled.push(format!(
                "{}/{} ({})",
                w.namespace,
                w.name,
                reason.map_or("not in SN_ENROLLED: see the agent's log", String::as_str)
            ));
        } else if let Some(r) = reason {
            unserved.push(format!("{}/{} ({r})", w.namespace, w.name));
        }
    }
    let n = local.len();
    let fix = if netns_problem {
        "make the pod's network namespace findable: its sidenode.io/netns annotation must name an \
         existing netns, or its cgroup (pod<uid>) must hold a process below the agent's \
         --cgroup-root; the agent and the proxy retry by themselves"
    } else {
        "read the agent's and the proxy's logs for the pod; both retry by themselves"
    };
    if !not_enrolled.is_empty() {
        return Check::fail(
            ENROLLMENT,
            format!(
                "{} of {n} meshed pods of this node enrolled; not enrolled: {}",
                n - not_enrolled.len(),
                not_enrolled.join("; ")
            ),
            fix,
        );
    }
    if !unserved.is_empty() {
        return Check::warn(
            ENROLLMENT,
            format!(
                "{n} of {n} meshed pods enrolled, but the proxy cannot serve: {}",
                unserved.join("; ")
            ),
            fix,
        );
    }
    Check::ok(
        ENROLLMENT,
        format!("{n} of {n} meshed pods of this node enrolled"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::config_dump::{CertView, WorkloadView};

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(kernel_version("5.8.0\n"), Some((5, 8)));
        assert_eq!(kernel_version("4.19"), Some((4, 19)));
        assert_eq!(kernel_version("5.10rc1"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(kernel_check(Ok("6.1.0".into())).status, Status::Ok);
        let old = kernel_check(Ok("5.4.0-generic".into()));
        assert_eq!(old.status, Status::Warn);
        assert!(old.fix.is_some_and(|f| f.contains("5.14")));
    }

    #[test]
    fn capabilities_from_proc_status() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let c = Caps::from_status(root).expect("caps");
        assert!(c.bpf && c.net);
        assert_eq!(capabilities_check(Ok(c)).0.status, Status::Ok);
        // CAP_NET_ADMIN only.
        let c = Caps::from_status("CapEff:\t0000000000001000\n").expect("caps");
        assert!(!c.bpf && c.net);
        let (check, _) = capabilities_check(Ok(c));
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("CAP_NET_ADMIN"), "{check:?}");
        assert!(
            probe_checks(Some(c))
                .iter()
                .all(|c| c.status == Status::Skipped)
        );
        assert_eq!(Caps::from_status("CapEff:\tzz\n"), None);
        assert_eq!(Caps::from_status(""), None);
    }

    #[test]
    fn a_missing_probe_names_the_kernel() {
        let r = [
            ("a".to_string(), "4.10", Ok(true)),
            ("b".to_string(), "5.7", Ok(false)),
        ];
        let c = probe_check(HELPERS, "helpers", &r);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("b (Linux >= 5.7)"), "{c:?}");
        assert!(
            c.fix.as_deref().is_some_and(|f| f.contains(">= 5.14 ")),
            "{c:?}"
        );
        // A need newer than the documented minimum is what the fix names.
        let r2 = [
            ("c".to_string(), "6.15", Ok(false)),
            ("d".to_string(), "4.19", Ok(false)),
        ];
        let c = probe_check(HELPERS, "helpers", &r2);
        assert!(
            c.fix.as_deref().is_some_and(|f| f.contains(">= 6.15 ")),
            "{c:?}"
        );
        let r3 = [("e".to_string(), "4.19", Ok(false))];
        let c = probe_check(HELPERS, "helpers", &r3);
        assert!(
            c.fix.as_deref().is_some_and(|f| f.contains(">= 5.14 ")),
            "{c:?}"
        );
        let ok = probe_check(HELPERS, "helpers", &r[..1]);
        assert_eq!(ok.status, Status::Ok);
        let err = [("a".to_string(), "4.10", Err("EPERM".to_string()))];
        assert_eq!(probe_check(HELPERS, "helpers", &err).status, Status::Warn);
    }

    fn dump() -> ConfigDump {
        let wl = |ns: &str, name: &str, node: &str, meshed: bool| WorkloadView {
            uid: format!("{ns}/{name}"),
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            meshed,
            ..Default::default()
        };
        ConfigDump {
            node: "node1".into(),
            mode: "mesh".into(),
            state_version: 7,
            controller_connected: Some(true),
            workloads: vec![
                wl("shop", "a", "node1", true),
                wl("shop", "b", "node1", true),
                wl("plain", "c", "node1", false),
                wl("shop", "d", "node2", true),
            ],
            certificates: vec![CertView {
                identity: "spiffe://cluster.local/ns/shop/sa/a".into(),
                expires_in_seconds: 7200,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn controller_states() {
        let mut d = dump();
        assert_eq!(controller_check(&d).status, Status::Ok);
        d.controller_connected = Some(false);
        let c = controller_check(&d);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("version 7") && c.fix.is_some(), "{c:?}");
        d.controller_connected = Some(true);
        d.state_version = 0;
        assert_eq!(controller_check(&d).status, Status::Fail);
        d.mode = "plain".into();
        assert_eq!(controller_check(&d).status, Status::Skipped);
    }

    #[test]
    fn certificate_expiry() {
        let mut d = dump();
        let hour = Duration::from_secs(3600);
        assert_eq!(certificates_check(&d, hour).status, Status::Ok);
        d.certificates[0].expires_in_seconds = 600;
        assert_eq!(certificates_check(&d, hour).status, Status::Warn);
        d.certificates[0].expires_in_seconds = -5;
        let c = certificates_check(&d, hour);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("expired 5s ago"), "{c:?}");
        assert!(c.fix.is_some_and(|f| f.contains("controller")));
    }

    #[test]
    fn enrollment_names_the_pods_not_enrolled_and_why() {
        let mut d = dump();
        let both = set(&[("shop", "a"), ("shop", "b")]);
        assert_eq!(enrollment_check(&d, Some(&both)).status, Status::Ok);
        assert_eq!(enrollment_check(&d, None).status, Status::Skipped);
        d.unserved_pods.insert(
            "shop/b".into(),
            "sidenode.io/netns: network namespace /x: No such file or directory".into(),
        );
        let c = enrollment_check(&d, Some(&set(&[("shop", "a")])));
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("1 of 2"), "{c:?}");
        assert!(c.detail.contains("shop/b (sidenode.io/netns"), "{c:?}");
        assert!(c.fix.is_some_and(|f| f.contains("annotation")));
        // Enrolled, but the proxy cannot serve it: a warning.
        assert_eq!(enrollment_check(&d, Some(&both)).status, Status::Warn);
    }

    #[test]
    fn the_text_lists_fixes_and_the_verdict() {
        let r = Report {
            node: "node1".into(),
            healthy: false,
            checks: vec![
                Check::ok(KERNEL, "Linux 6.1"),
                Check::fail(AGENT, "no agent", "start it"),
                Check::skipped(ENROLLMENT, "no pins"),
            ],
        };
        let t = text(&r);
        assert!(t.starts_with("CHECK"), "{t}");
        assert!(t.contains("agent (fail): start it"), "{t}");
        assert!(t.contains("node node1: 1 check(s) failed"), "{t}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][0].get("fix"), None);
    }
}
