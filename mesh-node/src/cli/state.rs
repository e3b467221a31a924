//! `mesh-node state`: what the controller serves to a node — workloads, services, Istio
//! objects and mesh settings — fetched with the node's credentials (the first snapshot of the
//! state stream), as a table or JSON. The counterpart of `mesh-node maps` for the control plane.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::identity::controller::{ControllerSettings, channel};
use crate::proto;
use crate::state::client::state_client;

#[derive(Args)]
pub struct StateArgs {
    /// Controller gRPC address `host:port`.
    #[arg(long)]
    controller: String,
    /// PEM root the controller's certificate chains to.
    #[arg(long)]
    controller_ca: std::path::PathBuf,
    /// The node's bootstrap token file (node token, or projected service-account token).
    #[arg(long)]
    token_file: std::path::PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: StateArgs) -> Result<()> {
    let conn = channel(&ControllerSettings {
        addr: a.controller.clone(),
        ca_file: a.controller_ca,
        token_file: a.token_file,
    })?;
    let mut client = state_client(&conn);
    let mut stream = client
        .watch(proto::WatchRequest { known_version: 0 })
        .await
        .with_context(|| format!("state stream from {}", a.controller))?
        .into_inner();
    let Some(snap) = stream
        .message()
        .await
        .with_context(|| format!("reading the state from {}", a.controller))?
    else {
        bail!("{}: the stream ended before the snapshot", a.controller);
    };
    let v = to_json(&snap);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&snap);
    }
    Ok(())
}

fn map(m: &std::collections::HashMap<String, String>) -> BTreeMap<&String, &String> {
    m.iter().collect()
}

fn to_json(s: &proto::StateUpdate) -> Value {
    let workloads: Vec<Value> = s
        .workloads
        .iter()
        .map(|w| {
            json!({"uid": w.uid, "namespace": w.namespace, "name": w.name, "node": w.node,
                   "service_account": w.service_account, "ips": w.ips, "meshed": w.meshed,
                   "dataplane": crate::admin::config_dump::dataplane_name(w.served_by()),
                   "ready": w.ready, "pod_uid": w.pod_uid, "labels": map(&w.labels)})
        })
        .collect();
    let services: Vec<Value> = s
        .services
        .iter()
        .map(|v| {
            let ports: Vec<Value> = v
                .ports
                .iter()
                .map(|p| {
                    json!({"name": p.name, "port": p.port, "target_port": p.target_port,
                                "target_port_name": p.target_port_name, "protocol": p.protocol,
                                "app_protocol": p.app_protocol})
                })
                .collect();
            json!({"uid": v.uid, "cluster_ip": v.cluster_ip, "ports": ports,
                   "selector": map(&v.selector)})
        })
        .collect();
    let configs: Vec<Value> = s
        .configs
        .iter()
        .map(|c| {
            let spec: Value = serde_json::from_str(&c.spec_json).unwrap_or(Value::Null);
            json!({"uid": c.uid, "kind": c.kind, "namespace": c.namespace, "name": c.name,
                   "spec": spec.get("spec").cloned().unwrap_or(Value::Null)})
        })
        .collect();
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| json!({"name": n.name, "ip": n.ip}))
        .collect();
    let settings = s.settings.clone().unwrap_or_default();
    json!({
        "version": s.version,
        "trust_domain": s.trust_domain,
        "workloads": workloads,
        "services": services,
        "nodes": nodes,
        "configs": configs,
        "settings": {"exclude_ports": settings.exclude_ports, "exclude_cidrs": settings.exclude_cidrs},
    })
}

fn print_text(s: &proto::StateUpdate) {
    println!(
        "STATE version {} (trust domain {})",
        s.version, s.trust_domain
    );
    println!("\nWORKLOADS ({})", s.workloads.len());
    println!(
        "{:<32} {:<10} {:<18} {:<9} {:<6} SERVICE ACCOUNT",
        "POD", "NODE", "IP", "DATAPLANE", "READY"
    );
    for w in &s.workloads {
        println!(
            "{:<32} {:<10} {:<18} {:<9} {:<6} {}",
            w.uid,
            w.node,
            w.ips.first().map(String::as_str).unwrap_or("-"),
            crate::admin::config_dump::dataplane_name(w.served_by()),
            w.ready,
            w.service_account
        );
    }
    println!("\nSERVICES ({})", s.services.len());
    for v in &s.services {
        let ports: Vec<String> = v
            .ports
            .iter()
            .map(|p| format!("{}->{}", p.port, p.target_port))
            .collect();
        let ip = if v.cluster_ip.is_empty() {
            "None"
        } else {
            &v.cluster_ip
        };
        println!("{:<32} {:<18} {}", v.uid, ip, ports.join(","));
    }
    println!("\nCONFIGS ({})", s.configs.len());
    for c in &s.configs {
        println!("{}", c.uid);
    }
    if let Some(st) = &s.settings
        && (!st.exclude_ports.is_empty() || !st.exclude_cidrs.is_empty())
    {
        println!(
            "\nSETTINGS exclude ports {:?}, exclude CIDRs {:?}",
            st.exclude_ports, st.exclude_cidrs
        );
    }
}
