//! Why the proxy refused a tunnel or a connection: one reason list for the tunnel (`hbone`),
//! routing (`route`) and the HTTP path (`http`), counted in `sidenode_hbone_refused_total`
//! and written as Envoy's response flags in access logs (counted by `hbone::count_refusal`).

/// Why a tunnel (or, for `NoEndpoint`/`NoRoute`/`Overflow`, a connection to a service VIP)
/// was refused (label of `sidenode_hbone_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Untrusted,
    WrongIdentity,
    Expired,
    Handshake,
    BadRequest,
    Unreachable,
    NoCertificate,
    /// A service VIP with no ready endpoint (for the chosen subset).
    NoEndpoint,
    /// A VirtualService route naming an unknown host, subset or port.
    NoRoute,
    /// A `DestinationRule` connection pool limit (`tcp.maxConnections`) was reached.
    Overflow,
    /// A `RateLimitPolicy` connection limit of the destination (HBONE status 429).
    RateLimited,
    /// The destination's `AuthorizationPolicy` refused the tunnel (HBONE status 401/403).
    Denied,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::WrongIdentity => "wrong_identity",
            Refusal::Expired => "expired",
            Refusal::Handshake => "handshake",
            Refusal::BadRequest => "bad_request",
            Refusal::Unreachable => "unreachable",
            Refusal::NoCertificate => "no_certificate",
            Refusal::NoEndpoint => "no_endpoint",
            Refusal::NoRoute => "no_route",
            Refusal::Overflow => "overflow",
            Refusal::RateLimited => "rate_limited",
            Refusal::Denied => "denied",
        }
    }

    /// Envoy's response flag for a connection given up for this reason (access log and
    /// `istio_tcp_connections_closed_total{response_flags}`).
    pub fn response_flag(self) -> &'static str {
        match self {
            Refusal::Unreachable => "UF",
            Refusal::NoEndpoint => "UH",
            Refusal::NoRoute => "NR",
            Refusal::Overflow => "UO",
            Refusal::RateLimited => "RL",
            Refusal::Denied => "UAEX",
            Refusal::Untrusted
            | Refusal::WrongIdentity
            | Refusal::Expired
            | Refusal::Handshake
            | Refusal::NoCertificate => "UPE",
            Refusal::BadRequest => "DPE",
        }
    }

    /// Classifies a TLS failure by what rustls reported.
    pub fn of_tls(err: &std::io::Error) -> Refusal {
        let text = err.to_string();
        if text.contains("wrong server identity") {
            Refusal::WrongIdentity
        } else if text.contains("Expired") || text.contains("expired") {
            Refusal::Expired
        } else if text.contains("UnknownIssuer")
            || text.contains("untrusted")
            || text.contains("BadSignature")
        {
            Refusal::Untrusted
        } else {
            Refusal::Handshake
        }
    }
}
