//! Real TLS 1.3 handshakes on loopback between HBONE's client and server configurations:
//! both identities are checked, and certificates from another CA, expired ones, or for the
//! wrong identity are refused with a classified reason. Also: the certificate service signs
//! only identities of pods on the caller's node, and only for callers with a node token.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_node::controller::ca::Ca;
use mesh_node::controller::grpc::Services;
use mesh_node::controller::tokens::NodeTokens;
use mesh_node::controller::view::View;
use mesh_node::identity::Identity;
use mesh_node::identity::certs::{certs_from_pem, key_and_csr, peer_identity};
use mesh_node::identity::tls::{client_config, roots_from_pem, server_config};
use mesh_node::proto;
use mesh_node::proto::certificates_server::Certificates;
use mesh_node::proxy::hbone::Refusal;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

struct Issued {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Issued {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn issue(ca: &Ca, id: &Identity, window: Option<(SystemTime, SystemTime)>) -> Issued {
    let (key, csr) = key_and_csr(id).expect("csr");
    let pem = match window {
        None => ca.sign(&csr, id),
        Some((a, b)) => ca.sign_valid(&csr, id, a, b),
    }
    .expect("sign");
    let chain = pem
        .iter()
        .flat_map(|p| certs_from_pem(p).expect("pem"))
        .collect();
    Issued {
        chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

fn ca(dir: &std::path::Path) -> Ca {
    Ca::load_or_create(dir, "cluster.local", Duration::from_secs(3600)).expect("ca")
}

/// Runs one handshake; returns (client result, server result with the client's identity).
/// Each side's failure is the `std::io::Error` tokio-rustls gave it, classified (server) the
/// way the HBONE listener classifies and counts it (`Refusal::of_tls`, as in
/// `proxy::inbound`); the client's error is left for the caller to classify the way the
/// outbound client does (`proxy::hbone::client`).
async fn handshake(
    server: &Issued,
    server_roots_pem: &str,
    client: &Issued,
    client_roots_pem: &str,
    expected: Identity,
) -> (Result<(), std::io::Error>, Result<Identity, Refusal>) {
    let scfg = server_config(
        server.chain.clone(),
        server.key(),
        roots_from_pem(server_roots_pem).expect("roots"),
    )
    .expect("server config");
    let ccfg = client_config(
        client.chain.clone(),
        client.key(),
        roots_from_pem(client_roots_pem).expect("roots"),
        expected,
    )
    .expect("client config");
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        match tokio_rustls::TlsAcceptor::from(scfg).accept(s).await {
            Ok(tls) => {
                let id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| peer_identity(c));
                match id {
                    Some(Ok(id)) => Ok(id),
                    _ => Err(Refusal::Untrusted),
                }
            }
            Err(e) => Err(Refusal::of_tls(&e)),
        }
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let c = tokio_rustls::TlsConnector::from(ccfg)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map(|_| ());
    let s = srv.await.expect("server task");
    (c, s)
}

#[tokio::test]
async fn mutual_identities_are_proven_and_bad_certificates_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca1 = ca(&dir.path().join("ca1"));
    let other = ca(&dir.path().join("ca2"));
    let roots = ca1.trust_bundle_pem().to_string();
    let a = Identity::new("cluster.local", "mesh", "client");
    let b = Identity::new("cluster.local", "mesh", "server");
    let server = issue(&ca1, &b, None);
    let client = issue(&ca1, &a, None);

    // Good: both sides proven; the server learns the client's identity.
    let (c, s) = handshake(&server, &roots, &client, &roots, b.clone()).await;
    assert!(c.is_ok(), "{c:?}");
    assert_eq!(s, Ok(a.clone()));

    // The server is not who the client expects.
    let wrong = Identity::new("cluster.local", "mesh", "someone-else");
    let (c, _) = handshake(&server, &roots, &client, &roots, wrong).await;
    let e = c.expect_err("wrong server identity must be refused");
    // The error the outbound client gets, classified as it classifies it (no string rebuilt).
    assert_eq!(Refusal::of_tls(&e), Refusal::WrongIdentity, "{e}");

    // A client certificate from another CA.
    let stranger = issue(&other, &a, None);
    let (_, s) = handshake(&server, &roots, &stranger, &roots, b.clone()).await;
    assert_eq!(s, Err(Refusal::Untrusted));

    // An expired client certificate from the right CA.
    let day = Duration::from_secs(86_400);
    let past = SystemTime::now() - 10 * day;
    let expired = issue(&ca1, &a, Some((past, past + day)));
    let (_, s) = handshake(&server, &roots, &expired, &roots, b.clone()).await;
    assert_eq!(s, Err(Refusal::Expired));

    // A server certificate from another CA is refused by the client.
    let fake_server = issue(&other, &b, None);
    let (c, _) = handshake(&fake_server, other.trust_bundle_pem(), &client, &roots, b).await;
    let e = c.expect_err("an untrusted server must be refused");
    // As the certificate error webpki found, which rustls turns into the alert the server
    // gets, as ztunnel's client does (not a general error, sent as `handshake_failure`). Both
    // test CAs are named "sidenode root CA": the issuer is found by name and its signature
    // fails (`BadSignature`, alert `decrypt_error`); a CA of another name gives
    // `UnknownIssuer` (`unknown_ca`), checked end to end in tests/tests/ztunnel_wire.rs.
    let tls = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .expect("a rustls error");
    assert_eq!(
        tls,
        &rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature),
        "{e}"
    );
    assert_eq!(Refusal::of_tls(&e), Refusal::Untrusted, "{e}");
}

fn services(dir: &std::path::Path) -> Services {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    std::fs::write(tokens.join("node1"), "tok-1\n").expect("token");
    std::fs::write(tokens.join("node2"), "tok-2\n").expect("token");
    let ca = Arc::new(ca(&dir.join("ca")));
    let mut view = View {
        version: 1,
        trust_domain: "cluster.local".into(),
        ..View::default()
    };
    for (node, pod, sa) in [("node1", "a", "sa-a"), ("node2", "b", "sa-b")] {
        view.workloads.insert(
            format!("mesh/{pod}"),
            proto::Workload {
                uid: format!("mesh/{pod}"),
                namespace: "mesh".into(),
                name: pod.into(),
                service_account: sa.into(),
                node: node.into(),
                ..Default::default()
            },
        );
    }
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(view));
    std::mem::forget(_tx);
    Services {
        views: rx,
        ca,
        auth: Arc::new(mesh_node::controller::grpc::Auth::NodeTokens(
            NodeTokens::new(tokens),
        )),
    }
}

fn sign_req(token: Option<&str>, id: &Identity) -> tonic::Request<proto::SignRequest> {
    let (_, csr) = key_and_csr(id).expect("csr");
    let mut r = tonic::Request::new(proto::SignRequest { csr_pem: csr });
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    r
}

#[tokio::test]
async fn certificate_service_signs_only_for_pods_on_the_callers_node() {
    let dir = tempfile::tempdir().expect("tmp");
    let svc = services(dir.path());
    let mine = Identity::new("cluster.local", "mesh", "sa-a");
    let theirs = Identity::new("cluster.local", "mesh", "sa-b");

    let ok = svc
        .sign(sign_req(Some("tok-1"), &mine))
        .await
        .expect("own pod is signed")
        .into_inner();
    let leaf = certs_from_pem(&ok.cert_chain_pem[0]).expect("pem");
    assert_eq!(peer_identity(&leaf[0]).expect("identity"), mine);

    let refused = svc
        .sign(sign_req(Some("tok-1"), &theirs))
        .await
        .expect_err("pod on another node");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("node1"), "{}", refused.message());

    let other_td = Identity::new("evil.example", "mesh", "sa-a");
    let refused = svc
        .sign(sign_req(Some("tok-1"), &other_td))
        .await
        .expect_err("foreign trust domain");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    for token in [None, Some("nope")] {
        let refused = svc
            .sign(sign_req(token, &mine))
            .await
            .expect_err("unauthenticated");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    let mut garbage = tonic::Request::new(proto::SignRequest {
        csr_pem: "not a csr".into(),
    });
    garbage
        .metadata_mut()
        .insert("authorization", "Bearer tok-1".parse().expect("header"));
    assert_eq!(
        svc.sign(garbage).await.expect_err("garbage").code(),
        tonic::Code::InvalidArgument
    );
}

#[test]
fn ca_keys_are_private_and_plugin_files_are_used() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let first = ca(dir.path());
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "CA key readable by others: {mode:o}");
    // A second start reuses the same root.
    let again = ca(dir.path());
    assert_eq!(first.trust_bundle_pem(), again.trust_bundle_pem());
    // A broken plug-in file is a clear error naming the file.
    std::fs::write(dir.path().join("ca-cert.pem"), "garbage").expect("write");
    let err = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60))
        .err()
        .expect("error");
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");
}
