//! The userspace side of the kernel programs: loading or adopting them (`load`), the pinned
//! maps as typed handles (`maps`), network-namespace cookies (`netns`), and finding a pod's
//! namespace from its UID through its cgroup (`podns`), the host's cgroup2 and bpffs mounts
//! (`mounts`), the programs' decision logs (`log`).
//!
//! Everything is pinned under `<bpffs>/sidenode/`: maps in `maps/`, program links in `links/`,
//! and the `sk_msg` program (attached to its sockhash, not a cgroup) in `progs/`.
//! While the pins exist the programs stay attached, so capture goes on while the agent is down.

pub mod fdpass;
pub mod heap;
pub mod inpod;
pub mod inspect;
pub mod load;
pub mod log;
pub mod maps;
pub mod mounts;
pub mod netns;
pub mod podns;
pub mod probe;
pub mod rlimit;
pub mod tls;

use std::path::{Path, PathBuf};

/// Where a node's pins live.
#[derive(Clone, Debug)]
pub struct Pins {
    bpffs: PathBuf,
}

impl Pins {
    pub fn new(bpffs: impl Into<PathBuf>) -> Self {
        Self {
            bpffs: bpffs.into(),
        }
    }
    pub fn root(&self) -> PathBuf {
        self.bpffs.join(mesh_common::PIN_ROOT)
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.bpffs.join(mesh_common::PIN_MAPS)
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.bpffs.join(mesh_common::PIN_LINKS)
    }
    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }
    pub fn progs_dir(&self) -> PathBuf {
        self.bpffs.join(mesh_common::PIN_PROGS)
    }
    /// The pin of a program attached to a map (no link): present while it is attached.
    pub fn prog(&self, program: &str) -> PathBuf {
        self.progs_dir().join(program)
    }
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Takes the agent's lock: an exclusive `flock` on `<bpffs>/sidenode`, held while the
    /// returned file is open (the agent keeps it for its whole life; the kernel drops it when
    /// the process ends, however it ends). `mesh-node doctor` reads it as "an agent runs on
    /// these pins" ([`Pins::agent_running`]). `Ok(false)`: another process holds it.
    pub fn lock_agent(&self) -> std::io::Result<(std::fs::File, bool)> {
        let dir = std::fs::File::open(self.root())?;
        match dir.try_lock() {
            Ok(()) => Ok((dir, true)),
            Err(std::fs::TryLockError::WouldBlock) => Ok((dir, false)),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Does a running agent hold its lock on these pins ([`Pins::lock_agent`])?
    pub fn agent_running(&self) -> std::io::Result<bool> {
        let dir = std::fs::File::open(self.root())?;
        match dir.try_lock_shared() {
            Ok(()) => {
                dir.unlock()?;
                Ok(false)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Errors of the kernel side, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("opening pinned map {path}: {source} (is the agent installed on this bpffs?)")]
    OpenPin {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("adopting pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what}: the map layout changed, so this agent will not run its programs over them; \
         `mesh-node uninstall` then start this agent (capture stops in between), or keep the \
         agent version that installed them"
    )]
    Layout { what: String },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock is seen from another open of the folder, and goes with the file.
    #[test]
    fn the_agent_lock_is_seen_while_held() {
        let t = tempfile::tempdir().expect("tempdir");
        let pins = Pins::new(t.path());
        assert!(pins.agent_running().is_err(), "no pins folder yet");
        std::fs::create_dir_all(pins.root()).expect("mkdir");
        assert!(!pins.agent_running().expect("probe"));
        let (held, got) = pins.lock_agent().expect("lock");
        assert!(got);
        assert!(pins.agent_running().expect("probe"));
        // A second agent does not get it.
        assert!(!pins.lock_agent().expect("lock").1);
        drop(held);
        assert!(!pins.agent_running().expect("probe"));
    }
}
