//! `kernel::heap::one_arena`: memory a worker thread freed goes back to the kernel on a trim.
//!
//! Its own test binary without the test harness, because the arena setting only holds for
//! threads that have not allocated yet, and the harness starts threads of its own.
//! Set `ONE_ARENA_OFF=1` to run it without `one_arena` and watch it fail (glibc keeps the
//! freed top of a thread's own arena).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use mesh_node::kernel::heap;

    fn rss() -> usize {
        heap::resident_bytes().expect("/proc/self/statm")
    }

    if std::env::var_os("ONE_ARENA_OFF").is_none() {
        heap::one_arena();
    }
    // A large buffer freed raises glibc's trim threshold (to twice its size): from then on a
    // `free` leaves up to 8 MiB at an arena's top, as after a proxy's bulk flow.
    drop(std::hint::black_box(vec![1u8; 4 << 20]));
    let (before, after) = std::thread::spawn(|| {
        // 6 MiB in 64 KiB blocks (inside the arena), written, then all freed: one free top.
        let blocks: Vec<Vec<u8>> = (0..96).map(|i| vec![i as u8 | 1; 64 << 10]).collect();
        assert!(blocks.iter().all(|b| b[0] != 0));
        drop(blocks);
        let before = rss();
        heap::trim();
        (before, rss())
    })
    .join()
    .expect("worker thread");
    let returned = before.saturating_sub(after);
    println!("RSS {before} -> {after} after the trim ({returned} bytes returned)");
    assert!(
        returned >= 4 << 20,
        "the worker's freed 6 MiB stayed resident: RSS {before} -> {after}"
    );
    println!("test one_arena ... ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}
