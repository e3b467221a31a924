//! sidenode's own `RateLimitPolicy` (`sidenode.io/v1alpha1`): a local token-bucket rate limit
//! per destination workload, enforced by the destination's node proxy.
//!
//! Istio has no API object for this (its local rate limit is an `EnvoyFilter` patch of Envoy's
//! `envoy.filters.http.local_ratelimit`), so the resource is ours; the bucket is written with
//! Envoy's field names (`maxTokens`, `tokensPerFill`, `fillInterval`) and has Envoy's
//! semantics: a bucket starts full, and every `fillInterval` adds `tokensPerFill` tokens up to
//! `maxTokens`; each new connection (or request) takes one token or is refused.
//!
//! ```yaml
//! apiVersion: sidenode.io/v1alpha1
//! kind: RateLimitPolicy
//! metadata: {name: reviews, namespace: shop}
//! spec:
//!   selector: {matchLabels: {app: reviews}}   # absent: every workload of the namespace
//!   connections:                              # new connections per workload (L4)
//!     ports: [9080]                           # absent: every port
//!     tokenBucket: {maxTokens: 50, tokensPerFill: 50, fillInterval: 1s}
//!   requests:                                 # HTTP requests per workload, per route
//!   - name: writes
//!     match: {methods: [POST, PUT], paths: ["/api/*"], ports: [9080]}
//!     tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}
//! ```
//!
//! `requests` entries are tried in order and the first whose `match` fits the request takes
//! the token (a route table: one bucket per route); a request no entry matches is not limited.

use serde::{Deserialize, Serialize};

use super::fields::{WorkloadSelector, parse_duration};

/// The fill interval of a bucket: at least this (Envoy's minimum is 50 ms).
pub const MIN_FILL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub connections: Option<ConnectionLimit>,
    #[serde(default)]
    pub requests: Vec<RequestLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimit {
    /// The destination (pod) ports limited; empty: all.
    #[serde(default)]
    pub ports: Vec<u16>,
    pub token_bucket: TokenBucketSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestLimit {
    /// Shown in logs and metrics (`requests[i]` when absent).
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: RequestMatch,
    pub token_bucket: TokenBucketSpec,
}

/// Which requests a `requests` entry counts: every field set must match; within a field any
/// value. Paths and hosts use Istio's string match (`exact`, `prefix*`, `*suffix`, `*`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenBucketSpec {
    pub max_tokens: u64,
    /// Default: `maxTokens`.
    pub tokens_per_fill: Option<u64>,
    /// Istio duration syntax (`1s`, `100ms`).
    pub fill_interval: String,
}

impl TokenBucketSpec {
    pub fn tokens_per_fill(&self) -> u64 {
        self.tokens_per_fill.unwrap_or(self.max_tokens)
    }

    /// The interval; validation made sure it parses.
    pub fn interval(&self) -> std::time::Duration {
        parse_duration(&self.fill_interval)
            .unwrap_or(MIN_FILL_INTERVAL)
            .max(MIN_FILL_INTERVAL)
    }

    fn validate(&self, field: &str) -> Result<(), (String, String)> {
        if self.max_tokens == 0 {
            return Err((
                format!("{field}.maxTokens"),
                "must be at least 1".to_string(),
            ));
        }
        if self.tokens_per_fill == Some(0) {
            return Err((
                format!("{field}.tokensPerFill"),
                "must be at least 1".to_string(),
            ));
        }
        match parse_duration(&self.fill_interval) {
            Some(d) if d >= MIN_FILL_INTERVAL => Ok(()),
            Some(_) => Err((
                format!("{field}.fillInterval"),
                format!("`{}` is shorter than 50ms", self.fill_interval),
            )),
            None => Err((
                format!("{field}.fillInterval"),
                format!(
                    "`{}` is not a duration (like `1s` or `100ms`)",
                    self.fill_interval
                ),
            )),
        }
    }
}

fn check_ports(field: &str, ports: &[u16]) -> Result<(), (String, String)> {
    match ports.iter().position(|p| *p == 0) {
        Some(i) => Err((format!("{field}[{i}]"), "must be 1-65535".to_string())),
        None => Ok(()),
    }
}

impl RateLimitPolicySpec {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.connections.is_none() && self.requests.is_empty() {
            return Err((
                "spec".to_string(),
                "sets no limit: give `connections` or `requests`".to_string(),
            ));
        }
        if let Some(c) = &self.connections {
            check_ports("spec.connections.ports", &c.ports)?;
            c.token_bucket.validate("spec.connections.tokenBucket")?;
        }
        for (i, r) in self.requests.iter().enumerate() {
            check_ports(&format!("spec.requests[{i}].match.ports"), &r.matches.ports)?;
            r.token_bucket
                .validate(&format!("spec.requests[{i}].tokenBucket"))?;
            if let Some(m) = r.matches.methods.iter().position(|m| {
                m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
            }) {
                return Err((
                    format!("spec.requests[{i}].match.methods[{m}]"),
                    format!("`{}` is not an HTTP method", r.matches.methods[m]),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> RateLimitPolicySpec {
        yaml_serde::from_str(yaml).expect("test yaml")
    }

    #[test]
    fn defaults_and_validation() {
        let s = spec("connections: {tokenBucket: {maxTokens: 5, fillInterval: 1s}}");
        assert_eq!(s.validate(), Ok(()));
        let b = &s.connections.as_ref().map(|c| c.token_bucket.clone());
        assert_eq!(b.as_ref().map(|b| b.tokens_per_fill()), Some(5));
        assert_eq!(
            b.as_ref().map(|b| b.interval()),
            Some(std::time::Duration::from_secs(1))
        );

        let err = |y: &str| spec(y).validate().map_err(|(f, _)| f);
        assert_eq!(err("{}"), Err("spec".to_string()));
        assert_eq!(
            err("connections: {tokenBucket: {maxTokens: 0, fillInterval: 1s}}"),
            Err("spec.connections.tokenBucket.maxTokens".to_string())
        );
        assert_eq!(
            err("connections: {tokenBucket: {maxTokens: 1, fillInterval: 10ms}}"),
            Err("spec.connections.tokenBucket.fillInterval".to_string())
        );
        assert_eq!(
            err("connections: {tokenBucket: {maxTokens: 1, fillInterval: soon}}"),
            Err("spec.connections.tokenBucket.fillInterval".to_string())
        );
        assert_eq!(
            err("requests: [{tokenBucket: {maxTokens: 1, tokensPerFill: 0, fillInterval: 1s}}]"),
            Err("spec.requests[0].tokenBucket.tokensPerFill".to_string())
        );
        assert_eq!(
            err(
                "requests: [{match: {methods: ['GE T']}, tokenBucket: {maxTokens: 1, fillInterval: 1s}}]"
            ),
            Err("spec.requests[0].match.methods[0]".to_string())
        );
        assert_eq!(
            err("requests: [{match: {ports: [0]}, tokenBucket: {maxTokens: 1, fillInterval: 1s}}]"),
            Err("spec.requests[0].match.ports[0]".to_string())
        );
    }
}
