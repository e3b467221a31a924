use super::*;
use std::path::PathBuf;

fn parse(text: &str) -> FileParse {
    parse_file(&PathBuf::from("cfg/pods.yaml"), text)
}

const GOOD: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: mesh
  labels:
    sidenode.io/dataplane-mode: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: mesh
  annotations:
    sidenode.io/netns: /var/run/netns/x
spec:
  nodeName: node1
  serviceAccountName: sa-a
status:
  podIP: 198.19.1.2
---
kind: Deployment
metadata: {name: ignored}
";

#[test]
fn multi_document_file_gives_objects_and_skips_other_kinds() {
    let p = parse(GOOD);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.objects.len(), 2);
    let Object::Pod(pod) = &p.objects[1] else {
        panic!("second object is a pod")
    };
    assert_eq!(pod.key.to_string(), "mesh/a");
    assert_eq!(pod.ip.to_string(), "198.19.1.2");
    assert_eq!(pod.service_account, "sa-a");
    assert_eq!(pod.node.as_deref(), Some("node1"));
    assert_eq!(pod.origin.line, 8);
    let Object::Namespace(ns) = &p.objects[0] else {
        panic!("first object is a namespace")
    };
    assert!(ns.mesh_enabled());
}

#[test]
fn pod_without_ip_is_named_with_file_line_and_field() {
    let p = parse(
        "kind: Namespace\nmetadata: {name: x}\n---\nkind: Pod\nmetadata: {name: b, namespace: mesh}\nspec: {nodeName: n}\n",
    );
    assert_eq!(p.objects.len(), 1);
    assert_eq!(p.errors.len(), 1);
    let e = p.errors[0].to_string();
    assert!(
        e.starts_with("cfg/pods.yaml:4: Pod mesh/b: status.podIP: missing"),
        "{e}"
    );
    assert_eq!(p.failed.len(), 1);
    assert!(!p.unreadable);
}

#[test]
fn wrong_field_type_names_the_field() {
    let p = parse(
        "kind: Pod\nmetadata:\n  name: c\n  namespace: mesh\n  labels: 5\nstatus: {podIP: 1.2.3.4}\n",
    );
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    let e = p.errors[0].to_string();
    assert!(
        e.contains("Pod mesh/c: metadata.labels: invalid type"),
        "{e}"
    );
    assert!(e.starts_with("cfg/pods.yaml:5:"), "{e}");
}

#[test]
fn malformed_yaml_reports_the_line_and_marks_the_file_unreadable() {
    let p = parse("kind: Namespace\nmetadata: {name: ok}\n---\nkind: Pod\nmetadata: [unclosed\n");
    assert_eq!(p.objects.len(), 1);
    assert!(p.unreadable);
    let e = p.errors[0].to_string();
    assert!(e.contains("malformed YAML"), "{e}");
    assert!(e.starts_with("cfg/pods.yaml:"), "{e}");
}

#[test]
fn bad_ip_and_bad_port_are_errors() {
    let p = parse(
        "kind: Pod\nmetadata: {name: d}\nstatus: {podIP: nope}\n---\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n",
    );
    assert_eq!(p.errors.len(), 2);
    assert!(
        p.errors[0]
            .to_string()
            .contains("status.podIP: `nope` is not an IP address")
    );
    assert!(p.errors[1].to_string().contains("spec.ports[0].port"));
}

#[test]
fn service_parses_ports_and_headless() {
    let p = parse(
        "kind: Service\nmetadata: {name: web, namespace: mesh}\nspec:\n  clusterIP: None\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http-alt, appProtocol: http}\n  - {port: 81, targetPort: 8081}\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let Object::Service(s) = &p.objects[0] else {
        panic!("a service")
    };
    assert_eq!(s.cluster_ip, None);
    assert_eq!(
        s.ports[0].target_port,
        Some(TargetPort::Name("http-alt".into()))
    );
    assert_eq!(s.ports[1].target_port, Some(TargetPort::Number(8081)));
}

const HTTP_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: mesh}
spec:
  parentRefs:
  - {group: '', kind: Service, name: reviews, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /v2}
      headers: [{name: End-User, value: jason}]
    backendRefs:
    - {name: reviews-v2, port: 9080}
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 4}
    - {name: reviews-v2, port: 9080, weight: 1}
    timeouts: {request: 2s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge, namespace: mesh}
spec:
  parentRefs: [{name: my-gateway}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
";

#[test]
fn an_httproute_on_a_service_reads_as_a_virtual_service() {
    use crate::model::istio::IstioSpec;
    let p = parse(HTTP_ROUTE);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    // The route attached to a Gateway is not the mesh's.
    assert_eq!(p.objects.len(), 2);
    let Object::HttpRoute(r) = &p.objects[0] else {
        panic!("an HTTPRoute object")
    };
    assert!(r.gateway.is_none());
    let Some(r) = &r.mesh else {
        panic!("the mesh's route")
    };
    let IstioSpec::VirtualService(vs) = &r.spec else {
        panic!("read as a VirtualService")
    };
    assert_eq!(vs.hosts, ["reviews"]);
    let first = &vs.http[0];
    let m = &first.r#match[0];
    assert_eq!(m.port, Some(80));
    assert_eq!(
        m.uri.as_ref().and_then(|u| u.regex.as_deref()),
        Some("/v2(/.*)?")
    );
    assert_eq!(
        m.headers.get("end-user").and_then(|h| h.exact.as_deref()),
        Some("jason")
    );
    assert_eq!(first.route[0].weight, None);
    let second = &vs.http[1];
    let weights: Vec<_> = second.route.iter().map(|d| d.weight).collect();
    assert_eq!(weights, [Some(80), Some(20)]);
    assert_eq!(second.timeout.as_deref(), Some("2s"));
    assert_eq!(second.r#match[0].port, Some(80));
}

#[test]
fn an_httproute_on_a_gateway_is_not_the_mesh_s() {
    let p = parse(HTTP_ROUTE);
    let Object::HttpRoute(r) = &p.objects[1] else {
        panic!("an HTTPRoute object")
    };
    assert!(r.mesh.is_none());
    let g = r.gateway.as_ref().expect("the gateway's route");
    assert_eq!(g.spec.gateways, ["mesh/my-gateway"]);
    assert_eq!(g.spec.hosts, ["*"]);
}

#[test]
fn an_httproute_with_what_sidenode_cannot_honour_is_an_error() {
    let text = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: mesh}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - filters: [{type: RequestHeaderModifier}]
    backendRefs: [{name: reviews-v1, port: 9080}]
";
    let p = parse(text);
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    let e = &p.errors[0];
    assert_eq!(e.object.as_deref(), Some("HTTPRoute mesh/r"));
    assert_eq!(e.field.as_deref(), Some("spec.rules[0].filters"));
}

#[test]
fn a_rate_limit_policy_parses_and_its_errors_name_file_line_and_field() {
    let text = "\
apiVersion: sidenode.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: ok, namespace: mesh}
spec:
  connections: {tokenBucket: {maxTokens: 5, fillInterval: 1s}}
---
apiVersion: sidenode.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: bad, namespace: mesh}
spec:
  requests:
  - tokenBucket: {maxTokens: 5, fillInterval: 5ms}
";
    let p = parse(text);
    assert_eq!(p.objects.len(), 1, "{:?}", p.errors);
    assert!(matches!(
        &p.objects[0],
        Object::Istio(o) if matches!(o.spec, IstioSpec::RateLimitPolicy(_))
    ));
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    let e = p.errors[0].to_string();
    assert!(
        e.starts_with(
            "cfg/pods.yaml:7: RateLimitPolicy mesh/bad: spec.requests[0].tokenBucket.fillInterval:"
        ),
        "{e}"
    );
}

#[test]
fn mesh_config_tunnel_protocol_is_h2_or_quic() {
    let p = parse("kind: MeshConfig\nmetadata: {name: default}\nspec: {tunnelProtocol: quic}\n");
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let Object::MeshConfig(m) = &p.objects[0] else {
        panic!("a MeshConfig")
    };
    assert_eq!(m.tunnel_protocol.as_deref(), Some("quic"));
    let p = parse("kind: MeshConfig\nmetadata: {name: default}\nspec: {tunnelProtocol: h3}\n");
    assert!(p.objects.is_empty());
    let e = p.errors[0].to_string();
    assert!(
        e.contains("spec.tunnelProtocol: `h3` is not `h2` or `quic`"),
        "{e}"
    );
}
