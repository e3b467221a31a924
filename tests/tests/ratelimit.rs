//! End-to-end tests of `RateLimitPolicy` (sidenode.io/v1alpha1) enforced by the destination's
//! node proxy: a burst of new connections beyond a workload's bucket is refused (the client's
//! connection is reset) and counted on both nodes, and HTTP requests beyond a route's bucket
//! get 429 while other routes pass. Mesh mode (controller, HBONE), file config. Run as root:
//! `cargo test -p sidenode-tests --test ratelimit`. The buckets refill once an hour, so every
//! count is exact: nothing refills during a test.

mod common;

use anyhow::{Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{Server, dial};
use std::time::Duration;

/// Meshed client on node 1 (namespace `mesh`).
const CLIENT: &str = "node1-pod1";
/// Meshed TCP echo server on node 2, ports 8080 and 9090.
const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const TARGET_9090: &str = "198.19.2.2:9090";
/// Meshed HTTP server on node 2 (port 9080), behind the Service `web` (port `http` 80).
const WEB_POD: &str = "node2-pod2";
const WEB_URL: &str = "http://198.19.2.3:9080";
const LIMITED: &str = "sidenode_rate_limited_total";
const REFUSED: &str = "sidenode_hbone_refused_total";

fn rate_limit(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: sidenode.io/v1alpha1\nkind: RateLimitPolicy\nmetadata:\n  name: {name}\n  namespace: mesh\nspec:\n{spec}---\n"
    )
}

fn limited(c: &Cluster, kind: &str, policy: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, "node2")?,
        LIMITED,
        &[("kind", kind), ("policy", policy)],
    ))
}

fn refused(c: &Cluster, node: &str, direction: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, node)?,
        REFUSED,
        &[("direction", direction), ("reason", "rate_limited")],
    ))
}

/// `n` connections from the client to `target`, `n` at a time: how many echoed. Every other
/// one must have been refused the way a rate limit refuses: the client's connection reset
/// before the server's HELLO (a timeout or any other failure is an error).
fn burst(c: &Cluster, target: &str, n: usize) -> Result<usize> {
    let r = dial(c, &testpod(), CLIENT, &[target.to_string()], n, n, 0)?;
    ensure!(r.len() == n, "{} results for {n} connections", r.len());
    let mut echoed = 0;
    for one in &r {
        match outcome(one)? {
            Outcome::Echoed => echoed += 1,
            Outcome::Refused => {}
            Outcome::Closed => bail!("closed after the server's HELLO, not refused: {one:?}"),
        }
    }
    Ok(echoed)
}

#[test]
fn connection_burst_beyond_the_bucket_is_refused_and_counted() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster(3, None)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080, 9090])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    // No policy: nothing is limited.
    ensure!(burst(&c, TARGET, 12)? == 12, "no policy: refused");

    // Two policies in one file (one update): `probe` (port 9090, one connection) tells when
    // both are in force; `burst` (port 8080) then has all of its 5 tokens.
    let offset = c.log_len("node2", "proxy");
    c.write_config_file(
        "limits.yaml",
        &format!(
            "{}{}",
            rate_limit(
                "probe",
                "  connections:\n    ports: [9090]\n    tokenBucket: {maxTokens: 1, fillInterval: 1h}\n"
            ),
            rate_limit(
                "burst",
                "  connections:\n    ports: [8080]\n    tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1h}\n"
            )
        ),
    )?;
    if !wait_until(Duration::from_secs(15), || {
        Ok(burst(&c, TARGET_9090, 2)? < 2)
    })? {
        bail!("the probe limit (1 connection to :9090) never refused a connection");
    }

    let before_src = refused(&c, "node1", "outbound")?;
    let before_dst = refused(&c, "node2", "inbound")?;
    let before = limited(&c, "connection", "mesh/burst")?;
    // 12 at once against a bucket of 5: exactly 5 pass, 7 are refused and counted.
    let ok = burst(&c, TARGET, 12)?;
    ensure!(ok == 5, "{ok} of 12 connections passed a bucket of 5");
    let counted = limited(&c, "connection", "mesh/burst")? - before;
    ensure!(
        counted == 7.0,
        "{LIMITED}{{policy=mesh/burst}} counted {counted}, want 7"
    );
    let dst = refused(&c, "node2", "inbound")? - before_dst;
    ensure!(
        dst == 7.0,
        "node2 {REFUSED}{{reason=rate_limited}} +{dst}, want 7"
    );
    let src = refused(&c, "node1", "outbound")? - before_src;
    ensure!(
        src == 7.0,
        "node1 {REFUSED}{{reason=rate_limited}} +{src}, want 7"
    );
    wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &[
            "connection over the rate limit",
            "policy=mesh/burst",
            "src_identity=spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1",
        ],
        Duration::from_secs(5),
    )?;

    // The bucket is per workload: another pod on node 2 is not limited by `burst`'s tokens
    // (its own bucket is full)...
    let _other = Server::start(&c, &testpod(), "node2-pod2", &[8080])?;
    wait_hbone_listener(&c, "node2-pod2")?;
    ensure!(
        burst(&c, "198.19.2.3:8080", 5)? == 5,
        "a second workload shared the first one's bucket"
    );
    // ...and removing the policies lifts the limit.
    c.write_config_file("limits.yaml", "")?;
    if !wait_until(Duration::from_secs(15), || Ok(burst(&c, TARGET, 8)? == 8))? {
        bail!("connections still refused after the policy was removed");
    }
    Ok(())
}

const WEB: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: mesh
spec:
  clusterIP: 198.18.128.20
  selector:
    svc: web
  ports:
  - name: http
    port: 80
    targetPort: 9080
---
"#;

#[test]
fn http_requests_beyond_a_route_bucket_get_429() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster(3, None)?;
    label_pods(&c, &[(WEB_POD, &[("svc", "web")])])?;
    let _web = HttpServer::start(&c, WEB_POD, "web", &[])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", WEB_POD)?;
    wait_hbone_listener(&c, WEB_POD)?;
    let get =
        |method: &str, path: &str, n: usize| http_get(&c, CLIENT, WEB_URL, method, path, &[], n);
    ensure!(
        get("POST", "/api/x", 10)?.status("200") == 10,
        "no policy: not all 200"
    );

    // Per route: POST /api/* has 3 tokens, other /api/* requests 10; the rest is not limited.
    let spec = "  selector:\n    matchLabels: {svc: web}\n  requests:\n  - name: writes\n    match: {methods: [POST], paths: [\"/api/*\"]}\n    tokenBucket: {maxTokens: 3, fillInterval: 1h}\n  - name: api\n    match: {paths: [\"/api/*\"]}\n    tokenBucket: {maxTokens: 10, fillInterval: 1h}\n";
    c.write_config_file(
        "limits.yaml",
        &format!("{WEB}{}", rate_limit("web-limits", spec)),
    )?;
    // In force once POSTs get 429 (using up to the 3 write tokens).
    let mut last = None;
    let ok = wait_until(Duration::from_secs(15), || {
        let r = get("POST", "/api/x", 4)?;
        let done = r.status("429") > 0;
        last = Some(r);
        Ok(done)
    })?;
    if !ok {
        bail!("POST /api/x never answered 429: {last:?}");
    }
    let before = limited(&c, "request", "mesh/web-limits")?;
    let writes = get("POST", "/api/orders", 6)?;
    ensure!(
        writes.status("429") == 6,
        "the empty write bucket passed requests: {writes:?}"
    );
    // A burst of 15 reads against 10 tokens: 10 pass (served by the pod), 5 get 429.
    let reads = get("GET", "/api/items", 15)?;
    ensure!(
        reads.status("200") == 10 && reads.body("web") == 10 && reads.status("429") == 5,
        "15 reads against a bucket of 10: {reads:?}"
    );
    // Outside every route: not limited.
    let other = get("GET", "/health", 20)?;
    ensure!(other.status("200") == 20, "an unlimited path: {other:?}");
    let counted = limited(&c, "request", "mesh/web-limits")? - before;
    ensure!(
        counted == 11.0,
        "{LIMITED}{{kind=request}} counted {counted}, want 6 + 5"
    );
    Ok(())
}
