//! Carrying bytes between two TCP sockets without copying them through the proxy:
//! `splice(2)` from one socket into a pipe and from the pipe into the other. The kernel moves
//! references to the received pages instead of copying each byte into the proxy and out
//! again (as `tokio::io::copy_bidirectional` does), so a same-node meshed connection and a
//! plain pass-through cost the proxy only the two sockets' TCP work.
//!
//! Only where both ends are plain sockets: the tunnel's bytes pass through TLS in userspace.
//! Not for a socket the agent's experimental kernel splicing (`agent --splice`, the
//! `SN_SPLICE` sockhash) put in a sockhash: the kernel delivers that socket's bytes to a queue
//! `splice(2)` does not read, so the caller checks ([`crate::kernel::maps::ProxyMaps::spliced`])
//! and keeps the ordinary copy for those.
//!
//! Pipes are kept for reuse (see [`POOL_MAX`]): a new connection takes one per direction
//! without a system call, and gives it back empty when the direction ends.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::telemetry::conn::Meter;

/// Bytes a pipe holds at most (64 pages): what one `splice` moves from a busy socket, as the
/// largest read of the HBONE copy (`hbone::stream::MAX_BUF`) would.
pub const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept for reuse (two descriptors each).
pub const POOL_MAX: usize = 128;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(p);
        }
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // The default (16 pages) also works, in more, smaller moves.
        let _ = fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Pipe { read, write })
    }

    /// Back to the pool; only an empty pipe may be reused.
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

/// Copies both ways between `a` and `b` until both directions are done: the end of one
/// direction (FIN) is passed on with a half-close and the other goes on; an error in either
/// ends both. Each direction's bytes are added to its meters (`a_to_b`, `b_to_a`) as they
/// move and flushed whenever the direction waits. Returns (a → b, b → a) bytes.
pub async fn copy_bidirectional<const N: usize>(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &mut [Meter; N],
    b_to_a: &mut [Meter; N],
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, a_to_b), one_way(b, a, b_to_a))
}

async fn one_way(from: &TcpStream, to: &TcpStream, meters: &mut [Meter]) -> io::Result<u64> {
    let pipe = Pipe::take()?;
    let mut total = 0u64;
    // Bytes in the pipe, not yet moved on to `to`.
    let mut held = 0usize;
    loop {
        if held == 0 {
            let moved = from.try_io(Interest::READABLE, || {
                splice(
                    from,
                    None,
                    &pipe.write,
                    None,
                    PIPE_SIZE,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match moved {
                Ok(0) => {
                    // FIN: pass it on, keep the other direction.
                    pipe.give_back();
                    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                    return Ok(total);
                }
                Ok(n) => held = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    meters.iter_mut().for_each(Meter::flush);
                    from.readable().await?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let moved = to.try_io(Interest::WRITABLE, || {
            splice(
                &pipe.read,
                None,
                to,
                None,
                held,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        match moved {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                held -= n;
                total += n as u64;
                meters.iter_mut().for_each(|m| m.add(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                meters.iter_mut().for_each(Meter::flush);
                to.writable().await?;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    /// client ⇄ (a | relay | b) ⇄ server: 8 MiB each way, checked byte for byte, with a
    /// half-close from each side in turn; the counts come back exact.
    // The guard serializes the tests that share the process-wide registry; holding it across
    // the awaits is the point.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let _g = crate::telemetry::test_lock();
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let t = crate::telemetry::conn::Tracked::open(crate::telemetry::conn::test_meta(
                "zero-copy",
                crate::telemetry::istio::Reporter::Source,
            ));
            let (r, s) = t.meters();
            let r = copy_bidirectional(&a, &b, &mut [r], &mut [s]).await;
            t.close("-", None);
            r
        });
        let data: Vec<u8> = (0..8 << 20)
            .map(|i: u32| (i * 7 + i / 4099) as u8)
            .collect();
        let up = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up).await.expect("client write");
            client.shutdown().await.expect("client FIN");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("client read");
            back
        });
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).await.expect("server read");
        assert!(got == data, "bytes changed on the way to the server");
        assert_eq!(
            server.read(&mut [0u8; 1]).await.expect("EOF"),
            0,
            "FIN passed on"
        );
        let down: Vec<u8> = data.iter().rev().copied().collect();
        server.write_all(&down).await.expect("server write");
        drop(server);
        let back = writer.await.expect("client task");
        assert!(back == down, "bytes changed on the way back");
        let (ab, ba) = relay.await.expect("relay task").expect("relay result");
        assert_eq!((ab, ba), (data.len() as u64, down.len() as u64));
    }

    /// A reset on one side ends the copy with an error, not a hang.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn reset_ends_the_copy() {
        let _g = crate::telemetry::test_lock();
        let (client, a) = pair().await;
        let (b, _server) = pair().await;
        let relay = tokio::spawn(async move {
            let t = crate::telemetry::conn::Tracked::open(crate::telemetry::conn::test_meta(
                "zero-copy",
                crate::telemetry::istio::Reporter::Source,
            ));
            let (r, s) = t.meters();
            copy_bidirectional(&a, &b, &mut [r], &mut [s]).await
        });
        crate::proxy::socket::reset(client);
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("the copy ended")
            .expect("relay task");
        assert!(r.is_err(), "a reset is an error: {r:?}");
    }
}
