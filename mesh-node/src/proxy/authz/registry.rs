//! Open inbound tunnels, re-checked when the node's state changes: a tunnel that the policies
//! in force no longer allow is closed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Peer, check_connection, count_denied};
use crate::state::StateRx;

struct Tracked {
    pod: String,
    peer: Peer,
    close: CancellationToken,
}

/// The open tunnels of this proxy that policies may close.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Tracked>>,
}

/// A registered tunnel: `closed()` fires when a policy change refuses it; dropping it
/// unregisters the tunnel.
pub struct Registration<'r> {
    id: u64,
    registry: &'r Registry,
    close: CancellationToken,
}

impl Registration<'_> {
    pub async fn closed(&self) {
        self.close.cancelled().await
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a tunnel to `pod` (workload uid) from `peer`.
    pub fn register(&self, pod: &str, peer: Peer) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.lock().insert(
            id,
            Tracked {
                pod: pod.to_string(),
                peer,
                close: close.clone(),
            },
        );
        Registration {
            id,
            registry: self,
            close,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-evaluates every open tunnel against `st`; closes (and unregisters) the refused ones.
    /// Returns how many were closed.
    pub fn recheck(&self, st: &crate::state::NodeState) -> usize {
        let mut open = self.lock();
        let mut closed = 0;
        open.retain(|_, t| {
            let d = check_connection(st, &t.pod, &t.peer);
            if d.allowed() {
                return true;
            }
            info!(
                pod = %t.pod,
                client = %t.peer.ip,
                src_principal = t.peer.principal.as_deref().unwrap_or(""),
                dst_port = t.peer.dest_port,
                reason = d.denied.map_or("", |r| r.as_str()),
                policy = d.policy.as_deref().unwrap_or(""),
                "connection closed by policy change"
            );
            count_denied("l4", "policy_change");
            t.close.cancel();
            closed += 1;
            false
        });
        closed
    }

    /// Follows the state; each change re-checks the open tunnels. Ends with the state stream.
    pub async fn recheck_forever(&self, mut rx: StateRx) {
        while rx.changed().await.is_ok() {
            let st = rx.borrow_and_update().clone();
            // Workload labels matter too (selectors), so every change is a reason.
            if !self.is_empty() {
                debug!(
                    version = st.version,
                    "state changed; re-checking open tunnels"
                );
                self.recheck(&st);
            }
        }
    }
}
