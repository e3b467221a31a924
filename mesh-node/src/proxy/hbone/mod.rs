//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams over mutual TLS 1.3, following
//! Istio ztunnel's wire conventions so the two can interoperate (the side-by-side table with
//! ztunnel's source is in docs/architecture.md, "HBONE on the wire"):
//!
//! - the tunnel goes to the destination pod's address, port 15008; `:authority` is the
//!   destination `ip:port` (IPv6 in brackets); TLS 1.3 only, ALPN `h2`, no SNI;
//! - request headers `baggage` (ztunnel's keys, [`baggage`]), `forwarded: for=<client ip>` and
//!   `traceparent` (always; an unsampled one when tracing is off);
//! - answers: `200` tunnel open, `400` not a `CONNECT`, a malformed authority or a destination
//!   this listener does not serve, `401` refused by policy, `429` over a `RateLimitPolicy`
//!   (sidenode only; ztunnel has no such limit), `503` the pod could not be reached.
//!
//! `pool` (one multiplexed HTTP/2 connection per source identity, destination and destination
//! identity), `client` (open a tunnel), `server` (accept tunnels for one pod), `stream` (a
//! tunnel's stream on `h2` and the copy between it and a socket), `quiet_buf` (the read buffer
//! under TLS, given back when a connection goes quiet), `quic` (the same over
//! HTTP/3; `h3_stream` its stream and copy), `dial` (which of the two a new tunnel takes: the one place that decides).

pub mod client;
pub mod dial;
pub mod h3_stream;
pub mod ktls;
pub mod pool;
pub mod quic;
pub mod quiet_buf;
pub mod request;
pub mod server;
pub mod stream;

use std::net::IpAddr;

/// HTTP/2 flow-control windows sized for throughput (the defaults, 64 KiB, cap a stream at a
/// few hundred Mbit/s on a millisecond of latency).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame a peer may send us. The receiver holds a whole frame in one buffer that
/// h2 then hands on (and cannot reuse): at 256 KiB each frame took a fresh, page-faulted
/// allocation (90 % of the destination proxy's page faults under a bulk flow); at 64 KiB the
/// buffers come from the allocator's free lists, and a frame is still one socket write.
/// ztunnel advertises 1 MiB; the two need not agree (each side sends frames no larger than
/// the peer's setting), so this stays ours, chosen for performance. 9 bytes short of 64 KiB so
/// that a full frame and its 9-byte header fill exactly four 16 KiB TLS records: at 64 KiB
/// every frame left a fifth record of 9 bytes, written (TCP_NODELAY) as a packet of its own.
pub const MAX_FRAME: u32 = 64 * 1024 - FRAME_HEADER;
/// An HTTP/2 frame header's size.
const FRAME_HEADER: u32 = 9;
/// Encrypted bytes rustls queues for the socket before it stops taking plaintext (rustls'
/// default is 64 KiB). A full DATA frame plus its header and the records' overhead is more
/// than 64 KiB, so at the default h2's write of one frame was taken in two parts and went out
/// in two `writev`s; with room for a few frames a frame is always one `writev`.
pub const TLS_SEND_BUF: usize = 256 * 1024;
/// Bytes h2 queues per stream before the sender must wait (hyper's client default, 1 MiB).
pub const MAX_SEND_BUF: usize = 1024 * 1024;
/// Largest header block accepted (hyper's default, 16 KiB; ztunnel's client also 16 KiB, its
/// server 64 KiB): a bigger one is refused. ztunnel's `CONNECT` headers are a few hundred
/// bytes.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Bytes read from an HBONE connection's socket at once, below TLS. rustls asks for at most
/// 4 KiB more than it holds (a 16 KiB record takes several reads); a buffer under it turns
/// those into one `read` per this many bytes.
pub const TLS_READ_BUF: usize = 64 * 1024;
/// Streams one HTTP/2 connection carries at once (ztunnel's server allows 200, its client
/// opens at most 100 per connection, as ours does).
pub const MAX_STREAMS: u32 = 100;
/// Rapid-reset protection (CVE-2023-44487): streams a peer opened and reset before the
/// server accepted them, at once on one connection; past it the connection is closed with
/// `GOAWAY ENHANCE_YOUR_CALM` (h2's default, 20, written down).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams this side reset because the peer broke the protocol (a malformed or oversized
/// header block among them), per connection; past it the connection is closed with
/// `GOAWAY ENHANCE_YOUR_CALM` (h2's default, 1024, written down).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Pooled client connections ping their peer this often and give up on it after
/// `KEEPALIVE_TIMEOUT` without an answer.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The transport a tunnel rides on (`MeshConfig.spec.tunnelProtocol`): label `transport` of
/// `sidenode_hbone_refused_total` and `sidenode_hbone_pool_connections`, the `TRANSPORT`
/// column of `mesh-node config connections`, the `tunnel` field of access-log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HTTP/2 over mutual TLS on TCP 15008.
    H2,
    /// HTTP/3 over QUIC on UDP 15008.
    Quic,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::H2 => "h2",
            Transport::Quic => "quic",
        }
    }

    /// The `transport` label of a refusal: `none` when no tunnel was involved (a refusal
    /// before one was dialled, e.g. no endpoint, or a same-node connection).
    pub fn label(t: Option<Transport>) -> &'static str {
        t.map_or("none", Transport::as_str)
    }
}

pub use super::refusal::Refusal;

/// Counts a refused tunnel in `sidenode_hbone_refused_total{direction, transport, reason}`:
/// `transport` is the tunnel's (`None`: refused before or without a tunnel, label `none`).
pub fn count_refusal(direction: &str, transport: Option<Transport>, reason: Refusal) {
    crate::telemetry::metrics::count_refusal(
        direction,
        Transport::label(transport),
        reason.as_str(),
    );
}

/// Counts and logs one refusal by an inbound listener (TCP 15008 and UDP 15008 alike) before
/// a tunnel was served: in `sidenode_hbone_refused_total{direction="inbound", transport,
/// reason}` and as a warning. `error`: the handshake's error; `None` with `Handshake` means it
/// timed out (`HBONE_HANDSHAKE_TIMEOUT`), `None` with `Untrusted` a client certificate without
/// a SPIFFE identity.
pub fn refuse_handshake(
    transport: Transport,
    reason: Refusal,
    error: Option<&dyn std::fmt::Display>,
) {
    count_refusal("inbound", Some(transport), reason);
    let name = match transport {
        Transport::H2 => "HBONE",
        Transport::Quic => "HBONE/QUIC",
    };
    let r = reason.as_str();
    match (reason, error) {
        (Refusal::NoCertificate, e) => {
            let e = e.map(ToString::to_string).unwrap_or_default();
            tracing::warn!(error = %e, "no certificate for this pod; refusing the tunnel")
        }
        (_, Some(e)) => tracing::warn!(reason = r, error = %e, "refused an {name} client"),
        (Refusal::Handshake, None) => tracing::warn!(reason = r, "{name} handshake timed out"),
        (Refusal::Untrusted, None) => {
            tracing::warn!(reason = r, "{name} client without a SPIFFE identity")
        }
        (_, None) => tracing::warn!(reason = r, "refused an {name} client"),
    }
}

/// The destination pod's HBONE address for a connection to `target` (one of its addresses):
/// `target`'s own IP, as ztunnel tunnels to the pod address of the connection's family (its
/// listener refuses a CONNECT naming an address of the other family with `400`); else the
/// pod's first address of that family, else its first.
pub fn tunnel_ip(pod_ips: &[String], target: IpAddr) -> IpAddr {
    let ips: Vec<IpAddr> = pod_ips.iter().filter_map(|i| i.parse().ok()).collect();
    if ips.contains(&target) {
        return target;
    }
    ips.iter()
        .find(|ip| ip.is_ipv4() == target.is_ipv4())
        .or(ips.first())
        .copied()
        .unwrap_or(target)
}

/// The `baggage` value of a `CONNECT` from source pod `namespace/pod` at `ip`, with ztunnel's
/// keys in ztunnel's order (`src/baggage.rs`): `k8s.cluster.name`, `k8s.namespace.name`,
/// `k8s.<workload type>.name`, `service.name`, `service.version`. The workload is the
/// Deployment (`deployment`, from the pod's `pod-template-hash`) or else the pod itself
/// (`pod`); service name and version are the canonical ones Istio's telemetry uses. A pod the
/// state does not know yet is named by its pod name.
pub fn baggage(st: &crate::state::NodeState, namespace: &str, pod: &str, ip: IpAddr) -> String {
    use crate::telemetry::istio::{CLUSTER, Side};
    let found = st
        .workload_by_ip(ip)
        .filter(|w| w.namespace == namespace && w.name == pod);
    let (side, kind) = match found {
        Some(w) => {
            let kind = if w
                .labels
                .get("pod-template-hash")
                .is_some_and(|h| !h.is_empty())
            {
                "deployment"
            } else {
                "pod"
            };
            (Side::of(w, None), kind)
        }
        None => (Side::named(namespace, pod), "pod"),
    };
    format!(
        "k8s.cluster.name={CLUSTER},k8s.namespace.name={},k8s.{kind}.name={},service.name={},service.version={}",
        side.namespace, side.workload, side.canonical_service, side.canonical_revision
    )
}

#[cfg(test)]
mod tests {
    use crate::proto;
    use crate::state::NodeState;

    fn state() -> NodeState {
        let wl = |name: &str, ip: &str, labels: &[(&str, &str)]| proto::Workload {
            uid: format!("shop/{name}"),
            namespace: "shop".into(),
            name: name.into(),
            service_account: "sa".into(),
            node: "node1".into(),
            ips: vec![ip.into()],
            meshed: true,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ready: true,
            ..Default::default()
        };
        NodeState::default().apply(proto::StateUpdate {
            version: 1,
            snapshot: true,
            trust_domain: "cluster.local".into(),
            workloads: vec![
                wl(
                    "reviews-v2-7d9c8b6f5-x2k4q",
                    "10.0.1.2",
                    &[
                        ("pod-template-hash", "7d9c8b6f5"),
                        ("app", "reviews"),
                        ("version", "v2"),
                    ],
                ),
                wl("solo", "10.0.1.3", &[]),
            ],
            ..Default::default()
        })
    }

    #[test]
    fn baggage_has_ztunnels_keys_in_its_order() {
        let st = state();
        let ip = |s: &str| s.parse().expect("ip");
        assert_eq!(
            super::baggage(&st, "shop", "reviews-v2-7d9c8b6f5-x2k4q", ip("10.0.1.2")),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,\
             k8s.deployment.name=reviews-v2,service.name=reviews,service.version=v2"
        );
        assert_eq!(
            super::baggage(&st, "shop", "solo", ip("10.0.1.3")),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,\
             k8s.pod.name=solo,service.name=solo,service.version=latest"
        );
        // A pod the state does not know yet: named by the kernel's record.
        assert_eq!(
            super::baggage(&st, "shop", "new-pod", ip("10.0.1.9")),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,\
             k8s.pod.name=new-pod,service.name=new-pod,service.version=latest"
        );
    }
}
