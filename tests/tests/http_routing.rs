//! End-to-end tests of HTTP routing in the node proxy (L7): a Service port named `http` is
//! terminated by node1's proxy and each request routed by the VirtualService `http` routes
//! (weights, header and path matches, retries, timeouts, faults), then carried to node2's pods
//! inside HBONE. Mesh mode (controller, HBONE), file config. Run as root:
//! `cargo test -p sidenode-tests --test http_routing`. The tests take turns (one cluster at a
//! time); each has its own cluster, torn down on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{Cluster, TestCluster};
use std::process::Stdio;
use std::time::{Duration, Instant};

const CLIENT_POD: &str = "node1-pod1";
const CLIENT_IP: &str = "198.19.1.2";
/// `reviews` endpoints: subset v1 and subset v2 (both meshed, on node 2).
const V1_POD: &str = "node2-pod1";
const V2_POD: &str = "node2-pod2";
const URL: &str = "http://198.18.128.10:80";
const REQUESTS: &str = "istio_requests_total";

/// `n` requests from the client pod on one connection, with `headers` (`K:V`) and `path`.
fn get(c: &Cluster, n: usize, headers: &[&str], path: &str) -> Result<HttpReport> {
    http_get(c, CLIENT_POD, URL, "GET", path, headers, n)
}

/// Waits (20 s) until `n` requests with `headers` to `path` all answer 200 with body `body`.
fn wait_all(c: &Cluster, headers: &[&str], path: &str, body: &str, n: usize) -> Result<()> {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(20), || {
        // Two connections: an L4 split (per connection) cannot pass by chance.
        for _ in 0..2 {
            let r = get(c, n, headers, path)?;
            let done = r.status("200") == n && r.body(body) == n;
            last = Some(r);
            if !done {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    if !ok {
        bail!("requests {headers:?} {path} did not all reach {body} within 20 s: {last:?}");
    }
    Ok(())
}

const SERVICE_AND_RULE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: mesh
spec:
  clusterIP: 198.18.128.10
  selector:
    svc: reviews
  ports:
  - name: http
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
"#;

/// The Service, rule and a VirtualService with these `http` routes (YAML list items, indented
/// two spaces), preceded by a route sending `probe: 1` to v2 (to see that the file is in force).
fn reviews_yaml(http_routes: &str) -> String {
    format!(
        r#"{SERVICE_AND_RULE}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: mesh
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        probe:
          exact: "1"
    route:
    - destination:
        host: reviews
        subset: v2
{http_routes}"#
    )
}

/// A 2-node mesh cluster with `reviews` v1/v2 pods on node 2 serving HTTP on 9080 (`v1_args`
/// for v1's server), enrolled, HBONE listeners open.
fn reviews_cluster(v1_args: &[&str]) -> Result<(TestCluster, Vec<HttpServer>)> {
    let c = mesh_cluster(3, None)?;
    label_pods(
        &c,
        &[
            (V1_POD, &[("svc", "reviews"), ("version", "v1")]),
            (V2_POD, &[("svc", "reviews"), ("version", "v2")]),
        ],
    )?;
    let servers = vec![
        HttpServer::start(&c, V1_POD, "v1", v1_args)?,
        HttpServer::start(&c, V2_POD, "v2", &[])?,
    ];
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node2", "mesh", V1_POD)?;
    wait_enrolled(&c, "node2", "mesh", V2_POD)?;
    wait_hbone_listener(&c, V1_POD)?;
    wait_hbone_listener(&c, V2_POD)?;
    Ok((c, servers))
}

fn split_routes(w1: u32, w2: u32) -> String {
    format!(
        r#"  - route:
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

#[test]
fn http_requests_split_80_20_inside_hbone() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster(&[])?;
    c.write_config_file("reviews.yaml", &reviews_yaml(&split_routes(100, 0)))?;
    wait_all(&c, &["probe:1"], "/", "v2", 5)?;
    wait_all(&c, &[], "/", "v1", 10)?;
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("reviews.yaml", &reviews_yaml(&split_routes(80, 20)))?;
    let ok = wait_until(Duration::from_secs(20), || {
        Ok(get(&c, 20, &[], "/")?.body("v2") > 0)
    })?;
    ensure!(ok, "the 80/20 split never reached v2");

    let n = 2000;
    let started = Instant::now();
    let r = get(&c, n, &[], "/")?;
    let took = started.elapsed();
    ensure!(r.status("200") == n, "not all 200: {r:?}");
    let (v1, v2) = (r.body("v1"), r.body("v2"));
    ensure!(v1 + v2 == n, "other bodies: {r:?}");
    let share = 100.0 * v1 as f64 / n as f64;
    eprintln!(
        "http split over {n} requests on {} connection(s) in {took:?} (mean {:.2} ms): v1 {v1} ({share:.1}%), v2 {v2}; peers {:?}",
        r.connections, r.mean_ms, r.peers
    );
    ensure!(
        (77.0..=83.0).contains(&share),
        "v1 got {share:.1}% of {n} requests, wanted 80 ± 3: {r:?}"
    );
    // Per request, on one client connection.
    ensure!(r.connections == 1, "{r:?}");
    // Delivered by node2's proxy, which keeps the client's address: the servers see the
    // client pod's IP only (the tunnel itself is proven below by node1's request lines and
    // source-reported metrics for the remote endpoints).
    ensure!(
        r.peers.get(CLIENT_IP) == Some(&n) && r.peers.len() == 1,
        "the servers should see the client's address ({CLIENT_IP}) for every request: {:?}",
        r.peers
    );
    // The node2 proxy carried tunnels from the client's identity; node1's counted requests.
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "request done",
            "service=\"mesh/reviews\"",
            "endpoint=198.19.2.3:9080",
            "status=200",
        ],
        Duration::from_secs(5),
    )?;
    let m = proxy_metrics(&c, "node1")?;
    let counted = metric_value(
        &m,
        REQUESTS,
        &[
            ("reporter", "source"),
            ("destination_service", "reviews.mesh.svc.cluster.local"),
            ("destination_workload", V2_POD),
            ("response_code", "200"),
            ("request_protocol", "http"),
        ],
    );
    ensure!(
        counted >= v2 as f64,
        "istio_requests_total v2 {counted} < {v2}"
    );
    Ok(())
}

#[test]
fn header_and_path_matches_pick_the_subset() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster(&[])?;
    let routes = r#"  - match:
    - headers:
        end-user:
          exact: jason
    - uri:
        prefix: /v2/
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"#;
    c.write_config_file("reviews.yaml", &reviews_yaml(routes))?;
    wait_all(&c, &["probe:1"], "/", "v2", 5)?;
    for (headers, path, want) in [
        (&["end-user:jason"][..], "/", "v2"),
        (&[][..], "/v2/reviews", "v2"),
        (&[][..], "/", "v1"),
        (&["end-user:bob"][..], "/reviews", "v1"),
        (&[][..], "/v2", "v1"),
    ] {
        let r = get(&c, 20, headers, path)?;
        ensure!(
            r.status("200") == 20 && r.body(want) == 20,
            "{headers:?} {path}: wanted all {want}: {r:?}"
        );
    }
    // HTTP/2 with prior knowledge (h2c) from the client is routed alike.
    for (header, want) in [("end-user: jason", "v2"), ("end-user: bob", "v1")] {
        let out = c
            .pod_command(CLIENT_POD, "curl")?
            .args([
                "-sS",
                "--max-time",
                "5",
                "--http2-prior-knowledge",
                "-H",
                header,
            ])
            .arg(format!("{URL}/"))
            .output()
            .context("running curl")?;
        let body = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && body == want,
            "h2c with {header:?}: {} {body:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // No route matches: 404, as Envoy's NR.
    let only_jason = r#"  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v1
"#;
    c.write_config_file("reviews.yaml", &reviews_yaml(only_jason))?;
    let ok = wait_until(Duration::from_secs(20), || {
        Ok(get(&c, 1, &[], "/")?.status("404") == 1)
    })?;
    ensure!(ok, "an unmatched request never got 404");
    Ok(())
}

#[test]
fn retries_turn_first_503s_into_200s() -> Result<()> {
    let _turn = serial();
    // v1 fails its first two requests with 503.
    let (c, _servers) = reviews_cluster(&["--fail-first", "2", "--fail-status", "503"])?;
    let routes = r#"  - route:
    - destination:
        host: reviews
        subset: v1
    retries:
      attempts: 3
      retryOn: 5xx
"#;
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("reviews.yaml", &reviews_yaml(routes))?;
    // In force (the probe route goes to v2, so v1's failures are still unspent).
    wait_all(&c, &["probe:1"], "/", "v2", 3)?;
    let r = get(&c, 5, &[], "/")?;
    eprintln!("with retries: {r:?}");
    ensure!(
        r.status("200") == 5 && r.body("v1") == 5,
        "the 503s were not retried away: {r:?}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &["request done", "status=200", "attempts=3"],
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn route_timeout_answers_504() -> Result<()> {
    let _turn = serial();
    // The server answers after SERVER_DELAY_MS; the route gives up after TIMEOUT_MS.
    const SERVER_DELAY_MS: f64 = 1000.0;
    const TIMEOUT_MS: f64 = 200.0;
    let (c, _servers) = reviews_cluster(&["--delay-ms", &SERVER_DELAY_MS.to_string()])?;
    let routes = format!(
        r#"  - route:
    - destination:
        host: reviews
        subset: v1
    timeout: {TIMEOUT_MS}ms
"#
    );
    c.write_config_file("reviews.yaml", &reviews_yaml(&routes))?;
    wait_all(&c, &["probe:1"], "/", "v2", 3)?;
    let r = get(&c, 5, &[], "/")?;
    eprintln!(
        "timeout 200ms against a 1000 ms server: statuses {:?}, latency min {:.1} mean {:.1} max {:.1} ms",
        r.statuses, r.min_ms, r.mean_ms, r.max_ms
    );
    ensure!(r.status("504") == 5, "wanted 504s: {r:?}");
    // The 504 is the route's timeout: not before it (the client's clock, 5 % for rounding),
    // and before the server could have answered (else the answer would have been a 200).
    ensure!(
        r.min_ms >= TIMEOUT_MS * 0.95 && r.max_ms < SERVER_DELAY_MS,
        "504 after {:.1}..{:.1} ms: not the {TIMEOUT_MS} ms timeout of a {SERVER_DELAY_MS} ms server",
        r.min_ms,
        r.max_ms
    );
    Ok(())
}

#[test]
fn faults_abort_and_delay() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster(&[])?;
    let routes = r#"  - match:
    - headers:
        x-fault:
          exact: abort
    fault:
      abort:
        httpStatus: 418
        percentage:
          value: 100
    route:
    - destination:
        host: reviews
        subset: v1
  - match:
    - headers:
        x-fault:
          exact: delay
    fault:
      delay:
        fixedDelay: 300ms
        percentage:
          value: 100
    route:
    - destination:
        host: reviews
        subset: v1
  - route:
    - destination:
        host: reviews
        subset: v1
"#;
    c.write_config_file("reviews.yaml", &reviews_yaml(routes))?;
    wait_all(&c, &["probe:1"], "/", "v2", 3)?;
    let abort = get(&c, 10, &["x-fault:abort"], "/")?;
    ensure!(abort.status("418") == 10, "wanted 418s: {abort:?}");
    let plain = get(&c, 5, &[], "/")?;
    ensure!(plain.status("200") == 5, "{plain:?}");
    let delayed = get(&c, 5, &["x-fault:delay"], "/")?;
    eprintln!(
        "fault: abort {:?}; plain mean {:.1} ms; delayed min {:.1} mean {:.1} ms",
        abort.statuses, plain.mean_ms, delayed.min_ms, delayed.mean_ms
    );
    ensure!(
        delayed.status("200") == 5 && delayed.body("v1") == 5,
        "{delayed:?}"
    );
    // The delay was applied to every delayed request (none answered sooner than it); how much
    // longer they took is a speed figure, not checked.
    ensure!(delayed.min_ms >= 295.0, "delay not applied: {delayed:?}");
    Ok(())
}

const GREETER_URL: &str = "http://198.18.128.11:80";

/// `greeter`: a Service whose port is declared `grpc`, to the v1 pod's HTTP/2-only server.
const GREETER: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: greeter
  namespace: mesh
spec:
  clusterIP: 198.18.128.11
  selector:
    svc: reviews
    version: v1
  ports:
  - name: grpc
    port: 80
    targetPort: 9090
"#;

/// curl from the client pod with `args`; (success, stdout with `-D -` headers, stderr).
fn curl(c: &Cluster, args: &[&str]) -> Result<(bool, String, String)> {
    let out = c
        .pod_command(CLIENT_POD, "curl")?
        .args(["-sS", "--max-time", "5", "-D", "-"])
        .args(args)
        .output()
        .context("running curl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn grpc_port_goes_upstream_as_http2_with_trailers() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster(&[])?;
    let _h2 = HttpServer::spawn(
        &c,
        V1_POD,
        &["h2-serve", "--port", "9090", "--name", "greeter-v1"],
    )?;
    let offset = c.log_len("node1", "proxy");
    c.write_config_file("greeter.yaml", GREETER)?;
    let url = format!("{GREETER_URL}/helloworld.Greeter/SayHello");
    let h2c = [
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        "hello",
        url.as_str(),
    ];
    let mut last = None;
    let ok = wait_until(Duration::from_secs(20), || {
        let r = curl(&c, &h2c)?;
        let done = r.0 && r.1.contains("greeter-v1 HTTP/2.0");
        last = Some(r);
        Ok(done)
    })?;
    ensure!(
        ok,
        "h2c through the grpc port never reached the server: {last:?}"
    );
    let (_, out, _) = last.context("a curl result")?;
    eprintln!("h2c through a grpc port:\n{out}");
    // The server spoke HTTP/2 (its answer names the version); its trailer reached curl (after
    // the body, in the `-D -` dump).
    ensure!(out.starts_with("HTTP/2 200"), "{out}");
    let after_body = out
        .split_once("greeter-v1 HTTP/2.0")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    ensure!(
        after_body.to_ascii_lowercase().contains("grpc-status: 0"),
        "the grpc-status trailer did not reach the client: {out:?}"
    );
    // An HTTP/1.1 client of the same port: HTTP/2 to the endpoint all the same.
    let (ok, out, err) = curl(&c, &["--http1.1", url.as_str()])?;
    ensure!(
        ok && out.contains("greeter-v1 HTTP/2.0"),
        "HTTP/1.1 client: {out:?} {err}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "request done",
            "service=\"mesh/greeter\"",
            "endpoint=198.19.2.2:9090",
            "status=200",
        ],
        Duration::from_secs(5),
    )?;
    let m = proxy_metrics(&c, "node1")?;
    let grpc = metric_value(
        &m,
        REQUESTS,
        &[
            ("destination_service", "greeter.mesh.svc.cluster.local"),
            ("response_code", "200"),
            ("request_protocol", "grpc"),
        ],
    );
    ensure!(grpc >= 1.0, "no grpc request counted: {grpc}");
    Ok(())
}

#[test]
fn pending_requests_over_the_limit_get_503_overflow() -> Result<()> {
    let _turn = serial();
    // v1 answers after 500 ms.
    let (c, _servers) = reviews_cluster(&["--delay-ms", "500"])?;
    let yaml = reviews_yaml(
        r#"  - route:
    - destination:
        host: reviews
        subset: v1
"#,
    )
    .replace(
        "  host: reviews.mesh.svc.cluster.local\n",
        r#"  host: reviews.mesh.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
"#,
    );
    c.write_config_file("reviews.yaml", &yaml)?;
    wait_all(&c, &["probe:1"], "/", "v2", 3)?;
    let offset = c.log_len("node1", "proxy");
    // Four requests at once, each on its own client connection.
    let started = Instant::now();
    let children = (0..4)
        .map(|_| {
            c.pod_command(CLIENT_POD, "curl")?
                .args([
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-D",
                    "-",
                    "-w",
                    "code=%{http_code} ms=%{time_total}\n",
                ])
                .arg(format!("{URL}/"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting curl")
        })
        .collect::<Result<Vec<_>>>()?;
    let outs = children
        .into_iter()
        .map(|ch| ch.wait_with_output().context("curl"))
        .collect::<Result<Vec<_>>>()?;
    let took = started.elapsed();
    let outs: Vec<String> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    eprintln!("4 concurrent requests, maxConnections 1, 1 pending, in {took:?}: {outs:#?}");
    let ok = outs.iter().filter(|o| o.contains("code=200")).count();
    let overflow: Vec<&String> = outs.iter().filter(|o| o.contains("code=503")).collect();
    ensure!(ok >= 1, "none succeeded: {outs:?}");
    ensure!(!overflow.is_empty(), "none overflowed: {outs:?}");
    let total_s = |o: &str| -> Result<f64> {
        o.split("ms=")
            .nth(1)
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no time_total in {o}"))
    };
    // The first served request waited for the (delayed) server; every overflow was answered
    // before it, i.e. refused at once rather than queued behind it.
    let served_first = outs
        .iter()
        .filter(|o| o.contains("code=200"))
        .map(|o| total_s(o))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    for o in &overflow {
        ensure!(
            o.to_ascii_lowercase().contains("x-envoy-overloaded: true"),
            "a 503 without x-envoy-overloaded: {o}"
        );
        let s = total_s(o)?;
        ensure!(
            s < served_first,
            "the overflow took {s} s, the first served request {served_first} s: {o}"
        );
    }
    // Not more than 1 connection: at most 1 served at once + 1 pending, so ≥ 2 503s.
    ensure!(ok + overflow.len() == 4, "{outs:?}");
    ensure!(
        overflow.len() >= 2,
        "more than one connection was opened? {outs:?}"
    );
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &[
            "request refused: connection pool overflow",
            "http1MaxPendingRequests",
        ],
        Duration::from_secs(5),
    )?;
    let m = proxy_metrics(&c, "node1")?;
    let refused = metric_value(
        &m,
        "sidenode_hbone_refused_total",
        &[("direction", "outbound"), ("reason", "overflow")],
    );
    ensure!(
        refused >= overflow.len() as f64,
        "refusals counted: {refused}"
    );
    Ok(())
}

/// `reviews` plus one Service per version, and a Gateway API HTTPRoute attached to `reviews`:
/// `end-user: jason` to reviews-v2, the rest 4:1 (80/20) between reviews-v1 and reviews-v2.
const HTTP_ROUTE_YAML: &str = r#"apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: mesh}
spec:
  clusterIP: 198.18.128.10
  selector: {svc: reviews}
  ports: [{name: http, port: 80, targetPort: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: mesh}
spec:
  clusterIP: 198.18.128.21
  selector: {svc: reviews, version: v1}
  ports: [{name: http, port: 9080, targetPort: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: mesh}
spec:
  clusterIP: 198.18.128.22
  selector: {svc: reviews, version: v2}
  ports: [{name: http, port: 9080, targetPort: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: mesh}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 80}
  rules:
  - matches:
    - headers: [{name: end-user, value: jason}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 4}
    - {name: reviews-v2, port: 9080, weight: 1}
"#;

#[test]
fn a_gateway_api_httproute_on_a_service_routes_requests() -> Result<()> {
    let _turn = serial();
    let (c, _servers) = reviews_cluster(&[])?;
    c.write_config_file("reviews.yaml", HTTP_ROUTE_YAML)?;
    wait_all(&c, &["end-user:jason"], "/", "v2", 10)?;
    let n = 2000;
    let r = get(&c, n, &[], "/")?;
    ensure!(r.status("200") == n, "not all 200: {r:?}");
    let (v1, v2) = (r.body("v1"), r.body("v2"));
    ensure!(v1 + v2 == n, "other bodies: {r:?}");
    let share = 100.0 * v1 as f64 / n as f64;
    eprintln!("HTTPRoute split over {n} requests: v1 {v1} ({share:.1}%), v2 {v2}");
    ensure!(
        (77.0..=83.0).contains(&share),
        "v1 got {share:.1}% of {n} requests, wanted 80 ± 3: {r:?}"
    );
    Ok(())
}
