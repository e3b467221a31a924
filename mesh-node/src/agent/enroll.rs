//! Enrollment: which pods of this node are in the mesh, kept in step with the kernel's
//! `SN_ENROLLED` map (netns cookie → workload).
//!
//! A pod is enrolled when it runs on this node, its namespace carries
//! `sidenode.io/dataplane-mode: enabled`, it has not opted out with the same label set to
//! `none`, and it does not share the node's network (`hostNetwork`). Its network namespace
//! comes from the `sidenode.io/netns` annotation when there is one (standalone mode), else
//! from its UID through its cgroup (`kernel::podns`).
//!
//! A pod whose namespace cannot be resolved keeps its previous enrollment (the last good
//! state stays in force) and the problem is reported; `unresolved` tells the caller to try
//! again soon (a pod whose processes are not up yet gets enrolled without any state change).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use mesh_common::{
    NAME_LEN, NAMESPACE_LEN, SA_LEN, WORKLOAD_F_CAPTURE, Workload, fill_name, name_str,
};
use tracing::{error, info, warn};

use crate::kernel::maps::{NodeMaps, addr_to_ip, ip_to_addr};
use crate::kernel::netns::{netns_cookie, netns_id};
use crate::kernel::podns::PodNetnsFinder;
use crate::model::{NETNS_ANNOTATION, ObjKey, Snapshot};

/// A pod that should be (or stay) enrolled.
#[derive(Clone, Copy)]
struct Entry {
    cookie: u64,
    workload: Workload,
}

pub struct Enroller {
    node: String,
    /// netns file identity (dev, ino) → cookie: resolving a cookie costs a thread. Only the
    /// namespaces of the last reconcile are kept (a dead namespace's inode can be reused).
    cookies: HashMap<(u64, u64), u64>,
    /// Finds a pod's namespace from its UID (absent: only the annotation works).
    pods: Option<PodNetnsFinder>,
    /// What was enrolled in the last reconcile, by pod.
    last: BTreeMap<ObjKey, Entry>,
    /// Problems already reported (reported again only after they were gone).
    reported: Vec<String>,
    /// Network namespaces handed over by the CNI plugin (`agent::cni`), by pod: used before
    /// the pod-UID search, so a pod enrolled at `ADD` keeps the same cookie in every reconcile.
    cni_netns: HashMap<ObjKey, String>,
    /// When each CNI enrollment was made: until `CNI_GRACE` has passed, it is kept even if the
    /// state does not list the pod yet (on Kubernetes, the state has a pod only once the
    /// kubelet reported its address, after the CNI `ADD`).
    cni_since: HashMap<ObjKey, std::time::Instant>,
}

/// How long a CNI enrollment of a pod the state does not list yet is kept.
pub const CNI_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// Path of the pod's network namespace (the `sidenode.io/netns` annotation).
    pub netns: Option<String>,
    /// Kubernetes `metadata.uid`: finds the namespace through the pod's cgroup.
    pub pod_uid: Option<String>,
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
                pod_uid: p.uid.clone(),
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
            pods: None,
            last: BTreeMap::new(),
            reported: Vec::new(),
            cni_netns: HashMap::new(),
            cni_since: HashMap::new(),
        }
    }

    /// Also finds pods' namespaces from their UID, searching the cgroup tree below `finder`'s
    /// root.
    pub fn with_pod_cgroups(mut self, finder: PodNetnsFinder) -> Self {
        self.pods = Some(finder);
        self
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// How many candidates of the last reconcile could not be resolved.
    pub fn unresolved(&self) -> usize {
        self.reported.len()
    }

    /// The pods enrolled after the last reconcile.
    pub fn enrolled(&self) -> impl Iterator<Item = &ObjKey> {
        self.last.keys()
    }

    fn cookie(
        &mut self,
        path: &Path,
        used: &mut HashMap<(u64, u64), u64>,
    ) -> Result<u64, crate::kernel::KernelError> {
        let id = netns_id(path)?;
        let c = match self.cookies.get(&id) {
            Some(c) => *c,
            None => netns_cookie(path)?,
        };
        used.insert(id, c);
        Ok(c)
    }

    /// The cookie of `pod`'s network namespace: from the annotation, else from its UID.
    fn resolve(
        &mut self,
        pod: &Candidate,
        used: &mut HashMap<(u64, u64), u64>,
    ) -> Result<u64, String> {
        if let Some(path) = &pod.netns {
            return self.cookie(Path::new(path), used).map_err(|e| {
                format!(
                    "{}: Pod {}: metadata.annotations.{NETNS_ANNOTATION}: {e}",
                    pod.origin, pod.key
                )
            });
        }
        if let Some(path) = self.cni_netns.get(&pod.key).cloned() {
            match self.cookie(Path::new(&path), used) {
                Ok(c) => return Ok(c),
                // Gone without a DEL (the runtime crashed): forget it, search by UID.
                Err(e) => {
                    warn!(pod = %pod.key, netns = %path, error = %e, "CNI network namespace gone");
                    self.cni_netns.remove(&pod.key);
                }
            }
        }
        let Some(uid) = &pod.pod_uid else {
            return Err(format!(
                "{}: Pod {}: no {NETNS_ANNOTATION} annotation and no metadata.uid: cannot find its network namespace",
                pod.origin, pod.key
            ));
        };
        let Some(finder) = self.pods.as_mut() else {
            return Err(format!(
                "{}: Pod {}: no {NETNS_ANNOTATION} annotation, and finding namespaces by pod uid is off",
                pod.origin, pod.key
            ));
        };
        let found = finder
            .find(uid)
            .map_err(|e| format!("{}: Pod {}: {e}", pod.origin, pod.key))?;
        self.cookie(&found.path, used).map_err(|e| {
            format!(
                "{}: Pod {} (uid {uid}, cgroup {}): {e}",
                pod.origin,
                pod.key,
                found.cgroup.display()
            )
        })
    }

    /// The enrollment the snapshot asks for, and the problems found on the way.
    fn desired(&mut self, candidates: &[Candidate]) -> (BTreeMap<ObjKey, Entry>, Vec<String>) {
        let mut want = BTreeMap::new();
        let mut problems = Vec::new();
        let mut used = HashMap::new();
        for pod in candidates {
            let resolved = self.resolve(pod, &mut used);
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
        // CNI enrollments of pods the state does not list yet stay for a while.
        self.cni_since.retain(|_, t| t.elapsed() < CNI_GRACE);
        for key in self.cni_since.keys() {
            if !want.contains_key(key)
                && let Some(prev) = self.last.get(key)
            {
                want.insert(key.clone(), *prev);
            }
        }
        // Keep only the cookies of namespaces in use: a dead namespace's inode can come back.
        self.cookies = used;
        (want, problems)
    }

    /// Enrolls `pod` at once with the network namespace the CNI plugin handed over (CNI
    /// `ADD`), and remembers that namespace for later reconciles. Returns the cookie.
    pub fn enroll_now(
        &mut self,
        pod: &Candidate,
        netns: &str,
        maps: &mut NodeMaps,
    ) -> Result<u64, String> {
        let cookie = netns_cookie(Path::new(netns)).map_err(|e| e.to_string())?;
        let workload = workload_of(pod);
        maps.enrolled
            .insert(cookie, workload, 0)
            .map_err(|e| format!("writing SN_ENROLLED: {e}"))?;
        self.cni_netns.insert(pod.key.clone(), netns.to_string());
        self.cni_since
            .insert(pod.key.clone(), std::time::Instant::now());
        self.last
            .insert(pod.key.clone(), Entry { cookie, workload });
        info!(pod = %pod.key, cookie, netns, ip = %pod.ip, "enrolled (CNI)");
        Ok(cookie)
    }

    /// Removes `key`'s enrollment at once (CNI `DEL`). The next reconcile enrolls the pod
    /// again only if its namespace can still be found (a pod whose sandbox is gone cannot).
    pub fn release_now(&mut self, key: &ObjKey, maps: &mut NodeMaps) -> bool {
        self.cni_netns.remove(key);
        self.cni_since.remove(key);
        let Some(prev) = self.last.remove(key) else {
            return false;
        };
        match maps.enrolled.remove(&prev.cookie) {
            Ok(()) => {
                info!(pod = %key, cookie = prev.cookie, "un-enrolled (CNI DEL)");
                true
            }
            Err(e) => {
                // Already gone (a reconcile removed it): nothing to do.
                warn!(pod = %key, cookie = prev.cookie, error = %e, "removing an enrollment (CNI DEL)");
                false
            }
        }
    }

    /// Is `key` enrolled (as of the last reconcile or CNI `ADD`)?
    pub fn is_enrolled(&self, key: &ObjKey) -> bool {
        self.last.contains_key(key)
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

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn candidate(name: &str, netns: Option<&str>, uid: Option<&str>) -> Candidate {
        Candidate {
            key: ObjKey {
                namespace: "mesh".into(),
                name: name.into(),
            },
            ip: "10.0.0.1".parse().expect("test step"),
            service_account: "sa".into(),
            netns: netns.map(Into::into),
            pod_uid: uid.map(Into::into),
            origin: "test".into(),
        }
    }

    /// Annotation first, else the pod uid through the cgroup; problems name the pod.
    #[test]
    fn resolution_order_and_problems() {
        let t = tempfile::tempdir().expect("test step");
        let pod = t.path().join(format!("kubepods/pod{UID}"));
        std::fs::create_dir_all(&pod).expect("test step");
        // No host namespace: this test process stands for the pod's sandbox.
        let mut e = Enroller::new("n1").with_pod_cgroups(PodNetnsFinder::with_host(t.path(), None));
        let own = netns_cookie(Path::new("/proc/self/ns/net")).expect("test step");

        // The pod's cgroup has no process yet: a problem naming it, nothing enrolled.
        let by_uid = candidate("by-uid", None, Some(UID));
        let (want, problems) = e.desired(std::slice::from_ref(&by_uid));
        assert!(want.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("mesh/by-uid") && problems[0].contains("no process"),
            "{}",
            problems[0]
        );

        std::fs::write(pod.join("cgroup.procs"), std::process::id().to_string())
            .expect("test step");
        let cands = [
            by_uid.clone(),
            candidate(
                "annotated",
                Some("/proc/self/ns/net"),
                Some("ffffffff-4b5a-6978-8796-a5b4c3d2e1f0"),
            ),
            candidate("nothing", None, None),
        ];
        let (want, problems) = e.desired(&cands);
        assert_eq!(want.len(), 2, "{problems:?}");
        assert!(want.values().all(|w| w.cookie == own));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("mesh/nothing"), "{}", problems[0]);

        // Once enrolled, a failing resolution keeps the last good enrollment.
        e.last = want;
        std::fs::remove_dir_all(&pod).expect("test step");
        let (want, problems) = e.desired(std::slice::from_ref(&by_uid));
        assert_eq!(want.len(), 1);
        assert!(problems[0].contains("no cgroup folder"), "{}", problems[0]);
    }
}
