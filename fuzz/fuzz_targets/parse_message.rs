//! `cargo fuzz run parse_message`: every parser entry point on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sip_wire::{Contact, Framing, Message, Uri, Writer};

fuzz_target!(|data: &[u8]| {
    let _ = sip_wire::frame_stream(data, 4096);
    for framing in [Framing::Datagram, Framing::Stream] {
        if let Ok(m) = Message::parse(data, framing) {
            let _ = m.check_request();
            let _ = m.check_response();
            for v in m.vias() {
                let _ = v;
            }
            for c in m.contacts() {
                if let Ok(Contact::Addr(a)) = c {
                    let _ = a.addr.parsed_uri();
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
            if let Some(u) = m.request_uri() {
                let _ = Uri::parse(u);
            }
            let mut out = [0u8; 1024];
            let mut w = Writer::new(&mut out);
            w.response_head(
                &m,
                400,
                "Bad",
                "127.0.0.1".parse().unwrap(),
                5060,
                Some(b"x"),
            );
        }
    }
});
