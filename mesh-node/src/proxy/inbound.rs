//! Inbound: an HBONE listener at `podIP:15008` inside each meshed local pod's network
//! namespace (ztunnel's in-pod model). The listener knows its pod, so it presents that pod's
//! certificate without SNI — wire-compatible with ztunnel — and a tunnel can only reach the
//! pod it was addressed to. Listeners follow the state: added for new pods, closed for gone
//! ones.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use super::Mesh;
use super::hbone::{Refusal, count_refusal, server};
use crate::identity::Identity;
use crate::identity::certs::peer_identity;
use crate::kernel::netns::bind_in_netns;
use crate::proto;

/// What a listener was opened for; a change reopens it.
#[derive(Clone, PartialEq, Eq)]
struct Spec {
    ip: IpAddr,
    netns: String,
    identity: Identity,
    ips: Vec<IpAddr>,
}

pub async fn run(mesh: Arc<Mesh>, node: String, connect_timeout: Duration) {
    let mut rx = mesh.state.clone();
    let mut open: HashMap<String, (Spec, JoinHandle<()>)> = HashMap::new();
    loop {
        let st = rx.borrow_and_update().clone();
        let mut want: HashMap<String, Spec> = HashMap::new();
        for w in st
            .workloads
            .values()
            .filter(|w| w.node == node && w.meshed && !w.netns.is_empty())
        {
            if let Some(spec) = spec_of(&st, w) {
                want.insert(w.uid.clone(), spec);
            }
        }
        // Certificates: only for identities of local pods, fetched ahead of the first
        // connection.
        let local: std::collections::HashSet<Identity> =
            want.values().map(|s| s.identity.clone()).collect();
        mesh.certs.retain(&|id| local.contains(id));
        for id in &local {
            let (certs, id) = (mesh.certs.clone(), id.clone());
            tokio::spawn(async move {
                if let Err(e) = certs.get(&id).await {
                    warn!(identity = %id, error = %e, "could not obtain a certificate yet");
                }
            });
        }
        open.retain(|uid, (spec, task)| {
            let keep = want.get(uid) == Some(spec);
            if !keep {
                task.abort();
                info!(pod = %uid, "HBONE listener closed");
            }
            keep
        });
        for (uid, spec) in want {
            if open.contains_key(&uid) {
                continue;
            }
            let addr = SocketAddr::new(spec.ip, mesh_common::ports::HBONE);
            match bind_in_netns(std::path::Path::new(&spec.netns), addr)
                .and_then(TcpListener::from_std)
            {
                Ok(l) => {
                    info!(pod = %uid, %addr, identity = %spec.identity, "HBONE listener open");
                    let task = tokio::spawn(accept_loop(
                        l,
                        uid.clone(),
                        spec.clone(),
                        mesh.clone(),
                        connect_timeout,
                    ));
                    open.insert(uid, (spec, task));
                }
                Err(e) => {
                    warn!(pod = %uid, %addr, error = %e, "cannot open the HBONE listener in the pod")
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn spec_of(st: &crate::state::NodeState, w: &proto::Workload) -> Option<Spec> {
    let ips: Vec<IpAddr> = w.ips.iter().filter_map(|i| i.parse().ok()).collect();
    Some(Spec {
        ip: *ips.first()?,
        netns: w.netns.clone(),
        identity: st.identity_of(w),
        ips,
    })
}

async fn accept_loop(
    l: TcpListener,
    pod: String,
    spec: Spec,
    mesh: Arc<Mesh>,
    connect_timeout: Duration,
) {
    loop {
        let (tcp, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(%pod, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small HTTP/2 frames (headers, a short reply) must not wait for a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (pod, spec, mesh) = (pod.clone(), spec.clone(), mesh.clone());
        let span = info_span!("hbone", %peer, %pod);
        tokio::spawn(
            async move {
                let cert = match mesh.certs.get(&spec.identity).await {
                    Ok(c) => c,
                    Err(e) => {
                        count_refusal("inbound", Refusal::NoCertificate);
                        warn!(error = %e, "no certificate for this pod; refusing the tunnel");
                        return;
                    }
                };
                let acceptor = TlsAcceptor::from(cert.server_config.clone());
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        let reason = Refusal::of_tls(&e);
                        count_refusal("inbound", reason);
                        warn!(reason = reason.as_str(), error = %e, "refused an HBONE client");
                        return;
                    }
                    Err(_) => {
                        count_refusal("inbound", Refusal::Handshake);
                        warn!(reason = "handshake", "HBONE handshake timed out");
                        return;
                    }
                };
                let Some(peer_identity) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| peer_identity(c).ok())
                else {
                    count_refusal("inbound", Refusal::Untrusted);
                    warn!(
                        reason = "untrusted",
                        "HBONE client without a SPIFFE identity"
                    );
                    return;
                };
                let conn = Arc::new(server::Conn {
                    pod,
                    pod_ips: spec.ips,
                    peer,
                    peer_identity,
                    connect_timeout,
                });
                server::serve(tls, conn).await;
            }
            .instrument(span),
        );
    }
}
