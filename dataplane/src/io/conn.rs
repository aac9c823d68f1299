//! TCP connection state shared by both drivers: a slab of connections with generation
//! numbers, per-connection receive buffers, write queues and stream framing.

use sip_wire::{StreamFrame, frame_stream};
use socket2::Socket;

use super::stats::{IoStats, bump};
use super::{ConnId, Dest, Handler, Millis, Outbox, Source};

/// First size of a connection's receive buffer; it grows up to `max_message_size + 1`.
const INITIAL_RBUF: usize = 8 * 1024;

/// Why a connection is being closed (for the stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    Idle,
    Invalid,
    Peer,
    Local,
}

pub(crate) struct Conn {
    pub sock: Socket,
    /// Source handed to the handler (`conn` is set).
    pub src: Source,
    /// Receive buffer: `rbuf[rstart..rend]` holds unframed bytes.
    pub rbuf: Vec<u8>,
    pub rstart: usize,
    pub rend: usize,
    /// Bytes queued by the handler, not yet handed to the kernel.
    pub wq: Vec<u8>,
    /// Bytes being written: `wbuf[woff..]` is still to go. The io_uring driver never
    /// touches `wbuf` while a send is in flight.
    pub wbuf: Vec<u8>,
    pub woff: usize,
    pub last_rx: Millis,
    /// No more reading; close once the queued bytes are written.
    pub closing: bool,
    /// Write error or reset: drop queued bytes and close.
    pub aborted: bool,
    /// Already in the dirty list.
    pub dirty: bool,
    /// io_uring driver: operations in flight, cancel of the receive requested.
    pub recv_inflight: bool,
    pub send_inflight: bool,
    pub cancel_sent: bool,
    /// epoll driver: the registered interest.
    pub ep_events: u32,
}

impl Conn {
    pub fn new(sock: Socket, src: Source, max_message_size: usize, now: Millis) -> Conn {
        Conn {
            sock,
            src,
            rbuf: vec![0; INITIAL_RBUF.min(max_message_size + 1)],
            rstart: 0,
            rend: 0,
            wq: Vec::new(),
            wbuf: Vec::new(),
            woff: 0,
            last_rx: now,
            closing: false,
            aborted: false,
            dirty: false,
            recv_inflight: false,
            send_inflight: false,
            cancel_sent: false,
            ep_events: 0,
        }
    }

    /// Make room at the end of the receive buffer and return the free range's start.
    /// `None` if the buffer is full of one message, which framing rules out (a message
    /// never exceeds `max + 1` octets before `TooLarge`).
    pub fn prepare_rx(&mut self, max_message_size: usize) -> Option<usize> {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        if self.rend == self.rbuf.len() {
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            } else if self.rbuf.len() <= max_message_size {
                let grown = (self.rbuf.len() * 2).min(max_message_size + 1);
                self.rbuf.resize(grown, 0);
            } else {
                return None;
            }
        }
        Some(self.rend)
    }

    /// Move queued bytes to the write buffer when it is empty. Returns whether there is
    /// something to write.
    pub fn stage_write(&mut self) -> bool {
        if self.woff >= self.wbuf.len() {
            self.wbuf.clear();
            self.woff = 0;
            if !self.wq.is_empty() {
                std::mem::swap(&mut self.wq, &mut self.wbuf);
            }
        }
        self.woff < self.wbuf.len()
    }

    /// Nothing left to write.
    pub fn write_idle(&self) -> bool {
        self.woff >= self.wbuf.len() && self.wq.is_empty()
    }
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

/// The connections of one worker.
pub(crate) struct Conns {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    limit: usize,
    /// Connections with new output or a close request, to be handled by the driver.
    dirty: Vec<u32>,
    /// Largest write backlog per connection before it is closed as too slow.
    max_backlog: usize,
    /// A connection that received nothing for this long is closed.
    idle_ms: u64,
    /// How often to look for idle connections, and when next.
    sweep_every: u64,
    next_sweep: Millis,
}

impl Conns {
    pub fn new(limit: usize, max_message_size: usize, idle_ms: u64, tick_ms: u64) -> Conns {
        Conns {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            limit,
            dirty: Vec::with_capacity(64),
            max_backlog: (max_message_size * 16).max(1 << 20),
            idle_ms,
            sweep_every: idle_sweep_interval(idle_ms, tick_ms),
            next_sweep: 0,
        }
    }

    pub fn at_limit(&self) -> bool {
        self.live >= self.limit
    }

    /// Insert a connection built by `make` (which is given its id). `None` at the limit.
    pub fn insert(&mut self, make: impl FnOnce(ConnId) -> Conn) -> Option<ConnId> {
        if self.at_limit() {
            return None;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                u32::try_from(self.slots.len() - 1).ok()?
            }
        };
        let s = &mut self.slots[slot as usize];
        let id = ConnId {
            slot,
            generation: s.generation,
        };
        s.conn = Some(make(id));
        self.live += 1;
        Some(id)
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.conn.as_mut()
    }

    pub fn slot_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.slots.get_mut(slot as usize)?.conn.as_mut()
    }

    /// The generation of a slot (for stale-event checks).
    pub fn generation(&self, slot: u32) -> Option<u32> {
        self.slots.get(slot as usize).map(|s| s.generation)
    }

    /// Remove a connection (the socket closes when the returned value drops).
    pub fn remove(&mut self, slot: u32) -> Option<Conn> {
        let s = self.slots.get_mut(slot as usize)?;
        let conn = s.conn.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        Some(conn)
    }

    /// Slots of all live connections, written into `into` (cleared first).
    pub fn live_slots(&self, into: &mut Vec<u32>) {
        into.clear();
        for (i, s) in self.slots.iter().enumerate() {
            if s.conn.is_some() {
                into.push(i as u32);
            }
        }
    }

    pub fn mark_dirty(&mut self, slot: u32) {
        if let Some(c) = self.slot_mut(slot)
            && !c.dirty
        {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Swap the dirty list with `into` (which must be empty) and clear the dirty marks.
    pub fn take_dirty(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(&mut self.dirty, into);
        for &slot in into.iter() {
            if let Some(c) = self.slot_mut(slot) {
                c.dirty = false;
            }
        }
    }

    /// Begin closing every connection idle for the timeout, marking it dirty for the
    /// driver to service. Looks only every `idle_sweep_interval`, not on every tick, so a
    /// short tick does not scan every connection each time. `scratch` is working space.
    pub fn close_idle(&mut self, now: Millis, stats: &IoStats, scratch: &mut Vec<u32>) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + self.sweep_every;
        let idle_ms = self.idle_ms;
        self.live_slots(scratch);
        for &slot in scratch.iter() {
            if let Some(c) = self.slot_mut(slot)
                && !c.closing
                && now.saturating_sub(c.last_rx) >= idle_ms
            {
                begin_close(c, CloseReason::Idle, stats);
                self.mark_dirty(slot);
            }
        }
        scratch.clear();
    }

    /// Queue bytes on a connection (for `Dest::Conn`).
    pub fn queue(&mut self, id: ConnId, bytes: &[u8], stats: &IoStats) {
        let max_backlog = self.max_backlog;
        let Some(c) = self.get_mut(id) else {
            bump(&stats.tx_errors, 1);
            return;
        };
        if c.aborted || (c.closing && c.write_idle() && !c.send_inflight) {
            bump(&stats.tx_errors, 1);
            return;
        }
        if c.wq.len() + c.wbuf.len() - c.woff + bytes.len() > max_backlog {
            // The peer does not read: give up on it rather than buffer without bound.
            bump(&stats.tx_errors, 1);
            c.aborted = true;
            c.closing = true;
        } else {
            c.wq.extend_from_slice(bytes);
        }
        self.mark_dirty(id.slot);
    }

    /// Ask for a connection to be closed once its queued bytes are written.
    pub fn close(&mut self, id: ConnId, reason: CloseReason, stats: &IoStats) {
        if let Some(c) = self.get_mut(id) {
            begin_close(c, reason, stats);
            self.mark_dirty(id.slot);
        }
    }
}

/// Mark a connection closing and count why (once).
pub(crate) fn begin_close(c: &mut Conn, reason: CloseReason, stats: &IoStats) {
    if c.closing {
        return;
    }
    c.closing = true;
    let counter = match reason {
        CloseReason::Idle => &stats.tcp_closed_idle,
        CloseReason::Invalid => &stats.tcp_closed_invalid,
        CloseReason::Peer => &stats.tcp_closed_peer,
        CloseReason::Local => &stats.tcp_closed_local,
    };
    bump(counter, 1);
}

/// Frame `buf` (the unframed bytes of one connection), handing each message to the handler
/// and answering pings. Returns the octets consumed and whether the stream is broken.
pub(crate) fn process_stream<H: Handler, O: Outbox>(
    buf: &[u8],
    max_message_size: usize,
    src: &Source,
    now: Millis,
    handler: &mut H,
    out: &mut O,
    stats: &IoStats,
) -> (usize, bool) {
    let Some(conn) = src.conn else {
        return (buf.len(), true);
    };
    let mut pos = 0;
    loop {
        match frame_stream(&buf[pos..], max_message_size) {
            StreamFrame::Message(n) => {
                bump(&stats.tcp_rx_msgs, 1);
                handler.on_message(&buf[pos..pos + n], src, now, out);
                pos += n;
            }
            StreamFrame::Ping(n) => {
                // RFC 5626 §3.5.1: answer a double-CRLF ping with a single CRLF pong.
                bump(&stats.tcp_pings, 1);
                out.send(Dest::Conn(conn), |b| match b.get_mut(..2) {
                    Some(pong) => {
                        pong.copy_from_slice(b"\r\n");
                        2
                    }
                    None => 0,
                });
                pos += n;
            }
            StreamFrame::Skip(n) => pos += n,
            StreamFrame::Incomplete => return (pos, false),
            StreamFrame::TooLarge | StreamFrame::Invalid => return (pos, true),
        }
    }
}

/// Pick the UDP socket for a destination: the one the current message came in on when
/// the family matches, else the first of the family.
pub(crate) fn pick_udp(
    locals: &[std::net::SocketAddr],
    current: Option<usize>,
    to: std::net::SocketAddr,
) -> Option<usize> {
    if let Some(i) = current
        && locals.get(i).is_some_and(|l| l.is_ipv4() == to.is_ipv4())
    {
        return Some(i);
    }
    locals.iter().position(|l| l.is_ipv4() == to.is_ipv4())
}

/// How often to look for idle connections: an eighth of the timeout (so a connection is
/// closed at most 12.5% late), between one tick and one second.
fn idle_sweep_interval(idle_ms: u64, tick_ms: u64) -> u64 {
    (idle_ms / 8).clamp(tick_ms.min(1000), 1000)
}
