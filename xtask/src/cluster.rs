//! `cargo xtask cluster up|down|status`: the simulated cluster of `sidenode_tests::cluster`.

use anyhow::{Result, bail};
use clap::Subcommand;
use sidenode_tests::cluster::{Cluster, ClusterOpts};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Create namespaces, veths, cgroups, bpffs and config; start an agent and proxy per node.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Pods per node (the last one is in namespace `plain`, not enrolled).
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Prefix of every namespace, folder and mount (≤ 6 chars of [a-z0-9]).
        #[arg(long, default_value = "sn")]
        prefix: String,
        /// Only the network, cgroups, bpffs and config: start no agents or proxies.
        #[arg(long)]
        no_agents: bool,
    },
    /// Kill everything, remove namespaces, cgroups, the bpffs mount and the state folder.
    Down {
        #[arg(long, default_value = "sn")]
        prefix: String,
    },
    /// Show nodes and pods.
    Status {
        #[arg(long, default_value = "sn")]
        prefix: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Up {
            nodes,
            pods,
            prefix,
            no_agents,
        } => {
            let mesh_node = crate::mesh_node_bin();
            if !no_agents && !mesh_node.exists() {
                bail!(
                    "{} not found: run `cargo xtask build` first (or use --no-agents)",
                    mesh_node.display()
                );
            }
            let c = Cluster::up(ClusterOpts {
                prefix: prefix.clone(),
                nodes,
                pods,
                mesh_node,
                start_agents: !no_agents,
            })?;
            print_table(&c);
            println!(
                "\nstate in {}; tear down with `cargo xtask cluster down --prefix {prefix}`",
                c.state_dir.display()
            );
            Ok(())
        }
        ClusterCmd::Down { prefix } => {
            Cluster::down(&prefix);
            println!("cluster {prefix} is down");
            Ok(())
        }
        ClusterCmd::Status { prefix, json } => {
            let mut c = Cluster::load(&prefix)?;
            if json {
                println!("{}", c.status_json()?);
            } else {
                print_table(&c);
                for node in c.node_names() {
                    for kind in ["agent", "proxy"] {
                        if let Some(pid) = c.pid(&node, kind) {
                            let state = if c.is_alive(&node, kind) {
                                "running"
                            } else {
                                "dead"
                            };
                            println!("{node} {kind}: pid {pid} {state}");
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

fn print_table(c: &Cluster) {
    let st = c.status();
    println!("{:<12} {:<14} {:<14}", "NODE", "NETNS", "IP (proxy)");
    for n in &st.nodes {
        println!("{:<12} {:<14} {:<14}", n.name, n.netns, n.ip);
    }
    println!();
    println!(
        "{:<12} {:<10} {:<8} {:<12} {:<12} CGROUP",
        "POD", "NAMESPACE", "NODE", "NETNS", "IP"
    );
    for p in &st.pods {
        println!(
            "{:<12} {:<10} {:<8} {:<12} {:<12} {}",
            p.name,
            p.namespace,
            p.node,
            p.netns,
            p.ip,
            p.cgroup.display()
        );
    }
    println!();
    println!("config: {}", st.config_dir.display());
    println!(
        "bpffs:  {} (node i pins under node<i>/)",
        st.bpffs.display()
    );
}
