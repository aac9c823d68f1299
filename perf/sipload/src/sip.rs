//! Reading the few things the generator needs from a SIP message, in place: no copy, no
//! allocation.

/// The message's head: its start line and headers, without the empty line and the body.
pub fn head(msg: &str) -> &str {
    msg.find("\r\n\r\n").map_or(msg, |i| &msg[..i])
}

/// The header lines (whole lines, name included) of the header `name` (case-insensitive;
/// the compact form is a separate name).
pub fn header_lines<'a>(msg: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    head(msg).split("\r\n").skip(1).filter(move |l| {
        l.split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
    })
}

/// The value of the first `name` header, trimmed.
pub fn header_value<'a>(msg: &'a str, name: &'a str) -> Option<&'a str> {
    header_lines(msg, name)
        .next()
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())
}

/// The value of the first `long` header, or of its compact form `short`.
pub fn header_either<'a>(msg: &'a str, long: &'a str, short: &'a str) -> Option<&'a str> {
    header_value(msg, long).or_else(|| header_value(msg, short))
}

/// The URI of a name-addr (`"Bob" <sip:bob@h>;tag=x` → `sip:bob@h`), or of an addr-spec
/// without its header parameters.
pub fn angle(v: &str) -> &str {
    match (v.find('<'), v.find('>')) {
        (Some(a), Some(b)) if b > a => &v[a + 1..b],
        _ => v.split(';').next().unwrap_or(v).trim(),
    }
}

/// The status code of a response, or the method of a request, from the start line.
pub fn start_line(msg: &str) -> (Option<u16>, Option<&str>) {
    let first = msg.split("\r\n").next().unwrap_or("");
    match first.strip_prefix("SIP/2.0 ") {
        Some(r) => (r.get(..3).and_then(|s| s.parse::<u16>().ok()), None),
        None => (None, first.split(' ').next()),
    }
}

/// The `tag` parameter of a From or To value.
pub fn tag(v: &str) -> Option<&str> {
    v.find(";tag=")
        .map(|i| v[i + 5..].split(';').next().unwrap_or(""))
}

/// FNV-1a: a fast 64-bit hash of a Call-ID or a CSeq (the generator's own tables; not
/// exposed to anyone who could choose colliding inputs against it).
pub fn hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &str = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\n\
                       Record-Route: <sip:p1;lr>\r\nrecord-route: <sip:p2;lr>\r\n\
                       To: <sip:bob@x>;tag=abc;x=1\r\ni: 1@h\r\nCSeq: 1 INVITE\r\n\r\n\
                       Via: not a header\r\n";

    #[test]
    fn headers_are_read_in_place() {
        assert_eq!(header_lines(MSG, "Record-Route").count(), 2);
        assert_eq!(header_either(MSG, "Call-ID", "i"), Some("1@h"));
        assert_eq!(
            header_value(MSG, "Via"),
            Some("SIP/2.0/UDP a;branch=z9hG4bK1")
        );
        // The body is not read as headers.
        assert_eq!(header_lines(MSG, "Via").count(), 1);
        assert_eq!(tag(header_value(MSG, "To").unwrap()), Some("abc"));
        assert_eq!(start_line(MSG), (Some(180), None));
        assert_eq!(
            start_line("NOTIFY sip:a SIP/2.0\r\n\r\n"),
            (None, Some("NOTIFY"))
        );
        assert_eq!(angle("\"B\" <sip:b@h;lr>;tag=1"), "sip:b@h;lr");
        assert_eq!(angle("sip:b@h;expires=5"), "sip:b@h");
        assert_ne!(hash("1 INVITE"), hash("2 INVITE"));
    }
}
