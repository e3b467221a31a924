//! cargo-fuzz target `hbone_request`: the check and its properties are in `checks/hbone_request.rs`, shared with
//! the corpus test that `cargo test` runs (`tests/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/hbone_request.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
