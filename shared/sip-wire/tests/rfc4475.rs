//! The RFC 4475 torture messages: every valid one parses to the right values, every
//! invalid one yields the typed error its defect calls for.

use sip_wire::{
    Contact, ErrorKind, Framing, HeaderName, Message, Method, Scheme, StartLine, Uri,
    uri::unescape_into,
};

fn load(name: &str) -> Vec<u8> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/rfc4475");
    std::fs::read(format!("{dir}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Parse and run the checks the node runs before any logic.
fn check(m: &Message<'_>) -> Result<(), ErrorKind> {
    if m.is_request() {
        m.check_request().map(|_| ())
    } else {
        m.check_response()
    }
}

fn outcome(name: &str) -> Result<(), ErrorKind> {
    let data = load(name);
    Message::parse(&data, Framing::Datagram).and_then(|m| check(&m))
}

#[test]
fn manifest_lists_every_file_with_an_expectation() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/rfc4475");
    let manifest = std::fs::read_to_string(format!("{dir}/manifest.tsv")).unwrap();
    let rows: Vec<_> = manifest.lines().skip(1).collect();
    assert_eq!(rows.len(), 50);
    for row in rows {
        let cols: Vec<&str> = row.split('\t').collect();
        let (file, expectation) = (cols[0], cols[2]);
        let r = outcome(file);
        match expectation {
            "valid" | "tolerate" => assert_eq!(r, Ok(()), "{file}"),
            "invalid" => assert!(r.is_err(), "{file} must be rejected"),
            // Well formed; the node's logic rejects them (tested in the node tests), the
            // two unknown Request-URI schemes are already a 416 here.
            "valid-reject" => {
                if file == "unkscm.dat" || file == "novelsc.dat" {
                    assert_eq!(r, Err(ErrorKind::UnsupportedUriScheme), "{file}");
                } else {
                    assert_eq!(r, Ok(()), "{file}");
                }
            }
            "unclassified" => {}
            other => panic!("unknown expectation {other}"),
        }
    }
}

#[test]
fn invalid_messages_yield_the_right_typed_error() {
    use ErrorKind::*;
    let cases: &[(&str, ErrorKind, u16)] = &[
        ("badinv01.dat", BadHeader(HeaderName::Via), 400),
        ("clerr.dat", BodyTruncated, 400),
        ("ncl.dat", BadHeader(HeaderName::ContentLength), 400),
        ("scalar02.dat", BadHeader(HeaderName::CSeq), 400),
        ("scalarlg.dat", BadHeader(HeaderName::CSeq), 400),
        ("quotbal.dat", BadHeader(HeaderName::To), 400),
        ("ltgtruri.dat", BadRequestUri, 400),
        ("lwsruri.dat", BadRequestLine, 400),
        ("lwsstart.dat", BadRequestLine, 400),
        ("trws.dat", BadRequestLine, 400),
        ("escruri.dat", BadRequestUri, 400),
        ("baddate.dat", BadHeader(HeaderName::Date), 400),
        ("regbadct.dat", BadHeader(HeaderName::Contact), 400),
        ("badaspec.dat", BadHeader(HeaderName::To), 400),
        ("baddn.dat", BadHeader(HeaderName::From), 400),
        ("badvers.dat", VersionNotSupported, 505),
        ("mismatch01.dat", CSeqMethodMismatch, 400),
        ("mismatch02.dat", CSeqMethodMismatch, 400),
        ("bigcode.dat", BadStatusCode, 400),
        ("insuf.dat", MissingHeader(HeaderName::From), 400),
        ("multi01.dat", DuplicateHeader(HeaderName::From), 400),
        ("mcl01.dat", DuplicateHeader(HeaderName::ContentLength), 400),
        ("unkscm.dat", UnsupportedUriScheme, 416),
        ("novelsc.dat", UnsupportedUriScheme, 416),
    ];
    for &(file, kind, status) in cases {
        assert_eq!(outcome(file), Err(kind), "{file}");
        assert_eq!(kind.status(), status, "{file}");
        assert!(!kind.reason().is_empty());
    }
    assert_eq!(BadHeader(HeaderName::CSeq).reason(), "Malformed CSeq");
}

#[test]
fn wsinv_folding_compact_forms_and_odd_lws() {
    let d = load("wsinv.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.method(), Some(Method::Invite));
    assert_eq!(m.to().unwrap().tag(), Some(&b"1918181833n"[..]));
    assert_eq!(m.from().unwrap().tag(), Some(&b"98asjd8"[..]));
    assert_eq!(m.from().unwrap().display, br#""J Rosenberg \\\"""#);
    assert_eq!(m.max_forwards(), Some(68));
    let cseq = m.cseq().unwrap();
    assert_eq!((cseq.seq, cseq.method), (9, Method::Invite));
    let vias: Vec<_> = m.vias().map(Result::unwrap).collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(
        (vias[0].transport, vias[0].host, vias[0].branch),
        (&b"UDP"[..], &b"192.0.2.2"[..], Some(&b"390skdjuw"[..]))
    );
    assert_eq!(
        (vias[1].transport, vias[1].host),
        (&b"TCP"[..], &b"spindle.example.com"[..])
    );
    assert_eq!(vias[1].branch, Some(&b"z9hG4bK9ikj8"[..]));
    assert_eq!(vias[2].branch, Some(&b"z9hG4bK30239"[..]));
    let contacts: Vec<_> = m.contacts().map(Result::unwrap).collect();
    let Contact::Addr(c) = contacts[0] else {
        panic!()
    };
    assert_eq!(c.q, Some(330));
    assert!(c.addr.param(b"newparam").is_some());
    assert_eq!(m.body.len(), 150);
    assert_eq!(m.header(HeaderName::Subject), Some(&b""[..]));
    let nf = m.header_by_name(b"newfangledheader").unwrap();
    assert!(nf.starts_with(b"newfangled value") && nf.ends_with(b"continued newfangled value"));
    let route: Vec<_> = m.routes(HeaderName::Route).map(Result::unwrap).collect();
    assert_eq!(route[0].parsed_uri().host, b"services.example.com");
}

#[test]
fn intmeth_token_method_and_odd_uri() {
    let d = load("intmeth.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(
        m.method(),
        Some(Method::Other(
            b"!interesting-Method0123456789_*+`.%indeed'~"
        ))
    );
    let uri = Uri::parse(m.request_uri().unwrap()).unwrap();
    assert_eq!(uri.host, b"example.com");
    assert_eq!(
        uri.password,
        Some(&b"&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"[..])
    );
    assert_eq!(
        m.call_id(),
        Some(&br#"intmeth.word%ZK-!.*_+'@word`~)(><:\/"][?}{"#[..])
    );
    assert!(m.from().unwrap().display.starts_with(b"token1~`"));
}

#[test]
fn esc01_escapes_are_kept_and_decodable() {
    let d = load("esc01.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let ruri = Uri::parse(m.request_uri().unwrap()).unwrap();
    let mut b = [0u8; 64];
    let n = unescape_into(ruri.user.unwrap(), &mut b).unwrap();
    assert_eq!(&b[..n], b"sips:user@example.com");
    let to = m.to().unwrap().parsed_uri();
    let n = unescape_into(to.user.unwrap(), &mut b).unwrap();
    assert_eq!(&b[..n], b"user");
    assert_eq!(m.content_type().unwrap().subtype, b"sdp");
}

#[test]
fn escnull_registers_two_distinct_contacts() {
    let d = load("escnull.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.method(), Some(Method::Register));
    let users: Vec<Vec<u8>> = m
        .contacts()
        .map(|c| match c.unwrap() {
            Contact::Addr(a) => {
                let mut b = [0u8; 16];
                let n = unescape_into(a.addr.parsed_uri().user.unwrap(), &mut b).unwrap();
                b[..n].to_vec()
            }
            Contact::Star => panic!(),
        })
        .collect();
    assert_eq!(users, vec![b"\0".to_vec(), b"\0\0".to_vec()]);
    // The AoR must not be truncated at the NUL.
    let mut b = [0u8; 32];
    let n = unescape_into(m.to().unwrap().parsed_uri().user.unwrap(), &mut b).unwrap();
    assert_eq!(&b[..n], b"null-\0-null");
}

#[test]
fn esc02_method_is_not_register_and_has_two_contacts() {
    let d = load("esc02.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.method(), Some(Method::Other(b"RE%47IST%45R")));
    assert_ne!(m.method(), Some(Method::Register));
    assert_eq!(m.contacts().count(), 2);
    assert_eq!(
        m.header_by_name(b"C%6Fntact"),
        Some(&b"<sip:alias2@host2.example.com>"[..])
    );
}

#[test]
fn semiuri_user_part_holds_the_semicolon() {
    let d = load("semiuri.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let uri = Uri::parse(m.request_uri().unwrap()).unwrap();
    assert_eq!(uri.user, Some(&b"user;par=u%40example.net"[..]));
    assert_eq!(uri.host, b"example.com");
    assert!(uri.param(b"par").is_none());
    assert_eq!(m.tokens(HeaderName::Accept).count(), 6);
}

#[test]
fn dblreq_trailing_octets_are_ignored() {
    let d = load("dblreq.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.method(), Some(Method::Register));
    assert!(m.body.is_empty());
    assert!(m.len < d.len());
    assert_eq!(
        m.call_id(),
        Some(&b"dblreq.0ha0isndaksdj99sdfafnl3lk233412"[..])
    );
}

#[test]
fn lwsdisp_longreq_transports_and_friends() {
    let d = load("lwsdisp.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.from().unwrap().display, b"caller");

    let d = load("longreq.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.vias().count(), 34);
    assert!(m.call_id().unwrap().len() > 100);
    assert_eq!(m.top_via().unwrap().host, b"sip33.example.com");

    let d = load("transports.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let t: Vec<_> = m.vias().map(|v| v.unwrap().transport).collect();
    assert_eq!(t, vec![&b"UDP"[..], b"SCTP", b"TLS", b"UNKNOWN", b"TCP"]);

    let d = load("mpart01.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.body.len(), 553);
    assert!(m.body.contains(&0));
    assert_eq!(m.top_via().unwrap().rport, Some(None));

    let d = load("inv2543.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.top_via().unwrap().branch, None);
    assert_eq!(m.from().unwrap().tag(), None);
    assert_eq!(m.max_forwards(), None);
    assert!(!m.body.is_empty());
}

#[test]
fn responses_with_odd_reason_phrases() {
    let d = load("unreason.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let StartLine::Response { code, reason } = m.start else {
        panic!()
    };
    assert_eq!(code, 200);
    assert!(std::str::from_utf8(reason).unwrap().contains("простое"));

    let d = load("noreason.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(
        m.start,
        StartLine::Response {
            code: 100,
            reason: b""
        }
    );

    let d = load("bcast.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.vias().nth(1).unwrap().unwrap().host, b"255.255.255.255");
}

#[test]
fn register_contact_params_and_escaped_headers() {
    let d = load("cparam01.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let Contact::Addr(c) = m.contacts().next().unwrap().unwrap() else {
        panic!()
    };
    assert!(!c.addr.bracketed);
    assert!(c.addr.param(b"unknownparam").is_some());
    assert!(c.addr.parsed_uri().param(b"unknownparam").is_none());

    let d = load("cparam02.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let Contact::Addr(c) = m.contacts().next().unwrap().unwrap() else {
        panic!()
    };
    assert!(c.addr.param(b"unknownparam").is_none());
    assert!(c.addr.parsed_uri().param(b"unknownparam").is_some());

    let d = load("regescrt.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let Contact::Addr(c) = m.contacts().next().unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(
        c.addr.parsed_uri().headers,
        Some(&b"Route=%3Csip:sip.example.com%3E"[..])
    );

    let d = load("regaut01.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let a = m.authorizations().next().unwrap().unwrap();
    assert_eq!(a.scheme, b"NoOneKnowsThisScheme");
    assert_eq!(a.param(b"opaque-data"), Some(&b"here"[..]));

    let d = load("unksm2.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.to().unwrap().parsed_uri().scheme, Scheme::Other);
}

#[test]
fn valid_reject_messages_expose_what_the_logic_needs() {
    let d = load("bext01.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    let req: Vec<_> = m.tokens(HeaderName::Require).collect();
    assert_eq!(
        req,
        vec![&b"nothingSupportsThis"[..], b"nothingSupportsThisEither"]
    );
    assert_eq!(m.tokens(HeaderName::ProxyRequire).count(), 2);

    let d = load("zeromf.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.max_forwards(), Some(0));

    let d = load("invut.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert_eq!(m.content_type().unwrap().kind, b"application");
    assert_eq!(m.content_type().unwrap().subtype, b"unknownformat");

    let d = load("badbranch.dat");
    let m = Message::parse(&d, Framing::Datagram).unwrap();
    assert!(!m.top_via().unwrap().is_rfc3261_branch());
}
