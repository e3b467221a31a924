//! What the node lets operators see: logs (`logging`), Prometheus metrics (`metrics`, with
//! Istio's standard metrics in `istio`), per-connection telemetry and access logs (`conn`),
//! distributed tracing (`trace`: W3C trace context, OTLP export).

#![forbid(unsafe_code)]

pub mod conn;
pub mod istio;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod request;
pub mod trace;

/// The metric registry and the connection list are process-wide: tests that read or sweep
/// them take turns.
#[cfg(test)]
pub(crate) fn test_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}
