//! The kernel programs' decision logs (aya-log records: captured, not captured and why,
//! recorded, dropped by STRICT) written to the agent's log under the target `kernel`, with the
//! pod each one is about: `netns=<cookie>` is looked up in `SN_ENROLLED`, the destination of a
//! STRICT drop among this node's pods' addresses. What is logged is switched in the pins
//! (`kernel::log`, `mesh-node log-level --kernel`); off, nothing reaches this reader.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;

use aya::maps::{HashMap as BpfHashMap, MapData};
use mesh_common::{Workload, name_str};
use tracing::{info, warn};

use super::enroll::Candidate;
use crate::kernel::{Pins, log::reader, maps::open_typed};

/// This node's meshed pods by address (for STRICT drops, which name the destination address).
static ADDRESSES: RwLock<Option<HashMap<IpAddr, String>>> = RwLock::new(None);

/// Keeps the address → pod index in step with the pods the agent enrolls.
pub fn set_pods(candidates: &[Candidate]) {
    let index = candidates
        .iter()
        .map(|c| (c.ip, format!("{}/{}", c.key.namespace, c.key.name)))
        .collect();
    if let Ok(mut a) = ADDRESSES.write() {
        *a = Some(index);
    }
}

/// Starts reading the programs' log records. A failure (pins of a version without logs) is
/// reported and the agent goes on without them.
pub fn spawn(pins: &Pins) {
    let started = open_typed(pins, mesh_common::ENROLLED)
        .map_err(|e| e.to_string())
        .and_then(|enrolled| reader(pins, Forward { enrolled }));
    let mut reader = match started {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "kernel decision logs unavailable (programs pinned by an older version?)");
            return;
        }
    };
    let task = tokio::spawn(async move {
        loop {
            let Ok(mut ready) = reader.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    // aya-log's reader panics on a record it cannot decode: say so rather than go quiet.
    tokio::spawn(async move {
        if let Err(e) = task.await {
            warn!(error = %e, "the kernel decision log reader stopped");
        }
    });
}

/// Writes each record to the agent's log, naming the pod.
struct Forward {
    enrolled: BpfHashMap<MapData, u64, Workload>,
}

impl Forward {
    fn pod_of(&self, msg: &str) -> Option<String> {
        if let Some(cookie) = field(msg, "netns=").and_then(|c| c.parse::<u64>().ok()) {
            let w = self.enrolled.get(&cookie, 0).ok()?;
            return Some(format!("{}/{}", name_str(&w.namespace), name_str(&w.name)));
        }
        let dst = field(msg, "dst=")?;
        let ip: IpAddr = match dst.strip_prefix('[') {
            Some(v6) => v6.split(']').next()?.parse().ok()?,
            None => dst
                .rsplit_once(':')
                .map_or(dst, |(ip, _)| ip)
                .parse()
                .ok()?,
        };
        ADDRESSES.read().ok()?.as_ref()?.get(&ip).cloned()
    }
}

/// The value after `key` in a record's message, up to the next space.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    let at = msg.find(key)? + key.len();
    msg[at..].split_whitespace().next()
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args().to_string();
        let pod = self.pod_of(&msg).unwrap_or_else(|| "-".into());
        match record.level() {
            log::Level::Error | log::Level::Warn => warn!(target: "kernel", %pod, "{msg}"),
            _ => info!(target: "kernel", %pod, "{msg}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fields_of_kernel_records() {
        let m = "captured: netns=4026532 dst=10.0.0.2:80";
        assert_eq!(field(m, "netns="), Some("4026532"));
        assert_eq!(field(m, "dst="), Some("10.0.0.2:80"));
        assert_eq!(
            field("dropped: src=a dst=[fd00::1]:80", "dst="),
            Some("[fd00::1]:80")
        );
        assert_eq!(field("nothing here", "netns="), None);
    }
}
