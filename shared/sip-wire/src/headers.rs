//! Typed header values, parsed on access from the framed message.

use crate::error::Malformed;
use nom::{IResult, Parser, bytes::complete::take_while1};

use crate::error::ErrorKind;
use crate::message::{HeaderName, Message, Method};
use crate::scan::{
    self, CommaSplit, Param, Params, find_byte, is_lws, is_token, quoted_string, sws, token, trim,
};
use crate::uri::Uri;

// ---------------------------------------------------------------------------------- Via

/// One Via value (RFC 3261 §20.42, §18.2.1; RFC 3581 rport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// The protocol version as written (normally `2.0`).
    pub version: &'a [u8],
    pub transport: &'a [u8],
    pub host: &'a [u8],
    pub port: Option<u16>,
    /// `;param...` as written.
    pub params: &'a [u8],
    pub branch: Option<&'a [u8]>,
    pub received: Option<&'a [u8]>,
    /// `Some(None)`: `rport` without a value (the client asks for it to be filled).
    pub rport: Option<Option<u16>>,
    pub maddr: Option<&'a [u8]>,
    pub ttl: Option<u8>,
    /// The whole value as written.
    pub raw: &'a [u8],
}

fn slash(i: &[u8]) -> Result<&[u8], Malformed> {
    let i = sws(i);
    let i = i.strip_prefix(b"/").ok_or(Malformed)?;
    Ok(sws(i))
}

/// (rest, host, port)
type HostPort<'a> = (&'a [u8], &'a [u8], Option<u16>);

fn host_port(i: &[u8]) -> Result<HostPort<'_>, Malformed> {
    let (rest, host) = if i.first() == Some(&b'[') {
        let close = find_byte(b']', i).ok_or(Malformed)?;
        (&i[close + 1..], &i[..close + 1])
    } else {
        let (r, h) = take_while1::<_, _, nom::error::Error<&[u8]>>(|b: u8| {
            b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'
        })
        .parse(i)
        .map_err(|_| Malformed)?;
        (r, h)
    };
    let r = sws(rest);
    if let Some(r) = r.strip_prefix(b":") {
        let r = sws(r);
        let (r, digits) = nom::character::complete::digit1::<_, nom::error::Error<&[u8]>>(r)
            .map_err(|_| Malformed)?;
        let port = scan::parse_u64(digits, 65535).ok_or(Malformed)? as u16;
        Ok((r, host, Some(port)))
    } else {
        Ok((rest, host, None))
    }
}

impl<'a> Via<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Via<'a>, Malformed> {
        Self::parse_inner(raw, true)
    }

    /// Like `parse`, but malformed parameters are skipped instead of failing: enough to
    /// send a 400 back to the sent-by of a request whose Via is broken (RFC 4475 §3.1.2.1).
    pub fn parse_lenient(raw: &'a [u8]) -> Result<Via<'a>, Malformed> {
        Self::parse_inner(raw, false)
    }

    fn parse_inner(raw: &'a [u8], strict: bool) -> Result<Via<'a>, Malformed> {
        let raw = trim(raw);
        let (i, name) = token(raw).map_err(|_| Malformed)?;
        if !name.eq_ignore_ascii_case(b"SIP") {
            return Err(Malformed);
        }
        let i = slash(i)?;
        let (i, version) = token(i).map_err(|_| Malformed)?;
        let i = slash(i)?;
        let (i, transport) = token(i).map_err(|_| Malformed)?;
        let i = sws(i);
        if i.len() == raw.len() {
            return Err(Malformed);
        }
        let (params, host, port) = host_port(i)?;
        let params = sws(params);
        let mut v = Via {
            version,
            transport,
            host,
            port,
            params,
            branch: None,
            received: None,
            rport: None,
            maddr: None,
            ttl: None,
            raw,
        };
        for p in Params::new(params) {
            let p = match p {
                Ok(p) => p,
                Err(e) if strict => return Err(e),
                Err(_) => break,
            };
            let val = p.value;
            if p.name.eq_ignore_ascii_case(b"branch") {
                v.branch = Some(val.ok_or(Malformed)?);
            } else if p.name.eq_ignore_ascii_case(b"received") {
                v.received = Some(val.ok_or(Malformed)?);
            } else if p.name.eq_ignore_ascii_case(b"rport") {
                v.rport = Some(match val {
                    Some(d) => Some(scan::parse_u64(d, 65535).ok_or(Malformed)? as u16),
                    None => None,
                });
            } else if p.name.eq_ignore_ascii_case(b"maddr") {
                v.maddr = Some(val.ok_or(Malformed)?);
            } else if p.name.eq_ignore_ascii_case(b"ttl") {
                v.ttl = Some(scan::parse_u64(val.ok_or(Malformed)?, 255).ok_or(Malformed)? as u8);
            }
        }
        Ok(v)
    }

    /// RFC 3261 §8.1.1.7: a branch beginning with the magic cookie.
    pub fn is_rfc3261_branch(&self) -> bool {
        self.branch
            .is_some_and(|b| b.len() > 7 && b[..7].eq_ignore_ascii_case(b"z9hG4bK"))
    }
}

// ------------------------------------------------------------------------- name-addr

/// A `name-addr` or `addr-spec` with its header parameters (From, To, Contact, Route,
/// Record-Route, Path, Refer-To).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// Display name as written (quoted strings keep their quotes); empty when absent.
    pub display: &'a [u8],
    /// The URI (inside the angle brackets when they are used).
    pub uri: &'a [u8],
    /// Whether the URI was enclosed in `<>`.
    pub bracketed: bool,
    /// Header parameters `;...` after the URI, as written.
    pub params: &'a [u8],
    /// The URI, parsed.
    pub parsed: Uri<'a>,
}

/// RFC 3261 §25.1: display-name = *(token LWS) / quoted-string.
fn display_name(i: &[u8]) -> IResult<&[u8], &[u8]> {
    if i.first() == Some(&b'"') {
        return quoted_string(i);
    }
    let start = i;
    let mut rest = i;
    while let Ok((r, _)) = token(rest) {
        rest = sws(r);
    }
    Ok((rest, trim(&start[..start.len() - rest.len()])))
}

impl<'a> NameAddr<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<NameAddr<'a>, Malformed> {
        Self::parse_inner(raw, true)
    }

    /// `parse` without checking the header parameters, for callers that walk them anyway
    /// (Contact) and fail on a malformed one themselves.
    fn parse_inner(raw: &'a [u8], check_params: bool) -> Result<NameAddr<'a>, Malformed> {
        let i = trim(raw);
        if i.is_empty() {
            return Err(Malformed);
        }
        let lt = find_byte(b'<', i);
        let quoted = i.first() == Some(&b'"');
        if quoted || lt.is_some() {
            let (r, display) = display_name(i).map_err(|_| Malformed)?;
            let r = sws(r);
            let r = r.strip_prefix(b"<").ok_or(Malformed)?;
            let gt = find_byte(b'>', r).ok_or(Malformed)?;
            let uri = &r[..gt];
            let parsed = Uri::parse(uri)?;
            let params = sws(&r[gt + 1..]);
            if !params.is_empty() && params[0] != b';' {
                return Err(Malformed);
            }
            if check_params && !Params::validate(params) {
                return Err(Malformed);
            }
            Ok(NameAddr {
                display,
                uri,
                bracketed: true,
                params,
                parsed,
            })
        } else {
            // addr-spec: parameters after ';' belong to the header (RFC 3261 §20.10), so
            // the URI cannot carry ';' params, '?' headers or ',' here.
            let end = i
                .iter()
                .position(|&b| b == b';' || is_lws(b))
                .unwrap_or(i.len());
            let uri = &i[..end];
            if uri.contains(&b'?') || uri.contains(&b',') {
                return Err(Malformed);
            }
            let parsed = Uri::parse(uri)?;
            let params = sws(&i[end..]);
            if !params.is_empty() && params[0] != b';' {
                return Err(Malformed);
            }
            if check_params && !Params::validate(params) {
                return Err(Malformed);
            }
            Ok(NameAddr {
                display: b"",
                uri,
                bracketed: false,
                params,
                parsed,
            })
        }
    }

    pub fn param(&self, name: &[u8]) -> Option<Param<'a>> {
        Params::find(self.params, name)
    }

    pub fn tag(&self) -> Option<&'a [u8]> {
        self.param(b"tag").and_then(|p| p.value)
    }

    pub fn parsed_uri(&self) -> Uri<'a> {
        self.parsed
    }
}

// --------------------------------------------------------------------------- Contact

/// One Contact value (RFC 3261 §20.10, RFC 5626 §4.2 instance/reg-id).
// Lives on the stack only; boxing the large variant would allocate per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contact<'a> {
    /// `Contact: *`
    Star,
    Addr(ContactAddr<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContactAddr<'a> {
    pub addr: NameAddr<'a>,
    pub expires: Option<u32>,
    /// q-value in thousandths (0..=1000).
    pub q: Option<u16>,
    /// `+sip.instance` value without its quotes.
    pub instance: Option<&'a [u8]>,
    pub reg_id: Option<u32>,
}

/// RFC 3261 §20.10 qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
pub fn parse_qvalue(s: &[u8]) -> Option<u16> {
    let (int, frac) = match find_byte(b'.', s) {
        Some(d) => (&s[..d], &s[d + 1..]),
        None => (s, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut f: u16 = 0;
    for k in 0..3 {
        f = f * 10 + frac.get(k).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(f),
        b"1" if f == 0 => Some(1000),
        _ => None,
    }
}

impl<'a> Contact<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Contact<'a>, Malformed> {
        if trim(raw) == b"*" {
            return Ok(Contact::Star);
        }
        // The parameters are checked by the loop below.
        let addr = NameAddr::parse_inner(raw, false)?;
        let mut c = ContactAddr {
            addr,
            expires: None,
            q: None,
            instance: None,
            reg_id: None,
        };
        for p in Params::new(addr.params) {
            let p = p?;
            if p.name.eq_ignore_ascii_case(b"expires") {
                // delta-seconds; an RFC 1123 date (RFC 2543) is treated as absent
                c.expires = p.value.and_then(scan::parse_delta_seconds);
            } else if p.name.eq_ignore_ascii_case(b"q") {
                c.q = Some(parse_qvalue(p.value.ok_or(Malformed)?).ok_or(Malformed)?);
            } else if p.name.eq_ignore_ascii_case(b"+sip.instance") {
                c.instance = Some(scan::unquote(p.value.ok_or(Malformed)?));
            } else if p.name.eq_ignore_ascii_case(b"reg-id") {
                let v = scan::parse_u64(p.value.ok_or(Malformed)?, u64::from(u32::MAX))
                    .ok_or(Malformed)?;
                if v == 0 {
                    return Err(Malformed);
                }
                c.reg_id = Some(v as u32);
            }
        }
        Ok(Contact::Addr(c))
    }
}

// ----------------------------------------------------------------- small scalar types

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    pub seq: u32,
    pub method: Method<'a>,
}

impl<'a> CSeq<'a> {
    /// CSeq = 1*DIGIT LWS Method; the number is below 2^31 per RFC 3261 §8.1.1.5 but any
    /// 32-bit value is accepted (§20.16); more is a 400.
    pub fn parse(raw: &'a [u8]) -> Result<CSeq<'a>, Malformed> {
        let raw = trim(raw);
        let digits = raw.iter().take_while(|b| b.is_ascii_digit()).count();
        let seq = scan::parse_u64(&raw[..digits], u64::from(u32::MAX)).ok_or(Malformed)? as u32;
        let rest = &raw[digits..];
        if rest.is_empty() || !is_lws(rest[0]) {
            return Err(Malformed);
        }
        let (tail, m) = token(sws(rest)).map_err(|_| Malformed)?;
        if !trim(tail).is_empty() {
            return Err(Malformed);
        }
        Ok(CSeq {
            seq,
            method: Method::from_bytes(m),
        })
    }
}

/// A token with generic parameters (Event, Subscription-State, Content-Disposition...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenParams<'a> {
    pub value: &'a [u8],
    pub params: &'a [u8],
}

impl<'a> TokenParams<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<TokenParams<'a>, Malformed> {
        let raw = trim(raw);
        let (rest, value) = token(raw).map_err(|_| Malformed)?;
        let params = sws(rest);
        if !params.is_empty() && params[0] != b';' || !Params::validate(params) {
            return Err(Malformed);
        }
        Ok(TokenParams { value, params })
    }

    pub fn param(&self, name: &[u8]) -> Option<&'a [u8]> {
        Params::find(self.params, name).and_then(|p| p.value)
    }
}

/// Content-Type: media-type = type "/" subtype *(SEMI m-parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaType<'a> {
    pub kind: &'a [u8],
    pub subtype: &'a [u8],
    pub params: &'a [u8],
}

impl<'a> MediaType<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<MediaType<'a>, Malformed> {
        let raw = trim(raw);
        let (r, kind) = token(raw).map_err(|_| Malformed)?;
        let r = slash(r)?;
        let (r, subtype) = token(r).map_err(|_| Malformed)?;
        let params = sws(r);
        if !params.is_empty() && params[0] != b';' || !Params::validate(params) {
            return Err(Malformed);
        }
        Ok(MediaType {
            kind,
            subtype,
            params,
        })
    }
}

/// Authorization / Proxy-Authorization / WWW-Authenticate / Proxy-Authenticate:
/// a scheme followed by comma-separated auth-params (RFC 3261 §25.1). Parse only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthHeader<'a> {
    pub scheme: &'a [u8],
    pub params: &'a [u8],
}

impl<'a> AuthHeader<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<AuthHeader<'a>, Malformed> {
        let raw = trim(raw);
        let (r, scheme) = token(raw).map_err(|_| Malformed)?;
        if !r.is_empty() && !is_lws(r[0]) {
            return Err(Malformed);
        }
        let params = trim(r);
        let a = AuthHeader { scheme, params };
        for p in a.params() {
            p?;
        }
        Ok(a)
    }

    /// auth-param = token EQUAL ( token / quoted-string ); values as written.
    pub fn params(&self) -> impl Iterator<Item = Result<(&'a [u8], &'a [u8]), Malformed>> + 'a {
        CommaSplit::new(self.params)
            .filter(|s| !s.is_empty())
            .map(|p| {
                let eq = find_byte(b'=', p).ok_or(Malformed)?;
                let name = trim(&p[..eq]);
                let value = trim(&p[eq + 1..]);
                if name.is_empty() || !name.iter().all(|&b| is_token(b)) || value.is_empty() {
                    return Err(Malformed);
                }
                if value[0] == b'"' {
                    let (rest, _) = quoted_string(value).map_err(|_| Malformed)?;
                    if !rest.is_empty() {
                        return Err(Malformed);
                    }
                }
                Ok((name, value))
            })
    }

    pub fn param(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.params()
            .filter_map(Result::ok)
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

// ------------------------------------------------------------- typed access on Message

type Common<'a> = (Via<'a>, NameAddr<'a>, NameAddr<'a>, &'a [u8]);

/// What `Message::check_request` parsed on its way: a request that passed the checks,
/// with the values every handler reads, so nothing is parsed twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'a> {
    pub request_uri: Uri<'a>,
    pub top_via: Via<'a>,
    pub from: NameAddr<'a>,
    pub to: NameAddr<'a>,
    pub call_id: &'a [u8],
    pub cseq: CSeq<'a>,
    pub max_forwards: Option<u8>,
    /// The Expires header (delta-seconds, saturating).
    pub expires: Option<u32>,
}

impl<'a> Message<'a> {
    /// Every Via value, top first.
    pub fn vias(&self) -> impl Iterator<Item = Result<Via<'a>, Malformed>> + '_ {
        self.values(HeaderName::Via).map(Via::parse)
    }

    pub fn top_via(&self) -> Option<Via<'a>> {
        self.values(HeaderName::Via)
            .next()
            .and_then(|v| Via::parse(v).ok())
    }

    /// The top Via parsed leniently (see `Via::parse_lenient`), for stateless rejects.
    pub fn top_via_lenient(&self) -> Option<Via<'a>> {
        self.values(HeaderName::Via)
            .next()
            .and_then(|v| Via::parse_lenient(v).ok())
    }

    pub fn from(&self) -> Option<NameAddr<'a>> {
        self.header(HeaderName::From)
            .and_then(|v| NameAddr::parse(v).ok())
    }

    pub fn to(&self) -> Option<NameAddr<'a>> {
        self.header(HeaderName::To)
            .and_then(|v| NameAddr::parse(v).ok())
    }

    pub fn call_id(&self) -> Option<&'a [u8]> {
        self.header(HeaderName::CallId)
    }

    pub fn cseq(&self) -> Option<CSeq<'a>> {
        self.header(HeaderName::CSeq)
            .and_then(|v| CSeq::parse(v).ok())
    }

    pub fn max_forwards(&self) -> Option<u8> {
        self.header(HeaderName::MaxForwards)
            .and_then(|v| scan::parse_u64(v, 255))
            .map(|v| v as u8)
    }

    pub fn contacts(&self) -> impl Iterator<Item = Result<Contact<'a>, Malformed>> + '_ {
        self.values(HeaderName::Contact).map(Contact::parse)
    }

    /// Expires header (delta-seconds, saturating at 2^32-1).
    pub fn expires(&self) -> Option<u32> {
        self.header(HeaderName::Expires)
            .and_then(scan::parse_delta_seconds)
    }

    pub fn min_expires(&self) -> Option<u32> {
        self.header(HeaderName::MinExpires)
            .and_then(scan::parse_delta_seconds)
    }

    /// Route, Record-Route or Path entries.
    pub fn routes(
        &self,
        name: HeaderName,
    ) -> impl Iterator<Item = Result<NameAddr<'a>, Malformed>> + '_ {
        self.values(name).map(|v| {
            let na = NameAddr::parse(v)?;
            // rec-route / route-param / path-value are name-addr: brackets required.
            if na.bracketed { Ok(na) } else { Err(Malformed) }
        })
    }

    /// Tokens of Allow, Supported, Require, Proxy-Require, Unsupported, Allow-Events.
    pub fn tokens(&self, name: HeaderName) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.values(name).filter(|t| !t.is_empty())
    }

    pub fn content_type(&self) -> Option<MediaType<'a>> {
        self.header(HeaderName::ContentType)
            .and_then(|v| MediaType::parse(v).ok())
    }

    pub fn event(&self) -> Option<TokenParams<'a>> {
        self.header(HeaderName::Event)
            .and_then(|v| TokenParams::parse(v).ok())
    }

    pub fn subscription_state(&self) -> Option<TokenParams<'a>> {
        self.header(HeaderName::SubscriptionState)
            .and_then(|v| TokenParams::parse(v).ok())
    }

    pub fn sip_etag(&self) -> Option<&'a [u8]> {
        self.header(HeaderName::SipETag)
            .filter(|v| v.iter().all(|&b| is_token(b)))
    }

    pub fn sip_if_match(&self) -> Option<&'a [u8]> {
        self.header(HeaderName::SipIfMatch)
            .filter(|v| v.iter().all(|&b| is_token(b)))
    }

    pub fn authorizations(&self) -> impl Iterator<Item = Result<AuthHeader<'a>, Malformed>> + '_ {
        self.headers_named(HeaderName::Authorization)
            .map(AuthHeader::parse)
    }

    pub fn www_authenticate(&self) -> impl Iterator<Item = Result<AuthHeader<'a>, Malformed>> + '_ {
        self.headers_named(HeaderName::WwwAuthenticate)
            .map(AuthHeader::parse)
    }

    /// The checks a request must pass before any logic sees it (RFC 3261 §8.2, §16.3):
    /// mandatory header fields present, single-valued fields single, scalar fields in
    /// range, CSeq method equal to the request method, and every header this node reads
    /// well formed. Returns the first defect.
    pub fn check_request(&self) -> Result<Checked<'a>, ErrorKind> {
        let method = self.method().ok_or(ErrorKind::BadStartLine)?;
        let uri = self.request_uri().ok_or(ErrorKind::BadStartLine)?;
        // RFC 3261 §8.2.2.1: a scheme we do not handle is 416; malformed is 400.
        let ruri = Uri::parse(uri).map_err(|_| ErrorKind::BadRequestUri)?;
        match ruri.scheme {
            crate::uri::Scheme::Sip | crate::uri::Scheme::Sips | crate::uri::Scheme::Tel => {}
            crate::uri::Scheme::Other => return Err(ErrorKind::UnsupportedUriScheme),
        }
        // RFC 3261 §19.1.1 (table 1): headers are not allowed in a Request-URI.
        if ruri.headers.is_some() {
            return Err(ErrorKind::BadRequestUri);
        }
        let (top_via, from, to, call_id) = self.check_common()?;
        let cseq = CSeq::parse(
            self.header(HeaderName::CSeq)
                .ok_or(ErrorKind::MissingHeader(HeaderName::CSeq))?,
        )
        .map_err(|_| ErrorKind::BadHeader(HeaderName::CSeq))?;
        // RFC 3261 §8.1.1.5: the CSeq method MUST match the request method (ACK and
        // CANCEL carry the INVITE's number with their own method).
        if cseq.method != method {
            return Err(ErrorKind::CSeqMethodMismatch);
        }
        let max_forwards = match self.header(HeaderName::MaxForwards) {
            Some(mf) => Some(
                scan::parse_u64(mf, 255).ok_or(ErrorKind::BadHeader(HeaderName::MaxForwards))?
                    as u8,
            ),
            None => None,
        };
        for c in self.contacts() {
            c.map_err(|_| ErrorKind::BadHeader(HeaderName::Contact))?;
        }
        for name in [HeaderName::Route, HeaderName::RecordRoute, HeaderName::Path] {
            for r in self.routes(name) {
                r.map_err(|_| ErrorKind::BadHeader(name))?;
            }
        }
        for name in [HeaderName::Expires, HeaderName::MinExpires] {
            if let Some(v) = self.header(name) {
                scan::parse_delta_seconds(v).ok_or(ErrorKind::BadHeader(name))?;
            }
        }
        for name in [
            HeaderName::Require,
            HeaderName::ProxyRequire,
            HeaderName::Supported,
        ] {
            for t in self.values(name) {
                if t.is_empty() || !t.iter().all(|&b| is_token(b)) {
                    return Err(ErrorKind::BadHeader(name));
                }
            }
        }
        if let Some(v) = self.header(HeaderName::Date)
            && !valid_sip_date(v)
        {
            return Err(ErrorKind::BadHeader(HeaderName::Date));
        }
        for a in self.authorizations() {
            a.map_err(|_| ErrorKind::BadHeader(HeaderName::Authorization))?;
        }
        Ok(Checked {
            request_uri: ruri,
            top_via,
            from,
            to,
            call_id,
            cseq,
            max_forwards,
            expires: self.expires(),
        })
    }

    /// The checks a response must pass before it is used; a response that fails them is
    /// dropped (RFC 4475 §3.1.2.5, §3.1.2.19).
    pub fn check_response(&self) -> Result<(), ErrorKind> {
        self.check_common()?;
        CSeq::parse(
            self.header(HeaderName::CSeq)
                .ok_or(ErrorKind::MissingHeader(HeaderName::CSeq))?,
        )
        .map_err(|_| ErrorKind::BadHeader(HeaderName::CSeq))?;
        if let Some(v) = self.header(HeaderName::RetryAfter) {
            let d = trim(v).iter().take_while(|b| b.is_ascii_digit()).count();
            scan::parse_u64(&trim(v)[..d], u64::from(u32::MAX))
                .ok_or(ErrorKind::BadHeader(HeaderName::RetryAfter))?;
        }
        Ok(())
    }

    fn check_common(&self) -> Result<Common<'a>, ErrorKind> {
        // RFC 3261 §8.1.1: To, From, CSeq, Call-ID, Max-Forwards and Via are mandatory;
        // Max-Forwards is left optional for RFC 2543 peers (RFC 4475 §3.4.1).
        for name in [
            HeaderName::Via,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
        ] {
            if self.header(name).is_none() {
                return Err(ErrorKind::MissingHeader(name));
            }
        }
        // Single-valued fields (RFC 3261 §7.3.1: only comma-list headers may repeat).
        for name in [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
            HeaderName::MaxForwards,
        ] {
            let mut it = self.headers_named(name);
            let first = it.next();
            if it.next().is_some() {
                return Err(ErrorKind::DuplicateHeader(name));
            }
            if let Some(v) = first
                && v.is_empty()
            {
                return Err(ErrorKind::BadHeader(name));
            }
        }
        let mut top = None;
        for v in self.vias() {
            let v = v.map_err(|_| ErrorKind::BadHeader(HeaderName::Via))?;
            top.get_or_insert(v);
        }
        let top = top.ok_or(ErrorKind::MissingHeader(HeaderName::Via))?;
        let from = NameAddr::parse(self.header(HeaderName::From).unwrap_or_default())
            .map_err(|_| ErrorKind::BadHeader(HeaderName::From))?;
        let to = NameAddr::parse(self.header(HeaderName::To).unwrap_or_default())
            .map_err(|_| ErrorKind::BadHeader(HeaderName::To))?;
        let cid = self.header(HeaderName::CallId).unwrap_or_default();
        // callid = word [ "@" word ]: no whitespace inside.
        if cid.iter().any(|&b| is_lws(b)) {
            return Err(ErrorKind::BadHeader(HeaderName::CallId));
        }
        Ok((top, from, to, cid))
    }
}

/// RFC 3261 §25.1 SIP-date = rfc1123-date, which is always in GMT.
fn valid_sip_date(v: &[u8]) -> bool {
    let v = trim(v);
    v.len() >= 29 && v.ends_with(b" GMT") && v[3] == b','
}
