//! Zero-copy SIP parser and allocation-free serializer.
#![forbid(unsafe_code)]

pub mod framing;

pub use framing::{StreamFrame, frame_stream};
