//! One L4 connection's telemetry, from open to close: Istio's TCP metrics (opened, bytes as
//! they flow, closed with response flags), one access-log line at the end (target `access`),
//! and an entry in the list of open connections (the admin API's `/connections`).
//!
//! The proxy wraps the downstream side of the connection (the app's socket at the source,
//! the HBONE stream at the destination) in [`Counted`], so bytes count as they are copied:
//! reads are the request direction (`received`), writes the response direction (`sent`).
//!
//! Response flags are Envoy's where one fits: `-` none, `UF` upstream connect failure, `UH`
//! no healthy upstream (no ready endpoint), `NR` no route, `UO` overflow (connection pool
//! limit), `RL` rate limited, `UAEX` refused by the destination's authorization, `DC`
//! downstream (client) closed with an error, `UC` upstream closed with an error.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use super::istio::{self, Labels};

/// Where the connection runs and who is at each end.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    pub labels: Labels,
    pub src_addr: SocketAddr,
    /// The original destination (the pod or service address the client dialled).
    pub dst_addr: SocketAddr,
    /// The HBONE listener the tunnel went to (source) or came in on (destination).
    pub hbone_addr: Option<SocketAddr>,
    /// The tunnel's transport (`h2` or `quic`, `MeshConfig.spec.tunnelProtocol`); `None`:
    /// no tunnel.
    pub transport: Option<&'static str>,
}

/// Bytes so far, shared between the copy and the open-connection list.
#[derive(Default, Debug)]
pub struct Bytes {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

struct Open {
    meta: Arc<ConnMeta>,
    bytes: Arc<Bytes>,
    started_unix_ms: u64,
    started: Instant,
}

fn open_list() -> &'static Mutex<BTreeMap<u64, Open>> {
    static L: OnceLock<Mutex<BTreeMap<u64, Open>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

fn next_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// An open connection: counted opened on creation, closed by [`Tracked::close`] (or, if
/// dropped without it, closed with flags `DC`).
pub struct Tracked {
    id: u64,
    meta: Arc<ConnMeta>,
    bytes: Arc<Bytes>,
    sent: IntCounter,
    received: IntCounter,
    started: Instant,
    closed: bool,
}

impl Tracked {
    pub fn open(meta: ConnMeta) -> Tracked {
        Tracked::open_since(meta, Instant::now())
    }

    /// Like [`Tracked::open`] for a connection accepted at `started` (its duration counts
    /// from then: connect time included).
    pub fn open_since(meta: ConnMeta, started: Instant) -> Tracked {
        let counters = istio::tcp_opened(&meta.labels);
        let meta = Arc::new(meta);
        let bytes = Arc::new(Bytes::default());
        let id = next_id();
        let started_unix_ms = SystemTime::now()
            .checked_sub(started.elapsed())
            .unwrap_or_else(SystemTime::now)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        open_list()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Open {
                    meta: meta.clone(),
                    bytes: bytes.clone(),
                    started_unix_ms,
                    started,
                },
            );
        Tracked {
            id,
            meta,
            bytes,
            sent: counters.sent,
            received: counters.received,
            started,
            closed: false,
        }
    }

    /// Wraps the downstream side so its bytes are counted as they flow.
    pub fn count<S>(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            bytes: self.bytes.clone(),
            sent: self.sent.clone(),
            received: self.received.clone(),
        }
    }

    /// Batched counters for a copy loop that counts its own bytes: `(received, sent)`.
    pub fn meters(&self) -> (Meter, Meter) {
        let m = |dir, counter: &IntCounter| Meter {
            bytes: self.bytes.clone(),
            dir,
            counter: counter.clone(),
            pending: 0,
        };
        (
            m(Direction::Received, &self.received),
            m(Direction::Sent, &self.sent),
        )
    }

    pub fn meta(&self) -> &ConnMeta {
        &self.meta
    }

    /// Counts the connection closed and writes its access-log line.
    pub fn close(mut self, flags: &str, error: Option<&str>) {
        self.finish(flags, error);
    }

    fn finish(&mut self, flags: &str, error: Option<&str>) {
        if self.closed {
            return;
        }
        self.closed = true;
        open_list()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        istio::tcp_closed(&self.meta.labels, flags);
        access_log(
            &self.meta,
            self.bytes.sent.load(Ordering::Relaxed),
            self.bytes.received.load(Ordering::Relaxed),
            self.started.elapsed().as_millis() as u64,
            flags,
            error,
        );
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish("DC", Some("connection task ended"));
    }
}

/// A connection that never reached its destination: counted opened and closed with `flags`,
/// and logged.
pub fn failed(meta: ConnMeta, started: Instant, flags: &str, error: &str) {
    Tracked::open_since(meta, started).close(flags, Some(error));
}

/// The access-log line (target `access`, so `RUST_LOG=info,access=off` silences it).
fn access_log(
    m: &ConnMeta,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: u64,
    flags: &str,
    error: Option<&str>,
) {
    let l = &m.labels;
    let service = l
        .service
        .as_ref()
        .map_or(istio::UNKNOWN, |s| s.host.as_str());
    let hbone = m.hbone_addr.map_or_else(String::new, |a| a.to_string());
    let id = |principal: &str| {
        if principal == istio::UNKNOWN {
            String::new()
        } else {
            format!("spiffe://{principal}")
        }
    };
    info!(
        target: "access",
        direction = if l.reporter == istio::Reporter::Source { "outbound" } else { "inbound" },
        protocol = %l.protocol,
        transport = if l.security == istio::MUTUAL_TLS { "hbone" } else { "tcp" },
        tunnel = m.transport.unwrap_or(""),
        "src.addr" = %m.src_addr,
        "src.workload" = %l.source.workload,
        "src.namespace" = %l.source.namespace,
        "src.identity" = %id(&l.source.principal),
        "dst.addr" = %m.dst_addr,
        "dst.hbone_addr" = %hbone,
        "dst.service" = %service,
        "dst.workload" = %l.destination.workload,
        "dst.namespace" = %l.destination.namespace,
        "dst.identity" = %id(&l.destination.principal),
        security = l.security,
        bytes_sent,
        bytes_received,
        duration_ms,
        flags,
        error = error.unwrap_or(""),
        "connection complete"
    );
}

/// An open connection as the admin API lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub reporter: istio::Reporter,
    pub protocol: String,
    pub src_addr: String,
    pub dst_addr: String,
    pub hbone_addr: Option<String>,
    /// `h2` or `quic` for a tunnelled connection.
    pub transport: Option<&'static str>,
    pub src_workload: String,
    pub src_namespace: String,
    pub src_identity: String,
    pub dst_workload: String,
    pub dst_namespace: String,
    pub dst_identity: String,
    pub dst_service: Option<String>,
    pub security: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
}

/// The open connections of this proxy, oldest first.
pub fn open_connections() -> Vec<ConnectionView> {
    let list = open_list().lock().unwrap_or_else(|p| p.into_inner());
    list.iter()
        .map(|(id, o)| {
            let l = &o.meta.labels;
            ConnectionView {
                id: *id,
                reporter: l.reporter,
                protocol: l.protocol.clone(),
                src_addr: o.meta.src_addr.to_string(),
                dst_addr: o.meta.dst_addr.to_string(),
                hbone_addr: o.meta.hbone_addr.map(|a| a.to_string()),
                transport: o.meta.transport,
                src_workload: l.source.workload.clone(),
                src_namespace: l.source.namespace.clone(),
                src_identity: l.source.principal.clone(),
                dst_workload: l.destination.workload.clone(),
                dst_namespace: l.destination.namespace.clone(),
                dst_identity: l.destination.principal.clone(),
                dst_service: l.service.as_ref().map(|s| s.host.clone()),
                security: l.security.to_string(),
                bytes_sent: o.bytes.sent.load(Ordering::Relaxed),
                bytes_received: o.bytes.received.load(Ordering::Relaxed),
                started_unix_ms: o.started_unix_ms,
                duration_ms: o.started.elapsed().as_millis() as u64,
            }
        })
        .collect()
}

/// (namespace, workload) of both ends of every open connection (kept by [`sweep_forever`]).
pub fn workloads_in_use() -> HashSet<(String, String)> {
    let list = open_list().lock().unwrap_or_else(|p| p.into_inner());
    list.values()
        .flat_map(|o| {
            let l = &o.meta.labels;
            [
                (l.source.namespace.clone(), l.source.workload.clone()),
                (
                    l.destination.namespace.clone(),
                    l.destination.workload.clone(),
                ),
            ]
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Received,
    Sent,
}

/// Bytes a [`Meter`] holds back before publishing them (a busy flow publishes about once per
/// this many bytes; an idle one as soon as it pauses).
pub const METER_BATCH: u64 = 256 * 1024;

/// One direction's byte count, kept locally and published in batches: when
/// [`METER_BATCH`] bytes are pending, when the copy is about to wait ([`Meter::flush`]), and
/// when dropped. Totals are exact once the copy has ended and its meters are dropped.
pub struct Meter {
    bytes: Arc<Bytes>,
    dir: Direction,
    counter: IntCounter,
    pending: u64,
}

impl Meter {
    #[inline]
    pub fn add(&mut self, n: usize) {
        self.pending += n as u64;
        if self.pending >= METER_BATCH {
            self.flush();
        }
    }

    /// Publishes what is pending (the Istio counter and the open-connection list).
    pub fn flush(&mut self) {
        if self.pending == 0 {
            return;
        }
        let n = std::mem::take(&mut self.pending);
        match self.dir {
            Direction::Received => self.bytes.received.fetch_add(n, Ordering::Relaxed),
            Direction::Sent => self.bytes.sent.fetch_add(n, Ordering::Relaxed),
        };
        self.counter.inc_by(n);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A stream whose bytes are counted: reads as received (request direction), writes as sent.
pub struct Counted<S> {
    inner: S,
    bytes: Arc<Bytes>,
    sent: IntCounter,
    received: IntCounter,
}

impl<S> Counted<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.bytes.received.fetch_add(n, Ordering::Relaxed);
            self.received.inc_by(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.bytes.sent.fetch_add(*n as u64, Ordering::Relaxed);
            self.sent.inc_by(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.bytes.sent.fetch_add(*n as u64, Ordering::Relaxed);
            self.sent.inc_by(*n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A connection between workloads `client` and `server` of namespace `ns`, for unit tests.
/// Sweeps after every state change (at most once a second): series of workloads that left
/// the state, and that no open connection uses, are dropped.
pub async fn sweep_forever(mut state: crate::state::StateRx) {
    while state.changed().await.is_ok() {
        let live = istio::live_workloads(&state.borrow_and_update().clone());
        let in_use = workloads_in_use();
        let removed = istio::sweep(|k| live.contains(k) || in_use.contains(k));
        if removed > 0 {
            tracing::debug!(
                removed,
                "dropped the metric series of workloads that are gone"
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
pub(crate) fn test_meta(ns: &str, reporter: crate::telemetry::istio::Reporter) -> ConnMeta {
    use crate::telemetry::istio::Side;
    ConnMeta {
        labels: Labels {
            reporter,
            source: Side::named(ns, "client"),
            destination: Side::named(ns, "server"),
            service: None,
            protocol: "tcp".into(),
            security: "mutual_tls",
        },
        src_addr: "127.0.0.1:1000".parse().expect("addr"),
        dst_addr: "127.0.0.1:2000".parse().expect("addr"),
        hbone_addr: None,
        transport: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::istio::Reporter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn meta(ns: &str) -> ConnMeta {
        test_meta(ns, Reporter::Destination)
    }

    // The guard serializes the tests that share the process-wide registry; holding it across
    // the awaits is the point.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn bytes_count_as_they_flow_and_the_list_follows_the_connection() {
        let _g = crate::telemetry::test_lock();
        let t = Tracked::open(meta("conn-test"));
        let (a, mut b) = tokio::io::duplex(1024);
        let mut counted = t.count(a);
        b.write_all(b"request!").await.expect("write");
        let mut buf = [0u8; 8];
        counted.read_exact(&mut buf).await.expect("read");
        counted.write_all(b"response-bytes").await.expect("write");
        let open = open_connections();
        let me = open
            .iter()
            .find(|c| c.src_namespace == "conn-test")
            .expect("listed");
        assert_eq!((me.bytes_received, me.bytes_sent), (8, 14));
        assert!(workloads_in_use().contains(&("conn-test".into(), "server".into())));
        t.close("-", None);
        assert!(
            !open_connections()
                .iter()
                .any(|c| c.src_namespace == "conn-test")
        );
        let text = crate::telemetry::metrics::render();
        let line = |name: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name) && l.contains("source_workload_namespace=\"conn-test\"")
                })
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        assert_eq!(line("istio_tcp_received_bytes_total").as_deref(), Some("8"));
        assert_eq!(line("istio_tcp_sent_bytes_total").as_deref(), Some("14"));
        assert_eq!(
            line("istio_tcp_connections_opened_total").as_deref(),
            Some("1")
        );
        assert_eq!(
            line("istio_tcp_connections_closed_total").as_deref(),
            Some("1")
        );
    }
}
