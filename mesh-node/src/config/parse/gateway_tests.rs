//! The two gateway dialects: Istio `Gateway`, and the Gateway API's `GatewayClass`, `Gateway`,
//! `ReferenceGrant`, `HTTPRoute` (Gateway parents) and `TLSRoute`.

use super::*;
use crate::model::gateway::TlsMode;
use crate::model::gatewayapi::{GatewayRoute, RouteKind};
use std::path::PathBuf;

fn parse(text: &str) -> FileParse {
    parse_file(&PathBuf::from("cfg/gw.yaml"), text)
}

fn one(text: &str) -> Object {
    let mut p = parse(text);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.objects.len(), 1, "{:?}", p.objects);
    p.objects.remove(0)
}

/// The only error of `text`, as displayed.
fn error(text: &str) -> String {
    let p = parse(text);
    assert_eq!(p.errors.len(), 1, "{:?} {:?}", p.errors, p.objects);
    assert!(p.objects.is_empty(), "{:?}", p.objects);
    p.errors[0].to_string()
}

fn gateway_route(o: Object) -> GatewayRoute {
    match o {
        Object::HttpRoute(r) => r.gateway.expect("gateway part"),
        Object::TlsRoute(r) => r,
        other => panic!("not a route: {other:?}"),
    }
}

const ISTIO_GATEWAY: &str = "\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: web, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ['*.example.com']
    tls: {mode: SIMPLE, credentialName: web-cert}
";

#[test]
fn an_istio_gateway_is_read_by_its_api_version() {
    for v in ["v1", "v1beta1", "v1alpha3"] {
        let text = ISTIO_GATEWAY.replace("v1alpha3", v);
        let Object::Istio(o) = one(&text) else {
            panic!("an Istio object")
        };
        let IstioSpec::Gateway(gw) = &o.spec else {
            panic!("a Gateway")
        };
        assert_eq!(o.key.to_string(), "edge/web");
        assert!(gw.gateway_class_name.is_none());
        assert!(gw.servers[0].terminates_tls());
        let id = Object::Istio(o.clone()).id();
        assert_eq!(id.kind, "Gateway");
    }
}

#[test]
fn an_istio_gateway_secret_is_in_its_own_namespace() {
    let e = error(&ISTIO_GATEWAY.replace("web-cert", "certs/web-cert"));
    assert!(
        e.starts_with(
            "cfg/gw.yaml:1: Gateway edge/web: spec.servers[0].tls.credentialName: `certs/web-cert`"
        ),
        "{e}"
    );
}

#[test]
fn an_istio_gateway_error_names_the_field() {
    let e = error(&ISTIO_GATEWAY.replace("protocol: HTTPS", "protocol: GRPC"));
    assert!(
        e.contains("Gateway edge/web: spec.servers[0].port.protocol: `GRPC`"),
        "{e}"
    );
    let e = error(&ISTIO_GATEWAY.replace("mode: SIMPLE", "mode: MUTUAL"));
    assert!(e.contains("spec.servers[0].tls.mode"), "{e}");
}

#[test]
fn another_group_s_gateway_and_secrets_are_skipped() {
    let p = parse(
        "apiVersion: example.com/v1\nkind: Gateway\nmetadata: {name: x}\nspec: {}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: web-cert}\ntype: kubernetes.io/tls\n\
         data: {tls.crt: eA==, tls.key: eA==}\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(p.objects.is_empty(), "{:?}", p.objects);
}

const API_GATEWAY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: sidenode}
spec: {controllerName: sidenode.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: edge, generation: 2}
spec:
  gatewayClassName: sidenode
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - name: https
    hostname: shop.example.com
    port: 443
    protocol: HTTPS
    tls:
      certificateRefs: [{name: shop-cert, namespace: certs}]
  - name: pass
    port: 8443
    protocol: TLS
    tls: {mode: Passthrough}
";

#[test]
fn a_gateway_api_gateway_and_class_are_read() {
    let p = parse(API_GATEWAY);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let Object::GatewayClass(c) = &p.objects[0] else {
        panic!("a class")
    };
    assert_eq!(c.controller_name, crate::model::gateway::CONTROLLER_NAME);
    assert_eq!(p.objects[0].id().to_string(), "GatewayClass sidenode");
    let Object::ApiGateway(g) = &p.objects[1] else {
        panic!("a Gateway API Gateway")
    };
    assert_eq!(
        p.objects[1].id().to_string(),
        "Gateway.gateway.networking.k8s.io edge/web"
    );
    assert_eq!(g.class_name, "sidenode");
    assert_eq!(g.generation, 2);
    assert_eq!(g.origin.line, 6);
    let https = &g.listeners[1];
    let tls = https.tls.as_ref().expect("tls");
    assert_eq!(tls.mode, "Terminate");
    assert_eq!(tls.certificate_refs[0].namespace, "certs");
    assert_eq!(tls.certificate_refs[0].kind, "Secret");
    assert_eq!(
        g.listeners[2].tls.as_ref().map(|t| t.mode.as_str()),
        Some("Passthrough")
    );
    let _ = TlsMode::Simple;
}

#[test]
fn gateway_api_errors_name_file_line_and_field() {
    let e = error(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: edge}\n\
         spec:\n  gatewayClassName: sidenode\n  listeners:\n  - {name: a, port: 70000, protocol: HTTP}\n",
    );
    assert!(
        e.starts_with(
            "cfg/gw.yaml:1: Gateway.gateway.networking.k8s.io edge/w: spec.listeners[0].port: 70000"
        ),
        "{e}"
    );
    let e = error(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w}\nspec:\n  listeners: []\n",
    );
    assert!(e.contains("spec.gatewayClassName: missing"), "{e}");
    let e = error(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w}\n\
         spec:\n  gatewayClassName: c\n  listeners:\n  - {name: a, port: eighty, protocol: HTTP}\n",
    );
    assert!(e.contains("spec.listeners[0].port: invalid type"), "{e}");
    assert!(e.starts_with("cfg/gw.yaml:7:"), "{e}");
    let e = error(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: c}\nspec: {}\n",
    );
    assert!(
        e.contains("GatewayClass c: spec.controllerName: missing"),
        "{e}"
    );
}

#[test]
fn a_reference_grant_is_read() {
    let o = one(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: certs}\n\
         spec:\n  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}]\n\
         \x20 to: [{group: '', kind: Secret, name: shop-cert}]\n",
    );
    let Object::ReferenceGrant(g) = o else {
        panic!("a grant")
    };
    assert!(g.permits(
        "gateway.networking.k8s.io",
        "Gateway",
        "edge",
        "",
        "Secret",
        "shop-cert"
    ));
    let e = error(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: certs}\n\
         spec:\n  from: [{group: '', kind: HTTPRoute}]\n  to: [{group: '', kind: Service}]\n",
    );
    assert!(e.contains("ReferenceGrant certs/g: spec.from[0]"), "{e}");
}

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: shop}
spec:
  parentRefs:
  - {name: web, namespace: edge, sectionName: https}
  - {kind: Service, group: '', name: shop}
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs:
    - {name: api, port: 8080, weight: 3}
    - {name: api-canary, namespace: canary, port: 8080, weight: 1}
";

#[test]
fn an_httproute_with_both_parents_means_both() {
    let text = ROUTE.replace(
        "    - {name: api-canary, namespace: canary, port: 8080, weight: 1}\n",
        "    - {name: api-canary, port: 8080, weight: 1}\n",
    );
    let Object::HttpRoute(r) = one(&text) else {
        panic!("an HTTPRoute")
    };
    let mesh = r.mesh.expect("the mesh's part");
    let IstioSpec::VirtualService(vs) = &mesh.spec else {
        panic!("a VirtualService")
    };
    assert_eq!(vs.hosts, ["shop"]);
    assert!(vs.gateways.is_empty());
    let g = r.gateway.expect("the gateway's part");
    assert_eq!(g.kind, RouteKind::Http);
    assert_eq!(g.spec.gateways, ["edge/web"]);
    assert_eq!(g.spec.hosts, ["shop.example.com"]);
    assert_eq!(g.parents[0].section_name.as_deref(), Some("https"));
    let weights: Vec<_> = g.spec.http[0].route.iter().map(|d| d.weight).collect();
    assert_eq!(weights, [Some(75), Some(25)]);
}

#[test]
fn a_gateway_route_may_name_another_namespace_s_backend() {
    let p = parse(ROUTE);
    // The Service parent may not: the whole route is refused, naming the field.
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    let e = p.errors[0].to_string();
    assert!(
        e.contains("HTTPRoute shop/shop: spec.rules[0].backendRefs[1].namespace"),
        "{e}"
    );
    let text = ROUTE.replace("  - {kind: Service, group: '', name: shop}\n", "");
    let g = gateway_route(one(&text));
    assert_eq!(
        g.spec.http[0].route[1].destination.host,
        "api-canary.canary"
    );
    assert_eq!(g.backends[1].service.to_string(), "canary/api-canary");
    assert_eq!(g.backends[1].weight, 1);
}

const FILTERS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: edge}
spec:
  parentRefs: [{name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: new.example.com
        port: 8443
        statusCode: 302
        path: {type: ReplaceFullPath, replaceFullPath: /new}
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Env, value: prod}]
        add: [{name: X-Seen, value: gw}]
        remove: [X-Debug]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: Cache-Control, value: no-store}]
    - type: URLRewrite
      urlRewrite:
        hostname: internal.shop
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    backendRefs: [{name: shop, port: 80}]
";

#[test]
fn httproute_filters_become_redirect_headers_and_rewrite() {
    let g = gateway_route(one(FILTERS));
    let rd = g.spec.http[0].redirect.as_ref().expect("redirect");
    assert_eq!(rd.scheme.as_deref(), Some("https"));
    assert_eq!(rd.authority.as_deref(), Some("new.example.com"));
    assert_eq!(rd.port, Some(8443));
    assert_eq!(rd.redirect_code, Some(302));
    assert_eq!(rd.uri.as_deref(), Some("/new"));
    assert!(g.spec.http[0].route.is_empty());
    let second = &g.spec.http[1];
    let h = second.headers.as_ref().expect("headers");
    let req = h.request.as_ref().expect("request");
    assert_eq!(req.set.get("X-Env").map(String::as_str), Some("prod"));
    assert_eq!(req.add.get("X-Seen").map(String::as_str), Some("gw"));
    assert_eq!(req.remove, ["X-Debug"]);
    let resp = h.response.as_ref().expect("response");
    assert_eq!(
        resp.set.get("Cache-Control").map(String::as_str),
        Some("no-store")
    );
    let rw = second.rewrite.as_ref().expect("rewrite");
    assert_eq!(rw.authority.as_deref(), Some("internal.shop"));
    assert_eq!(rw.uri.as_deref(), Some("/v2"));
}

#[test]
fn httproute_filter_errors_name_the_field() {
    let cases = [
        (
            FILTERS.replace("type: ResponseHeaderModifier", "type: RequestMirror"),
            "spec.rules[1].filters[1].type: `RequestMirror` is not supported",
        ),
        (
            FILTERS.replace(
                "path: {type: ReplaceFullPath, replaceFullPath: /new}",
                "path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}",
            ),
            "spec.rules[0].filters[0].requestRedirect.path.type",
        ),
        (
            FILTERS.replace(
                "        path: {type: ReplaceFullPath, replaceFullPath: /new}\n",
                "        path: {type: ReplaceFullPath, replaceFullPath: /new}\n    backendRefs: [{name: shop, port: 80}]\n",
            ),
            "spec.rules[0].backendRefs: a rule with a RequestRedirect filter",
        ),
        (
            FILTERS.replace("statusCode: 302", "statusCode: 305"),
            "spec.http[0].redirect.redirectCode: 305",
        ),
        (
            FILTERS.replace("name: X-Env", "name: 'X Env'"),
            "spec.http[1].headers.request.set: `X Env` is not a valid header name",
        ),
        (
            FILTERS.replace("    - type: RequestHeaderModifier\n      requestHeaderModifier:\n", "    - type: RequestHeaderModifier\n      other:\n"),
            "spec.rules[1].filters[0].requestHeaderModifier: missing",
        ),
    ];
    for (text, want) in cases {
        let e = error(&text);
        assert!(e.starts_with("cfg/gw.yaml:1: HTTPRoute edge/r: "), "{e}");
        assert!(e.contains(want), "{e} lacks {want}");
    }
}

#[test]
fn filters_on_service_parents_stay_an_error() {
    let text = FILTERS.replace(
        "parentRefs: [{name: web}]",
        "parentRefs: [{kind: Service, name: shop}]",
    );
    let e = error(&text);
    assert!(
        e.contains("spec.rules[0].filters: filters are not supported"),
        "{e}"
    );
}

const TLS_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: db, namespace: data}
spec:
  parentRefs: [{name: web, namespace: edge, sectionName: pass}]
  hostnames: [db.example.com]
  rules:
  - backendRefs: [{name: db, port: 5432}]
";

#[test]
fn a_tlsroute_reads_as_tls_routes_by_sni() {
    let o = one(TLS_ROUTE);
    assert_eq!(o.id().to_string(), "TLSRoute data/db");
    let g = gateway_route(o);
    assert_eq!(g.kind, RouteKind::Tls);
    assert_eq!(g.spec.gateways, ["edge/web"]);
    assert_eq!(g.spec.hosts, ["db.example.com"]);
    assert_eq!(g.spec.tls[0].r#match[0].sni_hosts, ["db.example.com"]);
    assert_eq!(g.spec.tls[0].route[0].destination.host, "db");
    assert!(g.spec.http.is_empty());
    // No Gateway parent: not the mesh's.
    let p = parse(&TLS_ROUTE.replace(
        "{name: web, namespace: edge, sectionName: pass}",
        "{kind: Service, name: db}",
    ));
    assert!(p.objects.is_empty() && p.errors.is_empty());
    let e = error(&TLS_ROUTE.replace("port: 5432", "port: 0"));
    assert!(
        e.contains("TLSRoute data/db: spec.rules[0].backendRefs[0].port"),
        "{e}"
    );
}

#[test]
fn virtual_service_gateway_fields_are_validated() {
    let vs = |body: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: edge}}\nspec:\n  hosts: [a.example.com]\n  gateways: [web]\n{body}"
        )
    };
    let cases = [
        (
            "  http:\n  - redirect: {uri: /x}\n    route: [{destination: {host: a}}]\n",
            "spec.http[0].redirect: a route answers with a redirect or forwards",
        ),
        (
            "  http:\n  - redirect: {uri: /x, redirectCode: 200}\n",
            "spec.http[0].redirect.redirectCode: 200",
        ),
        (
            "  http:\n  - rewrite: {uri: x}\n    route: [{destination: {host: a}}]\n",
            "spec.http[0].rewrite.uri",
        ),
        (
            "  http:\n  - headers: {response: {remove: ['bad header']}}\n    route: [{destination: {host: a}}]\n",
            "spec.http[0].headers.response.remove",
        ),
        (
            "  tls:\n  - route: [{destination: {host: a}}]\n",
            "spec.tls[0].match: at least one match",
        ),
        (
            "  tls:\n  - match: [{sniHosts: []}]\n    route: [{destination: {host: a}}]\n",
            "spec.tls[0].match[0].sniHosts",
        ),
        (
            "  tls:\n  - match: [{sniHosts: [a.example.com]}]\n",
            "spec.tls[0].route: at least one destination",
        ),
    ];
    for (body, want) in cases {
        let e = error(&vs(body));
        assert!(
            e.starts_with("cfg/gw.yaml:1: VirtualService edge/v: "),
            "{e}"
        );
        assert!(e.contains(want), "{e} lacks {want}");
    }
    let ok = one(&vs(
        "  http:\n  - redirect: {uri: /x, redirectCode: 308, scheme: https}\n  tls:\n  - match: [{sniHosts: ['*.example.com']}]\n    route: [{destination: {host: a, port: {number: 443}}}]\n",
    ));
    assert!(matches!(ok, Object::Istio(_)));
}

#[test]
fn a_failed_document_is_known_by_the_id_of_its_good_version() {
    // The folder keeps the last good version of the object a bad document names: the two ids
    // must agree, for both Gateway kinds and the cluster-scoped class.
    let good = parse(API_GATEWAY);
    let bad = parse(&API_GATEWAY.replace("port: 443", "port: 0").replace(
        "spec: {controllerName: sidenode.io/gateway-controller}",
        "spec: {}",
    ));
    assert_eq!(bad.failed.len(), 2, "{:?}", bad.errors);
    assert_eq!(bad.failed[0], good.objects[0].id());
    assert_eq!(bad.failed[1], good.objects[1].id());
    let istio = parse(ISTIO_GATEWAY);
    let istio_bad = parse(&ISTIO_GATEWAY.replace("web-cert", "a/b"));
    assert_eq!(istio_bad.failed[0], istio.objects[0].id());
    assert_ne!(istio.objects[0].id(), good.objects[1].id());
}
