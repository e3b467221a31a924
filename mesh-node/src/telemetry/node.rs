//! sidenode's own metrics of the node proxy, read when Prometheus scrapes (a collector, so
//! nothing is kept up to date in between):
//!
//! - `sidenode_capture_events_total{event}`: the kernel's capture counters (`SN_STATS`,
//!   summed over CPUs: captured, excluded, proxy_own, recorded, closed, map_errors,
//!   strict_dropped, splice_*, refused);
//! - `sidenode_enrolled_netns`: network namespaces enrolled on this node (`SN_ENROLLED`);
//! - `sidenode_certificate_expiration_timestamp_seconds{identity}`: when each workload
//!   certificate the proxy holds expires (Unix seconds; alert on `- time()`);
//! - `sidenode_hbone_pool_connections{transport="h2|quic"}`: pooled outbound HBONE
//!   connections, HTTP/2 over TLS over TCP or HTTP/3 over QUIC (`tunnelProtocol`);
//! - `sidenode_open_connections{reporter}`: L4 connections open now;
//! - `sidenode_rate_limit_buckets`: token buckets held.
//!
//! And, updated as the state stream delivers (`state::client`): `sidenode_state_version`,
//! `sidenode_state_updates_total{kind="snapshot|delta"}`, `sidenode_state_lag_seconds` (the
//! last delta's receive time minus the time the controller built it) and
//! `sidenode_state_connected` (0 or 1).

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::proxy::Shared;

/// Reads the node's numbers at scrape time.
pub struct NodeCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

const CAPTURE: (&str, &str) = (
    "sidenode_capture_events_total",
    "The kernel's capture counters (SN_STATS), summed over CPUs",
);
const ENROLLED: (&str, &str) = (
    "sidenode_enrolled_netns",
    "Network namespaces enrolled for capture on this node",
);
const CERT_EXPIRY: (&str, &str) = (
    "sidenode_certificate_expiration_timestamp_seconds",
    "When each workload certificate held by the proxy expires (Unix seconds)",
);
const POOL: (&str, &str) = (
    "sidenode_hbone_pool_connections",
    "Pooled outbound HBONE connections, by transport (h2: HTTP/2 over TLS/TCP, quic: HTTP/3)",
);
const OPEN: (&str, &str) = (
    "sidenode_open_connections",
    "L4 connections open now, by reporter",
);
const BUCKETS: (&str, &str) = (
    "sidenode_rate_limit_buckets",
    "Rate-limit token buckets held",
);

impl NodeCollector {
    pub fn new(shared: Arc<Shared>) -> Self {
        let descs = [
            (CAPTURE, vec!["event"]),
            (ENROLLED, vec![]),
            (CERT_EXPIRY, vec!["identity"]),
            (POOL, vec!["transport"]),
            (OPEN, vec!["reporter"]),
            (BUCKETS, vec![]),
        ]
        .into_iter()
        .filter_map(|((name, help), labels)| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.into_iter().map(String::from).collect(),
                Default::default(),
            )
            .ok()
        })
        .collect();
        NodeCollector { shared, descs }
    }

    /// Registers the collector (once per process; a second call is ignored).
    pub fn register(shared: Arc<Shared>) {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            let _ = crate::telemetry::metrics::metrics()
                .registry
                .register(Box::new(NodeCollector::new(shared)));
        });
    }
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let capture = IntCounterVec::new(opts(CAPTURE.0, CAPTURE.1), &["event"])
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        let Some(maps) = &self.shared.maps else {
            return out;
        };
        for (event, n) in crate::kernel::maps::read_stats(&maps.stats) {
            capture.with_label_values(&[event]).inc_by(n);
        }
        out.extend(capture.collect());

        let enrolled = IntGauge::with_opts(opts(ENROLLED.0, ENROLLED.1))
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        enrolled.set(maps.enrolled.keys().filter(Result::is_ok).count() as i64);
        out.extend(enrolled.collect());

        let open = IntGaugeVec::new(opts(OPEN.0, OPEN.1), &["reporter"])
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        for reporter in ["source", "destination"] {
            open.with_label_values(&[reporter]).set(0);
        }
        for c in crate::telemetry::conn::open_connections() {
            let r = crate::telemetry::istio::Reporter::as_str(c.reporter);
            open.with_label_values(&[r]).inc();
        }
        out.extend(open.collect());

        if let Some(mesh) = &self.shared.mesh {
            let expiry = GaugeVec::new(opts(CERT_EXPIRY.0, CERT_EXPIRY.1), &["identity"])
                .unwrap_or_else(|_| unreachable!("static metric definition"));
            for c in mesh.certs.certificates() {
                let at = c
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                expiry
                    .with_label_values(&[c.identity.to_string().as_str()])
                    .set(at);
            }
            out.extend(expiry.collect());
            let pool = IntGaugeVec::new(opts(POOL.0, POOL.1), &["transport"])
                .unwrap_or_else(|_| unreachable!("static metric definition"));
            pool.with_label_values(&["h2"]).set(mesh.pool.len() as i64);
            pool.with_label_values(&["quic"])
                .set(mesh.quic.len() as i64);
            out.extend(pool.collect());
            let buckets = IntGauge::with_opts(opts(BUCKETS.0, BUCKETS.1))
                .unwrap_or_else(|_| unreachable!("static metric definition"));
            buckets.set(mesh.limiter.len() as i64);
            out.extend(buckets.collect());
        }
        out
    }
}

// ------------------------------------------------------------------------- state stream

struct StateMetrics {
    version: IntGauge,
    updates: IntCounterVec,
    lag: Gauge,
    connected: IntGauge,
}

fn state_metrics() -> &'static StateMetrics {
    static S: OnceLock<StateMetrics> = OnceLock::new();
    S.get_or_init(|| {
        let reg = &crate::telemetry::metrics::metrics().registry;
        let version = IntGauge::new(
            "sidenode_state_version",
            "Version of the controller's state this node holds",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let updates = IntCounterVec::new(
            opts(
                "sidenode_state_updates_total",
                "State updates received from the controller",
            ),
            &["kind"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let lag = Gauge::new(
            "sidenode_state_lag_seconds",
            "Receive time of the last state delta minus the time the controller built it",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let connected = IntGauge::new(
            "sidenode_state_connected",
            "1 while the state stream to the controller is open",
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let _ = reg.register(Box::new(version.clone()));
        let _ = reg.register(Box::new(updates.clone()));
        let _ = reg.register(Box::new(lag.clone()));
        let _ = reg.register(Box::new(connected.clone()));
        StateMetrics {
            version,
            updates,
            lag,
            connected,
        }
    })
}

/// One update applied: `version` now held; `built_unix_ms` from the controller (0: unknown).
pub fn state_update(version: u64, snapshot: bool, built_unix_ms: u64) {
    let m = state_metrics();
    m.version.set(i64::try_from(version).unwrap_or(i64::MAX));
    m.updates
        .with_label_values(&[if snapshot { "snapshot" } else { "delta" }])
        .inc();
    m.connected.set(1);
    // A snapshot may carry an old build time (the version was built before the stream
    // opened): only deltas measure propagation.
    if !snapshot && built_unix_ms > 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        m.lag.set(now.saturating_sub(built_unix_ms) as f64 / 1000.0);
    }
}

pub fn state_connected(up: bool) {
    state_metrics().connected.set(i64::from(up));
}

/// Is the state stream to the controller open now (`sidenode_state_connected`)?
pub fn state_is_connected() -> bool {
    state_metrics().connected.get() == 1
}
