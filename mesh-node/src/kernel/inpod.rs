//! Keeping the client's address on the last leg (as ztunnel's in-pod mode does): the node
//! proxy connects to a pod from *inside the pod's network namespace*, from the client pod's IP
//! (`IP_TRANSPARENT`), so the application sees the real client as its peer.
//!
//! The pod's replies go to the client's address, which is not local in the pod: without help
//! they would leave through the pod's interface. Two kernel settings of the pod's namespace
//! bring them back to the proxy's socket, no packet filter rules involved:
//! - `net.ipv4.tcp_fwmark_accept = 1` (it covers IPv6 too): a connection accepted from a SYN
//!   that carries a mark takes that mark, and so do its SYN-ACK and every later packet; and
//!   `net.ipv4|ipv6.fwmark_reflect = 1`: the kernel's replies without a socket (the RST for a
//!   closed port) take the mark of what they answer. The proxy's socket carries
//!   [`orig_src_mark`]; packets from other namespaces arrive unmarked (the kernel clears the
//!   mark when a packet crosses namespaces), so nothing else changes;
//! - a policy rule `fwmark <that mark> lookup 1337` (IPv4 and IPv6) and, in table 1337, a
//!   `local` default route through `lo`: the marked replies are delivered locally, to the
//!   proxy's socket bound to the client's address.
//!
//! [`prepare`] sets both up when the proxy opens the pod's HBONE listener, [`release`] removes
//! them when the pod leaves the mesh. [`transparent_socket`] makes the proxy's socket inside
//! the pod's namespace on the calling thread, which it returns to the proxy's namespace
//! before anything else runs on it.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mesh_common::ports::{PROXY_MARK, orig_src_mark};
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, RouteMessageBuilder};

/// The routing table (and rule priority) used inside pods: Istio's 1337, as the mark.
pub const ROUTE_TABLE: u32 = 1337;
pub const RULE_PRIORITY: u32 = 1337;
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_INDEX: u32 = 1;
/// The sysctls set to 1 in the pod's namespace: accepted connections take the SYN's mark, and
/// the kernel's own replies without a socket (the RST to a SYN for a closed port, ICMP
/// errors) take the mark of the packet they answer, so a refused connection is refused to the
/// proxy, not sent towards the client's real address. (The IPv6 one is missing when the pod
/// has no IPv6: then it is skipped.)
const SYSCTLS: [(&str, bool); 3] = [
    ("ipv4/tcp_fwmark_accept", true),
    ("ipv4/fwmark_reflect", true),
    ("ipv6/fwmark_reflect", false),
];

/// Why a pod's namespace could not be set up for (or rid of) client addresses.
#[derive(Debug, thiserror::Error)]
pub enum InPodError {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sysctl {path} in the pod's namespace: {source}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("netlink in the pod's namespace: {what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink in the pod's namespace: {0}")]
    Io(#[from] io::Error),
}

/// What [`prepare`] found and did: [`release`] restores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The sysctls changed, with their values before (restored on release).
    pub sysctls_were: Vec<(PathBuf, String)>,
    /// The IPv6 rule and route are there (false when the pod has no IPv6).
    pub ipv6: bool,
}

/// The proxy's own network namespace (its main thread's, which never changes namespace).
fn home() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| f))
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on this thread inside the namespace `ns`, then brings the thread back. `f` must
/// not yield (no `.await` can be inside it: it is a plain closure).
pub fn within<T>(ns: &File, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = home()?;
    setns(ns)?;
    let r = f();
    if let Err(e) = setns(home) {
        // The thread would stay in the pod's namespace and every later socket it opens (for
        // any connection) would be made there: stop rather than misroute traffic.
        tracing::error!(error = %e, "cannot return to the proxy's network namespace; aborting");
        std::process::abort();
    }
    r
}

/// A non-blocking TCP socket inside the pod's namespace `ns`, bound to `client` (any port)
/// with `IP_TRANSPARENT` and the client-address mark, ready to connect to a pod address of
/// the same family.
pub fn transparent_socket(ns: &File, client: IpAddr) -> io::Result<socket2::Socket> {
    within(ns, || {
        let domain = match client {
            IpAddr::V4(_) => socket2::Domain::IPV4,
            IpAddr::V6(_) => socket2::Domain::IPV6,
        };
        let s = socket2::Socket::new(
            domain,
            socket2::Type::STREAM.nonblocking(),
            Some(socket2::Protocol::TCP),
        )?;
        s.set_mark(orig_src_mark(PROXY_MARK))?;
        match client {
            IpAddr::V4(_) => s.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => s.set_ip_transparent_v6(true)?,
        }
        s.set_tcp_nodelay(true)?;
        // A port chosen by `bind`, not by `connect` (no `IP_BIND_ADDRESS_NO_PORT`): the kernel
        // gives `bind` the odd ports of the range and `connect` the even ones, and it chooses
        // `connect`'s port from a sequence keyed by the addresses and port but not by the
        // namespace, so with the option this leg often got the client's own port (the same
        // four-tuple in two namespaces; 8 of 12,000 connections in one test run) — harmless to
        // TCP, but the server could no longer tell a proxied connection from a direct one.
        s.bind(&SocketAddr::new(client, 0).into())?;
        Ok(s)
    })
}

/// A non-blocking TCP socket inside the pod's namespace `ns`, carrying the proxy's mark (the
/// capture programs skip it), not bound: it connects from the pod's own address, as the pod
/// would. The proxy's HBONE tunnels leave the node this way, so the destination sees the
/// source pod's address on the tunnel itself (as with ztunnel's in-pod mode).
pub fn pod_socket(ns: &File, family: SocketAddr) -> io::Result<socket2::Socket> {
    within(ns, || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(family),
            socket2::Type::STREAM.nonblocking(),
            Some(socket2::Protocol::TCP),
        )?;
        s.set_mark(PROXY_MARK)?;
        s.set_tcp_nodelay(true)?;
        Ok(s)
    })
}

/// Sets the pod's namespace at `path` up for client addresses (idempotent). `proc_sys_net`
/// is where this process sees `/proc/sys/net` writable (a container mounts its own read-only:
/// the DaemonSet mounts the host's at `/host/proc/sys/net`); it resolves to the namespace of
/// the thread that opens it.
pub fn prepare(path: &Path, proc_sys_net: &Path) -> Result<Prepared, InPodError> {
    let proc_sys_net = proc_sys_net.to_path_buf();
    in_namespace(path, move || {
        let mut sysctls_were = Vec::new();
        for (name, required) in SYSCTLS {
            let sysctl = proc_sys_net.join(name);
            let err = |source| InPodError::Sysctl {
                path: sysctl.clone(),
                source,
            };
            let was = match std::fs::read_to_string(&sysctl) {
                Ok(v) => v.trim().to_string(),
                Err(e) if !required && e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(e)),
            };
            if was != "1" {
                std::fs::write(&sysctl, "1").map_err(err)?;
                sysctls_were.push((sysctl.clone(), was));
            }
        }
        let ipv6 = netlink(|h| async move {
            add_rule_and_route(&h, false).await?;
            // A pod without IPv6 (disabled in its namespace) refuses the IPv6 ones: that pod
            // has no IPv6 clients either.
            Ok(add_rule_and_route(&h, true).await.is_ok())
        })?;
        Ok(Prepared { sysctls_were, ipv6 })
    })
}

/// Undoes [`prepare`] in the namespace at `path` (a namespace already gone needs nothing).
pub fn release(path: &Path, prepared: &Prepared) -> Result<(), InPodError> {
    let prepared = prepared.clone();
    in_namespace(path, move || {
        netlink(|h| async move {
            del_rule_and_route(&h, false).await?;
            if prepared.ipv6 {
                del_rule_and_route(&h, true).await?;
            }
            Ok(())
        })?;
        for (sysctl, was) in &prepared.sysctls_were {
            std::fs::write(sysctl, was).map_err(|source| InPodError::Sysctl {
                path: sysctl.clone(),
                source,
            })?;
        }
        Ok(())
    })
}

/// Runs `f` on a short-lived thread inside the namespace at `path`.
fn in_namespace<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, InPodError> + Send + 'static,
) -> Result<T, InPodError> {
    let netns_err = |source| InPodError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let ns = File::open(path).map_err(netns_err)?;
    std::thread::Builder::new()
        .name("netns-inpod".into())
        .spawn(move || {
            setns(&ns).map_err(|source| InPodError::Netns {
                path: PathBuf::new(),
                source,
            })?;
            f()
        })
        .map_err(netns_err)?
        .join()
        .map_err(|_| netns_err(io::Error::other("namespace thread panicked")))?
}

/// A netlink connection made on this thread (so in its namespace), driven by a runtime of
/// its own for the requests of `f`.
fn netlink<T, F, Fut>(f: F) -> Result<T, InPodError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, InPodError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

fn rule(h: &Handle, v6: bool) -> rtnetlink::packet_route::rule::RuleMessage {
    let add = h
        .rule()
        .add()
        .fw_mark(orig_src_mark(PROXY_MARK))
        .table_id(ROUTE_TABLE)
        .priority(RULE_PRIORITY)
        .action(RuleAction::ToTable);
    if v6 {
        add.v6().message_mut().clone()
    } else {
        add.v4().message_mut().clone()
    }
}

fn route(v6: bool) -> rtnetlink::packet_route::route::RouteMessage {
    if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LOOPBACK_INDEX)
            .build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LOOPBACK_INDEX)
            .build()
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

async fn add_rule_and_route(h: &Handle, v6: bool) -> Result<(), InPodError> {
    let exists = |e: &rtnetlink::Error| errno(e) == Some(libc::EEXIST);
    if let Err(e) = h.route().add(route(v6)).execute().await
        && !exists(&e)
    {
        return Err(InPodError::Netlink {
            what: if v6 {
                "adding the IPv6 local route"
            } else {
                "adding the IPv4 local route"
            },
            source: e,
        });
    }
    // A rule is added again by the kernel even when an equal one exists: look first.
    if !rule_present(h, v6).await? {
        let mut req = h.rule().add();
        *req.message_mut() = rule(h, v6);
        req.execute().await.map_err(|source| InPodError::Netlink {
            what: if v6 {
                "adding the IPv6 mark rule"
            } else {
                "adding the IPv4 mark rule"
            },
            source,
        })?;
    }
    Ok(())
}

async fn rule_present(h: &Handle, v6: bool) -> Result<bool, InPodError> {
    use futures::TryStreamExt;
    use rtnetlink::IpVersion;
    use rtnetlink::packet_route::rule::RuleAttribute;
    let mut rules = h
        .rule()
        .get(if v6 { IpVersion::V6 } else { IpVersion::V4 })
        .execute();
    while let Some(r) = rules
        .try_next()
        .await
        .map_err(|source| InPodError::Netlink {
            what: "listing rules",
            source,
        })?
    {
        let mark = r
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::FwMark(m) if *m == orig_src_mark(PROXY_MARK)));
        let table = r
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Table(t) if *t == ROUTE_TABLE))
            || u32::from(r.header.table) == ROUTE_TABLE;
        if mark && table {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn del_rule_and_route(h: &Handle, v6: bool) -> Result<(), InPodError> {
    let gone = |e: &rtnetlink::Error| {
        matches!(
            errno(e),
            Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EAFNOSUPPORT)
        )
    };
    while rule_present(h, v6).await? {
        if let Err(e) = h.rule().del(rule(h, v6)).execute().await {
            if gone(&e) {
                break;
            }
            return Err(InPodError::Netlink {
                what: "removing the mark rule",
                source: e,
            });
        }
    }
    if let Err(e) = h.route().del(route(v6)).execute().await
        && !gone(&e)
    {
        return Err(InPodError::Netlink {
            what: "removing the local route",
            source: e,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last leg's socket is bound to the client's address with a port of `bind`'s parity
    /// (odd: never one the client's own `connect` took) and made non-blocking at creation.
    #[test]
    fn the_transparent_socket_binds_an_odd_port() {
        let ns = File::open("/proc/self/ns/net").expect("own netns");
        let s = transparent_socket(&ns, IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("socket");
        let local = s.local_addr().expect("local address");
        let local = local.as_socket().expect("an inet address");
        assert_eq!(local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(local.port() % 2, 1, "bind took an even port: {local}");
        assert!(s.nonblocking().expect("flags"));
    }

    #[test]
    fn the_rule_matches_the_whole_client_address_mark() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (conn, h, _) = rtnetlink::new_connection().expect("netlink");
            let task = tokio::spawn(conn);
            let m = rule(&h, false);
            use rtnetlink::packet_route::rule::RuleAttribute;
            assert!(m.attributes.contains(&RuleAttribute::FwMark(0x8000_0539)));
            assert!(
                m.attributes
                    .contains(&RuleAttribute::Priority(RULE_PRIORITY))
            );
            task.abort();
        });
    }
}
