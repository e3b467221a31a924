//! Resolution of the Gateway API: classes, listeners, grants, routes and their status.

use super::*;
use crate::config::parse::parse_file;
use crate::model::istio::IstioSpec;
use std::path::PathBuf;

const BASE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: sidenode}
spec: {controllerName: sidenode.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: other}
spec: {controllerName: example.com/other}
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: api}
spec: {clusterIP: 10.96.0.11, ports: [{port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: edge, generation: 4}
spec:
  gatewayClassName: sidenode
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - name: https
    hostname: shop.example.com
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop-cert}]}
  - name: other-ns
    port: 8443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shared-cert, namespace: certs}]}
  - name: pass
    port: 9443
    protocol: TLS
    tls: {mode: Passthrough}
  - {name: tcp, port: 5432, protocol: TCP}
  - name: not-secret
    port: 7443
    protocol: HTTPS
    tls: {certificateRefs: [{name: x, kind: ConfigMap}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: edge}
spec:
  gatewayClassName: other
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: shop, generation: 7}
spec:
  parentRefs: [{name: web, namespace: edge}, {name: theirs, namespace: edge}]
  hostnames: [shop.example.com]
  rules:
  - backendRefs:
    - {name: shop, port: 80, weight: 3}
    - {name: api, namespace: api, port: 8080, weight: 1}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: db, namespace: shop}
spec:
  parentRefs: [{name: web, namespace: edge, sectionName: pass}]
  hostnames: [db.example.com]
  rules: [{backendRefs: [{name: shop, port: 80}]}]
";

const SECRET_GRANT: &str = "
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: gw-certs, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}]
  to: [{group: '', kind: Secret}]
";

const SERVICE_GRANT: &str = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: routes, namespace: api}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: '', kind: Service, name: api}]
";

fn snapshot(text: &str) -> Snapshot {
    let p = parse_file(&PathBuf::from("cfg/gw.yaml"), text);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let mut s = Snapshot::default();
    for o in p.objects {
        s.insert(o);
    }
    s
}

fn edge(name: &str) -> ObjKey {
    ObjKey {
        namespace: "edge".into(),
        name: name.into(),
    }
}

fn servers(r: &Resolution) -> Vec<Server> {
    let IstioSpec::Gateway(g) = &r.gateways[0].spec else {
        panic!("a Gateway")
    };
    assert_eq!(g.gateway_class_name.as_deref(), Some("sidenode"));
    g.servers.clone()
}

fn listener<'a>(st: &'a GatewayStatus, name: &str) -> &'a ListenerStatus {
    st.listeners
        .iter()
        .find(|l| l.name == name)
        .expect("listener status")
}

fn has(conds: &[Condition], kind: &str, status: bool, reason: &str) -> bool {
    conds
        .iter()
        .any(|c| c.kind == kind && c.status == status && c.reason == reason)
}

#[test]
fn only_gateways_of_sidenode_s_class_are_served() {
    let r = resolve(&snapshot(BASE));
    assert_eq!(r.classes.keys().collect::<Vec<_>>(), ["sidenode"]);
    assert_eq!(r.gateways.len(), 1);
    assert_eq!(r.gateways[0].key, edge("web"));
    assert!(!r.gateway_status.contains_key(&edge("theirs")));
    // Without its class, the Gateway is nobody's.
    let r = resolve(&snapshot(&BASE.replace(
        "spec: {controllerName: sidenode.io/gateway-controller}",
        "spec: {controllerName: example.com/x}",
    )));
    assert!(r.gateways.is_empty() && r.gateway_status.is_empty() && r.routes.is_empty());
}

#[test]
fn listeners_become_servers() {
    let r = resolve(&snapshot(BASE));
    let s = servers(&r);
    let names: Vec<_> = s.iter().filter_map(|s| s.name.as_deref()).collect();
    // other-ns has no grant, tcp is not served, not-secret is no Secret.
    assert_eq!(names, ["http", "https", "pass"]);
    assert_eq!(s[0].hosts, ["*"]);
    assert!(s[0].tls.is_none());
    assert_eq!(s[1].hosts, ["shop.example.com"]);
    let tls = s[1].tls.as_ref().expect("tls");
    assert_eq!(tls.mode, Some(TlsMode::Simple));
    assert_eq!(tls.credential_name.as_deref(), Some("edge/shop-cert"));
    assert!(s[1].terminates_tls());
    assert!(s[2].passthrough());
    let IstioSpec::Gateway(g) = &r.gateways[0].spec else {
        panic!()
    };
    assert_eq!(IstioSpec::Gateway(g.clone()).validate(), Ok(()));
    let st = &r.gateway_status[&edge("web")];
    assert_eq!(st.generation, 4);
    assert!(has(&st.conditions, "Accepted", true, "Accepted"));
    assert!(has(&st.conditions, "Programmed", true, "Programmed"));
    assert!(has(
        &listener(st, "https").conditions,
        "Programmed",
        true,
        "Programmed"
    ));
    let other = &listener(st, "other-ns").conditions;
    assert!(
        has(other, "ResolvedRefs", false, "RefNotPermitted"),
        "{other:?}"
    );
    assert!(has(other, "Programmed", false, "Invalid"));
    let tcp = &listener(st, "tcp").conditions;
    assert!(
        has(tcp, "Accepted", false, "UnsupportedProtocol"),
        "{tcp:?}"
    );
    let ns = &listener(st, "not-secret").conditions;
    assert!(
        has(ns, "ResolvedRefs", false, "InvalidCertificateRef"),
        "{ns:?}"
    );
    assert_eq!(listener(st, "pass").supported_kinds, ["TLSRoute"]);
    assert_eq!(listener(st, "https").supported_kinds, ["HTTPRoute"]);
}

#[test]
fn a_reference_grant_lets_a_listener_use_another_namespace_s_secret() {
    let r = resolve(&snapshot(&format!("{BASE}{SECRET_GRANT}")));
    let s = servers(&r);
    let other = s
        .iter()
        .find(|s| s.name.as_deref() == Some("other-ns"))
        .expect("other-ns served");
    assert_eq!(
        other
            .tls
            .as_ref()
            .and_then(|t| t.credential_name.as_deref()),
        Some("certs/shared-cert")
    );
    // A grant for another source namespace does not.
    let r = resolve(&snapshot(&format!(
        "{BASE}{}",
        SECRET_GRANT.replace("namespace: edge}", "namespace: shop}")
    )));
    assert!(
        !servers(&r)
            .iter()
            .any(|s| s.name.as_deref() == Some("other-ns"))
    );
}

#[test]
fn no_valid_listener_means_not_programmed_and_nothing_served() {
    let text = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: sidenode}
spec: {controllerName: sidenode.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: edge}
spec:
  gatewayClassName: sidenode
  listeners: [{name: udp, port: 53, protocol: UDP}]
";
    let r = resolve(&snapshot(text));
    assert!(r.gateways.is_empty());
    let st = &r.gateway_status[&edge("web")];
    assert!(has(&st.conditions, "Programmed", false, "Invalid"));
    assert!(has(&st.conditions, "Accepted", false, "ListenersNotValid"));
}

#[test]
fn routes_bind_to_sidenode_s_gateways_and_report_refs() {
    let r = resolve(&snapshot(BASE));
    let http_key = (
        RouteKind::Http,
        ObjKey {
            namespace: "shop".into(),
            name: "shop".into(),
        },
    );
    let st = &r.route_status[&http_key];
    assert_eq!(st.generation, 7);
    // Only the parent that is sidenode's gets a status.
    assert_eq!(st.parents.len(), 1);
    let p = &st.parents[0];
    assert_eq!(p.gateway, edge("web"));
    assert!(has(&p.conditions, "Accepted", true, "Accepted"));
    assert!(
        has(&p.conditions, "ResolvedRefs", false, "RefNotPermitted"),
        "{:?}",
        p.conditions
    );
    let (_, vs) = r
        .routes
        .iter()
        .find(|(k, _)| *k == RouteKind::Http)
        .expect("the HTTPRoute is served");
    let IstioSpec::VirtualService(vs) = &vs.spec else {
        panic!()
    };
    assert_eq!(vs.gateways, ["edge/web"]);
    // The backend not permitted is left out; the other takes all the traffic.
    assert_eq!(vs.http[0].route.len(), 1);
    assert_eq!(vs.http[0].route[0].destination.host, "shop");
    assert_eq!(vs.http[0].route[0].weight, None);
    // HTTP listeners count the route.
    let gst = &r.gateway_status[&edge("web")];
    assert_eq!(listener(gst, "http").attached_routes, 1);
    assert_eq!(listener(gst, "https").attached_routes, 1);
    assert_eq!(listener(gst, "pass").attached_routes, 1);

    // With the grant, both backends, weighted.
    let r = resolve(&snapshot(&format!("{BASE}{SERVICE_GRANT}")));
    let p = &r.route_status[&http_key].parents[0];
    assert!(has(&p.conditions, "ResolvedRefs", true, "ResolvedRefs"));
    let IstioSpec::VirtualService(vs) = &r
        .routes
        .iter()
        .find(|(k, _)| *k == RouteKind::Http)
        .expect("served")
        .1
        .spec
    else {
        panic!()
    };
    let hosts: Vec<_> = vs.http[0]
        .route
        .iter()
        .map(|d| (d.destination.host.as_str(), d.weight))
        .collect();
    assert_eq!(hosts, [("shop", Some(75)), ("api.api", Some(25))]);
}

#[test]
fn a_rule_without_a_valid_backend_answers_500() {
    let text = BASE.replace("    - {name: shop, port: 80, weight: 3}\n", "");
    let r = resolve(&snapshot(&text));
    let IstioSpec::VirtualService(vs) = &r
        .routes
        .iter()
        .find(|(k, _)| *k == RouteKind::Http)
        .expect("served")
        .1
        .spec
    else {
        panic!()
    };
    assert!(vs.http[0].route.is_empty());
    let abort = vs.http[0]
        .fault
        .as_ref()
        .and_then(|f| f.abort.as_ref())
        .expect("abort");
    assert_eq!(abort.http_status, 500);
    assert_eq!(IstioSpec::VirtualService(vs.clone()).validate(), Ok(()));
}

#[test]
fn a_missing_backend_is_reported() {
    let text = BASE.replace(
        "rules: [{backendRefs: [{name: shop, port: 80}]}]",
        "rules: [{backendRefs: [{name: gone, port: 80}]}]",
    );
    let r = resolve(&snapshot(&text));
    let key = (
        RouteKind::Tls,
        ObjKey {
            namespace: "shop".into(),
            name: "db".into(),
        },
    );
    let p = &r.route_status[&key].parents[0];
    assert!(
        has(&p.conditions, "ResolvedRefs", false, "BackendNotFound"),
        "{:?}",
        p.conditions
    );
    // Its only rule lost its only backend: nothing to route to.
    let IstioSpec::VirtualService(vs) = &r
        .routes
        .iter()
        .find(|(k, _)| *k == RouteKind::Tls)
        .expect("served")
        .1
        .spec
    else {
        panic!()
    };
    assert!(vs.tls.is_empty());
}

#[test]
fn a_route_on_a_missing_listener_or_kind_is_not_accepted() {
    let text = BASE.replace("sectionName: pass", "sectionName: nope");
    let r = resolve(&snapshot(&text));
    let key = (
        RouteKind::Tls,
        ObjKey {
            namespace: "shop".into(),
            name: "db".into(),
        },
    );
    let p = &r.route_status[&key].parents[0];
    assert!(
        has(&p.conditions, "Accepted", false, "NoMatchingParent"),
        "{:?}",
        p.conditions
    );
    assert!(!r.routes.iter().any(|(k, _)| *k == RouteKind::Tls));
    let text = BASE.replace("sectionName: pass", "sectionName: https");
    let r = resolve(&snapshot(&text));
    let p = &r.route_status[&key].parents[0];
    assert!(
        has(&p.conditions, "Accepted", false, "NotAllowedByListeners"),
        "{:?}",
        p.conditions
    );
}

#[test]
fn the_view_carries_converted_gateways_and_routes() {
    let snap = snapshot(&format!("{BASE}{SERVICE_GRANT}"));
    let v = crate::controller::view::View::from_snapshot(&snap, "", "cluster.local");
    let gw = &v.configs["Gateway/edge/web"];
    assert_eq!(gw.kind, "Gateway");
    let spec: IstioSpec = serde_json::from_str(&gw.spec_json).expect("decodes");
    let IstioSpec::Gateway(g) = spec else {
        panic!()
    };
    assert_eq!(g.gateway_class_name.as_deref(), Some("sidenode"));
    let r = &v.configs["GatewayHTTPRoute/shop/shop"];
    assert_eq!(r.kind, "HTTPRoute");
    let spec: IstioSpec = serde_json::from_str(&r.spec_json).expect("decodes");
    let IstioSpec::VirtualService(vs) = spec else {
        panic!()
    };
    assert!(vs.applies_to_gateway("shop", &edge("web")));
    assert!(!vs.applies_to_mesh());
    assert!(v.configs.contains_key("GatewayTLSRoute/shop/db"));
}

#[test]
fn a_route_whose_hostnames_no_listener_takes_is_not_accepted() {
    assert!(hostnames_intersect(None, &["a.example.com".into()]));
    assert!(hostnames_intersect(Some("shop.example.com"), &["*".into()]));
    assert!(hostnames_intersect(
        Some("*.example.com"),
        &["shop.example.com".into()]
    ));
    assert!(hostnames_intersect(
        Some("shop.example.com"),
        &["*.example.com".into()]
    ));
    assert!(!hostnames_intersect(
        Some("shop.example.com"),
        &["db.example.com".into()]
    ));
    // The route names the https listener (shop.example.com) but serves another host.
    let text = BASE
        .replace(
            "parentRefs: [{name: web, namespace: edge}, {name: theirs, namespace: edge}]",
            "parentRefs: [{name: web, namespace: edge, sectionName: https}]",
        )
        .replace(
            "hostnames: [shop.example.com]\n  rules:\n  - backendRefs:",
            "hostnames: [other.example.org]\n  rules:\n  - backendRefs:",
        );
    let r = resolve(&snapshot(&text));
    let key = (
        RouteKind::Http,
        ObjKey {
            namespace: "shop".into(),
            name: "shop".into(),
        },
    );
    let p = &r.route_status[&key].parents[0];
    assert!(
        has(
            &p.conditions,
            "Accepted",
            false,
            "NoMatchingListenerHostname"
        ),
        "{:?}",
        p.conditions
    );
    assert!(!r.routes.iter().any(|(k, _)| *k == RouteKind::Http));
}
