//! `mesh-node config <view>` and `mesh-node log-level`: what a node proxy holds, read from its
//! admin API (`127.0.0.1:15000`, so run them on the node: in its network namespace), as
//! tables or JSON — in the spirit of `istioctl ztunnel-config`. The kernel's side is
//! `mesh-node maps`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Empty};
use serde::Deserialize;
use serde_json::Value;

use super::table::{human_secs, render};
use crate::admin::config_dump::{ConfigDump, ConfigView};
use crate::defaults;

#[derive(Args)]
pub struct ConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    view: View,
    /// The node proxy's admin API (`mesh-node proxy --admin`).
    #[arg(long, default_value_t = defaults::ADMIN_ADDR)]
    admin: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum View {
    /// Every workload of the mesh the proxy knows (namespace, name, IP, node, identity).
    Workloads,
    /// Services with their VIP, ports and endpoints.
    Services,
    /// AuthorizationPolicy, PeerAuthentication, RateLimitPolicy, VirtualService,
    /// DestinationRule objects, with a summary.
    Policies,
    /// The workload certificates the proxy holds (public parts).
    Certificates,
    /// The proxy's open connections.
    Connections,
    /// All of the above.
    All,
}

#[derive(Args)]
pub struct LogLevelArgs {
    /// A level for every target (trace, debug, info, warn, error, off) or filter directives in
    /// `RUST_LOG` syntax (`info,access=off,mesh_node::proxy=debug`). Without it: show the
    /// filter in force.
    filter: Option<String>,
    /// The node proxy's admin API (`mesh-node proxy --admin`).
    #[arg(long, default_value_t = defaults::ADMIN_ADDR)]
    admin: SocketAddr,
    /// Print the admin API's JSON answer.
    #[arg(long)]
    json: bool,
    /// Switch the kernel programs' decision logs instead (read from the pins under
    /// --bpffs, written to the agent's log): FILTER is `off`, `all`, or enrolled pods
    /// `namespace/name[,namespace/name...]`. Without FILTER: show what is logged.
    #[arg(long)]
    kernel: bool,
    /// bpffs folder of the pins, with --kernel.
    #[arg(long, default_value = defaults::BPFFS, requires = "kernel")]
    bpffs: std::path::PathBuf,
}

/// `mesh-node log-level --kernel [off|all|NS/NAME,...]`: the pinned switch of the kernel
/// programs' logs.
pub fn kernel_log_level(a: &LogLevelArgs) -> Result<()> {
    use crate::kernel::log::{KernelLog, LogSwitch, cookies_of};
    let pins = crate::kernel::Pins::new(&a.bpffs);
    let mut switch = LogSwitch::open(&pins)?;
    let maps = crate::kernel::maps::ProxyMaps::open(&pins)?;
    if let Some(f) = a.filter.as_deref().map(str::trim) {
        let to = match f {
            "off" => KernelLog::Off,
            "all" => KernelLog::All,
            pods => {
                let names: Vec<String> = pods
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect();
                if names.is_empty() || names.iter().any(|n| n.split('/').count() != 2) {
                    anyhow::bail!(
                        "--kernel {f:?}: expected `off`, `all` or `namespace/name[,...]`; \
                         nothing changed"
                    );
                }
                match cookies_of(&maps.enrolled, &names) {
                    Ok(c) => KernelLog::Pods(c),
                    Err(missing) => anyhow::bail!(
                        "not enrolled on this node: {}; nothing changed",
                        missing.join(", ")
                    ),
                }
            }
        };
        switch.set(&to)?;
    }
    let now = switch.get()?;
    let names = |cookies: &[u64]| -> Vec<String> {
        cookies
            .iter()
            .map(|c| match maps.enrolled.get(c, 0) {
                Ok(w) => format!(
                    "{}/{}",
                    mesh_common::name_str(&w.namespace),
                    mesh_common::name_str(&w.name)
                ),
                Err(_) => format!("netns {c} (no longer enrolled)"),
            })
            .collect()
    };
    if a.json {
        let pods = match &now {
            KernelLog::Pods(c) => names(c),
            _ => Vec::new(),
        };
        let mode = match &now {
            KernelLog::Off => "off",
            KernelLog::All => "all",
            KernelLog::Pods(_) => "pods",
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"kernel": mode, "pods": pods}))?
        );
        return Ok(());
    }
    match now {
        KernelLog::Off => println!("kernel decision logs: off"),
        KernelLog::All => println!("kernel decision logs: every pod"),
        KernelLog::Pods(c) => println!("kernel decision logs: {}", names(&c).join(", ")),
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error(
        "cannot reach the proxy's admin API at {addr}: {source} (is `mesh-node proxy` running \
         here, with this --admin address? The API listens on the node's loopback: run this on \
         the node, in its network namespace)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API at {addr}: no answer to {path} within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        path: String,
        timeout: Duration,
    },
    #[error("admin API at {addr}: {path}: {source}")]
    Http {
        addr: SocketAddr,
        path: String,
        source: hyper::Error,
    },
    #[error("admin API at {addr}: {path} answered {status}: {message}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
        message: String,
    },
    #[error("admin API at {addr}: {path}: not the JSON expected ({source})")]
    Json {
        addr: SocketAddr,
        path: String,
        source: serde_json::Error,
    },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request to the admin API; the body of a `2xx` answer, or the error it gave.
pub async fn request(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
) -> Result<Bytes, AdminClientError> {
    let timeout = |t| AdminClientError::Timeout {
        addr,
        path: path.to_string(),
        timeout: t,
    };
    let http_err = |source| AdminClientError::Http {
        addr,
        path: path.to_string(),
        source,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| timeout(CONNECT_TIMEOUT))?
        .map_err(|source| AdminClientError::Connect { addr, source })?;
    let exchange = async {
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(http_err)?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| AdminClientError::Status {
                addr,
                path: path.to_string(),
                status: 0,
                message: format!("bad request: {e}"),
            })?;
        let resp = send.send_request(req).await.map_err(http_err)?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(AdminClientError::Status {
                addr,
                path: path.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| timeout(REQUEST_TIMEOUT))?
}

pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
) -> Result<T, AdminClientError> {
    let body = request(addr, http::Method::GET, path).await?;
    serde_json::from_slice(&body).map_err(|source| AdminClientError::Json {
        addr,
        path: path.to_string(),
        source,
    })
}

pub async fn run(a: ConfigArgs) -> Result<()> {
    let needs_dump = a.view != View::Connections;
    let needs_conns = matches!(a.view, View::Connections | View::All);
    let dump: Value = if needs_dump {
        get_json(a.admin, "/config_dump").await?
    } else {
        Value::Null
    };
    let conns: Value = if needs_conns {
        get_json(a.admin, "/connections").await?
    } else {
        Value::Null
    };
    if a.json {
        let out = match a.view {
            View::Workloads => dump.get("workloads").cloned(),
            View::Services => dump.get("services").cloned(),
            View::Policies => dump.get("configs").cloned(),
            View::Certificates => dump.get("certificates").cloned(),
            View::Connections => Some(conns),
            View::All => {
                let mut all = dump;
                if let Value::Object(m) = &mut all {
                    m.insert("connections".into(), conns);
                }
                Some(all)
            }
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out.unwrap_or(Value::Array(Vec::new())))?
        );
        return Ok(());
    }
    let json_err = |path: &str, source| AdminClientError::Json {
        addr: a.admin,
        path: path.to_string(),
        source,
    };
    let d: ConfigDump = if needs_dump {
        serde_json::from_value(dump).map_err(|e| json_err("/config_dump", e))?
    } else {
        ConfigDump::default()
    };
    let c: Vec<Connection> = if needs_conns {
        serde_json::from_value(conns).map_err(|e| json_err("/connections", e))?
    } else {
        Vec::new()
    };
    print!("{}", text(a.view, &d, &c));
    Ok(())
}

/// The tables of `view`.
pub fn text(view: View, d: &ConfigDump, c: &[Connection]) -> String {
    let one = |v| match v {
        View::Workloads => workloads_table(d),
        View::Services => services_table(d),
        View::Policies => policies_table(d),
        View::Certificates => certificates_table(d),
        _ => connections_table(c),
    };
    if view != View::All {
        return one(view);
    }
    let mut out = format!(
        "NODE {} ({} mode, state version {})\n",
        d.node, d.mode, d.state_version
    );
    for (title, v, n) in [
        ("WORKLOADS", View::Workloads, d.workloads.len()),
        ("SERVICES", View::Services, d.services.len()),
        ("POLICIES", View::Policies, d.configs.len()),
        ("CERTIFICATES", View::Certificates, d.certificates.len()),
        ("CONNECTIONS", View::Connections, c.len()),
    ] {
        out.push_str(&format!("\n{title} ({n})\n"));
        out.push_str(&one(v));
    }
    out
}

pub fn workloads_table(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .workloads
        .iter()
        .map(|w| {
            vec![
                w.namespace.clone(),
                w.name.clone(),
                w.ips.join(","),
                w.node.clone(),
                w.identity.clone(),
                if w.meshed || w.dataplane == "istio" {
                    "HBONE"
                } else {
                    "TCP"
                }
                .to_string(),
                w.dataplane.clone(),
                w.ready.to_string(),
            ]
        })
        .collect();
    render(
        &[
            "NAMESPACE",
            "NAME",
            "IP",
            "NODE",
            "IDENTITY",
            "PROTOCOL",
            "DATAPLANE",
            "READY",
        ],
        &rows,
    )
}

pub fn services_table(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .services
        .iter()
        .map(|s| {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| {
                    let target = if p.target_port_name.is_empty() {
                        p.target_port.to_string()
                    } else {
                        p.target_port_name.clone()
                    };
                    let proto = if p.protocol.is_empty() {
                        "TCP"
                    } else {
                        &p.protocol
                    };
                    let app = if p.app_protocol.is_empty() {
                        String::new()
                    } else {
                        format!("({})", p.app_protocol)
                    };
                    format!("{}/{proto}->{target}{app}", p.port)
                })
                .collect();
            let ready = s.endpoints.iter().filter(|e| e.ready).count();
            vec![
                s.namespace.clone(),
                s.name.clone(),
                if s.cluster_ip.is_empty() {
                    "None".to_string()
                } else {
                    s.cluster_ip.clone()
                },
                ports.join(","),
                format!("{ready}/{}", s.endpoints.len()),
            ]
        })
        .collect();
    render(
        &["NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS (READY/ALL)"],
        &rows,
    )
}

pub fn policies_table(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .configs
        .iter()
        .map(|c| {
            vec![
                c.kind.clone(),
                c.namespace.clone(),
                c.name.clone(),
                summary(c, &d.settings.root_namespace),
            ]
        })
        .collect();
    render(&["KIND", "NAMESPACE", "NAME", "SUMMARY"], &rows)
}

pub fn certificates_table(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .certificates
        .iter()
        .map(|c| {
            let left = if c.expires_in_seconds >= 0 {
                human_secs(c.expires_in_seconds.unsigned_abs())
            } else {
                format!(
                    "expired {} ago",
                    human_secs(c.expires_in_seconds.unsigned_abs())
                )
            };
            vec![
                c.identity.clone(),
                c.serial.clone(),
                c.not_after.clone(),
                left,
                c.generation.to_string(),
            ]
        })
        .collect();
    render(
        &[
            "IDENTITY",
            "SERIAL",
            "NOT-AFTER",
            "EXPIRES-IN",
            "GENERATION",
        ],
        &rows,
    )
}

/// An open connection as `/connections` lists it (`telemetry::conn::ConnectionView`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Connection {
    pub id: u64,
    pub reporter: String,
    pub protocol: String,
    pub src_addr: String,
    pub dst_addr: String,
    pub hbone_addr: Option<String>,
    /// `h2` or `quic` for a tunnelled connection.
    pub transport: Option<String>,
    pub src_workload: String,
    pub src_namespace: String,
    pub src_identity: String,
    pub dst_workload: String,
    pub dst_namespace: String,
    pub dst_identity: String,
    pub dst_service: Option<String>,
    pub security: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
}

fn end(ns: &str, workload: &str, addr: &str) -> String {
    if workload.is_empty() || workload == crate::telemetry::istio::UNKNOWN {
        addr.to_string()
    } else {
        format!("{ns}/{workload} {addr}")
    }
}

pub fn connections_table(c: &[Connection]) -> String {
    let rows: Vec<Vec<String>> = c
        .iter()
        .map(|c| {
            vec![
                match c.reporter.as_str() {
                    "source" => "out".to_string(),
                    "destination" => "in".to_string(),
                    other => other.to_string(),
                },
                end(&c.src_namespace, &c.src_workload, &c.src_addr),
                end(&c.dst_namespace, &c.dst_workload, &c.dst_addr),
                c.dst_service.clone().unwrap_or_default(),
                c.transport.clone().unwrap_or_else(|| "-".into()),
                format!("{} -> {}", c.src_identity, c.dst_identity),
                format!("{}/{}", c.bytes_received, c.bytes_sent),
                human_secs(c.duration_ms / 1000),
            ]
        })
        .collect();
    render(
        &[
            "DIR",
            "SRC",
            "DST",
            "SERVICE",
            "TRANSPORT",
            "IDENTITIES",
            "BYTES RX/TX",
            "AGE",
        ],
        &rows,
    )
}

fn selector_text(spec: &Value) -> Option<String> {
    let labels = spec.get("selector")?.get("matchLabels")?.as_object()?;
    if labels.is_empty() {
        return None;
    }
    Some(
        labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn count(spec: &Value, field: &str) -> usize {
    spec.get(field)
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn bucket(b: Option<&Value>) -> String {
    let Some(b) = b else {
        return "?".into();
    };
    let max = b.get("maxTokens").and_then(Value::as_u64).unwrap_or(0);
    let per = b
        .get("tokensPerFill")
        .and_then(Value::as_u64)
        .unwrap_or(max);
    let every = b.get("fillInterval").and_then(Value::as_str).unwrap_or("?");
    if per == max {
        format!("{max}/{every}")
    } else {
        format!("{per}/{every} max {max}")
    }
}

fn ports(v: Option<&Value>) -> Option<String> {
    let p: Vec<String> = v?.as_array()?.iter().map(Value::to_string).collect();
    (!p.is_empty()).then(|| p.join(","))
}

/// One line about a policy or routing object: what it does and to whom.
pub fn summary(c: &ConfigView, root_namespace: &str) -> String {
    let s = &c.spec;
    let scope = || match selector_text(s) {
        Some(sel) => format!("selector {sel}"),
        None if c.namespace == root_namespace => "mesh-wide".into(),
        None => "namespace-wide".into(),
    };
    match c.kind.as_str() {
        "AuthorizationPolicy" => format!(
            "{}, {}; {}",
            s.get("action").and_then(Value::as_str).unwrap_or("ALLOW"),
            plural(count(s, "rules"), "rule"),
            scope()
        ),
        "PeerAuthentication" => {
            let mode = |v: &Value| {
                v.get("mode")
                    .and_then(Value::as_str)
                    .unwrap_or("UNSET")
                    .to_string()
            };
            let mut out = format!("mode {}", s.get("mtls").map_or("UNSET".to_string(), mode));
            if let Some(ports) = s
                .get("portLevelMtls")
                .or_else(|| s.get("port_level_mtls"))
                .and_then(Value::as_object)
            {
                for (port, m) in ports {
                    out.push_str(&format!(", port {port} {}", mode(m)));
                }
            }
            format!("{out}; {}", scope())
        }
        "RateLimitPolicy" => {
            let mut parts = Vec::new();
            if let Some(conns) = s.get("connections").filter(|v| !v.is_null()) {
                let on = ports(conns.get("ports"))
                    .map(|p| format!(" on ports {p}"))
                    .unwrap_or_default();
                parts.push(format!(
                    "connections {}{on}",
                    bucket(conns.get("tokenBucket"))
                ));
            }
            if let Some(reqs) = s.get("requests").and_then(Value::as_array)
                && !reqs.is_empty()
            {
                let routes: Vec<String> = reqs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let name = r
                            .get("name")
                            .and_then(Value::as_str)
                            .filter(|n| !n.is_empty())
                            .map_or_else(|| format!("requests[{i}]"), str::to_string);
                        format!("{name} {}", bucket(r.get("tokenBucket")))
                    })
                    .collect();
                parts.push(format!("requests {}", routes.join(", ")));
            }
            if parts.is_empty() {
                parts.push("no limits".into());
            }
            format!("{}; {}", parts.join("; "), scope())
        }
        "VirtualService" => {
            let hosts: Vec<&str> = s
                .get("hosts")
                .and_then(Value::as_array)
                .map(|h| h.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            format!(
                "hosts {}; {}, {}",
                hosts.join(","),
                plural(count(s, "http"), "http route"),
                plural(count(s, "tcp"), "tcp route")
            )
        }
        "DestinationRule" => {
            let subsets: Vec<&str> = s
                .get("subsets")
                .and_then(Value::as_array)
                .map(|v| {
                    v.iter()
                        .filter_map(|x| x.get("name").and_then(Value::as_str))
                        .collect()
                })
                .unwrap_or_default();
            let lb = s
                .pointer("/trafficPolicy/loadBalancer/simple")
                .and_then(Value::as_str)
                .unwrap_or("ROUND_ROBIN");
            let mut out = format!(
                "host {}; lb {lb}",
                s.get("host").and_then(Value::as_str).unwrap_or("?")
            );
            if !subsets.is_empty() {
                out.push_str(&format!("; subsets {}", subsets.join(",")));
            }
            out
        }
        _ => String::new(),
    }
}

/// `mesh-node log-level`: shows the proxy's log filter, or replaces it.
pub async fn log_level(a: LogLevelArgs) -> Result<()> {
    if a.kernel {
        return kernel_log_level(&a);
    }
    let path = match &a.filter {
        None => "/logging".to_string(),
        Some(f) => {
            let is_level = crate::telemetry::logging::LEVELS
                .iter()
                .any(|l| l.eq_ignore_ascii_case(f.trim()));
            let key = if is_level { "level" } else { "filter" };
            format!("/logging?{key}={}", encode(f.trim()))
        }
    };
    let method = if a.filter.is_some() {
        http::Method::POST
    } else {
        http::Method::GET
    };
    let body = match request(a.admin, method, &path).await {
        Err(AdminClientError::Status {
            status: 400,
            message,
            ..
        }) => anyhow::bail!(
            "the proxy refused `{}`: {message}; the filter in force is unchanged",
            a.filter.as_deref().unwrap_or_default().trim()
        ),
        other => other?,
    };
    let v: Value = serde_json::from_slice(&body).map_err(|source| AdminClientError::Json {
        addr: a.admin,
        path: path.clone(),
        source,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let filter = v.get("filter").and_then(Value::as_str).unwrap_or("-");
    match v.get("previous").and_then(Value::as_str) {
        Some(prev) => println!("log filter: {filter} (was: {prev})"),
        None => println!("log filter: {filter}"),
    }
    Ok(())
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::config_dump::{
        CertView, EndpointView, PortView, ServiceView, SettingsView, WorkloadView,
    };
    use serde_json::json;

    fn dump() -> ConfigDump {
        ConfigDump {
            node: "node2".into(),
            mode: "mesh".into(),
            state_version: 4,
            workloads: vec![WorkloadView {
                uid: "mesh/node1-pod1".into(),
                namespace: "mesh".into(),
                name: "node1-pod1".into(),
                node: "node1".into(),
                ips: vec!["198.19.1.2".into(), "fd00:198:19:1::2".into()],
                identity: "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1".into(),
                meshed: true,
                dataplane: "sidenode".into(),
                ready: true,
                ..Default::default()
            }],
            services: vec![ServiceView {
                namespace: "mesh".into(),
                name: "echo".into(),
                cluster_ip: "198.18.128.30".into(),
                ports: vec![
                    PortView {
                        port: 80,
                        target_port: 8080,
                        protocol: "TCP".into(),
                        ..Default::default()
                    },
                    PortView {
                        port: 9080,
                        target_port: 9080,
                        app_protocol: "http".into(),
                        ..Default::default()
                    },
                ],
                endpoints: vec![
                    EndpointView {
                        workload: "mesh/node2-pod1".into(),
                        ready: true,
                        ..Default::default()
                    },
                    EndpointView {
                        workload: "mesh/node2-pod2".into(),
                        ready: false,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            configs: vec![
                ConfigView {
                    kind: "AuthorizationPolicy".into(),
                    namespace: "mesh".into(),
                    name: "allow-mesh".into(),
                    spec: json!({"action": "ALLOW", "rules": [{"from": []}], "selector": null}),
                    ..Default::default()
                },
                ConfigView {
                    kind: "RateLimitPolicy".into(),
                    namespace: "mesh".into(),
                    name: "limits".into(),
                    spec: json!({"selector": {"matchLabels": {"app": "node2-pod1"}},
                        "connections": {"ports": [8080], "tokenBucket": {"maxTokens": 100, "fillInterval": "1s"}},
                        "requests": [{"name": "writes", "tokenBucket": {"maxTokens": 10, "tokensPerFill": 5, "fillInterval": "1m"}}]}),
                    ..Default::default()
                },
                ConfigView {
                    kind: "PeerAuthentication".into(),
                    namespace: "istio-system".into(),
                    name: "default".into(),
                    spec: json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {}}),
                    ..Default::default()
                },
            ],
            settings: SettingsView {
                root_namespace: "istio-system".into(),
                ..Default::default()
            },
            certificates: vec![CertView {
                identity: "spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1".into(),
                serial: "0a1b".into(),
                not_after: "2030-01-01T00:00:00Z".into(),
                expires_in_seconds: 86_399,
                generation: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn workloads_and_services_tables() {
        let mut d = dump();
        // An Istio ambient pod: reached over HBONE, not sidenode's.
        d.workloads.push(WorkloadView {
            namespace: "legacy".into(),
            name: "amb-0".into(),
            node: "node1".into(),
            ips: vec!["198.19.1.9".into()],
            identity: "spiffe://cluster.local/ns/legacy/sa/default".into(),
            meshed: false,
            dataplane: "istio".into(),
            ready: true,
            ..Default::default()
        });
        assert_eq!(
            workloads_table(&d),
            "NAMESPACE   NAME         IP                            NODE    IDENTITY                                          PROTOCOL   DATAPLANE   READY\n\
             mesh        node1-pod1   198.19.1.2,fd00:198:19:1::2   node1   spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1   HBONE      sidenode    true\n\
             legacy      amb-0        198.19.1.9                    node1   spiffe://cluster.local/ns/legacy/sa/default       HBONE      istio       true\n"
        );
        let t = services_table(&d);
        let row = t.lines().nth(1).expect("row");
        assert!(
            row.starts_with("mesh        echo   198.18.128.30   "),
            "{t}"
        );
        assert!(row.contains("80/TCP->8080,9080/TCP->9080(http)"), "{t}");
        assert!(row.ends_with("1/2"), "{t}");
    }

    #[test]
    fn policy_summaries() {
        let d = dump();
        let t = policies_table(&d);
        assert!(t.starts_with("KIND"), "{t}");
        assert!(t.contains("ALLOW, 1 rule; namespace-wide"), "{t}");
        assert!(
            t.contains(
                "connections 100/1s on ports 8080; requests writes 5/1m max 10; selector app=node2-pod1"
            ),
            "{t}"
        );
        assert!(t.contains("mode STRICT; mesh-wide"), "{t}");
        let vs = ConfigView {
            kind: "VirtualService".into(),
            spec: json!({"hosts": ["reviews"], "http": [{}, {}], "tcp": [{}]}),
            ..Default::default()
        };
        assert_eq!(
            summary(&vs, ""),
            "hosts reviews; 2 http routes, 1 tcp route"
        );
        let dr = ConfigView {
            kind: "DestinationRule".into(),
            spec: json!({"host": "reviews", "subsets": [{"name": "v1"}, {"name": "v2"}],
                         "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}),
            ..Default::default()
        };
        assert_eq!(
            summary(&dr, ""),
            "host reviews; lb LEAST_REQUEST; subsets v1,v2"
        );
    }

    #[test]
    fn certificates_and_connections_tables() {
        let d = dump();
        assert_eq!(
            certificates_table(&d),
            "IDENTITY                                          SERIAL   NOT-AFTER              EXPIRES-IN   GENERATION\n\
             spiffe://cluster.local/ns/mesh/sa/sa-node2-pod1   0a1b     2030-01-01T00:00:00Z   23h59m       1\n"
        );
        let c = Connection {
            reporter: "destination".into(),
            src_addr: "198.19.1.2:40000".into(),
            dst_addr: "198.19.2.2:8080".into(),
            src_workload: "node1-pod1".into(),
            src_namespace: "mesh".into(),
            src_identity: "cluster.local/ns/mesh/sa/sa-node1-pod1".into(),
            dst_workload: "unknown".into(),
            dst_identity: "cluster.local/ns/mesh/sa/sa-node2-pod1".into(),
            bytes_received: 8,
            bytes_sent: 14,
            duration_ms: 61_000,
            transport: Some("quic".into()),
            ..Default::default()
        };
        let t = connections_table(&[c]);
        let row = t.lines().nth(1).expect("row");
        assert!(
            row.starts_with(
                "in    mesh/node1-pod1 198.19.1.2:40000   198.19.2.2:8080   -         quic   "
            ),
            "{t}"
        );
        assert!(row.ends_with("8/14          1m1s"), "{t}");
        let all = text(View::All, &d, &[]);
        for title in [
            "WORKLOADS (1)",
            "SERVICES (1)",
            "POLICIES (3)",
            "CERTIFICATES (1)",
            "CONNECTIONS (0)",
        ] {
            assert!(all.contains(title), "{title}: {all}");
        }
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode("info,access=off,mesh_node::proxy=debug"),
            "info%2Caccess%3Doff%2Cmesh_node%3A%3Aproxy%3Ddebug"
        );
        assert_eq!(
            crate::admin::logging::decode(&encode("a b,c=[d]{e}")).as_deref(),
            Ok("a b,c=[d]{e}")
        );
    }
}
