//! `mesh-node`: sidenode's node agent, node proxy, controller and operator CLI in one binary.

fn main() -> std::process::ExitCode {
    // One malloc arena, so the heap trim returns all freed memory (kernel/heap.rs).
    mesh_node::kernel::heap::one_arena();
    match mesh_node::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
