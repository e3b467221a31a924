//! Kernel TLS (TLS ULP) for HBONE/TCP tunnels: after the rustls handshake the session keys go
//! to the kernel (`TCP_ULP "tls"`, `TLS_TX`, `TLS_RX`, through the `ktls` crate), so the
//! tunnel's HTTP/2 bytes are encrypted and decrypted by the kernel; the records on the wire
//! are the same TLS 1.3 records rustls would write (a userspace peer cannot tell).
//!
//! `--ktls auto` (the default) probes once per process whether the kernel accepts the TLS ULP
//! and which ciphers it configures ([`ktls::CompatibleCiphers`]); when it does, the handshake
//! runs over a [`CorkStream`] (it reads record by record, so no bytes past the handshake are
//! buffered in userspace) and the connection moves to the kernel if its cipher is supported.
//! Otherwise — no `tls` module, a cipher the kernel lacks, `--ktls off`, or a failure while
//! moving — the tunnel stays with rustls (a failure after the keys were extracted ends that
//! one connection; the pool dials again). Each connection is counted in
//! `sidenode_hbone_tls_connections_total{direction, path}`.
//!
//! Post-handshake messages: our server sends no TLS 1.3 session tickets (`identity::tls`);
//! tickets from another peer (ztunnel) are dropped by the kTLS stream, alerts end the stream
//! (close_notify answered). A TLS 1.3 KeyUpdate cannot be followed by kernels before 6.13
//! (a rustls peer sends one at 2^24 AES-GCM records), so a kTLS connection is retired at
//! 2^23 records in either direction ([`KeyWatch`]; docs/architecture.md, "Post-handshake
//! records").

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use crate::kernel::tls::{Direction, record_seq};
use ktls::{CompatibleCiphers, CorkStream, KtlsStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::quiet_buf::QuietBuf;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

/// `--ktls`: whether tunnels may move to kernel TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// kTLS when the kernel accepts it for the negotiated cipher, else userspace TLS.
    #[default]
    Auto,
    /// Userspace TLS (rustls) always.
    Off,
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// Sets the process's mode (once, at start; later calls are ignored).
pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
}

fn mode() -> Mode {
    MODE.get().copied().unwrap_or_default()
}

static RECORD_LIMIT: OnceLock<u64> = OnceLock::new();

/// Sets the record count at which a kTLS tunnel is retired (once, at start; tests lower it).
pub fn set_record_limit(records: u64) {
    let _ = RECORD_LIMIT.set(records);
}

fn record_limit() -> u64 {
    RECORD_LIMIT
        .get()
        .copied()
        .unwrap_or(crate::defaults::KTLS_RECORD_LIMIT)
}

/// Watches a kTLS connection's record sequence numbers in both directions. A kernel before
/// 6.13 cannot follow a TLS 1.3 KeyUpdate, which a userspace peer (rustls, ztunnel) sends when
/// its AES-GCM write sequence reaches 2^24 records; the connection is retired well before
/// (half of that by default), so its peer never has to.
pub struct KeyWatch {
    fd: RawFd,
}

impl KeyWatch {
    /// Returns the direction that reached the record limit, checking every
    /// [`crate::defaults::KTLS_RECORD_CHECK`]; never returns when the counters cannot be read.
    /// Must be dropped with the connection (the descriptor is only borrowed).
    pub async fn limit_reached(self) -> Direction {
        let limit = record_limit();
        let mut tick = tokio::time::interval(crate::defaults::KTLS_RECORD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for dir in [Direction::Tx, Direction::Rx] {
                match record_seq(self.fd, dir) {
                    Ok(seq) if seq >= limit => return dir,
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, "kTLS record counters unreadable; not watched");
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}

/// Counts and logs a tunnel retired for its record limit.
pub fn retired(direction: &'static str, dir: Direction) {
    info!(
        direction,
        records = dir.as_str(),
        limit = record_limit(),
        "kTLS connection retired at its record limit (no new tunnels on it)"
    );
    crate::telemetry::metrics::count_hbone_tls_retired(direction, "record_limit");
}

/// What the kernel supports, probed on first use (`None`: no kTLS at all).
async fn support() -> Option<&'static CompatibleCiphers> {
    static SUPPORT: OnceCell<Option<CompatibleCiphers>> = OnceCell::const_new();
    SUPPORT
        .get_or_init(|| async {
            if mode() == Mode::Off {
                info!("kernel TLS off (--ktls off): HBONE tunnels use userspace TLS");
                return None;
            }
            if let Err(e) = crate::kernel::probe::tls_ulp() {
                info!(error = %e, "kernel TLS unavailable (TCP_ULP \"tls\" refused): HBONE tunnels use userspace TLS");
                return None;
            }
            match CompatibleCiphers::new().await {
                Ok(c) if c.tls13.aes_gcm_256 || c.tls13.aes_gcm_128 || c.tls13.chacha20_poly1305 => {
                    info!(ciphers = ?c.tls13, "kernel TLS available: HBONE tunnels move to kTLS after the handshake");
                    Some(c)
                }
                Ok(_) => {
                    info!("kernel TLS unavailable (no TLS ULP or no TLS 1.3 cipher): HBONE tunnels use userspace TLS");
                    None
                }
                Err(e) => {
                    info!(error = %e, "kernel TLS probe failed: HBONE tunnels use userspace TLS");
                    None
                }
            }
        })
        .await
        .as_ref()
}

/// The transport a TLS handshake runs over: buffered reads for userspace TLS, or a
/// [`CorkStream`] when the connection may move to the kernel afterwards.
pub enum HandshakeIo {
    Buffered(QuietBuf<TcpStream>),
    Corked(CorkStream<TcpStream>),
}

/// Wraps a fresh TCP connection for its handshake (`read_buf`: the userspace read buffer).
pub async fn handshake_io(tcp: TcpStream, read_buf: usize) -> HandshakeIo {
    match support().await {
        Some(_) => HandshakeIo::Corked(CorkStream::new(tcp)),
        None => HandshakeIo::Buffered(QuietBuf::new(tcp, read_buf)),
    }
}

/// An HBONE/TCP connection after its handshake: userspace TLS, or kTLS.
pub enum TunnelIo {
    User(Box<tokio_rustls::TlsStream<QuietBuf<TcpStream>>>),
    UserCorked(Box<tokio_rustls::TlsStream<CorkStream<TcpStream>>>),
    Kernel(KtlsStream<TcpStream>),
}

impl TunnelIo {
    pub fn path(&self) -> &'static str {
        match self {
            TunnelIo::Kernel(_) => "kernel",
            _ => "userspace",
        }
    }

    /// The record-limit watch of a kTLS connection (none in userspace: rustls re-keys itself).
    pub fn key_watch(&self) -> Option<KeyWatch> {
        match self {
            TunnelIo::Kernel(k) => Some(KeyWatch { fd: k.as_raw_fd() }),
            _ => None,
        }
    }
}

/// Why a connection could not move to the kernel after its keys were taken from rustls.
#[derive(Debug, thiserror::Error)]
#[error("moving the TLS session to the kernel: {0}")]
pub struct KtlsError(#[from] ktls::Error);

/// A finished handshake on `io` (client or server side).
pub enum Handshaken {
    Buffered(tokio_rustls::TlsStream<QuietBuf<TcpStream>>),
    Corked(tokio_rustls::TlsStream<CorkStream<TcpStream>>),
}

impl Handshaken {
    /// The rustls connection (peer certificates, negotiated cipher).
    pub fn common(&self) -> &rustls::CommonState {
        match self {
            Handshaken::Buffered(t) => t.get_ref().1,
            Handshaken::Corked(t) => t.get_ref().1,
        }
    }
}

/// Moves a handshaken connection to the kernel when it may, else keeps it in userspace with
/// `send_buf` as rustls's send buffer limit. Counts the path taken for `direction`.
pub async fn finish(
    tls: Handshaken,
    send_buf: usize,
    direction: &'static str,
) -> Result<TunnelIo, KtlsError> {
    let io = match tls {
        Handshaken::Buffered(mut t) => {
            set_limit(&mut t, send_buf);
            TunnelIo::User(Box::new(t))
        }
        Handshaken::Corked(mut t) => {
            let suite = t.get_ref().1.negotiated_cipher_suite();
            let ok = match (support().await, suite) {
                (Some(c), Some(s)) => c.is_compatible(s),
                _ => false,
            };
            if ok {
                let r = match t {
                    tokio_rustls::TlsStream::Client(c) => ktls::config_ktls_client(c).await,
                    tokio_rustls::TlsStream::Server(s) => ktls::config_ktls_server(s).await,
                };
                match r {
                    Ok(k) => TunnelIo::Kernel(k),
                    Err(e) => {
                        warn!(error = %e, direction, "kernel TLS setup failed; connection dropped");
                        crate::telemetry::metrics::count_hbone_tls(direction, "failed");
                        return Err(e.into());
                    }
                }
            } else {
                debug!(?suite, "cipher not supported by kernel TLS; userspace TLS");
                set_limit(&mut t, send_buf);
                TunnelIo::UserCorked(Box::new(t))
            }
        }
    };
    info!(direction, path = io.path(), "HBONE connection TLS path");
    crate::telemetry::metrics::count_hbone_tls(direction, io.path());
    Ok(io)
}

fn set_limit<IO>(t: &mut tokio_rustls::TlsStream<IO>, send_buf: usize) {
    match t {
        tokio_rustls::TlsStream::Client(c) => c.get_mut().1.set_buffer_limit(Some(send_buf)),
        tokio_rustls::TlsStream::Server(s) => s.get_mut().1.set_buffer_limit(Some(send_buf)),
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelIo::User(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            TunnelIo::UserCorked(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            TunnelIo::Kernel(k) => {
                // The `ktls` crate panics on some records a peer can send after the handshake
                // (an encrypted ChangeCipherSpec, an empty alert): such a peer ends its own
                // connection with an error instead of unwinding through the tunnel's task.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Pin::new(&mut *k).poll_read(cx, buf)
                })) {
                    Ok(r) => r,
                    Err(_) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "kernel TLS: a record the ktls crate cannot handle (ChangeCipherSpec or an empty alert)",
                    ))),
                }
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelIo::User(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            TunnelIo::UserCorked(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            TunnelIo::Kernel(k) => Pin::new(k).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelIo::User(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
            TunnelIo::UserCorked(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
            TunnelIo::Kernel(k) => Pin::new(k).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            TunnelIo::User(t) => t.is_write_vectored(),
            TunnelIo::UserCorked(t) => t.is_write_vectored(),
            TunnelIo::Kernel(k) => k.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelIo::User(t) => Pin::new(t.as_mut()).poll_flush(cx),
            TunnelIo::UserCorked(t) => Pin::new(t.as_mut()).poll_flush(cx),
            TunnelIo::Kernel(k) => Pin::new(k).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelIo::User(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            TunnelIo::UserCorked(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            TunnelIo::Kernel(k) => Pin::new(k).poll_shutdown(cx),
        }
    }
}
