//! Property tests: a request built with `Writer` parses back to the values it was built
//! from, and no input of any shape makes the parser panic.

use proptest::prelude::*;
use sip_wire::{Contact, Framing, HeaderName, Message, Method, Uri, Writer};

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]{0,15}"
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){0,3}",
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        any::<u128>().prop_map(|v| format!("[{}]", std::net::Ipv6Addr::from(v))),
    ]
}

fn user() -> impl Strategy<Value = String> {
    "([a-zA-Z0-9_.!~*'()&=+$,;?/-]|%[0-9A-F]{2}){1,20}"
}

#[derive(Debug, Clone)]
struct Req {
    method: String,
    user: String,
    host: String,
    port: Option<u16>,
    branch: String,
    from_tag: String,
    call_id: String,
    cseq: u32,
    max_forwards: u8,
    contacts: Vec<(String, String, u32, u16)>,
    expires: Option<u32>,
    compact: bool,
    fold: bool,
    body: Vec<u8>,
}

fn req() -> impl Strategy<Value = Req> {
    (
        prop_oneof![
            Just("REGISTER".to_string()),
            Just("INVITE".to_string()),
            Just("OPTIONS".to_string()),
            "[A-Z]{3,10}"
        ],
        user(),
        host(),
        proptest::option::of(1u16..),
        token(),
        token(),
        "[A-Za-z0-9.!%*_+`'~()<>:\\\\\"/\\[\\]?{}-]{1,40}(@[a-z0-9.]{1,20})?",
        (
            any::<u32>(),
            any::<u8>(),
            proptest::collection::vec((user(), host(), any::<u32>(), 0u16..=1000), 0..4),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        ),
    )
        .prop_map(
            |(
                method,
                user,
                host,
                port,
                branch,
                from_tag,
                call_id,
                (cseq, max_forwards, contacts, expires, compact, fold, body),
            )| Req {
                method,
                user,
                host,
                port,
                branch,
                from_tag,
                call_id,
                cseq,
                max_forwards,
                contacts,
                expires,
                compact,
                fold,
                body,
            },
        )
}

fn build(r: &Req, buf: &mut [u8]) -> usize {
    let mut w = Writer::new(buf);
    let ruri = match r.port {
        Some(p) => format!("sip:{}@{}:{}", r.user, r.host, p),
        None => format!("sip:{}@{}", r.user, r.host),
    };
    w.request_line(r.method.as_bytes(), ruri.as_bytes());
    let sep: &[u8] = if r.fold { b"\r\n  " } else { b" " };
    w.put(if r.compact { b"v:" } else { b"Via:" })
        .put(sep)
        .put(b"SIP/2.0/UDP ")
        .put(r.host.as_bytes());
    w.put(b";branch=z9hG4bK")
        .put(r.branch.as_bytes())
        .put(b";rport\r\n");
    w.put(if r.compact { b"f: " } else { b"From: " })
        .put(b"<sip:a@example.com>;tag=")
        .put(r.from_tag.as_bytes())
        .crlf();
    let to = format!("<sip:{}@{}>", r.user, r.host);
    w.header(if r.compact { "t" } else { "To" }, to.as_bytes());
    w.header(
        if r.compact { "i" } else { "Call-ID" },
        r.call_id.as_bytes(),
    );
    w.put(b"CSeq: ")
        .put_u64(r.cseq.into())
        .put(sep)
        .put(r.method.as_bytes())
        .crlf();
    w.put(b"Max-Forwards: ")
        .put_u64(r.max_forwards.into())
        .crlf();
    for (i, (u, h, e, q)) in r.contacts.iter().enumerate() {
        let name: &[u8] = if r.compact && i % 2 == 0 {
            b"m: "
        } else {
            b"Contact: "
        };
        w.put(name)
            .put(b"<sip:")
            .put(u.as_bytes())
            .put(b"@")
            .put(h.as_bytes())
            .put(b">;expires=");
        w.put_u64((*e).into())
            .put(b";q=")
            .put_u64(u64::from(q / 1000))
            .put(b".");
        let frac = q % 1000;
        w.put(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ])
        .crlf();
    }
    if let Some(e) = r.expires {
        w.put(b"Expires: ").put_u64(e.into()).crlf();
    }
    w.put(if r.compact {
        b"l: "
    } else {
        b"Content-Length: "
    })
    .put_u64(r.body.len() as u64)
    .crlf()
    .crlf();
    w.put(&r.body);
    w.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn serialize_then_parse_roundtrips(r in req()) {
        let mut buf = vec![0u8; 8192];
        let n = build(&r, &mut buf);
        let m = Message::parse(&buf[..n], Framing::Datagram).unwrap();
        prop_assert_eq!(m.check_request().map(|_| ()), Ok(()));
        prop_assert_eq!(m.method().unwrap().as_bytes(), r.method.as_bytes());
        let uri = Uri::parse(m.request_uri().unwrap()).unwrap();
        prop_assert_eq!(uri.user.unwrap(), r.user.as_bytes());
        prop_assert_eq!(uri.host, r.host.as_bytes());
        prop_assert_eq!(uri.port, r.port);
        let via = m.top_via().unwrap();
        prop_assert_eq!(via.host, r.host.as_bytes());
        prop_assert_eq!(&via.branch.unwrap()[7..], r.branch.as_bytes());
        prop_assert_eq!(via.rport, Some(None));
        prop_assert_eq!(m.from().unwrap().tag().unwrap(), r.from_tag.as_bytes());
        prop_assert_eq!(m.call_id().unwrap(), r.call_id.as_bytes());
        let cseq = m.cseq().unwrap();
        prop_assert_eq!(cseq.seq, r.cseq);
        prop_assert_eq!(cseq.method, Method::from_bytes(r.method.as_bytes()));
        prop_assert_eq!(m.max_forwards(), Some(r.max_forwards));
        prop_assert_eq!(m.expires(), r.expires);
        let contacts: Vec<_> = m.contacts().map(|c| c.unwrap()).collect();
        prop_assert_eq!(contacts.len(), r.contacts.len());
        for (c, (u, h, e, q)) in contacts.iter().zip(&r.contacts) {
            let Contact::Addr(c) = c else { panic!("star") };
            let cu = c.addr.parsed_uri();
            prop_assert_eq!(cu.user.unwrap(), u.as_bytes());
            prop_assert_eq!(cu.host, h.as_bytes());
            prop_assert_eq!(c.expires, Some(*e));
            prop_assert_eq!(c.q, Some(*q));
        }
        prop_assert_eq!(m.body, &r.body[..]);
        let cl = r.body.len().to_string();
        prop_assert_eq!(m.header(HeaderName::ContentLength).unwrap(), cl.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        exercise(&data);
    }

    #[test]
    fn mutated_valid_messages_never_panic(r in req(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut buf = vec![0u8; 8192];
        let n = build(&r, &mut buf);
        let data = &mut buf[..n];
        for (at, b) in flips {
            let k = at % data.len();
            data[k] = b;
        }
        exercise(data);
    }
}

/// Everything the node does with an untrusted message (shared with the fuzz target).
fn exercise(data: &[u8]) {
    sip_wire::fuzzing::exercise(data);
}
