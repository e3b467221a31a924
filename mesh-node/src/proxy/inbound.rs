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
use super::hbone::ktls::{HandshakeIo, Handshaken};
use super::hbone::{Refusal, TLS_READ_BUF, TLS_SEND_BUF, Transport, refuse_handshake, server};
use crate::identity::Identity;
use crate::identity::certs::peer_identity;
use crate::kernel::netns::{bind_in_netns, netns_id};
use crate::kernel::podns::PodNetnsFinder;
use crate::proto;

/// What the inbound side needs besides the mesh.
pub struct Settings {
    pub node: String,
    pub connect_timeout: Duration,
    /// Where pods' cgroups are searched (None: only the netns annotation works).
    pub cgroup_root: Option<PathBuf>,
    pub retry_interval: Duration,
    /// Pods' listeners taken over from the previous proxy (`handover`): used instead of new
    /// ones for the same pod, address and namespace; the others are closed after the first
    /// round (their pods left during the hand-over).
    pub inherited: Vec<super::handover::Inherited>,
    /// Told when the first round's listeners accept.
    pub first_round: Option<tokio::sync::oneshot::Sender<()>>,
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
        mut inherited,
        mut first_round,
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
        // Listeners open and close under the hand-over registry's lock; once handed over,
        // the successor manages them.
        let mut registry = super::handover::registry().await;
        if registry.closed() {
            info!("the proxy stopped accepting; the inbound side stops following the state");
            return;
        }
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
            registry.remove_pod(&uid);
            mesh.pods.close(&uid).await;
            mesh.quic.forget_pod(&uid);
        }
        for (uid, (spec, path)) in want {
            if open.contains_key(&uid) {
                continue;
            }
            let addr = SocketAddr::new(spec.ip, mesh_common::ports::HBONE);
            match take_inherited(&mut inherited, &uid, addr, spec.netns)
                .map_or_else(|| bind_in_netns(Path::new(&path), addr), Ok)
                .and_then(TcpListener::from_std)
            {
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
                        match take_inherited(&mut inherited, &uid, addr, spec.netns)
                            .map_or_else(|| bind_in_netns(Path::new(&path), addr), Ok)
                            .and_then(TcpListener::from_std)
                        {
                            Ok(l) => listeners.push((addr, l)),
                            Err(e) => {
                                warn!(pod = %uid, %addr, error = %e, "cannot open the HBONE listener at this address of the pod")
                            }
                        }
                    }
                    let mut tasks = Vec::with_capacity(2 * listeners.len());
                    for (addr, l) in listeners {
                        let meta = super::handover::Meta {
                            kind: super::handover::Kind::Hbone,
                            addr,
                            pod: Some(uid.clone()),
                            netns: Some(spec.netns),
                        };
                        if let Err(e) = registry.add(meta, &l) {
                            warn!(pod = %uid, %addr, error = %e, "cannot keep this listener for a hand-over");
                        }
                        info!(pod = %uid, %addr, identity = %spec.identity, "HBONE listener open");
                        tasks.push(tokio::spawn(accept_loop(
                            l,
                            uid.clone(),
                            spec.clone(),
                            mesh.clone(),
                            connect_timeout,
                        )));
                        // HBONE over QUIC beside it, on UDP (hbone::quic); after a hand-over,
                        // once the previous proxy has freed the port.
                        tasks.push(tokio::spawn(quic_listener(
                            path.clone(),
                            addr,
                            uid.clone(),
                            spec.clone(),
                            mesh.clone(),
                            connect_timeout,
                            retry_interval,
                        )));
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
        drop(registry);
        if let Some(tx) = first_round.take() {
            // Inherited listeners of pods this proxy does not serve (they left during the
            // hand-over) close now; those of pods not found yet wait for the next round.
            let local: std::collections::HashSet<&str> = st
                .workloads
                .values()
                .filter(|w| w.node == node && w.meshed)
                .map(|w| w.uid.as_str())
                .collect();
            inherited.retain(|i| {
                let keep = i.meta.pod.as_deref().is_some_and(|p| local.contains(p));
                if !keep {
                    info!(pod = ?i.meta.pod, addr = %i.meta.addr, "inherited HBONE listener of a pod no longer served; closed");
                }
                keep
            });
            let _ = tx.send(());
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
    let mut stopping = super::handover::stopping();
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            // A successor accepts on this socket now (or SIGTERM): drop this copy.
            _ = super::handover::until(&mut stopping) => return,
        };
        let (tcp, peer) = match accepted {
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
        // Tracked: a draining proxy waits for its tunnels.
        super::handover::tasks().spawn(
            async move {
                let cert = match mesh.certs.get(&spec.identity).await {
                    Ok(c) => c,
                    Err(e) => {
                        refuse_handshake(Transport::H2, Refusal::NoCertificate, Some(&e));
                        return;
                    }
                };
                let acceptor = TlsAcceptor::from(cert.server_config.clone());
                let hs = async {
                    match super::hbone::ktls::handshake_io(tcp, TLS_READ_BUF).await {
                        HandshakeIo::Buffered(io) => acceptor
                            .accept(io)
                            .await
                            .map(|t| Handshaken::Buffered(tokio_rustls::TlsStream::Server(t))),
                        HandshakeIo::Corked(io) => acceptor
                            .accept(io)
                            .await
                            .map(|t| Handshaken::Corked(tokio_rustls::TlsStream::Server(t))),
                    }
                };
                let tls = match tokio::time::timeout(crate::defaults::HBONE_HANDSHAKE_TIMEOUT, hs)
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        refuse_handshake(Transport::H2, Refusal::of_tls(&e), Some(&e));
                        return;
                    }
                    Err(_) => {
                        refuse_handshake(Transport::H2, Refusal::Handshake, None);
                        return;
                    }
                };
                let Some(peer_identity) = tls
                    .common()
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| peer_identity(c).ok())
                else {
                    refuse_handshake(Transport::H2, Refusal::Untrusted, None);
                    return;
                };
                let tls = match super::hbone::ktls::finish(tls, TLS_SEND_BUF, "inbound").await {
                    Ok(t) => t,
                    Err(e) => {
                        refuse_handshake(Transport::H2, Refusal::Handshake, Some(&e));
                        return;
                    }
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
                    transport: Some(Transport::H2),
                    tunnel_limits: mesh.tunnel_limits.clone(),
                });
                let key_watch = tls.key_watch();
                server::serve(tls, conn, key_watch).await;
            }
            .instrument(span),
        );
    }
}

/// An inherited listener for pod `uid` at `addr` in namespace `netns`, if the predecessor
/// handed one over.
fn take_inherited(
    inherited: &mut Vec<super::handover::Inherited>,
    uid: &str,
    addr: SocketAddr,
    netns: (u64, u64),
) -> Option<std::net::TcpListener> {
    let i = inherited.iter().position(|i| {
        i.meta.pod.as_deref() == Some(uid) && i.meta.addr == addr && i.meta.netns == Some(netns)
    })?;
    let l = inherited.swap_remove(i).listener;
    info!(pod = %uid, %addr, "HBONE listener taken over from the previous proxy");
    Some(l)
}

/// The pod's HBONE/QUIC listener (UDP): bound as soon as the port is free — right away,
/// except after a hand-over, where the previous proxy keeps its UDP socket until its drain
/// ends (`handover`) — then served until the task is aborted.
async fn quic_listener(
    path: PathBuf,
    addr: SocketAddr,
    uid: String,
    spec: Spec,
    mesh: Arc<Mesh>,
    connect_timeout: Duration,
    retry_interval: Duration,
) {
    let mut said = false;
    let sock = loop {
        match super::hbone::quic::bind_udp_in_netns(&path, addr) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if !said {
                    info!(pod = %uid, %addr, "UDP port in use (the previous proxy drains); HBONE/QUIC listener opens when it is free");
                    said = true;
                }
                tokio::time::sleep(retry_interval.min(Duration::from_millis(250))).await;
            }
            Err(e) => {
                warn!(pod = %uid, %addr, error = %e, "cannot open the HBONE/QUIC listener");
                return;
            }
        }
    };
    super::hbone::quic::serve_pod(sock, uid, spec.identity, spec.ips, mesh, connect_timeout).await;
}
