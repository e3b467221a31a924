//! Every default in one place (flags in `cli` refer to these).

use std::time::Duration;

pub use mesh_common::ports::{ADMIN, METRICS, OUTBOUND};

/// Where the proxy's admin API listens unless `--admin` says otherwise: loopback only.
pub const ADMIN_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), ADMIN);

/// Controller gRPC port (Istio's istiod xDS port).
pub const CONTROLLER: u16 = 15012;
/// SPIFFE trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// How often the agent looks at its configuration folder.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// How often the agent reconciles the kernel maps even without a change.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How often the agent and the proxy try again while a pod's network namespace cannot be found
/// (its processes are not up yet).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to renew a certificate while the controller fails
/// (back-off from 1 s, doubling). The current certificate serves meanwhile.
pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(10);
/// How long the proxy waits for a destination to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled outbound HBONE connection (HTTP/2 or QUIC) that carried no tunnel for this long is
/// closed (`mesh-node proxy --pool-idle-timeout`; ztunnel's `POOL_UNUSED_RELEASE_TIMEOUT`
/// is 5 minutes too).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the proxy looks at its heap and returns freed pages to the kernel when more than
/// 4 MiB are free (`kernel::heap`; docs/operations.md, "Memory after a burst").
pub const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// A kernel-TLS tunnel is retired (no new tunnels on it; the server sends GOAWAY) once either
/// direction has carried this many records: half the 2^24 at which a rustls or ztunnel peer
/// re-keys with a KeyUpdate, which kernels before 6.13 cannot follow (`proxy::hbone::ktls`).
pub const KTLS_RECORD_LIMIT: u64 = 1 << 23;
/// How often a kernel-TLS tunnel's record counters are read against [`KTLS_RECORD_LIMIT`].
pub const KTLS_RECORD_CHECK: Duration = Duration::from_secs(1);
/// How long a client has to complete the TLS handshake on an HBONE listener (a peer that
/// stalls mid-handshake is dropped and counted as `reason="handshake"`).
pub const HBONE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// With `tunnelProtocol: quic`, how long a new QUIC connection may wait for the destination's
/// answer before the tunnel is opened over HTTP/2 instead: quinn's first Initial retransmit
/// comes after about 1 s (initial RTT estimate 333 ms, PTO 3x), so 1.5 s gives one retry.
pub const QUIC_FALLBACK_TIMEOUT: Duration = Duration::from_millis(1500);
/// After a fallback, how long a destination is reached over HTTP/2 before QUIC is tried again.
pub const QUIC_RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long the proxy lets open connections finish after SIGTERM.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Where pins go when `--bpffs` is not given.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the proxy writes pods' network sysctls (`--proc-sys-net`): the thread's namespace
/// decides which namespace a write reaches. The DaemonSet mounts the host's at
/// `/host/proc/sys/net` (a container's own `/proc/sys` is read-only).
pub const PROC_SYS_NET: &str = "/proc/sys/net";
/// Captured (outbound) connections one proxy carries at once (`mesh-node proxy
/// --max-connections`); past it a new one is reset at accept. Each takes two file descriptors
/// and, idle, a few KiB (docs/performance.md, "Memory per connection").
pub const MAX_CONNECTIONS: usize = 100_000;
/// Captured connections of one source pod at once (`--max-connections-per-workload`): one
/// misbehaving pod cannot take the whole node's share.
pub const MAX_CONNECTIONS_PER_WORKLOAD: usize = 20_000;
/// Inbound tunnels (HBONE streams over HTTP/2 or QUIC, and same-node connections) one proxy
/// serves at once (`--max-inbound-tunnels`); past it a `CONNECT` is answered `503`.
pub const MAX_INBOUND_TUNNELS: usize = 100_000;
/// Inbound tunnels from one peer identity at once (`--max-inbound-tunnels-per-identity`).
pub const MAX_INBOUND_TUNNELS_PER_IDENTITY: usize = 20_000;
/// Proxy runtime worker threads (see `mesh-node proxy --worker-threads`).
pub const PROXY_WORKERS: usize = 1;
/// How often the controller looks for changes from the Kubernetes API (a flag check; the
/// watches themselves push).
pub const KUBE_SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// The controller's namespace on Kubernetes.
pub const CONTROLLER_NAMESPACE: &str = "sidenode-system";
/// The agents' service account (in the controller's namespace).
pub const AGENT_SERVICE_ACCOUNT: &str = "sidenode-agent";
/// Audience of the agents' projected service-account tokens.
pub const TOKEN_AUDIENCE: &str = "sidenode";
/// The leader-election Lease (in the controller's namespace).
pub const LEADER_LEASE: &str = "sidenode-controller";
/// Where the controller keeps its CA files (on Kubernetes, copied from the CA Secret).
pub const CONTROLLER_STATE_DIR: &str = "/var/run/sidenode-controller";

/// The gateway's ServiceAccount (`mesh-node gateway --service-account`).
pub const GATEWAY_SERVICE_ACCOUNT: &str = "sidenode-gateway";
/// Pod labels an Istio `Gateway.spec.selector` is matched against (`--labels`).
pub const GATEWAY_LABELS: &str = "istio=ingressgateway";
/// The Gateway API class the gateway serves (`--class`).
pub const GATEWAY_CLASS: &str = "sidenode";
/// Open client connections per gateway (`--max-connections`).
pub const GATEWAY_MAX_CONNECTIONS: usize = 10_000;
/// From accept to the end of the TLS handshake (`--handshake-timeout`).
pub const GATEWAY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// To receive a request's headers (`--header-timeout`; Envoy's `request_headers_timeout` is
/// off by default, which lets a slowloris client hold a connection forever).
pub const GATEWAY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client connection without a request in flight is closed after this long
/// (`--idle-timeout`; Envoy's `idle_timeout`: 1 h).
pub const GATEWAY_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Request headers, bytes (`--max-header-bytes`; Envoy: 60 KiB).
pub const GATEWAY_MAX_HEADER_BYTES: usize = 60 * 1024;
