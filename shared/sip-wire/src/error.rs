//! Parse errors: small `Copy` values that say which SIP response a stateless reject
//! carries and name the defect in its reason phrase.

use core::fmt;

use crate::HeaderName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No CRLF CRLF ending the header block.
    Truncated,
    /// Start line is neither a request line nor a status line.
    BadStartLine,
    /// Request-Line does not have exactly three single-SP separated parts.
    BadRequestLine,
    /// Request-URI is malformed (whitespace, brackets, bad characters).
    BadRequestUri,
    /// Request-URI has a scheme this node does not handle (RFC 3261 §8.2.2.1: 416).
    UnsupportedUriScheme,
    /// SIP version other than 2.0 (RFC 3261 §8.2.x: 505).
    VersionNotSupported,
    /// Status code outside 100..=699.
    BadStatusCode,
    /// A header line without a colon or with a bad name.
    BadHeaderLine,
    /// More header fields than the parser keeps.
    TooManyHeaders,
    /// A header value that does not follow its grammar.
    BadHeader(HeaderName),
    /// A required header is absent.
    MissingHeader(HeaderName),
    /// A single-valued header appears more than once with different values.
    DuplicateHeader(HeaderName),
    /// CSeq method differs from the Request-Line method.
    CSeqMethodMismatch,
    /// Content-Length says more octets than the datagram holds.
    BodyTruncated,
}

impl ErrorKind {
    /// The status code of the stateless reject for a request with this defect.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::VersionNotSupported => 505,
            ErrorKind::UnsupportedUriScheme => 416,
            _ => 400,
        }
    }

    /// A reason phrase that names the defect.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::Truncated => "Truncated Message",
            ErrorKind::BadStartLine => "Bad Start Line",
            ErrorKind::BadRequestLine => "Bad Request-Line",
            ErrorKind::BadRequestUri => "Bad Request-URI",
            ErrorKind::UnsupportedUriScheme => "Unsupported URI Scheme",
            ErrorKind::VersionNotSupported => "Version Not Supported",
            ErrorKind::BadStatusCode => "Bad Status Code",
            ErrorKind::BadHeaderLine => "Bad Header Line",
            ErrorKind::TooManyHeaders => "Too Many Header Fields",
            ErrorKind::BadHeader(h) => h.bad_reason(),
            ErrorKind::MissingHeader(h) => h.missing_reason(),
            ErrorKind::DuplicateHeader(h) => h.duplicate_reason(),
            ErrorKind::CSeqMethodMismatch => "CSeq Method Does Not Match Request-Line",
            ErrorKind::BodyTruncated => "Content-Length Exceeds Message",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.reason())
    }
}

impl std::error::Error for ErrorKind {}

/// A header value or URI that does not follow its grammar (the caller knows which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed")
    }
}

impl std::error::Error for Malformed {}
