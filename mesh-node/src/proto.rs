//! Generated gRPC types and services of `proto/sidenode.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sidenode.v1");

impl Workload {
    /// The data plane serving this workload; from `meshed` when the controller predates the
    /// `dataplane` field.
    pub fn served_by(&self) -> Dataplane {
        match self.dataplane() {
            Dataplane::Unspecified if self.meshed => Dataplane::Sidenode,
            Dataplane::Unspecified => Dataplane::None,
            d => d,
        }
    }

    /// Reached over HBONE at its first address `:15008`: sidenode's pods and Istio's.
    pub fn hbone_destination(&self) -> bool {
        matches!(self.served_by(), Dataplane::Sidenode | Dataplane::Istio)
    }
}

impl From<crate::model::Dataplane> for Dataplane {
    fn from(d: crate::model::Dataplane) -> Self {
        match d {
            crate::model::Dataplane::None => Dataplane::None,
            crate::model::Dataplane::Sidenode => Dataplane::Sidenode,
            crate::model::Dataplane::Istio => Dataplane::Istio,
        }
    }
}
