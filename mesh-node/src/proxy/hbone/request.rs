//! The pure part of serving a `CONNECT` on a pod's HBONE listener: the method and the
//! `:authority` checked against the pod's addresses. No I/O, so it is unit-tested and fuzzed
//! (`fuzz/fuzz_targets/hbone_request.rs`).

use std::net::{IpAddr, SocketAddr};

use http::{Method, StatusCode};

/// Why a request on the listener is not a tunnel this pod serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not a `CONNECT` (405).
    NotConnect,
    /// No authority, or one that is not `ip:port` (400).
    BadAuthority,
    /// Port 0 is no destination (400).
    PortZero,
    /// An address this pod does not have: a tunnel to a pod may reach only that pod (400).
    NotThisPod,
}

impl Rejected {
    pub fn status(self) -> StatusCode {
        match self {
            Rejected::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
