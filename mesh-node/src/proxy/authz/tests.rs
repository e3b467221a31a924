//! Table tests of the evaluator: which policies apply, the DENY → ALLOW order, rule semantics
//! and the L4 treatment of HTTP-only fields.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::model::istio::{IstioObject, IstioSpec};
use crate::model::{ObjKey, Origin};

fn policy(ns: &str, name: &str, yaml: &str) -> (String, IstioObject) {
    let spec: AuthorizationPolicySpec = yaml_serde::from_str(yaml).expect("policy yaml");
    (
        format!("AuthorizationPolicy/{ns}/{name}"),
        IstioObject {
            key: ObjKey {
                namespace: ns.into(),
                name: name.into(),
            },
            spec: IstioSpec::AuthorizationPolicy(spec),
            origin: Origin::kubernetes("test".to_string()),
        },
    )
}

fn state(policies: &[(&str, &str, &str)]) -> NodeState {
    let mut st = NodeState::default();
    for (ns, name, yaml) in policies {
        let (k, v) = policy(ns, name, yaml);
        st.configs.insert(k, v);
    }
    let mut w = proto::Workload {
        uid: "mesh/web".into(),
        namespace: "mesh".into(),
        name: "web".into(),
        service_account: "web".into(),
        ..Default::default()
    };
    w.labels.insert("app".into(), "web".into());
    w.labels.insert("version".into(), "v1".into());
    st.workloads.insert(w.uid.clone(), w);
    st
}

fn peer(ns: &str, sa: &str, ip: &str, port: u16) -> Peer {
    let id = Identity::new("cluster.local", ns, sa);
    let ip: IpAddr = ip.parse().expect("ip");
    Peer::new(
        Some(&id),
        ip,
        SocketAddr::new("198.19.2.2".parse().expect("ip"), port),
    )
}

fn client() -> Peer {
    peer("mesh", "client", "198.19.1.2", 8080)
}

fn l4(st: &NodeState, p: &Peer) -> Decision {
    check_connection(st, "mesh/web", p)
}

fn l7(st: &NodeState, p: &Peer, method: &str, path: &str, headers: &[(&str, &str)]) -> Decision {
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let req = HttpRequest {
        method,
        path,
        host: "web.mesh.svc.cluster.local:8080",
        headers: &h,
    };
    check(st, "mesh/web", p, Some(&req))
}

const ALLOW_CLIENT: &str = r#"
action: ALLOW
rules:
- from:
  - source:
      principals: ["cluster.local/ns/mesh/sa/client"]
"#;

#[test]
fn no_policy_allows() {
    let d = l4(&state(&[]), &client());
    assert!(d.allowed());
    assert_eq!(d, Decision::default());
}

#[test]
fn which_policies_apply() {
    let sel = |labels: &str| {
        format!("selector:\n  matchLabels: {labels}\naction: DENY\nrules:\n- {{}}\n")
    };
    // (namespace, yaml, applies to mesh/web{app=web,version=v1})
    let cases: Vec<(&str, String, bool)> = vec![
        ("mesh", "action: DENY\nrules:\n- {}\n".into(), true),
        ("other", "action: DENY\nrules:\n- {}\n".into(), false),
        ("istio-system", "action: DENY\nrules:\n- {}\n".into(), true),
        ("mesh", sel("{app: web}"), true),
        ("mesh", sel("{app: web, version: v1}"), true),
        ("mesh", sel("{app: web, version: v2}"), false),
        ("mesh", sel("{app: db}"), false),
        ("mesh", sel("{}"), true),
        ("istio-system", sel("{app: web}"), true),
        ("istio-system", sel("{app: db}"), false),
    ];
    for (ns, yaml, applies) in cases {
        let st = state(&[(ns, "p", &yaml)]);
        let d = l4(&st, &client());
        assert_eq!(!d.allowed(), applies, "{ns}: {yaml}");
        if applies {
            assert_eq!(d.policy.as_deref(), Some(format!("{ns}/p").as_str()));
        }
    }
}

#[test]
fn order_and_actions() {
    const DENY_ALL: &str = "action: DENY\nrules:\n- {}\n";
    const ALLOW_ALL: &str = "action: ALLOW\nrules:\n- {}\n";
    const ALLOW_NOTHING: &str = "{}";
    const DENY_NO_RULES: &str = "action: DENY\n";
    const AUDIT_ALL: &str = "action: AUDIT\nrules:\n- {}\n";
    // (policies, allowed, reason, audit)
    let cases: Vec<(Vec<&str>, bool, Option<DenyReason>, usize)> = vec![
        (vec![ALLOW_ALL], true, None, 0),
        (
            vec![ALLOW_NOTHING],
            false,
            Some(DenyReason::NoAllowMatch),
            0,
        ),
        (vec![DENY_NO_RULES], true, None, 0),
        (
            vec![DENY_ALL, ALLOW_ALL],
            false,
            Some(DenyReason::DenyPolicy),
            0,
        ),
        (vec![ALLOW_CLIENT], true, None, 0),
        (vec![ALLOW_NOTHING, ALLOW_CLIENT], true, None, 0),
        (vec![AUDIT_ALL], true, None, 1),
        (
            vec![AUDIT_ALL, DENY_ALL],
            false,
            Some(DenyReason::DenyPolicy),
            1,
        ),
        (
            vec![AUDIT_ALL, ALLOW_NOTHING],
            false,
            Some(DenyReason::NoAllowMatch),
            1,
        ),
    ];
    for (i, (yamls, allowed, reason, audit)) in cases.into_iter().enumerate() {
        let names: Vec<String> = (0..yamls.len()).map(|j| format!("p{j}")).collect();
        let pols: Vec<(&str, &str, &str)> = yamls
            .iter()
            .zip(&names)
            .map(|(y, n)| ("mesh", n.as_str(), *y))
            .collect();
        let d = l4(&state(&pols), &client());
        assert_eq!(d.allowed(), allowed, "case {i}: {yamls:?}");
        assert_eq!(d.denied, reason, "case {i}");
        assert_eq!(d.audit.len(), audit, "case {i}");
    }
}

#[test]
fn sources() {
    let other = peer("mesh", "other", "198.19.1.3", 8080);
    let plain = peer("plain", "client", "10.1.2.3", 8080);
    let v6 = peer("mesh", "client", "fd00:198:19:1::2", 8080);
    let c = client();
    // (source fields, peer, matches)
    let cases: Vec<(&str, &Peer, bool)> = vec![
        (
            r#"principals: ["cluster.local/ns/mesh/sa/client"]"#,
            &c,
            true,
        ),
        (
            r#"principals: ["cluster.local/ns/mesh/sa/client"]"#,
            &other,
            false,
        ),
        (
            r#"principals: ["spiffe://cluster.local/ns/mesh/sa/client"]"#,
            &c,
            true,
        ),
        (r#"principals: ["*"]"#, &other, true),
        (r#"principals: ["cluster.local/ns/mesh/*"]"#, &other, true),
        (r#"principals: ["cluster.local/ns/plain/*"]"#, &other, false),
        (r#"principals: ["*/sa/other"]"#, &other, true),
        (r#"principals: ["*/sa/other"]"#, &c, false),
        (
            r#"notPrincipals: ["cluster.local/ns/mesh/sa/client"]"#,
            &c,
            false,
        ),
        (
            r#"notPrincipals: ["cluster.local/ns/mesh/sa/client"]"#,
            &other,
            true,
        ),
        (r#"namespaces: ["mesh"]"#, &c, true),
        (r#"namespaces: ["mesh"]"#, &plain, false),
        (r#"namespaces: ["pl*"]"#, &plain, true),
        (r#"notNamespaces: ["mesh"]"#, &plain, true),
        (r#"notNamespaces: ["mesh"]"#, &c, false),
        (r#"ipBlocks: ["198.19.1.0/24"]"#, &c, true),
        (r#"ipBlocks: ["198.19.1.2"]"#, &c, true),
        (r#"ipBlocks: ["198.19.1.2"]"#, &other, false),
        (r#"ipBlocks: ["fd00::/8"]"#, &v6, true),
        (r#"notIpBlocks: ["10.0.0.0/8"]"#, &plain, false),
        (r#"notIpBlocks: ["10.0.0.0/8"]"#, &c, true),
        // All fields of one source must match.
        (
            r#"{namespaces: ["mesh"], ipBlocks: ["10.0.0.0/8"]}"#,
            &c,
            false,
        ),
        (
            r#"{namespaces: ["mesh"], ipBlocks: ["198.19.0.0/16"]}"#,
            &c,
            true,
        ),
    ];
    for (src, p, want) in cases {
        let src = if src.starts_with('{') {
            src.to_string()
        } else {
            format!("{{{src}}}")
        };
        let yaml = format!("action: ALLOW\nrules:\n- from:\n  - source: {src}\n");
        let d = l4(&state(&[("mesh", "p", &yaml)]), p);
        assert_eq!(d.allowed(), want, "{src} for {p:?}");
    }
    // Any `from` entry; all of from/to/when.
    let yaml = r#"
action: ALLOW
rules:
- from:
  - source: {principals: ["cluster.local/ns/mesh/sa/nobody"]}
  - source: {namespaces: ["plain"]}
  to:
  - operation: {ports: ["8080"]}
"#;
    let st = state(&[("mesh", "p", yaml)]);
    assert!(l4(&st, &plain).allowed());
    assert!(!l4(&st, &c).allowed());
    assert!(!l4(&st, &peer("plain", "x", "10.0.0.1", 9090)).allowed());
}

#[test]
fn operations_and_conditions_at_l4() {
    let c = client();
    // (rule yaml under `- `, action, matches at L4 for client → :8080)
    let cases: Vec<(&str, &str, bool)> = vec![
        ("to: [{operation: {ports: [\"8080\"]}}]", "ALLOW", true),
        ("to: [{operation: {ports: [\"9090\"]}}]", "ALLOW", false),
        ("to: [{operation: {notPorts: [\"8080\"]}}]", "ALLOW", false),
        (
            "to: [{operation: {ports: [\"9090\"]}}, {operation: {ports: [\"8080\"]}}]",
            "ALLOW",
            true,
        ),
        ("to: [{operation: {ports: [\"8080\"]}}]", "DENY", true),
        ("to: [{operation: {ports: [\"9090\"]}}]", "DENY", false),
        // HTTP-only fields: an ALLOW rule never matches at L4 ...
        ("to: [{operation: {methods: [\"GET\"]}}]", "ALLOW", false),
        (
            "to: [{operation: {ports: [\"8080\"], paths: [\"/x\"]}}]",
            "ALLOW",
            false,
        ),
        (
            "to: [{operation: {ports: [\"8080\"]}}, {operation: {hosts: [\"a\"]}}]",
            "ALLOW",
            false,
        ),
        (
            "when: [{key: \"request.headers[x-a]\", values: [\"1\"]}]",
            "ALLOW",
            false,
        ),
        // ... while a DENY rule keeps its L4 part (fails closed).
        ("to: [{operation: {methods: [\"GET\"]}}]", "DENY", true),
        (
            "to: [{operation: {ports: [\"8080\"], paths: [\"/x\"]}}]",
            "DENY",
            true,
        ),
        (
            "to: [{operation: {ports: [\"9090\"], paths: [\"/x\"]}}]",
            "DENY",
            false,
        ),
        (
            "when: [{key: \"request.headers[x-a]\", values: [\"1\"]}]",
            "DENY",
            true,
        ),
        (
            "when: [{key: \"request.auth.claims[iss]\", values: [\"x\"]}]",
            "DENY",
            true,
        ),
        (
            "when: [{key: \"request.auth.claims[iss]\", values: [\"x\"]}]",
            "ALLOW",
            false,
        ),
        // `when` keys known at L4.
        (
            "when: [{key: source.ip, values: [\"198.19.1.0/24\"]}]",
            "ALLOW",
            true,
        ),
        (
            "when: [{key: remote.ip, values: [\"10.0.0.0/8\"]}]",
            "ALLOW",
            false,
        ),
        (
            "when: [{key: source.namespace, values: [\"mesh\"]}]",
            "ALLOW",
            true,
        ),
        (
            "when: [{key: source.namespace, notValues: [\"mesh\"]}]",
            "ALLOW",
            false,
        ),
        (
            "when: [{key: source.principal, values: [\"cluster.local/ns/mesh/sa/client\"]}]",
            "ALLOW",
            true,
        ),
        (
            "when: [{key: destination.port, values: [\"8080\"]}]",
            "ALLOW",
            true,
        ),
        (
            "when: [{key: destination.port, values: [\"80\"]}]",
            "ALLOW",
            false,
        ),
        (
            "when: [{key: destination.ip, values: [\"198.19.2.2\"]}]",
            "ALLOW",
            true,
        ),
        (
            "when: [{key: source.ip, values: [\"198.19.1.2\"]}, {key: destination.port, values: [\"80\"]}]",
            "ALLOW",
            false,
        ),
        (
            "when: [{key: source.ip, values: [\"1.1.1.1\"]}]",
            "DENY",
            false,
        ),
    ];
    for (rule, action, matches) in cases {
        let yaml = format!("action: {action}\nrules:\n- {rule}\n");
        let d = l4(&state(&[("mesh", "p", &yaml)]), &c);
        let matched = match action {
            "ALLOW" => d.allowed(),
            _ => !d.allowed(),
        };
        assert_eq!(matched, matches, "{action} {rule}");
    }
}

/// (rule yaml, method, path, headers, ALLOW matches)
type HttpCase = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    bool,
);

#[test]
fn http_rules() {
    let c = client();
    let allow_public = r#"
action: ALLOW
rules:
- to:
  - operation:
      methods: ["GET"]
      paths: ["/public*"]
"#;
    let st = state(&[("mesh", "p", allow_public)]);
    // (method, path, allowed)
    for (m, path, want) in [
        ("GET", "/public/x", true),
        ("GET", "/public", true),
        ("GET", "/public/x?q=/private", true),
        ("POST", "/public/x", false),
        ("GET", "/private", false),
        ("GET", "/x?/public", false),
    ] {
        assert_eq!(l7(&st, &c, m, path, &[]).allowed(), want, "{m} {path}");
    }
    // At L4 that policy allows nothing.
    assert_eq!(l4(&st, &c).denied, Some(DenyReason::NoAllowMatch));
    assert!(needs_http(&applicable(
        &st,
        Target::of(&st.workloads["mesh/web"])
    )));

    let cases: Vec<HttpCase> = vec![
        // (operation or when yaml, method, path, headers, ALLOW matches)
        (
            "to: [{operation: {paths: [\"*.json\"]}}]",
            "GET",
            "/a/b.json",
            &[],
            true,
        ),
        (
            "to: [{operation: {paths: [\"/exact\"]}}]",
            "GET",
            "/exact/x",
            &[],
            false,
        ),
        (
            "to: [{operation: {notPaths: [\"/admin*\"]}}]",
            "GET",
            "/admin/x",
            &[],
            false,
        ),
        (
            "to: [{operation: {notPaths: [\"/admin*\"]}}]",
            "GET",
            "/x",
            &[],
            true,
        ),
        (
            "to: [{operation: {notMethods: [\"DELETE\"]}}]",
            "DELETE",
            "/x",
            &[],
            false,
        ),
        (
            "to: [{operation: {hosts: [\"web.mesh.svc.cluster.local\"]}}]",
            "GET",
            "/",
            &[],
            true,
        ),
        (
            "to: [{operation: {hosts: [\"*.cluster.local\"]}}]",
            "GET",
            "/",
            &[],
            true,
        ),
        (
            "to: [{operation: {hosts: [\"WEB.mesh.svc.cluster.local:8080\"]}}]",
            "GET",
            "/",
            &[],
            true,
        ),
        (
            "to: [{operation: {hosts: [\"db.mesh\"]}}]",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "to: [{operation: {ports: [\"9090\"], methods: [\"GET\"]}}]",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "when: [{key: \"request.headers[x-user]\", values: [\"alice\"]}]",
            "GET",
            "/",
            &[("x-user", "alice")],
            true,
        ),
        (
            "when: [{key: \"request.headers[x-user]\", values: [\"ali*\"]}]",
            "GET",
            "/",
            &[("x-user", "alice")],
            true,
        ),
        (
            "when: [{key: \"request.headers[x-user]\", values: [\"alice\"]}]",
            "GET",
            "/",
            &[("x-user", "bob")],
            false,
        ),
        (
            "when: [{key: \"request.headers[x-user]\", values: [\"alice\"]}]",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "when: [{key: \"request.headers[x-user]\", notValues: [\"bob\"]}]",
            "GET",
            "/",
            &[],
            true,
        ),
        (
            "when: [{key: \"request.headers[x-user]\", notValues: [\"bob\"]}]",
            "GET",
            "/",
            &[("x-user", "bob")],
            false,
        ),
        (
            "when: [{key: \"request.auth.claims[iss]\", values: [\"x\"]}]",
            "GET",
            "/",
            &[],
            false,
        ),
        (
            "when: [{key: no.such.key, values: [\"x\"]}]",
            "GET",
            "/",
            &[],
            false,
        ),
    ];
    for (rule, m, path, headers, want) in cases {
        let yaml = format!("action: ALLOW\nrules:\n- {rule}\n");
        let st = state(&[("mesh", "p", &yaml)]);
        assert_eq!(
            l7(&st, &c, m, path, headers).allowed(),
            want,
            "ALLOW {rule} {m} {path}"
        );
        // A DENY of the same rule refuses exactly what the ALLOW admits, except where the
        // rule cannot be evaluated (left out of a DENY: it then refuses everything).
        let yaml = format!("action: DENY\nrules:\n- {rule}\n");
        let st = state(&[("mesh", "p", &yaml)]);
        let unevaluable = rule.contains("request.auth") || rule.contains("no.such");
        let want_denied = want || unevaluable;
        assert_eq!(
            !l7(&st, &c, m, path, headers).allowed(),
            want_denied,
            "DENY {rule} {m} {path}"
        );
    }
}

#[test]
fn per_request_only_on_http_ports_with_http_rules() {
    let allow_public = "action: ALLOW\nrules:\n- to: [{operation: {methods: [\"GET\"]}}]\n";
    let mut st = state(&[("mesh", "p", allow_public)]);
    let svc = |name: &str, port: u32, target: u32| proto::ServicePort {
        name: name.into(),
        port,
        target_port: target,
        ..Default::default()
    };
    st.services.insert(
        "mesh/web".into(),
        proto::Service {
            uid: "mesh/web".into(),
            namespace: "mesh".into(),
            name: "web".into(),
            ports: vec![
                svc("http", 80, 9080),
                svc("tcp", 81, 9081),
                svc("http-alt", 8000, 0),
            ],
            selector: HashMap::from([("app".to_string(), "web".to_string())]),
            ..Default::default()
        },
    );
    assert!(per_request(&st, "mesh/web", 9080));
    assert!(per_request(&st, "mesh/web", 8000));
    assert!(!per_request(&st, "mesh/web", 9081));
    assert!(!per_request(&st, "mesh/web", 80));
    assert!(!per_request(&st, "mesh/other", 9080));
    // Without HTTP rules: bytes are spliced.
    let (k, v) = policy("mesh", "p", ALLOW_CLIENT);
    st.configs.insert(k, v);
    assert!(!per_request(&st, "mesh/web", 9080));
}

/// A selector-less policy in the root namespace applies to the workloads of every namespace;
/// the same policy in an ordinary namespace only to that namespace's.
#[test]
fn a_root_namespace_policy_applies_mesh_wide() {
    const DENY_ALL: &str = "action: DENY\nrules:\n- {}\n";
    // No `--root-namespace` in a unit test: the default is in force.
    assert_eq!(root_namespace(), DEFAULT_ROOT_NAMESPACE);
    let with_db = |policy_ns: &str| {
        let mut st = state(&[(policy_ns, "p", DENY_ALL)]);
        let db = proto::Workload {
            uid: "other/db".into(),
            namespace: "other".into(),
            name: "db".into(),
            service_account: "db".into(),
            ..Default::default()
        };
        st.workloads.insert(db.uid.clone(), db);
        st
    };
    let st = with_db(root_namespace());
    for uid in ["mesh/web", "other/db"] {
        let d = check_connection(&st, uid, &client());
        assert!(!d.allowed(), "{uid}: {d:?}");
        assert_eq!(
            d.policy.as_deref(),
            Some(format!("{}/p", root_namespace()).as_str())
        );
    }
    let st = with_db("mesh");
    assert!(!check_connection(&st, "mesh/web", &client()).allowed());
    assert!(check_connection(&st, "other/db", &client()).allowed());
}

#[test]
fn string_and_ip_matchers() {
    for (pat, v, want) in [
        ("*", "anything", true),
        ("abc", "abc", true),
        ("abc", "abcd", false),
        ("ab*", "abcd", true),
        ("*cd", "abcd", true),
        ("*cd", "abce", false),
    ] {
        assert_eq!(string_matches(pat, v), want, "{pat} {v}");
    }
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert!(ip_matches("10.0.0.0/8", ip("10.1.2.3")));
    assert!(!ip_matches("10.0.0.0/8", ip("11.1.2.3")));
    assert!(ip_matches("::1", ip("::1")));
    assert!(!ip_matches("garbage", ip("::1")));
    assert!(host_matches("a.b", "A.B:80"));
    assert!(!host_matches("a.b:81", "a.b:80"));
}
