//! TLS routes by server name (VirtualService `tls`): where a gateway's `PASSTHROUGH` server
//! sends a connection it does not terminate. Pure functions over [`NodeState`], as the rest
//! of `route`.

use std::net::SocketAddr;

use crate::model::ObjKey;
use crate::model::gateway::host_matches;
use crate::proxy::refusal::Refusal;
use crate::state::NodeState;

use super::{Balancer, Decision, Health, Source, balance, destination_rule_for, service};

/// The endpoint for a TLS connection with server name `sni` that reached a gateway on `port`,
/// served there by `gateways`: the first `tls` route (of the VirtualServices bound to one of
/// them) whose `sniHosts` match, a weighted destination, then one endpoint as for any
/// connection to a service. `NotService` when no route matches.
#[allow(clippy::too_many_arguments)]
pub fn select_tls(
    st: &NodeState,
    lb: &Balancer,
    health: Option<&Health>,
    rng: &mut fastrand::Rng,
    src: &Source<'_>,
    gateways: &[&ObjKey],
    port: u16,
    sni: &str,
) -> Decision {
    let found = super::gateway_virtual_services(st, gateways);
    for (vs_key, vs) in found {
        for (ri, r) in vs.tls.iter().enumerate() {
            let hit = r.r#match.iter().any(|m| {
                m.port.is_none_or(|p| p == u32::from(port))
                    && m.sni_hosts.iter().any(|h| host_matches(h, sni))
            });
            if !hit || r.route.is_empty() {
                continue;
            }
            let weights: Vec<u32> = r
                .route
                .iter()
                .map(|d| match d.weight {
                    None if r.route.len() == 1 => 100,
                    w => w.unwrap_or(0).clamp(0, 100).unsigned_abs(),
                })
                .collect();
            let field = format!("VirtualService {vs_key}: spec.tls[{ri}].route");
            let refuse = |why: String| Decision::Refuse {
                service: String::new(),
                reason: Refusal::NoRoute,
                why,
            };
            let Some(di) = balance::pick_weighted(&weights, rng) else {
                return refuse(format!("{field} has no destination with weight"));
            };
            let d = &r.route[di].destination;
            let Some(svc) = service::service_for_host(st, &d.host, &vs_key.namespace) else {
                return refuse(format!(
                    "{field}[{di}].destination.host `{}` names no known service",
                    d.host
                ));
            };
            let dport = match d.port.as_ref().and_then(|p| p.number) {
                Some(n) => u16::try_from(n).unwrap_or(0),
                None if svc.ports.len() == 1 => svc.ports[0].port as u16,
                None => port,
            };
            if service::service_port(svc, dport).is_none() {
                return refuse(format!(
                    "{field}[{di}].destination: service {} has no port {dport}",
                    svc.uid
                ));
            }
            let subset = match &d.subset {
                None => None,
                Some(name) => {
                    match destination_rule_for(st, svc, &vs_key.namespace, src.namespace).and_then(
                        |(_, dr)| dr.subsets.iter().find(|s| &s.name == name).map(|s| (dr, s)),
                    ) {
                        Some(x) => Some(x),
                        None => {
                            return refuse(format!(
                                "{field}[{di}].destination.subset `{name}` is not defined by a DestinationRule"
                            ));
                        }
                    }
                }
            };
            let vip = svc
                .cluster_ip
                .parse()
                .map(|ip| SocketAddr::new(ip, dport))
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], dport)));
            let mut out = super::to_service(
                st,
                lb,
                health,
                rng,
                src,
                vip,
                svc,
                dport,
                subset,
                Some(&vs_key.namespace),
            );
            if let Decision::Endpoint(r) = &mut out {
                r.route = Some(vs_key.to_string());
            }
            return out;
        }
    }
    Decision::NotService
}
