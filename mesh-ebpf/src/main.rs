//! sidenode's kernel programs, attached to one cgroup v2 folder (`--cgroup-root`):
//!
//! 1. `sn_connect4` / `sn_connect6` (`cgroup/connect4|6`): a TCP `connect()` from an enrolled
//!    network namespace is rewritten to the node proxy's outbound listener; the original
//!    destination is kept in `SN_PENDING`, keyed by the socket's cookie.
//! 2. `sn_sockops` (`sockops`): when that connection is established, its original destination
//!    moves to `SN_ORIG_DST`, keyed by the client's own address and port — exactly the peer
//!    address the proxy sees after `accept()`. The entry is removed when the socket closes.
//! 3. `sn_strict_in` (`cgroup_skb/ingress`): a plaintext connection attempt (TCP SYN) to a
//!    port of a pod whose `PeerAuthentication` mode is STRICT (`SN_STRICT`) is dropped, unless
//!    it is for the HBONE port or comes from the node proxy's own address (the inbound proxy
//!    connects to the pod from the node's network namespace).
//! 4. Splicing the local legs (`sn_sockops` + `sn_splice_msg`, an `sk_msg` program attached to
//!    `SN_SPLICE`): both ends of a leg that never leaves the node — a captured pod's socket and
//!    the proxy's accepted one; the proxy's socket to a local pod and the pod's accepted one —
//!    join the `SN_SPLICE` sockhash when established, and each message one of them sends is
//!    put straight on its peer's receive queue, skipping TCP/IP and the veth. A socket whose
//!    first message finds no peer keeps the normal path for good (`SPLICE_F_PLAIN`).
//!
//! 5. Decision logs (aya-log, read by the agent): captured, excluded and why, recorded, STRICT
//!    drops — only while `SN_LOG` says so (for every pod, or for the pods in `SN_LOG_PODS`);
//!    off, a program only tests one word of an array map.
//!
//! Everything else passes untouched. Layouts, names and byte orders: `mesh-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{info, warn};
use core::net::{Ipv4Addr, Ipv6Addr};
use mesh_common::ports::{is_proxy_mark, orig_src_mark};
use mesh_common::{
    Addr, CONFIG_F_SPLICE, ENROLLED_MAX, EXCL_CIDRS_MAX, EXCL_PORTS_MAX, FAMILY_V4, FAMILY_V6,
    LOG_F_ALL, LOG_F_SOME, LOG_PODS_MAX, META_MAX, MTLS_STRICT, ORIG_DST_MAX, OrigDst, PENDING_MAX,
    ProxyConfig, SPLICE_F_LEG, SPLICE_F_ORIG, SPLICE_F_PLAIN, SPLICE_MAX, SPLICE_STATE_MAX,
    STATS_MAX, STRICT_MAX, SockKey, SpliceKey, Stat, StrictKey, V4_MAPPED_WORD, Workload,
    addr_from_v4,
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `connect()` goes on (with the rewritten address, if any).
const ALLOW: i32 = 1;
/// `connect()` fails with `EPERM`: a connection to capture whose original destination could
/// not be kept. It must neither reach the proxy (which could not forward it) nor bypass the
/// mesh by going to its destination directly.
const REFUSE: i32 = 0;

#[map(name = "SN_ENROLLED")]
static SN_ENROLLED: HashMap<u64, Workload> = HashMap::pinned(ENROLLED_MAX, 0);

#[map(name = "SN_PENDING")]
static SN_PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(PENDING_MAX, 0);

#[map(name = "SN_ORIG_DST")]
static SN_ORIG_DST: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(ORIG_DST_MAX, 0);

#[map(name = "SN_CONFIG")]
static SN_CONFIG: Array<ProxyConfig> = Array::pinned(1, 0);

#[map(name = "SN_EXCL_PORTS")]
static SN_EXCL_PORTS: HashMap<u16, u8> = HashMap::pinned(EXCL_PORTS_MAX, 0);

#[map(name = "SN_EXCL_CIDRS")]
static SN_EXCL_CIDRS: LpmTrie<Addr, u8> = LpmTrie::pinned(EXCL_CIDRS_MAX, 0);

#[map(name = "SN_STATS")]
static SN_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_MAX, 0);

#[map(name = "SN_STRICT")]
static SN_STRICT: HashMap<StrictKey, u32> = HashMap::pinned(STRICT_MAX, 0);

#[map(name = "SN_SPLICE")]
static SN_SPLICE: SockHash<SpliceKey> = SockHash::pinned(SPLICE_MAX, 0);

#[map(name = "SN_SPLICE_ST")]
static SN_SPLICE_ST: LruHashMap<SpliceKey, u32> = LruHashMap::pinned(SPLICE_STATE_MAX, 0);

#[map(name = "SN_LOG")]
static SN_LOG: Array<u32> = Array::pinned(1, 0);

#[map(name = "SN_LOG_PODS")]
static SN_LOG_PODS: HashMap<u64, u8> = HashMap::pinned(LOG_PODS_MAX, 0);

/// What is installed (layout version, object id): written and read by the agent only.
#[map(name = "SN_META")]
static SN_META: Array<u64> = Array::pinned(META_MAX, 0);

/// Are the decisions about the pod of network namespace `netns` logged? Off (the default),
/// one array word is tested.
#[inline(always)]
fn logging(netns: u64) -> bool {
    let Some(flags) = SN_LOG.get(0) else {
        return false;
    };
    let flags = *flags;
    flags & LOG_F_ALL != 0 || (flags & LOG_F_SOME != 0 && SN_LOG_PODS.get_ptr(netns).is_some())
}

/// Logging for every pod (decisions not tied to one source pod: STRICT drops).
#[inline(always)]
fn logging_all() -> bool {
    SN_LOG.get(0).is_some_and(|f| *f & LOG_F_ALL != 0)
}

/// An [`Addr`] that is IPv4 (mapped), as an address to log.
#[inline(always)]
fn v4_of(a: &Addr) -> Option<Ipv4Addr> {
    (a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD).then(|| Ipv4Addr::from(u32::from_be(a[3])))
}

/// An [`Addr`] as an IPv6 address to log (network-order words → bytes).
#[inline(always)]
fn v6_of(a: &Addr) -> Ipv6Addr {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        b[i * 4] = w[0];
        b[i * 4 + 1] = w[1];
        b[i * 4 + 2] = w[2];
        b[i * 4 + 3] = w[3];
        i += 1;
    }
    Ipv6Addr::from(b)
}

/// Why a destination is not captured (logged; `None`: captured).
#[derive(Clone, Copy)]
enum Excluded {
    Local,
    ProxyPort,
    Port,
    Cidr,
}

impl Excluded {
    #[inline(always)]
    fn as_str(self) -> &'static str {
        match self {
            Excluded::Local => "loopback or unspecified",
            Excluded::ProxyPort => "the proxy's own port",
            Excluded::Port => "excluded port",
            Excluded::Cidr => "excluded CIDR",
        }
    }
}

/// The four words of an IPv6 address field of a kernel context (`bpf_sock_ops`, `sk_msg_md`),
/// read one by one at constant offsets: the verifier refuses a context access through a
/// computed pointer, which a whole-array copy compiles to. Use inside `unsafe`.
macro_rules! ip6_words {
    ($ctx:expr, $field:ident) => {
        [
            core::ptr::read_volatile(&(*$ctx).$field[0]),
            core::ptr::read_volatile(&(*$ctx).$field[1]),
            core::ptr::read_volatile(&(*$ctx).$field[2]),
            core::ptr::read_volatile(&(*$ctx).$field[3]),
        ]
    };
}

#[inline(always)]
fn bump(stat: Stat) {
    add(stat, 1);
}

#[inline(always)]
fn add(stat: Stat, n: u64) {
    if let Some(p) = SN_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot, so no other writer races with this one.
        unsafe { *p += n };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sn_connect4(ctx: SockAddrContext) -> i32 {
    capture_connect4(&ctx)
}

/// [`ALLOW`], or [`REFUSE`] when the connection should be captured but its original
/// destination could not be kept.
#[inline(always)]
fn capture_connect4(ctx: &SockAddrContext) -> i32 {
    let Some((netns, cfg)) = capturable(ctx) else {
        return ALLOW;
    };
    if cfg.proxy_ip4 == 0 {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; these fields are readable in connect4.
    let (dst_ip, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let dst_port = u16::from_be(user_port as u16);
    if let Some(why) = excluded_v4(cfg, dst_ip, dst_port) {
        bump(Stat::Excluded);
        if logging(netns) {
            info!(
                ctx,
                "not captured ({}): netns={} dst={}:{}",
                why.as_str(),
                netns,
                Ipv4Addr::from(u32::from_be(dst_ip)),
                dst_port
            );
        }
        return ALLOW;
    }
    let orig = OrigDst {
        addr: addr_from_v4(dst_ip),
        port: dst_port,
        family: FAMILY_V4,
        _pad: 0,
        netns_cookie: netns,
    };
    if !record(ctx, orig) {
        bump(Stat::Refused);
        return REFUSE;
    }
    // SAFETY: user_ip4/user_port are writable in connect4; the port is network order.
    unsafe {
        (*sa).user_ip4 = cfg.proxy_ip4;
        (*sa).user_port = u32::from(cfg.outbound_port.to_be());
    }
    bump(Stat::Captured);
    if logging(netns) {
        info!(
            ctx,
            "captured: netns={} dst={}:{}",
            netns,
            Ipv4Addr::from(u32::from_be(dst_ip)),
            dst_port
        );
    }
    ALLOW
}

/// What both connect programs check first: the socket's network namespace is enrolled, it is
/// TCP, the capture settings are there, and it is not one of the proxy's own (marked) sockets.
/// Gives the netns cookie and the settings.
#[inline(always)]
fn capturable(ctx: &SockAddrContext) -> Option<(u64, &'static ProxyConfig)> {
    let sa = ctx.sock_addr;
    // SAFETY: the helper takes the program's context, which `ctx` is.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SN_ENROLLED.get_ptr(netns)?;
    // SAFETY: `sa` is the kernel-provided context; these fields are readable in connect4/6.
    let (sock_type, sk) = unsafe { ((*sa).type_, (*sa).__bindgen_anon_1.sk) };
    if sock_type != SOCK_STREAM {
        return None;
    }
    let cfg = SN_CONFIG.get(0)?;
    // SAFETY: `sk` is the socket being connected; `mark` is readable.
    if !sk.is_null() && is_proxy_mark(unsafe { (*sk).mark }, cfg.proxy_mark) {
        bump(Stat::ProxyOwn);
        if logging(netns) {
            info!(
                ctx,
                "not captured (the proxy's own socket): netns={}", netns
            );
        }
        return None;
    }
    Some((netns, cfg))
}

/// Keeps the original destination under the socket's cookie. False when the map refused it:
/// without a record the proxy could not forward the connection, and letting it go straight
/// to its destination would bypass the mesh, so `connect()` is refused.
#[inline(always)]
fn record(ctx: &SockAddrContext, orig: OrigDst) -> bool {
    // SAFETY: the helper takes the program's context, which `ctx` is.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SN_PENDING.insert(cookie, orig, 0).is_err() {
        bump(Stat::MapErrors);
        if logging(orig.netns_cookie) {
            warn!(
                ctx,
                "not captured (SN_PENDING refused the entry): netns={} dst port {}",
                orig.netns_cookie,
                orig.port
            );
        }
        return false;
    }
    true
}

/// Loopback, unspecified, the proxy's own ports, and the configured ports and CIDRs.
#[inline(always)]
fn excluded_v4(cfg: &ProxyConfig, dst_ip: u32, dst_port: u16) -> Option<Excluded> {
    let host = u32::from_be(dst_ip);
    if host >> 24 == 127 || host == 0 {
        return Some(Excluded::Local);
    }
    if dst_ip == cfg.proxy_ip4 && proxy_port(cfg, dst_port) {
        return Some(Excluded::ProxyPort);
    }
    if SN_EXCL_PORTS.get_ptr(dst_port).is_some() {
        return Some(Excluded::Port);
    }
    SN_EXCL_CIDRS
        .get(Key::new(128, addr_from_v4(dst_ip)))
        .map(|_| Excluded::Cidr)
}

/// Is `port` one of the proxy's own ports?
#[inline(always)]
fn proxy_port(cfg: &ProxyConfig, port: u16) -> bool {
    let mut i = 0;
    while i < cfg.proxy_ports.len() {
        if cfg.proxy_ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[cgroup_sock_addr(connect6)]
pub fn sn_connect6(ctx: SockAddrContext) -> i32 {
    capture_connect6(&ctx)
}

/// IPv6 sockets: an IPv4-mapped destination (`::ffff:a.b.c.d`, a dual-stack socket reaching an
/// IPv4 peer) is handled as IPv4 and sent to the proxy's IPv4 address (mapped); a native IPv6
/// destination goes to the proxy's IPv6 address, when one is configured.
#[inline(always)]
fn capture_connect6(ctx: &SockAddrContext) -> i32 {
    let Some((netns, cfg)) = capturable(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; these fields are readable in connect6.
    let (user_port, d0, d1, d2, d3) = unsafe {
        (
            (*sa).user_port,
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        )
    };
    let dst_port = u16::from_be(user_port as u16);
    let dst: Addr = [d0, d1, d2, d3];
    let mapped = d0 == 0 && d1 == 0 && d2 == V4_MAPPED_WORD;
    let (to, family) = if mapped {
        if cfg.proxy_ip4 == 0 {
            return ALLOW;
        }
        if let Some(why) = excluded_v4(cfg, d3, dst_port) {
            bump(Stat::Excluded);
            log_excluded6(ctx, netns, why, &dst, dst_port);
            return ALLOW;
        }
        (addr_from_v4(cfg.proxy_ip4), FAMILY_V4)
    } else {
        if cfg.proxy_ip6 == [0; 4] {
            return ALLOW;
        }
        if let Some(why) = excluded_v6(cfg, &dst, dst_port) {
            bump(Stat::Excluded);
            log_excluded6(ctx, netns, why, &dst, dst_port);
            return ALLOW;
        }
        (cfg.proxy_ip6, FAMILY_V6)
    };
    let orig = OrigDst {
        addr: dst,
        port: dst_port,
        family,
        _pad: 0,
        netns_cookie: netns,
    };
    if !record(ctx, orig) {
        bump(Stat::Refused);
        return REFUSE;
    }
    // SAFETY: user_ip6/user_port are writable in connect6 (4-byte stores); network order.
    unsafe {
        (*sa).user_ip6[0] = to[0];
        (*sa).user_ip6[1] = to[1];
        (*sa).user_ip6[2] = to[2];
        (*sa).user_ip6[3] = to[3];
        (*sa).user_port = u32::from(cfg.outbound_port.to_be());
    }
    bump(Stat::Captured);
    if logging(netns) {
        match v4_of(&dst) {
            Some(v4) => info!(ctx, "captured: netns={} dst={}:{}", netns, v4, dst_port),
            None => info!(
                ctx,
                "captured: netns={} dst=[{}]:{}",
                netns,
                v6_of(&dst),
                dst_port
            ),
        }
    }
    ALLOW
}

#[inline(always)]
fn log_excluded6(ctx: &SockAddrContext, netns: u64, why: Excluded, dst: &Addr, port: u16) {
    if logging(netns) {
        match v4_of(dst) {
            Some(v4) => info!(
                ctx,
                "not captured ({}): netns={} dst={}:{}",
                why.as_str(),
                netns,
                v4,
                port
            ),
            None => info!(
                ctx,
                "not captured ({}): netns={} dst=[{}]:{}",
                why.as_str(),
                netns,
                v6_of(dst),
                port
            ),
        }
    }
}

/// `::1`, `::`, the proxy's own ports on its IPv6 address, and the configured ports and CIDRs.
#[inline(always)]
fn excluded_v6(cfg: &ProxyConfig, dst: &Addr, dst_port: u16) -> Option<Excluded> {
    let loopback = dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && u32::from_be(dst[3]) == 1;
    let unspecified = dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == 0;
    if loopback || unspecified {
        return Some(Excluded::Local);
    }
    if *dst == cfg.proxy_ip6 && proxy_port(cfg, dst_port) {
        return Some(Excluded::ProxyPort);
    }
    if SN_EXCL_PORTS.get_ptr(dst_port).is_some() {
        return Some(Excluded::Port);
    }
    SN_EXCL_CIDRS
        .get(Key::new(128, *dst))
        .map(|_| Excluded::Cidr)
}

#[sock_ops]
pub fn sn_sockops(ctx: SockOpsContext) -> u32 {
    on_sock_ops(&ctx);
    1
}

#[inline(always)]
fn on_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: the helper takes the program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if SN_PENDING.get_ptr(cookie).is_some() {
                // Ask for state changes so a failed connect cleans up its pending entry.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let Some(conn) = splice_key(ctx) else { return };
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(orig) = SN_PENDING.get_ptr(cookie) {
                // SAFETY: a live map value; copied out before the entry is removed.
                let orig = unsafe { *orig };
                if SN_ORIG_DST.insert(local_key(&conn), orig, 0).is_err() {
                    bump(Stat::MapErrors);
                    // An entry left under this key (a socket whose close went unseen) must not
                    // stand for this connection: without one the proxy closes it, never
                    // sends it to another connection's destination.
                    let _ = SN_ORIG_DST.remove(local_key(&conn));
                    if logging(orig.netns_cookie) {
                        warn!(
                            ctx,
                            "not recorded (SN_ORIG_DST refused the entry): netns={} client port {}",
                            orig.netns_cookie,
                            conn.local_port
                        );
                    }
                } else {
                    bump(Stat::Recorded);
                    if logging(orig.netns_cookie) {
                        log_recorded(ctx, &orig, conn.local_port);
                    }
                }
                let _ = SN_PENDING.remove(cookie);
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
                // A captured pod's connection to the proxy: the first local leg.
                join_splice(ctx, conn, SPLICE_F_LEG | SPLICE_F_ORIG);
            } else if to_local_pod(ctx) {
                // The proxy's connection to a pod: the last local leg.
                join_splice(ctx, conn, SPLICE_F_LEG);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The accepting end of a leg whose active end registered itself.
            let Some(key) = splice_key(ctx) else { return };
            if let Some(peer) = SN_SPLICE_ST.get_ptr(key.peer())
                // SAFETY: a live map value.
                && unsafe { *peer } & SPLICE_F_LEG != 0
            {
                join_splice(ctx, key, 0);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state.
            if ctx.arg(1) != BPF_TCP_CLOSE {
                return;
            }
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SN_PENDING.remove(cookie);
            // A spliced socket that was not captured has no original destination to remove
            // (and its local address may be a captured socket's).
            let Some(conn) = splice_key(ctx) else { return };
            let mut orig = true;
            if let Some(st) = SN_SPLICE_ST.get_ptr(conn) {
                // SAFETY: a live map value, read before the entry is removed.
                orig = unsafe { *st } & SPLICE_F_ORIG != 0;
                let _ = SN_SPLICE_ST.remove(conn);
            }
            if orig && SN_ORIG_DST.remove(local_key(&conn)).is_ok() {
                bump(Stat::Closed);
            }
        }
        _ => {}
    }
}

/// Is this established active socket the proxy's own (marked) connection to a pod's port?
/// Its HBONE connections (to port 15008) are tunnels, never local legs.
#[inline(always)]
fn to_local_pod(ctx: &SockOpsContext) -> bool {
    let Some(cfg) = SN_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: `ops` is the kernel-provided context; `sk` is readable in sock_ops programs
    // (null unless a full socket).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // SAFETY: checked non-null; `mark` is readable through a `bpf_sock`.
    if sk.is_null() || !is_proxy_mark(unsafe { (*sk).mark }, cfg.proxy_mark) {
        return false;
    }
    remote_port(ctx.remote_port()) != mesh_common::ports::HBONE
}

/// Adds the socket to `SN_SPLICE` under its own key and records its state; asks for its close
/// so the state goes with it.
#[inline(always)]
fn join_splice(ctx: &SockOpsContext, mut key: SpliceKey, flags: u32) {
    match SN_CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_F_SPLICE != 0 => {}
        _ => return,
    }
    // SAFETY: `ops` is the program's context.
    if SN_SPLICE
        .update(&mut key, unsafe { &mut *ctx.ops }, 0)
        .is_err()
    {
        bump(Stat::MapErrors);
        return;
    }
    if SN_SPLICE_ST.insert(key, flags, 0).is_err() {
        bump(Stat::MapErrors);
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    bump(Stat::SpliceJoined);
}

/// A `remote_port` field of `bpf_sock_ops` / `sk_msg_md` in host order: the kernel loads the
/// network-order port into the upper 16 bits on little-endian machines.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    if cfg!(target_endian = "little") {
        u16::from_be((raw >> 16) as u16)
    } else {
        raw as u16
    }
}

/// The original destination recorded for a client port.
#[inline(always)]
fn log_recorded(ctx: &SockOpsContext, orig: &OrigDst, client_port: u16) {
    match v4_of(&orig.addr) {
        Some(v4) => info!(
            ctx,
            "recorded: netns={} client port {} dst={}:{}",
            orig.netns_cookie,
            client_port,
            v4,
            orig.port
        ),
        None => info!(
            ctx,
            "recorded: netns={} client port {} dst=[{}]:{}",
            orig.netns_cookie,
            client_port,
            v6_of(&orig.addr),
            orig.port
        ),
    }
}

/// This socket's own connection, as [`SpliceKey`].
#[inline(always)]
fn splice_key(ctx: &SockOpsContext) -> Option<SpliceKey> {
    let (local, remote) = match ctx.family() {
        AF_INET => (
            addr_from_v4(ctx.local_ip4()),
            addr_from_v4(ctx.remote_ip4()),
        ),
        AF_INET6 => {
            let ops = ctx.ops;
            // SAFETY: `ops` is the kernel-provided context; the ip6 words are readable in
            // sockops (word by word at constant offsets, as the verifier wants).
            unsafe { (ip6_words!(ops, local_ip6), ip6_words!(ops, remote_ip6)) }
        }
        _ => return None,
    };
    Some(SpliceKey {
        local,
        remote,
        local_port: ctx.local_port() as u16,
        remote_port: remote_port(ctx.remote_port()),
    })
}

/// Every message a member of `SN_SPLICE` sends: straight to its peer's receive queue, or,
/// when the peer is not there, the normal path — for good, so bytes never overtake each other.
#[sk_msg]
pub fn sn_splice_msg(ctx: SkMsgContext) -> u32 {
    splice_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn splice_msg(ctx: &SkMsgContext) {
    let Some(own) = msg_key(ctx) else {
        return;
    };
    let state = match SN_SPLICE_ST.get_ptr(own) {
        // SAFETY: a live map value.
        Some(st) => unsafe { *st },
        None => 0,
    };
    if state & SPLICE_F_PLAIN != 0 {
        return;
    }
    let size = ctx.size();
    let mut peer = own.peer();
    // The helper sets the redirect and answers SK_PASS, or SK_DROP when the peer is not in the
    // map; the program still answers SK_PASS, so a miss takes the normal path.
    if SN_SPLICE.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == SK_PASS as i64 {
        bump(Stat::SpliceMsgs);
        add(Stat::SpliceBytes, u64::from(size));
    } else {
        let _ = SN_SPLICE_ST.insert(own, state | SPLICE_F_PLAIN, 0);
        bump(Stat::SplicePlain);
    }
}

/// The sending socket's own connection, as [`SpliceKey`].
#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> Option<SpliceKey> {
    let md = ctx.msg;
    // SAFETY: `md` is the kernel-provided context; every field read here is readable in
    // sk_msg programs, at constant offsets.
    unsafe {
        let (local, remote) = match (*md).family {
            AF_INET => (
                addr_from_v4((*md).local_ip4),
                addr_from_v4((*md).remote_ip4),
            ),
            AF_INET6 => (ip6_words!(md, local_ip6), ip6_words!(md, remote_ip6)),
            _ => return None,
        };
        Some(SpliceKey {
            local,
            remote,
            local_port: (*md).local_port as u16,
            remote_port: remote_port((*md).remote_port),
        })
    }
}

/// The client's own address as the proxy will see it as peer: local address (IPv4 mapped) and
/// local port (host order). A dual-stack IPv6 socket to an IPv4 peer already has a mapped one.
#[inline(always)]
fn local_key(conn: &SpliceKey) -> SockKey {
    SockKey {
        addr: conn.local,
        port: conn.local_port,
        _pad: 0,
    }
}

/// `skb->protocol` values (network order, as the field holds them).
const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;

/// Ingress of every socket below the cgroup root (pods' listeners among them): a connection
/// attempt to a STRICT pod's port that did not come through the mesh is dropped.
#[cgroup_skb(ingress)]
pub fn sn_strict_in(ctx: SkBuffContext) -> i32 {
    if strict_drop(&ctx) {
        bump(Stat::StrictDropped);
        if logging_all() {
            log_strict_drop(&ctx);
        }
        SKB_DROP
    } else {
        SKB_PASS
    }
}

/// A TCP packet's source and destination (as [`Addr`]) and the offset of its TCP header; `None`
/// for anything else (and for later IPv4 fragments, which carry no TCP header).
#[inline(always)]
fn ip_header(ctx: &SkBuffContext) -> Option<(Addr, Addr, usize)> {
    let proto = ctx.skb.protocol();
    if proto == ETH_P_IP_BE {
        let vihl = ctx.load::<u8>(0).ok()?;
        let ip_proto = ctx.load::<u8>(9).ok()?;
        // Later fragments carry no TCP header: fragment offset bits of bytes 6..8.
        let frag = ctx.load::<u16>(6).ok()?;
        if ip_proto != IPPROTO_TCP || u16::from_be(frag) & 0x1fff != 0 {
            return None;
        }
        let s = ctx.load::<u32>(12).ok()?;
        let d = ctx.load::<u32>(16).ok()?;
        Some((
            addr_from_v4(s),
            addr_from_v4(d),
            usize::from(vihl & 0x0f) * 4,
        ))
    } else if proto == ETH_P_IPV6_BE {
        // The TCP header right after the fixed header (extension headers are not walked).
        if ctx.load::<u8>(6).ok()? != IPPROTO_TCP {
            return None;
        }
        let s = ctx.load::<Addr>(8).ok()?;
        let d = ctx.load::<Addr>(24).ok()?;
        Some((s, d, 40))
    } else {
        None
    }
}

/// Logs a dropped SYN: its addresses and port, read again (only when logging is on).
#[inline(always)]
fn log_strict_drop(ctx: &SkBuffContext) {
    let Some((src, dst, l4)) = ip_header(ctx) else {
        return;
    };
    let Ok(port_be) = ctx.load::<u16>(l4 + 2) else {
        return;
    };
    let port = u16::from_be(port_be);
    match (v4_of(&src), v4_of(&dst)) {
        (Some(s), Some(d)) => info!(
            ctx,
            "dropped by STRICT (plaintext SYN): src={} dst={}:{}", s, d, port
        ),
        _ => info!(
            ctx,
            "dropped by STRICT (plaintext SYN): src={} dst=[{}]:{}",
            v6_of(&src),
            v6_of(&dst),
            port
        ),
    }
}

/// Only a SYN without ACK (a new inbound connection) is judged: replies to the pod's own
/// outbound connections (SYN-ACK and later) and connections established before the policy
/// pass. The packet starts at its IP header in cgroup_skb programs.
#[inline(always)]
fn strict_drop(ctx: &SkBuffContext) -> bool {
    let Some((src, dst, l4)) = ip_header(ctx) else {
        return false;
    };
    let (Ok(port_be), Ok(flags)) = (ctx.load::<u16>(l4 + 2), ctx.load::<u8>(l4 + 13)) else {
        return false;
    };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    let port = u16::from_be(port_be);
    if port == mesh_common::ports::HBONE {
        return false;
    }
    let mode = match SN_STRICT.get_ptr(StrictKey {
        addr: dst,
        port,
        _pad: 0,
    }) {
        Some(m) => m,
        None => match SN_STRICT.get_ptr(StrictKey {
            addr: dst,
            port: 0,
            _pad: 0,
        }) {
            Some(m) => m,
            None => return false,
        },
    };
    // SAFETY: a live map value.
    if unsafe { *mode } != MTLS_STRICT {
        return false;
    }
    // The inbound proxy (and the node's own processes, kubelet probes among them) connect
    // from the node proxy's address, or, keeping the client's address, from inside the pod
    // with the proxy's client-address mark (a mark no pod process can set without
    // CAP_NET_ADMIN, and which the kernel clears on packets that cross network namespaces).
    let Some(cfg) = SN_CONFIG.get(0) else {
        return true;
    };
    // SAFETY: the kernel-provided `__sk_buff`; `mark` is readable in cgroup_skb programs.
    if unsafe { (*ctx.skb.skb).mark } == orig_src_mark(cfg.proxy_mark) {
        return false;
    }
    let from_proxy = if src[2] == V4_MAPPED_WORD && src[0] == 0 && src[1] == 0 {
        cfg.proxy_ip4 != 0 && src[3] == cfg.proxy_ip4
    } else {
        cfg.proxy_ip6 != [0; 4] && src == cfg.proxy_ip6
    };
    !from_proxy
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
