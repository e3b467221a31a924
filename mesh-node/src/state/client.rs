//! The state stream from the controller: the loop that reconnects (with backoff) and resyncs
//! from a fresh snapshot each time, over the authenticated channel of
//! `identity::controller`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::NodeState;
use crate::identity::controller::{AuthChannel, TokenAuth};
use crate::proto;

pub fn state_client(c: &(Channel, TokenAuth)) -> proto::state_client::StateClient<AuthChannel> {
    proto::state_client::StateClient::with_interceptor(c.0.clone(), c.1.clone())
}

/// How the state stream is doing. Written here as updates arrive; read at scrape time by
/// `telemetry::node` (`sidenode_state_*`) and by the admin API, so this module reports
/// without depending on either.
pub struct StreamStatus {
    version: AtomicU64,
    snapshots: AtomicU64,
    deltas: AtomicU64,
    /// Receive time of the last delta minus the time the controller built it, in ms.
    lag_ms: AtomicU64,
    connected: AtomicBool,
}

/// The process's state stream (one per process: the proxy's or the gateway's).
pub static STREAM: StreamStatus = StreamStatus {
    version: AtomicU64::new(0),
    snapshots: AtomicU64::new(0),
    deltas: AtomicU64::new(0),
    lag_ms: AtomicU64::new(0),
    connected: AtomicBool::new(false),
};

impl StreamStatus {
    /// One update applied: `version` now held; `built_unix_ms` from the controller (0: unknown).
    fn applied(&self, version: u64, snapshot: bool, built_unix_ms: u64) {
        self.version.store(version, Ordering::Relaxed);
        let kind = if snapshot {
            &self.snapshots
        } else {
            &self.deltas
        };
        kind.fetch_add(1, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        // A snapshot may carry an old build time (the version was built before the stream
        // opened): only deltas measure propagation.
        if !snapshot && built_unix_ms > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.lag_ms
                .store(now.saturating_sub(built_unix_ms), Ordering::Relaxed);
        }
    }

    fn lost(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    /// The state version this process holds (0: none yet).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Updates received so far: (snapshots, deltas).
    pub fn updates(&self) -> (u64, u64) {
        (
            self.snapshots.load(Ordering::Relaxed),
            self.deltas.load(Ordering::Relaxed),
        )
    }

    /// The last delta's propagation time, in seconds (0 before the first delta).
    pub fn lag_seconds(&self) -> f64 {
        self.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Is the state stream to the controller open now?
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Follows the state stream forever, publishing each new state. The last state stays in
/// force while the controller is unreachable.
pub async fn follow(conn: (Channel, TokenAuth), tx: watch::Sender<Arc<NodeState>>) {
    let mut backoff = Duration::from_millis(100);
    let mut was_lost = false;
    loop {
        let known = tx.borrow().version;
        let mut client = state_client(&conn);
        match client
            .watch(proto::WatchRequest {
                known_version: known,
            })
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            backoff = Duration::from_millis(100);
                            let snapshot = update.snapshot;
                            let built = update.built_unix_ms;
                            let next = tx.borrow().apply(update);
                            STREAM.applied(next.version, snapshot, built);
                            if snapshot {
                                info!(
                                    version = next.version,
                                    workloads = next.workloads.len(),
                                    resync = was_lost,
                                    "state stream synced"
                                );
                                was_lost = false;
                            }
                            tx.send_replace(Arc::new(next));
                        }
                        Ok(None) => {
                            STREAM.lost();
                            break;
                        }
                        Err(e) => {
                            STREAM.lost();
                            warn!(error = %e, "state stream error");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !was_lost {
                    warn!(error = %e.message(), "controller unreachable; keeping the last state");
                }
            }
        }
        if !was_lost {
            warn!(
                version = tx.borrow().version,
                "state stream lost; keeping the last state and reconnecting"
            );
        }
        was_lost = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
