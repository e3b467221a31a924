//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams over mutual TLS 1.3, following
//! Istio ztunnel's wire conventions so the two can interoperate:
//!
//! - the tunnel goes to the destination pod's address, port 15008; `:authority` is the
//!   destination `ip:port`;
//! - request headers `forwarded: for=<client ip>` and `baggage` (workload metadata);
//! - answers: `200` tunnel open, `400` malformed request or a destination this listener does
//!   not serve, `401` refused by policy, `503` the pod could not be reached.
//!
//! `pool` (one multiplexed HTTP/2 connection per source identity, destination and destination
//! identity), `client` (open a tunnel), `server` (accept tunnels for one pod), `stream` (a
//! tunnel's stream on `h2` and the copy between it and a socket).

pub mod client;
pub mod pool;
pub mod quic;
pub mod request;
pub mod server;
pub mod stream;

/// HTTP/2 flow-control windows sized for throughput (the defaults, 64 KiB, cap a stream at a
/// few hundred Mbit/s on a millisecond of latency).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame a peer may send us. The receiver holds a whole frame in one buffer that
/// h2 then hands on (and cannot reuse): at 256 KiB each frame took a fresh, page-faulted
/// allocation (90 % of the destination proxy's page faults under a bulk flow); at 64 KiB the
/// buffers come from the allocator's free lists, and a frame is still one socket write.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Bytes h2 queues per stream before the sender must wait (hyper's client default, 1 MiB).
pub const MAX_SEND_BUF: usize = 1024 * 1024;
/// Largest header block accepted (hyper's default, 16 KiB): a bigger one is refused.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Bytes read from an HBONE connection's socket at once, below TLS. rustls asks for at most
/// 4 KiB more than it holds (a 16 KiB record takes several reads); a buffer under it turns
/// those into one `read` per this many bytes.
pub const TLS_READ_BUF: usize = 64 * 1024;
/// Streams one HTTP/2 connection carries at once.
pub const MAX_STREAMS: u32 = 100;
/// Pooled client connections ping their peer this often and give up on it after
/// `KEEPALIVE_TIMEOUT` without an answer.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Why a tunnel (or, for `NoEndpoint`/`NoRoute`/`Overflow`, a connection to a service VIP)
/// was refused (label of `sidenode_hbone_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Untrusted,
    WrongIdentity,
    Expired,
    Handshake,
    BadRequest,
    Unreachable,
    NoCertificate,
    /// A service VIP with no ready endpoint (for the chosen subset).
    NoEndpoint,
    /// A VirtualService route naming an unknown host, subset or port.
    NoRoute,
    /// A `DestinationRule` connection pool limit (`tcp.maxConnections`) was reached.
    Overflow,
    /// A `RateLimitPolicy` connection limit of the destination (HBONE status 429).
    RateLimited,
    /// The destination's `AuthorizationPolicy` refused the tunnel (HBONE status 401/403).
    Denied,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::WrongIdentity => "wrong_identity",
            Refusal::Expired => "expired",
            Refusal::Handshake => "handshake",
            Refusal::BadRequest => "bad_request",
            Refusal::Unreachable => "unreachable",
            Refusal::NoCertificate => "no_certificate",
            Refusal::NoEndpoint => "no_endpoint",
            Refusal::NoRoute => "no_route",
            Refusal::Overflow => "overflow",
            Refusal::RateLimited => "rate_limited",
            Refusal::Denied => "denied",
        }
    }

    /// Envoy's response flag for a connection given up for this reason (access log and
    /// `istio_tcp_connections_closed_total{response_flags}`).
    pub fn response_flag(self) -> &'static str {
        match self {
            Refusal::Unreachable => "UF",
            Refusal::NoEndpoint => "UH",
            Refusal::NoRoute => "NR",
            Refusal::Overflow => "UO",
            Refusal::RateLimited => "RL",
            Refusal::Denied => "UAEX",
            Refusal::Untrusted
            | Refusal::WrongIdentity
            | Refusal::Expired
            | Refusal::Handshake
            | Refusal::NoCertificate => "UPE",
            Refusal::BadRequest => "DPE",
        }
    }

    /// Classifies a TLS failure by what rustls reported.
    pub fn of_tls(err: &std::io::Error) -> Refusal {
        let text = err.to_string();
        if text.contains("wrong server identity") {
            Refusal::WrongIdentity
        } else if text.contains("Expired") || text.contains("expired") {
            Refusal::Expired
        } else if text.contains("UnknownIssuer")
            || text.contains("untrusted")
            || text.contains("BadSignature")
        {
            Refusal::Untrusted
        } else {
            Refusal::Handshake
        }
    }
}

pub use crate::telemetry::metrics::count_refusal;
