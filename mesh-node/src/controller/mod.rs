//! The controller: the mesh's source of truth and certificate authority. It watches the
//! configuration (a folder of YAML; Kubernetes later), keeps a versioned view, streams it to
//! every node (snapshot, then deltas) and signs workload certificates for the identities of
//! pods on the calling node. gRPC with TLS; callers authenticate with node tokens.

#![forbid(unsafe_code)]

pub mod ca;
pub mod grpc;
pub mod tokens;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::{error, info, warn};

use crate::config::watch::FileSource;
use crate::proto;
use view::View;

/// The name agents expect on the controller's serving certificate.
pub const SERVER_NAME: &str = "sidenode-controller";

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub node_tokens: PathBuf,
    pub scan_interval: Duration,
}

pub async fn run(cfg: ControllerConfig) -> Result<()> {
    let ca = Arc::new(
        ca::Ca::load_or_create(&cfg.state_dir, &cfg.trust_domain, cfg.cert_ttl)
            .context("loading the certificate authority")?,
    );
    let names = vec![SERVER_NAME.to_string(), cfg.listen.ip().to_string()];
    let (cert, key) = ca
        .server_cert(&names)
        .context("issuing the controller's serving certificate")?;

    let mut source = FileSource::new(&cfg.config_dir);
    let (tx, rx) = watch::channel(Arc::new(refresh(&mut source, &ca, &View::default(), true)));
    let services = grpc::Services {
        views: rx,
        ca: ca.clone(),
        tokens: Arc::new(tokens::NodeTokens::new(&cfg.node_tokens)),
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
    served.with_context(|| format!("serving gRPC on {}", cfg.listen))
}

/// Re-reads the folder; a new version only when something served changed.
fn refresh(source: &mut FileSource, ca: &ca::Ca, cur: &View, force: bool) -> View {
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
