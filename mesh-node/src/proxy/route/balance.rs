//! Load balancing among a service's endpoints (`DestinationRule` `loadBalancer.simple`) and the
//! proxy-wide state it needs: round-robin counters and active connections per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use crate::model::istio::SimpleLb;

use super::service::Endpoint;

/// How one endpoint is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// In turn, per service and subset (the default).
    #[default]
    RoundRobin,
    Random,
    /// Power of two random choices: the one with fewer active connections.
    LeastRequest,
    /// No endpoint: connect to the original destination as it is.
    Passthrough,
}

impl Policy {
    /// The policy an Istio `simple` setting asks for; `None` when unset (a wider setting or
    /// the default applies).
    pub fn from_simple(s: SimpleLb) -> Option<Policy> {
        match s {
            SimpleLb::Unspecified => None,
            SimpleLb::RoundRobin => Some(Policy::RoundRobin),
            SimpleLb::Random => Some(Policy::Random),
            SimpleLb::LeastRequest | SimpleLb::LeastConn => Some(Policy::LeastRequest),
            SimpleLb::Passthrough => Some(Policy::Passthrough),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::LeastRequest => "least_request",
            Policy::Passthrough => "passthrough",
        }
    }
}

/// Index of a weighted choice: `weights[i]` out of their total. `None` when they total 0.
pub fn pick_weighted(weights: &[u32], rng: &mut fastrand::Rng) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.u64(..total);
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// The proxy's balancing state, shared by every connection.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Next round-robin position per `service uid/subset`.
    rr: Mutex<HashMap<String, usize>>,
    /// Open connections per endpoint address.
    active: Mutex<HashMap<SocketAddr, usize>>,
}

impl Balancer {
    /// Index of the chosen endpoint of `eps` (`None` when empty or `Passthrough`). `key` names
    /// the endpoint set for round robin (service uid and subset).
    pub fn pick(
        &self,
        key: &str,
        policy: Policy,
        eps: &[Endpoint],
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let n = eps.len();
        if n == 0 {
            return None;
        }
        match policy {
            Policy::Passthrough => None,
            Policy::RoundRobin => {
                let mut rr = self.rr.lock().unwrap_or_else(|p| p.into_inner());
                let next = rr.entry(key.to_string()).or_insert(0);
                let i = *next % n;
                *next = next.wrapping_add(1);
                Some(i)
            }
            Policy::Random => Some(rng.usize(..n)),
            Policy::LeastRequest => {
                if n == 1 {
                    return Some(0);
                }
                let a = rng.usize(..n);
                let mut b = rng.usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ca, cb) = (self.active(eps[a].addr), self.active(eps[b].addr));
                Some(if cb < ca { b } else { a })
            }
        }
    }

    /// Open connections to `addr` right now.
    pub fn active(&self, addr: SocketAddr) -> usize {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.get(&addr).copied().unwrap_or(0)
    }

    /// Counts one open connection to `addr` until the guard is dropped.
    pub fn track(&self, addr: SocketAddr) -> Active<'_> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        *active.entry(addr).or_insert(0) += 1;
        Active { lb: self, addr }
    }
}

/// One open connection to an endpoint (see [`Balancer::track`]).
#[derive(Debug)]
pub struct Active<'a> {
    lb: &'a Balancer,
    addr: SocketAddr,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let mut active = self.lb.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = active.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                active.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: u8) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                workload: format!("ns/pod{i}"),
                addr: SocketAddr::from(([10, 0, 0, i + 1], 80)),
            })
            .collect()
    }

    #[test]
    fn weights_within_three_points() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut hits = [0u32; 2];
        for _ in 0..10_000 {
            hits[pick_weighted(&[80, 20], &mut rng).expect("pick")] += 1;
        }
        let share = f64::from(hits[0]) / 100.0;
        assert!((77.0..=83.0).contains(&share), "v1 share {share}%");
        assert_eq!(pick_weighted(&[0, 0], &mut rng), None);
        assert_eq!(pick_weighted(&[0, 100], &mut rng), Some(1));
    }

    #[test]
    fn round_robin_in_order_per_key() {
        let lb = Balancer::default();
        let e = eps(3);
        let mut rng = fastrand::Rng::with_seed(1);
        let a: Vec<_> = (0..7)
            .map(|_| lb.pick("ns/svc/", Policy::RoundRobin, &e, &mut rng))
            .collect();
        assert_eq!(a, [0, 1, 2, 0, 1, 2, 0].map(Some));
        // Another service/subset has its own counter.
        assert_eq!(
            lb.pick("ns/svc/v1", Policy::RoundRobin, &e, &mut rng),
            Some(0)
        );
        assert_eq!(lb.pick("ns/svc/", Policy::Passthrough, &e, &mut rng), None);
        assert_eq!(lb.pick("ns/svc/", Policy::Random, &[], &mut rng), None);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let lb = Balancer::default();
        let e = eps(2);
        let _busy: Vec<_> = (0..3).map(|_| lb.track(e[0].addr)).collect();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..100 {
            assert_eq!(lb.pick("k", Policy::LeastRequest, &e, &mut rng), Some(1));
        }
        assert_eq!(lb.active(e[0].addr), 3);
        drop(_busy);
        assert_eq!(lb.active(e[0].addr), 0);
        // With three endpoints, the busy one is never chosen (two distinct candidates).
        let e3 = eps(3);
        let _busy = lb.track(e3[2].addr);
        for _ in 0..200 {
            assert_ne!(lb.pick("k", Policy::LeastRequest, &e3, &mut rng), Some(2));
        }
    }

    #[test]
    fn random_covers_every_endpoint() {
        let lb = Balancer::default();
        let e = eps(4);
        let mut rng = fastrand::Rng::with_seed(9);
        let mut seen = [0u32; 4];
        for _ in 0..4000 {
            seen[lb.pick("k", Policy::Random, &e, &mut rng).expect("pick")] += 1;
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
    }
}
