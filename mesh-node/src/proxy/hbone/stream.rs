//! One HBONE tunnel's stream, on `h2` directly (as ztunnel does), and the copy between it and
//! a TCP socket.
//!
//! Why not `hyper::upgrade` and `tokio::io::copy_bidirectional`: hyper's upgraded HTTP/2
//! stream copies every write into a new boxed buffer and hands it through a channel to a task
//! of its own (one more task wake-up per write), and copies every read out of h2's buffer
//! again. Here a read from the socket goes into a `BytesMut` that becomes the DATA frame's
//! payload as it is (no copy until TLS encrypts it), and a received DATA frame is written to
//! the socket straight from h2's buffer. Flow-control credit is given back to the peer only
//! once the bytes are written to the socket, so a slow reader slows the sender.
//!
//! Buffers grow with the flow: a direction starts reading [`MIN_BUF`] at a time and doubles
//! (up to [`MAX_BUF`]) each time a read fills what it was offered, so a chatty connection
//! holds little and a bulk one moves big frames; one waiting for its socket holds no read
//! buffer at all (it takes one when the socket becomes readable).
//!
//! Stream ends follow hyper's mapping, as before: END_STREAM or a reset with `NO_ERROR` or
//! `CANCEL` is the end of that direction (FIN to the socket); any other reset is an error.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::telemetry::conn::Meter;

/// First read size of a direction.
pub const MIN_BUF: usize = 16 * 1024;
/// Largest read size of a busy direction.
pub const MAX_BUF: usize = 256 * 1024;

/// An open HBONE stream: the `CONNECT` was answered `200`.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// A client tunnel's place on its pooled connection, given back when the stream ends.
    slot: Option<super::pool::StreamSlot>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            slot: None,
        }
    }

    /// The stream holds `slot` until it is dropped.
    pub fn holding(mut self, slot: super::pool::StreamSlot) -> H2Stream {
        self.slot = Some(slot);
        self
    }

    /// The stream as an ordinary byte pipe (`AsyncRead + AsyncWrite`), for the paths that
    /// parse what flows (HTTP per request).
    pub fn into_io(self) -> H2Io {
        H2Io {
            stream: self,
            unread: Bytes::new(),
        }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("h2 I/O error"),
        }
    } else {
        io::Error::other(e)
    }
}

/// What a received error means for the reading direction: `Ok(())` the end of it.
fn recv_error(e: h2::Error) -> io::Result<()> {
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
        Some(Reason::STREAM_CLOSED) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
        _ => Err(h2_to_io(e)),
    }
}

/// The next chunk of the stream; `None` at its end.
fn poll_chunk(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        return Poll::Ready(match ready!(recv.poll_data(cx)) {
            None => Ok(None),
            Some(Ok(b)) if b.is_empty() && !recv.is_end_stream() => continue,
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => recv_error(e).map(|()| None),
        });
    }
}

/// Waits until the stream may send at least one byte; the bytes it may send.
async fn capacity(send: &mut SendStream<Bytes>, want: usize) -> io::Result<usize> {
    send.reserve_capacity(want);
    loop {
        let c = send.capacity();
        if c > 0 {
            return Ok(c);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => return Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// Copies both ways between `tcp` and `stream` until both directions are done. The end of
/// one direction (FIN from the socket, END_STREAM from the peer) is passed on and the other
/// goes on (half-close); an error in either ends both. `from_tcp` and `from_h2` count the
/// bytes of each direction. Returns (socket → stream, stream → socket) bytes.
pub async fn copy(
    tcp: &mut TcpStream,
    stream: H2Stream,
    from_tcp: &mut Meter,
    from_h2: &mut Meter,
) -> io::Result<(u64, u64)> {
    let H2Stream {
        send,
        recv,
        slot: _slot,
    } = stream;
    let (r, w) = tcp.split();
    tokio::try_join!(tcp_to_h2(r, send, from_tcp), h2_to_tcp(recv, w, from_h2))
}

async fn tcp_to_h2(
    mut r: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    meter: &mut Meter,
) -> io::Result<u64> {
    let mut reader = SocketReader::new();
    loop {
        let Some(mut data) = reader.next(&mut r, meter).await? else {
            send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            return Ok(reader.total);
        };
        while !data.is_empty() {
            let cap = capacity(&mut send, data.len()).await?;
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_to_io)?;
        }
    }
}

/// Reads a tunnel's socket in pieces that grow with the flow (both transports' copies).
pub(super) struct SocketReader {
    buf: BytesMut,
    size: usize,
    /// Bytes read so far.
    pub total: u64,
}

impl SocketReader {
    pub fn new() -> SocketReader {
        SocketReader {
            buf: BytesMut::new(),
            size: MIN_BUF,
            total: 0,
        }
    }

    /// What the socket has next, counted in `meter`; `None` at its end (FIN).
    pub async fn next(
        &mut self,
        r: &mut ReadHalf<'_>,
        meter: &mut Meter,
    ) -> io::Result<Option<Bytes>> {
        loop {
            // An idle tunnel holds no read buffer: when the socket has nothing to read, give
            // the buffer back and wait for data before taking one. (Holding MIN_BUF per
            // waiting tunnel cost 16 KiB of heap per idle connection: 160 MB for 10,000,
            // pages that became resident once the allocator handed them out a second time.)
            // A busy flow finds the socket readable and keeps its buffer.
            if r.readable().now_or_never().is_none() {
                self.idle(r, meter).await?;
            }
            // Read into what is left of the current buffer while it is worth it. Else a
            // buffer of `size`: the same allocation again when the transport has written out
            // (and dropped) what was sent from it, so a steady flow does not allocate (and
            // fault in) new memory per read.
            if self.buf.capacity() < self.size / 2 {
                self.buf.reserve(self.size);
            }
            let offered = self.buf.capacity().saturating_sub(self.buf.len());
            // Through `poll_read`, not `try_read_buf`: tokio's `poll_read` takes a read that
            // did not fill the buffer as proof the socket is drained (epoll is edge-triggered)
            // and waits for the next edge, where `try_read_buf` would make one more
            // `recvfrom` to learn it (one wasted system call per read of a chatty
            // connection). Polled once: a readiness that finds no data (a fresh socket starts
            // readable) waits without the buffer, as above.
            let read = {
                let mut read = std::pin::pin!(r.read_buf(&mut self.buf));
                poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await
            };
            let n = match read {
                Poll::Ready(n) => n?,
                Poll::Pending => {
                    self.idle(r, meter).await?;
                    continue;
                }
            };
            if n == 0 {
                return Ok(None);
            }
            self.total += n as u64;
            meter.add(n);
            if n == offered && self.size < MAX_BUF {
                self.size *= 2;
            }
            return Ok(Some(self.buf.split().freeze()));
        }
    }

    /// The socket has nothing to read: publish the flow's count (it pauses), give back the
    /// read buffer, and wait until the socket is readable.
    ///
    /// Through `poll_read_ready`, not `readable()`: a read also comes back `Pending` when the
    /// task has used up its tokio budget (cooperative scheduling), though the socket has data.
    /// `readable()` does not count against the budget and would answer at once, so the loop
    /// would read, get `Pending`, wait, and read again without ever giving the worker back:
    /// a busy loop that starves the other direction of the same task (seen with QUIC, whose
    /// sends complete at once). `poll_read_ready` is budgeted, so the task yields and resumes.
    async fn idle(&mut self, r: &ReadHalf<'_>, meter: &mut Meter) -> io::Result<()> {
        meter.flush();
        self.buf = BytesMut::new();
        poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await
    }
}

/// What the tunnel's stream has next (`poll` polled until ready). When it has nothing yet the
/// flow pauses: the meter's count is published first, so counts never wait for the next burst
/// (both transports' stream → socket copies).
pub(super) async fn next_or_pause<T>(
    meter: &mut Meter,
    mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> T {
    match poll_fn(|cx| Poll::Ready(poll(cx))).await {
        Poll::Ready(v) => v,
        Poll::Pending => {
            meter.flush();
            poll_fn(poll).await
        }
    }
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    mut w: WriteHalf<'_>,
    meter: &mut Meter,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let chunk = next_or_pause(meter, |cx| poll_chunk(&mut recv, cx)).await?;
        let Some(data) = chunk else {
            w.shutdown().await?;
            return Ok(total);
        };
        let n = data.len();
        w.write_all(&data).await?;
        // Credit back only what the socket took.
        let _ = recv.flow_control().release_capacity(n);
        total += n as u64;
        meter.add(n);
    }
}

/// An [`H2Stream`] as `AsyncRead + AsyncWrite` (each write is copied into a frame).
pub struct H2Io {
    stream: H2Stream,
    /// Received and not read yet.
    unread: Bytes,
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.unread.is_empty() {
            match ready!(poll_chunk(&mut me.stream.recv, cx))? {
                Some(b) => me.unread = b,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = me.unread.len().min(buf.remaining());
        buf.put_slice(&me.unread[..n]);
        me.unread.advance(n);
        let _ = me.stream.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.get_mut().stream.send;
        send.reserve_capacity(buf.len());
        loop {
            let c = send.capacity();
            if c > 0 {
                let n = c.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what was sent.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let send = &mut self.get_mut().stream.send;
        // Already ended or reset: nothing more to end.
        let _ = send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::conn::{ConnMeta, Tracked, open_connections};
    use crate::telemetry::istio::Reporter;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A stream pair (client end, server end) over an in-memory HTTP/2 connection.
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (c_io, s_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s_io).await.expect("server handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("a request");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("respond");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (mut client, conn) = h2::client::handshake(c_io).await.expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("127.0.0.1:1")
            .body(())
            .expect("request");
        let (resp, send) = client.send_request(req, false).expect("send");
        let resp = resp.await.expect("response");
        let server_end = server.await.expect("server task");
        (H2Stream::new(send, resp.into_body()), server_end)
    }

    /// A read refused only because the task spent its tokio budget must make the task yield
    /// (and resume with a new budget), not wait on a readiness that is already there: that
    /// loop never gave the worker back (QUIC tunnels stalled on it, `h3_stream`).
    #[test]
    fn a_read_refused_by_the_task_budget_yields_instead_of_spinning() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _g = crate::telemetry::test_lock();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let got = rt.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                let mut app = TcpStream::connect(addr).await.expect("connect");
                let (mut sock, _) = listener.accept().await.expect("accept");
                app.write_all(b"hello").await.expect("write");
                sock.readable().await.expect("readable");
                let tracked = Tracked::open(meta("budget-test"));
                let (mut meter, _other) = tracked.meters();
                // Spend the task's whole budget (each message received costs one unit)
                // without yielding.
                let (btx, mut brx) = tokio::sync::mpsc::unbounded_channel();
                for i in 0..1000 {
                    btx.send(i).expect("send");
                }
                poll_fn(|cx| {
                    for _ in 0..1000 {
                        if brx.poll_recv(cx).is_pending() {
                            break;
                        }
                    }
                    Poll::Ready(())
                })
                .await;
                let (mut r, _w) = sock.split();
                let mut reader = SocketReader::new();
                let data = reader.next(&mut r, &mut meter).await.expect("read");
                data.map(|b| b.to_vec())
            });
            let _ = tx.send(got);
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the reader spun without giving its worker back");
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn meta(ns: &str) -> ConnMeta {
        crate::telemetry::conn::test_meta(ns, Reporter::Source)
    }

    // The guard serializes the tests that share the process-wide registry; holding it across
    // the awaits is the point.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts_exactly() {
        let _g = crate::telemetry::test_lock();
        let (client_end, server_end) = stream_pair().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut app = TcpStream::connect(addr).await.expect("connect");
        let (mut proxy_side, _) = listener.accept().await.expect("accept");

        let tracked = Tracked::open(meta("stream-test"));
        let (mut received, mut sent) = tracked.meters();
        let copy = tokio::spawn(async move {
            let r = copy(&mut proxy_side, server_end, &mut received, &mut sent).await;
            drop((received, sent));
            r
        });
        // 3 MiB up (grows the read buffer to its largest), 2 MiB down, each direction closed
        // on its own.
        let (up, down) = (pattern(3 << 20, 1), pattern(2 << 20, 7));
        let mut far = client_end.into_io();
        let (up2, down2) = (up.clone(), down.clone());
        let app_task = tokio::spawn(async move {
            app.write_all(&up2).await.expect("app write");
            app.shutdown().await.expect("app shutdown");
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.expect("app read");
            assert!(
                got == down2,
                "the app got other bytes ({} bytes)",
                got.len()
            );
        });
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("far read");
        assert!(
            got == up,
            "the far end got other bytes ({} bytes)",
            got.len()
        );
        // Half-closed: the other direction still flows.
        far.write_all(&down).await.expect("far write");
        far.shutdown().await.expect("far shutdown");
        app_task.await.expect("app task");
        let copied = copy.await.expect("copy task").expect("copy");
        assert_eq!(copied, (up.len() as u64, down.len() as u64));
        let me = open_connections()
            .into_iter()
            .find(|c| c.src_namespace == "stream-test")
            .expect("listed");
        assert_eq!(
            (me.bytes_received, me.bytes_sent),
            (up.len() as u64, down.len() as u64)
        );
        tracked.close("-", None);
    }

    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn a_cancelled_stream_ends_the_direction_and_an_error_ends_the_copy() {
        let _g = crate::telemetry::test_lock();
        let (client_end, server_end) = stream_pair().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut app = TcpStream::connect(addr).await.expect("connect");
        let (mut proxy_side, _) = listener.accept().await.expect("accept");
        let tracked = Tracked::open(meta("stream-test-reset"));
        let (mut received, mut sent) = tracked.meters();
        let copy = tokio::spawn(async move {
            copy(&mut proxy_side, server_end, &mut received, &mut sent).await
        });
        // The far side goes away without END_STREAM: h2 resets the stream (CANCEL), which the
        // app sees as the end of what it reads; its next write then fails the copy.
        drop(client_end);
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.expect("app read");
        assert!(got.is_empty());
        let _ = app.write_all(b"more").await;
        let _ = app.shutdown().await;
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), copy)
            .await
            .expect("the copy ends")
            .expect("copy task");
        assert!(r.is_err(), "a write to a reset stream is an error: {r:?}");
        tracked.close("DC", None);
    }
}
