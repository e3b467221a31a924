//! Installing the kernel programs once per node, or adopting the ones already pinned.
//!
//! First start: load the object (maps pinned by name under `<bpffs>/sidenode/maps/`), attach
//! `sn_connect4`, `sn_connect6`, `sn_sockops` and `sn_strict_in` to the cgroup root with bpf
//! links, and pin the links under `<bpffs>/sidenode/links/`. Later starts find every link pin
//! and adopt them: nothing is detached or reloaded, so capture never stops across agent
//! restarts. An agent started on pins left by an older version (some programs pinned, newer
//! ones missing) keeps the pinned ones and attaches only the missing ones, sharing the pinned
//! maps (a map the old object did not have is created and pinned).
//!
//! An agent whose program object differs from the installed one (recorded in `SN_META`)
//! replaces the programs in place: the new object is loaded against the pinned maps and each
//! pinned link is pointed at its new program (`BPF_LINK_UPDATE`, atomic: every connect is
//! seen by the old program or the new one, none by neither); the `sk_msg` program is
//! re-attached to its sockhash, which swaps it. Capture never stops. It does so only when
//! every pinned map's layout is the one this agent's object expects (the layout version in
//! `SN_META`, and each map's key and value sizes); otherwise it refuses, naming the map,
//! rather than have new programs misread old entries.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
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
    /// Found pinned from an earlier run of the same object and kept as they were.
    Adopted,
    /// Some found pinned, the missing ones (newer programs) attached now, and the pinned
    /// ones replaced in place by this object's.
    Upgraded,
    /// Every program found pinned from another object: replaced in place by this object's.
    Replaced,
}

/// Which program object to install: the embedded one, told apart from others by a hash of
/// its bytes and `build_id` (`mesh-node agent --ebpf-build-id`, a testing aid: another id
/// makes the same bytes count as another object).
#[derive(Clone, Copy, Debug, Default)]
pub struct ObjectChoice {
    pub build_id: u64,
    /// Entries of `SN_ORIG_DST` when the agent creates it (`mesh-node agent --orig-dst-max`;
    /// `None`: `mesh_common::ORIG_DST_MAX`). A map already pinned keeps its size.
    pub orig_dst_max: Option<u32>,
}

impl ObjectChoice {
    /// The id recorded in `SN_META`.
    pub fn id(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        OBJECT.hash(&mut h);
        self.build_id.hash(&mut h);
        // 0 means "nothing recorded".
        h.finish().max(1)
    }
}

/// Loads and attaches, adopts, or replaces in place; then opens the maps.
pub fn install(
    pins: &Pins,
    cgroup_root: &Path,
    object: ObjectChoice,
) -> Result<(NodeMaps, Install), KernelError> {
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
    let recorded = read_meta(pins);
    let same_object = recorded.is_some_and(|(_, id)| id == object.id());
    let how = if live.iter().all(|l| *l) && same_object {
        info!(bpffs = %pins.bpffs().display(), "adopting pinned programs and maps");
        Install::Adopted
    } else if live.iter().all(|l| *l) {
        check_layout(pins, recorded.map(|(layout, _)| layout))?;
        let all: Vec<&'static str> = PROGRAMS
            .iter()
            .chain(&[mesh_common::PROG_SPLICE_MSG])
            .copied()
            .collect();
        attach(pins, cgroup_root, object, &[], &all)?;
        info!(bpffs = %pins.bpffs().display(), programs = ?all, "replaced the pinned programs in place with this agent's (BPF_LINK_UPDATE); maps kept");
        Install::Replaced
    } else {
        for (l, ok) in links.iter().zip(&live) {
            if !ok && l.exists() {
                warn!(path = %l.display(), "removing a stale link pin");
                let _ = std::fs::remove_file(l);
            }
        }
        let (missing, kept): (Vec<_>, Vec<_>) = PROGRAMS
            .iter()
            .chain(&[mesh_common::PROG_SPLICE_MSG])
            .zip(&live)
            .partition(|(_, ok)| !**ok);
        let missing: Vec<&'static str> = missing.into_iter().map(|(p, _)| *p).collect();
        let kept: Vec<&'static str> = kept.into_iter().map(|(p, _)| *p).collect();
        if !kept.is_empty() {
            check_layout(pins, recorded.map(|(layout, _)| layout))?;
        }
        attach(pins, cgroup_root, object, &missing, &kept)?;
        if missing.len() == PROGRAMS.len() + 1 {
            info!(cgroup = %cgroup_root.display(), bpffs = %pins.bpffs().display(), "attached capture programs");
            Install::Fresh
        } else {
            info!(cgroup = %cgroup_root.display(), bpffs = %pins.bpffs().display(), attached = ?missing, "adopted pinned programs and attached the missing ones");
            Install::Upgraded
        }
    };
    write_meta(pins, object)?;
    if let Some(want) = object.orig_dst_max
        && let Ok(info) = aya::maps::MapInfo::from_pin(pins.map(mesh_common::ORIG_DST))
        && info.max_entries() != want
    {
        warn!(
            pinned = info.max_entries(),
            asked = want,
            "SN_ORIG_DST is pinned with another size and keeps it (`mesh-node uninstall` and a \
             fresh install resize it)"
        );
    }
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

/// Loads the object (maps pinned by name; those already pinned are reused), attaches the
/// programs in `which` and replaces the pinned ones in `replace` in place.
fn attach(
    pins: &Pins,
    cgroup_root: &Path,
    object: ObjectChoice,
    which: &[&'static str],
    replace: &[&'static str],
) -> Result<(), KernelError> {
    // The programs use no CO-RE relocations, so the kernel's BTF (megabytes to parse) is not
    // loaded: it would only raise the agent's peak memory.
    let mut loader = EbpfLoader::new();
    loader.btf(None).default_map_pin_directory(pins.maps_dir());
    if let Some(n) = object.orig_dst_max {
        loader.map_max_entries(mesh_common::ORIG_DST, n);
    }
    let mut ebpf: Ebpf = loader
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
    for name in replace {
        match *name {
            mesh_common::PROG_CONNECT4 | mesh_common::PROG_CONNECT6 => {
                replace_linked!(ebpf, CgroupSockAddr, *name, pins)
            }
            mesh_common::PROG_SOCKOPS => replace_linked!(ebpf, SockOps, *name, pins),
            mesh_common::PROG_STRICT_IN => replace_linked!(ebpf, CgroupSkb, *name, pins),
            mesh_common::PROG_SPLICE_MSG => {
                // Attaching to the sockhash swaps its verdict program (sockets already in
                // the map keep the one they joined with until they close); then the pin
                // names the new one.
                let path = pins.prog(mesh_common::PROG_SPLICE_MSG);
                let _ = std::fs::remove_file(&path);
                attach_splice(&mut ebpf, pins)?
            }
            other => return Err(KernelError::MissingProgram { name: other }),
        }
    }
    Ok(())
}

/// Loads program `$name` of type `$ty` from the new object and points its pinned link at it.
macro_rules! replace_linked {
    ($ebpf:expr, $ty:ty, $name:expr, $pins:expr) => {{
        let name: &'static str = $name;
        let prog: &mut $ty = $ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.load()
            .map_err(|source| KernelError::Program { name, source })?;
        let fd = prog
            .fd()
            .map_err(|source| KernelError::Program { name, source })?;
        let path = $pins.link(name);
        obj_get(&path)
            .and_then(|link| link_update(link.as_fd(), fd.as_fd()))
            .map_err(|source| KernelError::Io {
                what: "replacing the program of link",
                path,
                source,
            })?;
    }};
}
use replace_linked;

/// `BPF_OBJ_GET`: an fd of the object pinned at `path` (aya keeps a pinned link's fd private).
fn obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    /// `union bpf_attr`'s object member, up to `file_flags`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = aya_obj::generated::bpf_cmd::BPF_OBJ_GET as libc::c_long;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) reads `attr` and the NUL-terminated path it points to, both alive through
    // the call; a non-negative result is a new fd that we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `rc` is a fresh fd returned to us by the kernel.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// `BPF_LINK_UPDATE`: the link `link` runs `prog` from now on (atomically).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    /// `union bpf_attr`'s `link_update` member.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long =
        aya_obj::generated::bpf_cmd::BPF_LINK_UPDATE as libc::c_long;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<LinkUpdate>()` bytes of `attr`, which lives through the
    // call; both fds are open (borrowed).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdate,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The layout version and object id recorded in the pinned `SN_META`; `None` when there is
/// none (a fresh node, or pins of a version before it existed).
fn read_meta(pins: &Pins) -> Option<(u64, u64)> {
    let meta: aya::maps::Array<aya::maps::MapData, u64> =
        super::maps::open_typed(pins, mesh_common::META).ok()?;
    let layout = meta.get(&mesh_common::META_LAYOUT, 0).ok()?;
    let id = meta.get(&mesh_common::META_OBJECT, 0).ok()?;
    (layout != 0).then_some((layout, id))
}

fn write_meta(pins: &Pins, object: ObjectChoice) -> Result<(), KernelError> {
    let mut meta: aya::maps::Array<aya::maps::MapData, u64> =
        super::maps::open_typed(pins, mesh_common::META)?;
    let err = |source| KernelError::Map {
        name: mesh_common::META,
        source,
    };
    meta.set(mesh_common::META_LAYOUT, mesh_common::LAYOUT_VERSION, 0)
        .map_err(err)?;
    meta.set(mesh_common::META_OBJECT, object.id(), 0)
        .map_err(err)
}

/// Refuses to run new programs over pinned maps of another layout: the recorded layout
/// version (pins from before it existed count as 1) must be this agent's, and every pinned
/// map must have the key and value sizes this object declares.
fn check_layout(pins: &Pins, recorded: Option<u64>) -> Result<(), KernelError> {
    let pinned = recorded.unwrap_or(1);
    if pinned != mesh_common::LAYOUT_VERSION {
        return Err(KernelError::Layout {
            what: format!(
                "the pinned maps have layout version {pinned}, this agent's programs need {}",
                mesh_common::LAYOUT_VERSION
            ),
        });
    }
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| KernelError::Layout {
        what: format!("parsing this agent's object: {e}"),
    })?;
    for name in mesh_common::ALL_MAPS {
        let Ok(data) = aya::maps::MapData::from_pin(pins.map(name)) else {
            continue; // not pinned yet: created by the new object
        };
        let (Ok(info), Some(want)) = (data.info(), obj.maps.get(name)) else {
            continue;
        };
        if info.key_size() != want.key_size() || info.value_size() != want.value_size() {
            return Err(KernelError::Layout {
                what: format!(
                    "pinned map {name} has key/value sizes {}/{}, this agent's programs need {}/{}",
                    info.key_size(),
                    info.value_size(),
                    want.key_size(),
                    want.value_size()
                ),
            });
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
