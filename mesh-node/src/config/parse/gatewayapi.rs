//! Gateway API `GatewayClass`, `Gateway`, `ReferenceGrant` and `TLSRoute`
//! (`gateway.networking.k8s.io`) read into `model::gatewayapi`. Types and required fields are
//! checked here (errors name the field); what depends on other objects (the class's
//! controller, a grant for a cross-namespace reference, a supported protocol) is the
//! controller's to resolve and to report in the object's status (`controller::gateway`).

use serde::Deserialize;

use super::httproute::{self, BackendRef, ParentRef};
use super::{ObjError, RawMeta};
use crate::model::gatewayapi::{
    ApiGateway, GatewayClass, GatewayRoute, GrantFrom, GrantTo, Listener, ListenerTls,
    ReferenceGrant, RouteKind, SecretRef,
};
use crate::model::istio::{TlsMatch, TlsRoute, VirtualServiceSpec};
use crate::model::{ObjKey, Origin};

fn field(line: usize, f: String, msg: impl Into<String>) -> ObjError {
    ObjError::field(line, &f, msg)
}

// ------------------------------------------------------------------------------ GatewayClass

#[derive(Deserialize)]
pub(super) struct RawGatewayClass {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawGatewayClassSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawGatewayClassSpec {
    #[serde(default)]
    controller_name: String,
}

impl RawGatewayClass {
    pub(super) fn into_model(self, origin: Origin) -> Result<GatewayClass, ObjError> {
        let line = origin.line;
        let name = self.metadata.name(line)?;
        if self.spec.controller_name.is_empty() {
            return Err(field(line, "spec.controllerName".into(), "missing"));
        }
        Ok(GatewayClass {
            name,
            controller_name: self.spec.controller_name,
            generation: self.metadata.generation.unwrap_or(0),
            origin,
        })
    }
}

// ------------------------------------------------------------------------------ Gateway

#[derive(Deserialize)]
pub(super) struct RawGateway {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawGatewaySpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawGatewaySpec {
    #[serde(default)]
    gateway_class_name: String,
    #[serde(default)]
    listeners: Vec<RawListener>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawListener {
    #[serde(default)]
    name: String,
    hostname: Option<String>,
    port: u32,
    #[serde(default)]
    protocol: String,
    tls: Option<RawListenerTls>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawListenerTls {
    mode: Option<String>,
    #[serde(default)]
    certificate_refs: Vec<RawObjectRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObjectRef {
    group: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    name: String,
    namespace: Option<String>,
}

impl RawGateway {
    pub(super) fn into_model(self, origin: Origin) -> Result<ApiGateway, ObjError> {
        let line = origin.line;
        let key = self.metadata.key(line)?;
        if self.spec.gateway_class_name.is_empty() {
            return Err(field(line, "spec.gatewayClassName".into(), "missing"));
        }
        if self.spec.listeners.is_empty() {
            return Err(field(
                line,
                "spec.listeners".into(),
                "at least one listener is required",
            ));
        }
        let mut listeners = Vec::new();
        for (i, l) in self.spec.listeners.into_iter().enumerate() {
            let f = format!("spec.listeners[{i}]");
            if l.name.is_empty() {
                return Err(field(line, format!("{f}.name"), "missing"));
            }
            if listeners.iter().any(|x: &Listener| x.name == l.name) {
                return Err(field(
                    line,
                    format!("{f}.name"),
                    format!("`{}` is the name of an earlier listener", l.name),
                ));
            }
            if l.port == 0 || l.port > 65535 {
                return Err(field(
                    line,
                    format!("{f}.port"),
                    format!("{} is not a port (1-65535)", l.port),
                ));
            }
            if l.protocol.is_empty() {
                return Err(field(line, format!("{f}.protocol"), "missing"));
            }
            if let Some(h) = &l.hostname
                && (h.is_empty() || h.contains('/') || h.contains(':'))
            {
                return Err(field(
                    line,
                    format!("{f}.hostname"),
                    format!("`{h}` is not a host name"),
                ));
            }
            let tls = match l.tls {
                None => None,
                Some(t) => {
                    let mut refs = Vec::new();
                    for (j, r) in t.certificate_refs.into_iter().enumerate() {
                        if r.name.is_empty() {
                            return Err(field(
                                line,
                                format!("{f}.tls.certificateRefs[{j}].name"),
                                "missing",
                            ));
                        }
                        refs.push(SecretRef {
                            group: r.group.unwrap_or_default(),
                            kind: r.kind.unwrap_or_else(|| "Secret".into()),
                            namespace: r.namespace.unwrap_or_else(|| key.namespace.clone()),
                            name: r.name,
                        });
                    }
                    Some(ListenerTls {
                        mode: t.mode.unwrap_or_else(|| "Terminate".into()),
                        certificate_refs: refs,
                    })
                }
            };
            listeners.push(Listener {
                name: l.name,
                hostname: l.hostname,
                port: l.port,
                protocol: l.protocol,
                tls,
            });
        }
        Ok(ApiGateway {
            key,
            class_name: self.spec.gateway_class_name,
            listeners,
            generation: self.metadata.generation.unwrap_or(0),
            origin,
        })
    }
}

// ------------------------------------------------------------------------------ ReferenceGrant

#[derive(Deserialize)]
pub(super) struct RawReferenceGrant {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawGrantSpec,
}

#[derive(Deserialize, Default)]
struct RawGrantSpec {
    #[serde(default)]
    from: Vec<RawGrantFrom>,
    #[serde(default)]
    to: Vec<RawGrantTo>,
}

#[derive(Deserialize)]
struct RawGrantFrom {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Deserialize)]
struct RawGrantTo {
    group: String,
    kind: String,
    name: Option<String>,
}

impl RawReferenceGrant {
    pub(super) fn into_model(self, origin: Origin) -> Result<ReferenceGrant, ObjError> {
        let line = origin.line;
        let key = self.metadata.key(line)?;
        if self.spec.from.is_empty() {
            return Err(field(
                line,
                "spec.from".into(),
                "at least one entry is required",
            ));
        }
        if self.spec.to.is_empty() {
            return Err(field(
                line,
                "spec.to".into(),
                "at least one entry is required",
            ));
        }
        for (i, f) in self.spec.from.iter().enumerate() {
            if f.kind.is_empty() {
                return Err(field(line, format!("spec.from[{i}].kind"), "missing"));
            }
            if f.namespace.is_empty() {
                return Err(field(line, format!("spec.from[{i}].namespace"), "missing"));
            }
        }
        for (i, t) in self.spec.to.iter().enumerate() {
            if t.kind.is_empty() {
                return Err(field(line, format!("spec.to[{i}].kind"), "missing"));
            }
        }
        Ok(ReferenceGrant {
            key,
            from: self
                .spec
                .from
                .into_iter()
                .map(|f| GrantFrom {
                    group: core_group(f.group),
                    kind: f.kind,
                    namespace: f.namespace,
                })
                .collect(),
            to: self
                .spec
                .to
                .into_iter()
                .map(|t| GrantTo {
                    group: core_group(t.group),
                    kind: t.kind,
                    name: t.name.filter(|n| !n.is_empty()),
                })
                .collect(),
            origin,
        })
    }
}

/// The core group is `""` (`core` is accepted as its other spelling).
fn core_group(g: String) -> String {
    if g == "core" { String::new() } else { g }
}

// ------------------------------------------------------------------------------ TLSRoute

#[derive(Deserialize)]
pub(super) struct RawTlsRoute {
    #[serde(default)]
    pub metadata: RawMeta,
    #[serde(default)]
    spec: RawTlsRouteSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawTlsRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RawTlsRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTlsRule {
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
}

impl RawTlsRoute {
    /// The route for its Gateway parents; `None` when it has none.
    pub(super) fn into_model(self, origin: Origin) -> Result<Option<GatewayRoute>, ObjError> {
        let line = origin.line;
        let key: ObjKey = self.metadata.key(line)?;
        let parents = httproute::gateway_parents(&self.spec.parent_refs, &key.namespace);
        if parents.is_empty() {
            return Ok(None);
        }
        if self.spec.rules.is_empty() {
            return Err(field(
                line,
                "spec.rules".into(),
                "at least one rule is required",
            ));
        }
        let sni_hosts = if self.spec.hostnames.is_empty() {
            vec!["*".to_string()]
        } else {
            self.spec.hostnames.clone()
        };
        let mut tls = Vec::new();
        let mut backends = Vec::new();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let rf = format!("spec.rules[{i}]");
            let (dests, bs) =
                httproute::backends(&rule.backend_refs, &key.namespace, line, &rf, i, true)?;
            backends.extend(bs);
            tls.push(TlsRoute {
                r#match: vec![TlsMatch {
                    sni_hosts: sni_hosts.clone(),
                    port: None,
                }],
                route: dests,
            });
        }
        let spec = VirtualServiceSpec {
            hosts: sni_hosts.clone(),
            gateways: parents.iter().map(|p| p.gateway.to_string()).collect(),
            tls,
            ..Default::default()
        };
        Ok(Some(GatewayRoute {
            kind: RouteKind::Tls,
            key,
            generation: self.metadata.generation.unwrap_or(0),
            parents,
            backends,
            spec,
            origin,
        }))
    }
}
