//! Outlier detection (`DestinationRule` `trafficPolicy.outlierDetection`): passive health of
//! each endpoint of a destination from the outcomes of the connections (and, on the HTTP path,
//! the responses) this proxy sends it. An endpoint reaching the configured number of
//! consecutive errors is ejected — skipped by endpoint selection — for a time that grows with
//! each ejection.
//!
//! Following Envoy (which Istio configures):
//! - a connect failure (refused, timed out, or an HBONE tunnel answered `503`) counts as a
//!   gateway error, and every gateway error (`502`, `503`, `504`) also counts as a 5xx; another
//!   5xx resets the gateway-error count; a success resets both;
//! - `consecutive5xxErrors` defaults to 5 (0 disables), `consecutiveGatewayErrors` to 0 (off);
//! - the ejection lasts `baseEjectionTime` (default 30 s) × the number of times the endpoint
//!   was ejected, at most max(`baseEjectionTime`, 300 s) (Envoy's `max_ejection_time`);
//! - `maxEjectionPercent` (default 10): an ejection is allowed when, after it, at most that
//!   share of the endpoints is ejected — `(ejected + 1) × 100 ≤ max% × endpoints` — or when no
//!   endpoint is ejected yet and max% > 0, so that a small service (fewer than 10 endpoints
//!   with the default) can still lose its one bad endpoint (Envoy's `always_eject_one_host`);
//!   0 disables ejection;
//! - when every candidate is ejected, selection uses them all (Envoy's panic mode).
//!
//! Differences: ejections end when next looked at (no `interval` timer; `interval` is
//! accepted and ignored) and the ejection multiplier never decreases (Envoy lowers it after
//! healthy intervals).
//!
//! State is kept per endpoint set (`service`, the [`super::Routed::cluster`] key: one service
//! and subset, as an Envoy cluster) and endpoint address, only for destinations whose policy
//! has an `outlierDetection`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::balance::{Balancer, Policy};
use super::service::Endpoint;
use crate::model::istio::{OutlierDetection, parse_duration};

/// Istio's defaults.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Envoy's default `max_ejection_time`.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// The outcome of one connection or request to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The connection could not be opened (refused, timed out, tunnel answered 503).
    ConnectFailure,
    /// An HTTP 5xx other than 502, 503, 504.
    Http5xx,
    /// HTTP 502, 503 or 504.
    GatewayError,
}

impl Outcome {
    /// The outcome of an HTTP response status.
    pub fn from_status(status: u16) -> Outcome {
        match status {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::Http5xx,
            _ => Outcome::Success,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ConnectFailure => "connect_failure",
            Outcome::Http5xx => "5xx",
            Outcome::GatewayError => "gateway_error",
        }
    }
}

/// An `OutlierDetection` with Istio's defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// `None`: disabled.
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Thresholds {
    pub fn of(od: &OutlierDetection) -> Thresholds {
        Thresholds {
            consecutive_5xx: Some(od.consecutive_5xx_errors.unwrap_or(DEFAULT_CONSECUTIVE_5XX))
                .filter(|n| *n > 0),
            consecutive_gateway: od.consecutive_gateway_errors.filter(|n| *n > 0),
            base_ejection: od
                .base_ejection_time
                .as_deref()
                .and_then(parse_duration)
                .unwrap_or(DEFAULT_BASE_EJECTION),
            max_ejection_percent: od
                .max_ejection_percent
                .map(|p| p.clamp(0, 100).unsigned_abs())
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
        }
    }
}

/// An ejection that [`Health::report`] just made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// How many times the endpoint has been ejected (this one included).
    pub count: u32,
    pub duration: Duration,
}

#[derive(Debug, Default)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl EndpointHealth {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }
}

#[derive(Debug, Default)]
struct SetHealth {
    /// Endpoints in the set at the last selection.
    hosts: usize,
    endpoints: HashMap<SocketAddr, EndpointHealth>,
}

/// Outlier-detection state of the whole proxy, shared by every connection.
#[derive(Debug, Default)]
pub struct Health {
    sets: Mutex<HashMap<String, SetHealth>>,
}

impl Health {
    /// Records one outcome of a connection (or request) to `endpoint` of the endpoint set
    /// `service` (the [`super::Routed::cluster`] key) under `policy`; returns the ejection it
    /// caused, if any (also logged).
    pub fn report(
        &self,
        service: &str,
        endpoint: SocketAddr,
        outcome: Outcome,
        policy: &OutlierDetection,
    ) -> Option<Ejection> {
        self.report_at(
            service,
            endpoint,
            outcome,
            &Thresholds::of(policy),
            Instant::now(),
        )
    }

    pub fn report_at(
        &self,
        service: &str,
        endpoint: SocketAddr,
        outcome: Outcome,
        t: &Thresholds,
        now: Instant,
    ) -> Option<Ejection> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        let set = sets.entry(service.to_string()).or_default();
        let ep = set.endpoints.entry(endpoint).or_default();
        if ep.ejected(now) {
            // Connections opened before the ejection: already accounted for.
            return None;
        }
        match outcome {
            Outcome::Success => {
                ep.consecutive_5xx = 0;
                ep.consecutive_gateway = 0;
                return None;
            }
            Outcome::Http5xx => {
                ep.consecutive_gateway = 0;
                ep.consecutive_5xx += 1;
            }
            Outcome::GatewayError | Outcome::ConnectFailure => {
                ep.consecutive_gateway += 1;
                ep.consecutive_5xx += 1;
            }
        }
        let (c5xx, cgw) = (ep.consecutive_5xx, ep.consecutive_gateway);
        let tripped = t.consecutive_5xx.is_some_and(|n| c5xx >= n)
            || t.consecutive_gateway.is_some_and(|n| cgw >= n);
        if !tripped {
            return None;
        }
        // As Envoy: the counts start over whether or not the ejection is allowed.
        ep.consecutive_5xx = 0;
        ep.consecutive_gateway = 0;
        let hosts = set.hosts.max(set.endpoints.len());
        let ejected = set.endpoints.values().filter(|e| e.ejected(now)).count();
        if !ejection_allowed(ejected, hosts, t.max_ejection_percent) {
            warn!(
                cluster = service,
                %endpoint,
                outcome = outcome.as_str(),
                ejected,
                hosts,
                max_ejection_percent = t.max_ejection_percent,
                "endpoint not ejected: maxEjectionPercent reached"
            );
            return None;
        }
        let ep = set.endpoints.entry(endpoint).or_default();
        ep.ejections += 1;
        let duration = t
            .base_ejection
            .saturating_mul(ep.ejections)
            .min(t.base_ejection.max(MAX_EJECTION));
        ep.ejected_until = Some(now + duration);
        warn!(
            cluster = service,
            %endpoint,
            outcome = outcome.as_str(),
            consecutive_5xx = c5xx,
            consecutive_gateway_errors = cgw,
            ejections = ep.ejections,
            ejection_ms = duration.as_millis() as u64,
            "endpoint ejected (outlier detection)"
        );
        Some(Ejection {
            count: ep.ejections,
            duration,
        })
    }

    /// Is `endpoint` of `service` ejected now?
    pub fn is_ejected(&self, service: &str, endpoint: SocketAddr) -> bool {
        self.is_ejected_at(service, endpoint, Instant::now())
    }

    pub fn is_ejected_at(&self, service: &str, endpoint: SocketAddr, now: Instant) -> bool {
        let sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.get(service)
            .and_then(|s| s.endpoints.get(&endpoint))
            .is_some_and(|e| e.ejected(now))
    }

    /// Of the indexes `candidates` of `eps` (the whole endpoint set of `service`), those not
    /// ejected at `now`. Records the set's size and forgets endpoints no longer in it.
    pub fn healthy_at(
        &self,
        service: &str,
        eps: &[Endpoint],
        candidates: &[usize],
        now: Instant,
    ) -> Vec<usize> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        let set = sets.entry(service.to_string()).or_default();
        set.hosts = eps.len();
        if set.endpoints.len() > eps.len() {
            set.endpoints
                .retain(|addr, _| eps.iter().any(|e| e.addr == *addr));
        }
        for (addr, e) in set.endpoints.iter_mut() {
            if e.ejected_until.is_some_and(|t| now >= t) {
                e.ejected_until = None;
                info!(cluster = service, endpoint = %addr, "endpoint returned after ejection");
            }
        }
        candidates
            .iter()
            .copied()
            .filter(|&i| {
                !set.endpoints
                    .get(&eps[i].addr)
                    .is_some_and(|e| e.ejected(now))
            })
            .collect()
    }
}

/// May one more of `hosts` endpoints be ejected while `ejected` are?
pub fn ejection_allowed(ejected: usize, hosts: usize, max_percent: u32) -> bool {
    let max = u64::from(max_percent.min(100));
    max > 0 && (ejected == 0 || (ejected as u64 + 1) * 100 <= max * hosts as u64)
}

/// Index (into `eps`) of the endpoint to use for a connection to the endpoint set `key`:
/// `tried` endpoints excluded, ejected ones skipped when outlier detection is on (`health`
/// and `outlier` given) unless every remaining one is ejected (then all remaining are used),
/// the rest balanced by `policy`. `None` when nothing remains.
#[allow(clippy::too_many_arguments)]
pub fn select(
    lb: &Balancer,
    health: Option<&Health>,
    outlier: Option<&OutlierDetection>,
    key: &str,
    policy: Policy,
    eps: &[Endpoint],
    tried: &[SocketAddr],
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    let left: Vec<usize> = (0..eps.len())
        .filter(|&i| !tried.contains(&eps[i].addr))
        .collect();
    if left.is_empty() {
        return None;
    }
    let usable = match (health, outlier) {
        (Some(h), Some(_)) => {
            let healthy = h.healthy_at(key, eps, &left, Instant::now());
            if healthy.is_empty() { left } else { healthy }
        }
        _ => left,
    };
    if usable.len() == eps.len() {
        return lb.pick(key, policy, eps, rng);
    }
    let subset: Vec<Endpoint> = usable.iter().map(|&i| eps[i].clone()).collect();
    lb.pick(key, policy, &subset, rng).map(|j| usable[j])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn eps(n: u8) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| Endpoint {
                workload: format!("ns/pod{i}"),
                addr: addr(i),
            })
            .collect()
    }

    fn od(v: serde_json::Value) -> OutlierDetection {
        serde_json::from_value(v).expect("outlier detection")
    }

    fn thresholds(v: serde_json::Value) -> Thresholds {
        Thresholds::of(&od(v))
    }

    #[test]
    fn status_classes() {
        assert_eq!(Outcome::from_status(200), Outcome::Success);
        assert_eq!(Outcome::from_status(404), Outcome::Success);
        assert_eq!(Outcome::from_status(500), Outcome::Http5xx);
        assert_eq!(Outcome::from_status(501), Outcome::Http5xx);
        for s in [502, 503, 504] {
            assert_eq!(Outcome::from_status(s), Outcome::GatewayError);
        }
        assert_eq!(Outcome::from_status(505), Outcome::Http5xx);
    }

    #[test]
    fn istio_defaults() {
        let t = thresholds(serde_json::json!({}));
        assert_eq!(
            t,
            Thresholds {
                consecutive_5xx: Some(5),
                consecutive_gateway: None,
                base_ejection: Duration::from_secs(30),
                max_ejection_percent: 10,
            }
        );
        let t = thresholds(serde_json::json!({
            "consecutive5xxErrors": 0, "consecutiveGatewayErrors": 2,
            "baseEjectionTime": "1m", "maxEjectionPercent": 50
        }));
        assert_eq!(t.consecutive_5xx, None);
        assert_eq!(t.consecutive_gateway, Some(2));
        assert_eq!(t.base_ejection, Duration::from_secs(60));
        assert_eq!(t.max_ejection_percent, 50);
    }

    #[test]
    fn ejected_after_n_consecutive_failures_and_success_resets() {
        let h = Health::default();
        let t =
            thresholds(serde_json::json!({"consecutive5xxErrors": 3, "maxEjectionPercent": 100}));
        let now = Instant::now();
        let e = addr(1);
        assert_eq!(h.report_at("s", e, Outcome::ConnectFailure, &t, now), None);
        assert_eq!(h.report_at("s", e, Outcome::Http5xx, &t, now), None);
        // A success starts the count over.
        assert_eq!(h.report_at("s", e, Outcome::Success, &t, now), None);
        assert_eq!(h.report_at("s", e, Outcome::Http5xx, &t, now), None);
        assert_eq!(h.report_at("s", e, Outcome::GatewayError, &t, now), None);
        assert!(!h.is_ejected_at("s", e, now));
        let ej = h.report_at("s", e, Outcome::ConnectFailure, &t, now);
        assert_eq!(
            ej,
            Some(Ejection {
                count: 1,
                duration: Duration::from_secs(30)
            })
        );
        assert!(h.is_ejected_at("s", e, now));
        assert!(h.is_ejected_at("s", e, now + Duration::from_secs(29)));
        assert!(!h.is_ejected_at("s", e, now + Duration::from_secs(30)));
        // Another endpoint set keeps its own state.
        assert!(!h.is_ejected_at("other", e, now));
    }

    #[test]
    fn gateway_errors_count_separately() {
        let h = Health::default();
        let t = thresholds(serde_json::json!({
            "consecutive5xxErrors": 0, "consecutiveGatewayErrors": 2, "maxEjectionPercent": 100
        }));
        let now = Instant::now();
        let e = addr(1);
        assert_eq!(h.report_at("s", e, Outcome::GatewayError, &t, now), None);
        // A 5xx that is not a gateway error resets the gateway count.
        assert_eq!(h.report_at("s", e, Outcome::Http5xx, &t, now), None);
        assert_eq!(h.report_at("s", e, Outcome::GatewayError, &t, now), None);
        assert!(
            h.report_at("s", e, Outcome::ConnectFailure, &t, now)
                .is_some()
        );
        // 5xx detection disabled: any number of plain 5xx never ejects.
        let e2 = addr(2);
        for _ in 0..20 {
            assert_eq!(h.report_at("s", e2, Outcome::Http5xx, &t, now), None);
        }
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_up_to_the_cap() {
        let h = Health::default();
        let t = thresholds(serde_json::json!({
            "consecutive5xxErrors": 1, "baseEjectionTime": "100s", "maxEjectionPercent": 100
        }));
        let e = addr(1);
        let mut now = Instant::now();
        let mut got = Vec::new();
        for _ in 0..4 {
            let ej = h
                .report_at("s", e, Outcome::ConnectFailure, &t, now)
                .expect("ejected");
            got.push(ej.duration.as_secs());
            // While ejected, failures of older connections are ignored.
            assert_eq!(h.report_at("s", e, Outcome::ConnectFailure, &t, now), None);
            now += ej.duration;
        }
        assert_eq!(got, [100, 200, 300, 300]);
    }

    #[test]
    fn max_ejection_percent() {
        // The rule: after the ejection at most max% ejected, or the first one when max% > 0.
        assert!(ejection_allowed(0, 2, 10));
        assert!(!ejection_allowed(1, 2, 10));
        assert!(ejection_allowed(1, 2, 100));
        assert!(!ejection_allowed(0, 5, 0));
        assert!(ejection_allowed(1, 10, 20));
        assert!(!ejection_allowed(2, 10, 20));

        let h = Health::default();
        let t =
            thresholds(serde_json::json!({"consecutive5xxErrors": 1, "maxEjectionPercent": 50}));
        let now = Instant::now();
        let e = eps(4);
        let all = [0, 1, 2, 3];
        assert_eq!(h.healthy_at("s", &e, &all, now), all);
        assert!(
            h.report_at("s", e[0].addr, Outcome::ConnectFailure, &t, now)
                .is_some()
        );
        assert!(
            h.report_at("s", e[1].addr, Outcome::ConnectFailure, &t, now)
                .is_some()
        );
        // 3 of 4 would be 75% > 50%.
        assert_eq!(
            h.report_at("s", e[2].addr, Outcome::ConnectFailure, &t, now),
            None
        );
        assert_eq!(h.healthy_at("s", &e, &all, now), [2, 3]);
        // Once the ejections end, the endpoints are used again.
        let later = now + Duration::from_secs(30);
        assert_eq!(h.healthy_at("s", &e, &all, later), all);
        // Default 10%: with few endpoints still one may be ejected, not two.
        let d = thresholds(serde_json::json!({"consecutive5xxErrors": 1}));
        assert!(
            h.report_at("d", e[0].addr, Outcome::ConnectFailure, &d, now)
                .is_some()
        );
        assert_eq!(
            h.report_at("d", e[1].addr, Outcome::ConnectFailure, &d, now),
            None
        );
    }

    #[test]
    fn selection_skips_ejected_and_tried_and_falls_back_to_all() {
        let lb = Balancer::default();
        let h = Health::default();
        let o = od(serde_json::json!({"consecutive5xxErrors": 1, "maxEjectionPercent": 100}));
        let e = eps(3);
        let mut rng = fastrand::Rng::with_seed(5);
        let pick = |tried: &[SocketAddr], rng: &mut fastrand::Rng| {
            select(
                &lb,
                Some(&h),
                Some(&o),
                "s",
                Policy::RoundRobin,
                &e,
                tried,
                rng,
            )
        };
        assert!(
            h.report("s", e[1].addr, Outcome::ConnectFailure, &o)
                .is_some()
        );
        for _ in 0..20 {
            assert_ne!(pick(&[], &mut rng), Some(1));
        }
        // Excluding the tried one too leaves a single choice.
        for _ in 0..5 {
            assert_eq!(pick(&[e[0].addr], &mut rng), Some(2));
        }
        // Everything tried: nothing.
        assert_eq!(pick(&[e[0].addr, e[1].addr, e[2].addr], &mut rng), None);
        // All ejected: all are used (panic mode).
        assert!(
            h.report("s", e[0].addr, Outcome::ConnectFailure, &o)
                .is_some()
        );
        assert!(
            h.report("s", e[2].addr, Outcome::ConnectFailure, &o)
                .is_some()
        );
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[pick(&[], &mut rng).expect("pick")] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        // Without outlier detection the health state is not consulted.
        for _ in 0..3 {
            assert!(
                select(
                    &lb,
                    Some(&h),
                    None,
                    "t",
                    Policy::RoundRobin,
                    &e,
                    &[],
                    &mut rng
                )
                .is_some()
            );
        }
    }
}
