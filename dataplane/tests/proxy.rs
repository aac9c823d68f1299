//! The stateful proxy through a worker's core, sans-IO with virtual time: a call to a
//! registered user (INVITE → 100/180/200 → ACK → BYE), forking with best-response
//! selection, CANCEL, timeouts (408), retransmissions, 404/480, Record-Route and loose
//! routing (RFC 3261 §16, §17).

mod common;

use std::sync::Arc;

use common::*;
use sipmesh_dataplane::io::Dest;
use sipmesh_dataplane::registrar::RegistrarConfig;
use sipmesh_dataplane::stateful::{Proxy, ProxyConfig, ProxyStats};
use sipmesh_dataplane::txn::TimerConfig;
use sipmesh_dataplane::txn::table::Keys;

const ME: &str = "192.0.2.1:5060";
const CALLER: &str = "192.0.2.10:5062";

fn proxy_harness() -> (Harness, Arc<ProxyStats>) {
    let mut h = Harness::new(RegistrarConfig::default());
    let stats = Arc::new(ProxyStats::default());
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_proxy(new_proxy(h.now, false, stats.clone()));
    (h, stats)
}

/// A proxy as the tests run it: node 7, worker 0, 30 s in-dialog pings.
fn new_proxy(now: u64, serial_forking: bool, stats: Arc<ProxyStats>) -> Proxy {
    Proxy::new(
        ProxyConfig {
            timers: TimerConfig::default(),
            local: ME.parse().unwrap(),
            record_route: true,
            dialog_lifetime_ms: 43_200_000,
            dialog_ping_ms: 30_000,
            serial_forking,
        },
        Arc::new(Keys::new()),
        7,
        0,
        now,
        stats,
    )
}

/// Registers `user` with a contact at `addr` (from that address).
fn register_at(h: &mut Harness, user: &str, addr: &str, q: &str) {
    let r = h.send_from(
        &register(
            user,
            &format!("reg-{user}-{addr}"),
            1,
            &[&format!("Contact: <sip:{user}@{addr}>{q}")],
        ),
        &udp_source(addr),
    );
    assert!(r.starts_with("SIP/2.0 200"), "{r}");
    h.drain();
}

fn invite(call: &str, branch: &str) -> String {
    format!(
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};rport;branch={branch}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{CALLER}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n"
    )
}

/// Everything the core sent since the last call: (destination, text).
fn sent(h: &Harness) -> Vec<(Dest, String)> {
    h.out
        .sent
        .iter()
        .map(|&(d, off, len)| {
            (
                d,
                String::from_utf8_lossy(&h.out.buf[off..off + len]).into_owned(),
            )
        })
        .collect()
}

fn udp(a: &str) -> Dest {
    Dest::Udp(a.parse().unwrap())
}

/// A response from the callee to the forwarded request `req` (its Via list copied).
fn answer(req: &str, code: u16, reason: &str, to_tag: &str) -> String {
    let mut r = format!("SIP/2.0 {code} {reason}\r\n");
    for l in req.split("\r\n").skip(1) {
        if l.starts_with("Via:")
            || l.starts_with("From:")
            || l.starts_with("Call-ID:")
            || l.starts_with("CSeq:")
            || l.starts_with("Record-Route:")
        {
            r.push_str(l);
            r.push_str("\r\n");
        }
        if l.starts_with("To:") {
            r.push_str(l);
            if !to_tag.is_empty() && !l.contains(";tag=") {
                r.push_str(&format!(";tag={to_tag}"));
            }
            r.push_str("\r\n");
        }
    }
    r + "Content-Length: 0\r\n\r\n"
}

fn header<'a>(m: &'a str, name: &str) -> Option<&'a str> {
    m.split("\r\n")
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
}

#[test]
fn a_call_to_a_registered_user_goes_through_and_in_dialog_requests_follow_the_route() {
    let (mut h, stats) = proxy_harness();
    register_at(&mut h, "bob", "198.51.100.20:5070", "");
    h.send(&invite("call1", "z9hG4bKc1"));
    let s = sent(&h);
    // RFC 3261 §17.2.1: 100 Trying to the caller; §16.6: the INVITE to bob's contact.
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0].0, udp(CALLER));
    assert!(s[0].1.starts_with("SIP/2.0 100 Trying\r\n"));
    assert_eq!(s[1].0, udp("198.51.100.20:5070"));
    let fwd = s[1].1.clone();
    assert!(fwd.starts_with("INVITE sip:bob@198.51.100.20:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsm"));
    assert!(fwd.contains("\r\nRecord-Route: <sip:192.0.2.1:5060;lr>\r\n"));
    assert!(fwd.contains("\r\nMax-Forwards: 69\r\n"));
    assert!(fwd.ends_with("\r\n\r\nv=0\n"));
    // 180 and 200 come back: relayed without our Via.
    let callee = udp_source("198.51.100.20:5070");
    h.send_from(&answer(&fwd, 180, "Ringing", "b1"), &callee);
    let s = sent(&h);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, udp(CALLER));
    assert!(s[0].1.starts_with("SIP/2.0 180 Ringing\r\n"));
    assert!(
        s[0].1
            .contains("\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKc1\r\n")
    );
    assert!(!s[0].1.contains("branch=z9hG4bKsm"), "our Via is gone");
    h.send_from(&answer(&fwd, 200, "OK", "b1"), &callee);
    let s = sent(&h);
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"));
    assert!(s[0].1.contains("Record-Route: <sip:192.0.2.1:5060;lr>"));
    // A retransmitted 2xx passes too (the UAC's ACK stops it).
    h.send_from(&answer(&fwd, 200, "OK", "b1"), &callee);
    assert_eq!(sent(&h).len(), 1);
    // The ACK for the 2xx, with our Route, goes to bob's contact (§16.12 loose routing).
    let ack = format!(
        "ACK sip:bob@198.51.100.20:5070 SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};rport;branch=z9hG4bKack1\r\n\
         Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:bob@example.com>;tag=b1\r\nCall-ID: call1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    );
    h.send(&ack);
    let s = sent(&h);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, udp("198.51.100.20:5070"));
    assert!(s[0].1.starts_with(
        "ACK sip:bob@198.51.100.20:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK"
    ));
    assert!(!s[0].1.contains("Route:"), "our Route was removed");
    // BYE from the caller: forwarded to bob statefully, 200 relayed back.
    let bye = ack
        .replace("ACK sip:", "BYE sip:")
        .replace("1 ACK", "2 BYE")
        .replace("z9hG4bKack1", "z9hG4bKbye1");
    h.send(&bye);
    let s = sent(&h);
    assert_eq!(s.len(), 1);
    assert!(
        s[0].1
            .starts_with("BYE sip:bob@198.51.100.20:5070 SIP/2.0\r\n")
    );
    let fbye = s[0].1.clone();
    h.send_from(&answer(&fbye, 200, "OK", ""), &callee);
    let s = sent(&h);
    assert_eq!(s[0].0, udp(CALLER));
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n") && s[0].1.contains("CSeq: 2 BYE"));
    // Retransmitted BYE: the 200 again from the transaction, not forwarded again.
    h.send(&bye);
    let s = sent(&h);
    assert_eq!(s.len(), 1);
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"));
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.forwarded.load(Relaxed), 3);
}

#[test]
fn forks_to_every_contact_and_sends_the_best_final_response_or_the_first_2xx() {
    let (mut h, _) = proxy_harness();
    register_at(&mut h, "bob", "198.51.100.21:5060", ";q=0.5");
    register_at(&mut h, "bob", "198.51.100.22:5060", ";q=0.9");
    h.send(&invite("fork1", "z9hG4bKf1"));
    let s = sent(&h);
    assert_eq!(s.len(), 3);
    // Highest q first.
    assert_eq!(s[1].0, udp("198.51.100.22:5060"));
    assert_eq!(s[2].0, udp("198.51.100.21:5060"));
    let (b1, b2) = (s[1].1.clone(), s[2].1.clone());
    // One busy: held (the other is pending); ACKed hop by hop (§17.1.1.3).
    h.send_from(
        &answer(&b1, 486, "Busy Here", "x1"),
        &udp_source("198.51.100.22:5060"),
    );
    let s = sent(&h);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, udp("198.51.100.22:5060"));
    assert!(
        s[0].1
            .starts_with("ACK sip:bob@198.51.100.22:5060 SIP/2.0\r\n")
    );
    // The other declines with 404: every branch done, the best (486 over 404? both
    // 4xx, the first) goes up.
    h.send_from(
        &answer(&b2, 404, "Not Found", "x2"),
        &udp_source("198.51.100.21:5060"),
    );
    let s = sent(&h);
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(s[0].1.starts_with("ACK "));
    assert_eq!(s[1].0, udp(CALLER));
    assert!(
        s[1].1.starts_with("SIP/2.0 486 Busy Here\r\n"),
        "{}",
        s[1].1
    );
    // The caller's ACK for the 486 is absorbed by the server transaction.
    let ack = format!(
        "ACK sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};rport;branch=z9hG4bKf1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>;tag=x1\r\n\
         Call-ID: fork1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    );
    h.send(&ack);
    assert!(sent(&h).is_empty());

    // A 2xx goes up at once, and the other branch is cancelled (§16.7 step 10).
    h.send(&invite("fork2", "z9hG4bKf2"));
    let s = sent(&h);
    let (b1, b2) = (s[1].1.clone(), s[2].1.clone());
    h.send_from(
        &answer(&b2, 180, "Ringing", "y2"),
        &udp_source("198.51.100.21:5060"),
    );
    h.send_from(
        &answer(&b1, 200, "OK", "y1"),
        &udp_source("198.51.100.22:5060"),
    );
    let s = sent(&h);
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"));
    assert_eq!(s[1].0, udp("198.51.100.21:5060"));
    assert!(
        s[1].1
            .starts_with("CANCEL sip:bob@198.51.100.21:5060 SIP/2.0\r\n")
    );
}

#[test]
fn cancel_reaches_the_branch_and_the_caller_gets_487() {
    let (mut h, stats) = proxy_harness();
    register_at(&mut h, "bob", "198.51.100.30:5060", "");
    h.send(&invite("can1", "z9hG4bKx1"));
    let fwd = sent(&h)[1].1.clone();
    let callee = udp_source("198.51.100.30:5060");
    h.send_from(&answer(&fwd, 180, "Ringing", "c1"), &callee);
    let cancel = format!(
        "CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};rport;branch=z9hG4bKx1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: can1\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    );
    h.send(&cancel);
    let s = sent(&h);
    // §9.2: 200 to the CANCEL; §16.10: a CANCEL to the pending branch.
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n") && s[0].1.contains("CSeq: 1 CANCEL"));
    assert_eq!(s[1].0, udp("198.51.100.30:5060"));
    let fcancel = s[1].1.clone();
    assert!(fcancel.starts_with("CANCEL sip:bob@198.51.100.30:5060 SIP/2.0\r\n"));
    // Same branch as the INVITE it cancels (§9.1).
    assert_eq!(
        header(&fcancel, "Via"),
        header(&fwd, "Via").map(|v| v.split(',').next().unwrap())
    );
    h.send_from(&answer(&fcancel, 200, "OK", "c1"), &callee);
    assert!(sent(&h).is_empty(), "the CANCEL's 200 stays here");
    h.send_from(&answer(&fwd, 487, "Request Terminated", "c1"), &callee);
    let s = sent(&h);
    assert!(s[0].1.starts_with("ACK "));
    assert!(s[1].1.starts_with("SIP/2.0 487 Request Terminated\r\n"));
    assert_eq!(s[1].0, udp(CALLER));
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.cancels.load(Relaxed), 1);
    // A CANCEL for nothing: 481.
    h.send(
        &cancel
            .replace("can1", "nothing")
            .replace("z9hG4bKx1", "z9hG4bKx2"),
    );
    assert!(sent(&h)[0].1.starts_with("SIP/2.0 481 "));
}

#[test]
fn an_unanswered_branch_is_retransmitted_then_times_out_with_408() {
    let (mut h, stats) = proxy_harness();
    register_at(&mut h, "bob", "198.51.100.40:5060", "");
    h.send(&invite("to1", "z9hG4bKt1"));
    let mut retrans = 0;
    let mut got_408 = false;
    for _ in 0..3300 {
        h.advance(10);
        for (d, m) in sent(&h) {
            if d == udp("198.51.100.40:5060") && m.starts_with("INVITE ") {
                retrans += 1;
            }
            if d == udp(CALLER) && m.starts_with("SIP/2.0 408 Request Timeout\r\n") {
                got_408 = true;
            }
        }
    }
    // Timer A: 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s; timer B at 32 s → 408 (§16.7, §17.1.1.2).
    assert_eq!(retrans, 6);
    assert!(got_408);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.timeouts.load(Relaxed), 1);
}

#[test]
fn unknown_users_get_404_and_retransmitted_invites_get_100_again() {
    let (mut h, _) = proxy_harness();
    h.send(&invite("nf1", "z9hG4bKn1"));
    let s = sent(&h);
    assert_eq!(s.len(), 1);
    assert!(s[0].1.starts_with("SIP/2.0 404 Not Found\r\n"));
    register_at(&mut h, "bob", "198.51.100.50:5060", "");
    h.send(&invite("rt1", "z9hG4bKr1"));
    assert_eq!(sent(&h).len(), 2);
    h.send(&invite("rt1", "z9hG4bKr1"));
    let s = sent(&h);
    assert_eq!(s.len(), 1, "absorbed: only the 100 again");
    assert!(s[0].1.starts_with("SIP/2.0 100 Trying\r\n"));
    // Max-Forwards 0: 483 (§16.3 step 2).
    h.send(&invite("mf", "z9hG4bKm1").replace("Max-Forwards: 70", "Max-Forwards: 0"));
    assert!(sent(&h)[0].1.starts_with("SIP/2.0 483 "));
    // A Proxy-Require we do not support: 420 (§16.3 step 5).
    h.send(
        &invite("pr", "z9hG4bKp1")
            .replace("Max-Forwards: 70", "Max-Forwards: 70\r\nProxy-Require: foo"),
    );
    let r = &sent(&h)[0].1;
    assert!(
        r.starts_with("SIP/2.0 420 ") && r.contains("Unsupported: foo"),
        "{r}"
    );
}

#[test]
fn message_and_other_non_invite_requests_are_routed_the_same_way() {
    let (mut h, _) = proxy_harness();
    register_at(&mut h, "bob", "198.51.100.60:5060", "");
    let msg = format!(
        "MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};rport;branch=z9hG4bKm1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: m1\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
    );
    h.send(&msg);
    let s = sent(&h);
    assert_eq!(s.len(), 1, "no 100 for a non-INVITE");
    let fwd = s[0].1.clone();
    assert!(fwd.starts_with("MESSAGE sip:bob@198.51.100.60:5060 SIP/2.0\r\n"));
    assert!(!fwd.contains("Record-Route"));
    h.send_from(
        &answer(&fwd, 202, "Accepted", "b"),
        &udp_source("198.51.100.60:5060"),
    );
    assert!(sent(&h)[0].1.starts_with("SIP/2.0 202 Accepted\r\n"));
    // OPTIONS to the node itself is still answered by the node.
    let opt = msg
        .replace("MESSAGE sip:bob@example.com", "OPTIONS sip:example.com")
        .replace("1 MESSAGE", "1 OPTIONS")
        .replace("z9hG4bKm1", "z9hG4bKo1");
    h.send(&opt);
    let r = &sent(&h)[0].1;
    assert!(
        r.starts_with("SIP/2.0 200 OK\r\n") && r.contains("Allow: INVITE, ACK, CANCEL, BYE"),
        "{r}"
    );
}

#[test]
fn a_forged_branch_is_not_taken_for_ours() {
    let (mut h, stats) = proxy_harness();
    // A branch in our format but under another process's key: not ours.
    let resp = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsm0007000100000001000000010000abcd\r\n\
                Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKq\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\n\
                Call-ID: s1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n";
    h.send(resp);
    assert!(sent(&h).is_empty());
    use std::sync::atomic::Ordering::Relaxed;
    // Another process's MAC: not ours at all (dropped as a stray response).
    assert_eq!(stats.other_worker.load(Relaxed), 0);
}

/// A proxy that tracks dialogs: its table, the CDR lines it hands over.
fn dialog_harness() -> (
    Harness,
    Arc<sipmesh_cluster::dialog::DialogTable>,
    rtrb::Consumer<u8>,
    rtrb::Producer<u8>,
    sipmesh_cluster::ring::ChangeConsumer,
) {
    use sipmesh_cluster::ownership::{Ownership, Segment};
    let (mut h, _) = proxy_harness();
    let table = Arc::new(sipmesh_cluster::dialog::DialogTable::new(16));
    let (p, c) = rtrb::RingBuffer::new(1 << 16);
    let (op, oc) = rtrb::RingBuffer::new(1 << 16);
    let (rp, rc) = sipmesh_cluster::ring::change_ring(1 << 20);
    let segment = Arc::new(Segment::anonymous(7).unwrap());
    let mut o = Ownership::default();
    o.set_tag(0, true, 1);
    segment.publish(&o);
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    let proxy = new_proxy(h.now, false, Arc::new(ProxyStats::default())).with_dialogs(
        sipmesh_dataplane::stateful::DialogShare {
            table: table.clone(),
            cdrs: p,
            segment,
            orders: oc,
            changes: rp,
            profiles: Arc::new(sipmesh_cluster::dialog::Profiles::new(vec![
                ("calls".into(), sipmesh_cluster::dialog::ProfileKey::None),
                (
                    "caller".into(),
                    sipmesh_cluster::dialog::ProfileKey::FromUser,
                ),
            ])),
        },
    );
    h.core = core.with_proxy(proxy);
    (h, table, c, op, rc)
}

fn cdrs(c: &mut rtrb::Consumer<u8>) -> Vec<serde_json::Value> {
    let mut v = Vec::new();
    let mut bytes = Vec::new();
    while sipmesh_cluster::ring::pop_bytes(c, &mut bytes) {
        assert_eq!(bytes.last(), Some(&b'\n'), "one JSON line");
        v.push(serde_json::from_slice(&bytes).unwrap());
    }
    v
}

#[test]
fn a_call_is_tracked_as_a_dialog_through_its_states_and_ends_in_a_cdr() {
    use sipmesh_cluster::dialog::DialogState;
    let (mut h, table, mut c, _, _) = dialog_harness();
    register_at(&mut h, "bob", "198.51.100.70:5060", "");
    let t0 = h.now;
    h.send(&invite("d1", "z9hG4bKd1"));
    let fwd = sent(&h)[1].1.clone();
    let snap = table.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].state, DialogState::Unconfirmed);
    assert_eq!(&*snap[0].call_id, b"d1");
    let callee = udp_source("198.51.100.70:5060");
    h.send_from(&answer(&fwd, 180, "Ringing", "bt"), &callee);
    assert_eq!(table.snapshot()[0].state, DialogState::Early);
    assert_eq!(&*table.snapshot()[0].to_tag, b"bt");
    h.now += 2000;
    h.send_from(&answer(&fwd, 200, "OK", "bt"), &callee);
    let d = table.snapshot()[0].clone();
    assert_eq!(d.state, DialogState::Confirmed);
    assert_eq!(d.answered_ms, t0 + 2000);
    assert!(cdrs(&mut c).is_empty());
    // The callee hangs up 60 s later: its BYE carries the tags swapped.
    h.now += 60_000;
    let bye = format!(
        "BYE sip:alice@{CALLER} SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.70:5060;branch=z9hG4bKb9\r\n\
         Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=bt\r\n\
         To: <sip:alice@example.com>;tag=a1\r\nCall-ID: d1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    h.send_from(&bye, &callee);
    assert!(
        sent(&h)[0]
            .1
            .starts_with("BYE sip:alice@192.0.2.10:5062 SIP/2.0\r\n")
    );
    assert!(table.is_empty(), "terminated: out of the table");
    let v = cdrs(&mut c);
    assert_eq!(v.len(), 1);
    let r = &v[0];
    assert_eq!(r["caller"], "sip:alice@example.com");
    assert_eq!(r["callee"], "sip:bob@example.com");
    assert_eq!(r["call_id"], "d1");
    assert_eq!(r["setup_ms"], t0);
    assert_eq!(r["answer_ms"], t0 + 2000);
    assert_eq!(r["end_ms"], t0 + 62_000);
    assert_eq!(r["duration_ms"], 60_000);
    assert_eq!(r["end_reason"], "bye");
    assert_eq!(r["hung_up_by"], "callee");
    assert_eq!(r["node"], 7);
}

#[test]
fn failed_cancelled_and_timed_out_calls_have_their_cdr_too() {
    let (mut h, table, mut c, _, _) = dialog_harness();
    register_at(&mut h, "bob", "198.51.100.71:5060", "");
    let callee = udp_source("198.51.100.71:5060");
    // Busy.
    h.send(&invite("f1", "z9hG4bKe1"));
    let fwd = sent(&h)[1].1.clone();
    h.send_from(&answer(&fwd, 486, "Busy Here", "x"), &callee);
    // Cancelled after ringing.
    h.send(&invite("f2", "z9hG4bKe2"));
    let fwd = sent(&h)[1].1.clone();
    h.send_from(&answer(&fwd, 180, "Ringing", "y"), &callee);
    h.send(&format!(
        "CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};rport;branch=z9hG4bKe2\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: f2\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    ));
    h.send_from(&answer(&fwd, 487, "Request Terminated", "y"), &callee);
    // Never answered: 408 from the proxy after timer B.
    h.send(&invite("f3", "z9hG4bKe3"));
    for _ in 0..3300 {
        h.advance(10);
    }
    assert!(table.is_empty());
    let v = cdrs(&mut c);
    let got: Vec<(String, String, String)> = v
        .iter()
        .map(|r| {
            (
                r["call_id"].as_str().unwrap().to_string(),
                r["end_reason"].as_str().unwrap().to_string(),
                r["hung_up_by"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("f1".into(), "failed-486".into(), "callee".into()),
            ("f2".into(), "cancelled".into(), "caller".into()),
            ("f3".into(), "failed-408".into(), "proxy".into()),
        ]
    );
    assert!(
        v.iter()
            .all(|r| r["answer_ms"] == 0 && r["duration_ms"] == 0)
    );
}

#[test]
fn a_call_past_its_lifetime_is_ended_with_a_bye_to_each_side() {
    use sipmesh_dataplane::stateful::{ORDER_LIFETIME, push_end_order};
    let (mut h, table, mut c, mut orders, _) = dialog_harness();
    register_at(&mut h, "bob", "198.51.100.72:5060", "");
    let callee = udp_source("198.51.100.72:5060");
    h.send(&invite("lt1", "z9hG4bKl1"));
    let fwd = sent(&h)[1].1.clone();
    let ok = answer(&fwd, 200, "OK", "bt").replace(
        "Content-Length: 0",
        "Contact: <sip:bob@198.51.100.72:5060;ob>\r\nContent-Length: 0",
    );
    h.send_from(&ok, &callee);
    // A re-INVITE from the callee raises its CSeq (a later BYE must be above it).
    let reinv = format!(
        "INFO sip:alice@{CALLER} SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.72:5060;branch=z9hG4bKi1\r\n\
         Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=bt\r\n\
         To: <sip:alice@example.com>;tag=a1\r\nCall-ID: lt1\r\nCSeq: 7 INFO\r\nContent-Length: 0\r\n\r\n"
    );
    h.send_from(&reinv, &callee);
    let d = table.snapshot()[0].clone();
    assert_eq!(d.legs.callee_cseq, 7);
    assert_eq!(&*d.legs.callee_contact, b"sip:bob@198.51.100.72:5060;ob");
    // The control plane orders it ended (its lifetime ran out).
    let mut key = Vec::new();
    sipmesh_cluster::dialog::dialog_key(b"lt1", b"a1", &mut key);
    assert!(push_end_order(&mut orders, ORDER_LIFETIME, &key));
    h.advance(10);
    let s = sent(&h);
    assert_eq!(s.len(), 2, "{s:?}");
    // To the callee, as from the caller (RFC 3261 §15.1.1 for the proxy acting for both).
    assert_eq!(s[0].0, udp("198.51.100.72:5060"));
    let b1 = &s[0].1;
    assert!(
        b1.starts_with("BYE sip:bob@198.51.100.72:5060;ob SIP/2.0\r\n"),
        "{b1}"
    );
    assert!(b1.contains("\r\nFrom: <sip:alice@example.com>;tag=a1\r\n"));
    assert!(b1.contains("\r\nTo: <sip:bob@example.com>;tag=bt\r\n"));
    assert!(b1.contains("\r\nCSeq: 2 BYE\r\n"));
    // To the caller, as from the callee, above its CSeq 7.
    assert_eq!(s[1].0, udp(CALLER));
    let b2 = &s[1].1;
    assert!(
        b2.starts_with(&format!("BYE sip:alice@{CALLER} SIP/2.0\r\n")),
        "{b2}"
    );
    assert!(b2.contains("\r\nFrom: <sip:bob@example.com>;tag=bt\r\n"));
    assert!(b2.contains("\r\nTo: <sip:alice@example.com>;tag=a1\r\n"));
    assert!(b2.contains("\r\nCSeq: 8 BYE\r\n"));
    for b in [b1, b2] {
        let m = sip_wire::Message::parse(b.as_bytes(), sip_wire::Framing::Datagram).unwrap();
        assert!(m.check_request().is_ok());
    }
    assert!(table.is_empty());
    let v = cdrs(&mut c);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["end_reason"], "lifetime");
    assert_eq!(v[0]["hung_up_by"], "proxy");
    // Their 200s end the two transactions; nothing goes anywhere.
    let (b1, b2) = (b1.clone(), b2.clone());
    h.send_from(&answer(&b1, 200, "OK", ""), &callee);
    h.send_from(&answer(&b2, 200, "OK", ""), &udp_source(CALLER));
    assert!(sent(&h).is_empty());
    // An order for a call already gone does nothing.
    assert!(push_end_order(&mut orders, ORDER_LIFETIME, &key));
    h.advance(10);
    assert!(sent(&h).is_empty(), "nothing to end");
}

#[test]
fn serial_forking_tries_contacts_by_q_one_set_at_a_time() {
    let mut h = Harness::new(RegistrarConfig::default());
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_proxy(new_proxy(h.now, true, Arc::new(ProxyStats::default())));
    register_at(&mut h, "bob", "198.51.100.81:5060", ";q=0.9");
    register_at(&mut h, "bob", "198.51.100.82:5060", ";q=0.5");
    register_at(&mut h, "bob", "198.51.100.83:5060", ";q=0.5");
    h.send(&invite("ser1", "z9hG4bKs1"));
    let s = sent(&h);
    // 100 Trying and the INVITE to the q=0.9 contact only.
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[1].0, udp("198.51.100.81:5060"));
    let first = s[1].1.clone();
    // It is busy: ACKed, and the next set (both q=0.5) is tried together.
    h.send_from(
        &answer(&first, 486, "Busy Here", "s1"),
        &udp_source("198.51.100.81:5060"),
    );
    let s = sent(&h);
    assert_eq!(s.len(), 3, "{s:?}");
    assert!(s[0].1.starts_with("ACK "));
    let next: Vec<Dest> = s[1..].iter().map(|(d, _)| *d).collect();
    assert_eq!(
        next,
        vec![udp("198.51.100.82:5060"), udp("198.51.100.83:5060")]
    );
    assert!(
        s[1].1
            .starts_with("INVITE sip:bob@198.51.100.82:5060 SIP/2.0\r\n")
    );
    assert!(
        s[1].1
            .contains("\r\nRecord-Route: <sip:192.0.2.1:5060;lr>\r\n")
    );
    let (b2, b3) = (s[1].1.clone(), s[2].1.clone());
    // A 6xx ends the search (§16.7 step 6): it goes up, and the branch still pending is
    // cancelled.
    h.send_from(
        &answer(&b2, 603, "Decline", "s2"),
        &udp_source("198.51.100.82:5060"),
    );
    let s = sent(&h);
    assert!(
        s.iter()
            .any(|(d, m)| *d == udp(CALLER) && m.starts_with("SIP/2.0 603 Decline\r\n")),
        "{s:?}"
    );
    let cancel = s
        .iter()
        .find(|(d, m)| *d == udp("198.51.100.83:5060") && m.starts_with("CANCEL "))
        .expect("the pending branch is cancelled");
    assert_eq!(
        header(&cancel.1, "Via"),
        header(&b3, "Via").map(|v| v.split(',').next().unwrap())
    );
}

#[test]
fn in_dialog_pings_keep_a_live_call_and_end_one_whose_side_is_gone() {
    use sipmesh_dataplane::stateful::{ORDER_PING, push_end_order};
    let (mut h, table, mut c, mut orders, _) = dialog_harness();
    register_at(&mut h, "bob", "198.51.100.90:5060", "");
    let callee = udp_source("198.51.100.90:5060");
    h.send(&invite("pg1", "z9hG4bKp1"));
    let fwd = sent(&h)[1].1.clone();
    let ok = answer(&fwd, 200, "OK", "pt").replace(
        "Content-Length: 0",
        "Contact: <sip:bob@198.51.100.90:5060>\r\nContent-Length: 0",
    );
    h.send_from(&ok, &callee);
    let mut key = Vec::new();
    sipmesh_cluster::dialog::dialog_key(b"pg1", b"a1", &mut key);
    // Not due yet (the harness pings every 30 s): an order does nothing.
    assert!(push_end_order(&mut orders, ORDER_PING, &key));
    h.advance(10);
    assert!(sent(&h).is_empty());
    // 30 s after the answer: an OPTIONS to each side, in the dialog.
    h.now += 30_000;
    assert!(push_end_order(&mut orders, ORDER_PING, &key));
    assert!(
        push_end_order(&mut orders, ORDER_PING, &key),
        "repeated: one round only"
    );
    h.advance(10);
    let s = sent(&h);
    assert_eq!(s.len(), 2, "{s:?}");
    let (to_bob, to_alice) = (s[0].1.clone(), s[1].1.clone());
    assert_eq!(s[0].0, udp("198.51.100.90:5060"));
    assert!(to_bob.starts_with("OPTIONS sip:bob@198.51.100.90:5060 SIP/2.0\r\n"));
    assert!(to_bob.contains("\r\nTo: <sip:bob@example.com>;tag=pt\r\n"));
    assert!(to_bob.contains("\r\nFrom: <sip:alice@example.com>;tag=a1\r\n"));
    assert_eq!(s[1].0, udp(CALLER));
    assert!(to_alice.contains("\r\nFrom: <sip:bob@example.com>;tag=pt\r\n"));
    // Both answer: the call goes on.
    h.send_from(&answer(&to_bob, 200, "OK", ""), &callee);
    h.send_from(&answer(&to_alice, 200, "OK", ""), &udp_source(CALLER));
    assert!(sent(&h).is_empty());
    assert_eq!(table.len(), 1);
    // Next round: the caller has forgotten the call (481): it is ended, a BYE to each
    // side, CDR reason ping-timeout.
    h.now += 30_000;
    assert!(push_end_order(&mut orders, ORDER_PING, &key));
    h.advance(10);
    let s = sent(&h);
    let to_alice = s[1].1.clone();
    h.send_from(&answer(&s[0].1, 200, "OK", ""), &callee);
    h.send_from(
        &answer(&to_alice, 481, "Call/Transaction Does Not Exist", ""),
        &udp_source(CALLER),
    );
    let s = sent(&h);
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(s.iter().all(|(_, m)| m.starts_with("BYE ")));
    assert!(table.is_empty());
    let v = cdrs(&mut c);
    assert_eq!(v[0]["end_reason"], "ping-timeout");
    assert_eq!(v[0]["hung_up_by"], "proxy");

    // A side that does not answer at all: timer F (32 s) ends the call.
    h.send(&invite("pg2", "z9hG4bKp2"));
    let fwd = sent(&h)[1].1.clone();
    let ok = answer(&fwd, 200, "OK", "pu").replace(
        "Content-Length: 0",
        "Contact: <sip:bob@198.51.100.90:5060>\r\nContent-Length: 0",
    );
    h.send_from(&ok, &callee);
    sipmesh_cluster::dialog::dialog_key(b"pg2", b"a1", &mut key);
    h.now += 30_000;
    assert!(push_end_order(&mut orders, ORDER_PING, &key));
    h.advance(10);
    let first = sent(&h);
    h.send_from(&answer(&first[0].1, 200, "OK", ""), &callee);
    for _ in 0..3300 {
        h.advance(10);
    }
    assert!(table.is_empty());
    assert_eq!(cdrs(&mut c)[0]["end_reason"], "ping-timeout");
}

#[test]
fn every_dialog_change_is_a_versioned_record_for_the_peers() {
    use sipmesh_cluster::change::Change;
    let (mut h, _table, _c, _o, mut records) = dialog_harness();
    register_at(&mut h, "bob", "198.51.100.95:5060", "");
    let callee = udp_source("198.51.100.95:5060");
    h.send(&invite("rp1", "z9hG4bKr9"));
    let fwd = sent(&h)[1].1.clone();
    h.send_from(&answer(&fwd, 180, "Ringing", "rt"), &callee);
    h.send_from(&answer(&fwd, 200, "OK", "rt"), &callee);
    let bye = format!(
        "BYE sip:bob@198.51.100.95:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};branch=z9hG4bKbb\r\n\
         Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:bob@example.com>;tag=rt\r\nCall-ID: rp1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    h.send(&bye);
    let mut seen = Vec::new();
    records.drain(|r| seen.push(r));
    let states: Vec<(String, &'static str)> = seen
        .iter()
        .map(|r| match &r.change {
            Change::DialogUpsert { dialog, .. } => ("upsert".to_string(), dialog.state.as_str()),
            Change::DialogEnd { dialog, .. } => ("end".to_string(), dialog.state.as_str()),
            _ => ("binding".to_string(), ""),
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("upsert".into(), "unconfirmed"),
            ("upsert".into(), "early"),
            ("upsert".into(), "confirmed"),
            ("end".into(), "terminated"),
        ]
    );
    assert!(
        seen.windows(2).all(|w| w[1].version > w[0].version),
        "versions grow"
    );
    assert!(seen.iter().all(|r| r.origin.0 == 7));
    let Change::DialogEnd { key, dialog } = &seen[3].change else {
        panic!()
    };
    assert_eq!(&**key, b"rp1\0a1");
    assert_eq!(dialog.version, seen[3].version);
    assert_eq!(
        dialog.end.map(|e| e.0),
        Some(sipmesh_cluster::dialog::EndReason::Bye)
    );
}

#[test]
fn a_request_coming_back_unchanged_is_a_loop_and_a_changed_one_a_spiral() {
    let (mut h, _) = proxy_harness();
    register_at(&mut h, "bob", "198.51.100.99:5060", "");
    h.send(&invite("lp1", "z9hG4bKl9"));
    let fwd = sent(&h)[1].1.clone();
    // The next hop sends it straight back (same Request-URI): RFC 3261 §16.3 step 4.
    let back = fwd.replacen(
        "Via: ",
        "Via: SIP/2.0/UDP 198.51.100.99:5060;branch=z9hG4bKnext1\r\nVia: ",
        1,
    );
    h.send_from(&back, &udp_source("198.51.100.99:5060"));
    let s = sent(&h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(
        s[0].1.starts_with("SIP/2.0 482 Loop Detected\r\n"),
        "{}",
        s[0].1
    );
    // Retargeted (another Request-URI): a spiral, routed again.
    let spiral = back
        .replace(
            "INVITE sip:bob@198.51.100.99:5060 SIP/2.0",
            "INVITE sip:bob@example.com SIP/2.0",
        )
        .replace("z9hG4bKnext1", "z9hG4bKnext2");
    h.send_from(&spiral, &udp_source("198.51.100.99:5060"));
    let s = sent(&h);
    assert!(
        s.iter()
            .any(|(_, m)| m.starts_with("INVITE sip:bob@198.51.100.99:5060 ")),
        "{s:?}"
    );
}
