//! No network input reaches a panic: arbitrary bytes and mutated REGISTER/OPTIONS traffic
//! through the whole SIP core (parser, checks, registrar, timers, replies), after which
//! the node still answers correctly.

mod common;

use common::*;
use proptest::prelude::*;
use sipmesh_dataplane::io::{ConnId, Handler, Source, Transport};
use sipmesh_dataplane::registrar::{MaxContactsPolicy, RegistrarConfig};

fn seed(i: u8) -> String {
    let contacts = [
        "Contact: <sip:a@192.0.2.1>;expires=60, <sip:b@192.0.2.1;transport=tcp>;q=0.5",
        "Contact: *\r\nExpires: 0",
        "Contact: \"X\" <sip:x@[2001:db8::1]:5070>;+sip.instance=\"<urn:uuid:1>\";reg-id=1;expires=0",
        "Contact: sip:c@192.0.2.1;expires=3600\r\nPath: <sip:p1;lr>,<sip:p2;lr>\r\nSupported: path",
        "Contact: <sip:a@192.0.2.1>, <sip:a@192.0.2.1>;expires=0\r\nRequire: path",
    ];
    register(
        &format!("u{}", i % 4),
        &format!("c{}", i % 3),
        u32::from(i % 5) + 1,
        &[contacts[usize::from(i) % contacts.len()]],
    )
}

fn options() -> &'static str {
    "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKo1\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
}

fn still_serving(h: &mut Harness) {
    let r = h.send(options());
    assert_eq!(status(&r), 200, "{r}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut h = Harness::new(RegistrarConfig::default());
        h.out.clear();
        let udp = udp_source("192.0.2.10:5062");
        h.core.on_message(&data, &udp, h.now, &mut h.out);
        h.core.on_oversize(&data, &udp, h.now, &mut h.out);
        let tcp = Source { transport: Transport::Tcp, conn: Some(ConnId { slot: 1, generation: 1 }), ..udp };
        h.core.on_message(&data, &tcp, h.now, &mut h.out);
        still_serving(&mut h);
    }

    #[test]
    fn mutated_register_traffic(
        script in proptest::collection::vec((any::<u8>(), proptest::collection::vec((any::<u16>(), any::<u8>()), 0..6), 0u64..90_000), 1..12),
        replace in any::<bool>(),
    ) {
        let cfg = RegistrarConfig {
            min_expires: 1,
            max_contacts: 3,
            max_contacts_policy: if replace { MaxContactsPolicy::ReplaceOldest } else { MaxContactsPolicy::Reject },
            ..RegistrarConfig::default()
        };
        let mut h = Harness::with_ring(cfg, 1 << 16);
        for (which, flips, advance) in script {
            let mut msg = seed(which).into_bytes();
            for (at, b) in flips {
                let k = usize::from(at) % msg.len();
                msg[k] = b;
            }
            h.out.clear();
            h.core.on_message(&msg, &udp_source("192.0.2.10:5062"), h.now, &mut h.out);
            h.advance(advance);
            if which % 3 == 0 {
                h.drain();
            }
        }
        h.drain();
        still_serving(&mut h);
        // Every binding in the table is one the change stream announced (the ring was
        // drained above): counts agree after the timers settle.
        h.advance(200_000_000);
        prop_assert_eq!(h.table.bindings(), 0);
    }
}
