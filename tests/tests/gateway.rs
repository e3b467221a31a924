//! The ingress gateway end to end (issue 14): real `curl` and `openssl` clients in the
//! simulated cluster's `outside` namespace, the real `mesh-node gateway` in its own namespace,
//! backends in meshed pods on both nodes. One cluster for every step (they run in order; a
//! failure names its step): Istio `Gateway` + `VirtualService` and Gateway API `Gateway` +
//! `HTTPRoute` (with a `ReferenceGrant`) side by side, two hosts on 443 with a certificate
//! each, HTTP→HTTPS redirect, the edge headers, an 80/20 split, the gateway's identity on the
//! HBONE tunnel and an `AuthorizationPolicy` refusing it, a Secret rotated under an open
//! connection, broken and expired certificates, TLS passthrough to a meshed TLS server,
//! slowloris cut by the header timeout, errors as Envoy gives them.
//! Run: `cargo test -p sidenode-tests --test gateway` (root; `cargo build -p mesh-node` first).

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use sidenode_tests::cluster::{GATEWAY, GATEWAY_CLUSTER_IP, OUTSIDE_IP, TestCluster};
use sidenode_tests::tls::{CertPair, TestCa};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const GATEWAY_PRINCIPAL: &str = "cluster.local/ns/istio-ingress/sa/sidenode-gateway";
/// The gateway's header timeout in this test (seconds), short so slowloris is cut quickly.
const HEADER_TIMEOUT: u64 = 3;

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const OBJECTS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: v1, namespace: mesh}
spec:
  clusterIP: 198.18.128.31
  selector: {app: node2-pod1}
  ports:
  - {name: http, port: 80, targetPort: 9080}
---
apiVersion: v1
kind: Service
metadata: {name: v2, namespace: mesh}
spec:
  clusterIP: 198.18.128.32
  selector: {app: node1-pod1}
  ports:
  - {name: http, port: 80, targetPort: 9080}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: mesh}
spec:
  clusterIP: 198.18.128.33
  selector: {app: node2-pod1}
  ports:
  - {name: tls, port: 443, targetPort: 9443}
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: mesh}
spec:
  clusterIP: 198.18.128.34
  selector: {app: nothing-here}
  ports:
  - {name: http, port: 80, targetPort: 9080}
---
# Istio dialect: shop.example.com on 443 (its own certificate), HTTP on 80 redirected, and a
# passthrough server for db.example.com on 8443.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-ingress}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["shop.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 8443, name: tls, protocol: TLS}
    hosts: ["db.example.com"]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: mesh}
spec:
  hosts: ["shop.example.com"]
  gateways: ["istio-ingress/edge"]
  http:
  - match: [{uri: {prefix: /gone}}]
    route: [{destination: {host: gone.mesh.svc.cluster.local}}]
  - match: [{uri: {prefix: /nowhere}}]
    route: [{destination: {host: missing.mesh.svc.cluster.local}}]
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: v1.mesh.svc.cluster.local}}]
  tls:
  - match: [{sniHosts: ["db.example.com"]}]
    route: [{destination: {host: db.mesh.svc.cluster.local, port: {number: 443}}}]
---
# Gateway API dialect: api.example.com on the same port 443 with its own certificate, an 80/20
# split to Services of another namespace (allowed by the ReferenceGrant).
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: sidenode}
spec:
  controllerName: sidenode.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: api, namespace: istio-ingress}
spec:
  gatewayClassName: sidenode
  listeners:
  - name: https
    protocol: HTTPS
    port: 443
    hostname: api.example.com
    tls:
      mode: Terminate
      certificateRefs: [{kind: Secret, name: api-cert}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: istio-ingress}
spec:
  parentRefs: [{name: api}]
  hostnames: ["api.example.com"]
  rules:
  - backendRefs:
    - {name: v1, namespace: mesh, port: 80, weight: 80}
    - {name: v2, namespace: mesh, port: 80, weight: 20}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: gateway-routes, namespace: mesh}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: istio-ingress}]
  to: [{group: "", kind: Service}]
"#;

const DENY_GATEWAY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-gateway, namespace: mesh}
spec:
  selector: {matchLabels: {app: node2-pod1}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/istio-ingress/sa/sidenode-gateway"]}}]
"#;

struct Env {
    c: TestCluster,
    dir: PathBuf,
    ca: TestCa,
    ca_file: String,
    gw_ip: String,
}

impl Env {
    /// `curl` from outside to `https://<host>:<port><path>` resolved to the gateway.
    fn https(&self, host: &str, port: u16, path: &str, extra: &[&str]) -> Result<String> {
        let resolve = format!("{host}:{port}:{}", self.gw_ip);
        let url = format!("https://{host}:{port}{path}");
        let mut args = vec!["-i", "--cacert", &self.ca_file, "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        self.c.curl_outside(&args)
    }

    /// The serial number of the certificate the gateway serves for `host` on 443.
    fn served_serial(&self, host: &str) -> Result<String> {
        let out = self
            .c
            .outside_command("sh")?
            .args([
                "-c",
                &format!(
                    "echo | timeout 5 openssl s_client -connect {}:443 -servername {host} 2>/dev/null | openssl x509 -noout -serial",
                    self.gw_ip
                ),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            text.starts_with("serial="),
            "no certificate for {host}: {out:?}"
        );
        Ok(text)
    }

    fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.c.gateway_log_path()).unwrap_or_default()
    }
}

fn serial_of(pair: &CertPair) -> Result<String> {
    let dir = tempfile_dir("serial")?;
    let f = dir.join("c.pem");
    std::fs::write(&f, &pair.cert_pem)?;
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&f)
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn tempfile_dir(what: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "sidenode-gwtest-{what}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// An expired certificate for `host` (self-signed: the gateway refuses it before any client
/// would).
fn expired_pair(host: &str) -> Result<CertPair> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

type Step = fn(&Env) -> Result<()>;

const STEPS: &[(&str, Step)] = &[
    (
        "two hosts on 443, each with its certificate (SNI)",
        sni_hosts,
    ),
    ("HTTP on 80 is redirected to HTTPS", https_redirect),
    ("edge headers as Envoy sets them", edge_headers),
    ("errors: unknown host, no route, no endpoint", errors),
    ("80/20 HTTPRoute split over 1,000 requests", weighted_split),
    (
        "the backend sees the gateway's identity over HBONE",
        gateway_identity,
    ),
    (
        "an AuthorizationPolicy denying the gateway gives 403",
        authz_denies_gateway,
    ),
    (
        "a rotated Secret is served at once, open connection unharmed",
        rotation,
    ),
    (
        "broken and expired certificates are refused, the last good kept",
        bad_certificates,
    ),
    ("TLS passthrough to a meshed TLS server", passthrough),
    ("slowloris is cut by the header timeout", slowloris),
];

#[test]
fn gateway_end_to_end() -> Result<()> {
    let timeout = HEADER_TIMEOUT.to_string();
    let c = gateway_cluster(1, &["--header-timeout", &timeout])?;
    let dir = tempfile_dir("env")?;
    let ca = TestCa::new("sidenode gateway test CA")?;
    let ca_file = dir.join("ca.pem");
    ca.write_cert(&ca_file)?;
    c.write_tls_secret(
        "istio-ingress",
        "shop-cert",
        &ca.server_cert(&["shop.example.com"])?,
    )?;
    c.write_tls_secret(
        "istio-ingress",
        "api-cert",
        &ca.server_cert(&["api.example.com"])?,
    )?;
    c.write_config_file("gateway-test.yaml", OBJECTS)?;
    let gw_ip = c.gateway()?.ip.clone();
    let env = Env {
        c,
        dir: dir.clone(),
        ca,
        ca_file: ca_file.display().to_string(),
        gw_ip,
    };
    let _v1 = HttpServer::start(&env.c, "node2-pod1", "v1", &[])?;
    let _v2 = HttpServer::start(&env.c, "node1-pod1", "v2", &[])?;
    wait_hbone_listener(&env.c, "node2-pod1")?;
    wait_hbone_listener(&env.c, "node1-pod1")?;
    // Both dialects are served once the gateway answers each host.
    for host in ["shop.example.com", "api.example.com"] {
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(20), || {
            match env.https(host, 443, "/", &[]) {
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
        ensure!(
            ok,
            "{host} not served through the gateway: {last}\ngateway log:\n{}",
            env.gateway_log()
        );
    }
    for (name, step) in STEPS {
        step(&env).with_context(|| format!("step `{name}`"))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn sni_hosts(e: &Env) -> Result<()> {
    // HTTP/1.1 and HTTP/2; each certificate names only its own host, so curl's check proves
    // the gateway chose by SNI. No client certificate was asked for.
    let h2 = e.https("shop.example.com", 443, "/x", &["--http2"])?;
    ensure!(h2.starts_with("HTTP/2 200") && h2.ends_with("v1"), "{h2}");
    let h1 = e.https("shop.example.com", 443, "/x", &["--http1.1"])?;
    ensure!(h1.starts_with("HTTP/1.1 200") && h1.ends_with("v1"), "{h1}");
    let api = e.https("api.example.com", 443, "/", &["--http1.1"])?;
    ensure!(api.starts_with("HTTP/1.1 200"), "{api}");
    for host in ["shop.example.com", "api.example.com"] {
        let out = e
            .c
            .outside_command("sh")?
            .args([
                "-c",
                &format!(
                    "echo | timeout 5 openssl s_client -connect {}:443 -servername {host} 2>/dev/null | openssl x509 -noout -subject",
                    e.gw_ip
                ),
            ])
            .output()?;
        let subject = String::from_utf8_lossy(&out.stdout);
        ensure!(subject.contains(host), "{host}: served {subject}");
    }
    // A name neither server has: the handshake fails (no certificate to offer for it).
    let resolve = format!("other.example.com:443:{}", e.gw_ip);
    let out = e.c.run_outside(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            &e.ca_file,
            "--resolve",
            &resolve,
            "https://other.example.com/",
        ],
    )?;
    ensure!(!out.status.success(), "other.example.com answered: {out:?}");
    Ok(())
}

fn https_redirect(e: &Env) -> Result<()> {
    let resolve = format!("shop.example.com:80:{}", e.gw_ip);
    let out = e.c.curl_outside(&[
        "-i",
        "--resolve",
        &resolve,
        "http://shop.example.com/cart?id=7",
    ])?;
    ensure!(out.starts_with("HTTP/1.1 301"), "{out}");
    ensure!(
        out.to_ascii_lowercase()
            .contains("location: https://shop.example.com/cart?id=7"),
        "{out}"
    );
    // Followed, it lands on the HTTPS server.
    let out = e.c.curl_outside(&[
        "-L",
        "--cacert",
        &e.ca_file,
        "--resolve",
        &resolve,
        "--resolve",
        &format!("shop.example.com:443:{}", e.gw_ip),
        "http://shop.example.com/cart",
    ])?;
    ensure!(out == "v1", "{out}");
    Ok(())
}

fn edge_headers(e: &Env) -> Result<()> {
    let out = e.https(
        "shop.example.com",
        443,
        "/",
        &[
            "-H",
            "x-forwarded-for: 192.0.2.7",
            "-H",
            "x-request-id: forged",
        ],
    )?;
    let header = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim().to_string())
    };
    ensure!(
        header("x-testpod-xff").as_deref() == Some(&format!("192.0.2.7, {OUTSIDE_IP}")),
        "{out}"
    );
    ensure!(header("x-testpod-xfp").as_deref() == Some("https"), "{out}");
    let id = header("x-testpod-request-id").context("no x-request-id")?;
    ensure!(id != "forged" && id.len() == 36, "{out}");
    // The backend sees the gateway's address (its tunnel carries it), not outside's.
    ensure!(
        out.contains(&format!("x-testpod-peer: {GATEWAY_CLUSTER_IP}:")),
        "{out}"
    );
    Ok(())
}

fn errors(e: &Env) -> Result<()> {
    // A host the port's servers do not serve (plain HTTP on 80, so the handshake is not the
    // answer): 404.
    let resolve = format!("nobody.example.com:80:{}", e.gw_ip);
    let out =
        e.c.curl_outside(&["-i", "--resolve", &resolve, "http://nobody.example.com/"])?;
    ensure!(out.starts_with("HTTP/1.1 404"), "{out}");
    // A route to an unknown service: 503 (NR); to a service without endpoints: 503 (UH).
    let out = e.https("shop.example.com", 443, "/nowhere", &[])?;
    ensure!(out.starts_with("HTTP/2 503"), "{out}");
    let out = e.https("shop.example.com", 443, "/gone", &[])?;
    ensure!(out.starts_with("HTTP/2 503"), "{out}");
    let log = e.gateway_log();
    for (path, flag) in [("/nowhere", "NR"), ("/gone", "UH")] {
        ensure!(
            log.lines().any(|l| l.contains("request complete")
                && l.contains(&format!("path=\"{path}\""))
                && l.contains("status=503")
                && l.contains(&format!("flags=\"{flag}\""))),
            "no access-log line for {path} with 503 {flag}"
        );
    }
    Ok(())
}

fn weighted_split(e: &Env) -> Result<()> {
    // 1,000 requests on one kept connection (curl reuses it for every URL).
    let resolve = format!("api.example.com:443:{}", e.gw_ip);
    let url = "https://api.example.com/split";
    let mut args = vec![
        "-sS",
        "--max-time",
        "120",
        "--cacert",
        &e.ca_file,
        "--resolve",
        &resolve,
        "-w",
        "\n",
    ];
    args.extend(std::iter::repeat_n(url, 1000));
    let out = e.c.run_outside("curl", &args)?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let v1 = text.lines().filter(|l| *l == "v1").count();
    let v2 = text.lines().filter(|l| *l == "v2").count();
    ensure!(v1 + v2 == 1000, "answers: v1 {v1}, v2 {v2}");
    ensure!(
        (770..=830).contains(&v1),
        "v1 got {v1} of 1000 (want 80 % ± 3 points)"
    );
    Ok(())
}

fn gateway_identity(e: &Env) -> Result<()> {
    let metrics = proxy_metrics(&e.c, "node2")?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains(&format!(
                    "source_principal=\"spiffe://{GATEWAY_PRINCIPAL}\""
                ))),
        "node 2 counted no mutual-TLS tunnel from the gateway"
    );
    // The gateway counts the requests as the source, with its own workload.
    let gw_metrics =
        e.c.fabric_command("curl")?
            .args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://{GATEWAY_CLUSTER_IP}:15020/metrics"),
            ])
            .output()?;
    let gw_metrics = String::from_utf8_lossy(&gw_metrics.stdout);
    ensure!(
        gw_metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("reporter=\"source\"")
                && l.contains("source_workload=\"sidenode-gateway\"")
                && l.contains("destination_service_name=\"v1\"")
                && l.contains("response_code=\"200\"")),
        "the gateway's istio_requests_total lacks its requests"
    );
    Ok(())
}

fn authz_denies_gateway(e: &Env) -> Result<()> {
    e.c.write_config_file("deny-gateway.yaml", DENY_GATEWAY)?;
    let mut last = String::new();
    let denied = wait_until(Duration::from_secs(10), || {
        last = e.https("shop.example.com", 443, "/", &[])?;
        Ok(last.starts_with("HTTP/2 403"))
    })?;
    ensure!(denied, "not denied: {last}");
    ensure!(last.ends_with("RBAC: access denied"), "{last}");
    // The policy closed the gateway's open tunnel: node 2's access log names its identity.
    let line = wait_log_all(
        &e.c,
        "node2",
        "proxy",
        0,
        &[
            "direction=\"inbound\"",
            &format!("src.identity=spiffe://{GATEWAY_PRINCIPAL}"),
        ],
        Duration::from_secs(5),
    )?;
    ensure!(line.contains("transport=\"hbone\""), "{line}");
    e.c.remove_config_file("deny-gateway.yaml")?;
    let allowed = wait_until(Duration::from_secs(10), || {
        last = e.https("shop.example.com", 443, "/", &[])?;
        Ok(last.starts_with("HTTP/2 200"))
    })?;
    ensure!(allowed, "still denied after the policy went: {last}");
    Ok(())
}

/// An `openssl s_client` session to the gateway: requests written on stdin, the bytes it
/// prints collected by a thread.
struct Session {
    proc: Proc,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stderr: PathBuf,
}

impl Session {
    fn open(e: &Env, host: &str) -> Result<Session> {
        let stderr = e.dir.join("s_client.err");
        let mut cmd = e.c.outside_command("openssl")?;
        cmd.args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("{}:443", e.gw_ip),
            "-servername",
            host,
            "-CAfile",
            &e.ca_file,
            "-verify_return_error",
            "-alpn",
            "http/1.1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr)?);
        let mut proc = Proc(cmd.spawn().context("openssl s_client")?);
        let mut pipe = proc.0.stdout.take().context("stdout")?;
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut o) = sink.lock() {
                    o.extend_from_slice(&buf[..n]);
                }
            }
        });
        Ok(Session { proc, out, stderr })
    }

    /// One request; the whole answer (head and the body `v1`).
    fn get(&mut self, host: &str) -> Result<String> {
        if let Ok(mut o) = self.out.lock() {
            o.clear();
        }
        let stdin = self.proc.0.stdin.as_mut().context("stdin")?;
        let sent =
            write!(stdin, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").and_then(|()| stdin.flush());
        if let Err(err) = sent {
            bail!(
                "the open connection is gone ({err}); s_client said: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self
                .out
                .lock()
                .map(|o| String::from_utf8_lossy(&o).into_owned())
                .unwrap_or_default();
            if text.contains("\r\n\r\nv1") {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "no answer on the open connection: {text:?}; s_client said: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn rotation(e: &Env) -> Result<()> {
    let before = e.served_serial("shop.example.com")?;
    let mut open = Session::open(e, "shop.example.com")?;
    let first = open.get("shop.example.com")?;
    ensure!(first.starts_with("HTTP/1.1 200"), "{first}");
    let fresh = e.ca.server_cert(&["shop.example.com"])?;
    let want = serial_of(&fresh)?;
    ensure!(want != before, "the new certificate has the old serial");
    e.c.write_tls_secret("istio-ingress", "shop-cert", &fresh)?;
    let started = Instant::now();
    let mut now = String::new();
    let ok = wait_until(Duration::from_secs(2), || {
        now = e.served_serial("shop.example.com")?;
        Ok(now == want)
    })?;
    ensure!(
        ok,
        "new handshakes still get {now} 2 s after the rotation (want {want})"
    );
    let took = started.elapsed();
    // The connection opened before the rotation still works.
    let again = open.get("shop.example.com")?;
    ensure!(again.starts_with("HTTP/1.1 200"), "{again}");
    eprintln!("rotated certificate served after {took:?}");
    Ok(())
}

fn bad_certificates(e: &Env) -> Result<()> {
    let good = e.served_serial("shop.example.com")?;
    let garbage = CertPair {
        cert_pem: "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n".into(),
        key_pem: "garbage".into(),
    };
    for (what, pair, needle) in [
        ("garbage", garbage, "tls.crt"),
        ("expired", expired_pair("shop.example.com")?, "expired"),
    ] {
        let offset = e.gateway_log().len();
        e.c.write_tls_secret("istio-ingress", "shop-cert", &pair)?;
        let mut line = String::new();
        let reported = wait_until(Duration::from_secs(5), || {
            let log = e.gateway_log();
            line = log[offset.min(log.len())..]
                .lines()
                .find(|l| l.contains("Secret istio-ingress/shop-cert") && l.contains(needle))
                .unwrap_or_default()
                .to_string();
            Ok(!line.is_empty())
        })?;
        ensure!(reported, "{what}: no error naming the Secret and {needle}");
        ensure!(line.contains("keeping the last good certificate"), "{line}");
        let now = e.served_serial("shop.example.com")?;
        ensure!(
            now == good,
            "{what}: serving {now}, not the last good {good}"
        );
        let out = e.https("shop.example.com", 443, "/", &[])?;
        ensure!(out.starts_with("HTTP/2 200"), "{what}: {out}");
    }
    Ok(())
}

fn passthrough(e: &Env) -> Result<()> {
    // A TLS server in a meshed pod with its own certificate for db.example.com: the gateway
    // has no certificate for that name, so a verified handshake proves the bytes went through.
    let pair = e.ca.server_cert(&["db.example.com"])?;
    let (crt, key) = (e.dir.join("db.crt"), e.dir.join("db.key"));
    std::fs::write(&crt, &pair.cert_pem)?;
    std::fs::write(&key, &pair.key_pem)?;
    let mut cmd = e.c.pod_command("node2-pod1", "openssl")?;
    cmd.args(["s_server", "-quiet", "-www", "-accept", "9443", "-cert"])
        .arg(&crt)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = Proc(cmd.spawn().context("openssl s_server")?);
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        match e.https(
            "db.example.com",
            8443,
            "/",
            &["-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}"],
        ) {
            Ok(out) => {
                last = out;
                Ok(last.trim() == "200 0")
            }
            Err(err) => {
                last = format!("{err:#}");
                Ok(false)
            }
        }
    })?;
    ensure!(ok, "passthrough: {last}");
    let over_hbone = wait_until(Duration::from_secs(5), || {
        Ok(e.gateway_log().lines().any(|l| {
            l.contains("port=8443")
                && l.contains("connection complete")
                && l.contains("transport=\"hbone\"")
        }))
    })?;
    ensure!(
        over_hbone,
        "the passed-through connection did not go over HBONE:\n{}",
        e.gateway_log()
            .lines()
            .filter(|l| l.contains("port=8443"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

fn slowloris(e: &Env) -> Result<()> {
    // One byte a second of a never-ending header: cut after the header timeout.
    let script = format!(
        "trap '' PIPE; exec 3<>/dev/tcp/{}/80 || exit 2; printf 'GET / HTTP/1.1\\r\\nHost: shop.example.com\\r\\nX-Slow: ' >&3; \
         i=0; while [ $i -lt 20 ]; do printf a >&3 2>/dev/null || {{ echo cut $i; exit 0; }}; sleep 1; i=$((i+1)); done; echo uncut",
        e.gw_ip
    );
    let out =
        e.c.outside_command("bash")?
            .args(["-c", &script])
            .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let secs: u64 = text
        .strip_prefix("cut ")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the slow client was not cut: {text:?} {out:?}"))?;
    ensure!(
        secs <= HEADER_TIMEOUT + 4,
        "cut after {secs} s (header timeout {HEADER_TIMEOUT} s)"
    );
    // The gateway still serves.
    let ok = e.https("shop.example.com", 443, "/", &[])?;
    ensure!(ok.starts_with("HTTP/2 200"), "{ok}");
    let _ = GATEWAY;
    Ok(())
}
