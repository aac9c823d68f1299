//! NAT keepalives through a worker's core, sans-IO with virtual time: contacts registered
//! through the core are scheduled, the orders reach the core's pinger, the OPTIONS it
//! sends are well formed and go to the NAT's public side, answers are recognised (on any
//! worker), a ping whose owner changed before it went out is fenced, and a contact that
//! stops answering is removed after `max_misses`.

mod common;

use std::sync::Arc;

use common::*;
use sipmesh_cluster::keepalive::{
    Acks, Action, PingMethod, Scheduler, Settings, contact_key, order_ring,
};
use sipmesh_cluster::ownership::{Ownership, Segment};
use sipmesh_dataplane::io::{Dest, Handler};
use sipmesh_dataplane::pinger::{PingStats, Pinger};
use sipmesh_dataplane::registrar::{KeepaliveMode, RegistrarConfig};

struct Rig {
    h: Harness,
    sched: Scheduler,
    orders: sipmesh_cluster::keepalive::OrderProducer,
    segment: Arc<Segment>,
    stats: Arc<PingStats>,
    acks: Arc<Acks>,
}

fn rig(method: PingMethod, max_misses: u32) -> Rig {
    let mut h = Harness::new(RegistrarConfig {
        keepalive: KeepaliveMode::Nated,
        ..RegistrarConfig::default()
    });
    let segment = Arc::new(Segment::anonymous(7).unwrap());
    let mut o = Ownership::default();
    o.set_tag(0, true, 1);
    segment.publish(&o);
    let acks = Arc::new(Acks::new(64, 42));
    let (p, c) = order_ring(64);
    let stats = Arc::new(PingStats::default());
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_pinger(Pinger::new(
        c,
        segment.clone(),
        acks.clone(),
        "192.0.2.1:5060".parse().unwrap(),
        7,
        stats.clone(),
    ));
    let sched = Scheduler::new(
        Settings {
            enabled: true,
            method,
            interval_ms: 1000,
            max_misses,
        },
        acks.clone(),
    );
    Rig {
        h,
        sched,
        orders: p,
        segment,
        stats,
        acks,
    }
}

impl Rig {
    /// Runs the scheduler and the worker tick for `ms` of virtual time; returns the
    /// datagrams sent and the AoRs whose removal was asked.
    fn run(&mut self, ms: u64) -> (Vec<(Dest, String)>, Vec<Vec<u8>>) {
        let mut sent = Vec::new();
        let mut removals = Vec::new();
        let end = self.h.now + ms;
        while self.h.now < end {
            self.h.now += 10;
            let segment = self.segment.clone();
            let orders = &mut self.orders;
            self.sched.advance(
                self.h.now,
                &self.h.table,
                |_, b, due| segment.acts_on_at(0, b, due).0.then_some(0),
                |a| match a {
                    Action::Ping(o) => orders.push(o).is_ok(),
                    Action::Remove { aor, keys } => {
                        let b = self
                            .h
                            .table
                            .read(&aor, |r| r.unwrap().bindings()[0].clone());
                        assert_eq!(keys, vec![contact_key(&b)]);
                        removals.push(aor.to_vec());
                        true
                    }
                },
            );
            self.h.out.clear();
            let now = self.h.now;
            self.h.core.on_tick(now, &mut self.h.out);
            for &(d, off, len) in &self.h.out.sent {
                sent.push((
                    d,
                    String::from_utf8_lossy(&self.h.out.buf[off..off + len]).into_owned(),
                ));
            }
        }
        (sent, removals)
    }
}

fn answer(ping: &str) -> String {
    let mut r = String::from("SIP/2.0 200 OK\r\n");
    for l in ping.split("\r\n").skip(1) {
        if ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
            .iter()
            .any(|h| l.starts_with(h))
        {
            r.push_str(l);
            r.push_str("\r\n");
        }
    }
    r + "Content-Length: 0\r\n\r\n"
}

#[test]
fn registered_nated_contacts_get_well_formed_options_pings_at_their_public_address() {
    let mut r = rig(PingMethod::Options, 3);
    let nat = udp_source("203.0.113.9:41000");
    r.h.send_from(
        &register("kim", "k1", 1, &["Contact: <sip:kim@10.0.0.5:5060;ob>"]),
        &nat,
    );
    r.sched.observe_all(&r.h.table);
    let (sent, removed) = r.run(1010);
    assert!(removed.is_empty());
    assert_eq!(sent.len(), 1, "{sent:?}");
    let (dest, ping) = &sent[0];
    assert_eq!(*dest, Dest::Udp("203.0.113.9:41000".parse().unwrap()));
    let lines: Vec<&str> = ping.split("\r\n").collect();
    assert_eq!(lines[0], "OPTIONS sip:kim@10.0.0.5:5060;ob SIP/2.0");
    assert!(lines[1].starts_with("Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK.ka."));
    assert!(ping.contains("\r\nTo: <sip:kim@10.0.0.5:5060;ob>\r\n"));
    assert!(ping.contains("\r\nFrom: <sip:keepalive@192.0.2.1:5060>;tag=ka7\r\n"));
    assert!(ping.contains("\r\nCSeq: 1 OPTIONS\r\n"));
    assert!(ping.contains("\r\nMax-Forwards: 70\r\n"));
    assert!(ping.ends_with("\r\nContent-Length: 0\r\n\r\n"));
    // The ping parses as a valid request.
    let m = sip_wire::Message::parse(ping.as_bytes(), sip_wire::Framing::Datagram).unwrap();
    assert!(m.check_request().is_ok());

    // Its answer is recognised, is not a dropped response, and keeps the contact.
    let before = r.h.stats.dropped.load(std::sync::atomic::Ordering::Relaxed);
    r.h.send_from(&answer(ping), &nat);
    assert_eq!(
        r.h.stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    assert_eq!(
        r.stats.answers.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A response that is not ours is still counted as dropped.
    let other = answer(ping).replace("z9hG4bK.ka.", "z9hG4bKzz");
    r.h.send_from(&other, &nat);
    assert_eq!(
        r.h.stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );
    let (sent, removed) = r.run(1000);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].1.contains("\r\nCSeq: 2 OPTIONS\r\n"));
    assert!(removed.is_empty());
    assert_eq!(r.sched.stats().missed, 0);
}

#[test]
fn a_contact_that_stops_answering_is_removed_after_max_misses() {
    let mut r = rig(PingMethod::Options, 2);
    r.h.send_from(
        &register("lou", "l1", 1, &["Contact: <sip:lou@10.0.0.6:5060>"]),
        &udp_source("203.0.113.9:41001"),
    );
    r.sched.observe_all(&r.h.table);
    // Pinged at about 1 s, unanswered at 2 s and 3 s: removal asked at the third due.
    let (sent, removed) = r.run(3100);
    assert_eq!(sent.len(), 2);
    assert_eq!(removed, vec![b"lou@example.com".to_vec()]);
}

#[test]
fn a_ping_whose_owner_changed_before_it_went_out_is_fenced() {
    let mut r = rig(PingMethod::Crlf, 0);
    r.h.send_from(
        &register("max", "m1", 1, &["Contact: <sip:max@10.0.0.7:5060>"]),
        &udp_source("203.0.113.9:41002"),
    );
    r.sched.observe_all(&r.h.table);
    let (sent, _) = r.run(1010);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, "\r\n\r\n", "a CRLF keepalive is 4 bytes");
    // Orders already queued, then the tag leaves this node (boundary in the past): the
    // worker's own check drops them.
    let segment = r.segment.clone();
    let mut queued = 0;
    r.sched.advance(
        r.h.now + 1000,
        &r.h.table,
        |_, _, _| Some(0),
        |a| {
            if let Action::Ping(o) = a {
                queued += 1;
                r.orders.push(o).is_ok()
            } else {
                true
            }
        },
    );
    assert_eq!(queued, 1);
    let mut o = Ownership::default();
    o.set_tag_window(0, true, 2, 0, 1);
    segment.publish(&o);
    r.h.out.clear();
    let now = r.h.now;
    r.h.core.on_tick(now, &mut r.h.out);
    assert!(r.h.out.sent.is_empty());
    assert_eq!(r.stats.fenced.load(std::sync::atomic::Ordering::Relaxed), 1);
    let _ = &r.acks;
}
