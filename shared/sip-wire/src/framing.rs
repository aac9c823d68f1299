//! Stream framing for connection-oriented transports (RFC 3261 §18.3) and the
//! RFC 5626 §3.5.1 CRLF keep-alive.

use crate::error::Malformed;
use memchr::memmem;

/// What the front of a TCP receive buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFrame {
    /// A whole SIP message of this many octets (start line, headers, body).
    Message(usize),
    /// A double-CRLF keep-alive ping of this many octets: answer with a single CRLF pong
    /// (RFC 5626 §3.5.1).
    Ping(usize),
    /// Stray CRLFs before a start line, this many octets: skip them (RFC 3261 §7.5).
    Skip(usize),
    /// More octets are needed.
    Incomplete,
    /// The message would exceed the configured maximum size: close the connection.
    TooLarge,
    /// The framing is broken (missing, negative or conflicting Content-Length): the
    /// stream cannot be resynchronised, close the connection (RFC 3261 §18.3).
    Invalid,
}

/// Decide what the front of `buf` holds. `max_size` bounds headers plus body.
pub fn frame_stream(buf: &[u8], max_size: usize) -> StreamFrame {
    if buf.is_empty() {
        return StreamFrame::Incomplete;
    }
    if buf[0] == b'\r' || buf[0] == b'\n' {
        let n = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if buf.starts_with(b"\r\n\r\n") {
            return StreamFrame::Ping(4);
        }
        if n == buf.len() {
            // Could be the first half of a ping: wait for more.
            return if n >= 4 {
                StreamFrame::Skip(n)
            } else {
                StreamFrame::Incomplete
            };
        }
        return StreamFrame::Skip(n);
    }
    let head_end = match memmem::find(buf, b"\r\n\r\n") {
        Some(i) => i + 4,
        None => {
            return if buf.len() > max_size {
                StreamFrame::TooLarge
            } else {
                StreamFrame::Incomplete
            };
        }
    };
    let cl = match content_length(&buf[..head_end]) {
        Ok(Some(n)) => n,
        // RFC 3261 §18.3: Content-Length MUST be used with stream transports.
        Ok(None) | Err(Malformed) => return StreamFrame::Invalid,
    };
    let total = match head_end.checked_add(cl) {
        Some(t) => t,
        None => return StreamFrame::TooLarge,
    };
    if total > max_size {
        StreamFrame::TooLarge
    } else if buf.len() < total {
        StreamFrame::Incomplete
    } else {
        StreamFrame::Message(total)
    }
}

/// Scan a header block for Content-Length (long or compact `l` form). `Ok(None)` when
/// absent, `Err` when malformed or given twice with different values.
pub(crate) fn content_length(head: &[u8]) -> Result<Option<usize>, Malformed> {
    let mut found: Option<usize> = None;
    let mut pos = 0;
    while pos < head.len() {
        let end = memchr::memchr(b'\n', &head[pos..]).map_or(head.len(), |i| pos + i + 1);
        let line = &head[pos..end];
        pos = end;
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = trim(&line[..colon]);
        if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let v = trim(&line[colon + 1..]);
        if v.is_empty() || v.len() > 9 || !v.iter().all(u8::is_ascii_digit) {
            return Err(Malformed);
        }
        let n = v.iter().fold(0usize, |a, &d| a * 10 + (d - b'0') as usize);
        match found {
            Some(prev) if prev != n => return Err(Malformed),
            _ => found = Some(n),
        }
    }
    Ok(found)
}

fn trim(s: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = s.iter().position(|b| !is_ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ws(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_whole_and_partial_messages() {
        let m = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 3\r\n\r\nabcOPTIONS";
        assert_eq!(frame_stream(m, 4096), StreamFrame::Message(m.len() - 7));
        assert_eq!(frame_stream(&m[..20], 4096), StreamFrame::Incomplete);
        assert_eq!(frame_stream(&m[..45], 4096), StreamFrame::Incomplete);
        assert_eq!(frame_stream(m, 20), StreamFrame::TooLarge);
    }

    #[test]
    fn keepalive_ping_and_stray_crlf() {
        assert_eq!(frame_stream(b"\r\n\r\nINVITE", 100), StreamFrame::Ping(4));
        assert_eq!(frame_stream(b"\r\n", 100), StreamFrame::Incomplete);
        assert_eq!(frame_stream(b"\r\nINVITE", 100), StreamFrame::Skip(2));
    }

    #[test]
    fn broken_content_length_is_invalid() {
        // RFC 3261 §18.3: stream transports need Content-Length.
        assert_eq!(
            frame_stream(b"A sip:a SIP/2.0\r\n\r\n", 100),
            StreamFrame::Invalid
        );
        assert_eq!(
            frame_stream(b"A sip:a SIP/2.0\r\nl: -1\r\n\r\n", 100),
            StreamFrame::Invalid
        );
        assert_eq!(
            frame_stream(
                b"A sip:a SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\nab",
                100
            ),
            StreamFrame::Invalid
        );
    }
}
