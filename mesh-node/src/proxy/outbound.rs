//! One captured connection: original destination → source workload → a service VIP routed to
//! one endpoint (`route`) → HBONE tunnel to a meshed destination, or direct → copy until both
//! sides are done.
//!
//! A connection to a service is held to the destination's connection pool limit
//! (`tcp.maxConnections`, else reset and counted as `reason="overflow"`), connects within its
//! `tcp.connectTimeout`, and when the endpoint cannot be reached (connect refused or timed
//! out, HBONE tunnel refused with `503`) reports it to outlier detection and tries another
//! endpoint: at most [`MAX_CONNECT_ATTEMPTS`] in all, each endpoint once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use mesh_common::{Workload, name_str};
use tokio::net::TcpStream;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::hbone::client::TunnelRequest;
use super::hbone::dial::{self, Tunnel};
use super::hbone::server::{self, Downstream};
use super::hbone::{Refusal, Transport, count_refusal};
use super::hbone::{h3_stream, stream};
use super::route::{self, Decision, Outcome, Routed, Source};
use super::socket::{connect_marked, reset};
use super::{COPY_BUF, Mesh, Shared, zero_copy};
use crate::identity::Identity;
use crate::kernel::maps::{ProxyMaps, orig_dst_addr};
use crate::state::NodeState;
use crate::telemetry::conn::{self as telemetry, ConnMeta, Tracked};
use crate::telemetry::istio::{self, Labels, Reporter, ServiceName, Side};

/// Connect attempts for one connection to a service: the routed endpoint and up to two
/// others after it failed to connect (Istio's TCP proxy default `max_connect_attempts` is 1;
/// we retry so that one refusing endpoint does not fail connections).
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

pub async fn handle(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let span = info_span!(
        "outbound",
        src = %peer,
        service = field::Empty,
        endpoint = field::Empty
    );
    forward(inbound, peer, shared).instrument(span).await
}

/// A connection accepted elsewhere and already routed to a service endpoint (the gateway's
/// TLS passthrough): carried from `src` exactly as a captured connection to `vip` would be
/// (connection limits, other endpoints on connect failure, HBONE or direct, telemetry).
pub async fn carry_routed(
    inbound: TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    src: Option<Workload>,
    routed: Routed,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let Some(mesh) = shared.mesh.clone() else {
        reset(inbound);
        return;
    };
    let st = mesh.state.borrow().clone();
    let src_workload = src
        .map(|w| format!("{}/{}", name_str(&w.namespace), name_str(&w.name)))
        .unwrap_or_else(|| "unknown".into());
    let _ = inbound.set_nodelay(true);
    let ctx = Ctx {
        peer,
        src,
        src_workload: &src_workload,
        mesh: Some((&st, &mesh)),
        shared: &shared,
        trace: crate::telemetry::trace::outbound_connection(peer, vip, || false),
    };
    let span = info_span!(
        "outbound",
        src = %peer,
        service = field::Empty,
        endpoint = field::Empty
    );
    to_service(inbound, vip, routed, &ctx, started)
        .instrument(span)
        .await
}

/// What opening an upstream connection needs besides the destination.
struct Ctx<'a> {
    peer: SocketAddr,
    src: Option<Workload>,
    src_workload: &'a str,
    /// With a controller: the state and the mesh side.
    mesh: Option<(&'a NodeState, &'a Mesh)>,
    shared: &'a Shared,
    /// The connection's `outbound.tcp` span (none when tracing is off).
    trace: crate::telemetry::trace::Span,
}

/// An open upstream connection.
enum Upstream {
    Hbone {
        io: Tunnel,
        src_id: Identity,
        dst_id: Identity,
        tunnel_addr: SocketAddr,
    },
    /// A meshed pod on this node: admitted by the destination's checks in this process, and
    /// connected without a tunnel (see [`local`]).
    Local {
        admitted: Box<server::Admitted>,
        conn: Arc<server::Conn>,
        span: Span,
        src_id: Identity,
        dst_id: Identity,
    },
    Tcp(TcpStream),
}

/// Why an upstream connection could not be opened (already logged).
struct Failure {
    /// Counted in `sidenode_hbone_refused_total` when the connection is given up.
    refusal: Option<Refusal>,
    /// The endpoint could not be reached: another endpoint may be tried, and outlier
    /// detection counts it as a connect failure.
    unreachable: bool,
    /// The transport of the tunnel that was refused (`None`: no tunnel was dialled).
    transport: Option<Transport>,
}

async fn forward(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    let Some(maps) = &shared.maps else {
        warn!("no kernel maps to read the original destination from; closing");
        reset(inbound);
        return;
    };
    let Some(orig) = maps.orig_dst(peer) else {
        // Never guess: a connection without a recorded destination goes nowhere (its entry
        // was evicted from a full `SN_ORIG_DST`, or never made: docs/security.md).
        crate::telemetry::metrics::count_conn_refused("outbound", "no_orig_dst");
        warn!("no original destination recorded for this connection; closing it");
        reset(inbound);
        return;
    };
    let dst = orig_dst_addr(&orig);
    if shared.listens.contains(&dst) {
        warn!(%dst, "original destination is the proxy itself; closing to avoid a loop");
        reset(inbound);
        return;
    }
    let src = maps.workload(orig.netns_cookie);
    let src_workload = src
        .map(|w| format!("{}/{}", name_str(&w.namespace), name_str(&w.name)))
        .unwrap_or_else(|| "unknown".into());
    // Concurrent connection limits, per proxy and per source pod (its network namespace):
    // over one, the connection is reset now, never queued.
    let _permit = match &shared.conn_limits {
        Some(limits) => match limits.try_acquire(&orig.netns_cookie.to_string()) {
            Ok(p) => Some(p),
            Err(hit) => {
                debug!(%src_workload, %dst, reason = hit.as_str(), open = limits.open(), "over a connection limit; resetting");
                reset(inbound);
                return;
            }
        },
        None => None,
    };
    let _ = inbound.set_nodelay(true);

    let st = shared.mesh.as_ref().map(|m| m.state.borrow().clone());
    let ctx = Ctx {
        peer,
        src,
        src_workload: &src_workload,
        mesh: st.as_deref().zip(shared.mesh.as_deref()),
        shared: &shared,
        trace: crate::telemetry::trace::outbound_connection(peer, dst, || {
            st.as_deref()
                .is_some_and(|st| route::http::is_http_service_port(st, dst))
        }),
    };
    if let Some((st, _)) = ctx.mesh {
        let (src_ns, src_name) = src
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
        // An HTTP service port: routed per request at L7 (`proxy::http`).
        if route::http::is_http_service_port(st, dst)
            && let Some(mesh) = shared.mesh.clone()
        {
            super::http::serve(inbound, peer, dst, src, mesh, shared.clone()).await;
            return;
        }
        let mut rng = fastrand::Rng::new();
        match route::route_with(
            st,
            &shared.balancer,
            Some(&shared.health),
            &mut rng,
            &source,
            dst,
        ) {
            Decision::NotService => {}
            Decision::Endpoint(r) => {
                // Boxed: its state (endpoint retries around the copy) is 1.4 KB more than
                // the direct copy's below, for every connection's whole life.
                Box::pin(to_service(inbound, dst, r, &ctx, started)).await;
                return;
            }
            Decision::Passthrough { service } => {
                Span::current().record("service", service.as_str());
                let meta = |up: Option<&Upstream>| conn_meta(&ctx, dst, Some(&service), up);
                let direct = Ctx {
                    mesh: None,
                    trace: ctx.trace.clone(),
                    ..ctx
                };
                match open_upstream(&direct, dst, shared.connect_timeout).await {
                    Ok(up) => {
                        let m = meta(Some(&up));
                        splice(inbound, up, m, started, &direct.trace, Some(maps)).await
                    }
                    Err(f) => {
                        failed_with(meta(None), &f, started);
                        reset(inbound)
                    }
                }
                return;
            }
            Decision::Refuse {
                service,
                reason,
                why,
            } => {
                Span::current().record("service", service.as_str());
                count_refusal("outbound", None, reason);
                warn!(vip = %dst, %src_workload, reason = reason.as_str(), "{why}; closing");
                telemetry::failed(
                    conn_meta(&ctx, dst, Some(&service), None),
                    started,
                    reason.response_flag(),
                    &why,
                );
                reset(inbound);
                return;
            }
        }
    }
    match open_upstream(&ctx, dst, shared.connect_timeout).await {
        Ok(up) => {
            let meta = conn_meta(&ctx, dst, None, Some(&up));
            splice(inbound, up, meta, started, &ctx.trace, Some(maps)).await
        }
        Err(f) => {
            if let Some(reason) = f.refusal {
                count_refusal("outbound", f.transport, reason);
            }
            failed_with(conn_meta(&ctx, dst, None, None), &f, started);
            reset(inbound);
        }
    }
}

/// Istio's view of this connection's source workload (`principal`: the identity it presents
/// over mTLS).
fn source_side(c: &Ctx<'_>, principal: Option<String>) -> Side {
    let Some(w) = c.src else {
        return Side {
            principal: principal.unwrap_or_else(|| istio::UNKNOWN.into()),
            ..Side::default()
        };
    };
    let (ns, name) = (name_str(&w.namespace), name_str(&w.name));
    match c
        .mesh
        .and_then(|(st, _)| st.workloads.get(&format!("{ns}/{name}")))
    {
        Some(sw) => Side::of(sw, principal),
        None => Side {
            principal: principal.unwrap_or_else(|| istio::UNKNOWN.into()),
            ..Side::named(ns, name)
        },
    }
}

/// The telemetry of a connection to `dst` (a pod or outside address) sent over `up`, routed
/// through `service` (`namespace/name`) if a VIP was dialled.
fn conn_meta(
    c: &Ctx<'_>,
    dst: SocketAddr,
    service: Option<&str>,
    up: Option<&Upstream>,
) -> ConnMeta {
    let (src_p, dst_p, hbone_addr) = match up {
        Some(Upstream::Hbone {
            src_id,
            dst_id,
            tunnel_addr,
            ..
        }) => (
            Some(src_id.principal()),
            Some(dst_id.principal()),
            Some(*tunnel_addr),
        ),
        Some(Upstream::Local { src_id, dst_id, .. }) => {
            (Some(src_id.principal()), Some(dst_id.principal()), None)
        }
        _ => (None, None, None),
    };
    // A same-node connection is authenticated as a tunnel is (docs/architecture.md).
    let security = if matches!(up, Some(Upstream::Hbone { .. } | Upstream::Local { .. })) {
        istio::MUTUAL_TLS
    } else {
        istio::NONE
    };
    let destination = match c.mesh.and_then(|(st, _)| st.workload_by_ip(dst.ip())) {
        Some(w) => Side::of(w, dst_p),
        None => Side {
            principal: dst_p.unwrap_or_else(|| istio::UNKNOWN.into()),
            ..Side::default()
        },
    };
    ConnMeta {
        labels: Labels {
            reporter: Reporter::Source,
            source: source_side(c, src_p),
            destination,
            service: service.and_then(ServiceName::of_uid),
            protocol: "tcp".into(),
            security,
        },
        src_addr: c.peer,
        dst_addr: dst,
        hbone_addr,
        transport: match up {
            Some(Upstream::Hbone { io, .. }) => Some(io.transport().as_str()),
            _ => None,
        },
    }
}

/// Counts and logs a connection that could not be sent on.
fn failed_with(meta: ConnMeta, f: &Failure, started: Instant) {
    let (flag, why) = match f.refusal {
        Some(r) => (r.response_flag(), r.as_str()),
        None if f.unreachable => ("UF", "unreachable"),
        // Outside the mesh with direct connections off.
        None => ("NR", "outside the mesh"),
    };
    telemetry::failed(meta, started, flag, why);
}

/// A connection routed to an endpoint of a service: limits, connect with retries on other
/// endpoints, outlier detection, copy.
async fn to_service(inbound: TcpStream, vip: SocketAddr, r: Routed, c: &Ctx<'_>, started: Instant) {
    let span = Span::current();
    span.record("service", r.service.as_str());
    span.record("endpoint", field::display(r.endpoint.addr));
    c.trace.upstream(&r.service, "", None, &r.cluster, 0);
    debug!(
        %vip,
        subset = r.subset.as_deref().unwrap_or(""),
        route = r.route.as_deref().unwrap_or(""),
        policy = r.policy.as_str(),
        endpoint_workload = %r.endpoint.workload,
        "service routed"
    );
    let shared = c.shared;
    // Held for the connection's life.
    let _permit = match shared.limits.try_connection(&r.cluster, &r.resilience) {
        Ok(p) => p,
        Err(e) => {
            count_refusal("outbound", None, Refusal::Overflow);
            warn!(
                %vip,
                src_workload = c.src_workload,
                reason = Refusal::Overflow.as_str(),
                error = %e,
                "connection pool limit reached; closing"
            );
            telemetry::failed(
                conn_meta(c, r.endpoint.addr, Some(&r.service), None),
                started,
                Refusal::Overflow.response_flag(),
                "connection pool limit",
            );
            reset(inbound);
            return;
        }
    };
    let timeout: Duration = r.resilience.connect_timeout_or(shared.connect_timeout);
    let outlier = r.resilience.outlier.as_ref();
    let mut rng = fastrand::Rng::new();
    let mut endpoint = r.endpoint.addr;
    let mut tried = Vec::new();
    loop {
        // Least-request balancing counts open connections, attempts included.
        let active = shared.balancer.track(endpoint);
        let failure = match open_upstream(c, endpoint, timeout).await {
            Ok(up) => {
                if let Some(od) = outlier {
                    shared
                        .health
                        .report(&r.cluster, endpoint, Outcome::Success, od);
                }
                let meta = conn_meta(c, endpoint, Some(&r.service), Some(&up));
                splice(inbound, up, meta, started, &c.trace, shared.maps.as_ref()).await;
                drop(active);
                return;
            }
            Err(f) => f,
        };
        drop(active);
        if failure.unreachable
            && let Some(od) = outlier
        {
            shared
                .health
                .report(&r.cluster, endpoint, Outcome::ConnectFailure, od);
        }
        tried.push(endpoint);
        let next = if failure.unreachable && tried.len() < MAX_CONNECT_ATTEMPTS {
            route::health::select(
                &shared.balancer,
                Some(&shared.health),
                outlier,
                &r.cluster,
                r.policy,
                &r.endpoints,
                &tried,
                &mut rng,
            )
        } else {
            None
        };
        let Some(i) = next else {
            if let Some(reason) = failure.refusal {
                count_refusal("outbound", failure.transport, reason);
            }
            failed_with(
                conn_meta(c, endpoint, Some(&r.service), None),
                &failure,
                started,
            );
            if failure.unreachable {
                warn!(
                    %vip,
                    src_workload = c.src_workload,
                    attempts = tried.len(),
                    "no endpoint could be reached; closing"
                );
            }
            reset(inbound);
            return;
        };
        let failed = endpoint;
        endpoint = r.endpoints[i].addr;
        span.record("endpoint", field::display(endpoint));
        info!(
            %vip,
            %failed,
            attempt = tried.len() + 1,
            "endpoint unreachable; trying another endpoint"
        );
    }
}

/// Opens the connection to `dst`: an HBONE tunnel when it is a meshed workload or Istio's
/// (unless its `PeerAuthentication` mode for the port is DISABLE: then plaintext), else a
/// direct connection (when allowed). Failures are logged here.
///
/// Boxed, for every caller: a connection's task is as large as the largest future it ever
/// awaits, for as long as the connection lives, and opening the upstream (~9 KiB of state)
/// is what made it so; the copy the task spends its life in needs ~2 KiB
/// (docs/performance.md, "Memory per connection").
fn open_upstream<'a>(
    c: &'a Ctx<'_>,
    dst: SocketAddr,
    timeout: Duration,
) -> std::pin::Pin<Box<impl Future<Output = Result<Upstream, Failure>> + Send + 'a>> {
    Box::pin(open_upstream_inline(c, dst, timeout))
}

async fn open_upstream_inline(
    c: &Ctx<'_>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Upstream, Failure> {
    if let Some((st, mesh)) = c.mesh {
        let dw = st.workload_by_ip(dst.ip());
        // PeerAuthentication DISABLE on the destination's port: plaintext, as Istio sends it.
        let mtls_disabled = dw.is_some_and(|dw| {
            dw.hbone_destination()
                && crate::policy::peer_auth::mode_of(st, dw, dst.port())
                    == crate::policy::peer_auth::Mode::Disable
        });
        match dw {
            Some(_) if mtls_disabled => {
                debug!(%dst, src_workload = c.src_workload, "mTLS disabled by PeerAuthentication; connecting directly");
            }
            // sidenode's pods, and Istio's (ztunnel's `podIP:15008`, never local).
            Some(dw) if dw.hbone_destination() => {
                let Some(w) = c.src else {
                    warn!(%dst, "source workload unknown; cannot present an identity");
                    return Err(Failure {
                        refusal: Some(Refusal::NoCertificate),
                        unreachable: false,
                        transport: None,
                    });
                };
                let src_id = Identity::new(
                    &st.trust_domain,
                    name_str(&w.namespace),
                    name_str(&w.service_account),
                );
                let dst_id = st.identity_of(dw);
                // The pod's address of the connection's family (ztunnel's choice).
                let tunnel_ip = super::hbone::tunnel_ip(&dw.ips, dst.ip());
                let baggage = super::hbone::baggage(
                    st,
                    name_str(&w.namespace),
                    name_str(&w.name),
                    c.peer.ip(),
                );
                if dw.meshed && dw.node == mesh.node {
                    return local(c, mesh, dw, dst, src_id, dst_id, timeout).await;
                }
                let tunnel_addr = SocketAddr::new(tunnel_ip, mesh_common::ports::HBONE);
                return tunnel(c, mesh, dst, tunnel_addr, src_id, dst_id, baggage, timeout).await;
            }
            _ if !c.shared.direct_unmeshed => {
                warn!(%dst, src_workload = c.src_workload, "destination outside the mesh and direct connections are off; closing");
                return Err(Failure {
                    refusal: None,
                    unreachable: false,
                    transport: None,
                });
            }
            _ => {}
        }
    }
    match connect_marked(dst, timeout).await {
        Ok(s) => Ok(Upstream::Tcp(s)),
        Err(e) => {
            warn!(%dst, src_workload = c.src_workload, error = %e, "connection failed: destination unreachable");
            Err(Failure {
                refusal: None,
                unreachable: true,
                transport: None,
            })
        }
    }
}

/// A meshed destination on this node: the destination's checks (`AuthorizationPolicy`,
/// `RateLimitPolicy`, then the connection to the pod) run here, as the pod's HBONE listener
/// would run them, with the source identity the tunnel would have presented. Both come from
/// the kernel's record of the client's network namespace, so nothing is lost by skipping the
/// mutual TLS between two sockets of one process; both local legs are spliced in the kernel.
async fn local(
    c: &Ctx<'_>,
    mesh: &Mesh,
    dw: &crate::proto::Workload,
    dst: SocketAddr,
    src_id: Identity,
    dst_id: Identity,
    timeout: Duration,
) -> Result<Upstream, Failure> {
    let conn = Arc::new(server::Conn {
        pod: dw.uid.clone(),
        pod_ips: dw.ips.iter().filter_map(|i| i.parse().ok()).collect(),
        peer: c.peer,
        peer_identity: src_id.clone(),
        connect_timeout: timeout,
        state: mesh.state.clone(),
        tunnels: mesh.authz.clone(),
        limiter: mesh.limiter.clone(),
        pods: mesh.pods.clone(),
        transport: None,
        tunnel_limits: mesh.tunnel_limits.clone(),
    });
    let span = info_span!("inbound", src_identity = %src_id, target = %dst, client = %c.peer, local = true);
    match server::admit(&conn, dst, c.peer.ip(), &span).await {
        Ok(admitted) => Ok(Upstream::Local {
            admitted: Box::new(admitted),
            conn,
            span,
            src_id,
            dst_id,
        }),
        Err(code) => {
            let (reason, unreachable) = match code {
                StatusCode::SERVICE_UNAVAILABLE => (Refusal::Unreachable, true),
                StatusCode::TOO_MANY_REQUESTS => (Refusal::RateLimited, false),
                _ => (Refusal::Denied, false),
            };
            warn!(%dst, src_workload = c.src_workload, dst_identity = %dst_id, reason = reason.as_str(), "same-node connection refused by the destination");
            Err(Failure {
                refusal: Some(reason),
                unreachable,
                transport: None,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn tunnel(
    c: &Ctx<'_>,
    mesh: &Mesh,
    dst: SocketAddr,
    tunnel_addr: SocketAddr,
    src_id: Identity,
    dst_id: Identity,
    baggage: String,
    timeout: Duration,
) -> Result<Upstream, Failure> {
    let cert = match mesh.certs.get(&src_id).await {
        Ok(cert) => cert,
        Err(e) => {
            warn!(%dst, src_workload = c.src_workload, error = %e, "no certificate for the source identity");
            return Err(Failure {
                refusal: Some(Refusal::NoCertificate),
                unreachable: false,
                transport: None,
            });
        }
    };
    let src_netns = c
        .src
        .as_ref()
        .zip(c.mesh)
        .and_then(|(w, (st, _))| mesh.tunnel_source(st, w));
    let req = || TunnelRequest {
        cert: &cert,
        dst_identity: dst_id.clone(),
        tunnel_addr,
        target: dst,
        client: c.peer,
        src_netns: src_netns.clone(),
        baggage: baggage.clone(),
        traceparent: c.trace.traceparent(),
    };
    // `MeshConfig.spec.tunnelProtocol` (HTTP/3 or HTTP/2, with the fallback): decided in
    // `hbone::dial`, for this path and the HTTP path alike.
    match dial::open(mesh, req, timeout).await {
        Ok(io) => Ok(Upstream::Hbone {
            io,
            src_id,
            dst_id,
            tunnel_addr,
        }),
        Err(e) => {
            let (reason, unreachable) = e.refusal();
            let transport = e.transport();
            warn!(%dst, src_workload = c.src_workload, dst_identity = %dst_id, reason = reason.as_str(), error = %e, transport = transport.as_str(), "tunnel refused");
            Err(Failure {
                refusal: Some(reason),
                unreachable,
                transport: Some(transport),
            })
        }
    }
}

/// Whether the agent's kernel splicing (`agent --splice`) holds any of these sockets: their
/// bytes must then be read and written, not moved with `splice(2)` (`zero_copy`).
fn held_by_kernel_splicing(maps: Option<&ProxyMaps>, sockets: &[&TcpStream]) -> bool {
    let Some(maps) = maps else { return false };
    sockets
        .iter()
        .any(|s| match (s.local_addr(), s.peer_addr()) {
            (Ok(local), Ok(peer)) => maps.spliced(local, peer),
            // Closing already: the ordinary copy sees it through.
            _ => true,
        })
}

/// Copies both ways until both sides are done; the connection's bytes are counted as they
/// flow and its access-log line is written at the end (`telemetry::conn`).
async fn splice(
    inbound: TcpStream,
    upstream: Upstream,
    meta: ConnMeta,
    started: Instant,
    trace: &crate::telemetry::trace::Span,
    maps: Option<&ProxyMaps>,
) {
    let dst = meta.dst_addr;
    let transport = meta.transport;
    let tracked = Tracked::open_since(meta, started);
    let (result, protocol) = match upstream {
        Upstream::Hbone {
            io: Tunnel::Quic(io),
            ..
        } => {
            let (mut received, mut sent) = tracked.meters();
            let mut inbound = inbound;
            // Boxed, as in `server::carry_whole`: kept out of every outbound task's size.
            let r = Box::pin(h3_stream::copy(&mut inbound, *io, &mut received, &mut sent)).await;
            (r, "hbone")
        }
        Upstream::Hbone {
            io: Tunnel::H2(io), ..
        } => {
            // The app's socket is the downstream side: what comes from it is received.
            let (mut received, mut sent) = tracked.meters();
            let mut inbound = inbound;
            let r = stream::copy(&mut inbound, io, &mut received, &mut sent).await;
            (r, "hbone")
        }
        Upstream::Tcp(s) if !held_by_kernel_splicing(maps, &[&inbound, &s]) => {
            let (received, sent) = tracked.meters();
            (
                zero_copy::copy_bidirectional(&inbound, &s, &mut [received], &mut [sent]).await,
                "tcp",
            )
        }
        Upstream::Tcp(mut s) => {
            let mut down = tracked.count(inbound);
            (
                tokio::io::copy_bidirectional_with_sizes(&mut down, &mut s, COPY_BUF, COPY_BUF)
                    .await,
                "tcp",
            )
        }
        Upstream::Local {
            admitted,
            conn,
            span,
            ..
        } => {
            let none = crate::telemetry::trace::Span::none();
            let down = if held_by_kernel_splicing(maps, &[&inbound, &admitted.upstream]) {
                Downstream::Stream(tracked.count(inbound))
            } else {
                Downstream::Socket(inbound, &tracked)
            };
            let carried =
                Box::pin(server::carry(down, *admitted, &conn, &none, "local").instrument(span))
                    .await;
            // Served request by request: the destination's side counted and logged each.
            (carried.unwrap_or(Ok((0, 0))), "local")
        }
    };
    trace.set("network.peer.address", || dst.ip().to_string());
    if let Some(t) = transport {
        trace.set(crate::telemetry::trace::HBONE_TRANSPORT, || t);
    }
    trace.connection_closed(protocol, &result);
    match result {
        Ok(_) => tracked.close("-", None),
        Err(e) => tracked.close("DC", Some(&e.to_string())),
    }
}
