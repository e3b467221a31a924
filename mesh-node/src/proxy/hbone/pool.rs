//! Pooled, multiplexed HTTP/2 connections for outbound tunnels, one per
//! (source identity and certificate generation, source pod when the tunnel leaves from its
//! namespace, destination address, destination identity) — ztunnel's in-pod key.
//! A renewed certificate gets new connections; old ones finish their streams and close.
//! A connection that carried no tunnel for the pool's idle timeout (`--pool-idle-timeout`,
//! ztunnel's `POOL_UNUSED_RELEASE_TIMEOUT`) is retired and closed, so the connections a burst
//! opened, or those to destinations no longer used, do not stay open for ever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// What a pooled connection (HTTP/2 or QUIC) carries: its tunnels now, and in all. Both pools
/// take places on a connection and retire idle ones through it.
#[derive(Clone, Default)]
pub struct Usage {
    /// Tunnels open on it now (held by [`StreamSlot`]s); [`RETIRED`] once retired.
    streams: Arc<AtomicUsize>,
    /// Tunnels it was given in all (the idle watch compares it between looks).
    uses: Arc<AtomicU64>,
}

/// The stream count of a retired connection: no place can be taken on it any more.
const RETIRED: usize = usize::MAX;

/// One tunnel's place on a pooled connection, given back when the tunnel ends.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Usage {
    /// Takes one of `max` places, if one is free (none once retired).
    pub fn reserve(&self, max: usize) -> Option<StreamSlot> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.uses.fetch_add(1, Ordering::Relaxed);
        Some(StreamSlot(self.streams.clone()))
    }

    /// Tunnels open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    /// Retires the connection if it carries no tunnel now: from then on no place can be
    /// taken on it (the count and the check are one atomic step, so a tunnel being placed at
    /// the same moment either gets its place first, and the connection stays, or finds none
    /// and the pool dials anew). Returns whether it was retired.
    pub fn retire_if_unused(&self) -> bool {
        self.streams
            .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Waits until the connection has carried no tunnel for `timeout`, then retires it (the
    /// caller closes it). Looks every quarter of `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        let step = (timeout / 4).max(Duration::from_millis(50));
        let mut seen = self.uses.load(Ordering::Relaxed);
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(step).await;
            let uses = self.uses.load(Ordering::Relaxed);
            if uses != seen || self.streams() != 0 {
                (seen, since) = (uses, tokio::time::Instant::now());
                continue;
            }
            if since.elapsed() >= timeout && self.retire_if_unused() {
                return;
            }
        }
    }
}

/// A pooled HTTP/2 connection: opens streams; closed once its connection task ended. It
/// carries at most [`super::MAX_STREAMS`] tunnels at once (the peer's limit too: ztunnel's
/// server allows 200, ours 100): past that the pool opens another connection for the same key
/// rather than queue the tunnel in h2 until a stream ends (an idle connection may never end).
#[derive(Clone)]
pub struct Sender {
    pub h2: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Wakes the connection's task when the connection is closed to new tunnels.
    closing: Arc<tokio::sync::Notify>,
    usage: Usage,
}

/// How often a connection closed to new tunnels looks whether its last one ended.
const DRAIN_LOOK: Duration = Duration::from_millis(250);

impl Sender {
    pub fn new(h2: h2::client::SendRequest<Bytes>) -> Sender {
        Sender {
            h2,
            closed: Arc::default(),
            closing: Arc::default(),
            usage: Usage::default(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Closes the connection to new tunnels: the pool no longer places any on it, and its
    /// task closes it once the open ones ended ([`Sender::drained`]). Called when the pool
    /// forgets it, when the peer says GOAWAY, at kTLS' record limit, and by the task itself
    /// when the connection ended.
    pub fn set_closed(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.closing.notify_one();
    }

    /// Returns once the connection is closed to new tunnels ([`Sender::set_closed`]) and
    /// carries none: its task then closes it, rather than keep an unusable connection open
    /// until the idle timeout.
    pub async fn drained(&self) {
        while !self.is_closed() {
            self.closing.notified().await;
        }
        while !self.usage.retire_if_unused() && self.usage.streams() != RETIRED {
            tokio::time::sleep(DRAIN_LOOK).await;
        }
    }

    /// Takes a place for one more tunnel, if the connection has one.
    pub fn try_reserve(&self) -> Option<StreamSlot> {
        let max = (super::MAX_STREAMS as usize).min(self.h2.current_max_send_streams().max(1));
        self.usage.reserve(max)
    }

    /// Waits until the connection has carried no tunnel for `timeout`, then retires it and
    /// marks it closed (its task then closes it).
    pub async fn idle(&self, timeout: Duration) {
        self.usage.idle(timeout).await;
        self.set_closed();
    }

    /// Tunnels open on it now.
    pub fn streams(&self) -> usize {
        self.usage.streams()
    }
}

pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Sender>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// A connection without a tunnel for this long is closed (`--pool-idle-timeout`).
    idle_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(crate::defaults::POOL_IDLE_TIMEOUT)
    }
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Pool {
        Pool {
            conns: Default::default(),
            dialing: Default::default(),
            idle_timeout,
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// A live connection for `key` with room for one more tunnel (the place taken), if the
    /// pool has one. Closed connections are dropped on the way.
    pub fn ready(&self, key: &PoolKey) -> Option<(Sender, StreamSlot)> {
        let mut m = self.conns.lock().ok()?;
        let list = m.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        let found = list
            .iter()
            .find_map(|s| s.try_reserve().map(|slot| (s.clone(), slot)));
        if list.is_empty() {
            m.remove(key);
        }
        found
    }

    /// Serializes dialing per key so a burst of new connections shares one handshake.
    pub fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        match self.dialing.lock() {
            Ok(mut m) => m.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Adds a new connection for `key` (beside those that are full), and drops the closed
    /// ones of every key (those retired while idle included), so keys no longer asked for
    /// do not stay in the pool.
    pub fn insert(&self, key: PoolKey, sender: Sender) {
        if let Ok(mut m) = self.conns.lock() {
            m.retain(|_, list| {
                list.retain(|s| !s.is_closed());
                !list.is_empty()
            });
            m.entry(key).or_default().push(sender);
        }
    }

    /// Forgets every pooled connection (admin `POST /pool/forget`): the next tunnel to any
    /// destination dials afresh; open tunnels finish on their connection, which closes once
    /// its last stream ends. Returns how many connections were pooled.
    pub fn forget_all(&self) -> usize {
        let Ok(mut m) = self.conns.lock() else {
            return 0;
        };
        let mut n = 0;
        for s in m.drain().flat_map(|(_, list)| list) {
            if !s.is_closed() {
                n += 1;
            }
            s.set_closed();
        }
        n
    }

    /// Number of pooled connections that are not closed (for metrics).
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .map(|m| m.values().flatten().filter(|s| !s.is_closed()).count())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
