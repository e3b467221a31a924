//! One captured connection: original destination → source workload → a service VIP routed to
//! one endpoint (`route`) → HBONE tunnel to a meshed destination, or direct → copy until both
//! sides are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_common::name_str;
use tokio::net::TcpStream;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::hbone::client::{TunnelRequest, open};
use super::hbone::{Refusal, count_refusal};
use super::route::{self, Decision, Source};
use super::socket::{connect_marked, reset};
use super::{COPY_BUF, Mesh, Shared};
use crate::identity::Identity;
use crate::kernel::maps::orig_dst_addr;

pub async fn handle(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let span = info_span!(
        "outbound",
        src = %peer,
        service = field::Empty,
        endpoint = field::Empty
    );
    forward(inbound, peer, shared).instrument(span).await
}

async fn forward(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Some(orig) = shared.maps.orig_dst(peer) else {
        // Never guess: a connection without a recorded destination goes nowhere.
        warn!("no original destination recorded for this connection; closing it");
        reset(inbound);
        return;
    };
    let mut dst = orig_dst_addr(&orig);
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

    // Held for the connection's life: least-request balancing counts open connections.
    let mut _active = None;
    if let Some(mesh) = &shared.mesh {
        let st = mesh.state.borrow().clone();
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
        let mut rng = fastrand::Rng::new();
        match route::route(&st, &shared.balancer, &mut rng, &source, dst) {
            Decision::NotService => {}
            Decision::Endpoint(r) => {
                let span = Span::current();
                span.record("service", r.service.as_str());
                span.record("endpoint", field::display(r.endpoint.addr));
                debug!(
                    vip = %dst,
                    subset = r.subset.as_deref().unwrap_or(""),
                    route = r.route.as_deref().unwrap_or(""),
                    policy = r.policy.as_str(),
                    endpoint_workload = %r.endpoint.workload,
                    "service routed"
                );
                _active = Some(shared.balancer.track(r.endpoint.addr));
                dst = r.endpoint.addr;
            }
            Decision::Passthrough { service } => {
                Span::current().record("service", service.as_str());
                direct(inbound, dst, src_workload, &shared).await;
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
        match st.workload_by_ip(dst.ip()) {
            Some(dw) if dw.meshed => {
                let Some(w) = src else {
                    warn!(%dst, "source workload unknown; cannot present an identity");
                    count_refusal("outbound", Refusal::NoCertificate);
                    reset(inbound);
                    return;
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
                tunnel(
                    inbound,
                    peer,
                    dst,
                    tunnel_addr,
                    src_workload,
                    src_id,
                    dst_id,
                    baggage,
                    mesh,
                    &shared,
                )
                .await;
                return;
            }
            _ if !shared.direct_unmeshed => {
                warn!(%dst, %src_workload, "destination outside the mesh and direct connections are off; closing");
                reset(inbound);
                return;
            }
            _ => {}
        }
    }
    direct(inbound, dst, src_workload, &shared).await
}

#[allow(clippy::too_many_arguments)]
async fn tunnel(
    mut inbound: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    tunnel_addr: SocketAddr,
    src_workload: String,
    src_id: Identity,
    dst_id: Identity,
    baggage: String,
    mesh: &Mesh,
    shared: &Shared,
) {
    let started = Instant::now();
    let cert = match mesh.certs.get(&src_id).await {
        Ok(c) => c,
        Err(e) => {
            count_refusal("outbound", Refusal::NoCertificate);
            warn!(%dst, %src_workload, error = %e, "no certificate for the source identity");
            reset(inbound);
            return;
        }
    };
    let req = TunnelRequest {
        cert: &cert,
        dst_identity: dst_id.clone(),
        tunnel_addr,
        target: dst,
        client_ip: peer.ip(),
        baggage,
    };
    let mut tunnel = match open(&mesh.pool, req, shared.connect_timeout).await {
        Ok(t) => t,
        Err(e) => {
            let reason = match &e {
                super::hbone::client::TunnelError::Tls { reason, .. } => *reason,
                super::hbone::client::TunnelError::Connect { .. } => Refusal::Unreachable,
                _ => Refusal::Handshake,
            };
            count_refusal("outbound", reason);
            warn!(%dst, %src_workload, dst_identity = %dst_id, reason = reason.as_str(), error = %e, "tunnel refused");
            reset(inbound);
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut tunnel, COPY_BUF, COPY_BUF)
        .await
    {
        Ok((sent, received)) => info!(
            %dst,
            %src_workload,
            src_identity = %src_id,
            dst_identity = %dst_id,
            protocol = "hbone",
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        ),
        Err(e) => {
            info!(%dst, %src_workload, protocol = "hbone", error = %e, "connection closed with error")
        }
    }
}

async fn direct(mut inbound: TcpStream, dst: SocketAddr, src_workload: String, shared: &Shared) {
    let started = Instant::now();
    let mut outbound = match connect_marked(dst, shared.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%dst, %src_workload, error = %e, "connection failed: destination unreachable");
            reset(inbound);
            return;
        }
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, COPY_BUF, COPY_BUF)
        .await
    {
        Ok((sent, received)) => info!(
            %dst,
            %src_workload,
            protocol = "tcp",
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        ),
        Err(e) => info!(
            %dst,
            %src_workload,
            duration_ms = started.elapsed().as_millis() as u64,
            error = %e,
            "connection closed with error"
        ),
    }
}
