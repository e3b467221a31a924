//! The node proxy: carries every captured connection of this node's enrolled pods.
//!
//! Path of a connection: the kernel rewrote the pod's `connect()` to `proxy-ip:15001`
//! (`mesh-ebpf`) → `outbound` accepts it, reads the original destination the kernel recorded
//! for its 4-tuple and the source workload, and sends it on: through an HBONE tunnel
//! (`hbone/client`, `hbone/pool`) when the destination is a meshed workload, else directly.
//! On the far side `inbound` accepts tunnels inside each meshed pod's namespace and
//! `hbone/server` connects them to the pod. A destination that is a Service VIP is first
//! routed (`route`: VirtualService TCP routes, subsets, load balancing) to one endpoint pod.
//! The proxy reads the pinned maps and, in mesh mode, the controller's state; it runs as its
//! own process so that agent restarts never drop a connection (docs/architecture.md).

#![forbid(unsafe_code)]

pub mod authz;
pub mod connlimit;
pub mod gauges;
pub mod handover;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod pod;
pub mod ratelimit;
pub mod refusal;
pub mod reply;
pub mod route;
pub mod socket;
pub mod status;
pub mod zero_copy;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::identity::controller::ControllerSettings;
use crate::identity::manager::CertManager;
use crate::kernel::Pins;
use crate::kernel::maps::ProxyMaps;
use crate::state::StateRx;

/// Buffer per direction when splicing two TCP sockets (direct connections; HBONE streams use
/// `hbone::stream`, whose buffers grow with the flow): large enough that a bulk transfer moves
/// in few big writes, small enough for many idle connections.
pub const COPY_BUF: usize = 64 * 1024;

/// The admin API as the proxy runs it: its address, how to bind it and how to serve a
/// listener. The caller (the CLI) fills it from `admin`: the proxy binds, hands over and
/// serves the admin listener like its other sockets without depending on the admin module.
#[derive(Clone)]
pub struct AdminEndpoint {
    pub addr: SocketAddr,
    /// Binds `addr` (refusing what may not be bound).
    pub bind: Arc<dyn Fn() -> Result<TcpListener> + Send + Sync>,
    /// Starts serving the API on a listener (spawns a task).
    pub serve: Arc<dyn Fn(TcpListener, Arc<status::Status>) + Send + Sync>,
}

impl std::fmt::Debug for AdminEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminEndpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub node: String,
    pub bpffs: PathBuf,
    pub proxy_ip: IpAddr,
    pub proxy_ip6: Option<std::net::Ipv6Addr>,
    pub outbound_port: u16,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// A pooled HBONE connection without a tunnel for this long is closed.
    pub pool_idle_timeout: Duration,
    /// With a controller: HBONE mTLS between meshed pods. Without: plain forwarding.
    pub controller: Option<ControllerSettings>,
    /// Destinations outside the mesh get a direct plaintext connection (else refused).
    pub direct_unmeshed: bool,
    pub metrics_addr: Option<SocketAddr>,
    /// Admin API (`--admin`, loopback by default); `None`: off.
    pub admin: Option<AdminEndpoint>,
    /// cgroup v2 folder below which local pods' namespaces are found by pod UID (the agent's
    /// `--cgroup-root`); without it only the `sidenode.io/netns` annotation works.
    pub cgroup_root: Option<PathBuf>,
    /// How often to try again to open listeners of pods not found (or not ready) yet.
    pub retry_interval: Duration,
    /// Distributed tracing (`--otlp-endpoint`); `None`: off.
    pub tracing: Option<crate::telemetry::trace::Settings>,
    /// Connect to local pods from the client's address (`--keep-client-address`).
    pub keep_client_address: bool,
    /// Dial HBONE tunnels from inside the source pod's namespace, from its address
    /// (`--tunnel-from-pod`).
    pub tunnel_from_pod: bool,
    /// Where `/proc/sys/net` is writable (`--proc-sys-net`).
    pub proc_sys_net: PathBuf,
    /// Serve a hand-over socket here (`--handover-socket`): a successor started with
    /// `--takeover` takes this proxy's listening sockets through it (`handover`).
    pub handover_socket: Option<PathBuf>,
    /// Take over the listening sockets of the proxy serving `handover_socket` (`--takeover`).
    pub takeover: bool,
    /// This proxy's pod (`--pod-uid`, Kubernetes): marked retired after a hand-over.
    pub pod_uid: Option<String>,
    /// Concurrent connection limits (`--max-connections` and the like).
    pub conn_limits: ConnLimits,
}

/// Concurrent connection limits of one proxy (defaults in `defaults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub max_connections_per_workload: usize,
    pub max_inbound_tunnels: usize,
    pub max_inbound_tunnels_per_identity: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: crate::defaults::MAX_CONNECTIONS,
            max_connections_per_workload: crate::defaults::MAX_CONNECTIONS_PER_WORKLOAD,
            max_inbound_tunnels: crate::defaults::MAX_INBOUND_TUNNELS,
            max_inbound_tunnels_per_identity: crate::defaults::MAX_INBOUND_TUNNELS_PER_IDENTITY,
        }
    }
}

/// The mesh side of the proxy (present with a controller).
pub struct Mesh {
    pub state: StateRx,
    pub certs: Arc<CertManager>,
    pub pool: hbone::pool::Pool,
    /// Outbound HBONE over QUIC: client endpoints and pooled connections (`hbone::quic`).
    pub quic: hbone::quic::Clients,
    /// Open inbound tunnels, re-checked against `AuthorizationPolicy` on state changes.
    pub authz: Arc<authz::registry::Registry>,
    /// `RateLimitPolicy` token buckets of this node's workloads.
    pub limiter: Arc<ratelimit::Limiter>,
    /// This node's name: a meshed destination on it is reached without a tunnel
    /// (`outbound::local`).
    pub node: String,
    /// Local pods' namespaces: the proxy connects to them from their clients' addresses, and
    /// tunnels leave from them.
    pub pods: Arc<pod::Pods>,
    /// Inbound tunnels open at once, in all and per peer identity (`--max-inbound-tunnels`).
    pub tunnel_limits: Arc<connlimit::Limiter>,
}

impl Mesh {
    /// The namespace a tunnel from local workload `w` leaves from: its pod's, when the pod is
    /// served here and `--tunnel-from-pod` is on; else `None` (the proxy's address).
    pub fn tunnel_source(
        &self,
        st: &crate::state::NodeState,
        w: &mesh_common::Workload,
    ) -> Option<socket::PodNetns> {
        let key = format!(
            "{}/{}",
            mesh_common::name_str(&w.namespace),
            mesh_common::name_str(&w.name)
        );
        self.pods.source(&st.workloads.get(&key)?.uid)
    }
}

/// What every connection handler shares.
pub struct Shared {
    /// The kernel's maps (`None` in the gateway, which captures nothing).
    pub maps: Option<ProxyMaps>,
    /// The outbound listeners' addresses (a destination equal to one would loop).
    pub listens: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub mesh: Option<Arc<Mesh>>,
    pub direct_unmeshed: bool,
    /// Load-balancing state for service VIPs (round robin, active connections).
    pub balancer: route::Balancer,
    /// Outlier detection of service endpoints (`DestinationRule` `outlierDetection`).
    pub health: route::Health,
    /// Connection pool limits per service and subset (`DestinationRule` `connectionPool`).
    pub limits: route::Limits,
    /// Captured connections open at once, in all and per source pod (`--max-connections`);
    /// `None` (the gateway): its own `--max-connections` applies instead.
    pub conn_limits: Option<Arc<connlimit::Limiter>>,
}

/// Runs the proxy until SIGTERM, Ctrl-C or a successor's hand-over, then drains. `admin` is the
/// phase the readiness probe and the admin API read.
pub async fn run(cfg: ProxyConfig, admin: Arc<status::Status>) -> Result<()> {
    if let Some(t) = &cfg.tracing {
        crate::telemetry::trace::init(t, &cfg.node).context("setting up tracing")?;
    }
    // Up first, so that `/healthz/ready` can say what the proxy is waiting for (after the
    // hand-over when taking over: the predecessor holds the port until then).
    let takeover = cfg
        .takeover
        .then_some(cfg.handover_socket.as_ref())
        .flatten();
    if let (Some(path), Some(uid)) = (takeover, &cfg.pod_uid)
        && handover::retired_marker(path, uid).exists()
    {
        // This pod's proxy already handed its sockets to a newer pod's and exited; the
        // kubelet restarted it before deleting the pod. Taking them back would hand the node
        // to a pod about to be deleted: wait for the end instead.
        info!(pod_uid = %uid, "this pod's proxy handed its sockets over already; idle until terminated");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return Ok(());
    }
    // Freed heap goes back to the kernel after a burst (docs/operations.md).
    tokio::spawn(crate::kernel::heap::trim_forever(
        crate::defaults::HEAP_TRIM_INTERVAL,
    ));
    let mut admin_listener = None;
    if let (Some(a), None) = (&cfg.admin, takeover) {
        let l = (a.bind)()?;
        handover::registry()
            .await
            .add(meta(handover::Kind::Admin, a.addr), &l)?;
        (a.serve)(l, admin.clone());
    }
    let maps = wait_for_maps(&Pins::new(&cfg.bpffs)).await?;
    let mut listens = vec![SocketAddr::new(cfg.proxy_ip, cfg.outbound_port)];
    if let Some(ip6) = cfg.proxy_ip6 {
        listens.push(SocketAddr::new(ip6.into(), cfg.outbound_port));
    }
    let mut listeners = Vec::new();
    if takeover.is_none() {
        for addr in &listens {
            listeners.push(bind(*addr).with_context(|| format!("listening on {addr}"))?);
        }
    }
    let mesh = match &cfg.controller {
        Some(c) => Some(start_mesh(c, &cfg).await?),
        None => None,
    };
    // Ready to serve (state and certificates): take the predecessor's sockets now.
    let mut taken = match takeover {
        Some(path) => handover::take_over(path, &cfg.node)
            .await
            .with_context(|| format!("taking over from the proxy at {}", path.display()))?,
        None => None,
    };
    if takeover.is_some() {
        for addr in &listens {
            let l = match taken
                .as_mut()
                .and_then(|t| t.take(handover::Kind::Outbound, *addr))
            {
                Some(l) => TcpListener::from_std(l)?,
                None => bind(*addr).with_context(|| format!("listening on {addr}"))?,
            };
            listeners.push(l);
        }
        if let Some(a) = &cfg.admin {
            admin_listener = Some(
                match taken
                    .as_mut()
                    .and_then(|t| t.take(handover::Kind::Admin, a.addr))
                {
                    Some(l) => TcpListener::from_std(l)?,
                    None => (a.bind)()?,
                },
            );
        }
    }
    let metrics_listener = match cfg.metrics_addr {
        Some(addr) => Some(
            match taken
                .as_mut()
                .and_then(|t| t.take(handover::Kind::Metrics, addr))
            {
                Some(l) => TcpListener::from_std(l)?,
                None => TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("metrics endpoint on {addr}"))?,
            },
        ),
        None => None,
    };
    {
        // What a successor will take over.
        let mut reg = handover::registry().await;
        for (l, addr) in listeners.iter().zip(&listens) {
            reg.add(meta(handover::Kind::Outbound, *addr), l)?;
        }
        // (Bound here only when taking over; else served since the start.)
        if let (Some(l), Some(a)) = (&admin_listener, &cfg.admin) {
            reg.add(meta(handover::Kind::Admin, a.addr), l)?;
        }
        if let (Some(l), Some(addr)) = (&metrics_listener, cfg.metrics_addr) {
            reg.add(meta(handover::Kind::Metrics, addr), l)?;
        }
    }
    if let (Some(l), Some(a)) = (admin_listener, &cfg.admin) {
        (a.serve)(l, admin.clone());
    }
    if let Some(m) = &mesh {
        admin.set_mesh(m.clone());
    }
    if let Some(l) = metrics_listener {
        tokio::spawn(async move {
            if let Err(e) = crate::telemetry::metrics::serve_listener(l, async {
                let mut given = handover::handed_over();
                handover::until(&mut given).await
            })
            .await
            {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let shared = Arc::new(Shared {
        maps: Some(maps),
        listens: listens.clone(),
        connect_timeout: cfg.connect_timeout,
        mesh,
        direct_unmeshed: cfg.direct_unmeshed,
        balancer: Default::default(),
        health: Default::default(),
        limits: Default::default(),
        conn_limits: Some(connlimit::Limiter::new(
            "outbound",
            cfg.conn_limits.max_connections,
            cfg.conn_limits.max_connections_per_workload,
        )),
    });
    gauges::NodeCollector::register(shared.clone());

    let tracker = handover::tasks().clone();
    let mut acceptors = Vec::new();
    for listener in listeners {
        acceptors.push(tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            tracker.clone(),
            handover::stopping(),
        )));
    }
    if let Some(m) = &shared.mesh {
        // The inbound side: pods' HBONE listeners (the inherited ones first).
        let (first, first_done) = tokio::sync::oneshot::channel();
        tokio::spawn(inbound::run(
            m.clone(),
            inbound::Settings {
                node: cfg.node.clone(),
                connect_timeout: cfg.connect_timeout,
                cgroup_root: cfg.cgroup_root.clone(),
                retry_interval: cfg.retry_interval,
                inherited: taken.as_mut().map(|t| t.take_pods()).unwrap_or_default(),
                first_round: Some(first),
            },
        ));
        if taken.is_some()
            && tokio::time::timeout(Duration::from_secs(30), first_done)
                .await
                .is_err()
        {
            warn!("the pods' listeners are not all set up yet; taking over anyway");
        }
    }
    if let Some(t) = taken {
        let from = t.pid();
        t.finish()
            .await
            .context("finishing the hand-over (the old proxy may still be accepting)")?;
        info!(
            from_pid = from,
            "took over the listening sockets; the old proxy drains"
        );
        crate::telemetry::metrics::metrics()
            .handovers
            .with_label_values(&["taken"])
            .inc();
    }
    if let Some(path) = &cfg.handover_socket {
        handover::serve(path, &cfg.node, cfg.pod_uid.clone())?;
    }
    admin.set_serving();
    info!(node = %cfg.node, outbound = ?listens, mesh = shared.mesh.is_some(), "proxy ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stopping = handover::stopping();
    let why = tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "SIGTERM",
        _ = handover::until(&mut stopping) => "handed over",
    };
    // No new connections from here on (a successor, if any, accepts them); inbound tunnels
    // get GOAWAY.
    handover::stop();
    handover::registry().await.close();
    admin.set_draining();
    for a in acceptors {
        let _ = a.await;
    }
    tracker.close();
    info!(open = tracker.len(), why, drain_timeout = ?cfg.drain_timeout, "proxy draining");
    let drained = tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_ok();
    if drained {
        info!("drained: every connection finished");
    } else {
        warn!(
            open = tracker.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    // QUIC endpoints close their connections (CONNECTION_CLOSE) and free UDP 15008.
    handover::close();
    tokio::time::sleep(Duration::from_millis(100)).await;
    crate::telemetry::trace::shutdown().await;
    info!("proxy exiting");
    Ok(())
}

fn meta(kind: handover::Kind, addr: SocketAddr) -> handover::Meta {
    handover::Meta {
        kind,
        addr,
        pod: None,
        netns: None,
    }
}

/// Connects to the controller, follows its state, and starts certificates. Waits (bounded)
/// for the first state so the first connections are meshed. The inbound listeners are
/// started by `run`.
async fn start_mesh(c: &ControllerSettings, cfg: &ProxyConfig) -> Result<Arc<Mesh>> {
    let (rx, certs) = follow_controller(c).await?;
    let mesh = Arc::new(Mesh {
        state: rx,
        certs: certs.clone(),
        pool: hbone::pool::Pool::new(cfg.pool_idle_timeout),
        quic: hbone::quic::Clients::new(cfg.pool_idle_timeout),
        authz: Default::default(),
        limiter: Default::default(),
        node: cfg.node.clone(),
        pods: Arc::new(pod::Pods::new(
            cfg.keep_client_address,
            cfg.tunnel_from_pod,
            cfg.proc_sys_net.clone(),
        )),
        tunnel_limits: connlimit::Limiter::new(
            "inbound",
            cfg.conn_limits.max_inbound_tunnels,
            cfg.conn_limits.max_inbound_tunnels_per_identity,
        ),
    });
    tokio::spawn(certs.renew_forever());
    tokio::spawn(crate::telemetry::conn::sweep_forever(mesh.state.clone()));
    {
        let (tunnels, state) = (mesh.authz.clone(), mesh.state.clone());
        tokio::spawn(async move { tunnels.recheck_forever(state).await });
    }
    Ok(mesh)
}

/// Connects to the controller: its state, followed from now on, and the certificate service.
/// Waits (bounded) for the first state.
pub(crate) async fn follow_controller(
    c: &ControllerSettings,
) -> Result<(crate::state::StateRx, Arc<CertManager>)> {
    let conn = crate::identity::controller::channel(c)?;
    crate::telemetry::node::StateCollector::register();
    let certs = CertManager::new(crate::identity::controller::cert_client(&conn));
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(crate::state::NodeState::default()));
    tokio::spawn(crate::state::client::follow(conn, tx));
    let mut first = rx.clone();
    if tokio::time::timeout(Duration::from_secs(10), first.wait_for(|s| s.version > 0))
        .await
        .is_err()
    {
        warn!("no state from the controller yet; starting anyway");
    }
    Ok((rx, certs))
}

/// Accepts captured connections until told to stop; each is a task of `tracker`.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
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
            _ = handover::until(&mut stopped) => return,
        }
    }
}

/// A listening socket on `addr` (`SO_REUSEADDR`, backlog 4096).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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
