//! Generated gRPC types and services of `proto/sidenode.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sidenode.v1");
