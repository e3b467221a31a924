//! Inbound: an HBONE listener at `podIP:15008` (each of the pod's addresses: IPv4 and, on a
//! dual-stack pod, IPv6) inside each meshed local pod's network namespace (ztunnel's in-pod
//! model). The listener knows its pod, so it presents that pod's
//! certificate without SNI — wire-compatible with ztunnel — and a tunnel can only reach the
//! pod it was addressed to. Listeners follow the state: added for new pods, closed for gone
//! ones. A pod's namespace is found as the agent finds it: the `sidenode.io/netns` annotation
//! (standalone), else its UID through its cgroup (`kernel::podns`); pods not found yet (not
//! started) and listeners that failed to open are tried again every `retry_interval`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use super::Mesh;
use super::hbone::{Refusal, TLS_READ_BUF, count_refusal, server};
use crate::identity::Identity;
use crate::identity::certs::peer_identity;
use crate::kernel::netns::{bind_in_netns, netns_id};
use crate::kernel::podns::PodNetnsFinder;
use crate::proto;

/// What the inbound side needs besides the mesh.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    pub connect_timeout: Duration,
    /// Where pods' cgroups are searched (None: only the netns annotation works).
    pub cgroup_root: Option<PathBuf>,
    pub retry_interval: Duration,
}

/// What a listener was opened for; a change reopens it.
#[derive(Clone, PartialEq, Eq)]
struct Spec {
    ip: IpAddr,
    /// The namespace's identity (device, inode): a pod sandbox made again is a new one.
    netns: (u64, u64),
    identity: Identity,
    ips: Vec<IpAddr>,
}

/// The network namespace of a local pod: its path and identity.
fn netns_of(
    w: &proto::Workload,
    finder: Option<&mut PodNetnsFinder>,
) -> Result<(PathBuf, (u64, u64)), String> {
    if !w.netns.is_empty() {
        let path = PathBuf::from(&w.netns);
        let id = netns_id(&path).map_err(|e| format!("{NETNS}: {e}"))?;
        return Ok((path, id));
    }
    if w.pod_uid.is_empty() {
        return Err(format!("no {NETNS} annotation and no pod uid"));
    }
    let Some(finder) = finder else {
        return Err(format!(
            "no {NETNS} annotation, and no cgroup root to find the pod by uid"
        ));
    };
    let found = finder.find(&w.pod_uid).map_err(|e| e.to_string())?;
    Ok((found.path, found.id))
}

const NETNS: &str = crate::model::NETNS_ANNOTATION;

/// The last round's problems, by pod uid, for the admin API (`/config_dump`'s
/// `unserved_pods`, read by `mesh-node doctor`).
static UNSERVED: std::sync::Mutex<std::collections::BTreeMap<String, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Meshed pods of this node without an HBONE listener, and why.
pub fn unserved() -> std::collections::BTreeMap<String, String> {
    UNSERVED.lock().map(|m| m.clone()).unwrap_or_default()
}

pub async fn run(mesh: Arc<Mesh>, settings: Settings) {
    let Settings {
        node,
        connect_timeout,
        cgroup_root,
        retry_interval,
    } = settings;
    let mut finder = cgroup_root.map(PodNetnsFinder::new);
    let mut rx = mesh.state.clone();
    let mut open: HashMap<String, (Spec, Vec<JoinHandle<()>>)> = HashMap::new();
    // Problems already logged, by pod (logged again when they change).
    let mut reported: HashMap<String, String> = HashMap::new();
    // Woken by a state change (not only by the retry timer), and the identities whose
    // certificates were asked for since the last one.
    let mut changed_state = true;
    let mut prefetched: std::collections::HashSet<Identity> = Default::default();
    loop {
        let st = rx.borrow_and_update().clone();
        let mut want: HashMap<String, (Spec, PathBuf)> = HashMap::new();
        let mut problems: HashMap<String, String> = HashMap::new();
        for w in st.workloads.values().filter(|w| w.node == node && w.meshed) {
            match netns_of(w, finder.as_mut()) {
                Ok((path, id)) => {
                    if let Some(spec) = spec_of(&st, w, id) {
                        want.insert(w.uid.clone(), (spec, path));
                    }
                }
                Err(e) => {
                    // Keep a listener already open for it: its namespace may still be good.
                    if let Some((spec, _)) = open.get(&w.uid) {
                        want.insert(w.uid.clone(), (spec.clone(), PathBuf::new()));
                    }
                    problems.insert(w.uid.clone(), e);
                }
            }
        }
        // Certificates: only for identities of local pods, fetched ahead of the first
        // connection.
        let local: std::collections::HashSet<Identity> =
            want.values().map(|(s, _)| s.identity.clone()).collect();
        mesh.certs.retain(&|id| local.contains(id));
        for id in local
            .iter()
            .filter(|id| changed_state || !prefetched.contains(*id))
        {
            let (certs, id) = (mesh.certs.clone(), id.clone());
            tokio::spawn(async move {
                if let Err(e) = certs.get(&id).await {
                    warn!(identity = %id, error = %e, "could not obtain a certificate yet");
                }
            });
        }
        prefetched = local;
        let mut closed = Vec::new();
        open.retain(|uid, (spec, tasks)| {
            let keep = want.get(uid).is_some_and(|(s, _)| s == spec);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
                info!(pod = %uid, "HBONE listener closed");
                closed.push(uid.clone());
            }
            keep
        });
        for uid in closed {
            mesh.pods.close(&uid).await;
            mesh.quic.forget_pod(&uid);
        }
        for (uid, (spec, path)) in want {
            if open.contains_key(&uid) {
                continue;
            }
            let addr = SocketAddr::new(spec.ip, mesh_common::ports::HBONE);
            match bind_in_netns(Path::new(&path), addr).and_then(TcpListener::from_std) {
                Ok(l) => {
                    // The last leg from the clients' addresses, set up before the first
                    // accept: without it (a read-only /proc/sys, no CAP_NET_ADMIN) the pod is
                    // served from the node's address.
                    if let Err(e) = mesh.pods.open(&uid, &path).await {
                        warn!(pod = %uid, error = %e, "the pod will see the node's address as its clients'");
                    }
                    let mut listeners = vec![(addr, l)];
                    // The pod's other addresses (a dual-stack pod's IPv6): ztunnel dials a
                    // tunnel to the destination address of the connection's own family.
                    // Best effort: the first address alone still serves every tunnel
                    // (sidenode's clients dial it).
                    for ip in spec.ips.iter().filter(|ip| **ip != spec.ip) {
                        let addr = SocketAddr::new(*ip, mesh_common::ports::HBONE);
                        match bind_in_netns(Path::new(&path), addr).and_then(TcpListener::from_std)
                        {
                            Ok(l) => listeners.push((addr, l)),
                            Err(e) => {
                                warn!(pod = %uid, %addr, error = %e, "cannot open the HBONE listener at this address of the pod")
                            }
                        }
                    }
                    let mut tasks = Vec::with_capacity(2 * listeners.len());
                    for (addr, l) in listeners {
                        info!(pod = %uid, %addr, identity = %spec.identity, "HBONE listener open");
                        tasks.push(tokio::spawn(accept_loop(
                            l,
                            uid.clone(),
                            spec.clone(),
                            mesh.clone(),
                            connect_timeout,
                        )));
                        // HBONE over QUIC beside it, on UDP (hbone::quic).
                        match super::hbone::quic::bind_udp_in_netns(&path, addr) {
                            Ok(s) => tasks.push(tokio::spawn(super::hbone::quic::serve_pod(
                                s,
                                uid.clone(),
                                spec.identity.clone(),
                                spec.ips.clone(),
                                mesh.clone(),
                                connect_timeout,
                            ))),
                            Err(e) => {
                                warn!(pod = %uid, %addr, error = %e, "cannot open the HBONE/QUIC listener");
                            }
                        }
                    }
                    open.insert(uid, (spec, tasks));
                }
                Err(e) => {
                    problems.insert(
                        uid,
                        format!("cannot open the HBONE listener at {addr} in the pod: {e}"),
                    );
                }
            }
        }
        for (uid, problem) in &problems {
            if reported.get(uid) != Some(problem) {
                warn!(pod = %uid, error = %problem, "inbound: pod not served yet; will try again");
            }
        }
        let retry = !problems.is_empty();
        if let Ok(mut u) = UNSERVED.lock() {
            *u = problems
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        reported = problems;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                changed_state = true;
            }
            _ = tokio::time::sleep(retry_interval), if retry => changed_state = false,
        }
    }
}

fn spec_of(st: &crate::state::NodeState, w: &proto::Workload, netns: (u64, u64)) -> Option<Spec> {
    let ips: Vec<IpAddr> = w.ips.iter().filter_map(|i| i.parse().ok()).collect();
    Some(Spec {
        ip: *ips.first()?,
        netns,
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
                let tls = match tokio::time::timeout(
                    crate::defaults::HBONE_HANDSHAKE_TIMEOUT,
                    acceptor.accept(tokio::io::BufReader::with_capacity(TLS_READ_BUF, tcp)),
                )
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
                    state: mesh.state.clone(),
                    tunnels: mesh.authz.clone(),
                    limiter: mesh.limiter.clone(),
                    pods: mesh.pods.clone(),
                    tunnel_limits: mesh.tunnel_limits.clone(),
                });
                server::serve(tls, conn).await;
            }
            .instrument(span),
        );
    }
}
