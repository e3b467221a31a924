//! One YAML file (possibly several `---` documents) into model objects.
//!
//! Each document is parsed on its own, so a bad document is reported with its line and does
//! not hide the good ones. Kinds the mesh does not read are skipped. Unknown fields are
//! allowed (real manifests carry many), but a field the mesh reads must have the right type.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::ConfigError;
use crate::model::istio::{IstioKind, IstioObject, IstioSpec};
use crate::model::{
    Labels, MeshConfig, Namespace, Node, ObjKey, Object, Origin, Pod, Service, ServiceAccount,
    ServicePort, TargetPort,
};

/// Which object a document describes, as far as it could be read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjId {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The kind a Gateway API `Gateway` is known by in errors and stores (an Istio `Gateway` is
/// plain `Gateway`).
pub const API_GATEWAY_KIND: &str = "Gateway.gateway.networking.k8s.io";

/// The kind a document of `kind` and `api_version` is known by: a `Gateway` of the Gateway
/// API is told apart from Istio's.
pub fn kind_id(kind: &str, api_version: &str) -> String {
    if kind == "Gateway" && crate::model::gatewayapi::is_gateway_api(api_version) {
        API_GATEWAY_KIND.to_string()
    } else {
        kind.to_string()
    }
}

impl Object {
    pub fn id(&self) -> ObjId {
        match self {
            Object::Namespace(n) => ObjId {
                kind: "Namespace".into(),
                namespace: String::new(),
                name: n.name.clone(),
            },
            Object::Pod(p) => ObjId {
                kind: "Pod".into(),
                namespace: p.key.namespace.clone(),
                name: p.key.name.clone(),
            },
            Object::Service(s) => ObjId {
                kind: "Service".into(),
                namespace: s.key.namespace.clone(),
                name: s.key.name.clone(),
            },
            Object::Node(n) => ObjId {
                kind: "Node".into(),
                namespace: String::new(),
                name: n.name.clone(),
            },
            Object::ServiceAccount(sa) => ObjId {
                kind: "ServiceAccount".into(),
                namespace: sa.key.namespace.clone(),
                name: sa.key.name.clone(),
            },
            Object::HttpRoute(r) => ObjId {
                kind: "HTTPRoute".into(),
                namespace: r.key.namespace.clone(),
                name: r.key.name.clone(),
            },
            Object::TlsRoute(r) => ObjId {
                kind: "TLSRoute".into(),
                namespace: r.key.namespace.clone(),
                name: r.key.name.clone(),
            },
            Object::GatewayClass(c) => ObjId {
                kind: "GatewayClass".into(),
                namespace: String::new(),
                name: c.name.clone(),
            },
            Object::ApiGateway(g) => ObjId {
                kind: API_GATEWAY_KIND.into(),
                namespace: g.key.namespace.clone(),
                name: g.key.name.clone(),
            },
            Object::ReferenceGrant(g) => ObjId {
                kind: "ReferenceGrant".into(),
                namespace: g.key.namespace.clone(),
                name: g.key.name.clone(),
            },
            Object::MeshConfig(m) => ObjId {
                kind: "MeshConfig".into(),
                namespace: String::new(),
                name: m.name.clone(),
            },
            Object::Istio(o) => ObjId {
                kind: o.spec.kind().as_str().into(),
                namespace: o.key.namespace.clone(),
                name: o.key.name.clone(),
            },
        }
    }
}

/// The outcome of parsing one file.
#[derive(Debug, Default)]
pub struct FileParse {
    pub objects: Vec<Object>,
    pub errors: Vec<ConfigError>,
    /// Documents that failed but whose identity is known: their last good version stays.
    pub failed: Vec<ObjId>,
    /// A document could not even be read as YAML: keep every last-good object of the file
    /// that this parse did not produce.
    pub unreadable: bool,
}

/// A document and the file line it starts on (1-based).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_sep = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_sep {
            if !cur.trim().is_empty() {
                docs.push((start, std::mem::take(&mut cur)));
            }
            cur.clear();
            start = i + 2;
            // Content after the marker on the same line belongs to the new document.
            let rest = line[3..].trim();
            if !rest.is_empty() {
                start = i + 1;
                cur.push_str(rest);
                cur.push('\n');
            }
            continue;
        }
        if line == "..." {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.trim().is_empty() {
        docs.push((start, cur));
    }
    docs
}

pub fn parse_file(path: &Path, text: &str) -> FileParse {
    let mut out = FileParse::default();
    for (start, doc) in split_documents(text) {
        let err = |line: usize, object: Option<String>, field: Option<String>, message: String| {
            ConfigError {
                file: path.to_path_buf(),
                line,
                object,
                field,
                message,
            }
        };
        // First: is it YAML at all, and what does it claim to be?
        let value: yaml_serde::Value = match yaml_serde::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                let line = e.location().map(|l| start + l.line() - 1).unwrap_or(start);
                out.errors
                    .push(err(line, None, None, format!("malformed YAML: {e}")));
                out.unreadable = true;
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let Some(head) = Head::of(&value) else {
            out.errors.push(err(
                start,
                None,
                None,
                "document is not a mapping with `kind`".into(),
            ));
            out.unreadable = true;
            continue;
        };
        let id = head.id();
        let origin = Origin {
            file: path.to_path_buf(),
            line: start,
        };
        let reader = YamlDoc { doc: &doc, start };
        let Some(parsed) = convert(&head.kind, &head.api_version, &reader, origin) else {
            // Kinds the mesh does not read (Deployments, ConfigMaps, ...) are not errors.
            continue;
        };
        match parsed {
            Ok(obj) => out.objects.push(obj),
            Err(e) => {
                out.errors
                    .push(err(e.line, Some(id.to_string()), e.field, e.message));
                out.failed.push(id);
            }
        }
    }
    out
}

/// `kind`, `metadata.name` and `metadata.namespace`, read leniently to name the object in
/// errors even when the rest of it is wrong.
struct Head {
    kind: String,
    api_version: String,
    name: String,
    namespace: String,
}

impl Head {
    fn of(v: &yaml_serde::Value) -> Option<Head> {
        let kind = v.get("kind")?.as_str()?.to_string();
        let api_version = v
            .get("apiVersion")
            .and_then(|a| a.as_str())
            .unwrap_or("")
            .to_string();
        let meta = v.get("metadata");
        let s = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(|x| x.as_str())
                .map(str::to_string)
        };
        Some(Head {
            kind,
            api_version,
            name: s("name").unwrap_or_else(|| "<unnamed>".into()),
            namespace: s("namespace").unwrap_or_else(|| "default".into()),
        })
    }
    fn id(&self) -> ObjId {
        let cluster_scoped = matches!(
            self.kind.as_str(),
            "Namespace" | "Node" | "MeshConfig" | "GatewayClass"
        );
        let namespace = if cluster_scoped {
            String::new()
        } else {
            self.namespace.clone()
        };
        ObjId {
            kind: kind_id(&self.kind, &self.api_version),
            namespace,
            name: self.name.clone(),
        }
    }
}

/// An error inside one object: the line and field, when known.
#[derive(Debug)]
pub(crate) struct ObjError {
    pub line: usize,
    pub field: Option<String>,
    pub message: String,
}

impl ObjError {
    fn field(line: usize, field: &str, message: impl Into<String>) -> Self {
        ObjError {
            line,
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// Reads a typed view of one object, with the failing field's path and line in the error.
pub(crate) trait TypedReader {
    fn read<T: DeserializeOwned>(&self) -> Result<T, ObjError>;
}

/// One YAML document of a file, starting at `start`.
struct YamlDoc<'a> {
    doc: &'a str,
    start: usize,
}

impl TypedReader for YamlDoc<'_> {
    fn read<T: DeserializeOwned>(&self) -> Result<T, ObjError> {
        let de = yaml_serde::Deserializer::from_str(self.doc);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .location()
                .map(|l| self.start + l.line() - 1)
                .unwrap_or(self.start);
            // yaml_serde prefixes its message with the path it knows; keep the plain message.
            let message = inner.to_string();
            let message = match message.split_once(": ") {
                Some((head, rest)) if head == path || head.ends_with(&path) => rest.to_string(),
                _ => message,
            };
            ObjError {
                line,
                field: (path != ".").then_some(path),
                message,
            }
        })
    }
}

/// An object as the Kubernetes API returned it (JSON; no lines).
pub(crate) struct JsonObject<'a>(pub &'a serde_json::Value);

impl TypedReader for JsonObject<'_> {
    fn read<T: DeserializeOwned>(&self) -> Result<T, ObjError> {
        serde_path_to_error::deserialize(self.0).map_err(|e| {
            let path = e.path().to_string();
            ObjError {
                line: 0,
                field: (path != ".").then_some(path),
                message: e.into_inner().to_string(),
            }
        })
    }
}

/// [`convert`] on an object as the Kubernetes API returns it (JSON), as the controller's
/// source does; the error is the message it would report. Public for the fuzz targets.
pub fn convert_json(
    kind: &str,
    value: &serde_json::Value,
    origin: Origin,
) -> Option<Result<Object, String>> {
    let api_version = value
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or("");
    convert(kind, api_version, &JsonObject(value), origin).map(|r| {
        r.map_err(|e| match e.field {
            Some(f) => format!("{f}: {}", e.message),
            None => e.message,
        })
    })
}

/// The model object for a document of `kind` (and `api_version`, which tells the two
/// `Gateway` kinds apart); `None` for kinds the mesh does not read. The one conversion every
/// source (file, Kubernetes) goes through.
pub(crate) fn convert(
    kind: &str,
    api_version: &str,
    reader: &impl TypedReader,
    origin: Origin,
) -> Option<Result<Object, ObjError>> {
    use crate::model::gatewayapi::is_gateway_api;
    let gateway_api = is_gateway_api(api_version);
    Some(match kind {
        "Namespace" => reader
            .read::<RawNamespace>()
            .and_then(|r| r.into_model(origin)),
        "Pod" => reader.read::<RawPod>().and_then(|r| r.into_model(origin)),
        "Service" => reader
            .read::<RawService>()
            .and_then(|r| r.into_model(origin)),
        "Node" => reader.read::<RawNode>().and_then(|r| r.into_model(origin)),
        "ServiceAccount" => reader.read::<RawNamespace>().and_then(|r| {
            Ok(Object::ServiceAccount(ServiceAccount {
                key: r.metadata.key(origin.line)?,
                origin,
            }))
        }),
        "MeshConfig" => reader
            .read::<RawMeshConfig>()
            .and_then(|r| r.into_model(origin)),
        // TLS material is the gateway's to read; it never goes through the controller.
        "Secret" => return None,
        "HTTPRoute" => return read_http_route(reader, origin),
        "TLSRoute" => match reader
            .read::<gatewayapi::RawTlsRoute>()
            .and_then(|r| r.into_model(origin))
        {
            Ok(None) => return None,
            Ok(Some(r)) => Ok(Object::TlsRoute(r)),
            Err(e) => Err(e),
        },
        "GatewayClass" => reader
            .read::<gatewayapi::RawGatewayClass>()
            .and_then(|r| r.into_model(origin))
            .map(Object::GatewayClass),
        "ReferenceGrant" => reader
            .read::<gatewayapi::RawReferenceGrant>()
            .and_then(|r| r.into_model(origin))
            .map(Object::ReferenceGrant),
        "Gateway" if gateway_api => reader
            .read::<gatewayapi::RawGateway>()
            .and_then(|r| r.into_model(origin))
            .map(Object::ApiGateway),
        "Gateway" => {
            // Istio's (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`; hand-written files
            // may leave `apiVersion` out). Another group's Gateway is not the mesh's.
            let group = api_version.split_once('/').map_or("", |(g, _)| g);
            if !api_version.is_empty() && group != crate::model::istio::NETWORKING_GROUP {
                return None;
            }
            read_istio(IstioKind::Gateway, reader, origin).and_then(|o| {
                check_istio_gateway(&o)?;
                Ok(o)
            })
        }
        other => {
            let kind = IstioKind::parse(other)?;
            read_istio(kind, reader, origin)
        }
    })
}

/// What only an Istio `Gateway` may not do: `credentialName` is a Secret of its own namespace
/// (the `namespace/name` form is a converted Gateway API Gateway's, checked by grants).
fn check_istio_gateway(o: &Object) -> Result<(), ObjError> {
    let Object::Istio(IstioObject {
        spec: IstioSpec::Gateway(gw),
        origin,
        ..
    }) = o
    else {
        return Ok(());
    };
    for (i, s) in gw.servers.iter().enumerate() {
        if let Some(c) = s.tls.as_ref().and_then(|t| t.credential_name.as_deref())
            && c.contains('/')
        {
            return Err(ObjError::field(
                origin.line,
                &format!("spec.servers[{i}].tls.credentialName"),
                format!(
                    "`{c}`: an Istio Gateway's Secret is in its own namespace (a name without `/`)"
                ),
            ));
        }
    }
    Ok(())
}

/// An HTTPRoute: its Service parents' VirtualService and/or its Gateway parents' route;
/// `None` when it has neither kind of parent.
fn read_http_route(reader: &impl TypedReader, origin: Origin) -> Option<Result<Object, ObjError>> {
    let r = match reader.read::<httproute::RawHttpRoute>() {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    let line = origin.line;
    let key = match r.metadata.key(line) {
        Ok(k) => k,
        Err(e) => return Some(Err(e)),
    };
    let result = (|| {
        let mesh = match r.mesh_virtual_service(line, &key.namespace)? {
            None => None,
            Some(vs) => {
                let spec = IstioSpec::VirtualService(vs);
                spec.validate()
                    .map_err(|(field, message)| ObjError::field(line, &field, message))?;
                Some(IstioObject {
                    key: key.clone(),
                    spec,
                    origin: origin.clone(),
                })
            }
        };
        let gateway = r.gateway_route(&origin, &key)?;
        if let Some(g) = &gateway {
            IstioSpec::VirtualService(g.spec.clone())
                .validate()
                .map_err(|(field, message)| ObjError::field(line, &field, message))?;
        }
        Ok((mesh, gateway))
    })();
    match result {
        Ok((None, None)) => None,
        Ok((mesh, gateway)) => Some(Ok(Object::HttpRoute(Box::new(
            crate::model::gatewayapi::HttpRouteObject { key, mesh, gateway },
        )))),
        Err(e) => Some(Err(e)),
    }
}

#[derive(Deserialize)]
struct RawMeshConfig {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawMeshConfigSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawMeshConfigSpec {
    #[serde(default)]
    exclude_ports: Vec<u16>,
    #[serde(default, rename = "excludeCIDRs")]
    exclude_cidrs: Vec<String>,
    #[serde(rename = "certTTL")]
    cert_ttl: Option<String>,
    tunnel_protocol: Option<String>,
}

impl RawMeshConfig {
    fn into_model(self, origin: Origin) -> Result<Object, ObjError> {
        let line = origin.line;
        let name = self.metadata.name(line)?;
        let spec = self.spec;
        for (i, p) in spec.exclude_ports.iter().enumerate() {
            if *p == 0 {
                return Err(ObjError::field(
                    line,
                    &format!("spec.excludePorts[{i}]"),
                    "must be 1-65535",
                ));
            }
        }
        let mut exclude_cidrs = Vec::new();
        for (i, c) in spec.exclude_cidrs.iter().enumerate() {
            let net = c
                .parse::<ipnet::IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ObjError::field(
                        line,
                        &format!("spec.excludeCIDRs[{i}]"),
                        format!("`{c}` is not a CIDR"),
                    )
                })?;
            exclude_cidrs.push(net);
        }
        let cert_ttl = match &spec.cert_ttl {
            None => None,
            Some(s) => Some(
                crate::model::istio::parse_duration(s)
                    .filter(|d| d.as_secs() >= 60)
                    .ok_or_else(|| {
                        ObjError::field(
                            line,
                            "spec.certTTL",
                            format!("`{s}` is not a duration of at least 1m (like `24h`)"),
                        )
                    })?,
            ),
        };
        if let Some(p) = &spec.tunnel_protocol
            && p != "h2"
            && p != "quic"
        {
            return Err(ObjError::field(
                line,
                "spec.tunnelProtocol",
                format!("`{p}` is not `h2` or `quic`"),
            ));
        }
        Ok(Object::MeshConfig(MeshConfig {
            name,
            exclude_ports: spec.exclude_ports,
            exclude_cidrs,
            cert_ttl,
            tunnel_protocol: spec.tunnel_protocol,
            origin,
        }))
    }
}

#[derive(Deserialize)]
struct RawIstio<S> {
    #[serde(default)]
    metadata: RawMeta,
    spec: S,
}

fn read_istio(
    kind: IstioKind,
    reader: &impl TypedReader,
    origin: Origin,
) -> Result<Object, ObjError> {
    fn typed<S: DeserializeOwned>(
        reader: &impl TypedReader,
        line: usize,
    ) -> Result<(ObjKey, S), ObjError> {
        let r: RawIstio<S> = reader.read()?;
        Ok((r.metadata.key(line)?, r.spec))
    }
    let line = origin.line;
    let (key, spec) = match kind {
        IstioKind::VirtualService => {
            typed(reader, line).map(|(k, s)| (k, IstioSpec::VirtualService(s)))?
        }
        IstioKind::DestinationRule => {
            typed(reader, line).map(|(k, s)| (k, IstioSpec::DestinationRule(s)))?
        }
        IstioKind::AuthorizationPolicy => {
            typed(reader, line).map(|(k, s)| (k, IstioSpec::AuthorizationPolicy(s)))?
        }
        IstioKind::PeerAuthentication => {
            typed(reader, line).map(|(k, s)| (k, IstioSpec::PeerAuthentication(s)))?
        }
        IstioKind::RateLimitPolicy => {
            typed(reader, line).map(|(k, s)| (k, IstioSpec::RateLimitPolicy(s)))?
        }
        IstioKind::Gateway => typed(reader, line).map(|(k, s)| (k, IstioSpec::Gateway(s)))?,
    };
    spec.validate()
        .map_err(|(field, message)| ObjError::field(line, &field, message))?;
    Ok(Object::Istio(IstioObject { key, spec, origin }))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    name: Option<String>,
    generation: Option<i64>,
    uid: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

impl RawMeta {
    fn name(&self, line: usize) -> Result<String, ObjError> {
        match &self.name {
            Some(n) if !n.is_empty() => Ok(n.clone()),
            _ => Err(ObjError::field(line, "metadata.name", "missing")),
        }
    }
    fn key(&self, line: usize) -> Result<ObjKey, ObjError> {
        Ok(ObjKey {
            namespace: self.namespace.clone().unwrap_or_else(|| "default".into()),
            name: self.name(line)?,
        })
    }
    fn labels(&self) -> Labels {
        self.labels.clone().unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct RawNamespace {
    #[serde(default)]
    metadata: RawMeta,
}

impl RawNamespace {
    fn into_model(self, origin: Origin) -> Result<Object, ObjError> {
        Ok(Object::Namespace(Namespace {
            name: self.metadata.name(origin.line)?,
            labels: self.metadata.labels(),
            origin,
        }))
    }
}

#[derive(Deserialize)]
struct RawPod {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawPodSpec,
    #[serde(default)]
    status: RawPodStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<RawPodIp>>,
    conditions: Option<Vec<RawCondition>>,
}

#[derive(Deserialize)]
struct RawCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: String,
}

fn parse_ip(line: usize, field: &str, s: &str) -> Result<IpAddr, ObjError> {
    s.parse()
        .map_err(|_| ObjError::field(line, field, format!("`{s}` is not an IP address")))
}

impl RawPod {
    fn into_model(self, origin: Origin) -> Result<Object, ObjError> {
        let line = origin.line;
        let key = self.metadata.key(line)?;
        let ip = match self.status.pod_ip.as_deref() {
            Some(s) if !s.is_empty() => parse_ip(line, "status.podIP", s)?,
            _ => {
                return Err(ObjError::field(
                    line,
                    "status.podIP",
                    "missing: a pod needs an IP to be part of the mesh",
                ));
            }
        };
        let mut ips = vec![ip];
        for (i, p) in self.status.pod_ips.unwrap_or_default().iter().enumerate() {
            let extra = parse_ip(line, &format!("status.podIPs[{i}].ip"), &p.ip)?;
            if !ips.contains(&extra) {
                ips.push(extra);
            }
        }
        // Without conditions (a hand-written file) a pod counts as ready, as Kubernetes' own
        // tools would show it; with them, the `Ready` condition decides.
        let ready = match &self.status.conditions {
            None => true,
            Some(cs) => cs.iter().any(|c| c.kind == "Ready" && c.status == "True"),
        };
        Ok(Object::Pod(Pod {
            key,
            uid: self.metadata.uid.clone().filter(|u| !u.is_empty()),
            ready,
            node: self.spec.node_name,
            ip,
            ips,
            service_account: self
                .spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            host_network: self.spec.host_network.unwrap_or(false),
            labels: self.metadata.labels(),
            annotations: self.metadata.annotations.clone().unwrap_or_default(),
            origin,
        }))
    }
}

#[derive(Deserialize)]
struct RawService {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawServiceSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    ports: Option<Vec<RawServicePort>>,
    selector: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    name: Option<String>,
    port: u16,
    target_port: Option<RawTargetPort>,
    protocol: Option<String>,
    app_protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTargetPort {
    Number(u16),
    Name(String),
}

impl RawService {
    fn into_model(self, origin: Origin) -> Result<Object, ObjError> {
        let line = origin.line;
        let key = self.metadata.key(line)?;
        let cluster_ip = match self.spec.cluster_ip.as_deref() {
            None | Some("") | Some("None") => None,
            Some(s) => Some(parse_ip(line, "spec.clusterIP", s)?),
        };
        let mut ports = Vec::new();
        for (i, p) in self.spec.ports.unwrap_or_default().into_iter().enumerate() {
            if p.port == 0 {
                return Err(ObjError::field(
                    line,
                    &format!("spec.ports[{i}].port"),
                    "must be 1-65535",
                ));
            }
            ports.push(ServicePort {
                name: p.name,
                port: p.port,
                target_port: p.target_port.map(|t| match t {
                    RawTargetPort::Number(n) => TargetPort::Number(n),
                    RawTargetPort::Name(s) => TargetPort::Name(s),
                }),
                protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol,
            });
        }
        Ok(Object::Service(Service {
            key,
            cluster_ip,
            ports,
            selector: self.spec.selector.unwrap_or_default(),
            origin,
        }))
    }
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    status: RawNodeStatus,
}

#[derive(Deserialize, Default)]
struct RawNodeStatus {
    addresses: Option<Vec<RawNodeAddress>>,
}

#[derive(Deserialize)]
struct RawNodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

impl RawNode {
    fn into_model(self, origin: Origin) -> Result<Object, ObjError> {
        let line = origin.line;
        let name = self.metadata.name(line)?;
        let mut ip = None;
        for (i, a) in self.status.addresses.unwrap_or_default().iter().enumerate() {
            if a.kind == "InternalIP" && ip.is_none() {
                ip = Some(parse_ip(
                    line,
                    &format!("status.addresses[{i}].address"),
                    &a.address,
                )?);
            }
        }
        Ok(Object::Node(Node { name, ip, origin }))
    }
}

mod gatewayapi;
mod httproute;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod gateway_tests;
