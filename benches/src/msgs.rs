//! Realistic SIP messages used by the benchmarks, as a softphone, a proxy and a PBX would
//! send them over UDP. Every message here parses and passes `check_request` /
//! `check_response` (asserted by the benchmarks before they measure anything).

/// A typical softphone REGISTER refresh (~450 bytes): rport/branch Via, Contact with
/// `expires` and `+sip.instance`, Expires, Allow, Supported, User-Agent.
pub const REGISTER: &str = concat!(
    "REGISTER sip:example.com SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK776asdhds\r\n",
    "Max-Forwards: 70\r\n",
    "Contact: <sip:alice@192.0.2.10:5062>;expires=3600",
    ";+sip.instance=\"<urn:uuid:2a8c6f1e-4b3d-4e7a-9c15-0d6b8f2e1a37>\"\r\n",
    "To: <sip:alice@example.com>\r\n",
    "From: <sip:alice@example.com>;tag=5c1f9a2e\r\n",
    "Call-ID: a84b4c76e66710@192.0.2.10\r\n",
    "CSeq: 2 REGISTER\r\n",
    "Expires: 3600\r\n",
    "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n",
    "Supported: path, outbound\r\n",
    "User-Agent: Linphone/5.2.0\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

macro_rules! invite_sdp {
    () => {
        concat!(
            "v=0\r\n",
            "o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n",
            "s=-\r\n",
            "c=IN IP4 192.0.2.10\r\n",
            "t=0 0\r\n",
            "m=audio 49170 RTP/AVP 0 8 101\r\n",
            "a=rtpmap:0 PCMU/8000\r\n",
            "a=rtpmap:8 PCMA/8000\r\n",
            "a=rtpmap:101 telephone-event/8000\r\n",
            "a=fmtp:101 0-15\r\n",
            "a=ptime:20\r\n",
            "a=sendrecv\r\n",
        )
    };
}

/// SDP offer carried by [`INVITE`].
pub const INVITE_SDP: &str = invite_sdp!();

/// An INVITE as a proxy forwards it: two Vias, Record-Route and Route, SDP offer
/// (Content-Length = `INVITE_SDP.len()`, checked by the benchmarks).
pub const INVITE: &str = concat!(
    "INVITE sip:bob@198.51.100.20:5060;transport=udp SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-px-77a1b2c3d4\r\n",
    "Via: SIP/2.0/UDP 192.0.2.10:5062;received=192.0.2.10;rport=5062",
    ";branch=z9hG4bK-524287-1---a1b2c3d4e5f60718\r\n",
    "Max-Forwards: 69\r\n",
    "Record-Route: <sip:203.0.113.5;lr>\r\n",
    "Route: <sip:198.51.100.1;lr>\r\n",
    "Contact: <sip:alice@192.0.2.10:5062;transport=UDP>\r\n",
    "To: <sip:bob@example.com>\r\n",
    "From: \"Alice\" <sip:alice@example.com>;tag=9fxced76sl\r\n",
    "Call-ID: N2EzZjllMmIxYzRkNWU2Zjc4@192.0.2.10\r\n",
    "CSeq: 1 INVITE\r\n",
    "Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE\r\n",
    "Supported: replaces, timer\r\n",
    "User-Agent: Zoiper rv2.10.20.3\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 238\r\n",
    "\r\n",
    invite_sdp!(),
);

/// A presence SUBSCRIBE (Event, Accept, Expires).
pub const SUBSCRIBE: &str = concat!(
    "SUBSCRIBE sip:bob@example.com SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-524287-1---5e6f7a8b9c0d1e2f\r\n",
    "Max-Forwards: 70\r\n",
    "Contact: <sip:alice@192.0.2.10:5062;transport=UDP>\r\n",
    "To: <sip:bob@example.com>\r\n",
    "From: <sip:alice@example.com>;tag=4b5c6d7e\r\n",
    "Call-ID: OWQ4YzdiNmE1ZjRlM2QyYzFi@192.0.2.10\r\n",
    "CSeq: 1 SUBSCRIBE\r\n",
    "Expires: 3600\r\n",
    "Event: presence\r\n",
    "Accept: application/pidf+xml, application/xpidf+xml, multipart/related\r\n",
    "Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE\r\n",
    "Supported: eventlist\r\n",
    "User-Agent: Zoiper rv2.10.20.3\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

macro_rules! ok_invite_sdp {
    () => {
        concat!(
            "v=0\r\n",
            "o=bob 1827364519 1827364519 IN IP4 198.51.100.20\r\n",
            "s=-\r\n",
            "c=IN IP4 198.51.100.20\r\n",
            "t=0 0\r\n",
            "m=audio 31000 RTP/AVP 0 101\r\n",
            "a=rtpmap:0 PCMU/8000\r\n",
            "a=rtpmap:101 telephone-event/8000\r\n",
            "a=fmtp:101 0-16\r\n",
            "a=ptime:20\r\n",
            "a=sendrecv\r\n",
        )
    };
}

/// SDP answer carried by [`OK_INVITE`].
pub const OK_INVITE_SDP: &str = ok_invite_sdp!();

/// The 200 OK answering [`INVITE`] (Record-Route, Contact, SDP answer; Content-Length =
/// `OK_INVITE_SDP.len()`, checked by the benchmarks).
pub const OK_INVITE: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-px-77a1b2c3d4\r\n",
    "Via: SIP/2.0/UDP 192.0.2.10:5062;received=192.0.2.10;rport=5062",
    ";branch=z9hG4bK-524287-1---a1b2c3d4e5f60718\r\n",
    "Record-Route: <sip:203.0.113.5;lr>\r\n",
    "Contact: <sip:bob@198.51.100.20:5060;transport=udp>\r\n",
    "To: <sip:bob@example.com>;tag=as5f3c2e1d\r\n",
    "From: \"Alice\" <sip:alice@example.com>;tag=9fxced76sl\r\n",
    "Call-ID: N2EzZjllMmIxYzRkNWU2Zjc4@192.0.2.10\r\n",
    "CSeq: 1 INVITE\r\n",
    "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, NOTIFY, REFER, INFO\r\n",
    "Supported: replaces, timer\r\n",
    "Server: Asterisk PBX 20.5.0\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 218\r\n",
    "\r\n",
    ok_invite_sdp!(),
);

/// An OPTIONS keep-alive / capability probe.
pub const OPTIONS: &str = concat!(
    "OPTIONS sip:example.com SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK-524287-1---0f1e2d3c4b5a6978\r\n",
    "Max-Forwards: 70\r\n",
    "Contact: <sip:alice@192.0.2.10:5062;transport=UDP>\r\n",
    "To: <sip:example.com>\r\n",
    "From: <sip:alice@example.com>;tag=7d6e5f4a\r\n",
    "Call-ID: YjVhNjk3ODhjMWQyZTNmNDA1@192.0.2.10\r\n",
    "CSeq: 1 OPTIONS\r\n",
    "Accept: application/sdp\r\n",
    "User-Agent: Zoiper rv2.10.20.3\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

/// A REGISTER like [`REGISTER`] for `user@example.com` whose CSeq is a zero-padded
/// 10-digit field, so that a benchmark can bump it in place. Returns the message and the
/// offset of the CSeq digits.
pub fn register_for(user: &str) -> (Vec<u8>, usize) {
    let m = REGISTER
        .replace("alice", user)
        .replace("CSeq: 2 REGISTER", "CSeq: 0000000001 REGISTER");
    let at = m.find("CSeq: ").expect("CSeq header") + "CSeq: ".len();
    (m.into_bytes(), at)
}

/// Writes `n` into the 10 ASCII digits at `field` (zero-padded).
pub fn put_cseq(field: &mut [u8], mut n: u32) {
    for d in field[..10].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sip_wire::{Framing, Message};

    #[test]
    fn messages_are_valid() {
        for m in [REGISTER, INVITE, SUBSCRIBE, OPTIONS] {
            let msg = Message::parse(m.as_bytes(), Framing::Datagram).unwrap();
            msg.check_request().unwrap();
            assert_eq!(msg.len, m.len());
        }
        let ok = Message::parse(OK_INVITE.as_bytes(), Framing::Datagram).unwrap();
        ok.check_response().unwrap();
        assert_eq!(ok.body, OK_INVITE_SDP.as_bytes());
        let inv = Message::parse(INVITE.as_bytes(), Framing::Datagram).unwrap();
        assert_eq!(inv.body, INVITE_SDP.as_bytes());
        assert!((400..=500).contains(&REGISTER.len()), "{}", REGISTER.len());
    }

    #[test]
    fn cseq_field_is_rewritable() {
        let (mut m, at) = register_for("u00042");
        put_cseq(&mut m[at..], 4_000_000_123);
        let msg = Message::parse(&m, Framing::Datagram).unwrap();
        assert_eq!(msg.cseq().unwrap().seq, 4_000_000_123);
        assert_eq!(msg.to().unwrap().uri, b"sip:u00042@example.com");
    }
}
