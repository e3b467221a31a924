//! What every kind of configuration shares: the error form of a field check (`bad`), Istio's
//! duration syntax, port checks and the workload selector. The kinds (`istio`, `gateway`,
//! `ratelimit`) use these; nothing here uses a kind.

use serde::{Deserialize, Serialize};

use super::Labels;

pub(crate) fn bad<T>(
    field: impl Into<String>,
    message: impl Into<String>,
) -> Result<T, (String, String)> {
    Err((field.into(), message.into()))
}

/// Istio's duration syntax (`1.5s`, `100ms`, `2m`, `1h`).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(std::time::Duration::from_secs_f64(secs))
}

pub(crate) fn check_port(field: String, p: Option<u32>) -> Result<(), (String, String)> {
    match p {
        Some(p) if p == 0 || p > 65535 => bad(field, format!("{p} is not a port (1-65535)")),
        _ => Ok(()),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

impl WorkloadSelector {
    /// Are all of the selector's labels among `labels`?
    pub fn selects(&self, labels: &std::collections::HashMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}
