//! `mesh-node`: sidenode's node agent, node proxy and operator CLI in one binary.
//!
//! Follow a connection through the folders: `kernel` (the eBPF side: load, maps, netns) →
//! `proxy/outbound` (accept a captured connection, find its original destination, forward).
//! State flows one way: `config` (YAML) → `model` → `agent` (enrollment into kernel maps).

mod agent;
mod cli;
mod config;
mod defaults;
mod kernel;
mod model;
mod proxy;
mod telemetry;

fn main() -> std::process::ExitCode {
    match cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
