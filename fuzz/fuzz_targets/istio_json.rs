//! cargo-fuzz target `istio_json`: the check and its properties are in `checks/istio_json.rs`, shared with
//! the corpus test that `cargo test` runs (`tests/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/istio_json.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
