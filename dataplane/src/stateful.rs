//! A worker's transaction-stateful proxy (RFC 3261 §16, the OpenSIPS `tm` +
//! `lookup()` role): requests for users of our domains are looked up in the location
//! table and forked in parallel to every contact; in-dialog requests follow their Route
//! set; the best final response goes back (§16.7); CANCEL reaches every pending branch
//! (§16.10); every hop is a server or client transaction ([`crate::txn`]) with its
//! retransmissions and timers.
//!
//! Sans-IO like the rest of the core: messages, sources and time come in, datagrams to
//! send go out through the [`Outbox`].
//!
//! Limits of this step: targets are reached over UDP (a contact registered over TCP is
//! sent to over UDP at its source address); no DNS (a foreign Request-URI must name an IP
//! address); the bytes a transaction may retransmit are kept in a buffer of its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sip_wire::{Checked, Framing, HeaderName, Message, Method, Uri, Writer};

use crate::core::response_dest;
use crate::io::{Dest, Millis, Outbox, Source, Transport};
use crate::proxy::{
    Decision, Forward, MAX_BRANCHES, ResponseContext, cancel_or_ack, forward_request,
    forward_response,
};
use crate::registrar::{Lookup, Registrar};
use crate::txn::table::{BranchId, Keys, TxId, TxTable};
use crate::txn::{Action, Event, Kind, Reliability, TimerConfig, Transaction};
use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{ChangeRecordRef, ChangeRef, next_version};
use sipmesh_cluster::dialog::{
    Dialog, DialogState, DialogTable, EndReason, Legs, Party, Profiles, dialog_key,
};
use sipmesh_cluster::ring::{ChangeProducer, pop_bytes, push_bytes};

/// The URI of the first Contact of `m`.
fn first_contact<'a>(m: &Message<'a>) -> Option<&'a [u8]> {
    m.contacts().find_map(|c| match c {
        Ok(sip_wire::Contact::Addr(a)) => Some(a.addr.uri),
        _ => None,
    })
}
use sipmesh_cluster::ownership::{Segment, bucket_of};

/// The ownership slot of untagged data (dialogs carry no tag yet).
const DEFAULT_TAG_SLOT: usize = 0;

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// T1, T2, T4, timer C.
    pub timers: TimerConfig,
    /// Our SIP address: Via sent-by and Record-Route.
    pub local: SocketAddr,
    /// Record-Route INVITEs (so in-dialog requests come through us).
    pub record_route: bool,
    /// Lifetime limit of a call (ms).
    pub dialog_lifetime_ms: u64,
    /// In-dialog OPTIONS pings of both sides every this many ms (0: none).
    pub dialog_ping_ms: u64,
    /// Serial forking: contacts are tried by decreasing q, those of equal q together,
    /// the next set when the current one fails (RFC 3261 §16.6); else all in parallel.
    pub serial_forking: bool,
}

/// What the proxy shares with the rest of the node for dialogs.
pub struct DialogShare {
    /// Every live call.
    pub table: Arc<DialogTable>,
    /// Where finished calls go, as CDR lines (a JSON object and a newline, framed by a
    /// u32 LE length); the control plane writes them to the CDR file.
    pub cdrs: rtrb::Producer<u8>,
    /// The ownership segment: a CDR is written where the node acts on the dialog.
    pub segment: Arc<Segment>,
    /// Named counters of live calls.
    pub profiles: Arc<Profiles>,
    /// This worker's ring of dialog change records (replication).
    pub changes: ChangeProducer,
    /// Calls to end from the middle (lifetime limit, operator), ordered by the control
    /// plane: frames of a u32 LE length, a reason octet ([`ORDER_LIFETIME`],
    /// [`ORDER_ADMIN`]) and the dialog's key.
    pub orders: rtrb::Consumer<u8>,
}

/// Order reason: the call's lifetime ran out.
pub const ORDER_LIFETIME: u8 = 1;
/// Order reason: an operator ends it.
pub const ORDER_ADMIN: u8 = 2;
/// Order: ping both sides of the call in the dialog.
pub const ORDER_PING: u8 = 3;

/// Ping rounds a confirmed call answered at `answered_ms` is due at `now` (every
/// `interval` ms from the answer; 0: never).
pub fn ping_rounds_due(answered_ms: u64, now: Millis, interval: u64) -> u32 {
    if interval == 0 || answered_ms == 0 {
        return 0;
    }
    (now.saturating_sub(answered_ms) / interval).min(u64::from(u32::MAX)) as u32
}

/// Frames an order to end the call of `key` into `p`; false when the ring is full.
pub fn push_end_order(p: &mut rtrb::Producer<u8>, reason: u8, key: &[u8]) -> bool {
    push_bytes(p, &[&[reason], key])
}

/// Counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Requests forwarded (one per branch).
    pub forwarded: AtomicU64,
    /// Responses passed upstream.
    pub relayed: AtomicU64,
    /// Requests answered by the proxy itself (404, 480, 481, 408, 487 ...).
    pub answered: AtomicU64,
    /// Retransmissions absorbed or answered from a transaction.
    pub retransmissions: AtomicU64,
    /// Responses that matched no transaction here.
    pub stray_responses: AtomicU64,
    /// Responses for a transaction of another worker (steered to it).
    pub other_worker: AtomicU64,
    /// Client transactions that timed out (timer B, F, or C without a provisional).
    pub timeouts: AtomicU64,
    /// CANCELs received that found their INVITE.
    pub cancels: AtomicU64,
    /// Calls tracked from their INVITE.
    pub dialogs_created: AtomicU64,
    /// CDRs handed to the writer.
    pub cdrs: AtomicU64,
    /// CDRs dropped: the writer's ring was full.
    pub cdrs_dropped: AtomicU64,
    /// Calls whose end another node records (not ours to act on).
    pub cdrs_not_owner: AtomicU64,
    /// Dialog change records dropped: the ring was full (the peers miss that state).
    pub dialog_records_dropped: AtomicU64,
}

/// What a response belongs to, when not to this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFate {
    /// Handled (or dropped) here.
    Done,
    /// It belongs to a transaction of worker `0`: steer it there.
    Steer(u16),
    /// Not a response to anything we sent.
    NotOurs,
}

pub(crate) struct ServerCtx {
    /// The request as received: our own responses to it (408, 487) are built from it.
    request: Vec<u8>,
    /// Where responses go.
    upstream: Dest,
    /// The latest response sent upstream (a retransmitted request gets it again).
    response: Vec<u8>,
    rc: ResponseContext,
    branches: [Option<TxId>; MAX_BRANCHES],
    /// A final response of a branch kept until every branch is done (§16.7 step 4).
    held: [Vec<u8>; MAX_BRANCHES],
    invite: bool,
    /// A CANCEL came: branches cancel as soon as they may (after a provisional, §9.1).
    cancelled: bool,
    /// The key of the dialog this INVITE creates.
    dialog: Option<Arc<[u8]>>,
    /// Targets not tried yet (serial forking).
    rest: Vec<Target>,
}

pub(crate) struct ClientCtx {
    parent: TxId,
    index: usize,
    /// The request as sent (retransmissions, CANCEL, ACK).
    request: Vec<u8>,
    dest: SocketAddr,
    /// The CANCEL of this branch, once sent.
    cancel: Option<TxId>,
}

pub(crate) enum Ctx {
    Server(Box<ServerCtx>),
    Client(ClientCtx),
    /// A request of our own (a CANCEL, a BYE ending a call, an in-dialog ping, a
    /// NOTIFY): its bytes, where, and what its failure means.
    Own {
        request: Vec<u8>,
        dest: SocketAddr,
        purpose: Purpose,
    },
    /// A request the node answered itself (PUBLISH, SUBSCRIBE): its final response,
    /// sent again to a retransmission (RFC 3261 §17.2.2).
    Local {
        response: Vec<u8>,
        upstream: Dest,
    },
}

/// What the outcome of a request of our own matters to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Nothing.
    None,
    /// An in-dialog ping of the call of this key: 481 or no answer ends the call.
    Ping(Vec<u8>),
    /// A NOTIFY to the watcher of this key: 481 or no answer removes the watcher.
    Notify(Vec<u8>),
}

#[derive(Clone)]
struct Target {
    uri: Vec<u8>,
    path: Vec<u8>,
    dest: SocketAddr,
    /// q in thousandths (no q: 1000).
    q: u16,
}

impl Target {
    /// The next hop of a request whose Request-URI stays as it is.
    fn hop(dest: SocketAddr) -> Target {
        Target {
            uri: Vec::new(),
            path: Vec::new(),
            dest,
            q: 1000,
        }
    }
}

/// One worker's proxy.
pub struct Proxy {
    pub(crate) cfg: ProxyConfig,
    keys: Arc<Keys>,
    pub(crate) node: u16,
    pub(crate) worker: u16,
    pub(crate) txns: TxTable<Ctx>,
    pub(crate) stats: Arc<ProxyStats>,
    rr: Vec<u8>,
    /// `cfg.local` as text (Via sent-by, Contact), formatted once.
    pub(crate) local_text: String,
    buf: Vec<u8>,
    targets: Vec<Target>,
    fired: Vec<(TxId, Action)>,
    ended: Vec<(TxId, Ctx)>,
    pub(crate) dialogs: Option<DialogShare>,
    dkey: Vec<u8>,
    cdr: Vec<u8>,
    /// The presence server (None: PUBLISH and SUBSCRIBE are routed like the rest).
    pub(crate) presence: Option<crate::presence::PresenceShare>,
    /// Calls whose new state BLF watchers are to hear of (after the message at hand).
    blf: Vec<Dialog>,
    /// Watchers to NOTIFY when the driver has room (see `notify_presentity`).
    pub(crate) notify_queue: std::collections::VecDeque<Box<[u8]>>,
}

/// Next hop of a URI with a literal address (no DNS here).
pub(crate) fn uri_addr(uri: &Uri<'_>) -> Option<SocketAddr> {
    let h = uri.host;
    let h = h
        .strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .unwrap_or(h);
    let ip: IpAddr = std::str::from_utf8(h).ok()?.parse().ok()?;
    Some(SocketAddr::new(ip, uri.port.unwrap_or(5060)))
}

/// The URI of the first element of a Route-like list.
pub(crate) fn first_route_uri(v: &[u8]) -> Option<Uri<'_>> {
    let first = sip_wire::write::split_first(v).0;
    let inner = first
        .iter()
        .position(|&b| b == b'<')
        .and_then(|s| {
            first[s + 1..]
                .iter()
                .position(|&b| b == b'>')
                .map(|e| &first[s + 1..s + 1 + e])
        })
        .unwrap_or(first);
    Uri::parse(inner).ok()
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        keys: Arc<Keys>,
        node: u16,
        worker: u16,
        now: Millis,
        stats: Arc<ProxyStats>,
    ) -> Proxy {
        let rr = format!("sip:{};lr", cfg.local).into_bytes();
        let local_text = cfg.local.to_string();
        Proxy {
            cfg,
            keys,
            node,
            worker,
            txns: TxTable::new(now, 4096),
            stats,
            rr,
            local_text,
            buf: vec![0; 65_535],
            targets: Vec::new(),
            fired: Vec::new(),
            ended: Vec::new(),
            dialogs: None,
            dkey: Vec::new(),
            cdr: Vec::with_capacity(2048),
            presence: None,
            blf: Vec::new(),
            notify_queue: std::collections::VecDeque::new(),
        }
    }

    /// Serve PUBLISH and SUBSCRIBE for the users of our domains.
    pub fn with_presence(mut self, share: crate::presence::PresenceShare) -> Proxy {
        self.presence = Some(share);
        self
    }

    /// After each message and tick: BLF watchers hear of the calls that changed, and
    /// NOTIFYs held back for room go out as far as there is room now.
    fn after<O: Outbox>(&mut self, now: Millis, out: &mut O) {
        while let Some(d) = self.blf.pop() {
            self.dialog_changed(&d, now, out);
        }
        if !self.notify_queue.is_empty() {
            self.drain_notifies(now, out);
        }
    }
    /// Track every call in `share.table` and write a CDR when it ends.
    pub fn with_dialogs(mut self, share: DialogShare) -> Proxy {
        self.dialogs = Some(share);
        self
    }

    /// A call starts: its INVITE is forwarded.
    fn dialog_start(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        now: Millis,
    ) -> Option<Arc<[u8]>> {
        let d = self.dialogs.as_ref()?;
        let from_tag = c.from.tag().unwrap_or_default();
        dialog_key(c.call_id, from_tag, &mut self.dkey);
        let dialog = Dialog {
            id: d.table.next_id(NodeId(self.node), self.worker),
            state: DialogState::Unconfirmed,
            call_id: Arc::from(c.call_id),
            from_tag: Arc::from(from_tag),
            to_tag: Box::default(),
            early_tags: 0,
            caller: Arc::from(c.from.uri),
            callee: Arc::from(c.request_uri.raw),
            created_ms: now,
            answered_ms: 0,
            ended_ms: 0,
            expires_ms: now + self.cfg.dialog_lifetime_ms,
            end: None,
            origin: NodeId(self.node),
            version: next_version(0, now, self.worker),
            legs: Legs {
                from_hdr: Arc::from(m.header(HeaderName::From).unwrap_or_default()),
                to_hdr: Arc::from(m.header(HeaderName::To).unwrap_or_default()),
                caller_contact: Arc::from(first_contact(m).unwrap_or_default()),
                callee_contact: Box::default(),
                caller_addr: Some(src.remote),
                callee_addr: None,
                caller_cseq: c.cseq.seq,
                callee_cseq: 0,
                pings: 0,
            },
        };
        // Counted first: once in the table, any worker may end it.
        d.profiles.add(&dialog, 1);
        if d.table.insert(&self.dkey, dialog.clone()) {
            self.stats.dialogs_created.fetch_add(1, Relaxed);
            let key = std::mem::take(&mut self.dkey);
            self.emit(&key, &dialog, now);
            self.dkey = key;
        } else {
            d.profiles.add(&dialog, -1);
        }
        Some(Arc::from(&self.dkey[..]))
    }

    /// Atomic change of the dialog of `key` (`f` returns the new state, or `None` to
    /// leave it): a new version, and a change record for the peers.
    fn mutate(
        &mut self,
        key: &[u8],
        now: Millis,
        mut f: impl FnMut(&Dialog) -> Option<Dialog>,
    ) -> Option<Dialog> {
        let worker = self.worker;
        let d = self.dialogs.as_ref()?;
        let n = d.table.update(key, |cur| {
            f(cur).map(|mut n| {
                n.version = next_version(cur.version, now, worker);
                n
            })
        })?;
        self.emit(key, &n, now);
        Some(n)
    }

    /// The change record of a dialog's new state (an end when terminated), into this
    /// worker's dialog ring: replicated to the peers like the registrar's.
    fn emit(&mut self, key: &[u8], d: &Dialog, now: Millis) {
        let Some(share) = self.dialogs.as_mut() else {
            return;
        };
        let change = if d.state == DialogState::Terminated {
            ChangeRef::DialogEnd { key, dialog: d }
        } else {
            ChangeRef::DialogUpsert { key, dialog: d }
        };
        let rec = ChangeRecordRef {
            origin: NodeId(self.node),
            version: d.version,
            at_ms: now,
            change,
        };
        if share.changes.push(&rec).is_err() {
            self.stats.dialog_records_dropped.fetch_add(1, Relaxed);
        }
        if self
            .presence
            .as_ref()
            .is_some_and(|p| p.table.watchers() > 0)
        {
            self.blf.push(d.clone());
        }
    }

    /// The INVITE of dialog `key` got a response `code` with the callee's tag `to_tag`
    /// (`ours`: the proxy made it, e.g. a 408).
    #[allow(clippy::too_many_arguments)]
    fn dialog_response(
        &mut self,
        key: &[u8],
        code: u16,
        to_tag: &[u8],
        callee: (&[u8], Option<SocketAddr>),
        cancelled: bool,
        ours: bool,
        now: Millis,
    ) {
        let ended = self.mutate(key, now, |cur| {
            let mut n = cur.clone();
            match (code, cur.state) {
                (_, DialogState::Confirmed) => return None,
                (101..=199, DialogState::Unconfirmed | DialogState::Early)
                    if !to_tag.is_empty() && *cur.to_tag != *to_tag =>
                {
                    n.state = DialogState::Early;
                    n.to_tag = Box::from(to_tag);
                    n.early_tags = n.early_tags.saturating_add(1);
                }
                (200..=299, _) => {
                    n.state = DialogState::Confirmed;
                    n.to_tag = Box::from(to_tag);
                    n.answered_ms = now;
                    n.legs.callee_contact = Box::from(callee.0);
                    n.legs.callee_addr = callee.1;
                }
                (300..=699, _) => {
                    n.state = DialogState::Terminated;
                    n.ended_ms = now;
                    n.end = Some(if cancelled && code == 487 {
                        (EndReason::Cancelled, Party::Caller)
                    } else if ours {
                        (EndReason::Failed(code), Party::Proxy)
                    } else {
                        (EndReason::Failed(code), Party::Callee)
                    });
                }
                _ => return None,
            }
            Some(n)
        });
        if let Some(e) = ended.filter(|e| e.state == DialogState::Terminated) {
            self.dialog_ended(&e, now);
        }
    }

    /// An in-dialog request: the highest CSeq of its sender (a BYE the proxy sends later
    /// must be numbered above it, RFC 3261 §12.2.1.1).
    fn dialog_cseq(&mut self, c: &Checked<'_>, now: Millis) {
        if self.dialogs.is_none() {
            return;
        }
        let seq = c.cseq.seq;
        let mut key = std::mem::take(&mut self.dkey);
        dialog_key(c.call_id, c.from.tag().unwrap_or_default(), &mut key);
        let caller = self.mutate(&key, now, |cur| {
            (seq > cur.legs.caller_cseq).then(|| {
                let mut n = cur.clone();
                n.legs.caller_cseq = seq;
                n
            })
        });
        if caller.is_none() {
            dialog_key(c.call_id, c.to.tag().unwrap_or_default(), &mut key);
            self.mutate(&key, now, |cur| {
                (seq > cur.legs.callee_cseq).then(|| {
                    let mut n = cur.clone();
                    n.legs.callee_cseq = seq;
                    n
                })
            });
        }
        self.dkey = key;
    }

    /// Ends the call of `key` from the middle (its lifetime ran out, or an operator asked):
    /// a BYE to each side of a confirmed call (RFC 3261 §15.1.1, the proxy acting for
    /// both), and its CDR.
    pub fn end_dialog<O: Outbox>(
        &mut self,
        key: &[u8],
        reason: EndReason,
        now: Millis,
        out: &mut O,
    ) -> bool {
        let Some(ended) = self.mutate(key, now, |cur| {
            let mut n = cur.clone();
            n.state = DialogState::Terminated;
            n.ended_ms = now;
            n.end = Some((reason, Party::Proxy));
            Some(n)
        }) else {
            return false;
        };
        if ended.answered_ms > 0 {
            let l = &ended.legs;
            let mut to_tagged = l.to_hdr.to_vec();
            to_tagged.extend_from_slice(b";tag=");
            to_tagged.extend_from_slice(&ended.to_tag);
            // To the callee, as from the caller; to the caller, as from the callee.
            let legs = [
                (
                    &l.callee_contact[..],
                    l.callee_addr,
                    &l.from_hdr[..],
                    &to_tagged[..],
                    l.caller_cseq + 1,
                ),
                (
                    &l.caller_contact[..],
                    l.caller_addr,
                    &to_tagged[..],
                    &l.from_hdr[..],
                    l.callee_cseq.max(1) + 1,
                ),
            ];
            for (uri, addr, from, to, cseq) in legs {
                let Some(dest) = addr else { continue };
                self.send_own(
                    b"BYE",
                    uri,
                    from,
                    to,
                    &ended.call_id,
                    cseq,
                    dest,
                    Purpose::None,
                    b"",
                    b"",
                    now,
                    out,
                );
            }
        }
        self.dialog_ended(&ended, now);
        true
    }

    /// Pings both sides of a confirmed call with an in-dialog OPTIONS (once per round:
    /// an order repeated for the same round does nothing); a side that answers 481, or
    /// not at all, ends the call.
    fn ping_dialog<O: Outbox>(&mut self, key: &[u8], now: Millis, out: &mut O) {
        let interval = self.cfg.dialog_ping_ms;
        let Some(cur) = self.mutate(key, now, |cur| {
            let due = ping_rounds_due(cur.answered_ms, now, interval);
            (cur.state == DialogState::Confirmed && due > cur.legs.pings).then(|| {
                let mut n = cur.clone();
                n.legs.pings = due;
                n
            })
        }) else {
            return;
        };
        let l = &cur.legs;
        let mut to_tagged = l.to_hdr.to_vec();
        to_tagged.extend_from_slice(b";tag=");
        to_tagged.extend_from_slice(&cur.to_tag);
        // Above anything either side sent, and new each round (RFC 3261 §12.2.1.1).
        let cseq = l.caller_cseq.max(l.callee_cseq) + 1000 + l.pings;
        let legs = [
            (
                &l.callee_contact[..],
                l.callee_addr,
                &l.from_hdr[..],
                &to_tagged[..],
            ),
            (
                &l.caller_contact[..],
                l.caller_addr,
                &to_tagged[..],
                &l.from_hdr[..],
            ),
        ];
        for (uri, addr, from, to) in legs {
            let Some(dest) = addr else { continue };
            self.send_own(
                b"OPTIONS",
                uri,
                from,
                to,
                &cur.call_id,
                cseq,
                dest,
                Purpose::Ping(key.to_vec()),
                b"",
                b"",
                now,
                out,
            );
        }
    }

    /// A call is over: out of its profiles, and its CDR.
    fn dialog_ended(&mut self, d: &Dialog, now: Millis) {
        if let Some(s) = self.dialogs.as_ref() {
            s.profiles.add(d, -1);
        }
        self.cdr(d, now);
    }

    /// Sends a request of our own as a client transaction (retransmitted until answered).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_own<O: Outbox>(
        &mut self,
        method: &[u8],
        uri: &[u8],
        from: &[u8],
        to: &[u8],
        call_id: &[u8],
        cseq: u32,
        dest: SocketAddr,
        purpose: Purpose,
        extra: &[u8],
        body: &[u8],
        now: Millis,
        out: &mut O,
    ) {
        let (txn, _) = Transaction::client(
            Kind::NonInvite,
            Reliability::Unreliable,
            self.cfg.timers,
            false,
            now,
        );
        let id = self.txns.insert_client(
            method,
            txn,
            Ctx::Own {
                request: Vec::new(),
                dest,
                purpose,
            },
        );
        let mut branch = [0u8; 48];
        let bn = self.keys.branch(
            BranchId {
                node: self.node,
                worker: self.worker,
                id,
            },
            &mut branch,
        );
        let mut w = Writer::new(&mut self.buf);
        w.request_line(method, uri);
        w.put(b"Via: SIP/2.0/UDP ")
            .put_str(&self.local_text)
            .put(b";branch=")
            .put(&branch[..bn])
            .crlf();
        w.put(b"Max-Forwards: 70\r\n");
        w.put(b"From: ").put(from).crlf();
        w.put(b"To: ").put(to).crlf();
        w.put(b"Call-ID: ").put(call_id).crlf();
        w.put(b"CSeq: ")
            .put_u64(u64::from(cseq))
            .put(b" ")
            .put(method)
            .crlf();
        w.put(extra);
        w.put(b"Content-Length: ")
            .put_u64(body.len() as u64)
            .put(b"\r\n\r\n")
            .put(body);
        let Some(n) = w.finish() else {
            self.txns.remove(id);
            return;
        };
        let bytes = self.buf[..n].to_vec();
        Self::send(out, Dest::Udp(dest), &bytes);
        if let Some((_, Ctx::Own { request, .. })) = self.txns.get_mut(id) {
            *request = bytes;
        }
    }

    /// An in-dialog BYE: the call ends, hung up by whoever sent it.
    fn dialog_bye(&mut self, c: &Checked<'_>, now: Millis) {
        if self.dialogs.is_none() {
            return;
        }
        let (from_tag, to_tag) = (
            c.from.tag().unwrap_or_default(),
            c.to.tag().unwrap_or_default(),
        );
        let bye = |by: Party| {
            move |cur: &Dialog| {
                let mut n = cur.clone();
                n.state = DialogState::Terminated;
                n.ended_ms = now;
                n.end = Some((EndReason::Bye, by));
                Some(n)
            }
        };
        let mut key = std::mem::take(&mut self.dkey);
        dialog_key(c.call_id, from_tag, &mut key);
        let mut ended = self.mutate(&key, now, bye(Party::Caller));
        if ended.is_none() {
            dialog_key(c.call_id, to_tag, &mut key);
            ended = self.mutate(&key, now, bye(Party::Callee));
        }
        self.dkey = key;
        if let Some(e) = ended {
            self.dialog_ended(&e, now);
        }
    }

    /// Hands the CDR of a finished call to the writer, where this node acts on the
    /// dialog (the ownership segment).
    fn cdr(&mut self, d: &Dialog, now: Millis) {
        let Some(share) = self.dialogs.as_mut() else {
            return;
        };
        if !share
            .segment
            .acts_on_at(DEFAULT_TAG_SLOT, bucket_of(&d.call_id), now)
            .0
        {
            self.stats.cdrs_not_owner.fetch_add(1, Relaxed);
            return;
        }
        d.cdr_line(self.node, &mut self.cdr);
        if push_bytes(&mut share.cdrs, &[&self.cdr]) {
            self.stats.cdrs.fetch_add(1, Relaxed);
        } else {
            self.stats.cdrs_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Live transactions.
    pub fn transactions(&self) -> usize {
        self.txns.len()
    }

    fn is_us(&self, uri: &Uri<'_>) -> bool {
        uri_addr(uri) == Some(self.cfg.local)
    }

    pub(crate) fn send<O: Outbox>(out: &mut O, dest: Dest, bytes: &[u8]) {
        out.send(dest, |b| match b.get_mut(..bytes.len()) {
            Some(d) => {
                d.copy_from_slice(bytes);
                bytes.len()
            }
            None => 0,
        });
    }

    /// The To tag of our responses to a request: derived from it, so that a
    /// retransmission gets the same one on any worker (RFC 3261 §8.2.6.2).
    pub(crate) fn local_tag(c: &Checked<'_>) -> [u8; 16] {
        let mut tag = [0u8; 16];
        let h = fnv(c.call_id)
            ^ fnv(c.from.tag().unwrap_or_default()).rotate_left(17)
            ^ fnv(c.top_via.branch.unwrap_or_default()).rotate_left(34);
        for (i, b) in tag.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((h >> (60 - 4 * i)) & 0xf) as usize];
        }
        tag
    }

    /// Our own response to `m` (100, 404, 480, 481, 408, 487 ...), with a To tag derived
    /// from the request so retransmissions get the same one.
    fn build_reply(m: &Message<'_>, src_addr: SocketAddr, code: u16, reason: &str) -> Vec<u8> {
        Self::build_reply_with(m, src_addr, code, reason, |_| {})
    }

    /// [`Proxy::build_reply`] with header fields of its own (`extra` writes them).
    pub(crate) fn build_reply_with(
        m: &Message<'_>,
        src_addr: SocketAddr,
        code: u16,
        reason: &str,
        extra: impl FnOnce(&mut Writer<'_>),
    ) -> Vec<u8> {
        let mut v = [0u8; 4096];
        let n = {
            let Ok(c) = m.check_request() else {
                return Vec::new();
            };
            let tag = Self::local_tag(&c);
            let mut w = Writer::new(&mut v);
            w.response_head_with(
                m,
                Some(&c.top_via),
                c.to.tag().is_some(),
                code,
                reason,
                src_addr.ip(),
                src_addr.port(),
                Some(&tag),
            );
            extra(&mut w);
            w.put(b"Content-Length: 0\r\n\r\n");
            w.finish().unwrap_or(0)
        };
        // Exactly its length: a transaction may keep it for 32 s.
        v[..n].to_vec()
    }

    /// Builds and sends our own response to `m`.
    fn reply_to<O: Outbox>(
        &self,
        m: &Message<'_>,
        src_addr: SocketAddr,
        dest: Dest,
        code: u16,
        reason: &str,
        out: &mut O,
    ) -> Vec<u8> {
        let v = Self::build_reply(m, src_addr, code, reason);
        if !v.is_empty() {
            Self::send(out, dest, &v);
            if code >= 200 {
                self.stats.answered.fetch_add(1, Relaxed);
            }
        }
        v
    }

    /// A request the node does not answer itself (the core has checked it): routed, or
    /// answered by the proxy (404, 480, 481 ...).
    pub fn on_request<O: Outbox>(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        now: Millis,
        reg: &mut Registrar,
        out: &mut O,
    ) {
        self.request(m, c, src, now, reg, out);
        self.after(now, out);
    }

    fn request<O: Outbox>(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        now: Millis,
        reg: &mut Registrar,
        out: &mut O,
    ) {
        let method = c.cseq.method;
        let rel = match src.transport {
            Transport::Udp => Reliability::Unreliable,
            Transport::Tcp => Reliability::Reliable,
        };
        let upstream = response_dest(&c.top_via, src);
        let key = self.keys.server_key(c);
        // §17.2.3: a retransmission, or the ACK of a non-2xx final response.
        if let Some(id) = self.txns.find_server(key) {
            let ev = if method == Method::Ack {
                Event::Ack
            } else {
                Event::RequestRetransmission
            };
            self.stats.retransmissions.fetch_add(1, Relaxed);
            let (a, _) = self.txns.event(id, ev, now);
            if a.iter().any(|x| x == Action::SendResponse) {
                match self.txns.get_mut(id) {
                    Some((_, Ctx::Server(s))) => Self::send(out, s.upstream, &s.response),
                    Some((_, Ctx::Local { response, upstream })) => {
                        Self::send(out, *upstream, response)
                    }
                    _ => {}
                }
            }
            return;
        }
        if method == Method::Cancel {
            return self.cancel(m, c, src, upstream, now, out);
        }
        // RFC 3261 §16.3 step 4: a request that already went through us with the same
        // Request-URI is looping (482); with another one it is a legitimate spiral.
        if method != Method::Ack && self.looping(m) {
            self.reply_to(m, src.remote, upstream, 482, "Loop Detected", out);
            return;
        }
        // §16.4: a Route naming us is ours to remove.
        let top_route = m.header(HeaderName::Route).and_then(first_route_uri);
        let pop = top_route.as_ref().is_some_and(|u| self.is_us(u));
        let next_route = if pop {
            m.header(HeaderName::Route)
                .and_then(|v| sip_wire::write::split_first(v).1)
                .and_then(first_route_uri)
                .or_else(|| {
                    m.headers_named(HeaderName::Route)
                        .nth(1)
                        .and_then(first_route_uri)
                })
        } else {
            top_route
        };
        if matches!(method, Method::Publish | Method::Subscribe)
            && self.presence_takes(m, c, next_route.is_some(), reg)
        {
            return self.on_presence(m, c, src, upstream, key, now, reg, out);
        }
        // ACK of a 2xx: end to end, forwarded without a transaction (§16.11: a proxy
        // forwards it statelessly).
        if method == Method::Ack {
            let dest = next_route
                .as_ref()
                .and_then(uri_addr)
                .or_else(|| uri_addr(&c.request_uri));
            if let Some(d) = dest {
                let mut branch = [0u8; 48];
                let bn = self.stateless_branch(c, &mut branch);
                let f = Forward {
                    request_uri: None,
                    via_addr: self.cfg.local,
                    transport: "UDP",
                    branch: &branch[..bn],
                    record_route: None,
                    pop_route: pop,
                    push_routes: b"",
                };
                if let Some(n) = forward_request(m, &f, &mut self.buf) {
                    Self::send(out, Dest::Udp(d), &self.buf[..n]);
                    self.stats.forwarded.fetch_add(1, Relaxed);
                }
            }
            return;
        }
        // Targets: the route set of an in-dialog request, else the location service.
        self.targets.clear();
        let in_dialog = c.to.tag().is_some();
        if let Some(r) = next_route.as_ref().filter(|_| pop || in_dialog) {
            match uri_addr(r) {
                Some(d) => self.targets.push(Target::hop(d)),
                None => {
                    self.reply_to(m, src.remote, upstream, 404, "Not Found", out);
                    return;
                }
            }
        } else if in_dialog || self.is_us(&c.request_uri) {
            match uri_addr(&c.request_uri).filter(|a| *a != self.cfg.local) {
                Some(d) => self.targets.push(Target::hop(d)),
                None => {
                    // In a dialog with no route to follow, or addressed to us: §16.3.
                    self.reply_to(
                        m,
                        src.remote,
                        upstream,
                        481,
                        "Call/Transaction Does Not Exist",
                        out,
                    );
                    return;
                }
            }
        } else {
            let targets = &mut self.targets;
            let found = reg.lookup(&c.request_uri, now, |b| {
                let path = b.path();
                let dest = if path.is_empty() {
                    Some(b.source())
                } else {
                    first_route_uri(path).as_ref().and_then(uri_addr)
                };
                if let Some(dest) = dest
                    && targets.len() < MAX_BRANCHES
                {
                    targets.push(Target {
                        uri: b.contact().to_vec(),
                        path: path.to_vec(),
                        dest,
                        q: if b.q == sipmesh_cluster::usrloc::Q_NONE {
                            1000
                        } else {
                            b.q
                        },
                    });
                }
            });
            match found {
                Lookup::Found(_) if !self.targets.is_empty() => {}
                Lookup::Found(_) | Lookup::NoContacts => {
                    // RFC 3261 §21.4.18
                    self.reply_to(m, src.remote, upstream, 480, "Temporarily Unavailable", out);
                    return;
                }
                Lookup::NotFound => {
                    self.reply_to(m, src.remote, upstream, 404, "Not Found", out);
                    return;
                }
                Lookup::NotOurs => match uri_addr(&c.request_uri) {
                    Some(d) => self.targets.push(Target::hop(d)),
                    None => {
                        self.reply_to(m, src.remote, upstream, 404, "Not Found", out);
                        return;
                    }
                },
            }
        }
        let invite = method == Method::Invite;
        let kind = if invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let dialog = if invite && !in_dialog {
            self.dialog_start(m, c, src, now)
        } else {
            None
        };
        if method == Method::Bye && in_dialog {
            self.dialog_bye(c, now);
        } else if in_dialog && method != Method::Ack {
            self.dialog_cseq(c, now);
        }
        // Serial forking: the targets of the highest q first (RFC 3261 §16.6).
        let first_group = if self.cfg.serial_forking {
            let q0 = self.targets.first().map_or(0, |t| t.q);
            self.targets.iter().take_while(|t| t.q == q0).count()
        } else {
            self.targets.len()
        };
        let (txn, acts) = Transaction::server(kind, rel, self.cfg.timers);
        let mut ctx = ServerCtx {
            request: m.as_bytes().to_vec(),
            upstream,
            response: Vec::new(),
            rc: ResponseContext::new(first_group),
            branches: [None; MAX_BRANCHES],
            held: Default::default(),
            invite,
            cancelled: false,
            dialog,
            rest: self.targets[first_group..].to_vec(),
        };
        if acts.iter().any(|a| a == Action::SendResponse) {
            // §17.2.1: 100 Trying at once, hop by hop.
            ctx.response = self.reply_to(m, src.remote, upstream, 100, "Trying", out);
        }
        let sid = self
            .txns
            .insert_server(key, txn, Ctx::Server(Box::new(ctx)));
        let targets = std::mem::take(&mut self.targets);
        let failed = self.forward_branches(sid, m, pop, &targets[..first_group], 0, now, out);
        self.targets = targets;
        for i in failed {
            self.relay(sid, i, None, 503, now, out);
        }
    }

    /// Forwards `m` to `targets` as branches `first..` of server transaction `sid`;
    /// returns the indices of the branches that could not be sent.
    #[allow(clippy::too_many_arguments)]
    fn forward_branches<O: Outbox>(
        &mut self,
        sid: TxId,
        m: &Message<'_>,
        pop: bool,
        targets: &[Target],
        first: usize,
        now: Millis,
        out: &mut O,
    ) -> Vec<usize> {
        let Some(method) = m.method() else {
            return (first..first + targets.len()).collect();
        };
        let invite = method == Method::Invite;
        let kind = if invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let record_route = (invite && self.cfg.record_route).then_some(&self.rr[..]);
        let mut failed = Vec::new();
        for (k, t) in targets.iter().enumerate() {
            let i = first + k;
            let (txn, _) =
                Transaction::client(kind, Reliability::Unreliable, self.cfg.timers, invite, now);
            let cid = self.txns.insert_client(
                method.as_bytes(),
                txn,
                Ctx::Client(ClientCtx {
                    parent: sid,
                    index: i,
                    request: Vec::new(),
                    dest: t.dest,
                    cancel: None,
                }),
            );
            let mut branch = [0u8; 48];
            let bn = self.keys.branch(
                BranchId {
                    node: self.node,
                    worker: self.worker,
                    id: cid,
                },
                &mut branch,
            );
            let f = Forward {
                request_uri: (!t.uri.is_empty()).then_some(&t.uri[..]),
                via_addr: self.cfg.local,
                transport: "UDP",
                branch: &branch[..bn],
                record_route,
                pop_route: pop,
                push_routes: &t.path,
            };
            let Some(n) = forward_request(m, &f, &mut self.buf) else {
                // The request does not fit a datagram for this target: the branch fails
                // as if the transport had (§16.9), once every branch exists.
                self.txns.remove(cid);
                failed.push(i);
                continue;
            };
            Self::send(out, Dest::Udp(t.dest), &self.buf[..n]);
            self.stats.forwarded.fetch_add(1, Relaxed);
            if let Some((_, Ctx::Client(cc))) = self.txns.get_mut(cid) {
                cc.request = self.buf[..n].to_vec();
            }
            if let Some((_, Ctx::Server(s))) = self.txns.get_mut(sid) {
                s.branches[i] = Some(cid);
            }
        }
        failed
    }

    /// Serial forking: the current targets all failed; the next set (equal q) is tried.
    fn next_targets<O: Outbox>(&mut self, sid: TxId, now: Millis, out: &mut O) {
        let Some((_, Ctx::Server(s))) = self.txns.get_mut(sid) else {
            return;
        };
        let q0 = s.rest.first().map_or(0, |t| t.q);
        let k = s.rest.iter().take_while(|t| t.q == q0).count();
        let group: Vec<Target> = s.rest.drain(..k).collect();
        let Some(first) = s.rc.add_branches(group.len()) else {
            return;
        };
        let request = s.request.clone();
        let Ok(m) = Message::parse(&request, Framing::Datagram) else {
            return;
        };
        let pop = m
            .header(HeaderName::Route)
            .and_then(first_route_uri)
            .is_some_and(|u| self.is_us(&u));
        let failed = self.forward_branches(sid, &m, pop, &group, first, now, out);
        for i in failed {
            self.relay(sid, i, None, 503, now, out);
        }
    }

    fn stateless_branch(&self, c: &Checked<'_>, out: &mut [u8; 48]) -> usize {
        let h = fnv(c.top_via.branch.unwrap_or_default()) ^ fnv(c.call_id);
        out[..7].copy_from_slice(b"z9hG4bK");
        let mut n = 7;
        for i in (0..16).rev() {
            out[n] = b"0123456789abcdef"[((h >> (4 * i)) & 0xf) as usize];
            n += 1;
        }
        n
    }

    /// §16.10 / §9.2: a CANCEL for one of our INVITE server transactions: 200 to the
    /// CANCEL, then every branch is cancelled (the 487 comes back from them).
    fn cancel<O: Outbox>(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        upstream: Dest,
        now: Millis,
        out: &mut O,
    ) {
        let ikey = self.keys.server_key_as(c, Method::Invite);
        let Some(sid) = self.txns.find_server(ikey) else {
            // RFC 3261 §9.2: no matching transaction.
            self.reply_to(
                m,
                src.remote,
                upstream,
                481,
                "Call/Transaction Does Not Exist",
                out,
            );
            return;
        };
        self.stats.cancels.fetch_add(1, Relaxed);
        self.reply_to(m, src.remote, upstream, 200, "OK", out);
        let branches = match self.txns.get_mut(sid) {
            Some((t, Ctx::Server(s))) if t.state() == crate::txn::State::Proceeding => {
                s.cancelled = true;
                s.rc.cancellable()
                    .filter_map(|i| s.branches[i])
                    .collect::<Vec<_>>()
            }
            _ => return,
        };
        for b in branches {
            self.cancel_branch(b, now, out);
        }
    }

    fn cancel_branch<O: Outbox>(&mut self, cid: TxId, now: Millis, out: &mut O) {
        let (request, dest) = match self.txns.get_mut(cid) {
            Some((_, Ctx::Client(cc))) if cc.cancel.is_none() => (cc.request.clone(), cc.dest),
            _ => return,
        };
        let Ok(sent) = Message::parse(&request, Framing::Datagram) else {
            return;
        };
        let Some(n) = cancel_or_ack(&sent, b"CANCEL", None, &mut self.buf) else {
            return;
        };
        let bytes = self.buf[..n].to_vec();
        Self::send(out, Dest::Udp(dest), &bytes);
        let (txn, _) = Transaction::client(
            Kind::NonInvite,
            Reliability::Unreliable,
            self.cfg.timers,
            false,
            now,
        );
        let id = self.txns.insert_client(
            b"CANCEL",
            txn,
            Ctx::Own {
                request: bytes,
                dest,
                purpose: Purpose::None,
            },
        );
        if let Some((_, Ctx::Client(cc))) = self.txns.get_mut(cid) {
            cc.cancel = Some(id);
        }
    }

    /// A response: to one of our client transactions (or another worker's).
    pub fn on_response<O: Outbox>(
        &mut self,
        m: &Message<'_>,
        now: Millis,
        out: &mut O,
    ) -> ResponseFate {
        let fate = self.response(m, now, out);
        self.after(now, out);
        fate
    }

    fn response<O: Outbox>(&mut self, m: &Message<'_>, now: Millis, out: &mut O) -> ResponseFate {
        let Some(branch) = m.top_via().and_then(|v| v.branch) else {
            return ResponseFate::NotOurs;
        };
        let Some(b) = self.keys.parse_branch(branch) else {
            return ResponseFate::NotOurs;
        };
        if b.node != self.node {
            return ResponseFate::NotOurs;
        }
        if b.worker != self.worker {
            self.stats.other_worker.fetch_add(1, Relaxed);
            return ResponseFate::Steer(b.worker);
        }
        let (Some(code), Some(cseq)) = (m.status(), m.cseq()) else {
            return ResponseFate::NotOurs;
        };
        let method = cseq.method.as_bytes();
        let id = match self.txns.find_client(b.id, method) {
            Some(id) => id,
            None => {
                // The response to a CANCEL we sent for this branch.
                match self.txns.get_mut(b.id) {
                    Some((_, Ctx::Client(cc))) if cseq.method == Method::Cancel => {
                        match cc.cancel {
                            Some(cid) => cid,
                            None => return self.stray(),
                        }
                    }
                    _ => return self.stray(),
                }
            }
        };
        let (acts, ended) = self.txns.event(id, Event::Response(code), now);
        for a in acts.iter() {
            match a {
                Action::SendAck => self.send_ack(id, m, out),
                // An in-dialog ping or a NOTIFY answered "no such call" (or timed out,
                // below): the call, or the subscription, is over.
                Action::Pass(481 | 408) if self.purpose_of(id, &ended) != Purpose::None => {
                    let p = self.purpose_of(id, &ended);
                    self.own_failed(p, now, out);
                }
                Action::Pass(code) => {
                    if let Some((_, Ctx::Client(cc))) = self.txns.get_mut(id) {
                        let (parent, index) = (cc.parent, cc.index);
                        if (200..300).contains(&code) && cseq.method == Method::Invite {
                            // Accepted: no retransmission, CANCEL or ACK of ours follows.
                            cc.request = Vec::new();
                        }
                        self.relay(parent, index, Some(m), code, now, out);
                    } else if let Some(Ctx::Client(cc)) = &ended {
                        self.relay(cc.parent, cc.index, Some(m), code, now, out);
                    }
                }
                _ => {}
            }
        }
        ResponseFate::Done
    }

    /// Whether one of the request's Vias is a branch this worker forwarded with the same
    /// Request-URI as the request has now.
    fn looping(&mut self, m: &Message<'_>) -> bool {
        let Some(ruri) = m.request_uri() else {
            return false;
        };
        let mine: Vec<TxId> = m
            .vias()
            .filter_map(Result::ok)
            .filter_map(|v| v.branch.and_then(|b| self.keys.parse_branch(b)))
            .filter(|b| b.node == self.node && b.worker == self.worker)
            .map(|b| b.id)
            .collect();
        mine.into_iter().any(|id| match self.txns.get_mut(id) {
            Some((_, Ctx::Client(cc))) => Message::parse(&cc.request, Framing::Datagram)
                .ok()
                .and_then(|sent| sent.request_uri().map(|u| u == ruri))
                .unwrap_or(false),
            _ => false,
        })
    }

    /// What a request of ours is for.
    fn purpose_of(&mut self, id: TxId, ended: &Option<Ctx>) -> Purpose {
        match self.txns.get_mut(id) {
            Some((_, Ctx::Own { purpose, .. })) => purpose.clone(),
            _ => match ended {
                Some(Ctx::Own { purpose, .. }) => purpose.clone(),
                _ => Purpose::None,
            },
        }
    }

    /// A request of ours was refused with 481 or got no answer (RFC 3261 §12.2.1.2 /
    /// RFC 5057 §5.1: the dialog usage is gone).
    fn own_failed<O: Outbox>(&mut self, p: Purpose, now: Millis, out: &mut O) {
        match p {
            Purpose::Ping(k) => {
                self.end_dialog(&k, EndReason::PingTimeout, now, out);
            }
            Purpose::Notify(k) => self.notify_failed(&k, now, out),
            Purpose::None => {}
        }
    }

    fn stray(&self) -> ResponseFate {
        self.stats.stray_responses.fetch_add(1, Relaxed);
        ResponseFate::Done
    }

    fn send_ack<O: Outbox>(&mut self, id: TxId, resp: &Message<'_>, out: &mut O) {
        let Some((_, Ctx::Client(cc))) = self.txns.get_mut(id) else {
            return;
        };
        let dest = cc.dest;
        let Ok(sent) = Message::parse(&cc.request, Framing::Datagram) else {
            return;
        };
        let mut buf = [0u8; 4096];
        if let Some(n) = cancel_or_ack(&sent, b"ACK", resp.header(HeaderName::To), &mut buf) {
            Self::send(out, Dest::Udp(dest), &buf[..n]);
        }
    }

    /// Branch `index` of server transaction `sid` got a response (`None`: it timed out or
    /// could not be sent, with `code` 408 or 503).
    fn relay<O: Outbox>(
        &mut self,
        sid: TxId,
        index: usize,
        resp: Option<&Message<'_>>,
        code: u16,
        now: Millis,
        out: &mut O,
    ) {
        let Some((_, Ctx::Server(s))) = self.txns.get_mut(sid) else {
            return;
        };
        let decision = s.rc.on_response_more(index, code, !s.rest.is_empty());
        let (upstream, invite, cancelled) = (s.upstream, s.invite, s.cancelled);
        let dialog = s.dialog.clone();
        let mut ours = false;
        // What goes upstream: a response of a branch (`raw`, with a status override) or,
        // when the chosen branch has none (it timed out), our own.
        let (raw, status, final_code, cancel_others) = match decision {
            Decision::Drop => return,
            Decision::Next => {
                if let Some(r) = resp {
                    s.held[index].clear();
                    s.held[index].extend_from_slice(r.as_bytes());
                }
                return self.next_targets(sid, now, out);
            }
            Decision::Hold => {
                if let Some(r) = resp {
                    s.held[index].clear();
                    s.held[index].extend_from_slice(r.as_bytes());
                }
                return;
            }
            Decision::Forward => {
                let Some(r) = resp else { return };
                // §16.7 step 10: a 2xx to an INVITE cancels the other branches.
                (
                    r.as_bytes().to_vec(),
                    None,
                    code,
                    invite && (200..300).contains(&code),
                )
            }
            Decision::SendBest { branch, code: best } => {
                let raw = match resp {
                    Some(r) if branch == index => r.as_bytes().to_vec(),
                    _ => std::mem::take(&mut s.held[branch]),
                };
                let status = (best != code_of(&raw)).then(|| (best, reason_of(best)));
                (raw, status, best, best >= 600)
            }
        };
        let request = s.request.clone();
        let bytes = match Message::parse(&raw, Framing::Datagram).ok().and_then(|r| {
            forward_response(&r, status.map(|(c, t)| (c, t.as_bytes())), &mut self.buf)
        }) {
            Some(n) => self.buf[..n].to_vec(),
            None => {
                let Ok(req) = Message::parse(&request, Framing::Datagram) else {
                    return;
                };
                let src_addr = match upstream {
                    Dest::Udp(a) => a,
                    Dest::Conn(_) => self.cfg.local,
                };
                self.stats.answered.fetch_add(1, Relaxed);
                ours = true;
                Self::build_reply(&req, src_addr, final_code, reason_of(final_code))
            }
        };
        Self::send(out, upstream, &bytes);
        self.stats.relayed.fetch_add(1, Relaxed);
        if let Some(key) = dialog {
            let sent = Message::parse(&bytes, Framing::Datagram).ok();
            let to_tag = sent
                .as_ref()
                .and_then(|m| m.to().and_then(|t| t.tag()))
                .unwrap_or_default();
            let contact = sent.as_ref().and_then(first_contact).unwrap_or_default();
            // Where the answering branch was sent: where a BYE to the callee goes.
            let callee_addr = match self.txns.get_mut(sid) {
                Some((_, Ctx::Server(s))) => s.branches[index],
                _ => None,
            }
            .and_then(|cid| match self.txns.get_mut(cid) {
                Some((_, Ctx::Client(cc))) => Some(cc.dest),
                _ => None,
            });
            self.dialog_response(
                &key,
                final_code,
                to_tag,
                (contact, callee_addr),
                cancelled,
                ours,
                now,
            );
        }
        let Some((_, Ctx::Server(s))) = self.txns.get_mut(sid) else {
            return;
        };
        let cancel: Vec<TxId> = if cancel_others {
            s.rc.pending().filter_map(|i| s.branches[i]).collect()
        } else if cancelled && code < 200 {
            // A CANCEL came before this branch's first provisional response (§9.1).
            s.branches[index].into_iter().collect()
        } else {
            Vec::new()
        };
        // What a retransmission may need, and nothing more: a transaction lives on for
        // up to 64*T1 after its final response. An INVITE answered 2xx absorbs
        // retransmitted INVITEs without answering (RFC 6026 Accepted), and our own
        // responses are built from the request only until a final one went.
        if invite && (200..300).contains(&final_code) {
            s.response = Vec::new();
        } else {
            s.response = bytes;
        }
        if final_code >= 200 {
            s.request = Vec::new();
        }
        if final_code >= 101 {
            self.txns.event(sid, Event::Send(final_code), now);
        }
        for b in cancel {
            self.cancel_branch(b, now, out);
        }
    }

    /// Ends the calls the control plane ordered ended.
    fn run_orders<O: Outbox>(&mut self, now: Millis, out: &mut O) {
        let mut key = Vec::new();
        for _ in 0..1024 {
            let Some(share) = self.dialogs.as_mut() else {
                return;
            };
            if !pop_bytes(&mut share.orders, &mut key) {
                return;
            }
            let Some((&reason, k)) = key.split_first() else {
                continue;
            };
            let k = k.to_vec();
            if self.presence_order(reason, &k, now, out) {
                continue;
            }
            match reason {
                ORDER_PING => self.ping_dialog(&k, now, out),
                ORDER_ADMIN => {
                    self.end_dialog(&k, EndReason::Admin, now, out);
                }
                _ => {
                    self.end_dialog(&k, EndReason::Lifetime, now, out);
                }
            }
        }
    }

    /// Fires due timers.
    pub fn on_tick<O: Outbox>(&mut self, now: Millis, out: &mut O) {
        self.run_orders(now, out);
        let mut fired = std::mem::take(&mut self.fired);
        let mut ended = std::mem::take(&mut self.ended);
        fired.clear();
        ended.clear();
        self.txns.advance(now, |id, acts, v| {
            for a in acts.iter() {
                fired.push((id, a));
            }
            if let Err(ctx) = v {
                ended.push((id, ctx));
            }
        });
        for &(id, a) in &fired {
            let ctx = match self.txns.get_mut(id) {
                Some((_, c)) => Some(c),
                None => ended.iter_mut().find(|(e, _)| *e == id).map(|(_, c)| c),
            };
            let Some(ctx) = ctx else { continue };
            match (a, ctx) {
                (Action::SendRequest, Ctx::Client(cc)) => {
                    let (d, r) = (cc.dest, cc.request.clone());
                    Self::send(out, Dest::Udp(d), &r);
                }
                (Action::TimedOut(_), Ctx::Own { purpose, .. }) => {
                    let p = purpose.clone();
                    self.own_failed(p, now, out);
                }
                (Action::SendResponse, Ctx::Local { response, upstream }) => {
                    let (d, r) = (*upstream, response.clone());
                    Self::send(out, d, &r);
                }
                (Action::SendRequest, Ctx::Own { request, dest, .. }) => {
                    let (d, r) = (*dest, request.clone());
                    Self::send(out, Dest::Udp(d), &r);
                }
                (Action::SendResponse, Ctx::Server(s)) => {
                    let (d, r) = (s.upstream, s.response.clone());
                    Self::send(out, d, &r);
                }
                (Action::TimedOut(_), Ctx::Client(cc)) => {
                    let (p, i) = (cc.parent, cc.index);
                    self.stats.timeouts.fetch_add(1, Relaxed);
                    // §16.7 step 2 / §16.8: a branch that timed out counts as a 408.
                    self.relay(p, i, None, 408, now, out);
                }
                (Action::TimerC { provisional }, Ctx::Client(cc)) => {
                    let (p, i) = (cc.parent, cc.index);
                    if provisional {
                        // §16.8: cancel the branch.
                        self.cancel_branch(id, now, out);
                    } else {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                        self.relay(p, i, None, 408, now, out);
                    }
                }
                _ => {}
            }
        }
        self.fired = fired;
        self.ended = ended;
        self.after(now, out);
    }
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn code_of(raw: &[u8]) -> u16 {
    raw.get(8..11)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Reason phrases of the responses the proxy makes or rewrites.
fn reason_of(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        200 => "OK",
        404 => "Not Found",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        487 => "Request Terminated",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
