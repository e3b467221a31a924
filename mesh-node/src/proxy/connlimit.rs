//! Concurrent connection limits that hold under attack: at most `max` connections open at once
//! through one side of the proxy, and at most `per_source` of them from one source (a source
//! pod for outbound connections, a peer identity for inbound tunnels). A connection over a
//! limit is refused at once (never queued), counted in `sidenode_connections_refused_total`
//! and logged at debug with its source. Each admitted connection holds a [`Permit`] until it
//! ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which limit refused a connection (label `reason` of `sidenode_connections_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    /// The proxy-wide limit of this direction.
    Proxy,
    /// The limit of one source.
    Source,
}

impl LimitHit {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::Proxy => "proxy_limit",
            LimitHit::Source => "source_limit",
        }
    }
}

/// The limits of one direction and the connections open now.
#[derive(Debug)]
pub struct Limiter {
    /// `outbound` or `inbound` (label `direction`).
    direction: &'static str,
    max: usize,
    per_source: usize,
    open: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<String, usize>,
}

impl Limiter {
    pub fn new(direction: &'static str, max: usize, per_source: usize) -> Arc<Limiter> {
        Arc::new(Limiter {
            direction,
            max,
            per_source,
            open: Mutex::new(Counts::default()),
        })
    }

    pub fn direction(&self) -> &'static str {
        self.direction
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Connections open now (all sources).
    pub fn open(&self) -> usize {
        self.open.lock().map(|c| c.total).unwrap_or(0)
    }

    /// Admits one more connection from `source`, or says which limit it is over (counted in
    /// the metric here).
    pub fn try_acquire(self: &Arc<Self>, source: &str) -> Result<Permit, LimitHit> {
        let hit = {
            let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let from_source = c.by_source.get(source).copied().unwrap_or(0);
            if c.total >= self.max {
                Some(LimitHit::Proxy)
            } else if from_source >= self.per_source {
                Some(LimitHit::Source)
            } else {
                c.total += 1;
                *c.by_source.entry(source.to_string()).or_insert(0) += 1;
                None
            }
        };
        match hit {
            Some(hit) => {
                crate::telemetry::metrics::count_conn_refused(self.direction, hit.as_str());
                Err(hit)
            }
            None => Ok(Permit {
                limiter: self.clone(),
                source: source.to_string(),
            }),
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    source: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_source_then_per_proxy_and_frees_on_drop() {
        let l = Limiter::new("outbound", 3, 2);
        let a1 = l.try_acquire("a").expect("first from a");
        let a2 = l.try_acquire("a").expect("second from a");
        assert_eq!(l.try_acquire("a").err(), Some(LimitHit::Source));
        let b1 = l.try_acquire("b").expect("first from b");
        assert_eq!(l.open(), 3);
        assert_eq!(l.try_acquire("c").err(), Some(LimitHit::Proxy));
        drop(a1);
        assert_eq!(l.open(), 2);
        let a3 = l.try_acquire("a").expect("a again after one closed");
        drop((a2, a3, b1));
        assert_eq!(l.open(), 0);
        assert!(
            l.open.lock().expect("lock").by_source.is_empty(),
            "no source left behind"
        );
    }
}
