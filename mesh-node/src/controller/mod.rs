//! The controller: the mesh's source of truth and certificate authority. It watches the
//! configuration (a folder of YAML; Kubernetes later), keeps a versioned view, streams it to
//! every node (snapshot, then deltas) and signs workload certificates for the identities of
//! pods on the calling node. gRPC with TLS; callers authenticate with node tokens.

#![forbid(unsafe_code)]

pub mod ca;
pub mod gateway;
pub mod grpc;
pub mod k8s;
pub mod tokens;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::{error, info, warn};

use crate::config::watch::{FileSource, Scan};
use crate::model::Snapshot;
use crate::proto;
use grpc::Auth;
use k8s::source::KubeSource;
use view::View;

/// The name agents expect on the controller's serving certificate.
pub use crate::identity::controller::SERVER_NAME;

/// Where the controller reads the cluster from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A folder of Kubernetes-style YAML (standalone).
    Folder(PathBuf),
    /// The Kubernetes API.
    Kubernetes(KubeSettings),
}

#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// Credentials; in-cluster (or `KUBECONFIG`) when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// The controller's own namespace (Lease, CA Secret, agent service account).
    pub namespace: String,
    /// This replica's name in the Lease.
    pub pod_name: String,
    /// The agents' service account (in `namespace`); only its tokens are accepted.
    pub agent_service_account: String,
    /// The audience agents' projected tokens are issued for.
    pub token_audience: String,
    pub lease_name: String,
    pub lease_duration: Duration,
}

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub source: SourceConfig,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    /// Node tokens folder; required with a folder source, replaces TokenReview on Kubernetes.
    pub node_tokens: Option<PathBuf>,
    pub scan_interval: Duration,
}

/// The configuration source: the one place a folder and the Kubernetes API differ. Everything
/// after it (snapshot → view → stream) is the same code.
enum Source {
    Folder(FileSource),
    Kube(KubeSource),
}

impl Source {
    fn scan(&mut self) -> Scan {
        match self {
            Source::Folder(f) => f.scan(),
            Source::Kube(k) => k.scan(),
        }
    }
    fn snapshot(&self) -> (Snapshot, Vec<String>) {
        match self {
            Source::Folder(f) => f.snapshot(),
            Source::Kube(k) => (k.snapshot(), Vec::new()),
        }
    }
}

pub async fn run(cfg: ControllerConfig) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = Vec::new();
    let (ca, mut source, auth) = match &cfg.source {
        SourceConfig::Folder(dir) => {
            let ca = ca::Ca::load_or_create(&cfg.state_dir, &cfg.trust_domain, cfg.cert_ttl)
                .context("loading the certificate authority")?;
            let Some(tokens) = &cfg.node_tokens else {
                bail!("--node-tokens is required with --config");
            };
            (
                ca,
                Source::Folder(FileSource::new(dir)),
                Auth::NodeTokens(tokens::NodeTokens::new(tokens)),
            )
        }
        SourceConfig::Kubernetes(k) => {
            let client = k8s::client(k.kubeconfig.as_deref()).await?;
            let ca = k8s::ca_secret::load(
                client.clone(),
                &k.namespace,
                &cfg.state_dir,
                &cfg.trust_domain,
                cfg.cert_ttl,
            )
            .await
            .context("loading the certificate authority")?;
            let src = KubeSource::start(client.clone());
            let mut waited = 0u32;
            while !src.synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                waited += 1;
                if waited.is_multiple_of(50) {
                    warn!(
                        "still waiting for the first list of namespaces, nodes, pods, services and service accounts"
                    );
                }
            }
            info!("kubernetes objects listed");
            let auth = match &cfg.node_tokens {
                Some(t) => Auth::NodeTokens(tokens::NodeTokens::new(t)),
                None => Auth::TokenReview(k8s::auth::TokenReviewer::new(
                    client.clone(),
                    &k.namespace,
                    &k.agent_service_account,
                    &k.token_audience,
                )),
            };
            let (leader_tx, leader_rx) = watch::channel(false);
            let lcfg = k8s::leader::LeaderConfig {
                namespace: k.namespace.clone(),
                lease_name: k.lease_name.clone(),
                identity: k.pod_name.clone(),
                lease_duration: k.lease_duration,
                renew_every: (k.lease_duration / 3).max(Duration::from_millis(500)),
            };
            background.push(tokio::spawn(k8s::leader::run(
                client.clone(),
                lcfg,
                leader_tx,
                stop_rx.clone(),
            )));
            background.push(tokio::spawn(leader_work(
                client,
                src.clone(),
                ca.trust_bundle_pem().to_string(),
                leader_rx,
            )));
            (ca, Source::Kube(src), auth)
        }
    };
    let ca = Arc::new(ca);
    let names = vec![SERVER_NAME.to_string(), cfg.listen.ip().to_string()];
    let (cert, key) = ca
        .server_cert(&names)
        .context("issuing the controller's serving certificate")?;

    let (tx, rx) = watch::channel(Arc::new(refresh(&mut source, &ca, &View::default(), true)));
    let services = grpc::Services {
        views: rx,
        ca: ca.clone(),
        auth: Arc::new(auth),
    };

    // Configuration watch: a new version on every change.
    let scan = cfg.scan_interval;
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(scan);
        loop {
            tick.tick().await;
            let cur = tx.borrow().clone();
            let next = refresh(&mut source, &ca, &cur, false);
            if next.version != cur.version {
                info!(
                    version = next.version,
                    workloads = next.workloads.len(),
                    "state changed"
                );
                let _ = tx.send(Arc::new(next));
            }
        }
    });

    let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(cert, key));
    info!(listen = %cfg.listen, "controller ready");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    error!(error = %e, "cannot watch SIGTERM");
                    return std::future::pending().await;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let served = Server::builder()
        .tls_config(tls)
        .context("controller TLS")?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(proto::state_server::StateServer::new(services.clone()))
        .add_service(proto::certificates_server::CertificatesServer::new(
            services,
        ))
        .serve_with_shutdown(cfg.listen, shutdown)
        .await;
    watcher.abort();
    // Let the leader release its lease, so another replica takes over at once.
    let _ = stop_tx.send(true);
    for task in background {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    served.with_context(|| format!("serving gRPC on {}", cfg.listen))
}

/// While this replica leads: keep the root certificate published in every namespace and the
/// Gateway API status written.
async fn leader_work(
    client: ::kube::Client,
    src: KubeSource,
    root_pem: String,
    mut leader: watch::Receiver<bool>,
) {
    let mut publisher = k8s::publish::Publisher::new(client.clone());
    let mut status = k8s::status::StatusWriter::new(client);
    loop {
        if *leader.borrow_and_update() {
            let snap = src.snapshot();
            publisher.sync(snap.namespaces.keys(), &root_pem).await;
            status.sync(&gateway::resolve(&snap)).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = leader.changed() => if r.is_err() { return },
            }
        } else {
            publisher.reset();
            status.reset();
            if leader.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Re-reads the source; a new version only when something served changed.
fn refresh(source: &mut Source, ca: &ca::Ca, cur: &View, force: bool) -> View {
    let scan = source.scan();
    for e in &scan.new_errors {
        error!("config error: {e}; keeping the last good state");
    }
    if !(scan.changed || force) {
        return cur.clone();
    }
    let (snap, dups) = source.snapshot();
    for d in dups {
        warn!("config: {d}");
    }
    let mut next = View::from_snapshot(&snap, ca.trust_bundle_pem(), &ca.trust_domain);
    if next.same_content(cur) && !force {
        return cur.clone();
    }
    next.version = cur.version + 1;
    next
}
