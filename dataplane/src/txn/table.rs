//! A worker's transactions: matching (RFC 3261 §17.1.3, §17.2.3), the branches we
//! generate, and the timers, without a lock and without allocating per message once the
//! table has reached its working size.
//!
//! - **Server transactions** are found by a 128-bit key hashed (under a per-process
//!   random key) from what §17.2.3 compares: with the RFC 3261 magic cookie, the top Via
//!   branch and sent-by and the method (ACK counts as INVITE, CANCEL is its own);
//!   otherwise the RFC 2543 fields (Request-URI, From tag, Call-ID, CSeq number, the top
//!   Via as written, and the To tag except for INVITE and its ACK, whose To tag the
//!   server chose).
//! - **Client transactions** need no index: the branch we put in the request names the
//!   node, the worker, the slot and its generation under a MAC, so a response finds its
//!   transaction directly — on the worker it names, to which another worker steers it.
//! - **Timers**: one hashed wheel in milliseconds; an entry whose transaction's next
//!   deadline moved is skipped when it fires and the transaction is rescheduled.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use sip_wire::{Checked, Method};
use sipmesh_cluster::wheel::TimerWheel;

use super::{Actions, Event, Millis, State, Transaction};

/// Magic cookie of RFC 3261 branches (§8.1.1.7).
pub const MAGIC: &[u8] = b"z9hG4bK";
/// Our branches: the cookie and a marker.
const OURS: &[u8] = b"z9hG4bKsm";

/// The identity of a server transaction (§17.2.3), as a 128-bit hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxKey(u128);

/// A transaction's place in the table (a stale id finds nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxId {
    pub slot: u32,
    pub generation: u32,
}

/// What a branch of ours names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchId {
    pub node: u16,
    pub worker: u16,
    pub id: TxId,
}

/// Keys, branches and their secrets (one per process: the same on every worker).
#[derive(Clone, Debug)]
pub struct Keys {
    a: std::hash::RandomState,
    b: std::hash::RandomState,
    mac: u64,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new()
    }
}

impl Keys {
    pub fn new() -> Keys {
        let a = std::hash::RandomState::new();
        let mac = a.hash_one(0x5349_504du64);
        Keys {
            a,
            b: std::hash::RandomState::new(),
            mac,
        }
    }

    fn hash(&self, parts: &[&[u8]]) -> TxKey {
        let (mut x, mut y) = (self.a.build_hasher(), self.b.build_hasher());
        for p in parts {
            // Length-prefixed: no two different field lists hash alike by concatenation.
            x.write_usize(p.len());
            x.write(p);
            y.write_usize(p.len());
            y.write(p);
        }
        TxKey(u128::from(x.finish()) << 64 | u128::from(y.finish()))
    }

    /// The server transaction a request belongs to (§17.2.3).
    pub fn server_key(&self, c: &Checked<'_>) -> TxKey {
        self.server_key_as(c, c.cseq.method)
    }

    /// The key the request would have with method `method`: a CANCEL finds the INVITE it
    /// cancels (§9.2: same branch, sent-by, Request-URI, tags, Call-ID and CSeq number).
    pub fn server_key_as(&self, c: &Checked<'_>, method: Method<'_>) -> TxKey {
        let method = match method {
            // The ACK of a non-2xx matches the INVITE's transaction.
            Method::Ack => Method::Invite.as_bytes(),
            m => m.as_bytes(),
        };
        let via = &c.top_via;
        if let Some(branch) = via.branch.filter(|b| b.starts_with(MAGIC)) {
            let port = via.port.unwrap_or(5060).to_be_bytes();
            let host = lower(via.host);
            return self.hash(&[
                b"3261",
                branch,
                &host[..via.host.len().min(64)],
                &port,
                method,
            ]);
        }
        // RFC 2543 fallback.
        let to_tag = match c.cseq.method {
            Method::Invite | Method::Ack | Method::Cancel => &b""[..],
            _ => c.to.tag().unwrap_or_default(),
        };
        self.hash(&[
            b"2543",
            c.request_uri.raw,
            c.from.tag().unwrap_or_default(),
            to_tag,
            c.call_id,
            &c.cseq.seq.to_be_bytes(),
            via.raw,
            method,
        ])
    }

    fn mac(&self, node: u16, worker: u16, id: TxId) -> u32 {
        let mut h = self.a.build_hasher();
        h.write_u64(self.mac);
        h.write_u16(node);
        h.write_u16(worker);
        h.write_u32(id.slot);
        h.write_u32(id.generation);
        h.finish() as u32
    }

    /// The branch of a request we send (§8.1.1.7: unique, with the magic cookie):
    /// `z9hG4bKsm` then node, worker, slot, generation and a MAC in fixed-width hex.
    pub fn branch(&self, b: BranchId, out: &mut [u8; 48]) -> usize {
        out[..OURS.len()].copy_from_slice(OURS);
        let mut n = OURS.len();
        let mut hex = |v: u64, digits: usize| {
            for i in (0..digits).rev() {
                out[n] = b"0123456789abcdef"[((v >> (4 * i)) & 0xf) as usize];
                n += 1;
            }
        };
        hex(u64::from(b.node), 4);
        hex(u64::from(b.worker), 4);
        hex(u64::from(b.id.slot), 8);
        hex(u64::from(b.id.generation), 8);
        hex(u64::from(self.mac(b.node, b.worker, b.id)), 8);
        n
    }

    /// What a branch of ours names; `None` for any other (or a forged) branch.
    pub fn parse_branch(&self, branch: &[u8]) -> Option<BranchId> {
        let rest = branch.strip_prefix(OURS)?;
        if rest.len() != 32 {
            return None;
        }
        let hex = |s: &[u8]| -> Option<u64> {
            s.iter().try_fold(0u64, |acc, &c| {
                let d = (c as char).to_digit(16)?;
                Some(acc << 4 | u64::from(d))
            })
        };
        let b = BranchId {
            node: hex(&rest[0..4])? as u16,
            worker: hex(&rest[4..8])? as u16,
            id: TxId {
                slot: hex(&rest[8..16])? as u32,
                generation: hex(&rest[16..24])? as u32,
            },
        };
        (hex(&rest[24..32])? == u64::from(self.mac(b.node, b.worker, b.id))).then_some(b)
    }
}

fn lower(s: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (o, c) in out.iter_mut().zip(s) {
        *o = c.to_ascii_lowercase();
    }
    out
}

struct Slot<V> {
    generation: u32,
    key: Option<TxKey>,
    /// The method of a client transaction's request (§17.1.3: CSeq method must match).
    method: [u8; 16],
    method_len: u8,
    txn: Option<Transaction>,
    value: Option<V>,
    /// The deadline the wheel holds for it.
    scheduled: Option<Millis>,
}

/// One worker's transactions, each with the transaction user's state `V`.
pub struct TxTable<V> {
    index: HashMap<TxKey, u32>,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    wheel: TimerWheel<TxId>,
    base: Millis,
    due: Vec<TxId>,
}

impl<V> TxTable<V> {
    /// A table at time `now` with room for `capacity` transactions before it grows.
    pub fn new(now: Millis, capacity: usize) -> TxTable<V> {
        TxTable {
            index: HashMap::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            wheel: TimerWheel::new(0, 8192),
            base: now,
            due: Vec::with_capacity(1024),
        }
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rel(&self, t: Millis) -> u32 {
        t.saturating_sub(self.base).min(u64::from(u32::MAX)) as u32
    }

    fn alloc(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        self.slots.push(Slot {
            generation: 0,
            key: None,
            method: [0; 16],
            method_len: 0,
            txn: None,
            value: None,
            scheduled: None,
        });
        (self.slots.len() - 1) as u32
    }

    fn schedule(&mut self, id: TxId) {
        let Some(s) = self.slots.get_mut(id.slot as usize) else {
            return;
        };
        let next = s.txn.as_ref().and_then(Transaction::next_deadline);
        if next.is_some() && next != s.scheduled {
            s.scheduled = next;
            let at = next.unwrap_or_default();
            let at = at.saturating_sub(self.base).min(u64::from(u32::MAX)) as u32;
            self.wheel.insert(at, id);
        }
    }

    /// Adds a server transaction under `key`.
    pub fn insert_server(&mut self, key: TxKey, txn: Transaction, value: V) -> TxId {
        let slot = self.alloc();
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        s.key = Some(key);
        s.method_len = 0;
        s.txn = Some(txn);
        s.value = Some(value);
        s.scheduled = None;
        let id = TxId {
            slot,
            generation: s.generation,
        };
        self.index.insert(key, slot);
        self.schedule(id);
        id
    }

    /// Adds a client transaction for a request of `method`; its branch comes from the
    /// returned id ([`Keys::branch`]).
    pub fn insert_client(&mut self, method: &[u8], txn: Transaction, value: V) -> TxId {
        let slot = self.alloc();
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        s.key = None;
        let n = method.len().min(16);
        s.method[..n].copy_from_slice(&method[..n]);
        s.method_len = n as u8;
        s.txn = Some(txn);
        s.value = Some(value);
        s.scheduled = None;
        let id = TxId {
            slot,
            generation: s.generation,
        };
        self.schedule(id);
        id
    }

    /// The server transaction of `key`.
    pub fn find_server(&self, key: TxKey) -> Option<TxId> {
        let slot = *self.index.get(&key)?;
        let s = &self.slots[slot as usize];
        Some(TxId {
            slot,
            generation: s.generation,
        })
    }

    /// The client transaction a response belongs to (§17.1.3): our branch names it, and
    /// the CSeq method must be the request's.
    pub fn find_client(&self, id: TxId, cseq_method: &[u8]) -> Option<TxId> {
        let s = self.slots.get(id.slot as usize)?;
        (s.generation == id.generation
            && s.txn.is_some()
            && s.key.is_none()
            && &s.method[..s.method_len as usize] == cseq_method)
            .then_some(id)
    }

    /// The transaction and its user's state.
    pub fn get_mut(&mut self, id: TxId) -> Option<(&mut Transaction, &mut V)> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        match (&mut s.txn, &mut s.value) {
            (Some(t), Some(v)) => Some((t, v)),
            _ => None,
        }
    }

    /// Feeds `ev` to transaction `id`; a transaction that terminates is removed and its
    /// user's state returned with the actions.
    pub fn event(&mut self, id: TxId, ev: Event, now: Millis) -> (Actions, Option<V>) {
        let Some((t, _)) = self.get_mut(id) else {
            return (Actions::default(), None);
        };
        let a = t.on_event(ev, now);
        let done = t.state() == State::Terminated;
        (a, self.settle(id, done))
    }

    fn settle(&mut self, id: TxId, done: bool) -> Option<V> {
        if done {
            return self.remove(id);
        }
        self.schedule(id);
        None
    }

    /// Removes transaction `id`, returning its user's state.
    pub fn remove(&mut self, id: TxId) -> Option<V> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation || s.txn.is_none() {
            return None;
        }
        s.txn = None;
        s.scheduled = None;
        if let Some(k) = s.key.take() {
            self.index.remove(&k);
        }
        let v = s.value.take();
        self.free.push(id.slot);
        v
    }

    /// Fires the timers due at `now`: `f` gets each transaction's actions and its user's
    /// state (`Some(owned)` when the transaction ended and was removed).
    pub fn advance(&mut self, now: Millis, mut f: impl FnMut(TxId, Actions, Result<&mut V, V>)) {
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        let rel = self.rel(now);
        self.wheel.advance(rel, |id| due.push(id));
        for &id in &due {
            let Some(s) = self.slots.get_mut(id.slot as usize) else {
                continue;
            };
            if s.generation != id.generation {
                continue;
            }
            let Some(t) = s.txn.as_mut() else { continue };
            // The wheel's entry is stale if the deadline moved since.
            let next = t.next_deadline();
            match next {
                Some(d) if d <= now => {}
                _ => {
                    // Another entry already holds the current deadline, or none is due.
                    if s.scheduled != next {
                        s.scheduled = None;
                        self.schedule(id);
                    }
                    continue;
                }
            }
            s.scheduled = None;
            let a = t.on_timers(now);
            if t.state() == State::Terminated {
                if let Some(v) = self.remove(id) {
                    f(id, a, Err(v));
                }
            } else {
                self.schedule(id);
                if let Some(v) = self.slots[id.slot as usize].value.as_mut()
                    && !a.is_empty()
                {
                    f(id, a, Ok(v));
                }
            }
        }
        self.due = due;
    }
}

#[cfg(test)]
mod tests;
