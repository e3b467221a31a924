//! Routing decisions over hand-built states.

use super::*;
use serde_json::json;

const VIP: [u8; 4] = [10, 96, 0, 10];

fn workload(
    ns: &str,
    name: &str,
    ip: &str,
    labels: &[(&str, &str)],
    ready: bool,
) -> proto::Workload {
    proto::Workload {
        uid: format!("{ns}/{name}"),
        namespace: ns.into(),
        name: name.into(),
        service_account: "default".into(),
        ips: vec![ip.into()],
        meshed: true,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ready,
        ..Default::default()
    }
}

fn service(
    ns: &str,
    name: &str,
    vip: &str,
    port: u32,
    target: u32,
    sel: &[(&str, &str)],
) -> proto::Service {
    proto::Service {
        uid: format!("{ns}/{name}"),
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: vip.into(),
        ports: vec![proto::ServicePort {
            port,
            target_port: target,
            protocol: "TCP".into(),
            ..Default::default()
        }],
        selector: sel
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn config(kind: &str, ns: &str, name: &str, spec: serde_json::Value) -> proto::Config {
    proto::Config {
        uid: format!("{kind}/{ns}/{name}"),
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
        spec_json: json!({"kind": kind, "spec": spec}).to_string(),
    }
}

/// `shop/reviews` (10.96.0.10:80 → 9080) with pods r1 (v1), r2 (v2), r3 (v2, not ready);
/// client pods `shop/client` (app: web) and `other/outsider`.
fn base(configs: Vec<proto::Config>) -> NodeState {
    NodeState::default().apply(proto::StateUpdate {
        version: 1,
        snapshot: true,
        workloads: vec![
            workload(
                "shop",
                "r1",
                "10.0.0.1",
                &[("app", "reviews"), ("version", "v1")],
                true,
            ),
            workload(
                "shop",
                "r2",
                "10.0.0.2",
                &[("app", "reviews"), ("version", "v2")],
                true,
            ),
            workload(
                "shop",
                "r3",
                "10.0.0.3",
                &[("app", "reviews"), ("version", "v2")],
                false,
            ),
            workload("shop", "client", "10.0.1.1", &[("app", "web")], true),
            workload("other", "outsider", "10.0.2.1", &[("app", "web")], true),
            workload(
                "other",
                "r9",
                "10.0.2.9",
                &[("app", "reviews"), ("version", "v1")],
                true,
            ),
        ],
        services: vec![
            service(
                "shop",
                "reviews",
                "10.96.0.10",
                80,
                9080,
                &[("app", "reviews")],
            ),
            service("shop", "headless", "", 80, 80, &[("app", "reviews")]),
            service("shop", "empty", "10.96.0.11", 80, 80, &[("app", "nobody")]),
        ],
        configs,
        trust_domain: "example.org".into(),
        ..Default::default()
    })
}

fn subsets_dr(ns: &str, host: &str, extra: serde_json::Value) -> proto::Config {
    let mut spec = json!({
        "host": host,
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}}
        ]
    });
    if let (Some(m), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    config("DestinationRule", ns, "reviews", spec)
}

fn weighted_vs(ns: &str, host: &str, w1: i32, w2: i32, extra: serde_json::Value) -> proto::Config {
    let mut spec = json!({
        "hosts": [host],
        "tcp": [{"route": [
            {"destination": {"host": host, "subset": "v1"}, "weight": w1},
            {"destination": {"host": host, "subset": "v2"}, "weight": w2}
        ]}]
    });
    if let (Some(m), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    config("VirtualService", ns, "reviews", spec)
}

fn client(st: &NodeState) -> Source<'_> {
    Source {
        namespace: "shop",
        labels: st.workloads.get("shop/client").map(|w| &w.labels),
    }
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

fn endpoint_of(d: &Decision) -> &str {
    match d {
        Decision::Endpoint(r) => &r.endpoint.workload,
        other => panic!("expected an endpoint, got {other:?}"),
    }
}

#[test]
fn vip_goes_to_ready_selected_pods_round_robin() {
    let st = base(vec![]);
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(1);
    let picks: Vec<String> = (0..4)
        .map(|_| endpoint_of(&route(&st, &lb, &mut rng, &client(&st), vip(80))).to_string())
        .collect();
    // r3 is not ready; other/r9 is in another namespace.
    assert_eq!(picks, ["shop/r1", "shop/r2", "shop/r1", "shop/r2"]);
    let Decision::Endpoint(r) = route(&st, &lb, &mut rng, &client(&st), vip(80)) else {
        panic!("endpoint")
    };
    assert_eq!(r.endpoint.addr.port(), 9080);
    assert_eq!(r.service, "shop/reviews");
    assert_eq!(r.route, None);
    assert_eq!(r.policy, Policy::RoundRobin);
}

#[test]
fn not_a_vip_and_headless_are_not_services() {
    let st = base(vec![]);
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(1);
    let d = route(
        &st,
        &lb,
        &mut rng,
        &client(&st),
        "10.0.0.1:9080".parse().expect("addr"),
    );
    assert_eq!(d, Decision::NotService);
    assert!(!st.by_vip.values().any(|uid| uid == "shop/headless"));
}

#[test]
fn no_ready_endpoint_is_refused() {
    let st = base(vec![]);
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(1);
    let d = route(
        &st,
        &lb,
        &mut rng,
        &client(&st),
        "10.96.0.11:80".parse().expect("addr"),
    );
    assert!(
        matches!(&d, Decision::Refuse { reason: Refusal::NoEndpoint, service, .. } if service == "shop/empty"),
        "{d:?}"
    );
    // A port the service does not have.
    let d = route(&st, &lb, &mut rng, &client(&st), vip(81));
    assert!(
        matches!(
            &d,
            Decision::Refuse {
                reason: Refusal::NoRoute,
                ..
            }
        ),
        "{d:?}"
    );
    // An IPv6 destination never gets an IPv4 endpoint.
    let mut st6 = base(vec![]);
    st6.by_vip
        .insert("fd00::10".parse().expect("ip"), "shop/reviews".into());
    let d = route(
        &st6,
        &lb,
        &mut rng,
        &client(&st6),
        "[fd00::10]:80".parse().expect("addr"),
    );
    assert!(
        matches!(
            &d,
            Decision::Refuse {
                reason: Refusal::NoEndpoint,
                ..
            }
        ),
        "{d:?}"
    );
}

#[test]
fn weights_split_80_20_within_three_points() {
    let st = base(vec![
        subsets_dr("shop", "reviews", json!({})),
        weighted_vs("shop", "reviews", 80, 20, json!({})),
    ]);
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut v1 = 0;
    for _ in 0..10_000 {
        let d = route(&st, &lb, &mut rng, &client(&st), vip(80));
        let Decision::Endpoint(r) = &d else {
            panic!("{d:?}")
        };
        assert_eq!(r.route.as_deref(), Some("shop/reviews"));
        match r.subset.as_deref() {
            Some("v1") => {
                assert_eq!(r.endpoint.workload, "shop/r1");
                v1 += 1;
            }
            Some("v2") => assert_eq!(r.endpoint.workload, "shop/r2"),
            other => panic!("subset {other:?}"),
        }
    }
    let share = f64::from(v1) / 100.0;
    assert!((77.0..=83.0).contains(&share), "v1 share {share}%");
}

#[test]
fn host_forms_name_the_service() {
    for host in [
        "reviews",
        "reviews.shop",
        "reviews.shop.svc",
        "reviews.shop.svc.cluster.local",
    ] {
        let st = base(vec![
            subsets_dr("shop", host, json!({})),
            weighted_vs("shop", host, 0, 100, json!({})),
        ]);
        let lb = Balancer::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let d = route(&st, &lb, &mut rng, &client(&st), vip(80));
        assert_eq!(endpoint_of(&d), "shop/r2", "host {host}");
    }
    // The trust domain is not the cluster domain.
    let host = "reviews.shop.svc.example.org";
    let st = base(vec![
        subsets_dr("shop", "reviews", json!({})),
        weighted_vs("shop", host, 0, 100, json!({})),
    ]);
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    // The VS does not apply: round robin over the whole service.
    let Decision::Endpoint(r) = d else {
        panic!("endpoint")
    };
    assert_eq!(r.route, None);
}

#[test]
fn short_host_is_relative_to_the_vs_namespace() {
    // A VS in `other` naming `reviews` means other/reviews, which does not exist.
    let st = base(vec![
        subsets_dr("shop", "reviews", json!({})),
        weighted_vs("other", "reviews", 0, 100, json!({})),
    ]);
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    let Decision::Endpoint(r) = d else {
        panic!("endpoint")
    };
    assert_eq!(r.route, None);
    // Fully qualified from another namespace: applies (DR in the service's namespace).
    let host = "reviews.shop.svc.cluster.local";
    let st = base(vec![
        subsets_dr("shop", "reviews", json!({})),
        weighted_vs("other", host, 0, 100, json!({})),
    ]);
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    let Decision::Endpoint(r) = d else {
        panic!("endpoint")
    };
    assert_eq!(r.route.as_deref(), Some("other/reviews"));
    assert_eq!(r.endpoint.workload, "shop/r2");
}

#[test]
fn export_to_limits_who_sees_the_vs() {
    assert!(exported_to(&[], "a", "b"));
    assert!(exported_to(&["*".into()], "a", "b"));
    assert!(exported_to(&[".".into()], "a", "a"));
    assert!(!exported_to(&[".".into()], "a", "b"));
    assert!(exported_to(&["b".into()], "a", "b"));
    let st = base(vec![
        subsets_dr("shop", "reviews", json!({})),
        weighted_vs("shop", "reviews", 0, 100, json!({"exportTo": ["."]})),
    ]);
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(1);
    let d = route(&st, &lb, &mut rng, &client(&st), vip(80));
    assert_eq!(endpoint_of(&d), "shop/r2");
    let outsider = Source {
        namespace: "other",
        labels: st.workloads.get("other/outsider").map(|w| &w.labels),
    };
    let routes: Vec<Option<String>> = (0..4)
        .map(|_| match route(&st, &lb, &mut rng, &outsider, vip(80)) {
            Decision::Endpoint(r) => r.route,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(routes.iter().all(Option::is_none), "{routes:?}");
}

#[test]
fn matches_select_the_route() {
    let vs = config(
        "VirtualService",
        "shop",
        "reviews",
        json!({
            "hosts": ["reviews"],
            "tcp": [
                {"match": [{"port": 81}], "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
                {"match": [{"sourceLabels": {"app": "nope"}}], "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
                {"match": [{"sourceNamespace": "other"}], "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
                {"match": [{"port": 80, "sourceLabels": {"app": "web"}, "sourceNamespace": "shop"}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            ]
        }),
    );
    let st = base(vec![subsets_dr("shop", "reviews", json!({})), vs]);
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(1);
    for _ in 0..5 {
        assert_eq!(
            endpoint_of(&route(&st, &lb, &mut rng, &client(&st), vip(80))),
            "shop/r2"
        );
    }
    // From `other` (labels app: web): the sourceNamespace route, v1.
    let outsider = Source {
        namespace: "other",
        labels: st.workloads.get("other/outsider").map(|w| &w.labels),
    };
    assert_eq!(
        endpoint_of(&route(&st, &lb, &mut rng, &outsider, vip(80))),
        "shop/r1"
    );
}

#[test]
fn unknown_subset_or_host_is_refused_naming_the_field() {
    let st = base(vec![weighted_vs("shop", "reviews", 100, 0, json!({}))]);
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    let Decision::Refuse { reason, why, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(reason, Refusal::NoRoute);
    assert!(
        why.contains("VirtualService shop/reviews")
            && why.contains("spec.tcp[0].route[0].destination.subset"),
        "{why}"
    );

    let vs = config(
        "VirtualService",
        "shop",
        "reviews",
        json!({"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "ratings"}}]}]}),
    );
    let st = base(vec![vs]);
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    let Decision::Refuse { reason, why, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(reason, Refusal::NoRoute);
    assert!(why.contains("destination.host `ratings`"), "{why}");
}

#[test]
fn destination_port_number_picks_the_service_port() {
    let mut st = base(vec![]);
    let svc = st.services.get_mut("shop/reviews").expect("svc");
    svc.ports.push(proto::ServicePort {
        port: 8080,
        target_port: 9090,
        ..Default::default()
    });
    let vs = config(
        "VirtualService",
        "shop",
        "reviews",
        json!({"hosts": ["reviews"], "tcp": [{"route": [{"destination": {"host": "reviews", "port": {"number": 8080}}}]}]}),
    );
    let st = st.apply(proto::StateUpdate {
        version: 2,
        configs: vec![vs],
        ..Default::default()
    });
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    let Decision::Endpoint(r) = d else {
        panic!("{d:?}")
    };
    assert_eq!(r.endpoint.addr.port(), 9090);
}

#[test]
fn subset_policy_overrides_the_rule_policy() {
    let dr = config(
        "DestinationRule",
        "shop",
        "reviews",
        json!({
            "host": "reviews",
            "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}},
                {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer": {"simple": "PASSTHROUGH"}}}
            ]
        }),
    );
    let lb = Balancer::default();
    let mut rng = fastrand::Rng::with_seed(1);
    // No VS: the rule's policy.
    let st = base(vec![dr.clone()]);
    let Decision::Endpoint(r) = route(&st, &lb, &mut rng, &client(&st), vip(80)) else {
        panic!()
    };
    assert_eq!(r.policy, Policy::Random);
    let st = base(vec![
        dr.clone(),
        weighted_vs("shop", "reviews", 100, 0, json!({})),
    ]);
    let Decision::Endpoint(r) = route(&st, &lb, &mut rng, &client(&st), vip(80)) else {
        panic!()
    };
    assert_eq!(r.policy, Policy::LeastRequest);
    let st = base(vec![dr, weighted_vs("shop", "reviews", 0, 100, json!({}))]);
    let d = route(&st, &lb, &mut rng, &client(&st), vip(80));
    assert_eq!(
        d,
        Decision::Passthrough {
            service: "shop/reviews".into()
        }
    );
}

#[test]
fn named_target_port_is_refused() {
    let mut st = base(vec![]);
    let svc = st.services.get_mut("shop/reviews").expect("svc");
    svc.ports[0].target_port = 0;
    svc.ports[0].target_port_name = "http".into();
    let d = route(
        &st,
        &Balancer::default(),
        &mut fastrand::Rng::with_seed(1),
        &client(&st),
        vip(80),
    );
    let Decision::Refuse { reason, why, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(reason, Refusal::NoEndpoint);
    assert!(why.contains("named targetPort `http`"), "{why}");
}

#[test]
fn resilience_merged_per_subset_and_ejected_endpoints_skipped() {
    let dr = config(
        "DestinationRule",
        "shop",
        "reviews",
        json!({
            "host": "reviews",
            "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": 5}},
                "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100}
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"},
                 "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "1s"}}}},
                {"name": "v2", "labels": {"version": "v2"}}
            ]
        }),
    );
    let lb = Balancer::default();
    let health = Health::default();
    let mut rng = fastrand::Rng::with_seed(1);
    let st = base(vec![dr.clone()]);
    let Decision::Endpoint(r) =
        route_with(&st, &lb, Some(&health), &mut rng, &client(&st), vip(80))
    else {
        panic!()
    };
    assert_eq!(r.cluster, "shop/reviews/");
    assert_eq!(r.resilience.max_connections, Some(5));
    assert_eq!(r.endpoints.len(), 2);
    let od = r.resilience.outlier.clone().expect("outlier detection");
    // r1 refused: ejected, every new connection goes to r2.
    let r1 = r
        .endpoints
        .iter()
        .find(|e| e.workload == "shop/r1")
        .expect("r1");
    assert!(
        health
            .report(&r.cluster, r1.addr, Outcome::ConnectFailure, &od)
            .is_some()
    );
    for _ in 0..6 {
        let d = route_with(&st, &lb, Some(&health), &mut rng, &client(&st), vip(80));
        assert_eq!(endpoint_of(&d), "shop/r2");
    }
    // Without health (plain `route`), round robin as before.
    let seen: Vec<String> = (0..2)
        .map(|_| endpoint_of(&route(&st, &lb, &mut rng, &client(&st), vip(80))).to_string())
        .collect();
    assert!(seen.contains(&"shop/r1".to_string()), "{seen:?}");
    // Subset v1: its connectionPool replaces the rule's whole; outlierDetection inherited.
    let st = base(vec![dr, weighted_vs("shop", "reviews", 100, 0, json!({}))]);
    let Decision::Endpoint(r) =
        route_with(&st, &lb, Some(&health), &mut rng, &client(&st), vip(80))
    else {
        panic!()
    };
    assert_eq!(r.cluster, "shop/reviews/v1");
    assert_eq!(r.resilience.max_connections, None);
    assert_eq!(
        r.resilience.connect_timeout,
        Some(std::time::Duration::from_secs(1))
    );
    assert_eq!(r.resilience.outlier, Some(od));
    // Ejections are per endpoint set: r1 is not ejected in subset v1.
    assert_eq!(r.endpoint.workload, "shop/r1");
}

/// Gateway `edge/gw` on port 443 for `*.shop.example`, and a VirtualService bound to it.
fn gateway_state() -> NodeState {
    base(vec![
        config(
            "Gateway",
            "edge",
            "gw",
            json!({"selector": {"istio": "ingressgateway"}, "servers": [
                {"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["*.shop.example"],
                 "tls": {"mode": "SIMPLE", "credentialName": "shop-cert"}},
                {"port": {"number": 8443, "protocol": "TLS"}, "hosts": ["db.shop.example"],
                 "tls": {"mode": "PASSTHROUGH"}}]}),
        ),
        config(
            "VirtualService",
            "edge",
            "shop",
            json!({"hosts": ["www.shop.example"], "gateways": ["gw"], "http": [
                {"match": [{"uri": {"prefix": "/v2/"}}], "rewrite": {"uri": "/"},
                 "route": [{"destination": {"host": "reviews.shop.svc.cluster.local"}}]},
                {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "redirectCode": 302}},
                {"route": [{"destination": {"host": "reviews.shop.svc.cluster.local", "port": {"number": 80}}}]}],
              "tls": [{"match": [{"sniHosts": ["db.shop.example"]}],
                       "route": [{"destination": {"host": "reviews.shop.svc.cluster.local"}}]}]}),
        ),
        // Bound to the mesh only: never seen by the gateway.
        config(
            "VirtualService",
            "edge",
            "mesh-only",
            json!({"hosts": ["www.shop.example"], "http": [
                {"route": [{"destination": {"host": "nowhere"}}]}]}),
        ),
    ])
}

#[test]
fn gateway_requests_route_by_host_and_path() {
    use super::http as rh;
    use rh::RequestInfo;
    let st = gateway_state();
    let mut rng = fastrand::Rng::with_seed(1);
    let src = Source {
        namespace: "edge",
        labels: None,
    };
    let gw = rh::GatewayPort {
        port: 443,
        servers: vec![(
            crate::model::ObjKey {
                namespace: "edge".into(),
                name: "gw".into(),
            },
            vec!["*.shop.example".into()],
        )],
    };
    let h = ::http::HeaderMap::new();
    let req = |path: &'static str| RequestInfo {
        method: "GET",
        path,
        headers: &h,
    };
    // The service's only port when the route names none; the rewrite and the matched prefix.
    match rh::select_gateway(&st, &mut rng, &src, &gw, "www.shop.example", &req("/v2/x")) {
        rh::HttpDecision::Forward { plan, policy } => {
            assert_eq!(plan.service, "shop/reviews");
            assert_eq!(plan.port, 80);
            assert_eq!(policy.matched_prefix.as_deref(), Some("/v2/"));
            assert_eq!(policy.rewrite.and_then(|r| r.uri).as_deref(), Some("/"));
        }
        other => panic!("{other:?}"),
    }
    match rh::select_gateway(&st, &mut rng, &src, &gw, "www.shop.example", &req("/old")) {
        rh::HttpDecision::Redirect { redirect, .. } => {
            assert_eq!(redirect.uri.as_deref(), Some("/new"));
            assert_eq!(redirect.redirect_code, Some(302));
        }
        other => panic!("{other:?}"),
    }
    // A host the port serves but no VirtualService names: no route (404).
    assert!(matches!(
        rh::select_gateway(&st, &mut rng, &src, &gw, "api.shop.example", &req("/")),
        rh::HttpDecision::NoMatch { .. }
    ));
    // A host no server of the port serves: unknown (404 too, before any route).
    assert_eq!(
        rh::select_gateway(&st, &mut rng, &src, &gw, "evil.example", &req("/")),
        rh::HttpDecision::UnknownHost
    );
    // The mesh does not see the gateway's VirtualService (`gateways` without `mesh`).
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    let client = Source {
        namespace: "shop",
        labels: None,
    };
    match rh::select(&st, &mut rng, &client, vip, &req("/v2/x")) {
        rh::HttpDecision::Forward { plan, .. } => assert_eq!(plan.vs, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gateway_tls_routes_by_server_name() {
    let st = gateway_state();
    let mut rng = fastrand::Rng::with_seed(1);
    let src = Source {
        namespace: "edge",
        labels: None,
    };
    let gw = crate::model::ObjKey {
        namespace: "edge".into(),
        name: "gw".into(),
    };
    let lb = Balancer::default();
    match tls::select_tls(
        &st,
        &lb,
        None,
        &mut rng,
        &src,
        &[&gw],
        8443,
        "db.shop.example",
    ) {
        Decision::Endpoint(r) => {
            assert_eq!(r.service, "shop/reviews");
            assert_eq!(r.endpoint.addr.port(), 9080);
            assert_eq!(r.route.as_deref(), Some("edge/shop"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        tls::select_tls(
            &st,
            &lb,
            None,
            &mut rng,
            &src,
            &[&gw],
            8443,
            "x.shop.example"
        ),
        Decision::NotService
    );
}
