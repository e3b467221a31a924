//! Distributed tracing of the node proxy's hops: W3C trace context (`traceparent`,
//! `tracestate`) taken from requests or started here, OpenTelemetry spans created with
//! explicit parents, exported in batches (on the proxy's tokio runtime) with OTLP/gRPC to
//! `--otlp-endpoint` (an OpenTelemetry Collector, Jaeger, Tempo…).
//!
//! Without an endpoint nothing is set up: every function here returns after one look at a
//! `OnceLock` and request headers pass untouched.
//!
//! Spans (name, kind, where):
//! - `outbound` (CLIENT), the client's node proxy, one per HTTP request it routes for a
//!   Service VIP (`proxy::http`). Parent: the request's `traceparent`, else a new trace. The
//!   request goes on with this span's context as its `traceparent`.
//! - `inbound` (SERVER), the destination's node proxy, one per HTTP request on a tunnel to an
//!   HTTP port (`proxy::authz::l7`). Parent: the request's `traceparent` (the source's
//!   `outbound` span). The pod gets this span's context as its `traceparent`.
//! - `outbound.tcp` (CLIENT), the client's node proxy, one per captured L4 connection, from
//!   accept to close (`proxy::outbound`); its context rides on the HBONE `CONNECT` as a
//!   `traceparent` header.
//! - `inbound.tunnel` (SERVER), the destination's node proxy, one per HBONE tunnel, from
//!   `CONNECT` to close (`proxy::hbone::server`); child of the `CONNECT`'s `traceparent` when
//!   it has one (tunnels of the HTTP path's connection pool carry none: they outlive requests).
//!
//! Sampling is parent-based: a request whose `traceparent` says sampled (or not) is sampled
//! (or not) whatever `--trace-sampling` says; new traces are sampled at that percentage.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing::{info, warn};

/// Span attribute: the transport of the HBONE tunnel (`h2`, `quic`; `none` on a same-node
/// connection) of an `outbound.tcp`, `outbound` (HTTP request) or `inbound.tunnel` span.
pub const HBONE_TRANSPORT: &str = "sidenode.hbone.transport";
/// The W3C trace context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The `service.name` of every span this proxy exports.
pub const SERVICE_NAME: &str = "sidenode-proxy";
/// Default `--trace-sampling` when an endpoint is given: every new trace.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 100.0;
/// One export call (gRPC deadline).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last batch.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("OTLP endpoint {0:?}: expected http://HOST:PORT")]
    Endpoint(String),
    #[error("trace sampling {0:?}: expected a percentage from 0 to 100")]
    Sampling(String),
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("tracing is already set up in this process")]
    AlreadySet,
}

/// `--otlp-endpoint` and `--trace-sampling`.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `http://HOST:PORT` of an OTLP/gRPC receiver.
    pub endpoint: String,
    /// Percentage of new traces (no incoming sampled flag) that are sampled.
    pub sampling_percent: f64,
}

/// A fresh, unsampled W3C `traceparent` (`00-<trace id>-<parent id>-00`, random non-zero ids),
/// for a `CONNECT` sent while tracing is off: ztunnel sends one on every `CONNECT` (a random
/// one per connection, flags `00`), and a receiver may key its logs on it. Nothing is
/// recorded or exported.
pub fn unsampled_traceparent() -> HeaderValue {
    let text = format!(
        "00-{:032x}-{:016x}-00",
        fastrand::u128(1..),
        fastrand::u64(1..)
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(UNSAMPLED_FALLBACK))
}

/// Never used in practice (the hex above is always a valid header value).
const UNSAMPLED_FALLBACK: &str = "00-00000000000000000000000000000001-0000000000000001-00";

/// Checks `--otlp-endpoint`: `http://HOST:PORT`, nothing after the port (plaintext gRPC; TLS
/// to the collector is not supported).
pub fn parse_endpoint(s: &str) -> Result<String, TraceError> {
    let bad = || TraceError::Endpoint(s.to_string());
    let uri: http::Uri = s.parse().map_err(|_| bad())?;
    let ok = uri.scheme_str() == Some("http")
        && uri.authority().is_some_and(|a| a.port_u16().is_some())
        && uri.path_and_query().is_none_or(|p| p.as_str() == "/");
    if !ok {
        return Err(bad());
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// Checks `--trace-sampling`: a percentage from 0 to 100.
pub fn parse_sampling(s: &str) -> Result<f64, TraceError> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(TraceError::Sampling(s.to_string())),
    }
}

/// The tracer of this process.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    node: String,
}

static TRACING: OnceLock<Tracing> = OnceLock::new();

/// Is tracing on in this process?
pub fn enabled() -> bool {
    TRACING.get().is_some()
}

fn current() -> Option<&'static Tracing> {
    TRACING.get()
}

/// The sampler for `percent`: parent-based (an incoming decision is kept), new traces at
/// `percent`.
fn sampler(percent: f64) -> Sampler {
    let root = if percent >= 100.0 {
        Sampler::AlwaysOn
    } else if percent <= 0.0 {
        Sampler::AlwaysOff
    } else {
        Sampler::TraceIdRatioBased(percent / 100.0)
    };
    Sampler::ParentBased(Box::new(root))
}

/// Sets up the OTLP/gRPC exporter and the tracer for node `node`. Must run inside the tokio
/// runtime (the batch processor and the gRPC channel are tasks of it). The collector is
/// connected to lazily: a collector that is down loses spans, never requests.
pub fn init(settings: &Settings, node: &str) -> Result<(), TraceError> {
    use opentelemetry_otlp::WithExportConfig;
    if enabled() {
        return Err(TraceError::AlreadySet);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let exporter = Logged {
        inner: exporter,
        failing: AtomicBool::new(false),
    };
    let batch =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(sampler(settings.sampling_percent))
        .with_resource(resource(node))
        .build();
    TRACING
        .set(Tracing::new(provider, node))
        .map_err(|_| TraceError::AlreadySet)?;
    info!(
        endpoint = %settings.endpoint,
        sampling_percent = settings.sampling_percent,
        "tracing: exporting spans with OTLP/gRPC"
    );
    Ok(())
}

/// An exporter that logs when exports start failing (the collector is down or refuses) and
/// when they work again — once each, not per batch.
#[derive(Debug)]
struct Logged<E> {
    inner: E,
    failing: AtomicBool,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Logged<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                warn!(error = %e, spans, "tracing: exporting spans failed; dropping them until the collector answers");
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                info!("tracing: exporting spans works again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

fn resource(node: &str) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(SERVICE_NAME)
        .with_attribute(KeyValue::new("k8s.node.name", node.to_string()))
        .build()
}

/// Exports what is still buffered and stops the exporter (the proxy's SIGTERM path, after the
/// drain). Bounded: a collector that does not answer costs at most a few seconds.
pub async fn shutdown() {
    let Some(t) = current() else { return };
    let provider = t.provider.clone();
    // The processor's shutdown blocks until its task (on this runtime) has exported: off the
    // runtime's workers, or a one-worker runtime would wait for itself.
    let done = tokio::task::spawn_blocking(move || provider.shutdown());
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, done).await {
        Ok(Ok(Ok(()))) => info!("tracing: spans flushed"),
        Ok(Ok(Err(e))) => warn!(error = %e, "tracing: flushing spans failed"),
        Ok(Err(e)) => warn!(error = %e, "tracing: flushing spans failed"),
        Err(_) => warn!("tracing: flushing spans timed out"),
    }
}

impl Tracing {
    fn new(provider: SdkTracerProvider, node: &str) -> Tracing {
        let tracer = provider.tracer("sidenode-proxy");
        Tracing {
            provider,
            tracer,
            node: node.to_string(),
        }
    }

    fn start(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        mut attrs: Vec<KeyValue>,
    ) -> Span {
        attrs.push(KeyValue::new("sidenode.node", self.node.clone()));
        let server = kind == SpanKind::Server;
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, parent);
        Span(Some(Arc::new(Inner {
            span: Mutex::new(span),
            server,
            unfinished: None,
            finished: AtomicBool::new(false),
        })))
    }

    fn outbound_request(&self, headers: &mut HeaderMap, req: RequestInfo<'_>) -> Span {
        let parent = extract(headers);
        let span = self.start("outbound", SpanKind::Client, &parent, req.attributes());
        span.inject(headers);
        span
    }

    fn inbound_request(&self, headers: &mut HeaderMap, req: RequestInfo<'_>) -> Span {
        let parent = extract(headers);
        let span = self.start("inbound", SpanKind::Server, &parent, req.attributes());
        span.inject(headers);
        span
    }
}

/// The parent context in `headers` (W3C TraceContext), or an empty one (a new trace).
fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            return;
        };
        match HeaderValue::from_str(&value) {
            Ok(v) if !value.is_empty() => {
                self.0.insert(name, v);
            }
            // An empty `tracestate` is not sent.
            _ => {
                self.0.remove(name);
            }
        }
    }
}

/// What a request span records when it starts.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// `host`/`:authority`, else the address the client connected to.
    pub host: &'a str,
    /// The address the request was sent to (the Service VIP, or the pod's `ip:port`).
    pub dst: SocketAddr,
    /// The client: the app's address at the source, the original client's at the destination.
    pub client: IpAddr,
    /// Source principal as Istio writes it (the SPIFFE id without `spiffe://`), when known
    /// (destination side).
    pub principal: Option<&'a str>,
    /// The destination workload (`namespace/name`), when known (destination side).
    pub workload: Option<&'a str>,
}

impl RequestInfo<'_> {
    fn attributes(&self) -> Vec<KeyValue> {
        let path = self.path.split(['?', '#']).next().unwrap_or("");
        let mut a = vec![
            KeyValue::new("http.request.method", self.method.to_string()),
            KeyValue::new("url.path", path.to_string()),
            KeyValue::new("server.address", self.host.to_string()),
            KeyValue::new("server.port", i64::from(self.dst.port())),
            KeyValue::new("client.address", self.client.to_string()),
        ];
        if let Some(p) = self.principal {
            a.push(KeyValue::new(
                "sidenode.source.principal",
                format!("spiffe://{p}"),
            ));
        }
        if let Some(w) = self.workload {
            workload_attrs(w, &mut a);
        }
        a
    }
}

/// `sidenode.destination.workload` (the pod's name) and `sidenode.destination.namespace` of a
/// workload `namespace/name`.
fn workload_attrs(uid: &str, a: &mut Vec<KeyValue>) {
    let (ns, name) = uid.split_once('/').unwrap_or(("", uid));
    a.push(KeyValue::new(
        "sidenode.destination.workload",
        name.to_string(),
    ));
    if !ns.is_empty() {
        a.push(KeyValue::new(
            "sidenode.destination.namespace",
            ns.to_string(),
        ));
    }
}

/// The `host` of a request: `:authority` (HTTP/2, absolute URIs) or the `host` header.
pub fn request_host<B>(req: &http::Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
}

/// Source side, one HTTP request for a Service VIP (`vip`) from `client`: takes the request's
/// trace context (or starts a trace), starts `outbound` and puts its context into the
/// request's headers (replacing the client's `traceparent`/`tracestate`), so that what goes
/// upstream has the proxy's span as parent.
pub fn outbound_request<B>(
    req: &mut http::Request<B>,
    client: SocketAddr,
    vip: SocketAddr,
) -> Span {
    let Some(t) = current() else {
        return Span::none();
    };
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let host = request_host(req).map_or_else(|| vip.to_string(), str::to_string);
    let info = RequestInfo {
        method: &method,
        path: &path,
        host: &host,
        dst: vip,
        client: client.ip(),
        principal: None,
        workload: None,
    };
    t.outbound_request(req.headers_mut(), info)
}

/// Destination side, one HTTP request on a tunnel to `target` of workload `pod`: starts
/// `inbound` as a child of the request's `traceparent` and replaces it with this span's.
pub fn inbound_request<B>(
    req: &mut http::Request<B>,
    pod: &str,
    target: SocketAddr,
    client: IpAddr,
    principal: Option<&str>,
) -> Span {
    let Some(t) = current() else {
        return Span::none();
    };
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let host = request_host(req).map_or_else(|| target.to_string(), str::to_string);
    let info = RequestInfo {
        method: &method,
        path: &path,
        host: &host,
        dst: target,
        client,
        principal,
        workload: Some(pod),
    };
    t.inbound_request(req.headers_mut(), info)
}

/// Source side, one captured L4 connection from `client` to `dst` (its original destination):
/// `outbound.tcp`, a new trace. `is_http` is asked only when tracing is on: connections to
/// HTTP service ports get per-request spans instead and no connection span.
pub fn outbound_connection(
    client: SocketAddr,
    dst: SocketAddr,
    is_http: impl FnOnce() -> bool,
) -> Span {
    let Some(t) = current() else {
        return Span::none();
    };
    if is_http() {
        return Span::none();
    }
    let mut span = t.start(
        "outbound.tcp",
        SpanKind::Client,
        &Context::new(),
        vec![
            KeyValue::new("network.transport", "tcp"),
            KeyValue::new("client.address", client.ip().to_string()),
            KeyValue::new("client.port", i64::from(client.port())),
            KeyValue::new("server.address", dst.ip().to_string()),
            KeyValue::new("server.port", i64::from(dst.port())),
        ],
    );
    if let Some(inner) = span.0.as_mut().and_then(Arc::get_mut) {
        inner.unfinished = Some("refused");
    }
    span
}

/// Destination side, one HBONE tunnel (`CONNECT authority`) to workload `pod` from a peer
/// with `identity`: `inbound.tunnel`, child of the `CONNECT`'s `traceparent` when it has one.
/// `client` is the address the `forwarded: for=` element names (any RFC 7239 form, read by
/// the caller), else the peer's.
pub fn inbound_tunnel(
    connect_headers: &HeaderMap,
    authority: Option<&str>,
    pod: &str,
    client: IpAddr,
    identity: &crate::identity::Identity,
) -> Span {
    let Some(t) = current() else {
        return Span::none();
    };
    let mut attrs = vec![
        KeyValue::new("network.transport", "tcp"),
        KeyValue::new("client.address", client.to_string()),
        KeyValue::new("sidenode.source.principal", identity.to_string()),
    ];
    workload_attrs(pod, &mut attrs);
    if let Some(target) = authority.and_then(|a| a.parse::<SocketAddr>().ok()) {
        attrs.push(KeyValue::new("server.address", target.ip().to_string()));
        attrs.push(KeyValue::new("server.port", i64::from(target.port())));
    }
    t.start(
        "inbound.tunnel",
        SpanKind::Server,
        &extract(connect_headers),
        attrs,
    )
}

/// Should the destination serve a tunnel to `port` of workload `pod` per request, so that each
/// request gets its `inbound` span? Only with tracing on, on HTTP ports.
pub fn per_request(st: &crate::state::NodeState, pod: &str, port: u16) -> bool {
    enabled()
        && st
            .workloads
            .get(pod)
            .is_some_and(|w| crate::state::protocol::is_http_pod_port(st, w, port))
}

struct Inner {
    span: Mutex<opentelemetry_sdk::trace::Span>,
    /// SERVER spans are errors on 5xx only; CLIENT spans on 4xx too (OTel's conventions).
    server: bool,
    /// A connection span that ends without [`Span::connection_closed`] (the connection was
    /// refused or could not be opened) gets this `sidenode.result` and an error status.
    unfinished: Option<&'static str>,
    finished: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(result) = self.unfinished
            && !self.finished.load(Ordering::Relaxed)
        {
            let s = self.span.get_mut().unwrap_or_else(|p| p.into_inner());
            s.set_attribute(KeyValue::new("sidenode.result", result));
            s.set_status(Status::error(result));
        }
    }
}

/// One span of this proxy, or nothing (tracing off, or a connection that has none). Clones
/// share the span; it ends when the last clone is dropped.
#[derive(Clone, Default)]
pub struct Span(Option<Arc<Inner>>);

impl Span {
    /// No span: every method does nothing.
    pub fn none() -> Span {
        Span(None)
    }

    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    fn with(&self, f: impl FnOnce(&mut opentelemetry_sdk::trace::Span)) {
        if let Some(inner) = &self.0 {
            let mut s = inner.span.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
    }

    /// Sets an attribute (`value` is only computed when there is a span).
    pub fn set<V: Into<Value>>(&self, key: &'static str, value: impl FnOnce() -> V) {
        if self.0.is_some() {
            let v = value().into();
            self.with(|s| s.set_attribute(KeyValue::new(key, v)));
        }
    }

    /// Marks the span failed.
    pub fn error(&self, why: impl FnOnce() -> String) {
        if self.0.is_some() {
            let why = why();
            self.with(|s| s.set_status(Status::error(why)));
        }
    }

    /// The span's context (trace id, span id, sampled flag).
    pub fn context(&self) -> Option<SpanContext> {
        let inner = self.0.as_ref()?;
        let s = inner.span.lock().unwrap_or_else(|p| p.into_inner());
        Some(s.span_context().clone())
    }

    /// Writes this span's context into `headers` as `traceparent` (and `tracestate` when it
    /// has one), replacing what was there.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let Some(sc) = self.context() else { return };
        headers.remove(TRACESTATE);
        let cx = Context::new().with_remote_span_context(sc);
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }

    /// This span's context as a `traceparent` value (for the HBONE `CONNECT`).
    pub fn traceparent(&self) -> Option<HeaderValue> {
        let mut h = HeaderMap::new();
        self.inject(&mut h);
        h.remove(TRACEPARENT)
    }

    /// The response status of the request this span stands for.
    pub fn http_status(&self, code: u16) {
        let Some(inner) = &self.0 else { return };
        let failed = code >= 500 || (!inner.server && code >= 400);
        self.with(|s| {
            s.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
            if failed {
                s.set_status(Status::error(format!("HTTP {code}")));
            }
        });
    }

    /// The answer to an HBONE `CONNECT` (`200`: the tunnel is open).
    pub fn tunnel_status(&self, code: u16) {
        if self.0.is_none() {
            return;
        }
        self.with(|s| {
            s.set_attribute(KeyValue::new("sidenode.hbone.status", i64::from(code)));
            if code != 200 {
                s.set_status(Status::error(format!("CONNECT answered {code}")));
            }
        });
    }

    /// Where a request went at the source: destination service (`namespace/name`), workload
    /// (`name`), endpoint, Envoy-style cluster (`namespace/name/subset`) and attempts (0:
    /// not recorded).
    pub fn upstream(
        &self,
        service: &str,
        workload: &str,
        endpoint: Option<SocketAddr>,
        cluster: &str,
        attempts: u32,
    ) {
        if self.0.is_none() {
            return;
        }
        let mut a = Vec::with_capacity(6);
        if attempts > 0 {
            a.push(KeyValue::new("sidenode.attempts", i64::from(attempts)));
        }
        if let Some((ns, name)) = service.split_once('/') {
            a.push(KeyValue::new(
                "sidenode.destination.service",
                format!("{name}.{ns}.svc.{}", crate::model::CLUSTER_DOMAIN),
            ));
            a.push(KeyValue::new(
                "sidenode.destination.namespace",
                ns.to_string(),
            ));
        }
        if !workload.is_empty() {
            a.push(KeyValue::new(
                "sidenode.destination.workload",
                workload.to_string(),
            ));
        }
        if !cluster.is_empty() {
            a.push(KeyValue::new("upstream_cluster", cluster.to_string()));
        }
        if let Some(ep) = endpoint {
            a.push(KeyValue::new("network.peer.address", ep.ip().to_string()));
            a.push(KeyValue::new("network.peer.port", i64::from(ep.port())));
        }
        self.with(|s| s.set_attributes(a));
    }

    /// Keeps the span open until `resp`'s body has been sent (or dropped), so that it covers
    /// the whole response, not only its headers.
    pub fn end_with_body<E: 'static>(
        self,
        resp: http::Response<UnsyncBoxBody<Bytes, E>>,
    ) -> http::Response<UnsyncBoxBody<Bytes, E>> {
        if self.0.is_none() {
            return resp;
        }
        resp.map(|body| {
            body.map_frame(move |frame| {
                let _open = &self;
                frame
            })
            .boxed_unsync()
        })
    }

    /// A connection's end: bytes each way (`sent` = from the client towards the destination)
    /// and whether it closed cleanly.
    pub fn connection_closed(&self, protocol: &str, result: &std::io::Result<(u64, u64)>) {
        if self.0.is_none() {
            return;
        }
        let protocol = protocol.to_string();
        if let Some(inner) = &self.0 {
            inner.finished.store(true, Ordering::Relaxed);
        }
        self.with(|s| {
            s.set_attribute(KeyValue::new("sidenode.protocol", protocol));
            match result {
                Ok((sent, received)) => {
                    s.set_attribute(KeyValue::new("sidenode.bytes_sent", *sent as i64));
                    s.set_attribute(KeyValue::new("sidenode.bytes_received", *received as i64));
                    s.set_attribute(KeyValue::new("sidenode.result", "closed"));
                }
                Err(e) => {
                    s.set_attribute(KeyValue::new("sidenode.result", "error"));
                    s.set_status(Status::error(e.to_string()));
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};

    /// Keeps exported spans in memory.
    #[derive(Clone, Debug, Default)]
    struct Memory(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Memory {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(batch);
            Ok(())
        }
    }

    fn tracing_with(percent: f64) -> (Tracing, Memory) {
        let mem = Memory::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(mem.clone())
            .with_sampler(sampler(percent))
            .with_resource(resource("node1"))
            .build();
        (Tracing::new(provider, "node1"), mem)
    }

    fn info(client: IpAddr) -> RequestInfo<'static> {
        RequestInfo {
            method: "GET",
            path: "/a?b=c",
            host: "reviews:80",
            dst: SocketAddr::from(([198, 18, 128, 10], 80)),
            client,
            principal: None,
            workload: None,
        }
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_request_span_is_a_child_of_the_incoming_context_and_replaces_it() {
        let (t, mem) = tracing_with(100.0);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(PARENT));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let span = t.outbound_request(&mut h, info(IpAddr::from([198, 19, 1, 2])));
        let sc = span.context().expect("span");
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
        );
        assert!(sc.is_sampled());
        let sent = h[TRACEPARENT].to_str().expect("ascii").to_string();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", sc.span_id())
        );
        assert_eq!(h[TRACESTATE], "vendor=x");
        span.http_status(200);
        drop(span);
        let spans = mem.0.lock().expect("lock").clone();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.name, "outbound");
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(
            s.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("url.path").as_deref(), Some("/a"));
        assert_eq!(attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(attr("sidenode.node").as_deref(), Some("node1"));
    }

    #[test]
    fn without_a_context_a_new_trace_starts() {
        let (t, mem) = tracing_with(100.0);
        let mut h = HeaderMap::new();
        let span = t.inbound_request(&mut h, info(IpAddr::from([198, 19, 1, 2])));
        let sc = span.context().expect("span");
        assert!(sc.is_valid() && sc.is_sampled());
        assert!(h.contains_key(TRACEPARENT));
        assert!(!h.contains_key(TRACESTATE));
        span.http_status(503);
        drop(span);
        let spans = mem.0.lock().expect("lock").clone();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
        assert_eq!(spans[0].span_kind, SpanKind::Server);
        assert!(matches!(spans[0].status, Status::Error { .. }));
    }

    #[test]
    fn an_unsampled_parent_is_respected_and_propagated() {
        let (t, mem) = tracing_with(100.0);
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let span = t.outbound_request(&mut h, info(IpAddr::from([198, 19, 1, 2])));
        let sent = h[TRACEPARENT].to_str().expect("ascii").to_string();
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(sent.ends_with("-00"), "{sent}");
        drop(span);
        assert!(mem.0.lock().expect("lock").is_empty());
    }

    #[test]
    fn new_traces_follow_the_sampling_percentage() {
        let (t, mem) = tracing_with(0.0);
        let span = t.start("outbound.tcp", SpanKind::Client, &Context::new(), vec![]);
        let tp = span.traceparent().expect("a context even when not sampled");
        assert!(tp.to_str().expect("ascii").ends_with("-00"));
        drop(span);
        // A sampled parent wins over 0 %.
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(PARENT));
        drop(t.inbound_request(&mut h, info(IpAddr::from([198, 19, 1, 2]))));
        assert_eq!(mem.0.lock().expect("lock").len(), 1);
    }

    #[test]
    fn no_span_does_nothing() {
        let s = Span::none();
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(PARENT));
        s.inject(&mut h);
        s.http_status(500);
        s.set("x", || "y");
        assert_eq!(h[TRACEPARENT], PARENT);
        assert!(s.traceparent().is_none());
        // Tracing is never set up in unit tests.
        let mut req = http::Request::new(());
        req.headers_mut()
            .insert(TRACEPARENT, HeaderValue::from_static(PARENT));
        let peer = SocketAddr::from(([198, 19, 1, 2], 40000));
        assert!(!outbound_request(&mut req, peer, peer).is_active());
        assert_eq!(req.headers()[TRACEPARENT], PARENT);
    }

    #[test]
    fn flags() {
        assert_eq!(
            parse_endpoint("http://198.18.0.254:4317").expect("ok"),
            "http://198.18.0.254:4317"
        );
        assert!(parse_endpoint("http://collector:4317/").is_ok());
        for bad in [
            "198.18.0.254:4317",
            "https://c:4317",
            "http://c",
            "http://c:4317/v1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_sampling("12.5").expect("ok"), 12.5);
        assert_eq!(parse_sampling("100%").expect("ok"), 100.0);
        for bad in ["-1", "101", "x", "NaN"] {
            assert!(parse_sampling(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unsampled_traceparent_has_ztunnels_form() {
        let a = super::unsampled_traceparent();
        let b = super::unsampled_traceparent();
        let t = a.to_str().expect("ascii");
        assert_eq!(t.len(), 55, "{t}");
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4, "{t}");
        assert_eq!((parts[0], parts[3]), ("00", "00"), "{t}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{t}");
        assert!(
            parts[1]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(parts[1], "0".repeat(32));
        assert_ne!(a, b);
    }
}
