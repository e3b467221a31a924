//! Every default in one place (flags in `cli` refer to these).

use std::time::Duration;

pub use mesh_common::ports::{METRICS, OUTBOUND};

/// Controller gRPC port (Istio's istiod xDS port).
pub const CONTROLLER: u16 = 15012;
/// SPIFFE trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// How often the agent looks at its configuration folder.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// How often the agent reconciles the kernel maps even without a change.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How long the proxy waits for a destination to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy lets open connections finish after SIGTERM.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Where pins go when `--bpffs` is not given.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Proxy runtime worker threads (see `mesh-node proxy --worker-threads`).
pub const PROXY_WORKERS: usize = 1;
