//! The gRPC services: the state stream and the certificate service. Every call is
//! authenticated: by a node token (a node), or on Kubernetes by a bound service-account token
//! (the agent's: a node; another's: that one workload, e.g. the ingress gateway).

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::ca::Ca;
use super::k8s::auth::{Caller, TokenReviewer};
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
    /// Who the caller proved to be.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <node token>`")
            })?;
        match &*self.auth {
            Auth::NodeTokens(t) => t.node_of(token).map(Caller::Node).ok_or_else(|| {
                warn!("refused a caller with an unknown node token");
                Status::unauthenticated("unknown node token")
            }),
            Auth::TokenReview(r) => r.caller_of(token).await.map_err(|e| {
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
        let node = self.caller(&req).await?;
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
        let node = self.caller(&req).await?;
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
        let view = self.views.borrow().clone();
        if let Err(refusal) = may_sign(&node, &view, &id.namespace, &id.service_account) {
            warn!(%node, identity = %id, reason = refusal.reason(), "refused a certificate request");
            return Err(Status::permission_denied(
                refusal.message(&id.to_string(), &node),
            ));
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

/// Why a caller may not have a certificate for an identity.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// A node asked for an identity none of its pods has.
    NotOnNode,
    /// A workload asked for another identity than its own.
    NotOwnIdentity,
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::NotOnNode => "not_on_node",
            Refusal::NotOwnIdentity => "not_own_identity",
        }
    }
    fn message(&self, id: &str, caller: &Caller) -> String {
        match (self, caller) {
            (Refusal::NotOnNode, Caller::Node(node)) => {
                format!("no pod with identity {id} is scheduled on node {node}")
            }
            _ => format!("{caller} may have a certificate for its own identity only, not {id}"),
        }
    }
}

/// A node: identities of pods scheduled on it. A workload: its own identity only.
fn may_sign(
    caller: &Caller,
    view: &View,
    namespace: &str,
    service_account: &str,
) -> Result<(), Refusal> {
    match caller {
        Caller::Node(node) => view
            .workloads
            .values()
            .any(|w| {
                &w.node == node && w.namespace == namespace && w.service_account == service_account
            })
            .then_some(())
            .ok_or(Refusal::NotOnNode),
        Caller::Workload {
            namespace: ns,
            service_account: sa,
            ..
        } => (ns == namespace && sa == service_account)
            .then_some(())
            .ok_or(Refusal::NotOwnIdentity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        let mut v = View::default();
        v.workloads.insert(
            "shop/a".into(),
            proto::Workload {
                namespace: "shop".into(),
                name: "a".into(),
                service_account: "shop-sa".into(),
                node: "n1".into(),
                ..Default::default()
            },
        );
        v
    }

    #[test]
    fn a_node_signs_for_its_pods_and_a_workload_for_itself() {
        let v = view();
        let node = Caller::Node("n1".into());
        assert_eq!(may_sign(&node, &v, "shop", "shop-sa"), Ok(()));
        assert_eq!(
            may_sign(&Caller::Node("n2".into()), &v, "shop", "shop-sa"),
            Err(Refusal::NotOnNode)
        );
        let gw = Caller::Workload {
            namespace: "istio-ingress".into(),
            service_account: "sidenode-gateway".into(),
            pod: "gw-1".into(),
            node: "n1".into(),
        };
        assert_eq!(
            may_sign(&gw, &v, "istio-ingress", "sidenode-gateway"),
            Ok(())
        );
        // Not the node's pods', even on its own node.
        let refused = may_sign(&gw, &v, "shop", "shop-sa");
        assert_eq!(refused, Err(Refusal::NotOwnIdentity));
        assert_eq!(
            Refusal::NotOwnIdentity.message("spiffe://cluster.local/ns/shop/sa/shop-sa", &gw),
            "pod istio-ingress/gw-1 (service account sidenode-gateway, node n1) may have a certificate for its own identity only, not spiffe://cluster.local/ns/shop/sa/shop-sa"
        );
    }
}
