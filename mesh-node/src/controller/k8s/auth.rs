//! Node authentication on Kubernetes: an agent or proxy presents its projected service-account
//! token (audience `sidenode`). The controller asks the API server to review it (TokenReview),
//! requires the agent's service account, and takes the node from the pod the token is bound to
//! (`authentication.kubernetes.io/pod-name` / `pod-uid` in the review's extra fields — only
//! bound tokens carry them, so a legacy secret token is refused). Results are cached for a
//! minute so a burst of certificate requests costs one review.

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

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token review failed: {0}")]
    Review(String),
    #[error("token not authenticated{0}")]
    NotAuthenticated(String),
    #[error("token belongs to `{0}`, not to the agent's service account `{1}`")]
    WrongAccount(String, String),
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
    cache: Mutex<HashMap<String, (String, Instant)>>,
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

    /// The node the token's bearer runs on.
    pub async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
            if let Some((node, _)) = cache.get(token) {
                return Ok(node.clone());
            }
        }
        let node = self.review(token).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(token.to_string(), (node.clone(), Instant::now()));
        Ok(node)
    }

    async fn review(&self, token: &str) -> Result<String, AuthError> {
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
        if name != self.account {
            return Err(AuthError::WrongAccount(name, self.account.clone()));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::NotBound);
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let p = pods.get_opt(&pod).await.map_err(|e| {
            warn!(pod, error = %e, "reading the pod a token is bound to");
            AuthError::Review(e.to_string())
        })?;
        let p = p.ok_or_else(|| AuthError::PodGone(pod.clone()))?;
        if p.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(AuthError::PodGone(pod));
        }
        p.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::NoNode(pod))
    }
}
