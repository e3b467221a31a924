//! `config_yaml`: the standalone configuration folder's parser on arbitrary text. Shared by the
//! cargo-fuzz target (`fuzz_targets/config_yaml.rs`) and the corpus test
//! (`tests/tests/fuzz_corpus.rs`); a violated property panics.
//!
//! Properties: no panic; every error names a line of the file; parsing is deterministic; and
//! every Istio object the parser accepts is valid and survives the state stream's encoding
//! unchanged (the controller sends `serde_json::to_string(&spec)`, the node decodes it back).

use mesh_node::config::parse::parse_file;
use mesh_node::model::Object;
use mesh_node::model::istio::IstioSpec;
use std::path::Path;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_file(Path::new("fuzz.yaml"), &text);
    let lines = text.lines().count().max(1);
    for e in &parsed.errors {
        let shown = e.to_string();
        assert!(
            e.line >= 1 && e.line <= lines + 1,
            "error on line {} of a {lines}-line file: {shown}",
            e.line
        );
    }
    for o in &parsed.objects {
        let _ = o.id().to_string();
        if let Object::Istio(obj) = o {
            assert_eq!(
                obj.spec.validate(),
                Ok(()),
                "accepted an invalid {}",
                o.id()
            );
            let json = serde_json::to_string(&obj.spec)
                .unwrap_or_else(|e| panic!("accepted {} does not serialize: {e}", o.id()));
            let back: IstioSpec = serde_json::from_str(&json).unwrap_or_else(|e| {
                panic!("{} does not decode from its own JSON {json}: {e}", o.id())
            });
            assert_eq!(back, obj.spec, "{} changed through JSON {json}", o.id());
        }
    }
    let again = parse_file(Path::new("fuzz.yaml"), &text);
    assert_eq!(
        again.objects, parsed.objects,
        "parsing is not deterministic"
    );
    assert_eq!(again.errors.len(), parsed.errors.len());
}
