//! End-to-end tests of service routing in the node proxy (L4): a Service VIP resolved to ready
//! endpoints, VirtualService TCP weights across DestinationRule subsets, live weight changes and
//! refusals when a service has no ready endpoint. Mesh mode (controller, HBONE), file config.
//! Run as root: `cargo test -p sidenode-tests --test routing`. The tests take turns (one
//! cluster at a time); each has its own cluster (prefix `m....`), torn down on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{Cluster, TestCluster};
use sidenode_tests::workload::{DialResult, Server, Session, dial};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CLIENT_POD: &str = "node1-pod1";
/// `reviews` endpoints: subset v1 and subset v2 (both meshed, on node 2).
const V1_POD: &str = "node2-pod1";
const V2_POD: &str = "node2-pod2";
const V1_ADDR: &str = "198.19.2.2:9080";
const V2_ADDR: &str = "198.19.2.3:9080";
/// `ratings`: its only pod is not ready.
const NOT_READY_POD: &str = "node1-pod2";
const REVIEWS_VIP: &str = "198.18.128.10:80";
const RATINGS_VIP: &str = "198.18.128.11:80";
const REFUSED: &str = "sidenode_hbone_refused_total";

/// Rewrites every node's pod file with extra labels per pod, and `not_ready` pods given a
/// `Ready: False` condition.
fn label_pods(c: &Cluster, labels: &[(&str, &[(&str, &str)])], not_ready: &[&str]) -> Result<()> {
    let labels: BTreeMap<&str, &[(&str, &str)]> = labels.iter().copied().collect();
    for node in c.node_names() {
        let docs: Vec<String> = c
            .pod_objects(&node)
            .into_iter()
            .map(|mut p| {
                if let Some(extra) = labels.get(p.name.as_str()) {
                    for (k, v) in *extra {
                        p.labels.insert(k.to_string(), v.to_string());
                    }
                }
                if not_ready.contains(&p.name.as_str()) {
                    p.to_yaml_with_ready(false)
                } else {
                    p.to_yaml()
                }
            })
            .collect();
        c.write_config_file(&format!("{node}.yaml"), &docs.join("---\n"))?;
    }
    Ok(())
}

/// Service `mesh/reviews` (198.18.128.10:80 → 9080, selector `svc: reviews`), a
/// DestinationRule with subsets v1/v2 by `version`, and a VirtualService splitting TCP traffic
/// `w1`/`w2` between them. One file, so the controller sends them in one update.
fn reviews_yaml(w1: u32, w2: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: mesh
spec:
  clusterIP: 198.18.128.10
  selector:
    svc: reviews
  ports:
  - name: tcp
    port: 80
    targetPort: 9080
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: mesh
spec:
  host: reviews.mesh.svc.cluster.local
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: mesh
spec:
  hosts:
  - reviews
  tcp:
  - match:
    - port: 80
    route:
    - destination:
        host: reviews
        subset: v1
      weight: {w1}
    - destination:
        host: reviews
        subset: v2
      weight: {w2}
"#
    )
}

/// Service `mesh/ratings` (198.18.128.11:80 → 9080) selecting only a pod that is not ready.
const RATINGS_YAML: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: ratings
  namespace: mesh
spec:
  clusterIP: 198.18.128.11
  selector:
    svc: ratings
  ports:
  - port: 80
    targetPort: 9080
"#;

/// A 2-node mesh cluster (3 pods per node) with v1/v2 `reviews` pods serving 9080, the
/// client and both servers enrolled and the servers' HBONE listeners open.
fn reviews_cluster() -> Result<(TestCluster, Vec<Server>)> {
    let c = mesh_cluster(3, None)?;
    label_pods(
        &c,
        &[
            (V1_POD, &[("svc", "reviews"), ("version", "v1")]),
            (V2_POD, &[("svc", "reviews"), ("version", "v2")]),
            (NOT_READY_POD, &[("svc", "ratings")]),
        ],
        &[NOT_READY_POD],
    )?;
    let servers = vec![
        Server::start(&c, &testpod(), V1_POD, &[9080])?,
        Server::start(&c, &testpod(), V2_POD, &[9080])?,
    ];
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node2", "mesh", V1_POD)?;
    wait_enrolled(&c, "node2", "mesh", V2_POD)?;
    wait_hbone_listener(&c, V1_POD)?;
    wait_hbone_listener(&c, V2_POD)?;
    Ok((c, servers))
}

/// `n` connections from the client pod to `target`, `concurrency` at a time.
fn dial_many(c: &Cluster, target: &str, n: usize, concurrency: usize) -> Result<Vec<DialResult>> {
    dial(
        c,
        &testpod(),
        CLIENT_POD,
        &[target.to_string()],
        n,
        concurrency,
        0,
    )
}

/// Which endpoint answered one successful connection.
fn answered(r: &DialResult) -> Result<&str> {
    ensure!(r.echo_ok, "connection failed: {r:?}");
    r.server_local.as_deref().context("no server_local")
}

/// Waits (20 s) until new connections to the VIP are routed by the current VirtualService:
/// `n` connections in a row all reach `addr`.
fn wait_all_reach(c: &Cluster, vip: &str, addr: &str, n: usize) -> Result<Duration> {
    let start = Instant::now();
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        last = dial_many(c, vip, n, 4)?;
        Ok(last.len() == n && last.iter().all(|r| answered(r).ok() == Some(addr)))
    })?;
    if !ok {
        bail!("connections to {vip} did not all reach {addr} within 20 s; last: {last:?}");
    }
    Ok(start.elapsed())
}

#[test]
fn vip_traffic_splits_80_20_across_subsets() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster()?;
    // First all to v1: proves the whole file (Service, rule, route) is in force before counting.
    c.write_config_file("reviews.yaml", &reviews_yaml(100, 0))?;
    wait_all_reach(&c, REVIEWS_VIP, V1_ADDR, 10)?;
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("reviews.yaml", &reviews_yaml(80, 20))?;
    // The new weights are in force once a connection reaches v2.
    let ok = wait_until(Duration::from_secs(20), || {
        let r = dial_many(&c, REVIEWS_VIP, 10, 4)?;
        Ok(r.iter().any(|r| answered(r).ok() == Some(V2_ADDR)))
    })?;
    ensure!(ok, "the 80/20 split never reached v2");

    let n = 2000;
    let started = Instant::now();
    let results = dial_many(&c, REVIEWS_VIP, n, 16)?;
    let took = started.elapsed();
    ensure!(results.len() == n, "{} results, wanted {n}", results.len());
    let mut by_addr: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        *by_addr.entry(answered(r)?.to_string()).or_default() += 1;
    }
    let v1 = by_addr.get(V1_ADDR).copied().unwrap_or(0);
    let v2 = by_addr.get(V2_ADDR).copied().unwrap_or(0);
    ensure!(
        v1 + v2 == n,
        "connections reached other endpoints: {by_addr:?}"
    );
    let share = 100.0 * v1 as f64 / n as f64;
    eprintln!("reviews split over {n} connections in {took:?}: v1 {v1} ({share:.1}%), v2 {v2}");
    ensure!(
        (77.0..=83.0).contains(&share),
        "v1 got {share:.1}% of {n} connections, wanted 80 ± 3: {by_addr:?}"
    );
    // The proxy names the service and the chosen endpoint for each connection.
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "connection complete",
            "service=\"mesh/reviews\"",
            &format!("endpoint={V2_ADDR}"),
            "transport=\"hbone\"",
        ],
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn weight_change_moves_new_connections_and_keeps_open_ones() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster()?;
    c.write_config_file("reviews.yaml", &reviews_yaml(100, 0))?;
    wait_all_reach(&c, REVIEWS_VIP, V1_ADDR, 10)?;

    let mut open = Session::open(&c, &testpod(), CLIENT_POD, REVIEWS_VIP)?;
    ensure!(
        open.server_local == V1_ADDR,
        "the open connection went to {} instead of v1",
        open.hello
    );
    ensure!(open.echo("before")? == "before", "echo before the change");

    c.write_config_file("reviews.yaml", &reviews_yaml(0, 100))?;
    // How long the change took is printed, not asserted: speed is a benchmark figure.
    let took = wait_all_reach(&c, REVIEWS_VIP, V2_ADDR, 10)?;
    eprintln!("new connections moved to v2 within {took:?}");
    // Everything after the change goes to v2.
    let after = dial_many(&c, REVIEWS_VIP, 100, 8)?;
    for r in &after {
        ensure!(
            answered(r)? == V2_ADDR,
            "a new connection still reached v1: {r:?}"
        );
    }
    // The connection opened before the change still works, still with v1.
    for i in 0..3 {
        let line = format!("after-{i}");
        ensure!(open.echo(&line)? == line, "echo after the change");
    }
    open.close()?;
    Ok(())
}

#[test]
fn service_without_ready_endpoint_is_refused() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster()?;
    let labels: [(&str, &str); 2] = [("direction", "outbound"), ("reason", "no_endpoint")];
    let before = metric_value(&proxy_metrics(&c, "node1")?, REFUSED, &labels);
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("ratings.yaml", RATINGS_YAML)?;
    // Until the controller's update arrives the VIP is unknown (and unreachable); then every
    // connection is refused by routing.
    let ok = wait_until(Duration::from_secs(20), || {
        let _ = dial_many(&c, RATINGS_VIP, 1, 1)?;
        Ok(metric_value(&proxy_metrics(&c, "node1")?, REFUSED, &labels) > before)
    })?;
    ensure!(ok, "no no_endpoint refusal counted within 20 s");
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "service mesh/ratings has no ready endpoint",
            "reason=\"no_endpoint\"",
        ],
        Duration::from_secs(5),
    )?;

    let counted = metric_value(&proxy_metrics(&c, "node1")?, REFUSED, &labels);
    let r = dial_many(&c, RATINGS_VIP, 1, 1)?;
    let one = r.first().context("empty dial report")?;
    // Reset by node1's proxy: not a hang (testpod's read timeout is an error in `outcome`),
    // and before the proxy's connect timeout, i.e. not an attempt to reach something.
    ensure!(
        outcome(one)? == Outcome::Refused,
        "a connection to a service without endpoints was not refused: {one:?}"
    );
    eprintln!("refused after {} ms: {:?}", one.elapsed_ms, one.error);
    let limit = mesh_node::defaults::CONNECT_TIMEOUT;
    ensure!(
        u128::from(one.elapsed_ms) < limit.as_millis(),
        "refused after {} ms, not before the proxy's {limit:?} connect timeout",
        one.elapsed_ms
    );
    let after = metric_value(&proxy_metrics(&c, "node1")?, REFUSED, &labels);
    ensure!(
        after >= counted + 1.0,
        "refusal not counted: {counted} → {after}"
    );
    // The other service keeps working meanwhile.
    c.write_config_file("reviews.yaml", &reviews_yaml(100, 0))?;
    wait_all_reach(&c, REVIEWS_VIP, V1_ADDR, 5)?;
    Ok(())
}
