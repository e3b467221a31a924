//! Pooled, multiplexed HTTP/2 connections for outbound tunnels, one per
//! (source identity and certificate generation, destination address, destination identity).
//! A renewed certificate gets new connections; old ones finish their streams and close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;

use crate::identity::Identity;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub src_generation: u64,
    pub dst: SocketAddr,
    pub dst_identity: Identity,
}

pub type Sender = SendRequest<Empty<Bytes>>;

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

    /// Number of pooled connections (for metrics).
    pub fn len(&self) -> usize {
        self.conns.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
