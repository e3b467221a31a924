//! The node proxy's ports. They follow Istio's ztunnel so tooling and habits carry over.

/// Outbound capture listener: captured `connect()` calls are rewritten to `proxy-ip:15001`.
pub const OUTBOUND: u16 = 15001;
/// HBONE (HTTP/2 CONNECT over mTLS) inbound listener.
pub const HBONE: u16 = 15008;
/// Admin API (localhost only).
pub const ADMIN: u16 = 15000;
/// Prometheus metrics.
pub const METRICS: u16 = 15020;
/// Readiness probe.
pub const READINESS: u16 = 15021;

/// Ports of the proxy that a captured connection to the proxy's own address is never rewritten
/// for (connecting to them must reach the proxy itself, not loop through it).
pub const PROXY_PORTS: [u16; 5] = [OUTBOUND, HBONE, ADMIN, METRICS, READINESS];

/// `SO_MARK` the node proxy sets on every socket it opens; the capture program never rewrites a
/// socket carrying it, so the proxy's own connections are not captured (Istio uses 1337 too).
pub const PROXY_MARK: u32 = 0x539;
