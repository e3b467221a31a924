//! An HBONE client and server written from Istio ztunnel's wire format (read from
//! istio/ztunnel at 62d826530e5ce85764e309170205b293efcbc80b, 1.31.0-alpha.0-18), for the
//! conformance tests (`tests/tests/ztunnel_wire.rs`) and, later, mixed-cluster tests. Nothing
//! here comes from mesh-node: TLS, HTTP/2 settings and headers are set as ztunnel's source
//! sets them, so a test sees what sidenode does with a ztunnel peer.
//!
//! - TLS 1.3 only, suites `TLS13_AES_256_GCM_SHA384` then `TLS13_AES_128_GCM_SHA256` (ztunnel
//!   `src/tls/lib.rs`), ALPN `h2`, no SNI (the client names `0.0.0.0`, `enable_sni = false`),
//!   no resumption (`src/tls/certificate.rs`); the client checks the server's chain, then its
//!   SPIFFE id (`src/tls/workload.rs`: an unknown issuer refused as `UnknownIssuer`, so the
//!   alert is `unknown_ca`; a wrong id as `Other`, alert `certificate_unknown`);
//! - HTTP/2, client (`src/proxy/h2/client.rs`, defaults of `src/config.rs`): stream window
//!   4 MiB, connection window 16 MiB, max frame 1 MiB, 100 streams, header list 16 KiB, send
//!   buffer 4 MiB, no push; server (`src/proxy/h2/server.rs`): the same windows and frame,
//!   header list 64 KiB, send buffer 400 KiB, 200 streams;
//! - `CONNECT` (`src/proxy/outbound.rs` `create_hbone_request`): `:authority` the target
//!   `ip:port` (`[v6]:port`), headers `baggage`, `forwarded: for="<src ip:port>"`,
//!   `traceparent: 00-<32 hex>-<16 hex>-00`;
//! - answers (`src/proxy/inbound.rs`): `400` not a `CONNECT`, authority not an address, or an
//!   address that is not the one the connection reached; `401` policy; `503` target
//!   unreachable; `200` then bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// ztunnel `src/config.rs` defaults and `src/proxy/h2/{client,server}.rs` builders.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const FRAME_SIZE: u32 = 1024 * 1024;
pub const CLIENT_MAX_STREAMS: usize = 100;
pub const CLIENT_HEADER_LIST: u32 = 16 * 1024;
pub const SERVER_HEADER_LIST: u32 = 65536;
pub const SERVER_SEND_BUFFER: usize = 400 * 1024;
pub const SERVER_MAX_STREAMS: u32 = 200;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    Arc::new(CryptoProvider {
        cipher_suites: vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256],
        ..rustls::crypto::ring::default_provider()
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading {}", path.display()))
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_certs(path)?);
    if added == 0 {
        bail!("{}: no usable CA certificate", path.display());
    }
    Ok(Arc::new(roots))
}

/// The `spiffe://` URI SANs of a certificate.
pub fn spiffe_ids(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// A SPIFFE id mismatch, refused as ztunnel refuses it (`CertificateError::Other`).
#[derive(Debug)]
struct WrongId(String);

impl std::fmt::Display for WrongId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongId {}

/// ztunnel's `IdentityVerifier`: the chain (server auth), then the SPIFFE id.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(C::BadEncoding))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::UnknownIssuer => C::UnknownIssuer,
                webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                    C::Expired
                }
                webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
                other => C::Other(rustls::OtherError(Arc::new(other))),
            })
        })?;
        let ids = spiffe_ids(end_entity);
        if !ids.contains(&self.expected) {
            return Err(rustls::Error::InvalidCertificate(C::Other(
                rustls::OtherError(Arc::new(WrongId(format!(
                    "server identities {ids:?}, expected {}",
                    self.expected
                )))),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// RFC 8446 name of a TLS alert (`unknown_ca`), as tests assert it.
pub fn alert_name(a: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    match a {
        A::UnknownCA => "unknown_ca".into(),
        A::BadCertificate => "bad_certificate".into(),
        A::CertificateUnknown => "certificate_unknown".into(),
        A::CertificateExpired => "certificate_expired".into(),
        A::CertificateRequired => "certificate_required".into(),
        A::HandshakeFailure => "handshake_failure".into(),
        A::AccessDenied => "access_denied".into(),
        A::DecryptError => "decrypt_error".into(),
        A::NoApplicationProtocol => "no_application_protocol".into(),
        A::ProtocolVersion => "protocol_version".into(),
        A::UnsupportedCertificate => "unsupported_certificate".into(),
        A::IllegalParameter => "illegal_parameter".into(),
        other => format!("{other:?}"),
    }
}

/// The alert named in rustls' text "received fatal alert: UnknownCA", by its RFC 8446 name.
fn alert_in_text(text: &str) -> Option<String> {
    use rustls::AlertDescription as A;
    let (_, rest) = text.split_once("received fatal alert: ")?;
    let word: String = rest
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    (0..=255u8)
        .map(A::from)
        .find(|a| format!("{a:?}") == word)
        .map(alert_name)
}

/// The rustls error somewhere in `err`'s chain (an I/O error wrapping it, h2's I/O error).
fn rustls_error(err: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r.clone());
        }
        if let Some(h) = e.downcast_ref::<h2::Error>()
            && let Some(r) = h
                .get_io()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

// ---- client -----------------------------------------------------------------------------------

pub struct ClientArgs {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// SPIFFE id the server must present.
    pub server_id: String,
    /// `podIP:15008`.
    pub tunnel: SocketAddr,
    /// `:authority`, the destination `ip:port`.
    pub target: SocketAddr,
    /// The address the `forwarded` header names (ztunnel: the source connection's peer).
    pub source: SocketAddr,
    pub baggage: String,
    /// Written through the tunnel after the echo server's HELLO line, then read back.
    pub payload: String,
    /// Send this method instead of `CONNECT` (a refusal test).
    pub method: String,
}

/// What one `hbone-client` run saw (printed as one JSON line).
#[derive(Debug, Default, Serialize)]
pub struct ClientReport {
    /// `CONNECT` answer, when one came.
    pub status: Option<u16>,
    /// The TLS alert the server sent us (`unknown_ca`).
    pub alert_received: Option<String>,
    /// Why we refused the server's certificate (and so the alert we sent).
    pub refused_server: Option<String>,
    pub alert_sent: Option<String>,
    pub alpn: Option<String>,
    pub tls_version: Option<String>,
    /// Headers sent on the `CONNECT`.
    pub sent: BTreeMap<String, String>,
    /// The echo server's greeting line (`HELLO local=… peer=…`).
    pub hello: Option<String>,
    pub echo_ok: bool,
    pub error: Option<String>,
}

/// A random `traceparent` as ztunnel's `TraceParent::new()` writes it (version 0, flags 0).
fn traceparent() -> Result<String> {
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("/dev/urandom")?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("00-{}-{}-00", &hex[..32], &hex[32..48]))
}

pub fn client(args: ClientArgs) -> Result<ClientReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = ClientReport::default();
    let res = rt.block_on(client_run(&args, &mut report));
    if let Err(e) = res {
        let chain: &(dyn std::error::Error + 'static) = e.as_ref();
        match rustls_error(chain) {
            Some(rustls::Error::AlertReceived(a)) => report.alert_received = Some(alert_name(a)),
            Some(rustls::Error::InvalidCertificate(c)) => {
                report.alert_sent = Some(alert_name(c.clone().into()));
                report.refused_server = Some(format!("{c:?}"));
            }
            _ => {
                // h2 keeps an I/O error's text only: the alert as rustls wrote it.
                report.alert_received = alert_in_text(&format!("{e:#}"));
            }
        }
        report.error = Some(format!("{e:#}"));
    }
    Ok(report)
}

async fn client_run(args: &ClientArgs, report: &mut ClientReport) -> Result<()> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        roots: read_roots(&args.ca)?,
        expected: args.server_id.clone(),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(read_certs(&args.cert)?, read_key(&args.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(args.tunnel))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("TCP connect to {}", args.tunnel))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
            tcp,
        )
        .await
        .context("TLS handshake")?;
    {
        let (_, c) = tls.get_ref();
        report.alpn = c
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        report.tls_version = c.protocol_version().map(|v| format!("{v:?}"));
    }
    // The server speaks first (its HTTP/2 SETTINGS), or refuses our certificate with an
    // alert: wait for either before writing, so that a refusal is read as the alert it is and
    // not lost to a write on a closed connection (TLS 1.3 ends the client's handshake before
    // the server has checked its certificate). ztunnel does not wait; the bytes are the same.
    let mut tls = tls;
    let mut first = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(IO_TIMEOUT, tls.read(&mut first))
        .await
        .context("the server sent nothing after the handshake")?
        .context("after the TLS handshake")?;
    if n == 0 {
        bail!("the server closed the connection after the TLS handshake");
    }
    first.truncate(n);
    let tls = Prefixed {
        first: Bytes::from(first),
        io: tls,
    };
    let (h2c, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .initial_max_send_streams(CLIENT_MAX_STREAMS)
        .max_header_list_size(CLIENT_HEADER_LIST)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(conn);
    let mut h2c = h2c.ready().await.context("HTTP/2 connection")?;
    let headers = [
        ("baggage", args.baggage.clone()),
        ("forwarded", format!("for=\"{}\"", args.source)),
        ("traceparent", traceparent()?),
    ];
    let mut req = http::Request::builder()
        .method(args.method.as_str())
        .uri(args.target.to_string())
        .version(http::Version::HTTP_2);
    for (k, v) in &headers {
        req = req.header(*k, v);
        report.sent.insert(k.to_string(), v.clone());
    }
    let (resp, mut send) = h2c.send_request(req.body(())?, false)?;
    let resp = match tokio::time::timeout(IO_TIMEOUT, resp).await {
        Ok(r) => r.context("CONNECT answer")?,
        Err(_) => {
            // A reset stream or a connection the server closed after refusing our certificate
            // (TLS 1.3: the client's handshake completes first) surfaces here or in the driver.
            bail!("no answer to CONNECT within {IO_TIMEOUT:?}");
        }
    };
    report.status = Some(resp.status().as_u16());
    if resp.status() != http::StatusCode::OK {
        return Ok(());
    }
    let mut recv = resp.into_body();
    // The echo server's greeting, then the payload echoed.
    let mut got = Vec::new();
    let want_len = |got: &[u8]| {
        got.iter()
            .position(|b| *b == b'\n')
            .map(|i| i + 1 + args.payload.len())
    };
    send.send_data(Bytes::from(args.payload.clone()), true)?;
    while want_len(&got).is_none_or(|n| got.len() < n) {
        let chunk = match tokio::time::timeout(IO_TIMEOUT, recv.data()).await {
            Ok(Some(c)) => c?,
            Ok(None) => break,
            Err(_) => bail!("no data through the tunnel within {IO_TIMEOUT:?}"),
        };
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    if let Some((hello, rest)) = text.split_once('\n') {
        report.hello = Some(hello.to_string());
        report.echo_ok = rest == args.payload;
    }
    drop((send, recv, h2c));
    driver.abort();
    Ok(())
}

/// `io` with `first` (already read from it) put back in front.
struct Prefixed<S> {
    first: Bytes,
    io: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            let part = self.first.split_to(n);
            buf.put_slice(&part);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// ---- server -----------------------------------------------------------------------------------

pub struct ServerArgs {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Answer `401` (ztunnel's policy refusal) unless the client presents this SPIFFE id.
    pub client_id: Option<String>,
    /// One JSON line per `CONNECT`.
    pub log: PathBuf,
}

/// One `CONNECT` as the server saw it.
#[derive(Debug, Serialize)]
pub struct ServerRecord {
    pub method: String,
    pub authority: String,
    /// Every header, lower-case name → values in order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The TCP peer of the HBONE connection.
    pub peer: String,
    /// The address the connection reached (`podIP:15008`).
    pub local: String,
    pub client_ids: Vec<String>,
    pub status: u16,
    /// Why the status is not 200.
    pub reason: Option<String>,
}

pub fn server(args: ServerArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(server_run(args))
}

async fn server_run(args: ServerArgs) -> Result<()> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(read_roots(&args.ca)?, provider.clone())
            .build()
            .context("client verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&args.cert)?, read_key(&args.key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)
            .with_context(|| format!("opening {}", args.log.display()))?,
    ));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("serving");
    let client_id = Arc::new(args.client_id);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let local = tcp.local_addr()?;
        let acceptor = acceptor.clone();
        let log = log.clone();
        let client_id = client_id.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("TLS from {peer}: {e}");
                    return;
                }
            };
            let ids = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| spiffe_ids(c))
                .unwrap_or_default();
            let conn = Conn {
                peer,
                local,
                ids,
                want_id: client_id,
                log,
            };
            if let Err(e) = serve_h2(tls, Arc::new(conn)).await {
                eprintln!("HTTP/2 from {peer}: {e:#}");
            }
        });
    }
}

struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    ids: Vec<String>,
    want_id: Arc<Option<String>>,
    log: Arc<Mutex<std::fs::File>>,
}

async fn serve_h2(tls: tokio_rustls::server::TlsStream<TcpStream>, conn: Arc<Conn>) -> Result<()> {
    let mut h2c = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .max_header_list_size(SERVER_HEADER_LIST)
        .max_send_buffer_size(SERVER_SEND_BUFFER)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await?;
    while let Some(req) = h2c.accept().await {
        let (req, respond) = req?;
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connect(req, respond, &conn).await {
                eprintln!("CONNECT from {}: {e:#}", conn.peer);
            }
        });
    }
    Ok(())
}

/// ztunnel's inbound order: method, authority, destination check, policy, connect.
async fn serve_connect(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    conn: &Conn,
) -> Result<()> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let target = authority.parse::<SocketAddr>();
    let refusal = if req.method() != http::Method::CONNECT {
        Some((400, "not a CONNECT".to_string()))
    } else if target.is_err() {
        Some((400, format!("authority {authority:?} is not ip:port")))
    } else if target.as_ref().is_ok_and(|t| t.ip() != conn.local.ip()) {
        Some((
            400,
            "destination is not the address the connection reached".into(),
        ))
    } else if let Some(want) = conn.want_id.as_ref()
        && !conn.ids.contains(want)
    {
        Some((401, format!("client {:?} is not {want}", conn.ids)))
    } else {
        None
    };
    let mut record = ServerRecord {
        method: req.method().to_string(),
        authority,
        headers,
        peer: conn.peer.to_string(),
        local: conn.local.to_string(),
        client_ids: conn.ids.clone(),
        status: 200,
        reason: None,
    };
    let upstream = match (refusal, target) {
        (Some((code, why)), _) => Err((code, why)),
        (None, Ok(t)) => match tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(t)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err((503, format!("connecting to {t}: {e}"))),
            Err(_) => Err((503, format!("connecting to {t}: timed out"))),
        },
        (None, Err(_)) => Err((400, "no target".into())),
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err((code, why)) => {
            record.status = code;
            record.reason = Some(why);
            write_record(conn, &record)?;
            let resp = http::Response::builder().status(code).body(())?;
            respond.send_response(resp, true)?;
            return Ok(());
        }
    };
    write_record(conn, &record)?;
    let send = respond.send_response(http::Response::builder().status(200).body(())?, false)?;
    copy(upstream, send, req.into_body()).await
}

fn write_record(conn: &Conn, record: &ServerRecord) -> Result<()> {
    let line = serde_json::to_string(record)?;
    let mut f = conn
        .log
        .lock()
        .map_err(|_| anyhow::anyhow!("log lock poisoned"))?;
    writeln!(f, "{line}")?;
    f.flush()?;
    Ok(())
}

/// Bytes both ways between a TCP stream and an h2 stream, half-closes passed on.
async fn copy(
    tcp: TcpStream,
    mut send: h2::SendStream<Bytes>,
    mut recv: h2::RecvStream,
) -> Result<()> {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async move {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            wr.write_all(&chunk).await?;
        }
        wr.shutdown().await?;
        anyhow::Ok(())
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true)?;
                return anyhow::Ok(());
            }
            let mut left = Bytes::copy_from_slice(&buf[..n]);
            while !left.is_empty() {
                send.reserve_capacity(left.len());
                let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .context("stream closed")??;
                let part = left.split_to(cap.min(left.len()));
                send.send_data(part, false)?;
            }
        }
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}
