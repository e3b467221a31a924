//! Passing open file descriptors between processes over a Unix socket (`SCM_RIGHTS`): the
//! proxy hands its listening sockets to its successor this way (`proxy::handover`).
//!
//! One message carries its bytes and at most one descriptor. The socket is expected to be
//! `SOCK_SEQPACKET`, so message boundaries hold and a descriptor stays with its bytes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Sends `data` and, if given, a duplicate of `fd` (the kernel installs it in the receiver).
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    // Room for one `int` of ancillary data, aligned as the kernel wants it.
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(sizeof(int)) zeroed bytes, so the first
        // header and its data fit; the pointers come from the CMSG macros on that buffer.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::Error::other("no room for the descriptor"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers (see above).
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            if n as usize != data.len() {
                return Err(io::Error::other("message sent only in part"));
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf`: its length (0: the peer closed) and the descriptor it
/// carried, if any (close-on-exec). A message longer than `buf` or with more ancillary data
/// than one descriptor is an error (any descriptors received are closed).
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    // Room for a few descriptors, so a peer sending more is detected rather than truncated.
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(4 * std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; the pointers below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at live, writable buffers of the sizes given.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Take ownership of every descriptor first, so that none leaks on an error below.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the CMSG macros and within
    // `msg_controllen`; each SCM_RIGHTS entry holds descriptors now open in this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data as usize - cmsg as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "ancillary data truncated: more descriptors than expected",
        ));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other(format!(
            "message longer than {} bytes",
            buf.len()
        )));
    }
    if fds.len() > 1 {
        return Err(io::Error::other(format!(
            "{} descriptors in one message (expected at most one)",
            fds.len()
        )));
    }
    Ok((n, fds.pop()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_descriptor_travels_with_its_message() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("test");
        let (mut r, mut w) = std::os::unix::net::UnixStream::pair().expect("test");
        send(a.as_fd(), b"first", Some(w.as_fd())).expect("test");
        send(a.as_fd(), b"second", None).expect("test");
        let mut buf = [0u8; 64];
        let (n, fd) = recv(b.as_fd(), &mut buf).expect("test");
        assert_eq!(&buf[..n], b"first");
        let fd = fd.expect("a descriptor");
        // The received descriptor is the same pipe end: data written to it reaches `r`.
        let mut w2 = std::os::unix::net::UnixStream::from(fd);
        w2.write_all(b"x").expect("test");
        drop(w2);
        w.write_all(b"y").expect("test");
        let mut got = [0u8; 2];
        r.read_exact(&mut got).expect("test");
        assert_eq!(&got, b"xy");
        let (n, fd) = recv(b.as_fd(), &mut buf).expect("test");
        assert_eq!(&buf[..n], b"second");
        assert!(fd.is_none());
        drop(a);
        let (n, fd) = recv(b.as_fd(), &mut buf).expect("test");
        assert_eq!(n, 0);
        assert!(fd.is_none());
    }

    #[test]
    fn an_oversized_message_is_an_error() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("test");
        send(a.as_fd(), &[7u8; 100], None).expect("test");
        let mut buf = [0u8; 10];
        assert!(recv(b.as_fd(), &mut buf).is_err());
    }
}
