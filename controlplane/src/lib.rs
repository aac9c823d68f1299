//! The control plane of a sipmesh node and the `sipd` binary's building blocks.
#![forbid(unsafe_code)]

pub mod cdr;
pub mod config;
pub mod grpc;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod store;

/// Generated protobuf and gRPC code (`proto/sipmesh.proto`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("sipmesh.v1");
}
