//! Certificates for tests of the ingress gateway: a self-signed CA (what the outside client
//! trusts, e.g. `curl --cacert`), server certificates it signs for host names, and
//! `kubernetes.io/tls` Secrets holding them (the gateway reads Secrets from the simulated
//! cluster's config folder, `--secrets-dir`).

use crate::cluster::Cluster;
use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::Path;

/// A self-signed test CA (ECDSA P-256; rcgen's default validity, 1975 to 4096).
pub struct TestCa {
    /// The CA certificate (PEM): what clients trust.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    /// The leaf certificate followed by the CA's (a full chain, as `tls.crt` usually holds).
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A new CA whose subject is `CN=<name>`.
    pub fn new(name: &str) -> Result<TestCa> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a CA key")?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).context("CA certificate params")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for `hosts` (DNS names, `*.example.com` wildcards, or IP
    /// addresses), signed by this CA.
    pub fn server_cert(&self, hosts: &[&str]) -> Result<CertPair> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a server key")?;
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params =
            CertificateParams::new(names).with_context(|| format!("server names {hosts:?}"))?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = hosts.first() {
            dn.push(DnType::CommonName, *first);
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a server certificate")?;
        Ok(CertPair {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Write the CA certificate to `path` (for `curl --cacert`).
    pub fn write_cert(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.cert_pem).with_context(|| format!("writing {}", path.display()))
    }
}

/// A `kubernetes.io/tls` Secret (`data: tls.crt, tls.key`, base64) as one YAML document.
pub fn tls_secret_yaml(namespace: &str, name: &str, pair: &CertPair) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {}\n  namespace: {}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        q(name),
        q(namespace),
        b64(&pair.cert_pem),
        b64(&pair.key_pem)
    )
}

impl Cluster {
    /// Write `pair` as the `kubernetes.io/tls` Secret `namespace/name` into the config folder
    /// (file `secret-<namespace>-<name>.yaml`, replacing an earlier one of the same name); the
    /// gateway picks it up live. Returns the file name (for [`Cluster::remove_config_file`]).
    pub fn write_tls_secret(&self, namespace: &str, name: &str, pair: &CertPair) -> Result<String> {
        let file = format!("secret-{namespace}-{name}.yaml");
        self.write_config_file(&file, &tls_secret_yaml(namespace, name, pair))?;
        Ok(file)
    }
}
