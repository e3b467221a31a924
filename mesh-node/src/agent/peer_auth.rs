//! `PeerAuthentication`: which mTLS mode applies to a workload's port, and the kernel's copy of
//! the STRICT ones (`SN_STRICT`, enforced by `sn_strict_in`).
//!
//! Resolution, as Istio does it, most specific first: a policy in the workload's namespace
//! whose selector matches its labels (workload level); a policy in its namespace without
//! selector (namespace level); a policy without selector in the root namespace
//! [`ROOT_NAMESPACE`] (mesh level); else PERMISSIVE. `UNSET` inherits from the next level
//! down. `portLevelMtls` (workload-level policies only; the port is the pod's port, not a
//! service port) overrides per port, and an `UNSET` port inherits the workload's resolved
//! mode. A selector with no labels counts as no selector (namespace level), as in Istio.
//!
//! When several policies match at one level, Istio takes the oldest. Nodes are not told
//! creation times, so sidenode takes the one whose name sorts first — deterministic on every
//! node; name policies accordingly (or avoid overlaps, which Istio warns about too).
//!
//! The proxy uses the same resolution for DISABLE (plaintext instead of HBONE, in
//! `proxy::outbound`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_common::{MTLS_DISABLE, MTLS_PERMISSIVE, MTLS_STRICT, StrictKey};
use tracing::{error, info};

use crate::kernel::maps::{NodeMaps, addr_to_ip, ip_to_addr};
use crate::model::istio::{IstioSpec, MtlsMode, MtlsSetting, PeerAuthenticationSpec};
use crate::model::{ObjKey, Snapshot};
use crate::proto;
use crate::state::NodeState;

/// Istio's root namespace: a policy without selector here applies to the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A resolved mode (never `UNSET`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Permissive,
    Strict,
    Disable,
}

impl Mode {
    /// The `SN_STRICT` value.
    pub fn map_value(self) -> u32 {
        match self {
            Mode::Permissive => MTLS_PERMISSIVE,
            Mode::Strict => MTLS_STRICT,
            Mode::Disable => MTLS_DISABLE,
        }
    }

    /// `mode`, or `parent` when unset.
    fn or(setting: Option<&MtlsSetting>, parent: Mode) -> Mode {
        match setting.map(|s| s.mode).unwrap_or_default() {
            MtlsMode::Unset => parent,
            MtlsMode::Disable => Mode::Disable,
            MtlsMode::Permissive => Mode::Permissive,
            MtlsMode::Strict => Mode::Strict,
        }
    }
}

/// A workload's modes: its own, and the ports that differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub mode: Mode,
    /// Pod port → mode, from `portLevelMtls` (only ports whose mode is set there).
    pub ports: BTreeMap<u16, Mode>,
}

impl Default for Effective {
    fn default() -> Self {
        Self {
            mode: Mode::Permissive,
            ports: BTreeMap::new(),
        }
    }
}

impl Effective {
    pub fn port(&self, port: u16) -> Mode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }

    /// `SN_STRICT` entries for one address: (addr, 0) → STRICT when the workload is STRICT, and
    /// the ports whose strictness differs from the workload's.
    pub fn kernel_entries(&self, ip: IpAddr) -> Vec<(StrictKey, u32)> {
        let key = |port| StrictKey {
            addr: ip_to_addr(ip),
            port,
            _pad: 0,
        };
        let strict = self.mode == Mode::Strict;
        let mut out = Vec::new();
        if strict {
            out.push((key(0), MTLS_STRICT));
        }
        for (port, mode) in &self.ports {
            if *port != 0 && (*mode == Mode::Strict) != strict {
                out.push((key(*port), mode.map_value()));
            }
        }
        out
    }
}

/// One `PeerAuthentication` object.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    pub key: &'a ObjKey,
    pub spec: &'a PeerAuthenticationSpec,
}

/// The policies in the controller's state.
pub fn policies_of_state(st: &NodeState) -> Vec<Policy<'_>> {
    st.configs
        .values()
        .filter_map(|o| match &o.spec {
            IstioSpec::PeerAuthentication(spec) => Some(Policy { key: &o.key, spec }),
            _ => None,
        })
        .collect()
}

/// The policies in a config-folder snapshot.
pub fn policies_of_snapshot(snap: &Snapshot) -> Vec<Policy<'_>> {
    snap.istio
        .values()
        .filter_map(|o| match &o.spec {
            IstioSpec::PeerAuthentication(spec) => Some(Policy { key: &o.key, spec }),
            _ => None,
        })
        .collect()
}

/// The selector's labels, `None` for a namespace- or mesh-wide policy.
fn selector<'a>(p: &Policy<'a>) -> Option<&'a crate::model::Labels> {
    p.spec
        .selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|l| !l.is_empty())
}

/// Of the policies matching `pred`, the one whose name sorts first.
fn first<'a>(policies: &[Policy<'a>], pred: impl Fn(&Policy<'a>) -> bool) -> Option<Policy<'a>> {
    policies
        .iter()
        .filter(|p| pred(p))
        .min_by(|a, b| a.key.name.cmp(&b.key.name))
        .copied()
}

/// The effective modes of a workload in `namespace` whose label `k` has value `v` when
/// `label(k) == Some(v)`.
pub fn resolve<'l>(
    policies: &[Policy<'_>],
    namespace: &str,
    label: impl Fn(&str) -> Option<&'l str>,
) -> Effective {
    let mesh = first(policies, |p| {
        p.key.namespace == ROOT_NAMESPACE && selector(p).is_none()
    });
    let ns = first(policies, |p| {
        p.key.namespace == namespace && selector(p).is_none()
    });
    let wl = first(policies, |p| {
        p.key.namespace == namespace
            && selector(p).is_some_and(|sel| {
                sel.iter()
                    .all(|(k, v)| label(k).is_some_and(|have| have == v))
            })
    });
    let mut mode = Mode::or(mesh.and_then(|p| p.spec.mtls.as_ref()), Mode::Permissive);
    mode = Mode::or(ns.and_then(|p| p.spec.mtls.as_ref()), mode);
    let mut ports = BTreeMap::new();
    if let Some(wl) = wl {
        mode = Mode::or(wl.spec.mtls.as_ref(), mode);
        for (port, setting) in &wl.spec.port_level_mtls {
            let Ok(port) = u16::try_from(*port) else {
                continue;
            };
            if setting.mode != MtlsMode::Unset {
                ports.insert(port, Mode::or(Some(setting), mode));
            }
        }
    }
    Effective { mode, ports }
}

/// The mode for `port` of a workload known to the controller.
pub fn mode_of(st: &NodeState, w: &proto::Workload, port: u16) -> Mode {
    let policies = policies_of_state(st);
    if policies.is_empty() {
        return Mode::Permissive;
    }
    resolve(&policies, &w.namespace, |k| {
        w.labels.get(k).map(String::as_str)
    })
    .port(port)
}

/// A meshed pod of this node, as peer authentication needs it.
pub struct Target {
    pub key: ObjKey,
    pub ips: Vec<IpAddr>,
    pub effective: Effective,
}

/// The meshed pods of `node` in the controller's state, with their modes.
pub fn targets_from_state(st: &NodeState, node: &str) -> Vec<Target> {
    let policies = policies_of_state(st);
    st.workloads
        .values()
        .filter(|w| w.node == node && w.meshed)
        .map(|w| Target {
            key: ObjKey {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            },
            ips: w.ips.iter().filter_map(|i| i.parse().ok()).collect(),
            effective: resolve(&policies, &w.namespace, |k| {
                w.labels.get(k).map(String::as_str)
            }),
        })
        .collect()
}

/// The meshed pods of `node` in a config-folder snapshot, with their modes.
pub fn targets_from_snapshot(snap: &Snapshot, node: &str) -> Vec<Target> {
    let policies = policies_of_snapshot(snap);
    snap.pods
        .values()
        .filter(|p| p.node.as_deref() == Some(node) && snap.is_meshed(p))
        .map(|p| {
            let mut ips: Vec<IpAddr> = vec![p.ip];
            ips.extend(p.ips.iter().copied().filter(|i| *i != p.ip));
            Target {
                key: p.key.clone(),
                ips,
                effective: resolve(&policies, &p.key.namespace, |k| {
                    p.labels.get(k).map(String::as_str)
                }),
            }
        })
        .collect()
}

/// Counts of one sync, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StrictOutcome {
    pub entries: usize,
    pub added: usize,
    pub removed: usize,
    pub errors: usize,
}

/// Brings `SN_STRICT` in line with `targets`: entries no longer wanted are removed, new or
/// changed ones written. A failed map write is logged and tried again at the next sync; what
/// the map held stays in force meanwhile.
pub fn sync_kernel(targets: &[Target], maps: &mut NodeMaps) -> StrictOutcome {
    let mut want: BTreeMap<([u32; 4], u16), (u32, &ObjKey)> = BTreeMap::new();
    for t in targets {
        for ip in &t.ips {
            for (k, v) in t.effective.kernel_entries(*ip) {
                want.insert((k.addr, k.port), (v, &t.key));
            }
        }
    }
    let mut out = StrictOutcome {
        entries: want.len(),
        ..StrictOutcome::default()
    };
    let current: Vec<(StrictKey, u32)> = maps.strict.iter().filter_map(Result::ok).collect();
    let have: BTreeSet<([u32; 4], u16)> = current.iter().map(|(k, _)| (k.addr, k.port)).collect();
    for (k, _) in &current {
        if !want.contains_key(&(k.addr, k.port)) {
            match maps.strict.remove(k) {
                Ok(()) => {
                    out.removed += 1;
                    info!(ip = %addr_to_ip(&k.addr), port = k.port, "peer authentication: kernel enforcement lifted");
                }
                Err(e) => {
                    out.errors += 1;
                    error!(ip = %addr_to_ip(&k.addr), port = k.port, error = %e, "removing an SN_STRICT entry");
                }
            }
        }
    }
    for ((addr, port), (value, pod)) in &want {
        let unchanged = have.contains(&(*addr, *port))
            && current
                .iter()
                .any(|(k, v)| k.addr == *addr && k.port == *port && v == value);
        if unchanged {
            continue;
        }
        let key = StrictKey {
            addr: *addr,
            port: *port,
            _pad: 0,
        };
        match maps.strict.insert(key, *value, 0) {
            Ok(()) => {
                out.added += 1;
                info!(%pod, ip = %addr_to_ip(addr), port = *port, mode = value, "peer authentication: kernel entry written (port 0 = whole workload; 2 = STRICT)");
            }
            Err(e) => {
                out.errors += 1;
                error!(%pod, ip = %addr_to_ip(addr), port = *port, error = %e, "writing an SN_STRICT entry");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;
    use crate::model::istio::WorkloadSelector;

    fn pa(
        ns: &str,
        name: &str,
        sel: Option<&[(&str, &str)]>,
        mode: MtlsMode,
    ) -> (ObjKey, PeerAuthenticationSpec) {
        (
            ObjKey {
                namespace: ns.into(),
                name: name.into(),
            },
            PeerAuthenticationSpec {
                selector: sel.map(|l| WorkloadSelector {
                    match_labels: l
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                }),
                mtls: Some(MtlsSetting { mode }),
                port_level_mtls: BTreeMap::new(),
            },
        )
    }

    fn eff(
        objs: &[(ObjKey, PeerAuthenticationSpec)],
        ns: &str,
        labels: &[(&str, &str)],
    ) -> Effective {
        let policies: Vec<Policy<'_>> = objs
            .iter()
            .map(|(key, spec)| Policy { key, spec })
            .collect();
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(&policies, ns, |k| labels.get(k).map(String::as_str))
    }

    #[test]
    fn default_is_permissive() {
        assert_eq!(eff(&[], "mesh", &[]), Effective::default());
    }

    #[test]
    fn levels_override_and_unset_inherits() {
        let mesh = pa(ROOT_NAMESPACE, "default", None, MtlsMode::Strict);
        let ns = pa("mesh", "ns", None, MtlsMode::Permissive);
        let wl = pa("mesh", "wl", Some(&[("app", "db")]), MtlsMode::Disable);
        // Mesh level only.
        assert_eq!(
            eff(std::slice::from_ref(&mesh), "mesh", &[]).mode,
            Mode::Strict
        );
        // Namespace over mesh.
        assert_eq!(
            eff(&[mesh.clone(), ns.clone()], "mesh", &[]).mode,
            Mode::Permissive
        );
        // Workload over namespace, only for matching labels.
        let all = [mesh.clone(), ns.clone(), wl.clone()];
        assert_eq!(eff(&all, "mesh", &[("app", "db")]).mode, Mode::Disable);
        assert_eq!(eff(&all, "mesh", &[("app", "web")]).mode, Mode::Permissive);
        // Another namespace sees only the mesh level.
        assert_eq!(eff(&all, "other", &[("app", "db")]).mode, Mode::Strict);
        // UNSET inherits: workload UNSET → namespace; namespace UNSET → mesh.
        let wl_unset = pa("mesh", "wl", Some(&[("app", "db")]), MtlsMode::Unset);
        let ns_unset = pa("mesh", "ns", None, MtlsMode::Unset);
        assert_eq!(
            eff(
                &[mesh.clone(), ns_unset, wl_unset],
                "mesh",
                &[("app", "db")]
            )
            .mode,
            Mode::Strict
        );
        // A policy with a selector in the root namespace is not mesh-wide.
        let root_sel = pa(ROOT_NAMESPACE, "a", Some(&[("app", "x")]), MtlsMode::Strict);
        assert_eq!(
            eff(&[root_sel], "mesh", &[("app", "x")]).mode,
            Mode::Permissive
        );
        // An empty selector is namespace-wide.
        let empty_sel = pa("mesh", "e", Some(&[]), MtlsMode::Strict);
        assert_eq!(eff(&[empty_sel], "mesh", &[]).mode, Mode::Strict);
    }

    #[test]
    fn same_level_first_name_wins() {
        let a = pa("mesh", "b-second", None, MtlsMode::Strict);
        let b = pa("mesh", "a-first", None, MtlsMode::Disable);
        assert_eq!(
            eff(&[a.clone(), b.clone()], "mesh", &[]).mode,
            Mode::Disable
        );
        assert_eq!(eff(&[b, a], "mesh", &[]).mode, Mode::Disable);
    }

    #[test]
    fn port_level_overrides_and_kernel_entries() {
        let mut wl = pa("mesh", "wl", Some(&[("app", "db")]), MtlsMode::Strict);
        wl.1.port_level_mtls.insert(
            8080,
            MtlsSetting {
                mode: MtlsMode::Permissive,
            },
        );
        wl.1.port_level_mtls.insert(
            9090,
            MtlsSetting {
                mode: MtlsMode::Unset,
            },
        );
        wl.1.port_level_mtls.insert(
            7070,
            MtlsSetting {
                mode: MtlsMode::Disable,
            },
        );
        let e = eff(&[wl.clone()], "mesh", &[("app", "db")]);
        assert_eq!(e.mode, Mode::Strict);
        assert_eq!(e.port(8080), Mode::Permissive);
        assert_eq!(e.port(9090), Mode::Strict);
        assert_eq!(e.port(7070), Mode::Disable);
        assert_eq!(e.port(1), Mode::Strict);
        let ip: IpAddr = "198.19.2.2".parse().expect("literal");
        let k: Vec<(u16, u32)> = e
            .kernel_entries(ip)
            .iter()
            .map(|(k, v)| (k.port, *v))
            .collect();
        assert_eq!(
            k,
            vec![
                (0, MTLS_STRICT),
                (7070, MTLS_DISABLE),
                (8080, MTLS_PERMISSIVE)
            ]
        );

        // A PERMISSIVE workload with one STRICT port: only that port is in the map.
        let mut wl = pa("mesh", "wl", Some(&[("app", "db")]), MtlsMode::Unset);
        wl.1.port_level_mtls.insert(
            8080,
            MtlsSetting {
                mode: MtlsMode::Strict,
            },
        );
        let e = eff(&[wl], "mesh", &[("app", "db")]);
        assert_eq!(e.mode, Mode::Permissive);
        let k: Vec<(u16, u32)> = e
            .kernel_entries(ip)
            .iter()
            .map(|(k, v)| (k.port, *v))
            .collect();
        assert_eq!(k, vec![(8080, MTLS_STRICT)]);
        assert_eq!(k.len(), 1);

        // Nothing strict: no entries.
        assert!(Effective::default().kernel_entries(ip).is_empty());
    }
}
