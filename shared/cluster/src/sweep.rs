//! Expiry of bindings nobody else will expire: an owner-gated sweep.
//!
//! A worker expires the bindings it wrote on its timer wheel and replicates the removals.
//! A binding received from a peer is on no local wheel: its origin expires it. When the
//! origin is gone for good, nobody would; the sweep removes such bindings once they are
//! past their expiry by a grace period (so that in normal operation the origin's removal
//! always comes first), only for AoRs this node acts on (the ownership segment), and
//! makes each removal a versioned change record like any other, so it is replicated and
//! persisted. Sans-IO: the caller gives the time, the ownership decision and the ring.

use crate::NodeId;
use crate::change::{ChangeRecordRef, ChangeRef, RemoveReason, next_version};
use crate::ring::ChangeProducer;
use crate::usrloc::{AorRecord, Binding, Update, Usrloc};

/// The `worker` part of versions made by the sweep (workers use their index).
pub const SWEEP_WORKER: u16 = u16::MAX;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// AoRs looked at.
    pub aors: u64,
    /// Bindings removed.
    pub removed: u64,
    /// Expired bindings left to another node (not ours to act on).
    pub not_owner: u64,
    /// Removals deferred because the change ring was full (retried next sweep).
    pub deferred: u64,
}

/// Removes every binding with `expires_at + grace_s <= now_s` for which
/// `acts_on(aor, binding)` holds, pushing one `Expired` removal record per binding to
/// `ring` (origin `node`). An AoR whose records do not fit in the ring is left for next
/// time.
pub fn sweep_expired(
    usrloc: &Usrloc,
    now_ms: u64,
    grace_s: u32,
    node: NodeId,
    acts_on: impl Fn(&[u8], &Binding) -> bool,
    ring: &mut ChangeProducer,
) -> SweepReport {
    let now_s = (now_ms / 1000) as u32;
    let cutoff = now_s.saturating_sub(grace_s);
    let mut report = SweepReport::default();
    let mut due: Vec<std::sync::Arc<[u8]>> = Vec::new();
    usrloc.for_each(|k, rec| {
        report.aors += 1;
        if rec.bindings().iter().any(|b| b.expires_at <= cutoff) {
            due.push(k.clone());
        }
    });
    let mut remover = Remover::new(node, RemoveReason::Expired);
    for aor in due {
        report.not_owner += usrloc.read(&aor, |r| {
            r.map_or(0, |r| {
                r.bindings()
                    .iter()
                    .filter(|b| b.expires_at <= cutoff && !acts_on(&aor, b))
                    .count() as u64
            })
        });
        match remover.remove(usrloc, &aor, now_ms, ring, |b| {
            b.expires_at <= cutoff && acts_on(&aor, b)
        }) {
            Ok(n) => report.removed += n,
            Err(n) => report.deferred += n,
        }
    }
    report
}

/// Removes bindings as versioned change records of this node (the sweep's expiries, the
/// keepalive's removals of contacts that stopped answering), so that they are
/// replicated and persisted like a worker's.
#[derive(Debug)]
pub struct Remover {
    node: NodeId,
    reason: RemoveReason,
    last_version: u64,
}

impl Remover {
    /// Removals by `node` for `reason`.
    pub fn new(node: NodeId, reason: RemoveReason) -> Remover {
        Remover {
            node,
            reason,
            last_version: 0,
        }
    }

    /// Removes the bindings of `aor` matching `gone`, pushing a record for each to
    /// `ring`: `Ok(removed)`, or `Err(count)` when their records do not fit in the ring
    /// (then nothing changes).
    pub fn remove(
        &mut self,
        usrloc: &Usrloc,
        aor: &[u8],
        now_ms: u64,
        ring: &mut ChangeProducer,
        gone: impl Fn(&Binding) -> bool,
    ) -> Result<u64, u64> {
        let free = ring.free_bytes();
        let (node, reason, last_version) = (self.node, self.reason, self.last_version);
        let out = usrloc.update(aor, |old| {
            let Some(old) = old else {
                return Update::Keep(Ok(Vec::new()));
            };
            let (gone, kept): (Vec<_>, Vec<_>) = old.bindings().iter().partition(|b| gone(b));
            if gone.is_empty() {
                return Update::Keep(Ok(Vec::new()));
            }
            let mut version = last_version;
            let mut records = Vec::with_capacity(gone.len());
            let mut need = 0usize;
            for b in &gone {
                version = next_version(b.version.max(version), now_ms, SWEEP_WORKER);
                let rec = ChangeRecordRef {
                    origin: node,
                    version,
                    at_ms: now_ms,
                    change: ChangeRef::BindingRemove {
                        aor,
                        contact: b.contact(),
                        instance: b.instance(),
                        reg_id: b.reg_id,
                        reason,
                    },
                };
                need += ChangeProducer::frame_len(&rec);
                records.push(rec.to_owned_record());
            }
            if need > free {
                return Update::Keep(Err(gone.len() as u64));
            }
            let kept: Vec<_> = kept.into_iter().cloned().collect();
            Update::Replace(AorRecord::new(kept), Ok(records))
        });
        let records = out.value?;
        let mut removed = 0;
        for r in &records {
            self.last_version = self.last_version.max(r.version);
            // Sized against the free space above; only this producer pushes.
            if ring.push(&r.as_ref()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Change;
    use crate::ring::change_ring;
    use crate::usrloc::{BindingParts, Q_NONE, TRANSPORT_UDP};

    fn b(contact: &str, expires_at: u32, version: u64) -> Binding {
        Binding::new(BindingParts {
            contact: contact.as_bytes(),
            call_id: b"c",
            path: b"",
            instance: b"",
            user_agent: b"",
            tag: b"",
            expires_at,
            cseq: 1,
            q: Q_NONE,
            reg_id: 0,
            source: "192.0.2.1:5060".parse().unwrap(),
            transport: TRANSPORT_UDP,
            flags: 0,
            version,
            origin: NodeId(1),
            last_modified: 0,
        })
    }

    #[test]
    fn removes_only_long_expired_bindings_of_owned_aors_with_records() {
        let u = Usrloc::new(0);
        let now_ms = 1_800_000_000_000u64;
        let now_s = (now_ms / 1000) as u32;
        u.update(b"a@x", |_| {
            Update::Replace(
                AorRecord::new(vec![
                    b("sip:a1", now_s - 100, 5),
                    b("sip:a2", now_s + 100, 6),
                ]),
                (),
            )
        });
        u.update(b"b@x", |_| {
            Update::Replace(AorRecord::single(b("sip:b1", now_s - 100, 7)), ())
        });
        // Expired, but within the grace period: the origin may still remove it.
        u.update(b"c@x", |_| {
            Update::Replace(AorRecord::single(b("sip:c1", now_s - 5, 8)), ())
        });
        // Not ours.
        u.update(b"d@x", |_| {
            Update::Replace(AorRecord::single(b("sip:d1", now_s - 100, 9)), ())
        });
        let (mut p, mut c) = change_ring(1 << 16);
        let r = sweep_expired(&u, now_ms, 30, NodeId(2), |aor, _| aor != b"d@x", &mut p);
        assert_eq!(
            r,
            SweepReport {
                aors: 4,
                removed: 2,
                not_owner: 1,
                deferred: 0
            }
        );
        assert_eq!(u.read(b"a@x", |r| r.unwrap().len()), 1);
        assert!(u.read(b"b@x", |r| r.is_none()));
        assert!(u.read(b"c@x", |r| r.is_some()));
        assert!(u.read(b"d@x", |r| r.is_some()));
        let mut recs = Vec::new();
        c.drain(|r| recs.push(r));
        assert_eq!(recs.len(), 2);
        for rec in &recs {
            assert_eq!(rec.origin, NodeId(2));
            let Change::BindingRemove {
                reason, contact, ..
            } = &rec.change
            else {
                panic!()
            };
            assert_eq!(*reason, RemoveReason::Expired);
            assert!(&**contact == b"sip:a1" || &**contact == b"sip:b1");
            // Newer than the binding it removes: it wins everywhere by version.
            assert!(rec.version > 7);
        }
        // Nothing left to do.
        let r = sweep_expired(&u, now_ms, 30, NodeId(2), |aor, _| aor != b"d@x", &mut p);
        assert_eq!((r.removed, r.deferred), (0, 0));
    }

    #[test]
    fn a_full_ring_defers_without_changing_anything() {
        let u = Usrloc::new(0);
        let now_ms = 1_800_000_000_000u64;
        let now_s = (now_ms / 1000) as u32;
        u.update(b"a@x", |_| {
            Update::Replace(AorRecord::single(b("sip:a1", now_s - 100, 5)), ())
        });
        let (mut p, _c) = change_ring(4096);
        // Fill the ring: the consumer is not draining.
        let filler = b("sip:filler", 1, 1);
        let rec = ChangeRecordRef {
            origin: NodeId(9),
            version: 1,
            at_ms: 0,
            change: ChangeRef::BindingUpsert {
                aor: b"f@x",
                binding: &filler,
            },
        };
        while p.push(&rec).is_ok() {}
        let r = sweep_expired(&u, now_ms, 30, NodeId(2), |_, _| true, &mut p);
        assert_eq!((r.removed, r.deferred), (0, 1));
        assert!(
            u.read(b"a@x", |r| r.is_some()),
            "a removal that cannot be recorded is not made"
        );
    }
}
