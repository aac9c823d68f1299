//! Shared cluster state of `sipmesh`.
//!
//! * [`usrloc`]: the user-location table (AoR → registered contacts), read lock-free by the
//!   worker threads and updated with atomic read-modify-write closures.
//! * [`change`]: versioned change records (bincode 2, `config::standard()`), in an owned form
//!   for the consumer and a borrowed, allocation-free form for the producer.
//! * [`ring`]: a per-worker single-producer single-consumer byte ring carrying change records
//!   from a worker to the control plane.
//! * [`wheel`]: a sans-IO hashed timer wheel (binding expiry).
//! * [`ownership`]: the shared-memory ownership segment (active sharing tags, partition
//!   buckets) read by the workers before every externally visible action; with the
//!   driver islands of the dataplane, the only `unsafe` code of the project.
//! * [`apply`]: replication on the receiving side — [`Usrloc::apply_remote`] merges a change
//!   record from another node by last writer wins on the binding version (no local side
//!   effects), and [`Usrloc::snapshot_records`] yields the records of a full sync.
//! * [`digest`]: [`Digest`], an order-independent, incrementally maintainable digest of the
//!   bindings ([`Usrloc::digest`]), to verify a full sync.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod apply;
pub mod change;
pub mod dialog;
pub mod digest;
pub mod keepalive;
pub mod ownership;
pub mod presence;
pub mod ring;
pub mod sweep;
pub mod usrloc;
pub mod wheel;

pub use change::{Change, ChangeRecord, ChangeRecordRef, ChangeRef, RemoveReason, next_version};
pub use digest::Digest;
pub use ring::{ChangeBatch, ChangeConsumer, ChangeProducer, RingFull, RingStats, change_ring};
pub use usrloc::{
    AorRecord, Applied, Binding, BindingParts, FieldTooLong, Outcome, Update, Usrloc,
};
pub use wheel::TimerWheel;

/// Identifier of a node of the cluster.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Debug,
    Default,
    bincode::Encode,
    bincode::Decode,
)]
pub struct NodeId(pub u16);

/// The bincode configuration used for every record of this crate:
/// `bincode::config::standard()` (little endian, variable-length integers).
pub const BINCODE_CONFIG: bincode::config::Configuration = bincode::config::standard();
