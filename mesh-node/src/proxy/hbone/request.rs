//! The pure part of serving a `CONNECT` on a pod's HBONE listener (TCP or QUIC alike): the
//! method and the `:authority` checked against the pod's addresses, the client address the
//! `forwarded` header claims. No I/O, so it is unit-tested and fuzzed
//! (`fuzz/fuzz_targets/hbone_request.rs`). `server::accept_connect` runs it for both
//! listeners.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Method, StatusCode};

/// Why a request on the listener is not a tunnel this pod serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not a `CONNECT` (400, as ztunnel answers it).
    NotConnect,
    /// No authority, or one that is not `ip:port` (400).
    BadAuthority,
    /// Port 0 is no destination (400).
    PortZero,
    /// An address this pod does not have: a tunnel to a pod may reach only that pod (400).
    NotThisPod,
}

impl Rejected {
    /// Every rejection is `400`, as ztunnel's inbound answers a non-`CONNECT`, an authority
    /// that is not an address, and an address that is not the listener's pod.
    pub fn status(self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::NotConnect => "not a CONNECT",
            Rejected::BadAuthority => "CONNECT without an ip:port authority",
            Rejected::PortZero => "CONNECT to port 0",
            Rejected::NotThisPod => "CONNECT to an address this pod does not have",
        }
    }
}

/// The destination a request asks for, if this listener serves it: a `CONNECT` whose
/// authority is `ip:port` (IPv6 in brackets), port not 0, the address one of `pod_ips`.
pub fn check_connect(
    method: &Method,
    authority: Option<&str>,
    pod_ips: &[IpAddr],
) -> Result<SocketAddr, Rejected> {
    if method != Method::CONNECT {
        return Err(Rejected::NotConnect);
    }
    let target = authority
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or(Rejected::BadAuthority)?;
    if target.port() == 0 {
        return Err(Rejected::PortZero);
    }
    if !pod_ips.contains(&target.ip()) {
        return Err(Rejected::NotThisPod);
    }
    Ok(target)
}

/// A `CONNECT` this listener serves: its destination, and the client address its
/// `forwarded` header claims (not yet believed: `server::trusted_forwarded_ip` decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub target: SocketAddr,
    pub claimed: Option<IpAddr>,
}

/// [`check_connect`], then the claimed client address ([`claimed_client`]).
pub fn read_connect(
    method: &Method,
    authority: Option<&str>,
    headers: &HeaderMap,
    pod_ips: &[IpAddr],
) -> Result<Connect, Rejected> {
    let target = check_connect(method, authority, pod_ips)?;
    Ok(Connect {
        target,
        claimed: claimed_client(headers),
    })
}

/// The client address a request's `forwarded` header claims ([`forwarded_for`]); `None`
/// without one, or when it is not text.
pub fn claimed_client(headers: &HeaderMap) -> Option<IpAddr> {
    headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_connect_takes_the_claimed_client() {
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            http::HeaderValue::from_static("for=\"198.19.1.2:4000\""),
        );
        let c = read_connect(&Method::CONNECT, Some("198.19.2.2:8080"), &h, &ips());
        assert_eq!(
            c,
            Ok(Connect {
                target: "198.19.2.2:8080".parse().expect("addr"),
                claimed: Some("198.19.1.2".parse().expect("ip")),
            })
        );
        let none = read_connect(
            &Method::CONNECT,
            Some("198.19.2.2:8080"),
            &HeaderMap::new(),
            &ips(),
        );
        assert_eq!(none.map(|c| c.claimed), Ok(None));
        // A bad request is refused whatever the header says.
        assert_eq!(
            read_connect(&Method::GET, Some("198.19.2.2:8080"), &h, &ips()),
            Err(Rejected::NotConnect)
        );
    }

    fn ips() -> Vec<IpAddr> {
        vec![
            "198.19.2.2".parse().expect("ip"),
            "fd00::2:2".parse().expect("ip"),
        ]
    }

    #[test]
    fn accepts_the_pods_addresses() {
        let c = Method::CONNECT;
        assert_eq!(
            check_connect(&c, Some("198.19.2.2:8080"), &ips()),
            Ok("198.19.2.2:8080".parse().expect("addr"))
        );
        assert!(check_connect(&c, Some("[fd00::2:2]:80"), &ips()).is_ok());
    }

    #[test]
    fn refuses_the_rest() {
        let c = Method::CONNECT;
        let cases = [
            (Method::GET, Some("198.19.2.2:8080"), Rejected::NotConnect),
            (c.clone(), None, Rejected::BadAuthority),
            (c.clone(), Some("not-an-address"), Rejected::BadAuthority),
            (c.clone(), Some("not-an-address:80"), Rejected::BadAuthority),
            (c.clone(), Some("198.19.2.2"), Rejected::BadAuthority),
            (c.clone(), Some("198.19.2.2:65536"), Rejected::BadAuthority),
            (c.clone(), Some("198.19.2.2:0"), Rejected::PortZero),
            (c.clone(), Some("198.19.2.3:8080"), Rejected::NotThisPod),
            (
                c.clone(),
                Some("[::ffff:198.19.2.2]:80"),
                Rejected::NotThisPod,
            ),
        ];
        for (m, a, want) in cases {
            assert_eq!(check_connect(&m, a, &ips()), Err(want), "{m} {a:?}");
            assert!(want.status().is_client_error());
        }
    }
}

/// The client address of a `Forwarded` header (RFC 7239): the `for=` parameter of its first
/// element — the one the originating proxy wrote — in any of the forms senders use: a bare
/// IPv4 address, a quoted one with a port (`for="10.0.0.1:8080"`, what ztunnel sends), a quoted
/// bracketed IPv6 address with or without a port (`for="[2001:db8::1]:443"`), the parameter
/// name in any case, other parameters (`;proto=`, `;by=`) and further elements ignored.
/// `unknown` and obfuscated identifiers (`_hidden`) give no address.
pub fn forwarded_for(header: &str) -> Option<IpAddr> {
    let element = split_unquoted(header, ',').into_iter().next()?;
    for pair in split_unquoted(element, ';') {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let value = unquote(value.trim())?;
        return node_ip(&value);
    }
    None
}

/// `s` split at `sep` outside quoted strings.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// A token, or a quoted-string with its quotes and escapes removed; `None` when a quote is
/// not closed.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return Some(v.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next()?);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// RFC 7239 `node`: `IPv4[:port]` or `[IPv6][:port]` (a bare IPv6 address is accepted too,
/// as some senders write it).
fn node_ip(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (ip, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod forwarded_tests {
    use super::forwarded_for;

    #[test]
    fn every_form_senders_use() {
        let v4 = Some("10.0.0.1".parse().expect("ip"));
        let v6 = Some("2001:db8::1".parse().expect("ip"));
        for (h, want) in [
            ("for=10.0.0.1", v4),
            ("for=\"10.0.0.1:8080\"", v4),
            ("For=\"10.0.0.1\"", v4),
            ("for=10.0.0.1:8080", v4),
            ("for=\"[2001:db8::1]\"", v6),
            ("for=\"[2001:db8::1]:443\"", v6),
            ("for=2001:db8::1", v6),
            ("proto=https;for=10.0.0.1;by=10.0.0.9", v4),
            ("for=10.0.0.1, for=\"[2001:db8::1]:443\"", v4),
            ("for=\"10.0.0.1:8080\";proto=http, for=192.0.2.60", v4),
            ("by=\"a,b\";for=10.0.0.1", v4),
            ("for=unknown", None),
            ("for=_hidden", None),
            ("for=\"10.0.0.1", None),
            ("for=\"[2001:db8::1\"", None),
            ("for=10.0.0.1:99999", None),
            ("proto=https", None),
            ("", None),
        ] {
            assert_eq!(forwarded_for(h), want, "{h}");
        }
    }

    /// ztunnel's `build_forwarded` outputs, verbatim from its own unit test
    /// (`src/proxy/outbound.rs` @62d82653): IPv4 and IPv6 with the port, and the `host=` it adds
    /// for a Service destination.
    #[test]
    fn ztunnels_exact_output() {
        let ip = |s: &str| Some(s.parse().expect("ip"));
        assert_eq!(forwarded_for(r#"for="127.0.0.1:80""#), ip("127.0.0.1"));
        assert_eq!(forwarded_for(r#"for="[::1]:80""#), ip("::1"));
        assert_eq!(
            forwarded_for(r#"for="127.0.0.1:80";host=example.com"#),
            ip("127.0.0.1")
        );
        assert_eq!(
            forwarded_for(r#"for="[fd00:198:19:1::4]:40123";host=echo.mesh.svc.cluster.local"#),
            ip("fd00:198:19:1::4")
        );
    }
}
