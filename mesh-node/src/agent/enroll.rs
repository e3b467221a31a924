//! Enrollment: which pods of this node are in the mesh, kept in step with the kernel's
//! `SN_ENROLLED` map (netns cookie → workload).
//!
//! A pod is enrolled when it runs on this node, its namespace carries
//! `sidenode.io/dataplane-mode: enabled`, it has not opted out with the same label set to
//! `none`, and it does not share the node's network (`hostNetwork`). In standalone mode its
//! network namespace comes from the `sidenode.io/netns` annotation.
//!
//! A pod whose namespace cannot be resolved keeps its previous enrollment (the last good
//! state stays in force) and the problem is reported.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use mesh_common::{
    NAME_LEN, NAMESPACE_LEN, SA_LEN, WORKLOAD_F_CAPTURE, Workload, fill_name, name_str,
};
use tracing::{error, info, warn};

use crate::kernel::maps::{NodeMaps, addr_to_ip, ip_to_addr};
use crate::kernel::netns::{netns_cookie, netns_id};
use crate::model::{NETNS_ANNOTATION, ObjKey, Snapshot};

/// A pod that should be (or stay) enrolled.
#[derive(Clone, Copy)]
struct Entry {
    cookie: u64,
    workload: Workload,
}

pub struct Enroller {
    node: String,
    /// netns file identity (dev, ino) → cookie: resolving a cookie costs a thread.
    cookies: HashMap<(u64, u64), u64>,
    /// What was enrolled in the last reconcile, by pod.
    last: BTreeMap<ObjKey, Entry>,
    /// Problems already reported (reported again only after they were gone).
    reported: Vec<String>,
}

/// Counts of one reconcile, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub enrolled: usize,
    pub added: usize,
    pub removed: usize,
    pub errors: usize,
}

/// A pod of this node that belongs in the mesh, from whichever source (config folder or
/// controller).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub key: ObjKey,
    pub ip: IpAddr,
    pub service_account: String,
    /// Path of the pod's network namespace.
    pub netns: Option<String>,
    /// Where the pod was defined, for error messages.
    pub origin: String,
}

impl Candidate {
    /// The meshed pods of `node` in a snapshot.
    pub fn from_snapshot(snap: &Snapshot, node: &str) -> Vec<Candidate> {
        snap.pods
            .values()
            .filter(|p| p.node.as_deref() == Some(node) && snap.is_meshed(p))
            .map(|p| Candidate {
                key: p.key.clone(),
                ip: p.ip,
                service_account: p.service_account.clone(),
                netns: p.annotations.get(NETNS_ANNOTATION).cloned(),
                origin: p.origin.to_string(),
            })
            .collect()
    }
}

fn workload_of(c: &Candidate) -> Workload {
    Workload {
        addr: ip_to_addr(c.ip),
        flags: WORKLOAD_F_CAPTURE,
        _pad: 0,
        name: fill_name::<NAME_LEN>(&c.key.name),
        namespace: fill_name::<NAMESPACE_LEN>(&c.key.namespace),
        service_account: fill_name::<SA_LEN>(&c.service_account),
    }
}

fn same(a: &Workload, b: &Workload) -> bool {
    a.addr == b.addr
        && a.flags == b.flags
        && a.name == b.name
        && a.namespace == b.namespace
        && a.service_account == b.service_account
}

impl Enroller {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            cookies: HashMap::new(),
            last: BTreeMap::new(),
            reported: Vec::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn cookie(&mut self, path: &Path) -> Result<u64, crate::kernel::KernelError> {
        let id = netns_id(path)?;
        if let Some(c) = self.cookies.get(&id) {
            return Ok(*c);
        }
        let c = netns_cookie(path)?;
        self.cookies.insert(id, c);
        Ok(c)
    }

    /// The enrollment the snapshot asks for, and the problems found on the way.
    fn desired(&mut self, candidates: &[Candidate]) -> (BTreeMap<ObjKey, Entry>, Vec<String>) {
        let mut want = BTreeMap::new();
        let mut problems = Vec::new();
        for pod in candidates {
            let resolved = match &pod.netns {
                None => Err(format!(
                    "{}: Pod {}: metadata.annotations.{NETNS_ANNOTATION}: missing (standalone mode needs the pod's network namespace path)",
                    pod.origin, pod.key
                )),
                Some(path) => self.cookie(Path::new(path)).map_err(|e| {
                    format!(
                        "{}: Pod {}: metadata.annotations.{NETNS_ANNOTATION}: {e}",
                        pod.origin, pod.key
                    )
                }),
            };
            match resolved {
                Ok(cookie) => {
                    want.insert(
                        pod.key.clone(),
                        Entry {
                            cookie,
                            workload: workload_of(pod),
                        },
                    );
                }
                Err(problem) => {
                    problems.push(problem);
                    // Keep what was in force for this pod.
                    if let Some(prev) = self.last.get(&pod.key) {
                        want.insert(pod.key.clone(), *prev);
                    }
                }
            }
        }
        (want, problems)
    }

    /// Brings the kernel map in line with the snapshot.
    pub fn reconcile(&mut self, candidates: &[Candidate], maps: &mut NodeMaps) -> Outcome {
        let (want, problems) = self.desired(candidates);
        let mut out = Outcome {
            errors: problems.len(),
            ..Outcome::default()
        };
        for p in &problems {
            if !self.reported.contains(p) {
                error!("config error: {p}; keeping the last good state");
            }
        }
        self.reported = problems;

        let mut by_cookie: HashMap<u64, (&ObjKey, &Entry)> = HashMap::new();
        for (key, e) in &want {
            if let Some((other, _)) = by_cookie.insert(e.cookie, (key, e)) {
                warn!(pod = %key, other = %other, cookie = e.cookie, "two pods name the same network namespace; the later one wins");
            }
        }
        // Remove what is no longer wanted.
        let current: Vec<(u64, Workload)> = maps.enrolled.iter().filter_map(Result::ok).collect();
        for (cookie, wl) in &current {
            if !by_cookie.contains_key(cookie) {
                match maps.enrolled.remove(cookie) {
                    Ok(()) => {
                        out.removed += 1;
                        info!(
                            pod = %format!("{}/{}", name_str(&wl.namespace), name_str(&wl.name)),
                            cookie, "un-enrolled"
                        );
                    }
                    Err(e) => {
                        error!(cookie, error = %e, "removing an enrollment from the kernel map")
                    }
                }
            }
        }
        // Add or update what is wanted.
        for (cookie, (key, e)) in &by_cookie {
            let existing = current.iter().find(|(c, _)| c == cookie).map(|(_, w)| w);
            if existing.is_some_and(|w| same(w, &e.workload)) {
                continue;
            }
            match maps.enrolled.insert(cookie, e.workload, 0) {
                Ok(()) => {
                    out.added += 1;
                    info!(pod = %key, cookie, ip = %addr_to_ip(&e.workload.addr), "enrolled");
                }
                Err(err) => {
                    out.errors += 1;
                    error!(pod = %key, error = %err, "writing an enrollment to the kernel map");
                }
            }
        }
        out.enrolled = by_cookie.len();
        self.last = want;
        out
    }
}
