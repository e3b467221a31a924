//! Upstream HTTP connections to endpoints: inside an HBONE `CONNECT` stream to a meshed pod,
//! else a direct marked TCP connection; HTTP/1.1 or HTTP/2 (h2c with prior knowledge,
//! [`Proto`]).
//!
//! Connections are kept per (destination cluster, endpoint, source identity, protocol):
//! - HTTP/1.1: idle connections are reused by later requests; a connection goes back to the
//!   pool when its response body has been read to the end.
//! - HTTP/2: one connection per key, shared by every request while it is open (streams are
//!   multiplexed on it).
//!
//! Every connection holds a unit of the destination's `tcp.maxConnections`
//! ([`Limits::try_connection`]) until it closes. A request that finds no usable connection
//! while the limit is reached waits for one (an idle connection coming back, or one closing),
//! counted under `http.http1MaxPendingRequests` ([`Limits::try_pending`]); past that limit, or
//! after waiting the connect timeout, it fails with [`SendError::Overflow`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;
use tracing::{Instrument, debug, warn};

use super::Body;
use crate::identity::Identity;
use crate::proxy::Mesh;
use crate::proxy::hbone::client::TunnelRequest;
use crate::proxy::hbone::{Transport, count_refusal, dial, server};
use crate::proxy::route::limits::{Kind, Overflow, Permit};
use crate::proxy::route::{Limits, Resilience};
use crate::proxy::socket::{PodNetns, connect_marked};

/// Buffer of the in-process pipe to a same-node pod's destination side.
const LOCAL_PIPE: usize = 64 * 1024;

/// Idle HTTP/1.1 connections kept per key: as many as requests run at once to one endpoint
/// under load (a gateway's HTTP/2 clients multiplex many requests, each needing its own
/// HTTP/1.1 connection upstream); fewer, and every burst opens and closes connections (32 made
/// the backend accept a new connection for one request in five under 64 concurrent streams).
const MAX_IDLE: usize = 256;

/// A waiting request looks again at least this often (a missed wake-up costs no more).
const RECHECK: Duration = Duration::from_millis(100);

/// How a connection to an endpoint is opened (one per attempt: the size does not matter).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Route {
    /// HBONE to a meshed pod, presenting `src_id`'s certificate.
    Hbone {
        src_id: Identity,
        dst_id: Identity,
        /// `podIP:15008`.
        tunnel_addr: SocketAddr,
        client_ip: IpAddr,
        /// The source pod's namespace the tunnel leaves from (`Mesh::tunnel_source`).
        src_netns: Option<PodNetns>,
        baggage: String,
    },
    /// A meshed pod on this node: the destination's checks run in this process and the
    /// requests reach the pod without a tunnel (as `outbound::local` for TCP).
    Local {
        src_id: Identity,
        /// The destination workload's uid and addresses.
        pod: String,
        pod_ips: Vec<IpAddr>,
        client_ip: IpAddr,
    },
    /// Plain TCP (an endpoint outside the mesh).
    Direct,
}

/// The HTTP version spoken to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    /// h2c with prior knowledge.
    Http2,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// The destination (`Routed::cluster`): connections count against its limits.
    cluster: String,
    endpoint: SocketAddr,
    /// The source identity, empty for direct connections.
    src: String,
    proto: Proto,
}

impl Key {
    fn new(cluster: &str, endpoint: SocketAddr, route: &Route, proto: Proto) -> Key {
        Key {
            cluster: cluster.to_string(),
            endpoint,
            // Per client address too: the destination sees it (as the `forwarded` client, or
            // as the connection's source address), so a connection serves only its client.
            src: match route {
                Route::Hbone {
                    src_id, client_ip, ..
                }
                | Route::Local {
                    src_id, client_ip, ..
                } => format!("{src_id}@{client_ip}"),
                Route::Direct => String::new(),
            },
            proto,
        }
    }
}

/// A connection's request handle, with the transport of the tunnel it runs in (`None`: no
/// tunnel).
enum Sender {
    H1(http1::SendRequest<Body>, Option<Transport>),
    /// Cloned for every request; the connection lives while a clone or a stream does.
    H2(http2::SendRequest<Body>, Option<Transport>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s, _) => s.is_closed(),
            Sender::H2(s, _) => s.is_closed(),
        }
    }
}

/// A response's extension: the transport of the HBONE tunnel its request went through (set by
/// [`send`] on responses that came through one), for the request's telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnelled(pub Transport);

/// Held by a connection's task until the connection ends: its unit of `tcp.maxConnections`;
/// dropping it wakes the requests waiting for a connection to the destination.
pub struct ConnGuard {
    _permit: Permit,
    notify: Arc<Notify>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.notify.notify_waiters();
    }
}

/// Upstream connections: idle HTTP/1.1 ones, the shared HTTP/2 one per key.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Sender>>>,
    /// Per cluster: woken when a connection comes back idle or closes.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
}

/// The proxy's pool of upstream HTTP connections.
pub fn pool() -> &'static Pool {
    static P: OnceLock<Pool> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection (or tunnel) could not be opened.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed or closed before a response.
    #[error("reset: {0}")]
    Reset(String),
    /// A connection pool limit: `tcp.maxConnections` reached and the request could not wait
    /// (`http1MaxPendingRequests` reached, or waited too long).
    #[error("{0}")]
    Overflow(Overflow),
    /// The destination's authorization policy refused the tunnel (`401`/`403`).
    #[error("denied: {0}")]
    Denied(String),
}

impl Pool {
    fn notify(&self, cluster: &str) -> Arc<Notify> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get(cluster) {
            return n.clone();
        }
        w.entry(cluster.to_string()).or_default().clone()
    }

    /// A usable connection for `key`: an idle HTTP/1.1 one (removed from the pool), or the
    /// HTTP/2 one (shared, left in the pool).
    async fn take(&self, key: &Key) -> Option<Sender> {
        loop {
            let s = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let list = idle.get_mut(key)?;
                match key.proto {
                    Proto::Http1 => list.pop(),
                    Proto::Http2 => {
                        list.retain(|s| !s.is_closed());
                        match list.first() {
                            Some(Sender::H2(s, t)) => Some(Sender::H2(s.clone(), *t)),
                            _ => None,
                        }
                    }
                }
            };
            match s {
                None => {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.get(key).is_some_and(Vec::is_empty) {
                        idle.remove(key);
                    }
                    return None;
                }
                Some(Sender::H1(mut s, t)) => {
                    // An idle connection is ready at once; one still finishing a body is soon.
                    if let Ok(Ok(())) =
                        tokio::time::timeout(Duration::from_millis(50), s.ready()).await
                    {
                        return Some(Sender::H1(s, t));
                    }
                }
                Some(s @ Sender::H2(..)) => return Some(s),
            }
        }
    }

    /// Keeps `s` for `key`: idle (HTTP/1.1) or shared (HTTP/2); wakes the waiting requests.
    fn put(&self, key: Key, s: Sender) {
        if s.is_closed() {
            return;
        }
        let notify = self.notify(&key.cluster);
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(key.clone()).or_default();
            match s {
                Sender::H1(..) if list.len() < MAX_IDLE => list.push(s),
                Sender::H1(..) => {}
                // One shared connection per key: the newest.
                Sender::H2(..) => *list = vec![s],
            }
        }
        notify.notify_waiters();
    }

    /// Closes one idle HTTP/1.1 connection of `cluster` not for `except` (it goes to another
    /// endpoint or identity), so that its unit of `maxConnections` can serve `except`.
    fn evict_idle(&self, cluster: &str, except: &Key) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for (k, list) in idle.iter_mut() {
            if k.cluster == cluster && k != except && k.proto == Proto::Http1 && !list.is_empty() {
                // Dropped: the connection ends, its guard wakes the waiters.
                list.remove(0);
                return true;
            }
        }
        false
    }

    /// Idle HTTP/1.1 connections and shared HTTP/2 ones (all keys).
    pub fn idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }

    /// A connection for `key` (pooled, or new through `dial`), waiting for one when
    /// `tcp.maxConnections` of the cluster are open.
    async fn connection<D, F>(
        &'static self,
        limits: &Limits,
        res: &Resilience,
        key: &Key,
        max_wait: Duration,
        dial: D,
    ) -> Result<Sender, SendError>
    where
        D: FnOnce(ConnGuard) -> F,
        F: Future<Output = Result<Sender, SendError>>,
    {
        let notify = self.notify(&key.cluster);
        let mut pending: Option<Permit> = None;
        let mut since: Option<Instant> = None;
        loop {
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(s) = self.take(key).await {
                return Ok(s);
            }
            match limits.try_connection(&key.cluster, res) {
                Ok(permit) => {
                    drop(pending);
                    let guard = ConnGuard {
                        _permit: permit,
                        notify: notify.clone(),
                    };
                    let s = dial(guard).await?;
                    if key.proto == Proto::Http2
                        && let Sender::H2(h2, t) = &s
                    {
                        self.put(key.clone(), Sender::H2(h2.clone(), *t));
                    }
                    return Ok(s);
                }
                Err(full) => {
                    if pending.is_none() {
                        pending = Some(
                            limits
                                .try_pending(&key.cluster, res)
                                .map_err(SendError::Overflow)?,
                        );
                        debug!(cluster = %key.cluster, "waiting for an upstream connection");
                    }
                    let started = *since.get_or_insert_with(Instant::now);
                    if started.elapsed() >= max_wait {
                        return Err(SendError::Overflow(Overflow {
                            kind: Kind::PendingRequests,
                            ..full
                        }));
                    }
                    if self.evict_idle(&key.cluster, key) {
                        continue;
                    }
                    let _ = tokio::time::timeout(RECHECK, woken).await;
                }
            }
        }
    }

    /// Sends `req` on a connection for `key` and returns its response, whose body hands an
    /// HTTP/1.1 connection back to the pool once read to the end.
    async fn send<D, F>(
        &'static self,
        limits: &Limits,
        res: &Resilience,
        key: Key,
        max_wait: Duration,
        dial: D,
        req: Request<Body>,
    ) -> Result<Response<Body>, SendError>
    where
        D: FnOnce(ConnGuard) -> F,
        F: Future<Output = Result<Sender, SendError>>,
    {
        match self.connection(limits, res, &key, max_wait, dial).await? {
            Sender::H1(mut s, tunnel) => {
                let resp = s
                    .send_request(req)
                    .await
                    .map_err(|e| SendError::Reset(e.to_string()))?;
                let (parts, body) = resp.into_parts();
                let body = Pooled {
                    pool: self,
                    inner: body,
                    give_back: Some((key, s, tunnel)),
                };
                Ok(tunnelled(
                    Response::from_parts(parts, body.boxed_unsync()),
                    tunnel,
                ))
            }
            Sender::H2(mut s, tunnel) => {
                let resp = s
                    .send_request(req)
                    .await
                    .map_err(|e| SendError::Reset(e.to_string()))?;
                Ok(tunnelled(resp.map(BodyExt::boxed_unsync), tunnel))
            }
        }
    }
}

/// Sends `req` to `endpoint` over `proto`, for destination `cluster` (its limits `res`).
#[allow(clippy::too_many_arguments)]
pub async fn send(
    mesh: &Mesh,
    limits: &Limits,
    cluster: &str,
    res: &Resilience,
    connect_timeout: Duration,
    endpoint: SocketAddr,
    route: &Route,
    proto: Proto,
    req: Request<Body>,
) -> Result<Response<Body>, SendError> {
    let key = Key::new(cluster, endpoint, route, proto);
    let dial = |guard| dial(mesh, connect_timeout, endpoint, route, proto, guard);
    pool()
        .send(limits, res, key, connect_timeout, dial, req)
        .await
}

async fn dial(
    mesh: &Mesh,
    connect_timeout: Duration,
    endpoint: SocketAddr,
    route: &Route,
    proto: Proto,
    guard: ConnGuard,
) -> Result<Sender, SendError> {
    match route {
        Route::Direct => {
            let tcp = connect_marked(endpoint, connect_timeout)
                .await
                .map_err(|e| SendError::Connect(format!("{endpoint}: {e}")))?;
            handshake(TokioIo::new(tcp), endpoint, proto, None, guard).await
        }
        Route::Local {
            src_id,
            pod,
            pod_ips,
            client_ip,
        } => {
            // The destination's side (per-request authorization, rate limits, telemetry) runs
            // on the far end of an in-process pipe, as it would behind the pod's HBONE
            // listener.
            let conn = Arc::new(server::Conn {
                pod: pod.clone(),
                pod_ips: pod_ips.clone(),
                peer: SocketAddr::new(*client_ip, 0),
                peer_identity: src_id.clone(),
                connect_timeout,
                state: mesh.state.clone(),
                tunnels: mesh.authz.clone(),
                limiter: mesh.limiter.clone(),
                pods: mesh.pods.clone(),
                transport: None,
                tunnel_limits: mesh.tunnel_limits.clone(),
            });
            let span = tracing::info_span!("inbound", src_identity = %src_id, target = %endpoint, local = true);
            let admitted = server::admit(&conn, endpoint, *client_ip, &span)
                .await
                .map_err(|code| SendError::Connect(format!("{endpoint}: refused with {code}")))?;
            let (near, far) = tokio::io::duplex(LOCAL_PIPE);
            tokio::spawn(
                async move {
                    let none = crate::telemetry::trace::Span::none();
                    server::carry(
                        server::Downstream::Stream(far),
                        admitted,
                        &conn,
                        &none,
                        "local",
                    )
                    .await;
                }
                .instrument(span),
            );
            handshake(TokioIo::new(near), endpoint, proto, None, guard).await
        }
        Route::Hbone {
            src_id,
            dst_id,
            tunnel_addr,
            client_ip,
            src_netns,
            baggage,
        } => {
            let cert = mesh
                .certs
                .get(src_id)
                .await
                .map_err(|e| SendError::Connect(format!("no certificate for {src_id}: {e}")))?;
            let req = || TunnelRequest {
                cert: &cert,
                dst_identity: dst_id.clone(),
                tunnel_addr: *tunnel_addr,
                target: endpoint,
                // A pooled connection carries this client's requests from several of its
                // connections: the address, not a port.
                client: SocketAddr::new(*client_ip, 0),
                src_netns: src_netns.clone(),
                baggage: baggage.clone(),
                // A pooled connection outlives the request that opened it: no trace context.
                traceparent: None,
            };
            // The same choice of transport (and fallback) as the L4 path's (`hbone::dial`).
            let tunnel = dial::open(mesh, req, connect_timeout)
                .await
                .map_err(|e| {
                    let (reason, _) = e.refusal();
                    let transport = e.transport();
                    count_refusal("outbound", Some(transport), reason);
                    warn!(%endpoint, dst_identity = %dst_id, reason = reason.as_str(), error = %e, transport = transport.as_str(), "tunnel refused");
                    match e.status() {
                        Some(http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN) => {
                            SendError::Denied(format!("HBONE to {endpoint}: {e}"))
                        }
                        // Refused by the far side (e.g. 503: the pod is unreachable), or
                        // not reached.
                        _ => SendError::Connect(format!("HBONE to {endpoint}: {e}")),
                    }
                })?;
            let transport = tunnel.transport();
            handshake(
                TokioIo::new(tunnel.into_io()),
                endpoint,
                proto,
                Some(transport),
                guard,
            )
            .await
        }
    }
}

/// `resp` marked with the transport of the tunnel it came through, if any ([`Tunnelled`]).
fn tunnelled(mut resp: Response<Body>, tunnel: Option<Transport>) -> Response<Body> {
    if let Some(t) = tunnel {
        resp.extensions_mut().insert(Tunnelled(t));
    }
    resp
}

/// HTTP/1.1 or HTTP/2 on `io` (inside a tunnel over `tunnel`, or none); the connection's
/// task holds `guard` until it ends.
async fn handshake<IO>(
    io: IO,
    endpoint: SocketAddr,
    proto: Proto,
    tunnel: Option<Transport>,
    guard: ConnGuard,
) -> Result<Sender, SendError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    match proto {
        Proto::Http1 => {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| SendError::Connect(format!("HTTP/1 with {endpoint}: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%endpoint, error = %e, "upstream HTTP/1 connection ended");
                }
                drop(guard);
            });
            Ok(Sender::H1(sender, tunnel))
        }
        Proto::Http2 => {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| SendError::Connect(format!("HTTP/2 with {endpoint}: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                }
                drop(guard);
            });
            Ok(Sender::H2(sender, tunnel))
        }
    }
}

/// A response body that returns its HTTP/1.1 connection to the pool once read to the end.
struct Pooled {
    pool: &'static Pool,
    inner: Incoming,
    give_back: Option<(Key, http1::SendRequest<Body>, Option<Transport>)>,
}

impl Pooled {
    fn release_if_done(&mut self) {
        if self.inner.is_end_stream()
            && let Some((key, s, t)) = self.give_back.take()
        {
            self.pool.put(key, Sender::H1(s, t));
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some((key, s, t)) = self.give_back.take() {
                    self.pool.put(key, Sender::H1(s, t));
                }
            }
            Poll::Ready(Some(Ok(_))) => self.release_if_done(),
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.release_if_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory server answering `delay` late with body `ok` (HTTP/1.1 or HTTP/2, with a
    /// trailer `grpc-status: 0` for HTTP/2), counting its connections.
    fn serve_in_memory(
        proto: Proto,
        delay: Duration,
        conns: Arc<AtomicUsize>,
    ) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        conns.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                let version = format!("{:?}", req.version());
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from(version))),
                    Ok(Frame::trailers({
                        let mut t = http::HeaderMap::new();
                        t.insert("grpc-status", http::HeaderValue::from_static("0"));
                        t
                    })),
                ];
                Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(
                    futures::stream::iter(frames),
                )))
            });
            let io = TokioIo::new(server);
            let _ = match proto {
                Proto::Http1 => {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                }
                Proto::Http2 => {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                }
            };
        });
        client
    }

    fn request() -> Request<Body> {
        let mut r = Request::new(
            Full::new(Bytes::new())
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        *r.uri_mut() = http::Uri::from_static("http://svc/");
        r
    }

    fn key(cluster: &str, port: u16, proto: Proto) -> Key {
        Key::new(
            cluster,
            SocketAddr::from(([10, 0, 0, 1], port)),
            &Route::Direct,
            proto,
        )
    }

    fn leak() -> &'static Pool {
        Box::leak(Box::default())
    }

    #[allow(clippy::too_many_arguments)]
    async fn one(
        pool: &'static Pool,
        limits: &Limits,
        res: &Resilience,
        key: Key,
        delay: Duration,
        conns: Arc<AtomicUsize>,
    ) -> Result<(String, Option<http::HeaderMap>), SendError> {
        let proto = key.proto;
        let dial = move |guard| async move {
            let io = TokioIo::new(serve_in_memory(proto, delay, conns));
            handshake(
                io,
                SocketAddr::from(([10, 0, 0, 1], 80)),
                proto,
                None,
                guard,
            )
            .await
        };
        let resp = pool
            .send(limits, res, key, Duration::from_secs(5), dial, request())
            .await?;
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        Ok((
            String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        ))
    }

    #[tokio::test]
    async fn http1_connections_are_reused_and_http2_shared() {
        let pool = leak();
        let limits = Limits::default();
        let res = Resilience::default();
        let conns = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (body, _) = one(
                pool,
                &limits,
                &res,
                key("c", 80, Proto::Http1),
                Duration::ZERO,
                conns.clone(),
            )
            .await
            .expect("h1");
            assert_eq!(body, "HTTP/1.1");
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one HTTP/1.1 connection reused"
        );
        // HTTP/2: concurrent requests share one connection; trailers pass.
        let h2 = conns.clone();
        let results = futures::future::join_all((0..4).map(|_| {
            one(
                pool,
                &limits,
                &res,
                key("c", 80, Proto::Http2),
                Duration::from_millis(50),
                h2.clone(),
            )
        }))
        .await;
        for r in results {
            let (body, trailers) = r.expect("h2");
            assert_eq!(body, "HTTP/2.0");
            assert_eq!(
                trailers.and_then(|t| t.get("grpc-status").cloned()),
                Some(http::HeaderValue::from_static("0"))
            );
        }
        // The first request dials; the others may race it, but not all four.
        let n = conns.load(Ordering::SeqCst) - 1;
        assert!((1..4).contains(&n), "{n} HTTP/2 connections");
        assert_eq!(limits.in_use(Kind::Connections, "c"), 1 + n as u32);
    }

    #[tokio::test]
    async fn max_connections_makes_requests_wait_bounded_by_pending() {
        let pool = leak();
        let limits = Limits::default();
        let res = Resilience {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..Default::default()
        };
        let conns = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let results = futures::future::join_all((0..4).map(|_| {
            one(
                pool,
                &limits,
                &res,
                key("ns/svc/v1", 80, Proto::Http1),
                Duration::from_millis(200),
                conns.clone(),
            )
        }))
        .await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let overflow = results
            .iter()
            .filter(|r| matches!(r, Err(SendError::Overflow(o)) if o.kind == Kind::PendingRequests))
            .count();
        assert_eq!((ok, overflow), (2, 2), "{results:?}");
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "never more than one connection"
        );
        // The pending one waited for the first.
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(limits.in_use(Kind::PendingRequests, "ns/svc/v1"), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_to_another_endpoint_is_closed_for_a_waiting_request() {
        let pool = leak();
        let limits = Limits::default();
        let res = Resilience {
            max_connections: Some(1),
            ..Default::default()
        };
        let conns = Arc::new(AtomicUsize::new(0));
        let a = key("k", 80, Proto::Http1);
        let b = key("k", 81, Proto::Http1);
        one(pool, &limits, &res, a, Duration::ZERO, conns.clone())
            .await
            .expect("a");
        assert_eq!(pool.idle(), 1);
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            one(pool, &limits, &res, b, Duration::ZERO, conns.clone()),
        )
        .await
        .expect("not stuck");
        r.expect("b");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        assert!(limits.in_use(Kind::Connections, "k") <= 1);
    }
}
