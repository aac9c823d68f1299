//! The control plane's side of NAT keepalives: feeds the scheduler with every AoR that
//! changes (local records, replicated ones, loaded or synced tables), runs it on the
//! mesh tick, hands ping orders to the workers and removes the contacts that stopped
//! answering through its own change ring (replicated and persisted like any change).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sipmesh_dataplane::pinger::PingStats;

use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{Change, ChangeRecord, RemoveReason};
use sipmesh_cluster::keepalive::{
    Acks, Action, OrderProducer, Scheduler, Settings, Stats, contact_key,
};
use sipmesh_cluster::ownership::{Segment, TAG_SLOTS};
use sipmesh_cluster::ring::ChangeProducer;
use sipmesh_cluster::sweep::Remover;
use sipmesh_cluster::usrloc::Usrloc;

use crate::mesh::tags::{DEFAULT_TAG_SLOT, TagView};

/// Sharing tag name → ownership segment slot, as this node knows them.
pub type TagSlots = Arc<RwLock<HashMap<Vec<u8>, u16>>>;

/// Refreshes `slots` from the mesh's tags; true when it changed.
pub fn refresh_tag_slots(slots: &TagSlots, tags: &[TagView]) -> bool {
    let fresh: HashMap<Vec<u8>, u16> = tags
        .iter()
        .filter(|t| t.slot < TAG_SLOTS)
        .map(|t| (t.name.as_bytes().to_vec(), t.slot as u16))
        .collect();
    let Ok(mut cur) = slots.write() else {
        return false;
    };
    if *cur == fresh {
        return false;
    }
    *cur = fresh;
    true
}

/// The segment slot of a binding's tag (untagged: the default tag); `None` for a tag this
/// node has not heard of (nobody here acts on it).
pub fn tag_slot(slots: &HashMap<Vec<u8>, u16>, tag: &[u8]) -> Option<u16> {
    if tag.is_empty() {
        return Some(DEFAULT_TAG_SLOT as u16);
    }
    slots.get(tag).copied()
}

/// What the node hands the control plane for keepalives.
pub struct KeepaliveAttach {
    /// One order ring per worker.
    pub orders: Vec<OrderProducer>,
    /// Answers, shared with the workers.
    pub acks: Arc<Acks>,
    /// Initial settings.
    pub settings: Settings,
    /// The workers' counters.
    pub worker_stats: Vec<Arc<PingStats>>,
    /// Local registrations may be flagged (the registrar's keepalive mode is not off):
    /// drained records are decoded to find them.
    pub observe_local: bool,
}

/// Runtime view for `sipctl ping`.
#[derive(Clone, Copy, Debug)]
pub struct KeepaliveStatus {
    pub settings: Settings,
    pub stats: Stats,
    /// Orders dropped because a worker's ring was full.
    pub ring_full: u64,
    /// Pings the workers sent, fenced, answers they saw.
    pub sent: u64,
    pub fenced: u64,
    pub answers: u64,
    /// Removals deferred because the change ring was full.
    pub deferred: u64,
}

pub(crate) struct Keepalive {
    sched: Scheduler,
    orders: Vec<OrderProducer>,
    remover: Remover,
    observe_local: bool,
    ring_full: u64,
    deferred: u64,
    worker_stats: Vec<Arc<PingStats>>,
}

impl Keepalive {
    pub fn new(a: KeepaliveAttach, me: NodeId) -> Keepalive {
        Keepalive {
            sched: Scheduler::new(a.settings, a.acks),
            orders: a.orders,
            remover: Remover::new(me, RemoveReason::Unreachable),
            observe_local: a.observe_local,
            worker_stats: a.worker_stats,
            ring_full: 0,
            deferred: 0,
        }
    }

    pub fn status(&self) -> KeepaliveStatus {
        let sum = |f: fn(&PingStats) -> &AtomicU64| {
            self.worker_stats
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum()
        };
        KeepaliveStatus {
            sent: sum(|s| &s.sent),
            fenced: sum(|s| &s.fenced),
            answers: sum(|s| &s.answers),
            settings: self.sched.settings(),
            stats: self.sched.stats(),
            ring_full: self.ring_full,
            deferred: self.deferred,
        }
    }

    pub fn set(&mut self, s: Settings) {
        self.sched.set(s);
    }

    pub fn observe_all(&mut self, usrloc: &Usrloc) {
        self.sched.observe_all(usrloc);
    }

    /// A record applied to (or made in) the table.
    pub fn observe(&mut self, usrloc: &Usrloc, rec: &ChangeRecord) {
        if let Change::BindingUpsert { aor, binding } = &rec.change
            && binding.keepalive()
            && let Some(k) = usrloc.key(aor)
        {
            self.sched.observe(&k);
        }
    }

    /// A local record drained from a worker's ring (its bincode bytes).
    pub fn observe_frame(&mut self, usrloc: &Usrloc, frame: &[u8]) {
        if self.observe_local
            && let Ok((rec, _)) = ChangeRecord::decode_from_slice(frame)
        {
            self.observe(usrloc, &rec);
        }
    }

    /// Runs the scheduler up to `now_ms` (wall clock).
    pub fn tick(
        &mut self,
        now_ms: u64,
        usrloc: &Usrloc,
        segment: &Segment,
        slots: &TagSlots,
        ring: &std::sync::Mutex<ChangeProducer>,
    ) {
        let Ok(slots) = slots.read() else { return };
        let owner = |tag: &[u8], bucket: usize, due: u64| {
            let slot = tag_slot(&slots, tag)?;
            segment
                .acts_on_at(slot as usize, bucket, due)
                .0
                .then_some(slot)
        };
        let Keepalive {
            sched,
            orders,
            remover,
            ring_full,
            deferred,
            ..
        } = self;
        let n = orders.len().max(1);
        sched.advance(now_ms, usrloc, owner, |a| match a {
            Action::Ping(o) => {
                let ok = orders
                    .get_mut(o.bucket as usize % n)
                    .is_some_and(|p| p.push(o).is_ok());
                if !ok {
                    *ring_full += 1;
                }
                ok
            }
            Action::Remove { aor, keys } => {
                let Ok(mut ring) = ring.lock() else {
                    return false;
                };
                match remover.remove(usrloc, &aor, now_ms, &mut ring, |b| {
                    keys.contains(&contact_key(b))
                }) {
                    Ok(n) => {
                        if n > 0 {
                            eprintln!(
                                "sipd: keepalive: {n} binding(s) of {} removed: no answer to pings",
                                String::from_utf8_lossy(&aor)
                            );
                        }
                        true
                    }
                    Err(_) => {
                        *deferred += 1;
                        false
                    }
                }
            }
        });
    }
}
