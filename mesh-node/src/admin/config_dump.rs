//! `/config_dump`: what the proxy holds — the controller's state as this node decoded it
//! (workloads, services with their endpoints, Istio and sidenode objects, mesh settings) and
//! the workload certificates it holds, public parts only.
//!
//! The types are shared with the CLI (`mesh-node config`), which reads them back; every field
//! has a default so an older or newer proxy's dump still reads.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::identity::manager::PublicCert;
use crate::proto;
use crate::proxy::route::service::labels_match;
use crate::state::NodeState;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigDump {
    pub node: String,
    /// `mesh` (with a controller) or `plain` (forwarding only: no state, no certificates).
    pub mode: String,
    /// The controller's state version (0: none received yet, or plain mode).
    pub state_version: u64,
    pub trust_domain: String,
    pub workloads: Vec<WorkloadView>,
    pub services: Vec<ServiceView>,
    /// Istio objects and `RateLimitPolicy`, as the proxy decoded them.
    pub configs: Vec<ConfigView>,
    pub nodes: Vec<NodeView>,
    pub settings: SettingsView,
    /// The workload certificates this proxy holds (one per identity of its local pods).
    pub certificates: Vec<CertView>,
    /// The roots workload certificates are checked against.
    pub trust_bundle: Vec<RootView>,
    /// Mesh mode: is the state stream to the controller open now? (`None`: plain mode, or a
    /// proxy that predates the field.)
    pub controller_connected: Option<bool>,
    /// Meshed pods of this node the proxy cannot serve yet, by workload uid, and why (e.g.
    /// their network namespace is not found); retried every few seconds.
    pub unserved_pods: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkloadView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<String>,
    pub service_account: String,
    /// SPIFFE identity (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    pub identity: String,
    pub meshed: bool,
    /// Which data plane serves it: `sidenode`, `istio` (ztunnel or Istio's native tunnel:
    /// reached over HBONE, never captured) or `none`.
    pub dataplane: String,
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
}

/// The name a data plane is shown with.
pub fn dataplane_name(d: proto::Dataplane) -> &'static str {
    match d {
        proto::Dataplane::Sidenode => "sidenode",
        proto::Dataplane::Istio => "istio",
        proto::Dataplane::None | proto::Dataplane::Unspecified => "none",
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Empty for a headless service.
    pub cluster_ip: String,
    pub ports: Vec<PortView>,
    pub selector: BTreeMap<String, String>,
    /// Pods of the service's namespace its selector matches (routing uses the ready ones).
    pub endpoints: Vec<EndpointView>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PortView {
    pub name: String,
    pub port: u32,
    /// 0 when the target port is named (`target_port_name`).
    pub target_port: u32,
    pub target_port_name: String,
    pub protocol: String,
    pub app_protocol: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointView {
    /// Workload uid (`namespace/name`).
    pub workload: String,
    pub node: String,
    pub ips: Vec<String>,
    pub ready: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigView {
    /// `Kind/namespace/name`.
    pub uid: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The `spec` as the proxy decoded it (Istio's field names), defaults filled in.
    pub spec: serde_json::Value,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeView {
    pub name: String,
    pub ip: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SettingsView {
    pub exclude_ports: Vec<u32>,
    pub exclude_cidrs: Vec<String>,
    /// Istio's root namespace (policies there apply mesh-wide).
    pub root_namespace: String,
    /// Transport of new HBONE tunnels (`MeshConfig.spec.tunnelProtocol`: `h2` or `quic`).
    pub tunnel_protocol: String,
}

/// A held workload certificate: identity, validity and the public chain. Never a key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CertView {
    pub identity: String,
    /// Increases with every certificate the proxy obtains (a renewal gets a new one).
    pub generation: u64,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_after: String,
    /// Seconds until `not_after` (negative once expired).
    pub expires_in_seconds: i64,
    /// When the proxy renews it (half of the lifetime left when it was obtained).
    pub renew_at: String,
    /// The chain, leaf first, as PEM `CERTIFICATE` blocks.
    pub chain_pem: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RootView {
    pub subject: String,
    pub serial: String,
    pub not_after: String,
}

/// The dump of a proxy on `node`: `state` in mesh mode (`None`: plain mode), the certificates
/// it holds, at time `now`.
pub fn build(
    node: &str,
    state: Option<&NodeState>,
    certs: &[PublicCert],
    now: SystemTime,
) -> ConfigDump {
    let mut dump = ConfigDump {
        node: node.to_string(),
        mode: if state.is_some() { "mesh" } else { "plain" }.to_string(),
        settings: SettingsView {
            root_namespace: crate::policy::root_namespace().to_string(),
            ..Default::default()
        },
        certificates: certs.iter().map(|c| cert_view(c, now)).collect(),
        ..Default::default()
    };
    let Some(st) = state else {
        return dump;
    };
    dump.state_version = st.version;
    dump.trust_domain = st.trust_domain.clone();
    dump.workloads = st
        .workloads
        .values()
        .map(|w| WorkloadView {
            uid: w.uid.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            node: w.node.clone(),
            ips: w.ips.clone(),
            service_account: w.service_account.clone(),
            identity: st.identity_of(w).to_string(),
            meshed: w.meshed,
            dataplane: dataplane_name(w.served_by()).to_string(),
            ready: w.ready,
            labels: w.labels.clone().into_iter().collect(),
        })
        .collect();
    dump.services = st.services.values().map(|s| service_view(st, s)).collect();
    dump.configs = st
        .configs
        .iter()
        .map(|(uid, obj)| {
            // `IstioSpec` serialises as `{"kind": .., "spec": {..}}`.
            let tagged = serde_json::to_value(&obj.spec).unwrap_or(serde_json::Value::Null);
            ConfigView {
                uid: uid.clone(),
                kind: obj.spec.kind().as_str().to_string(),
                namespace: obj.key.namespace.clone(),
                name: obj.key.name.clone(),
                spec: tagged
                    .get("spec")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null),
            }
        })
        .collect();
    dump.nodes = st
        .nodes
        .values()
        .map(|n| NodeView {
            name: n.name.clone(),
            ip: n.ip.clone(),
        })
        .collect();
    dump.settings.exclude_ports = st.settings.exclude_ports.clone();
    dump.settings.exclude_cidrs = st.settings.exclude_cidrs.clone();
    dump.settings.tunnel_protocol = st.settings.tunnel_protocol.clone();
    dump.trust_bundle = crate::identity::certs::certs_from_pem(&st.trust_bundle_pem)
        .unwrap_or_default()
        .iter()
        .map(|der| {
            let (serial, subject, _, not_after) = describe(der.as_ref());
            RootView {
                subject,
                serial,
                not_after,
            }
        })
        .collect();
    dump
}

fn service_view(st: &NodeState, s: &proto::Service) -> ServiceView {
    let endpoints = if s.selector.is_empty() {
        Vec::new()
    } else {
        st.workloads
            .values()
            .filter(|w| w.namespace == s.namespace && labels_match(&s.selector, &w.labels))
            .map(|w| EndpointView {
                workload: w.uid.clone(),
                node: w.node.clone(),
                ips: w.ips.clone(),
                ready: w.ready,
            })
            .collect()
    };
    ServiceView {
        uid: s.uid.clone(),
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        cluster_ip: s.cluster_ip.clone(),
        ports: s
            .ports
            .iter()
            .map(|p| PortView {
                name: p.name.clone(),
                port: p.port,
                target_port: p.target_port,
                target_port_name: p.target_port_name.clone(),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect(),
        selector: s.selector.clone().into_iter().collect(),
        endpoints,
    }
}

fn cert_view(c: &PublicCert, now: SystemTime) -> CertView {
    let (serial, subject, issuer, _) = c
        .chain
        .first()
        .map(|der| describe(der.as_ref()))
        .unwrap_or_default();
    let expires_in_seconds = match c.not_after.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    CertView {
        identity: c.identity.to_string(),
        generation: c.generation,
        serial,
        subject,
        issuer,
        not_before: rfc3339(c.not_before),
        not_after: rfc3339(c.not_after),
        expires_in_seconds,
        renew_at: rfc3339(c.renew_at),
        chain_pem: c
            .chain
            .iter()
            .map(|der| {
                pem::encode_config(
                    &pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                )
            })
            .collect(),
    }
}

/// Serial (hex), subject, issuer and `not_after` of a DER certificate; empty strings when it
/// does not parse.
fn describe(der: &[u8]) -> (String, String, String, String) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => (
            cert.tbs_certificate
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            cert.subject().to_string(),
            cert.issuer().to_string(),
            rfc3339(
                SystemTime::UNIX_EPOCH
                    + std::time::Duration::from_secs(
                        u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
                    ),
            ),
        ),
        Err(_) => Default::default(),
    }
}

/// `2025-01-31T23:59:59Z` (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    fn state() -> NodeState {
        let wl =
            |ns: &str, name: &str, node: &str, ip: &str, app: &str, ready: bool| proto::Workload {
                uid: format!("{ns}/{name}"),
                namespace: ns.into(),
                name: name.into(),
                service_account: format!("sa-{name}"),
                node: node.into(),
                ips: vec![ip.into()],
                meshed: ns == "shop",
                labels: [("app".to_string(), app.to_string())].into(),
                ready,
                ..Default::default()
            };
        let update = proto::StateUpdate {
            version: 7,
            snapshot: true,
            trust_domain: "cluster.local".into(),
            workloads: vec![
                wl("shop", "web-0", "node1", "10.0.1.2", "web", true),
                wl("shop", "web-1", "node2", "10.0.2.2", "web", false),
                wl("shop", "db-0", "node2", "10.0.2.3", "db", true),
                wl("other", "web-9", "node2", "10.0.2.4", "web", true),
            ],
            services: vec![proto::Service {
                uid: "shop/web".into(),
                namespace: "shop".into(),
                name: "web".into(),
                cluster_ip: "10.96.0.10".into(),
                ports: vec![proto::ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: 8080,
                    protocol: "TCP".into(),
                    app_protocol: "http".into(),
                    ..Default::default()
                }],
                selector: [("app".to_string(), "web".to_string())].into(),
            }],
            configs: vec![proto::Config {
                uid: "AuthorizationPolicy/shop/allow-web".into(),
                kind: "AuthorizationPolicy".into(),
                namespace: "shop".into(),
                name: "allow-web".into(),
                spec_json: r#"{"kind":"AuthorizationPolicy","spec":{"action":"DENY","rules":[{"from":[{"source":{"namespaces":["evil"]}}]}]}}"#.into(),
            }],
            settings: Some(proto::MeshSettings {
                exclude_ports: vec![22],
                exclude_cidrs: vec!["10.9.0.0/16".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        NodeState::default().apply(update)
    }

    #[test]
    fn the_dump_says_what_the_state_says() {
        let st = state();
        let d = build("node2", Some(&st), &[], SystemTime::now());
        assert_eq!((d.mode.as_str(), d.state_version), ("mesh", 7));
        let uids: Vec<&str> = d.workloads.iter().map(|w| w.uid.as_str()).collect();
        assert_eq!(
            uids,
            ["other/web-9", "shop/db-0", "shop/web-0", "shop/web-1"]
        );
        let web0 = &d.workloads[2];
        assert_eq!(web0.identity, "spiffe://cluster.local/ns/shop/sa/sa-web-0");
        assert_eq!(web0.ips, ["10.0.1.2"]);
        assert!(web0.meshed && web0.ready);
        let svc = &d.services[0];
        assert_eq!(
            (svc.uid.as_str(), svc.cluster_ip.as_str()),
            ("shop/web", "10.96.0.10")
        );
        assert_eq!(svc.ports[0].app_protocol, "http");
        let eps: Vec<(&str, bool)> = svc
            .endpoints
            .iter()
            .map(|e| (e.workload.as_str(), e.ready))
            .collect();
        assert_eq!(eps, [("shop/web-0", true), ("shop/web-1", false)]);
        assert_eq!(d.configs.len(), 1);
        assert_eq!(d.configs[0].kind, "AuthorizationPolicy");
        assert_eq!(d.configs[0].spec["action"], "DENY");
        assert_eq!(
            d.configs[0].spec["rules"][0]["from"][0]["source"]["namespaces"][0],
            "evil"
        );
        assert_eq!(d.settings.exclude_ports, [22]);
        assert_eq!(d.settings.exclude_cidrs, ["10.9.0.0/16"]);
    }

    #[test]
    fn plain_mode_has_no_mesh_parts() {
        let d = build("node1", None, &[], SystemTime::now());
        assert_eq!(d.mode, "plain");
        assert!(d.workloads.is_empty() && d.services.is_empty() && d.certificates.is_empty());
    }

    /// A certificate manager holding a real certificate: the dump shows it, and no byte of
    /// its private key in any encoding.
    #[tokio::test]
    async fn certificates_are_shown_without_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::controller::ca::Ca::load_or_create(
            &dir.path().join("ca"),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .expect("ca");
        let ca_file = dir.path().join("root.pem");
        let token_file = dir.path().join("token");
        std::fs::write(&ca_file, ca.trust_bundle_pem()).expect("write");
        std::fs::write(&token_file, "t0ken\n").expect("write");
        let conn = crate::identity::controller::channel(
            &crate::identity::controller::ControllerSettings {
                addr: "127.0.0.1:9".into(),
                ca_file,
                token_file,
            },
        )
        .expect("channel");
        let certs = crate::identity::manager::CertManager::new(
            crate::identity::controller::cert_client(&conn),
        );
        let id = Identity::new("cluster.local", "shop", "web");
        let (key, csr) = crate::identity::certs::key_and_csr(&id).expect("csr");
        let chain = ca.sign(&csr, &id).expect("sign");
        let held = certs.hold_for_tests(&id, &key, &chain, ca.trust_bundle_pem(), None);

        let mut st = state();
        st.trust_bundle_pem = ca.trust_bundle_pem().to_string();
        let d = build("node1", Some(&st), &certs.certificates(), SystemTime::now());
        assert_eq!(d.certificates.len(), 1);
        let c = &d.certificates[0];
        assert_eq!(c.identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert!(!c.serial.is_empty(), "{c:?}");
        assert!(
            c.expires_in_seconds > 3000 && c.expires_in_seconds <= 3600,
            "{c:?}"
        );
        assert!(
            c.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"),
            "{c:?}"
        );
        assert_eq!(c.chain_pem.trim(), chain.concat().trim());
        assert_eq!(d.trust_bundle.len(), 1);

        let json = serde_json::to_string_pretty(&d).expect("json");
        let key_der = held.key().secret_der().to_vec();
        let key_pem = key.serialize_pem();
        assert!(!json.contains("PRIVATE KEY"));
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !json.contains(line),
                "a line of the key's PEM is in the dump"
            );
        }
        let hex: String = key_der.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!json.contains(&hex));
        // The secret scalar itself (the ECPrivateKey's `version 1, privateKey OCTET STRING
        // (32)` inside the PKCS#8), in hex and as raw bytes.
        let at = key_der
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .expect("ECPrivateKey in the PKCS#8")
            + 5;
        let scalar = &key_der[at..at + 32];
        let scalar_hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!json.contains(&scalar_hex));
        assert!(!json.as_bytes().windows(scalar.len()).any(|w| w == scalar));
    }
}
