//! Pooled, multiplexed HTTP/2 connections for outbound tunnels, one per
//! (source identity and certificate generation, source pod when the tunnel leaves from its
//! namespace, destination address, destination identity) — ztunnel's in-pod key.
//! A renewed certificate gets new connections; old ones finish their streams and close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::identity::Identity;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub src_generation: u64,
    /// The uid of the pod whose namespace (and address) the connection leaves from; `None`:
    /// the proxy's own.
    pub src_pod: Option<String>,
    pub dst: SocketAddr,
    pub dst_identity: Identity,
}

/// A pooled HTTP/2 connection: opens streams; closed once its connection task ended.
#[derive(Clone)]
pub struct Sender {
    pub h2: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Sender {
    pub fn new(h2: h2::client::SendRequest<Bytes>) -> Sender {
        Sender {
            h2,
            closed: Arc::default(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Called by the connection's task when it ends.
    pub fn set_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Sender>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    /// A live connection for `key`, if the pool has one.
    pub fn ready(&self, key: &PoolKey) -> Option<Sender> {
        let mut m = self.conns.lock().ok()?;
        match m.get(key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    /// Serializes dialing per key so a burst of new connections shares one handshake.
    pub fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        match self.dialing.lock() {
            Ok(mut m) => m.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    pub fn insert(&self, key: PoolKey, sender: Sender) {
        if let Ok(mut m) = self.conns.lock() {
            m.insert(key, sender);
        }
    }

    /// Forgets every pooled connection (admin `POST /pool/forget`): the next tunnel to any
    /// destination dials afresh; open tunnels finish on their connection, which closes once
    /// its last stream ends. Returns how many were pooled.
    pub fn forget_all(&self) -> usize {
        self.conns
            .lock()
            .map(|mut m| m.drain().count())
            .unwrap_or(0)
    }

    /// Number of pooled connections (for metrics).
    pub fn len(&self) -> usize {
        self.conns.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
