//! The last leg: the proxy's connection to a meshed pod of this node, made so the pod sees the
//! client pod's address as its peer (ztunnel in-pod mode's "original source"). The pods whose
//! network namespace is set up for it (`kernel::inpod`) are kept here by the inbound side,
//! which opens and closes their HBONE listeners; a connection to any other pod, or one whose
//! client address cannot be used, is made from the node's address as before.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::kernel::inpod::{self, Prepared};
use crate::proxy::socket::connect_marked;

/// A local pod's network namespace, set up for client addresses.
struct PodNetns {
    file: File,
    path: PathBuf,
    prepared: Prepared,
}

/// The local pods the proxy connects to from their clients' addresses.
pub struct Pods {
    /// `--keep-client-address`: off, every connection comes from the node's address.
    enabled: bool,
    /// Where `/proc/sys/net` is writable (`--proc-sys-net`).
    proc_sys_net: PathBuf,
    by_uid: RwLock<HashMap<String, Arc<PodNetns>>>,
}

impl Default for Pods {
    fn default() -> Self {
        Pods::new(false, PathBuf::from(crate::defaults::PROC_SYS_NET))
    }
}

impl Pods {
    pub fn new(enabled: bool, proc_sys_net: PathBuf) -> Self {
        Pods {
            enabled,
            proc_sys_net,
            by_uid: Default::default(),
        }
    }

    /// Sets up the namespace at `path` of pod `uid` (the inbound side opened its listener).
    /// On failure the pod is still served, from the node's address, and the error says why.
    pub async fn open(&self, uid: &str, path: &Path) -> Result<(), inpod::InPodError> {
        if !self.enabled {
            return Ok(());
        }
        let file = File::open(path).map_err(|source| inpod::InPodError::Netns {
            path: path.to_path_buf(),
            source,
        })?;
        let (p, sys) = (path.to_path_buf(), self.proc_sys_net.clone());
        let prepared = tokio::task::spawn_blocking(move || inpod::prepare(&p, &sys))
            .await
            .map_err(|e| inpod::InPodError::Io(std::io::Error::other(e.to_string())))??;
        info!(pod = %uid, ipv6 = prepared.ipv6, "pod set up to see clients' addresses");
        let ns = Arc::new(PodNetns {
            file,
            path: path.to_path_buf(),
            prepared,
        });
        if let Ok(mut m) = self.by_uid.write() {
            m.insert(uid.to_string(), ns);
        }
        Ok(())
    }

    /// The pod left the mesh (or its listener is reopened): undo its set-up, if its
    /// namespace still exists.
    pub async fn close(&self, uid: &str) {
        let Some(ns) = self.by_uid.write().ok().and_then(|mut m| m.remove(uid)) else {
            return;
        };
        let uid = uid.to_string();
        let done = tokio::task::spawn_blocking(move || {
            // The namespace file is gone with the pod: nothing to undo.
            if !ns.path.exists() {
                return Ok(());
            }
            inpod::release(&ns.path, &ns.prepared)
        })
        .await;
        match done {
            Ok(Ok(())) => debug!(pod = %uid, "client-address set-up removed"),
            Ok(Err(e)) => {
                warn!(pod = %uid, error = %e, "could not remove the client-address set-up")
            }
            Err(e) => warn!(pod = %uid, error = %e, "client-address clean-up task failed"),
        }
    }

    fn get(&self, uid: &str) -> Option<Arc<PodNetns>> {
        self.by_uid.read().ok()?.get(uid).cloned()
    }
}

/// Connects to `target` of local pod `pod` for a client at `client_ip`: from that address,
/// inside the pod's namespace, when the pod is set up for it and the families match; else
/// (and if the transparent socket cannot be made) from the node's address.
pub async fn connect(
    pods: &Pods,
    pod: &str,
    target: SocketAddr,
    client_ip: IpAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let usable = client_ip.is_ipv4() == target.is_ipv4()
        && !client_ip.is_loopback()
        && !client_ip.is_unspecified();
    if let Some(ns) = pods.get(pod).filter(|_| usable) {
        match inpod::transparent_socket(&ns.file, client_ip) {
            Ok(s) => {
                let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(OwnedFd::from(s)));
                return match tokio::time::timeout(timeout, sock.connect(target)).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )),
                };
            }
            Err(e) => {
                warn!(%pod, client = %client_ip, error = %e, "cannot connect from the client's address; using the node's");
            }
        }
    }
    connect_marked(target, timeout).await
}
