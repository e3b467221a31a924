//! The controller's client side: a TLS gRPC channel carrying the node token, and the state
//! stream loop that reconnects (with backoff) and resyncs from a fresh snapshot each time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

use super::NodeState;
use crate::proto;

/// How to reach and authenticate to the controller.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// `host:port`.
    pub addr: String,
    /// PEM root the controller's serving certificate chains to.
    pub ca_file: PathBuf,
    /// This node's bootstrap token.
    pub token_file: PathBuf,
}

/// Adds `authorization: Bearer <token>` to every call. The token file is read again on each
/// call (it is small): a projected service-account token is rotated by the kubelet in place.
/// If the file cannot be read, the last token read is used.
#[derive(Clone)]
pub struct TokenAuth {
    path: PathBuf,
    header: Arc<std::sync::Mutex<MetadataValue<tonic::metadata::Ascii>>>,
}

fn bearer(path: &std::path::Path) -> Result<MetadataValue<tonic::metadata::Ascii>> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading node token {}", path.display()))?;
    format!("Bearer {}", token.trim())
        .parse()
        .with_context(|| format!("{}: the token is not valid header text", path.display()))
}

impl Interceptor for TokenAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut header = self.header.lock().unwrap_or_else(|p| p.into_inner());
        match bearer(&self.path) {
            Ok(h) => *header = h,
            Err(e) => warn!(error = %format!("{e:#}"), "keeping the last token read"),
        }
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    }
}

pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, TokenAuth>;

/// A lazily connecting channel: calls fail while the controller is away, then work again.
pub fn channel(s: &ControllerSettings) -> Result<(Channel, TokenAuth)> {
    let ca = std::fs::read_to_string(&s.ca_file)
        .with_context(|| format!("reading controller CA {}", s.ca_file.display()))?;
    let header = bearer(&s.token_file)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(crate::controller::SERVER_NAME);
    let ep = Endpoint::from_shared(format!("https://{}", s.addr))
        .with_context(|| format!("controller address {}", s.addr))?
        .tls_config(tls)
        .context("controller TLS settings")?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let auth = TokenAuth {
        path: s.token_file.clone(),
        header: Arc::new(std::sync::Mutex::new(header)),
    };
    Ok((ep.connect_lazy(), auth))
}

pub fn state_client(c: &(Channel, TokenAuth)) -> proto::state_client::StateClient<AuthChannel> {
    proto::state_client::StateClient::with_interceptor(c.0.clone(), c.1.clone())
}

pub fn cert_client(
    c: &(Channel, TokenAuth),
) -> proto::certificates_client::CertificatesClient<AuthChannel> {
    proto::certificates_client::CertificatesClient::with_interceptor(c.0.clone(), c.1.clone())
}

/// Follows the state stream forever, publishing each new state. The last state stays in
/// force while the controller is unreachable.
pub async fn follow(conn: (Channel, TokenAuth), tx: watch::Sender<Arc<NodeState>>) {
    let mut backoff = Duration::from_millis(100);
    let mut was_lost = false;
    loop {
        let known = tx.borrow().version;
        let mut client = state_client(&conn);
        match client
            .watch(proto::WatchRequest {
                known_version: known,
            })
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            backoff = Duration::from_millis(100);
                            let snapshot = update.snapshot;
                            let built = update.built_unix_ms;
                            let next = tx.borrow().apply(update);
                            crate::telemetry::node::state_update(next.version, snapshot, built);
                            if snapshot {
                                info!(
                                    version = next.version,
                                    workloads = next.workloads.len(),
                                    resync = was_lost,
                                    "state stream synced"
                                );
                                was_lost = false;
                            }
                            tx.send_replace(Arc::new(next));
                        }
                        Ok(None) => {
                            crate::telemetry::node::state_connected(false);
                            break;
                        }
                        Err(e) => {
                            crate::telemetry::node::state_connected(false);
                            warn!(error = %e, "state stream error");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !was_lost {
                    warn!(error = %e.message(), "controller unreachable; keeping the last state");
                }
            }
        }
        if !was_lost {
            warn!(
                version = tx.borrow().version,
                "state stream lost; keeping the last state and reconnecting"
            );
        }
        was_lost = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
