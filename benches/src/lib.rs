//! Criterion benchmarks and measurement tools for `sipmesh`.
//!
//! The benchmarks themselves are the `[[bench]]` targets next to this crate's manifest
//! (`parse.rs`, `usrloc.rs`, `core.rs`); this library holds what they share.

pub mod msgs;
