//! `mesh-node`: sidenode's node agent, node proxy, controller and operator CLI in one binary.

fn main() -> std::process::ExitCode {
    match mesh_node::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
