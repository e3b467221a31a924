//! TLS termination: a rustls server configuration per certificate (a Secret) and minimum
//! version, built when a certificate is first served and again only when its Secret changed,
//! so session resumption works and a rotated Secret reaches new handshakes at once while open
//! connections keep theirs. ALPN offers `h2` and `http/1.1`; no client certificate is asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::model::ObjKey;

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

type Entry = (Arc<CertifiedKey>, Arc<ServerConfig>);

#[derive(Default)]
pub struct Configs {
    by_secret: Mutex<HashMap<(ObjKey, bool), Entry>>,
}

impl Configs {
    /// The configuration serving `ck` (the current certificate of `secret`).
    pub fn get(
        &self,
        secret: &ObjKey,
        ck: &Arc<CertifiedKey>,
        tls13_only: bool,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut map = self.by_secret.lock().unwrap_or_else(|p| p.into_inner());
        let k = (secret.clone(), tls13_only);
        if let Some((have, cfg)) = map.get(&k)
            && Arc::ptr_eq(have, ck)
        {
            return Ok(cfg.clone());
        }
        let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut cfg = ServerConfig::builder_with_provider(crate::identity::tls::provider())
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(ck.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        map.insert(k, (ck.clone(), cfg.clone()));
        Ok(cfg)
    }
}
