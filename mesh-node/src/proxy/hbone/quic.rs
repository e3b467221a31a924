//! HBONE over HTTP/3 (docs/architecture.md, "Decision: HBONE over QUIC"): the same `CONNECT`
//! (`:authority` = destination `ip:port`, `forwarded`, `baggage`, `traceparent`), the same
//! answers and the same mutual TLS 1.3 with SPIFFE certificates as the HTTP/2 form, carried on
//! QUIC (quinn) with ALPN `h3`. The destination listens on UDP `podIP:15008` inside the pod's
//! namespace, beside the TCP listener; one QUIC connection per pool key (as `pool`), one
//! bidirectional stream per tunnelled connection. Client endpoints (UDP sockets) are made per
//! source pod inside its namespace, or the node's own.
//!
//! A whole-connection tunnel's stream is copied straight to and from its socket by
//! `h3_stream::copy`, as HTTP/2's by `stream::copy`. The paths that need a byte stream (HTTP
//! routed or authorized per request) get one through an in-memory duplex pipe and a task that
//! pumps between it and the HTTP/3 stream ([`bridge`]); a finished stream (FIN) is a
//! half-close both ways.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tracing::{Instrument, debug, info, info_span, warn};

use super::client::TunnelRequest;
use super::h3_stream::{ClientRecv, ClientSend, H3Stream};
use super::pool::{PoolKey, StreamSlot};
use super::server::{self, Conn};
use super::{Refusal, Transport, refuse_handshake};
use crate::identity::Identity;
use crate::identity::certs::peer_identity;
use crate::identity::manager::WorkloadCert;
use crate::proxy::socket::PodNetns;

/// HTTP/3's "no error" code, closing a connection gracefully.
const H3_NO_ERROR: u32 = 0x100;
/// ALPN of HBONE over QUIC.
pub const ALPN: &[u8] = b"h3";
/// Per-stream receive window: as the HTTP/2 stream window (`STREAM_WINDOW`), so one tunnel
/// is not capped by flow control on a millisecond of latency.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection-wide receive window (as HTTP/2's `CONNECTION_WINDOW`).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Bytes the sender may have in flight per connection (quinn's default is 10 MB; sized as the
/// receive window so the windows, not the send buffer, bound a bulk flow).
pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;
/// A connection silent this long (no packet, keep-alives included) is closed by either side.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pooled client connections send a PING this often, well inside `IDLE_TIMEOUT`, so an idle
/// pooled connection stays open and a dead peer is found within `IDLE_TIMEOUT`.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// Streams (tunnels) one QUIC connection carries at once, as HTTP/2's `MAX_STREAMS`.
pub const MAX_STREAMS: u32 = 100;
/// Bidirectional streams a peer may have open (the `initial_max_streams_bidi` transport
/// parameter). Above [`MAX_STREAMS`], the tunnels the pool places on a connection, because
/// quinn hands back the credit of ended streams (`MAX_STREAMS` frames) only once more than an
/// eighth of this limit has been freed: with the limit at 100, up to 12 ended tunnels' credit
/// was held back, and the pool's 100th tunnel on a reused connection waited for another
/// tunnel to end (after 10 tunnels had ended, 10 of the next 100 held at once stalled; test
/// `a_reused_quic_connection_takes_a_full_set_of_tunnels`). With 128 a peer always has at
/// least 112 streams to open.
pub const STREAM_CREDIT: u32 = 128;
const _: () = assert!(STREAM_CREDIT - STREAM_CREDIT / 8 >= MAX_STREAMS);
/// Size of the in-memory pipe between an HTTP/3 stream and the proxy's copy loops.
pub const BRIDGE_BUF: usize = 256 * 1024;
/// Largest read from the pipe sent as one DATA frame.
const CHUNK: usize = 64 * 1024;
/// Largest UDP payload an endpoint accepts (the transport parameter `max_udp_payload_size`):
/// a full datagram on a 1500-byte MTU link (MTU discovery's ceiling, 1452, is below it).
/// quinn sizes each endpoint's receive buffer from it (× GRO segments × receive batch): with
/// its default, 65527, that is 128 MiB per endpoint, which a bulk flow touches page by page
/// (the receiving proxy measured 259 MB RSS after one iperf3 run); with this, 3 MiB.
pub const MAX_UDP_PAYLOAD: u16 = 1472;
/// UDP socket buffers of an endpoint: the kernel's default (208 KiB) drops datagrams of a
/// bulk flow before quinn reads them.
const UDP_BUF: usize = 4 * 1024 * 1024;

/// Pumps between an HTTP/3 stream's halves and a new duplex pipe; evaluates to the pipe's
/// other end. EOF read from the pipe finishes the stream (FIN); the stream's end shuts the
/// pipe's write side. `$keep` lives as long as the pumps (the client side keeps its
/// connection's request sender, so a connection the pool forgot closes only once its last
/// tunnel ends: h3 closes a connection when its last sender is dropped).
macro_rules! bridge {
    ($send:expr, $recv:expr) => {
        bridge!($send, $recv, ())
    };
    ($send:expr, $recv:expr, $hold:expr) => {{
        let (mut send, mut recv) = ($send, $recv);
        let hold = $hold;
        let (app, mine) = tokio::io::duplex(BRIDGE_BUF);
        let (mut rd, mut wr) = tokio::io::split(mine);
        tokio::spawn(async move {
            // Kept (e.g. a pooled connection's stream slot) until the stream is done.
            let _hold = hold;
            let up = async move {
                let mut buf = BytesMut::with_capacity(CHUNK);
                loop {
                    buf.reserve(CHUNK);
                    match rd.read_buf(&mut buf).await {
                        Ok(0) => {
                            let _ = send.finish().await;
                            return;
                        }
                        Ok(_) => {
                            if send.send_data(buf.split().freeze()).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => {
                            send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                            return;
                        }
                    }
                }
            };
            let down = async move {
                loop {
                    match recv.recv_data().await {
                        Ok(Some(mut b)) => {
                            while b.has_remaining() {
                                let chunk = b.copy_to_bytes(b.chunk().len());
                                if wr.write_all(&chunk).await.is_err() {
                                    // The pipe's reader is gone: drop the receiving half,
                                    // which makes quinn send STOP_SENDING. Not
                                    // `stop_sending`: h3-quinn 0.0.10 panics there when h3
                                    // has a read of the stream in flight, which it often
                                    // has after returning data (hyperium/h3#330).
                                    drop(recv);
                                    return;
                                }
                            }
                        }
                        Ok(None) => {
                            let _ = wr.shutdown().await;
                            return;
                        }
                        Err(e) => {
                            // A pipe carries no reset: the other side sees the end of the
                            // stream (docs/architecture.md, "HBONE over QUIC", limits).
                            debug!(error = %e, "HBONE/QUIC stream reset");
                            let _ = wr.shutdown().await;
                            return;
                        }
                    }
                }
            };
            tokio::join!(up, down);
        });
        app
    }};
}

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC socket for {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("QUIC connection to {addr} refused ({}): {detail}", reason.as_str())]
    Handshake {
        addr: SocketAddr,
        reason: Refusal,
        detail: String,
    },
    #[error("QUIC connection to {addr} not answered within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("QUIC endpoint {addr} takes no new connections (CONNECTION_REFUSED)")]
    NotAccepting { addr: SocketAddr },
    #[error("TLS settings: {0}")]
    Config(String),
    #[error("HTTP/3: {0}")]
    H3(String),
    /// The server did not take the `CONNECT`: it sent GOAWAY (its proxy drains) and refused
    /// the stream, or the client saw the GOAWAY first. Nothing reached the destination.
    #[error("HTTP/3: the CONNECT was not processed ({0}); the connection goes away")]
    GoingAway(String),
    #[error("CONNECT answered {0}")]
    Status(StatusCode),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl QuicError {
    /// The refusal this failure is counted as, and whether the destination is unreachable.
    pub fn refusal(&self) -> (Refusal, bool) {
        match self {
            QuicError::Handshake { reason, .. } => (*reason, false),
            QuicError::Socket { .. }
            | QuicError::Timeout { .. }
            | QuicError::NotAccepting { .. } => (Refusal::Unreachable, true),
            QuicError::Status(StatusCode::SERVICE_UNAVAILABLE) => (Refusal::Unreachable, true),
            QuicError::Status(StatusCode::TOO_MANY_REQUESTS) => (Refusal::RateLimited, false),
            QuicError::Status(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                (Refusal::Denied, false)
            }
            _ => (Refusal::Handshake, false),
        }
    }

    /// The destination never answered (no QUIC path): worth trying HTTP/2.
    pub fn no_answer(&self) -> bool {
        matches!(
            self,
            QuicError::Timeout { .. } | QuicError::NotAccepting { .. }
        )
    }
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(STREAM_CREDIT))
        // HTTP/3 needs three unidirectional streams each way (control, QPACK encoder and decoder).
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(8))
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL));
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Classifies a handshake failure by what quinn/rustls reported (as `Refusal::of_tls`).
fn handshake_refusal(e: &quinn::ConnectionError) -> Refusal {
    Refusal::of_tls(&std::io::Error::other(e.to_string()))
}

/// A UDP socket marked as the proxy's (the capture programs skip it), bound to `bind`,
/// non-blocking, with large buffers.
fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Without CAP_NET_ADMIN (the gateway) the socket stays unmarked: nothing captures there.
    if let Err(e) = s.set_mark(mesh_common::ports::PROXY_MARK) {
        debug!(error = %e, "QUIC socket left unmarked");
    }
    let _ = s.set_recv_buffer_size(UDP_BUF);
    let _ = s.set_send_buffer_size(UDP_BUF);
    s.set_nonblocking(true)?;
    s.bind(&bind.into())?;
    Ok(s.into())
}

/// A UDP socket made inside the namespace at `path`, bound to `addr`.
pub fn bind_udp_in_netns(path: &Path, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let ns = File::open(path)?;
    crate::kernel::inpod::within(&ns, || udp_socket(addr))
}

fn endpoint(
    sock: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("max_udp_payload_size: {e}")))?;
    quinn::Endpoint::new(cfg, server, sock, Arc::new(quinn::TokioRuntime))
}

fn server_config(cert: &WorkloadCert) -> Result<Arc<quinn::ServerConfig>, QuicError> {
    let mut tls = (*cert.server_config).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Config(e.to_string()))?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(Arc::new(transport()));
    Ok(Arc::new(c))
}

fn client_config(cert: &WorkloadCert, dst: &Identity) -> Result<quinn::ClientConfig, QuicError> {
    let tls = cert
        .client_config(dst.clone())
        .map_err(|e| QuicError::Config(e.to_string()))?;
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| QuicError::Config(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport()));
    Ok(c)
}

/// A pooled QUIC connection and its HTTP/3 request sender.
#[derive(Clone)]
struct Pooled {
    conn: quinn::Connection,
    send: SendRequest,
    /// Its tunnels: at [`MAX_STREAMS`] open (the bidirectional streams a peer allows)
    /// another connection is dialled for the key rather than waiting for a stream; without
    /// one for the pool's idle timeout it is retired and closed.
    usage: super::pool::Usage,
}

/// Outbound QUIC: client endpoints by source (pod uid or the node, and address family) and
/// pooled connections by [`PoolKey`].
pub struct Clients {
    /// A pooled connection without a tunnel for this long is closed (`--pool-idle-timeout`).
    idle_timeout: Duration,
    endpoints: Mutex<HashMap<(Option<String>, bool), quinn::Endpoint>>,
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Destinations (`podIP:15008`) that did not answer over QUIC, reached over HTTP/2 until
    /// the time given.
    h2_until: Mutex<HashMap<SocketAddr, std::time::Instant>>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new(crate::defaults::POOL_IDLE_TIMEOUT)
    }
}

impl Clients {
    pub fn new(idle_timeout: Duration) -> Clients {
        Clients {
            idle_timeout,
            endpoints: Default::default(),
            conns: Default::default(),
            dialing: Default::default(),
            h2_until: Default::default(),
        }
    }

    /// May a tunnel to `dst` try QUIC (it has not fallen back recently)?
    pub fn may_try(&self, dst: SocketAddr) -> bool {
        let Ok(mut m) = self.h2_until.lock() else {
            return true;
        };
        match m.get(&dst) {
            Some(t) if *t > std::time::Instant::now() => false,
            Some(_) => {
                m.remove(&dst);
                true
            }
            None => true,
        }
    }

    /// `dst` did not answer over QUIC: HTTP/2 for `QUIC_RETRY_AFTER`.
    pub fn fall_back(&self, dst: SocketAddr) {
        if let Ok(mut m) = self.h2_until.lock() {
            m.insert(
                dst,
                std::time::Instant::now() + crate::defaults::QUIC_RETRY_AFTER,
            );
        }
    }

    /// Forgets every pooled connection (admin `POST /pool/forget`): the next tunnel dials a
    /// new one; a forgotten connection closes once its last tunnel ends. Returns how many.
    pub fn forget_all(&self) -> usize {
        self.conns
            .lock()
            .map(|mut m| m.drain().count())
            .unwrap_or(0)
    }

    /// Number of pooled QUIC connections that are not closed (for metrics).
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .map(|m| {
                m.values()
                    .flatten()
                    .filter(|p| p.conn.close_reason().is_none())
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `conn` out of the pool for `key` (it goes away): no new tunnel is opened on it.
    fn remove(&self, key: &PoolKey, conn: &quinn::Connection) {
        if let Ok(mut m) = self.conns.lock()
            && let Some(list) = m.get_mut(key)
        {
            list.retain(|p| p.conn.stable_id() != conn.stable_id());
            if list.is_empty() {
                m.remove(key);
            }
        }
    }

    /// A live pooled connection for `key` with a free stream (taken), if there is one.
    fn ready(&self, key: &PoolKey) -> Option<(Pooled, StreamSlot)> {
        let mut m = self.conns.lock().ok()?;
        let list = m.get_mut(key)?;
        list.retain(|p| p.conn.close_reason().is_none());
        let found = list.iter().find_map(|p| {
            p.usage
                .reserve(MAX_STREAMS as usize)
                .map(|slot| (p.clone(), slot))
        });
        if list.is_empty() {
            m.remove(key);
        }
        found
    }

    fn endpoint(
        &self,
        from: Option<&PodNetns>,
        dst: SocketAddr,
    ) -> std::io::Result<quinn::Endpoint> {
        let key = (from.map(|n| n.uid.clone()), dst.is_ipv6());
        let mut m = self
            .endpoints
            .lock()
            .map_err(|_| std::io::Error::other("QUIC endpoints lock poisoned"))?;
        if let Some(e) = m.get(&key) {
            return Ok(e.clone());
        }
        let any: SocketAddr = if dst.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let sock = match from {
            Some(ns) => {
                crate::kernel::inpod::within(&ns.file, || udp_socket(any)).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("UDP socket in the network namespace of pod {}: {e}", ns.uid),
                    )
                })?
            }
            None => udp_socket(any)?,
        };
        let e = endpoint(sock, None)?;
        m.insert(key, e.clone());
        Ok(e)
    }

    /// Forgets the endpoint of a pod no longer served (its namespace may be gone).
    pub fn forget_pod(&self, uid: &str) {
        if let Ok(mut m) = self.endpoints.lock() {
            m.retain(|(pod, _), _| pod.as_deref() != Some(uid));
        }
    }

    async fn dial(
        &self,
        cert: &WorkloadCert,
        dst_identity: &Identity,
        from: Option<&PodNetns>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Pooled, QuicError> {
        let ep = self
            .endpoint(from, addr)
            .map_err(|source| QuicError::Socket { addr, source })?;
        let cfg = client_config(cert, dst_identity)?;
        let connecting = ep
            .connect_with(cfg, addr, &addr.ip().to_string())
            .map_err(|e| QuicError::Handshake {
                addr,
                reason: Refusal::Handshake,
                detail: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => return Err(QuicError::Timeout { addr, timeout }),
            Ok(Err(quinn::ConnectionError::TimedOut)) => {
                return Err(QuicError::Timeout { addr, timeout });
            }
            // The endpoint takes no new connections (a proxy closing its QUIC side at the end
            // of its drain, `proxy::handover`): as no answer, so the tunnel uses HTTP/2.
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                return Err(QuicError::NotAccepting { addr });
            }
            Ok(Err(e)) => {
                return Err(QuicError::Handshake {
                    addr,
                    reason: handshake_refusal(&e),
                    detail: e.to_string(),
                });
            }
            Ok(Ok(c)) => c,
        };
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| QuicError::H3(e.to_string()))?;
        let usage = super::pool::Usage::default();
        let (idle, idle_conn, idle_timeout) = (usage.clone(), conn.clone(), self.idle_timeout);
        tokio::spawn(async move {
            tokio::select! {
                e = std::future::poll_fn(|cx| driver.poll_close(cx)) => {
                    debug!(%addr, error = %e, "HBONE/QUIC connection ended");
                }
                () = idle.idle(idle_timeout) => {
                    // `H3_NO_ERROR`: the connection is done, nothing was cut.
                    idle_conn.close(quinn::VarInt::from_u32(0x100), b"idle");
                    debug!(%addr, "HBONE/QUIC connection idle; closed");
                }
            }
        });
        Ok(Pooled { conn, send, usage })
    }
}

/// A client's open tunnel stream.
pub type ClientStream = H3Stream<ClientSend, ClientRecv>;

/// Opens a tunnel over HTTP/3: the pooled QUIC connection for the request's key (dialled
/// within `connect_timeout` if there is none), then a `CONNECT` stream.
pub async fn open(
    clients: &Clients,
    req: TunnelRequest<'_>,
    connect_timeout: Duration,
) -> Result<ClientStream, QuicError> {
    let key = req.pool_key();
    let mut retried = false;
    loop {
        let (pooled, slot, fresh) = match clients.ready(&key) {
            Some((p, slot)) => (p, slot, false),
            None => {
                let lock = match clients.dialing.lock() {
                    Ok(mut m) => m.entry(key.clone()).or_default().clone(),
                    Err(_) => Arc::default(),
                };
                let _one_dialer = lock.lock().await;
                match clients.ready(&key) {
                    Some((p, slot)) => (p, slot, false),
                    None => {
                        let p = clients
                            .dial(
                                req.cert,
                                &req.dst_identity,
                                req.src_netns.as_ref(),
                                req.tunnel_addr,
                                connect_timeout,
                            )
                            .await?;
                        let slot = p
                            .usage
                            .reserve(MAX_STREAMS as usize)
                            .ok_or(QuicError::Status(StatusCode::SERVICE_UNAVAILABLE))?;
                        if let Ok(mut m) = clients.conns.lock() {
                            // Closed connections (idle ones retired included) leave the pool.
                            m.retain(|_, list| {
                                list.retain(|p| p.conn.close_reason().is_none());
                                !list.is_empty()
                            });
                            m.entry(key.clone()).or_default().push(p.clone());
                        }
                        (p, slot, true)
                    }
                }
            }
        };
        match request(&pooled, &req, slot).await {
            // The peer's proxy drains (a hand-over, `proxy::handover`): it sent GOAWAY and
            // refused the stream. The connection leaves the pool (its open tunnels finish);
            // the tunnel is opened again on a new connection, which the draining endpoint
            // refuses (CONNECTION_REFUSED: HTTP/2 to the successor) or the successor takes.
            Err(QuicError::GoingAway(e)) if !retried => {
                debug!(addr = %req.tunnel_addr, error = %e, "pooled QUIC connection goes away; opening a new one");
                clients.remove(&key, &pooled.conn);
                retried = true;
            }
            // The pooled connection was closed under us (the peer's proxy ended its drain):
            // the stream was never served; open it on a new connection.
            Err(QuicError::H3(e)) if !fresh && !retried && pooled.conn.close_reason().is_some() => {
                debug!(addr = %req.tunnel_addr, error = %e, "pooled QUIC connection closed; opening a new one");
                retried = true;
            }
            r => return r,
        }
    }
}

/// Opens the tunnel's `CONNECT` stream on a QUIC connection.
async fn request(
    pooled: &Pooled,
    req: &TunnelRequest<'_>,
    slot: super::pool::StreamSlot,
) -> Result<ClientStream, QuicError> {
    let connect = super::client::connect_request(req)?;
    let mut send = pooled.send.clone();
    let mut stream = send.send_request(connect).await.map_err(stream_error)?;
    let resp = stream.recv_response().await.map_err(stream_error)?;
    if resp.status() != StatusCode::OK {
        return Err(QuicError::Status(resp.status()));
    }
    let (send, recv) = stream.split();
    Ok(H3Stream {
        send,
        recv,
        hold: Box::new((slot, pooled.send.clone())),
    })
}

/// An error opening a `CONNECT` stream; "not processed" when the server said so (RFC 9114
/// 5.2: GOAWAY, then `H3_REQUEST_REJECTED` for streams past it), so it may be sent again.
fn stream_error(e: h3::error::StreamError) -> QuicError {
    match &e {
        h3::error::StreamError::RemoteClosing { .. } => QuicError::GoingAway(e.to_string()),
        h3::error::StreamError::RemoteTerminate { code, .. }
            if *code == h3::error::Code::H3_REQUEST_REJECTED =>
        {
            QuicError::GoingAway(e.to_string())
        }
        _ => QuicError::H3(e.to_string()),
    }
}

/// A client's tunnel as a byte stream (the L7 paths): bridged to an in-memory pipe.
pub fn client_io(t: ClientStream) -> DuplexStream {
    bridge!(t.send, t.recv, t.hold)
}

/// Serves HBONE over QUIC on one pod's UDP socket until the task is aborted: each
/// connection presents the pod's current certificate (fetched per handshake, so a rotated
/// certificate serves new connections while open ones finish).
pub async fn serve_pod(
    sock: std::net::UdpSocket,
    pod: String,
    identity: Identity,
    ips: Vec<IpAddr>,
    mesh: Arc<crate::proxy::Mesh>,
    connect_timeout: Duration,
) {
    let addr = sock.local_addr().ok();
    let first = match mesh.certs.get(&identity).await {
        Ok(c) => server_config(&c).ok(),
        Err(_) => None,
    };
    let ep = match endpoint(sock, first.map(|c| (*c).clone())) {
        Ok(e) => e,
        Err(e) => {
            warn!(%pod, error = %e, "cannot open the HBONE/QUIC listener");
            return;
        }
    };
    info!(%pod, addr = ?addr, "HBONE/QUIC listener open");
    // The proxy stops accepting (`proxy::handover`): new connections are refused
    // (CONNECTION_REFUSED, so clients use HTTP/2 towards the successor) while the open ones
    // finish their tunnels. The drain is over: close them (CONNECTION_CLOSE, so peers drop
    // them from their pools at once) and free the UDP port for the successor.
    let mut stopping = crate::proxy::handover::stopping();
    let mut closing = crate::proxy::handover::closing();
    let mut refusing = false;
    loop {
        let incoming = tokio::select! {
            biased;
            _ = crate::proxy::handover::until(&mut closing) => {
                ep.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"proxy exiting");
                let _ = tokio::time::timeout(Duration::from_millis(50), ep.wait_idle()).await;
                info!(%pod, addr = ?addr, "HBONE/QUIC listener closed");
                return;
            }
            _ = crate::proxy::handover::until(&mut stopping), if !refusing => {
                ep.set_server_config(None);
                refusing = true;
                debug!(%pod, "HBONE/QUIC listener refuses new connections (draining)");
                continue;
            }
            i = ep.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        if refusing {
            // Queued before the refusal began.
            incoming.refuse();
            continue;
        }
        // The drain waits for this connection until it has told its client to open no more
        // tunnels on it (`serve_conn`), so no tunnel can arrive after the drain is over.
        let held = crate::proxy::handover::tasks().token();
        let peer = incoming.remote_address();
        let (pod, identity, ips, mesh) = (pod.clone(), identity.clone(), ips.clone(), mesh.clone());
        let span = info_span!("hbone", %peer, %pod, transport = "quic");
        tokio::spawn(
            async move {
                let cert = match mesh.certs.get(&identity).await {
                    Ok(c) => c,
                    Err(e) => {
                        refuse_handshake(Transport::Quic, Refusal::NoCertificate, Some(&e));
                        incoming.refuse();
                        return;
                    }
                };
                let cfg = match server_config(&cert) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "QUIC server settings");
                        incoming.refuse();
                        return;
                    }
                };
                let connecting = match incoming.accept_with(cfg) {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "QUIC connection not accepted");
                        return;
                    }
                };
                let conn = match tokio::time::timeout(
                    crate::defaults::HBONE_HANDSHAKE_TIMEOUT,
                    connecting,
                )
                .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        refuse_handshake(Transport::Quic, handshake_refusal(&e), Some(&e));
                        return;
                    }
                    Err(_) => {
                        refuse_handshake(Transport::Quic, Refusal::Handshake, None);
                        return;
                    }
                };
                let Some(peer_identity) = conn
                    .peer_identity()
                    .and_then(|i| {
                        i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                            .ok()
                    })
                    .and_then(|c| c.first().and_then(|c| peer_identity(c).ok()))
                else {
                    refuse_handshake(Transport::Quic, Refusal::Untrusted, None);
                    conn.close(quinn::VarInt::from_u32(0x0101), b"no identity");
                    return;
                };
                info!(src_identity = %peer_identity, "HBONE/QUIC connection accepted");
                let conn_info = Arc::new(Conn {
                    pod,
                    pod_ips: ips,
                    peer,
                    peer_identity,
                    connect_timeout,
                    state: mesh.state.clone(),
                    tunnels: mesh.authz.clone(),
                    limiter: mesh.limiter.clone(),
                    pods: mesh.pods.clone(),
                    transport: Some(Transport::Quic),
                    tunnel_limits: mesh.tunnel_limits.clone(),
                });
                serve_conn(conn, conn_info, held).await;
            }
            .instrument(span),
        );
    }
}

/// Serves one QUIC connection's tunnels. `held` keeps the proxy's drain waiting until the
/// connection has sent its GOAWAY: from then on every stream the client opens is refused
/// (`H3_REQUEST_REJECTED`, which the client retries elsewhere, `open`), so each tunnel is
/// either tracked by the drain or never started.
async fn serve_conn(
    conn: quinn::Connection,
    info: Arc<Conn>,
    held: tokio_util::task::task_tracker::TaskTrackerToken,
) {
    let quic = conn.clone();
    let mut h3c: h3::server::Connection<h3_quinn::Connection, Bytes> = match h3::server::builder()
        .max_field_section_size(u64::from(super::MAX_HEADER_LIST))
        .build(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "HBONE/QUIC connection ended");
            return;
        }
    };
    let mut stopping = crate::proxy::handover::stopping();
    let mut held = Some(held);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = crate::proxy::handover::until(&mut stopping), if held.is_some() => {
                // GOAWAY naming the last stream accepted; later ones are rejected.
                if let Err(e) = h3c.shutdown(0).await {
                    debug!(error = %e, "HBONE/QUIC connection ended");
                    return;
                }
                // A first stream sent before the client read the GOAWAY is still accepted
                // (GOAWAY cannot name "none"): keep the drain waiting for two round trips so
                // it arrives while the drain still counts it.
                let wait = (quic.rtt() * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                let token = held.take();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    drop(token);
                });
                continue;
            }
            a = h3c.accept() => a,
        };
        let resolver = match accepted {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "HBONE/QUIC connection ended");
                return;
            }
        };
        let info = info.clone();
        // Tracked: a draining proxy waits for its tunnels.
        crate::proxy::handover::tasks().spawn(async move {
            let (req, stream) = match resolver.resolve_request().await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "HBONE/QUIC request not read");
                    return;
                }
            };
            let trace = server::tunnel_trace(&req, &info);
            handle(req, stream, info, trace).await;
        });
    }
}

type ServerStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

async fn answer(
    stream: &mut ServerStream,
    code: StatusCode,
    trace: &crate::telemetry::trace::Span,
) -> bool {
    let mut r = Response::new(());
    *r.status_mut() = code;
    trace.tunnel_status(code.as_u16());
    if let Err(e) = stream.send_response(r).await {
        debug!(error = %e, "could not answer the CONNECT");
        return false;
    }
    if code != StatusCode::OK {
        let _ = stream.finish().await;
    }
    true
}

/// The destination's side of one `CONNECT`: the same checks as HTTP/2's
/// (`server::accept_connect`) and the same carrying (`server::carry`).
async fn handle(
    req: Request<()>,
    mut stream: ServerStream,
    conn: Arc<Conn>,
    trace: crate::telemetry::trace::Span,
) {
    let (admitted, span) = match server::accept_connect(&req, &conn).await {
        Ok(a) => a,
        Err(code) => {
            answer(&mut stream, code, &trace).await;
            return;
        }
    };
    if !answer(&mut stream, StatusCode::OK, &trace).await {
        crate::telemetry::conn::Tracked::open_since(admitted.meta, admitted.accepted)
            .close("DC", Some("the tunnel closed before its answer"));
        return;
    }
    let (send, recv) = stream.split();
    if !admitted.per_request {
        // A whole connection: the stream copied straight to the pod's socket.
        let tunnel = server::Whole::H3(Box::new(H3Stream {
            send,
            recv,
            hold: Box::new(()),
        }));
        server::carry_whole(tunnel, admitted, &conn, &trace)
            .instrument(span)
            .await;
        return;
    }
    // Request by request: the stream as a byte stream under the L7 layer.
    let io = bridge!(send, recv, ());
    Box::pin(
        server::carry(
            server::Downstream::Stream(io),
            admitted,
            &conn,
            &trace,
            "hbone",
        )
        .instrument(span),
    )
    .await;
}
