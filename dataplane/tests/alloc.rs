//! No heap allocation per message on receive → parse → logic → reply, except the table
//! insert of a REGISTER that changes bindings. Counted with an instrumented global
//! allocator; one `#[test]` so no other test thread allocates meanwhile.

mod common;

use std::alloc::System;

use common::*;
use sipmesh_dataplane::durable::{DurableShared, Gate};
use sipmesh_dataplane::io::Handler;
use sipmesh_dataplane::registrar::RegistrarConfig;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn allocations_for(h: &mut Harness, msgs: &[Vec<u8>]) -> usize {
    let src = udp_source("192.0.2.10:5062");
    let region = Region::new(GLOBAL);
    for m in msgs {
        h.out.sent.clear();
        h.core.on_message(m, &src, h.now, &mut h.out);
    }
    region.change().allocations
}

#[test]
fn hot_path_allocations() {
    let mut h = Harness::new(RegistrarConfig::default());
    let opt = b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKo1\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n".to_vec();
    let bad = String::from_utf8(opt.clone())
        .unwrap()
        .replace("CSeq: 1", "CSeq: x")
        .into_bytes();
    let invite = String::from_utf8(opt.clone())
        .unwrap()
        .replace("OPTIONS", "INVITE")
        .into_bytes();
    let fetch = register("alice", "c1", 1, &[]).into_bytes();

    // Warm up: first-use growth of scratch buffers and the table entry.
    let first = register("alice", "c1", 1, &["Contact: <sip:alice@192.0.2.10:5062>"]).into_bytes();
    allocations_for(
        &mut h,
        &[
            first,
            opt.clone(),
            bad.clone(),
            invite.clone(),
            fetch.clone(),
        ],
    );
    h.drain();

    let n = 1000;
    assert_eq!(allocations_for(&mut h, &vec![opt; n]), 0, "OPTIONS → 200");
    assert_eq!(allocations_for(&mut h, &vec![bad; n]), 0, "malformed → 400");
    assert_eq!(allocations_for(&mut h, &vec![invite; n]), 0, "INVITE → 405");
    assert_eq!(
        allocations_for(&mut h, &vec![fetch; n]),
        0,
        "REGISTER fetch → 200 with bindings"
    );

    // A refresh replaces the binding: the table insert allocates (the new binding's
    // string buffer and the table entry), nothing else does.
    let refreshes: Vec<Vec<u8>> = (2..2 + n as u32)
        .map(|i| register("alice", "c1", i, &["Contact: <sip:alice@192.0.2.10:5062>"]).into_bytes())
        .collect();
    let a = allocations_for(&mut h, &refreshes);
    let per = a as f64 / n as f64;
    assert!(
        h.out.last_text().starts_with("SIP/2.0 200 OK"),
        "{}",
        h.out.last_text()
    );
    assert!(per <= 2.2, "refresh: {per} allocations per REGISTER");
    eprintln!("allocations per REGISTER refresh: {per:.2}");

    // Sync durability: the same refreshes with every 200 parked until its records are
    // durable, then released by the doorbell path. Parking and releasing allocate
    // nothing (the arena and the queue are sized at start): the same count as above.
    let gate = |h: &mut Harness| {
        let shared = DurableShared::new().unwrap();
        let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
        h.core = core.with_durability_gate(Gate::new(shared.clone(), 1 << 22, 4096, 0));
        shared
    };
    // Warm-up of the parking path.
    let shared = gate(&mut h);
    allocations_for(
        &mut h,
        &[register(
            "alice",
            "c1",
            5000,
            &["Contact: <sip:alice@192.0.2.10:5062>"],
        )
        .into_bytes()],
    );
    shared.publish(u64::MAX / 2);
    let now = h.now;
    h.core.on_wake(now, &mut h.out);
    h.drain();
    // Measured: a fresh gate (nothing durable yet), n REGISTERs parked, then all released.
    let shared = gate(&mut h);
    let refreshes: Vec<Vec<u8>> = (5001..5001 + n as u32)
        .map(|i| register("alice", "c1", i, &["Contact: <sip:alice@192.0.2.10:5062>"]).into_bytes())
        .collect();
    let src = udp_source("192.0.2.10:5062");
    h.out.sent.clear();
    let region = Region::new(GLOBAL);
    for m in &refreshes {
        h.core.on_message(m, &src, h.now, &mut h.out);
    }
    let parked = h.core.parked_replies();
    shared.publish(u64::MAX / 2);
    h.core.on_wake(now, &mut h.out);
    let a = region.change().allocations;
    assert_eq!(parked, n, "every 200 waited");
    assert_eq!(h.out.sent.len(), n, "and every one left");
    assert_eq!(h.core.parked_replies(), 0);
    let per_gated = a as f64 / n as f64;
    eprintln!("allocations per REGISTER refresh with sync durability: {per_gated:.2}");
    assert!(per_gated <= per + 0.05, "gated {per_gated} vs {per}");

    keepalive_pings_and_their_answers_allocate_nothing();
    proxied_calls_allocate_a_bounded_amount_per_call();
}

/// A call through the proxy (INVITE, 180, 200, ACK, BYE, 200 in; 100 and the rest
/// out; with dialog tracking, CDR and change records): counted, not zero — the transactions keep copies
/// of what they may retransmit and the dialog's strings live in their own allocations.
/// The bound catches regressions; the figure is printed.
fn proxied_calls_allocate_a_bounded_amount_per_call() {
    use sipmesh_cluster::dialog::{DialogTable, ProfileKey, Profiles};
    use sipmesh_cluster::ownership::{Ownership, Segment};
    use sipmesh_dataplane::stateful::{DialogShare, Proxy, ProxyConfig, ProxyStats};
    use sipmesh_dataplane::txn::TimerConfig;
    use sipmesh_dataplane::txn::table::Keys;
    use std::sync::Arc;

    let mut h = Harness::new(RegistrarConfig::default());
    let segment = Arc::new(Segment::anonymous(7).unwrap());
    let mut o = Ownership::default();
    o.set_tag(0, true, 1);
    segment.publish(&o);
    let (cdr_p, mut cdr_c) = rtrb::RingBuffer::new(1 << 22);
    let (_op, oc) = rtrb::RingBuffer::new(1 << 16);
    let (rp, mut rc) = sipmesh_cluster::ring::change_ring(1 << 24);
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_proxy(
        Proxy::new(
            ProxyConfig {
                timers: TimerConfig::default(),
                local: "192.0.2.1:5060".parse().unwrap(),
                record_route: true,
                dialog_lifetime_ms: 43_200_000,
                dialog_ping_ms: 0,
                serial_forking: false,
            },
            Arc::new(Keys::new()),
            7,
            0,
            h.now,
            Arc::new(ProxyStats::default()),
        )
        .with_dialogs(DialogShare {
            table: Arc::new(DialogTable::new(1024)),
            cdrs: cdr_p,
            segment,
            profiles: Arc::new(Profiles::new(vec![("calls".into(), ProfileKey::None)])),
            changes: rp,
            orders: oc,
        }),
    );
    let callee = udp_source("198.51.100.20:5070");
    h.send_from(
        &register(
            "bob",
            "reg-bob",
            1,
            &["Contact: <sip:bob@198.51.100.20:5070>"],
        ),
        &callee,
    );
    let call = |h: &mut Harness, i: u32| -> usize {
        let caller = udp_source("192.0.2.10:5062");
        let invite = format!(
            "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKc{i}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a{i}\r\nTo: <sip:bob@example.com>\r\n\
             Call-ID: call{i}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.10:5062>\r\nContent-Length: 0\r\n\r\n"
        );
        h.out.sent.clear();
        let region = Region::new(GLOBAL);
        h.core
            .on_message(invite.as_bytes(), &caller, h.now, &mut h.out);
        let at_invite = region.change().allocations;
        let fwd = {
            let (_, off, len) = h.out.sent[1];
            String::from_utf8_lossy(&h.out.buf[off..off + len]).into_owned()
        };
        let r = |code: &str| {
            let mut m = format!("SIP/2.0 {code}\r\n");
            for l in fwd.split("\r\n").filter(|l| {
                ["Via:", "Record-Route:", "From:", "Call-ID:", "CSeq:"]
                    .iter()
                    .any(|x| l.starts_with(x))
            }) {
                m.push_str(l);
                m.push_str("\r\n");
            }
            m + &format!(
                "To: <sip:bob@example.com>;tag=b{i}\r\nContact: <sip:bob@198.51.100.20:5070>\r\nContent-Length: 0\r\n\r\n"
            )
        };
        let (ringing, ok) = (r("180 Ringing"), r("200 OK"));
        let ack = format!(
            "ACK sip:bob@198.51.100.20:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKa{i}\r\n\
             Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a{i}\r\n\
             To: <sip:bob@example.com>;tag=b{i}\r\nCall-ID: call{i}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        );
        let bye = ack
            .replace("ACK sip:", "BYE sip:")
            .replace("1 ACK", "2 BYE")
            .replace(&format!("z9hG4bKa{i}"), &format!("z9hG4bKb{i}"));
        let region = Region::new(GLOBAL);
        h.core
            .on_message(ringing.as_bytes(), &callee, h.now, &mut h.out);
        h.core.on_message(ok.as_bytes(), &callee, h.now, &mut h.out);
        h.core
            .on_message(ack.as_bytes(), &caller, h.now, &mut h.out);
        h.out.sent.clear();
        h.core
            .on_message(bye.as_bytes(), &caller, h.now, &mut h.out);
        let fbye = {
            let (_, off, len) = h.out.sent[0];
            String::from_utf8_lossy(&h.out.buf[off..off + len]).into_owned()
        };
        let a = region.change().allocations;
        let mut m = String::from("SIP/2.0 200 OK\r\n");
        for l in fbye.split("\r\n").filter(|l| {
            ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
                .iter()
                .any(|x| l.starts_with(x))
        }) {
            m.push_str(l);
            m.push_str("\r\n");
        }
        m.push_str("Content-Length: 0\r\n\r\n");
        let region = Region::new(GLOBAL);
        h.core.on_message(m.as_bytes(), &callee, h.now, &mut h.out);
        at_invite + a + region.change().allocations
    };
    for i in 0..50 {
        call(&mut h, i);
    }
    let n = 200;
    let total: usize = (50..50 + n).map(|i| call(&mut h, i)).sum();
    let per = total as f64 / n as f64;
    eprintln!("allocations per proxied call (INVITE, 180, 200, ACK, BYE, 200): {per:.1}");
    assert!(per <= 60.0, "{per} allocations per call");
    let mut seen = 0;
    rc.drain(|_| seen += 1);
    assert!(seen > 0);
    while cdr_c.pop().is_ok() {}
}

/// A worker sending 1000 keepalive pings (ownership checked for each) and taking their
/// 1000 answers allocates nothing.
fn keepalive_pings_and_their_answers_allocate_nothing() {
    use sipmesh_cluster::keepalive::{Acks, Action, Scheduler, Settings, order_ring};
    use sipmesh_cluster::ownership::{Ownership, Segment};
    use sipmesh_dataplane::pinger::{PingStats, Pinger};
    use sipmesh_dataplane::registrar::KeepaliveMode;
    use std::sync::Arc;

    let cfg = RegistrarConfig {
        keepalive: KeepaliveMode::All,
        ..RegistrarConfig::default()
    };
    let mut h = Harness::new(cfg.clone());
    let n = 1000;
    for i in 0..n {
        h.send(&register(
            &format!("u{i}"),
            &format!("c{i}"),
            1,
            &[&format!("Contact: <sip:u{i}@192.0.2.10:5062>")],
        ));
    }
    let segment = Arc::new(Segment::anonymous(1).unwrap());
    let mut o = Ownership::default();
    o.set_tag(0, true, 1);
    segment.publish(&o);
    let acks = Arc::new(Acks::new(2 * n, 1));
    let (mut p, c) = order_ring(2 * n);
    let stats = Arc::new(PingStats::default());
    let core = std::mem::replace(&mut h.core, Harness::new(cfg).core);
    h.core = core.with_pinger(Pinger::new(
        c,
        segment,
        acks.clone(),
        "192.0.2.1:5060".parse().unwrap(),
        1,
        stats.clone(),
    ));
    let mut sched = Scheduler::new(
        Settings {
            interval_ms: 1000,
            ..Settings::default()
        },
        acks,
    );
    sched.observe_all(&h.table);
    let run_interval = |h: &mut Harness, sched: &mut Scheduler, p: &mut _| {
        let p: &mut sipmesh_cluster::keepalive::OrderProducer = p;
        for _ in 0..100 {
            h.now += 10;
            sched.advance(
                h.now,
                &h.table,
                |_, _, _| Some(0),
                |a| match a {
                    Action::Ping(o) => p.push(o).is_ok(),
                    Action::Remove { .. } => true,
                },
            );
        }
    };
    run_interval(&mut h, &mut sched, &mut p);
    // Warm-up tick (first use of the outbox).
    h.out.clear();
    let now = h.now;
    h.core.on_tick(now, &mut h.out);
    run_interval(&mut h, &mut sched, &mut p);

    h.out.clear();
    let region = Region::new(GLOBAL);
    h.core.on_tick(now, &mut h.out);
    let a = region.change().allocations;
    assert_eq!(h.out.sent.len(), n, "one ping per contact");
    assert_eq!(a, 0, "sending {n} pings");
    let answers: Vec<Vec<u8>> = h
        .out
        .sent
        .iter()
        .map(|&(_, off, len)| {
            let ping = String::from_utf8_lossy(&h.out.buf[off..off + len]).into_owned();
            let mut r = String::from("SIP/2.0 200 OK\r\n");
            for l in ping.split("\r\n").filter(|l| {
                ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
                    .iter()
                    .any(|x| l.starts_with(x))
            }) {
                r.push_str(l);
                r.push_str("\r\n");
            }
            (r + "Content-Length: 0\r\n\r\n").into_bytes()
        })
        .collect();
    let before = stats.answers.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(allocations_for(&mut h, &answers), 0, "taking {n} answers");
    assert_eq!(
        stats.answers.load(std::sync::atomic::Ordering::Relaxed) - before,
        n as u64
    );
}
