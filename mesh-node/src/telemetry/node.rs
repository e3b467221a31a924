//! The state stream's metrics, read from `state::client::STREAM` when Prometheus scrapes:
//! `sidenode_state_version`, `sidenode_state_updates_total{kind="snapshot|delta"}`,
//! `sidenode_state_lag_seconds` (the last delta's receive time minus the time the controller
//! built it) and `sidenode_state_connected` (0 or 1). The proxy's own gauges are in
//! `proxy::gauges`.

use std::sync::OnceLock;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts};

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// `sidenode_state_*`, read at scrape time from `state::client::STREAM`.
pub struct StateCollector {
    descs: Vec<Desc>,
}

const STATE_VERSION: (&str, &str) = (
    "sidenode_state_version",
    "Version of the controller's state this node holds",
);
const STATE_UPDATES: (&str, &str) = (
    "sidenode_state_updates_total",
    "State updates received from the controller",
);
const STATE_LAG: (&str, &str) = (
    "sidenode_state_lag_seconds",
    "Receive time of the last state delta minus the time the controller built it",
);
const STATE_CONNECTED: (&str, &str) = (
    "sidenode_state_connected",
    "1 while the state stream to the controller is open",
);

impl StateCollector {
    /// Registers the collector (once per process; a second call is ignored). Called by the
    /// processes that follow the controller's state (the proxy and the gateway).
    pub fn register() {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            let descs = super::metrics::descs(&[
                (STATE_VERSION, &[]),
                (STATE_UPDATES, &["kind"]),
                (STATE_LAG, &[]),
                (STATE_CONNECTED, &[]),
            ]);
            let _ = crate::telemetry::metrics::metrics()
                .registry
                .register(Box::new(StateCollector { descs }));
        });
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stream = &crate::state::client::STREAM;
        let mut out = Vec::new();
        let version = IntGauge::with_opts(opts(STATE_VERSION.0, STATE_VERSION.1))
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        version.set(i64::try_from(stream.version()).unwrap_or(i64::MAX));
        out.extend(version.collect());
        let updates = IntCounterVec::new(opts(STATE_UPDATES.0, STATE_UPDATES.1), &["kind"])
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        let (snapshots, deltas) = stream.updates();
        updates.with_label_values(&["snapshot"]).inc_by(snapshots);
        updates.with_label_values(&["delta"]).inc_by(deltas);
        out.extend(updates.collect());
        let lag = Gauge::with_opts(opts(STATE_LAG.0, STATE_LAG.1))
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        lag.set(stream.lag_seconds());
        out.extend(lag.collect());
        let connected = IntGauge::with_opts(opts(STATE_CONNECTED.0, STATE_CONNECTED.1))
            .unwrap_or_else(|_| unreachable!("static metric definition"));
        connected.set(i64::from(stream.connected()));
        out.extend(connected.collect());
        out
    }
}
