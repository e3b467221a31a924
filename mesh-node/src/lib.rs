//! sidenode's node agent, node proxy, controller and CLI.
//!
//! Follow a connection through the folders: `kernel` (the eBPF side: load, maps, netns) →
//! `proxy/outbound` (accept a captured connection, find its original destination) →
//! `proxy/hbone` (pooled HTTP/2 CONNECT over mutual TLS to the destination pod's 15008) →
//! `proxy/inbound` (TLS accept inside the destination pod's namespace, CONNECT, connect to the
//! pod). Identities and certificates: `identity`. State flows one way: `config` (YAML) or
//! `controller` (gRPC stream, `state`) → `model` → `agent` (enrollment) and `proxy`.
//! Which policy applies where (shared by agent and proxy): `policy`.
//!
//! Only `kernel` (bpf and namespace syscalls) may use `unsafe`; every other module forbids it.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod cni;
pub mod config;
pub mod controller;
pub mod defaults;
pub mod gateway;
pub mod identity;
pub mod kernel;
pub mod model;
pub mod policy;
pub mod proto;
pub mod proxy;
pub mod state;
pub mod telemetry;
