//! The table (path × measure, medians of the rounds, with what each path adds to its
//! baseline), the memory table, the targets of issue 12, and `target/bench/latest.json`.

use super::lossy::Lossy;
use super::measure::Sample;
use super::util::{Mem, median};
use super::{Params, Route};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

pub type Round = BTreeMap<Route, Sample>;

// Targets of issue 12 (this 2-vCPU VM, medians of ≥ 3 rounds).
const TARGET_XNODE_TP_OF_DIRECT: f64 = 0.60;
const TARGET_XNODE_TP_OVER_ENVOY: f64 = 1.3;
const TARGET_CPU_S_PER_GB: f64 = 1.2;
const TARGET_RR_ADDED_P50_US: f64 = 35.0;
const TARGET_CONN_ADDED_P50_US: f64 = 250.0;
const TARGET_LOCAL_TP_OF_DIRECT: f64 = 0.80;
const TARGET_RSS_MB: f64 = 20.0;
// Targets of issue 16 (HBONE over QUIC).
const TARGET_LOSSY_P99_QUIC_OF_H2: f64 = 0.5;
const TARGET_QUIC_TP_OF_H2: f64 = 0.8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Throughput: "% of the baseline".
    Ratio,
    /// Latency: "+added vs the baseline".
    Added,
    /// Only the value.
    Plain,
}

struct Measure {
    key: &'static str,
    label: String,
    kind: Kind,
    get: fn(&Sample) -> f64,
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn measures(p: &Params) -> Vec<Measure> {
    let b = p.rr_size;
    vec![
        Measure {
            key: "throughput_gbps",
            label: format!("throughput, 1 stream ({} s), Gbit/s", p.iperf_secs),
            kind: Kind::Ratio,
            get: |s| s.throughput_bps / 1e9,
        },
        Measure {
            key: "proxy_cpu_s_per_gb",
            label: "proxy CPU-seconds per GB moved".into(),
            kind: Kind::Plain,
            get: |s| s.cpu_s_per_gb().unwrap_or(f64::NAN),
        },
        Measure {
            key: "rr_pinned_p50_us",
            label: format!("{b} B RR p50, all pinned, µs"),
            kind: Kind::Added,
            get: |s| num(&s.rr_pinned, "p50_us"),
        },
        Measure {
            key: "rr_pinned_p99_us",
            label: format!("{b} B RR p99, all pinned, µs"),
            kind: Kind::Added,
            get: |s| num(&s.rr_pinned, "p99_us"),
        },
        Measure {
            key: "rr_unpinned_p50_us",
            label: format!("{b} B RR p50, unpinned (*), µs"),
            kind: Kind::Added,
            get: |s| num(&s.rr_unpinned, "p50_us"),
        },
        Measure {
            key: "rr_unpinned_p99_us",
            label: format!("{b} B RR p99, unpinned (*), µs"),
            kind: Kind::Added,
            get: |s| num(&s.rr_unpinned, "p99_us"),
        },
        Measure {
            key: "connlat_pinned_p50_us",
            label: format!("connect + {b} B echo + close p50, pinned, µs"),
            kind: Kind::Added,
            get: |s| num(&s.connlat, "p50_us"),
        },
        Measure {
            key: "connlat_pinned_p99_us",
            label: format!("connect + {b} B echo + close p99, pinned, µs"),
            kind: Kind::Added,
            get: |s| num(&s.connlat, "p99_us"),
        },
        Measure {
            key: "connlat_cold_pinned_p50_us",
            label: "same, pool cold (new tunnel) p50, pinned, µs".into(),
            kind: Kind::Added,
            get: |s| num(&s.connlat_cold, "p50_us"),
        },
        Measure {
            key: "connlat_cold_pinned_p99_us",
            label: "same, pool cold (new tunnel) p99, pinned, µs".into(),
            kind: Kind::Added,
            get: |s| num(&s.connlat_cold, "p99_us"),
        },
    ]
}

pub struct Report {
    pub text: String,
    pub medians: Value,
    pub vs_baseline: Value,
    pub targets: Value,
    /// HTTP/2 vs QUIC on the clean link, and the targets of issue 16.
    pub quic: Value,
}

fn fmt_val(v: f64, kind: Kind) -> String {
    if v.is_nan() {
        "-".into()
    } else if kind == Kind::Added && v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if kind == Kind::Added {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let w: Vec<usize> = (0..cols).map(width).collect();
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(" | ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header);
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 3 * (cols - 1)));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

impl Report {
    pub fn new(
        p: &Params,
        rounds: &[Round],
        idle: &BTreeMap<String, Mem>,
        after: &BTreeMap<String, Mem>,
        settled: &BTreeMap<String, Mem>,
        lossy: &Lossy,
    ) -> Report {
        let routes = p.routes();
        let ms = measures(p);
        let med = |r: Route, f: fn(&Sample) -> f64| -> f64 {
            let v: Vec<f64> = rounds.iter().filter_map(|x| x.get(&r)).map(f).collect();
            median(&v)
        };
        let mut medians = Map::new();
        let mut vs = Map::new();
        for r in routes.iter().copied() {
            let mut m = Map::new();
            for x in &ms {
                m.insert(x.key.into(), json!(nan_null(med(r, x.get))));
            }
            medians.insert(r.name().into(), Value::Object(m));
            if let Some(b) = r.baseline() {
                let mut d = Map::new();
                d.insert("baseline".into(), json!(b.name()));
                for x in &ms {
                    let (v, bv) = (med(r, x.get), med(b, x.get));
                    match x.kind {
                        Kind::Ratio => {
                            d.insert(
                                format!("{}_pct_of_baseline", x.key),
                                json!(nan_null(v / bv * 100.0)),
                            );
                        }
                        Kind::Added => {
                            d.insert(format!("{}_added", x.key), json!(nan_null(v - bv)));
                        }
                        Kind::Plain => {}
                    }
                }
                vs.insert(r.name().into(), Value::Object(d));
            }
        }

        // The path × measure table.
        let mut header = vec!["measure (medians)".to_string()];
        header.extend(routes.iter().map(|r| r.name().to_string()));
        let mut rows = Vec::new();
        for x in &ms {
            let mut row = vec![x.label.clone()];
            for r in routes.iter().copied() {
                let v = med(r, x.get);
                let cell = match (x.kind, r.baseline()) {
                    (Kind::Ratio, Some(b)) if !v.is_nan() => {
                        format!(
                            "{} ({:.0} %)",
                            fmt_val(v, x.kind),
                            v / med(b, x.get) * 100.0
                        )
                    }
                    (Kind::Added, Some(b)) if !v.is_nan() => {
                        let d = v - med(b, x.get);
                        let d = if d.abs() >= 100.0 {
                            format!("{d:+.0}")
                        } else {
                            format!("{d:+.1}")
                        };
                        format!("{} ({d})", fmt_val(v, x.kind))
                    }
                    _ => fmt_val(v, x.kind),
                };
                row.push(cell);
            }
            rows.push(row);
        }
        let mut text = String::new();
        text.push_str(&format!(
            "\n{} round(s); mesh, mesh-quic and envoy are compared with direct, mesh-local with \
             direct-local (same node): (+x) = added µs, (x %) = % of the baseline's throughput.\n\n",
            rounds.len()
        ));
        text.push_str(&table(&header, &rows));
        text.push_str(
            "(*) unpinned: on this VM an idle vCPU halts and a cross-CPU wake-up costs ~30 µs, so \
             the unpinned figure mostly counts wake-ups; the pinned rows (client, server and every \
             proxy/Envoy of the path on one CPU) show what the path itself costs.\n",
        );
        text.push_str(&format!(
            "New connections: {} per round in batches of {}, an ordinary close (FIN); TIME_WAIT \
             emptied (ss -K, else waited out) in every namespace of the path before each batch.\n\
             Pool cold: node1's tunnel pool forgotten (admin POST /pool/forget) before each of {} \
             new connections, so each dials a new tunnel.\n\
             CPU per GB: utime+stime of the path's proxies (mesh: both node proxies; mesh-local: \
             node1's; envoy: both Envoys) over the iperf3 run, divided by the bytes received.\n",
            p.conn_count, p.conn_batch, p.cold_count
        ));

        // Memory.
        let mut mrows = Vec::new();
        for (name, m) in after {
            let i = idle.get(name);
            let st = settled.get(name);
            mrows.push(vec![
                name.clone(),
                i.map_or("-".into(), |m| format!("{:.1}", m.rss_mb())),
                format!("{:.1}", m.rss_mb()),
                st.map_or("-".into(), |m| format!("{:.1}", m.rss_mb())),
                st.map_or("-".into(), |m| format!("{:.1}", m.anon_mb())),
                format!("{:.1}", m.hwm_mb()),
            ]);
        }
        text.push_str(&format!(
            "\n{}",
            table(
                &[
                    "process RSS, MB (10^6 B)".into(),
                    "idle".into(),
                    "after load".into(),
                    "+12 s".into(),
                    "+12 s anonymous".into(),
                    "peak".into()
                ],
                &mrows
            )
        ));

        // Targets of issue 12.
        let g = |r: Route, key: &str| -> f64 {
            ms.iter()
                .find(|x| x.key == key)
                .map_or(f64::NAN, |x| med(r, x.get))
        };
        let tp = "throughput_gbps";
        let xnode_pct = g(Route::Mesh, tp) / g(Route::Direct, tp);
        let over_envoy = g(Route::Mesh, tp) / g(Route::Envoy, tp);
        let cpu = g(Route::Mesh, "proxy_cpu_s_per_gb");
        let rr_added = g(Route::Mesh, "rr_pinned_p50_us") - g(Route::Direct, "rr_pinned_p50_us");
        let conn_added =
            g(Route::Mesh, "connlat_pinned_p50_us") - g(Route::Direct, "connlat_pinned_p50_us");
        let local_pct = g(Route::MeshLocal, tp) / g(Route::DirectLocal, tp);
        /// The node processes the target is on: agents and proxies.
        fn node_procs(m: &BTreeMap<String, Mem>) -> Vec<(&String, &Mem)> {
            m.iter()
                .filter(|(n, _)| n.ends_with("-proxy") || n.ends_with("-agent"))
                .collect()
        }
        let rss = node_procs(after);
        let rss_max = rss.iter().map(|(_, m)| m.rss_mb()).fold(f64::NAN, f64::max);
        let rss_worst = rss
            .iter()
            .max_by(|a, b| a.1.rss_kb.cmp(&b.1.rss_kb))
            .map_or("-".to_string(), |(n, m)| {
                format!("{:.1} MB ({n})", m.rss_mb())
            });
        // 12 s later (the heap trimmed) and the peak (VmHWM) are shown beside it; the target is
        // judged on the RSS right after.
        let settled_worst = node_procs(settled)
            .into_iter()
            .max_by(|a, b| a.1.rss_kb.cmp(&b.1.rss_kb))
            .map_or("-".to_string(), |(n, m)| {
                format!("{:.1} MB ({n}, {:.1} anonymous)", m.rss_mb(), m.anon_mb())
            });
        let hwm_worst = rss
            .iter()
            .max_by(|a, b| a.1.hwm_kb.cmp(&b.1.hwm_kb))
            .map_or("-".to_string(), |(n, m)| {
                format!("{:.1} MB ({n})", m.hwm_mb())
            });
        let t = |target: String, measured: String, key: &str, value: f64, met: bool| {
            (
                target,
                measured,
                json!({"target": key, "value": nan_null(value), "met": !value.is_nan() && met}),
            )
        };
        let targets = [
            t(
                format!(
                    "cross-node throughput ≥ {:.0} % of direct",
                    TARGET_XNODE_TP_OF_DIRECT * 100.0
                ),
                format!("{:.0} %", xnode_pct * 100.0),
                "mesh_throughput_of_direct",
                xnode_pct,
                xnode_pct >= TARGET_XNODE_TP_OF_DIRECT,
            ),
            t(
                format!("cross-node throughput ≥ {TARGET_XNODE_TP_OVER_ENVOY} × the Envoy pair"),
                format!("{over_envoy:.2} ×"),
                "mesh_throughput_over_envoy",
                over_envoy,
                over_envoy >= TARGET_XNODE_TP_OVER_ENVOY,
            ),
            t(
                format!("proxy CPU-seconds per GB moved (both proxies) ≤ {TARGET_CPU_S_PER_GB}"),
                format!("{cpu:.2}"),
                "mesh_proxy_cpu_s_per_gb",
                cpu,
                cpu <= TARGET_CPU_S_PER_GB,
            ),
            t(
                format!(
                    "cross-node {} B RR, all pinned, added p50 ≤ +{TARGET_RR_ADDED_P50_US:.0} µs",
                    p.rr_size
                ),
                format!("{rr_added:+.1} µs"),
                "mesh_rr_pinned_p50_added_us",
                rr_added,
                rr_added <= TARGET_RR_ADDED_P50_US,
            ),
            t(
                format!(
                    "cross-node new connection + first reply, added p50 ≤ +{TARGET_CONN_ADDED_P50_US:.0} µs"
                ),
                format!("{conn_added:+.1} µs"),
                "mesh_connlat_pinned_p50_added_us",
                conn_added,
                conn_added <= TARGET_CONN_ADDED_P50_US,
            ),
            t(
                format!(
                    "same-node (mesh-local) throughput ≥ {:.0} % of same-node direct",
                    TARGET_LOCAL_TP_OF_DIRECT * 100.0
                ),
                format!("{:.0} %", local_pct * 100.0),
                "mesh_local_throughput_of_direct_local",
                local_pct,
                local_pct >= TARGET_LOCAL_TP_OF_DIRECT,
            ),
            t(
                format!("proxy and agent RSS after the load ≤ {TARGET_RSS_MB:.0} MB each"),
                format!("max {rss_worst}; +12 s {settled_worst}; peak {hwm_worst}"),
                "node_rss_after_load_max_mb",
                rss_max,
                rss_max <= TARGET_RSS_MB,
            ),
        ];
        let trows = |targets: &[(String, String, Value)]| -> Vec<Vec<String>> {
            targets
                .iter()
                .map(|(target, measured, j)| {
                    vec![
                        target.clone(),
                        measured.clone(),
                        if j.get("met") == Some(&Value::Bool(true)) {
                            "met".into()
                        } else {
                            "missed".into()
                        },
                    ]
                })
                .collect()
        };
        let theader = ["target".into(), "measured".into(), "met/missed".into()];
        // Issue 12's targets need every path (not with --quic-only).
        let targets = if p.quic_only {
            Vec::new()
        } else {
            text.push_str(&format!(
                "\ntargets (issue 12)\n{}",
                table(&theader, &trows(&targets))
            ));
            targets.to_vec()
        };

        // HTTP/2 vs QUIC, clean link then lossy, and issue 16's targets.
        let (m, q) = (Route::Mesh, Route::MeshQuic);
        let mut qrows = Vec::new();
        let mut qjson = Map::new();
        for key in [
            "throughput_gbps",
            "proxy_cpu_s_per_gb",
            "rr_pinned_p50_us",
            "rr_unpinned_p50_us",
            "connlat_pinned_p50_us",
            "connlat_cold_pinned_p50_us",
            "connlat_cold_pinned_p99_us",
        ] {
            let Some(x) = ms.iter().find(|x| x.key == key) else {
                continue;
            };
            let (h, k) = (med(m, x.get), med(q, x.get));
            qrows.push(vec![
                x.label.clone(),
                fmt_val(h, x.kind),
                fmt_val(k, x.kind),
                format!("{:.2}", k / h),
            ]);
            qjson.insert(
                key.into(),
                json!({"h2": nan_null(h), "quic": nan_null(k), "quic_over_h2": nan_null(k / h)}),
            );
        }
        text.push_str(&format!(
            "\nHBONE over HTTP/2 (mesh) vs over QUIC (mesh-quic), clean link (medians)\n{}",
            table(
                &[
                    "measure".into(),
                    "h2".into(),
                    "quic".into(),
                    "quic / h2".into()
                ],
                &qrows
            )
        ));
        let lh = lossy.medians.get("h2").copied().unwrap_or([f64::NAN; 4]);
        let lq = lossy.medians.get("quic").copied().unwrap_or([f64::NAN; 4]);
        let lrows: Vec<Vec<String>> = [
            ("64 B RR p50, median of the connections, µs", 0),
            ("64 B RR p90, median of the connections, µs", 1),
            ("64 B RR p99, median of the connections, µs", 2),
            ("64 B RR p99, worst connection, µs", 3),
        ]
        .iter()
        .map(|(label, i)| {
            vec![
                label.to_string(),
                format!("{:.0}", lh[*i]),
                format!("{:.0}", lq[*i]),
                format!("{:.2}", lq[*i] / lh[*i]),
            ]
        })
        .collect();
        text.push_str(&format!(
            "\nlossy link ({} on both nodes' eth0 egress: iptables statistic DROP + NFQUEUE delayer), {} connections at once over one tunnel, {} round trips each (medians of the rounds)\n{}",
            super::lossy::NETEM.join(" "),
            p.lossy_conns,
            p.lossy_count,
            table(
                &[
                    "measure".into(),
                    "h2".into(),
                    "quic".into(),
                    "quic / h2".into()
                ],
                &lrows
            )
        ));
        let tp_ratio = g(q, tp) / g(m, tp);
        let cold = "connlat_cold_pinned_p50_us";
        let (cold_h2, cold_quic) = (g(m, cold), g(q, cold));
        let p99_ratio = lq[2] / lh[2];
        let qtargets = [
            t(
                format!(
                    "lossy link: quic 64 B RR p99 ≤ {TARGET_LOSSY_P99_QUIC_OF_H2} × h2's (median of the connections)"
                ),
                format!("{:.0} vs {:.0} µs ({p99_ratio:.2} ×)", lq[2], lh[2]),
                "lossy_p99_quic_over_h2",
                p99_ratio,
                p99_ratio <= TARGET_LOSSY_P99_QUIC_OF_H2,
            ),
            t(
                format!(
                    "clean link: quic throughput ≥ {:.0} % of h2's",
                    TARGET_QUIC_TP_OF_H2 * 100.0
                ),
                format!(
                    "{:.2} vs {:.2} Gbit/s ({:.0} %)",
                    g(q, tp),
                    g(m, tp),
                    tp_ratio * 100.0
                ),
                "quic_throughput_of_h2",
                tp_ratio,
                tp_ratio >= TARGET_QUIC_TP_OF_H2,
            ),
            t(
                "clean link: new connection with a cold pool, quic p50 < h2's".into(),
                format!("{cold_quic:.0} vs {cold_h2:.0} µs"),
                "connlat_cold_p50_quic_minus_h2_us",
                cold_quic - cold_h2,
                cold_quic < cold_h2,
            ),
        ];
        text.push_str(&format!(
            "\ntargets (issue 16, QUIC)\n{}",
            table(&theader, &trows(&qtargets))
        ));
        let quic = json!({
            "clean": qjson,
            "targets": qtargets.into_iter().map(|(_, _, j)| j).collect::<Vec<_>>(),
        });
        Report {
            text,
            medians: Value::Object(medians),
            vs_baseline: Value::Object(vs),
            targets: Value::Array(targets.into_iter().map(|(_, _, j)| j).collect()),
            quic,
        }
    }
}

/// NaN (a path without that figure) as JSON null.
fn nan_null(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns() {
        let t = table(
            &["a".into(), "bb".into()],
            &[vec!["long name".into(), "1".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a         | bb");
        assert_eq!(lines[2], "long name |  1");
    }
}
