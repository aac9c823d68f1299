//! The dataplane of a sipmesh node: per-core workers and the sans-IO SIP logic they run.
#![deny(unsafe_code)]

pub mod core;
pub mod date;
pub mod durable;
pub mod io;
pub mod mailbox;
pub mod pinger;
pub mod presence;
pub mod proxy;
pub mod registrar;
pub mod stateful;
pub mod txn;
