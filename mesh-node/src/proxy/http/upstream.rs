//! Upstream HTTP/1.1 connections to endpoints: inside an HBONE `CONNECT` stream to a meshed
//! pod, else a direct marked TCP connection. Idle connections are kept per (endpoint, source
//! identity) and reused by later requests; a connection goes back to the pool when its response
//! body has been read to the end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::Body;
use crate::identity::Identity;
use crate::proxy::Mesh;
use crate::proxy::hbone::client::{TunnelError, TunnelRequest, open};
use crate::proxy::socket::connect_marked;

/// Idle connections kept per key.
const MAX_IDLE: usize = 32;

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
        baggage: String,
    },
    /// Plain TCP (an endpoint outside the mesh).
    Direct,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    endpoint: SocketAddr,
    /// The source identity, empty for direct connections.
    src: String,
}

impl Key {
    fn new(endpoint: SocketAddr, route: &Route) -> Key {
        Key {
            endpoint,
            src: match route {
                Route::Hbone { src_id, .. } => src_id.to_string(),
                Route::Direct => String::new(),
            },
        }
    }
}

type Sender = SendRequest<Body>;

/// Idle upstream connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Sender>>>,
}

/// The proxy's pool of upstream HTTP connections.
pub fn pool() -> &'static Pool {
    static P: OnceLock<Arc<Pool>> = OnceLock::new();
    P.get_or_init(Default::default)
}

impl Pool {
    fn take(&self, key: &Key) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        idle.remove(key);
        None
    }

    fn put(&self, key: Key, s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push(s);
        }
    }

    /// Idle connections (all keys).
    pub fn idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }
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
}

/// Sends `req` to `endpoint` and returns its response, whose body hands the connection back to
/// the pool once read to the end.
pub async fn send(
    mesh: &Mesh,
    connect_timeout: Duration,
    endpoint: SocketAddr,
    route: &Route,
    req: Request<Body>,
) -> Result<Response<Body>, SendError> {
    let key = Key::new(endpoint, route);
    let mut sender = None;
    while let Some(mut s) = pool().take(&key) {
        // An idle connection is ready at once; one still finishing a body is soon.
        match tokio::time::timeout(Duration::from_millis(50), s.ready()).await {
            Ok(Ok(())) => {
                sender = Some(s);
                break;
            }
            _ => continue,
        }
    }
    let mut sender = match sender {
        Some(s) => s,
        None => dial(mesh, connect_timeout, endpoint, route).await?,
    };
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| SendError::Reset(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = Pooled {
        inner: body,
        give_back: Some((key, sender)),
    };
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

async fn dial(
    mesh: &Mesh,
    connect_timeout: Duration,
    endpoint: SocketAddr,
    route: &Route,
) -> Result<Sender, SendError> {
    match route {
        Route::Direct => {
            let tcp = connect_marked(endpoint, connect_timeout)
                .await
                .map_err(|e| SendError::Connect(format!("{endpoint}: {e}")))?;
            handshake(TokioIo::new(tcp), endpoint).await
        }
        Route::Hbone {
            src_id,
            dst_id,
            tunnel_addr,
            client_ip,
            baggage,
        } => {
            let cert = mesh
                .certs
                .get(src_id)
                .await
                .map_err(|e| SendError::Connect(format!("no certificate for {src_id}: {e}")))?;
            let req = TunnelRequest {
                cert: &cert,
                dst_identity: dst_id.clone(),
                tunnel_addr: *tunnel_addr,
                target: endpoint,
                client_ip: *client_ip,
                baggage: baggage.clone(),
            };
            let io = open(&mesh.pool, req, connect_timeout)
                .await
                .map_err(|e| match e {
                    // Refused by the far side (e.g. 503: the pod is unreachable).
                    TunnelError::Status(_)
                    | TunnelError::Connect { .. }
                    | TunnelError::Tls { .. }
                    | TunnelError::H2(_) => SendError::Connect(format!("HBONE to {endpoint}: {e}")),
                    other => SendError::Connect(other.to_string()),
                })?;
            handshake(io.into_inner(), endpoint).await
        }
    }
}

async fn handshake<IO>(io: IO, endpoint: SocketAddr) -> Result<Sender, SendError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| SendError::Connect(format!("HTTP/1 with {endpoint}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%endpoint, error = %e, "upstream HTTP connection ended");
        }
    });
    Ok(sender)
}

/// A response body that returns its connection to the pool once read to the end.
struct Pooled {
    inner: Incoming,
    give_back: Option<(Key, Sender)>,
}

impl Pooled {
    fn release_if_done(&mut self) {
        if self.inner.is_end_stream()
            && let Some((key, s)) = self.give_back.take()
        {
            pool().put(key, s);
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
                if let Some((key, s)) = self.give_back.take() {
                    pool().put(key, s);
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
