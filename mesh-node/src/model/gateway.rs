//! The listeners of an ingress gateway, in Istio's `networking.istio.io` `Gateway` form. Both
//! dialects end here: an Istio `Gateway` is read as it is; a Gateway API `Gateway` whose
//! `GatewayClass` names sidenode's controller ([`CONTROLLER_NAME`]) is converted by the
//! controller (listeners → `servers`, `certificateRefs` → `credentialName`, after the
//! `ReferenceGrant` checks) and carries its class in [`GatewaySpec::gateway_class_name`]. Routes
//! reach a gateway as VirtualServices whose `gateways` name it (an `HTTPRoute` or `TLSRoute`
//! with the Gateway as `parentRef` is converted to one). The gateway process (`mesh-node
//! gateway`) serves the Gateways that select it and nothing below the controller knows the
//! Gateway API.

use serde::{Deserialize, Serialize};

use super::Labels;
use super::fields::{bad, check_port};

/// `GatewayClass.spec.controllerName` of the classes sidenode's gateway serves.
pub const CONTROLLER_NAME: &str = "sidenode.io/gateway-controller";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Istio: the labels of the gateway pods that serve it (all of them must match).
    #[serde(default)]
    pub selector: Labels,
    #[serde(default)]
    pub servers: Vec<Server>,
    /// Set only on a converted Gateway API `Gateway`: its `gatewayClassName`. Such a Gateway is
    /// served by every gateway process of that class, whatever its labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_class_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    pub port: ServerPort,
    /// Host names served (`*` = all, `*.example.com` allowed). Istio also allows
    /// `namespace/host`; the namespace part limits which VirtualServices may bind.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerPort {
    pub number: u32,
    /// `HTTP`, `HTTPS` or `TLS` (case-insensitive).
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    /// On an `HTTP` server: answer every request with a 301 to `https`.
    #[serde(default)]
    pub https_redirect: bool,
    /// `SIMPLE` (terminate) or `PASSTHROUGH` (route by SNI, bytes untouched).
    #[serde(default)]
    pub mode: Option<TlsMode>,
    /// The `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`): a name in the Gateway's own
    /// namespace, or `namespace/name` (only in a converted Gateway API `Gateway`, whose
    /// cross-namespace reference the controller checked against `ReferenceGrant`s).
    pub credential_name: Option<String>,
    /// `TLSV1_2` (default) or `TLSV1_3`.
    pub min_protocol_version: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

/// What a server's port speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Https,
    Tls,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" => Some(Protocol::Http),
            "HTTPS" => Some(Protocol::Https),
            "TLS" => Some(Protocol::Tls),
            _ => None,
        }
    }
}

impl Server {
    pub fn protocol(&self) -> Option<Protocol> {
        Protocol::parse(&self.port.protocol)
    }

    /// TLS is terminated here (`HTTPS`, or `TLS` with `SIMPLE`).
    pub fn terminates_tls(&self) -> bool {
        matches!(self.protocol(), Some(Protocol::Https | Protocol::Tls))
            && self.tls.as_ref().and_then(|t| t.mode) == Some(TlsMode::Simple)
    }

    /// TLS passed through to the backend, routed by SNI (`tls.mode: PASSTHROUGH`).
    pub fn passthrough(&self) -> bool {
        self.tls.as_ref().and_then(|t| t.mode) == Some(TlsMode::Passthrough)
    }
}

/// Does a gateway host pattern (`*`, `*.example.com`, `example.com`, optionally prefixed by
/// `namespace/`) match this host name (no port, lower case)?
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.rsplit_once('/').map_or(pattern, |(_, h)| h);
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        // `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
        return host.len() > suffix.len() && host.ends_with(&suffix.to_ascii_lowercase());
    }
    pattern.eq_ignore_ascii_case(host)
}

impl GatewaySpec {
    /// Served by a gateway process with these pod labels and this class?
    pub fn selects(&self, labels: &Labels, class: &str) -> bool {
        match &self.gateway_class_name {
            Some(c) => c == class,
            None => self.selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }

    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.servers.is_empty() {
            return bad("spec.servers", "at least one server is required");
        }
        for (i, s) in self.servers.iter().enumerate() {
            let f = format!("spec.servers[{i}]");
            if s.port.number == 0 {
                return bad(format!("{f}.port.number"), "missing");
            }
            check_port(format!("{f}.port.number"), Some(s.port.number))?;
            let Some(proto) = s.protocol() else {
                return bad(
                    format!("{f}.port.protocol"),
                    format!(
                        "`{}` is not served by sidenode's gateway (HTTP, HTTPS or TLS)",
                        s.port.protocol
                    ),
                );
            };
            if s.hosts.is_empty() {
                return bad(format!("{f}.hosts"), "at least one host is required");
            }
            let mode = s.tls.as_ref().and_then(|t| t.mode);
            match (proto, mode) {
                (Protocol::Http, None | Some(TlsMode::Simple)) => {}
                (Protocol::Https | Protocol::Tls, Some(TlsMode::Simple)) => {
                    if s.tls
                        .as_ref()
                        .and_then(|t| t.credential_name.as_ref())
                        .is_none()
                    {
                        return bad(
                            format!("{f}.tls.credentialName"),
                            "required with mode SIMPLE (a kubernetes.io/tls Secret)",
                        );
                    }
                }
                (Protocol::Https | Protocol::Tls, Some(TlsMode::Passthrough)) => {}
                (Protocol::Https | Protocol::Tls, None) => {
                    return bad(format!("{f}.tls.mode"), "required on HTTPS and TLS servers");
                }
                (_, Some(m)) => {
                    return bad(
                        format!("{f}.tls.mode"),
                        format!(
                            "{m:?} is not supported by sidenode's gateway (SIMPLE or PASSTHROUGH)"
                        ),
                    );
                }
            }
            if let Some(v) = s
                .tls
                .as_ref()
                .and_then(|t| t.min_protocol_version.as_deref())
                && !matches!(v, "TLSV1_2" | "TLSV1_3" | "TLS_AUTO")
            {
                return bad(
                    format!("{f}.tls.minProtocolVersion"),
                    format!("`{v}`: sidenode's gateway speaks TLSV1_2 and TLSV1_3"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert!(host_matches("*", "a.example.com"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("ns/example.com", "example.com"));
        assert!(host_matches("Example.com", "example.com"));
        assert!(!host_matches("example.com", "example.org"));
    }
}
