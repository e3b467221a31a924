//! The host's mounts as the node needs them: where cgroup v2 is mounted (pure v2 at
//! `/sys/fs/cgroup`, or hybrid at `/sys/fs/cgroup/unified`), and a shared bpffs at the host's
//! `/sys/fs/bpf` (`mesh-node mount-bpffs`, the DaemonSet's init container).
//!
//! Both read `/proc/self/mountinfo` (proc(5)): one line per mount, `ID PARENT MAJ:MIN ROOT
//! MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`, in mount order, with space,
//! tab, newline and backslash in paths written as octal escapes (`\040`).

use std::path::{Path, PathBuf};

/// One line of mountinfo, the fields this module uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The folder of the filesystem that is mounted (`/` unless a bind mount or a cgroup
    /// namespace shows only part of it).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// Member of a shared peer group (`shared:N` among the optional fields): mounts below it
    /// propagate to its peers.
    pub shared: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cgroup2 mount in {0} (cgroup v1 only? sidenode needs cgroup v2, mounted alone at /sys/fs/cgroup or beside v1 at /sys/fs/cgroup/unified)"
    )]
    NoCgroup2(PathBuf),
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parses mountinfo text; lines that do not have the format are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split_whitespace();
            let root = unescape(l.nth(3)?);
            let mount_point = PathBuf::from(unescape(l.next()?));
            let _options = l.next()?;
            let shared = l.any(|f| f.starts_with("shared:"));
            let fs_type = right.split_whitespace().next()?.to_string();
            Some(Mount {
                root,
                mount_point,
                fs_type,
                shared,
            })
        })
        .collect()
}

/// `\040` → space, and so on (mountinfo's octal escapes).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts still visible: a later mount on a folder hides every earlier one on that folder
/// or below it (a container's hostPath over its own `/sys/fs/cgroup`, for example).
pub fn visible(mounts: &[Mount]) -> Vec<&Mount> {
    let mut out: Vec<&Mount> = Vec::new();
    for m in mounts {
        out.retain(|earlier| !earlier.mount_point.starts_with(&m.mount_point));
        out.push(m);
    }
    out
}

/// Where cgroup v2 is mounted, from mountinfo text: the visible `cgroup2` mount, the one
/// showing the whole hierarchy (root `/`) first; `/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    let mounts = parse_mountinfo(mountinfo);
    let v = visible(&mounts);
    let cg: Vec<&&Mount> = v.iter().filter(|m| m.fs_type == "cgroup2").collect();
    cg.iter()
        .find(|m| m.root == "/")
        .or_else(|| cg.first())
        .map(|m| m.mount_point.clone())
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

fn read_mountinfo() -> Result<String, MountError> {
    std::fs::read_to_string(MOUNTINFO).map_err(|source| MountError::Read {
        path: MOUNTINFO.into(),
        source,
    })
}

/// This process' cgroup2 mount point (see [`cgroup2_mount_in`]).
pub fn cgroup2_mount() -> Result<PathBuf, MountError> {
    cgroup2_mount_in(&read_mountinfo()?).ok_or_else(|| MountError::NoCgroup2(MOUNTINFO.into()))
}

/// The cgroup folder the agent attaches to and searches for pods: `--cgroup-root` when
/// absolute; below the cgroup2 mount when relative (kubelet's `--cgroup-root` without its
/// leading `/`, e.g. `$(NODE_NAME)` when every kubelet of a machine has its own); the cgroup2
/// mount itself without the flag.
pub fn resolve_cgroup_root(flag: Option<&Path>) -> Result<PathBuf, MountError> {
    match flag {
        Some(p) if p.is_absolute() => Ok(p.to_path_buf()),
        Some(p) => Ok(cgroup2_mount()?.join(p)),
        None => cgroup2_mount(),
    }
}

/// What [`ensure_shared_bpffs`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpffsAction {
    /// A bpffs was there and shared: nothing to do.
    Present,
    /// A bpffs was there but private (or slave): made shared.
    MadeShared,
    /// No bpffs at the path: mounted one and made it shared.
    Mounted,
}

/// What [`ensure_shared_bpffs`] has to do at `path`, from mountinfo text.
pub fn bpffs_action(mountinfo: &str, path: &Path) -> BpffsAction {
    let mounts = parse_mountinfo(mountinfo);
    match visible(&mounts)
        .iter()
        .rev()
        .find(|m| m.mount_point == path)
    {
        Some(m) if m.fs_type == "bpf" && m.shared => BpffsAction::Present,
        Some(m) if m.fs_type == "bpf" => BpffsAction::MadeShared,
        _ => BpffsAction::Mounted,
    }
}

/// Enters the mount namespace `mount_ns` (the host's: `/proc/1/ns/mnt` with `hostPID`), then
/// makes sure a bpffs is mounted at `path` there and is a shared mount, so that the runtime
/// accepts `mountPropagation: HostToContainer` for it and pins outlive containers. Must run
/// before any thread is started (setns of a mount namespace needs a single-threaded caller).
pub fn ensure_shared_bpffs(path: &Path, mount_ns: &Path) -> Result<BpffsAction, MountError> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let sys = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| MountError::Sys {
            what,
            path: p,
            source,
        }
    };
    let ns = std::fs::File::open(mount_ns).map_err(sys("opening", mount_ns))?;
    // SAFETY: a valid fd we own; CLONE_NEWNS asks the kernel to check it is a mount namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(sys("entering the mount namespace", mount_ns)(
            std::io::Error::last_os_error(),
        ));
    }
    let action = bpffs_action(&read_mountinfo()?, path);
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| sys("path", path)(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    if action == BpffsAction::Mounted {
        std::fs::create_dir_all(path).map_err(sys("creating", path))?;
        let fs = c"bpf";
        let opts = c"mode=0700";
        // SAFETY: NUL-terminated strings that live across the call.
        let rc = unsafe {
            libc::mount(
                fs.as_ptr(),
                c.as_ptr(),
                fs.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(sys("mounting bpffs at", path)(
                std::io::Error::last_os_error(),
            ));
        }
    }
    if action != BpffsAction::Present {
        // SAFETY: as above; a propagation change takes no source, type or data.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(sys("making shared", path)(std::io::Error::last_os_error()));
        }
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine kind: v1 controllers under a tmpfs, cgroup2 beside them.
    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
45 22 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    /// A systemd host with cgroup v2 only (every mount shared).
    const PURE_V2: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:24 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:5 - bpf bpf rw,mode=700
";

    /// Inside a container on a v2 host: its own cgroup namespace's view, then the hostPath
    /// /sys/fs/cgroup mounted over it.
    const CONTAINER_V2: &str = "\
600 500 0:50 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
601 600 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
610 600 0:23 /kubepods.slice/kubepods-pod1.slice /sys/fs/cgroup/x rw - cgroup2 cgroup2 rw
620 600 0:23 / /sys/fs/cgroup ro,relatime master:4 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_v2_hosts() {
        assert_eq!(
            cgroup2_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in(CONTAINER_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_on_a_v1_only_host_and_garbage_is_skipped() {
        let v1_only: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(cgroup2_mount_in(&v1_only), None);
        assert_eq!(cgroup2_mount_in("garbage\n\n1 2 3\n - \n"), None);
    }

    #[test]
    fn a_cgroup2_mount_hidden_by_a_later_mount_is_not_used() {
        // A tmpfs over /sys/fs/cgroup hides the hybrid unified mount below it.
        let text = format!("{HYBRID}90 22 0:99 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n");
        assert_eq!(cgroup2_mount_in(&text), None);
    }

    #[test]
    fn a_subtree_is_used_only_without_the_whole_hierarchy() {
        let only_subtree = "601 600 0:23 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(only_subtree),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn octal_escapes_in_paths() {
        let text = "41 31 0:38 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }

    #[test]
    fn bpffs_action_per_host() {
        let bpf = Path::new("/sys/fs/bpf");
        assert_eq!(bpffs_action(PURE_V2, bpf), BpffsAction::Present);
        // Mounted but private (no shared: field), as on this machine kind.
        assert_eq!(bpffs_action(HYBRID, bpf), BpffsAction::MadeShared);
        let none: String = HYBRID
            .lines()
            .filter(|l| !l.contains(" bpf "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(bpffs_action(&none, bpf), BpffsAction::Mounted);
        // Something else mounted over it: mount a bpffs.
        let over = format!("{PURE_V2}80 27 0:60 / /sys/fs/bpf rw shared:9 - tmpfs tmpfs rw\n");
        assert_eq!(bpffs_action(&over, bpf), BpffsAction::Mounted);
    }
}
