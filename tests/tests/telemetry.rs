//! End-to-end tests of the node proxies' telemetry: Istio's TCP metrics (`istio_tcp_*`) count
//! generated traffic exactly, with Istio's labels, on both the source and the destination
//! proxy; HTTP requests are counted in `istio_requests_total` and
//! `istio_request_duration_milliseconds`; every connection and request has one access-log
//! line with its workloads, identities, addresses, bytes and duration (JSON here:
//! `--log-format json`); the series of a deleted workload disappear. Mesh mode, file config.
//! Run as root: `cargo test -p sidenode-tests --test telemetry`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::Value;
use sidenode_tests::cluster::Cluster;
use sidenode_tests::workload::{Server, Session, dial};
use std::time::Duration;

const CLIENT: &str = "node1-pod1";
const ECHO_POD: &str = "node2-pod1";
const ECHO_VIP: &str = "198.18.128.30:80";
const WEB_POD: &str = "node2-pod2";
const WEB_VIP_URL: &str = "http://198.18.128.31:80";
const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec:
  clusterIP: 198.18.128.30
  selector: {svc: echo}
  ports:
  - {name: tcp-echo, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 198.18.128.31
  selector: {svc: web}
  ports:
  - {name: http, port: 80, targetPort: 9080}
"#;

/// Labels every TCP series of the echo traffic has, from either reporter.
fn echo_labels(reporter: &str) -> Vec<(&str, &str)> {
    vec![
        ("reporter", reporter),
        ("source_workload", CLIENT),
        ("source_workload_namespace", "mesh"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1",
        ),
        ("source_canonical_service", CLIENT),
        ("destination_workload", ECHO_POD),
        ("destination_workload_namespace", "mesh"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1",
        ),
        // The harness labels every pod `app: <pod name>`.
        ("destination_app", ECHO_POD),
        ("destination_version", "v1"),
        ("destination_canonical_service", ECHO_POD),
        ("destination_canonical_revision", "v1"),
        ("destination_service", "echo.mesh.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "mesh"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ]
}

struct Tcp {
    opened: f64,
    closed: f64,
    sent: f64,
    received: f64,
}

fn tcp(c: &Cluster, node: &str, reporter: &str) -> Result<Tcp> {
    let text = proxy_metrics(c, node)?;
    let l = echo_labels(reporter);
    Ok(Tcp {
        opened: metric_value(&text, "istio_tcp_connections_opened_total", &l),
        closed: metric_value(&text, "istio_tcp_connections_closed_total", &l),
        sent: metric_value(&text, "istio_tcp_sent_bytes_total", &l),
        received: metric_value(&text, "istio_tcp_received_bytes_total", &l),
    })
}

/// The JSON log lines of `node`'s proxy after `offset` whose `message` is `message`.
fn access_lines(c: &Cluster, node: &str, offset: u64, message: &str) -> Result<Vec<Value>> {
    let text = std::fs::read(c.log_path(node, "proxy")).context("proxy log")?;
    let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["message"] == message)
        .collect())
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

#[test]
fn tcp_metrics_and_access_logs_match_generated_traffic() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster_with_proxy_args(3, &["--log-format", "json"])?;
    label_pods(
        &c,
        &[
            (ECHO_POD, &[("svc", "echo"), ("version", "v1")]),
            (WEB_POD, &[("svc", "web")]),
        ],
    )?;
    c.write_config_file("services.yaml", SERVICES)?;
    let _srv = Server::start(&c, &testpod(), ECHO_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", ECHO_POD)?;
    // The Service is routed and the tunnel works (one warm-up connection, before the counts).
    let mut last = None;
    if !wait_until(Duration::from_secs(15), || {
        let r = dial(&c, &testpod(), CLIENT, &[ECHO_VIP.to_string()], 1, 1, 0)?;
        let ok = r
            .first()
            .is_some_and(|r| r.echo_ok && r.server_local.as_deref() == Some("198.19.2.2:8080"));
        last = r.into_iter().next();
        Ok(ok)
    })? {
        let log = std::fs::read_to_string(c.log_path("node1", "proxy")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "{ECHO_VIP} never reached the echo pod: {last:?}\n{}",
            tail.join("\n")
        );
    }
    // The warm-up connection is closed and counted on both sides before the baselines.
    if !wait_until(Duration::from_secs(5), || {
        Ok(tcp(&c, "node1", "source")?.closed >= 1.0
            && tcp(&c, "node2", "destination")?.closed >= 1.0)
    })? {
        bail!("the warm-up connection was not counted closed");
    }
    let src0 = tcp(&c, "node1", "source")?;
    let dst0 = tcp(&c, "node2", "destination")?;
    let (off1, off2) = (c.log_len("node1", "proxy"), c.log_len("node2", "proxy"));

    // 3 connections, each 5 lines of 100 bytes (+ newline) echoed back after the HELLO line.
    let line = "x".repeat(100);
    let mut hellos = Vec::new();
    for _ in 0..3 {
        let mut sess = Session::open(&c, &testpod(), CLIENT, ECHO_VIP)?;
        for _ in 0..5 {
            ensure!(sess.echo(&line)? == line, "echo");
        }
        hellos.push(
            format!(
                "HELLO local={} peer={}\n",
                sess.server_local, sess.server_peer
            )
            .len() as f64,
        );
        sess.close()?;
    }
    let request_bytes = 5.0 * 101.0;
    let want_received = 3.0 * request_bytes;
    let want_sent = hellos.iter().sum::<f64>() + 3.0 * request_bytes;
    if !wait_until(Duration::from_secs(5), || {
        Ok(tcp(&c, "node1", "source")?.closed - src0.closed >= 3.0
            && tcp(&c, "node2", "destination")?.closed - dst0.closed >= 3.0)
    })? {
        bail!("the 3 connections were not all counted closed");
    }
    for (node, reporter, before) in [("node1", "source", &src0), ("node2", "destination", &dst0)] {
        let now = tcp(&c, node, reporter)?;
        let d = |a: f64, b: f64| a - b;
        ensure!(
            d(now.opened, before.opened) == 3.0 && d(now.closed, before.closed) == 3.0,
            "{node} ({reporter}): opened +{}, closed +{}",
            d(now.opened, before.opened),
            d(now.closed, before.closed)
        );
        ensure!(
            d(now.received, before.received) == want_received,
            "{node} ({reporter}): received +{} bytes, want {want_received}",
            d(now.received, before.received)
        );
        ensure!(
            d(now.sent, before.sent) == want_sent,
            "{node} ({reporter}): sent +{} bytes, want {want_sent}",
            d(now.sent, before.sent)
        );
    }
    // The closed series carry the response flags: none here.
    let text = proxy_metrics(&c, "node1")?;
    let mut flagged = echo_labels("source");
    flagged.push(("response_flags", "-"));
    ensure!(
        metric_value(&text, "istio_tcp_connections_closed_total", &flagged) >= 4.0,
        "closed series without response_flags=\"-\""
    );

    // One access-log line per connection on each side, with the connection's facts.
    for (node, off, direction) in [("node1", off1, "outbound"), ("node2", off2, "inbound")] {
        let lines: Vec<Value> = access_lines(&c, node, off, "connection complete")?
            .into_iter()
            .filter(|v| s(v, "dst.service") == "echo.mesh.svc.cluster.local")
            .collect();
        ensure!(
            lines.len() == 3,
            "{node}: {} access lines for 3 connections: {lines:#?}",
            lines.len()
        );
        for (v, hello) in lines.iter().zip(&hellos) {
            ensure!(
                s(v, "direction") == direction
                    && s(v, "src.workload") == CLIENT
                    && s(v, "src.namespace") == "mesh"
                    && s(v, "src.identity") == "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1"
                    && s(v, "dst.workload") == ECHO_POD
                    && s(v, "dst.identity") == "spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1"
                    && s(v, "dst.addr") == "198.19.2.2:8080"
                    && s(v, "dst.hbone_addr") == "198.19.2.2:15008"
                    && s(v, "transport") == "hbone"
                    && s(v, "flags") == "-"
                    && v["bytes_received"].as_f64() == Some(request_bytes)
                    && v["bytes_sent"].as_f64() == Some(hello + request_bytes)
                    && v["duration_ms"].is_u64(),
                "{node}: access line {v:#}"
            );
        }
        if node == "node1" {
            ensure!(
                lines
                    .iter()
                    .all(|v| s(v, "src.addr").starts_with("198.19.1.2:")),
                "source address: {lines:#?}"
            );
        }
    }

    // HTTP: counted per request by the source proxy, with a duration histogram and one
    // access line each.
    let _web = HttpServer::start(&c, WEB_POD, "web", &[])?;
    let r = http_get(&c, CLIENT, WEB_VIP_URL, "GET", "/", &[], 1)?;
    ensure!(r.status("200") == 1, "warm-up request: {r:?}");
    let http_labels = [
        ("reporter", "source"),
        ("source_workload", CLIENT),
        ("destination_workload", WEB_POD),
        ("destination_service", "web.mesh.svc.cluster.local"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let before = proxy_metrics(&c, "node1")?;
    let off1 = c.log_len("node1", "proxy");
    let r = http_get(&c, CLIENT, WEB_VIP_URL, "GET", "/items", &[], 10)?;
    ensure!(r.status("200") == 10, "10 requests: {r:?}");
    let after = proxy_metrics(&c, "node1")?;
    let delta = |name: &str| {
        metric_value(&after, name, &http_labels) - metric_value(&before, name, &http_labels)
    };
    ensure!(
        delta("istio_requests_total") == 10.0,
        "istio_requests_total +{}",
        delta("istio_requests_total")
    );
    ensure!(
        delta("istio_request_duration_milliseconds_count") == 10.0,
        "duration histogram count +{}",
        delta("istio_request_duration_milliseconds_count")
    );
    let mut inf = http_labels.to_vec();
    inf.push(("le", "+Inf"));
    ensure!(
        metric_value(&after, "istio_request_duration_milliseconds_bucket", &inf)
            - metric_value(&before, "istio_request_duration_milliseconds_bucket", &inf)
            == 10.0,
        "+Inf bucket"
    );
    let mut reqs = Vec::new();
    if !wait_until(Duration::from_secs(5), || {
        reqs = access_lines(&c, "node1", off1, "request complete")?;
        Ok(reqs.len() >= 10)
    })? {
        bail!("{} request lines for 10 requests", reqs.len());
    }
    ensure!(
        reqs.len() == 10,
        "{} request lines for 10 requests",
        reqs.len()
    );
    for v in &reqs {
        ensure!(
            s(v, "method") == "GET"
                && s(v, "path") == "/items"
                && v["status"].as_u64() == Some(200)
                && s(v, "dst.workload") == WEB_POD
                && s(v, "dst.service") == "web.mesh.svc.cluster.local"
                && s(v, "src.workload") == CLIENT
                && s(v, "dst.addr") == "198.19.2.3:9080",
            "request line {v:#}"
        );
    }

    // A deleted workload's series disappear (the echo pod leaves node2's config).
    let docs: Vec<String> = c
        .pod_objects("node2")
        .into_iter()
        .filter(|p| p.name != ECHO_POD)
        .map(|p| p.to_yaml())
        .collect();
    c.write_config_file("node2.yaml", &docs.join("---\n"))?;
    let gone = format!("destination_workload=\"{ECHO_POD}\"");
    for node in ["node1", "node2"] {
        if !wait_until(Duration::from_secs(10), || {
            Ok(!proxy_metrics(&c, node)?.contains(&gone))
        })? {
            bail!("{node} still has series of the deleted {ECHO_POD}");
        }
    }
    // Other workloads' series stay.
    ensure!(
        proxy_metrics(&c, "node1")?.contains(&format!("destination_workload=\"{WEB_POD}\"")),
        "the web pod's series went too"
    );
    Ok(())
}
