//! The node agent: owns the kernel side of one node. It installs (or adopts) the capture
//! programs at the cgroup root, writes the capture settings, and keeps the enrolled-workload
//! map in step with the configuration folder it watches. It does not carry traffic — the
//! node proxy does (`proxy`), so restarting or killing the agent never touches a connection.

#![forbid(unsafe_code)]

pub mod cni;
pub mod enroll;
pub mod kernel_log;
pub mod peer_auth;
pub mod status;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use mesh_common::ProxyConfig;
use mesh_common::ports::{PROXY_MARK, PROXY_PORTS};
use tokio::sync::watch;
use tracing::{error, info, warn};

use std::sync::Arc;

use crate::config::watch::FileSource;
use crate::identity::controller::ControllerSettings;
use crate::kernel::maps::{NodeMaps, ip_to_addr, ip4_to_net};
use crate::kernel::podns::PodNetnsFinder;
use crate::kernel::{Pins, load};
use crate::state::NodeState;
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
    /// Splice the local legs (pod ↔ proxy) in the kernel (`--splice`).
    pub splice: bool,
    pub exclude_cidrs: Vec<IpNet>,
    pub scan_interval: Duration,
    pub resync_interval: Duration,
    /// How often to try again while some pod's namespace cannot be found (not started yet).
    pub retry_interval: Duration,
    /// Annotate enrolled pods (`--pod-status`).
    pub pod_status: Option<status::StatusConfig>,
    /// Answer the CNI plugin on a unix socket (`--cni-socket`, docs/cni.md).
    pub cni: Option<cni::CniSettings>,
    /// The program object (`--ebpf-build-id`): one that differs from the installed one
    /// replaces it in place.
    pub object: load::ObjectChoice,
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let pins = Pins::new(&cfg.bpffs);
    // A kernel without a feature the programs need: one clear line, not a verifier dump.
    crate::kernel::probe::require()?;
    let (mut maps, how) =
        load::install(&pins, &cfg.cgroup_root, cfg.object).with_context(|| {
            format!(
                "installing capture programs on {}",
                cfg.cgroup_root.display()
            )
        })?;
    write_capture_settings(&mut maps, &cfg, &crate::proto::MeshSettings::default())?;
    kernel_log::spawn(&pins);
    // Held until this process ends: `mesh-node doctor` reads it as "the agent runs".
    let _agent_lock = hold_agent_lock(&pins);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Pods' namespaces are searched below the same cgroup folder the programs attach to: the
    // programs only see pods below it anyway.
    let new_enroller =
        || Enroller::new(&cfg.node).with_pod_cgroups(PodNetnsFinder::new(&cfg.cgroup_root));
    let status = cfg
        .pod_status
        .clone()
        .map(|s| status::spawn(s, cfg.node.clone()));
    // The CNI plugin's requests are answered inside this loop (it owns the enroller and maps).
    let mut cni_front =
        cni::Front::start(cfg.cni.as_ref(), &cfg.node, cfg.pod_status.as_ref()).await?;
    let mut known = cni::Known::default();
    match &cfg.source {
        Source::Files(dir) => {
            let mut source = FileSource::new(dir);
            let mut enroller = new_enroller();
            if let Some(k) = sync(&mut source, &mut enroller, &mut maps, true, status.as_ref()) {
                known = k;
            }
            info!(node = %cfg.node, install = ?how, config = %dir.display(), "agent ready");
            let mut tick = tokio::time::interval(cfg.scan_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_full = Instant::now();
            let mut last_try = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    ev = cni_front.next() => {
                        cni_front.serve(ev, &known, &mut enroller, &mut maps);
                        continue;
                    }
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
                let full = last_full.elapsed() >= cfg.resync_interval;
                if full {
                    last_full = Instant::now();
                }
                // A pod not found yet (its processes not up) is tried again without a change.
                let retry = enroller.unresolved() > 0 && last_try.elapsed() >= cfg.retry_interval;
                if full || retry {
                    last_try = Instant::now();
                }
                if let Some(k) = sync(
                    &mut source,
                    &mut enroller,
                    &mut maps,
                    full || retry,
                    status.as_ref(),
                ) {
                    known = k;
                }
                cni_front.recheck(&known, &mut enroller, &mut maps);
            }
        }
        Source::Controller(settings) => {
            let conn = crate::identity::controller::channel(settings)?;
            let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(NodeState::default()));
            tokio::spawn(crate::state::client::follow(conn, tx));
            let mut enroller = new_enroller();
            let mut mesh_settings = crate::proto::MeshSettings::default();
            info!(node = %cfg.node, install = ?how, controller = %settings.addr, "agent ready");
            let mut tick = tokio::time::interval(cfg.resync_interval);
            let mut retry = tokio::time::interval(cfg.retry_interval);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let unresolved = enroller.unresolved() > 0;
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = tick.tick() => {}
                    _ = retry.tick(), if unresolved => {}
                    ev = cni_front.next() => {
                        cni_front.serve(ev, &known, &mut enroller, &mut maps);
                        continue;
                    }
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
                let st = rx.borrow_and_update().clone();
                if st.version == 0 {
                    continue; // nothing heard yet: keep what the kernel has
                }
                if st.settings != mesh_settings {
                    // The MeshConfig's exclusions add to this agent's flags.
                    match write_capture_settings(&mut maps, &cfg, &st.settings) {
                        Ok(()) => mesh_settings = st.settings.clone(),
                        Err(e) => error!(error = %format!("{e:#}"), "applying the mesh settings"),
                    }
                }
                let candidates = candidates_from_state(&st, &cfg.node);
                let out = enroller.reconcile(&candidates, &mut maps);
                kernel_log::set_pods(&candidates);
                known = cni::Known::from_state(&st, &cfg.node, &candidates);
                cni_front.recheck(&known, &mut enroller, &mut maps);
                let pa = peer_auth::sync_kernel(
                    &peer_auth::targets_from_state(&st, &cfg.node),
                    &mut maps,
                );
                log_peer_auth(&pa);
                report_status(status.as_ref(), &enroller, &candidates);
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

/// Takes the agent's lock on the pins ([`Pins::lock_agent`]). A doctor probing it holds it
/// shared for an instant, so a busy lock is tried again; one that stays busy belongs to
/// another agent on the same bpffs: warned about, and waited for in a thread.
fn hold_agent_lock(pins: &Pins) -> Option<std::fs::File> {
    for _ in 0..10 {
        match pins.lock_agent() {
            Ok((f, true)) => return Some(f),
            Ok((_, false)) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                warn!(path = %pins.root().display(), error = %e, "cannot take the agent lock; `mesh-node doctor` will report the agent down");
                return None;
            }
        }
    }
    warn!(path = %pins.root().display(), "another process holds the agent lock (another agent on this bpffs?); waiting for it");
    let root = pins.root();
    std::thread::spawn(move || {
        if let Ok(f) = std::fs::File::open(&root)
            && f.lock().is_ok()
        {
            info!(path = %root.display(), "agent lock taken");
            // Kept open for the rest of the process.
            std::mem::forget(f);
        }
    });
    None
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
                pod_uid: (!w.pod_uid.is_empty()).then(|| w.pod_uid.clone()),
                origin: format!("controller state v{}", st.version),
            })
        })
        .collect()
}

/// Tells the status task which pods are enrolled now.
fn report_status(
    status: Option<&watch::Sender<status::Enrolled>>,
    enroller: &Enroller,
    candidates: &[enroll::Candidate],
) {
    let Some(tx) = status else { return };
    let uids: std::collections::HashMap<&crate::model::ObjKey, &str> = candidates
        .iter()
        .map(|c| (&c.key, c.pod_uid.as_deref().unwrap_or_default()))
        .collect();
    let enrolled: status::Enrolled = enroller
        .enrolled()
        .map(|k| {
            (
                k.clone(),
                uids.get(k).copied().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // Sent after every reconcile, changed or not: the task retries failed patches then.
    tx.send_replace(enrolled);
}

/// Re-reads what changed, and reconciles the kernel when something did (or `force`); then
/// returns this node's pods as the CNI front sees them.
fn sync(
    source: &mut FileSource,
    enroller: &mut Enroller,
    maps: &mut NodeMaps,
    force: bool,
    status: Option<&watch::Sender<status::Enrolled>>,
) -> Option<cni::Known> {
    let scan = source.scan();
    for e in &scan.new_errors {
        error!("config error: {e}; keeping the last good state");
    }
    if !(scan.changed || force) {
        return None;
    }
    let (snap, dups) = source.snapshot();
    for d in dups {
        warn!("config: {d}");
    }
    let candidates = enroll::Candidate::from_snapshot(&snap, enroller.node());
    let out = enroller.reconcile(&candidates, maps);
    kernel_log::set_pods(&candidates);
    let pa = peer_auth::sync_kernel(
        &peer_auth::targets_from_snapshot(&snap, enroller.node()),
        maps,
    );
    log_peer_auth(&pa);
    report_status(status, enroller, &candidates);
    if out.added + out.removed > 0 {
        info!(
            enrolled = out.enrolled,
            added = out.added,
            removed = out.removed,
            "enrollment updated"
        );
    }
    Some(cni::Known::from_snapshot(
        &snap,
        enroller.node(),
        &candidates,
    ))
}

fn log_peer_auth(out: &peer_auth::StrictOutcome) {
    if out.added + out.removed > 0 {
        info!(
            entries = out.entries,
            added = out.added,
            removed = out.removed,
            "peer authentication (SN_STRICT) updated"
        );
    }
}

/// Writes the capture settings: the proxy's address and ports, and the exclusions — this
/// agent's flags plus the mesh-wide ones (`MeshConfig`; an entry that does not parse is logged
/// and skipped, the controller has validated them).
fn write_capture_settings(
    maps: &mut NodeMaps,
    cfg: &AgentConfig,
    mesh: &crate::proto::MeshSettings,
) -> Result<()> {
    let mut exclude_ports = cfg.exclude_ports.clone();
    for p in &mesh.exclude_ports {
        match u16::try_from(*p) {
            Ok(p) if p != 0 => exclude_ports.push(p),
            _ => warn!(port = p, "mesh settings: not a port; skipped"),
        }
    }
    let mut exclude_cidrs = cfg.exclude_cidrs.clone();
    for c in &mesh.exclude_cidrs {
        match c.parse::<IpNet>() {
            Ok(n) => exclude_cidrs.push(n),
            Err(_) => warn!(cidr = %c, "mesh settings: not a CIDR; skipped"),
        }
    }
    let mut proxy_ports = [0u16; 8];
    proxy_ports[..PROXY_PORTS.len()].copy_from_slice(&PROXY_PORTS);
    proxy_ports[PROXY_PORTS.len()] = cfg.outbound_port;
    let pc = ProxyConfig {
        proxy_ip4: ip4_to_net(cfg.proxy_ip),
        outbound_port: cfg.outbound_port,
        flags: if cfg.splice {
            mesh_common::CONFIG_F_SPLICE
        } else {
            0
        },
        proxy_mark: PROXY_MARK,
        proxy_ports,
        proxy_ip6: cfg
            .proxy_ip6
            .map(|ip| ip_to_addr(ip.into()))
            .unwrap_or([0; 4]),
    };
    maps.config.set(0, pc, 0).context("writing SN_CONFIG")?;

    let want: std::collections::BTreeSet<u16> = exclude_ports.iter().copied().collect();
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
    let want: Vec<(u32, mesh_common::Addr)> = exclude_cidrs
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
        exclude_ports = ?exclude_ports,
        exclude_cidrs = ?exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "capture settings written"
    );
    Ok(())
}
