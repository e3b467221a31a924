//! How this node proves itself to the controller: the controller's TLS name, the node token
//! sent on every call, and the authenticated gRPC channel that the state stream
//! (`state::client`) and the certificate requests (`manager`) share.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::warn;

use crate::proto;

/// The name in the controller's serving certificate, which nodes check.
pub const SERVER_NAME: &str = "sidenode-controller";

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
        .domain_name(SERVER_NAME);
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

pub fn cert_client(
    c: &(Channel, TokenAuth),
) -> proto::certificates_client::CertificatesClient<AuthChannel> {
    proto::certificates_client::CertificatesClient::with_interceptor(c.0.clone(), c.1.clone())
}
