//! The controller on Kubernetes: the API as configuration source (`source`), node
//! authentication by TokenReview (`auth`), leader election on a Lease (`leader`), the shared CA
//! in a Secret (`ca_secret`), the leader's publishing of the root certificate (`publish`) and
//! its Gateway API status write-back (`status`).

pub mod auth;
pub mod ca_secret;
pub mod leader;
pub mod publish;
pub mod source;
pub mod status;

use std::path::Path;

use anyhow::{Context, Result};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// A client from `kubeconfig`, or the usual way (in-cluster, then `KUBECONFIG`/~/.kube/config).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding Kubernetes credentials (in-cluster or KUBECONFIG)")?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}
