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

/// Set, beside the proxy's mark, on the proxy's connection to a pod that keeps the client's
/// address (made inside the pod's network namespace from the client's IP, `IP_TRANSPARENT`).
/// Inside the pod, a policy rule sends packets with this whole mark to the local table, and
/// `tcp_fwmark_accept` gives the pod's accepted socket the mark of the SYN: the pod's replies
/// to the client's address come back to the proxy's socket instead of leaving the pod.
pub const ORIG_SRC_BIT: u32 = 0x8000_0000;

/// The mark of the proxy's connections that keep the client's address.
pub const fn orig_src_mark(proxy_mark: u32) -> u32 {
    proxy_mark | ORIG_SRC_BIT
}

/// Is `mark` one of the proxy's own (with or without the client's-address bit)?
pub const fn is_proxy_mark(mark: u32, proxy_mark: u32) -> bool {
    mark & !ORIG_SRC_BIT == proxy_mark
}
