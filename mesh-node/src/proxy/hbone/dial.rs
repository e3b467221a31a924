//! Which transport a new tunnel takes, for the L4 path (`proxy::outbound`) and the HTTP path
//! (`proxy::http::upstream`) alike: with `MeshConfig.spec.tunnelProtocol: quic`, HTTP/3
//! (`quic`) unless the destination's UDP 15008 did not answer lately; a destination that does
//! not answer within `QUIC_FALLBACK_TIMEOUT` gets HTTP/2 (`client`) now and for
//! `QUIC_RETRY_AFTER` (docs/architecture.md, "Decision: HBONE over QUIC"). A refusal over QUIC
//! (TLS, a status) is no reason to fall back.

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tracing::warn;

use super::client::{self, TunnelError, TunnelRequest};
use super::quic::{self, QuicError};
use super::stream::H2Stream;
use super::{Refusal, Transport};
use crate::proxy::Mesh;

/// An open tunnel's stream.
pub enum Tunnel {
    /// An HTTP/2 stream (`stream::copy` moves it without a pipe).
    H2(H2Stream),
    /// An HTTP/3 stream (`h3_stream::copy` moves it without a pipe).
    /// (Boxed: its halves are ten times the HTTP/2 stream's size.)
    Quic(Box<quic::ClientStream>),
}

impl Tunnel {
    pub fn transport(&self) -> Transport {
        match self {
            Tunnel::H2(_) => Transport::H2,
            Tunnel::Quic(_) => Transport::Quic,
        }
    }

    /// The tunnel as a byte stream.
    pub fn into_io(self) -> TunnelIo {
        match self {
            Tunnel::H2(s) => TunnelIo::H2(s.into_io()),
            Tunnel::Quic(t) => TunnelIo::Quic(quic::client_io(*t)),
        }
    }
}

/// [`Tunnel::into_io`]: either transport's stream as one byte stream type.
pub enum TunnelIo {
    H2(super::stream::H2Io),
    Quic(DuplexStream),
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TunnelIo::H2(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            TunnelIo::Quic(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TunnelIo::H2(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            TunnelIo::Quic(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TunnelIo::H2(s) => std::pin::Pin::new(s).poll_flush(cx),
            TunnelIo::Quic(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TunnelIo::H2(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            TunnelIo::Quic(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A tunnel that could not be opened, over the transport that refused it.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    H2(#[from] TunnelError),
    #[error(transparent)]
    Quic(#[from] QuicError),
}

impl DialError {
    pub fn transport(&self) -> Transport {
        match self {
            DialError::H2(_) => Transport::H2,
            DialError::Quic(_) => Transport::Quic,
        }
    }

    /// The refusal this failure is counted as, and whether the destination is unreachable
    /// (another endpoint may be tried).
    pub fn refusal(&self) -> (Refusal, bool) {
        match self {
            DialError::H2(e) => e.refusal(),
            DialError::Quic(e) => e.refusal(),
        }
    }

    /// The `CONNECT`'s answer, when the destination gave one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            DialError::H2(TunnelError::Status(s)) | DialError::Quic(QuicError::Status(s)) => {
                Some(*s)
            }
            _ => None,
        }
    }
}

/// Opens a tunnel with the transport the mesh asks for (`req` builds the `CONNECT`'s
/// particulars, once per transport tried), falling back from QUIC to HTTP/2 for a destination
/// that does not answer over QUIC (logged here). `timeout` bounds each dial.
pub async fn open<'a>(
    mesh: &Mesh,
    req: impl Fn() -> TunnelRequest<'a>,
    timeout: Duration,
) -> Result<Tunnel, DialError> {
    let quic_wanted = mesh.state.borrow().settings.tunnel_protocol == Transport::Quic.as_str();
    if quic_wanted {
        let r = req();
        let tunnel_addr = r.tunnel_addr;
        let target = r.target;
        if mesh.quic.may_try(tunnel_addr) {
            let wait = timeout.min(crate::defaults::QUIC_FALLBACK_TIMEOUT);
            match quic::open(&mesh.quic, r, wait).await {
                Ok(io) => return Ok(Tunnel::Quic(Box::new(io))),
                Err(e) if e.no_answer() => {
                    mesh.quic.fall_back(tunnel_addr);
                    warn!(dst = %target, %tunnel_addr, error = %e, "no answer over QUIC; HTTP/2 to this destination for a while");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(Tunnel::H2(client::open(&mesh.pool, req(), timeout).await?))
}
