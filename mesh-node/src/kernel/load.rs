//! Installing the kernel programs once per node, or adopting the ones already pinned.
//!
//! First start: load the object (maps pinned by name under `<bpffs>/sidenode/maps/`), attach
//! `sn_connect4`, `sn_connect6`, `sn_sockops` and `sn_strict_in` to the cgroup root with bpf
//! links, and pin the links under `<bpffs>/sidenode/links/`. Later starts find every link pin
//! and adopt them: nothing is detached or reloaded, so capture never stops across agent
//! restarts. An agent started on pins left by an older version (some programs pinned, newer
//! ones missing) keeps the pinned ones and attaches only the missing ones, sharing the pinned
//! maps (a map the old object did not have is created and pinned).

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkMsg, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use tracing::{info, warn};

use super::maps::NodeMaps;
use super::{KernelError, Pins};

/// The compiled `mesh-ebpf` object, built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SIDENODE_EBPF_OBJECT"));

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Every program attached at the cgroup root with a pinned link (`<bpffs>/sidenode/links/<name>`).
pub const PROGRAMS: [&str; 4] = [
    mesh_common::PROG_CONNECT4,
    mesh_common::PROG_CONNECT6,
    mesh_common::PROG_SOCKOPS,
    mesh_common::PROG_STRICT_IN,
];

/// How the agent came to own the programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Loaded and attached now.
    Fresh,
    /// Found pinned from an earlier run and kept as they were.
    Adopted,
    /// Some found pinned (kept), the missing ones (newer programs) attached now.
    Upgraded,
}

/// Loads and attaches, or adopts, then opens the maps.
pub fn install(pins: &Pins, cgroup_root: &Path) -> Result<(NodeMaps, Install), KernelError> {
    check_cgroup2(cgroup_root)?;
    for dir in [pins.maps_dir(), pins.links_dir(), pins.progs_dir()] {
        std::fs::create_dir_all(&dir).map_err(|source| KernelError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
    }
    let links = PROGRAMS.map(|p| pins.link(p));
    let mut live: Vec<bool> = links
        .iter()
        .map(|l| PinnedLink::from_pin(l).is_ok())
        .collect();
    // The splice program is attached to its map; its program pin says it is.
    live.push(SkMsg::from_pin(pins.prog(mesh_common::PROG_SPLICE_MSG)).is_ok());
    let links: Vec<PathBuf> = links
        .into_iter()
        .chain([pins.prog(mesh_common::PROG_SPLICE_MSG)])
        .collect();
    let how = if live.iter().all(|l| *l) {
        info!(bpffs = %pins.bpffs().display(), "adopting pinned programs and maps");
        Install::Adopted
    } else {
        for (l, ok) in links.iter().zip(&live) {
            if !ok && l.exists() {
                warn!(path = %l.display(), "removing a stale link pin");
                let _ = std::fs::remove_file(l);
            }
        }
        let missing: Vec<&'static str> = PROGRAMS
            .iter()
            .chain(&[mesh_common::PROG_SPLICE_MSG])
            .zip(&live)
            .filter(|(_, ok)| !**ok)
            .map(|(p, _)| *p)
            .collect();
        attach(pins, cgroup_root, &missing)?;
        if missing.len() == PROGRAMS.len() + 1 {
            info!(cgroup = %cgroup_root.display(), bpffs = %pins.bpffs().display(), "attached capture programs");
            Install::Fresh
        } else {
            info!(cgroup = %cgroup_root.display(), bpffs = %pins.bpffs().display(), attached = ?missing, "adopted pinned programs and attached the missing ones");
            Install::Upgraded
        }
    };
    let maps = NodeMaps::open(pins)?;
    if maps.stats_slots() < mesh_common::STAT_COUNT {
        warn!(
            slots = maps.stats_slots(),
            "SN_STATS was pinned by an older version with fewer counters: the newer ones stay at \
             0 until `mesh-node uninstall` and a fresh install"
        );
    }
    Ok((maps, how))
}

/// Loads program `$name` of type `$ty`, attaches it to the cgroup with a bpf link, and pins
/// the link. (The program types share these steps but no trait, hence a macro.)
macro_rules! attach_pinned {
    ($ebpf:expr, $ty:ty, $name:expr, $cgroup:expr, $pins:expr $(, $attach_arg:expr)*) => {{
        let name: &'static str = $name;
        let prog: &mut $ty = $ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.load()
            .map_err(|source| KernelError::Program { name, source })?;
        let id = prog
            .attach($cgroup, $($attach_arg,)* CgroupAttachMode::Single)
            .map_err(|source| KernelError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| KernelError::Program { name, source })?;
        pin(name, link.try_into(), $pins)?;
    }};
}

/// Loads the object (maps pinned by name; those already pinned are reused) and attaches the
/// programs in `which`.
fn attach(pins: &Pins, cgroup_root: &Path, which: &[&'static str]) -> Result<(), KernelError> {
    // The programs use no CO-RE relocations, so the kernel's BTF (megabytes to parse) is not
    // loaded: it would only raise the agent's peak memory.
    let mut ebpf: Ebpf = EbpfLoader::new()
        .btf(None)
        .default_map_pin_directory(pins.maps_dir())
        .load(OBJECT)
        .map_err(|e| KernelError::Load(Box::new(e)))?;
    let cgroup = File::open(cgroup_root).map_err(|source| KernelError::Io {
        what: "opening cgroup",
        path: cgroup_root.to_path_buf(),
        source,
    })?;

    for name in which {
        match *name {
            mesh_common::PROG_CONNECT4 => attach_pinned!(
                ebpf,
                CgroupSockAddr,
                mesh_common::PROG_CONNECT4,
                &cgroup,
                pins
            ),
            mesh_common::PROG_CONNECT6 => attach_pinned!(
                ebpf,
                CgroupSockAddr,
                mesh_common::PROG_CONNECT6,
                &cgroup,
                pins
            ),
            mesh_common::PROG_SOCKOPS => {
                attach_pinned!(ebpf, SockOps, mesh_common::PROG_SOCKOPS, &cgroup, pins)
            }
            mesh_common::PROG_STRICT_IN => attach_pinned!(
                ebpf,
                CgroupSkb,
                mesh_common::PROG_STRICT_IN,
                &cgroup,
                pins,
                CgroupSkbAttachType::Ingress
            ),
            mesh_common::PROG_SPLICE_MSG => attach_splice(&mut ebpf, pins)?,
            other => return Err(KernelError::MissingProgram { name: other }),
        }
    }
    Ok(())
}

/// Attaches `sn_splice_msg` to the `SN_SPLICE` sockhash and pins the program. The attachment
/// belongs to the map (a legacy `BPF_PROG_ATTACH`: this kernel API has no bpf link for it in
/// aya), so it lasts as long as the pinned map; the handle is forgotten rather than dropped,
/// since dropping it would detach the program.
fn attach_splice(ebpf: &mut Ebpf, pins: &Pins) -> Result<(), KernelError> {
    let name = mesh_common::PROG_SPLICE_MSG;
    let map = ebpf
        .map(mesh_common::SPLICE)
        .ok_or(KernelError::MissingProgram {
            name: mesh_common::SPLICE,
        })?;
    let splice =
        aya::maps::SockHash::<_, mesh_common::SpliceKey>::try_from(map).map_err(|source| {
            KernelError::Map {
                name: mesh_common::SPLICE,
                source,
            }
        })?;
    let map_fd = splice.fd().try_clone().map_err(|source| KernelError::Io {
        what: "duplicating the fd of",
        path: pins.map(mesh_common::SPLICE),
        source,
    })?;
    let prog: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })?;
    prog.load()
        .map_err(|source| KernelError::Program { name, source })?;
    let id = prog
        .attach(&map_fd)
        .map_err(|source| KernelError::Program { name, source })?;
    let link = prog
        .take_link(id)
        .map_err(|source| KernelError::Program { name, source })?;
    std::mem::forget(link);
    let path = pins.prog(name);
    prog.pin(&path)
        .map_err(|source| KernelError::Pin { path, source })
}

/// Pins a program's link, so it stays attached after this process.
fn pin(
    name: &'static str,
    link: Result<FdLink, aya::programs::links::LinkError>,
    pins: &Pins,
) -> Result<(), KernelError> {
    let path = pins.link(name);
    let link = link.map_err(|source| KernelError::Link {
        path: path.clone(),
        source,
    })?;
    link.pin(&path)
        .map(|_| ())
        .map_err(|source| KernelError::Pin { path, source })
}

/// Removes every sidenode pin on this bpffs: the links then detach and the maps go away once
/// no process holds them.
pub fn uninstall(pins: &Pins) -> Result<(), KernelError> {
    let root = pins.root();
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|source| KernelError::Io {
            what: "removing",
            path: root,
            source,
        })?;
    }
    Ok(())
}

fn check_cgroup2(path: &Path) -> Result<(), KernelError> {
    use std::os::unix::ffi::OsStrExt;
    let io = |source| KernelError::Io {
        what: "checking cgroup",
        path: path.to_path_buf(),
        source,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a cgroup v2 folder (--cgroup-root must be inside the cgroup2 mount, e.g. /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one; without the flag it is found in /proc/self/mountinfo)",
        )));
    }
    Ok(())
}

/// The machine's cgroup2 mount point, from /proc/self/mountinfo (see
/// [`super::mounts::cgroup2_mount_in`]: hybrid and pure v2 hosts).
pub fn default_cgroup_root() -> Option<PathBuf> {
    super::mounts::cgroup2_mount().ok()
}

#[cfg(test)]
mod tests {
    /// The names in mesh-common are the names in the object: the two sides cannot drift.
    #[test]
    fn object_defines_every_map_and_program_named_in_mesh_common() {
        let obj = aya_obj_names(super::OBJECT);
        for name in mesh_common::ALL_MAPS {
            assert!(
                obj.contains(&name.to_string()),
                "map {name} missing from the object"
            );
        }
        for name in super::PROGRAMS {
            assert!(
                obj.contains(&name.to_string()),
                "program {name} missing from the object"
            );
        }
    }

    /// Symbol names in the ELF string table (enough to find map and program names).
    fn aya_obj_names(data: &[u8]) -> Vec<String> {
        data.split(|b| *b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .map(str::to_string)
            .collect()
    }
}
