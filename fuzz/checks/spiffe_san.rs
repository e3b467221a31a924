//! `spiffe_san`: certificate and SPIFFE SAN parsing (`identity::certs::cert_info`, the
//! `Identity` URI parser) on arbitrary input. Shared by the cargo-fuzz target and the corpus
//! test; a violated property panics.
//!
//! Input: the first byte picks the mode. Even: the rest is a DER certificate, parsed or
//! refused, never a panic (a found identity prints as a SPIFFE URI that parses back to it).
//! Odd: the rest (lossy UTF-8) is a URI; one that parses as an identity prints back as the same
//! text, and signed by a CA into a workload certificate's URI SAN it reads back from that
//! certificate as the same identity.

use mesh_node::controller::ca::Ca;
use mesh_node::identity::Identity;
use mesh_node::identity::certs::{cert_info, certs_from_pem, key_and_csr};
use rustls_pki_types::CertificateDer;
use std::sync::OnceLock;
use std::time::Duration;

/// A CA made once per process (its files are removed at once; it is kept in memory).
fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sidenode-fuzz-ca-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, "cluster.local", Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("creating a CA in {}: {e}", dir.display()));
        let _ = std::fs::remove_dir_all(&dir);
        ca
    })
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(info) = cert_info(&CertificateDer::from(rest.to_vec()))
            && let Some(id) = info.identity
        {
            let uri = id.to_string();
            assert_eq!(
                uri.parse::<Identity>().ok(),
                Some(id),
                "{uri} does not parse back"
            );
        }
        return;
    }
    let text = String::from_utf8_lossy(rest);
    let Ok(id) = text.parse::<Identity>() else {
        return;
    };
    assert_eq!(
        id.to_string(),
        text,
        "an identity does not print as the URI it came from"
    );
    // Not every identity can go into a certificate (a URI SAN is IA5, i.e. ASCII).
    let Ok((_, csr)) = key_and_csr(&id) else {
        return;
    };
    let Ok(chain) = ca().sign(&csr, &id) else {
        return;
    };
    let leaf = chain
        .iter()
        .flat_map(|pem| certs_from_pem(pem).unwrap_or_default())
        .next()
        .unwrap_or_else(|| panic!("the CA signed {id} but returned no certificate"));
    let info = cert_info(&leaf)
        .unwrap_or_else(|e| panic!("a certificate the CA signed for {id} does not parse: {e}"));
    assert_eq!(
        info.identity,
        Some(id),
        "the SAN read back is not the identity signed"
    );
}
