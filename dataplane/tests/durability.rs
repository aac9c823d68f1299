//! `sync` durability, sans-IO: a REGISTER's 200 waits until the persistence side says the
//! worker's change records are durable, and replies leave in order.

mod common;

use common::*;
use sipmesh_dataplane::durable::{DurableShared, Gate};
use sipmesh_dataplane::io::Handler;
use sipmesh_dataplane::registrar::RegistrarConfig;

fn gated(arena: usize) -> (Harness, std::sync::Arc<DurableShared>) {
    let mut h = Harness::new(RegistrarConfig::default());
    let shared = DurableShared::new().unwrap();
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_durability_gate(Gate::new(shared.clone(), arena, 4096, 0));
    (h, shared)
}

#[test]
fn the_200_waits_until_its_records_are_durable() {
    let (mut h, shared) = gated(1 << 20);
    let r = h.send(&register(
        "alice",
        "c1",
        1,
        &["Contact: <sip:alice@192.0.2.10>"],
    ));
    assert_eq!(r, "", "answered before the record was durable");
    assert_eq!(h.core.parked_replies(), 1);
    // The binding exists (and its record is in the ring) before the answer.
    assert_eq!(h.table.bindings(), 1);
    assert_eq!(h.drain().len(), 1);

    // A second REGISTER from another user parks behind it.
    let r = h.send(&register(
        "bob",
        "c2",
        1,
        &["Contact: <sip:bob@192.0.2.10>"],
    ));
    assert_eq!(r, "");
    assert_eq!(h.core.parked_replies(), 2);

    // Only the first record is durable: only the first answer leaves.
    shared.publish(1);
    h.out.clear();
    let now = h.now;
    h.core.on_wake(now, &mut h.out);
    assert_eq!(h.out.sent.len(), 1);
    let first = h.out.last_text();
    assert_eq!(status(&first), 200, "{first}");
    assert!(first.contains("sip:alice@192.0.2.10"), "{first}");
    assert_eq!(h.core.parked_replies(), 1);

    // Both durable: the second leaves too (a tick releases as well as the doorbell).
    shared.publish(2);
    h.advance(10);
    assert_eq!(h.out.sent.len(), 1);
    assert!(h.out.last_text().contains("sip:bob@192.0.2.10"));
    assert_eq!(h.core.parked_replies(), 0);
}

#[test]
fn a_fetch_after_durable_changes_is_answered_at_once() {
    let (mut h, shared) = gated(1 << 20);
    h.send(&register(
        "alice",
        "c1",
        1,
        &["Contact: <sip:alice@192.0.2.10>"],
    ));
    shared.publish(1);
    h.advance(10);
    // Nothing pending: a fetch (no change) is not held.
    let r = h.send(&register("alice", "c9", 1, &[]));
    assert_eq!(status(&r), 200, "{r}");
    // Errors never wait either.
    let r = h.send(&register(
        "alice",
        "c1",
        1,
        &["Contact: <sip:alice@192.0.2.10>", "Expires: 5"],
    ));
    assert_eq!(status(&r), 423, "{r}");
}

#[test]
fn a_full_parking_area_refuses_before_changing_anything() {
    // Room for exactly one maximum-size reply.
    let (mut h, _shared) = gated(4096);
    assert_eq!(
        h.send(&register("u1", "c1", 1, &["Contact: <sip:u1@192.0.2.10>"])),
        ""
    );
    let before = h.table.bindings();
    let r = h.send(&register("u2", "c2", 1, &["Contact: <sip:u2@192.0.2.10>"]));
    assert_eq!(status(&r), 503, "{r}");
    assert!(r.contains("Retry-After: 1"), "{r}");
    assert_eq!(
        h.table.bindings(),
        before,
        "a refused REGISTER changes nothing"
    );
    assert_eq!(
        h.stats
            .durability_busy
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn with_slack_replies_leave_until_the_store_is_that_far_behind() {
    // Async durability: up to 2 records may be unstored when a reply leaves.
    let mut h = Harness::new(RegistrarConfig::default());
    let shared = DurableShared::new().unwrap();
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_durability_gate(Gate::new(shared.clone(), 1 << 20, 4096, 2));
    for (i, user) in ["a", "b"].iter().enumerate() {
        let r = h.send(&register(
            user,
            &format!("c{i}"),
            1,
            &[&format!("Contact: <sip:{user}@192.0.2.10>")],
        ));
        assert_eq!(status(&r), 200, "{r}");
    }
    // The third is 3 records ahead of the store: it waits.
    assert_eq!(
        h.send(&register("c", "c3", 1, &["Contact: <sip:c@192.0.2.10>"])),
        ""
    );
    assert_eq!(h.core.parked_replies(), 1);
    shared.publish(1);
    h.advance(10);
    assert_eq!(h.out.sent.len(), 1);
    assert!(h.out.last_text().contains("sip:c@192.0.2.10"));
}
