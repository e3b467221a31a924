//! cargo-fuzz target `state_update`: the check and its properties are in `checks/state_update.rs`, shared with
//! the corpus test that `cargo test` runs (`tests/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/state_update.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
