//! The read buffer under an HBONE connection's userspace TLS, given back when the connection
//! goes quiet.
//!
//! rustls asks its transport for at most 4 KiB more than it holds, so a buffer under it turns
//! the reads of a bulk flow into one `read` per [`super::TLS_READ_BUF`] bytes. tokio's
//! `BufReader` keeps that buffer for the connection's life, and once a flow has written it,
//! every page of it stays resident: with a pooled connection per source pod and destination,
//! idle ones each kept 64 KiB on both sides (of the ~180 / ~125 KB a pooled connection held
//! after carrying a flow, measured with 20 of them).
//!
//! [`QuietBuf`] reads like `BufReader` and drops its buffer when the socket has nothing more
//! to give after a fill that followed a quiet spell of [`QUIET`] — on an idle pooled
//! connection, the keepalive `PING` (every 30 s) or its answer. A connection in use fills
//! more often than that and keeps its buffer; the next read after a release takes a new one.
//! Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A fill that comes this long after the one before marks the connection as quiet.
pub const QUIET: Duration = Duration::from_secs(1);

/// A buffered reader over `T` that frees its buffer when the connection goes quiet.
#[derive(Debug)]
pub struct QuietBuf<T> {
    inner: T,
    /// Empty when released (no memory held).
    buf: Vec<u8>,
    /// Buffered bytes are `buf[pos..filled]`.
    pos: usize,
    filled: usize,
    cap: usize,
    last_fill: Option<Instant>,
    /// The last fill came after a quiet spell: release once it is drained and nothing follows.
    quiet: bool,
    /// The buffer was given back: reads go straight to the caller until the connection is
    /// busy again.
    released: bool,
}

impl<T> QuietBuf<T> {
    /// A reader over `inner` reading up to `cap` bytes at a time. Nothing is allocated until
    /// the first read.
    pub fn new(inner: T, cap: usize) -> QuietBuf<T> {
        QuietBuf {
            inner,
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            cap: cap.max(1),
            last_fill: None,
            quiet: false,
            released: false,
        }
    }

    /// Whether the buffer is held now (for tests).
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for QuietBuf<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.filled {
            // Released, or a large read: straight into the caller's buffer (large reads skip
            // the buffer as BufReader's do). A released reader takes a buffer again once
            // data comes in quick succession (the connection is in use again), not for a
            // lone ping.
            if me.released || out.remaining() >= me.cap {
                let before = out.filled().len();
                let r = Pin::new(&mut me.inner).poll_read(cx, out);
                if me.released && matches!(r, Poll::Ready(Ok(()))) && out.filled().len() > before {
                    let now = Instant::now();
                    if me.last_fill.is_some_and(|t| now.duration_since(t) < QUIET) {
                        me.released = false;
                    }
                    me.last_fill = Some(now);
                }
                return r;
            }
            if me.buf.is_empty() {
                // Zeroed once per allocation: the first fill, or the first after a release.
                me.buf = vec![0; me.cap];
            }
            let mut rb = ReadBuf::new(&mut me.buf);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if me.quiet {
                        me.buf = Vec::new();
                        me.released = true;
                        me.quiet = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    me.pos = 0;
                    me.filled = rb.filled().len();
                    let now = Instant::now();
                    me.quiet = me.last_fill.is_some_and(|t| now.duration_since(t) >= QUIET);
                    me.last_fill = Some(now);
                }
            }
        }
        let n = (me.filled - me.pos).min(out.remaining());
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for QuietBuf<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_arrive_in_order_and_a_quiet_connection_gives_its_buffer_back() {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut r = QuietBuf::new(ours, 64 * 1024);
        assert!(!r.holds_buffer(), "nothing allocated before the first read");

        // A flow: many small reads, as rustls makes them, see every byte in order.
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.expect("write");
        let mut got = vec![0u8; sent.len()];
        for chunk in got.chunks_mut(4096) {
            r.read_exact(chunk).await.expect("read");
        }
        assert_eq!(got, sent);
        assert!(r.holds_buffer());

        // Drained, in use (fills close together): the buffer stays.
        let mut one = [0u8; 100];
        assert!(
            tokio::time::timeout(Duration::from_millis(10), r.read(&mut one))
                .await
                .is_err()
        );
        assert!(r.holds_buffer(), "released while the connection was busy");

        // A ping after a quiet spell: read, then nothing more: released.
        tokio::time::sleep(QUIET + Duration::from_millis(50)).await;
        peer.write_all(b"ping").await.expect("io");
        let n = r.read(&mut one).await.expect("io");
        assert_eq!(&one[..n], b"ping");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), r.read(&mut one))
                .await
                .is_err()
        );
        assert!(!r.holds_buffer(), "a quiet connection kept its read buffer");

        // Another lone message after a quiet spell is read without taking a buffer.
        tokio::time::sleep(QUIET + Duration::from_millis(50)).await;
        peer.write_all(b"ping2").await.expect("io");
        let n = r.read(&mut one).await.expect("io");
        assert_eq!(&one[..n], b"ping2");
        assert!(!r.holds_buffer(), "a lone ping took a buffer");

        // Data in quick succession: the connection is busy again and buffers; the end of the
        // stream still reads as EOF.
        peer.write_all(b"again").await.expect("io");
        drop(peer);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.expect("io");
        assert_eq!(rest, b"again");
        assert!(
            r.holds_buffer(),
            "a busy connection read without its buffer"
        );
    }
}
