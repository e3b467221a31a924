//! cargo-fuzz target `http_route_match`: the check and its properties are in `checks/http_route_match.rs`, shared with
//! the corpus test that `cargo test` runs (`tests/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../checks/http_route_match.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
