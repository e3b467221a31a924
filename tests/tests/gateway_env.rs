//! The simulated cluster's ingress-gateway environment (`ClusterOpts::gateway`, `cargo xtask
//! cluster up --mesh --gateway`). First without the gateway itself: a stand-in `mesh-node` (a
//! shell script printing its readiness line) shows how `mesh-node gateway` is started; testpod,
//! curl and openssl show the wiring: outside reaches the gateway's own addresses and nothing
//! else, the gateway reaches pods on every node and they answer it, the gateway does not
//! forward, the Pod object and the TLS Secret helpers are what the controller and gateway read,
//! and everything is removed afterwards (root, no mesh-node needed). Then one smoke test with
//! the real `mesh-node gateway` (built mesh-node needed).
//! Run: `cargo test -p sidenode-tests --test gateway_env`.

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use sidenode_tests::cluster::{
    Cluster, ClusterOpts, GATEWAY, GATEWAY_CLUSTER_IP, GATEWAY_OUTSIDE_IP, OUTSIDE_IP, TestCluster,
    cgroup2_mount, unique_prefix,
};
use sidenode_tests::tls::TestCa;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `testpod http-serve --port <port> --name <name>` in the gateway's namespace.
fn serve_in_gateway(c: &Cluster, port: u16, name: &str) -> Result<Proc> {
    let mut cmd = c.gateway_command(testpod())?;
    cmd.args(["http-serve", "--port", &port.to_string(), "--name", name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Proc(cmd.spawn().context("starting testpod in the gateway")?);
    let out = child.0.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    ensure!(line.trim() == "serving", "testpod: {line:?}");
    Ok(child)
}

#[test]
fn gateway_and_outside_namespaces_are_wired_and_removed() -> Result<()> {
    require_root();
    let prefix = unique_prefix('g');
    let dir = std::env::temp_dir().join(format!("sidenode-fake-{prefix}"));
    std::fs::create_dir_all(&dir)?;
    let fake = dir.join("mesh-node");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"$1 args: $*\"\necho \"$1 ready\"\nwhile :; do sleep 1; done\n",
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut c = TestCluster::up(ClusterOpts {
        prefix: prefix.clone(),
        nodes: 2,
        pods: 1,
        mesh_node: fake.clone(),
        start_agents: true,
        mesh: true,
        gateway: true,
        gateway_args: vec!["--class".into(), "sidenode".into()],
        ..Default::default()
    })?;

    // Status: what `cluster status --json` prints.
    let st: serde_json::Value = serde_json::from_str(&c.status_json()?)?;
    let gw = &st["gateway"];
    ensure!(gw["netns"] == format!("{prefix}-gw"), "{st}");
    ensure!(gw["ip"] == GATEWAY_OUTSIDE_IP && gw["cluster_ip"] == GATEWAY_CLUSTER_IP);
    ensure!(gw["http_port"] == 80 && gw["https_port"] == 443, "{gw}");
    ensure!(st["outside"]["netns"] == format!("{prefix}-out") && st["outside"]["ip"] == OUTSIDE_IP);
    // The reloaded state has it too (xtask `status` reads it back).
    ensure!(Cluster::load(&prefix)?.status() == c.status());

    // How the gateway was started: in its namespace, as the pod, with node 1's token.
    let line = c.wait_for_log(GATEWAY, GATEWAY, "args:", Duration::from_secs(1))?;
    let config = c.status().config_dir.display().to_string();
    for want in [
        "gateway --controller 198.18.0.254:15012 --controller-ca",
        &format!("--token-file /run/sidenode-{prefix}/tokens/node1"),
        "--namespace istio-ingress --pod sidenode-gateway --service-account sidenode-gateway",
        "--labels istio=ingressgateway,app=sidenode-gateway",
        &format!("--secrets-dir {config}"),
        "--admin 127.0.0.1:15000 --metrics 198.19.1.254:15020 --class sidenode",
    ] {
        ensure!(line.contains(want), "gateway args lack {want:?}: {line}");
    }
    let gw_pid = c.pid(GATEWAY, GATEWAY).context("gateway pid")?;
    let in_ns = std::process::Command::new("ip")
        .args(["netns", "pids", &format!("{prefix}-gw")])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&in_ns.stdout)
            .split_whitespace()
            .any(|p| p == gw_pid.to_string()),
        "the gateway (pid {gw_pid}) is not in {prefix}-gw"
    );
    let procs = std::fs::read_to_string(c.gateway_cgroup().join("cgroup.procs"))?;
    ensure!(
        procs.contains(&gw_pid.to_string()),
        "gateway cgroup: {procs:?}"
    );

    // The objects the controller reads.
    let yaml = std::fs::read_to_string(c.status().config_dir.join("gateway.yaml"))?;
    for want in [
        "kind: Namespace\nmetadata:\n  name: \"istio-ingress\"\n---",
        "kind: ServiceAccount",
        "name: \"sidenode-gateway\"\n  namespace: \"istio-ingress\"",
        "\"istio\": \"ingressgateway\"",
        "\"app\": \"sidenode-gateway\"",
        &format!("\"sidenode.io/netns\": \"/var/run/netns/{prefix}-gw\""),
        "nodeName: \"node1\"",
        "serviceAccountName: \"sidenode-gateway\"",
        "podIP: \"198.19.1.254\"",
    ] {
        ensure!(yaml.contains(want), "gateway.yaml lacks {want:?}:\n{yaml}");
    }
    ensure!(
        !yaml.contains("dataplane-mode"),
        "istio-ingress is enrolled:\n{yaml}"
    );

    // No forwarding in the gateway's namespace.
    let fwd = c
        .gateway_command("sysctl")?
        .args(["-n", "net.ipv4.ip_forward"])
        .output()?;
    ensure!(String::from_utf8_lossy(&fwd.stdout).trim() == "0");

    // Outside reaches the gateway's addresses.
    let _gw_srv = serve_in_gateway(&c, 8080, "gw")?;
    for ip in [GATEWAY_OUTSIDE_IP, GATEWAY_CLUSTER_IP] {
        let out = c.curl_outside(&["-i", &format!("http://{ip}:8080/x")])?;
        ensure!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("gw"),
            "{out}"
        );
        ensure!(
            out.contains(&format!("x-testpod-peer: {OUTSIDE_IP}:")),
            "{out}"
        );
    }
    // The fabric and pods reach the gateway's cluster address (its metrics port lives there).
    let out = c
        .fabric_command("curl")?
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{GATEWAY_CLUSTER_IP}:8080/"),
        ])
        .output()?;
    ensure!(String::from_utf8_lossy(&out.stdout) == "gw", "{out:?}");

    // The gateway reaches pods on both nodes, and they answer its cluster address.
    let mut servers = Vec::new();
    for pod in ["node1-pod1", "node2-pod1"] {
        servers.push(HttpServer::start(&c, pod, pod, &[])?);
        let ip = c.pod(pod)?.ip.clone();
        let out = c
            .gateway_command("curl")?
            .args([
                "-sS",
                "-i",
                "--max-time",
                "5",
                &format!("http://{ip}:9080/"),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(text.ends_with(pod), "gateway -> {pod}: {out:?}");
        ensure!(
            text.contains(&format!("x-testpod-peer: {GATEWAY_CLUSTER_IP}:")),
            "{text}"
        );
        // Outside does not: the gateway does not forward.
        let out = c.run_outside(
            "curl",
            &[
                "-sS",
                "--connect-timeout",
                "2",
                "--max-time",
                "3",
                &format!("http://{ip}:9080/"),
            ],
        )?;
        ensure!(!out.status.success(), "outside reached {pod}: {out:?}");
    }
    // Nor the nodes or the controller's address.
    for ip in ["198.18.0.1", "198.18.0.254"] {
        let out = c.run_outside(
            "curl",
            &[
                "-sS",
                "--connect-timeout",
                "2",
                "--max-time",
                "3",
                &format!("http://{ip}:15012/"),
            ],
        )?;
        ensure!(!out.status.success(), "outside reached {ip}: {out:?}");
    }

    // TLS helpers: a CA, a certificate for a host, the Secret the gateway reads; a TLS server
    // in the gateway's namespace with that certificate is trusted by curl outside.
    let ca = TestCa::new("gateway test CA")?;
    let pair = ca.server_cert(&["shop.example.com", "*.shop.example.com"])?;
    let file = c.write_tls_secret("istio-ingress", "shop-cert", &pair)?;
    let secret = std::fs::read_to_string(c.status().config_dir.join(&file))?;
    ensure!(secret.contains("type: kubernetes.io/tls") && secret.contains("tls.key: "));
    let files = dir.join("tls");
    std::fs::create_dir_all(&files)?;
    let (crt, key, ca_pem) = (
        files.join("tls.crt"),
        files.join("tls.key"),
        files.join("ca.pem"),
    );
    std::fs::write(&crt, &pair.cert_pem)?;
    std::fs::write(&key, &pair.key_pem)?;
    ca.write_cert(&ca_pem)?;
    let mut s_server = c.gateway_command("openssl")?;
    s_server
        .args(["s_server", "-quiet", "-www", "-accept", "8443", "-cert"])
        .arg(&crt)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _tls = Proc(s_server.spawn().context("openssl s_server")?);
    let ca_arg = ca_pem.display().to_string();
    let ok = wait_until(Duration::from_secs(5), || {
        Ok(c.curl_outside(&[
            "--cacert",
            &ca_arg,
            "--resolve",
            &format!("a.shop.example.com:8443:{GATEWAY_OUTSIDE_IP}"),
            "https://a.shop.example.com:8443/",
        ])
        .is_ok())
    })?;
    ensure!(
        ok,
        "curl did not trust the test CA's certificate through the gateway address"
    );
    let wrong = c.run_outside(
        "curl",
        &[
            "-sS",
            "--max-time",
            "3",
            "--cacert",
            &ca_arg,
            "--resolve",
            &format!("other.example.com:8443:{GATEWAY_OUTSIDE_IP}"),
            "https://other.example.com:8443/",
        ],
    )?;
    ensure!(
        !wrong.status.success(),
        "a name outside the certificate was accepted"
    );
    c.remove_config_file(&file)?;

    drop(servers);
    drop(c);
    let left: Vec<String> = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())?
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    ensure!(left.is_empty(), "netns left: {left:?}");
    ensure!(
        !cgroup2_mount()?.join(&prefix).exists(),
        "cgroup folder left"
    );
    ensure!(
        !sidenode_tests::cluster::pid_alive(gw_pid),
        "gateway pid {gw_pid} still alive"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// With the real `mesh-node gateway` (`common::gateway_cluster`): an Istio Gateway with an
/// HTTPS server whose certificate is a Secret written by `Cluster::write_tls_secret`, and a
/// VirtualService to a Service of a meshed pod on node 2, serve a client in the outside
/// namespace (HTTP/2 over TLS, trusting the test CA); the backend sees the gateway's cluster
/// address, the gateway serves again after `restart_process`, and node 2's proxy counts a
/// mutual-TLS tunnel from the gateway's identity.
#[test]
fn real_gateway_serves_outside_clients_over_https() -> Result<()> {
    let mut c = gateway_cluster(1, &[])?;
    let _web = HttpServer::start(&c, "node2-pod1", "web", &[])?;
    let ca = TestCa::new("gateway e2e CA")?;
    let pair = ca.server_cert(&["shop.example.com"])?;
    c.write_tls_secret("istio-ingress", "shop-cert", &pair)?;
    c.write_config_file(
        "shop.yaml",
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 198.18.128.20
  selector: {app: node2-pod1}
  ports:
  - {name: http, port: 80, targetPort: 9080}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop, namespace: istio-ingress}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: mesh}
spec:
  hosts: ["shop.example.com"]
  gateways: ["istio-ingress/shop"]
  http:
  - route:
    - destination: {host: web.mesh.svc.cluster.local, port: {number: 80}}
"#,
    )?;
    let dir = std::env::temp_dir().join(format!("sidenode-gw-{}", c.opts.prefix));
    std::fs::create_dir_all(&dir)?;
    let ca_pem = dir.join("ca.pem");
    ca.write_cert(&ca_pem)?;
    let ca_arg = ca_pem.display().to_string();
    let gw_ip = c.gateway()?.ip.clone();
    let resolve = format!("shop.example.com:443:{gw_ip}");
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(15), || {
        match c.curl_outside(&[
            "-i",
            "--cacert",
            &ca_arg,
            "--resolve",
            &resolve,
            "https://shop.example.com/hello",
        ]) {
            Ok(out) => {
                last = out;
                Ok(last.starts_with("HTTP/2 200"))
            }
            Err(e) => {
                last = format!("{e:#}");
                Ok(false)
            }
        }
    })?;
    ensure!(ok, "no answer through the gateway: {last}");
    ensure!(last.ends_with("web"), "{last}");
    ensure!(
        last.contains(&format!("x-testpod-peer: {GATEWAY_CLUSTER_IP}:")),
        "{last}"
    );
    // The process API: a restarted gateway serves again (same Gateway, Secret, certificate
    // from the controller).
    c.restart_process(GATEWAY, GATEWAY)?;
    let again = wait_until(Duration::from_secs(15), || {
        Ok(c.curl_outside(&[
            "--cacert",
            &ca_arg,
            "--resolve",
            &resolve,
            "https://shop.example.com/again",
        ])
        .is_ok_and(|body| body == "web"))
    })?;
    ensure!(again, "no answer after the gateway's restart");
    let metrics = proxy_metrics(&c, "node2")?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains(
                    "source_principal=\"spiffe://cluster.local/ns/istio-ingress/sa/sidenode-gateway\""
                )),
        "node 2 counted no mutual-TLS tunnel from the gateway"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Kubernetes mode (`ClusterOpts::kube`): the gateway's Pod and ServiceAccount are API objects
/// and it presents a token of its own ServiceAccount bound to its Pod, as the Deployment does;
/// the controller takes that token as the workload's and signs its certificate; an Istio
/// Gateway and VirtualService applied with kubectl serve an outside client over HTTPS.
#[test]
fn kube_mode_gateway_uses_its_own_bound_token() -> Result<()> {
    require_root();
    let mut c = TestCluster::up(ClusterOpts {
        prefix: unique_prefix('g'),
        nodes: 2,
        pods: 1,
        mesh_node: sidenode_tests::workload::mesh_node_path(),
        kube: true,
        mesh: true,
        gateway: true,
        ..Default::default()
    })?;
    let line = c.wait_for_log(
        "controller",
        "controller",
        "identity=spiffe://cluster.local/ns/istio-ingress/sa/sidenode-gateway",
        Duration::from_secs(10),
    )?;
    ensure!(line.contains("signed"), "{line}");
    c.kube()?.install_crds()?;
    let _web = HttpServer::start(&c, "node2-pod1", "web", &[])?;
    let ca = TestCa::new("gateway kube CA")?;
    c.write_tls_secret(
        "istio-ingress",
        "shop-cert",
        &ca.server_cert(&["shop.example.com"])?,
    )?;
    c.kube()?.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 198.18.128.20
  selector: {app: node2-pod1}
  ports:
  - {name: http, port: 80, targetPort: 9080, protocol: TCP}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop, namespace: istio-ingress}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: mesh}
spec:
  hosts: ["shop.example.com"]
  gateways: ["istio-ingress/shop"]
  http:
  - route:
    - destination: {host: web.mesh.svc.cluster.local, port: {number: 80}}
"#,
    )?;
    let dir = std::env::temp_dir().join(format!("sidenode-gw-{}", c.opts.prefix));
    std::fs::create_dir_all(&dir)?;
    let ca_pem = dir.join("ca.pem");
    ca.write_cert(&ca_pem)?;
    let ca_arg = ca_pem.display().to_string();
    let resolve = format!("shop.example.com:443:{}", c.gateway()?.ip);
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        match c.curl_outside(&[
            "--cacert",
            &ca_arg,
            "--resolve",
            &resolve,
            "https://shop.example.com/kube",
        ]) {
            Ok(out) => {
                last = out;
                Ok(last == "web")
            }
            Err(e) => {
                last = format!("{e:#}");
                Ok(false)
            }
        }
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(ok, "no answer through the gateway: {last}");
    Ok(())
}
