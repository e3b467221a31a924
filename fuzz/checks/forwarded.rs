//! `forwarded`: the HBONE server's reading of the `Forwarded` header (RFC 7239 `for=`), which
//! decides the client address a tunnel claims. Shared by the cargo-fuzz target and the corpus
//! test.
//!
//! Properties: no panic; an IPv4 address it returns is written in the input as it is.
//!
//! Input: the header value (lossy UTF-8).

use mesh_node::proxy::hbone::request::forwarded_for;
use std::net::IpAddr;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(IpAddr::V4(ip)) = forwarded_for(&text) {
        assert!(text.contains(&ip.to_string()), "{ip} is not in {text:?}");
    }
}
