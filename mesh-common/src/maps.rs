//! Map names, pin paths and key/value layouts.
//!
//! Names must fit the kernel's 15-character object names. `mesh-ebpf` declares each map with
//! `#[map(name = ...)]` using the same string; `mesh-node`'s tests load the built object and
//! check that every name below is present, so the two sides cannot drift apart.

/// Enrolled workloads: netns cookie (`u64`) → [`Workload`]. Written by the agent, read by the
/// capture program (is this socket's netns enrolled?) and by the proxy (who sent this?).
pub const ENROLLED: &str = "SN_ENROLLED";
/// Captured but not yet established: socket cookie (`u64`) → [`OrigDst`] (LRU).
pub const PENDING: &str = "SN_PENDING";
/// Original destinations of established captured connections: the client's local address
/// ([`SockKey`]) → [`OrigDst`] (LRU). Entries are removed when the client socket closes.
///
/// Full (more captured connections open at once than [`ORIG_DST_MAX`], or the agent's
/// `--orig-dst-max`): a new entry evicts the least recently used one. The proxy reads an
/// entry once, right after `accept()`, so an evicted entry of a connection already accepted
/// costs nothing; one evicted before the proxy read it leaves the proxy without a
/// destination, and the proxy closes that connection (`no_orig_dst`) — never guesses one.
/// An insert the kernel refuses removes any stale entry under the same key for the same
/// reason.
pub const ORIG_DST: &str = "SN_ORIG_DST";
/// Capture settings: one [`ProxyConfig`] at index 0 (array).
pub const CONFIG: &str = "SN_CONFIG";
/// Destination ports never captured: port (`u16`, host order) → `u8` (1).
pub const EXCL_PORTS: &str = "SN_EXCL_PORTS";
/// Destination CIDRs never captured: LPM trie over [`Addr`] (IPv4 prefixes as `96 + len`).
pub const EXCL_CIDRS: &str = "SN_EXCL_CIDRS";
/// Per-CPU counters indexed by [`Stat`].
pub const STATS: &str = "SN_STATS";
/// Peer authentication enforced in the kernel (`PeerAuthentication` STRICT): [`StrictKey`]
/// (pod address, port; port 0 = the workload's own mode) → [`MTLS_STRICT`] or another
/// `MTLS_*` mode. Written by the agent for its node's meshed pods, read by `sn_strict_in`.
pub const STRICT: &str = "SN_STRICT";

/// The local legs of meshed connections (sockhash): a socket's own [`SpliceKey`] → the
/// socket. Filled by `sn_sockops` at establishment; `sn_splice_msg` (attached to this map)
/// hands each message a member sends to its peer's receive queue (`bpf_msg_redirect_hash`,
/// ingress), skipping TCP/IP and the veth between pod and proxy. The kernel removes a socket
/// when it closes.
pub const SPLICE: &str = "SN_SPLICE";
/// Per-socket splice state: a member's own [`SpliceKey`] → [`SPLICE_F_*`](SPLICE_F_LEG) bits
/// (LRU). Removed when the socket closes.
pub const SPLICE_STATE: &str = "SN_SPLICE_ST";

/// Kernel-side decision logs (aya-log): one `u32` of [`LOG_F_ALL`]/[`LOG_F_SOME`] bits at
/// index 0 (array). 0 (the default) = off: the programs then only test this word.
pub const LOG: &str = "SN_LOG";
/// With [`LOG_F_SOME`]: the pods whose decisions are logged, netns cookie (`u64`) → `u8` (1).
pub const LOG_PODS: &str = "SN_LOG_PODS";

/// What is installed (array, read and written by the agent only): [`META_LAYOUT`] → the map
/// layout version ([`LAYOUT_VERSION`]), [`META_OBJECT`] → an id of the program object. An
/// agent whose object differs replaces the programs in place; one whose layout differs
/// refuses to touch the pins.
pub const META: &str = "SN_META";
pub const META_LAYOUT: u32 = 0;
pub const META_OBJECT: u32 = 1;
pub const META_MAX: u32 = 4;
/// The version of every map's key/value layout above. Bump it with any change to a layout
/// (field order, meaning, size): an agent refuses pins of another version rather than
/// misreading them. (Pins from before the version existed count as 1.)
pub const LAYOUT_VERSION: u64 = 1;

/// Every map the object defines, for checks and for the CLI.
pub const ALL_MAPS: [&str; 13] = [
    ENROLLED,
    PENDING,
    ORIG_DST,
    CONFIG,
    EXCL_PORTS,
    EXCL_CIDRS,
    STATS,
    STRICT,
    SPLICE,
    SPLICE_STATE,
    LOG,
    LOG_PODS,
    META,
];

pub const ENROLLED_MAX: u32 = 16_384;
pub const PENDING_MAX: u32 = 65_536;
pub const ORIG_DST_MAX: u32 = 262_144;
pub const EXCL_PORTS_MAX: u32 = 1_024;
pub const EXCL_CIDRS_MAX: u32 = 1_024;
/// Pods of one node × (1 + port-level settings each).
pub const STRICT_MAX: u32 = 65_536;
/// Live local legs on one node (two sockets per leg).
pub const SPLICE_MAX: u32 = 131_072;
pub const SPLICE_STATE_MAX: u32 = 131_072;
/// Pods logged one by one at once.
pub const LOG_PODS_MAX: u32 = 1_024;
/// [`LOG`] bits: log every enrolled pod's decisions (and every STRICT drop) ...
pub const LOG_F_ALL: u32 = 1;
/// ... or only those of the pods in [`LOG_PODS`].
pub const LOG_F_SOME: u32 = 2;
/// Slots of [`STATS`]: more than [`STAT_COUNT`], so a later counter fits the map an older
/// agent pinned (a pinned map is reused as it is).
pub const STATS_MAX: u32 = 32;

/// Program names (the Rust function names in `mesh-ebpf`).
pub const PROG_CONNECT4: &str = "sn_connect4";
pub const PROG_CONNECT6: &str = "sn_connect6";
pub const PROG_SOCKOPS: &str = "sn_sockops";
/// `cgroup_skb/ingress`: drops plaintext connection attempts to STRICT pods ([`STRICT`]).
pub const PROG_STRICT_IN: &str = "sn_strict_in";
/// `sk_msg`, attached to [`SPLICE`]: redirects a member's messages to its peer socket.
pub const PROG_SPLICE_MSG: &str = "sn_splice_msg";

/// Everything sidenode pins lives under `<bpffs>/sidenode/`.
pub const PIN_ROOT: &str = "sidenode";
/// The `sk_msg` program is attached to its map (not to a cgroup, so no bpf link) and pinned
/// as a program at `<bpffs>/sidenode/progs/<program>`: the pin marks it attached.
pub const PIN_PROGS: &str = "sidenode/progs";
/// Maps are pinned by name under `<bpffs>/sidenode/maps/`.
pub const PIN_MAPS: &str = "sidenode/maps";
/// Program links are pinned under `<bpffs>/sidenode/links/<program>`.
pub const PIN_LINKS: &str = "sidenode/links";

/// An IPv6 address or an IPv4-mapped IPv4 address, network byte order, as four words in memory
/// order (what `bpf_sock_addr.user_ip6` holds).
pub type Addr = [u32; 4];

/// Word 2 of an IPv4-mapped address (`00 00 ff ff`), in memory order on any endianness.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4-mapped form of an IPv4 address given as it sits in memory (network order).
#[inline(always)]
pub const fn addr_from_v4(ip4_net: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4_net]
}

/// `AF_INET` / `AF_INET6` as stored in [`OrigDst::family`].
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// Key of [`ORIG_DST`]: the captured client's own address and port, which is what the proxy
/// sees as the peer of the accepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of [`SPLICE`] and [`SPLICE_STATE`]: one socket's connection as that socket sees it.
/// The peer of a local leg is the socket whose key has `local` and `remote` swapped
/// ([`SpliceKey::peer`]): the captured pod's socket and the proxy's accepted one, or the
/// proxy's socket to a pod and the pod's accepted one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpliceKey {
    pub local: Addr,
    pub remote: Addr,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
}

impl SpliceKey {
    /// The key of the socket at the other end of this connection.
    #[inline(always)]
    pub const fn peer(&self) -> SpliceKey {
        SpliceKey {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// [`SPLICE_STATE`] bit: this socket is the active side of a local leg (a captured pod's
/// connection to the proxy, or the proxy's connection to a pod); the socket that accepts it
/// joins [`SPLICE`] too.
pub const SPLICE_F_LEG: u32 = 1;
/// [`SPLICE_STATE`] bit: this socket's first message found no peer in [`SPLICE`], so all its
/// messages take the normal path (mixing the two would let the reader see bytes out of order).
pub const SPLICE_F_PLAIN: u32 = 2;
/// [`SPLICE_STATE`] bit: this socket (a captured pod's) has an [`ORIG_DST`] entry to remove at
/// close. Other members share local addresses with captured sockets (the proxy's listener
/// address, a pod's served port), so they leave [`ORIG_DST`] alone.
pub const SPLICE_F_ORIG: u32 = 4;

/// Where a captured connection was meant to go, and from which workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
    pub _pad: u32,
    /// Network-namespace cookie of the client socket (a key of [`ENROLLED`]).
    pub netns_cookie: u64,
}

pub const NAME_LEN: usize = 128;
pub const NAMESPACE_LEN: usize = 64;
pub const SA_LEN: usize = 64;

/// Value of [`ENROLLED`]: who lives in an enrolled network namespace. Strings are UTF-8,
/// NUL-padded (and truncated to fit; Kubernetes namespace and service-account names fit).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub addr: Addr,
    /// [`WORKLOAD_F_*`](WORKLOAD_F_CAPTURE) bits.
    pub flags: u32,
    pub _pad: u32,
    pub name: [u8; NAME_LEN],
    pub namespace: [u8; NAMESPACE_LEN],
    pub service_account: [u8; SA_LEN],
}

/// Outbound connections of this workload are captured.
pub const WORKLOAD_F_CAPTURE: u32 = 1;

/// Value of [`CONFIG`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The proxy's IPv4 address, network order (as in `bpf_sock_addr.user_ip4`). 0 = capture off.
    pub proxy_ip4: u32,
    /// Outbound listener port, host order.
    pub outbound_port: u16,
    /// [`CONFIG_F_SPLICE`] bits. Was padding: an older agent writes 0 (everything off).
    pub flags: u16,
    /// `SO_MARK` of the proxy's own sockets: never captured.
    pub proxy_mark: u32,
    /// Ports on the proxy's addresses that are never rewritten (host order; 0 = unused slot).
    pub proxy_ports: [u16; 8],
    /// The proxy's IPv6 address (network order words, as `bpf_sock_addr.user_ip6`); all zero =
    /// IPv6 connections are not captured.
    pub proxy_ip6: Addr,
}

/// [`ProxyConfig::flags`] bit: splice the local legs of new connections
/// (`mesh-node agent --splice`); clearing it leaves sockets already spliced so until they
/// close.
pub const CONFIG_F_SPLICE: u16 = 1;

/// Key of [`STRICT`]: a pod address and a destination port (host order); port 0 holds the
/// mode of the workload as a whole. The program looks up (address, port) first, then
/// (address, 0); a pod with neither entry is not enforced.
///
/// The agent writes (address, 0) → `MTLS_STRICT` when the workload's mode is STRICT, and
/// (address, port) only for ports whose mode differs in strictness from the workload's
/// (a PERMISSIVE/DISABLE exception of a STRICT pod, or a STRICT port of a non-STRICT one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StrictKey {
    pub addr: Addr,
    /// Host order; 0 = the workload's mode.
    pub port: u16,
    pub _pad: u16,
}

/// Values of [`STRICT`] (the effective `PeerAuthentication` mode). Only [`MTLS_STRICT`] drops.
pub const MTLS_PERMISSIVE: u32 = 1;
pub const MTLS_STRICT: u32 = 2;
pub const MTLS_DISABLE: u32 = 3;

/// Indexes of [`STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// `connect()` rewritten to the proxy.
    Captured = 0,
    /// From an enrolled netns, but the destination is excluded (loopback, port, CIDR, proxy).
    Excluded = 1,
    /// From an enrolled netns, by the proxy's own marked socket.
    ProxyOwn = 2,
    /// Captured connection established: original destination recorded by 4-tuple.
    Recorded = 3,
    /// Original-destination entry removed at close.
    Closed = 4,
    /// A map update failed in the kernel.
    MapErrors = 5,
    /// A plaintext connection attempt (TCP SYN) to a STRICT pod's port was dropped.
    StrictDropped = 6,
    /// A socket joined [`SPLICE`] (a local leg's end).
    SpliceJoined = 7,
    /// A message was handed straight to the peer socket.
    SpliceMsgs = 8,
    /// Bytes handed straight to peer sockets.
    SpliceBytes = 9,
    /// A member's first message found no peer: the socket takes the normal path.
    SplicePlain = 10,
    /// A `connect()` to capture was refused (`EPERM`): its original destination could not be
    /// kept ([`PENDING`] refused the entry), and it must neither bypass the mesh nor reach
    /// the proxy unrecorded.
    Refused = 11,
}
pub const STAT_COUNT: u32 = 12;
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "captured",
    "excluded",
    "proxy_own",
    "recorded",
    "closed",
    "map_errors",
    "strict_dropped",
    "splice_joined",
    "splice_msgs",
    "splice_bytes",
    "splice_plain",
    "refused",
];

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are repr(C), Copy, and made only of integers and integer arrays
    // with explicit padding fields, so any bit pattern is valid.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Workload {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::StrictKey {}
    unsafe impl aya::Pod for super::SpliceKey {}
}

/// Copies `s` into a NUL-padded fixed buffer, truncating at a UTF-8 boundary.
pub fn fill_name<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// Reads a NUL-padded buffer back as text (invalid UTF-8 is cut at the first bad byte).
pub fn name_str(buf: &[u8]) -> &str {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match core::str::from_utf8(&buf[..end]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or(""),
    }
}
