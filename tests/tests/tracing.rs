//! End-to-end test of distributed tracing: both node proxies run with `--otlp-endpoint`
//! pointing at an OTLP/gRPC trace receiver built here from the OpenTelemetry protobuf
//! definitions (`opentelemetry-proto`'s `TraceServiceServer`). The receiver is a tonic server
//! in this process whose listening socket was made inside the cluster's fabric namespace (at
//! the controller's address, 198.18.0.254:4317), where the nodes reach it. One HTTP request
//! from a client pod on node 1 to a Service whose endpoint is on node 2 gives an `outbound`
//! span on node 1 (child of the client's `traceparent`) and an `inbound` span on node 2 (child
//! of node 1's), and the server pod sees node 2's span as its parent; a request without
//! `traceparent` starts a new trace; an unsampled one exports nothing; an L4 connection gets
//! `outbound.tcp` on node 1 and `inbound.tunnel` (its child, through the HBONE `CONNECT`) on
//! node 2. Mesh mode, file config. Run as root: `cargo test -p sidenode-tests --test tracing`.

mod common;

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use sidenode_tests::cluster::{
    CONTROLLER_IP, Cluster, ClusterOpts, TestCluster, netns_path, unique_prefix,
};
use sidenode_tests::workload::mesh_node_path;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RECEIVER_PORT: u16 = 4317;
const CLIENT_POD: &str = "node1-pod1";
const SERVER_POD: &str = "node2-pod1";
const SERVER_IP: &str = "198.19.2.2";
const URL: &str = "http://198.18.128.20:80";
const PATH: &str = "/traced/x";
/// OTLP `Span.kind`.
const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: traced
  namespace: mesh
spec:
  clusterIP: 198.18.128.20
  selector:
    svc: traced
  ports:
  - name: http
    port: 80
    targetPort: 9080
"#;

// ------------------------------------------------------------------------- the receiver

/// One span as received, with its resource's attributes.
#[derive(Clone, Debug)]
struct Got {
    /// `k8s.node.name` of the resource.
    node: String,
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    attrs: BTreeMap<String, String>,
}

impl Got {
    fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", String::as_str)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Got>>>);

impl Store {
    fn spans(&self) -> Vec<Got> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in req.into_inner().resource_spans {
            let res: BTreeMap<String, String> = rs
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect()
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        node: res.get("k8s.node.name").cloned().unwrap_or_default(),
                        service: res.get("service.name").cloned().unwrap_or_default(),
                        name: s.name.clone(),
                        kind: s.kind,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv)))
                            .collect(),
                    });
                }
            }
        }
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver: a tonic server on its own runtime (stopped on drop).
struct Receiver {
    store: Store,
    _rt: tokio::runtime::Runtime,
}

/// Binds `ip:port` inside the network namespace `netns` (a thread that enters it, binds and
/// ends; the socket stays in that namespace).
fn bind_in_netns(netns: &str, ip: &str, port: u16) -> Result<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let path = netns_path(netns);
    let ip: std::net::IpAddr = ip.parse().context("receiver address")?;
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a valid namespace descriptor; it changes only this thread's
        // network namespace, and the thread ends right after binding.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the fabric netns");
        }
        let l = std::net::TcpListener::bind((ip, port))
            .with_context(|| format!("binding {ip}:{port}"))?;
        l.set_nonblocking(true).context("set_nonblocking")?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow!("the binding thread panicked"))?
}

fn start_receiver(c: &Cluster) -> Result<Receiver> {
    let listener = bind_in_netns(&c.fabric_netns(), CONTROLLER_IP, RECEIVER_PORT)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let store = Store::default();
    let svc = TraceServiceServer::new(store.clone());
    rt.spawn(async move {
        let l = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("OTLP receiver: {e}");
                return;
            }
        };
        let incoming = tonic::transport::server::TcpIncoming::from(l);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("OTLP receiver: {e}");
        }
    });
    Ok(Receiver { store, _rt: rt })
}

impl Receiver {
    /// Waits (30 s: the proxies export every 5 s) until `want` holds for the spans received;
    /// returns its answer.
    fn wait_for<T>(&self, what: &str, mut want: impl FnMut(&[Got]) -> Option<T>) -> Result<T> {
        let mut found = None;
        wait_until(Duration::from_secs(30), || {
            found = want(&self.store.spans());
            Ok(found.is_some())
        })?;
        found.with_context(|| {
            let all: Vec<String> = self
                .store
                .spans()
                .iter()
                .map(|s| {
                    format!(
                        "{} {} trace={} span={} parent={}",
                        s.node, s.name, s.trace_id, s.span_id, s.parent
                    )
                })
                .collect();
            format!("no {what} within 30 s; received:\n{}", all.join("\n"))
        })
    }

    /// The `outbound` span of node 1 and the `inbound` span of node 2 in trace `trace_id`.
    fn request_spans(&self, trace_id: &str) -> Result<(Got, Got)> {
        self.wait_for(
            &format!("outbound and inbound spans of trace {trace_id}"),
            |all| {
                let find = |node: &str, name: &str| {
                    all.iter()
                        .find(|s| s.trace_id == trace_id && s.node == node && s.name == name)
                        .cloned()
                };
                Some((find("node1", "outbound")?, find("node2", "inbound")?))
            },
        )
    }
}

// ------------------------------------------------------------------------- the test

/// A 2-node mesh cluster whose proxies export to the receiver's address.
fn traced_cluster() -> Result<TestCluster> {
    require_root();
    let mesh_node = mesh_node_path();
    ensure!(
        mesh_node.exists(),
        "{} not found: build mesh-node (`cargo build -p mesh-node`) or set SIDENODE_MESH_NODE",
        mesh_node.display()
    );
    TestCluster::up(ClusterOpts {
        prefix: unique_prefix('o'),
        nodes: 2,
        pods: 2,
        mesh_node,
        start_agents: true,
        mesh: true,
        proxy_args: vec![
            "--otlp-endpoint".into(),
            format!("http://{CONTROLLER_IP}:{RECEIVER_PORT}"),
        ],
        ..Default::default()
    })
}

/// One request (with `headers`) from the client pod through the Service; returns the
/// `traceparent` the server pod received.
fn request(c: &Cluster, headers: &[&str]) -> Result<String> {
    let mut cmd = c.pod_command(CLIENT_POD, testpod())?;
    cmd.args(["http-get", "--url", URL, "--count", "1", "--path", PATH]);
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().context("running testpod http-get")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "http-get printed no report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("parsing {line}"))?;
    ensure!(
        v["statuses"]["200"] == 1 && v["bodies"]["traced"] == 1,
        "request {headers:?} did not succeed: {v}"
    );
    let tps = v["traceparents"]
        .as_object()
        .with_context(|| format!("the server received no traceparent: {v}"))?;
    ensure!(tps.len() == 1, "one traceparent expected: {v}");
    tps.keys().next().cloned().context("traceparent")
}

/// `(trace id, parent id, flags)` of a `traceparent`.
fn parse_tp(tp: &str) -> Result<(String, String, String)> {
    let p: Vec<&str> = tp.split('-').collect();
    ensure!(
        p.len() == 4 && p[0] == "00" && p[1].len() == 32 && p[2].len() == 16 && p[3].len() == 2,
        "malformed traceparent {tp:?}"
    );
    Ok((p[1].into(), p[2].into(), p[3].into()))
}

/// Checks a request's two spans: node 1's `outbound` (CLIENT) with its attributes, node 2's
/// `inbound` (SERVER) its child, and the server pod's parent is node 2's span.
fn check_request_spans(out: &Got, inb: &Got, server_parent: &str) -> Result<()> {
    ensure!(
        out.service == "sidenode-proxy" && inb.service == "sidenode-proxy",
        "{out:?} {inb:?}"
    );
    ensure!(out.kind == KIND_CLIENT, "outbound is not CLIENT: {out:?}");
    ensure!(inb.kind == KIND_SERVER, "inbound is not SERVER: {inb:?}");
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", PATH),
        ("http.response.status_code", "200"),
        (
            "sidenode.destination.service",
            "traced.mesh.svc.cluster.local",
        ),
        ("sidenode.destination.workload", SERVER_POD),
        ("network.peer.address", SERVER_IP),
        ("network.peer.port", "9080"),
        ("sidenode.node", "node1"),
        ("sidenode.attempts", "1"),
    ] {
        ensure!(
            out.attr(k) == v,
            "outbound {k} is {:?}, not {v:?}: {out:?}",
            out.attr(k)
        );
    }
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", PATH),
        ("http.response.status_code", "200"),
        ("sidenode.node", "node2"),
        ("sidenode.destination.workload", SERVER_POD),
        ("sidenode.destination.namespace", "mesh"),
        (
            "sidenode.source.principal",
            "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1",
        ),
    ] {
        ensure!(
            inb.attr(k) == v,
            "inbound {k} is {:?}, not {v:?}: {inb:?}",
            inb.attr(k)
        );
    }
    ensure!(
        out.attr("upstream_cluster").starts_with("mesh/traced"),
        "outbound upstream_cluster: {out:?}"
    );
    ensure!(
        inb.parent == out.span_id,
        "node 2's span is not a child of node 1's: {inb:?} {out:?}"
    );
    ensure!(
        server_parent == inb.span_id,
        "the server pod's parent {server_parent} is not node 2's span {inb:?}"
    );
    Ok(())
}

#[test]
fn a_request_across_two_nodes_is_traced() -> Result<()> {
    let _g = serial();
    let mut c = traced_cluster()?;
    // Declared after the cluster: dropped (stopped) before it is torn down.
    let rx = start_receiver(&c)?;
    label_pods(&c, &[(SERVER_POD, &[("svc", "traced")])])?;
    c.write_config_file("traced.yaml", SERVICE)?;
    let _http = HttpServer::start(&c, SERVER_POD, "traced", &[])?;
    let _echo = HttpServer::spawn(&c, SERVER_POD, &["serve", "--port", "7070"])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT_POD)?;
    wait_enrolled(&c, "node2", "mesh", SERVER_POD)?;
    wait_hbone_listener(&c, SERVER_POD)?;
    let mut last = None;
    let routed = wait_until(Duration::from_secs(20), || {
        let r = http_get(&c, CLIENT_POD, URL, "GET", "/", &[], 1)?;
        let ok = r.body("traced") == 1;
        last = Some(r);
        Ok(ok)
    })?;
    ensure!(
        routed,
        "the traced service was not routed within 20 s: {last:?}"
    );

    // Not sampled by the client: passed on unsampled, nothing exported.
    let unsampled_trace = random_hex(16)?;
    let tp = format!("00-{unsampled_trace}-{}-00", random_hex(8)?);
    let seen = request(&c, &[&format!("traceparent:{tp}")])?;
    let (t, _, flags) = parse_tp(&seen)?;
    ensure!(
        t == unsampled_trace && flags == "00",
        "an unsampled context must stay unsampled: sent {tp}, server got {seen}"
    );

    // The client's sampled context: node 1's span is its child, node 2's is node 1's child.
    let trace_id = random_hex(16)?;
    let client_span = random_hex(8)?;
    let tp = format!("00-{trace_id}-{client_span}-01");
    let seen = request(&c, &[&format!("traceparent:{tp}"), "tracestate:test=1"])?;
    let (t, server_parent, flags) = parse_tp(&seen)?;
    ensure!(
        t == trace_id && flags == "01" && server_parent != client_span,
        "server got {seen} for {tp}: not a proxy span of the client's trace"
    );
    let (out, inb) = rx.request_spans(&trace_id)?;
    ensure!(
        out.parent == client_span,
        "node 1's span is not a child of the client's span {client_span}: {out:?}"
    );
    check_request_spans(&out, &inb, &server_parent)?;
    // The request went through an HTTP/2 tunnel (the default `tunnelProtocol`).
    ensure!(
        out.attr("sidenode.hbone.transport") == "h2",
        "the outbound span does not name the tunnel's transport: {out:?}"
    );
    eprintln!(
        "trace {trace_id}: client {client_span} -> node1 outbound {} -> node2 inbound {} -> pod",
        out.span_id, inb.span_id
    );

    // No context: node 1 starts a trace, which node 2 and the pod continue.
    let seen = request(&c, &[])?;
    let (fresh, server_parent, flags) = parse_tp(&seen)?;
    ensure!(
        fresh != trace_id && fresh != unsampled_trace && flags == "01",
        "no new sampled trace: server got {seen}"
    );
    let (out, inb) = rx.request_spans(&fresh)?;
    ensure!(
        out.parent.is_empty(),
        "a new trace's first span has a parent: {out:?}"
    );
    check_request_spans(&out, &inb, &server_parent)?;

    // An L4 connection: `outbound.tcp` on node 1, its child `inbound.tunnel` on node 2.
    // Through HBONE: node 2's proxy connects to the pod from the client's address.
    let r = dial_one(&c, CLIENT_POD, &format!("{SERVER_IP}:7070"))?;
    ensure!(
        r.kept_client_address(),
        "the connection did not go through HBONE: {r:?}"
    );
    let (conn, tunnel) = rx.wait_for("outbound.tcp and inbound.tunnel spans", |all| {
        let conn = all.iter().find(|s| {
            s.node == "node1"
                && s.name == "outbound.tcp"
                && s.attr("server.address") == SERVER_IP
                && s.attr("server.port") == "7070"
        })?;
        let tunnel = all.iter().find(|s| {
            s.node == "node2" && s.name == "inbound.tunnel" && s.parent == conn.span_id
        })?;
        Some((conn.clone(), tunnel.clone()))
    })?;
    ensure!(
        conn.kind == KIND_CLIENT && tunnel.kind == KIND_SERVER,
        "{conn:?} {tunnel:?}"
    );
    ensure!(conn.trace_id == tunnel.trace_id, "{conn:?} {tunnel:?}");
    ensure!(
        conn.attr("sidenode.protocol") == "hbone"
            && conn.attr("sidenode.result") == "closed"
            && conn.attr("sidenode.hbone.transport") == "h2",
        "{conn:?}"
    );
    let sent: u64 = conn.attr("sidenode.bytes_sent").parse().unwrap_or(0);
    let received: u64 = conn.attr("sidenode.bytes_received").parse().unwrap_or(0);
    ensure!(sent > 0 && received > sent, "bytes not recorded: {conn:?}");
    ensure!(
        tunnel.attr("sidenode.hbone.status") == "200"
            && tunnel.attr("sidenode.source.principal")
                == "spiffe://cluster.local/ns/mesh/sa/sa-node1-pod1"
            && tunnel.attr("server.port") == "7070"
            && tunnel.attr("sidenode.result") == "closed"
            && tunnel.attr("sidenode.bytes_sent") == conn.attr("sidenode.bytes_sent")
            && tunnel.attr("sidenode.hbone.transport") == "h2",
        "{tunnel:?}"
    );

    // The positive marker: spans of the requests and the connection made after the unsampled
    // request have been received from both nodes (above), and each proxy exports its spans in
    // the order they end, so the unsampled request's spans, ended earlier, would be here too.
    ensure!(
        ["node1", "node2"].iter().all(|n| rx
            .store
            .spans()
            .iter()
            .any(|s| s.node == *n && s.trace_id == fresh)),
        "no span of the later trace {fresh} from both nodes"
    );
    let leaked: Vec<Got> = rx
        .store
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == unsampled_trace)
        .collect();
    if !leaked.is_empty() {
        bail!("spans of an unsampled trace were exported: {leaked:?}");
    }

    // SIGTERM: the proxy flushes what it has (a span ended just before).
    let before = rx.store.spans().len();
    dial_one(&c, CLIENT_POD, &format!("{SERVER_IP}:7070"))?;
    c.kill_process("node1", "proxy", libc::SIGTERM)?;
    let flushed = wait_until(Duration::from_secs(2), || {
        Ok(rx.store.spans()[before..]
            .iter()
            .any(|s| s.node == "node1" && s.name == "outbound.tcp"))
    })?;
    ensure!(
        flushed,
        "node 1's proxy did not flush its last span on SIGTERM"
    );
    Ok(())
}
