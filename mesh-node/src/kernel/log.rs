//! The kernel programs' decision logs (aya-log): the switch in the pinned maps (`SN_LOG`,
//! `SN_LOG_PODS`: off, every pod, or some pods by network-namespace cookie) and the reader of
//! the programs' log ring buffer.
//!
//! Off by default: a program then tests one word of an array map and logs nothing. The
//! switch lives in the pins, so it survives agent restarts and any process with the bpffs can
//! flip it (`mesh-node log-level --kernel`); the agent reads the records and writes them to
//! its own log with the pod's name.

use aya::maps::{Array, HashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya_log::EbpfLogger;
use mesh_common::{LOG_F_ALL, LOG_F_SOME, Workload};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::maps::{open_typed, read_map_keys};
use super::{KernelError, Pins};

/// What the programs log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelLog {
    Off,
    /// Every enrolled pod's decisions, and every STRICT drop.
    All,
    /// Only the decisions about these pods' connections (netns cookies).
    Pods(Vec<u64>),
}

/// The switch, opened from the pins.
pub struct LogSwitch {
    flags: Array<MapData, u32>,
    pods: HashMap<MapData, u64, u8>,
}

impl LogSwitch {
    /// Fails with a clear error on pins of a version without kernel logs (they have no
    /// `SN_LOG`): `mesh-node uninstall` and a fresh agent bring them.
    pub fn open(pins: &Pins) -> Result<Self, KernelError> {
        Ok(LogSwitch {
            flags: open_typed(pins, mesh_common::LOG)?,
            pods: open_typed(pins, mesh_common::LOG_PODS)?,
        })
    }

    pub fn get(&self) -> Result<KernelLog, KernelError> {
        let map_err = |source| KernelError::Map {
            name: mesh_common::LOG,
            source,
        };
        let flags = self.flags.get(&0, 0).map_err(map_err)?;
        Ok(if flags & LOG_F_ALL != 0 {
            KernelLog::All
        } else if flags & LOG_F_SOME != 0 {
            let mut cookies = read_map_keys(&self.pods);
            cookies.sort_unstable();
            KernelLog::Pods(cookies)
        } else {
            KernelLog::Off
        })
    }

    /// Sets what is logged. The pod list is written before the flag that makes the programs
    /// read it, so no pod is logged by mistake in between.
    pub fn set(&mut self, to: &KernelLog) -> Result<(), KernelError> {
        let flags_err = |source| KernelError::Map {
            name: mesh_common::LOG,
            source,
        };
        let pods_err = |source| KernelError::Map {
            name: mesh_common::LOG_PODS,
            source,
        };
        let want: Vec<u64> = match to {
            KernelLog::Pods(c) => c.clone(),
            _ => Vec::new(),
        };
        if matches!(to, KernelLog::Off | KernelLog::All) {
            self.flags
                .set(0, if *to == KernelLog::All { LOG_F_ALL } else { 0 }, 0)
                .map_err(flags_err)?;
        }
        for old in read_map_keys(&self.pods) {
            if !want.contains(&old) {
                self.pods.remove(&old).map_err(pods_err)?;
            }
        }
        for c in &want {
            self.pods.insert(c, 1, 0).map_err(pods_err)?;
        }
        if let KernelLog::Pods(_) = to {
            self.flags.set(0, LOG_F_SOME, 0).map_err(flags_err)?;
        }
        Ok(())
    }
}

/// The network-namespace cookies of the enrolled pods named `namespace/name`, from
/// `SN_ENROLLED`; names not enrolled are returned as the error.
pub fn cookies_of(
    enrolled: &HashMap<MapData, u64, Workload>,
    pods: &[String],
) -> Result<Vec<u64>, Vec<String>> {
    let mut by_name = std::collections::HashMap::new();
    for (cookie, w) in enrolled.iter().flatten() {
        by_name.insert(
            format!(
                "{}/{}",
                mesh_common::name_str(&w.namespace),
                mesh_common::name_str(&w.name)
            ),
            cookie,
        );
    }
    let missing: Vec<String> = pods
        .iter()
        .filter(|p| !by_name.contains_key(*p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    Ok(pods
        .iter()
        .filter_map(|p| by_name.get(p).copied())
        .collect())
}

/// The kernel id of the capture program attached through this node's pins (its log ring
/// buffer is the one every program of the object shares).
pub fn capture_program_id(pins: &Pins) -> Result<u32, KernelError> {
    let path = pins.link(mesh_common::PROG_CONNECT4);
    let link_err = |source| KernelError::Link {
        path: path.clone(),
        source,
    };
    let link: FdLink = PinnedLink::from_pin(&path).map_err(link_err)?.into();
    Ok(link.info().map_err(link_err)?.program_id())
}

/// The programs' log records, readable on the runtime: `flush` the inner logger when ready to
/// hand each record to `logger`. Must be called on a tokio runtime.
pub fn reader<T: log::Log>(pins: &Pins, logger: T) -> Result<AsyncFd<EbpfLogger<T>>, String> {
    let id = capture_program_id(pins).map_err(|e| e.to_string())?;
    let l = EbpfLogger::init_from_id_with_logger(id, logger)
        .map_err(|e| format!("the log buffer of program {id}: {e}"))?;
    // SAFETY: the fd is the ring buffer map's, owned by the `EbpfLogger` that the `AsyncFd`
    // owns: it stays open, and is the same fd, until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
        .map_err(|e| format!("polling the log buffer: {e}"))
}
