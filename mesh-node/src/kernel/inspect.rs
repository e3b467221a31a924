//! Read-only looks at the kernel side for `mesh-node doctor`: which filesystem a path is on,
//! and where a pinned cgroup link is attached (aya's `LinkInfo` does not expose the cgroup).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BPF_FS_MAGIC`: a bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC`: cgroup v2.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The filesystem type (`statfs.f_type`) of the filesystem `path` is on.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// A pinned cgroup link, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub link_id: u32,
    pub prog_id: u32,
    /// The cgroup's id: on cgroup v2, the inode number of its folder.
    pub cgroup_id: u64,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out `union bpf_attr` prefix of the size given;
    // the kernel reads and writes only within it (and the buffers it points to).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Where the link pinned at `pin` is attached. An error when the pin is missing, is not a
/// link, or is not a cgroup link.
pub fn cgroup_link(pin: &Path) -> io::Result<CgroupLink> {
    let c = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // `struct bpf_link_info`: type, id, prog_id (u32 each), then the union at offset 16;
    // for cgroup links `cgroup_id` (u64) then `attach_type` (u32).
    let mut info = [0u64; 16];
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // Read by byte offset (the struct's own layout), not by u64 word halves.
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .unwrap_or(0)
    };
    let link_type = u32_at(0);
    if link_type != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a cgroup link (link type {link_type})"),
        ));
    }
    let cgroup_id = bytes
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0);
    Ok(CgroupLink {
        link_id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id,
        attach_type: u32_at(24),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_types_and_a_missing_link() {
        // PROC_SUPER_MAGIC.
        assert_eq!(fs_magic(Path::new("/proc")).expect("statfs /proc"), 0x9fa0);
        assert!(fs_magic(Path::new("/nonexistent/sidenode")).is_err());
        let e =
            cgroup_link(Path::new("/nonexistent/sidenode/links/sn_connect4")).expect_err("no pin");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
