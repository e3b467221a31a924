//! Serving tunnels on one pod's HBONE listener: each `CONNECT` names a destination of this pod;
//! the proxy connects to it and splices the stream (`stream::copy`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tracing::{Instrument, info, info_span, warn};

use super::h3_stream::{self, H3Stream, ServerRecv, ServerSend};
use super::stream::{self, H2Stream};
use super::{
    CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, MAX_LOCAL_ERROR_RESET_STREAMS,
    MAX_PENDING_ACCEPT_RESET_STREAMS, MAX_SEND_BUF, MAX_STREAMS, Refusal, STREAM_WINDOW, Transport,
    count_refusal, request,
};
use crate::identity::Identity;
use crate::proxy::COPY_BUF;
use crate::proxy::authz;
use crate::proxy::pod;
use crate::proxy::ratelimit;
use crate::proxy::zero_copy;
use crate::state::{NodeState, StateRx};
use crate::telemetry::conn::{self as telemetry, ConnMeta, Tracked};
use crate::telemetry::istio::{self, Labels, Reporter, ServiceName, Side};
use tokio::net::TcpStream;

/// What the listener knows of its pod and its caller.
pub struct Conn {
    pub pod: String,
    pub pod_ips: Vec<IpAddr>,
    pub peer: SocketAddr,
    pub peer_identity: Identity,
    pub connect_timeout: Duration,
    /// The node's state (authorization policies in force).
    pub state: StateRx,
    /// Open tunnels, closed when a policy change refuses them.
    pub tunnels: Arc<authz::registry::Registry>,
    /// `RateLimitPolicy` buckets of this node's workloads.
    pub limiter: Arc<crate::proxy::ratelimit::Limiter>,
    /// Pods connected to from their clients' addresses.
    pub pods: Arc<crate::proxy::pod::Pods>,
    /// The listener's transport (`None`: a same-node connection, no tunnel).
    pub transport: Option<Transport>,
    /// Inbound tunnels open at once, in all and per peer identity (`--max-inbound-tunnels`).
    pub tunnel_limits: Arc<crate::proxy::connlimit::Limiter>,
}

pub async fn serve<IO>(io: IO, conn: Arc<Conn>, key_watch: Option<super::ktls::KeyWatch>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUF)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .handshake::<_, Bytes>(io)
        .await;
    let mut h2c = match handshake {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "HBONE connection ended");
            return;
        }
    };
    // Accepting also drives the connection: it runs until the connection ends. When the
    // proxy stops accepting (a successor took over, or SIGTERM) the client is told GOAWAY
    // (graceful: streams in flight are still served) and opens its next tunnels elsewhere.
    let mut stopping = crate::proxy::handover::stopping();
    let mut goaway = false;
    // A kTLS connection at its record limit is told GOAWAY too: the client opens its next
    // tunnels on a new connection before its own KeyUpdate would end this one.
    let mut key_limit = std::pin::pin!(async move {
        match key_watch {
            Some(w) => w.limit_reached().await,
            None => std::future::pending().await,
        }
    });
    loop {
        if !goaway && *stopping.borrow_and_update() {
            h2c.graceful_shutdown();
            goaway = true;
            tracing::debug!("GOAWAY sent: the proxy drains");
        }
        let accepted = tokio::select! {
            a = h2c.accept() => a,
            _ = stopping.changed(), if !goaway => continue,
            dir = &mut key_limit, if !goaway => {
                super::ktls::retired("inbound", dir);
                h2c.graceful_shutdown();
                goaway = true;
                continue;
            }
        };
        let Some(accepted) = accepted else { break };
        let (req, respond) = match accepted {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "HBONE connection ended");
                return;
            }
        };
        let conn = conn.clone();
        tokio::spawn(async move {
            let trace = tunnel_trace(&req, &conn);
            handle(req, respond, conn, trace).await;
        });
    }
}

/// The tunnel's `inbound.tunnel` trace span (child of the `CONNECT`'s `traceparent`), open
/// until the tunnel closes; the client is the address `forwarded` claims, else the peer's.
/// Both listeners (TCP and QUIC) start it so.
pub(super) fn tunnel_trace<B>(req: &Request<B>, conn: &Conn) -> crate::telemetry::trace::Span {
    let client = request::claimed_client(req.headers()).unwrap_or(conn.peer.ip());
    let trace = crate::telemetry::trace::inbound_tunnel(
        req.headers(),
        req.uri().authority().map(|a| a.as_str()),
        &conn.pod,
        client,
        &conn.peer_identity,
    );
    trace.set(crate::telemetry::trace::HBONE_TRANSPORT, || {
        Transport::label(conn.transport)
    });
    trace
}

/// Both listeners' (TCP and QUIC) handling of one `CONNECT` up to its answer: the request
/// checked against the pod (`request::read_connect`; else `400`, counted `bad_request`), the
/// client address `forwarded` claims believed only from a caller with that workload's
/// identity ([`trusted_forwarded_ip`]; else the peer's address), then the destination's
/// checks ([`admit`]). The admitted connection comes with its `inbound` span; a refusal is
/// the status to answer.
pub(super) async fn accept_connect<B>(
    req: &Request<B>,
    conn: &Conn,
) -> Result<(Admitted, tracing::Span), StatusCode> {
    let authority = req.uri().authority().map(|a| a.as_str());
    let connect = match request::read_connect(req.method(), authority, req.headers(), &conn.pod_ips)
    {
        Ok(c) => c,
        Err(why) => {
            count_refusal("inbound", conn.transport, Refusal::BadRequest);
            warn!(method = %req.method(), uri = %req.uri(), pod = %conn.pod, reason = "bad_request", "{}", why.as_str());
            return Err(why.status());
        }
    };
    let target = connect.target;
    // The address the header claims (shown in the span whether or not it is believed).
    let client = connect.claimed.map(|ip| ip.to_string()).unwrap_or_default();
    let span = info_span!("inbound", src_identity = %conn.peer_identity, %target, client = %client, transport = Transport::label(conn.transport));
    let client_ip = connect
        .claimed
        .filter(|ip| trusted_forwarded_ip(&conn.state.borrow(), &conn.peer_identity, *ip))
        .unwrap_or(conn.peer.ip());
    let admitted = admit(conn, target, client_ip, &span).await?;
    Ok((admitted, span))
}

/// Is the client address a `forwarded: for=` value claims believable? Only when it is an
/// address of a workload with the caller's proven identity (a node proxy speaks for its own
/// pods; a header naming someone else's address must not buy that address's policy or
/// telemetry). Otherwise the tunnel's own peer address stands.
pub(super) fn trusted_forwarded_ip(st: &NodeState, caller: &Identity, ip: IpAddr) -> bool {
    st.workload_by_ip(ip)
        .is_some_and(|w| st.identity_of(w) == *caller)
}

/// The telemetry of a tunnel to `target` (destination reporter): the caller's workload from
/// the client address (`forwarded`) and its proven identity; the pod; the first Service
/// selecting the pod with a port that targets `target`'s port.
fn inbound_meta(st: &NodeState, conn: &Conn, target: SocketAddr, client_ip: IpAddr) -> ConnMeta {
    let principal = conn.peer_identity.principal();
    let source = match st.workload_by_ip(client_ip) {
        Some(w) => Side::of(w, Some(principal)),
        None => Side {
            namespace: conn.peer_identity.namespace.clone(),
            principal,
            ..Side::default()
        },
    };
    let pod = st.workloads.get(&conn.pod);
    let destination = match pod {
        Some(w) => Side::of(w, Some(st.identity_of(w).principal())),
        None => Side::default(),
    };
    let service = pod.and_then(|w| {
        st.services
            .values()
            .filter(|s| s.namespace == w.namespace && !s.selector.is_empty())
            .filter(|s| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .find(|s| {
                s.ports.iter().any(|p| {
                    let t = if p.target_port == 0 {
                        p.port
                    } else {
                        p.target_port
                    };
                    t == u32::from(target.port())
                })
            })
            .and_then(|s| ServiceName::of_uid(&s.uid))
    });
    ConnMeta {
        labels: Labels {
            reporter: Reporter::Destination,
            source,
            destination,
            service,
            protocol: "tcp".into(),
            security: istio::MUTUAL_TLS,
        },
        // The client's port is not carried in HBONE (`forwarded: for=` has the address only).
        src_addr: SocketAddr::new(client_ip, 0),
        dst_addr: target,
        hbone_addr: Some(SocketAddr::new(target.ip(), mesh_common::ports::HBONE)),
        // The listener's (`None`: same node, no tunnel).
        transport: conn.transport.map(Transport::as_str),
    }
}

/// Answers the `CONNECT` with `code`; with `200` the stream stays open and is handed back.
fn respond_with(
    respond: &mut SendResponse<Bytes>,
    code: StatusCode,
    trace: &crate::telemetry::trace::Span,
) -> Option<h2::SendStream<Bytes>> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    trace.tunnel_status(code.as_u16());
    match respond.send_response(r, code != StatusCode::OK) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "could not answer the CONNECT");
            None
        }
    }
}

async fn handle(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    conn: Arc<Conn>,
    trace: crate::telemetry::trace::Span,
) {
    let (admitted, span) = match accept_connect(&req, &conn).await {
        Ok(a) => a,
        Err(code) => {
            respond_with(&mut respond, code, &trace);
            return;
        }
    };
    let recv = req.into_body();
    let Some(send) = respond_with(&mut respond, StatusCode::OK, &trace) else {
        Tracked::open_since(admitted.meta, admitted.accepted)
            .close("DC", Some("the tunnel closed before its answer"));
        return;
    };
    let tunnel = H2Stream::new(send, recv);
    if admitted.per_request {
        // Request by request: the tunnel as a byte stream under the L7 layer.
        // Boxed: this path's state (the L7 layer) is twice the size of the plain copy's, and
        // a tunnel's task is as large as the largest future it awaits.
        Box::pin(
            carry(
                Downstream::Stream(tunnel.into_io()),
                admitted,
                &conn,
                &trace,
                "hbone",
            )
            .instrument(span),
        )
        .await;
        return;
    }
    carry_whole(Whole::H2(tunnel), admitted, &conn, &trace)
        .instrument(span)
        .await
}

/// A whole-connection tunnel's stream, of either transport.
pub enum Whole {
    H2(H2Stream),
    /// (Boxed: its halves are ten times the HTTP/2 stream's size.)
    H3(Box<H3Stream<ServerSend, ServerRecv>>),
}

/// [`carry`] for a whole-connection tunnel: the stream copied straight to the pod's socket
/// (`stream::copy` or `h3_stream::copy`, flow-control aware, counted in batches).
pub async fn carry_whole(
    tunnel: Whole,
    a: Admitted,
    conn: &Conn,
    trace: &crate::telemetry::trace::Span,
) {
    let Admitted {
        mut upstream,
        meta,
        peer,
        accepted,
        permit: _permit,
        ..
    } = a;
    let tracked = Tracked::open_since(meta, accepted);
    let registration = conn.tunnels.register(&conn.pod, peer);
    // The downstream side is the tunnel: what comes from it is received.
    let (mut received, mut sent) = tracked.meters();
    let copied = {
        let copy = async {
            match tunnel {
                Whole::H2(t) => stream::copy(&mut upstream, t, &mut sent, &mut received).await,
                // Boxed: the HTTP/3 halves make this future ~1 KiB larger, which every
                // tunnel's task (HTTP/2 ones included) would otherwise carry.
                Whole::H3(t) => {
                    Box::pin(h3_stream::copy(&mut upstream, *t, &mut sent, &mut received)).await
                }
            }
        };
        tokio::select! {
            r = copy => Some(r.map(|(to_tunnel, from_tunnel)| (from_tunnel, to_tunnel))),
            _ = registration.closed() => None,
        }
    };
    drop((received, sent));
    let Some(copied) = copied else {
        crate::proxy::socket::reset(upstream);
        tracked.close("UAEX", Some(CLOSED_BY_POLICY));
        return;
    };
    trace.connection_closed("hbone", &copied);
    match copied {
        Ok(_) => tracked.close("-", None),
        Err(e) => tracked.close("DC", Some(&e.to_string())),
    }
}

/// A connection to one of the pod's addresses that passed the destination's checks, with its
/// connection to the pod open.
pub struct Admitted {
    pub upstream: TcpStream,
    pub meta: ConnMeta,
    pub peer: authz::Peer,
    /// Authorized (and traced) request by request: an HTTP port with L7 rules or limits.
    pub per_request: bool,
    pub accepted: Instant,
    /// Its place under the inbound tunnel limits, held until it ends.
    pub permit: crate::proxy::connlimit::Permit,
}

/// The destination's side of a new connection from `conn.peer_identity` (the client at
/// `client_ip`) to `target`: `AuthorizationPolicy`, `RateLimitPolicy`, then the connection to
/// the pod. A refusal is counted and logged here and answered with its status (`401`, `429`,
/// `503`). The same checks serve an HBONE `CONNECT` and a same-node connection.
pub async fn admit(
    conn: &Conn,
    target: SocketAddr,
    client_ip: IpAddr,
    span: &tracing::Span,
) -> Result<Admitted, StatusCode> {
    // Concurrent tunnel limits, per proxy and per peer identity: refused at once (503).
    let permit = match conn
        .tunnel_limits
        .try_acquire(&conn.peer_identity.to_string())
    {
        Ok(p) => p,
        Err(hit) => {
            span.in_scope(|| {
                tracing::debug!(
                    reason = hit.as_str(),
                    open = conn.tunnel_limits.open(),
                    "over an inbound tunnel limit; refusing"
                )
            });
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    // AuthorizationPolicy: the connection now, or each request on HTTP ports with L7 rules.
    let peer = authz::Peer::new(Some(&conn.peer_identity), client_ip, target);
    let accepted = Instant::now();
    let (per_request, meta) = {
        let st = conn.state.borrow().clone();
        let meta = inbound_meta(&st, conn, target, client_ip);
        let per_request = authz::per_request(&st, &conn.pod, target.port())
            || ratelimit::has_request_limits(&st, &conn.pod, target.port());
        if !per_request {
            let d = authz::check_connection(&st, &conn.pod, &peer);
            if let Some(reason) = d.denied {
                authz::count_denied("l4", reason.as_str());
                let policy = d.policy.as_deref().unwrap_or("");
                span.in_scope(|| {
                    warn!(
                        reason = reason.as_str(),
                        policy, "connection denied by authorization policy"
                    )
                });
                span.in_scope(|| {
                    telemetry::failed(
                        meta,
                        accepted,
                        Refusal::Denied.response_flag(),
                        reason.as_str(),
                    )
                });
                return Err(StatusCode::UNAUTHORIZED);
            }
            if !d.audit.is_empty() {
                span.in_scope(
                    || info!(audit = %d.audit.join(","), "authorization audit: connection allowed"),
                );
            }
        }
        // RateLimitPolicy: a new connection takes a token (after authorization: a denied
        // tunnel takes none).
        if let Err(l) = conn.limiter.check_connection(&st, &conn.pod, target.port()) {
            count_refusal("inbound", conn.transport, Refusal::RateLimited);
            span.in_scope(|| {
                warn!(
                    policy = %l.policy,
                    retry_after_ms = l.retry_after.as_millis() as u64,
                    "connection over the rate limit"
                )
            });
            span.in_scope(|| {
                telemetry::failed(
                    meta,
                    accepted,
                    Refusal::RateLimited.response_flag(),
                    "rate limited",
                )
            });
            return Err(StatusCode::TOO_MANY_REQUESTS);
        }
        // With tracing on, HTTP ports are served per request too (an `inbound` span each);
        // the connection was checked above when no L7 rule applies.
        let per_request =
            per_request || crate::telemetry::trace::per_request(&st, &conn.pod, target.port());
        (per_request, meta)
    };
    let upstream = match pod::connect(
        &conn.pods,
        &conn.pod,
        target,
        client_ip,
        conn.connect_timeout,
    )
    .instrument(span.clone())
    .await
    {
        Ok(s) => s,
        Err(e) => {
            count_refusal("inbound", conn.transport, Refusal::Unreachable);
            span.in_scope(|| warn!(error = %e, "destination unreachable"));
            span.in_scope(|| {
                telemetry::failed(
                    meta,
                    accepted,
                    Refusal::Unreachable.response_flag(),
                    &e.to_string(),
                )
            });
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    Ok(Admitted {
        upstream,
        meta,
        peer,
        per_request,
        accepted,
        permit,
    })
}

/// What an admitted connection is carried from.
pub enum Downstream<'a, IO> {
    /// The tunnel's stream, or any stream to be read and written as one.
    Stream(IO),
    /// A same-node client's own socket and the client side's record of the connection: both
    /// ends are plain sockets, so the bytes move in the kernel ([`zero_copy`]) and each side's
    /// counters see them. Only for sockets the agent's kernel splicing does not hold
    /// (`ProxyMaps::spliced`).
    Socket(TcpStream, &'a Tracked),
}

/// Carries an admitted connection between `down` (the tunnel's stream, or for a same-node
/// connection the client's own socket) and the pod, counted as the destination reports it,
/// until both sides are done or a policy change closes it. The copy's result, or `None` when
/// the connection was served request by request.
pub async fn carry<IO>(
    down: Downstream<'_, IO>,
    a: Admitted,
    conn: &Conn,
    trace: &crate::telemetry::trace::Span,
    protocol: &'static str,
) -> Option<std::io::Result<(u64, u64)>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Admitted {
        mut upstream,
        meta,
        peer,
        per_request,
        accepted,
        permit: _permit,
    } = a;
    let target = meta.dst_addr;
    let http_labels = Labels {
        protocol: "http".into(),
        ..meta.labels.clone()
    };
    let tracked = Tracked::open_since(meta, accepted);
    if per_request {
        let tunnel = authz::l7::Tunnel {
            pod: conn.pod.clone(),
            target,
            peer,
            state: conn.state.clone(),
            connect_timeout: conn.connect_timeout,
            limiter: conn.limiter.clone(),
            labels: http_labels,
            transport: conn.transport.map(Transport::as_str),
        };
        match down {
            Downstream::Stream(io) => {
                authz::l7::serve(tracked.count(io), Arc::new(tunnel), upstream).await
            }
            Downstream::Socket(s, client) => {
                let io = tracked.count(client.count(s));
                authz::l7::serve(io, Arc::new(tunnel), upstream).await
            }
        }
        tracked.close("-", None);
        return None;
    }
    let registration = conn.tunnels.register(&conn.pod, peer);
    let copy = async {
        match down {
            Downstream::Stream(io) => {
                let mut tunnel = tracked.count(io);
                tokio::io::copy_bidirectional_with_sizes(
                    &mut tunnel,
                    &mut upstream,
                    COPY_BUF,
                    COPY_BUF,
                )
                .await
            }
            Downstream::Socket(s, client) => {
                let ((cr, cs), (r, sent)) = (client.meters(), tracked.meters());
                zero_copy::copy_bidirectional(&s, &upstream, &mut [cr, r], &mut [cs, sent]).await
            }
        }
    };
    let copied = tokio::select! {
        r = copy => r,
        _ = registration.closed() => {
            crate::proxy::socket::reset(upstream);
            tracked.close("UAEX", Some(CLOSED_BY_POLICY));
            return Some(Err(std::io::Error::other(CLOSED_BY_POLICY)));
        }
    };
    trace.connection_closed(protocol, &copied);
    match &copied {
        Ok(_) => tracked.close("-", None),
        Err(e) => tracked.close("DC", Some(&e.to_string())),
    }
    Some(copied)
}

const CLOSED_BY_POLICY: &str = "closed by a policy change";
