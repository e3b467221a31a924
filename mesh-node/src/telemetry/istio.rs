//! Istio's standard metrics, with Istio's names and labels, so existing dashboards and alerts
//! work: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total` (L4 connections),
//! `istio_requests_total` and `istio_request_duration_milliseconds` (HTTP requests).
//!
//! Label values follow Istio, and where Istio's proxies differ, ztunnel (the node proxy
//! sidenode stands in for, so a cluster mixing both writes one set of series): `reporter` is
//! `source` (the client's node proxy) or `destination` (the server's); workloads are named as
//! istiod names them ([`workload_name`]); principals are full SPIFFE ids; anything not known is
//! `unknown`. Every label, checked against Istio's documentation, ztunnel and Envoy:
//! docs/observability.md, "Label values, checked against Istio". Sent/received are from the
//! reporter's view of the downstream side: `received` = bytes of the request direction
//! (client → server), `sent` = the response direction.
//!
//! Bounded cardinality: every label set used is remembered with its two workloads, and
//! [`sweep`] (run by the proxy on each state change) removes the series of workloads that have
//! no pod left in the node's state.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec};

use crate::proto;
use crate::state::NodeState;
use crate::telemetry::metrics::counter;

/// Istio's default cluster name (`values.global.multiCluster.clusterName` unset).
pub const CLUSTER: &str = "Kubernetes";
pub const UNKNOWN: &str = "unknown";
/// What sidenode knows of a connection's security (`Labels::security`, the access log and the
/// admin API): `mutual_tls` (HBONE, or same-node with both identities proven) or `none`
/// (plain TCP). The `connection_security_policy` label writes `none` as `unknown`, as ztunnel
/// does and as Istio documents for the source reporter: [`security_policy_label`].
pub const MUTUAL_TLS: &str = "mutual_tls";
pub const NONE: &str = "none";

/// The `connection_security_policy` label value: `mutual_tls`, else `unknown` (ztunnel writes
/// `unknown` for every connection it does not carry over mTLS, `src/proxy/metrics.rs`
/// `SecurityPolicy`; Istio's documentation: `unknown` when the report is from the source).
pub fn security_policy_label(security: &str) -> &str {
    if security == MUTUAL_TLS {
        MUTUAL_TLS
    } else {
        UNKNOWN
    }
}

/// Istio's label names for TCP metrics, in Istio's order.
pub const TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// HTTP metrics add these to [`TCP_LABELS`].
pub const HTTP_EXTRA_LABELS: [&str; 2] = ["response_code", "grpc_response_status"];

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The `source_principal`/`destination_principal` label value as Istio's proxies write it: the
/// full SPIFFE id (`spiffe://td/ns/NS/sa/SA`, ztunnel and Envoy alike), or `unknown`.
/// (AuthorizationPolicy `principals` use the form without the scheme: [`Side::principal`].)
pub fn principal_label(principal: &str) -> String {
    if principal == UNKNOWN {
        UNKNOWN.into()
    } else {
        format!("spiffe://{principal}")
    }
}

/// One side of a connection as Istio labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Side {
    pub workload: String,
    pub namespace: String,
    /// SPIFFE id without `spiffe://` (Istio's principal form), or `unknown`.
    pub principal: String,
    /// `source_app`/`destination_app`: the canonical service, as ztunnel writes it.
    pub app: String,
    /// `source_version`/`destination_version`: the canonical revision, as ztunnel writes it.
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// `source_cluster`/`destination_cluster`: [`CLUSTER`] for a pod of this cluster, `unknown`
    /// for an address that is no workload.
    pub cluster: String,
}

impl Default for Side {
    fn default() -> Self {
        Side {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }
}

impl Side {
    /// A workload of the state; `principal` as proven (mTLS) or `None` (plaintext: unknown).
    ///
    /// Canonical service and revision as istiod computes them for ztunnel (its
    /// `labels.CanonicalService`): `service.istio.io/canonical-name`, `app.kubernetes.io/name`,
    /// `app`, else the workload name; `service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`. App and version are the same two
    /// values, as ztunnel writes them (`with_source`/`with_destination`).
    pub fn of(w: &proto::Workload, principal: Option<String>) -> Side {
        let workload = workload_name(w);
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()).cloned())
        };
        let canonical_service = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload.clone());
        let canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| LATEST.into());
        Side {
            app: canonical_service.clone(),
            version: canonical_revision.clone(),
            canonical_service,
            canonical_revision,
            namespace: w.namespace.clone(),
            principal: principal.unwrap_or_else(|| UNKNOWN.into()),
            cluster: CLUSTER.into(),
            workload,
        }
    }

    /// Only what the kernel's workload map knows (namespace and pod name): a source pod the
    /// state does not have (yet), labelled as istiod would label a pod without labels.
    pub fn named(namespace: &str, pod: &str) -> Side {
        Side {
            workload: pod.to_string(),
            namespace: namespace.to_string(),
            app: pod.to_string(),
            version: LATEST.into(),
            canonical_service: pod.to_string(),
            canonical_revision: LATEST.into(),
            cluster: CLUSTER.into(),
            ..Side::default()
        }
    }
}

/// Istio's default canonical revision (no revision label).
pub const LATEST: &str = "latest";

/// Istio's workload name (istiod's `GetDeployMetaFromPod`: the pod's controller, with a
/// ReplicaSet's Deployment and a Job's CronJob in their place), found from the labels the
/// controllers put on their pods, since the state carries no owner references:
/// - a ReplicaSet pod (`pod-template-hash`, `<deployment>-<hash>-<suffix>`): the Deployment;
/// - a StatefulSet pod (`statefulset.kubernetes.io/pod-name`, `<statefulset>-<ordinal>`): the
///   StatefulSet;
/// - a DaemonSet pod (`pod-template-generation`, `<daemonset>-<5 characters>`): the DaemonSet;
/// - a Job pod (`batch.kubernetes.io/job-name` or `job-name`): the Job, or its CronJob when the
///   Job's name ends in `-<8 to 10 digits>` (istiod's `cronJobNameRegexp`);
/// - any other pod is its own workload.
pub fn workload_name(w: &proto::Workload) -> String {
    let label = |k: &str| w.labels.get(k).filter(|v| !v.is_empty());
    if let Some(hash) = label("pod-template-hash")
        && let Some(i) = w.name.rfind(&format!("-{hash}-"))
    {
        return w.name[..i].to_string();
    }
    if label("statefulset.kubernetes.io/pod-name") == Some(&w.name)
        && let Some((set, ordinal)) = w.name.rsplit_once('-')
        && !set.is_empty()
        && !ordinal.is_empty()
        && ordinal.bytes().all(|b| b.is_ascii_digit())
    {
        return set.to_string();
    }
    if label("pod-template-generation").is_some()
        && label("controller-revision-hash").is_some()
        && let Some((set, suffix)) = w.name.rsplit_once('-')
        && !set.is_empty()
        && suffix.len() == 5
    {
        return set.to_string();
    }
    if let Some(job) = label("batch.kubernetes.io/job-name").or_else(|| label("job-name")) {
        return match job.rsplit_once('-') {
            Some((cron, stamp))
                if !cron.is_empty()
                    && (8..=10).contains(&stamp.len())
                    && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_string()
            }
            _ => job.clone(),
        };
    }
    w.name.clone()
}

/// The Service a connection or request was sent to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ServiceName {
    /// FQDN (`reviews.shop.svc.cluster.local`).
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    /// From a service uid `namespace/name`.
    pub fn of_uid(uid: &str) -> Option<ServiceName> {
        let (ns, name) = uid.split_once('/')?;
        Some(ServiceName {
            host: format!("{name}.{ns}.svc.{}", crate::model::CLUSTER_DOMAIN),
            name: name.into(),
            namespace: ns.into(),
        })
    }
}

/// Everything the labels of one connection or request are made of.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Labels {
    pub reporter: Reporter,
    pub source: Side,
    pub destination: Side,
    pub service: Option<ServiceName>,
    /// `request_protocol`: `tcp` (connections), `http` or `grpc` (requests), as Envoy writes
    /// it (never `http2`: Envoy's stats filter knows only `http` and `grpc`).
    pub protocol: String,
    /// [`MUTUAL_TLS`] or [`NONE`] (the label writes `none` as `unknown`).
    pub security: &'static str,
}

impl Labels {
    /// The values for [`TCP_LABELS`].
    pub fn tcp_values(&self, flags: &str) -> Vec<String> {
        let (s, d) = (&self.source, &self.destination);
        let (svc_host, svc_name, svc_ns) = match &self.service {
            Some(sv) => (sv.host.clone(), sv.name.clone(), sv.namespace.clone()),
            // No service (a pod or an outside address dialled directly): all three `unknown`,
            // as ztunnel writes them (`with_destination_service` not called).
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        vec![
            self.reporter.as_str().into(),
            s.workload.clone(),
            s.canonical_service.clone(),
            s.canonical_revision.clone(),
            s.namespace.clone(),
            principal_label(&s.principal),
            s.app.clone(),
            s.version.clone(),
            s.cluster.clone(),
            d.workload.clone(),
            d.namespace.clone(),
            principal_label(&d.principal),
            d.app.clone(),
            d.version.clone(),
            svc_host,
            svc_name,
            svc_ns,
            d.canonical_service.clone(),
            d.canonical_revision.clone(),
            d.cluster.clone(),
            self.protocol.clone(),
            flags.into(),
            security_policy_label(self.security).into(),
        ]
    }

    fn workloads(&self) -> [(String, String); 2] {
        [
            (self.source.namespace.clone(), self.source.workload.clone()),
            (
                self.destination.namespace.clone(),
                self.destination.workload.clone(),
            ),
        ]
    }
}

// ------------------------------------------------------------------------------ families

pub struct Families {
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_sent: IntCounterVec,
    pub tcp_received: IntCounterVec,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
}

pub fn families() -> &'static Families {
    static F: OnceLock<Families> = OnceLock::new();
    F.get_or_init(|| {
        let http: Vec<&str> = TCP_LABELS
            .iter()
            .chain(HTTP_EXTRA_LABELS.iter())
            .copied()
            .collect();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "istio_request_duration_milliseconds",
                "Duration of HTTP requests, from the first request byte to the last response header",
            )
            .buckets(DURATION_BUCKETS_MS.to_vec()),
            &http,
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let _ = crate::telemetry::metrics::metrics()
            .registry
            .register(Box::new(duration.clone()));
        Families {
            tcp_opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                &TCP_LABELS,
            ),
            tcp_closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                &TCP_LABELS,
            ),
            tcp_sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client (response direction) on TCP connections",
                &TCP_LABELS,
            ),
            tcp_received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (request direction) on TCP connections",
                &TCP_LABELS,
            ),
            requests: counter(
                "istio_requests_total",
                "HTTP requests, by source, destination and response code",
                &http,
            ),
            duration,
        }
    })
}

// ------------------------------------------------------------------------------ book

/// A workload as the book keys it: (namespace, workload name).
pub type WorkloadKey = (String, String);

/// Label sets in use: HTTP ones by their values, with the workloads they name; TCP ones by
/// the connection's [`Labels`] and response flags, with their counters once resolved. A new
/// connection costs one lookup here (hashing the `Labels` it already has) instead of a
/// `with_label_values` per metric, each of which hashes 23 label values made for it.
#[derive(Default)]
struct Book {
    http: HashMap<Vec<String>, [WorkloadKey; 2]>,
    tcp: HashMap<Labels, HashMap<String, TcpSlots>>,
}

/// A TCP label set's counters, indexed by [`TcpMetric`]; each resolved when first counted, so
/// a label set only ever closed (flags other than `-`) exports no zero `opened` series.
type TcpSlots = [Option<IntCounter>; 4];

/// The TCP family's counters, in [`TcpSlots`] order.
#[derive(Clone, Copy)]
enum TcpMetric {
    Opened = 0,
    Closed = 1,
    Sent = 2,
    Received = 3,
}

impl TcpMetric {
    const ALL: [TcpMetric; 4] = [
        TcpMetric::Opened,
        TcpMetric::Closed,
        TcpMetric::Sent,
        TcpMetric::Received,
    ];

    fn vec(self, f: &Families) -> &IntCounterVec {
        match self {
            TcpMetric::Opened => &f.tcp_opened,
            TcpMetric::Closed => &f.tcp_closed,
            TcpMetric::Sent => &f.tcp_sent,
            TcpMetric::Received => &f.tcp_received,
        }
    }
}

fn book() -> &'static Mutex<Book> {
    static B: OnceLock<Mutex<Book>> = OnceLock::new();
    B.get_or_init(Default::default)
}

/// The counters `wanted` of the TCP label set (`labels`, `flags`), recorded in the book (for
/// [`sweep`]) and resolved once per label set.
fn tcp_counters<const N: usize>(
    labels: &Labels,
    flags: &str,
    wanted: [TcpMetric; N],
) -> [IntCounter; N] {
    let f = families();
    let mut values: Option<Vec<String>> = None;
    let mut resolve = |slot: Option<&mut Option<IntCounter>>, m: TcpMetric| {
        let mut make = || {
            let v = values.get_or_insert_with(|| labels.tcp_values(flags));
            m.vec(f).with_label_values(&refs(v))
        };
        match slot {
            Some(slot) => slot.get_or_insert_with(make).clone(),
            None => make(),
        }
    };
    let mut b = book().lock().unwrap_or_else(|p| p.into_inner());
    if !b.tcp.contains_key(labels) {
        b.tcp.insert(labels.clone(), HashMap::new());
    }
    let by_flags = b.tcp.get_mut(labels);
    let slots = by_flags.map(|m| {
        if !m.contains_key(flags) {
            m.insert(flags.to_string(), Default::default());
        }
        m.get_mut(flags)
    });
    match slots.flatten() {
        Some(slots) => wanted.map(|m| resolve(Some(&mut slots[m as usize]), m)),
        // Not reached (inserted above); counted without the book rather than not at all.
        None => wanted.map(|m| resolve(None, m)),
    }
}

/// Records an HTTP label set in the book, with the workloads it names (for [`sweep`]).
fn remember_http(values: &[String], labels: &Labels) {
    let mut b = book().lock().unwrap_or_else(|p| p.into_inner());
    if !b.http.contains_key(values) {
        b.http.insert(values.to_vec(), labels.workloads());
    }
}

fn refs(values: &[String]) -> Vec<&str> {
    values.iter().map(String::as_str).collect()
}

/// The byte counters of one TCP connection (resolved once; adding is an atomic add).
pub struct TcpCounters {
    pub sent: IntCounter,
    pub received: IntCounter,
}

/// Counts a TCP connection opened and returns its byte counters.
pub fn tcp_opened(labels: &Labels) -> TcpCounters {
    let [opened, sent, received] = tcp_counters(
        labels,
        "-",
        [TcpMetric::Opened, TcpMetric::Sent, TcpMetric::Received],
    );
    opened.inc();
    TcpCounters { sent, received }
}

/// Counts a TCP connection closed, with its Envoy-style response flags (`-`: none).
pub fn tcp_closed(labels: &Labels, flags: &str) {
    let [closed] = tcp_counters(labels, flags, [TcpMetric::Closed]);
    closed.inc();
}

/// Counts one HTTP request and its duration.
pub fn request(labels: &Labels, flags: &str, status: u16, grpc_status: Option<&str>, ms: f64) {
    let mut values = labels.tcp_values(flags);
    values.push(status.to_string());
    values.push(grpc_status.unwrap_or("").to_string());
    let f = families();
    let v = refs(&values);
    f.requests.with_label_values(&v).inc();
    f.duration.with_label_values(&v).observe(ms);
    remember_http(&values, labels);
}

/// Drops every series naming a workload (`namespace`, `workload`) that is not `live` (and not
/// `unknown`). Returns how many series were removed.
pub fn sweep(live: impl Fn(&WorkloadKey) -> bool) -> usize {
    let mut b = book().lock().unwrap_or_else(|p| p.into_inner());
    let f = families();
    let gone = |k: &WorkloadKey| k.1 != UNKNOWN && !live(k);
    let mut removed = 0;
    b.http.retain(|values, workloads| {
        if !workloads.iter().any(gone) {
            return true;
        }
        let v = refs(values);
        let _ = f.requests.remove_label_values(&v);
        let _ = f.duration.remove_label_values(&v);
        removed += 1;
        false
    });
    b.tcp.retain(|labels, by_flags| {
        if !labels.workloads().iter().any(gone) {
            return true;
        }
        for (flags, slots) in by_flags.iter() {
            let values = labels.tcp_values(flags);
            let v = refs(&values);
            for m in TcpMetric::ALL {
                if slots[m as usize].is_some() {
                    let _ = m.vec(f).remove_label_values(&v);
                }
            }
            removed += 1;
        }
        false
    });
    removed
}

/// The (namespace, workload) pairs of the state's pods.
pub fn live_workloads(st: &NodeState) -> HashSet<(String, String)> {
    st.workloads
        .values()
        .map(|w| (w.namespace.clone(), workload_name(w)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> proto::Workload {
        proto::Workload {
            uid: format!("shop/{name}"),
            namespace: "shop".into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn workload_and_canonical_names_follow_istio() {
        let w = pod(
            "reviews-v1-5d8f9c7b6-x2x9z",
            &[
                ("pod-template-hash", "5d8f9c7b6"),
                ("app", "reviews"),
                ("version", "v1"),
            ],
        );
        let s = Side::of(&w, Some("cluster.local/ns/shop/sa/reviews".into()));
        assert_eq!(s.workload, "reviews-v1");
        assert_eq!(s.canonical_service, "reviews");
        assert_eq!(s.canonical_revision, "v1");
        assert_eq!(s.app, "reviews");
        assert_eq!(s.principal, "cluster.local/ns/shop/sa/reviews");
        let bare = Side::of(&pod("db-0", &[]), None);
        assert_eq!(
            (bare.workload.as_str(), bare.canonical_service.as_str()),
            ("db-0", "db-0")
        );
        assert_eq!(
            (bare.canonical_revision.as_str(), bare.principal.as_str()),
            ("latest", UNKNOWN)
        );
    }

    #[test]
    fn workloads_are_named_by_their_controller_as_istiod_names_them() {
        let name = |pod_name: &str, labels: &[(&str, &str)]| workload_name(&pod(pod_name, labels));
        assert_eq!(
            name("web-7c9d8-abcde", &[("pod-template-hash", "7c9d8")]),
            "web"
        );
        assert_eq!(
            name(
                "db-12",
                &[
                    ("statefulset.kubernetes.io/pod-name", "db-12"),
                    ("controller-revision-hash", "db-6d4f"),
                ]
            ),
            "db"
        );
        assert_eq!(
            name(
                "agent-x2x9z",
                &[
                    ("controller-revision-hash", "5b7c"),
                    ("pod-template-generation", "3"),
                ]
            ),
            "agent"
        );
        assert_eq!(
            name(
                "migrate-q8k2p",
                &[("batch.kubernetes.io/job-name", "migrate")]
            ),
            "migrate"
        );
        assert_eq!(
            name("backup-29012345-q8k2p", &[("job-name", "backup-29012345")]),
            "backup",
            "a CronJob's Job: the CronJob"
        );
        assert_eq!(
            name("backup-1-q8k2p", &[("job-name", "backup-1")]),
            "backup-1",
            "a Job whose name merely ends in digits stays the Job"
        );
        // A bare pod, and a pod whose labels do not fit its name, is its own workload.
        assert_eq!(name("db-0", &[]), "db-0");
        assert_eq!(
            name("db-0", &[("statefulset.kubernetes.io/pod-name", "other-0")]),
            "db-0"
        );
    }

    #[test]
    fn values_follow_ztunnel_where_istios_proxies_differ() {
        let w = pod(
            "api-0",
            &[("app.kubernetes.io/name", "api"), ("app", "legacy")],
        );
        let l = Labels {
            reporter: Reporter::Source,
            source: Side::of(&w, None),
            destination: Side::default(),
            service: None,
            protocol: "tcp".into(),
            security: NONE,
        };
        let values = l.tcp_values("-");
        let at = |name: &str| {
            let i = TCP_LABELS.iter().position(|n| *n == name);
            i.map_or("(no such label)", |i| values[i].as_str())
        };
        // App and version are the canonical service and revision.
        assert_eq!(at("source_app"), "api");
        assert_eq!(at("source_canonical_service"), "api");
        assert_eq!(at("source_version"), LATEST);
        assert_eq!(at("source_cluster"), CLUSTER);
        // An address that is no workload: everything unknown, its cluster too.
        for d in [
            "destination_workload",
            "destination_workload_namespace",
            "destination_principal",
            "destination_app",
            "destination_version",
            "destination_canonical_service",
            "destination_canonical_revision",
            "destination_cluster",
            // No service: all three unknown.
            "destination_service",
            "destination_service_name",
            "destination_service_namespace",
        ] {
            assert_eq!(at(d), UNKNOWN, "{d}");
        }
        // Plaintext: `unknown`, never `none`.
        assert_eq!(at("connection_security_policy"), UNKNOWN);
        assert_eq!(security_policy_label(MUTUAL_TLS), MUTUAL_TLS);
        // A pod the state does not know yet, by its name only.
        let named = Side::named("shop", "client");
        assert_eq!(
            (
                named.app.as_str(),
                named.version.as_str(),
                named.cluster.as_str()
            ),
            ("client", LATEST, CLUSTER)
        );
    }

    #[test]
    fn principal_labels_are_full_spiffe_ids_as_istio_writes_them() {
        let mut l = Labels {
            reporter: Reporter::Source,
            source: Side::of(&pod("a", &[]), Some("cluster.local/ns/shop/sa/a".into())),
            destination: Side::of(&pod("b", &[]), None),
            service: None,
            protocol: "tcp".into(),
            security: "mutual_tls",
        };
        let at = |l: &Labels, name: &str| {
            let i = TCP_LABELS.iter().position(|n| *n == name);
            i.map(|i| l.tcp_values("-")[i].clone())
        };
        assert_eq!(
            at(&l, "source_principal").as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/a")
        );
        assert_eq!(at(&l, "destination_principal").as_deref(), Some(UNKNOWN));
        l.destination.principal = "cluster.local/ns/shop/sa/b".into();
        assert_eq!(
            at(&l, "destination_principal").as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/b")
        );
    }

    #[test]
    fn sweep_drops_series_of_gone_workloads_only() {
        let _g = crate::telemetry::test_lock();
        let labels = |src: &str, dst: &str| Labels {
            reporter: Reporter::Source,
            source: Side::named("sweep-test", src),
            destination: Side::named("sweep-test", dst),
            service: None,
            protocol: "tcp".into(),
            security: "mutual_tls",
        };
        let keep = labels("a", "b");
        let drop = labels("a", "gone");
        tcp_opened(&keep).sent.inc_by(5);
        tcp_opened(&drop).sent.inc_by(7);
        tcp_closed(&drop, "DC");
        // Series of other tests are left alone: only `sweep-test/gone` is not live.
        let gone = |k: &WorkloadKey| k.0 == "sweep-test" && k.1 == "gone";
        // Still in use (say, by an open connection): kept.
        assert_eq!(sweep(|_| true), 0);
        let removed = sweep(|k| !gone(k));
        assert_eq!(removed, 2, "opened/bytes (flags -) and closed series");
        let text = crate::telemetry::metrics::render();
        assert!(!text.contains("destination_workload=\"gone\""), "{text}");
        assert!(text.contains("destination_workload=\"b\""));
    }

    /// The counters a label set resolved once serve its later connections, a label set only
    /// closed exports no `opened` series, and after a sweep the label set counts afresh.
    #[test]
    fn resolved_counters_are_reused_and_swept() {
        let _g = crate::telemetry::test_lock();
        let labels = Labels {
            reporter: Reporter::Destination,
            source: Side::named("cache-test", "a"),
            destination: Side::named("cache-test", "b"),
            service: None,
            protocol: "tcp".into(),
            security: "mutual_tls",
        };
        let series = |name: &str, flags: &str| {
            let f = families();
            let vec = match name {
                "opened" => &f.tcp_opened,
                "closed" => &f.tcp_closed,
                _ => &f.tcp_sent,
            };
            vec.with_label_values(&refs(&labels.tcp_values(flags)))
                .get()
        };
        for _ in 0..3 {
            let c = tcp_opened(&labels);
            c.sent.inc_by(10);
            tcp_closed(&labels, "-");
        }
        tcp_closed(&labels, "UF");
        assert_eq!(series("opened", "-"), 3);
        assert_eq!(series("sent", "-"), 30);
        assert_eq!(series("closed", "-"), 3);
        assert_eq!(series("closed", "UF"), 1);
        let text = crate::telemetry::metrics::render();
        let opened_uf = text.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("destination_workload=\"b\"")
                && l.contains("response_flags=\"UF\"")
        });
        assert!(
            !opened_uf,
            "a closed-only label set exported an opened series:\n{text}"
        );
        let gone = |k: &WorkloadKey| k.0 == "cache-test";
        assert_eq!(sweep(|k| !gone(k)), 2);
        tcp_opened(&labels).sent.inc_by(1);
        assert_eq!(series("opened", "-"), 1, "a swept label set counts afresh");
        assert_eq!(series("sent", "-"), 1);
        assert_eq!(sweep(|k| !gone(k)), 1);
    }
}
