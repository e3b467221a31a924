//! sidenode's end-to-end test support: the simulated cluster ([`cluster`]) used by
//! `cargo xtask cluster` and the e2e tests, and helpers to run the `testpod` workload in pods
//! ([`workload`]), a real kube-apiserver for the Kubernetes tests ([`kube`]), and test
//! certificates for the ingress gateway ([`tls`]), and the workload of `cargo xtask soak`
//! ([`soak`]).
pub mod cluster;
pub mod hbone_wire;
pub mod kube;
pub mod openssl;
pub mod realnode;
pub mod soak;
pub mod tls;
pub mod workload;
