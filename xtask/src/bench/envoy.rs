//! The `envoy` path: an Envoy sidecar pair with mutual TLS 1.3 between two plain pods, the
//! way a sidecar mesh carries TCP.
//!
//! - Envoy A runs in the client pod (its netns and cgroup) and listens on 127.0.0.1: the
//!   client dials `127.0.0.1:<port>` instead of the server (a sidecar mesh captures with
//!   iptables; the bench points the client at the sidecar directly, which costs the same
//!   sockets and skips only a NAT lookup). A's `tcp_proxy` opens TLS to Envoy B.
//! - Envoy B runs in the server pod and listens on the pod IP; it requires a client
//!   certificate and hands the plaintext to the server on 127.0.0.1.
//! - A throwaway CA made with `openssl` at bench time signs one ECDSA P-256 certificate per
//!   side; both sides pin TLS 1.3 and check the peer's SAN. No access log, no admin listener,
//!   `--concurrency 1` (one worker thread, as the node proxy's default) and no hot restart.
//!
//! Everything lives under `<cluster state>/envoy/`, which the cluster's teardown removes.

use super::util::{Bg, checked, output};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sidenode_tests::cluster::Cluster;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Envoy A on 127.0.0.1 in the client pod: the echo server's side …
pub const A_ECHO_PORT: u16 = 18080;
/// … and iperf3's.
pub const A_IPERF_PORT: u16 = 15201;
/// Envoy B on the server pod's IP (mTLS), in front of the echo server …
pub const B_ECHO_PORT: u16 = 18443;
/// … and iperf3.
const B_IPERF_PORT: u16 = 15443;
/// Worker threads per Envoy (the node proxy's default is one too).
pub const CONCURRENCY: u32 = 1;

pub const SERVER_SAN: &str = "server.bench.sidenode.invalid";
const CLIENT_SAN: &str = "client.bench.sidenode.invalid";

pub struct EnvoyPair {
    pub a: Bg,
    pub b: Bg,
    pub version: String,
}

/// Certificates, configs, then both Envoys; returns once all four listeners listen.
pub fn start(
    c: &Cluster,
    envoy: &Path,
    client_pod: &str,
    server_pod: &str,
    echo_port: u16,
    iperf_port: u16,
) -> Result<EnvoyPair> {
    let dir = c.state_dir.join("envoy");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    certs(&dir)?;
    let server_ip = c.pod(server_pod)?.ip.clone();
    let a_cfg = dir.join("envoy-a.json");
    let b_cfg = dir.join("envoy-b.json");
    let write = |p: &Path, v: Value| -> Result<()> {
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))
    };
    write(
        &a_cfg,
        json!({
            "static_resources": {
                "listeners": [
                    a_listener("echo", A_ECHO_PORT),
                    a_listener("iperf", A_IPERF_PORT),
                ],
                "clusters": [
                    a_cluster("echo", &server_ip, B_ECHO_PORT, &dir),
                    a_cluster("iperf", &server_ip, B_IPERF_PORT, &dir),
                ],
            }
        }),
    )?;
    write(
        &b_cfg,
        json!({
            "static_resources": {
                "listeners": [
                    b_listener("echo", &server_ip, B_ECHO_PORT, &dir),
                    b_listener("iperf", &server_ip, B_IPERF_PORT, &dir),
                ],
                "clusters": [
                    local_cluster("echo", echo_port),
                    local_cluster("iperf", iperf_port),
                ],
            }
        }),
    )?;
    let version = crate::setup::envoy_version().unwrap_or_else(|| "?".into());
    let spawn = |pod: &str, name: &str, cfg: &Path| -> Result<Bg> {
        let mut cmd = c.pod_command(pod, envoy)?;
        cmd.arg("-c")
            .arg(cfg)
            .args(["--concurrency", &CONCURRENCY.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warn"]);
        Bg::spawn(
            cmd,
            format!("Envoy {name} in {pod}"),
            &dir.join(format!("envoy-{name}.log")),
        )
    };
    let mut b = spawn(server_pod, "b", &b_cfg)?;
    let mut a = spawn(client_pod, "a", &a_cfg)?;
    let wait = Duration::from_secs(20);
    let ready = b
        .wait_listening(c, server_pod, &[B_ECHO_PORT, B_IPERF_PORT], wait)
        .and_then(|()| a.wait_listening(c, client_pod, &[A_ECHO_PORT, A_IPERF_PORT], wait));
    if let Err(e) = ready {
        for n in ["a", "b"] {
            let log = dir.join(format!("envoy-{n}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("--- {}:", log.display());
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
        return Err(e);
    }
    Ok(EnvoyPair { a, b, version })
}

/// `openssl s_client` from the client pod to Envoy B's echo listener with the client
/// certificate: the handshake must be TLS 1.3 with an ECDSA server certificate that verifies
/// against the throwaway CA. Returns what s_client reported.
pub fn check_tls(c: &Cluster, client_pod: &str, server_pod: &str) -> Result<Value> {
    let dir = c.state_dir.join("envoy");
    let server_ip = c.pod(server_pod)?.ip.clone();
    let mut cmd = c.pod_command(client_pod, "openssl")?;
    cmd.current_dir(&dir)
        .args(["s_client", "-brief", "-no_ign_eof", "-verify_return_error"])
        .args(["-connect", &format!("{server_ip}:{B_ECHO_PORT}")])
        .args(["-servername", SERVER_SAN, "-verify_hostname", SERVER_SAN])
        .args([
            "-CAfile",
            "ca.pem",
            "-cert",
            "client.pem",
            "-key",
            "client.key",
        ]);
    let out = output(cmd, Duration::from_secs(20), "openssl s_client")?;
    let text = format!("{}\n{}", out.stderr, out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    let (proto, sig, verify) = (
        field("Protocol version:"),
        field("Signature type:"),
        field("Verification:"),
    );
    if proto.as_deref() != Some("TLSv1.3")
        || sig.as_deref() != Some("ECDSA")
        || verify.as_deref() != Some("OK")
    {
        bail!(
            "Envoy B's TLS is not TLS 1.3 + ECDSA + verified (protocol {proto:?}, signature \
             {sig:?}, verification {verify:?}): {}",
            text.trim()
        );
    }
    Ok(json!({
        "protocol": proto,
        "ciphersuite": field("Ciphersuite:"),
        "signature_type": sig,
        "peer_certificate": field("Peer certificate:"),
        "verification": verify,
    }))
}

fn tls_params() -> Value {
    json!({
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    })
}

fn common_tls(dir: &Path, me: &str, peer_san: &str) -> Value {
    let f = |n: &str| dir.join(n).display().to_string();
    json!({
        "tls_params": tls_params(),
        "tls_certificates": [{
            "certificate_chain": {"filename": f(&format!("{me}.pem"))},
            "private_key": {"filename": f(&format!("{me}.key"))},
        }],
        "validation_context": {
            "trusted_ca": {"filename": f("ca.pem")},
            "match_typed_subject_alt_names": [{
                "san_type": "DNS",
                "matcher": {"exact": peer_san},
            }],
        },
    })
}

fn tcp_proxy(name: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": name,
            "cluster": name,
        },
    })
}

pub fn socket_address(ip: &str, port: u16) -> Value {
    json!({"socket_address": {"address": ip, "port_value": port}})
}

fn static_cluster(name: &str, ip: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "3s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(ip, port)}}]}],
        },
    })
}

/// Envoy A: plaintext from the client on 127.0.0.1.
fn a_listener(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "address": socket_address("127.0.0.1", port),
        "filter_chains": [{"filters": [tcp_proxy(name)]}],
    })
}

/// Envoy A → Envoy B: TLS 1.3 with A's client certificate; B's SAN checked.
pub fn a_cluster(name: &str, server_ip: &str, port: u16, dir: &Path) -> Value {
    let mut c = static_cluster(name, server_ip, port);
    c["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": SERVER_SAN,
            "common_tls_context": common_tls(dir, "client", SERVER_SAN),
        },
    });
    c
}

/// Envoy B: TLS 1.3 on the pod IP, client certificate required (A's SAN checked).
pub fn b_listener(name: &str, server_ip: &str, port: u16, dir: &Path) -> Value {
    json!({
        "name": name,
        "address": socket_address(server_ip, port),
        "filter_chains": [{
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": common_tls(dir, "server", CLIENT_SAN),
                },
            },
            "filters": [tcp_proxy(name)],
        }],
    })
}

/// Envoy B → the server in its pod, plaintext on 127.0.0.1.
pub fn local_cluster(name: &str, port: u16) -> Value {
    static_cluster(name, "127.0.0.1", port)
}

/// A throwaway CA and one ECDSA P-256 leaf per side (`server.pem`/`.key`,
/// `client.pem`/`.key`, `ca.pem`), valid for a day.
pub fn certs(dir: &Path) -> Result<()> {
    let t = Duration::from_secs(30);
    let ossl = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("openssl");
        cmd.current_dir(dir).args(args);
        checked(cmd, t, &format!("openssl {}", args.first().unwrap_or(&"")))?;
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    ossl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=sidenode bench throwaway CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    for (name, san, usage) in [
        ("server", SERVER_SAN, "serverAuth"),
        ("client", CLIENT_SAN, "clientAuth"),
    ] {
        let ext = dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage={usage}\nsubjectAltName=DNS:{san}\n"
            ),
        )
        .with_context(|| format!("writing {}", ext.display()))?;
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subj = format!("/CN={san}");
        ossl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subj],
            ]
            .concat(),
        )?;
        let extfile = format!("{name}.ext");
        ossl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ])?;
    }
    Ok(())
}
