//! `state_update`: the node's side of the state stream: protobuf `StateUpdate` messages as the
//! stream delivers them (`prost` decoding, then `NodeState::apply`). Shared by the cargo-fuzz
//! target and the corpus test; a violated property panics.
//!
//! Input: frames of a 2-byte big-endian length and that many bytes (the last frame may be
//! short), each decoded as one `StateUpdate` and, when it decodes, applied in order.
//!
//! Properties: no panic; a decoded update re-encodes to the same message; after `apply` the
//! state is at the update's version, holds every workload, service and node the update sent
//! (the last one of a uid), drops what it removed without re-sending, keeps the rest unless it
//! was a snapshot, and its IP and VIP indexes only point at held objects with that address;
//! applying the same update twice changes nothing more.

use mesh_node::proto::StateUpdate;
use mesh_node::state::NodeState;
use prost::Message;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub fn run(data: &[u8]) {
    let mut st = NodeState::default();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let body = &body[..n.min(body.len())];
        rest = &rest[2 + body.len()..];
        let Ok(u) = StateUpdate::decode(body) else {
            continue;
        };
        let again = StateUpdate::decode(u.encode_to_vec().as_slice())
            .unwrap_or_else(|e| panic!("a decoded update does not decode after re-encoding: {e}"));
        assert_eq!(again, u, "re-encoding changed the update");
        let next = st.apply(u.clone());
        check(&st, &u, &next);
        let twice = next.apply(u.clone());
        assert_eq!(twice.version, next.version);
        assert_eq!(
            twice.workloads, next.workloads,
            "applying twice changed workloads"
        );
        assert_eq!(
            twice.services, next.services,
            "applying twice changed services"
        );
        assert_eq!(twice.nodes, next.nodes, "applying twice changed nodes");
        assert_eq!(
            twice.configs, next.configs,
            "applying twice changed configs"
        );
        st = next;
    }
}

/// Checks one map of `next` against what `u` sent and removed: `sent` the (key, value) pairs
/// in order, `removed` the keys.
fn check_map<V: PartialEq + std::fmt::Debug>(
    what: &str,
    snapshot: bool,
    prev: &BTreeMap<String, V>,
    next: &BTreeMap<String, V>,
    sent: &[(String, &V)],
    removed: &[String],
) {
    let mut last: BTreeMap<&str, &V> = BTreeMap::new();
    for (k, v) in sent {
        last.insert(k, v);
    }
    for (k, v) in &last {
        assert_eq!(
            next.get(*k),
            Some(*v),
            "{what} {k} sent but not held as sent"
        );
    }
    for k in removed {
        if !last.contains_key(k.as_str()) {
            assert!(!next.contains_key(k), "{what} {k} removed but still held");
        }
    }
    for (k, v) in next {
        if last.contains_key(k.as_str()) {
            continue;
        }
        assert!(
            !snapshot,
            "{what} {k} held after a snapshot that did not send it"
        );
        assert_eq!(
            prev.get(k),
            Some(v),
            "{what} {k} appeared or changed unsent"
        );
    }
    if !snapshot {
        for (k, v) in prev {
            if !removed.contains(k) && !last.contains_key(k.as_str()) {
                assert_eq!(next.get(k), Some(v), "{what} {k} lost by a delta");
            }
        }
    }
}

fn check(prev: &NodeState, u: &StateUpdate, next: &NodeState) {
    assert_eq!(next.version, u.version, "not at the update's version");
    let workloads: Vec<_> = u.workloads.iter().map(|w| (w.uid.clone(), w)).collect();
    check_map(
        "workload",
        u.snapshot,
        &prev.workloads,
        &next.workloads,
        &workloads,
        &u.removed_workloads,
    );
    let services: Vec<_> = u.services.iter().map(|s| (s.uid.clone(), s)).collect();
    check_map(
        "service",
        u.snapshot,
        &prev.services,
        &next.services,
        &services,
        &u.removed_services,
    );
    let nodes: Vec<_> = u.nodes.iter().map(|n| (n.name.clone(), n)).collect();
    check_map(
        "node",
        u.snapshot,
        &prev.nodes,
        &next.nodes,
        &nodes,
        &u.removed_nodes,
    );
    for (ip, uid) in &next.by_ip {
        let w = next
            .workloads
            .get(uid)
            .unwrap_or_else(|| panic!("by_ip {ip} -> {uid}, not held"));
        assert!(
            w.ips.iter().any(|s| s.parse::<IpAddr>().ok() == Some(*ip)),
            "by_ip {ip} -> {uid}, which does not have that address"
        );
    }
    for w in next.workloads.values() {
        for ip in w.ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
            assert!(
                next.by_ip.contains_key(&ip),
                "{} address {ip} not indexed",
                w.uid
            );
        }
    }
    for (ip, uid) in &next.by_vip {
        let s = next
            .services
            .get(uid)
            .unwrap_or_else(|| panic!("by_vip {ip} -> {uid}, not held"));
        assert_eq!(
            s.cluster_ip.parse::<IpAddr>().ok(),
            Some(*ip),
            "by_vip {ip} -> {uid}"
        );
    }
}
