//! `cargo xtask cluster up|down|status`: the simulated cluster of `sidenode_tests::cluster`;
//! with `--real`, the real two-node Kubernetes cluster of `sidenode_tests::realnode`.

use anyhow::{Result, bail};
use clap::Subcommand;
use sidenode_tests::cluster::{CONTROLLER, Cluster, ClusterOpts, GATEWAY};

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
        /// Mesh mode: run a controller (198.18.0.254:15012 in `<prefix>-net`) and connect
        /// agents and proxies to it (HBONE mTLS between meshed pods).
        #[arg(long)]
        mesh: bool,
        /// Workload certificate lifetime for the controller (e.g. 24h, 30m, 20s); needs --mesh.
        #[arg(long, requires = "mesh")]
        cert_ttl: Option<String>,
        /// Kubernetes mode (implies --mesh): a real kube-apiserver in `<prefix>-net` holds the
        /// Namespaces, Nodes and Pods; the controller reads it; agents find pods by UID.
        /// Needs `deploy/kube-testenv.sh install` (run by `cargo xtask setup`).
        #[arg(long)]
        kube: bool,
        /// Real nodes: kubelet + containerd + kube-proxy per node (`--nodes`, 1 to 9) in
        /// namespaces of their own, kube-apiserver in `<prefix>-net`, images built from
        /// target/debug, and the mesh applied through deploy/kubernetes/overlays/testenv
        /// (without it with --no-agents). Needs `deploy/kube-testenv.sh install --node` (run
        /// by `cargo xtask setup`). State in /var/tmp/sidenode-real-<prefix>.
        #[arg(long, conflicts_with_all = ["kube", "mesh", "cert_ttl"])]
        real: bool,
        /// Ingress gateway (needs --mesh or --kube): `mesh-node gateway` in `<prefix>-gw`
        /// (198.19.1.254, as the pod istio-ingress/sidenode-gateway of node 1; log
        /// logs/gateway.log) and an `<prefix>-out` namespace (203.0.113.2) that reaches only
        /// the gateway (203.0.113.1). Gateway objects go in the config folder (with --kube:
        /// the API server), TLS Secrets in the config folder.
        #[arg(long, conflicts_with = "real")]
        gateway: bool,
    },
    /// Kill everything, remove namespaces, cgroups, the bpffs mount and the state folder.
    Down {
        #[arg(long, default_value = "sn")]
        prefix: String,
        /// The real cluster (`up --real`) with this prefix.
        #[arg(long)]
        real: bool,
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
            mesh,
            cert_ttl,
            kube,
            real,
            gateway,
        } => {
            let mesh_node = crate::mesh_node_bin();
            if real {
                return real_up(&prefix, nodes, &mesh_node, !no_agents);
            }
            if !no_agents && !mesh_node.exists() {
                bail!(
                    "{} not found: run `cargo xtask build` first (or use --no-agents)",
                    mesh_node.display()
                );
            }
            let mut c = Cluster::up(ClusterOpts {
                prefix: prefix.clone(),
                nodes,
                pods,
                mesh_node,
                start_agents: !no_agents,
                mesh,
                cert_ttl,
                agent_args: Vec::new(),
                proxy_args: Vec::new(),
                kube,
                cni: false,
                gateway,
                gateway_args: Vec::new(),
            })?;
            if kube {
                c.detach_kube();
                println!(
                    "kube-apiserver: kubectl --kubeconfig {}/kubeconfig (run inside `nsenter --net=/var/run/netns/{prefix}-net`)",
                    sidenode_tests::kube::kube_env_dir(&prefix).display()
                );
            }
            print_table(&c);
            println!(
                "\nstate in {}; tear down with `cargo xtask cluster down --prefix {prefix}`",
                c.state_dir.display()
            );
            Ok(())
        }
        ClusterCmd::Down { prefix, real: true } => {
            sidenode_tests::realnode::down_leftover(&prefix);
            println!("real cluster {prefix} is down");
            Ok(())
        }
        ClusterCmd::Down {
            prefix,
            real: false,
        } => {
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
                if let Some(pid) = c.pid(CONTROLLER, CONTROLLER) {
                    let state = if c.is_alive(CONTROLLER, CONTROLLER) {
                        "running"
                    } else {
                        "dead"
                    };
                    println!("controller: pid {pid} {state}");
                }
                if let Some(pid) = c.pid(GATEWAY, GATEWAY) {
                    let state = if c.is_alive(GATEWAY, GATEWAY) {
                        "running"
                    } else {
                        "dead"
                    };
                    println!("gateway: pid {pid} {state}");
                }
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

fn real_up(prefix: &str, nodes: usize, mesh_node: &std::path::Path, mesh: bool) -> Result<()> {
    use sidenode_tests::realnode::RealCluster;
    let testpod = mesh_node.with_file_name("testpod");
    for b in [mesh_node, testpod.as_path()] {
        if !b.exists() {
            bail!("{} not found: run `cargo xtask build` first", b.display());
        }
    }
    let t = std::time::Instant::now();
    let c = RealCluster::up_with(prefix, nodes, mesh_node, &testpod)?;
    if mesh {
        c.deploy_mesh()?;
    }
    println!("{}", c.kubectl(&["get", "nodes,pods", "-A", "-o", "wide"])?);
    println!(
        "real cluster {prefix} up in {:.0?}: kubectl --kubeconfig {} (inside `nsenter --net={}`); \
         nodes' logs in {}/n<i>/logs;\ntear down with `cargo xtask cluster down --real --prefix {prefix}`",
        t.elapsed(),
        c.kubeconfig.display(),
        c.fabric_netns().display(),
        c.dir.display()
    );
    c.detach();
    Ok(())
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
    if c.opts.mesh {
        println!(
            "controller: {} (state {}, tokens {}, log {})",
            c.controller_addr(),
            c.controller_state_dir().display(),
            c.tokens_dir().display(),
            c.controller_log_path().display()
        );
    }
    if let (Some(gw), Some(out)) = (&st.gateway, &st.outside) {
        println!(
            "gateway: netns {} ({} for outside clients, {} in the cluster; http {}, https {}; pod {}; log {})",
            gw.netns,
            gw.ip,
            gw.cluster_ip,
            gw.http_port,
            gw.https_port,
            gw.pod,
            c.gateway_log_path().display()
        );
        println!(
            "outside: netns {} ({}), e.g. `nsenter --net=/var/run/netns/{} curl http://{}/`",
            out.netns, out.ip, out.netns, gw.ip
        );
    }
}
