//! HTTP-aware routing of captured connections to a Service VIP whose port speaks HTTP
//! (`route::http::is_http_port`). The proxy terminates the client's HTTP (HTTP/1.1, or h2c with
//! prior knowledge) and routes every request on its own: the VirtualService `http` route that
//! matches it (`route::http::select`), a weighted destination and subset, one endpoint per
//! attempt (the service's `Balancer`), then HTTP/1.1 or HTTP/2 ([`upstream_proto`]) to the
//! endpoint inside an HBONE tunnel (meshed) or directly (`upstream`, pooled, under the
//! destination's `connectionPool` limits). Per route: `fault` (delay, abort), `timeout` (504),
//! `retries` (a retry prefers another endpoint; bodies up to 64 KiB are replayable).
//! Each request is counted in `istio_requests_total` and has an `http` span.

pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::name_str;
use tokio::net::TcpStream;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::route::Outcome as HealthOutcome;
use super::route::http::{
    AttemptFailure, GatewayPort, HttpDecision, Plan, RequestInfo, RoutePolicy, pick_endpoint,
    select, select_gateway,
};
use super::route::{Decision, Routed, Source};
use super::{Mesh, Shared};
use crate::identity::Identity;
use crate::model::istio::{Percent, parse_duration};
use crate::proxy::hbone::{Refusal, count_refusal};
use crate::state::NodeState;
use crate::telemetry::request::RequestLog;
use upstream::{Proto, Route, SendError};

pub use super::reply::Body;
pub(crate) use super::reply::local;

/// Request bodies up to this size are kept so that a failed attempt can be retried.
pub const RETRY_BUFFER: usize = 64 * 1024;

/// One client connection: where it was going and who opened it.
pub struct Conn {
    pub peer: SocketAddr,
    /// The original destination (service VIP and port); a gateway's own listening address.
    pub dst: SocketAddr,
    pub src: Option<mesh_common::Workload>,
    pub mesh: Arc<Mesh>,
    pub shared: Arc<Shared>,
    /// Set on a gateway's connections: requests are routed by the VirtualServices bound to
    /// the Gateways of this port, and get the edge's headers (`x-forwarded-*`,
    /// `x-request-id`).
    pub gateway: Option<GatewayConn>,
}

/// What routing needs of a gateway's connection.
pub struct GatewayConn {
    pub port: Arc<GatewayPort>,
    /// `http` or `https`: what the client spoke (`x-forwarded-proto`, redirects).
    pub scheme: &'static str,
}

/// Limits on a captured client's HTTP connection (Envoy's defaults where it has one): request
/// headers at most this many bytes (HTTP/1.1 read buffer, HTTP/2 header list; Envoy 60 KiB);
/// a bigger block gets `431` or a stream reset.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;
/// Request header fields on HTTP/1.1 (Envoy: 100).
pub const MAX_HEADERS: usize = 100;
/// Concurrent HTTP/2 streams of one client connection (Envoy: 2^31-1; ours as HBONE's: 100);
/// rapid-reset and error-reset limits as on HBONE (`hbone::MAX_PENDING_ACCEPT_RESET_STREAMS`).
pub const MAX_STREAMS: u32 = 100;

/// Serves one captured client connection to an HTTP service port until it closes.
pub async fn serve(
    inbound: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: Option<mesh_common::Workload>,
    mesh: Arc<Mesh>,
    shared: Arc<Shared>,
) {
    let conn = Arc::new(Conn {
        peer,
        dst,
        src,
        mesh,
        shared,
        gateway: None,
    });
    let svc = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(crate::proxy::hbone::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(crate::proxy::hbone::MAX_LOCAL_ERROR_RESET_STREAMS);
    if let Err(e) = builder.serve_connection(TokioIo::new(inbound), svc).await {
        debug!(error = %e, "HTTP client connection ended");
    }
    debug!(vip = %dst, "HTTP client connection closed");
}

/// Routes and answers one request of `conn` (a captured client's or a gateway's).
pub async fn handle_request(req: Request<Incoming>, conn: Arc<Conn>) -> Response<Body> {
    handle(req, conn).await
}

/// What became of one request (for the log line and the metric).
#[derive(Default)]
struct Outcome {
    /// The destination service (`namespace/name`).
    service: String,
    /// The pod that answered (`name`), empty when none did.
    workload: String,
    attempts: u32,
    /// The last attempt's endpoint, and its cluster (`namespace/name/subset`; kept only when
    /// tracing is on, for the `outbound` span).
    endpoint: Option<SocketAddr>,
    cluster: String,
    /// The transport of the HBONE tunnel the answer came through (`upstream::Tunnelled`).
    tunnel: Option<&'static str>,
}

async fn handle(mut req: Request<Incoming>, conn: Arc<Conn>) -> Response<Body> {
    let started = Instant::now();
    if let Some(gw) = &conn.gateway {
        edge_headers(req.headers_mut(), conn.peer, gw.scheme);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let grpc = is_grpc(req.headers());
    // The `outbound` trace span; the request goes upstream with it as `traceparent`.
    let trace = crate::telemetry::trace::outbound_request(&mut req, conn.peer, conn.dst);
    let span = info_span!(
        "http",
        method = %req.method(),
        path = %path,
        service = field::Empty,
        endpoint = field::Empty,
        status = field::Empty,
        attempts = field::Empty,
        transport = field::Empty,
    );
    let mut out = Outcome::default();
    let method = req.method().clone();
    let authority = crate::telemetry::request::authority(&req).to_string();
    let resp = route_request(req, &path, &conn, &mut out)
        .instrument(span.clone())
        .await;
    let status = resp.status().as_u16();
    let req_log = RequestLog {
        method: method.as_str(),
        path: path.split('?').next().unwrap_or("/"),
        authority: &authority,
        upstream: out.endpoint,
        attempts: out.attempts,
        grpc,
        tunnel: out.tunnel,
    };
    report(&conn, &out, &resp, &req_log, grpc, started);
    trace.upstream(
        &out.service,
        &out.workload,
        out.endpoint,
        &out.cluster,
        out.attempts,
    );
    if let Some(t) = out.tunnel {
        trace.set(crate::telemetry::trace::HBONE_TRANSPORT, || t);
    }
    trace.http_status(status);
    let resp = trace.end_with_body(resp);
    span.record("status", status);
    span.record("attempts", out.attempts);
    if let Some(t) = out.tunnel {
        span.record("transport", t);
    }
    if !out.service.is_empty() {
        span.record("service", out.service.as_str());
    }
    span.in_scope(|| {
        info!(
            vip = %conn.dst,
            duration_ms = started.elapsed().as_millis() as u64,
            "request done"
        )
    });
    resp
}

/// What an edge proxy sets on a request from outside, as Envoy does with
/// `use_remote_address`: the client's address appended to `x-forwarded-for`,
/// `x-forwarded-proto` set to what the client spoke, and a fresh `x-request-id` (an external
/// client's is not trusted).
fn edge_headers(h: &mut HeaderMap, peer: SocketAddr, scheme: &'static str) {
    let ip = peer.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
    if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        h.insert("x-request-id", v);
    }
}

/// A gRPC request (`content-type: application/grpc…`, gRPC-Web included).
fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A service port that speaks HTTP/2 to its pods (Istio's `IsHTTP2`): `appProtocol` `http2`,
/// `grpc`, `grpc-web`, `h2c` or `kubernetes.io/h2c`; without a known `appProtocol`, a name
/// `http2`, `grpc` or starting with `http2-` or `grpc-`.
pub fn is_http2_port(p: &crate::proto::ServicePort) -> bool {
    match p.app_protocol.to_ascii_lowercase().as_str() {
        "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" | "h2c" => return true,
        // Known and not HTTP/2 (`route::http::is_http_port`'s list).
        "http" | "tcp" | "tls" | "https" | "udp" | "mongo" | "redis" | "mysql"
        | "kubernetes.io/ws" | "kubernetes.io/wss" => return false,
        _ => {}
    }
    let name = p.name.to_ascii_lowercase();
    matches!(name.as_str(), "http2" | "grpc")
        || ["http2-", "grpc-"].iter().any(|pre| name.starts_with(pre))
}

/// The HTTP version to the endpoint: HTTP/2 when the destination port is declared HTTP/2
/// ([`is_http2_port`]), or for a gRPC request (`application/grpc`, not gRPC-Web) that came as
/// HTTP/2 (gRPC needs HTTP/2 end to end). Else HTTP/1.1, as Istio does for ports declared
/// `http`, also for HTTP/2 clients: HTTP/1.1-only servers behind `http` ports keep working.
pub fn upstream_proto(
    port: Option<&crate::proto::ServicePort>,
    client: Version,
    headers: &HeaderMap,
) -> Proto {
    let grpc_over_h2 = client == Version::HTTP_2
        && is_grpc(headers)
        && !headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc-web"));
    if port.is_some_and(is_http2_port) || grpc_over_h2 {
        Proto::Http2
    } else {
        Proto::Http1
    }
}

/// Counts the request (`istio_requests_total`, `istio_request_duration_milliseconds`,
/// `reporter="source"`) and writes its access-log line.
fn report(
    conn: &Conn,
    out: &Outcome,
    resp: &Response<Body>,
    log: &RequestLog<'_>,
    grpc: bool,
    started: Instant,
) {
    use crate::telemetry::istio::{self, Labels, Reporter, ServiceName, Side};
    let st = conn.mesh.state.borrow().clone();
    let src_id = conn.src.map(|w| {
        Identity::new(
            &st.trust_domain,
            name_str(&w.namespace),
            name_str(&w.service_account),
        )
    });
    let dw = out.endpoint.and_then(|ep| st.workload_by_ip(ep.ip()));
    // mTLS when the answering pod is meshed and its port is not DISABLE'd.
    let mtls = match (dw, out.endpoint) {
        (Some(w), Some(ep)) => {
            w.hbone_destination()
                && crate::policy::peer_auth::mode_of(&st, w, ep.port())
                    != crate::policy::peer_auth::Mode::Disable
        }
        _ => false,
    };
    let source = match conn.src {
        Some(w) => {
            let (ns, name) = (name_str(&w.namespace), name_str(&w.name));
            let principal = src_id.filter(|_| mtls).map(|i| i.principal());
            match st.workloads.get(&format!("{ns}/{name}")) {
                Some(sw) => Side::of(sw, principal),
                None => Side::named(ns, name),
            }
        }
        None => Side::default(),
    };
    let destination = match dw {
        Some(w) => Side::of(w, mtls.then(|| st.identity_of(w).principal())),
        None => Side::default(),
    };
    let labels = Labels {
        reporter: Reporter::Source,
        source,
        destination,
        service: ServiceName::of_uid(&out.service),
        protocol: if grpc { "grpc" } else { "http" }.into(),
        security: if mtls { istio::MUTUAL_TLS } else { istio::NONE },
    };
    crate::telemetry::request::done(&labels, log, resp, started);
}

/// Does a fault with this `percentage` (absent: every request) apply to this request?
fn fault_hits(p: Option<&Percent>, rng: &mut fastrand::Rng) -> bool {
    let v = p.map_or(100.0, |p| p.value);
    v >= 100.0 || (v > 0.0 && rng.f64() * 100.0 < v)
}

/// Applies a route's `fault`: the delay, then the abort's response if it applies.
async fn apply_fault(policy: &RoutePolicy) -> Option<Response<Body>> {
    let fault = policy.fault.as_ref()?;
    let mut rng = fastrand::Rng::new();
    if let Some(d) = &fault.delay
        && fault_hits(d.percentage.as_ref(), &mut rng)
        && let Some(delay) = d.fixed_delay.as_deref().and_then(parse_duration)
    {
        debug!(delay_ms = delay.as_millis() as u64, "fault: delay");
        tokio::time::sleep(delay).await;
    }
    if let Some(a) = &fault.abort
        && fault_hits(a.percentage.as_ref(), &mut rng)
    {
        let code = StatusCode::from_u16(a.http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        debug!(status = code.as_u16(), "fault: abort");
        return Some(local(code, "fault filter abort"));
    }
    None
}

/// The request body: kept whole with its trailers (replayable) or, past [`RETRY_BUFFER`],
/// streamed once (trailers included).
enum ReqBody {
    Whole(Bytes, Option<HeaderMap>),
    Stream(Option<Body>),
}

impl ReqBody {
    async fn read(mut body: Incoming) -> Result<ReqBody, hyper::Error> {
        let mut buf = BytesMut::new();
        let mut trailers: Option<HeaderMap> = None;
        loop {
            match body.frame().await {
                None => return Ok(ReqBody::Whole(buf.freeze(), trailers)),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    match frame.into_data() {
                        Ok(data) => buf.extend_from_slice(&data),
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                trailers.get_or_insert_with(HeaderMap::new).extend(t);
                            }
                        }
                    }
                    if buf.len() > RETRY_BUFFER {
                        let head = futures::stream::iter([Ok(Frame::data(buf.freeze()))]);
                        let rest = http_body_util::BodyStream::new(body);
                        let stream = futures::StreamExt::chain(head, rest);
                        return Ok(ReqBody::Stream(Some(
                            StreamBody::new(stream).boxed_unsync(),
                        )));
                    }
                }
            }
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Whole(..))
    }

    fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Whole(b, None) => Some(
                Full::new(b.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            ReqBody::Whole(b, Some(t)) => {
                let mut frames = Vec::with_capacity(2);
                if !b.is_empty() {
                    frames.push(Ok(Frame::data(b.clone())));
                }
                frames.push(Ok(Frame::trailers(t.clone())));
                Some(StreamBody::new(futures::stream::iter(frames)).boxed_unsync())
            }
            ReqBody::Stream(s) => s.take(),
        }
    }
}

/// Hop-by-hop headers, never passed on.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// The parts of the client's request that every attempt repeats.
struct Head {
    method: http::Method,
    path: http::uri::PathAndQuery,
    /// Without hop-by-hop headers; with `host` (from `:authority` for HTTP/2 clients).
    headers: HeaderMap,
    /// The client sent `te: trailers` (passed on to HTTP/2 endpoints; gRPC wants it).
    te_trailers: bool,
}

impl Head {
    fn new(parts: &http::request::Parts, vip: SocketAddr) -> Head {
        let mut headers = parts.headers.clone();
        let te_trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        strip_hop_by_hop(&mut headers);
        if !headers.contains_key(header::HOST) {
            // HTTP/2 carries the host in `:authority`.
            let host = parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| vip.to_string());
            if let Ok(v) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, v);
            }
        }
        Head {
            method: parts.method.clone(),
            path: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            headers,
            te_trailers,
        }
    }

    /// A route's `rewrite` and `headers.request`.
    fn rewrite(&mut self, policy: &RoutePolicy) {
        if let Some(rw) = &policy.rewrite {
            if let Some(uri) = &rw.uri {
                let (path, query) = match self.path.as_str().split_once('?') {
                    Some((p, q)) => (p.to_string(), Some(q.to_string())),
                    None => (self.path.as_str().to_string(), None),
                };
                let new_path = match policy.matched_prefix.as_deref() {
                    Some(prefix) if path.starts_with(prefix) => {
                        let rest = &path[prefix.len()..];
                        // `/api` + `/v1` rewritten to `/`: `/v1`, not `//v1`.
                        if uri.ends_with('/') && rest.starts_with('/') {
                            format!("{uri}{}", &rest[1..])
                        } else {
                            format!("{uri}{rest}")
                        }
                    }
                    _ => uri.clone(),
                };
                let new_path = if new_path.is_empty() {
                    "/".into()
                } else {
                    new_path
                };
                let full = match query {
                    Some(q) => format!("{new_path}?{q}"),
                    None => new_path,
                };
                if let Ok(pq) = full.parse() {
                    self.path = pq;
                }
            }
            if let Some(a) = &rw.authority
                && let Ok(v) = HeaderValue::from_str(a)
            {
                self.headers.insert(header::HOST, v);
            }
        }
        if let Some(ops) = policy.headers.as_ref().and_then(|h| h.request.as_ref()) {
            apply_header_ops(&mut self.headers, ops);
        }
    }

    fn request(&self, body: Body, proto: Proto) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.headers_mut() = self.headers.clone();
        match proto {
            Proto::Http1 => {
                *r.uri_mut() = http::Uri::from(self.path.clone());
                *r.version_mut() = Version::HTTP_11;
            }
            Proto::Http2 => {
                // `:scheme` and `:authority` (from `host`, which HTTP/2 does not carry).
                let host = r.headers_mut().remove(header::HOST);
                let uri = http::Uri::builder()
                    .scheme("http")
                    .authority(host.as_ref().map_or(&b"localhost"[..], |h| h.as_bytes()))
                    .path_and_query(self.path.clone())
                    .build();
                match uri {
                    Ok(u) => *r.uri_mut() = u,
                    Err(_) => {
                        // Not an authority: keep it as a header, the path as the URI.
                        if let Some(h) = host {
                            r.headers_mut().insert(header::HOST, h);
                        }
                        *r.uri_mut() = http::Uri::from(self.path.clone());
                    }
                }
                *r.version_mut() = Version::HTTP_2;
                if self.te_trailers {
                    r.headers_mut()
                        .insert(header::TE, HeaderValue::from_static("trailers"));
                }
            }
        }
        r
    }
}

async fn route_request(
    req: Request<Incoming>,
    path: &str,
    conn: &Conn,
    out: &mut Outcome,
) -> Response<Body> {
    let st = conn.mesh.state.borrow().clone();
    // A gateway's `RateLimitPolicy` (one selecting the gateway's pod) before routing, as
    // Envoy's local rate limit filter.
    if let (Some(_), Some(w)) = (&conn.gateway, &conn.src) {
        let pod = format!("{}/{}", name_str(&w.namespace), name_str(&w.name));
        let http = crate::proxy::authz::HttpRequest {
            method: req.method().as_str(),
            path,
            host: crate::telemetry::request::authority(&req),
            headers: req.headers(),
        };
        if let Err(l) = conn
            .mesh
            .limiter
            .check_request(&st, &pod, conn.dst.port(), &http)
        {
            info!(policy = %l.policy, limit = %l.entry, "request over the gateway's rate limit");
            return super::reply::rate_limited(&l);
        }
    }
    let (src_ns, src_name) = conn
        .src
        .as_ref()
        .map(|w| (name_str(&w.namespace), name_str(&w.name)))
        .unwrap_or_default();
    let source = Source {
        namespace: src_ns,
        labels: st
            .workloads
            .get(&format!("{src_ns}/{src_name}"))
            .map(|w| &w.labels),
    };
    let info = RequestInfo {
        method: req.method().as_str(),
        path,
        headers: req.headers(),
    };
    let mut rng = fastrand::Rng::new();
    let decision = match &conn.gateway {
        None => select(&st, &mut rng, &source, conn.dst, &info),
        Some(gw) => select_gateway(&st, &mut rng, &source, &gw.port, &request_host(&req), &info),
    };
    let (plan, policy) = match decision {
        HttpDecision::Forward { plan, policy } => (plan, policy),
        HttpDecision::UnknownHost => {
            debug!(host = %request_host(&req), "no gateway server for this host");
            return local(StatusCode::NOT_FOUND, "");
        }
        HttpDecision::Redirect { service, redirect } => {
            out.service = service;
            let scheme = conn.gateway.as_ref().map_or("http", |g| g.scheme);
            return redirect_response(&req, scheme, &redirect);
        }
        HttpDecision::NotService => {
            warn!(vip = %conn.dst, "the service of this connection is gone");
            return local(StatusCode::SERVICE_UNAVAILABLE, "no service\n");
        }
        HttpDecision::NoMatch { service, vs } => {
            out.service = service;
            debug!(virtual_service = %vs, "no http route matches");
            return local(StatusCode::NOT_FOUND, "");
        }
        HttpDecision::Refuse {
            service,
            reason,
            why,
        } => {
            out.service = service;
            count_refusal("outbound", None, reason);
            warn!(reason = reason.as_str(), "{why}");
            return local(StatusCode::SERVICE_UNAVAILABLE, "no route\n");
        }
        HttpDecision::FaultOnly { service, policy } => {
            out.service = service;
            return match apply_fault(&policy).await {
                Some(r) => r,
                None => local(StatusCode::SERVICE_UNAVAILABLE, "no destination\n"),
            };
        }
    };
    out.service = plan.service.clone();
    if let Some(r) = apply_fault(&policy).await {
        return r;
    }
    let proto = upstream_proto(
        st.services
            .get(&plan.service)
            .and_then(|svc| super::route::service::service_port(svc, plan.port)),
        req.version(),
        req.headers(),
    );
    let (parts, body) = req.into_parts();
    let mut head = Head::new(&parts, conn.dst);
    head.rewrite(&policy);
    let body = match ReqBody::read(body).await {
        Ok(b) => b,
        Err(e) => {
            debug!(error = %e, "reading the request body failed");
            return local(StatusCode::BAD_REQUEST, "bad request body\n");
        }
    };
    let mut resp = forward(&st, &source, &plan, &policy, head, body, proto, conn, out).await;
    if let Some(ops) = policy.headers.as_ref().and_then(|h| h.response.as_ref()) {
        apply_header_ops(resp.headers_mut(), ops);
    }
    resp
}

/// The request's host name: `:authority` or `Host`, without the port, lower case.
pub fn request_host<B>(req: &Request<B>) -> String {
    strip_port(crate::telemetry::request::authority(req))
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// `host:port` → `host` (IPv6 `[::1]:80` → `[::1]`).
fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split_once(']').map_or(h, |(a, _)| &h[..a.len() + 1]);
    }
    h.rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(h, |(a, _)| a)
}

/// A route's `redirect`: the request's URL with the parts it names replaced, `301` unless
/// `redirectCode` says otherwise (Envoy's `redirect` action).
pub fn redirect_response<B>(
    req: &Request<B>,
    scheme: &str,
    r: &crate::model::istio::HttpRedirect,
) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let mut authority = r
        .authority
        .clone()
        .unwrap_or_else(|| crate::telemetry::request::authority(req).to_string());
    if r.scheme.is_some() || r.port.is_some() {
        authority = strip_port(&authority).to_string();
    }
    if let Some(p) = r.port {
        let default = (scheme == "https" && p == 443) || (scheme == "http" && p == 80);
        if !default {
            authority = format!("{authority}:{p}");
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let path = match &r.uri {
        Some(u) if u.contains('?') => u.clone(),
        Some(u) => match pq.split_once('?') {
            Some((_, q)) => format!("{u}?{q}"),
            None => u.clone(),
        },
        None => pq,
    };
    let code = r
        .redirect_code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut resp = local(code, "");
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{authority}{path}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A route's `headers.request` / `headers.response` operations: `set` replaces, `add` appends,
/// `remove` drops. Invalid names or values were refused by validation; any left are skipped.
pub fn apply_header_ops(h: &mut HeaderMap, ops: &crate::model::istio::HeaderOperations) {
    for (k, v) in &ops.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    for k in &ops.remove {
        if let Ok(k) = HeaderName::from_bytes(k.as_bytes()) {
            h.remove(k);
        }
    }
}

/// An attempt's failure (no usable response).
enum Failed {
    /// Answer the client with this.
    Final(Response<Body>),
    Retry(AttemptFailure, Response<Body>),
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    st: &NodeState,
    source: &Source<'_>,
    plan: &Plan,
    policy: &RoutePolicy,
    head: Head,
    mut body: ReqBody,
    proto: Proto,
    conn: &Conn,
    out: &mut Outcome,
) -> Response<Body> {
    let deadline = policy.timeout.map(|t| Instant::now() + t);
    let max_attempts = 1 + if body.replayable() {
        policy.retry.retries
    } else {
        0
    };
    let mut rng = fastrand::Rng::new();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
    for attempt in 1..=max_attempts {
        out.attempts = attempt;
        let routed = match pick(st, conn, &mut rng, source, plan, &tried) {
            Ok(r) => r,
            Err((code, why)) => return local(code, why),
        };
        let ep = routed.endpoint.addr;
        tried.push(ep);
        out.workload = routed
            .endpoint
            .workload
            .split_once('/')
            .map_or(routed.endpoint.workload.as_str(), |(_, n)| n)
            .to_string();
        out.endpoint = Some(ep);
        if crate::telemetry::trace::enabled() {
            out.cluster.clone_from(&routed.cluster);
        }
        Span::current().record("endpoint", field::display(ep));
        let Some(b) = body.take() else {
            break;
        };
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (policy.retry.per_try_timeout, remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // `connectionPool.http.http2MaxRequests`: requests in flight to this destination.
        let _permit = match conn
            .shared
            .limits
            .try_request(&routed.cluster, &routed.resilience)
        {
            Ok(p) => p,
            Err(e) => return overflow(ep, &e),
        };
        let result = attempt_once(conn, st, &routed, head.request(b, proto), proto, limit).await;
        // The transport of the tunnel this attempt's answer came through, if any.
        out.tunnel = result
            .as_ref()
            .ok()
            .and_then(|r| r.extensions().get::<upstream::Tunnelled>())
            .map(|t| t.0.as_str());
        // Outlier detection learns from every attempt's outcome (a local overflow is none).
        if let Some(od) = &routed.resilience.outlier {
            let outcome = match &result {
                Ok(resp) => Some(HealthOutcome::from_status(resp.status().as_u16())),
                Err(AttemptError::Send(SendError::Connect(_))) => {
                    Some(HealthOutcome::ConnectFailure)
                }
                Err(AttemptError::Send(SendError::Reset(_)) | AttemptError::Timeout) => {
                    Some(HealthOutcome::GatewayError)
                }
                Err(AttemptError::Send(SendError::Overflow(_) | SendError::Denied(_))) => None,
                Err(AttemptError::Refused(_)) => Some(HealthOutcome::ConnectFailure),
            };
            if let Some(outcome) = outcome {
                conn.shared.health.report(&routed.cluster, ep, outcome, od);
            }
        }
        let failed = match result {
            Ok(resp) => {
                let code = resp.status().as_u16();
                if attempt < max_attempts && policy.retry.on.retries(AttemptFailure::Status(code)) {
                    debug!(attempt, status = code, endpoint = %ep, "retrying");
                    Failed::Retry(AttemptFailure::Status(code), resp)
                } else {
                    return resp;
                }
            }
            Err(AttemptError::Timeout) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                }
                Failed::Retry(
                    AttemptFailure::PerTryTimeout,
                    local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                )
            }
            Err(AttemptError::Send(SendError::Connect(e))) => {
                warn!(endpoint = %ep, attempt, error = %e, "upstream connect failed");
                Failed::Retry(
                    AttemptFailure::Connect,
                    local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    ),
                )
            }
            Err(AttemptError::Send(SendError::Reset(e))) => {
                debug!(endpoint = %ep, attempt, error = %e, "upstream reset");
                Failed::Retry(
                    AttemptFailure::Reset,
                    local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    ),
                )
            }
            // `http1MaxPendingRequests` (waiting for a connection under `maxConnections`).
            Err(AttemptError::Send(SendError::Overflow(e))) => return overflow(ep, &e),
            // The destination's AuthorizationPolicy: its answer, as a sidecar's RBAC filter
            // gives it; never retried.
            Err(AttemptError::Send(SendError::Denied(e))) => {
                info!(endpoint = %ep, error = %e, "denied by the destination's authorization policy");
                Failed::Final(local(StatusCode::FORBIDDEN, "RBAC: access denied"))
            }
            Err(AttemptError::Refused(resp)) => Failed::Final(resp),
        };
        match failed {
            Failed::Final(r) => return r,
            Failed::Retry(why, resp) => {
                if attempt >= max_attempts || !policy.retry.on.retries(why) {
                    return resp;
                }
                last = resp;
            }
        }
        // Back off a little (Envoy: 25 ms base, jittered, doubling), within the deadline.
        let backoff = Duration::from_millis(rng.u64(0..=25u64 << (attempt - 1).min(4)));
        if let Some(d) = deadline
            && Instant::now() + backoff >= d
        {
            tokio::time::sleep_until(d.into()).await;
            return local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
        }
        tokio::time::sleep(backoff).await;
    }
    last
}

/// A connection pool limit refused the request: `503` with `x-envoy-overloaded` (Envoy's
/// overflow), counted as `reason="overflow"`.
fn overflow(ep: SocketAddr, e: &super::route::limits::Overflow) -> Response<Body> {
    count_refusal("outbound", None, Refusal::Overflow);
    warn!(endpoint = %ep, error = %e, "request refused: connection pool overflow");
    let mut r = local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow\n");
    r.headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
}

/// One endpoint for an attempt: a different one than those tried when there is one.
fn pick(
    st: &NodeState,
    conn: &Conn,
    rng: &mut fastrand::Rng,
    source: &Source<'_>,
    plan: &Plan,
    tried: &[SocketAddr],
) -> Result<Routed, (StatusCode, &'static str)> {
    let mut first = None;
    for _ in 0..4 {
        match pick_endpoint(
            st,
            &conn.shared.balancer,
            Some(&conn.shared.health),
            rng,
            source,
            conn.dst,
            plan,
        ) {
            Decision::Endpoint(r) => {
                if !tried.contains(&r.endpoint.addr) {
                    return Ok(r);
                }
                first.get_or_insert(r);
            }
            Decision::Refuse {
                service,
                reason,
                why,
            } => {
                count_refusal("outbound", None, reason);
                warn!(%service, reason = reason.as_str(), "{why}");
                return Err((StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"));
            }
            Decision::Passthrough { .. } | Decision::NotService => {
                // PASSTHROUGH: the original destination as it is (the VIP) is no endpoint
                // for HTTP routing; refuse rather than loop through the capture.
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "PASSTHROUGH load balancing is not supported for HTTP",
                ));
            }
        }
        if tried.is_empty() {
            break;
        }
    }
    first.ok_or((StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"))
}

enum AttemptError {
    Timeout,
    Send(SendError),
    /// Refused before sending (no identity, destination outside the mesh): the answer.
    Refused(Response<Body>),
}

async fn attempt_once(
    conn: &Conn,
    st: &NodeState,
    routed: &Routed,
    req: Request<Body>,
    proto: Proto,
    limit: Option<Duration>,
) -> Result<Response<Body>, AttemptError> {
    let ep = routed.endpoint.addr;
    let dw = st.workload_by_ip(ep.ip());
    // PeerAuthentication DISABLE on the endpoint's port: plaintext, as on the L4 path.
    let mtls_disabled = dw.is_some_and(|dw| {
        dw.hbone_destination()
            && crate::policy::peer_auth::mode_of(st, dw, ep.port())
                == crate::policy::peer_auth::Mode::Disable
    });
    let route = match dw {
        Some(_) if mtls_disabled => Route::Direct,
        // sidenode's pods, and Istio's (ztunnel's `podIP:15008`, never local).
        Some(dw) if dw.hbone_destination() => {
            let Some(w) = conn.src.as_ref() else {
                warn!(endpoint = %ep, "source workload unknown; cannot present an identity");
                count_refusal(
                    "outbound",
                    None,
                    crate::proxy::hbone::Refusal::NoCertificate,
                );
                return Err(AttemptError::Refused(local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no source identity",
                )));
            };
            // The pod's address of the connection's family (ztunnel's choice).
            let tunnel_ip = crate::proxy::hbone::tunnel_ip(&dw.ips, ep.ip());
            let src_id = Identity::new(
                &st.trust_domain,
                name_str(&w.namespace),
                name_str(&w.service_account),
            );
            if dw.meshed && dw.node == conn.mesh.node {
                Route::Local {
                    src_id,
                    pod: dw.uid.clone(),
                    pod_ips: dw.ips.iter().filter_map(|i| i.parse().ok()).collect(),
                    client_ip: conn.peer.ip(),
                }
            } else {
                Route::Hbone {
                    src_id,
                    dst_id: st.identity_of(dw),
                    tunnel_addr: SocketAddr::new(tunnel_ip, mesh_common::ports::HBONE),
                    client_ip: conn.peer.ip(),
                    src_netns: conn.mesh.tunnel_source(st, w),
                    baggage: crate::proxy::hbone::baggage(
                        st,
                        name_str(&w.namespace),
                        name_str(&w.name),
                        conn.peer.ip(),
                    ),
                }
            }
        }
        _ if !conn.shared.direct_unmeshed => {
            warn!(endpoint = %ep, "endpoint outside the mesh and direct connections are off");
            return Err(AttemptError::Refused(local(
                StatusCode::SERVICE_UNAVAILABLE,
                "endpoint outside the mesh",
            )));
        }
        _ => Route::Direct,
    };
    // Least-request balancing counts requests in flight (until the response headers).
    let _active = conn.shared.balancer.track(ep);
    let send = upstream::send(
        &conn.mesh,
        &conn.shared.limits,
        &routed.cluster,
        &routed.resilience,
        routed
            .resilience
            .connect_timeout_or(conn.shared.connect_timeout),
        ep,
        &route,
        proto,
        req,
    );
    let resp = match limit {
        Some(l) => tokio::time::timeout(l, send)
            .await
            .map_err(|_| AttemptError::Timeout)?,
        None => send.await,
    }
    .map_err(AttemptError::Send)?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("end-user", HeaderValue::from_static("jason"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("end-user"));
    }

    #[test]
    fn upstream_protocol_by_port_and_request() {
        let port = |name: &str, app: &str| crate::proto::ServicePort {
            name: name.into(),
            app_protocol: app.into(),
            port: 80,
            target_port: 8080,
            ..Default::default()
        };
        let grpc = {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc+proto"),
            );
            h
        };
        let plain = HeaderMap::new();
        for (name, app, want) in [
            ("grpc", "", Proto::Http2),
            ("http2-api", "", Proto::Http2),
            ("grpc-x", "", Proto::Http2),
            ("web", "kubernetes.io/h2c", Proto::Http2),
            ("http", "grpc", Proto::Http2),
            ("http", "", Proto::Http1),
            ("http-web", "", Proto::Http1),
            ("grpc", "http", Proto::Http1),
            ("http2x", "", Proto::Http1),
        ] {
            let p = port(name, app);
            assert_eq!(
                upstream_proto(Some(&p), Version::HTTP_11, &plain),
                want,
                "{name} {app}"
            );
        }
        // HTTP/2 clients on `http` ports: HTTP/1.1 upstream, unless the request is gRPC.
        let http = port("http", "");
        assert_eq!(
            upstream_proto(Some(&http), Version::HTTP_2, &plain),
            Proto::Http1
        );
        assert_eq!(
            upstream_proto(Some(&http), Version::HTTP_2, &grpc),
            Proto::Http2
        );
        assert_eq!(
            upstream_proto(Some(&http), Version::HTTP_11, &grpc),
            Proto::Http1
        );
    }

    #[test]
    fn http2_requests_carry_the_authority_and_te_trailers() {
        let req = Request::builder()
            .method("POST")
            .uri("http://reviews:80/pkg.Svc/Call?x=1")
            .version(Version::HTTP_2)
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let head = Head::new(&parts, SocketAddr::from(([198, 18, 0, 1], 80)));
        let empty = || {
            Full::new(Bytes::new())
                .map_err(|n| match n {})
                .boxed_unsync()
        };
        let h2 = head.request(empty(), Proto::Http2);
        assert_eq!(h2.uri().to_string(), "http://reviews:80/pkg.Svc/Call?x=1");
        assert_eq!(h2.version(), Version::HTTP_2);
        assert!(!h2.headers().contains_key(header::HOST));
        assert_eq!(h2.headers()[header::TE], "trailers");
        let h1 = head.request(empty(), Proto::Http1);
        assert_eq!(h1.uri().to_string(), "/pkg.Svc/Call?x=1");
        assert_eq!(h1.headers()[header::HOST], "reviews:80");
        assert!(!h1.headers().contains_key(header::TE));
    }

    #[tokio::test]
    async fn buffered_request_bodies_keep_their_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-timeout", HeaderValue::from_static("1S"));
        let mut body = ReqBody::Whole(Bytes::from_static(b"abc"), Some(t));
        for _ in 0..2 {
            let got = body
                .take()
                .expect("replayable")
                .collect()
                .await
                .expect("body");
            assert_eq!(
                got.trailers().map(|t| t["grpc-timeout"].clone()),
                Some(HeaderValue::from_static("1S"))
            );
            assert_eq!(got.to_bytes(), Bytes::from_static(b"abc"));
        }
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_and_redirects_keep_the_query() {
        use crate::model::istio::{HeaderOperations, Headers, HttpRedirect, HttpRewrite};
        let req = Request::builder()
            .uri("/v2/items?id=7")
            .header("host", "shop.example:8443")
            .header("x-drop", "1")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let mut head = Head::new(&parts, SocketAddr::from(([198, 18, 0, 1], 80)));
        let policy = RoutePolicy {
            rewrite: Some(HttpRewrite {
                uri: Some("/".into()),
                authority: Some("reviews".into()),
            }),
            headers: Some(Headers {
                request: Some(HeaderOperations {
                    set: [("x-env".to_string(), "prod".to_string())].into(),
                    add: Default::default(),
                    remove: vec!["x-drop".into()],
                }),
                response: None,
            }),
            matched_prefix: Some("/v2/".into()),
            ..Default::default()
        };
        head.rewrite(&policy);
        assert_eq!(head.path.as_str(), "/items?id=7");
        assert_eq!(head.headers[header::HOST], "reviews");
        assert_eq!(head.headers["x-env"], "prod");
        assert!(!head.headers.contains_key("x-drop"));

        let req = Request::builder()
            .uri("/old?id=7")
            .header("host", "shop.example:8080")
            .body(())
            .expect("request");
        let to_https = HttpRedirect {
            scheme: Some("https".into()),
            ..Default::default()
        };
        let r = redirect_response(&req, "http", &to_https);
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            r.headers()[header::LOCATION],
            "https://shop.example/old?id=7"
        );
        let moved = HttpRedirect {
            uri: Some("/new".into()),
            port: Some(8443),
            redirect_code: Some(308),
            ..Default::default()
        };
        let r = redirect_response(&req, "https", &moved);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            r.headers()[header::LOCATION],
            "https://shop.example:8443/new?id=7"
        );
    }

    #[test]
    fn edge_headers_are_set_as_envoy_sets_them() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-request-id", HeaderValue::from_static("forged"));
        edge_headers(&mut h, SocketAddr::from(([192, 0, 2, 1], 5555)), "https");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_ne!(h["x-request-id"], "forged");
        assert_eq!(h["x-request-id"].len(), 36);
    }

    #[test]
    fn fault_percentages() {
        let mut rng = fastrand::Rng::with_seed(3);
        assert!(fault_hits(None, &mut rng));
        assert!(!fault_hits(Some(&Percent { value: 0.0 }), &mut rng));
        let hits = (0..10_000)
            .filter(|_| fault_hits(Some(&Percent { value: 25.0 }), &mut rng))
            .count();
        assert!((2200..2800).contains(&hits), "{hits}");
    }
}
