//! Workload certificates on a node: one per identity of a local pod, requested from the
//! controller with a CSR (the private key never leaves the process), cached, and renewed at
//! half-life. Renewal never drops a connection: established TLS sessions keep going, new ones
//! use the new certificate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};

use super::Identity;
use super::certs::{CertInfo, cert_info, certs_from_pem, key_and_csr};
use crate::identity::controller::AuthChannel;
use crate::proto;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("requesting a certificate for {id}: {status}")]
    Refused { id: Identity, status: String },
    #[error("certificate for {id}: {message}")]
    Bad { id: Identity, message: String },
}

/// A signed certificate and its key, with the TLS server side ready.
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub info: CertInfo,
    /// When to renew: half of the lifetime that was left when it was obtained. (Measured from
    /// then, not from `not_before`, which the CA backdates for clock skew.)
    pub renew_at: SystemTime,
    /// Increases with every certificate this manager obtains (pools key on it).
    pub generation: u64,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl WorkloadCert {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
    pub fn client_config(
        &self,
        expected: Identity,
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        super::tls::client_config(self.chain.clone(), self.key(), self.roots.clone(), expected)
    }
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("generation", &self.generation)
            .finish()
    }
}

/// What may be shown of a held certificate: the identity, the validity and the public chain
/// (leaf first). No key.
#[derive(Clone, Debug)]
pub struct PublicCert {
    pub identity: Identity,
    pub generation: u64,
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub renew_at: SystemTime,
}

pub struct CertManager {
    client: proto::certificates_client::CertificatesClient<AuthChannel>,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
    fetching: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
    generation: AtomicU64,
}

impl CertManager {
    pub fn new(client: proto::certificates_client::CertificatesClient<AuthChannel>) -> Arc<Self> {
        Arc::new(Self {
            client,
            certs: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    fn cached(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.certs.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// The cached certificate, if it is not yet due for renewal.
    fn fresh(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.cached(id).filter(|c| SystemTime::now() < c.renew_at)
    }

    /// The current certificate for `id`. A connection waits for the controller only when
    /// there is no valid certificate (the first one, or an expired one): past half-life a
    /// still-valid certificate is served at once and `renew_forever` fetches the next one in
    /// the background, so a controller that is away never stalls new connections.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        if let Some(c) = self.cached(id)
            && SystemTime::now() < c.info.not_after
        {
            return Ok(c);
        }
        self.obtain(id).await
    }

    /// Fetches a certificate for `id` unless another caller did while this one waited (one
    /// request per identity at a time). On failure a still-valid certificate is kept.
    async fn obtain(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let lock = {
            let mut m = self.fetching.lock().map_err(|_| IdentityError::Bad {
                id: id.clone(),
                message: "lock poisoned".into(),
            })?;
            m.entry(id.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        // Another caller may have fetched it while this one waited.
        if let Some(c) = self.fresh(id) {
            return Ok(c);
        }
        match self.fetch(id).await {
            Ok(c) => Ok(c),
            Err(e) => match self.cached(id) {
                Some(c) if SystemTime::now() < c.info.not_after => {
                    warn!(identity = %id, error = %e, "renewal failed; using the current certificate until it expires");
                    Ok(c)
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let bad = |message: String| IdentityError::Bad {
            id: id.clone(),
            message,
        };
        let (key, csr) = key_and_csr(id).map_err(|e| bad(e.to_string()))?;
        let resp = self
            .client
            .clone()
            .sign(proto::SignRequest { csr_pem: csr })
            .await
            .map_err(|s| IdentityError::Refused {
                id: id.clone(),
                status: s.message().to_string(),
            })?
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain_pem
            .iter()
            .map(|p| certs_from_pem(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .flatten()
            .collect();
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let info = cert_info(leaf).map_err(|e| bad(e.to_string()))?;
        if info.identity.as_ref() != Some(id) {
            return Err(bad(format!(
                "issued for {:?}, not the identity asked for",
                info.identity
            )));
        }
        let roots =
            super::tls::roots_from_pem(&resp.trust_bundle_pem).map_err(|e| bad(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        let server_config = super::tls::server_config(
            chain.clone(),
            PrivateKeyDer::Pkcs8(key.clone_key()),
            roots.clone(),
        )
        .map_err(|e| bad(e.to_string()))?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let renewing = self.cached(id).is_some();
        let now = SystemTime::now();
        let renew_at = now + info.not_after.duration_since(now).unwrap_or(Duration::ZERO) / 2;
        let cert = Arc::new(WorkloadCert {
            renew_at,
            identity: id.clone(),
            chain,
            key,
            roots,
            info,
            generation,
            server_config,
        });
        if let Ok(mut m) = self.certs.lock() {
            m.insert(id.clone(), cert.clone());
        }
        let left = cert
            .info
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        info!(identity = %id, generation, valid_for_s = left.as_secs(), "{}", if renewing { "certificate renewed" } else { "certificate issued" });
        Ok(cert)
    }

    /// Drops certificates of identities no longer on this node.
    pub fn retain(&self, keep: &dyn Fn(&Identity) -> bool) {
        if let Ok(mut m) = self.certs.lock() {
            m.retain(|id, _| keep(id));
        }
    }

    /// The certificates held, by identity: public parts only (the admin API's
    /// `/config_dump`). The private keys stay in [`WorkloadCert`], which this never hands out.
    pub fn certificates(&self) -> Vec<PublicCert> {
        let Ok(m) = self.certs.lock() else {
            return Vec::new();
        };
        let mut out: Vec<PublicCert> = m
            .values()
            .map(|c| PublicCert {
                identity: c.identity.clone(),
                generation: c.generation,
                chain: c.chain.clone(),
                not_before: c.info.not_before,
                not_after: c.info.not_after,
                renew_at: c.renew_at,
            })
            .collect();
        out.sort_by_key(|c| c.identity.to_string());
        out
    }

    /// Renews every held certificate once it is past half-life. A failed renewal is retried
    /// with a back-off per identity (1 s doubling to `RENEW_RETRY_MAX`), while the current
    /// certificate stays in use until it expires.
    pub async fn renew_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut retry: HashMap<Identity, (tokio::time::Instant, Duration)> = HashMap::new();
        loop {
            tick.tick().await;
            let due: Vec<Identity> = match self.certs.lock() {
                Ok(m) => m
                    .iter()
                    .filter(|(_, c)| SystemTime::now() >= c.renew_at)
                    .map(|(id, _)| id.clone())
                    .collect(),
                Err(_) => continue,
            };
            retry.retain(|id, _| due.contains(id));
            for id in due {
                let now = tokio::time::Instant::now();
                if retry.get(&id).is_some_and(|(at, _)| now < *at) {
                    continue;
                }
                let renewed = match self.obtain(&id).await {
                    Ok(c) => SystemTime::now() < c.renew_at,
                    Err(e) => {
                        warn!(identity = %id, error = %e, "certificate renewal failed");
                        false
                    }
                };
                if renewed {
                    retry.remove(&id);
                } else {
                    let wait = retry.get(&id).map_or(Duration::from_secs(1), |(_, w)| {
                        (*w * 2).min(crate::defaults::RENEW_RETRY_MAX)
                    });
                    retry.insert(id, (tokio::time::Instant::now() + wait, wait));
                }
            }
        }
    }
}

#[cfg(test)]
impl CertManager {
    /// Holds a certificate made outside (a test CA) as if the controller had signed it:
    /// `chain_pem` leaf first, `key` its private key.
    pub(crate) fn hold_for_tests(
        &self,
        id: &Identity,
        key: &rcgen::KeyPair,
        chain_pem: &[String],
        bundle_pem: &str,
        renew_at: Option<SystemTime>,
    ) -> Arc<WorkloadCert> {
        let chain: Vec<CertificateDer<'static>> = chain_pem
            .iter()
            .flat_map(|p| certs_from_pem(p).expect("chain PEM"))
            .collect();
        let info = cert_info(&chain[0]).expect("leaf");
        let roots = super::tls::roots_from_pem(bundle_pem).expect("bundle");
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        let server_config = super::tls::server_config(
            chain.clone(),
            PrivateKeyDer::Pkcs8(key.clone_key()),
            roots.clone(),
        )
        .expect("server config");
        let cert = Arc::new(WorkloadCert {
            renew_at: renew_at.unwrap_or(info.not_after),
            identity: id.clone(),
            chain,
            key,
            roots,
            info,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            server_config,
        });
        self.certs
            .lock()
            .expect("certs")
            .insert(id.clone(), cert.clone());
        cert
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past half-life, with a controller that accepts and never answers: connections get the
    /// current certificate at once (before, each waited on a renewal, one at a time).
    #[tokio::test]
    async fn past_half_life_a_valid_certificate_is_served_without_the_controller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::controller::ca::Ca::load_or_create(
            &dir.path().join("ca"),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .expect("ca");
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let ca_file = dir.path().join("root.pem");
        let token_file = dir.path().join("token");
        std::fs::write(&ca_file, ca.trust_bundle_pem()).expect("write");
        std::fs::write(&token_file, "t0ken\n").expect("write");
        let conn = crate::identity::controller::channel(
            &crate::identity::controller::ControllerSettings {
                addr: silent.local_addr().expect("addr").to_string(),
                ca_file,
                token_file,
            },
        )
        .expect("channel");
        let certs = CertManager::new(crate::identity::controller::cert_client(&conn));
        let id = Identity::new("cluster.local", "shop", "web");
        let (key, csr) = crate::identity::certs::key_and_csr(&id).expect("csr");
        let chain = ca.sign(&csr, &id).expect("sign");
        let held = certs.hold_for_tests(
            &id,
            &key,
            &chain,
            ca.trust_bundle_pem(),
            Some(SystemTime::UNIX_EPOCH),
        );
        for _ in 0..3 {
            let got = tokio::time::timeout(Duration::from_secs(5), certs.get(&id))
                .await
                .expect("get waited on the silent controller")
                .expect("certificate");
            assert_eq!(got.generation, held.generation);
        }
        // An identity with no certificate does wait for the controller.
        let other = Identity::new("cluster.local", "shop", "db");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), certs.get(&other))
                .await
                .is_err(),
            "a first certificate needs the controller"
        );
    }
}
