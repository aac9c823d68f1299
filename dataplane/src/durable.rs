//! Durability gate of one worker: a REGISTER's 200 is held back until the change records
//! it depends on are stored — with no slack in `sync` durability (in the synced
//! write-ahead log), with a bounded slack in `async` (so that a store that falls behind
//! bounds what a crash can lose instead of letting the backlog grow).
//!
//! The worker's change ring numbers its records by how many it has pushed; the
//! persistence side publishes, per worker, how many of them are stored
//! ([`DurableShared::durable`]) and rings the worker's [`Doorbell`] when the worker waits.
//! A reply is parked with the ring position reached when it was decided and sent once
//! that position, less the slack, is stored — in order, without allocation: parked replies
//! are written into one arena allocated at start, and a REGISTER that finds no room for
//! its reply is refused (503) before it changes anything.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::io::{ConnId, Dest, Doorbell, Outbox};

/// What the worker and the persistence side share.
#[derive(Debug)]
pub struct DurableShared {
    /// Records of the worker's change ring that are durable (a count, as the ring's own
    /// "pushed" counter).
    pub durable: AtomicU64,
    /// Rung after `durable` advances, when the worker waits.
    pub doorbell: Doorbell,
    /// The worker may wait (set before it checks `durable`, cleared when nothing waits).
    pub waiting: AtomicBool,
}

impl DurableShared {
    /// A new shared state with its eventfd.
    pub fn new() -> std::io::Result<Arc<DurableShared>> {
        Ok(Arc::new(DurableShared {
            durable: AtomicU64::new(0),
            doorbell: Doorbell::new()?,
            waiting: AtomicBool::new(false),
        }))
    }

    /// Persistence side: `n` records are stored; wakes the worker when it waits. (The
    /// worker sets `waiting` before it reads `durable`, this side writes `durable` before
    /// it reads `waiting`, both sequentially consistent: one of them sees the other.)
    pub fn publish(&self, n: u64) {
        if self.durable.fetch_max(n, Ordering::SeqCst) < n && self.waiting.load(Ordering::SeqCst) {
            self.doorbell.ring();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Parked {
    pos: u64,
    dest: Dest,
    start: usize,
    len: usize,
}

/// The worker side: parked replies.
#[derive(Debug)]
pub struct Gate {
    shared: Arc<DurableShared>,
    arena: Vec<u8>,
    head: usize,
    tail: usize,
    parked: VecDeque<Parked>,
    max_msg: usize,
    /// Records that may be unstored when a reply leaves (0: `sync`).
    slack: u64,
}

impl Gate {
    /// `arena_bytes` of parking space (at least one maximum-size message); a reply leaves
    /// once all but `slack` of the records pushed before it are stored.
    pub fn new(shared: Arc<DurableShared>, arena_bytes: usize, max_msg: usize, slack: u64) -> Gate {
        let size = arena_bytes.max(max_msg);
        Gate {
            shared,
            arena: vec![0; size],
            head: 0,
            tail: 0,
            parked: VecDeque::with_capacity(size / 256 + 1),
            max_msg,
            slack,
        }
    }

    /// The eventfd the driver waits on.
    pub fn doorbell(&self) -> std::os::fd::RawFd {
        self.shared.doorbell.as_raw_fd()
    }

    /// Whether a reply decided at ring position `pos` may leave now. Marks the worker as
    /// possibly waiting first, so that a publish racing with this check still wakes it.
    pub fn is_durable(&self, pos: u64) -> bool {
        self.shared.waiting.store(true, Ordering::SeqCst);
        let ok = self.shared.durable.load(Ordering::SeqCst) + self.slack >= pos;
        if ok && self.parked.is_empty() {
            self.shared.waiting.store(false, Ordering::Relaxed);
        }
        ok
    }

    /// Whether one more reply of the maximum size can be parked (compacting if needed).
    pub fn has_room(&mut self) -> bool {
        if self.parked.is_empty() {
            self.head = 0;
            self.tail = 0;
        }
        if self.tail + self.max_msg <= self.arena.len() {
            return true;
        }
        if self.head > 0 {
            self.arena.copy_within(self.head..self.tail, 0);
            for p in &mut self.parked {
                p.start -= self.head;
            }
            self.tail -= self.head;
            self.head = 0;
        }
        self.tail + self.max_msg <= self.arena.len() && self.parked.len() < self.parked.capacity()
    }

    /// Replies waiting.
    pub fn pending(&self) -> usize {
        self.parked.len()
    }

    /// An [`Outbox`] that parks what is sent until `pos` is durable. Call
    /// [`Gate::has_room`] first.
    pub fn parking(&mut self, pos: u64) -> ParkOut<'_> {
        ParkOut { gate: self, pos }
    }

    /// Sends, in order, every parked reply whose records are durable.
    pub fn release<O: Outbox>(&mut self, out: &mut O) -> usize {
        let durable = self.shared.durable.load(Ordering::SeqCst) + self.slack;
        let mut n = 0;
        while let Some(p) = self.parked.front().copied() {
            if p.pos > durable {
                break;
            }
            self.parked.pop_front();
            let bytes = &self.arena[p.start..p.start + p.len];
            out.send(p.dest, |buf| {
                buf[..bytes.len()].copy_from_slice(bytes);
                bytes.len()
            });
            self.head = p.start + p.len;
            n += 1;
        }
        if self.parked.is_empty() {
            self.head = 0;
            self.tail = 0;
            self.shared.waiting.store(false, Ordering::Relaxed);
        }
        n
    }
}

/// See [`Gate::parking`].
pub struct ParkOut<'g> {
    gate: &'g mut Gate,
    pos: u64,
}

impl Outbox for ParkOut<'_> {
    fn send(&mut self, to: Dest, fill: impl FnOnce(&mut [u8]) -> usize) {
        let g = &mut *self.gate;
        if g.tail + g.max_msg > g.arena.len() {
            // The caller checked `has_room`; nothing else parks in between.
            debug_assert!(false, "parking without room");
            return;
        }
        let start = g.tail;
        let n = fill(&mut g.arena[start..start + g.max_msg]);
        if n == 0 {
            return;
        }
        g.tail += n;
        g.parked.push_back(Parked {
            pos: self.pos,
            dest: to,
            start,
            len: n,
        });
    }

    fn close(&mut self, _conn: ConnId) {
        // Replies to REGISTER never close a connection.
        debug_assert!(false, "a parked reply cannot close a connection");
    }
}
