//! One captured connection: original destination → source workload → connect → copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_common::name_str;
use mesh_common::ports::PROXY_MARK;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{Instrument, info, info_span, warn};

use super::Shared;
use crate::kernel::maps::orig_dst_addr;

pub async fn handle(inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let span = info_span!("outbound", src = %peer);
    forward(inbound, peer, shared).instrument(span).await
}

async fn forward(mut inbound: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Some(orig) = shared.maps.orig_dst(peer) else {
        // Never guess: a connection without a recorded destination goes nowhere.
        warn!("no original destination recorded for this connection; closing it");
        reset(inbound);
        return;
    };
    let dst = orig_dst_addr(&orig);
    let src_workload = shared
        .maps
        .workload(orig.netns_cookie)
        .map(|w| format!("{}/{}", name_str(&w.namespace), name_str(&w.name)))
        .unwrap_or_else(|| "unknown".into());
    if dst == shared.listen {
        warn!(%dst, "original destination is the proxy itself; closing to avoid a loop");
        reset(inbound);
        return;
    }
    let started = Instant::now();
    let mut outbound = match connect(dst, shared.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%dst, %src_workload, error = %e, "connection failed: destination unreachable");
            reset(inbound);
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        Ok((sent, received)) => info!(
            %dst,
            %src_workload,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        ),
        Err(e) => info!(
            %dst,
            %src_workload,
            duration_ms = started.elapsed().as_millis() as u64,
            error = %e,
            "connection closed with error"
        ),
    }
}

/// Dials the destination from a socket marked as the proxy's own, so the kernel programs
/// never capture it (no loop).
async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket2::SockRef::from(&sock).set_mark(PROXY_MARK)?;
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Closes with a reset, so the client learns at once that the connection failed.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
