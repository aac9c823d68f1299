//! The I/O side of a worker: sockets, the io_uring driver and the epoll fallback.
//!
//! Drivers are thin: they receive bytes, hand each SIP message to a [`Handler`] together
//! with its [`Source`] and the current time, and send whatever the handler wrote into the
//! [`Outbox`]. They hold no SIP decisions.

use std::net::SocketAddr;

/// Wall-clock time given to the sans-IO logic: milliseconds since the Unix epoch.
pub type Millis = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The token used in Via and in `transport=` parameters.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

/// A TCP connection held by the worker that accepted it. `generation` makes a stale id
/// (connection closed, slot reused) harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub generation: u32,
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub transport: Transport,
    /// The peer's address (IPv4-mapped IPv6 addresses are reported as IPv4).
    pub remote: SocketAddr,
    /// The local address the message arrived on.
    pub local: SocketAddr,
    /// Set for TCP.
    pub conn: Option<ConnId>,
}

/// Where an outgoing message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// A UDP datagram, sent from the worker's UDP socket of the matching address family.
    Udp(SocketAddr),
    /// Bytes appended to a TCP connection of this worker.
    Conn(ConnId),
}

/// Buffers a driver owns, into which the handler writes what it sends.
pub trait Outbox {
    /// Give `fill` a buffer of at least the configured maximum message size; `fill`
    /// writes the message and returns its length (0: send nothing). The driver queues the
    /// bytes for sending (batched) without allocating.
    fn send(&mut self, to: Dest, fill: impl FnOnce(&mut [u8]) -> usize);
    /// How many more UDP datagrams this call can hand over without any being dropped
    /// (the driver's free send buffers); a large fan-out sends while there is room and
    /// the rest at the next call.
    fn room(&self) -> usize {
        usize::MAX
    }
    /// Close a TCP connection (after what was already queued on it is sent).
    fn close(&mut self, conn: ConnId);
}

/// The SIP logic of one worker, as the drivers see it.
pub trait Handler {
    /// One complete SIP message: a UDP datagram, or one framed message of a TCP stream.
    fn on_message<O: Outbox>(&mut self, msg: &[u8], src: &Source, now: Millis, out: &mut O);
    /// A UDP datagram larger than the maximum message size; `head` is its first octets
    /// (RFC 3261 §18.1.1 / §21.5.14: answer 513 when the headers allow it).
    fn on_oversize<O: Outbox>(&mut self, head: &[u8], src: &Source, now: Millis, out: &mut O);
    /// Called at least every tick interval, also when idle: timers run here.
    fn on_tick<O: Outbox>(&mut self, now: Millis, out: &mut O);
    /// An eventfd the driver should wait on besides its sockets (see [`Doorbell`]); asked
    /// once when the driver starts. The handler keeps it open while the driver runs.
    fn doorbell(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The doorbell rang.
    fn on_wake<O: Outbox>(&mut self, _now: Millis, _out: &mut O) {}
}

/// Read the wall clock (vDSO, no system call on Linux x86_64).
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

mod config;
mod conn;
mod epoll;
mod sockets;
mod spawn;
mod stats;
mod sys;
mod uring;

pub use config::{Backend, IoConfig};
pub use spawn::{Workers, spawn_workers};
pub use stats::{IoStats, IoStatsSnapshot};
pub use sys::Doorbell;
