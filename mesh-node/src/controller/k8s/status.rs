//! Leader-only work: write the Gateway API status the controller's resolution earns
//! (`controller::gateway`) back to the objects — `GatewayClass` `Accepted`; `Gateway`
//! `Accepted`, `Programmed` and per-listener conditions; `HTTPRoute`/`TLSRoute`
//! `status.parents[]` entries of sidenode's controller (other controllers' entries are kept).
//!
//! A JSON merge patch on the status subresource, with the object's `resourceVersion` (a
//! concurrent change makes it fail and it is tried again next round). Nothing is written when
//! the status already says it: `lastTransitionTime` is kept for a condition whose status did
//! not change, and what was last written is remembered.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::controller::gateway::{Condition, GatewayStatus, Resolution, RouteStatus};
use crate::model::ObjKey;
use crate::model::gateway::CONTROLLER_NAME;
use crate::model::gatewayapi::{GROUP, RouteKind};

/// One object whose status is written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Class(String),
    Gateway(ObjKey),
    Route(RouteKind, ObjKey),
}

impl Target {
    fn kind(&self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            Target::Class(_) => ("GatewayClass", "gatewayclasses", &["v1", "v1beta1"]),
            Target::Gateway(_) => ("Gateway", "gateways", &["v1", "v1beta1"]),
            Target::Route(RouteKind::Http, _) => ("HTTPRoute", "httproutes", &["v1", "v1beta1"]),
            Target::Route(RouteKind::Tls, _) => ("TLSRoute", "tlsroutes", &["v1alpha2"]),
        }
    }
    fn namespace_name(&self) -> (Option<&str>, &str) {
        match self {
            Target::Class(n) => (None, n),
            Target::Gateway(k) | Target::Route(_, k) => (Some(&k.namespace), &k.name),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, _, _) = self.kind();
        match self.namespace_name() {
            (Some(ns), n) => write!(f, "{kind} {ns}/{n}"),
            (None, n) => write!(f, "{kind} {n}"),
        }
    }
}

/// What sidenode says of one object (conditions without their transition times).
#[derive(Clone, Debug, PartialEq)]
enum Desired {
    Class(i64),
    Gateway(GatewayStatus),
    Route(RouteStatus),
    /// A route no longer on sidenode's Gateways: take sidenode's entries out.
    RouteGone,
}

pub struct StatusWriter {
    client: Client,
    written: BTreeMap<Target, Desired>,
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            written: BTreeMap::new(),
        }
    }

    /// Forget what was written (after losing and regaining leadership, check again).
    pub fn reset(&mut self) {
        self.written.clear();
    }

    /// Brings every status up to `res`.
    pub async fn sync(&mut self, res: &Resolution) {
        let mut want: BTreeMap<Target, Desired> = BTreeMap::new();
        for (name, generation) in &res.classes {
            want.insert(Target::Class(name.clone()), Desired::Class(*generation));
        }
        for (key, st) in &res.gateway_status {
            want.insert(Target::Gateway(key.clone()), Desired::Gateway(st.clone()));
        }
        for ((kind, key), st) in &res.route_status {
            want.insert(
                Target::Route(*kind, key.clone()),
                Desired::Route(st.clone()),
            );
        }
        let gone: Vec<Target> = self
            .written
            .iter()
            .filter(|(t, d)| {
                matches!(t, Target::Route(..)) && **d != Desired::RouteGone && !want.contains_key(t)
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in gone {
            want.insert(t, Desired::RouteGone);
        }
        debug!(objects = want.len(), "gateway status sync");
        let known: BTreeSet<Target> = want.keys().cloned().collect();
        self.written.retain(|t, _| known.contains(t));
        for (target, desired) in want {
            if self.written.get(&target) == Some(&desired) {
                continue;
            }
            match self.write(&target, &desired).await {
                Ok(true) => {
                    self.written.insert(target, desired);
                }
                // Not found (yet: a new CRD's resource can 404 for a moment): next round.
                Ok(false) => {}
                Err(e) => warn!(object = %target, error = %e, "writing status; trying again"),
            }
        }
    }

    /// Writes the status if needed; `Ok(false)` when the object is not found.
    async fn write(&self, target: &Target, desired: &Desired) -> Result<bool, kube::Error> {
        let (kind, plural, versions) = target.kind();
        let (ns, name) = target.namespace_name();
        let mut last = None;
        for v in versions {
            let gvk = GroupVersionKind::gvk(GROUP, v, kind);
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = match ns {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
                None => Api::all_with(self.client.clone(), &ar),
            };
            let obj = match api.get(name).await {
                Ok(o) => o,
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    last = Some(kube::Error::Api(e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let current = obj.data.get("status").cloned().unwrap_or(Value::Null);
            let now = serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null);
            let status = new_status(desired, &current, &now);
            if status == current {
                debug!(object = %target, "status already up to date");
                return Ok(true);
            }
            let patch = json!({
                "metadata": {"resourceVersion": obj.metadata.resource_version},
                "status": status,
            });
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            info!(object = %target, "status written");
            return Ok(true);
        }
        match last {
            // The object is gone (or its CRD): nothing to write.
            Some(kube::Error::Api(e)) if e.code == 404 => {
                debug!(object = %target, "not found; no status written");
                Ok(false)
            }
            Some(e) => Err(e),
            None => Ok(false),
        }
    }
}

/// The status to write: `desired` over `current`.
fn new_status(desired: &Desired, current: &Value, now: &Value) -> Value {
    let mut status = match current {
        Value::Object(_) => current.clone(),
        _ => json!({}),
    };
    match desired {
        Desired::Class(generation) => {
            let ours = [Condition {
                kind: "Accepted",
                status: true,
                reason: "Accepted",
                message: "sidenode's gateway serves this class".into(),
            }];
            status["conditions"] = conditions(&ours, *generation, &current["conditions"], now);
        }
        Desired::Gateway(g) => {
            status["conditions"] =
                conditions(&g.conditions, g.generation, &current["conditions"], now);
            let old = current["listeners"].as_array().cloned().unwrap_or_default();
            let listeners: Vec<Value> = g
                .listeners
                .iter()
                .map(|l| {
                    let before = old
                        .iter()
                        .find(|o| o["name"].as_str() == Some(&l.name))
                        .map(|o| o["conditions"].clone())
                        .unwrap_or(Value::Null);
                    json!({
                        "name": l.name,
                        "supportedKinds": l.supported_kinds.iter()
                            .map(|k| json!({"group": GROUP, "kind": k}))
                            .collect::<Vec<_>>(),
                        "attachedRoutes": l.attached_routes,
                        "conditions": conditions(&l.conditions, g.generation, &before, now),
                    })
                })
                .collect();
            status["listeners"] = Value::Array(listeners);
        }
        Desired::Route(r) => {
            let old = current["parents"].as_array().cloned().unwrap_or_default();
            let mut parents: Vec<Value> = old
                .iter()
                .filter(|p| p["controllerName"].as_str() != Some(CONTROLLER_NAME))
                .cloned()
                .collect();
            for p in &r.parents {
                let mut parent_ref = json!({
                    "group": GROUP,
                    "kind": "Gateway",
                    "namespace": p.gateway.namespace,
                    "name": p.gateway.name,
                });
                if let Some(s) = &p.section_name {
                    parent_ref["sectionName"] = json!(s);
                }
                if let Some(port) = p.port {
                    parent_ref["port"] = json!(port);
                }
                let before = old
                    .iter()
                    .find(|o| {
                        o["controllerName"].as_str() == Some(CONTROLLER_NAME)
                            && o["parentRef"]["name"] == parent_ref["name"]
                            && o["parentRef"]["namespace"] == parent_ref["namespace"]
                            && o["parentRef"]["sectionName"] == parent_ref["sectionName"]
                    })
                    .map(|o| o["conditions"].clone())
                    .unwrap_or(Value::Null);
                parents.push(json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": conditions(&p.conditions, r.generation, &before, now),
                }));
            }
            status["parents"] = Value::Array(parents);
        }
        Desired::RouteGone => {
            let parents: Vec<Value> = current["parents"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p["controllerName"].as_str() != Some(CONTROLLER_NAME))
                .collect();
            status["parents"] = Value::Array(parents);
        }
    }
    status
}

/// Conditions as the API has them; a condition whose status did not change keeps its
/// `lastTransitionTime` from `before`.
fn conditions(ours: &[Condition], generation: i64, before: &Value, now: &Value) -> Value {
    let before = before.as_array().cloned().unwrap_or_default();
    Value::Array(
        ours.iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let since = before
                    .iter()
                    .find(|b| {
                        b["type"].as_str() == Some(c.kind) && b["status"].as_str() == Some(status)
                    })
                    .map(|b| b["lastTransitionTime"].clone())
                    .filter(|t| !t.is_null())
                    .unwrap_or_else(|| now.clone());
                json!({
                    "type": c.kind,
                    "status": status,
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": generation,
                    "lastTransitionTime": since,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::gateway::ParentStatus;

    fn route(accepted: bool) -> Desired {
        Desired::Route(RouteStatus {
            generation: 2,
            parents: vec![ParentStatus {
                gateway: ObjKey {
                    namespace: "edge".into(),
                    name: "web".into(),
                },
                section_name: Some("https".into()),
                port: None,
                conditions: vec![Condition {
                    kind: "Accepted",
                    status: accepted,
                    reason: if accepted {
                        "Accepted"
                    } else {
                        "NoMatchingParent"
                    },
                    message: "m".into(),
                }],
            }],
        })
    }

    #[test]
    fn other_controllers_entries_stay_and_unchanged_conditions_keep_their_time() {
        let t0 = json!("2026-01-01T00:00:00Z");
        let t1 = json!("2026-02-02T00:00:00Z");
        let theirs = json!({"parentRef": {"name": "x"}, "controllerName": "example.com/x", "conditions": []});
        let current = json!({"parents": [theirs.clone()]});
        let first = new_status(&route(true), &current, &t0);
        assert_eq!(first["parents"][0], theirs);
        let ours = &first["parents"][1];
        assert_eq!(ours["controllerName"], CONTROLLER_NAME);
        assert_eq!(ours["parentRef"]["sectionName"], "https");
        assert_eq!(ours["conditions"][0]["lastTransitionTime"], t0);
        assert_eq!(ours["conditions"][0]["observedGeneration"], 2);
        // Written again later, nothing changes: the same status, nothing to patch.
        assert_eq!(new_status(&route(true), &first, &t1), first);
        // A changed condition moves its time.
        let changed = new_status(&route(false), &first, &t1);
        assert_eq!(
            changed["parents"][1]["conditions"][0]["lastTransitionTime"],
            t1
        );
        assert_eq!(
            changed["parents"][1]["conditions"][0]["reason"],
            "NoMatchingParent"
        );
        // Off sidenode's Gateways: only the other controller's entry is left.
        let gone = new_status(&Desired::RouteGone, &changed, &t1);
        assert_eq!(gone["parents"], json!([theirs]));
    }

    #[test]
    fn a_gateway_status_has_listeners_with_required_fields() {
        let g = Desired::Gateway(GatewayStatus {
            generation: 3,
            conditions: vec![Condition {
                kind: "Programmed",
                status: true,
                reason: "Programmed",
                message: "m".into(),
            }],
            listeners: vec![crate::controller::gateway::ListenerStatus {
                name: "https".into(),
                supported_kinds: vec!["HTTPRoute"],
                attached_routes: 2,
                conditions: vec![],
            }],
        });
        let current = json!({"addresses": [{"value": "10.0.0.1"}]});
        let s = new_status(&g, &current, &json!("2026-01-01T00:00:00Z"));
        assert_eq!(s["addresses"], current["addresses"], "kept");
        assert_eq!(s["conditions"][0]["type"], "Programmed");
        assert_eq!(s["listeners"][0]["attachedRoutes"], 2);
        assert_eq!(
            s["listeners"][0]["supportedKinds"][0],
            json!({"group": GROUP, "kind": "HTTPRoute"})
        );
    }
}
