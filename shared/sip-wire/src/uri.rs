//! SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966), borrowed from the message.

use crate::error::Malformed;
use crate::scan::{Param, Params, class, find_byte};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Sip,
    Sips,
    Tel,
    /// Any other absoluteURI scheme (RFC 3261 §25.1); kept opaque.
    Other,
}

/// A parsed URI. For `Other` only `scheme_raw()` and `opaque()` are meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    pub scheme: Scheme,
    /// user part, still %-escaped (for tel: the number).
    pub user: Option<&'a [u8]>,
    pub password: Option<&'a [u8]>,
    /// host as written (for IPv6 with the brackets). Empty for tel/other.
    pub host: &'a [u8],
    pub port: Option<u16>,
    /// `;param...` as written, starting at the first ';' (may be empty).
    pub params: &'a [u8],
    /// `?h=v&...` after the '?' (None when absent).
    pub headers: Option<&'a [u8]>,
    /// The whole URI as written.
    pub raw: &'a [u8],
}

// RFC 3261 §25.1 character classes (unreserved = alphanum / mark).
static USER: [bool; 256] = class(b"-_.!~*'()&=+$,;?/%");
static PASSWORD: [bool; 256] = class(b"-_.!~*'()&=+$,%");
static PARAM: [bool; 256] = class(b"-_.!~*'()[]/:&+$%=;");
static HEADER: [bool; 256] = class(b"-_.!~*'()[]/?:+$%=&");
static HOST: [bool; 256] = class(b"-.");

#[inline]
fn is_user_char(b: u8) -> bool {
    USER[b as usize]
}

#[inline]
fn is_password_char(b: u8) -> bool {
    PASSWORD[b as usize]
}

#[inline]
fn is_param_char(b: u8) -> bool {
    PARAM[b as usize]
}

#[inline]
fn is_header_char(b: u8) -> bool {
    HEADER[b as usize]
}

fn valid_escapes(s: &[u8]) -> bool {
    let mut k = 0;
    while k < s.len() {
        if s[k] == b'%' {
            if !(s.get(k + 1).is_some_and(u8::is_ascii_hexdigit)
                && s.get(k + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return false;
            }
            k += 3;
        } else {
            k += 1;
        }
    }
    true
}

fn valid_host(h: &[u8]) -> bool {
    if h.is_empty() {
        return false;
    }
    if h[0] == b'[' {
        return h.len() > 2
            && h[h.len() - 1] == b']'
            && h[1..h.len() - 1]
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    h.iter().all(|&b| HOST[b as usize])
}

impl<'a> Uri<'a> {
    /// Parse a URI. Fails on whitespace, angle brackets, bad escapes, bad hosts or ports.
    pub fn parse(raw: &'a [u8]) -> Result<Uri<'a>, Malformed> {
        let colon = find_byte(b':', raw).ok_or(Malformed)?;
        let scheme_raw = &raw[..colon];
        if scheme_raw.is_empty()
            || !scheme_raw[0].is_ascii_alphabetic()
            || !scheme_raw
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return Err(Malformed);
        }
        let opaque = &raw[colon + 1..];
        if opaque
            .iter()
            .any(|&b| b <= b' ' || b == b'<' || b == b'>' || b == b'"' || b >= 0x7f)
        {
            return Err(Malformed);
        }
        let scheme = if scheme_raw.eq_ignore_ascii_case(b"sip") {
            Scheme::Sip
        } else if scheme_raw.eq_ignore_ascii_case(b"sips") {
            Scheme::Sips
        } else if scheme_raw.eq_ignore_ascii_case(b"tel") {
            Scheme::Tel
        } else {
            Scheme::Other
        };
        let mut uri = Uri {
            scheme,
            user: None,
            password: None,
            host: b"",
            port: None,
            params: b"",
            headers: None,
            raw,
        };
        match scheme {
            Scheme::Other => {
                if opaque.is_empty() {
                    return Err(Malformed);
                }
            }
            Scheme::Tel => {
                // RFC 3966: telephone-subscriber *par
                let semi = find_byte(b';', opaque).unwrap_or(opaque.len());
                let number = &opaque[..semi];
                if number.is_empty()
                    || !number.iter().all(|&b| {
                        b.is_ascii_hexdigit()
                            || matches!(b, b'+' | b'-' | b'.' | b'(' | b')' | b'*' | b'#')
                    })
                {
                    return Err(Malformed);
                }
                uri.user = Some(number);
                uri.params = &opaque[semi..];
                if !uri.params.iter().all(|&b| is_param_char(b)) || !valid_escapes(uri.params) {
                    return Err(Malformed);
                }
            }
            Scheme::Sip | Scheme::Sips => {
                let mut rest = opaque;
                // '@' cannot occur unescaped outside userinfo (RFC 3261 §25.1).
                if let Some(at) = find_byte(b'@', rest) {
                    let userinfo = &rest[..at];
                    rest = &rest[at + 1..];
                    let (user, password) = match find_byte(b':', userinfo) {
                        Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
                        None => (userinfo, None),
                    };
                    if user.is_empty()
                        || !user.iter().all(|&b| is_user_char(b))
                        || !valid_escapes(user)
                    {
                        return Err(Malformed);
                    }
                    if let Some(p) = password
                        && (!p.iter().all(|&b| is_password_char(b)) || !valid_escapes(p))
                    {
                        return Err(Malformed);
                    }
                    uri.user = Some(user);
                    uri.password = password;
                }
                let q = find_byte(b'?', rest);
                let (hostpart, headers) = match q {
                    Some(q) => (&rest[..q], Some(&rest[q + 1..])),
                    None => (rest, None),
                };
                if let Some(h) = headers
                    && (h.is_empty() || !h.iter().all(|&b| is_header_char(b)) || !valid_escapes(h))
                {
                    return Err(Malformed);
                }
                uri.headers = headers;
                let semi = find_byte(b';', hostpart).unwrap_or(hostpart.len());
                let hostport = &hostpart[..semi];
                uri.params = &hostpart[semi..];
                if !uri.params.iter().all(|&b| is_param_char(b)) || !valid_escapes(uri.params) {
                    return Err(Malformed);
                }
                for p in uri.params.split(|&b| b == b';').skip(1) {
                    if p.is_empty() || p[0] == b'=' {
                        return Err(Malformed);
                    }
                }
                let (host, port) = if hostport.first() == Some(&b'[') {
                    let close = find_byte(b']', hostport).ok_or(Malformed)?;
                    (&hostport[..close + 1], &hostport[close + 1..])
                } else {
                    match find_byte(b':', hostport) {
                        Some(c) => (&hostport[..c], &hostport[c..]),
                        None => (hostport, &b""[..]),
                    }
                };
                if !valid_host(host) {
                    return Err(Malformed);
                }
                uri.host = host;
                if !port.is_empty() {
                    let digits = port.strip_prefix(b":").ok_or(Malformed)?;
                    let p = crate::scan::parse_u64(digits, 65535).ok_or(Malformed)?;
                    uri.port = Some(p as u16);
                }
            }
        }
        Ok(uri)
    }

    /// The scheme as written.
    pub fn scheme_raw(&self) -> &'a [u8] {
        let raw = self.raw;
        &raw[..find_byte(b':', raw).unwrap_or(0)]
    }

    /// Everything after `scheme:`.
    pub fn opaque(&self) -> &'a [u8] {
        let raw = self.raw;
        &raw[find_byte(b':', raw).map_or(raw.len(), |c| c + 1)..]
    }

    pub fn is_sip(&self) -> bool {
        matches!(self.scheme, Scheme::Sip | Scheme::Sips)
    }

    /// URI parameters (`;name=value`), values as written.
    pub fn params(&self) -> impl Iterator<Item = Param<'a>> {
        Params::new(self.params).filter_map(Result::ok)
    }

    pub fn param(&self, name: &[u8]) -> Option<Param<'a>> {
        Params::find(self.params, name)
    }
}

/// The octets of `s` with %-escapes decoded.
pub fn unescaped(s: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut k = 0;
    core::iter::from_fn(move || {
        let b = *s.get(k)?;
        if b == b'%'
            && k + 2 < s.len()
            && s[k + 1].is_ascii_hexdigit()
            && s[k + 2].is_ascii_hexdigit()
        {
            k += 3;
            Some((hex(s[k - 2]) << 4) | hex(s[k - 1]))
        } else {
            k += 1;
            Some(b)
        }
    })
}

fn eq_unescaped(a: &[u8], b: &[u8], fold_case: bool) -> bool {
    let (mut x, mut y) = (unescaped(a), unescaped(b));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(p), Some(q)) if p == q || (fold_case && p.eq_ignore_ascii_case(&q)) => {}
            _ => return false,
        }
    }
}

impl Uri<'_> {
    /// URI equality of RFC 3261 §19.1.4: user and password case-sensitive after
    /// unescaping, host case-insensitive, ports equal (absent differs from 5060), the
    /// `user`, `ttl`, `method`, `maddr` and `transport` parameters present in both or
    /// neither, other parameters compared only when in both, headers always compared.
    pub fn equivalent(&self, other: &Uri<'_>) -> bool {
        if self.scheme != other.scheme {
            return false;
        }
        if !matches!(self.scheme, Scheme::Sip | Scheme::Sips) {
            return eq_unescaped(self.opaque(), other.opaque(), true);
        }
        let opt_eq = |a: Option<&[u8]>, b: Option<&[u8]>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => eq_unescaped(a, b, false),
            _ => false,
        };
        if !opt_eq(self.user, other.user) || !opt_eq(self.password, other.password) {
            return false;
        }
        if !eq_unescaped(self.host, other.host, true) || self.port != other.port {
            return false;
        }
        let value_eq = |a: Option<&[u8]>, b: Option<&[u8]>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => eq_unescaped(a, b, true),
            _ => false,
        };
        for p in self.params() {
            match other.param(p.name) {
                Some(q) => {
                    if !value_eq(p.value, q.value) {
                        return false;
                    }
                }
                None => {
                    if [&b"user"[..], b"ttl", b"method", b"maddr", b"transport"]
                        .iter()
                        .any(|n| p.name.eq_ignore_ascii_case(n))
                    {
                        return false;
                    }
                }
            }
        }
        for q in other.params() {
            if self.param(q.name).is_none()
                && [&b"user"[..], b"ttl", b"method", b"maddr", b"transport"]
                    .iter()
                    .any(|n| q.name.eq_ignore_ascii_case(n))
            {
                return false;
            }
        }
        match (self.headers, other.headers) {
            (None, None) => true,
            (Some(a), Some(b)) => eq_unescaped(a, b, false),
            _ => false,
        }
    }
}

/// Decode %-escapes of `src` into `dst`; returns the decoded length, or `None` when
/// `dst` is too small. Invalid escapes are copied as they are.
pub fn unescape_into(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    let mut k = 0;
    while k < src.len() {
        let b = if src[k] == b'%'
            && k + 2 < src.len()
            && src[k + 1].is_ascii_hexdigit()
            && src[k + 2].is_ascii_hexdigit()
        {
            let v = (hex(src[k + 1]) << 4) | hex(src[k + 2]);
            k += 3;
            v
        } else {
            k += 1;
            src[k - 1]
        };
        *dst.get_mut(n)? = b;
        n += 1;
    }
    Some(n)
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_uri_parts() {
        let u = Uri::parse(b"sip:user;par=u%40example.net@example.com").unwrap();
        assert_eq!(u.user, Some(&b"user;par=u%40example.net"[..]));
        assert_eq!(u.host, b"example.com");
        let u =
            Uri::parse(b"sips:alice:secret@[2001:db8::1]:5061;transport=tcp;lr?Subject=x&h=%20")
                .unwrap();
        assert_eq!(u.scheme, Scheme::Sips);
        assert_eq!(u.password, Some(&b"secret"[..]));
        assert_eq!(u.host, b"[2001:db8::1]");
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.param(b"transport").unwrap().value, Some(&b"tcp"[..]));
        assert!(u.param(b"lr").is_some());
        assert_eq!(u.headers, Some(&b"Subject=x&h=%20"[..]));
    }

    #[test]
    fn tel_and_other() {
        let u = Uri::parse(b"tel:+1-201-555-0123;phone-context=example.com").unwrap();
        assert_eq!(u.scheme, Scheme::Tel);
        assert_eq!(u.user, Some(&b"+1-201-555-0123"[..]));
        assert_eq!(
            Uri::parse(b"nobodyKnowsThisScheme:totallyopaquecontent")
                .unwrap()
                .scheme,
            Scheme::Other
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b"sip:user@example.com; lr"[..],
            b"<sip:user@example.com>",
            b"sip:j.user @example.com",
            b"sip:user@exa mple.com",
            b"sip:user@host:99999",
            b"sip:us%zzer@host",
            b"sip:user@host;;lr",
            b"sip:",
        ] {
            assert!(Uri::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn equivalence_follows_rfc3261_19_1_4() {
        let eq = |a: &[u8], b: &[u8]| Uri::parse(a).unwrap().equivalent(&Uri::parse(b).unwrap());
        // RFC 3261 §19.1.4 examples of equivalent URIs.
        assert!(eq(
            b"sip:%61lice@atlanta.com;transport=TCP",
            b"sip:alice@AtLanTa.CoM;Transport=tcp"
        ));
        assert!(eq(
            b"sip:carol@chicago.com",
            b"sip:carol@chicago.com;newparam=5"
        ));
        assert!(eq(
            b"sip:carol@chicago.com;security=on",
            b"sip:carol@chicago.com;newparam=5"
        ));
        assert!(eq(
            b"sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
            b"sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"
        ));
        // ... and of URIs that are not.
        assert!(!eq(
            b"SIP:ALICE@AtLanTa.CoM;Transport=udp",
            b"sip:alice@AtLanTa.CoM;Transport=UDP"
        ));
        assert!(!eq(b"sip:bob@biloxi.com", b"sip:bob@biloxi.com:5060"));
        assert!(!eq(
            b"sip:bob@biloxi.com",
            b"sip:bob@biloxi.com;transport=udp"
        ));
        assert!(!eq(
            b"sip:carol@chicago.com;newparam=5",
            b"sip:carol@chicago.com;newparam=6"
        ));
        assert!(!eq(
            b"sip:%00@host5.example.com",
            b"sip:%00%00@host5.example.com"
        ));
    }

    #[test]
    fn unescape() {
        let mut b = [0u8; 32];
        let n = unescape_into(b"null-%00-null", &mut b).unwrap();
        assert_eq!(&b[..n], b"null-\0-null");
        let n = unescape_into(b"100%", &mut b).unwrap();
        assert_eq!(&b[..n], b"100%");
    }
}
