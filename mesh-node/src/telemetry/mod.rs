//! Logs (and, later, metrics and traces).

#![forbid(unsafe_code)]

pub mod logging;
pub mod metrics;
