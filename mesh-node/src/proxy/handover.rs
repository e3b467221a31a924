//! Hitless upgrade of the node proxy (docs/operations.md): a new proxy started beside the
//! running one with `--takeover` takes over its listening sockets, and the old one drains.
//!
//! The running proxy serves a hand-over socket (`--handover-socket`, a Unix `SOCK_SEQPACKET`
//! socket). The exchange, one message per step (JSON; a listener travels with its descriptor
//! by `SCM_RIGHTS`, `kernel::fdpass`):
//!
//! 1. new → old: `hello` (protocol version, pid).
//! 2. old → new: `offer` (count), then one `listener` per listening socket: the outbound
//!    listeners (15001, IPv4 and IPv6), the admin API, the metrics endpoint, and every pod's
//!    HBONE TCP listener (15008 inside the pod's namespace: pod uid, address, namespace id).
//!    From here the old proxy opens and closes no pod listener (the registry is locked), so a
//!    pod enrolled or removed meanwhile is seen by the new one, which follows the same state.
//! 3. The new proxy accepts on every inherited socket (pod listeners mapped to its pods by
//!    uid, address and namespace), then says `accepting`. Both processes accept on the same
//!    sockets for that moment: the kernel's accept queue is never left unserved.
//! 4. old: stops accepting (its copies of the sockets are closed; the new one's keep them
//!    open), sends HTTP/2 GOAWAY on its inbound tunnels so peers open new ones (to the new
//!    proxy), answers `done`, and drains its open connections for at most `--drain-timeout`.
//!
//! If the new proxy goes away before `accepting`, the old one keeps serving as before.
//! HBONE over QUIC (UDP 15008) is not handed over: a UDP socket shared by two processes would
//! deliver one process's packets to the other, whose QUIC stack would answer them with
//! stateless resets. The old proxy keeps its UDP sockets, and its QUIC connections, until its
//! drain ends, then closes them (CONNECTION_CLOSE); the new proxy binds UDP 15008 as soon as
//! the port is free (every `retry_interval`). Meanwhile new QUIC tunnels to this node's pods
//! are served by the old proxy; right after, a client whose QUIC dial goes unanswered falls
//! back to HTTP/2 (`QUIC_FALLBACK_TIMEOUT`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::kernel::fdpass;

/// Version of the exchange; both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message of the exchange.
const MAX_MESSAGE: usize = 16 * 1024;
/// How long either side waits for the other's next message, except `accepting`.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old proxy waits for `accepting` (the new one opens its pods' listeners and
/// sets their namespaces up first).
const ACCEPTING_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hand-over with pid {pid}: {source}")]
    Io { pid: u32, source: io::Error },
    #[error("hand-over: the other proxy closed the hand-over socket during {step}")]
    Closed { step: &'static str },
    #[error("hand-over: bad message during {step}: {reason}")]
    BadMessage { step: &'static str, reason: String },
    #[error("hand-over: protocol version {theirs}, this proxy speaks {PROTOCOL_VERSION}")]
    Version { theirs: u32 },
    #[error("hand-over: listener {meta:?}: {reason}")]
    BadListener { meta: Meta, reason: String },
    #[error("hand-over: the other proxy refused: {0}")]
    Refused(String),
    #[error("hand-over task failed: {0}")]
    Task(String),
}

/// What a handed-over socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Captured connections (`proxy-ip:15001`, `[proxy-ip6]:15001`).
    Outbound,
    /// The admin API (`--admin`).
    Admin,
    /// The Prometheus endpoint (`--metrics`).
    Metrics,
    /// A pod's HBONE TCP listener (`podIP:15008` in the pod's network namespace).
    Hbone,
}

/// Which socket a descriptor is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// `Hbone`: the pod's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `Hbone`: the pod's network namespace (device, inode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Msg {
    Hello {
        version: u32,
        pid: u32,
        /// The node the new proxy serves: only a proxy of the same node hands over.
        node: String,
    },
    Offer {
        version: u32,
        pid: u32,
        count: usize,
    },
    Listener(Meta),
    Accepting,
    Done,
    Refused {
        reason: String,
    },
}

/// The listening sockets this proxy serves, as duplicates handed out on a hand-over.
#[derive(Default)]
pub struct Registry {
    listeners: Vec<(Meta, OwnedFd)>,
    closed: bool,
}

impl Registry {
    /// Records a listener (a duplicate of its descriptor).
    pub fn add(&mut self, meta: Meta, fd: impl AsFd) -> io::Result<()> {
        let dup = fd.as_fd().try_clone_to_owned()?;
        self.listeners.push((meta, dup));
        Ok(())
    }

    /// Forgets (closes) a pod's listeners: the pod left or its listener is reopened.
    pub fn remove_pod(&mut self, uid: &str) {
        self.listeners
            .retain(|(m, _)| !(m.kind == Kind::Hbone && m.pod.as_deref() == Some(uid)));
    }

    /// The proxy stopped accepting (its listeners went to a successor, or SIGTERM): open no
    /// new ones.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Stops accepting for good: the duplicates close, so a listener nobody else holds closes
    /// (new connections are refused instead of waiting in a queue no one serves).
    pub fn close(&mut self) {
        self.closed = true;
        self.listeners.clear();
    }
}

struct Global {
    registry: tokio::sync::Mutex<Registry>,
    /// Stop accepting, and ask peers to move on (GOAWAY): a successor took over, or SIGTERM.
    stop: watch::Sender<bool>,
    /// A successor took the listening sockets over (the admin API and metrics stop then;
    /// on SIGTERM they serve through the drain).
    given: watch::Sender<bool>,
    /// The drain is over: close what is left (QUIC endpoints).
    closing: watch::Sender<bool>,
    /// Every connection the proxy carries (outbound connections, inbound tunnels): the drain
    /// waits for them.
    tasks: TaskTracker,
}

static GLOBAL: LazyLock<Global> = LazyLock::new(|| Global {
    registry: Default::default(),
    stop: watch::channel(false).0,
    given: watch::channel(false).0,
    closing: watch::channel(false).0,
    tasks: TaskTracker::new(),
});

/// The listener registry; hold it while opening or closing listeners so that a hand-over sees
/// a consistent set.
pub async fn registry() -> tokio::sync::MutexGuard<'static, Registry> {
    GLOBAL.registry.lock().await
}

/// Becomes `true` when the proxy stops accepting (hand-over done, or SIGTERM).
pub fn stopping() -> watch::Receiver<bool> {
    GLOBAL.stop.subscribe()
}

/// Stop accepting everywhere and send GOAWAY on inbound tunnels (idempotent).
pub fn stop() {
    GLOBAL.stop.send_replace(true);
}

/// Waits until `rx` (one of the signals here) is `true`.
pub async fn until(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            // The senders are static: never dropped.
            return std::future::pending().await;
        }
    }
}

/// Becomes `true` when a successor took the listening sockets over.
pub fn handed_over() -> watch::Receiver<bool> {
    GLOBAL.given.subscribe()
}

/// Becomes `true` when the drain is over.
pub fn closing() -> watch::Receiver<bool> {
    GLOBAL.closing.subscribe()
}

/// The drain is over: close what is left.
pub fn close() {
    GLOBAL.closing.send_replace(true);
}

/// The tracker of the proxy's connections.
pub fn tasks() -> &'static TaskTracker {
    &GLOBAL.tasks
}

fn send(sock: &Socket, pid: u32, msg: &Msg, fd: Option<&OwnedFd>) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| HandoverError::BadMessage {
        step: "encoding",
        reason: e.to_string(),
    })?;
    fdpass::send(sock.as_fd(), &bytes, fd.map(|f| f.as_fd()))
        .map_err(|source| HandoverError::Io { pid, source })
}

fn recv(
    sock: &Socket,
    pid: u32,
    step: &'static str,
) -> Result<(Msg, Option<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fd) = fdpass::recv(sock.as_fd(), &mut buf).map_err(|source| {
        if source.kind() == io::ErrorKind::WouldBlock {
            HandoverError::Io {
                pid,
                source: io::Error::new(io::ErrorKind::TimedOut, format!("no answer during {step}")),
            }
        } else {
            HandoverError::Io { pid, source }
        }
    })?;
    if n == 0 {
        return Err(HandoverError::Closed { step });
    }
    let msg = serde_json::from_slice(&buf[..n]).map_err(|e| HandoverError::BadMessage {
        step,
        reason: e.to_string(),
    })?;
    Ok((msg, fd))
}

/// Listening sockets inherited from the predecessor, before they are put to use.
pub struct Taken {
    sock: Socket,
    pid: u32,
    listeners: Vec<(Meta, OwnedFd)>,
}

impl Taken {
    /// The predecessor's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The inherited listener of `kind` at `addr`, if any.
    pub fn take(&mut self, kind: Kind, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self
            .listeners
            .iter()
            .position(|(m, _)| m.kind == kind && m.addr == addr)?;
        let (_, fd) = self.listeners.swap_remove(i);
        Some(std::net::TcpListener::from(fd))
    }

    /// The pods' HBONE listeners (for the inbound side).
    pub fn take_pods(&mut self) -> Vec<Inherited> {
        let (pods, rest) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|(m, _)| m.kind == Kind::Hbone);
        self.listeners = rest;
        pods.into_iter()
            .map(|(meta, fd)| Inherited {
                meta,
                listener: std::net::TcpListener::from(fd),
            })
            .collect()
    }

    /// Tells the predecessor this proxy accepts on every inherited socket, and waits for it to
    /// stop accepting. Sockets not taken (a listener this proxy no longer has, e.g. an
    /// `--admin` address changed) are closed.
    pub async fn finish(self) -> Result<(), HandoverError> {
        for (m, _) in &self.listeners {
            warn!(kind = ?m.kind, addr = %m.addr, "inherited listener not used by this proxy; closing it");
        }
        let Taken { sock, pid, .. } = self;
        tokio::task::spawn_blocking(move || {
            send(&sock, pid, &Msg::Accepting, None)?;
            match recv(&sock, pid, "done")? {
                (Msg::Done, _) => Ok(()),
                (Msg::Refused { reason }, _) => Err(HandoverError::Refused(reason)),
                (other, _) => Err(HandoverError::BadMessage {
                    step: "done",
                    reason: format!("unexpected {other:?}"),
                }),
            }
        })
        .await
        .map_err(|e| HandoverError::Task(e.to_string()))?
    }
}

/// A pod's HBONE listener inherited from the predecessor.
pub struct Inherited {
    pub meta: Meta,
    pub listener: std::net::TcpListener,
}

/// Takes over the listeners of the proxy serving `path`. `None`: no proxy serves it (no
/// socket, or nobody listening on it): start afresh.
pub async fn take_over(path: &Path, node: &str) -> Result<Option<Taken>, HandoverError> {
    let (path, node) = (path.to_path_buf(), node.to_string());
    tokio::task::spawn_blocking(move || take_over_blocking(&path, node))
        .await
        .map_err(|e| HandoverError::Task(e.to_string()))?
}

fn take_over_blocking(path: &Path, node: String) -> Result<Option<Taken>, HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(err)?;
    let addr = SockAddr::unix(path).map_err(err)?;
    match sock.connect(&addr) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            info!(socket = %path.display(), "no running proxy to take over from; starting afresh");
            return Ok(None);
        }
        Err(e) => return Err(err(e)),
    }
    sock.set_read_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
    sock.set_write_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
    send(
        &sock,
        0,
        &Msg::Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            node,
        },
        None,
    )?;
    let (pid, count) = match recv(&sock, 0, "offer")? {
        (
            Msg::Offer {
                version,
                pid,
                count,
            },
            _,
        ) => {
            if version != PROTOCOL_VERSION {
                return Err(HandoverError::Version { theirs: version });
            }
            (pid, count)
        }
        (Msg::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
        (other, _) => {
            return Err(HandoverError::BadMessage {
                step: "offer",
                reason: format!("unexpected {other:?}"),
            });
        }
    };
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        match recv(&sock, pid, "listeners")? {
            (Msg::Listener(meta), Some(fd)) => {
                check_listener(&meta, &fd)?;
                listeners.push((meta, fd));
            }
            (Msg::Listener(meta), None) => {
                return Err(HandoverError::BadListener {
                    meta,
                    reason: "no descriptor came with it".into(),
                });
            }
            (other, _) => {
                return Err(HandoverError::BadMessage {
                    step: "listeners",
                    reason: format!("unexpected {other:?}"),
                });
            }
        }
    }
    // The old proxy may wait for the new one's pods to be set up.
    sock.set_read_timeout(Some(ACCEPTING_TIMEOUT + STEP_TIMEOUT))
        .map_err(err)?;
    info!(
        from_pid = pid,
        listeners = listeners.len(),
        "listening sockets received"
    );
    Ok(Some(Taken {
        sock,
        pid,
        listeners,
    }))
}

/// A handed-over descriptor must be a listening TCP socket at the address its metadata says.
fn check_listener(meta: &Meta, fd: &OwnedFd) -> Result<(), HandoverError> {
    let bad = |reason: String| HandoverError::BadListener {
        meta: meta.clone(),
        reason,
    };
    let s = socket2::SockRef::from(fd);
    match s.r#type() {
        Ok(t) if t == Type::STREAM => {}
        Ok(t) => return Err(bad(format!("socket type {t:?}, expected a TCP socket"))),
        Err(e) => return Err(bad(format!("not a socket: {e}"))),
    }
    if !s.is_listener().map_err(|e| bad(e.to_string()))? {
        return Err(bad("not listening".into()));
    }
    let local = s
        .local_addr()
        .map_err(|e| bad(e.to_string()))?
        .as_socket()
        .ok_or_else(|| bad("not an IP socket".into()))?;
    if local != meta.addr {
        return Err(bad(format!("bound to {local}")));
    }
    s.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// How long a pod's "retired" marker is kept (its pod is long gone by then).
const RETIRED_KEEP: Duration = Duration::from_secs(24 * 3600);

/// The marker saying the proxy of pod `uid` handed its sockets over: in Kubernetes the old
/// pod's container, restarted by the kubelet after its proxy drained and exited (before the
/// pod is deleted), must not take the sockets back from the new pod.
pub fn retired_marker(socket: &Path, uid: &str) -> PathBuf {
    let name = format!("retired-{}", uid.replace(['/', '.'], "_"));
    socket.with_file_name(name)
}

/// Removes markers of pods long gone.
fn prune_retired(socket: &Path) {
    let Some(dir) = socket.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > RETIRED_KEEP);
        if old && e.file_name().to_string_lossy().starts_with("retired-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Serves the hand-over socket at `path` (replacing a file there: the predecessor's socket,
/// or a stale one), on a thread of its own, until a successor took over. `pod_uid`: this
/// proxy's pod (Kubernetes), marked retired when it hands over.
pub fn serve(path: &Path, node: &str, pod_uid: Option<String>) -> Result<(), HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(err)?;
    sock.bind(&SockAddr::unix(path).map_err(err)?)
        .map_err(err)?;
    // Only root (the proxy's user) may hand the sockets over.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    sock.listen(4).map_err(err)?;
    prune_retired(path);
    let rt = tokio::runtime::Handle::current();
    let shown = path.display().to_string();
    let marker = pod_uid.map(|uid| retired_marker(path, &uid));
    let node = node.to_string();
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            info!(socket = %shown, "hand-over socket ready");
            loop {
                let conn = match sock.accept() {
                    Ok((c, _)) => c,
                    Err(e) => {
                        warn!(error = %e, "hand-over socket: accept failed");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                match rt.block_on(hand_over(conn, &node)) {
                    Ok(pid) => {
                        info!(to_pid = pid, "listening sockets handed over; draining");
                        if let Some(m) = &marker
                            && let Err(e) = std::fs::write(m, format!("{pid}\n"))
                        {
                            warn!(marker = %m.display(), error = %e, "cannot mark this pod's proxy retired");
                        }
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "hand-over failed; this proxy keeps serving");
                    }
                }
            }
        })
        .map_err(err)?;
    Ok(())
}

/// One hand-over, old side. Runs on the hand-over thread (blocking socket calls are fine).
async fn hand_over(sock: Socket, node: &str) -> Result<u32, HandoverError> {
    let io = |source| HandoverError::Io { pid: 0, source };
    sock.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    sock.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    let pid = match recv(&sock, 0, "hello")? {
        (
            Msg::Hello {
                version,
                pid,
                node: theirs,
            },
            _,
        ) => {
            if version != PROTOCOL_VERSION {
                let reason = format!("protocol version {version}, expected {PROTOCOL_VERSION}");
                let _ = send(&sock, pid, &Msg::Refused { reason }, None);
                return Err(HandoverError::Version { theirs: version });
            }
            if theirs != node {
                let reason = format!("this proxy serves node {node:?}, not {theirs:?}");
                let _ = send(
                    &sock,
                    pid,
                    &Msg::Refused {
                        reason: reason.clone(),
                    },
                    None,
                );
                return Err(HandoverError::Refused(reason));
            }
            pid
        }
        (other, _) => {
            return Err(HandoverError::BadMessage {
                step: "hello",
                reason: format!("unexpected {other:?}"),
            });
        }
    };
    info!(to_pid = pid, "a new proxy asks for the listening sockets");
    // Held until the end: no listener is opened or closed meanwhile.
    let mut reg = registry().await;
    if reg.closed || *GLOBAL.stop.borrow() {
        let reason = "this proxy is already draining".to_string();
        let _ = send(
            &sock,
            pid,
            &Msg::Refused {
                reason: reason.clone(),
            },
            None,
        );
        return Err(HandoverError::Refused(reason));
    }
    send(
        &sock,
        pid,
        &Msg::Offer {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            count: reg.listeners.len(),
        },
        None,
    )?;
    for (meta, fd) in &reg.listeners {
        send(&sock, pid, &Msg::Listener(meta.clone()), Some(fd))?;
    }
    sock.set_read_timeout(Some(ACCEPTING_TIMEOUT)).map_err(io)?;
    match recv(&sock, pid, "accepting")? {
        (Msg::Accepting, _) => {}
        (other, _) => {
            return Err(HandoverError::BadMessage {
                step: "accepting",
                reason: format!("unexpected {other:?}"),
            });
        }
    }
    // The successor accepts on every socket: stop accepting here. Our duplicates close; the
    // sockets stay open in the successor.
    reg.close();
    GLOBAL.given.send_replace(true);
    stop();
    drop(reg);
    send(&sock, pid, &Msg::Done, None)?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_written() {
        let m = Msg::Listener(Meta {
            kind: Kind::Hbone,
            addr: "10.0.0.5:15008".parse().expect("test"),
            pod: Some("uid-1".into()),
            netns: Some((4, 4026532000)),
        });
        let text = serde_json::to_string(&m).expect("test");
        assert_eq!(
            text,
            r#"{"msg":"listener","kind":"hbone","addr":"10.0.0.5:15008","pod":"uid-1","netns":[4,4026532000]}"#
        );
        match serde_json::from_str::<Msg>(&text).expect("test") {
            Msg::Listener(back) => assert_eq!(back.pod.as_deref(), Some("uid-1")),
            other => panic!("read back as {other:?}"),
        }
    }

    #[test]
    fn a_descriptor_that_is_not_the_listener_named_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("test");
        let addr = l.local_addr().expect("test");
        let fd = OwnedFd::from(l);
        let good = Meta {
            kind: Kind::Outbound,
            addr,
            pod: None,
            netns: None,
        };
        check_listener(&good, &fd).expect("test");
        let wrong = Meta {
            addr: "127.0.0.1:1".parse().expect("test"),
            ..good.clone()
        };
        assert!(check_listener(&wrong, &fd).is_err());
        let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").expect("test"));
        assert!(check_listener(&good, &udp).is_err());
    }
}
