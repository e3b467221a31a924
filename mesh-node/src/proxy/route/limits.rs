//! Connection pool limits (`DestinationRule` `trafficPolicy.connectionPool`), counted per
//! destination (the [`super::Routed::cluster`] key: service and subset) in this node's proxy,
//! as Envoy counts them per cluster in each proxy:
//!
//! - `tcp.maxConnections`: open connections; one more is refused at once;
//! - `http.http1MaxPendingRequests`, `http.http2MaxRequests`: for the HTTP path, requests
//!   waiting for a connection and requests in flight; over the limit the request is answered
//!   `503` (Envoy's overflow).
//!
//! Every acquisition is counted, limited or not, so that a limit added later applies to the
//! connections already open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::policy::Resilience;

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `tcp.maxConnections`.
    Connections,
    /// `http.http1MaxPendingRequests`.
    PendingRequests,
    /// `http.http2MaxRequests`.
    Requests,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connections => "maxConnections",
            Kind::PendingRequests => "http1MaxPendingRequests",
            Kind::Requests => "http2MaxRequests",
        }
    }
}

/// A limit was reached: refuse (reset, or answer `503`), count `reason="overflow"`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} of {} reached ({} in use)", kind.as_str(), key, max)]
pub struct Overflow {
    pub kind: Kind,
    pub key: String,
    pub max: u32,
}

/// The proxy's counters, shared by every connection.
#[derive(Debug, Default)]
pub struct Limits {
    counters: Mutex<HashMap<(Kind, String), Arc<AtomicU32>>>,
}

/// One unit of a limit, released on drop. Owns its counter (`'static`, can move into tasks).
#[derive(Debug)]
pub struct Permit {
    counter: Arc<AtomicU32>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limits {
    fn counter(&self, kind: Kind, key: &str) -> Arc<AtomicU32> {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = c.get(&(kind, key.to_string())) {
            return a.clone();
        }
        c.entry((kind, key.to_string())).or_default().clone()
    }

    /// One more of `kind` for `key`, unless `max` (`None`: no limit) are in use.
    pub fn try_acquire(&self, kind: Kind, key: &str, max: Option<u32>) -> Result<Permit, Overflow> {
        let counter = self.counter(kind, key);
        let limit = max.unwrap_or(u32::MAX);
        match counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        }) {
            Ok(_) => Ok(Permit { counter }),
            Err(_) => Err(Overflow {
                kind,
                key: key.to_string(),
                max: limit,
            }),
        }
    }

    /// A connection to `key` under its `tcp.maxConnections`.
    pub fn try_connection(&self, key: &str, r: &Resilience) -> Result<Permit, Overflow> {
        self.try_acquire(Kind::Connections, key, r.max_connections)
    }

    /// An HTTP request in flight to `key` under its `http.http2MaxRequests`.
    pub fn try_request(&self, key: &str, r: &Resilience) -> Result<Permit, Overflow> {
        self.try_acquire(Kind::Requests, key, r.http2_max_requests)
    }

    /// An HTTP request waiting for a connection to `key` under `http.http1MaxPendingRequests`.
    pub fn try_pending(&self, key: &str, r: &Resilience) -> Result<Permit, Overflow> {
        self.try_acquire(Kind::PendingRequests, key, r.http1_max_pending_requests)
    }

    /// How many of `kind` are in use for `key`.
    pub fn in_use(&self, kind: Kind, key: &str) -> u32 {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&(kind, key.to_string()))
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_limit_overflows_until_one_is_released() {
        let l = Limits::default();
        let r = Resilience {
            max_connections: Some(2),
            ..Default::default()
        };
        let a = l.try_connection("ns/svc/", &r).expect("first");
        let _b = l.try_connection("ns/svc/", &r).expect("second");
        let err = l.try_connection("ns/svc/", &r).expect_err("third");
        assert_eq!(err.kind, Kind::Connections);
        assert_eq!(err.max, 2);
        assert_eq!(l.in_use(Kind::Connections, "ns/svc/"), 2);
        // Another destination (or subset) has its own count.
        let _c = l.try_connection("ns/svc/v1", &r).expect("other subset");
        drop(a);
        assert_eq!(l.in_use(Kind::Connections, "ns/svc/"), 1);
        let _d = l.try_connection("ns/svc/", &r).expect("after a release");
        assert!(l.try_connection("ns/svc/", &r).is_err());
    }

    #[test]
    fn unlimited_is_counted_so_a_new_limit_applies_at_once() {
        let l = Limits::default();
        let free = Resilience::default();
        let held: Vec<_> = (0..3)
            .map(|_| l.try_connection("k", &free).expect("unlimited"))
            .collect();
        let limited = Resilience {
            max_connections: Some(3),
            ..Default::default()
        };
        assert!(l.try_connection("k", &limited).is_err());
        drop(held);
        assert!(l.try_connection("k", &limited).is_ok());
    }

    #[test]
    fn http_request_limits_are_separate_semaphores() {
        let l = Limits::default();
        let r = Resilience {
            http2_max_requests: Some(1),
            http1_max_pending_requests: Some(2),
            max_connections: Some(1),
            ..Default::default()
        };
        let _conn = l.try_connection("k", &r).expect("connection");
        let req = l.try_request("k", &r).expect("request");
        assert!(l.try_request("k", &r).is_err());
        let _p1 = l.try_pending("k", &r).expect("pending 1");
        let _p2 = l.try_pending("k", &r).expect("pending 2");
        let e = l.try_pending("k", &r).expect_err("pending 3");
        assert_eq!(
            e.to_string(),
            "http1MaxPendingRequests of k reached (2 in use)"
        );
        // A permit can move into another thread (task).
        std::thread::spawn(move || drop(req)).join().expect("join");
        assert!(l.try_request("k", &r).is_ok());
    }
}
