//! Local pods' network namespaces, kept by the inbound side (which opens and closes their
//! HBONE listeners), for two uses:
//! - the last leg: the proxy's connection to a meshed pod of this node, made so the pod sees
//!   the client pod's address as its peer (ztunnel in-pod mode's "original source"), when the
//!   pod's namespace is set up for it (`kernel::inpod`); a connection to any other pod, or one
//!   whose client address cannot be used, is made from the node's address;
//! - the first leg of a tunnel: HBONE connections leave from inside the *source* pod's
//!   namespace, from its address ([`Pods::source`]), as ztunnel's in-pod mode dials them.

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
use crate::proxy::socket::{PodNetns as Netns, connect_marked};

/// A local pod's network namespace, and its set-up for client addresses if made.
struct PodNetns {
    file: Arc<File>,
    path: PathBuf,
    prepared: Option<Prepared>,
}

/// The local pods' namespaces.
pub struct Pods {
    /// `--keep-client-address`: off, every connection to a pod comes from the node's address.
    keep_client_address: bool,
    /// `--tunnel-from-pod`: off, tunnels leave from the node's address.
    tunnel_from_pod: bool,
    /// Where `/proc/sys/net` is writable (`--proc-sys-net`).
    proc_sys_net: PathBuf,
    by_uid: RwLock<HashMap<String, Arc<PodNetns>>>,
}

impl Default for Pods {
    fn default() -> Self {
        Pods::new(false, false, PathBuf::from(crate::defaults::PROC_SYS_NET))
    }
}

impl Pods {
    pub fn new(keep_client_address: bool, tunnel_from_pod: bool, proc_sys_net: PathBuf) -> Self {
        Pods {
            keep_client_address,
            tunnel_from_pod,
            proc_sys_net,
            by_uid: Default::default(),
        }
    }

    /// Keeps the namespace at `path` of pod `uid` (the inbound side opened its listener) and
    /// sets it up for client addresses. On a set-up failure the pod is still served, from the
    /// node's address, and the error says why.
    pub async fn open(&self, uid: &str, path: &Path) -> Result<(), inpod::InPodError> {
        if !self.keep_client_address && !self.tunnel_from_pod {
            return Ok(());
        }
        let file = File::open(path).map_err(|source| inpod::InPodError::Netns {
            path: path.to_path_buf(),
            source,
        })?;
        let mut ns = PodNetns {
            file: Arc::new(file),
            path: path.to_path_buf(),
            prepared: None,
        };
        let mut result = Ok(());
        if self.keep_client_address {
            let (p, sys) = (path.to_path_buf(), self.proc_sys_net.clone());
            match tokio::task::spawn_blocking(move || inpod::prepare(&p, &sys)).await {
                Ok(Ok(prepared)) => {
                    info!(pod = %uid, ipv6 = prepared.ipv6, "pod set up to see clients' addresses");
                    ns.prepared = Some(prepared);
                }
                Ok(Err(e)) => result = Err(e),
                Err(e) => result = Err(inpod::InPodError::Io(std::io::Error::other(e.to_string()))),
            }
        }
        if let Ok(mut m) = self.by_uid.write() {
            m.insert(uid.to_string(), Arc::new(ns));
        }
        result
    }

    /// The pod left the mesh (or its listener is reopened): undo its set-up, if its
    /// namespace still exists.
    pub async fn close(&self, uid: &str) {
        let Some(ns) = self.by_uid.write().ok().and_then(|mut m| m.remove(uid)) else {
            return;
        };
        let Some(prepared) = ns.prepared.clone() else {
            return;
        };
        let uid = uid.to_string();
        let done = tokio::task::spawn_blocking(move || {
            // The namespace file is gone with the pod: nothing to undo.
            if !ns.path.exists() {
                return Ok(());
            }
            inpod::release(&ns.path, &prepared)
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

    /// The namespace a tunnel from local pod `uid` leaves from (`None`: `--tunnel-from-pod`
    /// is off, or the pod's namespace is not known here: the node's address is used).
    pub fn source(&self, uid: &str) -> Option<Netns> {
        if !self.tunnel_from_pod {
            return None;
        }
        let ns = self.get(uid)?;
        Some(Netns {
            uid: uid.to_string(),
            file: ns.file.clone(),
        })
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
    if let Some(ns) = pods.get(pod).filter(|ns| usable && ns.prepared.is_some()) {
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
