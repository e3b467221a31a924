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
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use mesh_common::{Workload, name_str};
use tokio::net::TcpStream;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::hbone::client::{TunnelError, TunnelRequest, open};
use super::hbone::{Refusal, count_refusal};
use super::route::{self, Decision, Outcome, Routed, Source};
use super::socket::{connect_marked, reset};
use super::{COPY_BUF, Mesh, Shared};
use crate::identity::Identity;
use crate::kernel::maps::orig_dst_addr;
use crate::state::NodeState;

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

/// What opening an upstream connection needs besides the destination.
struct Ctx<'a> {
    peer: SocketAddr,
    src: Option<Workload>,
    src_workload: &'a str,
    /// With a controller: the state and the mesh side.
    mesh: Option<(&'a NodeState, &'a Mesh)>,
    shared: &'a Shared,
}

/// An open upstream connection.
enum Upstream {
    Hbone {
        io: TokioIo<Upgraded>,
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
}

async fn forward(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    let Some(orig) = shared.maps.orig_dst(peer) else {
        // Never guess: a connection without a recorded destination goes nowhere.
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
    let src = shared.maps.workload(orig.netns_cookie);
    let src_workload = src
        .map(|w| format!("{}/{}", name_str(&w.namespace), name_str(&w.name)))
        .unwrap_or_else(|| "unknown".into());
    let _ = inbound.set_nodelay(true);

    let st = shared.mesh.as_ref().map(|m| m.state.borrow().clone());
    let ctx = Ctx {
        peer,
        src,
        src_workload: &src_workload,
        mesh: st.as_deref().zip(shared.mesh.as_deref()),
        shared: &shared,
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
                to_service(inbound, dst, r, &ctx, started).await;
                return;
            }
            Decision::Passthrough { service } => {
                Span::current().record("service", service.as_str());
                let ctx = Ctx { mesh: None, ..ctx };
                match open_upstream(&ctx, dst, shared.connect_timeout).await {
                    Ok(up) => splice(inbound, dst, up, &src_workload, started).await,
                    Err(_) => reset(inbound),
                }
                return;
            }
            Decision::Refuse {
                service,
                reason,
                why,
            } => {
                Span::current().record("service", service.as_str());
                count_refusal("outbound", reason);
                warn!(vip = %dst, %src_workload, reason = reason.as_str(), "{why}; closing");
                reset(inbound);
                return;
            }
        }
    }
    match open_upstream(&ctx, dst, shared.connect_timeout).await {
        Ok(up) => splice(inbound, dst, up, &src_workload, started).await,
        Err(f) => {
            if let Some(reason) = f.refusal {
                count_refusal("outbound", reason);
            }
            reset(inbound);
        }
    }
}

/// A connection routed to an endpoint of a service: limits, connect with retries on other
/// endpoints, outlier detection, copy.
async fn to_service(inbound: TcpStream, vip: SocketAddr, r: Routed, c: &Ctx<'_>, started: Instant) {
    let span = Span::current();
    span.record("service", r.service.as_str());
    span.record("endpoint", field::display(r.endpoint.addr));
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
            count_refusal("outbound", Refusal::Overflow);
            warn!(
                %vip,
                src_workload = c.src_workload,
                reason = Refusal::Overflow.as_str(),
                error = %e,
                "connection pool limit reached; closing"
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
                splice(inbound, endpoint, up, c.src_workload, started).await;
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
                count_refusal("outbound", reason);
            }
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

/// Opens the connection to `dst`: an HBONE tunnel when it is a meshed workload (unless its
/// `PeerAuthentication` mode for the port is DISABLE: then plaintext), else a direct
/// connection (when allowed). Failures are logged here.
async fn open_upstream(
    c: &Ctx<'_>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Upstream, Failure> {
    if let Some((st, mesh)) = c.mesh {
        let dw = st.workload_by_ip(dst.ip());
        // PeerAuthentication DISABLE on the destination's port: plaintext, as Istio sends it.
        let mtls_disabled = dw.is_some_and(|dw| {
            dw.meshed
                && crate::policy::peer_auth::mode_of(st, dw, dst.port())
                    == crate::policy::peer_auth::Mode::Disable
        });
        match dw {
            Some(_) if mtls_disabled => {
                debug!(%dst, src_workload = c.src_workload, "mTLS disabled by PeerAuthentication; connecting directly");
            }
            Some(dw) if dw.meshed => {
                let Some(w) = c.src else {
                    warn!(%dst, "source workload unknown; cannot present an identity");
                    return Err(Failure {
                        refusal: Some(Refusal::NoCertificate),
                        unreachable: false,
                    });
                };
                let src_id = Identity::new(
                    &st.trust_domain,
                    name_str(&w.namespace),
                    name_str(&w.service_account),
                );
                let dst_id = st.identity_of(dw);
                // The pod's HBONE listener is on its first address; the CONNECT may name any.
                let tunnel_ip = dw
                    .ips
                    .first()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(dst.ip());
                let baggage = format!(
                    "k8s.namespace.name={},k8s.pod.name={}",
                    name_str(&w.namespace),
                    name_str(&w.name)
                );
                let tunnel_addr = SocketAddr::new(tunnel_ip, mesh_common::ports::HBONE);
                return tunnel(c, mesh, dst, tunnel_addr, src_id, dst_id, baggage, timeout).await;
            }
            _ if !c.shared.direct_unmeshed => {
                warn!(%dst, src_workload = c.src_workload, "destination outside the mesh and direct connections are off; closing");
                return Err(Failure {
                    refusal: None,
                    unreachable: false,
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
            });
        }
    };
    let req = TunnelRequest {
        cert: &cert,
        dst_identity: dst_id.clone(),
        tunnel_addr,
        target: dst,
        client_ip: c.peer.ip(),
        baggage,
    };
    match open(&mesh.pool, req, timeout).await {
        Ok(io) => Ok(Upstream::Hbone { io, src_id, dst_id }),
        Err(e) => {
            // Unreachable: the pod's proxy (connect) or the pod itself (503).
            let (reason, unreachable) = match &e {
                TunnelError::Tls { reason, .. } => (*reason, false),
                TunnelError::Connect { .. } => (Refusal::Unreachable, true),
                TunnelError::Status(s) if *s == StatusCode::SERVICE_UNAVAILABLE => {
                    (Refusal::Unreachable, true)
                }
                TunnelError::Status(StatusCode::TOO_MANY_REQUESTS) => (Refusal::RateLimited, false),
                TunnelError::Status(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    (Refusal::Denied, false)
                }
                _ => (Refusal::Handshake, false),
            };
            warn!(%dst, src_workload = c.src_workload, dst_identity = %dst_id, reason = reason.as_str(), error = %e, "tunnel refused");
            Err(Failure {
                refusal: Some(reason),
                unreachable,
            })
        }
    }
}

/// Copies both ways until both sides are done, then logs the connection.
async fn splice(
    mut inbound: TcpStream,
    dst: SocketAddr,
    upstream: Upstream,
    src_workload: &str,
    started: Instant,
) {
    let (result, protocol, ids) = match upstream {
        Upstream::Hbone {
            mut io,
            src_id,
            dst_id,
        } => (
            tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut io, COPY_BUF, COPY_BUF)
                .await,
            "hbone",
            Some((src_id, dst_id)),
        ),
        Upstream::Tcp(mut s) => (
            tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut s, COPY_BUF, COPY_BUF)
                .await,
            "tcp",
            None,
        ),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    match (result, ids) {
        (Ok((sent, received)), Some((src_id, dst_id))) => info!(
            %dst,
            %src_workload,
            src_identity = %src_id,
            dst_identity = %dst_id,
            protocol,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            "connection closed"
        ),
        (Ok((sent, received)), None) => info!(
            %dst,
            %src_workload,
            protocol,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            "connection closed"
        ),
        (Err(e), _) => info!(
            %dst,
            %src_workload,
            protocol,
            duration_ms,
            error = %e,
            "connection closed with error"
        ),
    }
}
