//! Finding a pod's network namespace from its UID, as a node sees it without any annotation.
//!
//! kubelet puts every pod in a cgroup folder named for its UID: `pod<uid>` with the cgroupfs
//! driver (`kubepods/besteffort/pod<uid>/`), `…-pod<uid with '_' for '-'>.slice` with the
//! systemd driver (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/`).
//! The containers of the pod (the sandbox "pause" process first) are below it, and all share
//! the pod's network namespace, so the namespace is `/proc/<pid>/ns/net` of any of its
//! processes that is not in the host's namespace (a `hostNetwork` pod has none). This needs the
//! host's PID namespace (`hostPID`): `cgroup.procs` lists PIDs as the reader's PID namespace
//! sees them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::netns::netns_id;

/// How deep below the search root pod folders are looked for (kubelet's are 2–4 deep).
pub const MAX_DEPTH: usize = 8;

/// Why a pod's network namespace was not found.
#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error(
        "pod uid {uid}: no cgroup folder `pod{uid}` or `*-pod{}.slice` within {MAX_DEPTH} levels below {}",
        uid.replace('-', "_"),
        root.display()
    )]
    NoCgroup { uid: String, root: PathBuf },
    #[error("pod uid {uid}: cgroup {} has no process yet (pod not started?)", folder.display())]
    NoProcess { uid: String, folder: PathBuf },
    #[error(
        "pod uid {uid}: none of the {count} processes of cgroup {} is visible in /proc (does this process run with hostPID?)",
        folder.display()
    )]
    NotVisible {
        uid: String,
        folder: PathBuf,
        count: usize,
    },
    #[error(
        "pod uid {uid}: every process of cgroup {} is in the host network namespace (hostNetwork pod?)",
        folder.display()
    )]
    HostNetworkOnly { uid: String, folder: PathBuf },
}

/// A pod's network namespace, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    /// `/proc/<pid>/ns/net` of one of the pod's processes.
    pub path: PathBuf,
    /// The namespace's identity (device, inode).
    pub id: (u64, u64),
    /// The pod's cgroup folder.
    pub cgroup: PathBuf,
}

/// Finds pods' network namespaces below one cgroup v2 folder; remembers where each pod's
/// cgroup folder is (checked again on every use).
#[derive(Debug)]
pub struct PodNetnsFinder {
    root: PathBuf,
    proc_root: PathBuf,
    /// The host's network namespace: processes in it are not the pod's.
    host: Option<(u64, u64)>,
    /// pod uid → its cgroup folder (every pod folder seen by the last walk).
    folders: HashMap<String, PathBuf>,
}

impl PodNetnsFinder {
    /// Searches below `root`; the host network namespace is this process's own (the agent and
    /// the proxy run with `hostNetwork`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_host(root, netns_id(Path::new("/proc/self/ns/net")).ok())
    }

    /// Searches below `root`; processes in the namespace `host` are skipped.
    pub fn with_host(root: impl Into<PathBuf>, host: Option<(u64, u64)>) -> Self {
        Self {
            root: root.into(),
            proc_root: PathBuf::from("/proc"),
            host,
            folders: HashMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup folder of the pod `uid`, from the cache while it still exists, else by
    /// walking the tree (which refreshes the cache for every pod).
    pub fn cgroup_of(&mut self, uid: &str) -> Option<PathBuf> {
        if let Some(f) = self.folders.get(uid) {
            if f.is_dir() {
                return Some(f.clone());
            }
            self.folders.remove(uid);
        }
        self.folders = pod_folders(&self.root, MAX_DEPTH);
        self.folders.get(uid).cloned()
    }

    /// The network namespace of the pod `uid`.
    pub fn find(&mut self, uid: &str) -> Result<PodNetns, PodNetnsError> {
        let Some(folder) = self.cgroup_of(uid) else {
            return Err(PodNetnsError::NoCgroup {
                uid: uid.to_string(),
                root: self.root.clone(),
            });
        };
        let pids = pids_below(&folder, MAX_DEPTH);
        if pids.is_empty() {
            return Err(PodNetnsError::NoProcess {
                uid: uid.to_string(),
                folder,
            });
        }
        let mut visible = 0;
        for pid in &pids {
            let path = self.proc_root.join(pid.to_string()).join("ns/net");
            let Ok(id) = netns_id(&path) else {
                continue; // gone, or not in our PID namespace
            };
            visible += 1;
            if Some(id) != self.host {
                return Ok(PodNetns {
                    path,
                    id,
                    cgroup: folder,
                });
            }
        }
        if visible == 0 {
            Err(PodNetnsError::NotVisible {
                uid: uid.to_string(),
                folder,
                count: pids.len(),
            })
        } else {
            Err(PodNetnsError::HostNetworkOnly {
                uid: uid.to_string(),
                folder,
            })
        }
    }
}

/// The pod UID a kubelet cgroup folder name stands for: `pod<uid>` (cgroupfs driver) or
/// `<parent>-pod<uid, '_' for '-'>.slice` (systemd driver).
pub fn pod_uid_of_folder(name: &str) -> Option<String> {
    if let Some(uid) = name.strip_prefix("pod") {
        return valid_uid(uid).then(|| uid.to_string());
    }
    let stem = name.strip_suffix(".slice")?;
    let (_, uid) = stem.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    valid_uid(&uid).then_some(uid)
}

/// A Kubernetes UID: a UUID, or 32 hex digits (static pods' UIDs are a hash).
fn valid_uid(s: &str) -> bool {
    s.len() >= 32 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Every pod folder below `root` (at most `max_depth` levels), by pod UID. Folders that cannot
/// be read are skipped; pod folders are not searched further (pods do not nest).
pub fn pod_folders(root: &Path, max_depth: usize) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if depth >= max_depth {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            match e.file_name().to_str().and_then(pod_uid_of_folder) {
                Some(uid) => {
                    found.entry(uid).or_insert(path);
                }
                None => stack.push((path, depth + 1)),
            }
        }
    }
    found
}

/// The PIDs in `folder`'s `cgroup.procs` and its descendants' (at most `max_depth` levels),
/// the folder's own first.
pub fn pids_below(folder: &Path, max_depth: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut queue = std::collections::VecDeque::from([(folder.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(parse_procs(&text));
        }
        if depth >= max_depth {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut subs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        subs.sort();
        queue.extend(subs.into_iter().map(|p| (p, depth + 1)));
    }
    pids
}

/// The PIDs of a `cgroup.procs` file (0 stands for a process outside our PID namespace).
fn parse_procs(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn folder_names_of_both_cgroup_drivers() {
        assert_eq!(
            pod_uid_of_folder(&format!("pod{UID}")).as_deref(),
            Some(UID)
        );
        let systemd = format!("kubepods-besteffort-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_uid_of_folder(&systemd).as_deref(), Some(UID));
        let guaranteed = format!("kubepods-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_uid_of_folder(&guaranteed).as_deref(), Some(UID));
        for other in [
            "kubepods",
            "besteffort",
            "kubepods.slice",
            "kubepods-besteffort.slice",
            "pod",
            "podman",
            "cri-containerd-abc.scope",
            "kubepods-pod.slice",
            "pod1234",
            "system.slice",
        ] {
            assert_eq!(pod_uid_of_folder(other), None, "{other}");
        }
    }

    #[test]
    fn walks_to_pod_folders_and_collects_pids() {
        let t = tempfile::tempdir().expect("test step");
        let pod = t.path().join(format!("kubepods/burstable/pod{UID}"));
        std::fs::create_dir_all(pod.join("ctr-b")).expect("test step");
        std::fs::create_dir_all(pod.join("ctr-a")).expect("test step");
        std::fs::write(pod.join("cgroup.procs"), "").expect("test step");
        std::fs::write(pod.join("ctr-a/cgroup.procs"), "12\n0\n13\n").expect("test step");
        std::fs::write(pod.join("ctr-b/cgroup.procs"), "20\n").expect("test step");
        let found = pod_folders(t.path(), MAX_DEPTH);
        assert_eq!(found.get(UID), Some(&pod));
        assert_eq!(pids_below(&pod, MAX_DEPTH), vec![12, 13, 20]);
        // Too shallow a search does not reach it.
        assert!(pod_folders(t.path(), 2).is_empty());
    }

    #[test]
    fn systemd_driver_with_cri_o_and_containerd_scopes() {
        // systemd driver: the pod slice holds the runtime's scopes. CRI-O puts `conmon`
        // (a host-namespace process) in the pod's slice too; the finder skips processes in
        // the host's namespace, so it is listed here but never taken.
        let t = tempfile::tempdir().expect("test step");
        let uid_ = UID.replace('-', "_");
        let slice = t.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"
        ));
        for (scope, procs) in [
            ("crio-conmon-0a1b.scope", "31\n"),
            ("crio-0a1b.scope", "32\n"),
            ("cri-containerd-2c3d.scope", "33\n"),
        ] {
            std::fs::create_dir_all(slice.join(scope)).expect("test step");
            std::fs::write(slice.join(scope).join("cgroup.procs"), procs).expect("test step");
        }
        let found = pod_folders(t.path(), MAX_DEPTH);
        assert_eq!(found.get(UID), Some(&slice));
        // Folders in name order: cri-containerd-…, crio-0a1b…, crio-conmon-….
        assert_eq!(pids_below(&slice, MAX_DEPTH), vec![33, 32, 31]);
    }

    #[test]
    fn errors_name_the_pod_and_the_folder() {
        let t = tempfile::tempdir().expect("test step");
        let mut f = PodNetnsFinder::with_host(t.path(), None);
        let e = f.find(UID).expect_err("should fail");
        assert!(matches!(e, PodNetnsError::NoCgroup { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(UID) && msg.contains(&t.path().display().to_string()),
            "{msg}"
        );

        let pod = t.path().join(format!("pod{UID}"));
        std::fs::create_dir_all(&pod).expect("test step");
        let e = f.find(UID).expect_err("should fail");
        assert!(matches!(e, PodNetnsError::NoProcess { .. }), "{e}");
        assert!(e.to_string().contains(&pod.display().to_string()));

        // A PID that no longer exists (PIDs are below 2^22).
        std::fs::write(pod.join("cgroup.procs"), "99999999\n").expect("test step");
        let e = f.find(UID).expect_err("should fail");
        assert!(
            matches!(e, PodNetnsError::NotVisible { count: 1, .. }),
            "{e}"
        );

        // Our own process, with our namespace as the host's.
        let me = netns_id(Path::new("/proc/self/ns/net")).expect("test step");
        let mut f = PodNetnsFinder::with_host(t.path(), Some(me));
        std::fs::write(
            pod.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("test step");
        let e = f.find(UID).expect_err("should fail");
        assert!(matches!(e, PodNetnsError::HostNetworkOnly { .. }), "{e}");

        // Another host namespace: ours counts as the pod's.
        let mut f = PodNetnsFinder::with_host(t.path(), None);
        let got = f.find(UID).expect("test step");
        assert_eq!(got.id, me);
        assert_eq!(got.cgroup, pod);
    }

    #[test]
    fn cache_is_checked_again() {
        let t = tempfile::tempdir().expect("test step");
        let old = t.path().join(format!("a/pod{UID}"));
        std::fs::create_dir_all(&old).expect("test step");
        let mut f = PodNetnsFinder::with_host(t.path(), None);
        assert_eq!(f.cgroup_of(UID), Some(old.clone()));
        std::fs::remove_dir(&old).expect("test step");
        let new = t
            .path()
            .join(format!("b/kubepods-pod{}.slice", UID.replace('-', "_")));
        std::fs::create_dir_all(&new).expect("test step");
        assert_eq!(f.cgroup_of(UID), Some(new));
        std::fs::remove_dir(
            t.path()
                .join(format!("b/kubepods-pod{}.slice", UID.replace('-', "_"))),
        )
        .expect("test step");
        assert_eq!(f.cgroup_of(UID), None);
    }
}
