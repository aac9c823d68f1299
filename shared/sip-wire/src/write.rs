//! Building messages into a caller-owned buffer, without heap allocation.

use core::fmt;
use std::net::IpAddr;

use crate::headers::Via;
use crate::message::{HeaderName, Message};
use crate::scan::{CommaSplit, Params, trim};

/// Appends bytes to a borrowed buffer. Overflow is sticky: `finish` then returns `None`
/// and the caller sends nothing rather than a truncated message.
pub struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl<'b> Writer<'b> {
    pub fn new(buf: &'b mut [u8]) -> Self {
        Writer {
            buf,
            len: 0,
            overflow: false,
        }
    }

    pub fn put(&mut self, b: &[u8]) -> &mut Self {
        match self.buf.get_mut(self.len..self.len + b.len()) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(b);
                self.len += b.len();
            }
            _ => self.overflow = true,
        }
        self
    }

    pub fn put_str(&mut self, s: &str) -> &mut Self {
        self.put(s.as_bytes())
    }

    pub fn put_u64(&mut self, mut n: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.put(&tmp[i..])
    }

    pub fn put_ip(&mut self, ip: IpAddr) -> &mut Self {
        let _ = fmt::Write::write_fmt(self, format_args!("{ip}"));
        self
    }

    /// `Name: value CRLF`
    pub fn header(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.put_str(name).put(b": ").put(value).put(b"\r\n")
    }

    pub fn crlf(&mut self) -> &mut Self {
        self.put(b"\r\n")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// What was written so far.
    pub fn written(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The message length, or `None` if the buffer was too small.
    pub fn finish(&self) -> Option<usize> {
        if self.overflow { None } else { Some(self.len) }
    }

    pub fn request_line(&mut self, method: &[u8], uri: &[u8]) -> &mut Self {
        self.put(method).put(b" ").put(uri).put(b" SIP/2.0\r\n")
    }

    pub fn status_line(&mut self, code: u16, reason: &str) -> &mut Self {
        self.put(b"SIP/2.0 ")
            .put_u64(u64::from(code))
            .put(b" ")
            .put_str(reason)
            .put(b"\r\n")
    }

    /// Write a Via value with the server transport's additions: `received` when the
    /// sent-by host is not the packet's source address (RFC 3261 §18.2.1) or when rport
    /// is asked for, and `rport` filled with the source port (RFC 3581 §4).
    pub fn via_with_source(&mut self, via: &Via<'_>, src_ip: IpAddr, src_port: u16) -> &mut Self {
        let head = trim(&via.raw[..via.raw.len() - via.params.len()]);
        self.put(head);
        let mut add_received = via.rport.is_some() || !host_is_ip(via.host, src_ip);
        for p in Params::new(via.params).filter_map(Result::ok) {
            if p.name.eq_ignore_ascii_case(b"received") {
                add_received = true;
                continue;
            }
            self.put(b";").put(p.name);
            if p.name.eq_ignore_ascii_case(b"rport") && p.value.is_none() {
                self.put(b"=").put_u64(u64::from(src_port));
            } else if let Some(v) = p.value {
                self.put(b"=").put(v);
            }
        }
        if add_received {
            self.put(b";received=").put_ip(src_ip);
        }
        self
    }

    /// The head of a response to `req` (RFC 3261 §8.2.6.2): status line, Via fields (the
    /// top one with received/rport), From, To (with `to_tag` added when it has none and
    /// the response is not 100), Call-ID, CSeq. Header fields absent from the request are
    /// left out. The caller adds its own fields, Content-Length and the body.
    pub fn response_head(
        &mut self,
        req: &Message<'_>,
        code: u16,
        reason: &str,
        src_ip: IpAddr,
        src_port: u16,
        to_tag: Option<&[u8]>,
    ) -> &mut Self {
        let top = req
            .values(HeaderName::Via)
            .next()
            .and_then(|v| Via::parse(v).ok());
        let to_has_tag = req.to().is_some_and(|t| t.tag().is_some());
        self.response_head_with(
            req,
            top.as_ref(),
            to_has_tag,
            code,
            reason,
            src_ip,
            src_port,
            to_tag,
        )
    }

    /// `response_head` with the top Via and the To tag's presence already known (from
    /// `Message::check_request`), so nothing is parsed again.
    #[allow(clippy::too_many_arguments)]
    pub fn response_head_with(
        &mut self,
        req: &Message<'_>,
        top: Option<&Via<'_>>,
        to_has_tag: bool,
        code: u16,
        reason: &str,
        src_ip: IpAddr,
        src_port: u16,
        to_tag: Option<&[u8]>,
    ) -> &mut Self {
        self.status_line(code, reason);
        let mut first = true;
        for v in req.headers_named(HeaderName::Via) {
            if first {
                first = false;
                let (top_raw, rest) = split_first(v);
                match top {
                    Some(via) => {
                        self.put(b"Via: ")
                            .via_with_source(via, src_ip, src_port)
                            .crlf();
                    }
                    None => {
                        self.header("Via", top_raw);
                    }
                }
                if let Some(rest) = rest {
                    self.header("Via", rest);
                }
            } else {
                self.header("Via", v);
            }
        }
        if let Some(f) = req.header(HeaderName::From) {
            self.header("From", f);
        }
        if let Some(t) = req.header(HeaderName::To) {
            self.put(b"To: ").put(t);
            if let Some(tag) = to_tag
                && code > 100
                && !to_has_tag
            {
                self.put(b";tag=").put(tag);
            }
            self.crlf();
        }
        if let Some(c) = req.header(HeaderName::CallId) {
            self.header("Call-ID", c);
        }
        if let Some(c) = req.header(HeaderName::CSeq) {
            self.header("CSeq", c);
        }
        self
    }
}

impl fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes());
        if self.overflow {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// The first comma-separated element and the remainder after its comma.
pub fn split_first(v: &[u8]) -> (&[u8], Option<&[u8]>) {
    let mut it = CommaSplit::new(v);
    let first = it.next().unwrap_or(v);
    // CommaSplit trims; find where the first element ended in `v`.
    let off = first.as_ptr() as usize - v.as_ptr() as usize + first.len();
    let tail = &v[off..];
    match tail.iter().position(|&b| b == b',') {
        Some(c) => {
            let rest = trim(&tail[c + 1..]);
            (first, if rest.is_empty() { None } else { Some(rest) })
        }
        None => (first, None),
    }
}

fn host_is_ip(host: &[u8], ip: IpAddr) -> bool {
    let h = host
        .strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .unwrap_or(host);
    core::str::from_utf8(h)
        .ok()
        .and_then(|s| s.parse::<IpAddr>().ok())
        .is_some_and(|parsed| parsed == ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Framing;

    #[test]
    fn overflow_is_sticky() {
        let mut b = [0u8; 8];
        let mut w = Writer::new(&mut b);
        w.put(b"12345").put(b"6789").put(b"0");
        assert_eq!(w.finish(), None);
    }

    #[test]
    fn response_head_fills_received_and_rport() {
        let req = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP host.example.com;rport;branch=z9hG4bK1, SIP/2.0/UDP p\r\nVia: SIP/2.0/TCP q\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let m = Message::parse(req, Framing::Datagram).unwrap();
        let mut b = [0u8; 512];
        let mut w = Writer::new(&mut b);
        w.response_head(
            &m,
            200,
            "OK",
            "192.0.2.9".parse().unwrap(),
            5099,
            Some(b"tt"),
        );
        let s = String::from_utf8(w.written().to_vec()).unwrap();
        assert!(s.contains("Via: SIP/2.0/UDP host.example.com;rport=5099;branch=z9hG4bK1;received=192.0.2.9\r\nVia: SIP/2.0/UDP p\r\nVia: SIP/2.0/TCP q\r\n"), "{s}");
        assert!(s.contains("To: <sip:a@b>;tag=tt\r\n"));
    }

    #[test]
    fn no_received_when_sent_by_is_the_source() {
        let req = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let m = Message::parse(req, Framing::Datagram).unwrap();
        let mut b = [0u8; 512];
        let mut w = Writer::new(&mut b);
        w.via_with_source(&m.top_via().unwrap(), "192.0.2.9".parse().unwrap(), 5060);
        assert_eq!(w.written(), b"SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK1");
    }
}
