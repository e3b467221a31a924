//! The mesh's certificate authority.
//!
//! On first start it creates a self-signed root in the controller's state folder. An operator
//! may instead bring their own, in Istio's plug-in CA file names: `ca-cert.pem` + `ca-key.pem`
//! (the signing CA), `root-cert.pem` (the trust anchor) and `cert-chain.pem` (from the signing
//! CA up to the root). Keys are written with mode 0600 and never logged.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tracing::info;

use crate::identity::Identity;
use crate::identity::certs::{CertError, uri_san};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("certificate signing request: {0}")]
    Csr(String),
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// PEM certificates from the signing CA up to (and including) the root.
    chain_pem: String,
    root_pem: String,
    pub trust_domain: String,
    pub workload_ttl: Duration,
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.into(),
        source,
    })
}

/// Writes a file only its owner can read (keys). The mode is set on the open file before
/// anything is written, so a file that existed with a looser mode is narrowed first (`mode`
/// at open applies only when the file is created).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| CaError::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    std::fs::write(path, text).map_err(|source| CaError::Io {
        path: path.into(),
        source,
    })
}

fn time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    let _ = getrandom(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

impl Ca {
    /// Loads the plug-in or previously created CA from `dir`, or creates a root there.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        workload_ttl: Duration,
    ) -> Result<Ca, CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.into(),
            source,
        })?;
        let (cert_p, key_p) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if !(cert_p.exists() && key_p.exists()) {
            Self::create_root(dir)?;
        }
        let ca_pem = read(&cert_p)?;
        let key = KeyPair::from_pem(&read(&key_p)?).map_err(|e| CaError::BadFile {
            path: key_p.clone(),
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| CaError::BadFile {
            path: cert_p.clone(),
            message: e.to_string(),
        })?;
        let root_p = dir.join(ROOT_CERT);
        let root_pem = if root_p.exists() {
            read(&root_p)?
        } else {
            ca_pem.clone()
        };
        let chain_p = dir.join(CERT_CHAIN);
        let chain_pem = if chain_p.exists() {
            read(&chain_p)?
        } else {
            ca_pem.clone()
        };
        for (p, pem) in [
            (&cert_p, &ca_pem),
            (&root_p, &root_pem),
            (&chain_p, &chain_pem),
        ] {
            if crate::identity::certs::certs_from_pem(pem)
                .map(|v| v.is_empty())
                .unwrap_or(true)
            {
                return Err(CaError::BadFile {
                    path: p.clone(),
                    message: "no PEM certificate".into(),
                });
            }
        }
        info!(dir = %dir.display(), trust_domain, "certificate authority ready");
        Ok(Ca {
            issuer,
            chain_pem,
            root_pem,
            trust_domain: trust_domain.into(),
            workload_ttl,
        })
    }

    fn create_root(dir: &Path) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::from)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CertError::from)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sidenode");
        dn.push(DnType::CommonName, "sidenode root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = time(now - Duration::from_secs(3600));
        params.not_after = time(now + Duration::from_secs(10 * 365 * 24 * 3600));
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CertError::from)?;
        let pem = cert.pem();
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
        for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
            write_public(&dir.join(name), &pem)?;
        }
        info!(dir = %dir.display(), "created a new root CA");
        Ok(())
    }

    /// The roots workload certificates chain to.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// The single SPIFFE identity a CSR asks for (any other SAN is refused).
    pub fn requested_identity(csr_pem: &str) -> Result<Identity, CaError> {
        let req = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        match req.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => {
                let s: &str = uri.as_ref();
                Ok(s.parse::<Identity>().map_err(CertError::from)?)
            }
            _ => Err(CaError::Csr(
                "must carry exactly one URI SAN (the SPIFFE identity)".into(),
            )),
        }
    }

    /// Signs a workload certificate for `id` with the CSR's public key. Returns the chain
    /// (leaf first) as PEM.
    pub fn sign(&self, csr_pem: &str, id: &Identity) -> Result<Vec<String>, CaError> {
        self.sign_for(csr_pem, id, self.workload_ttl)
    }

    /// [`Ca::sign`] with a lifetime other than the default (a MeshConfig's `certTTL`).
    pub fn sign_for(
        &self,
        csr_pem: &str,
        id: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let now = SystemTime::now();
        self.sign_valid(csr_pem, id, now - Duration::from_secs(300), now + ttl)
    }

    /// Signs with an explicit validity window (tests make expired certificates with it).
    pub fn sign_valid(
        &self,
        csr_pem: &str,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<String>, CaError> {
        let mut req = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CertError::from)?;
        params.subject_alt_names = vec![uri_san(id)?];
        params.not_before = time(not_before);
        params.not_after = time(not_after);
        params.serial_number = Some(random_serial());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        req.params = params;
        let cert = req.signed_by(&self.issuer).map_err(CertError::from)?;
        let mut chain = vec![cert.pem()];
        // Intermediates: the chain file without the root itself.
        let root = crate::identity::certs::certs_from_pem(&self.root_pem)?;
        for c in crate::identity::certs::certs_from_pem(&self.chain_pem)? {
            if !root.contains(&c) {
                chain.push(der_to_pem(&c));
            }
        }
        Ok(chain)
    }

    /// A serving certificate for the controller's own gRPC endpoint (DNS and IP SANs).
    pub fn server_cert(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::from)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(CertError::from)?;
        let now = SystemTime::now();
        params.not_before = time(now - Duration::from_secs(300));
        params.not_after = time(now + Duration::from_secs(365 * 24 * 3600));
        params.serial_number = Some(random_serial());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CertError::from)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

pub fn der_to_pem(der: &rustls_pki_types::CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_private_narrows_an_existing_file_to_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        super::write_private(&path, b"new").expect("write_private");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
    }
}
