//! `PeerAuthentication`: which mTLS mode applies to a workload's port. Used by the agent (the
//! kernel's copy of the STRICT ones, `agent::peer_auth`) and by the proxy (DISABLE: plaintext
//! instead of HBONE, in `proxy::outbound` and `proxy::http`).
//!
//! Resolution, as Istio does it, most specific first: a policy in the workload's namespace
//! whose selector matches its labels (workload level); a policy in its namespace without
//! selector (namespace level); a policy without selector in the root namespace
//! (`super::root_namespace`, mesh level); else PERMISSIVE. `UNSET` inherits from the next level
//! down. `portLevelMtls` (workload-level policies only; the port is the pod's port, not a
//! service port) overrides per port, and an `UNSET` port inherits the workload's resolved
//! mode. A selector with no labels counts as no selector (namespace level), as in Istio.
//!
//! When several policies match at one level, Istio takes the oldest. Nodes are not told
//! creation times, so sidenode takes the one whose name sorts first — deterministic on every
//! node; name policies accordingly (or avoid overlaps, which Istio warns about too).

use std::collections::BTreeMap;

use mesh_common::{MTLS_DISABLE, MTLS_PERMISSIVE, MTLS_STRICT};

use crate::model::istio::{IstioSpec, MtlsMode, MtlsSetting, PeerAuthenticationSpec};
use crate::model::{ObjKey, Snapshot};
use crate::proto;
use crate::state::NodeState;

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
        p.key.namespace == super::root_namespace() && selector(p).is_none()
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
