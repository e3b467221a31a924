//! Sockets the proxy opens: marked, so the capture programs never take them. The gateway runs
//! in a pod of its own that nothing captures, without `CAP_NET_ADMIN` (needed for `SO_MARK`):
//! it turns the marking off for its process ([`unmarked_process`]).
//!
//! A socket may also be made inside a local pod's network namespace ([`PodNetns`]): HBONE
//! tunnels leave from the source pod's address that way ([`connect_from`]).

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_common::ports::PROXY_MARK;
use tokio::net::{TcpSocket, TcpStream};

static UNMARKED: AtomicBool = AtomicBool::new(false);

/// This process's sockets are not marked: it runs where no capture program is attached (the
/// gateway's own pod) and may lack the privilege to mark.
pub fn unmarked_process() {
    UNMARKED.store(true, Ordering::Relaxed);
}

/// A local pod's network namespace, held open while the pod is served (`proxy::pod`), and
/// the pod it belongs to.
#[derive(Clone, Debug)]
pub struct PodNetns {
    /// The pod's uid.
    pub uid: String,
    pub file: Arc<File>,
}

impl PartialEq for PodNetns {
    fn eq(&self, other: &Self) -> bool {
        self.uid == other.uid
    }
}

/// Dials `dst` from a socket carrying the proxy's mark (no capture loop), with a deadline.
pub async fn connect_marked(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if !UNMARKED.load(Ordering::Relaxed) {
        socket2::SockRef::from(&sock).set_mark(PROXY_MARK)?;
    }
    sock.set_nodelay(true)?;
    connect_within(sock, dst, timeout).await
}

/// Dials `dst` as [`connect_marked`] does, but from inside the pod's namespace `from` when
/// given: the connection leaves from the pod's address. If that socket cannot be made (the
/// namespace is gone), the error says so; the caller decides whether to fall back.
pub async fn connect_from(
    from: Option<&PodNetns>,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(ns) = from else {
        return connect_marked(dst, timeout).await;
    };
    let s = crate::kernel::inpod::pod_socket(&ns.file, dst).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("socket in the network namespace of pod {}: {e}", ns.uid),
        )
    })?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(OwnedFd::from(s)));
    connect_within(sock, dst, timeout).await
}

async fn connect_within(
    sock: TcpSocket,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Closes with a reset, so the peer learns at once that the connection failed.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
