//! End-to-end test of a same-node HTTP service: requests from a meshed pod to a meshed pod on
//! the same node skip the tunnel, yet the destination's per-request `AuthorizationPolicy`
//! (methods, paths) and its destination-reported metrics still apply. (The TCP side of
//! same-node connections is in `splice.rs`.) Mesh mode, file config. Run as root:
//! `cargo test -p sidenode-tests --test same_node`.

mod common;

use anyhow::{Result, ensure};
use common::*;
use std::time::Duration;

const CLIENT: &str = "node1-pod1";
/// Meshed HTTP server on node 1 (port 9080), behind the Service `web-local` (port 80).
const WEB_POD: &str = "node1-pod2";
const WEB_VIP_URL: &str = "http://198.18.128.21:80";

const WEB: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web-local
  namespace: mesh
spec:
  clusterIP: 198.18.128.21
  selector:
    svc: web-local
  ports:
  - name: http
    port: 80
    targetPort: 9080
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: public-get
  namespace: mesh
spec:
  selector:
    matchLabels:
      svc: web-local
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/public*"]
"#;

#[test]
fn same_node_http_meets_the_destination_l7_policy_without_a_tunnel() -> Result<()> {
    let _g = serial();
    let c = mesh_cluster(3, None)?;
    label_pods(&c, &[(WEB_POD, &[("svc", "web-local")])])?;
    let _web = HttpServer::start(&c, WEB_POD, "web-local", &[])?;
    wait_enrolled(&c, "node1", "mesh", CLIENT)?;
    wait_enrolled(&c, "node1", "mesh", WEB_POD)?;
    c.write_config_file("web.yaml", WEB)?;

    // Once the Service and the policy are in force: POST is refused per request, GET served.
    let mut last = None;
    let denied = wait_until(Duration::from_secs(10), || {
        let r = http_get(&c, CLIENT, WEB_VIP_URL, "POST", "/public/x", &[], 3)?;
        let done = r.status("403") == 3;
        last = Some(r);
        Ok(done)
    })?;
    ensure!(denied, "POST /public/x never answered 403: {last:?}");
    let r = http_get(&c, CLIENT, WEB_VIP_URL, "GET", "/public/x", &[], 3)?;
    ensure!(
        r.status("200") == 3 && r.body("web-local") == 3,
        "GET /public/x: {r:?}"
    );

    let m = proxy_metrics(&c, "node1")?;
    // The destination's side reported the requests, as it does behind an HBONE listener.
    for code in ["200", "403"] {
        let n = metric_value(
            &m,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", WEB_POD),
                ("response_code", code),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
        ensure!(n >= 3.0, "{n} destination-reported {code} answers, 3 sent");
    }
    // No tunnel was opened for it.
    let tunnels = metric_value(&m, "sidenode_hbone_pool_connections", &[]);
    ensure!(
        tunnels == 0.0,
        "node1 opened {tunnels} HBONE connections for a same-node service"
    );
    Ok(())
}
