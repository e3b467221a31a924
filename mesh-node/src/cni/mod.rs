//! The CNI side of enrollment (docs/cni.md): a chained CNI plugin (`sidenode-cni`) that hands
//! a new pod's network namespace to the node agent during `ADD` and waits until the agent has
//! enrolled it (or said it is not meshed), so a pod's first connection is already captured; the
//! installer that puts the plugin into a node's CNI configuration; and the socket protocol the
//! two sides speak. The agent's side of the socket is `agent::cni`.

#![forbid(unsafe_code)]

pub mod install;
pub mod plugin;
pub mod protocol;
