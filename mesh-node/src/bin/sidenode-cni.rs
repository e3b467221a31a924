//! `sidenode-cni`: the chained CNI plugin (docs/cni.md). A separate small binary, not an
//! argv[0] mode of `mesh-node`: the runtime starts it for every pod sandbox, so it does only
//! what `cni::plugin` needs (std, serde_json; no async runtime, no eBPF object).

fn main() -> std::process::ExitCode {
    mesh_node::cni::plugin::main()
}
