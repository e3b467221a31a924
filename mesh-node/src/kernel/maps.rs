//! Typed handles on the pinned maps, opened by path: the agent writes them, the proxy and the
//! `maps` CLI read them. Layouts come from `mesh-common`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, SockHash};
use mesh_common::{Addr, OrigDst, ProxyConfig, SockKey, SpliceKey, StrictKey, Workload};

use super::{KernelError, Pins};

/// Every map of a node, opened from its pins.
pub struct NodeMaps {
    pub enrolled: HashMap<MapData, u64, Workload>,
    pub pending: HashMap<MapData, u64, OrigDst>,
    pub orig_dst: HashMap<MapData, SockKey, OrigDst>,
    pub config: Array<MapData, ProxyConfig>,
    pub excl_ports: HashMap<MapData, u16, u8>,
    pub excl_cidrs: LpmTrie<MapData, Addr, u8>,
    pub stats: PerCpuArray<MapData, u64>,
    /// Kernel-enforced peer authentication (STRICT pods and port exceptions).
    pub strict: HashMap<MapData, StrictKey, u32>,
    /// The spliced local legs' sockets (`SN_SPLICE`) and their state (`SN_SPLICE_ST`); `None`
    /// on pins of a version without splicing.
    pub splice: Option<Splice>,
}

/// The splice maps: sockets by their own connection, and their flags.
pub struct Splice {
    pub sockets: SockHash<MapData, SpliceKey>,
    pub state: HashMap<MapData, SpliceKey, u32>,
}

fn open(pins: &Pins, name: &'static str) -> Result<Map, KernelError> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::OpenPin { path, source })?;
    Map::from_map_data(data).map_err(|source| KernelError::Map { name, source })
}

/// A pinned map of this node as its typed handle.
pub(crate) fn open_typed<T>(pins: &Pins, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    open(pins, name)?
        .try_into()
        .map_err(|source| KernelError::Map { name, source })
}

/// Every key of a hash map (entries that vanish while iterating are skipped).
pub(crate) fn read_map_keys<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>) -> Vec<K> {
    m.keys().flatten().collect()
}

macro_rules! typed {
    ($pins:expr, $name:expr) => {
        open($pins, $name)?
            .try_into()
            .map_err(|source| KernelError::Map {
                name: $name,
                source,
            })?
    };
}

impl NodeMaps {
    pub fn open(pins: &Pins) -> Result<Self, KernelError> {
        Ok(Self {
            enrolled: typed!(pins, mesh_common::ENROLLED),
            pending: typed!(pins, mesh_common::PENDING),
            orig_dst: typed!(pins, mesh_common::ORIG_DST),
            config: typed!(pins, mesh_common::CONFIG),
            excl_ports: typed!(pins, mesh_common::EXCL_PORTS),
            excl_cidrs: typed!(pins, mesh_common::EXCL_CIDRS),
            stats: typed!(pins, mesh_common::STATS),
            strict: typed!(pins, mesh_common::STRICT),
            splice: Splice::open(pins).ok(),
        })
    }

    /// How many counters the pinned `SN_STATS` holds (fewer than [`mesh_common::STAT_COUNT`]
    /// when an older version pinned it).
    pub fn stats_slots(&self) -> u32 {
        self.stats.len()
    }

    /// Counters summed over CPUs, in [`mesh_common::Stat`] order.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        read_stats(&self.stats)
    }
}

impl Splice {
    pub fn open(pins: &Pins) -> Result<Self, KernelError> {
        Ok(Self {
            sockets: typed!(pins, mesh_common::SPLICE),
            state: typed!(pins, mesh_common::SPLICE_STATE),
        })
    }
}

/// The `SN_STATS` counters summed over CPUs, in [`mesh_common::Stat`] order (0 for slots an
/// older pinned map lacks).
pub fn read_stats(stats: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    mesh_common::STAT_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sum = stats
                .get(&(i as u32), 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0);
            (*name, sum)
        })
        .collect()
}

/// Only what the proxy needs, read-only.
pub struct ProxyMaps {
    pub enrolled: HashMap<MapData, u64, Workload>,
    pub orig_dst: HashMap<MapData, SockKey, OrigDst>,
    /// The capture counters (read for the proxy's metrics).
    pub stats: PerCpuArray<MapData, u64>,
    /// The kernel-spliced sockets' state (`SN_SPLICE_ST`); `None` on pins of a version
    /// without splicing.
    pub splice_state: Option<HashMap<MapData, SpliceKey, u32>>,
}

impl ProxyMaps {
    pub fn open(pins: &Pins) -> Result<Self, KernelError> {
        Ok(Self {
            enrolled: typed!(pins, mesh_common::ENROLLED),
            orig_dst: typed!(pins, mesh_common::ORIG_DST),
            stats: typed!(pins, mesh_common::STATS),
            splice_state: open_typed(pins, mesh_common::SPLICE_STATE).ok(),
        })
    }

    /// Whether the agent's kernel splicing (`agent --splice`) holds the socket of this
    /// connection (`local` its own address): such a socket's received bytes skip its receive
    /// queue, so they must be read, never `splice(2)`d (`proxy::zero_copy`). Membership is
    /// settled once the connection is established (`sn_sockops`). When the map cannot answer,
    /// the socket counts as spliced (the ordinary copy is always safe).
    pub fn spliced(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        let Some(state) = &self.splice_state else {
            return false;
        };
        let key = SpliceKey {
            local: ip_to_addr(local.ip()),
            remote: ip_to_addr(remote.ip()),
            local_port: local.port(),
            remote_port: remote.port(),
        };
        !matches!(state.get(&key, 0), Err(aya::maps::MapError::KeyNotFound))
    }

    /// The original destination of an accepted connection, by its peer address.
    pub fn orig_dst(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.orig_dst.get(&sock_key(peer), 0).ok()
    }

    pub fn workload(&self, netns_cookie: u64) -> Option<Workload> {
        self.enrolled.get(&netns_cookie, 0).ok()
    }
}

pub fn sock_key(addr: SocketAddr) -> SockKey {
    SockKey {
        addr: ip_to_addr(addr.ip()),
        port: addr.port(),
        _pad: 0,
    }
}

/// The map form of an address (IPv4 as IPv4-mapped IPv6).
pub fn ip_to_addr(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut out = [0u32; 4];
    for (i, w) in out.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    out
}

/// Back from the map form; IPv4-mapped addresses come back as IPv4.
pub fn addr_to_ip(addr: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// An IPv4 address as `bpf_sock_addr.user_ip4` holds it (network order in memory).
pub fn ip4_to_net(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn orig_dst_addr(o: &OrigDst) -> SocketAddr {
    SocketAddr::new(addr_to_ip(&o.addr), o.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_round_trips_through_the_mapped_form() {
        let ip: IpAddr = "198.19.1.2".parse().expect("literal");
        let a = ip_to_addr(ip);
        assert_eq!(
            a,
            mesh_common::addr_from_v4(ip4_to_net("198.19.1.2".parse().expect("lit")))
        );
        assert_eq!(addr_to_ip(&a), ip);
        let v6: IpAddr = "fd00::1".parse().expect("literal");
        assert_eq!(addr_to_ip(&ip_to_addr(v6)), v6);
    }
}
