//! Hostile input on a pod's HBONE listener (`podIP:15008`), end to end on the simulated mesh
//! cluster: garbage bytes, truncated and stalled TLS handshakes, bad `CONNECT` requests over a
//! valid mTLS connection, oversized headers, many half-open sockets. Each case checks that the
//! connection gets an error, that the refusal is counted where a counter exists, and that the
//! proxy keeps serving (alive, and a normal meshed connection still goes through HBONE).
//!
//! Run as root: `cargo test -p sidenode-tests --test hostile -- --test-threads=1`.

mod common;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_node::identity::Identity;
use mesh_node::identity::certs::certs_from_pem;
use mesh_node::identity::tls::{client_config, roots_from_pem};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
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
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=URI:{identity}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth,serverAuth\n"
        ),
    )?;
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
    ]))?;
    let sd = c.controller_state_dir();
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["ca", "-batch", "-notext", "-config"])
            .arg(dir.join("ca/ca.cnf"))
            .args(["-in", "client.csr", "-out", "client.pem"])
            .arg("-cert")
            .arg(sd.join("ca-cert.pem"))
            .arg("-keyfile")
            .arg(sd.join("ca-key.pem"))
            .args(["-extfile", "leaf.ext"]),
    )?;
    Ok(())
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An mTLS + HTTP/2 connection to node2-pod1's listener (from node1's netns) with a mesh
/// certificate for node1-pod1, checking the listener presents node2-pod1's identity.
async fn hbone_connect(c: &Cluster, dir: &Path) -> Result<Sender> {
    let sd = c.controller_state_dir();
    let mut pem = std::fs::read_to_string(dir.join("client.pem"))?;
    pem.push_str(&std::fs::read_to_string(sd.join("cert-chain.pem")).unwrap_or_default());
    let chain = certs_from_pem(&pem)?;
    let key = PrivateKeyDer::from_pem_file(dir.join("client.key"))
        .map_err(|e| anyhow::anyhow!("client.key: {e}"))?;
    let roots = roots_from_pem(&std::fs::read_to_string(c.controller_ca())?)?;
    let expected = Identity::new("cluster.local", "mesh", "sa-node2-pod1");
    let cfg = client_config(chain, key, roots, expected)?;
    let std_tcp = tcp_to_listener(c)?;
    std_tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(std_tcp)?;
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
/// text when the stream or connection was reset.
async fn connect(
    sender: &mut Sender,
    authority: &str,
    extra: Option<(&str, String)>,
) -> Result<Result<StatusCode, String>> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .header("forwarded", "for=198.19.1.2");
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
        let t = Instant::now();
        expect_tunnel_works(&c)?;
        ensure!(
            t.elapsed() < Duration::from_secs(3),
            "a tunnel took {:?} with 200 idle connections open",
            t.elapsed()
        );
    }
    ensure!(c.is_alive("node2", "proxy"), "node2's proxy died");

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
