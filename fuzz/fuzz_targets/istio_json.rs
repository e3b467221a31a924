//! The Kubernetes source's conversion (`config::parse::convert` through the JSON reader, as
//! the controller runs it on objects from the API server) on arbitrary JSON: an object it
//! cannot use is an error, never a panic. The object's `kind` is tried, and every kind the
//! mesh reads, so a corpus entry exercises all the converters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::config::parse::convert_json;
use mesh_node::model::Origin;

const KINDS: &[&str] = &[
    "VirtualService",
    "DestinationRule",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "HTTPRoute",
    "Pod",
    "Service",
    "Namespace",
    "Node",
    "ServiceAccount",
    "MeshConfig",
    "RateLimitPolicy",
];

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let own = v.get("kind").and_then(|k| k.as_str()).map(str::to_string);
    for kind in own.iter().map(String::as_str).chain(KINDS.iter().copied()) {
        if let Some(Ok(obj)) = convert_json(kind, &v, Origin::kubernetes("fuzz".into())) {
            let _ = obj.id().to_string();
        }
    }
});
