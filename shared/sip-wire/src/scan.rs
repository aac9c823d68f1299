//! Character classes and the small nom parsers shared by the typed header parsers.

use crate::error::Malformed;
use nom::{IResult, Parser, bytes::complete::take_while1, error::ErrorKind as NomKind};

/// A 256-entry membership table for a character class: alphanumerics plus `extra`.
pub const fn class(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric();
        c += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// RFC 3261 §25.1 `token`.
pub static TOKEN: [bool; 256] = class(b"-.!%*_+`'~");

/// `gen-value` without quotes: token or host (IPv6 references carry ':' and []).
pub static GEN_VALUE: [bool; 256] = class(b"-.!%*_+`'~:[]");

/// Length of the run of `class` octets at the start of `s`.
#[inline]
pub fn span(s: &[u8], class: &[bool; 256]) -> usize {
    s.iter()
        .position(|&b| !class[b as usize])
        .unwrap_or(s.len())
}

/// RFC 3261 §25.1 `token` characters.
#[inline]
pub fn is_token(b: u8) -> bool {
    TOKEN[b as usize]
}

/// Whitespace inside an (unfolded) header value: folding keeps its CRLF in the slice.
pub fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Skip optional linear white space (SWS), folding included.
pub fn sws(i: &[u8]) -> &[u8] {
    let n = i.iter().take_while(|&&b| is_lws(b)).count();
    &i[n..]
}

/// Trim LWS on both ends.
pub fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_lws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_lws(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

pub fn token(i: &[u8]) -> IResult<&[u8], &[u8]> {
    match span(i, &TOKEN) {
        0 => take_while1(is_token).parse(i),
        n => Ok((&i[n..], &i[..n])),
    }
}

fn fail(i: &[u8]) -> nom::Err<nom::error::Error<&[u8]>> {
    nom::Err::Error(nom::error::Error::new(i, NomKind::Verify))
}

/// RFC 3261 §25.1 `quoted-string` including its quotes; backslash escapes are kept.
pub fn quoted_string(i: &[u8]) -> IResult<&[u8], &[u8]> {
    if i.first() != Some(&b'"') {
        return Err(fail(i));
    }
    let mut k = 1;
    // Jump from one quote or backslash to the next; a backslash escapes the next octet.
    while let Some(j) = memchr::memchr2(b'"', b'\\', &i[k..]) {
        k += j;
        if i[k] == b'"' {
            return Ok((&i[k + 1..], &i[..k + 1]));
        }
        k += 2;
        if k >= i.len() {
            break;
        }
    }
    Err(fail(i))
}

/// Strip the quotes of a quoted string (escapes are left as they are).
pub fn unquote(s: &[u8]) -> &[u8] {
    if s.len() >= 2 && s[0] == b'"' && s[s.len() - 1] == b'"' {
        &s[1..s.len() - 1]
    } else {
        s
    }
}

/// Parse an unsigned decimal, rejecting empty input, non-digits and values above `max`.
pub fn parse_u64(s: &[u8], max: u64) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in s {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        if v > max {
            return None;
        }
    }
    Some(v)
}

/// Parse delta-seconds (RFC 3261 §25.1): values above 2^32-1 saturate, as a registrar
/// clamps them to its maximum anyway.
pub fn parse_delta_seconds(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in s {
        v = (v * 10 + u64::from(d - b'0')).min(u64::from(u32::MAX));
    }
    Some(v as u32)
}

/// Split a header value at top-level commas (outside quotes and angle brackets).
pub struct CommaSplit<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> CommaSplit<'a> {
    pub fn new(s: &'a [u8]) -> Self {
        CommaSplit { rest: Some(s) }
    }
}

impl<'a> Iterator for CommaSplit<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let s = self.rest?;
        let mut k = 0;
        loop {
            // Jump to the next octet that matters at top level.
            let Some(j) = memchr::memchr3(b',', b'"', b'<', &s[k..]) else {
                self.rest = None;
                return Some(trim(s));
            };
            k += j;
            match s[k] {
                b',' => {
                    self.rest = Some(&s[k + 1..]);
                    return Some(trim(&s[..k]));
                }
                b'"' => {
                    // Skip the quoted string (backslash escapes included).
                    k += 1;
                    while k < s.len() && s[k] != b'"' {
                        k += if s[k] == b'\\' { 2 } else { 1 };
                    }
                    k += 1;
                }
                _ => {
                    // Inside <...>: commas belong to the URI.
                    match memchr::memchr(b'>', &s[k..]) {
                        Some(e) => k += e + 1,
                        None => {
                            self.rest = None;
                            return Some(trim(s));
                        }
                    }
                }
            }
            if k >= s.len() {
                self.rest = None;
                return Some(trim(s));
            }
        }
    }
}

/// One `;name[=value]` generic parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    pub name: &'a [u8],
    /// The value as written (quotes kept for quoted strings), `None` for a bare name.
    pub value: Option<&'a [u8]>,
}

/// Iterate generic header parameters `*( SEMI generic-param )` in a string that starts
/// at the first `;` (or is empty). Yields `Err(Malformed)` on a malformed parameter.
pub struct Params<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Params<'a> {
    pub fn new(s: &'a [u8]) -> Self {
        Params {
            rest: s,
            failed: false,
        }
    }

    /// Find the first parameter with this (case-insensitive) name.
    pub fn find(s: &'a [u8], name: &[u8]) -> Option<Param<'a>> {
        Params::new(s)
            .filter_map(Result::ok)
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// Check that every parameter is well formed.
    pub fn validate(s: &'a [u8]) -> bool {
        Params::new(s).all(|p| p.is_ok())
    }
}

impl<'a> Iterator for Params<'a> {
    type Item = Result<Param<'a>, Malformed>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let s = sws(self.rest);
        if s.is_empty() {
            return None;
        }
        let r = (|| {
            let s = s.strip_prefix(b";").ok_or(Malformed)?;
            let s = sws(s);
            let n = span(s, &TOKEN);
            if n == 0 {
                return Err(Malformed);
            }
            let (name, s) = s.split_at(n);
            let s = sws(s);
            if let Some(s) = s.strip_prefix(b"=") {
                let s = sws(s);
                let (s, v) = if s.first() == Some(&b'"') {
                    quoted_string(s).map_err(|_| Malformed)?
                } else {
                    // gen-value = token / host / quoted-string; IPv6 references carry ':' and [].
                    let n = span(s, &GEN_VALUE);
                    if n == 0 {
                        return Err(Malformed);
                    }
                    let (v, rest) = s.split_at(n);
                    (rest, v)
                };
                Ok((
                    s,
                    Param {
                        name,
                        value: Some(v),
                    },
                ))
            } else {
                Ok((s, Param { name, value: None }))
            }
        })();
        match r {
            Ok((rest, p)) => {
                self.rest = rest;
                Some(Ok(p))
            }
            Err(Malformed) => {
                self.failed = true;
                Some(Err(Malformed))
            }
        }
    }
}

/// Is `s` a comma-separated list of tokens (Allow, Supported, Require, ...)?
pub fn token_list(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    CommaSplit::new(s).filter(|t| !t.is_empty())
}

/// Position of `b` in a short slice. Header values and URIs are tens of octets: a plain
/// loop beats a vectorised search's set-up there.
#[inline]
pub fn find_byte(b: u8, s: &[u8]) -> Option<usize> {
    s.iter().position(|&c| c == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_with_lws_and_quotes() {
        let v: Vec<_> = Params::new(b" ; tag = 1918 ;q=0.3; x=\"a;b\" ;lr")
            .map(Result::unwrap)
            .collect();
        assert_eq!(v.len(), 4);
        assert_eq!(
            v[0],
            Param {
                name: b"tag",
                value: Some(b"1918")
            }
        );
        assert_eq!(v[2].value, Some(&b"\"a;b\""[..]));
        assert_eq!(v[3].value, None);
        assert!(!Params::validate(b";;"));
        assert!(!Params::validate(b"; a = "));
    }

    #[test]
    fn comma_split_respects_quotes_and_brackets() {
        let v: Vec<_> = CommaSplit::new(b"\"a,b\" <sip:x,y>;p=1 , <sip:z>").collect();
        assert_eq!(v, vec![&b"\"a,b\" <sip:x,y>;p=1"[..], &b"<sip:z>"[..]]);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64(b"0009", 100), Some(9));
        assert_eq!(
            parse_u64(b"36893488147419103232", u64::from(u32::MAX)),
            None
        );
        assert_eq!(
            parse_delta_seconds(b"100000000000000000000000"),
            Some(u32::MAX)
        );
        assert_eq!(parse_delta_seconds(b"-1"), None);
    }
}
