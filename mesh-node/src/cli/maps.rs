//! `mesh-node maps`: the kernel's view, read straight from the pinned maps (works while the
//! agent is down).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mesh_common::name_str;
use serde::Serialize;

use crate::defaults;
use crate::kernel::Pins;
use crate::kernel::maps::{NodeMaps, addr_to_ip, orig_dst_addr};

#[derive(Args)]
pub struct MapsArgs {
    #[arg(long, default_value = defaults::BPFFS)]
    bpffs: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
pub(crate) struct Enrolled {
    pub(crate) netns_cookie: u64,
    pub(crate) pod: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) ip: String,
}

#[derive(Serialize)]
struct OrigDstEntry {
    client: String,
    dst: String,
    netns_cookie: u64,
    pod: String,
    namespace: String,
}

/// One `SN_STRICT` entry: a pod address, a port (0 = the workload) and its mode.
#[derive(Serialize)]
struct StrictEntry {
    ip: String,
    port: u16,
    mode: &'static str,
}

/// One socket in `SN_SPLICE`: its own connection and how its messages travel.
#[derive(Serialize)]
struct SpliceEntry {
    local: String,
    remote: String,
    /// `connecting` (the active end: a captured pod's socket, or the proxy's to a pod) or
    /// `accepted`.
    side: &'static str,
    /// `spliced` (messages go to the peer's receive queue) or `plain` (its first message found
    /// no peer, so it keeps the normal path).
    path: &'static str,
}

#[derive(Serialize)]
pub(crate) struct View {
    pub(crate) enrolled: Vec<Enrolled>,
    strict: Vec<StrictEntry>,
    orig_dst: Vec<OrigDstEntry>,
    /// `None`: the pinned maps predate splicing.
    splice: Option<Vec<SpliceEntry>>,
    pending: usize,
    pub(crate) stats: serde_json::Map<String, serde_json::Value>,
}

pub fn run(args: MapsArgs) -> Result<()> {
    let maps = NodeMaps::open(&Pins::new(&args.bpffs))?;
    let view = read(&maps);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print_tables(&view);
    }
    Ok(())
}

pub(crate) fn read(maps: &NodeMaps) -> View {
    let mut enrolled: Vec<Enrolled> = maps
        .enrolled
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, w)| Enrolled {
            netns_cookie: cookie,
            pod: name_str(&w.name).to_string(),
            namespace: name_str(&w.namespace).to_string(),
            service_account: name_str(&w.service_account).to_string(),
            ip: addr_to_ip(&w.addr).to_string(),
        })
        .collect();
    enrolled.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    let mut orig_dst: Vec<OrigDstEntry> = maps
        .orig_dst
        .iter()
        .filter_map(Result::ok)
        .map(|(k, o)| {
            let who = enrolled.iter().find(|e| e.netns_cookie == o.netns_cookie);
            OrigDstEntry {
                client: std::net::SocketAddr::new(addr_to_ip(&k.addr), k.port).to_string(),
                dst: orig_dst_addr(&o).to_string(),
                netns_cookie: o.netns_cookie,
                pod: who.map(|e| e.pod.clone()).unwrap_or_default(),
                namespace: who.map(|e| e.namespace.clone()).unwrap_or_default(),
            }
        })
        .collect();
    orig_dst.sort_by(|a, b| a.client.cmp(&b.client));
    let mut strict: Vec<StrictEntry> = maps
        .strict
        .iter()
        .filter_map(Result::ok)
        .map(|(k, mode)| StrictEntry {
            ip: addr_to_ip(&k.addr).to_string(),
            port: k.port,
            mode: match mode {
                mesh_common::MTLS_STRICT => "STRICT",
                mesh_common::MTLS_PERMISSIVE => "PERMISSIVE",
                mesh_common::MTLS_DISABLE => "DISABLE",
                _ => "?",
            },
        })
        .collect();
    strict.sort_by(|a, b| (&a.ip, a.port).cmp(&(&b.ip, b.port)));
    let pending = maps.pending.keys().filter_map(Result::ok).count();
    let splice = maps.splice.as_ref().map(|sp| {
        let mut v: Vec<SpliceEntry> = sp
            .sockets
            .keys()
            .filter_map(Result::ok)
            .map(|k| {
                let flags = sp.state.get(&k, 0).unwrap_or(0);
                SpliceEntry {
                    local: std::net::SocketAddr::new(addr_to_ip(&k.local), k.local_port)
                        .to_string(),
                    remote: std::net::SocketAddr::new(addr_to_ip(&k.remote), k.remote_port)
                        .to_string(),
                    side: if flags & mesh_common::SPLICE_F_LEG != 0 {
                        "connecting"
                    } else {
                        "accepted"
                    },
                    path: if flags & mesh_common::SPLICE_F_PLAIN != 0 {
                        "plain"
                    } else {
                        "spliced"
                    },
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.local, &a.remote).cmp(&(&b.local, &b.remote)));
        v
    });
    let stats = maps
        .stats()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    View {
        enrolled,
        strict,
        orig_dst,
        splice,
        pending,
        stats,
    }
}

fn print_tables(v: &View) {
    println!("ENROLLED WORKLOADS ({})", v.enrolled.len());
    println!(
        "{:<20} {:<16} {:<32} {:<20} IP",
        "NETNS COOKIE", "NAMESPACE", "POD", "SERVICE ACCOUNT"
    );
    for e in &v.enrolled {
        println!(
            "{:<20} {:<16} {:<32} {:<20} {}",
            e.netns_cookie, e.namespace, e.pod, e.service_account, e.ip
        );
    }
    println!();
    println!("PEER AUTHENTICATION IN THE KERNEL ({})", v.strict.len());
    println!("{:<40} {:<6} MODE", "POD IP", "PORT");
    for e in &v.strict {
        let port = if e.port == 0 {
            "*".to_string()
        } else {
            e.port.to_string()
        };
        println!("{:<40} {:<6} {}", e.ip, port, e.mode);
    }
    println!();
    println!(
        "ORIGINAL DESTINATIONS ({} live, {} pending)",
        v.orig_dst.len(),
        v.pending
    );
    println!(
        "{:<24} {:<24} {:<16} POD",
        "CLIENT", "ORIGINAL DST", "NAMESPACE"
    );
    for o in &v.orig_dst {
        println!(
            "{:<24} {:<24} {:<16} {}",
            o.client, o.dst, o.namespace, o.pod
        );
    }
    println!();
    match &v.splice {
        Some(sp) => {
            println!("SPLICED LOCAL LEGS ({} sockets)", sp.len());
            println!("{:<44} {:<44} {:<11} PATH", "LOCAL", "REMOTE", "SIDE");
            for e in sp {
                println!("{:<44} {:<44} {:<11} {}", e.local, e.remote, e.side, e.path);
            }
        }
        None => println!("SPLICED LOCAL LEGS: not installed (pins of an older version)"),
    }
    println!();
    println!("COUNTERS");
    for (k, val) in &v.stats {
        println!("{k:<16} {val}");
    }
}
