//! Network-namespace cookies: the key the kernel programs use to tell an enrolled pod.
//!
//! The kernel offers a namespace's cookie only from inside it, so a short-lived thread enters
//! the namespace (`setns`), opens a socket and reads `SO_NETNS_COOKIE`. Only that thread
//! changes namespace; it ends right after.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::KernelError;

const SO_NETNS_COOKIE: libc::c_int = 71;

/// A namespace file's identity (device, inode): stable while the namespace lives.
pub fn netns_id(path: &Path) -> Result<(u64, u64), KernelError> {
    let md = std::fs::metadata(path).map_err(|source| netns_err(path, source))?;
    Ok((md.dev(), md.ino()))
}

fn netns_err(path: &Path, source: std::io::Error) -> KernelError {
    KernelError::Netns {
        path: path.to_path_buf(),
        source,
    }
}

/// The cookie of the network namespace at `path` (for example `/var/run/netns/NAME` or
/// `/proc/PID/ns/net`).
pub fn netns_cookie(path: &Path) -> Result<u64, KernelError> {
    let file = File::open(path).map_err(|source| netns_err(path, source))?;
    let owned: PathBuf = path.to_path_buf();
    let joined = std::thread::Builder::new()
        .name("netns-cookie".into())
        .spawn(move || cookie_inside(&file))
        .map_err(|source| netns_err(&owned, source))?
        .join();
    match joined {
        Ok(r) => r.map_err(|source| netns_err(path, source)),
        Err(_) => Err(netns_err(
            path,
            std::io::Error::other("cookie thread panicked"),
        )),
    }
}

fn cookie_inside(ns: &File) -> std::io::Result<u64> {
    // SAFETY: setns on a valid fd; it only changes this thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket_cookie()
}

pub(crate) fn socket_cookie() -> std::io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out-pointer and length describe `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A listening TCP socket created inside the network namespace at `path` (it keeps working
/// from any thread afterwards). Non-blocking, ready for tokio.
pub fn bind_in_netns(
    path: &Path,
    addr: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpListener> {
    let file = File::open(path)?;
    std::thread::Builder::new()
        .name("netns-bind".into())
        .spawn(move || {
            // SAFETY: setns on a valid fd; it only changes this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            sock.set_reuse_address(true)?;
            sock.set_mark(mesh_common::ports::PROXY_MARK)?;
            sock.bind(&addr.into())?;
            sock.listen(1024)?;
            sock.set_nonblocking(true)?;
            Ok(sock.into())
        })?
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
}
