//! sidenode on a real kube-apiserver (1.20, built and cached by `deploy/kube-testenv.sh`).
//! Run as root: `cargo test -p sidenode-tests --test kubernetes`. The tests take turns
//! (`serial()`: one API server and cluster at a time).
//!
//! The simulated cluster in Kubernetes mode (`ClusterOpts::kube`): the apiserver in the
//! fabric namespace, Pod objects without the standalone netns annotation (agents find each
//! pod's namespace from its UID through the cgroup tree), agents and proxies authenticated by
//! projected service-account tokens (TokenReview), the controller reading the API.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{ClusterOpts, SYSTEM_NS, TestCluster, unique_prefix};
use sidenode_tests::kube::KubeEnv;
use sidenode_tests::workload::{Server, Session, dial, mesh_node_path};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REDIRECTION: &str = "sidenode.io/redirection";

fn kube_cluster(pods: usize) -> Result<TestCluster> {
    require_root();
    TestCluster::up(ClusterOpts {
        prefix: unique_prefix('k'),
        nodes: 2,
        pods,
        mesh_node: mesh_node_path(),
        kube: true,
        mesh: true,
        ..Default::default()
    })
}

fn wait_annotation(c: &TestCluster, pod: &str, want: Option<&str>) -> Result<()> {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        last = c.pod_annotation(pod, REDIRECTION)?;
        Ok(last.as_deref() == want)
    })?;
    ensure!(
        ok,
        "pod {pod}: annotation {REDIRECTION} is {last:?}, expected {want:?}"
    );
    Ok(())
}

fn wait_not_enrolled(c: &TestCluster, node: &str, ns: &str, pod: &str) -> Result<()> {
    let key = (ns.to_string(), pod.to_string());
    let ok = wait_until(Duration::from_secs(10), || {
        Ok(!enrolled(c, node)?.contains(&key))
    })?;
    ensure!(ok, "{ns}/{pod} still enrolled on {node} after 10 s");
    Ok(())
}

/// How a new connection from `pod` to `target` lands: `MESH` when the destination's node
/// proxy delivered it (with the client's address, another port), else the peer IP the server
/// saw.
fn new_connection_peer(c: &TestCluster, pod: &str, target: &str) -> Result<String> {
    let r = dial_one(c, pod, target)?;
    if r.kept_client_address() {
        return Ok(MESH.to_string());
    }
    Ok(ip_of(r.server_peer.as_deref().context("no server_peer")?).to_string())
}

const MESH: &str = "mesh";

#[test]
fn labelling_a_namespace_enrolls_its_running_pods_without_restarting_them() -> Result<()> {
    let _turn = serial();
    let c = kube_cluster(2)?;
    const TARGET: &str = "198.19.2.2:8080"; // node2-pod1, namespace mesh (enabled)
    let _srv = Server::start(&c, &testpod(), "node2-pod1", &[8080])?;

    // The labelled namespace's pods are enrolled from the API alone (no netns annotation), and
    // the agent marks them.
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_enrolled(&c, "node2", "mesh", "node2-pod1")?;
    wait_annotation(&c, "node1-pod1", Some("enabled"))?;
    ensure!(
        c.pod_annotation("node1-pod2", REDIRECTION)?.is_none(),
        "a pod of an unlabelled namespace is annotated"
    );
    wait_hbone_listener(&c, "node2-pod1")?;
    // A meshed pod's connection crosses in HBONE: the server sees node2's proxy.
    ensure!(
        new_connection_peer(&c, "node1-pod1", TARGET)? == MESH,
        "meshed pod not tunnelled"
    );

    // node1-pod2 (namespace `plain`) runs, unmeshed: direct.
    let pause = c.pid("node1-pod2", "pause").context("pause pid")?;
    let mut s = Session::open(&c, &testpod(), "node1-pod2", TARGET)?;
    ensure!(!s.through_proxy(), "captured before enabling: {}", s.hello);

    // Label the namespace with kubectl: the running pod joins.
    let t = Instant::now();
    c.kubectl(&[
        "label",
        "namespace",
        "plain",
        "sidenode.io/dataplane-mode=enabled",
    ])?;
    wait_enrolled(&c, "node1", "plain", "node1-pod2")?;
    eprintln!("enrolled {:?} after labelling", t.elapsed());
    wait_annotation(&c, "node1-pod2", Some("enabled"))?;
    let mut peer = String::new();
    let tunnelled = wait_until(Duration::from_secs(5), || {
        peer = new_connection_peer(&c, "node1-pod2", TARGET)?;
        Ok(peer == MESH)
    })?;
    ensure!(
        tunnelled,
        "new connection after labelling not tunnelled (peer {peer})"
    );
    ensure!(
        s.echo("still here")? == "still here",
        "established connection broken"
    );
    ensure!(
        c.pid("node1-pod2", "pause") == Some(pause) && sidenode_tests::cluster::pid_alive(pause),
        "the pod's process was restarted"
    );

    // Unlabel: out again, annotation removed, new connections direct.
    c.kubectl(&["label", "namespace", "plain", "sidenode.io/dataplane-mode-"])?;
    wait_not_enrolled(&c, "node1", "plain", "node1-pod2")?;
    wait_annotation(&c, "node1-pod2", None)?;
    let direct = wait_until(Duration::from_secs(5), || {
        peer = new_connection_peer(&c, "node1-pod2", TARGET)?;
        Ok(peer == "198.19.1.3")
    })?;
    ensure!(direct, "still tunnelled after unlabelling (peer {peer})");
    ensure!(
        s.echo("and now")? == "and now",
        "established connection broken"
    );
    s.close()?;

    // The pod opt-out label works through the API too.
    c.kubectl(&[
        "label",
        "pod",
        "node1-pod1",
        "-n",
        "mesh",
        "sidenode.io/dataplane-mode=none",
    ])?;
    wait_not_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_annotation(&c, "node1-pod1", None)?;
    Ok(())
}

const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// A pod's label (`None` when absent).
fn pod_label(c: &TestCluster, pod: &str, key: &str) -> Result<Option<String>> {
    let ns = c.pod(pod)?.namespace.clone();
    let out = c.kubectl(&["get", "pod", pod, "-n", &ns, "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("kubectl get pod -o json")?;
    Ok(v["metadata"]["labels"][key].as_str().map(str::to_string))
}

fn wait_label(c: &TestCluster, pod: &str, want: Option<&str>) -> Result<()> {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(10), || {
        last = pod_label(c, pod, TUNNEL_LABEL)?;
        Ok(last.as_deref() == want)
    })?;
    ensure!(
        ok,
        "pod {pod}: label {TUNNEL_LABEL} is {last:?}, expected {want:?}"
    );
    Ok(())
}

/// Mixed clusters through the API (issue 15): `--advertise-hbone` labels enrolled pods
/// `networking.istio.io/tunnel: http` with the status annotation and removes both together;
/// sidenode's own label never makes a pod Istio's; and a pod annotated by "Istio's CNI"
/// (`kubectl annotate`) leaves sidenode's mesh at once, as from the YAML folder.
#[test]
fn advertised_pods_and_istio_ambient_pods_through_the_api() -> Result<()> {
    let _turn = serial();
    require_root();
    let c = TestCluster::up(ClusterOpts {
        prefix: unique_prefix('k'),
        nodes: 2,
        pods: 2,
        mesh_node: mesh_node_path(),
        kube: true,
        mesh: true,
        agent_args: vec!["--advertise-hbone".into()],
        ..Default::default()
    })?;
    // Enrolled and advertised, in one patch.
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_annotation(&c, "node1-pod1", Some("enabled"))?;
    wait_label(&c, "node1-pod1", Some("http"))?;
    ensure!(
        pod_label(&c, "node1-pod2", TUNNEL_LABEL)?.is_none(),
        "a pod of an unlabelled namespace was advertised"
    );
    // The advertised pod stays sidenode's: still enrolled, with its listener, shown so.
    let state = node_state(&c, "node2")?;
    let dataplane = state["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["uid"] == "mesh/node1-pod1"))
        .map(|w| w["dataplane"].clone());
    ensure!(
        dataplane == Some(serde_json::json!("sidenode")),
        "the advertised pod is served as {dataplane:?}, not sidenode: {state}"
    );
    ensure!(
        enrolled(&c, "node1")?.contains(&("mesh".to_string(), "node1-pod1".to_string())),
        "the advertised pod was un-enrolled"
    );

    // Istio's CNI takes the pod: sidenode steps aside, and removes its label and annotation.
    c.kubectl(&[
        "annotate",
        "pod",
        "node1-pod1",
        "-n",
        "mesh",
        "ambient.istio.io/redirection=enabled",
    ])?;
    wait_not_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_annotation(&c, "node1-pod1", None)?;
    wait_label(&c, "node1-pod1", None)?;
    let mut last = serde_json::Value::Null;
    let istio = wait_until(Duration::from_secs(10), || {
        let st = node_state(&c, "node2")?;
        last = st["workloads"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["uid"] == "mesh/node1-pod1"))
            .map(|w| w["dataplane"].clone())
            .unwrap_or_default();
        Ok(last == "istio")
    })?;
    ensure!(istio, "the ambient pod is served as {last}, not istio");
    Ok(())
}

const VIP: &str = "198.18.128.20";

fn reviews_objects(v1_weight: u32, v2_weight: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: mesh}}
spec:
  clusterIP: {VIP}
  selector: {{svc: reviews}}
  ports: [{{name: tcp-reviews, protocol: TCP, port: 9080, targetPort: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: mesh}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: mesh}}
spec:
  hosts: [reviews]
  tcp:
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {v1_weight}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {v2_weight}}}
"#
    )
}

/// Which pod answered `n` new connections to the VIP: `Some((v1 count, v2 count))`, or `None`
/// when a connection reached no server at all (what a Service not yet on node1 gives). A
/// connection answered by any other endpoint, or broken after a server answered, is an error.
fn try_split(c: &TestCluster, n: usize) -> Result<Option<(usize, usize)>> {
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..n {
        let mut r = dial(
            c,
            &testpod(),
            "node1-pod1",
            &[format!("{VIP}:9080")],
            1,
            1,
            0,
        )?;
        let r = r.pop().context("empty dial report")?;
        match (r.echo_ok, r.server_local.as_deref().map(ip_of)) {
            (false, None) => return Ok(None),
            (true, Some("198.19.2.2")) => v1 += 1,
            (true, Some("198.19.2.3")) => v2 += 1,
            _ => bail!("answered by an unexpected endpoint, or broken after the answer: {r:?}"),
        }
    }
    Ok(Some((v1, v2)))
}

/// [`try_split`] once the Service is in place: every connection must reach v1 or v2.
fn split(c: &TestCluster, n: usize) -> Result<(usize, usize)> {
    try_split(c, n)?.context("a connection to the VIP reached no server")
}

#[test]
fn a_virtual_service_applied_with_kubectl_changes_routing_live() -> Result<()> {
    let _turn = serial();
    // Pods: node<i>-pod1, -pod2 in `mesh`, -pod3 in `plain`.
    let c = kube_cluster(3)?;
    c.kube()?.install_crds()?;
    let _v1 = Server::start(&c, &testpod(), "node2-pod1", &[8080, 9999])?;
    let _v2 = Server::start(&c, &testpod(), "node2-pod2", &[8080])?;
    c.kubectl(&[
        "label",
        "pod",
        "node2-pod1",
        "-n",
        "mesh",
        "svc=reviews",
        "version=v1",
    ])?;
    c.kubectl(&[
        "label",
        "pod",
        "node2-pod2",
        "-n",
        "mesh",
        "svc=reviews",
        "version=v2",
    ])?;
    wait_enrolled(&c, "node1", "mesh", "node1-pod1")?;
    wait_hbone_listener(&c, "node2-pod1")?;
    wait_hbone_listener(&c, "node2-pod2")?;

    // All to v1.
    c.kube()?.apply(&reviews_objects(100, 0))?;
    let mut got = None;
    // The controller notices CRDs installed after it started within 3 s. Until the Service
    // and the pods' labels have reached node1, connections to the VIP reach no server:
    // retried (only that; an answer from anything but v1 or v2 fails the test).
    let ok = wait_until(Duration::from_secs(20), || {
        got = try_split(&c, 10)?;
        Ok(got == Some((10, 0)))
    })?;
    ensure!(ok, "with 100/0 the split is {got:?}");
    let mut got = (0, 0);
    let mut held = Session::open(&c, &testpod(), "node1-pod1", &format!("{VIP}:9080"))?;
    ensure!(
        held.hello.contains("198.19.2.2"),
        "held connection not on v1: {}",
        held.hello
    );

    // kubectl apply of new weights: new connections go to v2, the held one stays up.
    let t = Instant::now();
    c.kube()?.apply(&reviews_objects(0, 100))?;
    let ok = wait_until(Duration::from_secs(10), || {
        got = split(&c, 5)?;
        Ok(got == (0, 5))
    })?;
    ensure!(ok, "after the change the split is {got:?}");
    eprintln!("routing changed {:?} after kubectl apply", t.elapsed());
    ensure!(
        held.echo("v1 still")? == "v1 still",
        "held connection broken"
    );

    // An object the CRD schema accepts but the mesh cannot use (weights total 110): named in
    // the controller's log with its field, and the last good routing stays.
    let log = c.controller_log_path();
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    c.kube()?.apply(&reviews_objects(80, 30))?;
    wait_log_all(
        &c,
        "controller",
        "controller",
        offset,
        &["VirtualService mesh/reviews", "spec.tcp[0].route", "110"],
        Duration::from_secs(10),
    )?;
    ensure!(
        split(&c, 10)? == (0, 10),
        "routing changed after an invalid object"
    );
    held.close()?;

    // The security objects, a RateLimitPolicy and sidenode's MeshConfig reach the nodes too.
    ensure!(
        new_connection_peer(&c, "node1-pod1", "198.19.2.2:9999")? == MESH,
        "port 9999 not tunnelled before the MeshConfig"
    );
    c.kube()?.apply(SECURITY_OBJECTS)?;
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        last = node_state(&c, "node1")?;
        let uids: Vec<&str> = last["configs"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["uid"].as_str()).collect())
            .unwrap_or_default();
        Ok(uids.contains(&"AuthorizationPolicy/mesh/deny-plain")
            && uids.contains(&"PeerAuthentication/mesh/permissive")
            && uids.contains(&"RateLimitPolicy/mesh/limits")
            && uids.contains(&"VirtualService/mesh/reviews")
            && last["settings"]["exclude_ports"] == serde_json::json!([9999]))
    })?;
    ensure!(ok, "node1's state lacks the objects: {last:#}");
    let ap = last["configs"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c["uid"] == "AuthorizationPolicy/mesh/deny-plain")
        })
        .context("no policy")?;
    ensure!(
        ap["spec"]["action"] == "DENY"
            && ap["spec"]["rules"][0]["from"][0]["source"]["namespaces"][0] == "plain",
        "policy content: {ap:#}"
    );
    // The MeshConfig's `excludePorts: [9999]` reaches the agents' kernel maps: not captured.
    let mut peer = String::new();
    let excluded = wait_until(Duration::from_secs(5), || {
        peer = new_connection_peer(&c, "node1-pod1", "198.19.2.2:9999")?;
        Ok(peer == "198.19.1.2")
    })?;
    ensure!(
        excluded,
        "port 9999 still captured after the MeshConfig (peer {peer})"
    );
    Ok(())
}

const SECURITY_OBJECTS: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plain, namespace: mesh}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [plain]}}]}]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: permissive, namespace: mesh}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: sidenode.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: limits, namespace: mesh}
spec: {connections: {tokenBucket: {maxTokens: 1000, fillInterval: 1s}}}
---
apiVersion: sidenode.io/v1alpha1
kind: MeshConfig
metadata: {name: default}
spec: {excludePorts: [9999]}
"#;

/// `mesh-node state --json` as `node` sees it (its own token, from its netns).
fn node_state(c: &TestCluster, node: &str) -> Result<serde_json::Value> {
    let out = c
        .node_command(node, mesh_node_path())?
        .args(["state", "--json", "--controller", &c.controller_addr()])
        .arg("--controller-ca")
        .arg(c.controller_ca())
        .arg("--token-file")
        .arg(c.token_path(node))
        .output()
        .context("mesh-node state")?;
    ensure!(
        out.status.success(),
        "mesh-node state: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("mesh-node state --json output")
}

/// A controller replica run by the test against `kube` (loopback), with its own state folder.
struct Replica {
    child: Child,
    log: PathBuf,
}

impl Replica {
    fn start(kube: &KubeEnv, name: &'static str, port: u16) -> Result<Replica> {
        let dir = kube.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("controller.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(mesh_node_path())
            .args(["controller", "--kubernetes", "--kubeconfig"])
            .arg(&kube.kubeconfig)
            .args(["--namespace", SYSTEM_NS, "--pod-name", name])
            .args([
                "--lease-duration",
                "3s",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting a controller")?;
        Ok(Replica { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Lease's holder ("" when released); a kubectl failure (no Lease yet, no API server) is
/// an error, never an empty holder.
fn lease_holder(kube: &KubeEnv) -> Result<String> {
    Ok(kube
        .kubectl(&[
            "get",
            "lease",
            "sidenode-controller",
            "-n",
            SYSTEM_NS,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?
        .trim()
        .to_string())
}

fn root_cert_in(kube: &KubeEnv, ns: &str) -> Result<Option<String>> {
    let out = kube.kubectl(&[
        "get",
        "configmap",
        "sidenode-ca-root-cert",
        "-n",
        ns,
        "-o",
        "jsonpath={.data.root-cert\\.pem}",
        "--ignore-not-found",
    ])?;
    Ok(Some(out).filter(|s| s.contains("BEGIN CERTIFICATE")))
}

#[test]
fn leader_election_hands_over_when_the_leader_stops() -> Result<()> {
    let _turn = serial();
    require_root();
    let kube = KubeEnv::start(&unique_prefix('l'))?;
    kube.kubectl(&["create", "namespace", SYSTEM_NS])?;
    let a = Replica::start(&kube, "ctl-a", 25012)?;
    kube.wait_for("ctl-a to lead", Duration::from_secs(20), || {
        Ok((lease_holder(&kube)? == "ctl-a").then_some(()))
    })
    .with_context(|| a.log())?;
    let mut b = Replica::start(&kube, "ctl-b", 25013)?;
    // Both replicas serve with one CA (the Secret the first created).
    let root_a = kube.wait_for("ctl-a's root cert", Duration::from_secs(10), || {
        Ok(std::fs::read_to_string(kube.dir.join("ctl-a/state/root-cert.pem")).ok())
    })?;
    let root_b = kube
        .wait_for("ctl-b's root cert", Duration::from_secs(20), || {
            Ok(std::fs::read_to_string(kube.dir.join("ctl-b/state/root-cert.pem")).ok())
        })
        .with_context(|| b.log())?;
    ensure!(root_a == root_b, "the replicas use different CAs");
    // The leader (only) publishes the root certificate in every namespace.
    let published = kube.wait_for(
        "root cert ConfigMap in default",
        Duration::from_secs(10),
        || root_cert_in(&kube, "default"),
    )?;
    ensure!(
        published.trim() == root_a.trim(),
        "published root differs from the CA's"
    );
    kube.wait_for("ctl-b serving", Duration::from_secs(20), || {
        Ok(b.log().contains("controller ready").then_some(()))
    })?;
    ensure!(
        lease_holder(&kube)? == "ctl-a",
        "ctl-b took the lease from a live leader"
    );
    ensure!(
        !b.log().contains("became the leader"),
        "ctl-b led while ctl-a was alive"
    );

    // SIGKILL the leader (no release): ctl-b takes over once the lease runs out (3 s).
    let t = Instant::now();
    drop(a);
    kube.wait_for("ctl-b to lead", Duration::from_secs(15), || {
        Ok((lease_holder(&kube)? == "ctl-b").then_some(()))
    })
    .with_context(|| b.log())?;
    eprintln!("handover {:?} after the leader was killed", t.elapsed());
    // The new leader does the leader's work: a new namespace gets the ConfigMap.
    kube.kubectl(&["create", "namespace", "after-handover"])?;
    kube.wait_for(
        "root cert ConfigMap in after-handover",
        Duration::from_secs(10),
        || root_cert_in(&kube, "after-handover"),
    )
    .with_context(|| b.log())?;

    // A graceful stop releases the lease at once.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(b.child.id() as i32, libc::SIGTERM) };
    let _ = b.child.wait();
    ensure!(
        b.log().contains("released the leader lease"),
        "ctl-b did not release the lease on SIGTERM:\n{}",
        b.log()
    );
    ensure!(
        lease_holder(&kube)?.is_empty(),
        "lease still held after release"
    );
    Ok(())
}

/// `mesh-node state` against a controller on loopback with `token`: Ok(stdout) or Err(stderr).
fn state_with_token(kube: &KubeEnv, port: u16, ca: &Path, token: &str) -> Result<String, String> {
    let file = kube.dir.join(format!("token-{}", token.len()));
    std::fs::write(&file, token).map_err(|e| e.to_string())?;
    let out = Command::new(mesh_node_path())
        .args([
            "state",
            "--json",
            "--controller",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--controller-ca")
        .arg(ca)
        .arg("--token-file")
        .arg(&file)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn the_controller_accepts_only_tokens_that_prove_a_node_or_a_workload() -> Result<()> {
    let _turn = serial();
    require_root();
    let kube = KubeEnv::start(&unique_prefix('a'))?;
    kube.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {SYSTEM_NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sidenode-agent, namespace: {SYSTEM_NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: intruder, namespace: {SYSTEM_NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sidenode-n1, namespace: {SYSTEM_NS}}}
spec:
  nodeName: n1
  serviceAccountName: sidenode-agent
  containers: [{{name: agent, image: sidenode/mesh-node}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: intruder-n1, namespace: {SYSTEM_NS}}}
spec:
  nodeName: n1
  serviceAccountName: intruder
  containers: [{{name: app, image: intruder}}]
"#
    ))?;
    let ctl = Replica::start(&kube, "ctl", 25014)?;
    let ca = kube.dir.join("ctl/state/root-cert.pem");
    kube.wait_for("controller ready", Duration::from_secs(20), || {
        Ok(ctl.log().contains("controller ready").then_some(()))
    })
    .with_context(|| ctl.log())?;
    let token = |sa: &str, bound: bool, audience: &str| -> Result<String> {
        let pod = if sa == "intruder" {
            "intruder-n1"
        } else {
            "sidenode-n1"
        };
        let mut args = vec![
            "create",
            "token",
            sa,
            "-n",
            SYSTEM_NS,
            "--audience",
            audience,
        ];
        if bound {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        Ok(kube.kubectl(&args)?.trim().to_string())
    };

    // The agent's account, bound to a pod on a node: accepted.
    let good = state_with_token(
        &kube,
        25014,
        &ca,
        &token("sidenode-agent", true, "sidenode")?,
    );
    ensure!(good.is_ok(), "a bound agent token was refused: {good:?}");
    // Another service account's token, bound to its pod: that one workload (the ingress
    // gateway's case). It may read the state; certificates only for its own identity (the
    // controller's unit tests: `grpc::tests`).
    let workload = state_with_token(&kube, 25014, &ca, &token("intruder", true, "sidenode")?);
    ensure!(
        workload.is_ok(),
        "a bound workload token was refused: {workload:?}"
    );
    ensure!(
        ctl.log()
            .contains("pod sidenode-system/intruder-n1 (service account intruder, node n1)"),
        "the workload caller is not logged as itself:\n{}",
        ctl.log()
    );
    // Everything else is refused, with the reason.
    for (what, tok, reason) in [
        (
            "another service account's token bound to no pod",
            token("intruder", false, "sidenode")?,
            "not bound to a pod",
        ),
        (
            "a token bound to no pod",
            token("sidenode-agent", false, "sidenode")?,
            "not bound to a pod",
        ),
        (
            "a token for another audience",
            token("sidenode-agent", true, "someone-else")?,
            "not authenticated",
        ),
        ("garbage", "not-a-token".to_string(), "not authenticated"),
    ] {
        match state_with_token(&kube, 25014, &ca, &tok) {
            Ok(_) => bail!("{what} was accepted"),
            Err(e) => ensure!(
                e.contains(reason),
                "{what}: refused for another reason: {e}"
            ),
        }
    }
    Ok(())
}

/// The Gateway API kinds the status test needs, as minimal CRDs (any fields, a status
/// subresource). The 1.20 test API server refuses the Gateway API v1.3.0 CRDs themselves
/// (checked: `x-kubernetes-validations` is not in its schema, and `default: ""` on
/// `certificateRefs[].group` is rejected as "null").
const GATEWAY_API_TEST_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gatewayclasses.gateway.networking.k8s.io
  annotations: {api-approved.kubernetes.io: "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
spec:
  group: gateway.networking.k8s.io
  scope: Cluster
  names: {kind: GatewayClass, plural: gatewayclasses, singular: gatewayclass, listKind: GatewayClassList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gateways.gateway.networking.k8s.io
  annotations: {api-approved.kubernetes.io: "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
spec:
  group: gateway.networking.k8s.io
  scope: Namespaced
  names: {kind: Gateway, plural: gateways, singular: gateway, listKind: GatewayList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: httproutes.gateway.networking.k8s.io
  annotations: {api-approved.kubernetes.io: "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
spec:
  group: gateway.networking.k8s.io
  scope: Namespaced
  names: {kind: HTTPRoute, plural: httproutes, singular: httproute, listKind: HTTPRouteList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: referencegrants.gateway.networking.k8s.io
  annotations: {api-approved.kubernetes.io: "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
spec:
  group: gateway.networking.k8s.io
  scope: Namespaced
  names: {kind: ReferenceGrant, plural: referencegrants, singular: referencegrant, listKind: ReferenceGrantList}
  versions:
  - name: v1beta1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

/// `kubectl get <what> -o jsonpath=<path>`, trimmed ("" when absent).
fn jsonpath(kube: &KubeEnv, what: &[&str], path: &str) -> Result<String> {
    let mut args = vec!["get"];
    args.extend(what);
    let p = format!("jsonpath={path}");
    args.extend(["-o", &p]);
    Ok(kube.kubectl(&args)?.trim().to_string())
}

#[test]
fn the_leader_writes_gateway_api_status() -> Result<()> {
    let _turn = serial();
    require_root();
    let kube = KubeEnv::start(&unique_prefix('g'))?;
    kube.apply(GATEWAY_API_TEST_CRDS)?;
    for crd in [
        "gatewayclasses",
        "gateways",
        "httproutes",
        "referencegrants",
    ] {
        let name = format!("{crd}.gateway.networking.k8s.io");
        kube.wait_for(&format!("CRD {name}"), Duration::from_secs(30), || {
            let s = jsonpath(
                &kube,
                &["crd", &name],
                "{.status.conditions[?(@.type==\"Established\")].status}",
            )?;
            Ok((s == "True").then_some(()))
        })?;
    }
    kube.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {SYSTEM_NS}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: edge}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: certs}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: shop}}
spec: {{ports: [{{port: 80, protocol: TCP}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: sidenode}}
spec: {{controllerName: sidenode.io/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: theirs}}
spec: {{controllerName: example.com/theirs}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web, namespace: edge}}
spec:
  gatewayClassName: sidenode
  listeners:
  - {{name: http, port: 80, protocol: HTTP}}
  - name: https
    port: 443
    protocol: HTTPS
    tls: {{certificateRefs: [{{name: shared-cert, namespace: certs}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: shop}}
spec:
  parentRefs: [{{name: web, namespace: edge}}]
  rules:
  - backendRefs: [{{name: shop, port: 80}}, {{name: gone, port: 80}}]
"#
    ))?;
    let ctl = Replica::start(&kube, "ctl", 25015)?;
    let wait = |what: &str, obj: &[&str], path: &str, want: &str| -> Result<()> {
        kube.wait_for(what, Duration::from_secs(20), || {
            Ok((jsonpath(&kube, obj, path)? == want).then_some(()))
        })
        .with_context(|| {
            format!(
                "{}\n{}",
                jsonpath(&kube, obj, "{.status}").unwrap_or_default(),
                ctl.log()
            )
        })
    };
    let cond = |t: &str, field: &str| format!("{{.status.conditions[?(@.type==\"{t}\")].{field}}}");
    wait(
        "GatewayClass sidenode Accepted",
        &["gatewayclass", "sidenode"],
        &cond("Accepted", "status"),
        "True",
    )?;
    ensure!(
        jsonpath(&kube, &["gatewayclass", "theirs"], "{.status}")?.is_empty(),
        "another controller's class got a status"
    );
    let gw = ["gateway", "web", "-n", "edge"];
    wait(
        "Gateway Programmed",
        &gw,
        &cond("Programmed", "status"),
        "True",
    )?;
    let listener = |name: &str, t: &str, field: &str| {
        format!(
            "{{.status.listeners[?(@.name==\"{name}\")].conditions[?(@.type==\"{t}\")].{field}}}"
        )
    };
    wait(
        "listener https RefNotPermitted",
        &gw,
        &listener("https", "ResolvedRefs", "reason"),
        "RefNotPermitted",
    )?;
    ensure!(jsonpath(&kube, &gw, &listener("http", "Programmed", "status"))? == "True");
    ensure!(
        jsonpath(
            &kube,
            &gw,
            "{.status.listeners[?(@.name==\"http\")].attachedRoutes}"
        )? == "1"
    );
    let route = ["httproute", "shop", "-n", "shop"];
    let parent = |t: &str, field: &str| {
        format!("{{.status.parents[0].conditions[?(@.type==\"{t}\")].{field}}}")
    };
    wait(
        "route Accepted",
        &route,
        &parent("Accepted", "status"),
        "True",
    )?;
    wait(
        "route BackendNotFound",
        &route,
        &parent("ResolvedRefs", "reason"),
        "BackendNotFound",
    )?;
    ensure!(
        jsonpath(&kube, &route, "{.status.parents[0].controllerName}")?
            == "sidenode.io/gateway-controller"
    );
    let since = jsonpath(&kube, &gw, &cond("Programmed", "lastTransitionTime"))?;
    let version = jsonpath(&kube, &gw, "{.metadata.resourceVersion}")?;

    // A ReferenceGrant in the Secret's namespace: the listener's reference resolves.
    kube.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: gateways, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}]
  to: [{group: "", kind: Secret}]
"#,
    )?;
    wait(
        "listener https ResolvedRefs",
        &gw,
        &listener("https", "ResolvedRefs", "status"),
        "True",
    )?;
    ensure!(
        jsonpath(&kube, &gw, &cond("Programmed", "lastTransitionTime"))? == since,
        "an unchanged condition got a new lastTransitionTime"
    );
    ensure!(
        jsonpath(&kube, &gw, "{.metadata.resourceVersion}")? != version,
        "the status was not rewritten"
    );
    // Nothing changes from here on: nothing is written.
    let settled = jsonpath(&kube, &gw, "{.metadata.resourceVersion}")?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        jsonpath(&kube, &gw, "{.metadata.resourceVersion}")? == settled,
        "the status is rewritten without a change:\n{}",
        ctl.log()
    );
    Ok(())
}
