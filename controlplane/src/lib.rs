//! The control plane of a sipmesh node and the `sipd` binary's building blocks.
#![forbid(unsafe_code)]

pub mod config;
pub mod node;
