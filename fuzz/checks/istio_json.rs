//! `istio_json`: the Kubernetes source's conversion (`config::parse::convert_json`, as the
//! controller runs it on objects from the API server) on arbitrary JSON. The object's `kind`
//! is tried, and every kind the mesh reads, so a corpus entry exercises all the converters.
//! Shared by the cargo-fuzz target and the corpus test; a violated property panics.
//!
//! Properties: no panic; an accepted Istio object is valid and survives the state stream's
//! JSON encoding unchanged; conversion is deterministic.

use mesh_node::config::parse::convert_json;
use mesh_node::model::istio::IstioSpec;
use mesh_node::model::{Object, Origin};

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

pub fn run(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let own = v.get("kind").and_then(|k| k.as_str()).map(str::to_string);
    for kind in own.iter().map(String::as_str).chain(KINDS.iter().copied()) {
        let got = convert_json(kind, &v, Origin::kubernetes("fuzz".into()));
        if let Some(Ok(obj)) = &got {
            let _ = obj.id().to_string();
            if let Object::Istio(o) = obj {
                assert_eq!(o.spec.validate(), Ok(()), "accepted an invalid {kind}");
                let json = serde_json::to_string(&o.spec)
                    .unwrap_or_else(|e| panic!("accepted {kind} does not serialize: {e}"));
                let back: IstioSpec = serde_json::from_str(&json)
                    .unwrap_or_else(|e| panic!("{kind} does not decode from its JSON {json}: {e}"));
                assert_eq!(back, o.spec, "{kind} changed through JSON {json}");
            }
        }
        let again = convert_json(kind, &v, Origin::kubernetes("fuzz".into()));
        assert_eq!(
            again.as_ref().map(|r| r.as_ref().ok()),
            got.as_ref().map(|r| r.as_ref().ok()),
            "converting {kind} is not deterministic"
        );
    }
}
