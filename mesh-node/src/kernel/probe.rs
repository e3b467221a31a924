//! What the kernel programs need from the kernel, probed for real (aya's feature probes load
//! a trivial program or create a tiny map, then close it). One table, used by the agent at
//! start ([`require`]: it refuses with one line naming the missing feature and the kernel
//! that brought it, rather than fail in the verifier) and by `mesh-node doctor`.

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::BpfHelper;

/// The oldest kernel sidenode is documented for (docs/kubernetes.md): `SO_NETNS_COOKIE`
/// (5.14), which the agent reads to enroll a pod, is the newest feature it needs (found on
/// Debian 11's 5.10 by `cargo xtask kernels`: the programs load there, enrollment cannot work).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// The program types the capture programs are, and the kernel each appeared in.
pub const PROGRAM_TYPES: [(ProgramType, &str, &str); 4] = [
    (
        ProgramType::CgroupSockAddr,
        "cgroup_sock_addr (sn_connect4/6)",
        "4.17",
    ),
    (ProgramType::SockOps, "sock_ops (sn_sockops)", "4.13"),
    (ProgramType::CgroupSkb, "cgroup_skb (sn_strict_in)", "4.10"),
    (ProgramType::SkMsg, "sk_msg (sn_splice_msg)", "4.17"),
];

/// The map types of `mesh-common`'s maps (and aya-log's ring buffer), and the kernel each
/// appeared in.
pub const MAP_TYPES: [(MapType, &str, &str); 7] = [
    (MapType::Hash, "hash", "3.19"),
    (MapType::Array, "array", "3.19"),
    (MapType::PerCpuArray, "percpu_array", "4.6"),
    (MapType::LruHash, "lru_hash", "4.10"),
    (MapType::LpmTrie, "lpm_trie", "4.11"),
    (MapType::SockHash, "sockhash", "4.18"),
    (MapType::RingBuf, "ringbuf (the decision logs)", "5.8"),
];

/// The helpers the programs call, from which program type, and the kernel that allowed it.
pub const HELPERS: [(ProgramType, BpfHelper, &str, &str); 6] = [
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "get_netns_cookie from cgroup_sock_addr",
        "5.7",
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "get_socket_cookie from cgroup_sock_addr",
        "4.19",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "get_socket_cookie from sock_ops",
        "4.19",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sock_hash_update,
        "sock_hash_update from sock_ops",
        "4.18",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_msg_redirect_hash,
        "msg_redirect_hash from sk_msg",
        "4.18",
    ),
    (
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_skb_load_bytes,
        "skb_load_bytes from cgroup_skb",
        "4.10",
    ),
];

/// One probed feature: its name, the kernel that brought it, and whether this kernel has it
/// (`Err`: the probe itself failed, e.g. no permission).
#[derive(Clone, Debug)]
pub struct Probed {
    pub name: String,
    pub since: &'static str,
    pub supported: Result<bool, String>,
}

/// The three families, probed.
#[derive(Clone, Debug)]
pub struct Features {
    pub programs: Vec<Probed>,
    pub maps: Vec<Probed>,
    pub helpers: Vec<Probed>,
    /// Socket options the agent itself reads (`SO_NETNS_COOKIE`: a pod's netns cookie).
    pub sockopts: Vec<Probed>,
}

/// `SO_NETNS_COOKIE` (Linux 5.14): how the agent learns a pod's network namespace cookie,
/// the key of `SN_ENROLLED`. `ENOPROTOOPT`: the kernel lacks it.
fn netns_cookie_sockopt() -> Probed {
    let supported = match super::netns::socket_cookie() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e.to_string()),
    };
    Probed {
        name: "SO_NETNS_COOKIE socket option (pod enrollment)".into(),
        since: "5.14",
        supported,
    }
}

/// Probes every program type, map type and helper of the tables above.
pub fn probe() -> Features {
    Features {
        programs: PROGRAM_TYPES
            .iter()
            .map(|(t, name, since)| Probed {
                name: name.to_string(),
                since,
                supported: aya::sys::is_program_supported(*t).map_err(|e| e.to_string()),
            })
            .collect(),
        maps: MAP_TYPES
            .iter()
            .map(|(t, name, since)| Probed {
                name: name.to_string(),
                since,
                supported: aya::sys::is_map_supported(*t).map_err(|e| e.to_string()),
            })
            .collect(),
        helpers: HELPERS
            .iter()
            .map(|(t, h, name, since)| Probed {
                name: name.to_string(),
                since,
                supported: aya::sys::is_helper_supported(*t, *h).map_err(|e| e.to_string()),
            })
            .collect(),
        sockopts: vec![netns_cookie_sockopt()],
    }
}

/// `6.18.44-fc` → (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// The kernel to advise for the missing features in `missing`: the newest that brought one
/// of them, and never below [`MIN_KERNEL`].
pub fn kernel_for(missing: &[&Probed]) -> (u32, u32) {
    missing
        .iter()
        .filter_map(|p| kernel_version(p.since))
        .max()
        .unwrap_or(MIN_KERNEL)
        .max(MIN_KERNEL)
}

/// The kernel lacks features the programs need.
#[derive(Debug, thiserror::Error)]
#[error(
    "this kernel ({release}) lacks {missing}, which sidenode's kernel programs need: run the \
     node on Linux >= {}.{} (`mesh-node doctor` lists every feature)",
    need.0,
    need.1
)]
pub struct Unsupported {
    pub release: String,
    /// `feature (Linux >= x.y)`, comma-separated.
    pub missing: String,
    pub need: (u32, u32),
}

/// The features in `f` this kernel lacks (probes that failed are not counted: a probe that
/// cannot run says nothing about the kernel, and loading will tell).
pub fn missing(f: &Features) -> Vec<&Probed> {
    f.programs
        .iter()
        .chain(&f.maps)
        .chain(&f.helpers)
        .chain(&f.sockopts)
        .filter(|p| matches!(p.supported, Ok(false)))
        .collect()
}

/// Judges probe results: `Err` names every missing feature and the kernel that has them all.
pub fn judge(f: &Features, release: &str) -> Result<(), Unsupported> {
    let missing = missing(f);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Unsupported {
        release: format!("Linux {}", release.trim()),
        missing: missing
            .iter()
            .map(|p| format!("{} (Linux >= {})", p.name, p.since))
            .collect::<Vec<_>>()
            .join(", "),
        need: kernel_for(&missing),
    })
}

/// What the agent runs before loading anything: probes, and refuses on a kernel that lacks a
/// feature. Probe failures are logged and do not refuse.
pub fn require() -> Result<(), Unsupported> {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown".into());
    let f = probe();
    for p in f
        .programs
        .iter()
        .chain(&f.maps)
        .chain(&f.helpers)
        .chain(&f.sockopts)
    {
        if let Err(e) = &p.supported {
            tracing::warn!(feature = %p.name, error = %e, "kernel feature probe failed");
        }
    }
    judge(&f, &release)?;
    tracing::info!(
        release = %release.trim(),
        "kernel has every feature the programs need"
    );
    Ok(())
}

/// Whether the kernel accepts `TCP_ULP "tls"` on a connected loopback TCP socket (the
/// error says why not: `ENOENT` no `tls` module).
pub fn tls_ulp() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let s = std::net::TcpStream::connect(l.local_addr()?)?;
    let _peer = l.accept()?;
    let name = b"tls";
    // SAFETY: setsockopt on a socket we own, with a valid buffer and its length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, since: &'static str, supported: Result<bool, String>) -> Probed {
        Probed {
            name: name.into(),
            since,
            supported,
        }
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(kernel_version("5.8.0\n"), Some((5, 8)));
        assert_eq!(kernel_version("4.19"), Some((4, 19)));
        assert_eq!(kernel_version("5.10rc1"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn a_missing_feature_is_one_line_naming_it_and_the_kernel() {
        let f = Features {
            programs: vec![p("sock_ops (sn_sockops)", "4.13", Ok(true))],
            maps: vec![p("ringbuf (the decision logs)", "5.8", Ok(false))],
            helpers: vec![
                p("get_netns_cookie from cgroup_sock_addr", "5.7", Ok(false)),
                p(
                    "skb_load_bytes from cgroup_skb",
                    "4.10",
                    Err("EPERM".into()),
                ),
            ],
            sockopts: vec![p("SO_NETNS_COOKIE", "5.14", Ok(false))],
        };
        let e = judge(&f, "5.4.0-150-generic\n").expect_err("refused");
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("Linux 5.4.0-150-generic"), "{line}");
        assert!(
            line.contains("ringbuf (the decision logs) (Linux >= 5.8)"),
            "{line}"
        );
        assert!(line.contains("get_netns_cookie"), "{line}");
        assert!(
            !line.contains("skb_load_bytes"),
            "a failed probe is not a missing feature"
        );
        assert!(line.contains("SO_NETNS_COOKIE (Linux >= 5.14)"), "{line}");
        assert_eq!(e.need, (5, 14));
        // Older features than the minimum still advise the minimum.
        let old = [p("x", "4.10", Ok(false))];
        assert_eq!(kernel_for(&old.iter().collect::<Vec<_>>()), MIN_KERNEL);
        let ok = Features {
            programs: vec![p("a", "4.10", Ok(true))],
            maps: vec![p("b", "4.10", Err("EPERM".into()))],
            helpers: vec![],
            sockopts: vec![],
        };
        assert!(judge(&ok, "6.1.0").is_ok());
    }

    /// This machine's kernel has every feature (the tests run as root on a recent kernel).
    #[test]
    fn this_kernel_has_every_feature() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let f = probe();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if let Err(e) = judge(&f, &release) {
            panic!("{e}");
        }
        assert_eq!(f.programs.len(), PROGRAM_TYPES.len());
        assert_eq!(f.maps.len(), MAP_TYPES.len());
        assert_eq!(f.helpers.len(), HELPERS.len());
    }
}
