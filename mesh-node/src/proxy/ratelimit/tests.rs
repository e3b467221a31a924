//! Which limits apply, all-or-nothing across policies, per-route request buckets, and bucket
//! lifetime. Time is real here but the buckets are slow (1 h fills), so nothing refills.

use std::collections::HashMap;

use super::*;
use crate::model::istio::{IstioObject, IstioSpec};
use crate::model::{ObjKey, Origin};

const POD: &str = "mesh/web";

fn state(policies: &[(&str, &str, &str)]) -> NodeState {
    let mut st = NodeState::default();
    for (ns, name, yaml) in policies {
        let spec: RateLimitPolicySpec = yaml_serde::from_str(yaml).expect("policy yaml");
        assert_eq!(spec.validate(), Ok(()), "{yaml}");
        st.configs.insert(
            format!("RateLimitPolicy/{ns}/{name}"),
            IstioObject {
                key: ObjKey {
                    namespace: (*ns).into(),
                    name: (*name).into(),
                },
                spec: IstioSpec::RateLimitPolicy(spec),
                origin: Origin::kubernetes("test".to_string()),
            },
        );
    }
    let mut w = proto::Workload {
        uid: POD.into(),
        namespace: "mesh".into(),
        name: "web".into(),
        ..Default::default()
    };
    w.labels.insert("app".into(), "web".into());
    st.workloads.insert(w.uid.clone(), w);
    let mut selector = HashMap::new();
    selector.insert("app".to_string(), "web".to_string());
    st.services.insert(
        "mesh/web".into(),
        proto::Service {
            uid: "mesh/web".into(),
            namespace: "mesh".into(),
            name: "web".into(),
            cluster_ip: "198.19.100.1".into(),
            ports: vec![
                proto::ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: 8080,
                    ..Default::default()
                },
                proto::ServicePort {
                    name: "tcp".into(),
                    port: 9000,
                    target_port: 9000,
                    ..Default::default()
                },
            ],
            selector,
        },
    );
    st
}

fn conns(l: &Limiter, st: &NodeState, port: u16, n: usize) -> usize {
    (0..n)
        .filter(|_| l.check_connection(st, POD, port).is_ok())
        .count()
}

fn reqs(l: &Limiter, st: &NodeState, method: &str, path: &str, n: usize) -> usize {
    let h = http::HeaderMap::new();
    let req = HttpRequest {
        method,
        path,
        host: "web.mesh:80",
        headers: &h,
    };
    (0..n)
        .filter(|_| l.check_request(st, POD, 8080, &req).is_ok())
        .count()
}

const CONN_3: &str = "connections: {tokenBucket: {maxTokens: 3, fillInterval: 1h}}";

#[test]
fn connection_bucket_per_workload() {
    let st = state(&[("mesh", "c3", CONN_3)]);
    let l = Limiter::default();
    assert_eq!(conns(&l, &st, 9000, 10), 3);
    let err = l.check_connection(&st, POD, 9000).expect_err("limited");
    assert_eq!(err.policy, "mesh/c3");
    assert_eq!(err.entry, "connections");
    assert!(err.retry_after > Duration::from_secs(3500));
    // Another workload (unknown to the state) and no policy at all are not limited.
    assert!(l.check_connection(&st, "mesh/other", 9000).is_ok());
    assert_eq!(conns(&Limiter::default(), &state(&[]), 9000, 10), 10);
}

#[test]
fn selectors_namespaces_and_ports() {
    let other_app = "selector: {matchLabels: {app: db}}\nconnections: {tokenBucket: {maxTokens: 1, fillInterval: 1h}}";
    let other_ns = "connections: {tokenBucket: {maxTokens: 1, fillInterval: 1h}}";
    let st = state(&[("mesh", "db", other_app), ("elsewhere", "all", other_ns)]);
    assert_eq!(conns(&Limiter::default(), &st, 9000, 5), 5);

    // The root namespace is mesh-wide.
    let st = state(&[("istio-system", "mesh-wide", other_ns)]);
    assert_eq!(conns(&Limiter::default(), &st, 9000, 5), 1);

    let port_only = "connections: {ports: [8080], tokenBucket: {maxTokens: 2, fillInterval: 1h}}";
    let st = state(&[("mesh", "p", port_only)]);
    let l = Limiter::default();
    assert_eq!(conns(&l, &st, 9000, 5), 5, "other port unlimited");
    assert_eq!(conns(&l, &st, 8080, 5), 2);
}

#[test]
fn all_policies_must_have_a_token() {
    let big = "connections: {tokenBucket: {maxTokens: 5, fillInterval: 1h}}";
    let small = "connections: {tokenBucket: {maxTokens: 2, fillInterval: 1h}}";
    let st = state(&[("mesh", "a-big", big), ("mesh", "b-small", small)]);
    let l = Limiter::default();
    assert_eq!(conns(&l, &st, 9000, 10), 2);
    // The refusals took nothing from the big bucket: with the small policy gone, it has 3.
    let st = state(&[("mesh", "a-big", big)]);
    assert_eq!(conns(&l, &st, 9000, 10), 3);
}

#[test]
fn request_routes_have_their_own_buckets() {
    let routes = r#"
requests:
- name: writes
  match: {methods: [POST], paths: ["/api/*"]}
  tokenBucket: {maxTokens: 2, fillInterval: 1h}
- match: {paths: ["/api/*"]}
  tokenBucket: {maxTokens: 4, fillInterval: 1h}
"#;
    let st = state(&[("mesh", "routes", routes)]);
    let l = Limiter::default();
    assert_eq!(reqs(&l, &st, "POST", "/api/orders?x=1", 10), 2);
    assert_eq!(reqs(&l, &st, "GET", "/api/orders", 10), 4);
    assert_eq!(reqs(&l, &st, "GET", "/health", 10), 10, "no entry matches");
    let h = http::HeaderMap::new();
    let req = HttpRequest {
        method: "POST",
        path: "/api/x",
        host: "web",
        headers: &h,
    };
    let err = l.check_request(&st, POD, 8080, &req).expect_err("limited");
    assert_eq!(err.entry, "writes");
    assert!(has_request_limits(&st, POD, 8080));
    assert!(!has_request_limits(&st, POD, 9000), "not an HTTP port");
}

#[test]
fn changed_parameters_start_a_full_bucket_and_full_buckets_are_dropped() {
    let l = Limiter::default();
    let st = state(&[("mesh", "c3", CONN_3)]);
    assert_eq!(conns(&l, &st, 9000, 10), 3);
    let st = state(&[(
        "mesh",
        "c3",
        "connections: {tokenBucket: {maxTokens: 4, fillInterval: 1h}}",
    )]);
    assert_eq!(conns(&l, &st, 9000, 10), 4);
    assert_eq!(l.len(), 1);

    // A bucket that refilled is swept (fast fills, then a sweep after SWEEP_EVERY).
    let fast = Params {
        max_tokens: 1,
        tokens_per_fill: 1,
        fill_interval: Duration::from_millis(50),
    };
    let key = |p: &str| Key {
        policy: "mesh/x".into(),
        entry: "connections".into(),
        pod: p.into(),
    };
    let l = Limiter::default();
    let t0 = Instant::now();
    assert!(l.take(vec![(key("a"), fast)], t0).is_ok());
    assert_eq!(l.len(), 1, "an empty bucket is kept");
    assert!(l.take(vec![(key("b"), fast)], t0 + SWEEP_EVERY).is_ok());
    assert_eq!(
        l.len(),
        1,
        "a refilled, full bucket is dropped; the fresh empty one stays"
    );
}
