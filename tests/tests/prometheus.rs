//! A real Prometheus (Debian's `prometheus`, installed by `cargo xtask setup`) scrapes the
//! node proxies' metrics (`<node ip>:15020/metrics`) of a mesh-mode cluster, and PromQL
//! queries see exactly the connections and bytes of traffic the test generated, with Istio's
//! labels and the `instance`/`node` of the proxy that reported them; then every query of the
//! Grafana dashboard `deploy/grafana/sidenode-dashboard.json` is run against it (accepted, and
//! returning data after the traffic), which guards the dashboard against typos in metric and
//! label names. Run as root: `cargo test -p sidenode-tests --test prometheus`.
//!
//! Prometheus runs in the cluster's fabric namespace (`<prefix>-net`, which routes to every
//! node), listening on that namespace's loopback; its config and data live in a temporary
//! folder removed on drop, also when the test fails.

mod common;

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::*;
use serde_json::Value;
use sidenode_tests::cluster::{Cluster, netns_path};
use sidenode_tests::workload::{Server, Session, dial, mesh_node_path};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Meshed client on node 1 whose traffic is counted exactly.
const CLIENT: &str = "node1-pod1";
/// Meshed client on node 1 for everything else (HTTP, refused connections), so that the
/// exact counts of [`CLIENT`] stay exact.
const OTHER: &str = "node1-pod2";
/// Meshed TCP echo server on node 2 (ports 8080, 9090, 7070), behind the Service `echo`
/// (selector `app: node2-pod1`: the cluster labels each pod `app: <pod name>`).
const SERVER_POD: &str = "node2-pod1";
const SERVER_IP: &str = "198.19.2.2";
/// Meshed HTTP server on node 2 (port 9080), behind the Service `web`.
const WEB_POD: &str = "node2-pod2";
const ECHO_VIP: &str = "198.18.128.50:80";
const ECHO_HOST: &str = "echo.mesh.svc.cluster.local";
const WEB_URL: &str = "http://198.18.128.51:80";
/// The scrape job.
const JOB: &str = "sidenode-proxy";
const SESSIONS: usize = 4;
const LINES: [&str; 3] = ["first line", "a second, longer line of the session", "3"];
/// How long a query may take to show what was generated (scrapes are every second).
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: mesh
spec:
  clusterIP: 198.18.128.50
  selector:
    app: node2-pod1
  ports:
  - name: tcp-echo
    port: 80
    targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: mesh
spec:
  clusterIP: 198.18.128.51
  selector:
    app: node2-pod2
  ports:
  - name: http
    port: 80
    targetPort: 9080
"#;

/// Port 9090 of the echo server is denied; port 7070 takes one connection an hour.
const POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-9090
  namespace: mesh
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["9090"]
---
apiVersion: sidenode.io/v1alpha1
kind: RateLimitPolicy
metadata:
  name: one-conn
  namespace: mesh
spec:
  connections:
    ports: [7070]
    tokenBucket: {maxTokens: 1, fillInterval: 1h}
"#;

// ------------------------------------------------------------------------------ Prometheus

/// A folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `prometheus` running in the cluster's fabric namespace on `127.0.0.1:<port>`; killed,
/// and its folder removed, on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Then `dir` (a field) removes the config and the TSDB.
    }
}

/// A free TCP port on the loopback of `netns` (a thread enters it, binds port 0, ends).
fn free_port_in(netns: &str) -> Result<u16> {
    use std::os::fd::AsRawFd;
    let path = netns_path(netns);
    std::thread::spawn(move || -> Result<u16> {
        let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a valid namespace descriptor changes only this thread's network
        // namespace; the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the fabric netns");
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        Ok(l.local_addr().context("local_addr")?.port())
    })
    .join()
    .map_err(|_| anyhow!("the port-finding thread panicked"))?
}

/// The scrape config: job [`JOB`], every second, each node proxy's metrics address with a
/// `node` label.
fn scrape_config(c: &Cluster) -> String {
    let mut s = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    static_configs:\n"
    );
    for n in &c.status().nodes {
        s.push_str(&format!(
            "      - targets: ['{}:15020']\n        labels:\n          node: {}\n",
            n.ip, n.name
        ));
    }
    s
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One sample of an instant query: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

impl Prometheus {
    fn start(c: &Cluster) -> Result<Prometheus> {
        let fabric = c.fabric_netns();
        // The fabric namespace's loopback is down unless something brought it up.
        run_ok(Command::new("ip").args(["-n", &fabric, "link", "set", "lo", "up"]))?;
        let port = free_port_in(&fabric)?;
        let dir =
            TempDir(std::env::temp_dir().join(format!("sidenode-prometheus-{}", c.opts.prefix)));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(dir.0.join("data"))
            .with_context(|| format!("creating {}", dir.0.display()))?;
        let config = dir.0.join("prometheus.yml");
        std::fs::write(&config, scrape_config(c))
            .with_context(|| format!("writing {}", config.display()))?;
        run_ok(
            Command::new("promtool")
                .arg("check")
                .arg("config")
                .arg(&config),
        )?;
        let log_path = dir.0.join("prometheus.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let addr = format!("127.0.0.1:{port}");
        let child = c
            .fabric_command("prometheus")?
            .current_dir(&dir.0)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg("--storage.tsdb.retention.time=1h")
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (installed by `cargo xtask setup`)")?;
        let mut p = Prometheus { child, addr, dir };
        let ready = wait_until(Duration::from_secs(20), || {
            if let Some(st) = p.child.try_wait().context("waiting for prometheus")? {
                bail!("prometheus exited ({st}):\n{}", p.log_tail());
            }
            let st = c
                .fabric_command("curl")?
                .args(["-sf", "-o", "/dev/null", "--max-time", "2"])
                .arg(format!("http://{}/-/ready", p.addr))
                .status()
                .context("running curl")?;
            Ok(st.success())
        })?;
        ensure!(ready, "prometheus not ready within 20 s:\n{}", p.log_tail());
        Ok(p)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `GET /api/v1/query?query=EXPR` from inside the fabric namespace: the whole answer.
    fn query(&self, c: &Cluster, expr: &str) -> Result<Value> {
        let out = run_ok(
            c.fabric_command("curl")?
                .args(["-sS", "--max-time", "5", "-G", "--data-urlencode"])
                .arg(format!("query={expr}"))
                .arg(format!("http://{}/api/v1/query", self.addr)),
        )?;
        serde_json::from_str(&out).with_context(|| format!("parsing the answer to {expr}: {out}"))
    }

    /// An instant query that must succeed: its samples (a scalar is one unlabelled sample).
    fn samples(&self, c: &Cluster, expr: &str) -> Result<Vec<Sample>> {
        let v = self.query(c, expr)?;
        ensure!(
            v["status"] == "success",
            "query {expr} refused: {} {}",
            v["errorType"],
            v["error"]
        );
        let value = |x: &Value| -> Result<f64> {
            x[1].as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .with_context(|| format!("bad value in {v}"))
        };
        match v["data"]["resultType"].as_str() {
            Some("vector") => v["data"]["result"]
                .as_array()
                .context("no result")?
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .context("no metric")?
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect();
                    Ok((labels, value(&r["value"])?))
                })
                .collect(),
            Some("scalar") => Ok(vec![(BTreeMap::new(), value(&v["data"]["result"])?)]),
            other => bail!("query {expr}: unexpected result type {other:?}: {v}"),
        }
    }

    /// The value of a query that gives at most one sample (`None`: no sample).
    fn value(&self, c: &Cluster, expr: &str) -> Result<Option<f64>> {
        let s = self.samples(c, expr)?;
        ensure!(s.len() <= 1, "query {expr} gave several samples: {s:?}");
        Ok(s.first().map(|(_, v)| *v))
    }

    /// Waits until every query's value is exactly what is wanted.
    fn wait_values(&self, c: &Cluster, want: &[(String, f64)]) -> Result<()> {
        let mut last = Vec::new();
        let ok = wait_until(QUERY_TIMEOUT, || {
            last.clear();
            for (expr, w) in want {
                let got = self.value(c, expr)?;
                if got != Some(*w) {
                    last.push(format!("{expr} = {got:?}, want {w}"));
                }
            }
            Ok(last.is_empty())
        })?;
        ensure!(
            ok,
            "after {QUERY_TIMEOUT:?}:\n{}\nprometheus log:\n{}",
            last.join("\n"),
            self.log_tail()
        );
        Ok(())
    }
}

// ------------------------------------------------------------------------------ the mesh

/// Both Services have a ready endpoint in node 1's proxy (its admin API), so connections to
/// their addresses are routed; no traffic is sent to find out.
fn services_ready(c: &Cluster) -> Result<bool> {
    let out = c
        .node_command("node1", mesh_node_path())?
        .args(["config", "services", "--json"])
        .output()
        .context("running mesh-node config services")?;
    if !out.status.success() {
        return Ok(false);
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let ready = |name: &str| {
        v.as_array().into_iter().flatten().any(|s| {
            s["namespace"] == "mesh"
                && s["name"] == name
                && s["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["ready"] == true)
        })
    };
    Ok(ready("echo") && ready("web"))
}

/// Opens [`SESSIONS`] sessions from [`CLIENT`] to the `echo` Service, echoes [`LINES`] on
/// each and closes it: (bytes the client sent, bytes the server sent).
fn echo_sessions(c: &Cluster) -> Result<(u64, u64)> {
    let (mut client_bytes, mut server_bytes) = (0u64, 0u64);
    for i in 0..SESSIONS {
        let mut s = Session::open(c, &testpod(), CLIENT, ECHO_VIP)?;
        ensure!(
            s.server_local == format!("{SERVER_IP}:8080"),
            "session {i} did not reach the echo pod through the Service: {}",
            s.hello
        );
        // What testpod's `handle` writes first.
        let hello = format!("HELLO local={} peer={}\n", s.server_local, s.server_peer);
        ensure!(
            s.hello.starts_with(hello.trim_end()),
            "HELLO {:?} is not {hello:?}",
            s.hello
        );
        server_bytes += hello.len() as u64;
        for l in LINES {
            let line = format!("{l} #{i}");
            let echo = s.echo(&line)?;
            ensure!(echo == line, "echo of {line:?} was {echo:?}");
            // `testpod session` sends the line and a newline; the server echoes both.
            client_bytes += line.len() as u64 + 1;
            server_bytes += line.len() as u64 + 1;
        }
        s.close()?;
    }
    Ok((client_bytes, server_bytes))
}

/// HTTP requests through the `web` Service, a denied connection and rate-limited ones, all
/// from [`OTHER`], so that every panel of the dashboard has data.
fn other_traffic(c: &Cluster) -> Result<()> {
    let r = http_get(c, OTHER, WEB_URL, "GET", "/", &[], 5)?;
    ensure!(r.status("200") == 5, "GET through the web Service: {r:?}");
    c.write_config_file("policies.yaml", POLICIES)?;
    let denied = format!("{SERVER_IP}:9090");
    let in_force = wait_until(Duration::from_secs(15), || {
        let r = dial(c, &testpod(), OTHER, std::slice::from_ref(&denied), 1, 1, 0)?;
        Ok(!r.iter().any(|r| r.echo_ok))
    })?;
    ensure!(in_force, "the DENY of port 9090 never refused a connection");
    // Same file, same update: the one-token bucket of port 7070 is in force too.
    let limited = format!("{SERVER_IP}:7070");
    let r = dial(c, &testpod(), OTHER, &[limited], 3, 3, 0)?;
    let ok = r.iter().filter(|r| r.echo_ok).count();
    ensure!(ok == 1, "3 connections against a bucket of 1: {ok} passed");
    Ok(())
}

fn labels_of(s: &Sample) -> BTreeMap<&str, &str> {
    s.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn prometheus_sees_the_mesh_traffic_and_runs_every_dashboard_query() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster(3, None)?;
    c.write_config_file("services.yaml", SERVICES)?;
    let _echo = Server::start(&c, &testpod(), SERVER_POD, &[8080, 9090, 7070])?;
    let _web = HttpServer::start(&c, WEB_POD, "web", &[])?;
    for pod in [CLIENT, OTHER] {
        wait_enrolled(&c, "node1", "mesh", pod)?;
    }
    for pod in [SERVER_POD, WEB_POD] {
        wait_enrolled(&c, "node2", "mesh", pod)?;
        wait_hbone_listener(&c, pod)?;
    }
    ensure!(
        wait_until(Duration::from_secs(15), || services_ready(&c))?,
        "the Services echo and web have no ready endpoint on node1 within 15 s"
    );
    let prom = Prometheus::start(&c)?;

    // Every node proxy is a target, up.
    let node_ips: BTreeMap<String, String> = c
        .status()
        .nodes
        .iter()
        .map(|n| (n.name.clone(), format!("{}:15020", n.ip)))
        .collect();
    let up_query = format!("up{{job=\"{JOB}\"}}");
    let mut up = Vec::new();
    let all_up = wait_until(QUERY_TIMEOUT, || {
        up = prom.samples(&c, &up_query)?;
        Ok(up.len() == node_ips.len() && up.iter().all(|s| s.1 == 1.0))
    })?;
    ensure!(all_up, "{up_query}: {up:?}\n{}", prom.log_tail());
    let seen: BTreeMap<String, String> = up
        .iter()
        .map(|s| {
            let l = labels_of(s);
            (
                l.get("node").copied().unwrap_or_default().to_string(),
                l.get("instance").copied().unwrap_or_default().to_string(),
            )
        })
        .collect();
    ensure!(
        seen == node_ips,
        "up: node → instance {seen:?}, want {node_ips:?}"
    );
    eprintln!("{up_query}: {up:?}");

    // The traffic.
    let (client_bytes, server_bytes) = echo_sessions(&c)?;
    eprintln!(
        "{SESSIONS} sessions: client sent {client_bytes} bytes, server sent {server_bytes} bytes"
    );
    other_traffic(&c)?;

    // Exact counts, from both proxies' points of view.
    let n = SESSIONS as f64;
    let src = format!(
        "reporter=\"source\",source_workload=\"{CLIENT}\",destination_workload=\"{SERVER_POD}\""
    );
    let dst = format!(
        "reporter=\"destination\",source_workload=\"{CLIENT}\",destination_workload=\"{SERVER_POD}\""
    );
    let dst_svc = format!(
        "reporter=\"destination\",destination_service=\"{ECHO_HOST}\",connection_security_policy=\"mutual_tls\""
    );
    let src_svc = format!(
        "reporter=\"source\",source_workload=\"{CLIENT}\",destination_service=\"{ECHO_HOST}\",connection_security_policy=\"mutual_tls\""
    );
    let want: Vec<(String, f64)> = vec![
        (
            format!("sum(istio_tcp_connections_opened_total{{{src}}})"),
            n,
        ),
        (
            format!("sum(istio_tcp_connections_closed_total{{{src}}})"),
            n,
        ),
        (
            format!("sum(istio_tcp_connections_opened_total{{{dst}}})"),
            n,
        ),
        (
            format!("sum(istio_tcp_connections_closed_total{{{dst}}})"),
            n,
        ),
        (
            format!("sum(istio_tcp_received_bytes_total{{{dst_svc}}})"),
            client_bytes as f64,
        ),
        (
            format!("sum(istio_tcp_sent_bytes_total{{{dst_svc}}})"),
            server_bytes as f64,
        ),
        (
            format!("sum(istio_tcp_received_bytes_total{{{src_svc}}})"),
            client_bytes as f64,
        ),
        (
            format!("sum(istio_tcp_sent_bytes_total{{{src_svc}}})"),
            server_bytes as f64,
        ),
    ];
    prom.wait_values(&c, &want)?;
    for (expr, w) in &want {
        eprintln!("{expr} = {w}");
    }

    // Which proxy reported: the source's counts are node 1's, the destination's node 2's.
    for (sel, node) in [(&src, "node1"), (&dst, "node2")] {
        let expr = format!("sum by (instance, node) (istio_tcp_connections_opened_total{{{sel}}})");
        let s = prom.samples(&c, &expr)?;
        let want_labels: BTreeMap<&str, &str> =
            [("instance", node_ips[node].as_str()), ("node", node)].into();
        ensure!(
            s.len() == 1 && labels_of(&s[0]) == want_labels && s[0].1 == n,
            "{expr}: {s:?}, want one sample {want_labels:?} = {n}"
        );
        eprintln!("{expr}: {s:?}");
    }

    // Istio's labels on the series, as each reporter has them.
    for (reporter, node) in [("source", "node1"), ("destination", "node2")] {
        let expr = format!(
            "istio_tcp_connections_opened_total{{reporter=\"{reporter}\",destination_service=\"{ECHO_HOST}\"}}"
        );
        let s = prom.samples(&c, &expr)?;
        ensure!(s.len() == 1, "{expr}: want one series, got {s:?}");
        let l = labels_of(&s[0]);
        let expected: [(&str, &str); 21] = [
            ("job", JOB),
            ("instance", node_ips[node].as_str()),
            ("node", node),
            ("reporter", reporter),
            ("source_workload", CLIENT),
            ("source_workload_namespace", "mesh"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1",
            ),
            ("source_cluster", "Kubernetes"),
            ("destination_workload", SERVER_POD),
            ("destination_workload_namespace", "mesh"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1",
            ),
            ("destination_app", SERVER_POD),
            ("destination_canonical_service", SERVER_POD),
            ("destination_service", ECHO_HOST),
            ("destination_service_name", "echo"),
            ("destination_service_namespace", "mesh"),
            ("destination_cluster", "Kubernetes"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
            ("source_canonical_service", CLIENT),
        ];
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(k, v)| l.get(k) != Some(v))
            .map(|(k, v)| format!("{k}={:?} (want {v:?})", l.get(k)))
            .collect();
        ensure!(wrong.is_empty(), "{expr}: {wrong:?} in {l:?}");
    }

    every_exported_metric_has_a_panel(&c)?;
    check_dashboard_queries(&c, &prom)
}

/// Every `istio_*`/`sidenode_*` family the node proxies export now (read from their live
/// `/metrics` after the traffic, so a new metric is checked without this test naming it) is
/// queried by some panel (a histogram through its `_bucket`, `_sum` or `_count`).
fn every_exported_metric_has_a_panel(c: &Cluster) -> Result<()> {
    let queried: BTreeSet<String> = exprs(&dashboard()?)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    let mut exported = BTreeMap::new();
    for node in ["node1", "node2"] {
        for line in proxy_metrics(c, node)?.lines() {
            let mut w = line
                .strip_prefix("# TYPE ")
                .unwrap_or("")
                .split_whitespace();
            if let (Some(name), Some(kind)) = (w.next(), w.next())
                && (name.starts_with("istio_") || name.starts_with("sidenode_"))
            {
                exported.insert(name.to_string(), kind.to_string());
            }
        }
    }
    ensure!(
        exported.contains_key("istio_tcp_connections_opened_total")
            && exported.contains_key("sidenode_capture_events_total"),
        "the proxies' /metrics lack the families the traffic made: {exported:?}"
    );
    let missing: Vec<&String> = exported
        .iter()
        .filter(|(name, kind)| {
            !(queried.contains(*name)
                || kind.as_str() == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| queried.contains(&format!("{name}{s}"))))
        })
        .map(|(name, _)| name)
        .collect();
    eprintln!(
        "{} exported families, each on a panel: {:?}",
        exported.len(),
        exported.keys().collect::<Vec<_>>()
    );
    ensure!(
        missing.is_empty(),
        "exported by the proxies but queried by no panel: {missing:?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ dashboard

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/sidenode-dashboard.json")
}

fn dashboard() -> Result<Value> {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// (panel title, expr) of every query target.
fn exprs(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
}

/// What each template variable stands for in a test query: a query variable its "All"
/// value (`.*`), a custom or constant one its current value; Grafana's interval variables a
/// minute (much more than 4 scrapes of 1 s).
fn substitutions(d: &Value) -> Result<Vec<(String, String)>> {
    let mut subs = vec![
        ("__rate_interval".to_string(), "1m".to_string()),
        ("__interval".to_string(), "1m".to_string()),
        ("__range".to_string(), "5m".to_string()),
    ];
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().context("a variable without a name")?;
        let value = match v["type"].as_str() {
            Some("datasource") => continue,
            Some("query") => v["allValue"].as_str().unwrap_or(".*").to_string(),
            _ => match &v["current"]["value"] {
                Value::String(s) => s.clone(),
                other => bail!("variable {name}: no single current value: {other}"),
            },
        };
        subs.push((name.to_string(), value));
    }
    // Longer names first, so `$node` never eats the start of `$nodes`.
    subs.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    Ok(subs)
}

fn substitute(expr: &str, subs: &[(String, String)]) -> String {
    let mut e = expr.to_string();
    for (k, v) in subs {
        e = e
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    e
}

/// The metric names an expression uses (`istio_*`, `sidenode_*`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in expr.match_indices(['i', 's']) {
        let rest = &expr[i..];
        let before_ok = i == 0
            || !expr[..i]
                .chars()
                .next_back()
                .is_some_and(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if before_ok && (rest.starts_with("istio_") || rest.starts_with("sidenode_")) {
            let name: String = rest
                .chars()
                .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

/// Every dashboard query is accepted by Prometheus and, after the traffic, returns data;
/// every query variable's `label_values(...)` lists the cluster's namespace, workloads and
/// nodes.
fn check_dashboard_queries(c: &Cluster, prom: &Prometheus) -> Result<()> {
    let d = dashboard()?;
    let subs = substitutions(&d)?;
    let all = exprs(&d);
    ensure!(!all.is_empty(), "the dashboard has no queries");
    let mut empty = Vec::new();
    let ok = wait_until(QUERY_TIMEOUT, || {
        empty.clear();
        for (title, expr) in &all {
            let q = substitute(expr, &subs);
            ensure!(!q.contains('$'), "panel {title:?}: unknown variable in {q}");
            // A query Prometheus refuses fails at once (samples() checks the status).
            let s = prom
                .samples(c, &q)
                .with_context(|| format!("panel {title:?}"))?;
            if s.is_empty() {
                empty.push(format!("{title}: {q}"));
            }
        }
        Ok(empty.is_empty())
    })?;
    ensure!(
        ok,
        "dashboard queries without data after {QUERY_TIMEOUT:?}:\n{}",
        empty.join("\n")
    );
    eprintln!("dashboard: {} queries accepted, each with data", all.len());

    let expected: BTreeMap<&str, Vec<&str>> = [
        ("namespace", vec!["mesh"]),
        ("workload", vec![SERVER_POD, WEB_POD]),
        ("node", vec!["node1", "node2"]),
    ]
    .into();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or_default();
        let def = v["definition"].as_str().unwrap_or_default();
        let (selector, label) = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .with_context(|| {
                format!("variable {name}: not label_values(SELECTOR, LABEL): {def}")
            })?;
        let q = substitute(
            &format!("count by ({}) ({})", label.trim(), selector.trim()),
            &subs,
        );
        let values: BTreeSet<String> = prom
            .samples(c, &q)
            .with_context(|| format!("variable {name}"))?
            .iter()
            .filter_map(|s| s.0.get(label.trim()).cloned())
            .collect();
        for want in expected.get(name).into_iter().flatten() {
            ensure!(
                values.contains(*want),
                "variable {name} ({q}): {values:?} lacks {want}"
            );
        }
        eprintln!("variable {name}: {values:?}");
    }
    Ok(())
}

/// The dashboard's shape, without a cluster: Grafana's JSON model with the data source as a
/// variable, the namespace/workload/node variables, unique panel ids, a query per panel on
/// that data source, and a panel for each of these metrics (some appear in `/metrics` only
/// after events the live test does not cause, e.g. a rate limit; the live test checks every
/// family the proxies do export).
#[test]
fn dashboard_json_is_well_formed() -> Result<()> {
    let d = dashboard()?;
    ensure!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    ensure!(d["uid"].is_string() && d["title"].is_string(), "uid/title");
    let vars = d["templating"]["list"]
        .as_array()
        .context("templating.list")?;
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").context("no datasource variable")?;
    ensure!(
        ds["type"] == "datasource" && ds["query"] == "prometheus",
        "datasource variable: {ds}"
    );
    for name in ["namespace", "workload", "node"] {
        let v = var(name).with_context(|| format!("no {name} variable"))?;
        ensure!(
            v["type"] == "query"
                && v["datasource"]["uid"] == "${datasource}"
                && v["definition"]
                    .as_str()
                    .is_some_and(|q| q.starts_with("label_values(")),
            "variable {name}: {v}"
        );
    }
    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        let id = p["id"]
            .as_u64()
            .with_context(|| format!("panel {title:?}: no id"))?;
        ensure!(ids.insert(id), "panel id {id} used twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        ensure!(x + w <= 24, "panel {title:?}: gridPos {g}");
        if p["type"] == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "panel {title:?}: datasource {}",
            p["datasource"]
        );
        let targets = p["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?}: no expr"))?;
            ensure!(
                t["datasource"]["uid"] == "${datasource}",
                "panel {title:?}: target datasource {}",
                t["datasource"]
            );
            names.extend(metric_names(expr));
        }
    }
    for m in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "sidenode_hbone_refused_total",
        "sidenode_authz_denied_total",
        "sidenode_rate_limited_total",
        "sidenode_capture_events_total",
        "sidenode_certificate_expiration_timestamp_seconds",
        "sidenode_state_lag_seconds",
        "sidenode_state_version",
        "sidenode_hbone_pool_connections",
        "sidenode_open_connections",
        "sidenode_state_updates_total",
        "sidenode_state_connected",
        "sidenode_enrolled_netns",
        "sidenode_rate_limit_buckets",
    ] {
        ensure!(
            names.contains(m),
            "no panel queries {m}; the dashboard has {names:?}"
        );
    }
    Ok(())
}
