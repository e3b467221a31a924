//! The CA on Kubernetes, shared by every controller replica through a Secret in the
//! controller's namespace: Istio's plug-in Secret `cacerts` (ca-cert.pem, ca-key.pem,
//! root-cert.pem, cert-chain.pem) when an operator created one, else `sidenode-ca`, created by
//! the first replica that finds none (a create that loses the race reads the winner's). The
//! Secret's files are written to the state folder, from which `Ca::load_or_create` reads them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use crate::controller::ca::{CA_CERT, CA_KEY, CERT_CHAIN, Ca, ROOT_CERT, write_private};

pub const PLUGIN_SECRET: &str = "cacerts";
pub const SELF_SIGNED_SECRET: &str = "sidenode-ca";
const FILES: [&str; 4] = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN];

fn write_files(dir: &Path, s: &Secret) -> Result<bool> {
    let data = s.data.clone().unwrap_or_default();
    if !(data.contains_key(CA_CERT) && data.contains_key(CA_KEY)) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in FILES {
        let path = dir.join(name);
        match data.get(name) {
            Some(v) => write_private(&path, &v.0)?,
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(true)
}

/// Loads the shared CA (creating it on first start) into `dir` and returns it.
pub async fn load(
    client: Client,
    namespace: &str,
    dir: &Path,
    trust_domain: &str,
    ttl: std::time::Duration,
) -> Result<Ca> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    for name in [PLUGIN_SECRET, SELF_SIGNED_SECRET] {
        if let Some(s) = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {namespace}/{name}"))?
            && write_files(dir, &s)?
        {
            info!(secret = %format!("{namespace}/{name}"), "using the CA from the Secret");
            return Ok(Ca::load_or_create(dir, trust_domain, ttl)?);
        }
    }
    // None yet: create one locally, then publish it unless another replica was first.
    for name in FILES {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let ca = Ca::load_or_create(dir, trust_domain, ttl)?;
    let mut data = BTreeMap::new();
    for name in FILES {
        let bytes = std::fs::read(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))?;
        data.insert(name.to_string(), ByteString(bytes));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SELF_SIGNED_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %format!("{namespace}/{SELF_SIGNED_SECRET}"), "created the mesh CA");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api
                .get(SELF_SIGNED_SECRET)
                .await
                .context("reading the CA Secret another replica created")?;
            write_files(dir, &s)?;
            Ok(Ca::load_or_create(dir, trust_domain, ttl)?)
        }
        Err(e) => {
            Err(e).with_context(|| format!("creating Secret {namespace}/{SELF_SIGNED_SECRET}"))
        }
    }
}
