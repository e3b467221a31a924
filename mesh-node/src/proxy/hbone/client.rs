//! Opening a tunnel: reuse or dial the pooled HTTP/2 connection, send `CONNECT`, and hand back
//! the stream (`stream::H2Stream`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::ktls::{HandshakeIo, Handshaken};
use super::pool::{Pool, PoolKey, Sender};
use super::stream::H2Stream;
use super::{
    CONNECTION_WINDOW, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_FRAME, MAX_HEADER_LIST,
    MAX_SEND_BUF, Refusal, STREAM_WINDOW, TLS_READ_BUF, TLS_SEND_BUF,
};
use crate::identity::Identity;
use crate::identity::manager::WorkloadCert;
use crate::proxy::socket::{PodNetns, connect_from};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr} refused ({}): {source}", reason.as_str())]
    Tls {
        addr: SocketAddr,
        reason: Refusal,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS settings: {0}")]
    Config(#[from] rustls::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT answered {0}")]
    Status(StatusCode),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl TunnelError {
    /// The refusal this failure is counted as, and whether the destination is unreachable:
    /// the pod's proxy (connect) or the pod itself (`503`).
    pub fn refusal(&self) -> (Refusal, bool) {
        match self {
            TunnelError::Tls { reason, .. } => (*reason, false),
            TunnelError::Connect { .. } => (Refusal::Unreachable, true),
            TunnelError::Status(StatusCode::SERVICE_UNAVAILABLE) => (Refusal::Unreachable, true),
            TunnelError::Status(StatusCode::TOO_MANY_REQUESTS) => (Refusal::RateLimited, false),
            TunnelError::Status(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                (Refusal::Denied, false)
            }
            _ => (Refusal::Handshake, false),
        }
    }
}

/// What a tunnel carries besides the bytes.
pub struct TunnelRequest<'a> {
    pub cert: &'a WorkloadCert,
    pub dst_identity: Identity,
    /// `podIP:15008`.
    pub tunnel_addr: SocketAddr,
    /// The original destination (`:authority`).
    pub target: SocketAddr,
    /// The client's address, sent as `forwarded: for=` (port 0: not known, e.g. a pooled
    /// HTTP connection that carries several clients' requests; then only the address).
    pub client: SocketAddr,
    /// The source pod's namespace: the tunnel's connection leaves from there, from the pod's
    /// address (ztunnel's in-pod mode); `None`: from the proxy's own.
    pub src_netns: Option<PodNetns>,
    pub baggage: String,
    /// W3C `traceparent` of the connection's span (`telemetry::trace`), sent on the `CONNECT`.
    pub traceparent: Option<http::HeaderValue>,
}

impl TunnelRequest<'_> {
    /// The pooled connection this tunnel rides on, HTTP/2 or QUIC alike: per source identity
    /// and certificate generation, source pod, destination address and identity.
    pub(super) fn pool_key(&self) -> PoolKey {
        PoolKey {
            src: self.cert.identity.clone(),
            src_generation: self.cert.generation,
            src_pod: self.src_netns.as_ref().map(|n| n.uid.clone()),
            dst: self.tunnel_addr,
            dst_identity: self.dst_identity.clone(),
        }
    }
}

pub async fn open(
    pool: &Pool,
    req: TunnelRequest<'_>,
    connect_timeout: Duration,
) -> Result<H2Stream, TunnelError> {
    let key = req.pool_key();
    let mut retried = false;
    loop {
        let (sender, slot) = match pool.ready(&key) {
            Some(s) => s,
            None => {
                let lock = pool.dial_lock(&key);
                let _one_dialer = lock.lock().await;
                match pool.ready(&key) {
                    Some(s) => s,
                    None => {
                        // Every pooled connection of this key is full (or there is none).
                        let s = dial(
                            req.cert,
                            &req.dst_identity,
                            req.src_netns.as_ref(),
                            req.tunnel_addr,
                            connect_timeout,
                            pool.idle_timeout(),
                        )
                        .await?;
                        pool.insert(key.clone(), s.clone());
                        let slot = s
                            .try_reserve()
                            .ok_or(TunnelError::Status(StatusCode::SERVICE_UNAVAILABLE))?;
                        (s, slot)
                    }
                }
            }
        };
        match request(&sender, &req).await {
            // The peer said GOAWAY (its proxy drains, e.g. after a hand-over to a successor):
            // the stream was never served, so it is opened again on a new connection, which
            // reaches whoever accepts on the peer's listener now.
            Err(TunnelError::H2(e)) if !retried && going_away(&e) => {
                debug!(addr = %req.tunnel_addr, error = %e, "pooled HBONE connection going away; opening a new one");
                sender.set_closed();
                retried = true;
            }
            r => return r.map(|stream| stream.holding(slot)),
        }
    }
}

/// Opens the tunnel's stream on a pooled connection.
async fn request(sender: &Sender, req: &TunnelRequest<'_>) -> Result<H2Stream, TunnelError> {
    let mut h2 = sender.h2.clone().ready().await?;
    let connect = connect_request(req)?;
    let (resp, send) = h2.send_request(connect, false)?;
    let resp = resp.await?;
    if resp.status() != StatusCode::OK {
        return Err(TunnelError::Status(resp.status()));
    }
    Ok(H2Stream::new(send, resp.into_body()))
}

/// A stream refused because the connection is closing (GOAWAY, or `REFUSED_STREAM`): the
/// peer processed nothing of it, so opening it again elsewhere is safe.
fn going_away(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// The `CONNECT` of a tunnel, HTTP/2 or HTTP/3 alike: `:authority` the target, and the
/// headers ztunnel sends, in its order: `baggage`, `forwarded`, `traceparent` (always: an
/// unsampled one of our own when the connection is not traced).
pub(super) fn connect_request(req: &TunnelRequest<'_>) -> Result<Request<()>, http::Error> {
    let traceparent = req
        .traceparent
        .clone()
        .unwrap_or_else(crate::telemetry::trace::unsampled_traceparent);
    Request::builder()
        .method(Method::CONNECT)
        .uri(req.target.to_string())
        .header("baggage", req.baggage.as_str())
        .header("forwarded", format!("for={}", forwarded_for(req.client)))
        .header(crate::telemetry::trace::TRACEPARENT, traceparent)
        .body(())
}

/// RFC 7239 `for=` value as ztunnel writes it: `"ip:port"`, IPv6 `"[v6]:port"` (quoted, as
/// a port requires); without a port a bare IPv4 address or a quoted bracketed IPv6 one.
fn forwarded_for(client: SocketAddr) -> String {
    match (client.ip(), client.port()) {
        (IpAddr::V4(v4), 0) => v4.to_string(),
        (IpAddr::V6(v6), 0) => format!("\"[{v6}]\""),
        (_, _) => format!("\"{client}\""),
    }
}

async fn dial(
    cert: &WorkloadCert,
    dst_identity: &Identity,
    from: Option<&PodNetns>,
    addr: SocketAddr,
    timeout: Duration,
    idle_timeout: Duration,
) -> Result<Sender, TunnelError> {
    let tcp = connect_from(from, addr, timeout)
        .await
        .map_err(|source| TunnelError::Connect { addr, source })?;
    let connector = TlsConnector::from(cert.client_config(dst_identity.clone())?);
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = match super::ktls::handshake_io(tcp, TLS_READ_BUF).await {
        HandshakeIo::Buffered(io) => connector
            .connect(name, io)
            .await
            .map(|t| Handshaken::Buffered(tokio_rustls::TlsStream::Client(t))),
        HandshakeIo::Corked(io) => connector
            .connect(name, io)
            .await
            .map(|t| Handshaken::Corked(tokio_rustls::TlsStream::Client(t))),
    }
    .map_err(|source| TunnelError::Tls {
        addr,
        reason: Refusal::of_tls(&source),
        source,
    })?;
    let tls = super::ktls::finish(tls, TLS_SEND_BUF, "outbound")
        .await
        .map_err(|e| TunnelError::Tls {
            addr,
            reason: Refusal::Handshake,
            source: std::io::Error::other(e),
        })?;
    let key_watch = tls.key_watch();
    let (h2, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUF)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake(tls)
        .await?;
    let sender = Sender::new(h2);
    let ping = conn.ping_pong();
    let alive = sender.clone();
    tokio::spawn(async move {
        // At a kTLS connection's record limit the pool stops placing tunnels on it (the ones
        // open go on; it closes once they ended); the connection task keeps driving it.
        let retire = async {
            if let Some(w) = key_watch {
                let dir = w.limit_reached().await;
                super::ktls::retired("outbound", dir);
                alive.set_closed();
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = retire => {}
            r = conn => if let Err(e) = r {
                debug!(%addr, error = %e, "HBONE connection ended");
            },
            why = keepalive(ping) => debug!(%addr, why, "HBONE connection closed"),
            () = alive.idle(idle_timeout) => debug!(%addr, "HBONE connection idle; closed"),
            () = alive.drained() => debug!(%addr, "HBONE connection retired, its last tunnel ended; closed"),
        }
        alive.set_closed();
    });
    Ok(sender)
}

/// Pings the peer every [`KEEPALIVE_INTERVAL`]; returns when a ping is not answered in time.
async fn keepalive(ping: Option<h2::PingPong>) -> &'static str {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "keep-alive ping failed",
            Err(_) => return "keep-alive ping timed out",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::forwarded_for;

    /// As ztunnel's client writes `for=`, and as our server's RFC 7239 reader reads it back.
    #[test]
    fn forwarded_for_as_ztunnel_writes_it() {
        let cases = [
            ("198.19.1.2:40123", "\"198.19.1.2:40123\""),
            ("[fd00::2]:40123", "\"[fd00::2]:40123\""),
            ("198.19.1.2:0", "198.19.1.2"),
            ("[fd00::2]:0", "\"[fd00::2]\""),
        ];
        for (addr, want) in cases {
            let a: std::net::SocketAddr = addr.parse().expect("test address");
            let v = forwarded_for(a);
            assert_eq!(v, want);
            let back = crate::proxy::hbone::request::forwarded_for(&format!("for={v}"));
            assert_eq!(back, Some(a.ip()), "{v}");
        }
    }
}
