//! Properties of replication: last-writer-wins application of remote change records
//! (`Usrloc::apply_remote`), full-sync snapshots and the dataset digest.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use proptest::prelude::*;
use sipmesh_cluster::usrloc::{BindingParts, Q_NONE};
use sipmesh_cluster::{Binding, Change, ChangeRecord, Digest, NodeId, RemoveReason, Usrloc};

const AORS: [&[u8]; 3] = [
    b"alice@example.com",
    b"bob@example.com",
    b"a\0b@example.com",
];

/// Binding identities (contact, instance, reg-id). "The same binding" is an equivalence on
/// this set — classes {0, 1} (same Contact, one without instance), {2}, {3}, {4} (two RFC 5626
/// flows of one instance with the same Contact), {5, 6} (same instance and reg-id) — which is
/// what convergence of last writer wins without tombstones needs.
const IDENTS: [(&str, &str, u32); 7] = [
    ("sip:a@192.0.2.1", "", 0),
    ("sip:a@192.0.2.1", "<urn:uuid:3>", 0),
    ("sip:b@192.0.2.2", "", 0),
    ("sip:c@192.0.2.3;ob", "<urn:uuid:1>", 1),
    ("sip:c@192.0.2.3;ob", "<urn:uuid:1>", 2),
    ("sip:d@192.0.2.4", "<urn:uuid:2>", 0),
    ("sip:e@192.0.2.5", "<urn:uuid:2>", 0),
];
const CLASS: [usize; 7] = [0, 0, 1, 2, 3, 4, 4];

#[derive(Clone, Debug)]
struct Op {
    aor: usize,
    ident: usize,
    origin: u16,
    expires_at: u32,
    cseq: u32,
    remove: bool,
}

fn binding(op: &Op, version: u64) -> Binding {
    let (contact, instance, reg_id) = IDENTS[op.ident];
    Binding::new(BindingParts {
        contact: contact.as_bytes(),
        call_id: format!("call-{}", op.origin).as_bytes(),
        path: b"",
        instance: instance.as_bytes(),
        user_agent: b"UA",
        tag: b"",
        expires_at: op.expires_at,
        cseq: op.cseq,
        q: Q_NONE,
        reg_id,
        source: SocketAddr::from(([192, 0, 2, 9], 5060)),
        transport: 0,
        flags: 0,
        version,
        origin: NodeId(op.origin),
        last_modified: 1_700_000_000,
    })
}

fn record(op: &Op, version: u64) -> ChangeRecord {
    let aor: Box<[u8]> = AORS[op.aor].into();
    let change = if op.remove {
        let (contact, instance, reg_id) = IDENTS[op.ident];
        Change::BindingRemove {
            aor,
            contact: contact.as_bytes().into(),
            instance: instance.as_bytes().into(),
            reg_id,
            reason: RemoveReason::Expired,
        }
    } else {
        Change::BindingUpsert {
            aor,
            binding: binding(op, version),
        }
    };
    ChangeRecord {
        origin: NodeId(op.origin),
        version,
        at_ms: 0,
        change,
    }
}

fn op(removes: bool) -> impl Strategy<Value = Op> {
    (
        0..AORS.len(),
        0..IDENTS.len(),
        0..4u16,
        any::<u32>(),
        any::<u32>(),
        prop::bool::weighted(if removes { 0.3 } else { 0.0 }),
    )
        .prop_map(|(aor, ident, origin, expires_at, cseq, remove)| Op {
            aor,
            ident,
            origin,
            expires_at,
            cseq,
            remove,
        })
}

/// Records with pairwise distinct versions (in random order), plus a random permutation of
/// them.
fn records(removes: bool) -> impl Strategy<Value = (Vec<ChangeRecord>, Vec<usize>)> {
    (0..48usize).prop_flat_map(move |n| {
        (
            prop::collection::vec(op(removes), n),
            Just((1..=n as u64).collect::<Vec<_>>()).prop_shuffle(),
            proptest::collection::vec(0..1000u64, n),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        )
            .prop_map(|(ops, ranks, jitter, perm)| {
                let recs = ops
                    .iter()
                    .zip(ranks.iter().zip(&jitter))
                    // Distinct ranks keep versions distinct; the jitter spreads them.
                    .map(|(op, (rank, j))| record(op, rank * 1000 + j))
                    .collect();
                (recs, perm)
            })
    })
}

/// The table's content, each AoR's bindings sorted (the order within a record depends on
/// the order of application; the set must not).
fn contents(t: &Usrloc) -> BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
    let mut m = BTreeMap::new();
    let mut n = 0;
    t.for_each(|aor, rec| {
        let mut v: Vec<Vec<u8>> = rec
            .bindings()
            .iter()
            .map(|b| sipmesh_cluster::ChangeRecordRef::encode_to_vec(&upsert_ref(aor, b)))
            .collect();
        v.sort();
        n += v.len();
        assert!(!v.is_empty(), "an empty record is never stored");
        m.insert(aor.to_vec(), v);
    });
    assert_eq!(n, t.bindings(), "binding count out of step");
    assert_eq!(m.len(), t.aors());
    m
}

fn upsert_ref<'a>(aor: &'a [u8], b: &'a Binding) -> sipmesh_cluster::ChangeRecordRef<'a> {
    sipmesh_cluster::ChangeRecordRef {
        origin: b.origin,
        version: b.version,
        at_ms: 0,
        change: sipmesh_cluster::ChangeRef::BindingUpsert { aor, binding: b },
    }
}

fn apply_all<'a>(recs: impl IntoIterator<Item = &'a ChangeRecord>) -> Usrloc {
    let t = Usrloc::new(0);
    for r in recs {
        t.apply_remote(r);
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Upserts only: any delivery order gives the same table, namely the highest version of
    /// each binding.
    #[test]
    fn upserts_converge_in_any_order((recs, perm) in records(false)) {
        let a = apply_all(&recs);
        let b = apply_all(perm.iter().map(|&i| &recs[i]));
        let c = apply_all(recs.iter().rev());
        let ca = contents(&a);
        prop_assert_eq!(&ca, &contents(&b));
        prop_assert_eq!(&ca, &contents(&c));
        prop_assert_eq!(a.digest(), b.digest());
        prop_assert_eq!(a.digest(), c.digest());

        // The expected winners, computed independently.
        let mut best: BTreeMap<(Vec<u8>, usize), &Binding> = BTreeMap::new();
        for r in &recs {
            let Change::BindingUpsert { aor, binding } = &r.change else { unreachable!() };
            let ident = IDENTS
                .iter()
                .position(|&(c, i, g)| {
                    c.as_bytes() == binding.contact()
                        && i.as_bytes() == binding.instance()
                        && g == binding.reg_id
                })
                .unwrap();
            let e = best.entry((aor.to_vec(), CLASS[ident])).or_insert(binding);
            if binding.version > e.version {
                *e = binding;
            }
        }
        let mut expect: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        let mut digest = Digest::default();
        for ((aor, _), b) in &best {
            expect
                .entry(aor.clone())
                .or_default()
                .push(upsert_ref(aor, b).encode_to_vec());
            digest.add(aor, b);
        }
        expect.values_mut().for_each(|v| v.sort());
        prop_assert_eq!(&ca, &expect);
        prop_assert_eq!(a.digest(), digest);

        // Re-delivering everything changes nothing.
        for r in &recs {
            prop_assert_eq!(a.apply_remote(r), sipmesh_cluster::Applied::Kept);
        }
        prop_assert_eq!(contents(&a), ca);
    }

    /// Upserts and removes in one delivery order: the table matches a naive model of last
    /// writer wins, the counters stay right, no AoR holds two same bindings, and a full sync
    /// (snapshot → apply to an empty table) reproduces it with the same digest.
    #[test]
    fn with_removes_matches_model_and_syncs((recs, _perm) in records(true)) {
        let t = Usrloc::new(0);
        let mut model: BTreeMap<Vec<u8>, Vec<Binding>> = BTreeMap::new();
        for r in &recs {
            t.apply_remote(r);
            let v = model.entry(r.change.aor().to_vec()).or_default();
            let class_of = |contact: &[u8], instance: &[u8], reg_id: u32| {
                CLASS[IDENTS
                    .iter()
                    .position(|&(c, i, g)| {
                        c.as_bytes() == contact && i.as_bytes() == instance && g == reg_id
                    })
                    .unwrap()]
            };
            match &r.change {
                Change::BindingUpsert { binding, .. } => {
                    let k = class_of(binding.contact(), binding.instance(), binding.reg_id);
                    match v.iter().position(|b| class_of(b.contact(), b.instance(), b.reg_id) == k) {
                        Some(p) if v[p].version >= binding.version => {}
                        Some(p) => v[p] = binding.clone(),
                        None => v.push(binding.clone()),
                    }
                }
                Change::BindingRemove { contact, instance, reg_id, .. } => {
                    let k = class_of(contact, instance, *reg_id);
                    v.retain(|b| {
                        class_of(b.contact(), b.instance(), b.reg_id) != k || b.version >= r.version
                    });
                }
                _ => unreachable!("bindings only"),
            }
            if v.is_empty() {
                model.remove(r.change.aor());
            }
            let got: BTreeMap<Vec<u8>, Vec<Binding>> = {
                let mut m = BTreeMap::new();
                t.for_each(|aor, rec| {
                    m.insert(aor.to_vec(), rec.bindings().to_vec());
                });
                m
            };
            prop_assert_eq!(&got, &model);
            prop_assert_eq!(t.bindings(), model.values().map(Vec::len).sum::<usize>());
            prop_assert_eq!(t.aors(), model.len());
        }

        let copy = Usrloc::new(0);
        let mut n = 0;
        t.snapshot_records(|r| {
            copy.apply_remote(&r.to_owned_record());
            n += 1;
        });
        prop_assert_eq!(n, t.bindings());
        prop_assert_eq!(copy.digest(), t.digest());
        prop_assert_eq!(contents(&copy), contents(&t));
    }
}
