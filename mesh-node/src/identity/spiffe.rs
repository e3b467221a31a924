//! SPIFFE identities as Istio writes them: `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "`{uri}` is not a SPIFFE workload identity (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT)"
)]
pub struct BadIdentity {
    pub uri: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl Identity {
    /// Istio's principal form: the SPIFFE id without `spiffe://` (`td/ns/NS/sa/SA`).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = BadIdentity;
    fn from_str(uri: &str) -> Result<Self, BadIdentity> {
        let bad = || BadIdentity {
            uri: uri.to_string(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let id: Identity = "spiffe://cluster.local/ns/mesh/sa/web"
            .parse()
            .expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "mesh", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/mesh/sa/web");
        for bad in [
            "http://x/ns/a/sa/b",
            "spiffe://td/ns/a",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
