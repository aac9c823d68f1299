//! Zero-copy SIP parser and allocation-free serializer.
//!
//! `Message::parse` frames a message (start line, header fields, body) without copying;
//! typed values (`Via`, `NameAddr`, `Contact`, `CSeq`, `Uri` ...) are parsed from the
//! borrowed header values when asked for. `Writer` builds messages into a caller-owned
//! buffer.
#![forbid(unsafe_code)]

pub mod error;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod message;
pub mod scan;
pub mod uri;
pub mod write;

pub use error::{ErrorKind, Malformed};
pub use framing::{StreamFrame, frame_stream};
pub use headers::{
    AuthHeader, CSeq, Checked, Contact, ContactAddr, MediaType, NameAddr, TokenParams, Via,
};
pub use message::{Framing, Header, HeaderName, MAX_HEADERS, Message, Method, StartLine};
pub use uri::{Scheme, Uri};
pub use write::Writer;
