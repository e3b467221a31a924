//! The node agent: owns the kernel side of one node. It installs (or adopts) the capture
//! programs at the cgroup root, writes the capture settings, and keeps the enrolled-workload
//! map in step with the configuration folder it watches. It does not carry traffic — the
//! node proxy does (`proxy`), so restarting or killing the agent never touches a connection.

#![forbid(unsafe_code)]

pub mod enroll;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use mesh_common::ProxyConfig;
use mesh_common::ports::{PROXY_MARK, PROXY_PORTS};
use tracing::{error, info, warn};

use std::sync::Arc;

use crate::config::watch::FileSource;
use crate::kernel::maps::{NodeMaps, ip_to_addr, ip4_to_net};
use crate::kernel::{Pins, load};
use crate::state::NodeState;
use crate::state::client::ControllerSettings;
use enroll::Enroller;

/// Where the agent learns which pods to enroll.
#[derive(Clone, Debug)]
pub enum Source {
    /// Standalone: a folder of YAML.
    Files(PathBuf),
    /// The controller's state stream.
    Controller(ControllerSettings),
}

/// Everything the agent needs, filled from the command line (`cli`), defaults in `defaults`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub source: Source,
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
    pub proxy_ip: Ipv4Addr,
    /// IPv6 connections are captured only when the proxy has an IPv6 address.
    pub proxy_ip6: Option<std::net::Ipv6Addr>,
    pub outbound_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub scan_interval: Duration,
    pub resync_interval: Duration,
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let pins = Pins::new(&cfg.bpffs);
    let (mut maps, how) = load::install(&pins, &cfg.cgroup_root).with_context(|| {
        format!(
            "installing capture programs on {}",
            cfg.cgroup_root.display()
        )
    })?;
    write_capture_settings(&mut maps, &cfg)?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    match &cfg.source {
        Source::Files(dir) => {
            let mut source = FileSource::new(dir);
            let mut enroller = Enroller::new(&cfg.node);
            sync(&mut source, &mut enroller, &mut maps, true);
            info!(node = %cfg.node, install = ?how, config = %dir.display(), "agent ready");
            let mut tick = tokio::time::interval(cfg.scan_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_full = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
                let full = last_full.elapsed() >= cfg.resync_interval;
                if full {
                    last_full = Instant::now();
                }
                sync(&mut source, &mut enroller, &mut maps, full);
            }
        }
        Source::Controller(settings) => {
            let conn = crate::state::client::channel(settings)?;
            let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(NodeState::default()));
            tokio::spawn(crate::state::client::follow(conn, tx));
            let mut enroller = Enroller::new(&cfg.node);
            info!(node = %cfg.node, install = ?how, controller = %settings.addr, "agent ready");
            let mut tick = tokio::time::interval(cfg.resync_interval);
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = tick.tick() => {}
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
                let st = rx.borrow_and_update().clone();
                if st.version == 0 {
                    continue; // nothing heard yet: keep what the kernel has
                }
                let out = enroller.reconcile(&candidates_from_state(&st, &cfg.node), &mut maps);
                if out.added + out.removed > 0 {
                    info!(
                        enrolled = out.enrolled,
                        added = out.added,
                        removed = out.removed,
                        version = st.version,
                        "enrollment updated"
                    );
                }
            }
        }
    }
    info!("agent stopping; capture programs stay attached (pinned) for the next start");
    Ok(())
}

/// The meshed pods of this node, as the controller sees them.
fn candidates_from_state(st: &NodeState, node: &str) -> Vec<enroll::Candidate> {
    st.workloads
        .values()
        .filter(|w| w.node == node && w.meshed)
        .filter_map(|w| {
            Some(enroll::Candidate {
                key: crate::model::ObjKey {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                },
                ip: w.ips.first()?.parse().ok()?,
                service_account: w.service_account.clone(),
                netns: (!w.netns.is_empty()).then(|| w.netns.clone()),
                origin: format!("controller state v{}", st.version),
            })
        })
        .collect()
}

/// Re-reads what changed, and reconciles the kernel when something did (or `force`).
fn sync(source: &mut FileSource, enroller: &mut Enroller, maps: &mut NodeMaps, force: bool) {
    let scan = source.scan();
    for e in &scan.new_errors {
        error!("config error: {e}; keeping the last good state");
    }
    if !(scan.changed || force) {
        return;
    }
    let (snap, dups) = source.snapshot();
    for d in dups {
        warn!("config: {d}");
    }
    let out = enroller.reconcile(
        &enroll::Candidate::from_snapshot(&snap, enroller.node()),
        maps,
    );
    if out.added + out.removed > 0 {
        info!(
            enrolled = out.enrolled,
            added = out.added,
            removed = out.removed,
            "enrollment updated"
        );
    }
}

fn write_capture_settings(maps: &mut NodeMaps, cfg: &AgentConfig) -> Result<()> {
    let mut proxy_ports = [0u16; 8];
    proxy_ports[..PROXY_PORTS.len()].copy_from_slice(&PROXY_PORTS);
    proxy_ports[PROXY_PORTS.len()] = cfg.outbound_port;
    let pc = ProxyConfig {
        proxy_ip4: ip4_to_net(cfg.proxy_ip),
        outbound_port: cfg.outbound_port,
        _pad: 0,
        proxy_mark: PROXY_MARK,
        proxy_ports,
        proxy_ip6: cfg
            .proxy_ip6
            .map(|ip| ip_to_addr(ip.into()))
            .unwrap_or([0; 4]),
    };
    maps.config.set(0, pc, 0).context("writing SN_CONFIG")?;

    let want: std::collections::BTreeSet<u16> = cfg.exclude_ports.iter().copied().collect();
    let have: Vec<u16> = maps.excl_ports.keys().filter_map(Result::ok).collect();
    for p in have.iter().filter(|p| !want.contains(p)) {
        maps.excl_ports
            .remove(p)
            .context("updating SN_EXCL_PORTS")?;
    }
    for p in &want {
        maps.excl_ports
            .insert(p, 1, 0)
            .context("updating SN_EXCL_PORTS")?;
    }

    use aya::maps::lpm_trie::Key;
    let want: Vec<(u32, mesh_common::Addr)> = cfg
        .exclude_cidrs
        .iter()
        .map(|n| {
            let len = match n {
                IpNet::V4(v4) => 96 + u32::from(v4.prefix_len()),
                IpNet::V6(v6) => u32::from(v6.prefix_len()),
            };
            (len, ip_to_addr(n.network()))
        })
        .collect();
    let have: Vec<Key<mesh_common::Addr>> = maps.excl_cidrs.keys().filter_map(Result::ok).collect();
    for k in &have {
        let (len, data) = (k.prefix_len(), k.data());
        if !want.contains(&(len, data)) {
            maps.excl_cidrs
                .remove(k)
                .context("updating SN_EXCL_CIDRS")?;
        }
    }
    for (len, data) in want {
        maps.excl_cidrs
            .insert(&Key::new(len, data), 1, 0)
            .context("updating SN_EXCL_CIDRS")?;
    }
    info!(
        proxy = %format!("{}:{}", cfg.proxy_ip, cfg.outbound_port),
        proxy6 = ?cfg.proxy_ip6,
        exclude_ports = ?cfg.exclude_ports,
        exclude_cidrs = ?cfg.exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "capture settings written"
    );
    Ok(())
}
