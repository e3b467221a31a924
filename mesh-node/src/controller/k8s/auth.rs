//! Caller authentication on Kubernetes: an agent, proxy or gateway presents its projected
//! service-account token (audience `sidenode`). The controller asks the API server to review it
//! (TokenReview) and finds the pod the token is bound to (`authentication.kubernetes.io/pod-name`
//! / `pod-uid` in the review's extra fields — only bound tokens carry them, so a legacy secret
//! token is refused). A token of the agent's service account makes the caller its pod's node
//! ([`Caller::Node`]); a token of any other service account makes it that one workload
//! ([`Caller::Workload`], e.g. the ingress gateway), which may only act as itself. Results are
//! cached for a minute so a burst of certificate requests costs one review.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::warn;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const CACHE_FOR: Duration = Duration::from_secs(60);

/// Who a caller proved to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The node agent (or proxy) of this node: may act for every pod on it.
    Node(String),
    /// One pod with its own service account (the ingress gateway): may act only as itself.
    Workload {
        namespace: String,
        service_account: String,
        pod: String,
        node: String,
    },
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "node {n}"),
            Caller::Workload {
                namespace,
                service_account,
                pod,
                node,
            } => write!(
                f,
                "pod {namespace}/{pod} (service account {service_account}, node {node})"
            ),
        }
    }
}

/// `system:serviceaccount:<ns>:<name>` → (ns, name).
fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token review failed: {0}")]
    Review(String),
    #[error("token not authenticated{0}")]
    NotAuthenticated(String),
    #[error("token belongs to `{0}`, not to a service account")]
    NotServiceAccount(String),
    #[error("token is not bound to a pod (a projected service-account token is required)")]
    NotBound,
    #[error("the pod the token is bound to ({0}) is gone or was replaced")]
    PodGone(String),
    #[error("the pod the token is bound to ({0}) is not scheduled on a node")]
    NoNode(String),
}

pub struct TokenReviewer {
    client: Client,
    /// `system:serviceaccount:<ns>:<name>` of the agent.
    account: String,
    namespace: String,
    audience: String,
    cache: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl TokenReviewer {
    pub fn new(client: Client, namespace: &str, service_account: &str, audience: &str) -> Self {
        Self {
            client,
            account: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.to_string(),
            audience: audience.to_string(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Who the token's bearer is.
    pub async fn caller_of(&self, token: &str) -> Result<Caller, AuthError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
            if let Some((caller, _)) = cache.get(token) {
                return Ok(caller.clone());
            }
        }
        let caller = self.review(token).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(caller)
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let out = api
            .create(&PostParams::default(), &tr)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = out.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.map(|e| format!(": {e}")).unwrap_or_default();
            return Err(AuthError::NotAuthenticated(why));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let is_agent = name == self.account;
        let Some((namespace, service_account)) = service_account_of(&name) else {
            return Err(AuthError::NotServiceAccount(name));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::NotBound);
        };
        let pod_namespace = if is_agent { &self.namespace } else { namespace };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), pod_namespace);
        let p = pods.get_opt(&pod).await.map_err(|e| {
            warn!(pod, error = %e, "reading the pod a token is bound to");
            AuthError::Review(e.to_string())
        })?;
        let p = p.ok_or_else(|| AuthError::PodGone(pod.clone()))?;
        if p.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(AuthError::PodGone(pod));
        }
        let node = p
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| AuthError::NoNode(pod.clone()))?;
        Ok(if is_agent {
            Caller::Node(node)
        } else {
            Caller::Workload {
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
                pod,
                node,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_user_names() {
        assert_eq!(
            service_account_of("system:serviceaccount:istio-ingress:sidenode-gateway"),
            Some(("istio-ingress", "sidenode-gateway"))
        );
        assert_eq!(service_account_of("system:node:n1"), None);
        assert_eq!(service_account_of("system:serviceaccount:ns"), None);
        assert_eq!(service_account_of("system:serviceaccount::x"), None);
        assert_eq!(service_account_of("alice"), None);
    }
}
