//! Hostile input on a pod's HBONE listener (`podIP:15008`), end to end on the simulated mesh
//! cluster: garbage bytes, truncated and stalled TLS handshakes, bad `CONNECT` requests over a
//! valid mTLS connection, oversized headers, many half-open sockets, client certificates the
//! listener must refuse (another CA, expired, no or a malformed SPIFFE SAN, none at all), a
//! forged `forwarded:` header, and the certificate service asked for what the calling node
//! may not have. Each case checks that the
//! connection gets an error, that the refusal is counted where a counter exists, and that the
//! proxy keeps serving (alive, and a normal meshed connection still goes through HBONE).
//!
//! Run as root: `cargo test -p sidenode-tests --test hostile`. The tests take turns
//! (`serial()`: one cluster at a time).

mod common;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_node::identity::Identity;
use mesh_node::identity::certs::{certs_from_pem, key_and_csr, peer_identity};
use mesh_node::identity::controller::{ControllerSettings, cert_client, channel};
use mesh_node::identity::tls::{client_config, roots_from_pem};
use mesh_node::proto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sidenode_tests::cluster::{Cluster, TestCluster};
use sidenode_tests::workload::Server;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVER_POD: &str = "node2-pod1";
const TARGET: &str = "198.19.2.2:8080";
const CLIENT_POD: &str = "node1-pod1";
const HBONE_ADDR: &str = "198.19.2.2:15008";
const REFUSED: &str = "sidenode_hbone_refused_total";
/// `defaults::HBONE_HANDSHAKE_TIMEOUT`.
const HANDSHAKE_TIMEOUT: Duration = mesh_node::defaults::HBONE_HANDSHAKE_TIMEOUT;

/// Mesh cluster with a server on node2-pod1:8080, both meshed pods enrolled, the server's
/// HBONE listener open and one tunnel made (so node2's proxy holds the pod's certificate).
fn mesh_with_server() -> Result<(TestCluster, Server)> {
    let c = mesh_cluster(2, None)?;
    let srv = Server::start(&c, &testpod(), SERVER_POD, &[8080])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    expect_tunnel_works(&c)?;
    Ok((c, srv))
}

/// A new meshed connection node1-pod1 → node2-pod1:8080 echoes and went through HBONE.
fn expect_tunnel_works(c: &Cluster) -> Result<()> {
    let r = dial_one(c, CLIENT_POD, TARGET)?;
    let local = r.local.clone().context("no local address")?;
    wait_log_all(
        c,
        "node1",
        "proxy",
        0,
        &[
            "connection complete",
            &format!("src.addr={local}"),
            "transport=\"hbone\"",
        ],
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// The proxy is still running, and a normal tunnel still works.
fn expect_still_serving(c: &mut TestCluster) -> Result<()> {
    ensure!(c.is_alive("node2", "proxy"), "node2's proxy died");
    ensure!(c.is_alive("node1", "proxy"), "node1's proxy died");
    expect_tunnel_works(c)
}

fn refused(c: &Cluster, reason: &str) -> Result<f64> {
    Ok(metric_value(
        &proxy_metrics(c, "node2")?,
        REFUSED,
        &[("direction", "inbound"), ("reason", reason)],
    ))
}

/// Runs `f` on a thread that has entered the node's network namespace; sockets made there
/// stay in it.
fn in_node_netns<T: Send>(c: &Cluster, node: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/var/run/netns/{}", c.node(node)?.netns);
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (scoped, short-lived) thread only, with an open netns fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| bail!("netns thread panicked"))
    })
}

/// A plain TCP connection from node1's netns to node2-pod1's HBONE listener.
fn tcp_to_listener(c: &Cluster) -> Result<TcpStream> {
    let addr: SocketAddr = HBONE_ADDR.parse()?;
    in_node_netns(c, "node1", || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })?
    .with_context(|| format!("connecting to {addr}"))
}

/// Reads until the peer closes (EOF or reset); fails if it is still open after `within`.
/// Returns how long it took and what was read.
fn wait_closed(s: &mut TcpStream, within: Duration) -> Result<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!(
                "the listener kept the connection open for {within:?} (read {} bytes)",
                got.len()
            );
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok((start.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok((start.elapsed(), got)),
        }
    }
}

/// The first flight of a real TLS 1.3 client (a ClientHello with ALPN h2).
fn client_hello() -> Result<Vec<u8>> {
    let cfg = rustls::ClientConfig::builder_with_provider(mesh_node::identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::IpAddress(std::net::Ipv4Addr::new(198, 19, 2, 2).into()),
    )?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    ensure!(
        out.len() > 100 && out[0] == 0x16,
        "not a handshake record: {out:02x?}"
    );
    Ok(out)
}

/// Sends `bytes` then closes the write side; the listener must close the connection, log
/// the refusal and count it as `reason="handshake"`.
fn expect_garbage_refused(c: &Cluster, what: &str, bytes: &[u8]) -> Result<()> {
    let before = refused(c, "handshake")?;
    let offset = c.log_len("node2", "proxy");
    let mut s = tcp_to_listener(c)?;
    // The listener may close before everything is written; that is a refusal too.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let (took, reply) = wait_closed(&mut s, Duration::from_secs(5))?;
    let line = wait_log_all(
        c,
        "node2",
        "proxy",
        offset,
        &["refused an HBONE client", "reason=\"handshake\""],
        Duration::from_secs(5),
    )?;
    let after = refused(c, "handshake")?;
    ensure!(
        after >= before + 1.0,
        "{what}: {REFUSED}{{reason=\"handshake\"}} went {before} -> {after}"
    );
    ensure!(
        !reply.windows(4).any(|w| w == b"HTTP"),
        "{what}: the listener answered in clear HTTP: {:?}",
        String::from_utf8_lossy(&reply)
    );
    eprintln!(
        "{what}: closed after {took:?} ({} bytes back, a TLS alert at most); {line}",
        reply.len()
    );
    Ok(())
}

#[test]
fn garbage_and_truncated_handshakes_are_refused() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let hello = client_hello()?;
    let half = &hello[..hello.len() / 2];

    // A stalled handshake (half a ClientHello, then silence), left running while the other
    // cases go on: the listener must give up on it after its handshake timeout.
    let stalled_before = refused(&c, "handshake")?;
    let stalled_offset = c.log_len("node2", "proxy");
    let mut stalled = tcp_to_listener(&c)?;
    stalled.write_all(half)?;
    let stalled_at = Instant::now();

    let mut random = vec![0u8; 4096];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    // Not a handshake record type, whatever the rest is.
    random[0] = 0x42;
    expect_garbage_refused(&c, "random bytes", &random)?;
    expect_garbage_refused(
        &c,
        "plain HTTP/1.1",
        b"GET / HTTP/1.1\r\nHost: 198.19.2.2:15008\r\nUser-Agent: hostile\r\n\r\n",
    )?;
    expect_garbage_refused(
        &c,
        "CONNECT in clear text",
        b"CONNECT 198.19.2.2:8080 HTTP/1.1\r\nHost: 198.19.2.2:8080\r\n\r\n",
    )?;
    expect_garbage_refused(
        &c,
        "HTTP/2 preface in clear text",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    )?;
    expect_garbage_refused(&c, "half a ClientHello, then close", half)?;
    expect_still_serving(&mut c)?;

    // The stalled one: closed by the listener around the handshake timeout, not before.
    let left = (HANDSHAKE_TIMEOUT + Duration::from_secs(5)).saturating_sub(stalled_at.elapsed());
    let (_, reply) = wait_closed(&mut stalled, left)
        .with_context(|| format!("stalled handshake (timeout {HANDSHAKE_TIMEOUT:?})"))?;
    let took = stalled_at.elapsed();
    ensure!(
        took + Duration::from_millis(500) >= HANDSHAKE_TIMEOUT,
        "the stalled handshake was closed after {took:?}, before the {HANDSHAKE_TIMEOUT:?} timeout"
    );
    let line = wait_log_all(
        &c,
        "node2",
        "proxy",
        stalled_offset,
        &["HBONE handshake timed out", "reason=\"handshake\""],
        Duration::from_secs(3),
    )?;
    let after = refused(&c, "handshake")?;
    // Five refusals above plus the timed-out one.
    ensure!(
        after >= stalled_before + 6.0,
        "{REFUSED}{{reason=\"handshake\"}} went {stalled_before} -> {after}"
    );
    eprintln!(
        "stalled handshake closed after {took:?} ({} bytes back); {line}",
        reply.len()
    );
    expect_still_serving(&mut c)
}

// ---- a real HBONE client (mesh certificate, mTLS, HTTP/2) ------------------------------------

fn run_ok(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A current certificate for `identity` from the cluster's CA (`openssl ca`, as in hbone.rs):
/// writes `client.key` and `client.pem` in `dir`.
fn client_cert(c: &Cluster, dir: &Path, identity: &str) -> Result<()> {
    signed_cert(c, dir, &format!("URI:{identity}"), None)
}

/// A certificate from the cluster's CA with this `subjectAltName` value (`URI:...`,
/// `DNS:...`) and validity (`Some((start, end))` in `YYYYMMDDHHMMSSZ`, else now + 1 day):
/// writes `client.key` and `client.pem` in `dir`.
fn signed_cert(c: &Cluster, dir: &Path, san: &str, dates: Option<(&str, &str)>) -> Result<()> {
    std::fs::create_dir_all(dir.join("ca/new"))?;
    std::fs::write(dir.join("ca/index.txt"), "")?;
    std::fs::write(dir.join("ca/serial"), "1000\n")?;
    std::fs::write(
        dir.join("ca/ca.cnf"),
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndir = {}\ndatabase = $dir/index.txt\n\
             new_certs_dir = $dir/new\nserial = $dir/serial\ndefault_md = sha256\n\
             default_days = 1\npolicy = p\ncopy_extensions = none\nunique_subject = no\n\
             [p]\norganizationName = optional\ncommonName = optional\n",
            dir.join("ca").display()
        ),
    )?;
    write_leaf_ext(dir, san)?;
    new_key_and_csr(dir)?;
    let sd = c.controller_state_dir();
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir)
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(dir.join("ca/ca.cnf"))
        .args(["-in", "client.csr", "-out", "client.pem"])
        .arg("-cert")
        .arg(sd.join("ca-cert.pem"))
        .arg("-keyfile")
        .arg(sd.join("ca-key.pem"))
        .args(["-extfile", "leaf.ext"]);
    if let Some((start, end)) = dates {
        cmd.args(["-startdate", start, "-enddate", end]);
    }
    run_ok(&mut cmd)
}

fn write_leaf_ext(dir: &Path, san: &str) -> Result<()> {
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth,serverAuth\n"
        ),
    )?;
    Ok(())
}

/// A certificate for `identity` signed by a CA of its own (not the cluster's), with that CA
/// appended to `client.pem` as its chain: writes `client.key` and `client.pem` in `dir`.
fn foreign_cert(dir: &Path, identity: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    run_ok(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "evil-ca.key",
        "-out",
        "evil-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=evil root",
    ]))?;
    write_leaf_ext(dir, &format!("URI:{identity}"))?;
    new_key_and_csr(dir)?;
    run_ok(Command::new("openssl").current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "evil-ca.pem",
        "-CAkey",
        "evil-ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
    ]))?;
    let mut pem = std::fs::read_to_string(dir.join("client.pem"))?;
    pem.push_str(&std::fs::read_to_string(dir.join("evil-ca.pem"))?);
    std::fs::write(dir.join("client.pem"), pem)?;
    Ok(())
}

fn new_key_and_csr(dir: &Path) -> Result<()> {
    run_ok(Command::new("openssl").current_dir(dir).args([
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/O=sidenode-test",
    ]))
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// The mesh's own client configuration with `dir`'s `client.pem` (plus the cluster's
/// intermediate chain) and `client.key`, expecting node2-pod1's identity from the listener.
fn mesh_client_config(c: &Cluster, dir: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let sd = c.controller_state_dir();
    let mut pem = std::fs::read_to_string(dir.join("client.pem"))?;
    pem.push_str(&std::fs::read_to_string(sd.join("cert-chain.pem")).unwrap_or_default());
    let chain = certs_from_pem(&pem)?;
    let key = PrivateKeyDer::from_pem_file(dir.join("client.key"))
        .map_err(|e| anyhow::anyhow!("client.key: {e}"))?;
    let roots = roots_from_pem(&std::fs::read_to_string(c.controller_ca())?)?;
    let expected = Identity::new("cluster.local", "mesh", "sa-node2-pod1");
    Ok(client_config(chain, key, roots, expected)?)
}

/// An mTLS + HTTP/2 connection to node2-pod1's listener (from node1's netns) with a mesh
/// certificate for node1-pod1, checking the listener presents node2-pod1's identity.
async fn hbone_connect(c: &Cluster, dir: &Path) -> Result<Sender> {
    hbone_connect_with(c, mesh_client_config(c, dir)?).await
}

/// [`hbone_connect`] with any client configuration.
async fn hbone_connect_with(c: &Cluster, cfg: Arc<rustls::ClientConfig>) -> Result<Sender> {
    hbone_over(listener_conn(c)?, cfg).await
}

/// A TCP connection to node2-pod1's listener (from node1's netns), for tokio.
fn listener_conn(c: &Cluster) -> Result<tokio::net::TcpStream> {
    let std_tcp = tcp_to_listener(c)?;
    std_tcp.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(std_tcp)?)
}

/// TLS with `cfg`, then HTTP/2, over `tcp`.
async fn hbone_over(tcp: tokio::net::TcpStream, cfg: Arc<rustls::ClientConfig>) -> Result<Sender> {
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            ServerName::IpAddress(std::net::Ipv4Addr::new(198, 19, 2, 2).into()),
            tcp,
        )
        .await
        .context("mTLS handshake with the HBONE listener")?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A `CONNECT` with this authority (and an optional extra header); the status, or the error
/// text when the stream or connection was reset. It says `forwarded: for=198.19.1.2` (the
/// client pod's address, as a node proxy would) unless `extra` sets `forwarded` itself.
async fn connect(
    sender: &mut Sender,
    authority: &str,
    extra: Option<(&str, String)>,
) -> Result<Result<StatusCode, String>> {
    let mut req = Request::builder().method(Method::CONNECT).uri(authority);
    if extra.as_ref().is_none_or(|(k, _)| *k != "forwarded") {
        req = req.header("forwarded", "for=198.19.1.2");
    }
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    if let Err(e) = sender.ready().await {
        return Ok(Err(format!("connection not ready: {e}")));
    }
    let r = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("no answer to CONNECT within 10 s")?;
    Ok(r.map(|resp| resp.status()).map_err(|e| format!("{e:?}")))
}

#[test]
fn bad_connect_requests_are_refused_over_mtls() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let dir = c.state_dir.join("hostile-client");
    client_cert(&c, &dir, "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut tx = hbone_connect(&c, &dir).await?;
        // Control: this client opens a real tunnel.
        let ok = connect(&mut tx, TARGET, None).await?;
        ensure!(
            ok == Ok(StatusCode::OK),
            "a valid CONNECT {TARGET} got {ok:?}"
        );

        let before = refused(&c, "bad_request")?;
        let bad = [
            "not-an-address",
            "not-an-address:8080",
            // node2-pod2's address: not this pod's.
            "198.19.2.3:8080",
            "10.1.2.3:8080",
            "198.19.2.2:0",
            "[::1]:8080",
        ];
        for authority in bad {
            let got = connect(&mut tx, authority, None).await?;
            ensure!(
                got == Ok(StatusCode::BAD_REQUEST),
                "CONNECT {authority} got {got:?}, not 400"
            );
            eprintln!("CONNECT {authority}: 400");
        }
        let after = refused(&c, "bad_request")?;
        ensure!(
            after >= before + bad.len() as f64,
            "{REFUSED}{{reason=\"bad_request\"}} went {before} -> {after} for {} bad requests",
            bad.len()
        );

        // 1 MiB of header on a new connection: 431 or a reset, never a tunnel.
        let mut big_tx = hbone_connect(&c, &dir).await?;
        let big = "a".repeat(1 << 20);
        let got = connect(&mut big_tx, TARGET, Some(("x-hostile", big))).await?;
        ensure!(
            got != Ok(StatusCode::OK),
            "a CONNECT with a 1 MiB header was accepted"
        );
        if let Ok(s) = got {
            ensure!(
                s == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE || s.is_client_error(),
                "oversized headers got {s}"
            );
        }
        eprintln!("CONNECT with a 1 MiB header: {got:?}");

        // The first connection (not the one that misbehaved) still carries new tunnels.
        let ok = connect(&mut tx, TARGET, None).await?;
        ensure!(
            ok == Ok(StatusCode::OK),
            "CONNECT {TARGET} afterwards got {ok:?}"
        );
        Ok(())
    })?;
    expect_still_serving(&mut c)
}

#[test]
fn half_open_connections_do_not_block_tunnels() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let before = refused(&c, "handshake")?;
    let addr: SocketAddr = HBONE_ADDR.parse()?;
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = in_node_netns(&c, "node1", || {
        (0..200)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .collect::<std::io::Result<Vec<_>>>()
    })?
    .context("opening 200 idle connections")?;
    ensure!(idle.len() == 200, "only {} idle connections", idle.len());

    // While they sit there, normal tunnels work (new HBONE connections included: a second
    // client pod's identity needs a connection of its own).
    for _ in 0..3 {
        expect_tunnel_works(&c)?;
    }
    ensure!(c.is_alive("node2", "proxy"), "node2's proxy died");
    // ... and they did sit there the whole time: none was closed yet (so the tunnels were not
    // made after the listener had dropped them at its handshake timeout).
    for (i, s) in idle.iter().enumerate() {
        s.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        match s.peek(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => bail!(
                "idle connection {i} was closed before the tunnels were done ({:?} after opening): {other:?}",
                opened.elapsed()
            ),
        }
        s.set_nonblocking(false)?;
    }

    // The listener drops them at its handshake timeout and counts them.
    let deadline = opened + HANDSHAKE_TIMEOUT + Duration::from_secs(10);
    for (i, s) in idle.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        wait_closed(s, left.max(Duration::from_millis(100)))
            .with_context(|| format!("idle connection {i}"))?;
    }
    eprintln!(
        "200 idle connections closed by the listener after {:?}",
        opened.elapsed()
    );
    let after = refused(&c, "handshake")?;
    ensure!(
        after >= before + 200.0,
        "{REFUSED}{{reason=\"handshake\"}} went {before} -> {after} for 200 stalled handshakes"
    );
    drop(idle);
    expect_still_serving(&mut c)
}

// ---- client certificates the listener must refuse, end to end -------------------------------

/// An attacker's TLS client: no client certificate, and any server certificate accepted.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn no_client_cert_config() -> Result<Arc<rustls::ClientConfig>> {
    let provider = mesh_node::identity::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS with `cfg`, HTTP/2 and a `CONNECT` to the echo server over a new connection to the
/// listener: `Ok(status)`, or `Err(where it failed)` once the TCP connection was made (not
/// reaching the listener at all is an error of the test, not a refusal).
async fn tunnel_attempt(
    c: &Cluster,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<Result<StatusCode, String>> {
    let tcp = listener_conn(c)?;
    let mut tx = match hbone_over(tcp, cfg).await {
        Ok(tx) => tx,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    connect(&mut tx, TARGET, None).await
}

/// A tunnel attempt with `cfg` gets nowhere (no HTTP status at all: the listener never speaks
/// HTTP to it), and node2's proxy logs the refusal (`message`) and counts it as `reason`.
async fn expect_no_tunnel(
    c: &Cluster,
    what: &str,
    cfg: Arc<rustls::ClientConfig>,
    reason: &str,
    message: &str,
) -> Result<()> {
    let before = refused(c, reason)?;
    let offset = c.log_len("node2", "proxy");
    let got = tunnel_attempt(c, cfg).await?;
    ensure!(got.is_err(), "{what}: CONNECT {TARGET} got {got:?}");
    let line = wait_log_all(
        c,
        "node2",
        "proxy",
        offset,
        &[message, &format!("reason=\"{reason}\"")],
        Duration::from_secs(5),
    )
    .with_context(|| format!("{what}: the client saw {got:?}"))?;
    let after = refused(c, reason)?;
    ensure!(
        after >= before + 1.0,
        "{what}: {REFUSED}{{reason=\"{reason}\"}} went {before} -> {after}"
    );
    eprintln!("{what}: no tunnel ({got:?}); {line}");
    Ok(())
}

#[test]
fn client_certificates_the_listener_must_refuse_get_no_tunnel() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let base = c.state_dir.join("hostile-certs");
    let id = "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1";
    let good = base.join("good");
    client_cert(&c, &good, id)?;
    let foreign = base.join("foreign");
    foreign_cert(&foreign, id)?;
    let expired = base.join("expired");
    signed_cert(
        &c,
        &expired,
        &format!("URI:{id}"),
        Some(("20200101000000Z", "20200102000000Z")),
    )?;
    let no_spiffe = base.join("no-spiffe");
    signed_cert(
        &c,
        &no_spiffe,
        "DNS:node1-pod1.mesh.svc.cluster.local",
        None,
    )?;
    let malformed = base.join("malformed");
    signed_cert(&c, &malformed, "URI:spiffe://cluster.local/ns/mesh", None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Control: the same client with a valid certificate gets its tunnel.
        let ok = tunnel_attempt(&c, mesh_client_config(&c, &good)?).await?;
        ensure!(
            ok == Ok(StatusCode::OK),
            "control: a valid certificate got {ok:?}"
        );
        const TLS: &str = "refused an HBONE client";
        const NO_ID: &str = "HBONE client without a SPIFFE identity";
        for (what, dir, reason, message) in [
            ("a certificate from another CA", &foreign, "untrusted", TLS),
            ("an expired certificate", &expired, "expired", TLS),
            (
                "a certificate without a SPIFFE SAN",
                &no_spiffe,
                "untrusted",
                NO_ID,
            ),
            ("a malformed SPIFFE SAN", &malformed, "untrusted", NO_ID),
        ] {
            expect_no_tunnel(&c, what, mesh_client_config(&c, dir)?, reason, message).await?;
        }
        expect_no_tunnel(
            &c,
            "no client certificate",
            no_client_cert_config()?,
            "handshake",
            TLS,
        )
        .await
    })?;
    expect_still_serving(&mut c)
}

// ---- a forged `forwarded:` header ------------------------------------------------------------

/// node1-pod2's address: a pod the (real, authenticated) client node1-pod1 is not.
const OTHER_POD_IP: &str = "198.19.1.3";

fn ip_policy(ip: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: by-ip\n  namespace: mesh\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{ip}/32\"]\n"
    )
}

/// A tunnel to the echo server with `forwarded: for=<claimed>`: reads the server's HELLO, then
/// closes the tunnel (so node2's proxy writes its access line). The status.
async fn tunnel_once(sender: &mut Sender, claimed: &str) -> Result<StatusCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(TARGET)
        .header("forwarded", format!("for={claimed}"))
        .body(Empty::<Bytes>::new())?;
    sender.ready().await?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("no answer to CONNECT within 10 s")??;
    let status = resp.status();
    if status == StatusCode::OK {
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await?);
        let mut hello = [0u8; 128];
        let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut hello))
            .await
            .context("no HELLO through the tunnel within 5 s")??;
        ensure!(
            hello[..n].starts_with(b"HELLO "),
            "not the echo server: {:?}",
            &hello[..n]
        );
        io.shutdown().await?;
    }
    Ok(status)
}

/// [`wait_log_all`] for async code: polls without blocking the runtime (whose tasks drive the
/// HTTP/2 connections).
async fn wait_log_async(c: &Cluster, offset: u64, needles: &[&str]) -> Result<String> {
    let path = c.log_path("node2", "proxy");
    for _ in 0..50 {
        let bytes = std::fs::read(&path).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
        if let Some(l) = String::from_utf8_lossy(&bytes[start..])
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return Ok(l.to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no line with {needles:?} in {} within 5 s", path.display())
}

#[test]
fn a_forged_forwarded_header_changes_no_identity_policy_or_telemetry() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let dir = c.state_dir.join("forwarded-client");
    client_cert(&c, &dir, "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let forged = || Some(("forwarded", format!("for={OTHER_POD_IP}")));
    let opened_from = |c: &Cluster, workload: &str| -> Result<f64> {
        Ok(metric_value(
            &proxy_metrics(c, "node2")?,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", workload)],
        ))
    };
    rt.block_on(async {
        let mut tx = hbone_connect(&c, &dir).await?;

        // Telemetry and identity: a tunnel that claims to come from node1-pod2 is still
        // node1-pod1's (the proven identity), and is not counted as node1-pod2's.
        let other_before = opened_from(&c, "node1-pod2")?;
        let offset = c.log_len("node2", "proxy");
        let got = tunnel_once(&mut tx, OTHER_POD_IP).await?;
        ensure!(got == StatusCode::OK, "no policy: CONNECT got {got:?}");
        let line = wait_log_async(
            &c,
            offset,
            &[
                "connection complete",
                "direction=\"inbound\"",
                &format!("dst.addr={TARGET}"),
            ],
        )
        .await?;
        eprintln!("forged forwarded: {line}");
        ensure!(
            line.contains("src.identity=spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1"),
            "the tunnel's identity is not the certificate's: {line}"
        );
        ensure!(
            !line.contains("src.workload=node1-pod2")
                && !line.contains(&format!("src.addr={OTHER_POD_IP}:")),
            "the forged address was taken for the source: {line}"
        );
        let other_after = opened_from(&c, "node1-pod2")?;
        ensure!(
            other_after == other_before,
            "a tunnel of node1-pod1 was counted as node1-pod2's: {other_before} -> {other_after}"
        );
        // Control: the truthful header does name node1-pod1 in the metrics.
        let mine_before = opened_from(&c, "node1-pod1")?;
        ensure!(
            tunnel_once(&mut tx, "198.19.1.2").await? == StatusCode::OK,
            "truthful CONNECT refused"
        );
        let mine_after = opened_from(&c, "node1-pod1")?;
        ensure!(
            mine_after > mine_before,
            "the truthful tunnel was not counted as node1-pod1's: {mine_before} -> {mine_after}"
        );

        // Policy: an ALLOW for node1-pod2's address admits node1-pod1 with neither header.
        c.write_config_file("policy.yaml", &ip_policy(OTHER_POD_IP))?;
        // In force once the truthful request is refused.
        let mut last = None;
        for _ in 0..100 {
            let got = connect(&mut tx, TARGET, None).await?;
            if got == Ok(StatusCode::UNAUTHORIZED) || got == Ok(StatusCode::FORBIDDEN) {
                last = None;
                break;
            }
            last = Some(got);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            last.is_none(),
            "the ipBlocks policy never refused: {last:?}"
        );
        let got = connect(&mut tx, TARGET, forged()).await?;
        ensure!(
            got == Ok(StatusCode::UNAUTHORIZED) || got == Ok(StatusCode::FORBIDDEN),
            "a forged forwarded: for={OTHER_POD_IP} passed an ALLOW for that address: {got:?}"
        );
        // Control: an ALLOW for node1-pod1's own address admits it.
        c.write_config_file("policy.yaml", &ip_policy("198.19.1.2"))?;
        let mut admitted = false;
        for _ in 0..100 {
            if connect(&mut tx, TARGET, None).await? == Ok(StatusCode::OK) {
                admitted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            admitted,
            "an ALLOW for the client's own address never admitted it"
        );
        Ok(())
    })?;
    expect_still_serving(&mut c)
}

// ---- the certificate service, asked with a node's real credentials ----------------------------

/// `Sign` for `id` through the agents' own client (`state::client`: TLS to the controller, the
/// token from `token_file`), from node1's network namespace, to the cluster's controller.
fn sign_from_node1(
    c: &Cluster,
    token_file: &Path,
    id: &Identity,
) -> Result<Result<proto::SignResponse, tonic::Status>> {
    let settings = ControllerSettings {
        addr: c.controller_addr(),
        ca_file: c.controller_ca(),
        token_file: token_file.to_path_buf(),
    };
    let id = id.clone();
    in_node_netns(c, "node1", move || -> Result<_> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let conn = channel(&settings)?;
            let (_, csr) = key_and_csr(&id)?;
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                cert_client(&conn).sign(proto::SignRequest { csr_pem: csr }),
            )
            .await
            .context("no answer from the certificate service within 10 s")?;
            Ok(r.map(tonic::Response::into_inner))
        })
    })?
}

#[test]
fn the_certificate_service_signs_only_what_the_calling_node_may_have() -> Result<()> {
    let _turn = serial();
    let (c, _srv) = mesh_with_server()?;
    let node1_token = c.token_path("node1");
    let mine = Identity::new("cluster.local", "mesh", "sa-node1-pod1");

    // Control: node1's agent credentials get node1-pod1's certificate, naming it.
    let ok = sign_from_node1(&c, &node1_token, &mine)?
        .map_err(|s| anyhow::anyhow!("node1 asking for its own pod: {s:?}"))?;
    let leaf = certs_from_pem(ok.cert_chain_pem.first().context("empty chain")?)?;
    let got = peer_identity(leaf.first().context("no certificate")?)?;
    ensure!(got == mine, "signed {got}, asked {mine}");

    // Another node's pod, with node1's credentials.
    let theirs = Identity::new("cluster.local", "mesh", "sa-node2-pod1");
    let r = sign_from_node1(&c, &node1_token, &theirs)?;
    ensure!(
        matches!(&r, Err(s) if s.code() == tonic::Code::PermissionDenied),
        "node1 asking for node2-pod1's identity: {r:?}"
    );

    // node1's own pod, in a foreign trust domain.
    let foreign = Identity::new("evil.example", "mesh", "sa-node1-pod1");
    let r = sign_from_node1(&c, &node1_token, &foreign)?;
    ensure!(
        matches!(&r, Err(s) if s.code() == tonic::Code::PermissionDenied),
        "node1 asking for {foreign}: {r:?}"
    );

    // A token that is no node's.
    let bad = c.state_dir.join("bad-token");
    std::fs::write(&bad, "not-a-node-token\n")?;
    let r = sign_from_node1(&c, &bad, &mine)?;
    ensure!(
        matches!(&r, Err(s) if s.code() == tonic::Code::Unauthenticated),
        "a bad token asking for {mine}: {r:?}"
    );
    Ok(())
}

/// A hostile HTTP/2 client written frame by frame (an honest client library would never
/// exceed the server's limits): mTLS to node2-pod1's listener, the connection preface and an
/// empty SETTINGS.
struct RawH2 {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

/// What the listener sent back on a [`RawH2`] connection.
#[derive(Debug, Default)]
struct H2Seen {
    /// `HEADERS` frames (answers), by stream.
    answered: std::collections::BTreeSet<u32>,
    /// `RST_STREAM` error codes, by stream.
    resets: std::collections::BTreeMap<u32, u32>,
    /// `GOAWAY` error code.
    goaway: Option<u32>,
    /// The connection ended (EOF or error).
    closed: bool,
}

const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_GOAWAY: u8 = 0x7;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const CANCEL: u32 = 0x8;

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A `CONNECT authority` header block: HPACK literals without indexing, names from the static
/// table (`:method` 2, `:authority` 1), plain strings.
fn connect_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x02, 7];
    b.extend_from_slice(b"CONNECT");
    b.push(0x01);
    b.push(authority.len() as u8);
    b.extend_from_slice(authority.as_bytes());
    b
}

impl RawH2 {
    async fn open(c: &Cluster, dir: &Path) -> Result<RawH2> {
        use tokio::io::AsyncWriteExt;
        let tcp = listener_conn(c)?;
        let mut tls = tokio_rustls::TlsConnector::from(mesh_client_config(c, dir)?)
            .connect(
                ServerName::IpAddress(std::net::Ipv4Addr::new(198, 19, 2, 2).into()),
                tcp,
            )
            .await
            .context("mTLS handshake with the HBONE listener")?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tls.write_all(&h2_frame(H2_SETTINGS, 0, 0, &[])).await?;
        tls.flush().await?;
        Ok(RawH2 {
            tls,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.tls.write_all(bytes).await?;
        self.tls.flush().await?;
        Ok(())
    }

    /// Reads frames (acknowledging the server's SETTINGS) until `done` says so, the connection
    /// ends, or `within` passes.
    async fn read_until(
        &mut self,
        within: Duration,
        done: impl Fn(&H2Seen) -> bool,
    ) -> Result<H2Seen> {
        use tokio::io::AsyncReadExt;
        let mut seen = H2Seen::default();
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = vec![0u8; 64 * 1024];
        while !done(&seen) {
            while self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (self.buf[3], self.buf[4]);
                let stream =
                    u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                        & 0x7fff_ffff;
                let payload: Vec<u8> = self.buf[9..9 + len].to_vec();
                self.buf.drain(..9 + len);
                let code = |at: usize| {
                    payload
                        .get(at..at + 4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                };
                match kind {
                    H2_HEADERS => {
                        seen.answered.insert(stream);
                    }
                    H2_RST_STREAM => {
                        seen.resets.insert(stream, code(0).unwrap_or(u32::MAX));
                    }
                    H2_GOAWAY => seen.goaway = code(4),
                    H2_SETTINGS if flags & 1 == 0 => {
                        self.send(&h2_frame(H2_SETTINGS, 1, 0, &[])).await?;
                    }
                    _ => {}
                }
            }
            if done(&seen) {
                break;
            }
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    seen.closed = true;
                    break;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        Ok(seen)
    }
}

#[test]
fn too_many_streams_on_one_connection_are_refused() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let dir = c.state_dir.join("hostile-client");
    client_cert(&c, &dir, "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1")?;
    let max = mesh_node::proxy::hbone::MAX_STREAMS;
    let opened = max + 50;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut h2 = RawH2::open(&c, &dir).await?;
        // Every CONNECT at once, without waiting for the server's SETTINGS or answers.
        let mut burst = Vec::new();
        for i in 0..opened {
            burst.extend(h2_frame(H2_HEADERS, 0x4, 2 * i + 1, &connect_block(TARGET)));
        }
        h2.send(&burst).await?;
        let seen = h2
            .read_until(Duration::from_secs(15), |s| {
                s.answered.len() + s.resets.len() >= opened as usize || s.goaway.is_some()
            })
            .await?;
        let refused = seen
            .resets
            .values()
            .filter(|c| **c == REFUSED_STREAM)
            .count();
        eprintln!(
            "{opened} CONNECTs at once: {} answered, {refused} refused (REFUSED_STREAM), resets {:?}, goaway {:?}",
            seen.answered.len(),
            seen.resets.values().collect::<std::collections::BTreeSet<_>>(),
            seen.goaway
        );
        ensure!(
            seen.answered.len() <= max as usize,
            "{} streams answered on one connection; the limit is {max}",
            seen.answered.len()
        );
        ensure!(
            refused >= (opened - max) as usize,
            "only {refused} of the {} streams over the limit were refused",
            opened - max
        );
        Ok(())
    })?;
    expect_still_serving(&mut c)
}

#[test]
fn rapid_reset_closes_the_connection_and_others_are_served() -> Result<()> {
    let _turn = serial();
    let (mut c, _srv) = mesh_with_server()?;
    let dir = c.state_dir.join("hostile-client");
    client_cert(&c, &dir, "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut h2 = RawH2::open(&c, &dir).await?;
        // CVE-2023-44487: open a stream and cancel it at once, over and over.
        let mut burst = Vec::new();
        for i in 0..500u32 {
            let id = 2 * i + 1;
            burst.extend(h2_frame(H2_HEADERS, 0x4, id, &connect_block(TARGET)));
            burst.extend(h2_frame(H2_RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        // The server may close before the whole burst is written.
        let _ = h2.send(&burst).await;
        let seen = h2
            .read_until(Duration::from_secs(10), |s| s.goaway.is_some())
            .await?;
        eprintln!(
            "rapid reset: goaway {:?}, closed {}, {} answered",
            seen.goaway,
            seen.closed,
            seen.answered.len()
        );
        ensure!(
            seen.goaway == Some(ENHANCE_YOUR_CALM),
            "no GOAWAY ENHANCE_YOUR_CALM after 500 opened-and-cancelled streams: {seen:?}"
        );
        // And the connection is gone for good.
        let after = h2.read_until(Duration::from_secs(5), |s| s.closed).await?;
        ensure!(after.closed, "the connection stayed open after GOAWAY");
        Ok(())
    })?;
    expect_still_serving(&mut c)
}
