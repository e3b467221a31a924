//! Sockets the proxy opens: always marked, so the capture programs never take them.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_common::ports::PROXY_MARK;
use tokio::net::{TcpSocket, TcpStream};

/// Dials `dst` from a socket carrying the proxy's mark (no capture loop), with a deadline.
pub async fn connect_marked(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket2::SockRef::from(&sock).set_mark(PROXY_MARK)?;
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
