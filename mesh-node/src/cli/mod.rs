//! The `mesh-node` command line: one binary for the agent, the proxy and the operator views.

#![forbid(unsafe_code)]

pub mod cni;
pub mod config;
pub mod doctor;
pub mod maps;
pub mod reference;
pub mod state;
pub mod table;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::defaults;
use crate::telemetry::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "mesh-node",
    version,
    about = "sidenode: node agent, node proxy and CLI"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SIDENODE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Node agent: installs the capture programs and enrolls this node's pods.
    Agent(AgentArgs),
    /// Node proxy: carries captured connections.
    Proxy(ProxyArgs),
    /// Controller: configuration source, state stream and certificate authority.
    Controller(ControllerCmdArgs),
    /// Ingress gateway: HTTP and HTTPS from outside into the mesh (docs/gateway.md).
    Gateway(GatewayArgs),
    /// Show the kernel's maps: enrolled workloads, original destinations, counters.
    Maps(maps::MapsArgs),
    /// Show what the controller serves a node: workloads, services, Istio objects, settings.
    State(state::StateArgs),
    /// Show what this node's proxy holds (from its admin API): workloads, services, policies,
    /// certificates, connections.
    Config(config::ConfigArgs),
    /// Show or change the node proxy's log filter at run time (through its admin API).
    LogLevel(config::LogLevelArgs),
    /// Check this node: kernel, mounts, pins, agent, proxy, controller, certificates and
    /// enrollment; one line each with a fix for what is broken (exit code 1 when something
    /// fails). Run it on the node as root (docs/troubleshooting.md).
    Doctor(doctor::DoctorArgs),
    /// Make sure the host has a bpffs at --bpffs that is a shared mount: enters the host's
    /// mount namespace (--mount-ns, with hostPID), mounts one if there is none, makes it shared
    /// if it is private. The DaemonSet's init container (privileged for this only).
    MountBpffs {
        #[arg(long, default_value = defaults::BPFFS)]
        bpffs: PathBuf,
        /// The host's mount namespace.
        #[arg(long, default_value = "/proc/1/ns/mnt")]
        mount_ns: PathBuf,
    },
    /// Remove every sidenode pin from a bpffs (detaches the capture programs); with
    /// `--cni-conf-dir`, also the CNI plugin (as `mesh-node cni uninstall`).
    Uninstall {
        #[arg(long, default_value = defaults::BPFFS)]
        bpffs: PathBuf,
        /// Also remove the CNI plugin's entry from this CNI configuration folder (e.g.
        /// /etc/cni/net.d) ...
        #[arg(long)]
        cni_conf_dir: Option<PathBuf>,
        /// ... and its binary from this one (e.g. /opt/cni/bin).
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
    /// Install or remove the CNI plugin in this node's CNI configuration (docs/cni.md).
    #[command(subcommand)]
    Cni(cni::CniCmd),
    /// Print a shell completion script (`source <(mesh-node completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// This node's name (pods with `spec.nodeName` equal to it are enrolled here).
    #[arg(long, env = "SIDENODE_NODE")]
    node: String,
    /// Folder of Kubernetes-style YAML (Namespace, Pod, Service) to watch.
    #[arg(long, required_unless_present = "controller")]
    config: Option<PathBuf>,
    #[command(flatten)]
    controller: ControllerArgs,
    /// cgroup v2 folder the capture programs attach to. Default: the cgroup2 mount, found in
    /// /proc/self/mountinfo (/sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified on hybrid
    /// ones); a relative PATH is taken below that mount. Pods' network namespaces are found
    /// below it by pod UID (kubelet's `pod<uid>` folders).
    #[arg(long, env = "SIDENODE_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Annotate every enrolled pod with `sidenode.io/redirection: enabled` (removed when
    /// un-enrolled), through the Kubernetes API.
    #[arg(long)]
    pod_status: bool,
    /// With `--pod-status`: also label every enrolled pod `networking.istio.io/tunnel: http`
    /// (removed with the annotation), so Istio's ztunnel reaches it over HBONE at
    /// `podIP:15008` (docs/migrating-from-ambient.md). Off by default: it writes to users' pods.
    #[arg(long, requires = "pod_status")]
    advertise_hbone: bool,
    /// Kubeconfig for `--pod-status` (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, requires = "pod_status")]
    kubeconfig: Option<PathBuf>,
    /// bpffs folder for pins (`<bpffs>/sidenode/...`).
    #[arg(long, default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// The node proxy's IPv4 address; captured connections go to `proxy-ip:outbound-port`.
    #[arg(long)]
    proxy_ip: Ipv4Addr,
    /// The node proxy's IPv6 address; without it IPv6 connections are not captured.
    #[arg(long)]
    proxy_ip6: Option<std::net::Ipv6Addr>,
    #[arg(long, default_value_t = defaults::OUTBOUND)]
    outbound_port: u16,
    /// Destination ports never captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Destination CIDRs never captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_cidrs: Vec<IpNet>,
    /// Istio's root namespace: its `PeerAuthentication` without selector is mesh-wide.
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Splice the local legs (pod ↔ node proxy) of new connections in the kernel (sockmap),
    /// skipping TCP/IP on both legs. Experimental, off by default: on a spliced pod socket a
    /// blocking `recv()` can return EAGAIN and a bulk `write()` ENOMEM (docs/performance.md).
    #[arg(long)]
    splice: bool,
    /// Answer the CNI plugin (`sidenode-cni`) on this unix socket, enrolling pods while their
    /// sandbox is created (docs/cni.md). Off without it.
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// How long a CNI request for a pod the agent's state does not have yet waits for it
    /// before the answer is `unknown` (keep it below the plugin's `timeoutMs`).
    #[arg(long, default_value = "2000ms", value_parser = parse_duration_ms, requires = "cni_socket")]
    cni_wait: std::time::Duration,
    /// Testing aid: count this agent's program object as another build (a different id in
    /// `SN_META`), so it replaces the installed programs in place as a newer object would.
    #[arg(long, hide = true, default_value_t = 0)]
    ebpf_build_id: u64,
    /// Entries of the original-destination map (`SN_ORIG_DST`, LRU): captured connections
    /// open at once on this node. Used when the agent creates the map; a map already pinned
    /// keeps its size (remove it with `mesh-node uninstall` to resize). When full, the least
    /// recently used entry is evicted; a connection whose entry went before the proxy read it
    /// is closed by the proxy, never mis-routed (docs/security.md).
    #[arg(long, default_value_t = mesh_common::ORIG_DST_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    orig_dst_max: u32,
}

/// How to reach the controller (all three together).
#[derive(Args, Clone)]
struct ControllerArgs {
    /// Controller gRPC address `host:port`; turns on mesh mode (HBONE mTLS, certificates).
    #[arg(long, requires_all = ["controller_ca", "token_file"])]
    controller: Option<String>,
    /// PEM root the controller's certificate chains to (its `root-cert.pem`).
    #[arg(long)]
    controller_ca: Option<PathBuf>,
    /// This node's bootstrap token file.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl ControllerArgs {
    fn settings(&self) -> Option<crate::identity::controller::ControllerSettings> {
        Some(crate::identity::controller::ControllerSettings {
            addr: self.controller.clone()?,
            ca_file: self.controller_ca.clone()?,
            token_file: self.token_file.clone()?,
        })
    }
}

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// The gateway pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The gateway pod's name.
    #[arg(long, env = "POD_NAME")]
    pod: String,
    /// Its ServiceAccount: the identity it presents to meshed backends.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = defaults::GATEWAY_SERVICE_ACCOUNT)]
    service_account: String,
    /// Its labels (`k=v,k=v`), which an Istio `Gateway.spec.selector` must match.
    #[arg(long, env = "SIDENODE_GATEWAY_LABELS", default_value = defaults::GATEWAY_LABELS, value_parser = parse_labels)]
    labels: crate::model::Labels,
    /// The Gateway API class it serves (a `GatewayClass` with controllerName
    /// `sidenode.io/gateway-controller`).
    #[arg(long, default_value = defaults::GATEWAY_CLASS)]
    class: String,
    /// Address the listeners bind, on the ports the served Gateways declare.
    #[arg(long, default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// A folder of YAML holding `kubernetes.io/tls` Secrets (standalone); without it the
    /// Secrets are read from the Kubernetes API.
    #[arg(long)]
    secrets_dir: Option<PathBuf>,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: std::net::SocketAddr,
    /// Admin API address (loopback only unless --admin-allow-remote).
    #[arg(long, default_value_t = defaults::ADMIN_ADDR)]
    admin: std::net::SocketAddr,
    #[arg(long)]
    admin_allow_remote: bool,
    /// Open client connections; past it new ones are closed at once.
    #[arg(long, default_value_t = defaults::GATEWAY_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds from accept to the end of the TLS handshake.
    #[arg(long, default_value_t = defaults::GATEWAY_HANDSHAKE_TIMEOUT.as_secs_f64())]
    handshake_timeout: f64,
    /// Seconds a client has to send a request's headers.
    #[arg(long, default_value_t = defaults::GATEWAY_HEADER_TIMEOUT.as_secs_f64())]
    header_timeout: f64,
    /// Seconds a client connection may stay without a request in flight.
    #[arg(long, default_value_t = defaults::GATEWAY_IDLE_TIMEOUT.as_secs_f64())]
    idle_timeout: f64,
    /// Largest request header block, in bytes.
    #[arg(long, default_value_t = defaults::GATEWAY_MAX_HEADER_BYTES)]
    max_header_bytes: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = defaults::PROXY_WORKERS)]
    worker_threads: usize,
    /// Istio's root namespace (mesh-wide policies).
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Export trace spans with OTLP/gRPC to this collector (`http://HOST:PORT`).
    #[arg(long, value_parser = crate::telemetry::trace::parse_endpoint)]
    otlp_endpoint: Option<String>,
}

/// `k=v,k=v` → labels.
fn parse_labels(s: &str) -> Result<crate::model::Labels, String> {
    s.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("`{kv}` is not key=value"))
        })
        .collect()
}

/// Seconds (a flag) → a duration; refused unless positive and finite.
fn seconds(flag: &str, s: f64) -> Result<std::time::Duration> {
    if !s.is_finite() || s <= 0.0 {
        anyhow::bail!("--{flag}: {s} is not a positive number of seconds");
    }
    Ok(std::time::Duration::from_secs_f64(s))
}

#[derive(Args)]
struct ControllerCmdArgs {
    /// Folder of Kubernetes-style YAML to serve (standalone).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API (in-cluster credentials, or --kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes (default: in-cluster, then KUBECONFIG).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The controller's namespace (Lease, CA Secret, agent service account).
    #[arg(long, env = "POD_NAMESPACE", default_value = defaults::CONTROLLER_NAMESPACE)]
    namespace: String,
    /// This replica's name in the leader Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Service account (in --namespace) whose projected tokens identify agents and proxies.
    #[arg(long, default_value = defaults::AGENT_SERVICE_ACCOUNT)]
    agent_service_account: String,
    /// Audience of the agents' projected tokens.
    #[arg(long, default_value = defaults::TOKEN_AUDIENCE)]
    token_audience: String,
    /// Name of the leader-election Lease in --namespace.
    #[arg(long, default_value = defaults::LEADER_LEASE)]
    leader_lease: String,
    /// How long a leader's lease lasts without renewal (renewed every third of it).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: std::time::Duration,
    /// Where the CA lives (created on first start, or Istio plug-in CA files). On Kubernetes
    /// the CA comes from a Secret and is written here.
    #[arg(long, default_value = defaults::CONTROLLER_STATE_DIR)]
    state_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value_t = std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), defaults::CONTROLLER))]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = defaults::TRUST_DOMAIN)]
    trust_domain: String,
    /// Workload certificate lifetime (e.g. 24h, 30m, 20s).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: std::time::Duration,
    /// Folder of node tokens: one file per node, named for it, holding its token (standalone;
    /// on Kubernetes, agents present projected service-account tokens instead).
    #[arg(long)]
    node_tokens: Option<PathBuf>,
}

/// A duration with `ms` as well as the units of [`parse_duration`].
fn parse_duration_ms(s: &str) -> Result<std::time::Duration, String> {
    match s.strip_suffix("ms") {
        Some(n) => n
            .parse::<u64>()
            .map(std::time::Duration::from_millis)
            .map_err(|_| format!("`{s}`: expected a number with ms, s, m or h")),
        None => parse_duration(s),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number with s, m or h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{s}`: unit must be s, m or h")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Args)]
struct ProxyArgs {
    #[arg(long, env = "SIDENODE_NODE")]
    node: String,
    #[command(flatten)]
    controller: ControllerArgs,
    /// Refuse (instead of connecting directly) destinations outside the mesh.
    #[arg(long)]
    no_direct_unmeshed: bool,
    /// Kernel TLS for HBONE/TCP tunnels after the rustls handshake: `auto` uses it when the
    /// kernel has the TLS ULP and the negotiated cipher (else userspace TLS), `off` never.
    #[arg(long, env = "SIDENODE_KTLS", value_enum, default_value_t = crate::proxy::hbone::ktls::Mode::Auto)]
    ktls: crate::proxy::hbone::ktls::Mode,
    /// Testing knob: retire a kernel-TLS tunnel after this many records in either direction
    /// (default 2^23, half of where a userspace peer re-keys).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    ktls_record_limit: Option<u64>,
    /// Prometheus metrics address (default: proxy-ip:15020).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Admin API address (`/config_dump`, `/connections`, `/healthz/ready`, `/logging`,
    /// `/pool/forget`). It has no authentication, so only a loopback address is accepted
    /// without --admin-allow-remote.
    #[arg(long, default_value_t = defaults::ADMIN_ADDR)]
    admin: std::net::SocketAddr,
    /// Accept a non-loopback --admin address: anyone who reaches it can read the mesh's
    /// topology and policies and change the log filter.
    #[arg(long)]
    admin_allow_remote: bool,
    /// Runtime worker threads. One keeps every hop of a connection on one CPU, which on small
    /// nodes halves the added latency (no cross-CPU wake-ups); raise it on large nodes.
    #[arg(long, default_value_t = defaults::PROXY_WORKERS)]
    worker_threads: usize,
    #[arg(long, default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// Address the outbound listener binds (the agent's `--proxy-ip`).
    #[arg(long)]
    proxy_ip: IpAddr,
    /// Also listen on this IPv6 address (the agent's `--proxy-ip6`).
    #[arg(long)]
    proxy_ip6: Option<std::net::Ipv6Addr>,
    #[arg(long, default_value_t = defaults::OUTBOUND)]
    outbound_port: u16,
    /// cgroup v2 folder below which local pods' network namespaces are found by pod UID (the
    /// agent's `--cgroup-root`: default the cgroup2 mount, a relative PATH below it).
    #[arg(long, env = "SIDENODE_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Istio's root namespace: its `AuthorizationPolicy`, `PeerAuthentication` and
    /// `RateLimitPolicy` objects apply to the whole mesh.
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Export trace spans with OTLP/gRPC to this collector (`http://HOST:PORT`, e.g. Jaeger's
    /// 4317). Without it tracing is off.
    #[arg(long, value_parser = crate::telemetry::trace::parse_endpoint)]
    otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled (default 100); a request's own sampled flag is kept.
    #[arg(long, requires = "otlp_endpoint", value_parser = crate::telemetry::trace::parse_sampling)]
    trace_sampling: Option<f64>,
    /// Connect to local meshed pods from the client pod's address (inside the pod's network
    /// namespace, with a mark rule there), so applications see their real clients. `false`:
    /// from the node's address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    keep_client_address: bool,
    /// Dial HBONE tunnels from inside the source pod's network namespace, so the destination
    /// (sidenode or ztunnel) sees the source pod's address on the tunnel, as with ztunnel's
    /// in-pod mode. `false`: from the node's address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    tunnel_from_pod: bool,
    /// Where /proc/sys/net is writable, for the pods' `tcp_fwmark_accept` (a container's own
    /// /proc/sys is read-only: mount the host's there).
    #[arg(long, default_value = defaults::PROC_SYS_NET)]
    proc_sys_net: PathBuf,
    /// Serve a hand-over socket (Unix, mode 0600) at PATH: a new proxy started with the same
    /// flags plus --takeover takes this one's listening sockets through it, and this one
    /// drains and exits (docs/operations.md). Without it, no hand-over is possible.
    #[arg(long, env = "SIDENODE_HANDOVER_SOCKET", value_name = "PATH")]
    handover_socket: Option<PathBuf>,
    /// Take over the listening sockets (outbound, admin, metrics, every pod's HBONE TCP
    /// listener) of the proxy serving --handover-socket, once this one has the mesh's state;
    /// that proxy then stops accepting and drains. With no proxy serving it, start afresh.
    #[arg(long, requires = "handover_socket")]
    takeover: bool,
    /// This proxy's pod uid (Kubernetes: from the downward API). After a hand-over the pod is
    /// marked retired beside the hand-over socket, so that its container, restarted by the
    /// kubelet before the pod is deleted, idles instead of taking the sockets back.
    #[arg(long, env = "SIDENODE_POD_UID", requires = "handover_socket")]
    pod_uid: Option<String>,
    /// After SIGTERM or a hand-over, how long open connections may go on before the proxy
    /// closes them and exits (`30s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: std::time::Duration,
    /// A pooled outbound HBONE connection (HTTP/2 or QUIC) that carried no tunnel for this
    /// long is closed (`5m`, `30s`; ztunnel's `POOL_UNUSED_RELEASE_TIMEOUT`).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pool_idle_timeout: std::time::Duration,
    /// Captured connections carried at once; past it a new one is reset at accept (counted in
    /// `sidenode_connections_refused_total{direction="outbound",reason="proxy_limit"}`).
    #[arg(long, default_value_t = defaults::MAX_CONNECTIONS, value_parser = parse_limit)]
    max_connections: usize,
    /// Captured connections of one source pod at once; past it the pod's new ones are reset
    /// (`reason="source_limit"`).
    #[arg(long, default_value_t = defaults::MAX_CONNECTIONS_PER_WORKLOAD, value_parser = parse_limit)]
    max_connections_per_workload: usize,
    /// Inbound tunnels (HBONE streams over HTTP/2 or QUIC, same-node connections) served at
    /// once; past it a `CONNECT` is answered 503 (`direction="inbound",reason="proxy_limit"`).
    #[arg(long, default_value_t = defaults::MAX_INBOUND_TUNNELS, value_parser = parse_limit)]
    max_inbound_tunnels: usize,
    /// Inbound tunnels from one peer identity at once (`reason="source_limit"`).
    #[arg(long, default_value_t = defaults::MAX_INBOUND_TUNNELS_PER_IDENTITY, value_parser = parse_limit)]
    max_inbound_tunnels_per_identity: usize,
}

/// The admin API for the proxy to bind (or take over) and serve.
fn admin_endpoint(settings: crate::admin::Settings) -> crate::proxy::AdminEndpoint {
    let addr = settings.addr;
    crate::proxy::AdminEndpoint {
        addr,
        bind: std::sync::Arc::new(move || Ok(crate::admin::bind(&settings)?)),
        serve: std::sync::Arc::new(|listener, status| {
            tokio::spawn(crate::admin::serve(listener, status));
        }),
    }
}

/// A connection limit: a whole number of at least 1.
fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(format!("`{s}`: a limit must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}`: expected a whole number of connections")),
    }
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.cmd {
        Cmd::Agent(a) => {
            crate::policy::set_root_namespace(&a.root_namespace);
            let cgroup_root = crate::kernel::mounts::resolve_cgroup_root(a.cgroup_root.as_deref())?;
            let cfg = crate::agent::AgentConfig {
                node: a.node,
                source: match a.controller.settings() {
                    Some(c) => crate::agent::Source::Controller(c),
                    None => crate::agent::Source::Files(a.config.unwrap_or_default()),
                },
                cgroup_root,
                bpffs: a.bpffs,
                proxy_ip: a.proxy_ip,
                proxy_ip6: a.proxy_ip6,
                outbound_port: a.outbound_port,
                exclude_ports: a.exclude_ports,
                exclude_cidrs: a.exclude_cidrs,
                splice: a.splice,
                scan_interval: defaults::SCAN_INTERVAL,
                resync_interval: defaults::RESYNC_INTERVAL,
                retry_interval: defaults::RETRY_INTERVAL,
                pod_status: a.pod_status.then_some(crate::agent::status::StatusConfig {
                    kubeconfig: a.kubeconfig,
                    advertise_hbone: a.advertise_hbone,
                }),
                cni: a.cni_socket.map(|socket| crate::agent::cni::CniSettings {
                    socket,
                    wait: a.cni_wait,
                }),
                object: crate::kernel::load::ObjectChoice {
                    build_id: a.ebpf_build_id,
                    orig_dst_max: Some(a.orig_dst_max),
                },
            };
            runtime(None)?.block_on(crate::agent::run(cfg))
        }
        Cmd::Proxy(p) => {
            crate::kernel::rlimit::raise_nofile_logged("proxy");
            let cfg = crate::proxy::ProxyConfig {
                node: p.node,
                bpffs: p.bpffs,
                proxy_ip: p.proxy_ip,
                proxy_ip6: p.proxy_ip6,
                outbound_port: p.outbound_port,
                connect_timeout: defaults::CONNECT_TIMEOUT,
                drain_timeout: p.drain_timeout,
                pool_idle_timeout: p.pool_idle_timeout,
                controller: p.controller.settings(),
                direct_unmeshed: !p.no_direct_unmeshed,
                metrics_addr: Some(
                    p.metrics
                        .unwrap_or(std::net::SocketAddr::new(p.proxy_ip, defaults::METRICS)),
                ),
                admin: Some(admin_endpoint(crate::admin::Settings {
                    addr: p.admin,
                    allow_remote: p.admin_allow_remote,
                })),
                cgroup_root: match p.cgroup_root {
                    Some(c) => Some(crate::kernel::mounts::resolve_cgroup_root(Some(&c))?),
                    None => crate::kernel::load::default_cgroup_root(),
                },
                retry_interval: defaults::RETRY_INTERVAL,
                tracing: p
                    .otlp_endpoint
                    .map(|endpoint| crate::telemetry::trace::Settings {
                        endpoint,
                        sampling_percent: p
                            .trace_sampling
                            .unwrap_or(crate::telemetry::trace::DEFAULT_SAMPLING_PERCENT),
                    }),
                keep_client_address: p.keep_client_address,
                tunnel_from_pod: p.tunnel_from_pod,
                proc_sys_net: p.proc_sys_net,
                handover_socket: p.handover_socket,
                takeover: p.takeover,
                pod_uid: p.pod_uid,
                conn_limits: crate::proxy::ConnLimits {
                    max_connections: p.max_connections,
                    max_connections_per_workload: p.max_connections_per_workload,
                    max_inbound_tunnels: p.max_inbound_tunnels,
                    max_inbound_tunnels_per_identity: p.max_inbound_tunnels_per_identity,
                },
            };
            crate::policy::set_root_namespace(&p.root_namespace);
            crate::proxy::hbone::ktls::set_mode(p.ktls);
            if let Some(n) = p.ktls_record_limit {
                crate::proxy::hbone::ktls::set_record_limit(n);
            }
            let status = crate::proxy::status::Status::new(&cfg.node, cfg.controller.is_some());
            runtime(Some(p.worker_threads))?.block_on(crate::proxy::run(cfg, status))
        }
        Cmd::Gateway(g) => {
            let Some(controller) = g.controller.settings() else {
                anyhow::bail!("the gateway needs --controller, --controller-ca and --token-file");
            };
            let cfg = crate::gateway::GatewayConfig {
                controller,
                namespace: g.namespace,
                pod: g.pod,
                service_account: g.service_account,
                labels: g.labels,
                class: g.class,
                listen: g.listen_address,
                secrets: match g.secrets_dir {
                    Some(d) => crate::gateway::secrets::SecretSource::Dir(d),
                    None => crate::gateway::secrets::SecretSource::Kubernetes,
                },
                metrics_addr: Some(g.metrics),
                admin: Some(crate::admin::Settings {
                    addr: g.admin,
                    allow_remote: g.admin_allow_remote,
                }),
                connect_timeout: defaults::CONNECT_TIMEOUT,
                limits: crate::gateway::EdgeLimits {
                    max_connections: g.max_connections,
                    handshake_timeout: seconds("handshake-timeout", g.handshake_timeout)?,
                    header_timeout: seconds("header-timeout", g.header_timeout)?,
                    idle_timeout: seconds("idle-timeout", g.idle_timeout)?,
                    max_header_bytes: g.max_header_bytes,
                },
                tracing: g
                    .otlp_endpoint
                    .map(|endpoint| crate::telemetry::trace::Settings {
                        endpoint,
                        sampling_percent: crate::telemetry::trace::DEFAULT_SAMPLING_PERCENT,
                    }),
            };
            crate::policy::set_root_namespace(&g.root_namespace);
            runtime(Some(g.worker_threads))?.block_on(crate::gateway::run(cfg))
        }
        Cmd::Controller(c) => {
            let source = match c.config {
                Some(dir) => crate::controller::SourceConfig::Folder(dir),
                None => {
                    crate::controller::SourceConfig::Kubernetes(crate::controller::KubeSettings {
                        kubeconfig: c.kubeconfig,
                        namespace: c.namespace,
                        pod_name: c.pod_name.unwrap_or_else(host_name),
                        agent_service_account: c.agent_service_account,
                        token_audience: c.token_audience,
                        lease_name: c.leader_lease,
                        lease_duration: c.lease_duration,
                    })
                }
            };
            let kubernetes = c.kubernetes;
            let cfg = crate::controller::ControllerConfig {
                source,
                state_dir: c.state_dir,
                listen: c.listen,
                trust_domain: c.trust_domain,
                cert_ttl: c.cert_ttl,
                node_tokens: c.node_tokens,
                scan_interval: if kubernetes {
                    defaults::KUBE_SCAN_INTERVAL
                } else {
                    defaults::SCAN_INTERVAL
                },
            };
            runtime(None)?.block_on(crate::controller::run(cfg))
        }
        Cmd::Maps(m) => maps::run(m),
        Cmd::State(a) => runtime(Some(1))?.block_on(state::run(a)),
        Cmd::Config(a) => runtime(Some(1))?.block_on(config::run(a)),
        Cmd::LogLevel(a) => runtime(Some(1))?.block_on(config::log_level(a)),
        Cmd::Doctor(a) => {
            if !runtime(Some(1))?.block_on(doctor::run(a))? {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::MountBpffs { bpffs, mount_ns } => {
            use crate::kernel::mounts::{BpffsAction, ensure_shared_bpffs};
            let done = match ensure_shared_bpffs(&bpffs, &mount_ns)? {
                BpffsAction::Present => "a shared bpffs is already mounted",
                BpffsAction::MadeShared => "a private bpffs was mounted: made it shared",
                BpffsAction::Mounted => "no bpffs was mounted: mounted one, shared",
            };
            println!("{}: {done}", bpffs.display());
            Ok(())
        }
        Cmd::Uninstall {
            bpffs,
            cni_conf_dir,
            cni_bin_dir,
        } => {
            crate::kernel::load::uninstall(&crate::kernel::Pins::new(bpffs))?;
            if let Some(conf_dir) = cni_conf_dir {
                cni::uninstall(&conf_dir, cni_bin_dir.as_deref())?;
            }
            Ok(())
        }
        Cmd::Cni(c) => cni::run(c),
        Cmd::Completions { shell } => {
            reference::completions(shell);
            Ok(())
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "sidenode-controller".into())
}

/// A multi-threaded runtime; `workers` threads, or tokio's default (one per CPU).
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n.max(1));
    }
    Ok(b.enable_all().build()?)
}
