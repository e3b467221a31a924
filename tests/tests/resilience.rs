//! End-to-end tests of resilience for service traffic in the node proxy (L4), from
//! `DestinationRule` `trafficPolicy`: outlier detection with a refused connect retried on
//! another endpoint, the `tcp.maxConnections` limit, and least-request balancing by open
//! connections. Mesh mode (controller, HBONE), file config. Run as root:
//! `cargo test -p sidenode-tests --test resilience`. The tests take turns (one cluster at a
//! time); each has its own cluster (prefix `m....`), torn down on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{Cluster, TestCluster};
use sidenode_tests::workload::{DialResult, Server, Session, dial};
use std::time::{Duration, Instant};

const CLIENT_POD: &str = "node1-pod1";
/// Serves 9080 (meshed, node 2).
const GOOD_POD: &str = "node2-pod1";
const GOOD_ADDR: &str = "198.19.2.2:9080";
/// Meshed (node 2) but nothing listens on 9080: its HBONE listener answers `503`.
const BAD_POD: &str = "node2-pod2";
const BAD_ADDR: &str = "198.19.2.3:9080";
/// Serves 9080 (meshed, node 1, the client's node).
const OTHER_POD: &str = "node1-pod2";
const OTHER_ADDR: &str = "198.19.1.3:9080";
const WEB_VIP: &str = "198.18.128.20:80";
const ONE_VIP: &str = "198.18.128.21:80";
const LR_VIP: &str = "198.18.128.22:80";
const REFUSED: &str = "sidenode_hbone_refused_total";

/// A `Service` in `mesh` with `clusterIP:80 → 9080` and a one-label selector.
fn service_yaml(name: &str, ip: &str, key: &str, value: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: mesh
spec:
  clusterIP: {ip}
  selector:
    {key}: {value}
  ports:
  - name: tcp
    port: 80
    targetPort: 9080
"#
    )
}

/// A `DestinationRule` for `host` in `mesh` with this `spec` body (indented 2).
fn rule_yaml(name: &str, spec: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: mesh
spec:
  host: {name}.mesh.svc.cluster.local
{spec}"#
    )
}

/// A 2-node mesh cluster (3 pods per node): `web` selects the good and the bad pod, `one`
/// the good pod, `lr` the good pod (subset `a`) and the other one; servers on the good and
/// the other pod.
fn resilience_cluster() -> Result<(TestCluster, Vec<Server>)> {
    let c = mesh_cluster(3, None)?;
    label_pods(
        &c,
        &[
            (
                GOOD_POD,
                &[
                    ("web", "member"),
                    ("one", "member"),
                    ("lr", "member"),
                    ("lrsubset", "a"),
                ],
            ),
            (BAD_POD, &[("web", "member")]),
            (OTHER_POD, &[("lr", "member"), ("lrsubset", "b")]),
        ],
    )?;
    let servers = vec![
        Server::start(&c, &testpod(), GOOD_POD, &[9080])?,
        Server::start(&c, &testpod(), OTHER_POD, &[9080])?,
    ];
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    for pod in [GOOD_POD, BAD_POD, OTHER_POD] {
        let node = c.pod(pod)?.node.clone();
        wait_enrolled(&c, &node, "mesh", pod)?;
        wait_hbone_listener(&c, pod)?;
    }
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

/// Waits (20 s) until a connection to `vip` is answered by `addr` (any endpoint when `None`).
fn wait_reach(c: &Cluster, vip: &str, addr: Option<&str>) -> Result<()> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        last = dial_many(c, vip, 1, 1)?;
        Ok(last
            .iter()
            .any(|r| answered(r).is_ok_and(|a| addr.is_none_or(|want| a == want))))
    })?;
    if !ok {
        bail!("no connection to {vip} reached {addr:?} within 20 s; last: {last:?}");
    }
    Ok(())
}

/// Lines of the node's proxy log written after `offset` containing every needle.
fn log_lines(c: &Cluster, node: &str, offset: u64, needles: &[&str]) -> Vec<String> {
    let bytes = std::fs::read(c.log_path(node, "proxy")).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..])
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

#[test]
fn refused_endpoint_is_retried_elsewhere_and_ejected() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = resilience_cluster()?;
    let offset = c.log_len("node1", "proxy");
    let yaml = [
        service_yaml("web", "198.18.128.20", "web", "member"),
        rule_yaml(
            "web",
            "  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 1\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n",
        ),
    ]
    .join("---\n");
    c.write_config_file("web.yaml", &yaml)?;
    wait_reach(&c, WEB_VIP, None)?;

    // One at a time: after the first refusal the bad endpoint is ejected for 30 s.
    let n = 50;
    let started = Instant::now();
    let results = dial_many(&c, WEB_VIP, n, 1)?;
    eprintln!("{n} connections in {:?}", started.elapsed());
    ensure!(results.len() == n, "{} results, wanted {n}", results.len());
    for r in &results {
        ensure!(
            answered(r)? == GOOD_ADDR,
            "answered by another endpoint: {r:?}"
        );
    }
    let ejected = wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "endpoint ejected (outlier detection)",
            &format!("endpoint={BAD_ADDR}"),
            "cluster=\"mesh/web/\"",
            "ejection_ms=30000",
        ],
        Duration::from_secs(5),
    )?;
    eprintln!("{ejected}");
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "endpoint unreachable; trying another endpoint",
            &format!("failed={BAD_ADDR}"),
        ],
        Duration::from_secs(5),
    )?;
    // The bad endpoint was tried once (its refusal ejected it), never again.
    let refused = log_lines(
        &c,
        "node1",
        offset,
        &["tunnel refused", &format!("dst={BAD_ADDR}")],
    );
    ensure!(
        refused.len() == 1,
        "the refused endpoint was tried {} times, wanted 1:\n{}",
        refused.len(),
        refused.join("\n")
    );
    ensure!(
        refused[0].contains("reason=\"unreachable\""),
        "a 503 from the endpoint's proxy should be `unreachable`: {}",
        refused[0]
    );
    Ok(())
}

#[test]
fn max_connections_overflow_is_reset_and_counted() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = resilience_cluster()?;
    // The pool's connect timeout: a refusal must come before it (not be a queued connection
    // given up on at the timeout).
    const CONNECT_TIMEOUT_MS: u64 = 2000;
    let yaml = [
        service_yaml("one", "198.18.128.21", "one", "member"),
        rule_yaml(
            "one",
            &format!(
                "  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 2\n        connectTimeout: {CONNECT_TIMEOUT_MS}ms\n"
            ),
        ),
    ]
    .join("---\n");
    c.write_config_file("one.yaml", &yaml)?;
    wait_reach(&c, ONE_VIP, Some(GOOD_ADDR))?;

    let labels: [(&str, &str); 2] = [("direction", "outbound"), ("reason", "overflow")];
    let overflows =
        || -> Result<f64> { Ok(metric_value(&proxy_metrics(&c, "node1")?, REFUSED, &labels)) };
    let open = |what: &str| -> Result<Session> {
        // The connections of the wait above may take a moment to be released in the proxy:
        // an attempt refused as an overflow (counted) is tried again; any other failure, or
        // overflows for more than 5 s, fail.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let before = overflows()?;
            match Session::open(&c, &testpod(), CLIENT_POD, ONE_VIP) {
                Ok(s) => return Ok(s),
                Err(e) if overflows()? > before && Instant::now() < end => {
                    eprintln!("opening {what}: an overflow while the pool drains: {e:#}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.context(format!("opening {what}"))),
            }
        }
    };
    let mut s1 = open("session 1")?;
    let mut s2 = open("session 2")?;
    ensure!(s1.echo("one")? == "one" && s2.echo("two")? == "two", "echo");

    let before = overflows()?;
    let offset = c.log_len("node1", "proxy");
    let third = dial_many(&c, ONE_VIP, 1, 1)?;
    let one = third.first().context("empty dial report")?;
    // Reset before the server's HELLO (a hang would be testpod's read timeout, an error here).
    ensure!(
        outcome(one)? == Outcome::Refused,
        "a third connection was not refused: {one:?}"
    );
    eprintln!(
        "third connection refused after {} ms: {:?}",
        one.elapsed_ms, one.error
    );
    ensure!(
        one.elapsed_ms < CONNECT_TIMEOUT_MS,
        "the overflow was refused after {} ms, not before the {CONNECT_TIMEOUT_MS} ms connect timeout: {one:?}",
        one.elapsed_ms
    );
    let after = overflows()?;
    ensure!(
        after >= before + 1.0,
        "overflow not counted: {before} → {after}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "connection pool limit reached",
            "maxConnections of mesh/one/",
            "service=\"mesh/one\"",
        ],
        Duration::from_secs(5),
    )?;
    // The held sessions still work; closing one lets a new connection through.
    ensure!(s1.echo("still")? == "still", "echo after the overflow");
    s2.close()?;
    wait_reach(&c, ONE_VIP, Some(GOOD_ADDR))?;
    let mut s3 = open("session 3")?;
    ensure!(s3.echo("three")? == "three", "echo on the new session");
    Ok(())
}

/// `lr` with `LEAST_REQUEST`, and a VirtualService sending every connection to subset `a`
/// (`subset: true`) or to the whole service.
fn lr_yaml(subset: bool) -> String {
    let dest = if subset {
        "host: lr\n        subset: a"
    } else {
        "host: lr"
    };
    [
        service_yaml("lr", "198.18.128.22", "lr", "member"),
        rule_yaml(
            "lr",
            "  trafficPolicy:\n    loadBalancer:\n      simple: LEAST_REQUEST\n  subsets:\n  - name: a\n    labels:\n      lrsubset: a\n",
        ),
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: lr
  namespace: mesh
spec:
  hosts:
  - lr
  tcp:
  - route:
    - destination:
        {dest}
"#
        ),
    ]
    .join("---\n")
}

#[test]
fn least_request_avoids_the_endpoint_holding_sessions() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = resilience_cluster()?;
    c.write_config_file("lr.yaml", &lr_yaml(true))?;
    wait_reach(&c, LR_VIP, Some(GOOD_ADDR))?;
    // Five sessions held open to endpoint a (all routed to subset a).
    let mut held = Vec::new();
    for i in 0..5 {
        let s = Session::open(&c, &testpod(), CLIENT_POD, LR_VIP)
            .with_context(|| format!("session {i}"))?;
        ensure!(
            s.server_local == GOOD_ADDR,
            "session {i} reached {}",
            s.hello
        );
        held.push(s);
    }
    // Now the whole service: a has 5 open connections, b none, so least-request (two
    // choices among two endpoints: both compared) sends every new connection to b.
    c.write_config_file("lr.yaml", &lr_yaml(false))?;
    wait_reach(&c, LR_VIP, Some(OTHER_ADDR))?;
    let results = dial_many(&c, LR_VIP, 20, 1)?;
    ensure!(results.len() == 20, "{} results", results.len());
    for r in &results {
        ensure!(
            answered(r)? == OTHER_ADDR,
            "a new connection went to the busy endpoint: {r:?}"
        );
    }
    for s in &mut held {
        ensure!(s.echo("held")? == "held", "a held session broke");
    }
    Ok(())
}
