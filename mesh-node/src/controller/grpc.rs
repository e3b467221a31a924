//! The gRPC services: the state stream and the certificate service. Every call is
//! authenticated by the caller's node token.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::ca::Ca;
use super::k8s::auth::TokenReviewer;
use super::tokens::NodeTokens;
use super::view::View;
use crate::proto;

#[derive(Clone)]
pub struct Services {
    pub views: watch::Receiver<Arc<View>>,
    pub ca: Arc<Ca>,
    pub auth: Arc<Auth>,
}

/// How callers prove their node.
pub enum Auth {
    /// Standalone: a folder of node tokens.
    NodeTokens(NodeTokens),
    /// Kubernetes: projected service-account tokens, reviewed by the API server.
    TokenReview(TokenReviewer),
}

impl Services {
    /// The node the caller proved to be.
    async fn node<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <node token>`")
            })?;
        match &*self.auth {
            Auth::NodeTokens(t) => t.node_of(token).ok_or_else(|| {
                warn!("refused a caller with an unknown node token");
                Status::unauthenticated("unknown node token")
            }),
            Auth::TokenReview(r) => r.node_of(token).await.map_err(|e| {
                warn!(error = %e, "refused a caller");
                Status::unauthenticated(e.to_string())
            }),
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::StateUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl proto::state_server::State for Services {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node = self.node(&req).await?;
        let mut views = self.views.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let first = views.borrow_and_update().clone();
        info!(%node, version = first.version, known = req.get_ref().known_version, "state stream opened");
        tokio::spawn(async move {
            if tx.send(Ok(first.snapshot())).await.is_err() {
                return;
            }
            let mut sent = first;
            while views.changed().await.is_ok() {
                let now = views.borrow_and_update().clone();
                if tx.send(Ok(now.delta_from(&sent))).await.is_err() {
                    break;
                }
                sent = now;
            }
            info!(%node, "state stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tonic::async_trait]
impl proto::certificates_server::Certificates for Services {
    async fn sign(
        &self,
        req: Request<proto::SignRequest>,
    ) -> Result<Response<proto::SignResponse>, Status> {
        let node = self.node(&req).await?;
        let csr = &req.get_ref().csr_pem;
        let id = Ca::requested_identity(csr).map_err(|e| {
            warn!(%node, reason = "bad_csr", error = %e, "refused a certificate request");
            Status::invalid_argument(e.to_string())
        })?;
        if id.trust_domain != self.ca.trust_domain {
            warn!(%node, identity = %id, reason = "trust_domain", "refused a certificate request");
            return Err(Status::permission_denied(format!(
                "{id} is not in trust domain {}",
                self.ca.trust_domain
            )));
        }
        // Only identities of pods scheduled on the caller's node.
        let view = self.views.borrow().clone();
        let on_node = view.workloads.values().any(|w| {
            w.node == node && w.namespace == id.namespace && w.service_account == id.service_account
        });
        if !on_node {
            warn!(%node, identity = %id, reason = "not_on_node", "refused a certificate request");
            return Err(Status::permission_denied(format!(
                "no pod with identity {id} is scheduled on node {node}"
            )));
        }
        let chain = match view.cert_ttl {
            Some(ttl) => self.ca.sign_for(csr, &id, ttl),
            None => self.ca.sign(csr, &id),
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        info!(%node, identity = %id, "signed a workload certificate");
        Ok(Response::new(proto::SignResponse {
            cert_chain_pem: chain,
            trust_bundle_pem: self.ca.trust_bundle_pem().to_string(),
        }))
    }
}
