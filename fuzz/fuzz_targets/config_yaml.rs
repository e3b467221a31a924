//! The standalone configuration folder's parser on arbitrary text: it reports errors, never
//! panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::config::parse::parse_file;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_file(Path::new("fuzz.yaml"), &text);
    // Whatever was read is printable (errors name file, line and field).
    for e in &parsed.errors {
        let _ = e.to_string();
    }
    for o in &parsed.objects {
        let _ = o.id().to_string();
    }
});
