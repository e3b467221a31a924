//! Sockets the proxy opens: marked, so the capture programs never take them. The gateway runs
//! in a pod of its own that nothing captures, without `CAP_NET_ADMIN` (needed for `SO_MARK`):
//! it turns the marking off for its process ([`unmarked_process`]).

use std::net::SocketAddr;
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
