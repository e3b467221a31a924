//! `RateLimitPolicy` (sidenode.io/v1alpha1, `model::ratelimit`) enforced by the destination's
//! node proxy: local token buckets per destination workload — one per policy for new
//! connections (checked when a tunnel is accepted, refused with HBONE status 429) and one per
//! matching `requests` entry for HTTP requests (checked per request on HTTP ports, answered
//! `429 local_rate_limited`). Both are counted in `sidenode_rate_limited_total{kind,policy}`.
//!
//! Which policies apply to a workload: those of its namespace and of the root namespace
//! (`--root-namespace`, mesh-wide) whose `selector.matchLabels` are all among its labels (no
//! selector: every workload), as for `AuthorizationPolicy`. When several apply, a connection
//! or request needs a token from each, and takes them only if all have one.
//!
//! Buckets live as long as they carry information: one that has refilled to full is the same
//! as a new one, so full buckets are dropped now and then (bounded memory when workloads and
//! policies come and go). A policy whose bucket parameters change starts a new, full bucket.

pub mod bucket;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

use crate::model::ratelimit::{RateLimitPolicySpec, RequestMatch};
use crate::policy::matching::{HttpRequest, host_matches, string_matches};
use crate::proto;
use crate::state::NodeState;
use bucket::{Params, TokenBucket};

/// How often full buckets are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Which limit a bucket serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// `namespace/name` of the policy.
    policy: String,
    /// `connections` or `requests[i]`.
    entry: String,
    /// The destination workload's uid.
    pod: String,
}

/// A refused connection or request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// `namespace/name` of the policy whose bucket was empty.
    pub policy: String,
    /// `connections`, or the `requests` entry's name (`requests[i]` without one).
    pub entry: String,
    /// Until that bucket's next fill.
    pub retry_after: Duration,
}

#[derive(Default)]
pub struct Limiter {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    buckets: HashMap<Key, TokenBucket>,
    last_sweep: Option<Instant>,
}

/// The `RateLimitPolicy` objects applying to workload `w`, as (`namespace/name`, spec), in a
/// stable order.
fn applicable<'s>(
    st: &'s NodeState,
    w: &proto::Workload,
) -> Vec<(String, &'s RateLimitPolicySpec)> {
    let root = crate::policy::root_namespace();
    let mut out: Vec<_> = st
        .configs
        .values()
        .filter_map(|o| match &o.spec {
            crate::model::istio::IstioSpec::RateLimitPolicy(spec) => Some((o, spec)),
            _ => None,
        })
        .filter(|(o, _)| o.key.namespace == w.namespace || o.key.namespace == root)
        .filter(|(_, spec)| spec.selector.as_ref().is_none_or(|s| s.selects(&w.labels)))
        .map(|(o, spec)| (o.key.to_string(), spec))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Does a `requests` limit apply to port `port` of workload `pod` (so the proxy must serve
/// HTTP on tunnels to it)? Only HTTP service ports are read as HTTP.
pub fn has_request_limits(st: &NodeState, pod: &str, port: u16) -> bool {
    let Some(w) = st.workloads.get(pod) else {
        return false;
    };
    applicable(st, w).iter().any(|(_, spec)| {
        spec.requests
            .iter()
            .any(|r| r.matches.ports.is_empty() || r.matches.ports.contains(&port))
    }) && crate::state::protocol::is_http_pod_port(st, w, port)
}

fn request_matches(m: &RequestMatch, port: u16, req: &HttpRequest<'_>) -> bool {
    let path = req.path.split(['?', '#']).next().unwrap_or("");
    (m.ports.is_empty() || m.ports.contains(&port))
        && (m.methods.is_empty() || m.methods.iter().any(|x| x == req.method))
        && (m.paths.is_empty() || m.paths.iter().any(|p| string_matches(p, path)))
        && (m.hosts.is_empty() || m.hosts.iter().any(|h| host_matches(h, req.host)))
}

impl Limiter {
    /// A new connection to port `port` of workload `pod`: `Err` when a limit refuses it.
    pub fn check_connection(&self, st: &NodeState, pod: &str, port: u16) -> Result<(), Limited> {
        let Some(w) = st.workloads.get(pod) else {
            return Ok(());
        };
        let wanted: Vec<(Key, Params)> = applicable(st, w)
            .into_iter()
            .filter_map(|(policy, spec)| {
                let c = spec.connections.as_ref()?;
                (c.ports.is_empty() || c.ports.contains(&port)).then(|| {
                    let key = Key {
                        policy,
                        entry: "connections".into(),
                        pod: pod.to_string(),
                    };
                    (key, Params::of(&c.token_bucket))
                })
            })
            .collect();
        self.take(wanted, Instant::now())
            .inspect_err(|l| count("connection", &l.policy))
    }

    /// One HTTP request to port `port` of workload `pod`: the first matching `requests` entry
    /// of each applicable policy takes a token.
    pub fn check_request(
        &self,
        st: &NodeState,
        pod: &str,
        port: u16,
        req: &HttpRequest<'_>,
    ) -> Result<(), Limited> {
        let Some(w) = st.workloads.get(pod) else {
            return Ok(());
        };
        let wanted: Vec<(Key, Params)> = applicable(st, w)
            .into_iter()
            .filter_map(|(policy, spec)| {
                let (i, r) = spec
                    .requests
                    .iter()
                    .enumerate()
                    .find(|(_, r)| request_matches(&r.matches, port, req))?;
                let entry = if r.name.is_empty() {
                    format!("requests[{i}]")
                } else {
                    r.name.clone()
                };
                let key = Key {
                    policy,
                    entry,
                    pod: pod.to_string(),
                };
                Some((key, Params::of(&r.token_bucket)))
            })
            .collect();
        self.take(wanted, Instant::now())
            .inspect_err(|l| count("request", &l.policy))
    }

    /// Takes one token from each bucket, or none when one is empty.
    fn take(&self, wanted: Vec<(Key, Params)>, now: Instant) -> Result<(), Limited> {
        if wanted.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (key, params) in &wanted {
            let b = inner
                .buckets
                .entry(key.clone())
                .or_insert_with(|| TokenBucket::new(*params, now));
            if b.params != *params {
                *b = TokenBucket::new(*params, now);
            }
            b.refill(now);
            if b.tokens() == 0 {
                return Err(Limited {
                    policy: key.policy.clone(),
                    entry: key.entry.clone(),
                    retry_after: b.next_fill_in(now),
                });
            }
        }
        for (key, _) in &wanted {
            if let Some(b) = inner.buckets.get_mut(key) {
                b.take();
            }
        }
        let due = inner
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if due {
            inner.last_sweep = Some(now);
            inner.buckets.retain(|_, b| {
                b.refill(now);
                !b.is_full()
            });
        }
        Ok(())
    }

    /// Buckets held (for tests and the admin view).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `sidenode_rate_limited_total{kind,policy}`.
fn limited_total() -> &'static IntCounterVec {
    static C: OnceLock<IntCounterVec> = OnceLock::new();
    C.get_or_init(|| {
        crate::telemetry::metrics::counter(
            "sidenode_rate_limited_total",
            "Connections (kind connection) and HTTP requests (kind request) refused by a RateLimitPolicy at the destination's node proxy",
            &["kind", "policy"],
        )
    })
}

fn count(kind: &str, policy: &str) {
    limited_total().with_label_values(&[kind, policy]).inc();
}

#[cfg(test)]
mod tests;
