//! The ingress gateway (`mesh-node gateway`): HTTP and HTTPS from outside the cluster into the
//! mesh. Path of a request: a listener on a port some served Gateway declares (`listener`) →
//! TLS terminated with the certificate its server name selects (`tls`, Secrets from
//! `secrets`), or passed through by SNI → the request routed by the VirtualServices bound to
//! the Gateway (`proxy::route::http::select_gateway`, the node proxy's routing engine) → the
//! backend pod over HBONE with the gateway's own identity (`proxy::http`), or directly when
//! the pod is outside the mesh.
//!
//! Which Gateways it serves: an Istio `Gateway` whose `selector` matches the gateway's pod
//! labels (`--labels`), and a Gateway API `Gateway` (converted by the controller) of its class
//! (`--class`). Listeners open and close as those Gateways change; connections already open
//! are left to finish.

#![forbid(unsafe_code)]

pub mod listener;
pub mod secrets;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::identity::controller::ControllerSettings;
use crate::model::gateway::{Protocol, TlsMode};
use crate::model::istio::IstioSpec;
use crate::model::{Labels, ObjKey};
use crate::proxy::route::http::GatewayPort;
use crate::proxy::{Mesh, Shared};
use crate::state::NodeState;

/// Limits a gateway puts on what comes from outside.
#[derive(Clone, Debug)]
pub struct EdgeLimits {
    /// Open client connections; past it new ones are closed at once.
    pub max_connections: usize,
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// To receive a request's headers (HTTP/1.1; slowloris).
    pub header_timeout: Duration,
    /// A client connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Request headers, in bytes.
    pub max_header_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub controller: ControllerSettings,
    /// The gateway pod: its namespace, name and ServiceAccount (its identity).
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    pub labels: Labels,
    pub class: String,
    pub listen: IpAddr,
    pub secrets: secrets::SecretSource,
    pub metrics_addr: Option<SocketAddr>,
    pub admin: Option<crate::admin::Settings>,
    pub connect_timeout: Duration,
    pub limits: EdgeLimits,
    pub tracing: Option<crate::telemetry::trace::Settings>,
}

/// One server of a served Gateway, as a listener needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerPlan {
    pub gateway: ObjKey,
    pub hosts: Vec<String>,
    pub kind: ServerKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ServerKind {
    Http {
        https_redirect: bool,
    },
    /// TLS terminated with this Secret's certificate.
    Terminate {
        secret: ObjKey,
        tls13_only: bool,
    },
    Passthrough,
}

/// What one listening port serves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortPlan {
    pub port: u16,
    pub servers: Vec<ServerPlan>,
    /// The servers that answer HTTP on this port (all of them, TLS or not), for routing.
    pub routes: Arc<GatewayPort>,
}

impl PortPlan {
    /// Does this port speak TLS (its first server decides; mixing is refused in [`plan`])?
    pub fn is_tls(&self) -> bool {
        self.servers
            .first()
            .is_some_and(|s| !matches!(s.kind, ServerKind::Http { .. }))
    }

    /// The first server whose hosts match `host` (empty `host`: the first server).
    pub fn server_for(&self, host: &str) -> Option<&ServerPlan> {
        if host.is_empty() {
            return self.servers.first();
        }
        self.servers.iter().find(|s| {
            s.hosts
                .iter()
                .any(|h| crate::model::gateway::host_matches(h, host))
        })
    }
}

pub type Plans = BTreeMap<u16, Arc<PortPlan>>;

/// The ports to listen on and what each serves, from the Gateways in `st` that select this
/// gateway. A server that cannot be served is logged (once per state version) and skipped.
pub fn plan(st: &NodeState, labels: &Labels, class: &str) -> Plans {
    let mut ports: BTreeMap<u16, PortPlan> = BTreeMap::new();
    let mut gws: Vec<(&ObjKey, &crate::model::gateway::GatewaySpec)> = st
        .configs
        .values()
        .filter_map(|o| match &o.spec {
            IstioSpec::Gateway(g) if g.selects(labels, class) => Some((&o.key, g)),
            _ => None,
        })
        .collect();
    gws.sort_by_key(|(k, _)| (*k).clone());
    for (key, g) in gws {
        for (i, s) in g.servers.iter().enumerate() {
            let Ok(port) = u16::try_from(s.port.number) else {
                continue;
            };
            let tls = s.tls.as_ref();
            let kind = match (s.protocol(), tls.and_then(|t| t.mode)) {
                (Some(Protocol::Http), _) => ServerKind::Http {
                    https_redirect: tls.is_some_and(|t| t.https_redirect),
                },
                (Some(Protocol::Https | Protocol::Tls), Some(TlsMode::Simple)) => {
                    let Some(cred) = tls.and_then(|t| t.credential_name.as_deref()) else {
                        continue;
                    };
                    let secret = match cred.split_once('/') {
                        Some((ns, name)) => ObjKey {
                            namespace: ns.into(),
                            name: name.into(),
                        },
                        None => ObjKey {
                            namespace: key.namespace.clone(),
                            name: cred.into(),
                        },
                    };
                    ServerKind::Terminate {
                        secret,
                        tls13_only: tls.and_then(|t| t.min_protocol_version.as_deref())
                            == Some("TLSV1_3"),
                    }
                }
                (Some(Protocol::Https | Protocol::Tls), Some(TlsMode::Passthrough)) => {
                    ServerKind::Passthrough
                }
                _ => continue,
            };
            let entry = ports.entry(port).or_insert_with(|| PortPlan {
                port,
                ..Default::default()
            });
            let plain = matches!(kind, ServerKind::Http { .. });
            if entry
                .servers
                .first()
                .is_some_and(|f| matches!(f.kind, ServerKind::Http { .. }) != plain)
            {
                warn!(gateway = %key, server = i, port, "a port serves either plain HTTP or TLS; this server is skipped");
                continue;
            }
            entry.servers.push(ServerPlan {
                gateway: key.clone(),
                hosts: s.hosts.clone(),
                kind,
            });
        }
    }
    ports
        .into_iter()
        .map(|(port, mut p)| {
            p.routes = Arc::new(GatewayPort {
                port,
                servers: p
                    .servers
                    .iter()
                    .filter(|s| !matches!(s.kind, ServerKind::Passthrough))
                    .map(|s| (s.gateway.clone(), s.hosts.clone()))
                    .collect(),
            });
            (port, Arc::new(p))
        })
        .collect()
}

/// What every gateway connection shares.
pub struct Gateway {
    pub cfg: GatewayConfig,
    pub shared: Arc<Shared>,
    pub mesh: Arc<Mesh>,
    /// The gateway's own workload: the source of every request it sends on.
    pub src: mesh_common::Workload,
    pub plans: watch::Receiver<Arc<Plans>>,
    pub secrets: watch::Receiver<Arc<secrets::Secrets>>,
    pub conns: Arc<tokio::sync::Semaphore>,
    /// Every open client connection (drained on SIGTERM).
    pub tracker: tokio_util::task::TaskTracker,
    /// Cancelled on SIGTERM: HTTP connections finish their requests and close.
    pub drain: tokio_util::sync::CancellationToken,
}

pub async fn run(cfg: GatewayConfig) -> Result<()> {
    if let Some(t) = &cfg.tracing {
        crate::telemetry::trace::init(t, &cfg.pod).context("setting up tracing")?;
    }
    let name = format!("{}/{}", cfg.namespace, cfg.pod);
    // Nothing captures the gateway's pod, and it runs without CAP_NET_ADMIN.
    crate::proxy::socket::unmarked_process();
    let admin = crate::proxy::status::Status::new(&name, true);
    if let Some(a) = &cfg.admin {
        tokio::spawn(crate::admin::serve(crate::admin::bind(a)?, admin.clone()));
    }
    if let Some(addr) = cfg.metrics_addr {
        tokio::spawn(async move {
            if let Err(e) = crate::telemetry::metrics::serve(addr).await {
                warn!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }
    let (state, certs) = crate::proxy::follow_controller(&cfg.controller).await?;
    let mesh = Arc::new(Mesh {
        state: state.clone(),
        certs: certs.clone(),
        pool: Default::default(),
        quic: Default::default(),
        authz: Default::default(),
        limiter: Default::default(),
        // No node: every meshed backend is reached through its node's tunnel.
        node: format!("gateway:{name}"),
        // No local pods: its tunnels leave from its own pod's address anyway.
        pods: Arc::new(crate::proxy::pod::Pods::default()),
        // It serves no tunnels (no inbound listener); never consulted.
        tunnel_limits: crate::proxy::connlimit::Limiter::new(
            "inbound",
            crate::defaults::MAX_INBOUND_TUNNELS,
            crate::defaults::MAX_INBOUND_TUNNELS_PER_IDENTITY,
        ),
    });
    tokio::spawn(certs.renew_forever());
    admin.set_mesh(mesh.clone());
    let shared = Arc::new(Shared {
        maps: None,
        listens: Vec::new(),
        connect_timeout: cfg.connect_timeout,
        mesh: Some(mesh.clone()),
        direct_unmeshed: true,
        balancer: Default::default(),
        health: Default::default(),
        limits: Default::default(),
        conn_limits: None,
    });
    let src = mesh_common::Workload {
        addr: Default::default(),
        flags: 0,
        _pad: 0,
        name: mesh_common::fill_name(&cfg.pod),
        namespace: mesh_common::fill_name(&cfg.namespace),
        service_account: mesh_common::fill_name(&cfg.service_account),
    };
    let secrets = secrets::start(cfg.secrets.clone());
    let (plans_tx, plans) = watch::channel(Arc::new(Plans::new()));
    let gw = Arc::new(Gateway {
        conns: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_connections)),
        tracker: tokio_util::task::TaskTracker::new(),
        drain: Default::default(),
        cfg,
        shared,
        mesh,
        src,
        plans,
        secrets,
    });
    // Ask for the gateway's certificate now, so the first request does not wait for it.
    {
        let st = state.borrow().clone();
        if !st.trust_domain.is_empty() {
            let id = crate::identity::Identity::new(
                &st.trust_domain,
                &gw.cfg.namespace,
                &gw.cfg.service_account,
            );
            let certs = gw.mesh.certs.clone();
            tokio::spawn(async move {
                if let Err(e) = certs.get(&id).await {
                    warn!(identity = %id, error = %e, "no certificate for the gateway yet");
                }
            });
        }
    }
    admin.set_serving();
    info!(gateway = %name, class = %gw.cfg.class, "gateway ready");
    let follow = tokio::spawn(follow_plans(gw.clone(), state, plans_tx));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Stop accepting (the listeners close with the task that owns them), then let open
    // connections finish, for a bounded time.
    admin.set_draining();
    follow.abort();
    let _ = follow.await;
    gw.tracker.close();
    gw.drain.cancel();
    info!(open = gw.tracker.len(), "gateway draining");
    if tokio::time::timeout(crate::defaults::DRAIN_TIMEOUT, gw.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = gw.tracker.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    crate::telemetry::trace::shutdown().await;
    Ok(())
}

/// The accept loops by port; dropped (the gateway stops), every one stops and its listening
/// socket closes.
#[derive(Default)]
struct Listeners(BTreeMap<u16, tokio::task::JoinHandle<()>>);

impl Drop for Listeners {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Recomputes the plans on every state change and opens/closes listeners to match.
async fn follow_plans(
    gw: Arc<Gateway>,
    mut state: crate::state::StateRx,
    tx: watch::Sender<Arc<Plans>>,
) {
    let mut open = Listeners::default();
    loop {
        let st = state.borrow_and_update().clone();
        let plans = plan(&st, &gw.cfg.labels, &gw.cfg.class);
        if **tx.borrow() != plans {
            info!(ports = ?plans.keys().collect::<Vec<_>>(), "gateway listeners");
            tx.send_replace(Arc::new(plans.clone()));
        }
        open.0.retain(|port, task| {
            let keep = plans.contains_key(port) && !task.is_finished();
            if !keep {
                info!(port, "closing listener");
                task.abort();
            }
            keep
        });
        for port in plans.keys() {
            if open.0.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::new(gw.cfg.listen, *port);
            match crate::proxy::bind(addr) {
                Ok(l) => {
                    info!(%addr, "listening");
                    open.0.insert(
                        *port,
                        tokio::spawn(listener::accept_loop(l, *port, gw.clone())),
                    );
                }
                Err(e) => error!(%addr, error = %e, "cannot listen; will retry"),
            }
        }
        // Retry failed binds now and then, else wait for the next state.
        let retry = plans.keys().any(|p| !open.0.contains_key(p));
        if retry {
            let _ = tokio::time::timeout(Duration::from_secs(2), state.changed()).await;
        } else if state.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use serde_json::json;

    fn state(configs: Vec<(&str, &str, serde_json::Value)>) -> NodeState {
        NodeState::default().apply(proto::StateUpdate {
            version: 1,
            snapshot: true,
            configs: configs
                .into_iter()
                .map(|(ns, name, spec)| proto::Config {
                    uid: format!("Gateway/{ns}/{name}"),
                    kind: "Gateway".into(),
                    namespace: ns.into(),
                    name: name.into(),
                    spec_json: json!({"kind": "Gateway", "spec": spec}).to_string(),
                })
                .collect(),
            ..Default::default()
        })
    }

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plans_follow_the_gateways_that_select_this_gateway() {
        let st = state(vec![
            (
                "edge",
                "istio",
                json!({"selector": {"istio": "ingressgateway"}, "servers": [
                    {"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"],
                     "tls": {"httpsRedirect": true}},
                    {"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["a.example"],
                     "tls": {"mode": "SIMPLE", "credentialName": "a"}},
                    {"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["b.example"],
                     "tls": {"mode": "SIMPLE", "credentialName": "b", "minProtocolVersion": "TLSV1_3"}},
                    // Plain HTTP on a TLS port: skipped.
                    {"port": {"number": 443, "protocol": "HTTP"}, "hosts": ["c.example"]}]}),
            ),
            (
                "apps",
                "api",
                json!({"gatewayClassName": "sidenode", "servers": [
                    {"port": {"number": 8443, "protocol": "TLS"}, "hosts": ["db.example"],
                     "tls": {"mode": "PASSTHROUGH"}},
                    {"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["api.example"],
                     "tls": {"mode": "SIMPLE", "credentialName": "certs/api"}}]}),
            ),
            (
                "edge",
                "other",
                json!({"selector": {"istio": "eastwest"}, "servers": [
                    {"port": {"number": 15443, "protocol": "TLS"}, "hosts": ["*"],
                     "tls": {"mode": "PASSTHROUGH"}}]}),
            ),
        ]);
        let p = plan(
            &st,
            &labels(&[("istio", "ingressgateway"), ("app", "gw")]),
            "sidenode",
        );
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![80, 443, 8443]);
        assert!(!p[&80].is_tls());
        assert_eq!(
            p[&80].server_for("any.example").map(|s| &s.kind),
            Some(&ServerKind::Http {
                https_redirect: true
            })
        );
        let https = &p[&443];
        assert!(https.is_tls());
        assert_eq!(https.servers.len(), 3, "{:?}", https.servers);
        let key = |ns: &str, n: &str| ObjKey {
            namespace: ns.into(),
            name: n.into(),
        };
        assert_eq!(
            https.server_for("b.example").map(|s| &s.kind),
            Some(&ServerKind::Terminate {
                secret: key("edge", "b"),
                tls13_only: true
            })
        );
        // A converted Gateway API Gateway names its Secret's namespace.
        assert_eq!(
            https.server_for("api.example").map(|s| &s.kind),
            Some(&ServerKind::Terminate {
                secret: key("certs", "api"),
                tls13_only: false
            })
        );
        assert!(https.server_for("c.example").is_none());
        assert_eq!(
            p[&8443].server_for("db.example").map(|s| &s.kind),
            Some(&ServerKind::Passthrough)
        );
        // Passthrough servers take no HTTP routes.
        assert!(p[&8443].routes.servers.is_empty());
        // Another class, other labels: nothing.
        assert!(plan(&st, &labels(&[("app", "x")]), "other").is_empty());
    }
}
