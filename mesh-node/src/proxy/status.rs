//! The proxy's phase (starting, serving, draining) and, in mesh mode, its mesh side: what the
//! readiness probe and the admin API (`admin`) read of a running proxy or gateway.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use super::Mesh;

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

/// What the admin API reads of the proxy: its phase and, in mesh mode, its mesh side.
pub struct Status {
    node: String,
    mesh_mode: bool,
    phase: AtomicU8,
    mesh: OnceLock<Arc<Mesh>>,
}

impl Status {
    pub fn new(node: &str, mesh_mode: bool) -> Arc<Status> {
        Arc::new(Status {
            node: node.to_string(),
            mesh_mode,
            phase: AtomicU8::new(STARTING),
            mesh: OnceLock::new(),
        })
    }

    /// The mesh side once it is up (state stream, certificates).
    pub fn set_mesh(&self, mesh: Arc<Mesh>) {
        let _ = self.mesh.set(mesh);
    }

    /// The outbound listeners are bound and accepting.
    pub fn set_serving(&self) {
        self.phase.store(SERVING, Ordering::Relaxed);
    }

    /// SIGTERM: no new connections.
    pub fn set_draining(&self) {
        self.phase.store(DRAINING, Ordering::Relaxed);
    }

    /// `Ok(())` when ready, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match self.phase.load(Ordering::Relaxed) {
            STARTING => return Err("starting: waiting for the agent's maps and the listeners"),
            DRAINING => return Err("draining: the proxy is shutting down"),
            _ => {}
        }
        if self.mesh_mode {
            match self.mesh.get() {
                None => return Err("starting: the mesh side is not up yet"),
                Some(m) if m.state.borrow().version == 0 => {
                    return Err("no state from the controller yet");
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The node (or gateway) name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// With a controller (the mesh side is expected)?
    pub fn mesh_mode(&self) -> bool {
        self.mesh_mode
    }

    /// The mesh side, once up.
    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.get()
    }
}
