//! One HBONE tunnel's stream over HTTP/3, and the copy between it and a TCP socket: the QUIC
//! counterpart of [`super::stream`], used by both ends of a whole-connection tunnel.
//!
//! Why not the in-memory pipe (`quic::bridge`) the L7 paths use: the pipe costs a task and two
//! more copies of every byte, and it holds its buffers (a 64 KiB read chunk, two 64 KiB copy
//! buffers, the pipe's own) for the life of even an idle connection. Here a read from the
//! socket ([`SocketReader`], as the HTTP/2 copy: no buffer while the socket has nothing to
//! read) is the DATA frame's payload as it is, and a received DATA frame is written to the
//! socket straight from quinn's buffer. quinn's stream flow control paces both directions:
//! `send_data` waits for credit, and credit is given back as frames are taken.
//!
//! Stream ends: FIN from the socket finishes the stream; the stream's end shuts the socket's
//! write side (half-close). A reset or an error in either direction ends both.

use std::future::Future;
use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::WriteHalf;

use super::stream::{SocketReader, next_or_pause};
use crate::telemetry::conn::Meter;

/// The sending half of a tunnel's HTTP/3 stream (the client's or the server's).
pub trait H3Send: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    fn finish(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Resets the stream (`H3_REQUEST_CANCELLED`).
    fn cancel(&mut self);
}

/// The receiving half of a tunnel's HTTP/3 stream.
pub trait H3Recv: Send {
    /// The next DATA frame's payload; `None` at the end of the stream.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
}

pub type ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;
pub type ServerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
pub type ServerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

macro_rules! halves {
    ($send:ty, $recv:ty) => {
        impl H3Send for $send {
            fn send(
                &mut self,
                data: Bytes,
            ) -> impl Future<Output = Result<(), StreamError>> + Send {
                self.send_data(data)
            }
            fn finish(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send {
                <$send>::finish(self)
            }
            fn cancel(&mut self) {
                self.stop_stream(Code::H3_REQUEST_CANCELLED);
            }
        }
        impl H3Recv for $recv {
            fn poll_data(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<Bytes>, StreamError>> {
                self.poll_recv_data(cx)
                    .map(|r| r.map(|b| b.map(|mut b| b.copy_to_bytes(b.remaining()))))
            }
        }
    };
}

halves!(ClientSend, ClientRecv);
halves!(ServerSend, ServerRecv);

/// An open HBONE/QUIC stream (the `CONNECT` was answered `200`), with what must live as long
/// as it (a client's pooled stream slot and connection handle).
pub struct H3Stream<S, R> {
    pub send: S,
    pub recv: R,
    pub hold: Box<dyn Send>,
}

fn h3_to_io(e: StreamError) -> io::Error {
    io::Error::other(e)
}

/// Copies both ways between `tcp` and `stream` until both directions are done (as
/// [`super::stream::copy`]). Returns (socket → stream, stream → socket) bytes.
pub async fn copy<S: H3Send, R: H3Recv>(
    tcp: &mut TcpStream,
    stream: H3Stream<S, R>,
    from_tcp: &mut Meter,
    from_h3: &mut Meter,
) -> io::Result<(u64, u64)> {
    let H3Stream {
        mut send,
        recv,
        hold: _hold,
    } = stream;
    let (mut r, w) = tcp.split();
    let up = async {
        let mut reader = SocketReader::new();
        loop {
            match reader.next(&mut r, from_tcp).await {
                Ok(Some(data)) => send.send(data).await.map_err(h3_to_io)?,
                Ok(None) => {
                    send.finish().await.map_err(h3_to_io)?;
                    return Ok(reader.total);
                }
                Err(e) => {
                    send.cancel();
                    return Err(e);
                }
            }
        }
    };
    tokio::try_join!(up, h3_to_tcp(recv, w, from_h3))
}

async fn h3_to_tcp<R: H3Recv>(
    mut recv: R,
    mut w: WriteHalf<'_>,
    meter: &mut Meter,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let next = next_or_pause(meter, |cx| recv.poll_data(cx)).await;
        // On an error the receiving half is dropped with the copy, which makes quinn send
        // STOP_SENDING (not `stop_sending`: h3-quinn 0.0.10 panics there when h3 has a read
        // in flight, hyperium/h3#330).
        let Some(data) = next.map_err(h3_to_io)? else {
            w.shutdown().await?;
            return Ok(total);
        };
        w.write_all(&data).await?;
        total += data.len() as u64;
        meter.add(data.len());
    }
}
