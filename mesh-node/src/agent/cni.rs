//! The agent's side of the CNI plugin's socket (docs/cni.md): `--cni-socket` turns it on.
//!
//! A task accepts connections and reads one request each; the request goes to the agent's
//! reconcile loop (which owns the enroller and the kernel maps), which answers it there, so a
//! CNI enrollment and a reconcile never race. The decision is the reconcile's own: the pod is
//! enrolled when the agent's current state (config folder or controller stream) lists it as a
//! meshed pod of this node (namespace labelled, pod not opted out, not host network), with the
//! namespace path the plugin sent. A pod the state does not have yet (or has with another UID)
//! is parked and looked at again after every reconcile, for up to `--cni-wait`; then the agent
//! answers `unknown` and the reconcile stays the backstop.
//!
//! With a Kubernetes client (`--pod-status`), a parked pod is also looked up in the API: its
//! Pod and Namespace, with the address from the CNI result, go through the same conversion and
//! rule as the state's (`convert_json`, `Candidate::from_snapshot`). On Kubernetes the
//! controller's state has a pod only once it has an address, after `ADD`, so this is what
//! enrolls a new pod there; the enroller keeps such an enrollment until the state catches up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use super::enroll::{Candidate, Enroller};
use crate::cni::protocol::{self, Command, Outcome, Reply, Request};
use crate::kernel::maps::NodeMaps;
use crate::model::{ObjKey, Origin, Snapshot};
use crate::state::NodeState;

/// `--cni-socket` / `--cni-wait`.
#[derive(Clone, Debug)]
pub struct CniSettings {
    pub socket: PathBuf,
    /// How long a pod the state does not know yet is waited for.
    pub wait: Duration,
}

/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often parked requests are looked at between reconciles (for their deadline).
const PARK_TICK: Duration = Duration::from_millis(100);

pub struct Pending {
    req: Request,
    reply: oneshot::Sender<Reply>,
}

/// This node's pods in the agent's current state: meshed ones as the reconcile's candidates.
#[derive(Default)]
pub struct Known {
    /// pod → (UID if known, the candidate when it is meshed).
    pods: BTreeMap<ObjKey, (Option<String>, Option<Candidate>)>,
}

impl Known {
    /// From a config-folder snapshot (the same rule as `Candidate::from_snapshot`).
    pub fn from_snapshot(snap: &Snapshot, node: &str, candidates: &[Candidate]) -> Known {
        let mut pods: BTreeMap<_, _> = snap
            .pods
            .values()
            .filter(|p| p.node.as_deref() == Some(node))
            .map(|p| (p.key.clone(), (p.uid.clone(), None)))
            .collect();
        for c in candidates {
            pods.insert(c.key.clone(), (c.pod_uid.clone(), Some(c.clone())));
        }
        Known { pods }
    }

    /// From the controller's state (meshed pods without an address are not candidates of
    /// the reconcile either: they count as not known yet).
    pub fn from_state(st: &NodeState, node: &str, candidates: &[Candidate]) -> Known {
        let mut pods: BTreeMap<_, _> = st
            .workloads
            .values()
            .filter(|w| w.node == node && !w.meshed)
            .map(|w| {
                let key = ObjKey {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                };
                (
                    key,
                    ((!w.pod_uid.is_empty()).then(|| w.pod_uid.clone()), None),
                )
            })
            .collect();
        for c in candidates {
            pods.insert(c.key.clone(), (c.pod_uid.clone(), Some(c.clone())));
        }
        Known { pods }
    }
}

/// A finished API lookup: container id → the candidate (meshed), `None` (not meshed), or why
/// it could not be decided.
type Lookup = (String, Result<Option<Candidate>, String>);

/// The loop's handle on the socket: requests in, parked ones with their deadline.
pub struct Front {
    rx: Option<mpsc::Receiver<Pending>>,
    kube: Option<kube::Client>,
    node: String,
    lookups_tx: mpsc::Sender<Lookup>,
    lookups_rx: mpsc::Receiver<Lookup>,
    /// Container ids with a lookup in flight.
    looking: std::collections::BTreeSet<String>,
    parked: Vec<(Pending, Instant)>,
    wait: Duration,
    tick: tokio::time::Interval,
    /// container id → pod, for a DEL that carries no pod name.
    containers: BTreeMap<String, ObjKey>,
}

/// What woke the loop.
pub enum Event {
    Request(Pending),
    Lookup(Lookup),
    Tick,
}

impl Front {
    /// Starts listening when `settings` is given; otherwise a front that never wakes. With
    /// `kube`, pods the state does not have are looked up in the Kubernetes API.
    pub async fn start(
        settings: Option<&CniSettings>,
        node: &str,
        kube: Option<&super::status::StatusConfig>,
    ) -> Result<Front> {
        let mut tick = tokio::time::interval(PARK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (lookups_tx, lookups_rx) = mpsc::channel(256);
        let mut f = Front {
            rx: None,
            kube: None,
            node: node.to_string(),
            lookups_tx,
            lookups_rx,
            looking: Default::default(),
            parked: Vec::new(),
            wait: Duration::ZERO,
            tick,
            containers: BTreeMap::new(),
        };
        if let Some(s) = settings {
            let listener = bind(&s.socket)?;
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(accept_loop(listener, tx));
            info!(socket = %s.socket.display(), wait = ?s.wait, "CNI socket listening");
            f.rx = Some(rx);
            f.wait = s.wait;
            if let Some(k) = kube {
                match super::status::client(k).await {
                    Ok(c) => f.kube = Some(c),
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "no Kubernetes client for CNI lookups; pods the state lacks are answered from the state only")
                    }
                }
            }
        }
        Ok(f)
    }

    /// The next request, or a tick while some are parked. Never returns without a socket.
    pub async fn next(&mut self) -> Event {
        let parked = !self.parked.is_empty();
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            r = rx.recv() => match r {
                Some(p) => Event::Request(p),
                None => std::future::pending().await,
            },
            Some(l) = self.lookups_rx.recv() => Event::Lookup(l),
            _ = self.tick.tick(), if parked => Event::Tick,
        }
    }

    /// Handles what `next` returned.
    pub fn serve(
        &mut self,
        ev: Event,
        known: &Known,
        enroller: &mut Enroller,
        maps: &mut NodeMaps,
    ) {
        match ev {
            Event::Request(p) => {
                if p.req.command == Command::Del {
                    // An ADD of the same sandbox still waiting (state or API): it is gone now.
                    let id = p.req.container_id.clone();
                    let (gone, keep) = std::mem::take(&mut self.parked)
                        .into_iter()
                        .partition(|(q, _)| q.req.container_id == id);
                    self.parked = keep;
                    for (q, _) in gone {
                        answer(
                            q,
                            Reply::new(
                                Outcome::Error,
                                "the sandbox was deleted (CNI DEL) before it could be enrolled",
                            ),
                        );
                    }
                }
                let deadline = Instant::now() + self.wait;
                self.parked.push((p, deadline));
            }
            Event::Lookup((id, res)) => {
                self.looking.remove(&id);
                if let Some(i) = self
                    .parked
                    .iter()
                    .position(|(p, _)| p.req.container_id == id)
                {
                    let (p, deadline) = self.parked.swap_remove(i);
                    let _span = info_span!("cni", pod = %format!("{}/{}", p.req.pod_namespace, p.req.pod_name), container = %id).entered();
                    match res {
                        Ok(Some(cand)) => {
                            self.containers.insert(id, cand.key.clone());
                            let reply = match enroller.enroll_now(&cand, &p.req.netns, maps) {
                                Ok(cookie) => Reply::new(
                                    Outcome::Enrolled,
                                    format!(
                                        "netns cookie {cookie} (pod read from the Kubernetes API)"
                                    ),
                                ),
                                Err(e) => {
                                    Reply::new(Outcome::Error, format!("{}: {e}", p.req.netns))
                                }
                            };
                            answer(p, reply);
                        }
                        Ok(None) => answer(
                            p,
                            Reply::new(
                                Outcome::NotMeshed,
                                "not in the mesh (from the Kubernetes API)",
                            ),
                        ),
                        Err(e) => {
                            warn!(error = %e, "Kubernetes lookup for a CNI request");
                            self.parked.push((p, deadline));
                        }
                    }
                }
            }
            Event::Tick => {}
        }
        self.recheck(known, enroller, maps);
    }

    /// Answers every parked request that can be answered now (after a reconcile: the state
    /// may have caught up), and `unknown` to those past their wait.
    pub fn recheck(&mut self, known: &Known, enroller: &mut Enroller, maps: &mut NodeMaps) {
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        let parked = std::mem::take(&mut self.parked);
        for (p, deadline) in parked {
            let _span = info_span!("cni", command = ?p.req.command, pod = %format!("{}/{}", p.req.pod_namespace, p.req.pod_name), container = %p.req.container_id).entered();
            match self.decide(&p.req, known, enroller, maps) {
                Some(reply) => answer(p, reply),
                None if now >= deadline => {
                    info!("not in the agent's state within the CNI wait: answering unknown");
                    let msg = format!(
                        "the agent's state has no pod {}/{} on this node yet",
                        p.req.pod_namespace, p.req.pod_name
                    );
                    answer(p, Reply::new(Outcome::Unknown, msg));
                }
                None => {
                    if let Some(client) = &self.kube
                        && p.req.command == Command::Add
                        && self.looking.insert(p.req.container_id.clone())
                    {
                        let (client, req, node, tx) = (
                            client.clone(),
                            p.req.clone(),
                            self.node.clone(),
                            self.lookups_tx.clone(),
                        );
                        tokio::spawn(async move {
                            let res = lookup(client, &req, &node).await;
                            let _ = tx.send((req.container_id.clone(), res)).await;
                        });
                    }
                    self.parked.push((p, deadline));
                }
            }
        }
    }

    /// The answer, or `None` to wait for the state.
    fn decide(
        &mut self,
        req: &Request,
        known: &Known,
        enroller: &mut Enroller,
        maps: &mut NodeMaps,
    ) -> Option<Reply> {
        let key = ObjKey {
            namespace: req.pod_namespace.clone(),
            name: req.pod_name.clone(),
        };
        match req.command {
            Command::Check => Some(Reply::new(Outcome::Ok, "agent ready")),
            Command::Del => {
                let key = if req.pod_name.is_empty() {
                    self.containers.get(&req.container_id).cloned()
                } else {
                    Some(key)
                };
                self.containers.remove(&req.container_id);
                let removed = key.as_ref().is_some_and(|k| enroller.release_now(k, maps));
                Some(Reply::new(
                    Outcome::Removed,
                    if removed {
                        "enrollment removed"
                    } else {
                        "was not enrolled"
                    },
                ))
            }
            Command::Add => {
                if req.pod_name.is_empty() || req.pod_namespace.is_empty() {
                    return Some(Reply::new(
                        Outcome::Error,
                        "CNI_ARGS has no K8S_POD_NAMESPACE / K8S_POD_NAME",
                    ));
                }
                let (uid, cand) = known.pods.get(&key)?;
                // Another pod of the same name (the state has not seen the new one yet).
                if !req.pod_uid.is_empty() && uid.as_deref().is_some_and(|u| u != req.pod_uid) {
                    debug!(state_uid = ?uid, "the state has an older pod of that name; waiting");
                    return None;
                }
                let Some(cand) = cand else {
                    return Some(Reply::new(
                        Outcome::NotMeshed,
                        "not in the mesh (namespace not enabled, opted out, or host network)",
                    ));
                };
                self.containers
                    .insert(req.container_id.clone(), key.clone());
                match enroller.enroll_now(cand, &req.netns, maps) {
                    Ok(cookie) => Some(Reply::new(
                        Outcome::Enrolled,
                        format!("netns cookie {cookie}"),
                    )),
                    Err(e) => {
                        warn!(error = %e, "CNI enrollment failed");
                        Some(Reply::new(Outcome::Error, format!("{}: {e}", req.netns)))
                    }
                }
            }
        }
    }
}

/// The pod of `req` as the reconcile would see it, from the Kubernetes API: its Pod and
/// Namespace with the address the network plugin gave it (the API does not have it yet), through
/// the same conversion and rule as every source. `Ok(None)`: not meshed (or not this node's).
async fn lookup(
    client: kube::Client,
    req: &Request,
    node: &str,
) -> Result<Option<Candidate>, String> {
    use k8s_openapi::api::core::v1::{Namespace as KNamespace, Pod as KPod};
    use kube::api::Api;
    let pods: Api<KPod> = Api::namespaced(client.clone(), &req.pod_namespace);
    let pod = pods
        .get(&req.pod_name)
        .await
        .map_err(|e| format!("getting Pod {}/{}: {e}", req.pod_namespace, req.pod_name))?;
    let namespaces: Api<KNamespace> = Api::all(client);
    let ns = namespaces
        .get(&req.pod_namespace)
        .await
        .map_err(|e| format!("getting Namespace {}: {e}", req.pod_namespace))?;
    // A request for another node's pod means the plugin reached the wrong agent (a CNI socket
    // shared between nodes): say so rather than answer "not meshed".
    if let Some(other) = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty() && *n != node)
    {
        return Err(format!(
            "pod {}/{} is on node {other}, this agent serves node {node} (is the CNI socket shared between nodes?)",
            req.pod_namespace, req.pod_name
        ));
    }
    let mut pv = serde_json::to_value(&pod).map_err(|e| e.to_string())?;
    let uid = pv["metadata"]["uid"].as_str().unwrap_or_default();
    if !req.pod_uid.is_empty() && uid != req.pod_uid {
        return Err(format!(
            "the API's pod {}/{} has uid {uid}, not {}",
            req.pod_namespace, req.pod_name, req.pod_uid
        ));
    }
    let Some(first) = req.ips.first() else {
        return Err("no address in the CNI result".into());
    };
    pv["status"]["podIP"] = serde_json::Value::String(first.clone());
    pv["status"]["podIPs"] = req
        .ips
        .iter()
        .map(|ip| serde_json::json!({ "ip": ip }))
        .collect();
    let nv = serde_json::to_value(&ns).map_err(|e| e.to_string())?;
    let mut snap = Snapshot::default();
    for (kind, v) in [("Namespace", &nv), ("Pod", &pv)] {
        let origin = Origin::kubernetes(format!("Kubernetes API (CNI ADD {})", req.container_id));
        match crate::config::parse::convert_json(kind, v, origin) {
            Some(Ok(o)) => snap.insert(o),
            Some(Err(e)) => {
                return Err(format!(
                    "{kind} {}/{}: {e}",
                    req.pod_namespace, req.pod_name
                ));
            }
            None => return Err(format!("{kind}: not convertible")),
        }
    }
    Ok(Candidate::from_snapshot(&snap, node).into_iter().next())
}

fn answer(p: Pending, reply: Reply) {
    info!(outcome = ?reply.outcome, message = %reply.message, "CNI answer");
    // The plugin may have given up (its timeout): nothing to do then.
    let _ = p.reply.send(reply);
}

/// Binds the socket (a stale file from an earlier agent is replaced), owner-only.
fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale socket {}", path.display()));
        }
        _ => {}
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding the CNI socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

async fn accept_loop(l: UnixListener, tx: mpsc::Sender<Pending>) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let tx = tx.clone();
                tokio::spawn(serve_conn(s, tx).instrument(info_span!("cni-conn")));
            }
            Err(e) => {
                warn!(error = %e, "accepting on the CNI socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_conn(s: UnixStream, tx: mpsc::Sender<Pending>) {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(tokio::io::AsyncReadExt::take(r, protocol::MAX_LINE as u64));
    let reply = match tokio::time::timeout(READ_TIMEOUT, r.read_line(&mut line)).await {
        Err(_) => Reply::new(Outcome::Error, "no request line within 5 s"),
        Ok(Err(e)) => Reply::new(Outcome::Error, format!("reading the request: {e}")),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::new(Outcome::Error, format!("unreadable request: {e}")),
            Ok(req) if req.version != protocol::VERSION => Reply::new(
                Outcome::Error,
                format!(
                    "protocol version {} not supported (this agent speaks {})",
                    req.version,
                    protocol::VERSION
                ),
            ),
            Ok(req) => {
                let (reply, rx) = oneshot::channel();
                if tx.send(Pending { req, reply }).await.is_err() {
                    Reply::new(Outcome::Error, "the agent is stopping")
                } else {
                    rx.await.unwrap_or_else(|_| {
                        Reply::new(Outcome::Error, "the agent dropped the request")
                    })
                }
            }
        },
    };
    let mut out = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"outcome":"error"}"#.into());
    out.push('\n');
    if let Err(e) = w.write_all(out.as_bytes()).await {
        debug!(error = %e, "writing the CNI answer (the plugin gave up?)");
    }
}
