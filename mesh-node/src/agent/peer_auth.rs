//! The kernel's copy of the STRICT `PeerAuthentication` modes (`SN_STRICT`, enforced by
//! `sn_strict_in`): which of this node's pods and ports are STRICT, written to the map. The
//! resolution itself is `policy::peer_auth`, shared with the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_common::{MTLS_STRICT, StrictKey};
use tracing::{error, info};

use crate::kernel::maps::{NodeMaps, addr_to_ip, ip_to_addr};
use crate::model::{ObjKey, Snapshot};
use crate::policy::peer_auth::{Effective, Mode, policies_of_snapshot, policies_of_state, resolve};
use crate::state::NodeState;

/// The map entries of a resolved mode.
pub trait KernelEntries {
    /// `SN_STRICT` entries for one address: (addr, 0) → STRICT when the workload is STRICT, and
    /// the ports whose strictness differs from the workload's.
    fn kernel_entries(&self, ip: IpAddr) -> Vec<(StrictKey, u32)>;
}

impl KernelEntries for Effective {
    /// `SN_STRICT` entries for one address: (addr, 0) → STRICT when the workload is STRICT, and
    /// the ports whose strictness differs from the workload's.
    fn kernel_entries(&self, ip: IpAddr) -> Vec<(StrictKey, u32)> {
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
    use crate::model::istio::{MtlsMode, MtlsSetting, PeerAuthenticationSpec};
    use crate::policy::DEFAULT_ROOT_NAMESPACE as ROOT_NAMESPACE;
    use crate::policy::peer_auth::Policy;
    use mesh_common::{MTLS_DISABLE, MTLS_PERMISSIVE};

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
