//! Per-worker counters. Each counter has a single writer (its worker), so an increment is a
//! relaxed load and store, not a read-modify-write; readers may see slightly stale values.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! io_stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one worker, shared with whoever holds [`Workers`](super::Workers).
        #[derive(Debug, Default)]
        pub struct IoStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A plain copy of [`IoStats`]; `+` sums workers.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct IoStatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl IoStats {
            pub fn snapshot(&self) -> IoStatsSnapshot {
                IoStatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl std::ops::Add for IoStatsSnapshot {
            type Output = IoStatsSnapshot;
            fn add(self, o: IoStatsSnapshot) -> IoStatsSnapshot {
                IoStatsSnapshot { $($name: self.$name + o.$name,)* }
            }
        }
    };
}

io_stats! {
    /// UDP datagrams handed to `on_message`.
    udp_rx,
    /// UDP datagrams sent.
    udp_tx,
    /// UDP datagrams over the maximum size (handed to `on_oversize`).
    udp_oversize,
    /// UDP receive errors (other than "would block" / "no buffers").
    udp_rx_errors,
    /// TCP connections accepted and kept.
    tcp_accepted,
    /// TCP connections closed at once because the worker was at its limit.
    tcp_rejected_over_limit,
    /// TCP connections closed for idleness.
    tcp_closed_idle,
    /// TCP connections closed because of broken or too large framing.
    tcp_closed_invalid,
    /// TCP connections closed by the peer or after an I/O error.
    tcp_closed_peer,
    /// TCP connections closed by the handler (`Outbox::close`).
    tcp_closed_local,
    /// TCP messages handed to `on_message`.
    tcp_rx_msgs,
    /// RFC 5626 CRLFCRLF pings answered.
    tcp_pings,
    /// Bytes written on TCP connections.
    tcp_tx_bytes,
    /// Send errors (UDP send failed, no socket of the family, TCP write error or backlog).
    tx_errors,
    /// Messages dropped because no send buffer was free.
    tx_dropped,
    /// Accept errors.
    accept_errors,
    /// `on_tick` calls.
    ticks,
}

/// Add `n` to a counter of which the caller is the only writer.
#[inline]
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

impl IoStatsSnapshot {
    /// Sum a set of snapshots.
    pub fn sum<'a>(it: impl IntoIterator<Item = &'a IoStatsSnapshot>) -> IoStatsSnapshot {
        it.into_iter()
            .fold(IoStatsSnapshot::default(), |a, b| a + *b)
    }
}
