//! NAT keepalives (the nathelper role), sans-IO.
//!
//! Contacts flagged at registration ([`crate::usrloc::FLAG_KEEPALIVE`]) are pinged at a
//! fixed interval, spread evenly over it: each AoR has a phase (a hash of the AoR modulo
//! the interval), so its pings are due at `k * interval + phase`, the same instants on
//! every node. The [`Scheduler`] (in the control plane, which sees every change, local
//! or replicated) walks a timer wheel of AoRs; for each keepalive binding due it asks
//! whether this node acts on it *at the due time* (the ownership segment: the binding's
//! sharing tag and the AoR's bucket) and, if so, hands a [`PingOrder`] to a worker over
//! an SPSC ring. The worker checks the segment again for the same due time before it
//! sends — so a hand-over at a boundary never pings a contact twice nor skips it — and
//! sends an OPTIONS (or a 4-byte CRLF ping) from its SIP socket.
//!
//! Replies to OPTIONS pings may reach any worker; the branch names the ack slot and the
//! ping, under a per-process key, and the worker records it in the shared [`Acks`]
//! (one atomic per tracked contact, no lock). At the next due time the scheduler counts
//! an unanswered ping as a miss; `max_misses` in a row remove the binding through a
//! replicated change record ([`crate::sweep::Remover`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ownership::bucket_of;
use crate::usrloc::{Binding, TRANSPORT_UDP, Usrloc};

/// Longest Contact URI carried in an order; a longer one is pinged as `sip:IP:PORT`.
pub const PING_URI_MAX: usize = 200;
/// Granularity of the scheduler's wheel.
pub const SLOT_MS: u64 = 10;
/// Branch prefix of keepalive pings (RFC 3261 magic cookie + our marker).
pub const BRANCH_PREFIX: &[u8] = b"z9hG4bK.ka.";

/// How contacts are pinged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PingMethod {
    /// A SIP OPTIONS request; an answer (any status) proves the contact alive.
    #[default]
    Options,
    /// A 4-byte `CRLFCRLF` datagram that only keeps the NAT binding open (no answer).
    Crlf,
}

impl PingMethod {
    /// `options` or `crlf`.
    pub fn parse(s: &str) -> Option<PingMethod> {
        match s {
            "options" => Some(PingMethod::Options),
            "crlf" => Some(PingMethod::Crlf),
            _ => None,
        }
    }

    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            PingMethod::Options => "options",
            PingMethod::Crlf => "crlf",
        }
    }
}

/// One ping for a worker to send (fixed size: the ring holds values, no allocation).
#[derive(Clone, Copy, Debug)]
pub struct PingOrder {
    /// Where the contact registered from (the NAT's public side).
    pub dest: SocketAddr,
    /// When the ping was due (wall-clock ms): the ownership check is made for this time.
    pub due_ms: u64,
    /// Ack slot (`u32::MAX`: replies are not tracked).
    pub ack_slot: u32,
    /// Ping id in that slot (slot generation << 32 | sequence).
    pub ping_id: u64,
    /// Ownership segment slot of the binding's sharing tag.
    pub tag_slot: u16,
    /// Partition bucket of the AoR.
    pub bucket: u16,
    /// How to ping.
    pub method: PingMethod,
    uri_len: u16,
    uri: [u8; PING_URI_MAX],
}

impl PingOrder {
    /// The Request-URI of the OPTIONS: the Contact URI, or `sip:IP:PORT` when it is too
    /// long for an order.
    pub fn uri(&self) -> &[u8] {
        &self.uri[..self.uri_len as usize]
    }

    fn new(
        b: &Binding,
        due_ms: u64,
        track: (u32, u64),
        tag_slot: u16,
        bucket: u16,
        method: PingMethod,
    ) -> PingOrder {
        let mut uri = [0u8; PING_URI_MAX];
        let c = b.contact();
        let uri_len = if c.len() <= PING_URI_MAX {
            uri[..c.len()].copy_from_slice(c);
            c.len()
        } else {
            use std::io::Write;
            let mut w = &mut uri[..];
            let _ = write!(w, "sip:{}", b.source());
            PING_URI_MAX - w.len()
        };
        PingOrder {
            dest: b.source(),
            due_ms,
            ack_slot: track.0,
            ping_id: track.1,
            tag_slot,
            bucket,
            method,
            uri_len: uri_len as u16,
            uri,
        }
    }
}

/// Producer half of a worker's order ring (the control plane).
pub type OrderProducer = rtrb::Producer<PingOrder>;
/// Consumer half (the worker).
pub type OrderConsumer = rtrb::Consumer<PingOrder>;

/// A ring of `capacity` orders, allocated once.
pub fn order_ring(capacity: usize) -> (OrderProducer, OrderConsumer) {
    rtrb::RingBuffer::new(capacity)
}

/// Answers to OPTIONS pings: per tracked contact, the highest ping id answered. Shared
/// by the scheduler and every worker; written with atomic max, no lock.
#[derive(Debug)]
pub struct Acks {
    slots: Box<[AtomicU64]>,
    key: u64,
}

impl Acks {
    /// Room for `capacity` tracked contacts; `key` authenticates branches.
    pub fn new(capacity: usize, key: u64) -> Acks {
        Acks {
            slots: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            key,
        }
    }

    /// Tracked contacts at most.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn mac(&self, slot: u32, id: u64) -> u32 {
        let mut h: u64 = self.key ^ 0xcbf2_9ce4_8422_2325;
        for b in u64::from(slot)
            .to_le_bytes()
            .into_iter()
            .chain(id.to_le_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
    }

    /// Writes the branch of a ping into `out`: `z9hG4bK.ka.SLOT.ID.MAC` in hex; returns
    /// its length.
    pub fn branch(&self, slot: u32, id: u64, out: &mut [u8; 64]) -> usize {
        use std::io::Write;
        let mut w = &mut out[..];
        let _ = w.write_all(BRANCH_PREFIX);
        let _ = write!(w, "{slot:x}.{id:x}.{:x}", self.mac(slot, id));
        64 - w.len()
    }

    /// A response's top Via branch: if it is one of our pings, records the answer and
    /// returns true. A forged or stale branch changes nothing.
    pub fn on_reply(&self, branch: &[u8]) -> bool {
        let Some(rest) = branch.strip_prefix(BRANCH_PREFIX) else {
            return false;
        };
        let mut it = rest.split(|&b| b == b'.');
        let hex = |p: Option<&[u8]>| {
            p.and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|p| u64::from_str_radix(p, 16).ok())
        };
        let (Some(slot), Some(id), Some(mac), None) =
            (hex(it.next()), hex(it.next()), hex(it.next()), it.next())
        else {
            return false;
        };
        let Ok(slot) = u32::try_from(slot) else {
            return false;
        };
        if u64::from(self.mac(slot, id)) != mac {
            return false;
        }
        match self.slots.get(slot as usize) {
            Some(a) => {
                a.fetch_max(id, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn answered(&self, slot: u32, id: u64) -> bool {
        self.slots
            .get(slot as usize)
            .is_some_and(|a| a.load(Ordering::Relaxed) >= id)
    }

    /// Starts generation `gen` of `slot`: earlier pings' answers no longer count.
    fn reset(&self, slot: u32, generation: u32) {
        if let Some(a) = self.slots.get(slot as usize) {
            a.store(u64::from(generation) << 32, Ordering::Relaxed);
        }
    }
}

/// Keepalive settings (runtime: `sipctl ping`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Pings are sent at all.
    pub enabled: bool,
    /// OPTIONS or CRLF.
    pub method: PingMethod,
    /// Ping period per contact, ms.
    pub interval_ms: u64,
    /// Unanswered OPTIONS pings in a row that remove a binding (0: never).
    pub max_misses: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            method: PingMethod::Options,
            interval_ms: 30_000,
            max_misses: 3,
        }
    }
}

/// What the scheduler wants done.
// Handed straight to the driver's callback, never stored: boxing the order would cost
// an allocation per ping.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    /// Hand this ping to a worker (`bucket % workers`).
    Ping(PingOrder),
    /// Remove the bindings of `aor` whose [`contact_key`] is in `keys` (they stopped
    /// answering): a replicated, owner-gated removal.
    Remove {
        /// The AoR.
        aor: Arc<[u8]>,
        /// Contacts to remove.
        keys: Vec<u64>,
    },
}

/// Counters of the scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// AoRs on the wheel.
    pub aors: u64,
    /// Contacts with miss tracking (owned here lately).
    pub tracked: u64,
    /// Pings ordered.
    pub ordered: u64,
    /// Due pings another node acts on.
    pub not_owner: u64,
    /// Pings that went unanswered.
    pub missed: u64,
    /// Bindings removed after `max_misses`.
    pub removed: u64,
    /// Contacts pinged without tracking (no free ack slot).
    pub untracked: u64,
}

#[derive(Debug)]
struct Tracked {
    key: u64,
    slot: u32,
    generation: u32,
    seq: u32,
    misses: u32,
}

/// Identity of a binding within its AoR (Contact URI, instance, reg-id).
pub fn contact_key(b: &Binding) -> u64 {
    let mut h = std::hash::BuildHasherDefault::<Fnv>::default().build_hasher();
    h.write(b.contact());
    h.write(&[0]);
    h.write(b.instance());
    h.write_u32(b.reg_id);
    h.finish()
}

/// FNV-1a: stable across processes, so every node computes the same phases.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Phase of an AoR's pings within the interval (the same on every node).
pub fn phase(aor: &[u8], interval_ms: u64) -> u64 {
    let mut h = Fnv::default();
    h.write(aor);
    h.finish() % interval_ms.max(1)
}

/// The keepalive timer wheel of one node.
#[derive(Debug)]
pub struct Scheduler {
    settings: Settings,
    wheel: Vec<Vec<Arc<[u8]>>>,
    members: HashMap<Arc<[u8]>, Vec<Tracked>>,
    /// Wall-clock ms up to which due times were processed (exclusive).
    cursor: Option<u64>,
    acks: Arc<Acks>,
    free: Vec<(u32, u32)>,
    next_slot: u32,
    stats: Stats,
}

impl Scheduler {
    /// A scheduler with `settings`, tracking answers in `acks`.
    pub fn new(settings: Settings, acks: Arc<Acks>) -> Scheduler {
        let mut s = Scheduler {
            settings,
            wheel: Vec::new(),
            members: HashMap::new(),
            cursor: None,
            acks,
            free: Vec::new(),
            next_slot: 0,
            stats: Stats::default(),
        };
        s.rebuild();
        s
    }

    /// Current settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            aors: self.members.len() as u64,
            tracked: self.members.values().map(|v| v.len() as u64).sum(),
            ..self.stats
        }
    }

    /// Changes the settings; a new interval moves every AoR to its new phase.
    pub fn set(&mut self, settings: Settings) {
        let old = self.settings;
        self.settings = Settings {
            interval_ms: settings.interval_ms.max(SLOT_MS),
            ..settings
        };
        if old.interval_ms != self.settings.interval_ms {
            self.rebuild();
        }
        if !self.settings.enabled {
            // Resume from the moment pinging is enabled again, not from before.
            self.cursor = None;
            for (k, t) in std::mem::take(&mut self.members) {
                for t in t {
                    self.free.push((t.slot, t.generation));
                }
                self.members.insert(k, Vec::new());
            }
        }
    }

    fn slots(&self) -> usize {
        self.settings.interval_ms.div_ceil(SLOT_MS) as usize
    }

    fn slot_of(&self, aor: &[u8]) -> usize {
        (phase(aor, self.settings.interval_ms) / SLOT_MS) as usize
    }

    fn rebuild(&mut self) {
        self.wheel = vec![Vec::new(); self.slots()];
        let keys: Vec<Arc<[u8]>> = self.members.keys().cloned().collect();
        for k in keys {
            let s = self.slot_of(&k);
            self.wheel[s].push(k);
        }
    }

    /// An AoR changed (registered, refreshed, replicated, loaded): schedule it if it is
    /// not yet on the wheel. AoRs without keepalive bindings leave at their due time.
    pub fn observe(&mut self, aor: &Arc<[u8]>) {
        if !self.members.contains_key(aor) {
            self.members.insert(aor.clone(), Vec::new());
            let s = self.slot_of(aor);
            self.wheel[s].push(aor.clone());
        }
    }

    /// Schedules every AoR of `usrloc` with a keepalive binding (start-up, after a full
    /// sync).
    pub fn observe_all(&mut self, usrloc: &Usrloc) {
        let mut keys = Vec::new();
        usrloc.for_each(|k, r| {
            if r.bindings().iter().any(Binding::keepalive) {
                keys.push(k.clone());
            }
        });
        for k in &keys {
            self.observe(k);
        }
    }

    fn take_slot(&mut self) -> Option<(u32, u32)> {
        if let Some((s, g)) = self.free.pop() {
            let g = g.wrapping_add(1);
            self.acks.reset(s, g);
            return Some((s, g));
        }
        if (self.next_slot as usize) < self.acks.capacity() {
            let s = self.next_slot;
            self.next_slot += 1;
            self.acks.reset(s, 1);
            return Some((s, 1));
        }
        None
    }

    /// Processes every ping due before `now_ms`. `owner(tag, bucket, due_ms)` returns the
    /// segment slot of the tag when this node acts on the binding at `due_ms`.
    pub fn advance(
        &mut self,
        now_ms: u64,
        usrloc: &Usrloc,
        owner: impl Fn(&[u8], usize, u64) -> Option<u16>,
        mut act: impl FnMut(Action) -> bool,
    ) {
        if !self.settings.enabled {
            return;
        }
        let interval = self.settings.interval_ms;
        let mut t = *self.cursor.get_or_insert(now_ms);
        // Never replay more than one interval (after a stall).
        t = t.max(now_ms.saturating_sub(interval));
        while t < now_ms {
            let slot_start = t - t % SLOT_MS;
            let slot_end = slot_start + SLOT_MS;
            let end = slot_end.min(now_ms);
            let idx = ((slot_start % interval) / SLOT_MS) as usize;
            let cycle = slot_start - slot_start % interval;
            let aors = std::mem::take(&mut self.wheel[idx]);
            let mut keep = Vec::with_capacity(aors.len());
            for aor in aors {
                let due = cycle + phase(&aor, interval);
                if due < t || due >= end {
                    keep.push(aor);
                    continue;
                }
                if self.ping_aor(&aor, due, usrloc, &owner, &mut act) {
                    keep.push(aor);
                } else {
                    self.members.remove(&aor);
                }
            }
            self.wheel[idx].extend(keep);
            t = end;
        }
        self.cursor = Some(t);
    }

    /// Pings the keepalive bindings of `aor` due at `due`; false when it has none left.
    fn ping_aor(
        &mut self,
        aor: &Arc<[u8]>,
        due: u64,
        usrloc: &Usrloc,
        owner: &impl Fn(&[u8], usize, u64) -> Option<u16>,
        act: &mut impl FnMut(Action) -> bool,
    ) -> bool {
        let bucket = bucket_of(aor);
        let mut tracked = self.members.remove(aor).unwrap_or_default();
        let s = self.settings;
        let mut orders = Vec::new();
        let mut gone = Vec::new();
        let mut seen = Vec::new();
        let any = usrloc.read(aor, |r| {
            let Some(r) = r else { return false };
            let mut any = false;
            for b in r.bindings() {
                if !b.keepalive() || b.transport != TRANSPORT_UDP {
                    continue;
                }
                any = true;
                let key = contact_key(b);
                let Some(tag_slot) = owner(b.tag(), bucket, due) else {
                    self.stats.not_owner += 1;
                    continue;
                };
                seen.push(key);
                orders.push((
                    key,
                    PingOrder::new(b, due, (u32::MAX, 0), tag_slot, bucket as u16, s.method),
                ));
            }
            any
        });
        // Contacts no longer pinged here (gone, or another node acts): free their slots.
        tracked.retain(|t| {
            let keep = seen.contains(&t.key);
            if !keep {
                self.free.push((t.slot, t.generation));
            }
            keep
        });
        for (key, mut order) in orders {
            let i = match tracked.iter().position(|t| t.key == key) {
                Some(i) => i,
                None => match self.take_slot() {
                    Some((slot, generation)) => {
                        tracked.push(Tracked {
                            key,
                            slot,
                            generation,
                            seq: 0,
                            misses: 0,
                        });
                        tracked.len() - 1
                    }
                    None => {
                        self.stats.untracked += 1;
                        if act(Action::Ping(order)) {
                            self.stats.ordered += 1;
                        }
                        continue;
                    }
                },
            };
            let t = &mut tracked[i];
            if s.method == PingMethod::Options && t.seq > 0 {
                let id = u64::from(t.generation) << 32 | u64::from(t.seq);
                if self.acks.answered(t.slot, id) {
                    t.misses = 0;
                } else {
                    t.misses += 1;
                    self.stats.missed += 1;
                }
            }
            if s.method == PingMethod::Options && s.max_misses > 0 && t.misses >= s.max_misses {
                gone.push(key);
                continue;
            }
            order.ack_slot = t.slot;
            order.ping_id = u64::from(t.generation) << 32 | u64::from(t.seq + 1);
            if act(Action::Ping(order)) {
                t.seq += 1;
                self.stats.ordered += 1;
            }
        }
        if !gone.is_empty() {
            tracked.retain(|t| {
                let keep = !gone.contains(&t.key);
                if !keep {
                    self.free.push((t.slot, t.generation));
                }
                keep
            });
            self.stats.removed += gone.len() as u64;
            act(Action::Remove {
                aor: aor.clone(),
                keys: gone,
            });
        }
        if any {
            self.members.insert(aor.clone(), tracked);
        }
        any
    }
}

#[cfg(test)]
mod tests;
