//! Applying replicated change records, and producing a full-sync snapshot.
//!
//! A cluster peer feeds every [`ChangeRecord`] it receives from another node to
//! [`Usrloc::apply_remote`], which merges it into the local table by **last writer wins**
//! on the binding version. A full sync is [`Usrloc::snapshot_records`] on one side and
//! `apply_remote` of every record on the other; [`Usrloc::digest`] verifies
//! the result.
//!
//! # Which binding a record is about
//!
//! The same rule as the registrar's (RFC 5626 §6 / RFC 5627): when both the stored binding
//! and the record carry a `+sip.instance`, the pair (instance, reg-id) names the binding and
//! the Contact URI does not matter (so two RFC 5626 flows of one instance, with the same
//! Contact URI and different reg-ids, stay two bindings); otherwise the Contact URIs are
//! compared. Unlike the registrar, which compares URIs by RFC 3261 §19.1.4 equivalence, this
//! compares the exact bytes: records carry the bytes the origin stored, and when a
//! REGISTER changes a binding's Contact bytes the registrar emits an explicit remove of the
//! old bytes before the upsert of the new ones.
//!
//! # Known limits (no tombstones)
//!
//! A removed binding leaves no trace, so:
//!
//! * an upsert that arrives *after* a remove of the same binding with a higher version (the
//!   two coming from different origins) resurrects the binding: the remove's version is no
//!   longer known when the upsert is compared. Records of one origin are delivered in order
//!   by the transport, so this needs concurrent changes of the same binding on two nodes;
//!   expiry eventually removes such a binding everywhere;
//! * with upserts only, replicas converge to the same bindings whatever the delivery order
//!   (per binding, the highest version wins), as long as "the same binding" partitions the
//!   bindings of an AoR. It does not always: a binding without instance matches, by Contact,
//!   bindings with different instances that do not match each other; such a mix, made
//!   concurrently on several nodes, may converge to different sets on different nodes;
//! * two bindings with equivalent but byte-different Contact URIs made concurrently on two
//!   nodes both survive everywhere (the next REGISTER through the registrar folds them).

use crate::change::{Change, ChangeRecord, ChangeRecordRef, ChangeRef};
use crate::usrloc::{AorRecord, Applied, Binding, Update, Usrloc};

/// Whether `b` is the binding named by (`contact`, `instance`, `reg_id`) — the registrar's
/// rule with exact Contact bytes (see the [module documentation](self)).
#[inline]
fn same_binding(b: &Binding, contact: &[u8], instance: &[u8], reg_id: u32) -> bool {
    if !instance.is_empty() && !b.instance().is_empty() {
        return b.instance() == instance && b.reg_id == reg_id;
    }
    b.contact() == contact
}

impl Usrloc {
    /// Applies a change record received from another node, last writer wins by version.
    ///
    /// * [`Change::BindingUpsert`]: if a binding of the AoR that is the same binding (see the
    ///   [module documentation](crate::apply)) has a version `>=` the incoming binding's
    ///   version, nothing is written ([`Applied::Kept`]). Otherwise the incoming binding
    ///   replaces the same binding(s) in place, or is appended when there is none; the AoR's
    ///   other bindings are kept as they are. The version compared is the binding's own
    ///   (`binding.version`, which the origin sets equal to the record's).
    /// * [`Change::BindingRemove`]: every binding of the AoR that is the named binding and
    ///   has a version `<` `rec.version` is removed; newer ones are kept. An absent AoR or
    ///   binding is [`Applied::Kept`]. Removing the last binding removes the AoR.
    ///
    /// Returns what happened to the AoR's table entry ([`Applied::Replaced`] when other
    /// bindings remain, [`Applied::Removed`] when the entry went away).
    ///
    /// Applying a remote change **never has local side effects**: no change record is
    /// produced (it must not be replicated again), no timer is armed or cancelled, no event
    /// is raised. The caller schedules the expiry of bindings it applied (for instance from
    /// the record's [`AorRecord::min_expires_at`] afterwards), and the bindings' `origin`
    /// stays the node that made the change.
    ///
    /// See the [module documentation](crate::apply) for the limits of last writer wins
    /// without tombstones (a late upsert can resurrect a binding removed by a higher version
    /// from another origin; per-origin order is guaranteed by the transport).
    pub fn apply_remote(&self, rec: &ChangeRecord) -> Applied {
        match &rec.change {
            Change::BindingUpsert { aor, binding } => self.apply_upsert(aor, binding),
            Change::BindingRemove {
                aor,
                contact,
                instance,
                reg_id,
                ..
            } => self.apply_remove(aor, contact, instance, *reg_id, rec.version),
            // Dialogs live in the dialog table ([`crate::dialog::DialogTable::apply_remote`]).
            // Dialog and presence records: other tables.
            _ => Applied::Kept,
        }
    }

    /// [`Usrloc::apply_remote`] for a borrowed record (e.g. one yielded by
    /// [`Usrloc::snapshot_records`]); same rules, same result.
    pub fn apply_remote_ref(&self, rec: ChangeRecordRef<'_>) -> Applied {
        match rec.change {
            ChangeRef::BindingUpsert { aor, binding } => self.apply_upsert(aor, binding),
            ChangeRef::BindingRemove {
                aor,
                contact,
                instance,
                reg_id,
                ..
            } => self.apply_remove(aor, contact, instance, reg_id, rec.version),
            // Dialog and presence records: other tables.
            _ => Applied::Kept,
        }
    }

    fn apply_upsert(&self, aor: &[u8], nb: &Binding) -> Applied {
        let (contact, instance, reg_id) = (nb.contact(), nb.instance(), nb.reg_id);
        self.update(aor, |cur| {
            let old = cur.map_or(&[][..], AorRecord::bindings);
            let mut first = None;
            let mut matches = 0usize;
            for (k, b) in old.iter().enumerate() {
                if same_binding(b, contact, instance, reg_id) {
                    if b.version >= nb.version {
                        return Update::Keep(());
                    }
                    first.get_or_insert(k);
                    matches += 1;
                }
            }
            let n = old.len() - matches + 1;
            if n == 1 {
                return Update::Replace(AorRecord::single(nb.clone()), ());
            }
            let mut v = Vec::with_capacity(n);
            for (k, b) in old.iter().enumerate() {
                if Some(k) == first {
                    v.push(nb.clone());
                } else if !same_binding(b, contact, instance, reg_id) {
                    v.push(b.clone());
                }
            }
            if first.is_none() {
                v.push(nb.clone());
            }
            Update::Replace(AorRecord::new(v), ())
        })
        .applied
    }

    fn apply_remove(
        &self,
        aor: &[u8],
        contact: &[u8],
        instance: &[u8],
        reg_id: u32,
        version: u64,
    ) -> Applied {
        let doomed =
            |b: &Binding| b.version < version && same_binding(b, contact, instance, reg_id);
        self.update(aor, |cur| {
            let Some(r) = cur else {
                return Update::Keep(());
            };
            let gone = r.bindings().iter().filter(|b| doomed(b)).count();
            if gone == 0 {
                return Update::Keep(());
            }
            // An empty record removes the AoR.
            let rec: AorRecord = r
                .bindings()
                .iter()
                .filter(|b| !doomed(b))
                .cloned()
                .collect();
            Update::Replace(rec, ())
        })
        .applied
    }

    /// Yields one upsert record per binding of the table, borrowed (no allocation): the
    /// records a peer needs to rebuild the table by [`Usrloc::apply_remote`]. Each record is
    ///
    /// ```text
    /// ChangeRecord { origin: binding.origin, version: binding.version,
    ///                at_ms: binding.last_modified * 1000,
    ///                change: BindingUpsert { aor, binding } }
    /// ```
    ///
    /// and encodes byte-identically to its owned form ([`ChangeRecordRef::encode_into_vec`];
    /// [`ChangeRecordRef::to_owned_record`] makes an owned copy).
    ///
    /// Like [`Usrloc::for_each`], the walk is weakly consistent (a change made meanwhile may
    /// or may not be seen; bindings of one AoR are seen as one consistent record) and memory
    /// retired by writers during the walk is reclaimed only after it. Changes made during the
    /// walk must be replicated separately (their records follow the snapshot).
    pub fn snapshot_records(&self, mut f: impl FnMut(ChangeRecordRef<'_>)) {
        self.for_each(|aor, rec| {
            for binding in rec.bindings() {
                f(ChangeRecordRef {
                    origin: binding.origin,
                    version: binding.version,
                    at_ms: u64::from(binding.last_modified) * 1000,
                    change: ChangeRef::BindingUpsert { aor, binding },
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::RemoveReason;
    use crate::usrloc::{BindingParts, Q_NONE, TRANSPORT_UDP};
    use crate::{Digest, NodeId};

    const AOR: &[u8] = b"alice@example.com";

    fn b(contact: &str, instance: &str, reg_id: u32, version: u64) -> Binding {
        Binding::new(BindingParts {
            contact: contact.as_bytes(),
            call_id: b"call",
            path: b"",
            instance: instance.as_bytes(),
            user_agent: b"",
            tag: b"",
            expires_at: 1_800_000_000,
            cseq: version as u32,
            q: Q_NONE,
            reg_id,
            source: "192.0.2.10:5060".parse().unwrap(),
            transport: TRANSPORT_UDP,
            flags: 0,
            version,
            origin: NodeId((version % 3) as u16),
            last_modified: 1_700_000_000,
        })
    }

    fn upsert(aor: &[u8], binding: Binding) -> ChangeRecord {
        ChangeRecord {
            origin: binding.origin,
            version: binding.version,
            at_ms: 0,
            change: Change::BindingUpsert {
                aor: aor.into(),
                binding,
            },
        }
    }

    fn remove(aor: &[u8], contact: &str, instance: &str, reg_id: u32, v: u64) -> ChangeRecord {
        ChangeRecord {
            origin: NodeId(9),
            version: v,
            at_ms: 0,
            change: Change::BindingRemove {
                aor: aor.into(),
                contact: contact.as_bytes().into(),
                instance: instance.as_bytes().into(),
                reg_id,
                reason: RemoveReason::Unregistered,
            },
        }
    }

    fn bindings(t: &Usrloc, aor: &[u8]) -> Vec<Binding> {
        t.read(aor, |r| {
            r.map(|r| r.bindings().to_vec()).unwrap_or_default()
        })
    }

    fn versions(t: &Usrloc, aor: &[u8]) -> Vec<(String, u64)> {
        bindings(t, aor)
            .iter()
            .map(|b| (String::from_utf8_lossy(b.contact()).into_owned(), b.version))
            .collect()
    }

    #[test]
    fn upsert_last_writer_wins() {
        let t = Usrloc::new(0);
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:a", "", 0, 10))),
            Applied::Inserted
        );
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:b", "", 0, 5))),
            Applied::Replaced
        );
        assert_eq!((t.aors(), t.bindings()), (1, 2));
        // Newer replaces in place, the other binding untouched.
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:a", "", 0, 11))),
            Applied::Replaced
        );
        assert_eq!(
            versions(&t, AOR),
            [("sip:a".into(), 11), ("sip:b".into(), 5)]
        );
        // Older and equal versions are ignored, nothing written.
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:a", "", 0, 3))),
            Applied::Kept
        );
        let mut same_version = b("sip:a", "", 0, 11);
        same_version.expires_at = 1;
        assert_eq!(t.apply_remote(&upsert(AOR, same_version)), Applied::Kept);
        assert_eq!(bindings(&t, AOR)[0], b("sip:a", "", 0, 11));
        assert_eq!(
            versions(&t, AOR),
            [("sip:a".into(), 11), ("sip:b".into(), 5)]
        );
        assert_eq!((t.aors(), t.bindings()), (1, 2));
        // Another AoR is independent.
        assert_eq!(
            t.apply_remote(&upsert(b"bob@x", b("sip:a", "", 0, 1))),
            Applied::Inserted
        );
        assert_eq!((t.aors(), t.bindings()), (2, 3));
    }

    #[test]
    fn remove_last_writer_wins() {
        let t = Usrloc::new(0);
        for r in [
            upsert(AOR, b("sip:a", "", 0, 10)),
            upsert(AOR, b("sip:b", "", 0, 20)),
        ] {
            t.apply_remote(&r);
        }
        // Absent AoR, absent binding: kept.
        assert_eq!(
            t.apply_remote(&remove(b"nobody@x", "sip:a", "", 0, 99)),
            Applied::Kept
        );
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:zz", "", 0, 99)),
            Applied::Kept
        );
        // Lower or equal version: kept.
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:a", "", 0, 9)),
            Applied::Kept
        );
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:a", "", 0, 10)),
            Applied::Kept
        );
        assert_eq!(t.bindings(), 2);
        // Higher version: removed, the other binding untouched.
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:a", "", 0, 11)),
            Applied::Replaced
        );
        assert_eq!(versions(&t, AOR), [("sip:b".into(), 20)]);
        assert_eq!((t.aors(), t.bindings()), (1, 1));
        // The last binding goes: the AoR goes.
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:b", "", 0, 21)),
            Applied::Removed
        );
        assert_eq!((t.aors(), t.bindings()), (0, 0));
        assert!(t.read(AOR, |r| r.is_none()));
    }

    #[test]
    fn instance_and_reg_id_name_the_binding() {
        let t = Usrloc::new(0);
        let i = "<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>";
        // RFC 5626: two flows of one instance with the same Contact URI are two bindings.
        t.apply_remote(&upsert(AOR, b("sip:ua;ob", i, 1, 10)));
        t.apply_remote(&upsert(AOR, b("sip:ua;ob", i, 2, 11)));
        t.apply_remote(&upsert(AOR, b("sip:other", "", 0, 12)));
        assert_eq!(t.bindings(), 3);
        // Same instance and reg-id, another Contact: replaces flow 1 in place.
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:ua2;ob", i, 1, 13))),
            Applied::Replaced
        );
        let got: Vec<_> = bindings(&t, AOR)
            .iter()
            .map(|b| (b.contact().to_vec(), b.reg_id, b.version))
            .collect();
        assert_eq!(
            got,
            [
                (b"sip:ua2;ob".to_vec(), 1, 13),
                (b"sip:ua;ob".to_vec(), 2, 11),
                (b"sip:other".to_vec(), 0, 12)
            ]
        );
        // ... but not with an older version.
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:ua3;ob", i, 1, 12))),
            Applied::Kept
        );
        // A remove naming (instance, reg-id) removes that flow only, whatever its Contact.
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:ua;ob", i, 1, 14)),
            Applied::Replaced
        );
        assert_eq!(t.bindings(), 2);
        assert_eq!(
            t.apply_remote(&remove(AOR, "sip:ua;ob", i, 3, 99)),
            Applied::Kept
        );
        // Another instance with the same Contact is another binding.
        let j = "<urn:uuid:00000000-0000-1000-8000-000a95a0e128>";
        t.apply_remote(&upsert(AOR, b("sip:ua;ob", j, 2, 15)));
        assert_eq!(t.bindings(), 3);
        // Without an instance on one side the Contact decides.
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:other", j, 7, 16))),
            Applied::Replaced
        );
        assert_eq!(t.bindings(), 3);
        assert_eq!(bindings(&t, AOR)[1].instance(), j.as_bytes());
        assert_eq!(bindings(&t, AOR)[1].version, 16);
    }

    #[test]
    fn upsert_replacing_several_same_bindings() {
        // A binding without instance is the same as both flows (by Contact); a newer one
        // replaces both, an older-than-one is ignored entirely.
        let t = Usrloc::new(0);
        t.apply_remote(&upsert(AOR, b("sip:x", "i1", 1, 10)));
        t.apply_remote(&upsert(AOR, b("sip:y", "", 0, 11)));
        t.apply_remote(&upsert(AOR, b("sip:x", "i2", 1, 12)));
        assert_eq!(t.bindings(), 3);
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:x", "", 0, 11))),
            Applied::Kept
        );
        assert_eq!(t.bindings(), 3);
        assert_eq!(
            t.apply_remote(&upsert(AOR, b("sip:x", "", 0, 13))),
            Applied::Replaced
        );
        assert_eq!(
            versions(&t, AOR),
            [("sip:x".into(), 13), ("sip:y".into(), 11)]
        );
        assert_eq!(t.bindings(), 2);
    }

    #[test]
    fn snapshot_roundtrip() {
        let t = Usrloc::new(0);
        for a in 0..50u64 {
            let aor = format!("user{a}@example.com");
            for c in 0..=(a % 3) {
                let inst = if c == 2 { "inst" } else { "" };
                t.apply_remote(&upsert(
                    aor.as_bytes(),
                    b(&format!("sip:{c}@h"), inst, c as u32, a * 10 + c + 1),
                ));
            }
        }
        // 17 AoRs with 1 binding, 17 with 2, 16 with 3.
        assert_eq!(t.bindings(), 17 + 34 + 48);
        let copy = Usrloc::new(0);
        let copy_ref = Usrloc::new(0);
        let mut n = 0;
        t.snapshot_records(|r| {
            let ChangeRef::BindingUpsert { binding, .. } = r.change else {
                panic!("snapshot yields upserts only");
            };
            assert_eq!((r.origin, r.version), (binding.origin, binding.version));
            assert_eq!(r.at_ms, u64::from(binding.last_modified) * 1000);
            let owned = r.to_owned_record();
            assert_eq!(owned.encode_to_vec(), r.encode_to_vec());
            assert_eq!(copy.apply_remote(&owned), copy_ref.apply_remote_ref(r));
            n += 1;
        });
        assert_eq!(n, t.bindings());
        for c in [&copy, &copy_ref] {
            assert_eq!((c.aors(), c.bindings()), (t.aors(), t.bindings()));
            assert_eq!(c.digest(), t.digest());
            t.for_each(|aor, rec| {
                c.read(aor, |r| assert_eq!(r, Some(rec)));
            });
        }
        // Applying the snapshot again changes nothing.
        t.snapshot_records(|r| assert_eq!(copy.apply_remote_ref(r), Applied::Kept));
        assert_ne!(t.digest(), Digest::default());
    }
}
