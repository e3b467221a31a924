//! The gateway's certificates: `kubernetes.io/tls` Secrets (`tls.crt`, `tls.key`), read from
//! the Kubernetes API (a watch) or from a folder of YAML (`--secrets-dir`, polled every
//! second). Each Secret is checked when it arrives — the chain parses, the key parses and
//! belongs to the certificate, the certificate is within its validity — and a Secret that
//! fails keeps its last good version in force, with one error naming the Secret and the
//! field. Certificates and keys never pass through the controller.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{error, info};

use crate::model::ObjKey;

/// Every usable certificate, by Secret.
pub type Secrets = BTreeMap<ObjKey, Arc<CertifiedKey>>;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {secret} ({origin}): {field}: {message}")]
    Field {
        secret: ObjKey,
        origin: String,
        field: &'static str,
        message: String,
    },
}

/// Where the Secrets come from.
#[derive(Clone, Debug)]
pub enum SecretSource {
    Dir(PathBuf),
    Kubernetes,
}

/// Checks one Secret's `tls.crt` and `tls.key` (PEM) and builds what rustls serves.
pub fn certified_key(
    secret: &ObjKey,
    origin: &str,
    crt: &[u8],
    key: &[u8],
    now: SystemTime,
) -> Result<Arc<CertifiedKey>, SecretError> {
    let err = |field: &'static str, message: String| SecretError::Field {
        secret: secret.clone(),
        origin: origin.to_string(),
        field,
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<_, _>>()
        .map_err(|e| err("tls.crt", format!("not PEM certificates: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(err("tls.crt", "holds no certificate".into()));
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| err("tls.crt", format!("not an X.509 certificate: {e}")))?;
    let validity = cert.validity();
    let now_ts = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if validity.not_after.timestamp() < now_ts {
        return Err(err(
            "tls.crt",
            format!("the certificate expired on {}", validity.not_after),
        ));
    }
    if validity.not_before.timestamp() > now_ts {
        return Err(err(
            "tls.crt",
            format!(
                "the certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| err("tls.key", format!("not a PEM private key: {e}")))?;
    let provider = crate::identity::tls::provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| err("tls.key", format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| err("tls.key", format!("does not belong to tls.crt: {e}")))?;
    Ok(Arc::new(ck))
}

/// Keeps the last good version of every Secret; reports each new error once.
#[derive(Default)]
struct Keeper {
    good: Secrets,
    /// The last error text per Secret (so an unchanged broken Secret is reported once).
    errors: HashMap<ObjKey, String>,
}

impl Keeper {
    /// Applies a full listing: `(secret, origin, crt, key)`. Secrets absent from it are gone.
    fn apply(&mut self, listing: Vec<(ObjKey, String, Vec<u8>, Vec<u8>)>) -> bool {
        let now = SystemTime::now();
        let mut next = Secrets::new();
        let mut errors = HashMap::new();
        for (key, origin, crt, k) in listing {
            match certified_key(&key, &origin, &crt, &k, now) {
                Ok(ck) => {
                    if self.errors.contains_key(&key) {
                        info!(secret = %key, "certificate usable again");
                    }
                    next.insert(key, ck);
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.errors.get(&key) != Some(&text) {
                        error!("{text}; keeping the last good certificate");
                    }
                    if let Some(old) = self.good.get(&key) {
                        next.insert(key.clone(), old.clone());
                    }
                    errors.insert(key, text);
                }
            }
        }
        self.errors = errors;
        let changed = next.len() != self.good.len()
            || next
                .iter()
                .any(|(k, v)| self.good.get(k).is_none_or(|o| !Arc::ptr_eq(o, v)));
        self.good = next;
        changed
    }
}

/// Follows the source; the receiver always holds every usable certificate.
pub fn start(source: SecretSource) -> watch::Receiver<Arc<Secrets>> {
    let (tx, rx) = watch::channel(Arc::new(Secrets::new()));
    match source {
        SecretSource::Dir(dir) => {
            tokio::spawn(poll_dir(dir, tx));
        }
        SecretSource::Kubernetes => {
            tokio::spawn(watch_kubernetes(tx));
        }
    }
    rx
}

async fn poll_dir(dir: PathBuf, tx: watch::Sender<Arc<Secrets>>) {
    let mut keeper = Keeper::default();
    let mut last: Option<Vec<(PathBuf, SystemTime, u64)>> = None;
    loop {
        let stamp = stamps(&dir);
        if last.as_ref() != Some(&stamp) {
            last = Some(stamp);
            let listing = read_dir(&dir);
            if keeper.apply(listing) || tx.borrow().is_empty() {
                tx.send_replace(Arc::new(keeper.good.clone()));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Name, modification time and size of every YAML file: a change means a new read.
fn stamps(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out: Vec<_> = yaml_files(dir)
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().ok()?, m.len()))
        })
        .collect();
    out.sort();
    out
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect()
}

/// Every `kubernetes.io/tls` Secret in the folder's YAML files (other documents skipped).
fn read_dir(dir: &Path) -> Vec<(ObjKey, String, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for path in yaml_files(dir) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (i, doc) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let Ok(v) = <yaml_serde::Value as serde::Deserialize>::deserialize(doc) else {
                continue;
            };
            if v.get("kind").and_then(|k| k.as_str()) != Some("Secret") {
                continue;
            }
            let origin = format!("{} document {}", path.display(), i + 1);
            match secret_from_value(&v) {
                Ok(Some(s)) => out.push((s.0, origin, s.1, s.2)),
                Ok(None) => {}
                Err(e) => error!(origin, "{e}"),
            }
        }
    }
    out
}

type TlsData = (ObjKey, Vec<u8>, Vec<u8>);
/// `tls.crt` and `tls.key`.
type Pem = (Vec<u8>, Vec<u8>);

/// A Secret document's key and PEM fields; `None` when it is not `kubernetes.io/tls`.
fn secret_from_value(v: &yaml_serde::Value) -> Result<Option<TlsData>, String> {
    if v.get("type").and_then(|t| t.as_str()) != Some("kubernetes.io/tls") {
        return Ok(None);
    }
    let meta = v.get("metadata");
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(|x| x.as_str());
    let Some(name) = field("name") else {
        return Err("Secret: metadata.name is missing".into());
    };
    let key = ObjKey {
        namespace: field("namespace").unwrap_or("default").to_string(),
        name: name.to_string(),
    };
    let get = |k: &str| -> Result<Vec<u8>, String> {
        if let Some(s) = v
            .get("stringData")
            .and_then(|d| d.get(k))
            .and_then(|x| x.as_str())
        {
            return Ok(s.as_bytes().to_vec());
        }
        match v
            .get("data")
            .and_then(|d| d.get(k))
            .and_then(|x| x.as_str())
        {
            Some(b) => base64::engine::general_purpose::STANDARD
                .decode(b.split_whitespace().collect::<String>())
                .map_err(|e| format!("Secret {key}: data.{k}: not base64: {e}")),
            None => Ok(Vec::new()),
        }
    };
    Ok(Some((key.clone(), get("tls.crt")?, get("tls.key")?)))
}

async fn watch_kubernetes(tx: watch::Sender<Arc<Secrets>>) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::watcher::{self, Event};
    let client = loop {
        match kube::Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                error!(error = %e, "no Kubernetes client for the gateway's Secrets; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let api: kube::Api<Secret> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields("type=kubernetes.io/tls");
    let mut stream = watcher::watcher(api, cfg).boxed();
    let mut store: BTreeMap<ObjKey, Pem> = BTreeMap::new();
    let mut init: Option<BTreeMap<ObjKey, Pem>> = None;
    let mut keeper = Keeper::default();
    while let Some(ev) = stream.next().await {
        let data = |s: &Secret| -> Option<(ObjKey, Pem)> {
            let key = ObjKey {
                namespace: s.metadata.namespace.clone()?,
                name: s.metadata.name.clone()?,
            };
            let d = s.data.as_ref();
            let get = |k: &str| {
                d.and_then(|d| d.get(k))
                    .map(|b| b.0.clone())
                    .unwrap_or_default()
            };
            Some((key, (get("tls.crt"), get("tls.key"))))
        };
        let changed = match ev {
            Ok(Event::Apply(s)) => {
                if let Some((k, v)) = data(&s) {
                    store.insert(k, v);
                }
                true
            }
            Ok(Event::Delete(s)) => {
                if let Some((k, _)) = data(&s) {
                    store.remove(&k);
                }
                true
            }
            Ok(Event::Init) => {
                init = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(s)) => {
                if let (Some(i), Some((k, v))) = (init.as_mut(), data(&s)) {
                    i.insert(k, v);
                }
                false
            }
            Ok(Event::InitDone) => {
                store = init.take().unwrap_or_default();
                true
            }
            Err(e) => {
                error!(error = %e, "watching Secrets");
                false
            }
        };
        if changed {
            let listing = store
                .iter()
                .map(|(k, (c, key))| (k.clone(), "Kubernetes".to_string(), c.clone(), key.clone()))
                .collect();
            if keeper.apply(listing) || tx.borrow().is_empty() {
                tx.send_replace(Arc::new(keeper.good.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(not_after_days: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(10);
        params.not_after = now + time::Duration::days(not_after_days);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn key() -> ObjKey {
        ObjKey {
            namespace: "edge".into(),
            name: "a".into(),
        }
    }

    #[test]
    fn bad_secrets_name_the_field_and_keep_the_last_good() {
        let now = SystemTime::now();
        let (crt, k) = pair(30);
        assert!(certified_key(&key(), "t", crt.as_bytes(), k.as_bytes(), now).is_ok());
        let (old, old_key) = pair(-1);
        let e = certified_key(&key(), "t", old.as_bytes(), old_key.as_bytes(), now)
            .expect_err("expired")
            .to_string();
        assert!(
            e.contains("Secret edge/a") && e.contains("tls.crt") && e.contains("expired"),
            "{e}"
        );
        let e = certified_key(&key(), "t", b"garbage", k.as_bytes(), now)
            .expect_err("garbage")
            .to_string();
        assert!(e.contains("tls.crt"), "{e}");
        let (_, other_key) = pair(30);
        let e = certified_key(&key(), "t", crt.as_bytes(), other_key.as_bytes(), now)
            .expect_err("mismatch")
            .to_string();
        assert!(
            e.contains("tls.key") && e.contains("does not belong"),
            "{e}"
        );

        let mut keeper = Keeper::default();
        let entry = |c: &str, k: &str| {
            (
                key(),
                "t".to_string(),
                c.as_bytes().to_vec(),
                k.as_bytes().to_vec(),
            )
        };
        assert!(keeper.apply(vec![entry(&crt, &k)]));
        let good = keeper.good.get(&key()).cloned().expect("good");
        // Broken: the last good one stays.
        assert!(!keeper.apply(vec![entry("garbage", &k)]));
        assert!(Arc::ptr_eq(&keeper.good[&key()], &good));
        // Deleted: gone.
        assert!(keeper.apply(vec![]));
        assert!(keeper.good.is_empty());
    }

    #[test]
    fn folder_secrets_are_read_from_data_or_string_data() {
        let (crt, k) = pair(30);
        let dir = tempfile::tempdir().expect("dir");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            dir.path().join("s.yaml"),
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: edge}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: a, namespace: edge}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: opaque, namespace: edge}}\ntype: Opaque\nstringData: {{x: y}}\n",
                b64(&crt),
                b64(&k)
            ),
        )
        .expect("write");
        let got = read_dir(dir.path());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, key());
        assert_eq!(got[0].2, crt.as_bytes());
    }
}
