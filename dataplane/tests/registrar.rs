//! The registrar and the SIP core, sans-IO, with virtual time: RFC 3261 §10.3 step by
//! step, RFC 3327 Path, RFC 3581 rport, RFC 5626 instance/reg-id, and the change stream.

mod common;

use common::*;
use sipmesh_cluster::change::{Change, RemoveReason};
use sipmesh_dataplane::io::Dest;
use sipmesh_dataplane::registrar::{MaxContactsPolicy, RegistrarConfig};

fn cfg() -> RegistrarConfig {
    RegistrarConfig::default()
}

#[test]
fn add_refresh_and_list_bindings_with_remaining_expires() {
    let mut h = Harness::new(cfg());
    let r = h.send(&register(
        "alice",
        "c1",
        1,
        &["Contact: <sip:alice@192.0.2.10:5062>;expires=600;q=0.5"],
    ));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        header_values(&r, "Contact"),
        vec!["<sip:alice@192.0.2.10:5062>;expires=600;q=0.5"]
    );
    // RFC 3261 §10.3 step 8: the response SHOULD carry a Date.
    assert!(r.contains("\r\nDate: ") && r.contains(" GMT\r\n"));
    let recs = h.drain();
    assert_eq!(recs.len(), 1);
    let Change::BindingUpsert { aor, binding } = &recs[0].change else {
        panic!()
    };
    assert_eq!(&**aor, b"alice@example.com");
    assert_eq!(binding.expires_at as u64, T0 / 1000 + 600);
    assert_eq!(recs[0].origin.0, 7);
    let v1 = recs[0].version;

    h.now += 100_000;
    let r = h.send(&register(
        "alice",
        "c1",
        2,
        &["Contact: <sip:alice@192.0.2.10:5062>", "Expires: 300"],
    ));
    assert_eq!(status(&r), 200);
    assert_eq!(
        header_values(&r, "Contact"),
        vec!["<sip:alice@192.0.2.10:5062>;expires=300"]
    );
    let recs = h.drain();
    assert_eq!(recs.len(), 1);
    assert!(recs[0].version > v1, "versions grow");
    assert_eq!(h.table.bindings(), 1);

    // A fetch (no Contact) lists the bindings with what remains of their interval.
    h.now += 50_000;
    let r = h.send(&register("alice", "c9", 1, &[]));
    assert_eq!(status(&r), 200);
    assert_eq!(
        header_values(&r, "Contact"),
        vec!["<sip:alice@192.0.2.10:5062>;expires=250"]
    );
    assert!(h.drain().is_empty(), "a fetch changes nothing");
}

#[test]
fn expires_comes_from_contact_then_header_then_default_and_is_clamped() {
    let mut h = Harness::new(RegistrarConfig {
        max_expires: 7200,
        ..cfg()
    });
    let r = h.send(&register(
        "bob",
        "c1",
        1,
        &[
            "Contact: <sip:a@192.0.2.1>;expires=120, <sip:b@192.0.2.1>",
            "Contact: <sip:c@192.0.2.1>;expires=99999",
            "Expires: 900",
        ],
    ));
    let c = header_values(&r, "Contact");
    assert!(c.contains(&"<sip:a@192.0.2.1>;expires=120"), "{r}");
    assert!(c.contains(&"<sip:b@192.0.2.1>;expires=900"));
    assert!(c.contains(&"<sip:c@192.0.2.1>;expires=7200"));
    let r = h.send(&register("carol", "c1", 1, &["Contact: <sip:a@192.0.2.1>"]));
    assert_eq!(
        header_values(&r, "Contact"),
        vec!["<sip:a@192.0.2.1>;expires=3600"]
    );
}

#[test]
fn too_brief_interval_gets_423_with_min_expires() {
    // RFC 3261 §10.3 step 7 and §21.4.17
    let mut h = Harness::new(cfg());
    let r = h.send(&register(
        "dave",
        "c1",
        1,
        &["Contact: <sip:d@192.0.2.1>;expires=30"],
    ));
    assert_eq!(status(&r), 423);
    assert_eq!(header_values(&r, "Min-Expires"), vec!["60"]);
    assert_eq!(h.table.aors(), 0);
    assert!(h.drain().is_empty());
}

#[test]
fn call_id_and_cseq_ordering_rule() {
    // RFC 3261 §10.3 step 7: same Call-ID needs a higher CSeq, else the request fails.
    let mut h = Harness::new(cfg());
    let contact = "Contact: <sip:e@192.0.2.1>";
    assert_eq!(status(&h.send(&register("erin", "c1", 5, &[contact]))), 200);
    h.drain();
    assert_eq!(status(&h.send(&register("erin", "c1", 4, &[contact]))), 500);
    assert!(h.drain().is_empty(), "a refused update changes nothing");
    // Another Call-ID (a rebooted UA) may use any CSeq.
    assert_eq!(status(&h.send(&register("erin", "c2", 1, &[contact]))), 200);
    assert_eq!(h.drain().len(), 1);
    assert_eq!(h.table.bindings(), 1);
}

#[test]
fn a_retransmitted_register_gets_the_same_answer_and_changes_nothing() {
    // RFC 3261 §17.2.3: a retransmission is answered again, not processed again.
    let mut h = Harness::new(cfg());
    let req = register("rex", "c1", 7, &["Contact: <sip:r@192.0.2.1>;expires=600"]);
    let first = h.send(&req);
    assert_eq!(status(&first), 200);
    assert_eq!(h.drain().len(), 1);
    h.now += 2_000;
    let again = h.send(&req);
    assert_eq!(status(&again), 200, "{again}");
    assert_eq!(
        header_values(&again, "Contact"),
        vec!["<sip:r@192.0.2.1>;expires=598"]
    );
    assert!(h.drain().is_empty(), "a retransmission writes nothing");
    // The retransmission of an unregistration also answers 200.
    let unreg = register("rex", "c1", 8, &["Contact: <sip:r@192.0.2.1>;expires=0"]);
    assert_eq!(status(&h.send(&unreg)), 200);
    assert_eq!(status(&h.send(&unreg)), 200);
    assert_eq!(h.drain().len(), 1);
}

#[test]
fn expires_zero_and_wildcard_remove_bindings() {
    let mut h = Harness::new(cfg());
    h.send(&register(
        "fay",
        "c1",
        1,
        &["Contact: <sip:f1@192.0.2.1>, <sip:f2@192.0.2.1>, <sip:f3@192.0.2.1>"],
    ));
    h.drain();
    let r = h.send(&register(
        "fay",
        "c1",
        2,
        &["Contact: <sip:f1@192.0.2.1>;expires=0"],
    ));
    assert_eq!(header_values(&r, "Contact").len(), 2);
    let recs = h.drain();
    assert!(
        matches!(&recs[0].change, Change::BindingRemove { reason: RemoveReason::Unregistered, contact, .. } if &**contact == b"sip:f1@192.0.2.1")
    );

    // RFC 3261 §10.3 step 6: '*' only alone and only with Expires: 0.
    assert_eq!(
        status(&h.send(&register("fay", "c1", 3, &["Contact: *"]))),
        400
    );
    assert_eq!(
        status(&h.send(&register(
            "fay",
            "c1",
            3,
            &["Contact: *", "Contact: <sip:x@y>", "Expires: 0"]
        ))),
        400
    );
    let r = h.send(&register("fay", "c1", 3, &["Contact: *", "Expires: 0"]));
    assert_eq!(status(&r), 200);
    assert!(header_values(&r, "Contact").is_empty());
    assert_eq!(h.drain().len(), 2);
    assert_eq!(h.table.aors(), 0, "the AoR goes with its last binding");
}

#[test]
fn uri_comparison_decides_which_binding_a_contact_names() {
    // RFC 3261 §10.3 step 7 with §19.1.4: host case-insensitive, escapes decoded.
    let mut h = Harness::new(cfg());
    h.send(&register(
        "gil",
        "c1",
        1,
        &["Contact: <sip:%67il@HOST.example.com;transport=udp>"],
    ));
    let r = h.send(&register(
        "gil",
        "c1",
        2,
        &["Contact: <sip:gil@host.example.com;transport=UDP>;expires=0"],
    ));
    assert_eq!(status(&r), 200);
    assert_eq!(h.table.bindings(), 0);
}

#[test]
fn q_values_are_listed() {
    let mut h = Harness::new(cfg());
    let r = h.send(&register(
        "hal",
        "c1",
        1,
        &["Contact: <sip:a@192.0.2.1>;q=1.0, <sip:b@192.0.2.1>;q=0.125, <sip:c@192.0.2.1>;q=0"],
    ));
    let c = header_values(&r, "Contact");
    assert!(c.contains(&"<sip:a@192.0.2.1>;expires=3600;q=1"));
    assert!(c.contains(&"<sip:b@192.0.2.1>;expires=3600;q=0.125"));
    assert!(c.contains(&"<sip:c@192.0.2.1>;expires=3600;q=0"));
    assert_eq!(
        status(&h.send(&register(
            "hal",
            "c1",
            2,
            &["Contact: <sip:d@192.0.2.1>;q=1.5"]
        ))),
        400
    );
}

#[test]
fn max_contacts_reject_policy_changes_nothing() {
    let mut h = Harness::new(RegistrarConfig {
        max_contacts: 2,
        ..cfg()
    });
    h.send(&register(
        "ida",
        "c1",
        1,
        &["Contact: <sip:a@192.0.2.1>, <sip:b@192.0.2.1>"],
    ));
    h.drain();
    let r = h.send(&register("ida", "c2", 1, &["Contact: <sip:c@192.0.2.1>"]));
    assert_eq!(status(&r), 403);
    assert!(r.starts_with("SIP/2.0 403 Too Many Registered Contacts\r\n"));
    assert_eq!(h.table.bindings(), 2);
    assert!(h.drain().is_empty());
    // Refreshing an existing one is still fine.
    assert_eq!(
        status(&h.send(&register("ida", "c1", 2, &["Contact: <sip:a@192.0.2.1>"]))),
        200
    );
}

#[test]
fn max_contacts_replace_oldest_policy_drops_the_stalest() {
    let mut h = Harness::new(RegistrarConfig {
        max_contacts: 2,
        max_contacts_policy: MaxContactsPolicy::ReplaceOldest,
        ..cfg()
    });
    h.send(&register("jo", "c1", 1, &["Contact: <sip:a@192.0.2.1>"]));
    h.now += 1000;
    h.send(&register("jo", "c2", 1, &["Contact: <sip:b@192.0.2.1>"]));
    h.now += 1000;
    h.drain();
    let r = h.send(&register("jo", "c3", 1, &["Contact: <sip:c@192.0.2.1>"]));
    assert_eq!(status(&r), 200);
    let c = header_values(&r, "Contact");
    assert_eq!(c.len(), 2);
    assert!(!c.iter().any(|v| v.contains("sip:a@")), "{r}");
    let recs = h.drain();
    assert!(recs.iter().any(|r| matches!(&r.change, Change::BindingRemove { reason: RemoveReason::Replaced, contact, .. } if &**contact == b"sip:a@192.0.2.1")));
}

#[test]
fn path_is_stored_and_echoed_when_supported() {
    // RFC 3327 §5.3
    let mut h = Harness::new(cfg());
    let r = h.send(&register(
        "kim",
        "c1",
        1,
        &[
            "Contact: <sip:k@192.0.2.1>",
            "Path: <sip:edge1.example.net;lr>",
            "Path: <sip:edge2.example.net;lr>",
            "Supported: path",
        ],
    ));
    assert_eq!(
        header_values(&r, "Path"),
        vec!["<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>"]
    );
    assert!(header_values(&r, "Supported").contains(&"path"));
    let recs = h.drain();
    let Change::BindingUpsert { binding, .. } = &recs[0].change else {
        panic!()
    };
    assert_eq!(
        binding.path(),
        b"<sip:edge1.example.net;lr>,<sip:edge2.example.net;lr>"
    );
    // Without Supported: path the values are kept but not echoed.
    let r = h.send(&register(
        "kim",
        "c1",
        2,
        &[
            "Contact: <sip:k@192.0.2.1>",
            "Path: <sip:edge1.example.net;lr>",
        ],
    ));
    assert!(header_values(&r, "Path").is_empty());
}

#[test]
fn source_address_and_transport_are_kept_for_nat_traversal() {
    // RFC 3581: the reply goes to the source port; the binding keeps the source.
    let mut h = Harness::new(cfg());
    let src = udp_source("203.0.113.7:40000");
    let r = h.send_from(
        &register("lee", "c1", 1, &["Contact: <sip:lee@10.0.0.2:5060>"]),
        &src,
    );
    assert!(
        r.contains(";rport=40000;") && r.contains(";received=203.0.113.7"),
        "{r}"
    );
    assert_eq!(
        h.out.last().unwrap().0,
        Dest::Udp("203.0.113.7:40000".parse().unwrap())
    );
    let recs = h.drain();
    let Change::BindingUpsert { binding, .. } = &recs[0].change else {
        panic!()
    };
    assert_eq!(binding.source(), "203.0.113.7:40000".parse().unwrap());
    assert_eq!(binding.transport, sipmesh_cluster::usrloc::TRANSPORT_UDP);
}

#[test]
fn instance_and_reg_id_name_the_binding() {
    // RFC 5626 §6: (instance, reg-id) identifies a flow's binding; a new Contact for the
    // same pair replaces the old one.
    let mut h = Harness::new(cfg());
    let inst = "+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\"";
    h.send(&register(
        "mo",
        "c1",
        1,
        &[&format!("Contact: <sip:mo@10.0.0.1:5060>;{inst};reg-id=1")],
    ));
    h.drain();
    let r = h.send(&register(
        "mo",
        "c1",
        2,
        &[&format!("Contact: <sip:mo@10.0.0.9:6000>;{inst};reg-id=1")],
    ));
    let c = header_values(&r, "Contact");
    assert_eq!(
        c,
        vec![format!("<sip:mo@10.0.0.9:6000>;expires=3600;{inst};reg-id=1").as_str()]
    );
    let recs = h.drain();
    assert!(matches!(
        &recs[0].change,
        Change::BindingRemove {
            reason: RemoveReason::Replaced,
            ..
        }
    ));
    assert!(
        matches!(&recs[1].change, Change::BindingUpsert { binding, .. } if binding.reg_id == 1)
    );
    // Another reg-id is another flow: two bindings.
    h.send(&register(
        "mo",
        "c1",
        3,
        &[&format!("Contact: <sip:mo@10.0.0.9:6001>;{inst};reg-id=2")],
    ));
    assert_eq!(h.table.bindings(), 2);
}

#[test]
fn timer_wheel_expires_bindings_and_emits_records() {
    let mut h = Harness::new(RegistrarConfig {
        min_expires: 1,
        ..cfg()
    });
    h.send(&register(
        "ned",
        "c1",
        1,
        &["Contact: <sip:a@192.0.2.1>;expires=5, <sip:b@192.0.2.1>;expires=60"],
    ));
    h.drain();
    h.advance(4_000);
    assert!(h.drain().is_empty());
    h.advance(1_000);
    let recs = h.drain();
    assert_eq!(recs.len(), 1);
    assert!(
        matches!(&recs[0].change, Change::BindingRemove { reason: RemoveReason::Expired, contact, .. } if &**contact == b"sip:a@192.0.2.1")
    );
    assert_eq!(h.table.bindings(), 1);
    h.advance(55_000);
    assert_eq!(h.drain().len(), 1);
    assert_eq!(h.table.aors(), 0);
    assert_eq!(
        h.reg_stats
            .bindings_expired
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_full_change_ring_refuses_with_503_and_changes_nothing() {
    let mut h = Harness::with_ring(cfg(), 1 << 16);
    let mut last = 0;
    for i in 0..5000 {
        let r = h.send(&register(
            &format!("u{i}"),
            "c1",
            1,
            &["Contact: <sip:a@192.0.2.1>"],
        ));
        last = status(&r);
        if last == 503 {
            assert!(header_values(&r, "Retry-After") == vec!["1"]);
            break;
        }
    }
    assert_eq!(last, 503, "the ring must fill up without a consumer");
    let before = h.table.bindings();
    let recs = h.drain();
    assert_eq!(recs.len(), before, "every stored binding has its record");
    // Once drained, registrations go through again.
    assert_eq!(
        status(&h.send(&register("late", "c1", 1, &["Contact: <sip:a@192.0.2.1>"]))),
        200
    );
}

#[test]
fn aor_syntax_and_domain_checks() {
    let mut h = Harness::new(RegistrarConfig {
        domains: vec!["example.com".into()],
        ..cfg()
    });
    let other = register("pat", "c1", 1, &["Contact: <sip:p@192.0.2.1>"])
        .replace("REGISTER sip:example.com", "REGISTER sip:example.org");
    assert_eq!(status(&h.send(&other)), 404);
    let tel = register("pat", "c1", 1, &["Contact: <sip:p@192.0.2.1>"])
        .replace("To: <sip:pat@example.com>", "To: <tel:+15551234>");
    assert_eq!(status(&h.send(&tel)), 400);
}

#[test]
fn core_answers_options_and_rejects_by_rfc() {
    let mut h = Harness::new(cfg());
    let opt = "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKo1\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    let r = h.send(opt);
    // RFC 3261 §11.2: Allow, Accept, Supported.
    assert_eq!(status(&r), 200);
    assert_eq!(header_values(&r, "Allow"), vec!["REGISTER, OPTIONS, ACK"]);
    assert_eq!(header_values(&r, "Accept").len(), 1);
    assert_eq!(header_values(&r, "Supported"), vec!["path"]);
    // RFC 3261 §8.2.6.2: a To tag on every non-100 response, stable across retransmissions.
    let tag = header_values(&r, "To")[0].to_string();
    assert!(tag.contains(";tag="));
    assert_eq!(header_values(&h.send(opt), "To")[0], tag);
    // Max-Forwards: 0 → 483
    assert_eq!(
        status(&h.send(&opt.replace("Max-Forwards: 70", "Max-Forwards: 0"))),
        483
    );
    // RFC 3261 §8.2.1: unknown → 501, known but not here → 405 with Allow.
    let r = h.send(&opt.replace("OPTIONS", "FOO"));
    assert_eq!(status(&r), 501);
    let r = h.send(&opt.replace("OPTIONS", "SUBSCRIBE"));
    assert_eq!(status(&r), 405);
    assert_eq!(header_values(&r, "Allow"), vec!["REGISTER, OPTIONS, ACK"]);
    // RFC 3261 §8.2.2.3: 420 listing the unsupported option tags.
    let r = h.send(&opt.replace(
        "Max-Forwards: 70",
        "Max-Forwards: 70\r\nRequire: path, foo, bar",
    ));
    assert_eq!(status(&r), 420);
    assert_eq!(header_values(&r, "Unsupported"), vec!["foo", "bar"]);
    // RFC 3261 §8.2.x: SIP/3.0 → 505
    assert_eq!(status(&h.send(&opt.replacen("SIP/2.0", "SIP/3.0", 1))), 505);
    // Malformed, but answerable: 400 naming the defect.
    let r = h.send(&opt.replace("CSeq: 1 OPTIONS", "CSeq: x OPTIONS"));
    assert!(r.starts_with("SIP/2.0 400 Malformed CSeq\r\n"), "{r}");
    // No usable Via: dropped and counted.
    assert_eq!(
        h.send(&opt.replace("Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKo1\r\n", "")),
        ""
    );
    assert_eq!(
        h.stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // ACK is never answered.
    assert_eq!(h.send(&opt.replace("OPTIONS", "ACK")), "");
    // Responses are dropped (no client transactions here).
    assert_eq!(h.send("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n"), "");
}

#[test]
fn oversize_datagram_gets_513() {
    let mut h = Harness::new(cfg());
    let head = "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKo1\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 70000\r\n\r\nxxxx";
    h.out.clear();
    use sipmesh_dataplane::io::Handler;
    h.core.on_oversize(
        head.as_bytes(),
        &udp_source("192.0.2.10:5062"),
        h.now,
        &mut h.out,
    );
    assert!(
        h.out
            .last_text()
            .starts_with("SIP/2.0 513 Message Too Large\r\n")
    );
}

#[test]
fn response_goes_to_sent_by_port_without_rport_and_to_maddr_literal() {
    // RFC 3261 §18.2.2
    let mut h = Harness::new(cfg());
    let opt = "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP client.example.com:5070;branch=z9hG4bKo1\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\n\r\n";
    let r = h.send_from(opt, &udp_source("198.51.100.4:33333"));
    assert!(
        r.contains(
            "Via: SIP/2.0/UDP client.example.com:5070;branch=z9hG4bKo1;received=198.51.100.4\r\n"
        ),
        "{r}"
    );
    assert_eq!(
        h.out.last().unwrap().0,
        Dest::Udp("198.51.100.4:5070".parse().unwrap())
    );
    h.send_from(
        &opt.replace(";branch", ";maddr=239.255.255.1;branch"),
        &udp_source("198.51.100.4:33333"),
    );
    assert_eq!(
        h.out.last().unwrap().0,
        Dest::Udp("239.255.255.1:5070".parse().unwrap())
    );
}

#[test]
fn escnull_registers_two_distinct_contacts() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/rfc4475");
    let msg = std::fs::read_to_string(format!("{dir}/escnull.dat")).unwrap();
    let mut h = Harness::new(cfg());
    let r = h.send(&msg);
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header_values(&r, "Contact").len(), 2);
    let recs = h.drain();
    assert_eq!(recs.len(), 2);
    let Change::BindingUpsert { aor, .. } = &recs[0].change else {
        panic!()
    };
    assert_eq!(&**aor, b"null-\0-null@example.com");
}

#[test]
fn a_contact_named_twice_in_one_request_counts_once_last_wins() {
    let mut h = Harness::new(cfg());
    let r = h.send(&register(
        "quin",
        "c1",
        1,
        &["Contact: <sip:q@192.0.2.1>;expires=600, <sip:q@192.0.2.1>;expires=120"],
    ));
    assert_eq!(
        header_values(&r, "Contact"),
        vec!["<sip:q@192.0.2.1>;expires=120"]
    );
    assert_eq!(h.drain().len(), 1);
    let r = h.send(&register(
        "quin",
        "c1",
        2,
        &["Contact: <sip:q@192.0.2.1>;expires=600, <sip:q@192.0.2.1>;expires=0"],
    ));
    assert!(header_values(&r, "Contact").is_empty(), "{r}");
    assert_eq!(h.table.aors(), 0);
}

#[test]
fn refreshing_does_not_pile_up_timers() {
    let mut h = Harness::new(cfg());
    for i in 1..=200u32 {
        let r = h.send(&register(
            "rho",
            "c1",
            i,
            &["Contact: <sip:r@192.0.2.1>;expires=60"],
        ));
        assert_eq!(status(&r), 200);
        h.advance(30_000);
        assert!(
            h.core.registrar().timers() <= 3,
            "{} timers after {i} refreshes",
            h.core.registrar().timers()
        );
    }
    h.advance(61_000);
    assert_eq!(h.table.aors(), 0);
    assert_eq!(h.core.registrar().timers(), 0);
}

#[test]
fn a_binding_that_gains_an_instance_is_replaced_in_the_change_stream() {
    // Same Contact, now with +sip.instance and reg-id: the same binding for RFC 3261
    // §10.3, but known under another (contact, instance, reg-id), so the old one's removal
    // is in the stream (a store keyed by that triple drops its row).
    let mut h = Harness::new(cfg());
    let r = h.send(&register(
        "gail",
        "g1",
        1,
        &["Contact: <sip:gail@192.0.2.10>"],
    ));
    assert_eq!(status(&r), 200, "{r}");
    h.drain();
    let r = h.send(&register(
        "gail",
        "g1",
        2,
        &["Contact: <sip:gail@192.0.2.10>;+sip.instance=\"<urn:uuid:g>\";reg-id=1"],
    ));
    assert_eq!(status(&r), 200, "{r}");
    let recs = h.drain();
    assert_eq!(recs.len(), 2, "{recs:?}");
    let Change::BindingRemove {
        contact,
        instance,
        reg_id,
        reason,
        ..
    } = &recs[0].change
    else {
        panic!("{recs:?}")
    };
    assert_eq!(
        (&**contact, &**instance, *reg_id),
        (&b"sip:gail@192.0.2.10"[..], &b""[..], 0)
    );
    assert_eq!(*reason, RemoveReason::Replaced);
    let Change::BindingUpsert { binding, .. } = &recs[1].change else {
        panic!("{recs:?}")
    };
    assert_eq!(binding.instance(), b"<urn:uuid:g>");
    assert_eq!(h.table.bindings(), 1);
}

fn upserted(h: &mut Harness) -> Vec<sipmesh_cluster::usrloc::Binding> {
    h.drain()
        .into_iter()
        .filter_map(|r| match r.change {
            Change::BindingUpsert { binding, .. } => Some(binding),
            _ => None,
        })
        .collect()
}

#[test]
fn nated_registrations_are_flagged_for_keepalive_as_configured() {
    use sipmesh_cluster::usrloc::{FLAG_KEEPALIVE, FLAG_NATED};
    use sipmesh_dataplane::registrar::KeepaliveMode;
    let natted = udp_source("203.0.113.7:40000");
    let direct = udp_source("192.0.2.10:5062");
    let reg = |u: &str, contact: &str| {
        register(u, &format!("c-{u}"), 1, &[&format!("Contact: <{contact}>")])
    };
    for (mode, nated_flags, direct_flags) in [
        (KeepaliveMode::Off, FLAG_NATED, 0),
        (KeepaliveMode::Nated, FLAG_NATED | FLAG_KEEPALIVE, 0),
        (
            KeepaliveMode::All,
            FLAG_NATED | FLAG_KEEPALIVE,
            FLAG_KEEPALIVE,
        ),
    ] {
        let mut h = Harness::new(RegistrarConfig {
            keepalive: mode,
            ..cfg()
        });
        // A private Contact address behind a public source: NATed.
        h.send_from(&reg("a", "sip:a@10.0.0.2:5060"), &natted);
        // Contact and Via name the source exactly: not NATed.
        h.send_from(&reg("b", "sip:b@192.0.2.10:5062"), &direct);
        // A host name cannot be compared, but the Via (192.0.2.10:5062, rport) can.
        h.send_from(&reg("c", "sip:c@phone.example.net"), &natted);
        let b = upserted(&mut h);
        assert_eq!(b.len(), 3, "{mode:?}");
        assert_eq!(b[0].flags, nated_flags, "{mode:?} private contact");
        assert_eq!(b[1].flags, direct_flags, "{mode:?} direct");
        assert_eq!(b[2].flags, nated_flags, "{mode:?} via differs from source");
        assert_eq!(b[0].keepalive(), mode != KeepaliveMode::Off);
    }
    // TCP contacts keep their connection alive themselves (RFC 5626 §4.4.1): no pings.
    let mut h = Harness::new(RegistrarConfig {
        keepalive: KeepaliveMode::All,
        ..cfg()
    });
    let tcp = sipmesh_dataplane::io::Source {
        transport: sipmesh_dataplane::io::Transport::Tcp,
        conn: Some(sipmesh_dataplane::io::ConnId {
            slot: 0,
            generation: 1,
        }),
        ..natted
    };
    h.send_from(&reg("t", "sip:t@10.0.0.9:5060;transport=tcp"), &tcp);
    let b = upserted(&mut h);
    assert_eq!(b[0].flags, FLAG_NATED);
}

#[test]
fn the_sharing_tag_comes_from_the_header_then_the_listener_then_the_domain() {
    use sipmesh_dataplane::registrar::TagRules;
    let mut h = Harness::new(RegistrarConfig {
        tagging: TagRules {
            header: Some("X-Sharing-Tag".into()),
            listeners: vec![("127.0.0.1:5070".parse().unwrap(), "edge-b".into())],
            domains: vec![("example.com".into(), "dom-a".into())],
        },
        ..cfg()
    });
    let contact = "Contact: <sip:u@192.0.2.10:5062>";
    let other_listener = sipmesh_dataplane::io::Source {
        local: "127.0.0.1:5070".parse().unwrap(),
        ..udp_source("192.0.2.10:5062")
    };
    h.send(&register(
        "h",
        "c1",
        1,
        &[contact, "x-sharing-tag:  vip.1 "],
    ));
    h.send_from(&register("l", "c2", 1, &[contact]), &other_listener);
    h.send_from(
        &register("l2", "c3", 1, &[contact, "X-Sharing-Tag: bad tag!"]),
        &other_listener,
    );
    h.send(&register("d", "c4", 1, &[contact]));
    let tags: Vec<Vec<u8>> = upserted(&mut h).iter().map(|b| b.tag().to_vec()).collect();
    assert_eq!(
        tags,
        vec![
            b"vip.1".to_vec(),
            b"edge-b".to_vec(),
            b"edge-b".to_vec(),
            b"dom-a".to_vec()
        ]
    );
    // No rule: untagged (the node-wide default tag).
    let mut h = Harness::new(cfg());
    h.send(&register("n", "c5", 1, &[contact, "X-Sharing-Tag: vip"]));
    assert!(upserted(&mut h)[0].tag().is_empty());
}
