//! End-to-end tests of the node proxy's admin API (`127.0.0.1:15000`) and the CLI views built
//! on it (`mesh-node config`, `mesh-node log-level`): the views say exactly what the
//! configuration says (workloads, services, policies), the certificates are the node's
//! workload identities with a future expiry, an open connection is listed with its workloads,
//! `/config_dump` carries no key material, the log filter changes at run time (and a bad one
//! is refused while the old one stays), and the port is reachable from the node's loopback
//! only. Mesh mode (controller, HBONE), file config. Run as root:
//! `cargo test -p sidenode-tests --test admin`. One cluster at a time, torn down on drop.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::Value;
use sidenode_tests::cluster::{Cluster, TestCluster};
use sidenode_tests::workload::{Server, Session, mesh_node_path};
use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

/// Meshed client on node 1 (namespace `mesh`).
const CLIENT: &str = "node1-pod1";
/// Meshed echo server on node 2 (port 8080), behind the Service `echo`.
const SERVER_POD: &str = "node2-pod1";
const OTHER_NODE2_POD: &str = "node2-pod2";
const VIP: &str = "198.18.128.40";
const ADMIN: &str = "http://127.0.0.1:15000";

/// A Service, an AuthorizationPolicy and a RateLimitPolicy, all in namespace `mesh`.
const CONFIG: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: mesh
spec:
  clusterIP: 198.18.128.40
  selector:
    app: node2-pod1
  ports:
  - name: tcp-echo
    port: 80
    targetPort: 8080
  - name: http-web
    port: 9080
    targetPort: 9080
    appProtocol: http
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-mesh
  namespace: mesh
spec:
  selector:
    matchLabels:
      app: node2-pod1
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["mesh"]
---
apiVersion: sidenode.io/v1alpha1
kind: RateLimitPolicy
metadata:
  name: limits
  namespace: mesh
spec:
  connections:
    ports: [8080]
    tokenBucket: {maxTokens: 1000, tokensPerFill: 500, fillInterval: 1s}
"#;

/// `mesh-node ARGS` run in the node's network namespace.
fn mesh_node(c: &Cluster, node: &str, args: &[&str]) -> Result<Output> {
    c.node_command(node, mesh_node_path())?
        .args(args)
        .output()
        .with_context(|| format!("running mesh-node {args:?} on {node}"))
}

/// `mesh-node config VIEW --json` on `node`, parsed.
fn view_json(c: &Cluster, node: &str, view: &str) -> Result<Value> {
    let out = mesh_node(c, node, &["config", view, "--json"])?;
    if !out.status.success() {
        bail!(
            "mesh-node config {view} --json on {node} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing mesh-node config {view} --json: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `mesh-node config VIEW` (a table) on `node`.
fn view_text(c: &Cluster, node: &str, view: &str) -> Result<String> {
    let out = mesh_node(c, node, &["config", view])?;
    ensure!(
        out.status.success(),
        "mesh-node config {view} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `curl` in the node's netns: (HTTP status, body). A curl failure (no connection, no
/// answer) is an error: see [`curl_refused`] for the "must not connect" checks.
fn curl(c: &Cluster, node: &str, method: &str, url: &str) -> Result<(u16, String)> {
    let out = curl_output(c.node_command(node, "curl")?, method, url)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "curl {method} {url} from {node} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (body, code) = text
        .rsplit_once('\n')
        .with_context(|| format!("curl {url}: no status line in {text:?}"))?;
    let code = code
        .trim()
        .parse()
        .with_context(|| format!("curl {url}: status {code:?}"))?;
    Ok((code, body.to_string()))
}

/// curl's exit code for "Failed to connect to host" (the port refused the connection).
const CURL_COULDNT_CONNECT: i32 = 7;

/// `curl` run by `cmd` (in a node's or a pod's netns) must fail to connect to `url`: exit code
/// 7, i.e. the connection was refused. A timeout (28) or an HTTP answer of any status fails
/// the check, so an unreachable network cannot pass for a closed port.
fn curl_refused(cmd: std::process::Command, url: &str) -> Result<()> {
    let out = curl_output(cmd, "GET", url)?;
    ensure!(
        out.status.code() == Some(CURL_COULDNT_CONNECT),
        "{url}: expected curl to be refused (exit {CURL_COULDNT_CONNECT}), got {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn curl_output(mut cmd: std::process::Command, method: &str, url: &str) -> Result<Output> {
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ])
    .arg(url)
    .output()
    .context("running curl")
}

/// (namespace, name, node, addresses, service account, identity, meshed).
type WorkloadRow = (
    String,
    String,
    String,
    BTreeSet<String>,
    String,
    String,
    bool,
);

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A mesh cluster (3 pods per node) with the echo server on node2-pod1, the configuration
/// written and seen by node 2's proxy.
fn admin_cluster() -> Result<(TestCluster, Server)> {
    let c = mesh_cluster(3, None)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    wait_hbone_listener(&c, OTHER_NODE2_POD)?;
    c.write_config_file("admin.yaml", CONFIG)?;
    for node in ["node1", "node2"] {
        let mut last = Value::Null;
        let seen = wait_until(Duration::from_secs(15), || {
            last = view_json(&c, node, "policies")?;
            Ok(last.as_array().is_some_and(|a| a.len() == 2))
        })?;
        ensure!(seen, "{node}: the two policies never showed up: {last}");
    }
    Ok((c, srv))
}

#[test]
fn config_views_say_what_the_configuration_says() -> Result<()> {
    let _g = serial();
    let (c, _srv) = admin_cluster()?;

    // Workloads: every pod of the cluster, exactly, with its addresses and identity.
    let workloads = view_json(&c, "node2", "workloads")?;
    let got: BTreeSet<WorkloadRow> = workloads
        .as_array()
        .context("workloads is not a list")?
        .iter()
        .map(|w| {
            (
                str_of(w, "namespace").to_string(),
                str_of(w, "name").to_string(),
                str_of(w, "node").to_string(),
                strings(&w["ips"]),
                str_of(w, "service_account").to_string(),
                str_of(w, "identity").to_string(),
                w["meshed"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let want: BTreeSet<WorkloadRow> = c
        .status()
        .pods
        .iter()
        .map(|p| {
            let mut ips: BTreeSet<String> = [p.ip.clone()].into();
            if !p.ip6.is_empty() {
                ips.insert(p.ip6.clone());
            }
            (
                p.namespace.clone(),
                p.name.clone(),
                p.node.clone(),
                ips,
                format!("sa-{}", p.name),
                format!("spiffe://cluster.local/ns/{}/sa/sa-{}", p.namespace, p.name),
                p.namespace == "mesh",
            )
        })
        .collect();
    ensure!(
        got == want,
        "workloads differ from the cluster's pods:\n got {got:#?}\nwant {want:#?}"
    );

    // Services: the one Service, its ports and its one endpoint.
    let services = view_json(&c, "node2", "services")?;
    let list = services.as_array().context("services is not a list")?;
    ensure!(list.len() == 1, "want one service: {services}");
    let s = &list[0];
    ensure!(
        (
            str_of(s, "namespace"),
            str_of(s, "name"),
            str_of(s, "cluster_ip")
        ) == ("mesh", "echo", VIP),
        "service: {s}"
    );
    ensure!(
        s["selector"] == serde_json::json!({"app": SERVER_POD}),
        "selector: {s}"
    );
    let ports: Vec<(String, u64, u64, String)> = s["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .map(|p| {
            (
                str_of(p, "name").to_string(),
                p["port"].as_u64().unwrap_or(0),
                p["target_port"].as_u64().unwrap_or(0),
                str_of(p, "app_protocol").to_string(),
            )
        })
        .collect();
    ensure!(
        ports
            == [
                ("tcp-echo".to_string(), 80, 8080, String::new()),
                ("http-web".to_string(), 9080, 9080, "http".to_string())
            ],
        "ports: {s}"
    );
    let server_ip = c.pod(SERVER_POD)?.ip.clone();
    let eps = s["endpoints"].as_array().context("endpoints")?;
    ensure!(
        eps.len() == 1
            && str_of(&eps[0], "workload") == format!("mesh/{SERVER_POD}")
            && str_of(&eps[0], "node") == "node2"
            && strings(&eps[0]["ips"]).contains(&server_ip)
            && eps[0]["ready"] == true,
        "endpoints: {s}"
    );

    // Policies: both objects, with their specs as written.
    let policies = view_json(&c, "node2", "policies")?;
    let by_kind = |kind: &str| -> Result<Value> {
        policies
            .as_array()
            .and_then(|a| a.iter().find(|p| str_of(p, "kind") == kind))
            .cloned()
            .with_context(|| format!("no {kind} in {policies}"))
    };
    let ap = by_kind("AuthorizationPolicy")?;
    ensure!(
        (str_of(&ap, "namespace"), str_of(&ap, "name")) == ("mesh", "allow-mesh")
            && ap["spec"]["action"] == "ALLOW"
            && ap["spec"]["selector"]["matchLabels"]["app"] == SERVER_POD
            && ap["spec"]["rules"][0]["from"][0]["source"]["namespaces"]
                == serde_json::json!(["mesh"]),
        "AuthorizationPolicy: {ap}"
    );
    let rl = by_kind("RateLimitPolicy")?;
    let bucket = &rl["spec"]["connections"]["tokenBucket"];
    ensure!(
        (str_of(&rl, "namespace"), str_of(&rl, "name")) == ("mesh", "limits")
            && rl["spec"]["connections"]["ports"] == serde_json::json!([8080])
            && bucket["maxTokens"] == 1000
            && bucket["tokensPerFill"] == 500
            && bucket["fillInterval"] == "1s",
        "RateLimitPolicy: {rl}"
    );
    let table = view_text(&c, "node2", "policies")?;
    for needle in [
        "KIND",
        "AuthorizationPolicy",
        "allow-mesh",
        "ALLOW, 1 rule; selector app=node2-pod1",
        "RateLimitPolicy",
        "connections 500/1s max 1000 on ports 8080",
    ] {
        ensure!(table.contains(needle), "no {needle:?} in:\n{table}");
    }

    // Certificates: node 2's meshed workloads' identities, valid for a while yet.
    let certs = view_json(&c, "node2", "certificates")?;
    let ids: BTreeSet<String> = certs
        .as_array()
        .context("certificates")?
        .iter()
        .map(|c| str_of(c, "identity").to_string())
        .collect();
    let want_ids: BTreeSet<String> = [SERVER_POD, OTHER_NODE2_POD]
        .iter()
        .map(|p| format!("spiffe://cluster.local/ns/mesh/sa/sa-{p}"))
        .collect();
    ensure!(
        ids == want_ids,
        "certificate identities {ids:?}, want {want_ids:?}"
    );
    for cert in certs.as_array().context("certificates")? {
        ensure!(
            cert["expires_in_seconds"].as_i64().is_some_and(|s| s > 60)
                && !str_of(cert, "serial").is_empty()
                && str_of(cert, "not_after").ends_with('Z')
                && str_of(cert, "chain_pem").starts_with("-----BEGIN CERTIFICATE-----"),
            "certificate: {cert}"
        );
    }
    let table = view_text(&c, "node2", "certificates")?;
    ensure!(
        table.starts_with("IDENTITY") && table.contains("sa-node2-pod1"),
        "{table}"
    );
    let table = view_text(&c, "node2", "workloads")?;
    ensure!(
        table.starts_with("NAMESPACE") && table.contains(&server_ip),
        "{table}"
    );
    Ok(())
}

#[test]
fn connections_are_listed_with_their_workloads() -> Result<()> {
    let _g = serial();
    let (c, _srv) = admin_cluster()?;
    // Through the Service VIP: node 1 routes it to node2-pod1 over HBONE.
    let target = format!("{VIP}:80");
    let mut session = Session::open(&c, &testpod(), CLIENT, &target)?;
    ensure!(session.echo("hello")? == "hello", "echo");
    let find = |node: &str, reporter: &str| -> Result<Option<Value>> {
        let list = view_json(&c, node, "connections")?;
        Ok(list.as_array().and_then(|a| {
            a.iter()
                .find(|x| {
                    str_of(x, "reporter") == reporter
                        && str_of(x, "src_workload") == CLIENT
                        && str_of(x, "dst_workload") == SERVER_POD
                })
                .cloned()
        }))
    };
    for (node, reporter) in [("node2", "destination"), ("node1", "source")] {
        let mut found = None;
        wait_until(Duration::from_secs(5), || {
            found = find(node, reporter)?;
            Ok(found.is_some())
        })?;
        let conn = found.with_context(|| {
            format!(
                "{node}: no {reporter} connection {CLIENT} -> {SERVER_POD} in {}",
                view_json(&c, node, "connections").unwrap_or_default()
            )
        })?;
        ensure!(
            str_of(&conn, "src_namespace") == "mesh"
                && str_of(&conn, "dst_namespace") == "mesh"
                && str_of(&conn, "src_identity").ends_with("/ns/mesh/sa/sa-node1-pod1")
                && str_of(&conn, "dst_identity").ends_with("/ns/mesh/sa/sa-node2-pod1"),
            "{node}: {conn}"
        );
        if node == "node1" {
            ensure!(
                str_of(&conn, "dst_service").starts_with("echo.mesh"),
                "node1: the connection's service: {conn}"
            );
        }
        let table = view_text(&c, node, "connections")?;
        ensure!(
            table.starts_with("DIR") && table.contains(&format!("mesh/{CLIENT}")),
            "{node}:\n{table}"
        );
    }
    session.close()?;
    let gone = wait_until(Duration::from_secs(5), || {
        Ok(find("node2", "destination")?.is_none())
    })?;
    ensure!(gone, "the closed connection is still listed on node2");
    Ok(())
}

/// The hex of the private scalar of a PEM EC key (`openssl pkey -text`).
fn private_scalar_hex(pem_path: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-noout", "-text", "-in"])
        .arg(pem_path)
        .output()
        .context("running openssl pkey")?;
    ensure!(out.status.success(), "openssl pkey failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("priv:").context("no priv: in openssl output")? + 5;
    let end = text[start..].find("pub:").context("no pub:")? + start;
    let hex: String = text[start..end]
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    // openssl may print a leading 00 byte.
    Ok(hex.trim_start_matches("00").to_string())
}

#[test]
fn config_dump_has_no_key_material_and_the_port_is_loopback_only() -> Result<()> {
    let _g = serial();
    let (c, _srv) = admin_cluster()?;
    let (code, dump) = curl(&c, "node2", "GET", &format!("{ADMIN}/config_dump"))?;
    ensure!(code == 200, "/config_dump: {code} {dump}");
    let v: Value = serde_json::from_str(&dump).context("/config_dump is not JSON")?;
    ensure!(
        v["mode"] == "mesh" && v["node"] == "node2" && v["state_version"].as_u64() > Some(0),
        "{}",
        &dump[..dump.len().min(400)]
    );
    ensure!(!dump.contains("PRIVATE KEY"), "PRIVATE KEY in /config_dump");
    let begins = dump.matches("-----BEGIN ").count();
    let certs = dump.matches("-----BEGIN CERTIFICATE-----").count();
    ensure!(
        begins == certs && certs >= 2,
        "{begins} PEM blocks, {certs} of them certificates"
    );
    // The CA's private key (the only key on disk; workload keys live in the proxy's memory
    // only — the unit test `admin::config_dump` checks a real one's bytes): not one of its
    // PEM lines, nor its scalar in hex or as bytes.
    let key_path = c.controller_state_dir().join("ca-key.pem");
    let key_pem = std::fs::read_to_string(&key_path).context("reading the CA key")?;
    for line in key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 8)
    {
        ensure!(
            !dump.contains(line),
            "a line of the CA key's PEM is in /config_dump"
        );
    }
    let scalar = private_scalar_hex(&key_path)?;
    ensure!(scalar.len() >= 60, "scalar {scalar}");
    let lower = dump.to_ascii_lowercase();
    ensure!(
        !lower.contains(&scalar),
        "the CA key's scalar (hex) is in /config_dump"
    );
    let bytes: Vec<u8> = (0..scalar.len() / 2)
        .filter_map(|i| u8::from_str_radix(&scalar[2 * i..2 * i + 2], 16).ok())
        .collect();
    ensure!(
        !dump
            .as_bytes()
            .windows(bytes.len())
            .any(|w| w == bytes.as_slice()),
        "the CA key's scalar (bytes) is in /config_dump"
    );

    // Ready, and the index.
    let (code, body) = curl(&c, "node2", "GET", &format!("{ADMIN}/healthz/ready"))?;
    ensure!(
        code == 200 && body.trim() == "ready",
        "ready: {code} {body}"
    );
    let (code, body) = curl(&c, "node2", "GET", &format!("{ADMIN}/"))?;
    ensure!(
        code == 200 && body.contains("/config_dump"),
        "index: {code} {body}"
    );
    let (code, _) = curl(&c, "node2", "GET", &format!("{ADMIN}/nope"))?;
    ensure!(code == 404, "unknown path: {code}");

    // Loopback only: not from another node, not on the node's own address, not from a pod
    // (a pod's 127.0.0.1 is its own, so from a pod the node's address is the way in). Each is
    // a refused connection, while the proxy's metrics port on that same address answers from
    // each place: the network is there, the admin port is not.
    let node2_ip = c.node("node2")?.ip.clone();
    let admin_remote = format!("http://{node2_ip}:15000/config_dump");
    let metrics = format!("http://{node2_ip}:15020/metrics");
    for from in ["node1", "node2"] {
        let (code, _) = curl(&c, from, "GET", &metrics)?;
        ensure!(code == 200, "{metrics} from {from}: {code}");
        curl_refused(c.node_command(from, "curl")?, &admin_remote)
            .with_context(|| format!("the admin API from {from}"))?;
    }
    let out = curl_output(c.pod_command(OTHER_NODE2_POD, "curl")?, "GET", &metrics)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).ends_with("\n200"),
        "{metrics} from the pod {OTHER_NODE2_POD}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    curl_refused(c.pod_command(OTHER_NODE2_POD, "curl")?, &admin_remote)
        .context("the admin API from a pod")?;

    // A non-loopback --admin is refused at start, before anything else.
    let started = Instant::now();
    let mut child = c
        .node_command("node1", mesh_node_path())?
        .args(["proxy", "--node", "node1", "--proxy-ip", "127.0.0.1"])
        .args([
            "--bpffs",
            "/nonexistent-sidenode-bpffs",
            "--admin",
            "0.0.0.0:15999",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting mesh-node proxy")?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mesh-node proxy --admin 0.0.0.0:15999 did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    ensure!(
        !status.success() && stderr.contains("--admin-allow-remote"),
        "{status}: {stderr}"
    );

    // The CLI with no proxy to talk to: a clear error, non-zero.
    let out = mesh_node(
        &c,
        "node2",
        &["config", "workloads", "--admin", "127.0.0.1:1"],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("cannot reach the proxy's admin API"),
        "{}: {err}",
        out.status
    );
    Ok(())
}

/// Lines of the node's proxy log from byte `from` on.
fn log_since(c: &Cluster, node: &str, from: u64) -> String {
    let bytes = std::fs::read(c.log_path(node, "proxy")).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// `POST /logging?QUERY` on node 2: (status, body).
fn post_logging(c: &Cluster, query: &str) -> Result<(u16, Value)> {
    let (code, body) = curl(c, "node2", "POST", &format!("{ADMIN}/logging?{query}"))?;
    let v = serde_json::from_str(&body).with_context(|| format!("/logging answered {body}"))?;
    Ok((code, v))
}

#[test]
fn the_log_filter_changes_at_run_time() -> Result<()> {
    let _g = serial();
    let (c, _srv) = admin_cluster()?;
    let target = format!("{}:8080", c.pod(SERVER_POD)?.ip);
    let (code, v) = curl(&c, "node2", "GET", &format!("{ADMIN}/logging"))?;
    ensure!(code == 200, "GET /logging: {code} {v}");

    // Access lines are written (target `access`), then silenced by `access=off`.
    let offset = c.log_len("node2", "proxy");
    dial_one(&c, CLIENT, &target)?;
    wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &[" access: ", "connection complete"],
        Duration::from_secs(5),
    )?;
    let (code, v) = post_logging(&c, "filter=info,access=off")?;
    ensure!(
        code == 200 && v["filter"] == "info,access=off",
        "{code} {v}"
    );
    let off_at = c.log_len("node2", "proxy");
    let closed = || -> Result<f64> {
        Ok(metric_value(
            &proxy_metrics(&c, "node2")?,
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination")],
        ))
    };
    let closed_before = closed()?;
    for _ in 0..3 {
        dial_one(&c, CLIENT, &target)?;
    }
    // The positive marker: node2's proxy has finished all three connections (it counts a
    // connection closed just before it would write its access line), so their lines would
    // be in the log by now if access=off did not hold.
    ensure!(
        wait_until(Duration::from_secs(5), || Ok(
            closed()? >= closed_before + 3.0
        ))?,
        "node2's proxy did not finish the 3 connections: closed {closed_before} -> {}",
        closed()?
    );
    // Through the CLI: a level names everything (access lines come back).
    let out = mesh_node(&c, "node2", &["log-level", "info"])?;
    ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .contains("log filter: info (was: info,access=off)"),
        "log-level info: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let silent = log_since(&c, "node2", off_at);
    let until = silent
        .find("log filter changed through the admin API")
        .context("no `log filter changed` line")?;
    ensure!(
        !silent[..until].contains(" access: "),
        "access lines while access=off:\n{}",
        &silent[..until]
    );
    let on_at = c.log_len("node2", "proxy");
    dial_one(&c, CLIENT, &target)?;
    wait_log_all(
        &c,
        "node2",
        "proxy",
        on_at,
        &[" access: ", "connection complete"],
        Duration::from_secs(5),
    )?;

    // `mesh_node::admin=debug`: the admin API's own debug lines appear.
    let (code, v) = post_logging(&c, "filter=info%2Cmesh_node%3A%3Aadmin%3Ddebug")?;
    ensure!(
        code == 200 && v["filter"] == "info,mesh_node::admin=debug",
        "{code} {v}"
    );
    let debug_at = c.log_len("node2", "proxy");
    curl(&c, "node2", "GET", &format!("{ADMIN}/logging"))?;
    wait_log_all(
        &c,
        "node2",
        "proxy",
        debug_at,
        &["DEBUG", "admin request", "method=GET path=\"/logging\""],
        Duration::from_secs(5),
    )?;

    // A bad directive: 400 naming it, the filter in force stays.
    let (code, v) = post_logging(&c, "filter=info,access=loud")?;
    ensure!(
        code == 400
            && str_of(&v, "error").contains("access=loud")
            && v["filter"] == "info,mesh_node::admin=debug",
        "{code} {v}"
    );
    let (code, v) = post_logging(&c, "level=chatty")?;
    ensure!(
        code == 400 && str_of(&v, "error").contains("chatty"),
        "{code} {v}"
    );
    let out = mesh_node(&c, "node2", &["log-level", "verbose"])?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("verbose"),
        "log-level verbose: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mesh_node(&c, "node2", &["log-level"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "log filter: info,mesh_node::admin=debug",
        "log-level: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
