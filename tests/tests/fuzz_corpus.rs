//! The fuzz targets' checks (`fuzz/checks/*.rs`, shared with the cargo-fuzz targets of
//! `fuzz/`) as ordinary tests, so `cargo test` and `cargo xtask test` run them on a fresh
//! machine with the stable toolchain: each target's committed corpus, then a fixed number of
//! deterministic mutations of it (a seeded generator: the same inputs on every run, no timing).
//! No root, no cluster. The long, coverage-guided runs stay in `cargo xtask fuzz`.
//!
//! A failing input is written to `$CARGO_TARGET_TMPDIR/fuzz-failures/`; replay it with
//! `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>`.

#[path = "../../fuzz/checks/config_yaml.rs"]
mod config_yaml;
#[path = "../../fuzz/checks/forwarded.rs"]
mod forwarded;
#[path = "../../fuzz/checks/hbone_request.rs"]
mod hbone_request;
#[path = "../../fuzz/checks/http_route_match.rs"]
mod http_route_match;
#[path = "../../fuzz/checks/istio_json.rs"]
mod istio_json;
#[path = "../../fuzz/checks/spiffe_san.rs"]
mod spiffe_san;
#[path = "../../fuzz/checks/state_update.rs"]
mod state_update;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Mutated inputs per target, on top of its corpus.
const MUTATIONS: usize = 5000;

/// Text fragments the mutator inserts (YAML, JSON, URIs and authorities are text).
const TOKENS: &[&[u8]] = &[
    b"\n",
    b"---\n",
    b": ",
    b"- ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"/",
    b"*",
    b"\"exact\":",
    b"\"prefix\":",
    b"\"regex\":",
    b".*",
    b"(",
    b"spiffe://",
    b"/ns/",
    b"/sa/",
    b"[::1]",
    b":0",
    b":65536",
    b"\xff",
    b"\x00",
    b"null",
    b"true",
    b"-1",
    b"1e400",
];

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            let path = e
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path.display().to_string(), data)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no corpus in {}", dir.display());
    seeds
}

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// One to four edits of a seed: bit flips, byte changes, insertions (bytes or tokens),
/// deletions, duplications, truncation, and splices with another seed.
fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(d.len() + 1);
        match rng.below(8) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = [0, 0xff, 0x7f, 0x80, b'0', b' ', b'\n'][rng.below(7)];
            }
            2 => d.insert(at, rng.next() as u8),
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                d.splice(at..at, t.iter().copied());
            }
            4 if !d.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(d.len());
                d.drain(at.min(end)..end);
            }
            5 if !d.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(d.len());
                let piece: Vec<u8> = d[at.min(end)..end].to_vec();
                d.splice(at..at, piece);
            }
            6 => d.truncate(at),
            _ => {
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len() + 1);
                d.truncate(at);
                d.extend_from_slice(&other[from..]);
            }
        }
    }
    d
}

fn failure_path(target: &str, n: usize) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(format!("{target}-{n}"))
}

/// Runs `check` on every corpus entry, then on [`MUTATIONS`] mutations of them.
fn exercise(target: &str, check: fn(&[u8])) {
    let seeds = corpus(target);
    let seed = target.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng(seed | 1);
    let inputs = seeds
        .iter()
        .map(|(name, d)| (name.clone(), d.clone()))
        .chain((0..MUTATIONS).map(|i| (format!("mutation {i}"), mutate(&mut rng, &seeds))));
    for (n, (what, input)) in inputs.enumerate() {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let path = failure_path(target, n);
            let saved = path
                .parent()
                .map(std::fs::create_dir_all)
                .and_then(|r| r.ok())
                .and_then(|()| std::fs::write(&path, &input).ok())
                .map_or("not saved".to_string(), |()| path.display().to_string());
            panic!("{target}: {what} failed ({saved}): {msg}");
        }
    }
}

#[test]
fn config_yaml() {
    exercise("config_yaml", config_yaml::run);
}

#[test]
fn istio_json() {
    exercise("istio_json", istio_json::run);
}

#[test]
fn hbone_request() {
    exercise("hbone_request", hbone_request::run);
}

#[test]
fn forwarded() {
    exercise("forwarded", forwarded::run);
}

#[test]
fn http_route_match() {
    exercise("http_route_match", http_route_match::run);
}

#[test]
fn state_update() {
    exercise("state_update", state_update::run);
}

#[test]
fn spiffe_san() {
    exercise("spiffe_san", spiffe_san::run);
}
