//! End-to-end tests on a real two-node Kubernetes 1.20 cluster (kubelet + containerd + runc +
//! bridge CNI + kube-proxy per node, `sidenode_tests::realnode`): the shipped manifests through
//! `deploy/kubernetes/overlays/testenv`, real pods, real containers.
//!
//! One cluster is shared by every check (bringing it up costs ~30 s): a single `#[test]` runs
//! the [`STEPS`] in order, each a function of the shared [`Ctx`]. To add a check, write
//! `fn my_check(cx: &mut Ctx) -> Result<()>` and put it in [`STEPS`] where the state it needs
//! exists (the `shop` namespace enrolled, `client` on node 1, `echo` on node 2, ...).
//! Run as root: `cargo test -p sidenode-tests --test realnode` (`SIDENODE_KEEP_REAL=1` keeps the
//! cluster for a look afterwards; `cargo xtask cluster down --real --prefix P` removes it).

mod common;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sidenode_tests::cluster::unique_prefix;
use sidenode_tests::realnode::{MESH_NS, RealCluster, WORKLOAD_IMAGE};
use sidenode_tests::workload::{DialReport, mesh_node_path};
use std::collections::BTreeMap;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

const NS: &str = "shop";
const CLIENT: &str = "client";
const ECHO: &str = "echo";
const ECHO_PORT: u16 = 8080;
const SERVICE_IP: &str = "198.18.130.10";
const LABEL: &str = "sidenode.io/dataplane-mode";
const WAIT: Duration = Duration::from_secs(60);

/// What the steps share.
pub struct Ctx {
    pub c: RealCluster,
    /// Pod name → IP.
    pub ips: BTreeMap<String, String>,
    /// Pod name → (containerID, restartCount) before enrollment.
    pub containers: BTreeMap<String, (String, i64)>,
}

type Step = fn(&mut Ctx) -> Result<()>;

/// The checks, in order.
const STEPS: &[(&str, Step)] = &[
    ("mesh deployed: controller and DaemonSet Ready", mesh_ready),
    ("workloads running (not enrolled)", workloads),
    ("labelling the namespace enrolls running pods", enroll),
    ("kubectl exec ... mesh-node maps", maps_cli),
    (
        "cross-node connection over HBONE, both identities",
        cross_node_hbone,
    ),
    (
        "meshed destination sees the client pod's address",
        client_address_kept,
    ),
    (
        "a pod's first connection is captured (CNI plugin)",
        first_connect_captured,
    ),
    ("ClusterIP Service routed by the mesh", service_routed),
    ("DaemonSet rolling update: no capture gap", rolling_update),
    ("deleted pod leaves no map entries", deleted_pod),
    ("unlabelling the namespace releases its pods", unlabel),
    (
        "ingress gateway Deployment: HTTPS with an API Secret, over HBONE",
        ingress_gateway,
    ),
];

#[test]
fn real_cluster() -> Result<()> {
    common::require_root();
    let prefix = unique_prefix('r');
    let t0 = Instant::now();
    // testpod as cargo built it for this test; mesh-node as the other e2e tests take it.
    let c = RealCluster::up_with(&prefix, 2, &mesh_node_path(), &common::testpod())
        .context("bringing up the real cluster")?;
    eprintln!("[realnode] cluster {prefix} up in {:.1?}", t0.elapsed());
    let mut cx = Ctx {
        c,
        ips: BTreeMap::new(),
        containers: BTreeMap::new(),
    };
    for (name, step) in STEPS {
        let t = Instant::now();
        step(&mut cx).with_context(|| {
            format!(
                "step '{name}' (logs: {} and {})",
                cx.c.node_logs(1).display(),
                cx.c.node_logs(2).display()
            )
        })?;
        eprintln!("[realnode] ok: {name} ({:.1?})", t.elapsed());
    }
    let t = Instant::now();
    cx.c.down();
    eprintln!("[realnode] torn down in {:.1?}", t.elapsed());
    Ok(())
}

fn mesh_ready(cx: &mut Ctx) -> Result<()> {
    cx.c.deploy_mesh()?;
    // Each node's agent attached to its own kubelet's cgroup root, found below the cgroup2
    // mount it discovered itself (hybrid here: /sys/fs/cgroup/unified).
    for i in 1..=2 {
        let pod = cx.c.node_pod(i)?;
        let log =
            cx.c.kubectl(&["logs", "-n", MESH_NS, &pod, "-c", "agent"])?;
        let want = format!("cgroup=/sys/fs/cgroup/unified/{}", cx.c.node_name(i));
        let root_ok = log.contains(&want) || {
            // A pure v2 host: the mount is /sys/fs/cgroup itself.
            log.contains(&format!("cgroup=/sys/fs/cgroup/{} ", cx.c.node_name(i)))
        };
        ensure!(root_ok, "node {i}: agent log has no '{want}':\n{log}");
        let init =
            cx.c.kubectl(&["logs", "-n", MESH_NS, &pod, "-c", "mount-bpffs"])?;
        // Node 1 starts with a private bpffs, node 2 with none (kube-testenv.sh real-up).
        let want = if i == 1 {
            "made it shared"
        } else {
            "mounted one"
        };
        ensure!(init.contains(want), "node {i}: mount-bpffs said {init:?}");
    }
    Ok(())
}

fn workloads_yaml(c: &RealCluster) -> String {
    let pod = |name: &str, node: usize, cmd: &str, probe: bool| {
        let probe = if probe {
            format!("\n    readinessProbe: {{tcpSocket: {{port: {ECHO_PORT}}}, periodSeconds: 1}}")
        } else {
            String::new()
        };
        format!(
            r#"---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}}}
spec:
  nodeName: {node}
  serviceAccountName: {name}
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: {WORKLOAD_IMAGE}
    imagePullPolicy: Never
    command: {cmd}{probe}
"#,
            node = c.node_name(node)
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n{}{}---
apiVersion: v1
kind: Service
metadata: {{name: {ECHO}, namespace: {NS}}}
spec:
  clusterIP: {SERVICE_IP}
  selector: {{app: {ECHO}}}
  ports:
  - {{name: tcp-echo, port: 80, targetPort: {ECHO_PORT}}}
",
        pod(CLIENT, 1, r#"[/bin/busybox, sleep, "100000"]"#, false),
        pod(
            ECHO,
            2,
            &format!(r#"[/usr/local/bin/testpod, serve, --port, "{ECHO_PORT}"]"#),
            true
        ),
    )
}

fn pod_json(cx: &Ctx, pod: &str) -> Result<Value> {
    cx.c.get_json(&["-n", NS, "pod", pod])
}

fn container_state(p: &Value) -> Result<(String, i64)> {
    let s = &p["status"]["containerStatuses"][0];
    Ok((
        s["containerID"]
            .as_str()
            .context("no containerID")?
            .to_string(),
        s["restartCount"].as_i64().context("no restartCount")?,
    ))
}

fn workloads(cx: &mut Ctx) -> Result<()> {
    cx.c.apply(&workloads_yaml(&cx.c))?;
    for pod in [CLIENT, ECHO] {
        let (ip, state) = cx.c.wait_for(&format!("pod {NS}/{pod} Ready"), WAIT, || {
            let p = pod_json(cx, pod)?;
            let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            match (ready, p["status"]["podIP"].as_str()) {
                (true, Some(ip)) => Ok(Some((ip.to_string(), container_state(&p)?))),
                _ => Ok(None),
            }
        })?;
        cx.ips.insert(pod.to_string(), ip);
        cx.containers.insert(pod.to_string(), state);
    }
    // Not enrolled yet: no annotation, nothing in the maps.
    for (i, pod) in [(1, CLIENT), (2, ECHO)] {
        let p = pod_json(cx, pod)?;
        ensure!(
            p["metadata"]["annotations"]["sidenode.io/redirection"].is_null(),
            "{pod} annotated before its namespace was labelled"
        );
        ensure!(
            enrolled(&cx.c.maps_json(i)?, pod).is_none(),
            "{pod} in node {i}'s maps before enrollment"
        );
    }
    Ok(())
}

/// The `enrolled` entry of `pod` (namespace [`NS`]) in a `maps --json` view.
fn enrolled<'a>(maps: &'a Value, pod: &str) -> Option<&'a Value> {
    maps["enrolled"]
        .as_array()?
        .iter()
        .find(|e| e["namespace"] == NS && e["pod"] == pod)
}

fn enroll(cx: &mut Ctx) -> Result<()> {
    cx.c.kubectl(&["label", "namespace", NS, &format!("{LABEL}=enabled")])?;
    for (i, pod) in [(1, CLIENT), (2, ECHO)] {
        let ip = cx.ips[pod].clone();
        cx.c.wait_for(&format!("{pod} enrolled on node {i}"), WAIT, || {
            let p = pod_json(cx, pod)?;
            let annotated = p["metadata"]["annotations"]["sidenode.io/redirection"] == "enabled";
            let maps = cx.c.maps_json(i)?;
            let in_maps = enrolled(&maps, pod).is_some_and(|e| e["ip"] == ip.as_str());
            Ok((annotated && in_maps).then_some(()))
        })?;
        // Enrolled while running: the same container, never restarted.
        let now = container_state(&pod_json(cx, pod)?)?;
        ensure!(
            now == cx.containers[pod],
            "{pod}: container {:?} before enrollment, {now:?} after",
            cx.containers[pod]
        );
    }
    Ok(())
}

fn maps_cli(cx: &mut Ctx) -> Result<()> {
    let pod = cx.c.node_pod(1)?;
    let out = cx.c.exec(MESH_NS, &pod, "agent", &["mesh-node", "maps"])?;
    ensure!(
        out.contains("ENROLLED WORKLOADS (1)") && out.contains(CLIENT) && out.contains(NS),
        "mesh-node maps on node 1:\n{out}"
    );
    Ok(())
}

/// `testpod dial` in the client pod: the report.
fn dial(cx: &Ctx, to: &str, conns: usize) -> Result<DialReport> {
    let out = cx.c.exec(
        NS,
        CLIENT,
        "main",
        &[
            "/usr/local/bin/testpod",
            "dial",
            "--to",
            to,
            "--conns",
            &conns.to_string(),
            "--concurrency",
            "1",
        ],
    )?;
    let line = out.lines().last().context("testpod dial printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("testpod dial report {line:?}"))
}

fn dial_ok(cx: &Ctx, to: &str, conns: usize) -> Result<()> {
    let r = dial(cx, to, conns)?;
    let bad: Vec<_> = r.results.iter().filter(|d| !d.echo_ok).collect();
    ensure!(
        r.results.len() == conns && bad.is_empty(),
        "dial {to}: {} of {conns} echoed; failures {bad:?}",
        r.results.len() - bad.len()
    );
    Ok(())
}

/// Sum of the samples of `metric` whose labels include every `want` pair.
fn metric_sum(text: &str, metric: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The SPIFFE id of a service account of the test namespace, as Istio's metrics label
/// principals (`spiffe://`).
fn principal(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/{sa}")
}

fn hbone_labels<'a>(reporter: &'a str, client: &'a str, echo: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("reporter", reporter),
        ("source_workload_namespace", NS),
        ("source_principal", client),
        ("destination_principal", echo),
        ("connection_security_policy", "mutual_tls"),
    ]
}

/// Connections opened between client and echo over mTLS, as each proxy counts them.
fn hbone_counts(cx: &Ctx, extra: &[(&str, &str)]) -> Result<(f64, f64)> {
    let (client, echo) = (principal(CLIENT), principal(ECHO));
    let mut src = hbone_labels("source", &client, &echo);
    src.extend_from_slice(extra);
    let mut dst = hbone_labels("destination", &client, &echo);
    dst.extend_from_slice(extra);
    let m = "istio_tcp_connections_opened_total";
    Ok((
        metric_sum(&cx.c.proxy_metrics(1)?, m, &src),
        metric_sum(&cx.c.proxy_metrics(2)?, m, &dst),
    ))
}

fn cross_node_hbone(cx: &mut Ctx) -> Result<()> {
    let to = format!("{}:{ECHO_PORT}", cx.ips[ECHO]);
    let captured0 = stat(&cx.c.maps_json(1)?, "captured")?;
    dial_ok(cx, &to, 3)?;
    let captured = stat(&cx.c.maps_json(1)?, "captured")? - captured0;
    ensure!(captured == 3, "node 1 captured {captured} of 3 connections");
    // Both proxies saw them as mTLS tunnels between the two pods' SPIFFE identities.
    cx.c.wait_for(
        "both proxies' metrics count 3 HBONE connections",
        WAIT,
        || {
            let (src, dst) = hbone_counts(cx, &[])?;
            if src > 3.0 || dst > 3.0 {
                bail!("more connections counted than made: source {src}, destination {dst}");
            }
            Ok((src == 3.0 && dst == 3.0).then_some(()))
        },
    )?;
    Ok(())
}

/// Issue 13 item 5 on real pods: echo (behind node 2's proxy) sees client's pod address as the
/// peer of a meshed cross-node connection, not a node's.
fn client_address_kept(cx: &mut Ctx) -> Result<()> {
    let to = format!("{}:{ECHO_PORT}", cx.ips[ECHO]);
    let r = dial(cx, &to, 1)?;
    let d = r.results.first().context("no dial result")?;
    ensure!(d.echo_ok, "dial {to}: {d:?}");
    let peer = d.server_peer.as_deref().unwrap_or_default();
    let want = format!("{}:", cx.ips[CLIENT]);
    ensure!(
        peer.starts_with(&want) && d.kept_client_address(),
        "echo saw the connection from {peer:?}, not from the client pod {} through the mesh: {d:?}",
        cx.ips[CLIENT]
    );
    Ok(())
}

/// A pod of the enrolled namespace whose very first action is to connect: the CNI plugin
/// (chained into each node's bridge configuration by the DaemonSet's `install-cni`) enrolls
/// it during `ADD`, before its container starts, so that connection is captured too.
fn first_connect_captured(cx: &mut Ctx) -> Result<()> {
    const POD: &str = "first";
    let to = format!("{}:{ECHO_PORT}", cx.ips[ECHO]);
    cx.c.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {POD}, namespace: {NS}}}
spec:
  nodeName: {node}
  serviceAccountName: {CLIENT}
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: {WORKLOAD_IMAGE}
    imagePullPolicy: Never
    command: [/usr/local/bin/testpod, dial, --to, "{to}", --conns, "1", --concurrency, "1"]
"#,
        node = cx.c.node_name(1)
    ))?;
    let phase =
        cx.c.wait_for(&format!("pod {NS}/{POD} finished"), WAIT, || {
            let p = pod_json(cx, POD)?;
            Ok(match p["status"]["phase"].as_str() {
                Some(ph @ ("Succeeded" | "Failed")) => Some(ph.to_string()),
                _ => None,
            })
        })?;
    let log = cx.c.kubectl(&["logs", "-n", NS, POD])?;
    let line = log.lines().last().context("the pod printed nothing")?;
    let r: DialReport =
        serde_json::from_str(line).with_context(|| format!("dial report {line:?}"))?;
    let d = r.results.first().context("no dial result")?;
    // Captured: a proxy, not the pod's own socket, connected to echo.
    ensure!(
        phase == "Succeeded" && d.echo_ok && d.through_proxy(),
        "the pod's first connection was not captured (phase {phase}): {d:?}"
    );
    // And carried as a mutual-TLS HBONE tunnel with the pod's identity: node 2's proxy logged
    // it as such, the client being the new pod's address. (Echo may see node 1's address for
    // it: node 2 trusts a forwarded client address only once its state has that pod, about a
    // second after ADD; docs/cni.md, "What is left".)
    let local = d.local.as_deref().context("no local address")?;
    let first_ip = local.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(local);
    let want = [
        "direction=\"inbound\"".to_string(),
        "transport=\"hbone\"".to_string(),
        "security=\"mutual_tls\"".to_string(),
        format!("src.identity={}", principal(CLIENT)),
    ];
    // The whole address: the field ends the span (`}`) or another field follows (` `).
    let client_is = |l: &str| {
        l.contains(&format!("client={first_ip}}}")) || l.contains(&format!("client={first_ip} "))
    };
    cx.c.wait_for(
        "node 2's proxy logs the tunnel of the first connection",
        WAIT,
        || {
            let log =
                cx.c.kubectl(&["logs", "-n", MESH_NS, &cx.c.node_pod(2)?, "-c", "proxy"])?;
            Ok(log
                .lines()
                .any(|l| want.iter().all(|w| l.contains(w.as_str())) && client_is(l))
                .then_some(()))
        },
    )?;
    // The agent learned of it from the plugin, not from a later scan.
    let agent =
        cx.c.kubectl(&["logs", "-n", MESH_NS, &cx.c.node_pod(1)?, "-c", "agent"])?;
    ensure!(
        agent.lines().any(|l| l.contains("CNI answer")
            && l.contains(&format!("{NS}/{POD}"))
            && l.contains("Enrolled")),
        "no CNI enrollment of {NS}/{POD} in node 1's agent log:\n{agent}"
    );
    cx.c.kubectl(&[
        "delete",
        "pod",
        "-n",
        NS,
        POD,
        "--grace-period=0",
        "--force",
    ])?;
    Ok(())
}

fn service_routed(cx: &mut Ctx) -> Result<()> {
    let to = format!("{SERVICE_IP}:80");
    dial_ok(cx, &to, 2)?;
    let svc = format!("{ECHO}.{NS}.svc.cluster.local");
    // The source proxy resolved the VIP (the Service is in its labels); the destination proxy
    // counts every tunnel to echo (3 + 1 earlier, + 2), naming echo's Service whatever was
    // dialled.
    cx.c.wait_for("2 connections to the Service counted", WAIT, || {
        let (src, _) = hbone_counts(cx, &[("destination_service", &svc)])?;
        let (_, dst) = hbone_counts(cx, &[])?;
        Ok((src == 2.0 && dst == 6.0).then_some(()))
    })?;
    Ok(())
}

fn stat(maps: &Value, name: &str) -> Result<u64> {
    maps["stats"][name]
        .as_u64()
        .with_context(|| format!("maps --json: no stats.{name} in {}", maps["stats"]))
}

/// A client connecting in a loop through `kubectl rollout restart` of the DaemonSet: every
/// connection it attempted was captured (the kernel's `captured` counter on node 1, kept in
/// the pinned maps across the agent's restart, grew by exactly the attempts).
fn rolling_update(cx: &mut Ctx) -> Result<()> {
    let captured0 = stat(&cx.c.maps_json(1)?, "captured")?;
    let to = format!("{}:{ECHO_PORT}", cx.ips[ECHO]);
    let script = format!(
        "rm -f /loop-stop; while [ ! -e /loop-stop ]; do \
         if /usr/local/bin/testpod dial --to {to} --conns 1 2>/dev/null | /bin/busybox grep -q '\"echo_ok\":true'; \
         then echo ok; else echo fail; fi; /bin/busybox sleep 0.2; done"
    );
    let mut child =
        cx.c.kubectl_command(&[
            "exec",
            "-n",
            NS,
            CLIENT,
            "-c",
            "main",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the client loop")?;
    let rollout = (|| -> Result<()> {
        // Let the loop get going before the rollout starts.
        std::thread::sleep(Duration::from_secs(2));
        cx.c.kubectl(&[
            "rollout",
            "restart",
            "-n",
            MESH_NS,
            "daemonset/sidenode-node",
        ])?;
        cx.c.kubectl(&[
            "rollout",
            "status",
            "-n",
            MESH_NS,
            "daemonset/sidenode-node",
            "--timeout",
            "180s",
        ])?;
        cx.c.wait_mesh_ready(Duration::from_secs(120))?;
        // A few more rounds after the rollout.
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    })();
    // (The image has no /tmp: its root is the container's writable layer.)
    let stop =
        cx.c.exec(NS, CLIENT, "main", &["/bin/busybox", "touch", "/loop-stop"]);
    if stop.is_err() {
        let _ = child.kill();
    }
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    let status = child.wait().context("waiting for the client loop")?;
    rollout?;
    stop?;
    ensure!(status.success(), "client loop: {status}");
    let ok = out.lines().filter(|l| *l == "ok").count() as u64;
    let fail = out.lines().filter(|l| *l == "fail").count() as u64;
    let captured = stat(&cx.c.maps_json(1)?, "captured")? - captured0;
    eprintln!(
        "[realnode] rolling update: {ok} connections echoed, {fail} failed, {captured} captured"
    );
    ensure!(ok + fail > 0, "the client loop made no connection");
    ensure!(
        captured == ok + fail,
        "{} connections attempted during the rollout, {captured} captured: some escaped capture",
        ok + fail
    );
    // The mesh carries traffic again after the rollout.
    dial_ok(cx, &to, 2)?;
    Ok(())
}

fn deleted_pod(cx: &mut Ctx) -> Result<()> {
    cx.c.kubectl(&[
        "delete",
        "pod",
        "-n",
        NS,
        CLIENT,
        "--grace-period=0",
        "--force",
        "--wait=true",
    ])?;
    let ip = cx.ips[CLIENT].clone();
    cx.c.wait_for("no map entry of the deleted pod on node 1", WAIT, || {
        let maps = cx.c.maps_json(1)?;
        let left_enrolled = enrolled(&maps, CLIENT).is_some();
        let left_orig = maps["orig_dst"].as_array().is_some_and(|a| {
            a.iter().any(|e| {
                e["pod"] == CLIENT
                    || e["client"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(&format!("{ip}:")))
            })
        });
        Ok((!left_enrolled && !left_orig).then_some(()))
    })?;
    Ok(())
}

fn unlabel(cx: &mut Ctx) -> Result<()> {
    cx.c.kubectl(&["label", "namespace", NS, &format!("{LABEL}-")])?;
    cx.c.wait_for("echo released on node 2", WAIT, || {
        let p = pod_json(cx, ECHO)?;
        let annotated = !p["metadata"]["annotations"]["sidenode.io/redirection"].is_null();
        let in_maps = enrolled(&cx.c.maps_json(2)?, ECHO).is_some();
        Ok((!annotated && !in_maps).then_some(()))
    })?;
    let now = container_state(&pod_json(cx, ECHO)?)?;
    ensure!(
        now == cx.containers[ECHO],
        "echo: container {:?} before, {now:?} after release",
        cx.containers[ECHO]
    );
    Ok(())
}

/// The gateway's overlay for this environment (no Gateway API CRDs on 1.20, ports > 1024).
const GATEWAY_OVERLAY: &str = "deploy/kubernetes/overlays/testenv-gateway";
const GATEWAY_NS: &str = "istio-ingress";
const EDGE_NS: &str = "edge-apps";

/// The gateway as users install it (`components/gateway`): its pod authenticates to the
/// controller with its own bound token, reads its certificate from a Secret through the API,
/// serves an Istio Gateway + VirtualService from the API, and reaches a meshed pod on node 2
/// over HBONE with its own identity.
fn ingress_gateway(cx: &mut Ctx) -> Result<()> {
    let web = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {EDGE_NS}, labels: {{{LABEL}: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {EDGE_NS}, labels: {{app: web}}}}
spec:
  nodeName: {node2}
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: {WORKLOAD_IMAGE}
    imagePullPolicy: Never
    command: [/usr/local/bin/testpod, http-serve, --port, "9080", --name, web]
    readinessProbe: {{tcpSocket: {{port: 9080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {EDGE_NS}}}
spec:
  clusterIP: 198.18.130.11
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 9080}}
"#,
        node2 = cx.c.node_name(2)
    );
    cx.c.apply(&web)?;
    let overlay = sidenode_tests::realnode::repo_path(GATEWAY_OVERLAY);
    cx.c.kubectl(&["apply", "-k", &overlay.to_string_lossy()])?;
    let gw_ip = cx.c.wait_for("the gateway pod Ready", WAIT, || {
        let pods = cx.c.get_json(&[
            "-n",
            GATEWAY_NS,
            "pods",
            "-l",
            "app.kubernetes.io/name=sidenode-gateway",
        ])?;
        let ready = |p: &Value| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        };
        Ok(pods["items"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| ready(p)))
            .and_then(|p| p["status"]["podIP"].as_str())
            .map(str::to_string))
    })?;
    let ca = sidenode_tests::tls::TestCa::new("realnode gateway CA")?;
    let pair = ca.server_cert(&["web.example.com"])?;
    let dir = std::env::temp_dir().join(format!("sidenode-realgw-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca_file = dir.join("ca.pem");
    ca.write_cert(&ca_file)?;
    cx.c.apply(&format!(
        "{}---\n{}",
        sidenode_tests::tls::tls_secret_yaml(GATEWAY_NS, "web-cert", &pair),
        format_args!(
            r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: web, namespace: {GATEWAY_NS}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8443, name: https, protocol: HTTPS}}
    hosts: ["web.example.com"]
    tls: {{mode: SIMPLE, credentialName: web-cert}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: {EDGE_NS}}}
spec:
  hosts: ["web.example.com"]
  gateways: ["{GATEWAY_NS}/web"]
  http:
  - route:
    - destination: {{host: web.{EDGE_NS}.svc.cluster.local}}
"#
        )
    ))?;
    let resolve = format!("web.example.com:8443:{gw_ip}");
    let ca_arg = ca_file.display().to_string();
    let mut last = String::new();
    let served = cx.c.wait_for("HTTPS through the gateway", WAIT, || {
        let out =
            cx.c.node_command(1, "curl")
                .args([
                    "-sS",
                    "-i",
                    "--max-time",
                    "5",
                    "--cacert",
                    &ca_arg,
                    "--resolve",
                    &resolve,
                    "https://web.example.com:8443/hello",
                ])
                .output()?;
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success() && last.starts_with("HTTP/2 200")).then(|| last.clone()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let out = served.with_context(|| {
        let logs =
            cx.c.kubectl(&[
                "logs",
                "-n",
                GATEWAY_NS,
                "deploy/sidenode-gateway",
                "--tail",
                "30",
            ])
            .unwrap_or_default();
        format!("last answer: {last}\ngateway log:\n{logs}")
    })?;
    ensure!(out.ends_with("web"), "{out}");
    ensure!(out.contains(&format!("x-testpod-peer: {gw_ip}:")), "{out}");
    // Node 2's proxy took the tunnel from the gateway's identity, with mutual TLS.
    let principal = format!("spiffe://cluster.local/ns/{GATEWAY_NS}/sa/sidenode-gateway");
    let n = metric_sum(
        &cx.c.proxy_metrics(2)?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &principal),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    ensure!(n >= 1.0, "node 2 counted no tunnel from {principal}");
    Ok(())
}
