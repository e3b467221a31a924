//! The `mesh-node` command line: one binary for the agent, the proxy and the operator views.

pub mod maps;

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
    /// Show the kernel's maps: enrolled workloads, original destinations, counters.
    Maps(maps::MapsArgs),
    /// Remove every sidenode pin from a bpffs (detaches the capture programs).
    Uninstall {
        #[arg(long, default_value = defaults::BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// This node's name (pods with `spec.nodeName` equal to it are enrolled here).
    #[arg(long, env = "SIDENODE_NODE")]
    node: String,
    /// Folder of Kubernetes-style YAML (Namespace, Pod, Service) to watch.
    #[arg(long)]
    config: PathBuf,
    /// cgroup v2 folder the capture programs attach to (default: the cgroup2 mount).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// bpffs folder for pins (`<bpffs>/sidenode/...`).
    #[arg(long, default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// The node proxy's IPv4 address; captured connections go to `proxy-ip:outbound-port`.
    #[arg(long)]
    proxy_ip: Ipv4Addr,
    #[arg(long, default_value_t = defaults::OUTBOUND)]
    outbound_port: u16,
    /// Destination ports never captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Destination CIDRs never captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_cidrs: Vec<IpNet>,
}

#[derive(Args)]
struct ProxyArgs {
    #[arg(long, env = "SIDENODE_NODE")]
    node: String,
    #[arg(long, default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// Address the outbound listener binds (the agent's `--proxy-ip`).
    #[arg(long)]
    proxy_ip: IpAddr,
    #[arg(long, default_value_t = defaults::OUTBOUND)]
    outbound_port: u16,
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.cmd {
        Cmd::Agent(a) => {
            let cgroup_root = match a.cgroup_root {
                Some(p) => p,
                None => crate::kernel::load::default_cgroup_root()
                    .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount found; pass --cgroup-root"))?,
            };
            let cfg = crate::agent::AgentConfig {
                node: a.node,
                config_dir: a.config,
                cgroup_root,
                bpffs: a.bpffs,
                proxy_ip: a.proxy_ip,
                outbound_port: a.outbound_port,
                exclude_ports: a.exclude_ports,
                exclude_cidrs: a.exclude_cidrs,
                scan_interval: defaults::SCAN_INTERVAL,
                resync_interval: defaults::RESYNC_INTERVAL,
            };
            runtime()?.block_on(crate::agent::run(cfg))
        }
        Cmd::Proxy(p) => {
            let cfg = crate::proxy::ProxyConfig {
                node: p.node,
                bpffs: p.bpffs,
                proxy_ip: p.proxy_ip,
                outbound_port: p.outbound_port,
                connect_timeout: defaults::CONNECT_TIMEOUT,
                drain_timeout: defaults::DRAIN_TIMEOUT,
            };
            runtime()?.block_on(crate::proxy::run(cfg))
        }
        Cmd::Maps(m) => maps::run(m),
        Cmd::Uninstall { bpffs } => {
            crate::kernel::load::uninstall(&crate::kernel::Pins::new(bpffs))?;
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
