//! The presence server through a worker's core, sans-IO with virtual time: PUBLISH
//! (RFC 3903), SUBSCRIBE/NOTIFY (RFC 6665, RFC 3856), PIDF aggregation, BLF (RFC 4235)
//! for calls through the node, watcher information (RFC 3857), expiry and failures.

mod common;

use std::sync::Arc;

use common::*;
use sipmesh_cluster::Change;
use sipmesh_cluster::ownership::{Ownership, Segment};
use sipmesh_cluster::presence::PresenceTable;
use sipmesh_dataplane::io::Dest;
use sipmesh_dataplane::presence::{
    ORDER_NOTIFY, ORDER_PUBLICATION_EXPIRED, ORDER_WATCHER_EXPIRED, PresenceConfig, PresenceShare,
    PresenceStats,
};
use sipmesh_dataplane::registrar::RegistrarConfig;
use sipmesh_dataplane::stateful::{DialogShare, Proxy, ProxyConfig, ProxyStats, push_end_order};
use sipmesh_dataplane::txn::TimerConfig;
use sipmesh_dataplane::txn::table::Keys;

const ME: &str = "192.0.2.1:5060";
const PUBLISHER: &str = "192.0.2.30:5080";
const WATCHER: &str = "192.0.2.40:5090";

struct P {
    h: Harness,
    table: Arc<PresenceTable>,
    records: sipmesh_cluster::ring::ChangeConsumer,
    orders: rtrb::Producer<u8>,
    stats: Arc<PresenceStats>,
    segment: Arc<Segment>,
}

fn harness() -> P {
    let mut h = Harness::new(RegistrarConfig::default());
    let table = Arc::new(PresenceTable::new(16));
    let segment = Arc::new(Segment::anonymous(7).unwrap());
    let mut o = Ownership::default();
    o.set_tag(0, true, 1);
    segment.publish(&o);
    let (cdr_p, _cdr_c) = rtrb::RingBuffer::new(1 << 16);
    let (op, oc) = rtrb::RingBuffer::new(1 << 16);
    let (dp, _dc) = sipmesh_cluster::ring::change_ring(1 << 20);
    let (pp, pc) = sipmesh_cluster::ring::change_ring(1 << 20);
    let stats = Arc::new(PresenceStats::default());
    let proxy = Proxy::new(
        ProxyConfig {
            timers: TimerConfig::default(),
            local: ME.parse().unwrap(),
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
        table: Arc::new(sipmesh_cluster::dialog::DialogTable::new(16)),
        cdrs: cdr_p,
        segment: segment.clone(),
        profiles: Arc::new(sipmesh_cluster::dialog::Profiles::new(vec![])),
        changes: dp,
        orders: oc,
    })
    .with_presence(PresenceShare {
        table: table.clone(),
        changes: pp,
        segment: segment.clone(),
        config: PresenceConfig {
            max_watchers: 3,
            ..PresenceConfig::default()
        },
        stats: stats.clone(),
    });
    let core = std::mem::replace(&mut h.core, Harness::new(RegistrarConfig::default()).core);
    h.core = core.with_proxy(proxy);
    P {
        h,
        table,
        records: pc,
        orders: op,
        stats,
        segment,
    }
}

fn pidf(entity: &str, tuple: &str, basic: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
         entity=\"{entity}\"><tuple id=\"{tuple}\"><status><basic>{basic}</basic></status>\
         <contact>sip:{tuple}@192.0.2.30</contact></tuple></presence>"
    )
}

fn publish(cseq: u32, branch: &str, extra: &[&str], body: &str) -> String {
    let mut m = format!(
        "PUBLISH sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {PUBLISHER};branch={branch}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=p1\r\nTo: <sip:alice@example.com>\r\n\
         Call-ID: pub-1\r\nCSeq: {cseq} PUBLISH\r\n"
    );
    for e in extra {
        m.push_str(e);
        m.push_str("\r\n");
    }
    if !body.is_empty() && !extra.iter().any(|e| e.starts_with("Content-Type")) {
        m.push_str("Content-Type: application/pidf+xml\r\n");
    }
    m + &format!("Content-Length: {}\r\n\r\n{body}", body.len())
}

fn subscribe(user: &str, event: &str, call: &str, cseq: u32, to_tag: &str, expires: u32) -> String {
    let (uri, to) = if to_tag.is_empty() {
        (
            format!("sip:{user}@example.com"),
            format!("<sip:{user}@example.com>"),
        )
    } else {
        (
            format!("sip:{ME}"),
            format!("<sip:{user}@example.com>;tag={to_tag}"),
        )
    };
    format!(
        "SUBSCRIBE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {WATCHER};branch=z9hG4bKs{call}{cseq}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:watcher@example.com>;tag=w-{call}\r\nTo: {to}\r\n\
         Call-ID: {call}\r\nCSeq: {cseq} SUBSCRIBE\r\nContact: <sip:watcher@{WATCHER}>\r\n\
         Event: {event}\r\nExpires: {expires}\r\nContent-Length: 0\r\n\r\n"
    )
}

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

fn header<'a>(m: &'a str, name: &str) -> Option<&'a str> {
    m.split("\r\n")
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
}

fn body(m: &str) -> &str {
    m.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The 200 to a NOTIFY we sent (its Via, From, To, Call-ID and CSeq copied).
fn ok_to(req: &str, code: u16) -> String {
    let mut r = format!("SIP/2.0 {code} X\r\n");
    for l in req.split("\r\n").skip(1) {
        if ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
            .iter()
            .any(|p| l.starts_with(p))
        {
            r.push_str(l);
            r.push_str("\r\n");
        }
    }
    r + "Content-Length: 0\r\n\r\n"
}

fn records(p: &mut P) -> Vec<Change> {
    let mut v = Vec::new();
    p.records.drain(|r| v.push(r.change));
    v
}

/// Subscribes the watcher to alice's `event`; returns (our tag, the first NOTIFY).
fn subscribed(p: &mut P, event: &str, call: &str) -> (String, String) {
    p.h.send_from(
        &subscribe("alice", event, call, 1, "", 600),
        &udp_source(WATCHER),
    );
    let s = sent(&p.h);
    assert_eq!(s.len(), 2, "{s:?}");
    let ok = &s[0].1;
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    let tag = header(ok, "To")
        .and_then(|t| t.split(";tag=").nth(1))
        .unwrap()
        .to_string();
    (tag, s[1].1.clone())
}

#[test]
fn publish_initial_refresh_modify_and_remove() {
    let mut p = harness();
    let r = p.h.send_from(
        &publish(
            1,
            "z9hG4bKp1",
            &["Event: presence", "Expires: 600"],
            &pidf("sip:alice@example.com", "t1", "open"),
        ),
        &udp_source(PUBLISHER),
    );
    // RFC 3903 §6 step 8: 200 with the entity tag and the granted interval.
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    let e1 = header(&r, "SIP-ETag").unwrap().to_string();
    assert_eq!(header(&r, "Expires"), Some("600"));
    let recs = records(&mut p);
    assert!(matches!(&recs[..], [Change::PublishUpsert { replaces, .. }] if replaces.is_empty()));
    // A refresh: no body, a new entity tag replacing the old one (RFC 3903 §6 step 7).
    let r = p.h.send_from(
        &publish(
            2,
            "z9hG4bKp2",
            &[
                "Event: presence",
                "Expires: 600",
                &format!("SIP-If-Match: {e1}"),
            ],
            "",
        ),
        &udp_source(PUBLISHER),
    );
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    let e2 = header(&r, "SIP-ETag").unwrap().to_string();
    assert_ne!(e1, e2);
    let recs = records(&mut p);
    assert!(
        matches!(&recs[..], [Change::PublishUpsert { replaces, publication, .. }] if **replaces == *e1.as_bytes() && *publication.etag == *e2.as_bytes())
    );
    // The old tag is gone: 412.
    let r = p.h.send_from(
        &publish(
            3,
            "z9hG4bKp3",
            &["Event: presence", &format!("SIP-If-Match: {e1}")],
            "",
        ),
        &udp_source(PUBLISHER),
    );
    assert!(r.starts_with("SIP/2.0 412 "), "{r}");
    // A modification: a body under the current tag.
    let r = p.h.send_from(
        &publish(
            4,
            "z9hG4bKp4",
            &["Event: presence", &format!("SIP-If-Match: {e2}")],
            &pidf("sip:alice@example.com", "t1", "closed"),
        ),
        &udp_source(PUBLISHER),
    );
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    let e3 = header(&r, "SIP-ETag").unwrap().to_string();
    let pres = p.table.presentity(b"presence\0alice@example.com").unwrap();
    assert_eq!(pres.pubs.len(), 1);
    assert!(
        std::str::from_utf8(&pres.pubs[0].body)
            .unwrap()
            .contains("closed")
    );
    // A removal.
    let r = p.h.send_from(
        &publish(
            5,
            "z9hG4bKp5",
            &[
                "Event: presence",
                "Expires: 0",
                &format!("SIP-If-Match: {e3}"),
            ],
            "",
        ),
        &udp_source(PUBLISHER),
    );
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    assert!(p.table.presentity(b"presence\0alice@example.com").is_none());
    let recs = records(&mut p);
    assert!(
        matches!(recs.last(), Some(Change::PublishRemove { .. })),
        "{recs:?}"
    );
    // A retransmission of the removal gets the same answer from its transaction.
    let again = p.h.send_from(
        &publish(
            5,
            "z9hG4bKp5",
            &[
                "Event: presence",
                "Expires: 0",
                &format!("SIP-If-Match: {e3}"),
            ],
            "",
        ),
        &udp_source(PUBLISHER),
    );
    assert_eq!(again, r);
}

#[test]
fn publish_rejects_unknown_events_types_short_intervals_and_bad_bodies() {
    let mut p = harness();
    let doc = pidf("sip:alice@example.com", "t1", "open");
    let src = udp_source(PUBLISHER);
    // RFC 3903 §6 step 2: 489 with Allow-Events.
    let r =
        p.h.send_from(&publish(1, "z9hG4bKr1", &["Event: weather"], &doc), &src);
    assert!(r.starts_with("SIP/2.0 489 Bad Event\r\n"), "{r}");
    assert_eq!(header(&r, "Allow-Events"), Some("presence, dialog"));
    // RFC 3903 §6 step 3: 415 with Accept.
    let r = p.h.send_from(
        &publish(
            2,
            "z9hG4bKr2",
            &["Event: presence", "Content-Type: text/plain"],
            "hello",
        ),
        &src,
    );
    assert!(r.starts_with("SIP/2.0 415 "), "{r}");
    assert_eq!(header(&r, "Accept"), Some("application/pidf+xml"));
    // RFC 3903 §6 step 5: 423 with Min-Expires.
    let r = p.h.send_from(
        &publish(3, "z9hG4bKr3", &["Event: presence", "Expires: 5"], &doc),
        &src,
    );
    assert!(r.starts_with("SIP/2.0 423 "), "{r}");
    assert_eq!(header(&r, "Min-Expires"), Some("60"));
    // RFC 3903 §6 step 4: an initial PUBLISH without a body.
    let r =
        p.h.send_from(&publish(4, "z9hG4bKr4", &["Event: presence"], ""), &src);
    assert!(r.starts_with("SIP/2.0 400 "), "{r}");
    // Not a PIDF document.
    let r = p.h.send_from(
        &publish(5, "z9hG4bKr5", &["Event: presence"], "<presence"),
        &src,
    );
    assert!(r.starts_with("SIP/2.0 400 "), "{r}");
    assert_eq!(p.table.presentities(), 0);
    assert!(records(&mut p).is_empty());
}

#[test]
fn subscribe_gets_200_and_notifies_that_aggregate_publications() {
    let mut p = harness();
    let (tag, n1) = subscribed(&mut p, "presence", "s1");
    // RFC 6665 §4.2.1.2: the NOTIFY follows at once, with the state and the time left.
    assert!(
        n1.starts_with("NOTIFY sip:watcher@192.0.2.40:5090 SIP/2.0\r\n"),
        "{n1}"
    );
    assert_eq!(
        header(&n1, "Subscription-State"),
        Some("active;expires=600")
    );
    assert_eq!(header(&n1, "Event"), Some("presence"));
    assert_eq!(header(&n1, "Content-Type"), Some("application/pidf+xml"));
    assert!(
        header(&n1, "From")
            .unwrap()
            .ends_with(&format!(";tag={tag}"))
    );
    assert_eq!(
        header(&n1, "To"),
        Some("<sip:watcher@example.com>;tag=w-s1")
    );
    // Nothing published yet: the neutral "offline" document.
    assert!(body(&n1).contains("<basic>closed</basic>"), "{n1}");
    assert_eq!(sent(&p.h)[1].0, Dest::Udp(WATCHER.parse().unwrap()));
    p.h.send_from(&ok_to(&n1, 200), &udp_source(WATCHER));
    // Two publications from two devices: one NOTIFY each, the second with both tuples.
    let src = udp_source(PUBLISHER);
    p.h.send_from(
        &publish(
            1,
            "z9hG4bKa1",
            &["Event: presence"],
            &pidf("sip:alice@example.com", "phone", "open"),
        ),
        &src,
    );
    let s = sent(&p.h);
    assert_eq!(s.len(), 2, "{s:?}");
    let n2 = s[1].1.clone();
    assert!(n2.starts_with("NOTIFY "));
    p.h.send_from(&ok_to(&n2, 200), &udp_source(WATCHER));
    let mut other = publish(
        1,
        "z9hG4bKa2",
        &["Event: presence"],
        &pidf("sip:alice@example.com", "laptop", "closed"),
    );
    other = other.replace("Call-ID: pub-1", "Call-ID: pub-2");
    p.h.send_from(&other, &src);
    let s = sent(&p.h);
    let n3 = s[1].1.clone();
    let b = body(&n3);
    assert!(
        b.contains("id=\"phone\"") && b.contains("id=\"laptop\""),
        "{b}"
    );
    assert_eq!(b.matches("<presence").count(), 1, "one document: {b}");
    // CSeqs of the subscription increase.
    let cseq = |m: &str| -> u64 {
        header(m, "CSeq")
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(cseq(&n1) < cseq(&n2) && cseq(&n2) < cseq(&n3));
    p.h.send_from(&ok_to(&n3, 200), &udp_source(WATCHER));
    // A refresh in the dialog: 200 and a NOTIFY.
    p.h.send_from(
        &subscribe("alice", "presence", "s1", 2, &tag, 300),
        &udp_source(WATCHER),
    );
    let s = sent(&p.h);
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"), "{}", s[0].1);
    assert_eq!(
        header(&s[1].1, "Subscription-State"),
        Some("active;expires=300")
    );
    p.h.send_from(&ok_to(&s[1].1, 200), &udp_source(WATCHER));
    // Unsubscribe: 200 and the final NOTIFY (RFC 6665 §4.2.1.4).
    p.h.send_from(
        &subscribe("alice", "presence", "s1", 3, &tag, 0),
        &udp_source(WATCHER),
    );
    let s = sent(&p.h);
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"));
    assert_eq!(header(&s[1].1, "Subscription-State"), Some("terminated"));
    assert_eq!(p.table.watchers(), 0);
    // The subscription is gone: 481 to another refresh.
    let r = p.h.send_from(
        &subscribe("alice", "presence", "s1", 4, &tag, 300),
        &udp_source(WATCHER),
    );
    assert!(r.starts_with("SIP/2.0 481 "), "{r}");
    let recs = records(&mut p);
    assert!(recs.iter().any(|c| matches!(c, Change::WatcherEnd { .. })));
}

#[test]
fn subscribe_rejects_unknown_events_short_intervals_and_too_many_watchers() {
    let mut p = harness();
    let src = udp_source(WATCHER);
    let r =
        p.h.send_from(&subscribe("alice", "weather", "x1", 1, "", 600), &src);
    // RFC 6665 §4.2.1.1: 489 with Allow-Events.
    assert!(r.starts_with("SIP/2.0 489 "), "{r}");
    assert_eq!(
        header(&r, "Allow-Events"),
        Some("presence, dialog, presence.winfo")
    );
    let r =
        p.h.send_from(&subscribe("alice", "presence", "x2", 1, "", 10), &src);
    assert!(r.starts_with("SIP/2.0 423 "), "{r}");
    assert_eq!(header(&r, "Min-Expires"), Some("60"));
    for i in 0..3 {
        subscribed(&mut p, "presence", &format!("ok{i}"));
    }
    let r =
        p.h.send_from(&subscribe("alice", "presence", "x3", 1, "", 600), &src);
    assert!(r.starts_with("SIP/2.0 503 "), "{r}");
    // An unknown subscription dialog: 481.
    let r =
        p.h.send_from(&subscribe("alice", "presence", "x4", 2, "nope", 600), &src);
    assert!(r.starts_with("SIP/2.0 481 "), "{r}");
}

#[test]
fn a_notify_answered_481_or_not_at_all_removes_the_watcher() {
    let mut p = harness();
    let (_, n1) = subscribed(&mut p, "presence", "f1");
    p.h.send_from(&ok_to(&n1, 481), &udp_source(WATCHER));
    assert_eq!(p.table.watchers(), 0);
    let (_, n2) = subscribed(&mut p, "presence", "f2");
    // Unanswered: retransmitted after T1 (RFC 3261 §17.1.2.2), removed at timer F.
    p.h.advance(500);
    let s = sent(&p.h);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].1, n2);
    for _ in 0..70 {
        p.h.advance(500);
    }
    assert_eq!(p.table.watchers(), 0);
    assert_eq!(
        p.stats
            .notify_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn expiry_orders_send_the_final_notify_and_the_offline_document() {
    let mut p = harness();
    let (tag, n1) = subscribed(&mut p, "presence", "e1");
    p.h.send_from(&ok_to(&n1, 200), &udp_source(WATCHER));
    p.h.send_from(
        &publish(
            1,
            "z9hG4bKx1",
            &["Event: presence", "Expires: 60"],
            &pidf("sip:alice@example.com", "t", "open"),
        ),
        &udp_source(PUBLISHER),
    );
    let r = sent(&p.h)[0].1.clone();
    let etag = header(&r, "SIP-ETag").unwrap().to_string();
    let n2 = sent(&p.h)[1].1.clone();
    p.h.send_from(&ok_to(&n2, 200), &udp_source(WATCHER));
    // An order before the publication's time changes nothing.
    let mut k = b"presence\0alice@example.com\0".to_vec();
    k.extend_from_slice(etag.as_bytes());
    assert!(push_end_order(&mut p.orders, ORDER_PUBLICATION_EXPIRED, &k));
    p.h.advance(10);
    assert!(sent(&p.h).is_empty());
    // After it: removed, and the watcher hears the offline document.
    p.h.now += 61_000;
    assert!(push_end_order(&mut p.orders, ORDER_PUBLICATION_EXPIRED, &k));
    p.h.advance(10);
    let s = sent(&p.h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(body(&s[0].1).contains("<basic>closed</basic>"));
    assert!(p.table.presentity(b"presence\0alice@example.com").is_none());
    p.h.send_from(&ok_to(&s[0].1, 200), &udp_source(WATCHER));
    // The subscription runs out: final NOTIFY with reason=timeout (RFC 6665 §4.2.2).
    p.h.now += 600_000;
    let mut wk = b"e1\0".to_vec();
    wk.extend_from_slice(tag.as_bytes());
    wk.extend_from_slice(b"\0w-e1");
    assert!(push_end_order(&mut p.orders, ORDER_WATCHER_EXPIRED, &wk));
    p.h.advance(10);
    let s = sent(&p.h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(
        header(&s[0].1, "Subscription-State"),
        Some("terminated;reason=timeout")
    );
    assert_eq!(p.table.watchers(), 0);
}

#[test]
fn notifies_a_change_causes_go_only_to_watchers_this_node_acts_on() {
    let mut p = harness();
    let (_, n1) = subscribed(&mut p, "presence", "o1");
    p.h.send_from(&ok_to(&n1, 200), &udp_source(WATCHER));
    // The default tag is active elsewhere: the PUBLISH is answered, nobody notified here.
    p.segment.publish(&Ownership::default());
    p.h.send_from(
        &publish(
            1,
            "z9hG4bKo1",
            &["Event: presence"],
            &pidf("sip:alice@example.com", "t", "open"),
        ),
        &udp_source(PUBLISHER),
    );
    let s = sent(&p.h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].1.starts_with("SIP/2.0 200 "));
    // Back here: an order from the control plane (a peer's publication applied)
    // notifies the watchers of the presentity.
    let mut o = Ownership::default();
    o.set_tag(0, true, 2);
    p.segment.publish(&o);
    assert!(push_end_order(
        &mut p.orders,
        ORDER_NOTIFY,
        b"presence\0alice@example.com"
    ));
    p.h.advance(10);
    let s = sent(&p.h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].1.starts_with("NOTIFY ") && body(&s[0].1).contains("<basic>open</basic>"));
}

#[test]
fn watcher_information_lists_the_watchers_of_a_presentity() {
    let mut p = harness();
    let (_, w1) = subscribed(&mut p, "presence.winfo", "wi");
    assert_eq!(
        header(&w1, "Content-Type"),
        Some("application/watcherinfo+xml")
    );
    assert!(body(&w1).contains("<watcherinfo"), "{w1}");
    p.h.send_from(&ok_to(&w1, 200), &udp_source(WATCHER));
    // A presence watcher arrives: the winfo subscriber hears of it.
    p.h.send_from(
        &subscribe("alice", "presence", "pw", 1, "", 600),
        &udp_source(WATCHER),
    );
    let s = sent(&p.h);
    assert_eq!(s.len(), 3, "{s:?}");
    let winfo = s
        .iter()
        .find(|(_, m)| m.contains("Event: presence.winfo"))
        .unwrap();
    assert!(
        body(&winfo.1).contains("sip:watcher@example.com"),
        "{}",
        winfo.1
    );
}

#[test]
fn blf_watchers_hear_of_a_call_through_the_node() {
    let mut p = harness();
    // bob is registered; the watcher subscribes to bob's dialog state.
    let r = p.h.send_from(
        &register(
            "bob",
            "reg-bob",
            1,
            &["Contact: <sip:bob@198.51.100.20:5070>"],
        ),
        &udp_source("198.51.100.20:5070"),
    );
    assert!(r.starts_with("SIP/2.0 200"), "{r}");
    p.h.send_from(
        &subscribe("bob", "dialog", "blf", 1, "", 600),
        &udp_source(WATCHER),
    );
    let s = sent(&p.h);
    let n0 = s[1].1.clone();
    assert_eq!(
        header(&n0, "Content-Type"),
        Some("application/dialog-info+xml")
    );
    assert!(!body(&n0).contains("<dialog "), "idle: {n0}");
    p.h.send_from(&ok_to(&n0, 200), &udp_source(WATCHER));
    // alice calls bob.
    let invite = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKi1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: call-blf\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.10:5062>\r\nContent-Length: 0\r\n\r\n";
    p.h.send(invite);
    let s = sent(&p.h);
    let blf: Vec<&String> = s
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m.starts_with("NOTIFY "))
        .collect();
    assert_eq!(blf.len(), 1, "{s:?}");
    assert!(
        body(blf[0]).contains("trying") && body(blf[0]).contains("recipient"),
        "{}",
        blf[0]
    );
    let version = |m: &str| -> u64 {
        let b = body(m);
        let b = &b[b.find("<dialog-info").unwrap()..];
        let v = b.split("version=\"").nth(1).unwrap();
        v[..v.find('"').unwrap()].parse().unwrap()
    };
    assert!(version(blf[0]) > version(&n0));
    let n1 = blf[0].clone();
    p.h.send_from(&ok_to(&n1, 200), &udp_source(WATCHER));
    // bob answers: the watcher hears "confirmed".
    let fwd = s
        .iter()
        .find(|(_, m)| m.starts_with("INVITE "))
        .unwrap()
        .1
        .clone();
    let ok = ok_to(&fwd, 200)
        .replacen("SIP/2.0 200 X", "SIP/2.0 200 OK", 1)
        .replacen(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=b1",
            1,
        )
        .replacen(
            "Content-Length",
            "Contact: <sip:bob@198.51.100.20:5070>\r\nContent-Length",
            1,
        );
    p.h.send_from(&ok, &udp_source("198.51.100.20:5070"));
    let s = sent(&p.h);
    let n2 = s
        .iter()
        .find(|(_, m)| m.starts_with("NOTIFY "))
        .unwrap()
        .1
        .clone();
    assert!(body(&n2).contains("confirmed"), "{n2}");
    assert!(version(&n2) > version(&n1));
}

#[test]
fn a_fetch_an_unacceptable_accept_and_an_old_cseq() {
    let mut p = harness();
    let src = udp_source(WATCHER);
    // RFC 6665 §4.4.3: Expires 0 out of a dialog is a fetch: 200 and one final NOTIFY
    // with the state, no subscription kept.
    p.h.send_from(&subscribe("alice", "presence", "fe", 1, "", 0), &src);
    let s = sent(&p.h);
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"));
    assert_eq!(header(&s[0].1, "Expires"), Some("0"));
    assert_eq!(
        header(&s[1].1, "Subscription-State"),
        Some("terminated;reason=timeout")
    );
    assert_eq!(p.table.watchers(), 0);
    // RFC 6665 §4.2.1.1: an Accept without the package's type is 406.
    let m = subscribe("alice", "presence", "ac", 1, "", 600).replace(
        "Event: presence\r\n",
        "Event: presence\r\nAccept: text/plain\r\n",
    );
    let r = p.h.send_from(&m, &src);
    assert!(r.starts_with("SIP/2.0 406 "), "{r}");
    assert_eq!(header(&r, "Accept"), Some("application/pidf+xml"));
    // RFC 3261 §12.2.2: a request of the dialog with a lower CSeq is 500.
    let (tag, n) = subscribed(&mut p, "presence", "cs");
    p.h.send_from(&ok_to(&n, 200), &src);
    p.h.send_from(&subscribe("alice", "presence", "cs", 5, &tag, 600), &src);
    let r =
        p.h.send_from(&subscribe("alice", "presence", "cs", 4, &tag, 600), &src);
    assert!(r.starts_with("SIP/2.0 500 "), "{r}");
}

#[test]
fn dialog_publications_are_merged_into_the_blf_document() {
    let mut p = harness();
    let (_, n0) = subscribed(&mut p, "dialog", "dp");
    p.h.send_from(&ok_to(&n0, 200), &udp_source(WATCHER));
    let doc = "<?xml version=\"1.0\"?><dialog-info xmlns=\"urn:ietf:params:xml:ns:dialog-info\" \
               version=\"0\" state=\"full\" entity=\"sip:alice@example.com\"><dialog id=\"pub1\" \
               direction=\"initiator\"><state>confirmed</state></dialog></dialog-info>";
    // A PIDF type for the dialog package is 415.
    let r = p.h.send_from(
        &publish(1, "z9hG4bKd1", &["Event: dialog"], doc),
        &udp_source(PUBLISHER),
    );
    assert!(r.starts_with("SIP/2.0 415 "), "{r}");
    assert_eq!(header(&r, "Accept"), Some("application/dialog-info+xml"));
    p.h.send_from(
        &publish(
            2,
            "z9hG4bKd2",
            &["Event: dialog", "Content-Type: application/dialog-info+xml"],
            doc,
        ),
        &udp_source(PUBLISHER),
    );
    let s = sent(&p.h);
    assert!(s[0].1.starts_with("SIP/2.0 200 OK\r\n"), "{}", s[0].1);
    let n = &s[1].1;
    assert!(n.starts_with("NOTIFY "));
    assert!(
        body(n).contains("id=\"pub1\"") && body(n).contains("confirmed"),
        "{n}"
    );
}

#[test]
fn a_large_fan_out_is_paced_by_the_drivers_room_and_nothing_is_dropped() {
    let mut p = harness();
    let mut keys = Vec::new();
    for i in 0..3 {
        let (_, n) = subscribed(&mut p, "presence", &format!("pace{i}"));
        p.h.send_from(&ok_to(&n, 200), &udp_source(WATCHER));
        keys.push(n);
    }
    // Room for the 200 and the reserve only: no NOTIFY fits in this call.
    p.h.out.limit = 17;
    p.h.send_from(
        &publish(
            1,
            "z9hG4bKpace",
            &["Event: presence"],
            &pidf("sip:alice@example.com", "t", "open"),
        ),
        &udp_source(PUBLISHER),
    );
    let s = sent(&p.h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].1.starts_with("SIP/2.0 200 "));
    // Room for two at the next tick, the last one at the one after.
    p.h.out.limit = 18;
    p.h.advance(1);
    assert_eq!(sent(&p.h).len(), 2);
    p.h.advance(1);
    let s = sent(&p.h);
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].1.starts_with("NOTIFY "));
    p.h.out.limit = usize::MAX;
    p.h.advance(1);
    assert!(sent(&p.h).is_empty());
    let st = &p.stats;
    assert_eq!(
        st.notifies_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
