//! cargo-fuzz target `spiffe_san`: the check and its properties are in `checks/spiffe_san.rs`, shared with
//! the corpus test that `cargo test` runs (`tests/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/spiffe_san.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
