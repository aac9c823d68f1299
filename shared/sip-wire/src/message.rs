//! Message framing: start line, header fields (folding, compact forms, case-insensitive
//! names) and body, all borrowed from the receive buffer.

use memchr::memchr;
use nom::{
    IResult, Parser,
    bytes::complete::{tag, tag_no_case, take_while1},
    character::complete::digit1,
};

use crate::error::ErrorKind;
use crate::scan::{is_token, trim};

/// Most header fields kept per message; more is a 400.
pub const MAX_HEADERS: usize = 96;

macro_rules! header_names {
    ($( $v:ident = $long:literal $(, $short:literal)? ;)*) => {
        /// Header field names this node understands; everything else is `Other`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum HeaderName { $($v,)* Other }

        const KNOWN: usize = HeaderName::Other as usize;

        impl HeaderName {
            /// Classify a header name (case-insensitive, compact forms included).
            pub fn from_bytes(n: &[u8]) -> HeaderName {
                let Some(&first) = n.first() else { return HeaderName::Other };
                let first = first.to_ascii_lowercase();
                $(
                    if ($long.as_bytes()[0].to_ascii_lowercase() == first && n.len() == $long.len() && n.eq_ignore_ascii_case($long.as_bytes()))
                        $(|| (n.len() == 1 && $short.as_bytes()[0] == first))?
                    {
                        return HeaderName::$v;
                    }
                )*
                HeaderName::Other
            }

            /// The canonical long form.
            pub fn as_str(self) -> &'static str {
                match self { $(HeaderName::$v => $long,)* HeaderName::Other => "" }
            }

            pub(crate) fn bad_reason(self) -> &'static str {
                match self { $(HeaderName::$v => concat!("Malformed ", $long),)* HeaderName::Other => "Malformed Header" }
            }

            pub(crate) fn missing_reason(self) -> &'static str {
                match self { $(HeaderName::$v => concat!("Missing ", $long),)* HeaderName::Other => "Missing Header" }
            }

            pub(crate) fn duplicate_reason(self) -> &'static str {
                match self { $(HeaderName::$v => concat!("Multiple ", $long, " Values"),)* HeaderName::Other => "Duplicate Header" }
            }
        }
    };
}

header_names! {
    Via = "Via", "v";
    From = "From", "f";
    To = "To", "t";
    CallId = "Call-ID", "i";
    CSeq = "CSeq";
    MaxForwards = "Max-Forwards";
    Contact = "Contact", "m";
    Expires = "Expires";
    MinExpires = "Min-Expires";
    Route = "Route";
    RecordRoute = "Record-Route";
    Path = "Path";
    ContentLength = "Content-Length", "l";
    ContentType = "Content-Type", "c";
    ContentEncoding = "Content-Encoding", "e";
    Event = "Event", "o";
    AllowEvents = "Allow-Events", "u";
    Allow = "Allow";
    Accept = "Accept";
    Supported = "Supported", "k";
    Require = "Require";
    ProxyRequire = "Proxy-Require";
    Unsupported = "Unsupported";
    SipETag = "SIP-ETag";
    SipIfMatch = "SIP-If-Match";
    SubscriptionState = "Subscription-State";
    Authorization = "Authorization";
    ProxyAuthorization = "Proxy-Authorization";
    WwwAuthenticate = "WWW-Authenticate";
    ProxyAuthenticate = "Proxy-Authenticate";
    Date = "Date";
    UserAgent = "User-Agent";
    Server = "Server";
    Subject = "Subject", "s";
    Timestamp = "Timestamp";
    RetryAfter = "Retry-After";
    ReferTo = "Refer-To", "r";
}

/// RFC 3261 §7.1 methods (case-sensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method<'a> {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Subscribe,
    Notify,
    Publish,
    Refer,
    Message,
    Info,
    Prack,
    Update,
    Other(&'a [u8]),
}

impl<'a> Method<'a> {
    pub fn from_bytes(m: &'a [u8]) -> Method<'a> {
        match m {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"REGISTER" => Method::Register,
            b"OPTIONS" => Method::Options,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"PUBLISH" => Method::Publish,
            b"REFER" => Method::Refer,
            b"MESSAGE" => Method::Message,
            b"INFO" => Method::Info,
            b"PRACK" => Method::Prack,
            b"UPDATE" => Method::Update,
            other => Method::Other(other),
        }
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Method::Invite => b"INVITE",
            Method::Ack => b"ACK",
            Method::Bye => b"BYE",
            Method::Cancel => b"CANCEL",
            Method::Register => b"REGISTER",
            Method::Options => b"OPTIONS",
            Method::Subscribe => b"SUBSCRIBE",
            Method::Notify => b"NOTIFY",
            Method::Publish => b"PUBLISH",
            Method::Refer => b"REFER",
            Method::Message => b"MESSAGE",
            Method::Info => b"INFO",
            Method::Prack => b"PRACK",
            Method::Update => b"UPDATE",
            Method::Other(m) => m,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    Request { method: Method<'a>, uri: &'a [u8] },
    Response { code: u16, reason: &'a [u8] },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    name: HeaderName,
    name_len: u16,
    name_start: u16,
    val_start: u16,
    val_len: u16,
}

const EMPTY: Slot = Slot {
    name: HeaderName::Other,
    name_len: 0,
    name_start: 0,
    val_start: 0,
    val_len: 0,
};

/// One header field as it appears in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: HeaderName,
    /// The name as written (e.g. `v`, `MaX-fOrWaRdS`).
    pub raw_name: &'a [u8],
    /// The value, trimmed; folded lines keep their CRLF + WSP inside.
    pub value: &'a [u8],
}

/// A parsed SIP message borrowing from its buffer. Header values are framed here and
/// parsed into typed values on access (see `headers`).
#[derive(Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    pub start: StartLine<'a>,
    /// The start line without its CRLF.
    pub start_line: &'a [u8],
    slots: [Slot; MAX_HEADERS],
    count: u8,
    first: [u8; KNOWN],
    /// The body framed by Content-Length (or the rest of the datagram without one).
    pub body: &'a [u8],
    /// Octets of the message proper (start line to end of body): trailing octets of a
    /// datagram beyond it are ignored (RFC 3261 §18.3).
    pub len: usize,
}

impl core::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Message")
            .field("start", &self.start)
            .field("headers", &self.headers().collect::<Vec<_>>())
            .field("body_len", &self.body.len())
            .finish()
    }
}

fn sip_version(i: &[u8]) -> IResult<&[u8], (&[u8], &[u8])> {
    let (i, _) = tag_no_case(&b"SIP/"[..]).parse(i)?;
    let (i, (maj, _, min)) = (digit1, tag(&b"."[..]), digit1).parse(i)?;
    Ok((i, (maj, min)))
}

fn is_version_2_0(maj: &[u8], min: &[u8]) -> bool {
    maj == b"2" && min == b"0"
}

/// Request-Line = Method SP Request-URI SP SIP-Version (RFC 3261 §7.1). Exactly one SP
/// between elements; the URI cannot contain whitespace.
fn request_line(line: &[u8]) -> Result<StartLine<'_>, ErrorKind> {
    let (rest, method) = take_while1::<_, _, nom::error::Error<&[u8]>>(is_token)
        .parse(line)
        .map_err(|_| ErrorKind::BadStartLine)?;
    let rest = rest.strip_prefix(b" ").ok_or(ErrorKind::BadRequestLine)?;
    let sp = memchr::memrchr(b' ', rest).ok_or(ErrorKind::BadRequestLine)?;
    let (uri, version) = (&rest[..sp], &rest[sp + 1..]);
    if uri.is_empty() || version.is_empty() {
        return Err(ErrorKind::BadRequestLine);
    }
    match sip_version(version) {
        Ok((b"", (maj, min))) => {
            if !is_version_2_0(maj, min) {
                return Err(ErrorKind::VersionNotSupported);
            }
        }
        _ => return Err(ErrorKind::BadRequestLine),
    }
    if uri.iter().any(|&b| b == b' ' || b == b'\t') {
        return Err(ErrorKind::BadRequestLine);
    }
    Ok(StartLine::Request {
        method: Method::from_bytes(method),
        uri,
    })
}

/// Status-Line = SIP-Version SP Status-Code SP Reason-Phrase (RFC 3261 §7.2).
fn status_line(line: &[u8]) -> Result<StartLine<'_>, ErrorKind> {
    let (rest, (maj, min)) = sip_version(line).map_err(|_| ErrorKind::BadStartLine)?;
    if !is_version_2_0(maj, min) {
        return Err(ErrorKind::VersionNotSupported);
    }
    let rest = rest.strip_prefix(b" ").ok_or(ErrorKind::BadStartLine)?;
    let (rest, code) =
        digit1::<_, nom::error::Error<&[u8]>>(rest).map_err(|_| ErrorKind::BadStatusCode)?;
    if code.len() != 3 {
        return Err(ErrorKind::BadStatusCode);
    }
    let code = crate::scan::parse_u64(code, 999).ok_or(ErrorKind::BadStatusCode)? as u16;
    if !(100..=699).contains(&code) {
        return Err(ErrorKind::BadStatusCode);
    }
    // The SP before an empty reason phrase is required but tolerated when missing.
    let reason = rest.strip_prefix(b" ").unwrap_or(rest);
    Ok(StartLine::Response { code, reason })
}

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A datagram: the body is Content-Length octets, or the rest of the datagram when
    /// Content-Length is absent; trailing octets are ignored (RFC 3261 §18.3).
    Datagram,
    /// A message already framed by `frame_stream`: Content-Length is authoritative.
    Stream,
}

impl<'a> Message<'a> {
    /// Parse one message. Only the framing and the start line are checked here; header
    /// values are checked when read (see `Message::check_request`).
    #[inline]
    pub fn parse(buf: &'a [u8], framing: Framing) -> Result<Message<'a>, ErrorKind> {
        Self::parse_inner(buf, framing, false)
    }

    /// Frame the header fields of a request that `parse` rejected, so that a stateless
    /// reject can copy its Via, From, To, Call-ID and CSeq (RFC 3261 §8.2.6.2). The start
    /// line and body framing are not checked; `None` when even the header block is
    /// unreadable or the message is a response.
    pub fn parse_for_reject(buf: &'a [u8]) -> Option<Message<'a>> {
        let lead = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if buf.len() >= lead + 4 && buf[lead..lead + 4].eq_ignore_ascii_case(b"SIP/") {
            return None;
        }
        Self::parse_inner(buf, Framing::Datagram, true).ok()
    }

    #[inline(always)]
    fn parse_inner(
        buf: &'a [u8],
        framing: Framing,
        lenient: bool,
    ) -> Result<Message<'a>, ErrorKind> {
        // Offsets are 16-bit: a message is at most 65535 octets (the largest UDP payload
        // and the largest configurable message size); octets past that are not looked at.
        let buf = &buf[..buf.len().min(u16::MAX as usize)];
        // RFC 3261 §7.5: ignore CRLFs before the start line.
        let lead = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let mut pos = lead;
        let line_end = memchr(b'\n', &buf[pos..]).ok_or(ErrorKind::Truncated)? + pos;
        let start_line = strip_cr(&buf[pos..line_end]);
        let start = if start_line.len() >= 4 && start_line[..4].eq_ignore_ascii_case(b"SIP/") {
            status_line(start_line)
        } else {
            request_line(start_line)
        };
        let start = match start {
            Ok(s) => s,
            Err(_) if lenient => StartLine::Request {
                method: Method::Other(b""),
                uri: b"",
            },
            Err(e) => return Err(e),
        };
        pos = line_end + 1;

        let mut msg = Message {
            buf,
            start,
            start_line,
            slots: [EMPTY; MAX_HEADERS],
            count: 0,
            first: [u8::MAX; KNOWN],
            body: &[],
            len: 0,
        };
        let mut last: Option<usize> = None;
        loop {
            let nl = match memchr(b'\n', &buf[pos..]) {
                Some(k) => k + pos,
                // A datagram whose header block runs to its end without the empty line:
                // take the end of the datagram as the end of the headers.
                None if framing == Framing::Datagram && pos < buf.len() => buf.len(),
                None if framing == Framing::Datagram => {
                    pos = buf.len();
                    break;
                }
                None => return Err(ErrorKind::Truncated),
            };
            if nl == buf.len() {
                // Last line of a datagram without a terminating LF.
                let line = strip_cr(&buf[pos..nl]);
                if line.is_empty() {
                    pos = buf.len();
                    break;
                }
            }
            let line = strip_cr(&buf[pos..nl]);
            if line.is_empty() {
                pos = nl + 1;
                break;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                // Folded continuation (RFC 3261 §7.3.1): extend the previous value.
                let li = last.ok_or(ErrorKind::BadHeaderLine)?;
                let s = &mut msg.slots[li];
                let content_end = pos + line.len();
                if trim(line).is_empty() {
                    // whitespace-only continuation: nothing to add
                } else if s.val_len == 0 {
                    let lead_ws = line
                        .iter()
                        .take_while(|&&b| b == b' ' || b == b'\t')
                        .count();
                    s.val_start = (pos + lead_ws) as u16;
                    s.val_len = (content_end - pos - lead_ws) as u16;
                } else {
                    s.val_len = (content_end - s.val_start as usize) as u16;
                }
                pos = (nl + 1).min(buf.len());
                continue;
            }
            let colon = memchr(b':', line).ok_or(ErrorKind::BadHeaderLine)?;
            let raw_name = trim_ws_end(&line[..colon]);
            if raw_name.is_empty() || !raw_name.iter().all(|&b| is_token(b)) {
                return Err(ErrorKind::BadHeaderLine);
            }
            let value = &line[colon + 1..];
            let lead_ws = value
                .iter()
                .take_while(|&&b| b == b' ' || b == b'\t')
                .count();
            let vstart = pos + colon + 1 + lead_ws;
            let vlen = trim_ws_end(&value[lead_ws..]).len();
            let n = msg.count as usize;
            if n == MAX_HEADERS {
                return Err(ErrorKind::TooManyHeaders);
            }
            let name = HeaderName::from_bytes(raw_name);
            msg.slots[n] = Slot {
                name,
                name_len: raw_name.len().min(u16::MAX as usize) as u16,
                name_start: pos as u16,
                val_start: vstart as u16,
                val_len: vlen as u16,
            };
            if name != HeaderName::Other && msg.first[name as usize] == u8::MAX {
                msg.first[name as usize] = n as u8;
            }
            msg.count += 1;
            last = Some(n);
            pos = (nl + 1).min(buf.len());
            if nl == buf.len() {
                break;
            }
        }
        // Trim trailing whitespace of folded values.
        for s in &mut msg.slots[..msg.count as usize] {
            let v = &buf[s.val_start as usize..s.val_start as usize + s.val_len as usize];
            s.val_len = crate::scan::trim(v).len() as u16;
            let lead = v.len() - v.iter().skip_while(|&&b| crate::scan::is_lws(b)).count();
            if lead > 0 {
                s.val_start += lead as u16;
                s.val_len = crate::scan::trim(&v[lead..]).len() as u16;
            }
        }
        let rest = &buf[pos..];
        let cl = match msg.content_length() {
            Ok(cl) => cl,
            Err(_) if lenient => None,
            Err(e) => return Err(e),
        };
        msg.body = match (cl, framing) {
            (Some(n), _) if n > rest.len() && lenient => rest,
            (Some(n), _) => {
                if n > rest.len() {
                    return Err(ErrorKind::BodyTruncated);
                }
                &rest[..n]
            }
            (None, Framing::Datagram) => rest,
            (None, Framing::Stream) => &rest[..0],
        };
        msg.len = pos + msg.body.len();
        Ok(msg)
    }

    /// Content-Length, checked: every occurrence must be a valid number and agree.
    pub fn content_length(&self) -> Result<Option<usize>, ErrorKind> {
        let mut found = None;
        for h in self.headers_named(HeaderName::ContentLength) {
            let n = crate::scan::parse_u64(h, 1 << 30)
                .ok_or(ErrorKind::BadHeader(HeaderName::ContentLength))?;
            match found {
                Some(p) if p != n => {
                    return Err(ErrorKind::DuplicateHeader(HeaderName::ContentLength));
                }
                _ => found = Some(n),
            }
        }
        Ok(found.map(|n| n as usize))
    }

    /// The whole message buffer as given to `parse`.
    pub fn buffer(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<Method<'a>> {
        match self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The octets of the message proper (start line to end of body).
    pub fn as_bytes(&self) -> &'a [u8] {
        &self.buf[..self.len.min(self.buf.len())]
    }

    pub fn request_uri(&self) -> Option<&'a [u8]> {
        match self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    fn header_at(&self, s: &Slot) -> Header<'a> {
        let buf = self.buf;
        Header {
            name: s.name,
            raw_name: &buf[s.name_start as usize..s.name_start as usize + s.name_len as usize],
            value: &buf[s.val_start as usize..s.val_start as usize + s.val_len as usize],
        }
    }

    /// All header fields in order.
    pub fn headers(&self) -> impl Iterator<Item = Header<'a>> + '_ {
        self.slots[..self.count as usize]
            .iter()
            .map(|s| self.header_at(s))
    }

    pub fn header_count(&self) -> usize {
        self.count as usize
    }

    /// Values of every field with this name, in order (one per header line).
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &'a [u8]> + '_ {
        let from = if name == HeaderName::Other {
            self.count as usize
        } else {
            match self.first[name as usize] {
                u8::MAX => self.count as usize,
                i => i as usize,
            }
        };
        self.slots[from..self.count as usize]
            .iter()
            .filter(move |s| s.name == name)
            .map(|s| &self.buf[s.val_start as usize..s.val_start as usize + s.val_len as usize])
    }

    /// The first value of a header field.
    pub fn header(&self, name: HeaderName) -> Option<&'a [u8]> {
        match self.first.get(name as usize) {
            Some(&i) if i != u8::MAX => {
                let s = &self.slots[i as usize];
                Some(&self.buf[s.val_start as usize..s.val_start as usize + s.val_len as usize])
            }
            _ => None,
        }
    }

    /// Fields not in `HeaderName`, looked up by name (case-insensitive).
    pub fn header_by_name(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.headers()
            .find(|h| h.raw_name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Comma-separated elements across every field with this name (Via, Contact, Route,
    /// Allow, Supported ...).
    pub fn values(&self, name: HeaderName) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.headers_named(name)
            .flat_map(crate::scan::CommaSplit::new)
    }
}

fn strip_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn trim_ws_end(s: &[u8]) -> &[u8] {
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &s[..end]
}
