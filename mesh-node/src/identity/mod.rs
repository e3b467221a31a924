//! Workload identities (SPIFFE), their certificates, and the TLS configurations built on them.

#![forbid(unsafe_code)]

pub mod certs;
pub mod controller;
pub mod manager;
pub mod spiffe;
pub mod tls;

pub use spiffe::Identity;
