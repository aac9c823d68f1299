//! SIP parser throughput on realistic messages.
//!
//! * `parse_*`: `Message::parse` alone (framing: start line, header lines, body).
//! * `full_*`: what a request costs before any logic runs: parse + `check_request`
//!   (`check_response` for the 200) + every typed header the consumer reads. For the
//!   REGISTER (`register_full`) that is exactly the registrar's read set: top Via, From/To
//!   with tag and parsed URI, Call-ID, CSeq, Contacts with parsed URI, Expires,
//!   Max-Forwards, Path/Supported/Require tokens, User-Agent.
//!
//! Each set runs twice, under `Throughput::Elements(1)` (messages/s) and
//! `Throughput::Bytes(len)` (bytes/s).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mimalloc::MiMalloc;
use sip_wire::{Contact, Framing, HeaderName, Message};
use sipmesh_benches::msgs;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const MESSAGES: [(&str, &str); 4] = [
    ("register", msgs::REGISTER),
    ("invite", msgs::INVITE),
    ("subscribe", msgs::SUBSCRIBE),
    ("200_ok_invite", msgs::OK_INVITE),
];

/// Folds a byte slice into a checksum so nothing read can be optimised away.
#[inline]
fn mix(acc: u64, s: &[u8]) -> u64 {
    acc.rotate_left(5) ^ (s.len() as u64) ^ u64::from(s.first().copied().unwrap_or(0))
}

/// Everything the registrar reads from a REGISTER (see `dataplane/src/registrar.rs` and
/// `core.rs`), after the `check_request` the core runs first.
#[inline]
fn registrar_reads(m: &Message<'_>) -> u64 {
    // The core runs check_request once; the registrar reads what it parsed.
    let c = m.check_request().expect("valid REGISTER");
    let mut acc = 0u64;
    acc = mix(acc, c.request_uri.host);
    acc = mix(acc, c.top_via.branch.unwrap_or_default());
    acc ^= u64::from(c.top_via.rport.is_some());
    acc ^= u64::from(c.max_forwards.unwrap_or(0));
    acc = mix(acc, c.from.tag().unwrap_or_default());
    acc = mix(acc, c.from.parsed_uri().host);
    acc = mix(acc, c.to.tag().unwrap_or_default());
    let to_uri = c.to.parsed_uri();
    acc = mix(acc, to_uri.user.unwrap_or_default());
    acc = mix(acc, to_uri.host);
    acc = mix(acc, c.call_id);
    acc ^= u64::from(c.cseq.seq);
    acc ^= u64::from(c.expires.unwrap_or(0));
    for c in m.contacts() {
        match c.expect("Contact") {
            Contact::Star => acc ^= 1,
            Contact::Addr(a) => {
                let uri = a.addr.parsed_uri();
                acc = mix(acc, uri.host);
                acc ^= u64::from(uri.port.unwrap_or(0));
                acc ^= u64::from(a.expires.unwrap_or(0));
                acc = mix(acc, a.instance.unwrap_or_default());
                acc ^= u64::from(a.reg_id.unwrap_or(0)) ^ u64::from(a.q.unwrap_or(0));
            }
        }
    }
    for name in [HeaderName::Path, HeaderName::Supported, HeaderName::Require] {
        for t in m.tokens(name) {
            acc = mix(acc, t);
        }
    }
    for p in m.headers_named(HeaderName::Path) {
        acc = mix(acc, p);
    }
    acc = mix(acc, m.header(HeaderName::UserAgent).unwrap_or_default());
    acc
}

/// The corresponding read set for the other messages: what a stateful proxy / presence
/// server looks at (Vias, From/To, Call-ID, CSeq, Max-Forwards, Contacts, Route and
/// Record-Route, Content-Type, Event, Expires).
#[inline]
fn proxy_reads(m: &Message<'_>) -> u64 {
    if m.is_request() {
        m.check_request().expect("valid request");
    } else {
        m.check_response().expect("valid response");
    }
    let mut acc = 0u64;
    for v in m.vias() {
        let v = v.expect("Via");
        acc = mix(acc, v.branch.unwrap_or_default());
        acc = mix(acc, v.received.unwrap_or_default());
    }
    acc ^= u64::from(m.max_forwards().unwrap_or(0));
    let from = m.from().expect("From");
    acc = mix(acc, from.tag().unwrap_or_default());
    acc = mix(acc, from.parsed_uri().host);
    let to = m.to().expect("To");
    acc = mix(acc, to.tag().unwrap_or_default());
    acc = mix(acc, to.parsed_uri().host);
    acc = mix(acc, m.call_id().expect("Call-ID"));
    acc ^= u64::from(m.cseq().expect("CSeq").seq);
    acc ^= u64::from(m.expires().unwrap_or(0));
    for c in m.contacts() {
        if let Contact::Addr(a) = c.expect("Contact") {
            acc = mix(acc, a.addr.parsed_uri().host);
        }
    }
    for name in [HeaderName::Route, HeaderName::RecordRoute] {
        for r in m.routes(name) {
            let r = r.expect("route");
            let uri = r.parsed_uri();
            acc = mix(acc, uri.host);
            acc ^= u64::from(uri.param(b"lr").is_some());
        }
    }
    if let Some(ct) = m.content_type() {
        acc = mix(acc, ct.subtype);
    }
    if let Some(ev) = m.event() {
        acc = mix(acc, ev.value);
    }
    acc = mix(acc, m.body);
    acc
}

fn full(m: &Message<'_>) -> u64 {
    if m.method() == Some(sip_wire::Method::Register) {
        registrar_reads(m)
    } else {
        proxy_reads(m)
    }
}

/// Sanity checks before measuring: every message parses, validates and is framed whole.
fn validate() {
    for (name, text) in MESSAGES {
        let m = Message::parse(text.as_bytes(), Framing::Datagram).expect(name);
        assert_eq!(m.len, text.len(), "{name}: framed length");
        full(&m);
    }
    let inv = Message::parse(msgs::INVITE.as_bytes(), Framing::Datagram).unwrap();
    assert_eq!(inv.body, msgs::INVITE_SDP.as_bytes());
    let ok = Message::parse(msgs::OK_INVITE.as_bytes(), Framing::Datagram).unwrap();
    assert_eq!(ok.body, msgs::OK_INVITE_SDP.as_bytes());
}

fn parse_only(c: &mut Criterion) {
    validate();
    for (group, per_bytes) in [("parse_msgs", false), ("parse_bytes", true)] {
        let mut g = c.benchmark_group(group);
        for (name, text) in MESSAGES {
            let buf = text.as_bytes();
            g.throughput(if per_bytes {
                Throughput::Bytes(buf.len() as u64)
            } else {
                Throughput::Elements(1)
            });
            g.bench_function(name, |b| {
                b.iter(|| {
                    let m = Message::parse(black_box(buf), Framing::Datagram).unwrap();
                    black_box(m.header_count())
                })
            });
        }
        g.finish();
    }
}

fn parse_full(c: &mut Criterion) {
    for (group, per_bytes) in [("full_msgs", false), ("full_bytes", true)] {
        let mut g = c.benchmark_group(group);
        for (name, text) in MESSAGES {
            let buf = text.as_bytes();
            g.throughput(if per_bytes {
                Throughput::Bytes(buf.len() as u64)
            } else {
                Throughput::Elements(1)
            });
            g.bench_function(format!("{name}_full"), |b| {
                b.iter(|| {
                    let m = Message::parse(black_box(buf), Framing::Datagram).unwrap();
                    black_box(full(&m))
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, parse_only, parse_full);
criterion_main!(benches);
