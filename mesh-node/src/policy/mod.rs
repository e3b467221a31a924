//! Which policy applies where: resolution shared by the agent (which writes the kernel's copy)
//! and the proxy (which enforces), so both read Istio's rules the same way. Enforcement lives
//! with the component that enforces: `proxy::authz`, `proxy::ratelimit`, `agent::peer_auth`.

#![forbid(unsafe_code)]

pub mod matching;
pub mod peer_auth;

use std::sync::OnceLock;

/// Istio's default root namespace: its policies apply to every workload of the mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

static ROOT_NAMESPACE: OnceLock<String> = OnceLock::new();

/// Sets the root namespace (`--root-namespace`) once, before the agent or proxy starts.
pub fn set_root_namespace(ns: &str) {
    let _ = ROOT_NAMESPACE.set(ns.to_string());
}

/// The root namespace: `--root-namespace`, else [`DEFAULT_ROOT_NAMESPACE`].
pub fn root_namespace() -> &'static str {
    ROOT_NAMESPACE
        .get()
        .map(String::as_str)
        .unwrap_or(DEFAULT_ROOT_NAMESPACE)
}
