//! Network namespaces, veths, the bridge and routes, all through iproute2.
//!
//! Every interface lives inside a namespace the harness creates (they are created directly in
//! their namespace with `ip -n`), so the machine's own namespace is never touched.

use anyhow::{Context, Result, bail};
use std::process::Command;

/// Folder where `ip netns` keeps its namespace files.
pub const NETNS_DIR: &str = "/var/run/netns";

pub fn netns_path(name: &str) -> String {
    format!("{NETNS_DIR}/{name}")
}

/// Run a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// `ip -n <ns> <args>`.
pub fn ip_ns(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// Write a sysctl inside a namespace (via nsenter, so /proc/sys/net is the namespace's).
pub fn sysctl_ns(ns: &str, key: &str, value: &str) -> Result<()> {
    run(Command::new("nsenter")
        .arg(format!("--net={}", netns_path(ns)))
        .arg("--")
        .arg("sysctl")
        .arg("-qw")
        .arg(format!("{key}={value}")))
}

/// Names from `ip netns list` (each line is `name` or `name (id: N)`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// PIDs of processes in a namespace (`ip netns pids`); empty when it is gone.
pub fn netns_pids(name: &str) -> Vec<u32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip_ns(name, &["link", "set", "lo", "up"])
}

/// Best effort: delete a namespace, ignoring "already gone".
pub fn del_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// The controller's address on the fabric bridge (mesh mode).
pub const CONTROLLER_IP: &str = "198.18.0.254";
/// The controller's gRPC port.
pub const CONTROLLER_PORT: u16 = 15012;

pub fn node_ip(i: usize) -> String {
    format!("198.18.0.{i}")
}

pub fn pod_ip(node: usize, pod: usize) -> String {
    format!("198.19.{node}.{}", pod + 1)
}

/// IPv6 (the cluster is dual-stack): node `i` on the bridge, in a unique-local range that
/// exists only inside these namespaces.
pub fn node_ip6(i: usize) -> String {
    format!("fd00:198:18::{i}")
}

pub fn pod_ip6(node: usize, pod: usize) -> String {
    format!("fd00:198:19:{node}::{}", pod + 1)
}

/// IPv6 for node `i`: address on `eth0`, forwarding, routes to the other nodes' pod ranges.
fn setup_node6(node_ns: &str, i: usize, nodes: usize) -> Result<()> {
    sysctl_ns(node_ns, "net.ipv6.conf.all.forwarding", "1")?;
    ip_ns(
        node_ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{}/64", node_ip6(i)),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    for k in (1..=nodes).filter(|k| *k != i) {
        let range = format!("fd00:198:19:{k}::/64");
        ip_ns(
            node_ns,
            &[
                "-6",
                "route",
                "add",
                &range,
                "via",
                &node_ip6(k),
                "dev",
                "eth0",
            ],
        )?;
    }
    Ok(())
}

/// IPv6 for pod `j` of node `i`: its /128, default via the node side's fe80::1, and the node's
/// /128 route back.
fn setup_pod6(node_ns: &str, pod_ns: &str, node_if: &str, i: usize, j: usize) -> Result<()> {
    let ip6 = pod_ip6(i, j);
    ip_ns(
        node_ns,
        &["-6", "addr", "add", "fe80::1/64", "dev", node_if, "nodad"],
    )?;
    ip_ns(
        node_ns,
        &["-6", "route", "add", &format!("{ip6}/128"), "dev", node_if],
    )?;
    ip_ns(
        pod_ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip_ns(
        pod_ns,
        &[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ],
    )
}

/// In `ns`, a route to node `k`'s pod range via that node, out of `dev`.
fn route_to_pods_of(ns: &str, k: usize, dev: &str) -> Result<()> {
    ip_ns(
        ns,
        &[
            "route",
            "add",
            &format!("198.19.{k}.0/24"),
            "via",
            &node_ip(k),
            "dev",
            dev,
        ],
    )
}

/// The fabric namespace with its bridge.
pub fn setup_fabric(net_ns: &str) -> Result<()> {
    add_netns(net_ns)?;
    ip_ns(net_ns, &["link", "add", "br0", "type", "bridge"])?;
    ip_ns(net_ns, &["link", "set", "br0", "up"])
}

/// Mesh mode: give the bridge the controller's address, and route each node's pod range via
/// the node (so tools run in the fabric namespace can reach pods too).
pub fn setup_controller_addr(net_ns: &str, nodes: usize) -> Result<()> {
    ip_ns(
        net_ns,
        &["addr", "add", &format!("{CONTROLLER_IP}/24"), "dev", "br0"],
    )?;
    for k in 1..=nodes {
        route_to_pods_of(net_ns, k, "br0")?;
    }
    Ok(())
}

/// Node `i`: its namespace, `eth0` on the bridge with 198.18.0.i/24, forwarding on, and
/// a route towards every other node's pod range.
pub fn setup_node(net_ns: &str, node_ns: &str, i: usize, nodes: usize) -> Result<()> {
    add_netns(node_ns)?;
    let br_port = format!("n{i}");
    ip_ns(
        net_ns,
        &[
            "link", "add", &br_port, "type", "veth", "peer", "name", "eth0", "netns", node_ns,
        ],
    )?;
    ip_ns(net_ns, &["link", "set", &br_port, "master", "br0"])?;
    ip_ns(net_ns, &["link", "set", &br_port, "up"])?;
    ip_ns(
        node_ns,
        &["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"],
    )?;
    ip_ns(node_ns, &["link", "set", "eth0", "up"])?;
    sysctl_ns(node_ns, "net.ipv4.ip_forward", "1")?;
    // Proxy ARP answers for the pods' gateway 169.254.1.1 only when the node has a unicast
    // route to it through another interface; `lo` is such an interface and sends nothing out.
    ip_ns(node_ns, &["route", "add", "169.254.1.1/32", "dev", "lo"])?;
    setup_node6(node_ns, i, nodes)?;
    for k in (1..=nodes).filter(|k| *k != i) {
        route_to_pods_of(node_ns, k, "eth0")?;
    }
    Ok(())
}

/// Pod `j` of node `i`: `eth0` with its /32, a link route to 169.254.1.1 and a default via it;
/// the node side `p<j>` with proxy ARP and a /32 route to the pod.
pub fn setup_pod(node_ns: &str, pod_ns: &str, i: usize, j: usize) -> Result<()> {
    add_netns(pod_ns)?;
    let node_if = format!("p{j}");
    attach_to_node(node_ns, pod_ns, &node_if, &pod_ip(i, j))?;
    setup_pod6(node_ns, pod_ns, &node_if, i, j)
}

/// The IPv4 wiring of a pod-like namespace `pod_ns` (which exists) to its node: a veth with
/// `node_if` in the node (proxy ARP, a /32 route to `ip_addr`) and `eth0` in `pod_ns` (`ip_addr`
/// /32, a link route to 169.254.1.1 and a default route via it).
fn attach_to_node(node_ns: &str, pod_ns: &str, node_if: &str, ip_addr: &str) -> Result<()> {
    ip_ns(
        node_ns,
        &[
            "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns,
        ],
    )?;
    sysctl_ns(node_ns, &format!("net.ipv4.conf.{node_if}.proxy_arp"), "1")?;
    sysctl_ns(
        node_ns,
        &format!("net.ipv4.neigh.{node_if}.proxy_delay"),
        "0",
    )?;
    ip_ns(node_ns, &["link", "set", node_if, "up"])?;
    ip_ns(
        node_ns,
        &[
            "route",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            node_if,
            "scope",
            "link",
        ],
    )?;
    ip_ns(
        pod_ns,
        &["addr", "add", &format!("{ip_addr}/32"), "dev", "eth0"],
    )?;
    ip_ns(pod_ns, &["link", "set", "eth0", "up"])?;
    ip_ns(
        pod_ns,
        &[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ],
    )?;
    ip_ns(
        pod_ns,
        &[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ],
    )
}

/// The gateway's address on the cluster network: in node 1's pod range, wired like a pod of
/// node 1 (other nodes and the fabric route 198.19.1.0/24 to node 1).
pub const GATEWAY_CLUSTER_IP: &str = "198.19.1.254";
/// The gateway's address on the link to the outside namespace (TEST-NET-3, only inside the
/// namespaces): what outside clients connect to.
pub const GATEWAY_OUTSIDE_IP: &str = "203.0.113.1";
/// The outside namespace's address.
pub const OUTSIDE_IP: &str = "203.0.113.2";

/// The gateway's namespace `gw_ns`, wired like a pod of node 1 (`gw0` in the node, `eth0` =
/// [`GATEWAY_CLUSTER_IP`]), and the `outside` namespace `out_ns`, linked only to the gateway:
/// `out0` in the gateway ([`GATEWAY_OUTSIDE_IP`]/30) to `eth0` in outside ([`OUTSIDE_IP`]/30,
/// default route via the gateway). The gateway does not forward (`net.ipv4.ip_forward=0`,
/// written explicitly), so outside reaches the gateway's own addresses and nothing else; no
/// node has a route to 203.0.113.0/30.
pub fn setup_gateway(node_ns: &str, gw_ns: &str, out_ns: &str) -> Result<()> {
    add_netns(gw_ns)?;
    sysctl_ns(gw_ns, "net.ipv4.ip_forward", "0")?;
    sysctl_ns(gw_ns, "net.ipv6.conf.all.forwarding", "0")?;
    attach_to_node(node_ns, gw_ns, "gw0", GATEWAY_CLUSTER_IP)?;
    add_netns(out_ns)?;
    ip_ns(
        gw_ns,
        &[
            "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", out_ns,
        ],
    )?;
    ip_ns(
        gw_ns,
        &[
            "addr",
            "add",
            &format!("{GATEWAY_OUTSIDE_IP}/30"),
            "dev",
            "out0",
        ],
    )?;
    ip_ns(gw_ns, &["link", "set", "out0", "up"])?;
    ip_ns(
        out_ns,
        &["addr", "add", &format!("{OUTSIDE_IP}/30"), "dev", "eth0"],
    )?;
    ip_ns(out_ns, &["link", "set", "eth0", "up"])?;
    ip_ns(
        out_ns,
        &[
            "route",
            "add",
            "default",
            "via",
            GATEWAY_OUTSIDE_IP,
            "dev",
            "eth0",
        ],
    )
}
