//! The presence server of a worker: RFC 3903 PUBLISH, RFC 6665 SUBSCRIBE/NOTIFY, and the
//! `presence` (RFC 3856, PIDF aggregation), `dialog` (RFC 4235, BLF: published documents
//! and the node's own calls) and `presence.winfo` (RFC 3857) event packages.
//!
//! It runs inside the worker's [`Proxy`]: PUBLISH and SUBSCRIBE are answered from a
//! non-INVITE server transaction (retransmissions get the same response), NOTIFYs are
//! client transactions of the proxy's table (retransmitted until answered; 481 or no
//! answer removes the watcher). State lives in the node's [`PresenceTable`]; every change
//! is a versioned change record on this worker's presence ring (replicated like usrloc's).
//!
//! Which NOTIFYs a node sends: the immediate one after a SUBSCRIBE (an answer to the
//! subscriber) always; those a change causes (a PUBLISH, an expiry, a call's state) only
//! for the watchers whose bucket the node acts on (the ownership segment), so in a
//! cluster each watcher is notified once, by its owner. A change applied from a peer
//! sends nothing by itself: the control plane orders the worker to notify (the owner
//! check is done again here).

pub mod doc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sip_wire::{Checked, HeaderName, Message, Uri};
use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{ChangeRecordRef, ChangeRef, next_version};
use sipmesh_cluster::dialog::{Dialog, DialogState};
use sipmesh_cluster::ownership::{Segment, bucket_of};
use sipmesh_cluster::presence::{
    PresenceEnd, PresenceTable, Publication, SubState, Watcher, presentity_key,
    split_presentity_key, watcher_key,
};
use sipmesh_cluster::ring::ChangeProducer;

use crate::io::{Dest, Millis, Outbox, Source, Transport};
use crate::registrar::Registrar;
use crate::stateful::{Ctx, Proxy, Purpose, first_route_uri, uri_addr};
use crate::txn::table::TxKey;
use crate::txn::{Event, Kind, Reliability, Transaction};

/// The event packages a SUBSCRIBE may name (Allow-Events, RFC 6665 §8.2.2).
pub const ALLOW_EVENTS: &[u8] = b"presence, dialog, presence.winfo";
/// The event packages a PUBLISH may name.
pub const PUBLISH_EVENTS: &[u8] = b"presence, dialog";

/// Order (control plane → worker): notify the watchers of a presentity key that this
/// node acts on (a peer's change was applied).
pub const ORDER_NOTIFY: u8 = 4;
/// Order: a publication expired (the presentity key, a zero octet, the entity tag).
pub const ORDER_PUBLICATION_EXPIRED: u8 = 5;
/// Order: a watcher expired (its key).
pub const ORDER_WATCHER_EXPIRED: u8 = 6;

/// An event package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Package {
    /// RFC 3856.
    Presence,
    /// RFC 4235.
    Dialog,
    /// RFC 3857 (watcher information of the presence package).
    Winfo,
}

impl Package {
    /// The package of an Event header value (its token, parameters aside).
    pub fn parse(token: &[u8]) -> Option<Package> {
        // RFC 6665 §8.2.1: event-type tokens compare case-sensitively.
        match token {
            b"presence" => Some(Package::Presence),
            b"dialog" => Some(Package::Dialog),
            b"presence.winfo" => Some(Package::Winfo),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static [u8] {
        match self {
            Package::Presence => b"presence",
            Package::Dialog => b"dialog",
            Package::Winfo => b"presence.winfo",
        }
    }

    /// The body type of its documents.
    pub fn content_type(self) -> &'static [u8] {
        match self {
            Package::Presence => doc::PIDF,
            Package::Dialog => doc::DIALOG_INFO,
            Package::Winfo => doc::WATCHERINFO,
        }
    }
}

/// Limits of the presence server.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Shorter non-zero intervals are refused with 423 (RFC 3903 §6 step 5, RFC 6665
    /// §4.2.1.1).
    pub min_expires: u32,
    /// Longer intervals are shortened to this.
    pub max_expires: u32,
    /// The interval when a request gives none (RFC 3856 §6.4, RFC 3903 §4: 3600).
    pub default_expires: u32,
    /// Most watchers of one presentity (more get 503).
    pub max_watchers: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            min_expires: 60,
            max_expires: 86_400,
            default_expires: 3600,
            max_watchers: 1000,
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct PresenceStats {
    /// PUBLISH requests answered (any status).
    pub publishes: AtomicU64,
    /// SUBSCRIBE requests answered (any status).
    pub subscribes: AtomicU64,
    /// NOTIFYs sent (first transmissions).
    pub notifies: AtomicU64,
    /// Watchers removed because a NOTIFY got 481 or no answer.
    pub notify_failures: AtomicU64,
    /// NOTIFYs a change caused for watchers another node acts on (not sent here).
    pub not_owner: AtomicU64,
    /// NOTIFYs not sent: the worker's queue of NOTIFYs waiting for room was full.
    pub notifies_dropped: AtomicU64,
    /// Publications removed by expiry.
    pub publications_expired: AtomicU64,
    /// Watchers removed by expiry.
    pub watchers_expired: AtomicU64,
    /// Change records dropped: the ring was full.
    pub records_dropped: AtomicU64,
}

/// What a worker's presence server shares with the node.
pub struct PresenceShare {
    /// Presentities and watchers.
    pub table: Arc<PresenceTable>,
    /// This worker's ring of presence change records.
    pub changes: ChangeProducer,
    /// Who acts on which watcher (NOTIFYs a change causes).
    pub segment: Arc<Segment>,
    /// Limits.
    pub config: PresenceConfig,
    /// Counters.
    pub stats: Arc<PresenceStats>,
}

/// The ownership slot of presence data (presentities and watchers carry no tag yet).
const DEFAULT_TAG_SLOT: usize = 0;

/// Datagrams of the driver's room a NOTIFY fan-out leaves for other sends.
const NOTIFY_ROOM_RESERVE: usize = 16;
/// Most NOTIFYs a worker holds back for lack of room (beyond: counted and dropped).
const MAX_QUEUED_NOTIFIES: usize = 1 << 20;

/// 2024-01-01 in unix ms: the origin of the clock floor of NOTIFY CSeqs.
const CSEQ_EPOCH_MS: u64 = 1_704_067_200_000;

/// The lowest CSeq of a NOTIFY sent at `now`: four per second since 2024 (below 2^31
/// until 2040). A node that takes over a watcher continues above what the previous
/// notifier sent (RFC 3261 §12.2.1.1: CSeqs of a dialog increase) without a change record
/// per NOTIFY, as long as that one sent at most four a second on average.
pub fn cseq_floor(now: Millis) -> u32 {
    (now.saturating_sub(CSEQ_EPOCH_MS) / 250).min(0x7fff_ffff) as u32
}

/// How a request the presence server answers is answered.
struct Answer {
    code: u16,
    reason: &'static str,
    /// Header fields of the response (each with its CRLF).
    headers: Vec<u8>,
}

impl Answer {
    fn new(code: u16, reason: &'static str) -> Answer {
        Answer {
            code,
            reason,
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: &str, value: &[u8]) -> Answer {
        self.headers.extend_from_slice(name.as_bytes());
        self.headers.extend_from_slice(b": ");
        self.headers.extend_from_slice(value);
        self.headers.extend_from_slice(b"\r\n");
        self
    }

    fn with_u64(self, name: &str, v: u64) -> Answer {
        self.with(name, v.to_string().as_bytes())
    }
}

/// The AoR a request is about (its Request-URI), canonical; `None` when not ours.
fn aor_of(reg: &Registrar, uri: &Uri<'_>) -> Option<Vec<u8>> {
    if !uri.is_sip() || uri.user.is_none() || !reg.serves(uri.host) {
        return None;
    }
    let mut v = Vec::new();
    Registrar::canonical_aor(&mut v, uri).then_some(v)
}

/// The canonical AoR a URI names (`None`: not a SIP URI with a user part).
pub fn aor_of_uri(uri: &[u8]) -> Option<Vec<u8>> {
    let u = Uri::parse(uri).ok()?;
    let mut aor = Vec::new();
    Registrar::canonical_aor(&mut aor, &u).then_some(aor)
}

/// The document the watchers of `package` of `aor` get now (`version` of dialog-info and
/// watcherinfo documents). For operators; the dialog package shows published state only.
pub fn current_document(table: &PresenceTable, package: Package, aor: &[u8], out: &mut Vec<u8>) {
    let ent = entity(aor);
    let mut pkey = Vec::new();
    presentity_key(package.name(), aor, &mut pkey);
    let pres = table.presentity(&pkey).unwrap_or_default();
    let docs: Vec<&[u8]> = pres.pubs.iter().map(|x| &x.body[..]).collect();
    match package {
        Package::Presence => {
            if docs.is_empty() || doc::aggregate_pidf(&ent, &docs, out).is_err() {
                doc::offline_pidf(&ent, out);
            }
        }
        Package::Dialog => {
            let _ = doc::aggregate_dialog_info(&ent, 0, &docs, &[], out);
        }
        Package::Winfo => out.clear(),
    }
}

/// The key of the `dialog` presentity of the user a call's URI (From or Request-URI)
/// names: whose BLF watchers hear of the call.
pub fn dialog_presentity(uri: &[u8]) -> Option<Vec<u8>> {
    let u = Uri::parse(uri).ok()?;
    let mut aor = Vec::new();
    if !Registrar::canonical_aor(&mut aor, &u) {
        return None;
    }
    let mut k = Vec::new();
    presentity_key(Package::Dialog.name(), &aor, &mut k);
    Some(k)
}

/// The key of the watcher information of presentity `pkey` (a `presence` key).
pub fn winfo_key(pkey: &[u8]) -> Vec<u8> {
    let (_, aor) = split_presentity_key(pkey);
    let mut k = Vec::new();
    presentity_key(Package::Winfo.name(), aor, &mut k);
    k
}

/// `sip:` and the AoR: the entity of documents.
fn entity(aor: &[u8]) -> Vec<u8> {
    let mut v = b"sip:".to_vec();
    v.extend_from_slice(aor);
    v
}

fn hex16(v: u64) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, b) in o.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    o
}

impl Proxy {
    /// Whether the presence server takes this PUBLISH or SUBSCRIBE: no Route left to
    /// follow, and an out-of-dialog request for a user of our domains, or an in-dialog
    /// one addressed to us (our Contact).
    pub(crate) fn presence_takes(
        &self,
        m: &Message<'_>,
        c: &Checked<'_>,
        next_route: bool,
        reg: &Registrar,
    ) -> bool {
        if self.presence.is_none() || next_route || m.header(HeaderName::Event).is_none() {
            return false;
        }
        if c.to.tag().is_some() {
            uri_addr(&c.request_uri) == Some(self.cfg.local)
        } else {
            c.request_uri.user.is_some() && reg.serves(c.request_uri.host)
        }
    }

    /// Answers a PUBLISH or SUBSCRIBE (a server transaction keeps the response for
    /// retransmissions).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_presence<O: Outbox>(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        upstream: Dest,
        key: TxKey,
        now: Millis,
        reg: &Registrar,
        out: &mut O,
    ) {
        let subscribe = c.cseq.method == sip_wire::Method::Subscribe;
        let mut notify: Option<(Watcher, Option<&'static str>)> = None;
        let mut changed: Option<Vec<u8>> = None;
        let a = if subscribe {
            self.subscribe(m, c, src, now, reg, &mut notify, &mut changed)
        } else {
            self.publish(m, c, now, reg, &mut changed)
        };
        if let Some(p) = self.presence.as_ref() {
            let n = if subscribe {
                &p.stats.subscribes
            } else {
                &p.stats.publishes
            };
            n.fetch_add(1, Relaxed);
        }
        let to_tag = a.code >= 200 && a.code < 300 && subscribe;
        let response = Self::build_reply_with(m, src.remote, a.code, a.reason, |w| {
            w.put(&a.headers);
            if to_tag {
                // RFC 3261 §12.1.1: the route set is copied into the response, and our
                // Contact is the remote target of the subscriber's later requests.
                for rr in m.headers_named(HeaderName::RecordRoute) {
                    w.header("Record-Route", rr);
                }
                w.put(b"Contact: <sip:")
                    .put_str(&self.local_text)
                    .put(b">\r\n");
            }
        });
        if response.is_empty() {
            return;
        }
        Self::send(out, upstream, &response);
        self.stats.answered.fetch_add(1, Relaxed);
        let rel = match src.transport {
            Transport::Udp => Reliability::Unreliable,
            Transport::Tcp => Reliability::Reliable,
        };
        let (txn, _) = Transaction::server(Kind::NonInvite, rel, self.cfg.timers);
        let id = self
            .txns
            .insert_server(key, txn, Ctx::Local { response, upstream });
        let _ = self.txns.event(id, Event::Send(a.code), now);
        // RFC 6665 §4.2.1.2: the NOTIFY follows the 200 at once.
        if let Some((w, reason)) = notify {
            let cseq = w.local_cseq;
            self.send_notify(&w, reason, Some(cseq), now, out);
        }
        if let Some(pkey) = changed {
            self.notify_presentity(&pkey, now, out);
        }
    }

    /// RFC 3903 §6: the processing of a PUBLISH. `changed`: the presentity whose
    /// watchers are to hear of it.
    fn publish(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        now: Millis,
        reg: &Registrar,
        changed: &mut Option<Vec<u8>>,
    ) -> Answer {
        let (node, worker) = (self.node, self.worker);
        let Some(p) = self.presence.as_mut() else {
            return Answer::new(500, "Server Internal Error");
        };
        // Step 1: the resource must be one of ours.
        let Some(aor) = aor_of(reg, &c.request_uri) else {
            return Answer::new(404, "Not Found");
        };
        // Step 2: an event package we take publications of (RFC 3903 §6, 489).
        let package = match m.event().and_then(|e| Package::parse(e.value)) {
            Some(pk @ (Package::Presence | Package::Dialog)) => pk,
            _ => return Answer::new(489, "Bad Event").with("Allow-Events", PUBLISH_EVENTS),
        };
        // Step 5: the interval.
        let cfg = &p.config;
        let asked = c.expires.unwrap_or(cfg.default_expires);
        if asked > 0 && asked < cfg.min_expires {
            // RFC 3903 §6 step 5 / RFC 3261 §21.4.17
            return Answer::new(423, "Interval Too Brief")
                .with_u64("Min-Expires", u64::from(cfg.min_expires));
        }
        let granted = asked.min(cfg.max_expires);
        let if_match = m
            .header(HeaderName::SipIfMatch)
            .map(|v| v.trim_ascii())
            .filter(|v| !v.is_empty());
        let body = m.body;
        // Step 3: the body must be of the package's type (415 with Accept).
        if !body.is_empty() {
            let ok = m.content_type().is_some_and(|t| {
                let ct = package.content_type();
                ct.len() == t.kind.len() + 1 + t.subtype.len()
                    && ct[..t.kind.len()].eq_ignore_ascii_case(t.kind)
                    && ct[t.kind.len() + 1..].eq_ignore_ascii_case(t.subtype)
            });
            if !ok {
                return Answer::new(415, "Unsupported Media Type")
                    .with("Accept", package.content_type());
            }
            let valid = match package {
                Package::Presence => doc::check_pidf(body),
                _ => doc::check_dialog_info(body),
            };
            if valid.is_err() {
                return Answer::new(400, "Bad Document");
            }
        }
        let mut pkey = Vec::new();
        presentity_key(package.name(), &aor, &mut pkey);
        let Some(tag) = if_match else {
            // Step 4: an initial publication carries a body.
            if body.is_empty() {
                return Answer::new(400, "Missing Body");
            }
            if granted == 0 {
                return Answer::new(400, "Expires 0 Without SIP-If-Match");
            }
            let etag = hex16(p.table.next_id(NodeId(node), worker));
            let publication = Publication {
                etag: Arc::from(&etag[..]),
                content_type: Arc::from(package.content_type()),
                body: Arc::from(body),
                published_ms: now,
                expires_ms: now + u64::from(granted) * 1000,
                version: next_version(0, now, worker),
                origin: NodeId(node),
            };
            let pb = publication.clone();
            p.table.update_presentity(&pkey, |cur| {
                let mut n = cur.cloned().unwrap_or_default();
                n.pubs.push(pb.clone());
                Some(n)
            });
            emit(p, node, now, upsert(&pkey, b"", &publication));
            *changed = Some(pkey);
            return Answer::new(200, "OK")
                .with("SIP-ETag", &etag)
                .with_u64("Expires", u64::from(granted));
        };
        // Step 4: a refresh, modification or removal names a publication we hold (412).
        let mut found: Option<Publication> = None;
        let new_etag = hex16(p.table.next_id(NodeId(node), worker));
        let after = p.table.update_presentity(&pkey, |cur| {
            let cur = cur?;
            let old = cur.find(tag)?;
            let mut n = cur.clone();
            n.pubs.retain(|x| &x.etag[..] != tag);
            found = Some(old.clone());
            if granted == 0 {
                return Some(n);
            }
            let mut np = Publication {
                etag: Arc::from(&new_etag[..]),
                expires_ms: now + u64::from(granted) * 1000,
                version: next_version(old.version, now, worker),
                origin: NodeId(node),
                ..old.clone()
            };
            if !body.is_empty() {
                np.body = Arc::from(body);
                np.published_ms = now;
            }
            n.pubs.push(np);
            n.pubs.sort_by_key(|x| x.published_ms);
            Some(n)
        });
        let (Some(after), Some(old)) = (after, found) else {
            // RFC 3903 §6 step 4
            return Answer::new(412, "Conditional Request Failed");
        };
        if granted == 0 {
            emit(
                p,
                node,
                now,
                ChangeRef::PublishRemove {
                    key: &pkey,
                    etag: tag,
                    reason: PresenceEnd::Removed,
                },
            );
            *changed = Some(pkey);
            return Answer::new(200, "OK").with("Expires", b"0");
        }
        if let Some(np) = after.find(&new_etag) {
            emit(p, node, now, upsert(&pkey, &old.etag, np));
        }
        // A refresh changes no state: nobody is notified (RFC 3903 §4.2).
        if !body.is_empty() {
            *changed = Some(pkey);
        }
        Answer::new(200, "OK")
            .with("SIP-ETag", &new_etag)
            .with_u64("Expires", u64::from(granted))
    }

    /// RFC 6665 §4.2.1: the processing of a SUBSCRIBE. `notify`: the watcher to send a
    /// NOTIFY at once (with the reason of a final one); `changed`: the presentity whose
    /// watchers are to hear of it (the watcher information of its presence).
    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        now: Millis,
        reg: &Registrar,
        notify: &mut Option<(Watcher, Option<&'static str>)>,
        changed: &mut Option<Vec<u8>>,
    ) -> Answer {
        let (node, worker) = (self.node, self.worker);
        let Some(p) = self.presence.as_mut() else {
            return Answer::new(500, "Server Internal Error");
        };
        // RFC 6665 §4.2.1.1: an event package we do not know is 489 with Allow-Events.
        let Some(package) = m.event().and_then(|e| Package::parse(e.value)) else {
            return Answer::new(489, "Bad Event").with("Allow-Events", ALLOW_EVENTS);
        };
        let cfg = &p.config;
        let asked = c.expires.unwrap_or(cfg.default_expires);
        if asked > 0 && asked < cfg.min_expires {
            // RFC 6665 §4.2.1.1 / RFC 3261 §21.4.17
            return Answer::new(423, "Interval Too Brief")
                .with_u64("Min-Expires", u64::from(cfg.min_expires));
        }
        let granted = asked.min(cfg.max_expires);
        let contact = m.contacts().find_map(|c| match c {
            Ok(sip_wire::Contact::Addr(a)) => Some(a.addr.uri),
            _ => None,
        });
        let from_tag = c.from.tag().unwrap_or_default();
        let mut wkey = Vec::new();
        let subscriber_dest = || -> Option<SocketAddr> {
            // The first Record-Route (the NOTIFY's first Route), else where the
            // SUBSCRIBE came from (NAT-aware, like the proxy's targets).
            match m.header(HeaderName::RecordRoute) {
                Some(rr) => first_route_uri(rr).as_ref().and_then(uri_addr),
                None => Some(src.remote),
            }
        };
        if let Some(to_tag) = c.to.tag() {
            // In the dialog: a refresh or an unsubscription (RFC 6665 §4.2.1.2).
            watcher_key(c.call_id, to_tag, from_tag, &mut wkey);
            let mut stale = false;
            let w = p.table.update_watcher(&wkey, |cur| {
                let cur = cur?;
                // RFC 3261 §12.2.2: a lower CSeq is out of order (500).
                if c.cseq.seq <= cur.remote_cseq {
                    stale = true;
                    return None;
                }
                let mut n = cur.clone();
                n.remote_cseq = c.cseq.seq;
                // The CSeq of the NOTIFY that follows, in the record: a peer that takes
                // over continues above it.
                n.local_cseq = cur.local_cseq.saturating_add(1).max(cseq_floor(now));
                n.expires_ms = now + u64::from(granted) * 1000;
                n.version = next_version(cur.version, now, worker);
                if let Some(ct) = contact {
                    // SUBSCRIBE is a target refresh request (RFC 6665 §4.1.2.2).
                    n.contact = Arc::from(ct);
                }
                if granted == 0 {
                    n.state = SubState::Terminated;
                }
                Some(n)
            });
            let Some(w) = w else {
                if stale {
                    return Answer::new(500, "CSeq Out Of Order");
                }
                // RFC 6665 §4.2.1.2 / RFC 3261 §12.2.2
                return Answer::new(481, "Subscription Does Not Exist");
            };
            if granted == 0 {
                emit(
                    p,
                    node,
                    now,
                    ChangeRef::WatcherEnd {
                        key: &wkey,
                        watcher: &w,
                        reason: PresenceEnd::Removed,
                    },
                );
                *notify = Some((w.clone(), Some("")));
            } else {
                emit(
                    p,
                    node,
                    now,
                    ChangeRef::WatcherUpsert {
                        key: &wkey,
                        watcher: &w,
                    },
                );
                *notify = Some((w.clone(), None));
            }
            if package == Package::Presence {
                *changed = Some(winfo_key(&w.presentity));
            }
            return Answer::new(200, "OK").with_u64("Expires", u64::from(granted));
        }
        let Some(aor) = aor_of(reg, &c.request_uri) else {
            return Answer::new(404, "Not Found");
        };
        // RFC 6665 §4.1.2.1: a SUBSCRIBE carries a Contact.
        let Some(contact) = contact else {
            return Answer::new(400, "Missing Contact");
        };
        // RFC 6665 §4.2.1.1: the subscriber must accept the package's documents (406).
        let ct = package.content_type();
        let accepts = m.values(HeaderName::Accept).next().is_none()
            || m.values(HeaderName::Accept).any(|v| {
                let t = v
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                t.eq_ignore_ascii_case(ct) || t == b"*/*" || t == b"application/*"
            });
        if !accepts {
            return Answer::new(406, "Not Acceptable").with("Accept", ct);
        }
        let mut pkey = Vec::new();
        presentity_key(package.name(), &aor, &mut pkey);
        if granted > 0 && p.table.watcher_count(&pkey) >= cfg.max_watchers {
            return Answer::new(503, "Too Many Watchers").with("Retry-After", b"60");
        }
        let tag = Self::local_tag(c);
        watcher_key(c.call_id, &tag, from_tag, &mut wkey);
        let routes: Vec<u8> = {
            let mut v = Vec::new();
            for rr in m.headers_named(HeaderName::RecordRoute) {
                if !v.is_empty() {
                    v.extend_from_slice(b", ");
                }
                v.extend_from_slice(rr);
            }
            v
        };
        let mut to_hdr = m.header(HeaderName::To).unwrap_or_default().to_vec();
        // The To without parameters of ours: the NOTIFY's From gets our tag.
        if let Some(i) = find_tag_param(&to_hdr) {
            to_hdr.truncate(i);
        }
        let w = Watcher {
            id: p.table.next_id(NodeId(node), worker),
            presentity: Arc::from(&pkey[..]),
            call_id: Arc::from(c.call_id),
            local_tag: Arc::from(&tag[..]),
            remote_tag: Arc::from(from_tag),
            watcher_uri: Arc::from(c.from.uri),
            from_hdr: Arc::from(m.header(HeaderName::From).unwrap_or_default()),
            to_hdr: Arc::from(&to_hdr[..]),
            contact: Arc::from(contact),
            routes: Arc::from(&routes[..]),
            addr: subscriber_dest(),
            state: if granted == 0 {
                SubState::Terminated
            } else {
                SubState::Active
            },
            created_ms: now,
            expires_ms: now + u64::from(granted) * 1000,
            remote_cseq: c.cseq.seq,
            local_cseq: cseq_floor(now).max(1),
            version: next_version(0, now, worker),
            origin: NodeId(node),
        };
        if granted == 0 {
            // A fetch (RFC 6665 §4.4.3): one NOTIFY with the state, no subscription.
            *notify = Some((w, Some("timeout")));
        } else {
            let ww = w.clone();
            p.table.update_watcher(&wkey, |_| Some(ww.clone()));
            emit(
                p,
                node,
                now,
                ChangeRef::WatcherUpsert {
                    key: &wkey,
                    watcher: &w,
                },
            );
            if package == Package::Presence {
                *changed = Some(winfo_key(&pkey));
            }
            *notify = Some((w, None));
        }
        Answer::new(200, "OK").with_u64("Expires", u64::from(granted))
    }

    /// Sends the current state of its presentity to watcher `w` (`final_reason`: the
    /// subscription ends with this NOTIFY: `Some("")` without a reason, else
    /// `terminated;reason=…`). `cseq`: the one the SUBSCRIBE just recorded; else the next
    /// is taken from the table (atomic), so NOTIFYs of one subscription increase whoever
    /// sends them.
    fn send_notify<O: Outbox>(
        &mut self,
        w: &Watcher,
        final_reason: Option<&'static str>,
        cseq: Option<u32>,
        now: Millis,
        out: &mut O,
    ) {
        let Some(p) = self.presence.as_ref() else {
            return;
        };
        let Some(dest) = w.addr else { return };
        let mut wkey = Vec::new();
        w.key(&mut wkey);
        // The next CSeq: bumped in the table when the watcher is there (a fetch or a
        // final NOTIFY of a removed one uses its own).
        let floor = cseq_floor(now);
        let cseq = match cseq {
            Some(c) => c,
            None => p
                .table
                .update_watcher(&wkey, |cur| {
                    let cur = cur?;
                    let mut n = cur.clone();
                    n.local_cseq = cur.local_cseq.saturating_add(1).max(floor);
                    Some(n)
                })
                .map_or_else(
                    || w.local_cseq.saturating_add(1).max(floor),
                    |n| n.local_cseq,
                ),
        };
        let (event, aor) = split_presentity_key(&w.presentity);
        let Some(package) = Package::parse(event) else {
            return;
        };
        let mut body = Vec::new();
        self.document(package, aor, cseq, now, &mut body);
        let mut extra = Vec::with_capacity(256 + w.routes.len());
        if !w.routes.is_empty() {
            extra.extend_from_slice(b"Route: ");
            extra.extend_from_slice(&w.routes);
            extra.extend_from_slice(b"\r\n");
        }
        extra.extend_from_slice(b"Contact: <sip:");
        extra.extend_from_slice(self.local_text.as_bytes());
        extra.extend_from_slice(b">\r\nEvent: ");
        extra.extend_from_slice(package.name());
        // RFC 6665 §4.1.3: the state and, while active, the time left.
        extra.extend_from_slice(b"\r\nSubscription-State: ");
        match final_reason {
            None => {
                let left = w.expires_ms.saturating_sub(now).div_ceil(1000);
                extra.extend_from_slice(b"active;expires=");
                extra.extend_from_slice(left.to_string().as_bytes());
            }
            Some("") => extra.extend_from_slice(b"terminated"),
            Some(r) => {
                extra.extend_from_slice(b"terminated;reason=");
                extra.extend_from_slice(r.as_bytes());
            }
        }
        extra.extend_from_slice(b"\r\nContent-Type: ");
        extra.extend_from_slice(package.content_type());
        extra.extend_from_slice(b"\r\n");
        let mut from = w.to_hdr.to_vec();
        from.extend_from_slice(b";tag=");
        from.extend_from_slice(&w.local_tag);
        let purpose = if final_reason.is_some() {
            Purpose::None
        } else {
            Purpose::Notify(wkey)
        };
        if let Some(p) = self.presence.as_ref() {
            p.stats.notifies.fetch_add(1, Relaxed);
        }
        self.send_own(
            b"NOTIFY",
            &w.contact,
            &from,
            &w.from_hdr,
            &w.call_id,
            cseq,
            dest,
            purpose,
            &extra,
            &body,
            now,
            out,
        );
    }

    /// The document of presentity `aor` for `package` (`version`: of a dialog-info or
    /// watcherinfo document).
    fn document(&self, package: Package, aor: &[u8], version: u32, now: Millis, out: &mut Vec<u8>) {
        let Some(p) = self.presence.as_ref() else {
            return;
        };
        let ent = entity(aor);
        let mut pkey = Vec::new();
        match package {
            Package::Presence => {
                presentity_key(package.name(), aor, &mut pkey);
                let pres = p.table.presentity(&pkey);
                let docs: Vec<&[u8]> = pres
                    .iter()
                    .flat_map(|pr| pr.pubs.iter().map(|x| &x.body[..]))
                    .collect();
                if docs.is_empty() || doc::aggregate_pidf(&ent, &docs, out).is_err() {
                    doc::offline_pidf(&ent, out);
                }
            }
            Package::Dialog => {
                presentity_key(package.name(), aor, &mut pkey);
                let pres = p.table.presentity(&pkey).unwrap_or_default();
                let docs: Vec<&[u8]> = pres.pubs.iter().map(|x| &x.body[..]).collect();
                let calls = self.calls_of(aor);
                let ids: Vec<String> = calls.iter().map(|(d, _)| format!("{:x}", d.id)).collect();
                let views: Vec<doc::DialogView<'_>> = calls
                    .iter()
                    .zip(&ids)
                    .map(|((d, dir), id)| dialog_view(d, *dir, id))
                    .collect();
                if doc::aggregate_dialog_info(&ent, version, &docs, &views, out).is_err() {
                    let _ = doc::aggregate_dialog_info(&ent, version, &[], &views, out);
                }
            }
            Package::Winfo => {
                presentity_key(Package::Presence.name(), aor, &mut pkey);
                let watchers: Vec<Arc<Watcher>> = p
                    .table
                    .watchers_of(&pkey)
                    .iter()
                    .filter_map(|k| p.table.watcher(k))
                    .collect();
                let ids: Vec<String> = watchers.iter().map(|w| format!("{:x}", w.id)).collect();
                let views: Vec<doc::WatcherView<'_>> = watchers
                    .iter()
                    .zip(&ids)
                    .map(|(w, id)| doc::WatcherView {
                        id: id.as_bytes(),
                        status: doc::WatcherStatus::Active,
                        event: "subscribe",
                        uri: &w.watcher_uri,
                        display_name: b"",
                        duration_subscribed: Some(now.saturating_sub(w.created_ms) / 1000),
                    })
                    .collect();
                doc::watcherinfo(&ent, Package::Presence.name(), version, &views, out);
            }
        }
    }

    /// The node's live calls of user `aor`, with its side (a scan of the dialog table).
    fn calls_of(&self, aor: &[u8]) -> Vec<(Arc<Dialog>, doc::Direction)> {
        let mut v = Vec::new();
        let Some(d) = self.dialogs.as_ref() else {
            return v;
        };
        let mut scratch = Vec::new();
        let is = |uri: &[u8], scratch: &mut Vec<u8>| {
            Uri::parse(uri)
                .is_ok_and(|u| Registrar::canonical_aor(scratch, &u) && scratch.as_slice() == aor)
        };
        for call in d.table.snapshot() {
            if is(&call.caller, &mut scratch) {
                v.push((call, doc::Direction::Initiator));
            } else if is(&call.callee, &mut scratch) {
                v.push((call, doc::Direction::Recipient));
            }
        }
        v
    }

    /// Notifies the watchers of presentity `pkey` that this node acts on: they join the
    /// worker's NOTIFY queue, sent as far as the driver has room now, the rest with the
    /// next messages and ticks (a fan-out to thousands is paced, never dropped).
    pub(crate) fn notify_presentity<O: Outbox>(&mut self, pkey: &[u8], now: Millis, out: &mut O) {
        let Some(p) = self.presence.as_ref() else {
            return;
        };
        for k in p.table.watchers_of(pkey) {
            let Some(w) = p.table.watcher(&k) else {
                continue;
            };
            if !p
                .segment
                .acts_on_at(DEFAULT_TAG_SLOT, bucket_of(&w.call_id), now)
                .0
            {
                p.stats.not_owner.fetch_add(1, Relaxed);
                continue;
            }
            if self.notify_queue.len() >= MAX_QUEUED_NOTIFIES {
                p.stats.notifies_dropped.fetch_add(1, Relaxed);
                continue;
            }
            self.notify_queue.push_back(k);
        }
        self.drain_notifies(now, out);
    }

    /// Sends queued NOTIFYs while the driver has room (a few datagrams kept for the
    /// replies of the message at hand).
    pub(crate) fn drain_notifies<O: Outbox>(&mut self, now: Millis, out: &mut O) {
        while out.room() > NOTIFY_ROOM_RESERVE {
            let Some(k) = self.notify_queue.pop_front() else {
                return;
            };
            let Some(w) = self.presence.as_ref().and_then(|p| p.table.watcher(&k)) else {
                continue;
            };
            self.send_notify(&w, None, None, now, out);
        }
    }

    /// The BLF watchers of both sides of a call hear of its new state.
    pub(crate) fn dialog_changed<O: Outbox>(&mut self, d: &Dialog, now: Millis, out: &mut O) {
        if self.presence.is_none() {
            return;
        }
        for uri in [&d.caller, &d.callee] {
            if let Some(pkey) = dialog_presentity(uri) {
                let has = self
                    .presence
                    .as_ref()
                    .is_some_and(|p| p.table.watcher_count(&pkey) > 0);
                if has {
                    self.notify_presentity(&pkey, now, out);
                }
            }
        }
    }

    /// A NOTIFY to watcher `key` was refused (481) or not answered: the subscription is
    /// gone (RFC 6665 §4.2.2).
    pub(crate) fn notify_failed<O: Outbox>(&mut self, key: &[u8], now: Millis, out: &mut O) {
        self.end_watcher(key, PresenceEnd::Rejected, now, out);
    }

    /// Removes watcher `key` (an end record); an expired one gets its final NOTIFY.
    fn end_watcher<O: Outbox>(&mut self, key: &[u8], why: PresenceEnd, now: Millis, out: &mut O) {
        let (node, worker) = (self.node, self.worker);
        let Some(p) = self.presence.as_mut() else {
            return;
        };
        let w = p.table.update_watcher(key, |cur| {
            let cur = cur?;
            if why == PresenceEnd::Expired && cur.expires_ms > now {
                return None;
            }
            let mut n = cur.clone();
            n.state = SubState::Terminated;
            n.version = next_version(cur.version, now, worker);
            Some(n)
        });
        let Some(w) = w else { return };
        match why {
            PresenceEnd::Rejected => p.stats.notify_failures.fetch_add(1, Relaxed),
            _ => p.stats.watchers_expired.fetch_add(1, Relaxed),
        };
        emit(
            p,
            node,
            now,
            ChangeRef::WatcherEnd {
                key,
                watcher: &w,
                reason: why,
            },
        );
        if why == PresenceEnd::Expired {
            // RFC 6665 §4.2.2: the final NOTIFY of a subscription that ran out.
            self.send_notify(&w, Some("timeout"), None, now, out);
        }
        if w.presentity.starts_with(b"presence\0") {
            let wk = winfo_key(&w.presentity);
            self.notify_presentity(&wk, now, out);
        }
    }

    /// Removes publication `etag` of presentity `pkey` when it has expired.
    fn expire_publication<O: Outbox>(
        &mut self,
        pkey: &[u8],
        etag: &[u8],
        now: Millis,
        out: &mut O,
    ) {
        let node = self.node;
        let Some(p) = self.presence.as_mut() else {
            return;
        };
        let gone = p.table.update_presentity(pkey, |cur| {
            let cur = cur?;
            if cur.find(etag)?.expires_ms > now {
                return None;
            }
            let mut n = cur.clone();
            n.pubs.retain(|x| &x.etag[..] != etag);
            Some(n)
        });
        if gone.is_none() {
            return;
        }
        p.stats.publications_expired.fetch_add(1, Relaxed);
        emit(
            p,
            node,
            now,
            ChangeRef::PublishRemove {
                key: pkey,
                etag,
                reason: PresenceEnd::Expired,
            },
        );
        self.notify_presentity(pkey, now, out);
    }

    /// An order of the control plane about presence (see [`ORDER_NOTIFY`] and the
    /// others); false when `reason` is not one.
    pub(crate) fn presence_order<O: Outbox>(
        &mut self,
        reason: u8,
        key: &[u8],
        now: Millis,
        out: &mut O,
    ) -> bool {
        match reason {
            ORDER_NOTIFY => self.notify_presentity(key, now, out),
            ORDER_PUBLICATION_EXPIRED => {
                let (pkey, etag) = match key.iter().rposition(|&b| b == 0) {
                    Some(i) => (&key[..i], &key[i + 1..]),
                    None => return true,
                };
                self.expire_publication(pkey, etag, now, out);
            }
            ORDER_WATCHER_EXPIRED => self.end_watcher(key, PresenceEnd::Expired, now, out),
            _ => return false,
        }
        true
    }
}

/// The position of a `;tag=` parameter in a From/To value.
fn find_tag_param(v: &[u8]) -> Option<usize> {
    let lower: Vec<u8> = v.to_ascii_lowercase();
    let close = v.iter().rposition(|&b| b == b'>').unwrap_or(0);
    memchr::memmem::find_iter(&lower, b";tag=").find(|&i| i > close)
}

/// One call as a dialog-info `<dialog>` (RFC 4235 §4.1).
fn dialog_view<'a>(d: &'a Dialog, dir: doc::Direction, id: &'a str) -> doc::DialogView<'a> {
    let state = match d.state {
        DialogState::Unconfirmed => "trying",
        DialogState::Early => "early",
        DialogState::Confirmed => "confirmed",
        DialogState::Terminated => "terminated",
    };
    let (local_tag, remote_tag, local, remote) = match dir {
        doc::Direction::Initiator => (&d.from_tag[..], &d.to_tag[..], &d.caller, &d.callee),
        doc::Direction::Recipient => (&d.to_tag[..], &d.from_tag[..], &d.callee, &d.caller),
    };
    doc::DialogView {
        id: id.as_bytes(),
        call_id: &d.call_id,
        local_tag,
        remote_tag,
        direction: dir,
        state,
        duration_s: None,
        local_identity: local,
        remote_identity: remote,
    }
}

/// A publication's upsert record.
fn upsert<'a>(key: &'a [u8], replaces: &'a [u8], p: &'a Publication) -> ChangeRef<'a> {
    ChangeRef::PublishUpsert {
        key,
        replaces,
        publication: p,
    }
}

/// Pushes a presence change record on the worker's ring.
fn emit(p: &mut PresenceShare, node: u16, now: Millis, change: ChangeRef<'_>) {
    let version = match &change {
        ChangeRef::PublishUpsert { publication, .. } => publication.version,
        ChangeRef::WatcherUpsert { watcher, .. } | ChangeRef::WatcherEnd { watcher, .. } => {
            watcher.version
        }
        _ => next_version(0, now, 0),
    };
    let rec = ChangeRecordRef {
        origin: NodeId(node),
        version,
        at_ms: now,
        change,
    };
    if p.changes.push(&rec).is_err() {
        p.stats.records_dropped.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cseq_floor_increases_four_a_second_and_stays_below_2_31() {
        let t = 1_795_000_000_000;
        assert_eq!(cseq_floor(t + 1000) - cseq_floor(t), 4);
        assert!(cseq_floor(u64::MAX) <= 0x7fff_ffff);
        assert_eq!(cseq_floor(0), 0);
    }

    #[test]
    fn tag_parameter_of_a_to_value() {
        assert_eq!(find_tag_param(b"<sip:a@b;tag=x>;tag=y"), Some(15));
        assert_eq!(find_tag_param(b"<sip:a@b>"), None);
        assert_eq!(find_tag_param(b"sip:a@b;TAG=1"), Some(7));
    }
}
