//! Processes and cgroups: liveness, killing, cgroup v2 discovery and teardown, spawning into
//! a namespace and a pod's cgroup.

use anyhow::{Context, Result, bail};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cgroup2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 mount in /proc/mounts")
}

/// Is `path` a mount point (listed in /proc/mounts)?
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let want = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_ref()))
}

/// Alive = exists and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    match stat.rfind(')') {
        Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
        None => false,
    }
}

/// The process' command line, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

pub fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        // SAFETY: plain syscall; a stale pid only yields ESRCH.
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// Wait until none of `pids` is alive (zombies count as gone), up to `timeout`.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if pids.iter().all(|p| !pid_alive(*p)) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// All pids in a cgroup folder and its descendants.
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            procs
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

/// SIGKILL everything in a cgroup subtree and wait for it to be empty.
pub fn kill_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..3 {
        let pids = cgroup_pids(dir);
        if pids.is_empty() {
            return;
        }
        for p in &pids {
            signal(*p, libc::SIGKILL);
        }
        wait_gone(&pids, Duration::from_secs(5));
    }
}

/// rmdir a cgroup subtree, children first. Best effort.
pub fn rmdir_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // EBUSY while a killed process is still being torn down.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Open a netns file (before fork) for `setns` in a child.
pub fn open_netns(path: &str) -> Result<OwnedFd> {
    let f = std::fs::File::open(path).with_context(|| format!("opening netns {path}"))?;
    Ok(OwnedFd::from(f))
}

/// Make `cmd` enter the netns `netns_fd` and, if given, join the cgroup whose `cgroup.procs`
/// is `cgroup_procs`, in the child between fork and exec.
pub fn enter_in_child(
    cmd: &mut Command,
    netns_fd: OwnedFd,
    cgroup_procs: Option<&Path>,
) -> Result<()> {
    if let Some(procs) = cgroup_procs {
        join_cgroup_in_child(cmd, procs)?;
    }
    let fd = Arc::new(netns_fd);
    // SAFETY: the closure only makes an async-signal-safe syscall (setns).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Make `cmd`'s child join the cgroup whose `cgroup.procs` is `cgroup_procs`, between fork and
/// exec (before any `pre_exec` step added later).
pub fn join_cgroup_in_child(cmd: &mut Command, cgroup_procs: &Path) -> Result<()> {
    let procs =
        CString::new(cgroup_procs.as_os_str().as_encoded_bytes()).context("cgroup path has NUL")?;
    // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close).
    unsafe {
        cmd.pre_exec(move || {
            let cfd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if cfd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(cfd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(cfd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Put the child in its own session (and process group), so it outlives the caller's
/// terminal and process group.
pub fn new_session(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait until the file, from byte `offset` on, has a line containing `needle`; returns it.
pub fn wait_for_file_line(
    path: &Path,
    offset: u64,
    needle: &str,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<String> {
    let end = Instant::now() + timeout;
    let mut dead_seen = false;
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
            let text = String::from_utf8_lossy(&bytes[start..]);
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
        }
        let dead = !alive();
        if (dead && dead_seen) || Instant::now() > end {
            bail!(
                "{} {:?} in {} within {:?}; last lines:\n{}",
                if dead {
                    "process exited without"
                } else {
                    "no line containing"
                },
                needle,
                path.display(),
                timeout,
                tail(path, 30)
            );
        }
        // One more read after seeing the process gone: its last line may have just landed.
        dead_seen = dead;
        std::thread::sleep(Duration::from_millis(50));
    }
}
