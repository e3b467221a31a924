//! `sidenode-cni`: the chained CNI plugin (docs/cni.md). A separate small binary, not an
//! argv[0] mode of `mesh-node`: the runtime starts it for every pod sandbox, from the host's
//! CNI bin dir. It compiles the plugin's two source files directly (not the `mesh_node`
//! library), so it holds only std, serde_json and the plugin: no async runtime, no eBPF
//! object, a fraction of `mesh-node`'s size, and nothing of the agent runs on the host.

// The same files as `mesh_node::cni::{protocol, plugin}` (there `plugin` reaches `protocol`
// as `super::protocol`, as here). Items only the library's callers use are unused here.
#[allow(dead_code)]
#[path = "../cni/protocol.rs"]
mod protocol;

#[allow(dead_code)]
#[path = "../cni/plugin.rs"]
mod plugin;

fn main() -> std::process::ExitCode {
    plugin::main()
}
