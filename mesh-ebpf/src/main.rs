//! sidenode's kernel programs, attached to one cgroup v2 folder (`--cgroup-root`):
//!
//! 1. `sn_connect4` (`cgroup/connect4`): a TCP `connect()` from an enrolled network namespace is
//!    rewritten to the node proxy's outbound listener; the original destination is kept in
//!    `SN_PENDING`, keyed by the socket's cookie.
//! 2. `sn_sockops` (`sockops`): when that connection is established, its original destination
//!    moves to `SN_ORIG_DST`, keyed by the client's own address and port — exactly the peer
//!    address the proxy sees after `accept()`. The entry is removed when the socket closes.
//!
//! Everything else passes untouched. Layouts, names and byte orders: `mesh-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    Addr, ENROLLED_MAX, EXCL_CIDRS_MAX, EXCL_PORTS_MAX, FAMILY_V4, ORIG_DST_MAX, OrigDst,
    PENDING_MAX, ProxyConfig, STAT_COUNT, SockKey, Stat, Workload, addr_from_v4,
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
/// `connect()` goes on (with the rewritten address, if any).
const ALLOW: i32 = 1;

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
static SN_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(p) = SN_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot, so no other writer races with this one.
        unsafe { *p += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sn_connect4(ctx: SockAddrContext) -> i32 {
    capture_connect4(&ctx);
    ALLOW
}

#[inline(always)]
fn capture_connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the helper takes the program's context, which `ctx` is.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if SN_ENROLLED.get_ptr(netns).is_none() {
        return;
    }
    // SAFETY: `sa` is the kernel-provided context; these fields are readable in connect4.
    let (sock_type, dst_ip, user_port, sk) = unsafe {
        (
            (*sa).type_,
            (*sa).user_ip4,
            (*sa).user_port,
            (*sa).__bindgen_anon_1.sk,
        )
    };
    if sock_type != SOCK_STREAM {
        return;
    }
    let Some(cfg) = SN_CONFIG.get(0) else { return };
    if cfg.proxy_ip4 == 0 {
        return;
    }
    // SAFETY: `sk` is the socket being connected (never null in connect4); `mark` is readable.
    if !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark {
        bump(Stat::ProxyOwn);
        return;
    }
    let dst_port = u16::from_be(user_port as u16);
    if excluded_v4(cfg, dst_ip, dst_port) {
        bump(Stat::Excluded);
        return;
    }
    let orig = OrigDst {
        addr: addr_from_v4(dst_ip),
        port: dst_port,
        family: FAMILY_V4,
        _pad: 0,
        netns_cookie: netns,
    };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SN_PENDING.insert(cookie, orig, 0).is_err() {
        // Without a record the proxy could not forward it: leave the connection alone.
        bump(Stat::MapErrors);
        return;
    }
    // SAFETY: user_ip4/user_port are writable in connect4; the port is network order.
    unsafe {
        (*sa).user_ip4 = cfg.proxy_ip4;
        (*sa).user_port = u32::from(cfg.outbound_port.to_be());
    }
    bump(Stat::Captured);
}

/// Loopback, unspecified, the proxy's own ports, and the configured ports and CIDRs.
#[inline(always)]
fn excluded_v4(cfg: &ProxyConfig, dst_ip: u32, dst_port: u16) -> bool {
    let host = u32::from_be(dst_ip);
    if host >> 24 == 127 || host == 0 {
        return true;
    }
    if dst_ip == cfg.proxy_ip4 {
        let mut i = 0;
        while i < cfg.proxy_ports.len() {
            if cfg.proxy_ports[i] == dst_port {
                return true;
            }
            i += 1;
        }
    }
    if SN_EXCL_PORTS.get_ptr(dst_port).is_some() {
        return true;
    }
    SN_EXCL_CIDRS
        .get(Key::new(128, addr_from_v4(dst_ip)))
        .is_some()
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
            if ctx.family() != AF_INET {
                return;
            }
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let Some(orig) = SN_PENDING.get_ptr(cookie) else {
                return;
            };
            // SAFETY: a live map value; copied out before the entry is removed.
            let orig = unsafe { *orig };
            let key = local_key_v4(ctx);
            if SN_ORIG_DST.insert(key, orig, 0).is_err() {
                bump(Stat::MapErrors);
            } else {
                bump(Stat::Recorded);
            }
            let _ = SN_PENDING.remove(cookie);
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state.
            if ctx.arg(1) != BPF_TCP_CLOSE {
                return;
            }
            // SAFETY: as above.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SN_PENDING.remove(cookie);
            if ctx.family() == AF_INET && SN_ORIG_DST.remove(local_key_v4(ctx)).is_ok() {
                bump(Stat::Closed);
            }
        }
        _ => {}
    }
}

/// The client's own address: local IPv4 (network order) and local port (host order).
#[inline(always)]
fn local_key_v4(ctx: &SockOpsContext) -> SockKey {
    SockKey {
        addr: addr_from_v4(ctx.local_ip4()),
        port: ctx.local_port() as u16,
        _pad: 0,
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
