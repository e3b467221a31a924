//! `hbone_request`: the HBONE listener's `CONNECT` check (method, `:authority` against the
//! pod's addresses). Shared by the cargo-fuzz target and the corpus test.
//!
//! Properties: no panic, and what it accepts is a `CONNECT` to one of the pod's addresses with
//! a non-zero port.
//!
//! Input: first byte picks the method, the rest (lossy UTF-8) is the authority; as the
//! listener sees it, the authority has first gone through `http::uri::Authority`.

use mesh_node::proxy::hbone::request::check_connect;
use std::net::IpAddr;

pub fn run(data: &[u8]) {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = match m % 4 {
        0 | 1 => http::Method::CONNECT,
        2 => http::Method::GET,
        _ => http::Method::from_bytes(rest.get(..3).unwrap_or(b"X")).unwrap_or(http::Method::PUT),
    };
    let pod_ips: [IpAddr; 2] = [
        IpAddr::from([198, 19, 2, 2]),
        IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 2, 2]),
    ];
    let text = String::from_utf8_lossy(rest);
    // Raw text, and what hyper would hand over (an authority it accepted).
    let parsed = http::uri::Authority::try_from(text.as_ref()).ok();
    for authority in [
        Some(text.as_ref()),
        parsed.as_ref().map(|a| a.as_str()),
        None,
    ] {
        if let Ok(t) = check_connect(&method, authority, &pod_ips) {
            assert!(method == http::Method::CONNECT, "accepted {method}");
            assert!(
                pod_ips.contains(&t.ip()),
                "accepted {t} for another address"
            );
            assert_ne!(t.port(), 0, "accepted port 0");
        }
    }
}
