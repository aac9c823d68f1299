//! Allocation checks for the worker hot paths, with a counting global allocator.
//!
//! Everything runs in one `#[test]` so that no other test thread allocates concurrently
//! (the counters are process-wide).

use std::alloc::System;
use std::net::SocketAddr;

use sipmesh_cluster::usrloc::{BindingParts, Q_NONE};
use sipmesh_cluster::{
    AorRecord, Binding, ChangeRecordRef, ChangeRef, NodeId, RemoveReason, TimerWheel, Update,
    Usrloc, change_ring,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn binding(i: u32) -> Binding {
    let contact = format!("sip:user{i}@192.0.2.10:5060;transport=udp");
    let call_id = format!("{i:08x}-d9cb-469f-a165-70867728950e");
    Binding::new(BindingParts {
        contact: contact.as_bytes(),
        call_id: call_id.as_bytes(),
        path: b"",
        instance: b"",
        user_agent: b"",
        tag: b"",
        expires_at: 1_800_000_000 + i,
        cseq: i,
        q: Q_NONE,
        reg_id: 0,
        source: SocketAddr::from(([192, 0, 2, 10], 5060)),
        transport: 0,
        flags: 0,
        version: i as u64,
        origin: NodeId(1),
        last_modified: 1_700_000_000,
    })
}

fn allocs(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    let s = region.change();
    s.allocations + s.reallocations
}

#[test]
fn hot_paths_do_not_allocate() {
    // --- ring push (incl. frames straddling the wrap point) ---
    let (mut p, mut c) = change_ring(4096);
    let bindings: Vec<Binding> = (0..64).map(binding).collect();
    let aor = b"user123456@example.com";
    let n = allocs(|| {
        for round in 0..200u64 {
            for (i, b) in bindings.iter().enumerate() {
                let change = if i % 2 == 0 {
                    ChangeRef::BindingUpsert { aor, binding: b }
                } else {
                    ChangeRef::BindingRemove {
                        aor,
                        contact: b.contact(),
                        instance: b.instance(),
                        reg_id: 0,
                        reason: RemoveReason::Expired,
                    }
                };
                let rec = ChangeRecordRef {
                    origin: NodeId(1),
                    version: round,
                    at_ms: 0,
                    change,
                };
                if p.free_bytes() < sipmesh_cluster::ChangeProducer::frame_len(&rec) {
                    // A refused push must not allocate either.
                    assert!(p.push(&rec).is_err());
                    continue;
                }
                p.push(&rec).unwrap();
            }
            // Drain the raw frames (no decode) into the consumer's reused buffer.
            while c.pop_frame_scratch().is_some() {}
        }
    });
    // pop_frame_scratch grows its buffer once (at most a few times) at the start.
    assert!(n <= 4, "ring push/pop allocated {n} times");
    assert!(p.stats().pushed() > 5_000);

    let n = allocs(|| {
        for i in 0..1000u64 {
            let rec = ChangeRecordRef {
                origin: NodeId(1),
                version: i,
                at_ms: i,
                change: ChangeRef::BindingUpsert {
                    aor,
                    binding: &bindings[(i % 64) as usize],
                },
            };
            p.push(&rec).unwrap();
            let _ = c.pop_frame_scratch().unwrap();
        }
    });
    assert_eq!(n, 0, "steady-state ring push allocated {n} times");

    // --- batch fill + batch push, steady state ---
    let mut batch = sipmesh_cluster::ChangeBatch::with_capacity(16 * 1024);
    let n = allocs(|| {
        for round in 0..500u64 {
            batch.clear();
            for b in bindings.iter().take(8) {
                batch.push(&ChangeRecordRef {
                    origin: NodeId(1),
                    version: round,
                    at_ms: 0,
                    change: ChangeRef::BindingUpsert { aor, binding: b },
                });
            }
            p.push_batch(&batch).unwrap();
            while c.pop_frame_scratch().is_some() {}
        }
    });
    assert_eq!(n, 0, "batch fill/push allocated {n} times");

    // --- usrloc lock-free read and Keep decisions ---
    let table = Usrloc::new(1024);
    for (i, b) in bindings.iter().enumerate() {
        let key = format!("user{i}@example.com");
        table.update(key.as_bytes(), |_| {
            Update::Replace(AorRecord::single(b.clone()), ())
        });
    }
    let keys: Vec<String> = (0..64).map(|i| format!("user{i}@example.com")).collect();
    let n = allocs(|| {
        for _ in 0..100 {
            for k in &keys {
                let exp = table.read(k.as_bytes(), |r| r.and_then(|r| r.min_expires_at()));
                assert!(exp.is_some());
                let o = table.update(k.as_bytes(), |_| Update::Keep(()));
                assert!(o.key.is_some());
                // Unregistering an unknown AoR is a no-op that does not allocate either.
                table.update(b"nobody@example.com", |_| Update::Remove(()));
            }
        }
    });
    assert_eq!(n, 0, "usrloc read/keep allocated {n} times");

    // --- usrloc refresh: the binding data clone + the table entry (record is inline) ---
    let rounds = 50;
    let n = allocs(|| {
        for r in 0..rounds {
            for k in &keys {
                table.update(k.as_bytes(), |cur| {
                    let mut b = cur.unwrap().bindings()[0].clone();
                    b.expires_at += r;
                    Update::Replace(AorRecord::single(b), ())
                });
            }
        }
    });
    let per = n as f64 / (rounds as usize * keys.len()) as f64;
    eprintln!("refresh: {per:.3} allocations per update");
    assert!(
        per <= 2.2,
        "refresh allocated {per:.2} times per update (expected ~2)"
    );

    // --- timer wheel steady state ---
    let mut wheel = TimerWheel::new(0, 64);
    let arcs: Vec<_> = keys
        .iter()
        .map(|k| table.key(k.as_bytes()).unwrap())
        .collect();
    for (i, a) in arcs.iter().enumerate() {
        wheel.insert(i as u32 % 64 + 1, a.clone());
    }
    wheel.advance(64, drop);
    let n = allocs(|| {
        for t in 0..20u32 {
            let base = 64 + t * 64;
            for (i, a) in arcs.iter().enumerate() {
                wheel.insert(base + i as u32 % 64 + 1, a.clone());
            }
            wheel.advance(base + 64, drop);
        }
    });
    assert_eq!(n, 0, "timer wheel allocated {n} times in steady state");
}
