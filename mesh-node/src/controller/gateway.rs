//! The Gateway API, resolved: which `Gateway`s are sidenode's (their `GatewayClass` names
//! [`CONTROLLER_NAME`]), each listener as an Istio `Gateway` server (its certificate checked
//! against `ReferenceGrant`s), each `HTTPRoute`/`TLSRoute` on such a Gateway as the
//! VirtualService the gateway serves (backends in other namespaces checked the same way), and
//! the status conditions all of this earns, which the leader writes back (`k8s::status`).
//!
//! Everything here is a pure function of a [`Snapshot`]: the view (what is distributed) and
//! the status writer call [`resolve`] on the same snapshot and agree.

use std::collections::BTreeMap;

use crate::model::gateway::{
    CONTROLLER_NAME, GatewaySpec, Protocol, Server, ServerPort, ServerTls, TlsMode, host_matches,
};
use crate::model::gatewayapi::{ApiGateway, GROUP, GatewayRoute, Listener, RouteKind, route_of};
use crate::model::istio::{
    FaultAbort, HttpFault, IstioObject, IstioSpec, Percent, VirtualServiceSpec,
};
use crate::model::{ObjKey, Snapshot};

/// One status condition (`lastTransitionTime` is the writer's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

fn cond(
    kind: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> Condition {
    Condition {
        kind,
        status,
        reason,
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStatus {
    pub name: String,
    /// `HTTPRoute` or `TLSRoute`: the route kinds it takes.
    pub supported_kinds: Vec<&'static str>,
    pub attached_routes: u32,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayStatus {
    pub generation: i64,
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    pub gateway: ObjKey,
    pub section_name: Option<String>,
    pub port: Option<u32>,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteStatus {
    pub generation: i64,
    /// Only the parents that are sidenode's Gateways.
    pub parents: Vec<ParentStatus>,
}

/// What the controller makes of the Gateway API objects of a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// sidenode's Gateways with at least one valid listener, in the Istio form.
    pub gateways: Vec<IstioObject>,
    /// The routes bound to at least one of them, as VirtualServices.
    pub routes: Vec<(RouteKind, IstioObject)>,
    /// `GatewayClass`es of sidenode's controller: their generation (all are accepted).
    pub classes: BTreeMap<String, i64>,
    pub gateway_status: BTreeMap<ObjKey, GatewayStatus>,
    pub route_status: BTreeMap<(RouteKind, ObjKey), RouteStatus>,
}

/// May an object of `from_kind` in `from_ns` refer to the core `to_kind` `to_ns/to_name`? In
/// its own namespace always; elsewhere when a `ReferenceGrant` in `to_ns` says so.
fn granted(snap: &Snapshot, from_kind: &str, from_ns: &str, to_kind: &str, to: &ObjKey) -> bool {
    to.namespace == from_ns
        || snap.reference_grants.values().any(|g| {
            g.key.namespace == to.namespace
                && g.permits(GROUP, from_kind, from_ns, "", to_kind, &to.name)
        })
}

/// A listener as a server, or the conditions saying why it cannot be one.
fn listener_server(snap: &Snapshot, gw: &ApiGateway, l: &Listener) -> Result<Server, Condition> {
    let protocol = match l.protocol.as_str() {
        "HTTP" => Protocol::Http,
        "HTTPS" => Protocol::Https,
        "TLS" => Protocol::Tls,
        other => {
            return Err(cond(
                "Accepted",
                false,
                "UnsupportedProtocol",
                format!("sidenode's gateway serves HTTP, HTTPS and TLS, not {other}"),
            ));
        }
    };
    let tls = match (protocol, &l.tls) {
        (Protocol::Http, _) => None,
        (_, None) => {
            return Err(cond(
                "Accepted",
                false,
                "UnsupportedValue",
                format!("a {} listener needs `tls`", l.protocol),
            ));
        }
        (_, Some(t)) if t.mode == "Passthrough" => {
            if protocol == Protocol::Https {
                return Err(cond(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    "an HTTPS listener terminates TLS (Passthrough needs protocol TLS)",
                ));
            }
            Some(ServerTls {
                mode: Some(TlsMode::Passthrough),
                ..Default::default()
            })
        }
        (_, Some(t)) if t.mode == "Terminate" => {
            let Some(r) = t.certificate_refs.first() else {
                return Err(cond(
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    "tls.certificateRefs is empty",
                ));
            };
            if !(r.group.is_empty() || r.group == "core") || r.kind != "Secret" {
                return Err(cond(
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    format!("certificateRefs[0] is a {}, not a Secret", r.kind),
                ));
            }
            let secret = ObjKey {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            };
            if !granted(snap, "Gateway", &gw.key.namespace, "Secret", &secret) {
                return Err(cond(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "no ReferenceGrant in namespace {} lets Gateways of {} use Secret {}",
                        secret.namespace, gw.key.namespace, secret.name
                    ),
                ));
            }
            Some(ServerTls {
                mode: Some(TlsMode::Simple),
                credential_name: Some(secret.to_string()),
                ..Default::default()
            })
        }
        (_, Some(t)) => {
            return Err(cond(
                "Accepted",
                false,
                "UnsupportedValue",
                format!("tls.mode `{}` is not Terminate or Passthrough", t.mode),
            ));
        }
    };
    Ok(Server {
        port: ServerPort {
            number: l.port,
            protocol: l.protocol.clone(),
            name: l.name.clone(),
        },
        hosts: vec![l.hostname.clone().unwrap_or_else(|| "*".into())],
        tls,
        name: Some(l.name.clone()),
    })
}

/// The route kind a listener takes.
fn listener_takes(l: &Listener) -> RouteKind {
    let passthrough = l.tls.as_ref().is_some_and(|t| t.mode == "Passthrough");
    if l.protocol == "TLS" && passthrough {
        RouteKind::Tls
    } else {
        RouteKind::Http
    }
}

pub fn resolve(snap: &Snapshot) -> Resolution {
    let mut out = Resolution::default();
    for c in snap.gateway_classes.values() {
        if c.controller_name == CONTROLLER_NAME {
            out.classes.insert(c.name.clone(), c.generation);
        }
    }
    // Gateways: the valid listeners of each (by name) for the routes' checks.
    let mut valid: BTreeMap<&ObjKey, Vec<&Listener>> = BTreeMap::new();
    for gw in snap.api_gateways.values() {
        if !out.classes.contains_key(&gw.class_name) {
            continue; // not sidenode's: another controller's to report on
        }
        let mut servers = Vec::new();
        let mut listeners = Vec::new();
        let mut ok = Vec::new();
        for l in &gw.listeners {
            let kinds = vec![listener_takes(l).as_str()];
            let conditions = match listener_server(snap, gw, l) {
                Ok(s) => {
                    servers.push(s);
                    ok.push(l);
                    vec![
                        cond("Accepted", true, "Accepted", "listener accepted"),
                        cond("ResolvedRefs", true, "ResolvedRefs", "references resolved"),
                        cond(
                            "Programmed",
                            true,
                            "Programmed",
                            "distributed to the gateways",
                        ),
                    ]
                }
                Err(c) => {
                    let (accepted, refs) = if c.kind == "ResolvedRefs" {
                        (cond("Accepted", true, "Accepted", "listener accepted"), c)
                    } else {
                        (
                            c,
                            cond("ResolvedRefs", true, "ResolvedRefs", "references resolved"),
                        )
                    };
                    vec![
                        accepted,
                        refs,
                        cond("Programmed", false, "Invalid", "listener not served"),
                    ]
                }
            };
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                supported_kinds: kinds,
                attached_routes: 0,
                conditions,
            });
        }
        let programmed = !servers.is_empty();
        let conditions = if programmed {
            vec![
                cond("Accepted", true, "Accepted", "accepted by sidenode"),
                cond(
                    "Programmed",
                    true,
                    "Programmed",
                    format!(
                        "{} of {} listeners served",
                        servers.len(),
                        gw.listeners.len()
                    ),
                ),
            ]
        } else {
            vec![
                cond(
                    "Accepted",
                    false,
                    "ListenersNotValid",
                    "no listener is valid",
                ),
                cond("Programmed", false, "Invalid", "no listener is valid"),
            ]
        };
        out.gateway_status.insert(
            gw.key.clone(),
            GatewayStatus {
                generation: gw.generation,
                conditions,
                listeners,
            },
        );
        if programmed {
            valid.insert(&gw.key, ok);
            out.gateways.push(IstioObject {
                key: gw.key.clone(),
                spec: IstioSpec::Gateway(GatewaySpec {
                    selector: Default::default(),
                    servers,
                    gateway_class_name: Some(gw.class_name.clone()),
                }),
                origin: gw.origin.clone(),
            });
        }
    }
    for ((kind, key), r) in &snap.gateway_routes {
        let mut parents = Vec::new();
        let mut bound = Vec::new();
        let refs = backend_refs(snap, r);
        for p in &r.parents {
            let Some(gw) = snap.api_gateways.get(&p.gateway) else {
                continue;
            };
            if !out.classes.contains_key(&gw.class_name) {
                continue;
            }
            let listeners = valid.get(&p.gateway).cloned().unwrap_or_default();
            let named: Vec<&Listener> = listeners
                .iter()
                .copied()
                .filter(|l| p.section_name.as_ref().is_none_or(|s| *s == l.name))
                .filter(|l| p.port.is_none_or(|port| port == l.port))
                .collect();
            let taking: Vec<&Listener> = named
                .iter()
                .copied()
                .filter(|l| listener_takes(l) == *kind)
                .collect();
            let hosts = &r.spec.hosts;
            let matching: Vec<&Listener> = taking
                .iter()
                .copied()
                .filter(|l| hostnames_intersect(l.hostname.as_deref(), hosts))
                .collect();
            let accepted = if named.is_empty() {
                cond(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    match &p.section_name {
                        Some(s) => format!("the Gateway has no valid listener `{s}`"),
                        None => "the Gateway has no valid listener".into(),
                    },
                )
            } else if taking.is_empty() {
                cond(
                    "Accepted",
                    false,
                    "NotAllowedByListeners",
                    format!("no listener of the Gateway takes {}s", kind.as_str()),
                )
            } else if matching.is_empty() {
                cond(
                    "Accepted",
                    false,
                    "NoMatchingListenerHostname",
                    "no listener's hostname matches the route's hostnames",
                )
            } else {
                if let Some(st) = out.gateway_status.get_mut(&p.gateway) {
                    for ls in &mut st.listeners {
                        if matching.iter().any(|l| l.name == ls.name) {
                            ls.attached_routes += 1;
                        }
                    }
                }
                bound.push(p.gateway.to_string());
                cond("Accepted", true, "Accepted", "accepted by sidenode")
            };
            parents.push(ParentStatus {
                gateway: p.gateway.clone(),
                section_name: p.section_name.clone(),
                port: p.port,
                conditions: vec![accepted, refs.condition.clone()],
            });
        }
        if parents.is_empty() {
            continue;
        }
        out.route_status.insert(
            (*kind, key.clone()),
            RouteStatus {
                generation: r.generation,
                parents,
            },
        );
        if bound.is_empty() {
            continue;
        }
        bound.dedup();
        let mut spec = r.spec.clone();
        spec.gateways = bound;
        if refs.invalid.iter().any(|b| *b) {
            drop_invalid_backends(&mut spec, r, &refs.invalid);
        }
        out.routes.push((
            *kind,
            IstioObject {
                key: key.clone(),
                spec: IstioSpec::VirtualService(spec),
                origin: r.origin.clone(),
            },
        ));
    }
    out
}

/// Does a listener (`hostname`, none = any) take a route with these hosts (`*` = any)?
fn hostnames_intersect(listener: Option<&str>, route: &[String]) -> bool {
    let Some(l) = listener else { return true };
    route.iter().any(|h| {
        let h = h.to_ascii_lowercase();
        let l = l.to_ascii_lowercase();
        h == "*" || host_matches(&l, &h) || host_matches(&h, &l)
    })
}

/// The backends of a route checked: which are invalid, and the `ResolvedRefs` condition.
struct BackendCheck {
    invalid: Vec<bool>,
    condition: Condition,
}

fn backend_refs(snap: &Snapshot, r: &GatewayRoute) -> BackendCheck {
    let mut invalid = Vec::new();
    let mut condition = cond("ResolvedRefs", true, "ResolvedRefs", "backends resolved");
    for b in &r.backends {
        let problem = if !granted(
            snap,
            r.kind.as_str(),
            &r.key.namespace,
            "Service",
            &b.service,
        ) {
            Some(cond(
                "ResolvedRefs",
                false,
                "RefNotPermitted",
                format!(
                    "no ReferenceGrant in namespace {} lets {}s of {} use Service {}",
                    b.service.namespace,
                    r.kind.as_str(),
                    r.key.namespace,
                    b.service.name
                ),
            ))
        } else if !snap.services.contains_key(&b.service) {
            Some(cond(
                "ResolvedRefs",
                false,
                "BackendNotFound",
                format!("Service {} not found", b.service),
            ))
        } else {
            None
        };
        if let Some(c) = &problem
            && condition.status
        {
            condition = c.clone();
        }
        invalid.push(problem.is_some());
    }
    BackendCheck { invalid, condition }
}

/// Rebuilds the rules that name an invalid backend from their valid ones; an HTTP rule left
/// without any answers 500 (as the Gateway API asks), a TLS rule is dropped.
fn drop_invalid_backends(spec: &mut VirtualServiceSpec, r: &GatewayRoute, invalid: &[bool]) {
    let mut rules: Vec<usize> = r
        .backends
        .iter()
        .zip(invalid)
        .filter(|(_, bad)| **bad)
        .map(|(b, _)| b.rule)
        .collect();
    rules.dedup();
    let valid_of = |rule: usize| {
        r.backends
            .iter()
            .zip(invalid)
            .filter(move |(b, bad)| b.rule == rule && !**bad)
            .map(|(b, _)| b)
    };
    for rule in rules.iter().copied() {
        let route = route_of(valid_of(rule), &r.key.namespace);
        match r.kind {
            RouteKind::Http => {
                if let Some(h) = spec.http.get_mut(rule) {
                    if route.is_empty() {
                        h.fault = Some(HttpFault {
                            abort: Some(FaultAbort {
                                http_status: 500,
                                percentage: Some(Percent { value: 100.0 }),
                            }),
                            ..Default::default()
                        });
                    }
                    h.route = route;
                }
            }
            RouteKind::Tls => {
                if let Some(t) = spec.tls.get_mut(rule) {
                    t.route = route;
                }
            }
        }
    }
    spec.tls.retain(|t| !t.route.is_empty());
}

#[cfg(test)]
mod tests;
