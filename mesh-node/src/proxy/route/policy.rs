//! The traffic policy that applies to one destination (service, or subset of it), merged as
//! Istio merges a subset's `trafficPolicy` into its `DestinationRule`'s, and the resilience
//! settings the proxy acts on, resolved from it with Istio's defaults.

use std::time::Duration;

use crate::model::istio::{OutlierDetection, TrafficPolicy, parse_duration};

/// Istio's merge (`MergeTrafficPolicy`): each top-level field the subset sets (`loadBalancer`,
/// `connectionPool`, `outlierDetection`) replaces the rule's field as a whole; the others
/// come from the rule. Port-level settings are not modelled.
pub fn merge(rule: Option<&TrafficPolicy>, subset: Option<&TrafficPolicy>) -> TrafficPolicy {
    let mut out = rule.cloned().unwrap_or_default();
    if let Some(s) = subset {
        if s.load_balancer.is_some() {
            out.load_balancer = s.load_balancer.clone();
        }
        if s.connection_pool.is_some() {
            out.connection_pool = s.connection_pool.clone();
        }
        if s.outlier_detection.is_some() {
            out.outlier_detection = s.outlier_detection.clone();
        }
    }
    out
}

/// What the proxy enforces for one destination. A limit of 0 or unset is no limit (as in
/// Istio, where 0 means "the default", 2³²-1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resilience {
    /// Outlier detection, when the destination's policy has one (else no tracking).
    pub outlier: Option<OutlierDetection>,
    /// `connectionPool.tcp.maxConnections`: open connections from this proxy.
    pub max_connections: Option<u32>,
    /// `connectionPool.tcp.connectTimeout`: replaces the proxy's connect timeout.
    pub connect_timeout: Option<Duration>,
    /// `connectionPool.http.http1MaxPendingRequests` (for the HTTP path, see `limits`).
    pub http1_max_pending_requests: Option<u32>,
    /// `connectionPool.http.http2MaxRequests` (for the HTTP path, see `limits`).
    pub http2_max_requests: Option<u32>,
}

// No floating point inside: equality is total.
impl Eq for Resilience {}

fn limit(v: Option<u32>) -> Option<u32> {
    v.filter(|n| *n > 0)
}

impl Resilience {
    pub fn of(tp: &TrafficPolicy) -> Resilience {
        let tcp = tp.connection_pool.as_ref().and_then(|c| c.tcp.as_ref());
        let http = tp.connection_pool.as_ref().and_then(|c| c.http.as_ref());
        Resilience {
            outlier: tp.outlier_detection.clone(),
            max_connections: limit(tcp.and_then(|t| t.max_connections)),
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout.as_deref())
                .and_then(parse_duration)
                .filter(|d| !d.is_zero()),
            http1_max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
            http2_max_requests: limit(http.and_then(|h| h.http2_max_requests)),
        }
    }

    /// The connect timeout for this destination: its own, else the proxy's.
    pub fn connect_timeout_or(&self, default: Duration) -> Duration {
        self.connect_timeout.unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(v: serde_json::Value) -> TrafficPolicy {
        serde_json::from_value(v).expect("traffic policy")
    }

    #[test]
    fn subset_fields_replace_the_rule_fields_whole() {
        let rule = tp(serde_json::json!({
            "loadBalancer": {"simple": "RANDOM"},
            "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "2s"}},
            "outlierDetection": {"consecutive5xxErrors": 3}
        }));
        let subset = tp(serde_json::json!({
            "connectionPool": {"http": {"http2MaxRequests": 7}}
        }));
        let m = merge(Some(&rule), Some(&subset));
        // loadBalancer and outlierDetection from the rule; connectionPool wholly the subset's.
        assert_eq!(m.load_balancer, rule.load_balancer);
        assert_eq!(m.outlier_detection, rule.outlier_detection);
        let r = Resilience::of(&m);
        assert_eq!(r.max_connections, None);
        assert_eq!(r.connect_timeout, None);
        assert_eq!(r.http2_max_requests, Some(7));
        assert_eq!(
            r.outlier.as_ref().and_then(|o| o.consecutive_5xx_errors),
            Some(3)
        );

        let r = Resilience::of(&merge(Some(&rule), None));
        assert_eq!(r.max_connections, Some(10));
        assert_eq!(r.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            r.connect_timeout_or(Duration::from_secs(9)),
            Duration::from_secs(2)
        );
        assert_eq!(merge(None, None), TrafficPolicy::default());
        assert_eq!(
            merge(None, Some(&subset)).connection_pool,
            subset.connection_pool
        );
    }

    #[test]
    fn zero_limits_are_no_limits() {
        let r = Resilience::of(&tp(serde_json::json!({
            "connectionPool": {
                "tcp": {"maxConnections": 0, "connectTimeout": "0s"},
                "http": {"http1MaxPendingRequests": 0, "http2MaxRequests": 0}
            }
        })));
        assert_eq!(r, Resilience::default());
        assert_eq!(
            r.connect_timeout_or(Duration::from_secs(9)),
            Duration::from_secs(9)
        );
    }
}
