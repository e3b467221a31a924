//! Keys, CSRs and what a certificate says (SPIFFE identity, validity), used by the CA and by
//! the proxy's certificate manager.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};
use rustls_pki_types::CertificateDer;

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate carries no SPIFFE URI SAN")]
    NoIdentity,
    #[error(transparent)]
    BadIdentity(#[from] super::spiffe::BadIdentity),
    #[error("PEM: {0}")]
    Pem(String),
}

/// A fresh ECDSA P-256 key and a CSR asking for `id`.
pub fn key_and_csr(id: &Identity) -> Result<(KeyPair, String), CertError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![uri_san(id)?];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

pub fn uri_san(id: &Identity) -> Result<SanType, CertError> {
    let s = Ia5String::try_from(id.to_string()).map_err(CertError::Rcgen)?;
    Ok(SanType::URI(s))
}

/// What the mesh needs to know of a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub identity: Option<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let ts = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let mut identity = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                identity = Some(uri.parse()?);
                break;
            }
        }
    }
    Ok(CertInfo {
        identity,
        not_before: ts(cert.validity().not_before.timestamp()),
        not_after: ts(cert.validity().not_after.timestamp()),
    })
}

/// The SPIFFE identity of a peer's leaf certificate.
pub fn peer_identity(der: &CertificateDer<'_>) -> Result<Identity, CertError> {
    cert_info(der)?.identity.ok_or(CertError::NoIdentity)
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))
}
