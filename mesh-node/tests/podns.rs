//! Finding a pod's network namespace through its cgroup, on the real kernel (runs as root):
//! a cgroup tree shaped like kubelet's (both drivers), a network namespace, and a process in
//! it moved into the pod's container folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_node::kernel::load::default_cgroup_root;
use mesh_node::kernel::netns::netns_id;
use mesh_node::kernel::podns::{PodNetnsError, PodNetnsFinder};

/// Everything one test made; removed on drop, also when the test fails.
struct Fixture {
    children: Vec<Child>,
    /// cgroup folders, parents first.
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            cgroups: Vec::new(),
            netns: Vec::new(),
        }
    }

    fn mkdir_all(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut p = root.to_path_buf();
        for part in rel.split('/') {
            p.push(part);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.cgroups.push(p.clone());
            }
        }
        p
    }

    fn add_netns(&mut self, name: &str) -> PathBuf {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("running ip")
            .success();
        assert!(ok, "ip netns add {name}");
        self.netns.push(name.to_string());
        PathBuf::from(format!("/var/run/netns/{name}"))
    }

    /// `sleep 60`, in the network namespace `netns` (None: ours), moved into `cgroup`.
    fn sleeper(&mut self, netns: Option<&Path>, cgroup: &Path) -> u32 {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .args(["sleep", "60"]);
                c
            }
            None => {
                let mut c = Command::new("sleep");
                c.arg("60");
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning sleep");
        let pid = child.id();
        self.children.push(child);
        if let Some(ns) = netns {
            // nsenter execs sleep in the same process once it has entered the namespace.
            let want = netns_id(ns).expect("test step");
            let proc_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let deadline = Instant::now() + Duration::from_secs(5);
            while netns_id(&proc_ns).ok() != Some(want) {
                assert!(
                    Instant::now() < deadline,
                    "pid {pid} never entered {}",
                    ns.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", cgroup.display()));
        pid
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed process leaves its cgroup shortly after it is reaped.
        for dir in self.cgroups.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() && std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn root() -> PathBuf {
    default_cgroup_root().expect("a cgroup2 mount")
}

fn uid(n: u32) -> String {
    format!("{:08x}-1111-2222-3333-{:012x}", std::process::id(), n)
}

fn host() -> Option<(u64, u64)> {
    netns_id(Path::new("/proc/self/ns/net")).ok()
}

#[test]
fn cgroupfs_driver_pod_is_found() {
    let me = std::process::id();
    let mut fx = Fixture::new();
    let uid = uid(1);
    let ctr = fx.mkdir_all(
        &root(),
        &format!("snt{me}-a/kubepods/besteffort/pod{uid}/ctr1"),
    );
    let ns = fx.add_netns(&format!("snt{me}-a"));
    fx.sleeper(Some(&ns), &ctr);

    // Searched from the cgroup2 mount, as the agent does by default.
    let mut finder = PodNetnsFinder::new(root());
    let found = finder.find(&uid).expect("finding the pod's netns");
    assert_eq!(
        netns_id(&found.path).expect("test step"),
        netns_id(&ns).expect("test step")
    );
    assert_eq!(found.id, netns_id(&ns).expect("test step"));
    assert_eq!(found.cgroup, ctr.parent().expect("test step"));
    assert_ne!(Some(found.id), host());

    // From the cache, the same answer.
    assert_eq!(finder.find(&uid).expect("test step"), found);
}

#[test]
fn systemd_driver_pod_is_found_and_host_processes_are_skipped() {
    let me = std::process::id();
    let mut fx = Fixture::new();
    let uid = uid(2);
    let pod = format!(
        "snt{me}-b/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    // A host-network process first (in the pod's own folder), then the sandbox.
    let pod_dir = fx.mkdir_all(&root(), &pod);
    let ctr = fx.mkdir_all(&root(), &format!("{pod}/cri-containerd-x.scope"));
    let ns = fx.add_netns(&format!("snt{me}-b"));
    let sandbox = fx.sleeper(Some(&ns), &ctr);
    let _host_proc = fx.sleeper(None, &pod_dir);

    let mut finder = PodNetnsFinder::new(root());
    let found = finder.find(&uid).expect("finding the pod's netns");
    assert_eq!(found.id, netns_id(&ns).expect("test step"));
    assert_eq!(found.path, PathBuf::from(format!("/proc/{sandbox}/ns/net")));
    assert_eq!(found.cgroup, pod_dir);
}

#[test]
fn errors_name_the_pod_and_the_folder() {
    let me = std::process::id();
    let mut fx = Fixture::new();
    let mut finder = PodNetnsFinder::new(root());

    // Unknown pod.
    let unknown = uid(3);
    match finder.find(&unknown) {
        Err(e @ PodNetnsError::NoCgroup { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&unknown), "{msg}");
            assert!(msg.contains(&root().display().to_string()), "{msg}");
        }
        other => panic!("expected NoCgroup, got {other:?}"),
    }

    // Folder, no process yet.
    let empty = uid(4);
    let dir = fx.mkdir_all(&root(), &format!("snt{me}-c/kubepods/pod{empty}/ctr1"));
    match finder.find(&empty) {
        Err(e @ PodNetnsError::NoProcess { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&empty), "{msg}");
            assert!(
                msg.contains(&dir.parent().expect("test step").display().to_string()),
                "{msg}"
            );
        }
        other => panic!("expected NoProcess, got {other:?}"),
    }

    // Only a process in the host's namespace (a hostNetwork pod).
    let hostnet = uid(5);
    let dir = fx.mkdir_all(&root(), &format!("snt{me}-c/kubepods/pod{hostnet}/ctr1"));
    fx.sleeper(None, &dir);
    match finder.find(&hostnet) {
        Err(e @ PodNetnsError::HostNetworkOnly { .. }) => {
            assert!(e.to_string().contains(&hostnet), "{e}");
        }
        other => panic!("expected HostNetworkOnly, got {other:?}"),
    }

    // The empty pod's process comes up later: found without anything else changing.
    let ns = fx.add_netns(&format!("snt{me}-c"));
    let ctr = root().join(format!("snt{me}-c/kubepods/pod{empty}/ctr1"));
    fx.sleeper(Some(&ns), &ctr);
    assert_eq!(
        finder.find(&empty).expect("test step").id,
        netns_id(&ns).expect("test step")
    );
}

#[test]
fn a_dead_process_is_replaced_by_a_live_one() {
    let me = std::process::id();
    let mut fx = Fixture::new();
    let uid = uid(6);
    let ctr = fx.mkdir_all(&root(), &format!("snt{me}-d/kubepods/pod{uid}/ctr1"));
    let ns = fx.add_netns(&format!("snt{me}-d"));
    fx.sleeper(Some(&ns), &ctr);
    let mut finder = PodNetnsFinder::new(root());
    let first = finder.find(&uid).expect("test step");

    // A second process of the pod, then the first one dies.
    fx.sleeper(Some(&ns), &ctr);
    let mut c = fx.children.remove(0);
    c.kill().expect("test step");
    c.wait().expect("test step");
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.path.exists() {
        assert!(Instant::now() < deadline, "pid did not go away");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = finder.find(&uid).expect("test step");
    assert_ne!(second.path, first.path);
    assert_eq!(second.id, first.id);
}
