//! The per-worker SIP core: everything between a received message and its reply.
//!
//! `Core` implements the driver-facing `Handler`: it parses, validates, answers stateless
//! rejects, OPTIONS and REGISTER, and picks the reply address from the top Via. It owns no
//! socket and reads no clock: bytes, source and time come in, bytes to send go out.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sip_wire::{Checked, ErrorKind, Framing, HeaderName, Message, Method, StartLine, Via, Writer};

use crate::date::DateCache;
use crate::durable::Gate;
use crate::io::{Dest, Handler, Millis, Outbox, Source, Transport};
use crate::mailbox::Mailbox;
use crate::pinger::Pinger;
use crate::registrar::{RegReply, Registrar};
use crate::stateful::{Proxy, ResponseFate};

/// Methods this node implements; the Allow header of 405 and OPTIONS replies.
pub const ALLOW: &[u8] = b"REGISTER, OPTIONS, ACK";
/// The same with the proxy on: every method is routed.
pub const ALLOW_PROXY: &[u8] =
    b"INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, INFO, UPDATE, PRACK, SUBSCRIBE, NOTIFY, REFER, PUBLISH";
/// Option tags this node supports (RFC 3261 §8.2.2.3).
pub const SUPPORTED: &[&[u8]] = &[b"path"];
const SUPPORTED_HEADER: &[u8] = b"path";
const ACCEPT: &[u8] = b"application/sdp";

/// Counters of the SIP core, read by the control plane.
#[derive(Debug, Default)]
pub struct CoreStats {
    pub requests: AtomicU64,
    pub responses_received: AtomicU64,
    pub replies_sent: AtomicU64,
    /// Requests answered with a 4xx/5xx reject built from a parse or check failure.
    pub rejected_malformed: AtomicU64,
    /// Messages that could not be answered at all (no usable Via, malformed response...).
    pub dropped: AtomicU64,
    pub oversize: AtomicU64,
    pub options: AtomicU64,
    pub acks_absorbed: AtomicU64,
    /// Replies that did not fit the send buffer.
    pub reply_overflow: AtomicU64,
    /// REGISTERs refused (503) because no room was left to park their reply (sync
    /// durability).
    pub durability_busy: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Value of the Server header (empty: none).
    pub server_header: String,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            server_header: concat!("sipmesh/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

pub struct Core {
    cfg: CoreConfig,
    registrar: Registrar,
    /// `sync` durability: REGISTER replies wait for their records to be durable.
    gate: Option<Gate>,
    stats: Arc<CoreStats>,
    date: DateCache,
    tag_key: std::hash::RandomState,
    /// NAT keepalives (None: off).
    pinger: Option<Pinger>,
    /// The stateful proxy (None: registrar only).
    proxy: Option<Proxy>,
    /// Messages for other workers' transactions, and theirs for ours.
    mailbox: Option<Mailbox>,
}

/// One request being answered: the message, how to address the reply, where it came
/// from and when.
struct Incoming<'m, 'a> {
    m: &'m Message<'a>,
    to: Addressee<'a>,
    src: &'m Source,
    now: Millis,
}

impl Core {
    pub fn new(cfg: CoreConfig, registrar: Registrar, stats: Arc<CoreStats>) -> Core {
        Core {
            cfg,
            registrar,
            gate: None,
            stats,
            date: DateCache::default(),
            tag_key: std::hash::RandomState::new(),
            pinger: None,
            proxy: None,
            mailbox: None,
        }
    }

    /// Steering of responses between workers.
    pub fn with_mailbox(mut self, m: Mailbox) -> Core {
        self.mailbox = Some(m);
        self
    }

    /// Handles the messages other workers passed to this one.
    fn drain_mailbox<O: Outbox>(&mut self, now: Millis, out: &mut O) {
        let Some(mut mb) = self.mailbox.take() else {
            return;
        };
        // A bounded batch per call, so a flood from the others cannot starve our socket.
        for _ in 0..256 {
            if !mb.recv(|msg, src| self.handle(msg, src, now, out, false)) {
                break;
            }
        }
        self.mailbox = Some(mb);
    }

    /// Stateful proxying of every request the node does not answer itself.
    pub fn with_proxy(mut self, p: Proxy) -> Core {
        self.proxy = Some(p);
        self
    }

    fn allow(&self) -> &'static [u8] {
        if self.proxy.is_some() {
            ALLOW_PROXY
        } else {
            ALLOW
        }
    }

    /// NAT keepalives: this worker sends the pings the control plane orders.
    pub fn with_pinger(mut self, p: Pinger) -> Core {
        self.pinger = Some(p);
        self
    }

    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// `sync` durability: every 200 to a REGISTER is held until the change records the
    /// worker had pushed when it was decided are durable (see [`crate::durable`]).
    pub fn with_durability_gate(mut self, gate: Gate) -> Core {
        self.gate = Some(gate);
        self
    }

    /// Replies waiting for durability.
    pub fn parked_replies(&self) -> usize {
        self.gate.as_ref().map_or(0, Gate::pending)
    }

    /// A To tag for a stateless reply: the same for retransmissions of a request (hash of
    /// Call-ID, From tag and branch under a per-process random key), never a counter.
    fn to_tag(&self, a: &Addressee<'_>, out: &mut [u8; 16]) {
        let mut h = self.tag_key.build_hasher();
        h.write(a.call_id);
        h.write(a.from_tag);
        h.write(a.via.branch.unwrap_or_default());
        let v = h.finish();
        for (i, b) in out.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((v >> (60 - 4 * i)) & 0xf) as usize];
        }
    }

    /// Send a stateless reply to `req`: the response head (RFC 3261 §8.2.6.2), whatever
    /// `extra` adds, Server, Date and an empty body.
    fn reply<O: Outbox>(
        &mut self,
        req: &Incoming<'_, '_>,
        out: &mut O,
        code: u16,
        reason: &str,
        extra: impl FnOnce(&Self, &mut Writer<'_>),
    ) {
        let (m, a, src) = (req.m, &req.to, req.src);
        let dest = response_dest(&a.via, src);
        let mut tag = [0u8; 16];
        self.to_tag(a, &mut tag);
        let date = {
            let d = self.date.get(req.now / 1000);
            let mut b = [0u8; 29];
            b.copy_from_slice(d);
            b
        };
        let mut ok = true;
        out.send(dest, |buf| {
            let mut w = Writer::new(buf);
            w.response_head_with(
                m,
                a.via_well_formed.then_some(&a.via),
                a.to_has_tag,
                code,
                reason,
                src.remote.ip(),
                src.remote.port(),
                Some(&tag),
            );
            extra(self, &mut w);
            if !self.cfg.server_header.is_empty() {
                w.header("Server", self.cfg.server_header.as_bytes());
            }
            w.header("Date", &date);
            w.put(b"Content-Length: 0\r\n\r\n");
            match w.finish() {
                Some(n) => n,
                None => {
                    ok = false;
                    0
                }
            }
        });
        if ok {
            self.stats.replies_sent.fetch_add(1, Relaxed);
        } else {
            self.stats.reply_overflow.fetch_add(1, Relaxed);
        }
    }

    /// Answer a request that failed to parse or check with the status its defect calls
    /// for, or drop it (counted) when there is no Via to answer to.
    fn reject<O: Outbox>(
        &mut self,
        m: &Message<'_>,
        src: &Source,
        now: Millis,
        out: &mut O,
        e: ErrorKind,
    ) {
        // RFC 3261 §17.1.1.3 / §17.2.1: an ACK is never answered.
        if m.method() == Some(Method::Ack) {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        }
        let Some(to) = Addressee::from_raw(m) else {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        };
        let req = Incoming { m, to, src, now };
        // RFC 4475 §3.1.2.18: an unknown method is reported as such first.
        if let (Some(Method::Other(_)), ErrorKind::CSeqMethodMismatch) = (m.method(), e) {
            return self.not_implemented(&req, out);
        }
        self.stats.rejected_malformed.fetch_add(1, Relaxed);
        self.reply(&req, out, e.status(), e.reason(), |_, _| {});
    }

    fn request<O: Outbox>(&mut self, m: &Message<'_>, src: &Source, now: Millis, out: &mut O) {
        let checked = match m.check_request() {
            Ok(c) => c,
            Err(e) => return self.reject(m, src, now, out, e),
        };
        let method = checked.cseq.method;
        if method == Method::Ack && self.proxy.is_none() {
            // No INVITE server transactions: an ACK has nothing to match.
            self.stats.acks_absorbed.fetch_add(1, Relaxed);
            return;
        }
        let req = Incoming {
            m,
            to: Addressee::from_checked(&checked),
            src,
            now,
        };
        // RFC 3261 §16.3 step 2 / §8.2: Max-Forwards 0 is not processed further.
        if checked.max_forwards == Some(0) {
            return self.reply(&req, out, 483, "Too Many Hops", |_, _| {});
        }
        // RFC 3261 §16.3 step 2 / §8.2: Max-Forwards 0 is checked above; requests the node
        // does not answer itself go to the proxy: everything but REGISTER and an OPTIONS
        // addressed to the node (no user part).
        let to_us = method == Method::Register
            || (method == Method::Options && checked.request_uri.user.is_none());
        if !to_us && let Some(p) = self.proxy.as_mut() {
            // RFC 3261 §16.3 step 5: Proxy-Require must name only what we support.
            if m.tokens(HeaderName::ProxyRequire).any(|t| !is_supported(t)) {
                return self.reply(&req, out, 420, "Bad Extension", |_, w| {
                    for t in m
                        .tokens(HeaderName::ProxyRequire)
                        .filter(|t| !is_supported(t))
                    {
                        w.header("Unsupported", t);
                    }
                });
            }
            p.on_request(m, &checked, src, now, &mut self.registrar, out);
            return;
        }
        // RFC 3261 §8.2.1: method inspection.
        match method {
            Method::Register | Method::Options => {}
            Method::Other(_) => return self.not_implemented(&req, out),
            Method::Cancel | Method::Bye => {
                // RFC 3261 §9.2 / §15.1.2: no matching transaction or dialog.
                return self.reply(&req, out, 481, "Call/Transaction Does Not Exist", |_, _| {});
            }
            _ => {
                return self.reply(&req, out, 405, "Method Not Allowed", |c, w| {
                    w.header("Allow", c.allow());
                });
            }
        }
        // RFC 3261 §8.2.2.3: every Require option tag must be supported, else 420 listing
        // the unsupported ones.
        if m.tokens(HeaderName::Require).any(|t| !is_supported(t)) {
            return self.reply(&req, out, 420, "Bad Extension", |_, w| {
                for t in m.tokens(HeaderName::Require).filter(|t| !is_supported(t)) {
                    w.header("Unsupported", t);
                }
            });
        }
        if method == Method::Options {
            // RFC 3261 §11.2: Allow, Accept and Supported SHOULD be present.
            self.stats.options.fetch_add(1, Relaxed);
            return self.reply(&req, out, 200, "OK", |c, w| {
                w.header("Allow", c.allow())
                    .header("Accept", ACCEPT)
                    .header("Supported", SUPPORTED_HEADER);
            });
        }
        // Sync durability: the 200 will be parked, so there must be room for it before
        // anything changes.
        if let Some(g) = self.gate.as_mut()
            && !g.has_room()
        {
            self.stats.durability_busy.fetch_add(1, Relaxed);
            return self.reply(&req, out, 503, "Durability Queue Full", |_, w| {
                w.put(b"Retry-After: 1\r\n");
            });
        }
        match self.registrar.register(m, &checked, src, now) {
            RegReply::Ok => {
                let ok = |core: &Self, w: &mut Writer<'_>| {
                    core.registrar.write_bindings(m, w, now);
                    w.header("Supported", SUPPORTED_HEADER);
                };
                // The reply shows bindings whose records may not be durable yet: it waits
                // for every record this worker has pushed so far.
                let pos = self.registrar.records_pushed();
                match self.gate.take() {
                    Some(mut g) if !g.is_durable(pos) => {
                        self.reply(&req, &mut g.parking(pos), 200, "OK", ok);
                        self.gate = Some(g);
                    }
                    g => {
                        self.gate = g;
                        self.reply(&req, out, 200, "OK", ok);
                    }
                }
            }
            RegReply::Reject(r) => self.reply(&req, out, r.code, r.reason, |_, w| {
                if let Some(me) = r.min_expires {
                    // RFC 3261 §10.3 step 7 / §21.4.17
                    w.put(b"Min-Expires: ").put_u64(u64::from(me)).crlf();
                }
                if let Some(ra) = r.retry_after {
                    w.put(b"Retry-After: ").put_u64(u64::from(ra)).crlf();
                }
            }),
        }
    }

    fn not_implemented<O: Outbox>(&mut self, req: &Incoming<'_, '_>, out: &mut O) {
        // RFC 3261 §8.2.1: an unknown method is 501.
        self.reply(req, out, 501, "Not Implemented", |c, w| {
            w.header("Allow", c.allow());
        });
    }
}

/// What a reply to one request needs from it, parsed once.
struct Addressee<'a> {
    /// The top Via (leniently parsed when the request failed its checks).
    via: Via<'a>,
    /// Whether `via` parsed strictly (otherwise it is copied into the reply as written).
    via_well_formed: bool,
    to_has_tag: bool,
    call_id: &'a [u8],
    from_tag: &'a [u8],
}

impl<'a> Addressee<'a> {
    fn from_checked(c: &Checked<'a>) -> Self {
        Addressee {
            via: c.top_via,
            via_well_formed: true,
            to_has_tag: c.to.tag().is_some(),
            call_id: c.call_id,
            from_tag: c.from.tag().unwrap_or_default(),
        }
    }

    /// For a request that failed its checks: `None` when not even a lenient top Via
    /// can be read (then there is nowhere to send a reply).
    fn from_raw(m: &Message<'a>) -> Option<Self> {
        let (via, via_well_formed) = match m.top_via() {
            Some(v) => (v, true),
            None => (m.top_via_lenient()?, false),
        };
        Some(Addressee {
            via,
            via_well_formed,
            to_has_tag: m.to().is_some_and(|t| t.tag().is_some()),
            call_id: m.call_id().unwrap_or_default(),
            from_tag: m.from().and_then(|f| f.tag()).unwrap_or_default(),
        })
    }
}

fn is_supported(tag: &[u8]) -> bool {
    SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(tag))
}

/// Where a response goes (RFC 3261 §18.2.2, RFC 3581 §4): back on the connection for
/// TCP; for UDP to `maddr` when it is a literal address, else to the source address with
/// the source port when rport was asked for, or the sent-by port (default 5060).
pub fn response_dest(via: &Via<'_>, src: &Source) -> Dest {
    if src.transport == Transport::Tcp
        && let Some(c) = src.conn
    {
        return Dest::Conn(c);
    }
    let port = if via.rport.is_some() {
        src.remote.port()
    } else {
        via.port.unwrap_or(5060)
    };
    if let Some(maddr) = via.maddr
        && let Some(ip) = core::str::from_utf8(maddr)
            .ok()
            .and_then(|s| s.parse::<IpAddr>().ok())
    {
        return Dest::Udp(SocketAddr::new(ip, port));
    }
    Dest::Udp(SocketAddr::new(src.remote.ip(), port))
}

impl Core {
    /// One message; `steer`: a message for another worker's transaction may be passed on
    /// (not when it came from another worker already).
    fn handle<O: Outbox>(
        &mut self,
        msg: &[u8],
        src: &Source,
        now: Millis,
        out: &mut O,
        steer: bool,
    ) {
        let framing = match src.transport {
            Transport::Udp => Framing::Datagram,
            Transport::Tcp => Framing::Stream,
        };
        match Message::parse(msg, framing) {
            Ok(m) => match m.start {
                StartLine::Request { .. } => {
                    self.stats.requests.fetch_add(1, Relaxed);
                    self.request(&m, src, now, out);
                }
                StartLine::Response { .. } => {
                    self.stats.responses_received.fetch_add(1, Relaxed);
                    let fate = match self.proxy.as_mut() {
                        Some(p) => p.on_response(&m, now, out),
                        None => ResponseFate::NotOurs,
                    };
                    match fate {
                        ResponseFate::Done => return,
                        ResponseFate::Steer(w) => {
                            let sent = steer
                                && self
                                    .mailbox
                                    .as_mut()
                                    .is_some_and(|mb| mb.send(w, src, m.as_bytes()));
                            if !sent {
                                self.stats.dropped.fetch_add(1, Relaxed);
                            }
                            return;
                        }
                        ResponseFate::NotOurs => {}
                    }
                    // Answers to keepalive pings.
                    let ping = self.pinger.as_ref().is_some_and(|p| {
                        m.top_via()
                            .and_then(|v| v.branch)
                            .is_some_and(|b| p.on_response(b))
                    });
                    if !ping {
                        self.stats.dropped.fetch_add(1, Relaxed);
                    }
                }
            },
            Err(e) => match Message::parse_for_reject(msg) {
                Some(m) => {
                    self.stats.requests.fetch_add(1, Relaxed);
                    self.reject(&m, src, now, out, e);
                }
                None => {
                    self.stats.dropped.fetch_add(1, Relaxed);
                }
            },
        }
    }
}

impl Handler for Core {
    fn on_message<O: Outbox>(&mut self, msg: &[u8], src: &Source, now: Millis, out: &mut O) {
        if self.mailbox.is_some() {
            self.drain_mailbox(now, out);
        }
        self.handle(msg, src, now, out, true);
    }

    fn on_oversize<O: Outbox>(&mut self, head: &[u8], src: &Source, now: Millis, out: &mut O) {
        self.stats.oversize.fetch_add(1, Relaxed);
        // RFC 3261 §18.1.1 / §21.5.14: 513 Message Too Large.
        match Message::parse_for_reject(head) {
            Some(m) if m.method() != Some(Method::Ack) => {
                let Some(to) = Addressee::from_raw(&m) else {
                    self.stats.dropped.fetch_add(1, Relaxed);
                    return;
                };
                let req = Incoming {
                    m: &m,
                    to,
                    src,
                    now,
                };
                self.reply(&req, out, 513, "Message Too Large", |_, _| {});
            }
            _ => {
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    fn on_tick<O: Outbox>(&mut self, now: Millis, out: &mut O) {
        self.registrar.on_tick(now);
        if self.mailbox.is_some() {
            self.drain_mailbox(now, out);
        }
        if let Some(p) = self.proxy.as_mut() {
            p.on_tick(now, out);
        }
        if let Some(p) = self.pinger.as_mut() {
            p.run(out);
        }
        if let Some(g) = self.gate.as_mut() {
            g.release(out);
        }
    }

    fn doorbell(&self) -> Option<std::os::fd::RawFd> {
        self.gate.as_ref().map(Gate::doorbell)
    }

    fn on_wake<O: Outbox>(&mut self, _now: Millis, out: &mut O) {
        if let Some(g) = self.gate.as_mut() {
            g.release(out);
        }
    }
}
