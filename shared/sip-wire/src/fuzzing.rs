//! Everything a node does with an untrusted message, as one function: the body of the
//! fuzz target and of the no-panic property tests.

use std::net::{IpAddr, Ipv4Addr};

use crate::{Contact, Framing, Message, Uri, Writer};

/// Frame, parse, check, read every typed header and write a reply for `data`, in both
/// framings. Must never panic.
pub fn exercise(data: &[u8]) {
    let _ = crate::frame_stream(data, 4096);
    for framing in [Framing::Datagram, Framing::Stream] {
        if let Ok(m) = Message::parse(data, framing) {
            let _ = m.check_request();
            let _ = m.check_response();
            let _ = (m.top_via(), m.top_via_lenient());
            for v in m.vias() {
                let _ = v;
            }
            for c in m.contacts() {
                if let Ok(Contact::Addr(a)) = c {
                    let _ = a.addr.parsed_uri().equivalent(&a.addr.parsed_uri());
                }
            }
            let _ = (
                m.from(),
                m.to(),
                m.cseq(),
                m.expires(),
                m.event(),
                m.content_type(),
            );
            for a in m.authorizations() {
                let _ = a.map(|a| a.params().count());
            }
            if let Some(u) = m.request_uri() {
                let _ = Uri::parse(u);
            }
            let mut out = [0u8; 1024];
            let mut w = Writer::new(&mut out);
            w.response_head(
                &m,
                400,
                "Bad",
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                5060,
                Some(b"x"),
            );
        }
    }
    if let Some(m) = Message::parse_for_reject(data) {
        let _ = m.top_via_lenient();
    }
}
