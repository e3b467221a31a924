//! TLS 1.3 configurations for HBONE, with ALPN `h2`.
//!
//! - Inbound (server): requires a client certificate chaining to the trust bundle; the
//!   caller's SPIFFE identity is read from it after the handshake.
//! - Outbound (client): presents the source workload's certificate and accepts the server
//!   only if its certificate chains to the trust bundle *and* names exactly the expected
//!   destination identity (SPIFFE certificates carry no DNS name, so the usual host-name check
//!   does not apply).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::Identity;
use super::certs::peer_identity;

pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn roots_from_pem(pem: &str) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    let certs =
        super::certs::certs_from_pem(pem).map_err(|e| rustls::Error::General(e.to_string()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(rustls::Error::General(
            "trust bundle holds no usable certificate".into(),
        ));
    }
    Ok(Arc::new(roots))
}

pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // kTLS (`proxy::hbone::ktls`) takes the session keys after the handshake; and no TLS 1.3
    // session tickets (never used: clients do not resume), so no handshake messages follow it.
    cfg.enable_secret_extraction = true;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected: Identity,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected,
        provider: provider(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    // kTLS (`proxy::hbone::ktls`) takes the session keys after the handshake.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// A server certificate that chains to the trust bundle but is not the expected workload's.
/// Sent to the peer as alert `certificate_unknown` (rustls' alert for
/// `CertificateError::Other`), as ztunnel's client does on a SAN mismatch.
#[derive(thiserror::Error)]
enum ServerCertError {
    #[error("wrong server identity: {got}, expected {expected}")]
    WrongIdentity { got: String, expected: String },
    #[error("server certificate names no SPIFFE identity: {0}")]
    NoIdentity(String),
}

/// rustls shows an `OtherError` by its `Debug`: make that the message.
impl std::fmt::Debug for ServerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl ServerCertError {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(self),
        )))
    }
}

/// A chain verification failure as the `CertificateError` rustls turns into the right TLS
/// alert: an unknown issuer → `unknown_ca` (what ztunnel sends and expects), expired →
/// `certificate_expired`, a bad signature → `decrypt_error`, a wrong key usage →
/// `unsupported_certificate`. (A `rustls::Error::General` would go out as
/// `handshake_failure`.)
pub fn cert_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    use webpki::Error as W;
    let c = match e {
        W::BadDer | W::BadDerTime | W::TrailingData(_) => C::BadEncoding,
        W::CertNotValidYet { time, not_before } => C::NotValidYetContext { time, not_before },
        W::CertExpired { time, not_after } => C::ExpiredContext { time, not_after },
        W::InvalidCertValidity => C::Expired,
        W::UnknownIssuer => C::UnknownIssuer,
        W::CertRevoked => C::Revoked,
        W::UnknownRevocationStatus => C::UnknownRevocationStatus,
        W::InvalidSignatureForPublicKey => C::BadSignature,
        W::RequiredEkuNotFoundContext(_) => C::InvalidPurpose,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(cert_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(cert_error)?;
        let got = peer_identity(end_entity)
            .map_err(|e| ServerCertError::NoIdentity(e.to_string()).into_rustls())?;
        if got != self.expected {
            return Err(ServerCertError::WrongIdentity {
                got: got.to_string(),
                expected: self.expected.to_string(),
            }
            .into_rustls());
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

#[cfg(test)]
mod tests {
    use rustls::AlertDescription as A;

    fn alert(e: webpki::Error) -> A {
        match super::cert_error(e) {
            rustls::Error::InvalidCertificate(c) => A::from(c),
            other => panic!("not a certificate error: {other:?}"),
        }
    }

    #[test]
    fn chain_failures_go_out_as_the_alerts_ztunnel_sends() {
        assert_eq!(alert(webpki::Error::UnknownIssuer), A::UnknownCA);
        assert_eq!(
            alert(webpki::Error::InvalidCertValidity),
            A::CertificateExpired
        );
        assert_eq!(
            alert(webpki::Error::InvalidSignatureForPublicKey),
            A::DecryptError
        );
        assert_eq!(alert(webpki::Error::BadDer), A::BadCertificate);
        assert_eq!(alert(webpki::Error::CertRevoked), A::CertificateRevoked);
    }
}
