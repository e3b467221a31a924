//! End-to-end tests of `AuthorizationPolicy` enforced by the destination's node proxy: at L4
//! on the HBONE listener (principal, namespace, port, DENY over ALLOW, AUDIT), per request on
//! an HTTP port (L7), and open connections closed when a policy change refuses them. Mesh mode
//! (controller, HBONE), file config. Run as root: `cargo test -p sidenode-tests --test authz`.
//! The tests take turns (one cluster at a time); each has its own cluster, torn down on drop.

mod common;

use anyhow::{Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{Cluster, TestCluster};
use sidenode_tests::workload::{Server, Session};
use std::time::{Duration, Instant};

/// Meshed clients on node 1 (namespace `mesh`): identities `sa-node1-pod1`, `sa-node1-pod2`.
const CLIENT: &str = "node1-pod1";
const OTHER: &str = "node1-pod2";
/// Meshed TCP echo server on node 2, ports 8080 and 9090.
const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const TARGET_9090: &str = "198.19.2.2:9090";
/// Meshed HTTP server on node 2 (port 9080), behind the Service `web` (port `http` 80).
const WEB_POD: &str = "node2-pod2";
const WEB_URL: &str = "http://198.19.2.3:9080";
/// A plain TCP port of the web pod (a `testpod serve` echo).
const WEB_L4: &str = "198.19.2.3:8080";
const WEB_VIP_URL: &str = "http://198.18.128.20:80";
const DENIED: &str = "sidenode_authz_denied_total";

/// A mesh cluster (3 pods per node) with the echo server on node2-pod1 and the clients'
/// and server's enrollment and HBONE listener ready.
fn authz_cluster() -> Result<(TestCluster, Server)> {
    let c = mesh_cluster(3, None)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080, 9090])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node1", "mesh", OTHER)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    Ok((c, srv))
}

/// An `AuthorizationPolicy` in namespace `mesh` selecting the echo server (`app: echo` is
/// not a label the pod has, so no selector: namespace-wide) with this `spec` body.
fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: mesh\nspec:\n{spec}"
    )
}

/// One connection attempt: true when the echo round trip worked, false when the mesh refused
/// it (reset before the server's HELLO). Any other failure (a timeout, a refused `connect`,
/// a connection closed after HELLO) is an error, not a "no".
fn connects(c: &Cluster, pod: &str, target: &str) -> Result<bool> {
    match try_connect(c, pod, target)? {
        Outcome::Echoed => Ok(true),
        Outcome::Refused => Ok(false),
        Outcome::Closed => bail!("{pod} -> {target}: closed after the server's HELLO"),
    }
}

/// Waits (10 s) until connections `pod` → `target` succeed (`ok`) or are refused. A probe open
/// when the policy arrived may be closed by the change after its HELLO (not refused at the
/// `CONNECT`): that is "not yet"; for `ok == false` one more new connection must be refused.
fn wait_connects(c: &Cluster, pod: &str, target: &str, ok: bool) -> Result<()> {
    let want = if ok {
        Outcome::Echoed
    } else {
        Outcome::Refused
    };
    if !wait_until(Duration::from_secs(10), || {
        try_connect(c, pod, target).map(|r| r == want)
    })? {
        bail!(
            "{pod} -> {target} did not {} within 10 s",
            if ok { "connect" } else { "get refused" }
        );
    }
    if !ok {
        ensure!(
            !connects(c, pod, target)?,
            "{pod} -> {target}: refused once, then accepted"
        );
    }
    Ok(())
}

fn node2_denied(c: &Cluster, layer: &str, reason: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, "node2")?,
        DENIED,
        &[
            ("direction", "inbound"),
            ("layer", layer),
            ("reason", reason),
        ],
    ))
}

#[test]
fn l4_allow_by_principal_and_namespace() -> Result<()> {
    let _g = serial();
    let (c, _srv) = authz_cluster()?;
    // No policy: allowed.
    ensure!(connects(&c, CLIENT, TARGET)?, "no policy: refused");
    ensure!(connects(&c, OTHER, TARGET)?, "no policy: refused");

    let offset = c.log_len("node2", "proxy");
    c.write_config_file(
        "policy.yaml",
        &policy(
            "only-pod1",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/mesh/sa/sa-node1-pod1\"]\n",
        ),
    )?;
    wait_connects(&c, OTHER, TARGET, false)?;
    ensure!(
        connects(&c, CLIENT, TARGET)?,
        "the allowed principal was refused"
    );
    wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &[
            "connection denied by authorization policy",
            "reason=\"no_allow_match\"",
            "policy=\"mesh/only-pod1\"",
            "src_identity=spiffe://cluster.local/ns/mesh/sa/sa-node1-pod2",
        ],
        Duration::from_secs(5),
    )?;
    ensure!(
        node2_denied(&c, "l4", "no_allow_match")? >= 1.0,
        "{DENIED} not counted"
    );

    // By namespace: another namespace only → both refused; `mesh` → both allowed.
    c.write_config_file(
        "policy.yaml",
        &policy(
            "by-namespace",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [\"elsewhere\"]\n",
        ),
    )?;
    wait_connects(&c, CLIENT, TARGET, false)?;
    ensure!(
        !connects(&c, OTHER, TARGET)?,
        "other namespace only: allowed"
    );
    c.write_config_file(
        "policy.yaml",
        &policy(
            "by-namespace",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [\"mesh\"]\n",
        ),
    )?;
    wait_connects(&c, CLIENT, TARGET, true)?;
    ensure!(connects(&c, OTHER, TARGET)?, "namespace mesh: refused");
    Ok(())
}

#[test]
fn l4_deny_by_port_deny_beats_allow_and_audit() -> Result<()> {
    let _g = serial();
    let (mut c, _srv) = authz_cluster()?;
    ensure!(connects(&c, CLIENT, TARGET_9090)?, "no policy: refused");

    // DENY by port.
    c.write_config_file(
        "policy.yaml",
        &policy(
            "no-9090",
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9090\"]\n",
        ),
    )?;
    wait_connects(&c, CLIENT, TARGET_9090, false)?;
    ensure!(
        connects(&c, CLIENT, TARGET)?,
        "port 8080 refused by a DENY of 9090"
    );
    ensure!(
        node2_denied(&c, "l4", "deny_policy")? >= 1.0,
        "{DENIED} deny_policy not counted"
    );

    // DENY beats ALLOW.
    let both = format!(
        "{}---\n{}",
        policy(
            "allow-pod1",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/mesh/sa/sa-node1-pod1\"]\n",
        ),
        policy(
            "deny-pod1",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"*/sa/sa-node1-pod1\"]\n",
        ),
    );
    let offset = c.log_len("node2", "proxy");
    c.write_config_file("policy.yaml", &both)?;
    wait_connects(&c, CLIENT, TARGET, false)?;
    // Both refusals are the proxy's denials (counted with their reason), not a dead proxy.
    let denied_before = node2_denied(&c, "l4", "deny_policy")?;
    let no_allow_before = node2_denied(&c, "l4", "no_allow_match")?;
    ensure!(
        !connects(&c, CLIENT, TARGET)?,
        "allowed by the ALLOW, denied by the DENY: accepted"
    );
    ensure!(
        !connects(&c, OTHER, TARGET)?,
        "not allowed by the ALLOW: accepted"
    );
    let denied_after = node2_denied(&c, "l4", "deny_policy")?;
    let no_allow_after = node2_denied(&c, "l4", "no_allow_match")?;
    ensure!(
        denied_after >= denied_before + 1.0,
        "the DENY's refusal not counted as deny_policy: {denied_before} -> {denied_after}"
    );
    ensure!(
        no_allow_after >= no_allow_before + 1.0,
        "the other principal's refusal not counted as no_allow_match: {no_allow_before} -> {no_allow_after}"
    );
    ensure!(c.is_alive("node2", "proxy"), "node2's proxy died");
    wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &[
            "connection denied by authorization policy",
            "reason=\"deny_policy\"",
            "policy=\"mesh/deny-pod1\"",
        ],
        Duration::from_secs(5),
    )?;

    // AUDIT: logged, allowed.
    let offset = c.log_len("node2", "proxy");
    c.write_config_file(
        "policy.yaml",
        &policy(
            "audit-all",
            "  action: AUDIT\n  rules:\n  - from:\n    - source:\n        namespaces: [\"mesh\"]\n",
        ),
    )?;
    wait_connects(&c, CLIENT, TARGET, true)?;
    wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &["authorization audit", "audit=mesh/audit-all"],
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn policy_change_closes_open_connections() -> Result<()> {
    let _g = serial();
    let (c, _srv) = authz_cluster()?;
    c.write_config_file(
        "policy.yaml",
        &policy(
            "allow-mesh",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [\"mesh\"]\n",
        ),
    )?;
    // Wait until the ALLOW is in force (a policy naming another namespace would refuse).
    wait_connects(&c, CLIENT, TARGET, true)?;
    let mut open = Session::open(&c, &testpod(), CLIENT, TARGET)?;
    ensure!(open.echo("before")? == "before", "echo before");
    let mut other = Session::open(&c, &testpod(), OTHER, TARGET)?;
    ensure!(other.echo("before")? == "before", "echo before");

    let offset = c.log_len("node2", "proxy");
    let changed = Instant::now();
    let both = format!(
        "{}---\n{}",
        policy(
            "allow-mesh",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [\"mesh\"]\n"
        ),
        policy(
            "deny-pod1",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/mesh/sa/sa-node1-pod1\"]\n"
        ),
    );
    c.write_config_file("policy.yaml", &both)?;
    let line = wait_log_all(
        &c,
        "node2",
        "proxy",
        offset,
        &[
            "connection closed by policy change",
            "policy=\"mesh/deny-pod1\"",
        ],
        Duration::from_secs(5),
    )?;
    // How soon is a speed figure, printed only; the behaviour is that it was closed.
    eprintln!("closed {:?} after the change: {line}", changed.elapsed());
    ensure!(
        open.echo("after").is_err(),
        "the refused connection still echoes"
    );
    ensure!(
        other.echo("after")? == "after",
        "the still allowed connection broke"
    );
    ensure!(!connects(&c, CLIENT, TARGET)?, "new connection accepted");
    ensure!(
        node2_denied(&c, "l4", "policy_change")? >= 1.0,
        "policy_change not counted"
    );
    Ok(())
}

// ---- L7 ---------------------------------------------------------------------------------

/// `n` requests `method path` from `pod` to `url` on one connection.
fn request(
    c: &Cluster,
    pod: &str,
    url: &str,
    method: &str,
    path: &str,
    n: usize,
) -> Result<HttpReport> {
    http_get(c, pod, url, method, path, &[], n)
}

/// Every request of `n` answered `status`?
fn all_status(c: &Cluster, url: &str, method: &str, path: &str, status: &str) -> Result<bool> {
    let r = request(c, CLIENT, url, method, path, 3)?;
    Ok(r.status(status) == 3)
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
fn l7_allow_get_public_only() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster(3, None)?;
    // Label the web pod `svc: web` (the Service's selector).
    for node in c.node_names() {
        let docs: Vec<String> = c
            .pod_objects(&node)
            .into_iter()
            .map(|mut p| {
                if p.name == WEB_POD {
                    p.labels.insert("svc".into(), "web".into());
                }
                p.to_yaml()
            })
            .collect();
        c.write_config_file(&format!("{node}.yaml"), &docs.join("---\n"))?;
    }
    let _web = HttpServer::start(&c, WEB_POD, "web", &[])?;
    // A TCP echo on another port of the web pod: under the policy, plain L4.
    let _echo = Server::start(&c, &testpod(), WEB_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node2", "mesh", WEB_POD)?;
    wait_hbone_listener(&c, WEB_POD)?;
    ensure!(connects(&c, CLIENT, WEB_L4)?, "no policy: {WEB_L4} refused");
    let spec = "  selector:\n    matchLabels:\n      svc: web\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/public*\"]\n";
    c.write_config_file(
        "policy.yaml",
        &format!("{WEB}{}", policy("public-get", spec)),
    )?;

    // Until the policy is in force, POST answers 200.
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let r = request(&c, CLIENT, WEB_URL, "POST", "/public/x", 3)?;
        let done = r.status("403") == 3;
        last = Some(r);
        Ok(done)
    })?;
    if !ok {
        let proxy = std::fs::read_to_string(c.log_path("node2", "proxy")).unwrap_or_default();
        let ctl = std::fs::read_to_string(c.controller_log_path()).unwrap_or_default();
        let out = c
            .node_command("node2", sidenode_tests::workload::mesh_node_path())?
            .args(["state", "--controller", &c.controller_addr()])
            .arg("--controller-ca")
            .arg(c.controller_ca())
            .arg("--token-file")
            .arg(c.token_path("node2"))
            .output()?;
        let last_lines = |t: &str| t.lines().rev().take(8).collect::<Vec<_>>().join("\n");
        let tail = [
            String::from_utf8_lossy(&out.stdout).to_string(),
            last_lines(&proxy),
            last_lines(&ctl),
        ];
        bail!(
            "POST /public/x never answered 403: {last:?}; node2 proxy:\n{}",
            tail.join("\n")
        );
    }
    let r = request(&c, CLIENT, WEB_URL, "GET", "/public/x", 3)?;
    ensure!(
        r.status("200") == 3 && r.bodies.get("web") == Some(&3),
        "GET /public/x: {r:?}"
    );
    let r = request(&c, CLIENT, WEB_URL, "GET", "/private", 3)?;
    ensure!(
        r.status("403") == 3 && r.bodies.get("RBAC: access denied") == Some(&3),
        "GET /private: {r:?}"
    );
    // Allowed and refused requests mix on one connection.
    ensure!(
        node2_denied(&c, "l7", "no_allow_match")? >= 6.0,
        "l7 denials not counted"
    );
    // Through the Service VIP (the client proxy's HTTP routing, then the tunnel).
    ensure!(
        all_status(&c, WEB_VIP_URL, "GET", "/public/y", "200")?,
        "VIP GET /public/y not 200"
    );
    ensure!(
        all_status(&c, WEB_VIP_URL, "POST", "/public/y", "403")?,
        "VIP POST /public/y not 403"
    );
    // Another port of the pod without HTTP service (served, and reached before the policy):
    // L4, where the policy's HTTP-only rule matches nothing, so the ALLOW refuses it.
    let before = node2_denied(&c, "l4", "no_allow_match")?;
    ensure!(!connects(&c, CLIENT, WEB_L4)?, "L4 port allowed");
    let after = node2_denied(&c, "l4", "no_allow_match")?;
    ensure!(
        after >= before + 1.0,
        "the L4 refusal of {WEB_L4} not counted: {before} -> {after}"
    );
    Ok(())
}
