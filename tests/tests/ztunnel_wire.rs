//! Conformance with Istio ztunnel's HBONE (issue 15, point 4), both directions.
//!
//! ztunnel → sidenode (`ztunnel_client_to_sidenode`):
//! `testpod hbone-client` (`sidenode_tests::hbone_wire`, written from ztunnel's source: its
//! TLS, HTTP/2 settings and `CONNECT` headers) plays a ztunnel in in-pod mode, run inside the
//! network namespace of node1-pod3 (a pod sidenode does not mesh, as an ambient pod would be),
//! with a certificate from the mesh CA for that pod's identity. It tunnels to node2-pod1, a
//! sidenode-meshed pod, at `podIP:15008`. One cluster serves every step (`STEPS`).
//!
//! sidenode → ztunnel (`sidenode_client_to_ztunnel`): a pod marked as Istio ambient's
//! (`ambient.istio.io/redirection: enabled`) whose `podIP:15008` is served by `testpod
//! hbone-server` (the same source, ztunnel's inbound) with a certificate for its identity; a
//! meshed sidenode pod connects to it over IPv4 and IPv6, and the server records exactly what
//! sidenode's client sent; then a server that admits only another identity answers `401`.
//!
//! Run as root: `cargo test -p sidenode-tests --test ztunnel_wire -- --test-threads=1`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::Value;
use sidenode_tests::cluster::{Cluster, PodObject, TestCluster, pod_ip, pod_ip6};
use sidenode_tests::workload::Server;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The ambient-like client pod (namespace `plain`, not meshed by sidenode).
const CLIENT_POD: &str = "node1-pod3";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/plain/sa/sa-node1-pod3";
/// The sidenode-meshed destination and its identity.
const SERVER_POD: &str = "node2-pod1";
const SERVER_ID: &str = "spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1";
/// An unmeshed pod on node 2 where `testpod hbone-server` plays an ambient pod's ztunnel.
const AMBIENT_SERVER_POD: &str = "node2-pod3";
const AMBIENT_SERVER_ID: &str = "spiffe://cluster.local/ns/plain/sa/sa-node2-pod3";
/// ztunnel writes the source connection's `ip:port` in `forwarded`; any port of the pod.
const SOURCE_PORT: u16 = 40123;

struct Env {
    c: TestCluster,
    dir: PathBuf,
}

impl Env {
    fn client_ip(&self) -> String {
        pod_ip(1, 3)
    }

    /// `testpod hbone-client` in `pod`'s namespace (or node1's with `pod = None`), with the
    /// mesh certificate unless `cert` names other files; the JSON report.
    fn hbone_client(&self, pod: Option<&str>, cert: (&str, &str), args: &[&str]) -> Result<Value> {
        let mut cmd = match pod {
            Some(p) => self.c.pod_command(p, testpod())?,
            None => self.c.node_command("node1", testpod())?,
        };
        cmd.arg("hbone-client")
            .arg("--cert")
            .arg(self.dir.join(cert.0))
            .arg("--key")
            .arg(self.dir.join(cert.1))
            .arg("--ca")
            .arg(self.c.controller_ca())
            .args(args);
        let shown = format!("{cmd:?}");
        let out = cmd.output().with_context(|| format!("running {shown}"))?;
        ensure!(
            out.status.success(),
            "{shown}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .last()
            .context("hbone-client printed nothing")?;
        serde_json::from_str(line).with_context(|| format!("hbone-client report {line:?}"))
    }

    /// A tunnel from the client pod to `target` via `tunnel` (defaults: node2-pod1's IPv4).
    fn tunnel(&self, tunnel: &str, target: &str, source: &str, extra: &[&str]) -> Result<Value> {
        let mut args = vec![
            "--server-id",
            SERVER_ID,
            "--tunnel",
            tunnel,
            "--target",
            target,
            "--source",
            source,
        ];
        args.extend_from_slice(extra);
        self.hbone_client(Some(CLIENT_POD), ("client.pem", "client.key"), &args)
    }

    fn v4(&self, port: u16) -> (String, String, String) {
        (
            format!("{}:15008", pod_ip(2, 1)),
            format!("{}:{port}", pod_ip(2, 1)),
            format!("{}:{SOURCE_PORT}", self.client_ip()),
        )
    }
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `<name>.key` and a CSR `<name>.csr` in `dir` (P-256, as Istio's workload keys).
fn key_and_csr(dir: &Path, name: &str) -> Result<()> {
    run_ok(Command::new("openssl").current_dir(dir).args([
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &format!("{name}.key"),
        "-out",
        &format!("{name}.csr"),
        "-subj",
        "/O=ztunnel-wire",
    ]))
}

/// `<name>.pem`: a workload certificate for `spiffe` signed by `ca_cert`/`ca_key`, followed by
/// `chain` (the intermediates up to the root, as ztunnel presents them).
fn sign(dir: &Path, name: &str, spiffe: &str, ca: (&Path, &Path), chain: &str) -> Result<()> {
    key_and_csr(dir, name)?;
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=critical,URI:{spiffe}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth,serverAuth\n"
        ),
    )?;
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-req", "-in", &format!("{name}.csr"), "-CA"])
            .arg(ca.0)
            .arg("-CAkey")
            .arg(ca.1)
            .args([
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "leaf.ext",
                "-out",
                &format!("{name}.pem"),
            ]),
    )?;
    let mut pem = std::fs::read_to_string(dir.join(format!("{name}.pem")))?;
    pem.push_str(chain);
    std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    Ok(())
}

/// The client's certificates: `client.pem` from the mesh CA (the controller's signing key, as
/// the cluster's workloads get theirs), `stranger.pem` for the same identity from a CA of its
/// own ("ztunnel-wire stranger root", unknown to the mesh).
fn certificates(c: &Cluster, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let sd = c.controller_state_dir();
    let chain = std::fs::read_to_string(sd.join("cert-chain.pem")).unwrap_or_default();
    sign(
        dir,
        "client",
        CLIENT_ID,
        (&sd.join("ca-cert.pem"), &sd.join("ca-key.pem")),
        &chain,
    )?;
    sign(
        dir,
        "server",
        AMBIENT_SERVER_ID,
        (&sd.join("ca-cert.pem"), &sd.join("ca-key.pem")),
        &chain,
    )?;
    run_ok(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "stranger-ca.key",
        "-out",
        "stranger-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ztunnel-wire stranger root",
    ]))?;
    let stranger_root = std::fs::read_to_string(dir.join("stranger-ca.pem"))?;
    sign(
        dir,
        "stranger",
        CLIENT_ID,
        (&dir.join("stranger-ca.pem"), &dir.join("stranger-ca.key")),
        &stranger_root,
    )
}

fn status(r: &Value) -> Option<u64> {
    r["status"].as_u64()
}

/// The tunnel opened (200), the echo came back whole through it, and the destination pod saw
/// `client_ip` as its peer (the `HELLO … peer=<ip:port>` line of `testpod serve`).
fn expect_echo(r: &Value, client_ip: &str) -> Result<()> {
    ensure!(status(r) == Some(200), "tunnel not opened: {r}");
    ensure!(r["echo_ok"] == Value::Bool(true), "echo not intact: {r}");
    ensure!(
        r["alpn"] == "h2" && r["tls_version"] == "TLSv1_3",
        "not TLS 1.3 with ALPN h2: {r}"
    );
    let hello = r["hello"].as_str().unwrap_or_default();
    let peer = hello
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .context("no peer in HELLO")?;
    let peer: std::net::SocketAddr = peer.parse().context("HELLO peer")?;
    ensure!(
        peer.ip().to_string() == client_ip,
        "the destination pod saw {peer}, not the client {client_ip}: {r}"
    );
    Ok(())
}

fn ipv4_tunnel_echoes_and_the_pod_sees_the_client(e: &Env) -> Result<()> {
    let (tunnel, target, source) = e.v4(8080);
    let r = e.tunnel(&tunnel, &target, &source, &[])?;
    expect_echo(&r, &e.client_ip())?;
    // What was sent is ztunnel's format exactly.
    ensure!(r["sent"]["forwarded"] == format!("for=\"{source}\""), "{r}");
    // The destination's access log and metrics name the client pod and its identity.
    let line = wait_log_all(
        &e.c,
        "node2",
        "proxy",
        0,
        &[
            "connection complete",
            &format!("src.addr={}:", e.client_ip()),
            "sa-node1-pod3",
        ],
        Duration::from_secs(10),
    )?;
    ensure!(line.contains(SERVER_POD), "{line}");
    let m = proxy_metrics(&e.c, "node2")?;
    let opened = metric_value(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", CLIENT_POD),
            (
                "source_principal",
                "spiffe://cluster.local/ns/plain/sa/sa-node1-pod3",
            ),
        ],
    );
    let opened_td = metric_value(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", CLIENT_POD),
            (
                "source_principal",
                "cluster.local/ns/plain/sa/sa-node1-pod3",
            ),
        ],
    );
    ensure!(
        opened + opened_td >= 1.0,
        "no destination metric for the client pod:\n{}",
        m.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

fn ipv6_tunnel_echoes(e: &Env) -> Result<()> {
    // ztunnel dials the destination address of the connection's family: `[v6]:15008`, with
    // the `:authority` `[v6]:port` and `forwarded: for="[v6]:port"`.
    let tunnel = format!("[{}]:15008", pod_ip6(2, 1));
    let target = format!("[{}]:8080", pod_ip6(2, 1));
    let client6 = pod_ip6(1, 3);
    let source = format!("[{client6}]:{SOURCE_PORT}");
    let r = e.tunnel(&tunnel, &target, &source, &[])?;
    expect_echo(&r, &client6)?;
    ensure!(
        r["sent"]["forwarded"] == format!("for=\"[{client6}]:{SOURCE_PORT}\""),
        "{r}"
    );
    Ok(())
}

fn forwarded_names_the_client_when_the_tunnel_comes_from_the_node(e: &Env) -> Result<()> {
    // A ztunnel outside the pod (its shared, node-wide mode) dials from the node's address;
    // the client pod is then known only from `forwarded`. The caller's identity is the pod's,
    // so sidenode believes the header: the pod sees the client pod's address, not the node's.
    let (tunnel, target, source) = e.v4(8080);
    let r = e.hbone_client(
        None,
        ("client.pem", "client.key"),
        &[
            "--server-id",
            SERVER_ID,
            "--tunnel",
            &tunnel,
            "--target",
            &target,
            "--source",
            &source,
        ],
    )?;
    expect_echo(&r, &e.client_ip())
}

fn ip_policy(ip: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ztunnel-wire\n  namespace: mesh\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{ip}/32\"]\n"
    )
}

/// Retries a tunnel until its status is `want` (a policy takes effect when the node's state
/// changes); the last report.
fn wait_status(want: u64, f: impl Fn() -> Result<Value>) -> Result<Value> {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(15), || {
        last = f()?;
        Ok(status(&last) == Some(want))
    })?;
    ensure!(ok, "status {want} never came: {last}");
    Ok(last)
}

fn authorization_sees_the_client_ip_and_denies_with_401(e: &Env) -> Result<()> {
    const FILE: &str = "ztunnel-wire-authz.yaml";
    let (tunnel, target, source) = e.v4(8080);
    let go = || e.tunnel(&tunnel, &target, &source, &[]);
    // Allowed only from another address: refused with 401, as ztunnel's inbound refuses.
    e.c.write_config_file(FILE, &ip_policy(&pod_ip(1, 2)))?;
    let r = wait_status(401, go)?;
    ensure!(r["echo_ok"] == Value::Bool(false), "{r}");
    // Allowed only from the client pod's address (the policy sees it): the tunnel opens.
    e.c.write_config_file(FILE, &ip_policy(&e.client_ip()))?;
    let r = wait_status(200, go)?;
    expect_echo(&r, &e.client_ip())?;
    e.c.remove_config_file(FILE)?;
    Ok(())
}

fn a_closed_port_is_503(e: &Env) -> Result<()> {
    let (tunnel, target, source) = e.v4(9);
    let r = e.tunnel(&tunnel, &target, &source, &[])?;
    ensure!(status(&r) == Some(503), "{r}");
    Ok(())
}

fn another_pods_address_is_400(e: &Env) -> Result<()> {
    // node2-pod2 is a meshed pod on the same node, but the tunnel reached node2-pod1.
    let (tunnel, _, source) = e.v4(8080);
    let target = format!("{}:8080", pod_ip(2, 2));
    let r = e.tunnel(&tunnel, &target, &source, &[])?;
    ensure!(status(&r) == Some(400), "{r}");
    Ok(())
}

fn an_untrusted_client_certificate_gets_unknown_ca(e: &Env) -> Result<()> {
    let (tunnel, target, source) = e.v4(8080);
    let r = e.hbone_client(
        Some(CLIENT_POD),
        ("stranger.pem", "stranger.key"),
        &[
            "--server-id",
            SERVER_ID,
            "--tunnel",
            &tunnel,
            "--target",
            &target,
            "--source",
            &source,
        ],
    )?;
    ensure!(
        r["alert_received"] == "unknown_ca" && status(&r).is_none(),
        "expected TLS alert unknown_ca: {r}"
    );
    Ok(())
}

fn a_wrong_server_identity_is_refused_by_the_client(e: &Env) -> Result<()> {
    let (tunnel, target, source) = e.v4(8080);
    let r = e.hbone_client(
        Some(CLIENT_POD),
        ("client.pem", "client.key"),
        &[
            "--server-id",
            "spiffe://cluster.local/ns/mesh/sa/someone-else",
            "--tunnel",
            &tunnel,
            "--target",
            &target,
            "--source",
            &source,
        ],
    )?;
    ensure!(
        r["alert_sent"] == "certificate_unknown" && status(&r).is_none(),
        "the client must refuse the server (alert certificate_unknown, as ztunnel): {r}"
    );
    Ok(())
}

/// The JSON lines `hbone-server` wrote so far.
fn server_records(log: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("record {l:?}")))
        .collect()
}

fn the_test_server_answers_as_ztunnels_inbound(e: &Env) -> Result<()> {
    // The tool the sidenode -> ztunnel tests will use, checked against the client written
    // from the same source: a server in node2-pod3's netns, echo on 8080 there.
    let ip = pod_ip(2, 3);
    let _echo = Server::start(&e.c, &testpod(), AMBIENT_SERVER_POD, &[8080])?;
    let (cert, key, ca) = (
        e.dir.join("server.pem"),
        e.dir.join("server.key"),
        e.c.controller_ca(),
    );
    let log = e.dir.join("hbone-server.jsonl");
    let log_strict = e.dir.join("hbone-server-strict.jsonl");
    let listen = format!("{ip}:15008");
    let listen_strict = format!("{ip}:15009");
    let base = |listen: &str, log: &Path| -> Vec<String> {
        [
            "hbone-server",
            "--listen",
            listen,
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--ca",
            &ca.display().to_string(),
            "--log",
            &log.display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let args = base(&listen, &log);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _srv = HttpServer::spawn(&e.c, AMBIENT_SERVER_POD, &args)?;
    let mut strict = base(&listen_strict, &log_strict);
    strict.extend([
        "--client-id".into(),
        "spiffe://cluster.local/ns/plain/sa/other".into(),
    ]);
    let strict: Vec<&str> = strict.iter().map(String::as_str).collect();
    let _strict = HttpServer::spawn(&e.c, AMBIENT_SERVER_POD, &strict)?;

    let source = format!("{}:{SOURCE_PORT}", e.client_ip());
    let client = |tunnel: &str, target: &str| {
        e.hbone_client(
            Some(CLIENT_POD),
            ("client.pem", "client.key"),
            &[
                "--server-id",
                AMBIENT_SERVER_ID,
                "--tunnel",
                tunnel,
                "--target",
                target,
                "--source",
                &source,
            ],
        )
    };
    let r = client(&listen, &format!("{ip}:8080"))?;
    ensure!(
        status(&r) == Some(200) && r["echo_ok"] == Value::Bool(true),
        "{r}"
    );
    ensure!(status(&client(&listen, &format!("{ip}:9"))?) == Some(503));
    ensure!(status(&client(&listen, &format!("{}:8080", pod_ip(2, 1)))?) == Some(400));
    ensure!(status(&client(&listen_strict, &format!("{ip}:8080"))?) == Some(401));

    let recs = server_records(&log)?;
    let statuses: Vec<u64> = recs.iter().filter_map(|r| r["status"].as_u64()).collect();
    ensure!(statuses == [200, 503, 400], "{recs:?}");
    let first = &recs[0];
    let peer: std::net::SocketAddr = first["peer"].as_str().unwrap_or_default().parse()?;
    ensure!(
        first["method"] == "CONNECT"
            && first["authority"] == format!("{ip}:8080")
            && first["client_ids"] == serde_json::json!([CLIENT_ID])
            && peer.ip().to_string() == e.client_ip()
            && first["headers"]["forwarded"] == serde_json::json!([format!("for=\"{source}\"")])
            && first["headers"]["traceparent"][0]
                .as_str()
                .is_some_and(|t| t.len() == 55 && t.starts_with("00-") && t.ends_with("-00")),
        "{first}"
    );
    let strict_recs = server_records(&log_strict)?;
    ensure!(
        strict_recs.len() == 1 && strict_recs[0]["status"] == 401,
        "{strict_recs:?}"
    );
    Ok(())
}

type Step = fn(&Env) -> Result<()>;

const STEPS: &[(&str, Step)] = &[
    (
        "the test server answers as ztunnel's inbound",
        the_test_server_answers_as_ztunnels_inbound,
    ),
    (
        "IPv4: tunnel echoes, the pod, log and metrics see the client pod",
        ipv4_tunnel_echoes_and_the_pod_sees_the_client,
    ),
    ("IPv6: tunnel to [podIP6]:15008 echoes", ipv6_tunnel_echoes),
    (
        "forwarded names the client when the tunnel comes from the node",
        forwarded_names_the_client_when_the_tunnel_comes_from_the_node,
    ),
    (
        "AuthorizationPolicy ipBlocks see the client; deny is 401",
        authorization_sees_the_client_ip_and_denies_with_401,
    ),
    ("a closed target port is 503", a_closed_port_is_503),
    ("another pod's address is 400", another_pods_address_is_400),
    (
        "an untrusted client certificate gets alert unknown_ca",
        an_untrusted_client_certificate_gets_unknown_ca,
    ),
    (
        "a wrong server identity is refused by the client",
        a_wrong_server_identity_is_refused_by_the_client,
    ),
];

#[test]
fn ztunnel_client_to_sidenode() -> Result<()> {
    let _turn = serial();
    // Three pods per node: pod1 and pod2 meshed (namespace `mesh`), pod3 not (`plain`).
    let c = mesh_cluster(3, None)?;
    let _srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    let dir = c.state_dir.join("ztunnel-wire");
    certificates(&c, &dir)?;
    let env = Env { c, dir };
    let mut failed = Vec::new();
    for (name, step) in STEPS {
        if let Err(e) = step(&env) {
            eprintln!("step `{name}` failed: {e:#}");
            failed.push(format!("{name}: {e:#}"));
        }
    }
    if !failed.is_empty() {
        bail!("{} step(s) failed:\n{}", failed.len(), failed.join("\n"));
    }
    // Which TLS the sidenode side used against the ztunnel-style client (kernel TLS on a
    // kernel with the TLS ULP, e.g. `cargo xtask kernels --tests ztunnel-wire`).
    print_tls_paths(&env.c, "node2", "inbound", "")?;
    Ok(())
}

/// `hbone-server` arguments: listen on `listen` with `dir`'s `name.pem`/`name.key`, records
/// to `log`, plus `extra`.
fn hbone_server_args(c: &Cluster, dir: &Path, name: &str, listen: &str, log: &Path) -> Vec<String> {
    vec![
        "hbone-server".into(),
        "--listen".into(),
        listen.into(),
        "--cert".into(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--ca".into(),
        c.controller_ca().display().to_string(),
        "--log".into(),
        log.display().to_string(),
    ]
}

/// The record of the last CONNECT `hbone-server` logged to `log`, once there is one for
/// `authority` (the server writes it as it answers).
fn record_for(log: &Path, authority: &str) -> Result<Value> {
    let mut found = None;
    wait_until(Duration::from_secs(10), || {
        found = server_records(log)?
            .into_iter()
            .rev()
            .find(|r| r["authority"] == authority);
        Ok(found.is_some())
    })?;
    found.with_context(|| format!("no CONNECT for {authority} in {}", log.display()))
}

#[test]
fn sidenode_client_to_ztunnel() -> Result<()> {
    let _turn = serial();
    let mut c = mesh_cluster(2, None)?;
    const CLIENT: &str = "node1-pod1";
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;

    // The "ambient" pod: in the meshed namespace, marked by Istio's CNI annotation, so
    // sidenode tunnels to it and leaves its :15008 to "ztunnel".
    let amb = c.add_pod("node2", "mesh", false)?;
    let p = c.pod(&amb)?.clone();
    let object = PodObject {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        node: p.node.clone(),
        ip: p.ip.clone(),
        ip6: Some(p.ip6.clone()).filter(|s| !s.is_empty()),
        netns_path: format!("/var/run/netns/{}", p.netns),
        service_account: format!("sa-{amb}"),
        labels: Default::default(),
    };
    let yaml = object.to_yaml().replacen(
        "  annotations:\n",
        "  annotations:\n    \"ambient.istio.io/redirection\": \"enabled\"\n",
        1,
    );
    ensure!(yaml.contains("ambient.istio.io/redirection"), "{yaml}");
    c.write_config_file("ambient.yaml", &yaml)?;

    let dir = c.state_dir.join("ztunnel-wire-out");
    std::fs::create_dir_all(&dir)?;
    let sd = c.controller_state_dir();
    let chain = std::fs::read_to_string(sd.join("cert-chain.pem")).unwrap_or_default();
    let amb_id = format!("spiffe://cluster.local/ns/mesh/sa/sa-{amb}");
    sign(
        &dir,
        "ambient",
        &amb_id,
        (&sd.join("ca-cert.pem"), &sd.join("ca-key.pem")),
        &chain,
    )?;
    let _echo = Server::start(&c, &testpod(), &amb, &[8080])?;
    let (log4, log6) = (dir.join("v4.jsonl"), dir.join("v6.jsonl"));
    let listen4 = format!("{}:15008", p.ip);
    let listen6 = format!("[{}]:15008", p.ip6);
    let spawn = |listen: &str, log: &Path, extra: &[&str]| -> Result<HttpServer> {
        let mut args = hbone_server_args(&c, &dir, "ambient", listen, log);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        HttpServer::spawn(&c, &amb, &args)
    };
    let srv4 = spawn(&listen4, &log4, &[])?;
    let _srv6 = spawn(&listen6, &log6, &[])?;

    // IPv4: once node 1 knows the pod as Istio's, the connection is tunnelled to it (before,
    // an unknown address, it goes directly: so wait for a CONNECT the server recorded).
    let target4 = format!("{}:8080", p.ip);
    let mut last = None;
    let ok = wait_until(Duration::from_secs(15), || {
        let r = dial_one(&c, CLIENT, &target4)?;
        let tunnelled = server_records(&log4)?
            .iter()
            .any(|rec| rec["authority"] == target4.as_str());
        let ok = r.echo_ok && tunnelled;
        last = Some(r);
        Ok(ok)
    })?;
    ensure!(
        ok,
        "{CLIENT} -> {target4} never echoed through the ambient pod's ztunnel: {last:?}"
    );
    let r = last.context("dialled")?;
    let client_local = r.local.clone().context("no client address")?;
    let rec = record_for(&log4, &target4)?;
    let client_ip = c.pod(CLIENT)?.ip.clone();
    let peer: std::net::SocketAddr = rec["peer"].as_str().unwrap_or_default().parse()?;
    ensure!(
        rec["method"] == "CONNECT" && rec["status"] == 200,
        "not a CONNECT answered 200: {rec}"
    );
    ensure!(
        rec["client_ids"] == serde_json::json!(["spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1"]),
        "the client's certificate is not the source pod's identity: {rec}"
    );
    // In-pod mode: the tunnel itself comes from the source pod's address.
    ensure!(
        peer.ip().to_string() == client_ip,
        "the tunnel came from {peer}, not from {CLIENT} ({client_ip}): {rec}"
    );
    // ztunnel's header values: `for="ip:port"` of the source connection, baggage keys in
    // ztunnel's order, an unsampled traceparent.
    ensure!(
        rec["headers"]["forwarded"] == serde_json::json!([format!("for=\"{client_local}\"")]),
        "forwarded is not ztunnel's for=\"{client_local}\": {rec}"
    );
    let baggage = rec["headers"]["baggage"][0].as_str().unwrap_or_default();
    ensure!(
        baggage.starts_with("k8s.cluster.name=Kubernetes,k8s.namespace.name=mesh,k8s.pod.name=node1-pod1,service.name="),
        "baggage is not ztunnel's: {baggage}"
    );
    let tp = rec["headers"]["traceparent"][0]
        .as_str()
        .unwrap_or_default();
    ensure!(
        tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-00"),
        "traceparent {tp:?}"
    );

    // IPv6: tunnelled to the pod's IPv6 address, as ztunnel's listener requires.
    let target6 = format!("[{}]:8080", p.ip6);
    let r = dial_one(&c, CLIENT, &target6)?;
    ensure!(r.echo_ok, "{CLIENT} -> {target6}: {r:?}");
    let rec = record_for(&log6, &target6)?;
    let peer: std::net::SocketAddr = rec["peer"].as_str().unwrap_or_default().parse()?;
    ensure!(
        rec["status"] == 200 && peer.ip().to_string() == c.pod(CLIENT)?.ip6,
        "IPv6 tunnel record {rec}"
    );

    // ztunnel's inbound refusing the source identity (`401`): sidenode's client gives up on
    // the connection and counts it as denied.
    drop(srv4);
    let log_strict = dir.join("strict.jsonl");
    let _strict = spawn(
        &listen4,
        &log_strict,
        &["--client-id", "spiffe://cluster.local/ns/mesh/sa/other"],
    )?;
    let offset = c.log_len("node1", "proxy");
    let r = dial_one(&c, CLIENT, &target4);
    ensure!(
        !r.as_ref().is_ok_and(|r| r.echo_ok),
        "echoed although the ztunnel refused the identity: {r:?}"
    );
    ensure!(record_for(&log_strict, &target4)?["status"] == 401);
    wait_log_all(
        &c,
        "node1",
        "proxy",
        offset,
        &["tunnel refused", "reason=\"denied\""],
        Duration::from_secs(5),
    )?;
    print_tls_paths(&c, "node1", "outbound", " to the ztunnel-style server")?;
    Ok(())
}

/// Prints `node`'s HBONE/TCP connections in `direction` by the TLS path they took after the
/// handshake (`sidenode_hbone_tls_connections_total`: kernel TLS where the kernel has the ULP).
fn print_tls_paths(c: &Cluster, node: &str, direction: &str, what: &str) -> Result<()> {
    let m = proxy_metrics(c, node)?;
    let path = |p: &str| {
        metric_value(
            &m,
            "sidenode_hbone_tls_connections_total",
            &[("direction", direction), ("path", p)],
        )
    };
    eprintln!(
        "{node} {direction} HBONE/TCP connections{what} by TLS path: kernel {}, userspace {}",
        path("kernel"),
        path("userspace")
    );
    Ok(())
}
