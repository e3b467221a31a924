//! The node proxy: carries every captured connection of this node's enrolled pods.
//!
//! Path of a connection: the kernel rewrote the pod's `connect()` to `proxy-ip:15001`
//! (`mesh-ebpf`) → `outbound` accepts it, reads the original destination the kernel recorded
//! for its 4-tuple and the source workload, and forwards it (plain TCP until HBONE tunnels
//! arrive). The proxy reads only the pinned maps; it runs as its own process so that agent
//! restarts never drop a connection (docs/architecture.md).

pub mod outbound;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::kernel::Pins;
use crate::kernel::maps::ProxyMaps;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub node: String,
    pub bpffs: PathBuf,
    pub proxy_ip: IpAddr,
    pub outbound_port: u16,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
}

/// What every connection handler shares.
pub struct Shared {
    pub maps: ProxyMaps,
    pub listen: SocketAddr,
    pub connect_timeout: Duration,
}

pub async fn run(cfg: ProxyConfig) -> Result<()> {
    let maps = wait_for_maps(&Pins::new(&cfg.bpffs)).await?;
    let listen = SocketAddr::new(cfg.proxy_ip, cfg.outbound_port);
    let listener = bind(listen).with_context(|| format!("listening on {listen}"))?;
    let shared = Arc::new(Shared {
        maps,
        listen,
        connect_timeout: cfg.connect_timeout,
    });
    info!(node = %cfg.node, outbound = %listen, "proxy ready");

    let tracker = TaskTracker::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracker.spawn(outbound::handle(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    drop(listener);
    tracker.close();
    info!(open = tracker.len(), "proxy draining");
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = tracker.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// The agent creates the maps; the proxy may start first and waits for them.
async fn wait_for_maps(pins: &Pins) -> Result<ProxyMaps> {
    let mut said = false;
    loop {
        match ProxyMaps::open(pins) {
            Ok(m) => return Ok(m),
            Err(e) => {
                if !said {
                    info!(error = %e, "waiting for the agent to pin the maps");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
