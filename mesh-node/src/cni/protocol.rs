//! The plugin ↔ agent socket protocol (docs/cni.md "Socket protocol"): over a unix stream
//! socket, the plugin writes one JSON request line, the agent answers one JSON reply line and
//! closes. Version 1; unknown fields are ignored on both sides so either can add some.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest request or reply line either side accepts (bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// Where the agent listens unless configured otherwise (`--cni-socket`, plugin `socket`).
pub const DEFAULT_SOCKET: &str = "/var/run/sidenode/cni.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A pod sandbox was created: enroll it now if it belongs in the mesh.
    Add,
    /// A pod sandbox is going away: remove its enrollment.
    Del,
    /// Is the agent there? (CNI `CHECK`.)
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub version: u32,
    pub command: Command,
    /// CNI_CONTAINERID (the sandbox's id).
    pub container_id: String,
    /// CNI_NETNS: path of the pod's network namespace (empty on some DELs).
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: String,
    /// The pod's addresses from `prevResult.ips[].address`, without prefix length.
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// In the kernel map: the pod's connections are captured from now on.
    Enrolled,
    /// The agent's state has the pod, and it is not in the mesh (namespace not labelled, pod
    /// opted out, host network).
    NotMeshed,
    /// The agent's state did not have the pod within the agent's wait (`--cni-wait`); the
    /// reconcile enrolls it later if it belongs in the mesh.
    Unknown,
    /// `DEL`: the enrollment is gone (or there was none).
    Removed,
    /// `CHECK`: the agent answers.
    Ok,
    /// The agent could not do it (`message` says why).
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub outcome: Outcome,
    #[serde(default)]
    pub message: String,
}

impl Reply {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = Request {
            version: VERSION,
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "u".into(),
            ips: vec!["10.0.0.5".into()],
        };
        let s = serde_json::to_string(&r).expect("test step");
        assert_eq!(
            s,
            r#"{"version":1,"command":"add","containerId":"c1","netns":"/var/run/netns/cni-1","podNamespace":"shop","podName":"web-0","podUid":"u","ips":["10.0.0.5"]}"#
        );
        let back: Request = serde_json::from_str(&s).expect("test step");
        assert_eq!(back, r);
        let rep: Reply =
            serde_json::from_str(r#"{"outcome":"not-meshed","message":"x","later":1}"#)
                .expect("test step");
        assert_eq!(rep.outcome, Outcome::NotMeshed);
    }
}
