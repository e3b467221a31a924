//! sidenode's own gauges of the node proxy, read when Prometheus scrapes (a collector, so
//! nothing is kept up to date in between):
//!
//! - `sidenode_capture_events_total{event}`: the kernel's capture counters (`SN_STATS`,
//!   summed over CPUs: captured, excluded, proxy_own, recorded, closed, map_errors,
//!   strict_dropped);
//! - `sidenode_enrolled_netns`: network namespaces enrolled on this node (`SN_ENROLLED`);
//! - `sidenode_certificate_expiration_timestamp_seconds{identity}`: when each workload
//!   certificate the proxy holds expires (Unix seconds; alert on `- time()`);
//! - `sidenode_hbone_pool_connections{transport="h2|quic"}`: pooled outbound HBONE
//!   connections, HTTP/2 over TLS over TCP or HTTP/3 over QUIC (`tunnelProtocol`);
//! - `sidenode_open_connections{reporter}`: L4 connections open now;
//! - `sidenode_rate_limit_buckets`: token buckets held.
//!
//! The state stream's metrics are `telemetry::node`'s.

use std::sync::{Arc, OnceLock};
use std::time::UNIX_EPOCH;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use super::Shared;

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// Reads the node's numbers at scrape time.
pub struct NodeCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
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
        let descs = crate::telemetry::metrics::descs(&[
            (CAPTURE, &["event"]),
            (ENROLLED, &[]),
            (CERT_EXPIRY, &["identity"]),
            (POOL, &["transport"]),
            (OPEN, &["reporter"]),
            (BUCKETS, &[]),
        ]);
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
