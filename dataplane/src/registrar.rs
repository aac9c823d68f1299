//! The registrar (RFC 3261 §10.3, RFC 3327 Path, RFC 5626 instance/reg-id), sans-IO.
//!
//! `register` applies one REGISTER to the shared usrloc table and returns what to answer;
//! `write_bindings` writes the 200's Contact list. Every mutation, the timer-driven
//! expiries included, is pushed as a versioned change record onto the worker's change
//! ring; a mutation whose records the ring could not take is never made (the REGISTER is
//! answered 503 instead), so nothing acknowledged is missing from the change stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sip_wire::headers::ContactAddr;
use sip_wire::uri::unescaped;
use sip_wire::{Checked, Contact, HeaderName, Message, Scheme, Uri, Via, Writer};
use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{ChangeRecordRef, ChangeRef, RemoveReason, next_version};
use sipmesh_cluster::ring::{ChangeBatch, ChangeProducer};
use sipmesh_cluster::usrloc::{
    AorRecord, Binding, BindingParts, FLAG_KEEPALIVE, FLAG_NATED, Q_NONE, Update, Usrloc,
};
use sipmesh_cluster::wheel::TimerWheel;

use crate::io::{Millis, Source, Transport};

/// Most Contact values accepted in one REGISTER.
pub const MAX_REQUEST_CONTACTS: usize = 32;
/// Longest canonical AoR accepted.
pub const MAX_AOR_LEN: usize = 1024;
/// Longest User-Agent kept with a binding.
const MAX_USER_AGENT: usize = 128;

/// What happens when a REGISTER would leave an AoR with more than `max_contacts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxContactsPolicy {
    /// Refuse the whole REGISTER: 403 "Too Many Registered Contacts"; nothing changes.
    Reject,
    /// Drop the least recently refreshed bindings not named in the request.
    ReplaceOldest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarConfig {
    /// Used when neither the Contact nor the Expires header gives an interval.
    pub default_expires: u32,
    /// Shorter non-zero intervals are refused with 423 (RFC 3261 §10.3 step 7).
    pub min_expires: u32,
    /// Longer intervals are shortened to this.
    pub max_expires: u32,
    /// Most bindings per AoR.
    pub max_contacts: usize,
    pub max_contacts_policy: MaxContactsPolicy,
    /// Domains served (lower case). Empty: any domain.
    pub domains: Vec<String>,
    /// Which bindings get NAT keepalive pings (flagged at registration, replicated).
    pub keepalive: KeepaliveMode,
    /// How a new binding's sharing tag is chosen.
    pub tagging: TagRules,
}

/// Which contacts are flagged for NAT keepalive pings when they register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepaliveMode {
    /// None.
    #[default]
    Off,
    /// UDP contacts whose registration looks NATed (see [`looks_nated`]).
    Nated,
    /// Every UDP contact.
    All,
}

/// Rules choosing the sharing tag a binding is created under, first match wins: the
/// header an upstream proxy set, the listener the REGISTER arrived on, the AoR's domain.
/// No match: untagged (the node-wide default tag).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagRules {
    /// Header carrying the tag (e.g. `X-Sharing-Tag`), trusted as set by an upstream
    /// proxy; a value that is not a tag name is ignored.
    pub header: Option<String>,
    /// Listener address → tag.
    pub listeners: Vec<(std::net::SocketAddr, String)>,
    /// AoR domain (lower case) → tag.
    pub domains: Vec<(String, String)>,
}

impl TagRules {
    /// The tag of a binding registered through `m` on `local` for an AoR of `domain`.
    pub fn pick<'m>(
        &'m self,
        m: &Message<'m>,
        local: std::net::SocketAddr,
        domain: &[u8],
    ) -> &'m [u8] {
        if let Some(h) = &self.header
            && let Some(v) = m.header_by_name(h.as_bytes())
        {
            let v = v.trim_ascii();
            if sipmesh_cluster::ownership::is_tag_name(v) {
                return v;
            }
        }
        if let Some((_, t)) = self.listeners.iter().find(|(a, _)| *a == local) {
            return t.as_bytes();
        }
        if let Some((_, t)) = self
            .domains
            .iter()
            .find(|(d, _)| d.as_bytes().eq_ignore_ascii_case(domain))
        {
            return t.as_bytes();
        }
        b""
    }
}

/// Whether a registration looks NATed (the nathelper tests): the Contact host is a
/// private (RFC 1918 / RFC 6598 / unique-local) address, or the Contact's or the top
/// Via's address differs from where the request came from.
pub fn looks_nated(contact: &Uri<'_>, via: &Via<'_>, src: std::net::SocketAddr) -> bool {
    let ip = |h: &[u8]| {
        let h = h
            .strip_prefix(b"[")
            .and_then(|h| h.strip_suffix(b"]"))
            .unwrap_or(h);
        std::str::from_utf8(h)
            .ok()
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
    };
    let private = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => {
            let o = v.octets();
            v.is_private() || (o[0] == 100 && (64..128).contains(&o[1]))
        }
        std::net::IpAddr::V6(v) => (v.segments()[0] & 0xfe00) == 0xfc00,
    };
    let differs = |host: &[u8], port: Option<u16>| match ip(host) {
        Some(a) => a != src.ip() || port.unwrap_or(5060) != src.port(),
        // A host name: resolved elsewhere, compare nothing.
        None => false,
    };
    ip(contact.host).is_some_and(private)
        || differs(contact.host, contact.port)
        || differs(via.host, via.rport.flatten().or(via.port))
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            default_expires: 3600,
            min_expires: 60,
            max_expires: 86_400,
            max_contacts: 10,
            max_contacts_policy: MaxContactsPolicy::Reject,
            domains: Vec::new(),
            keepalive: KeepaliveMode::Off,
            tagging: TagRules::default(),
        }
    }
}

/// What a location lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The Request-URI is not a user of a domain we serve.
    NotOurs,
    /// No such address-of-record (404).
    NotFound,
    /// Known, but no live contact (480).
    NoContacts,
    /// This many contacts.
    Found(usize),
}

/// Registrar counters, read by the control plane.
#[derive(Debug, Default)]
pub struct RegistrarStats {
    pub registers: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Bindings added or refreshed (one upsert record each).
    pub bindings_upserted: AtomicU64,
    pub bindings_removed: AtomicU64,
    pub bindings_expired: AtomicU64,
    /// REGISTERs refused with 503 because the change ring was full.
    pub change_ring_busy: AtomicU64,
    /// Expiries deferred a second because the change ring was full.
    pub expiry_deferred: AtomicU64,
}

/// Why a REGISTER is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub code: u16,
    pub reason: &'static str,
    /// For 423: the Min-Expires to announce.
    pub min_expires: Option<u32>,
    /// For 503: the Retry-After to announce.
    pub retry_after: Option<u32>,
}

impl Reject {
    const fn new(code: u16, reason: &'static str) -> Reject {
        Reject {
            code,
            reason,
            min_expires: None,
            retry_after: None,
        }
    }
}

/// The registrar's answer to one REGISTER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegReply {
    /// 200 OK; list the bindings with `write_bindings`.
    Ok,
    Reject(Reject),
}

/// One Contact of the request, resolved.
#[derive(Clone, Copy)]
struct ReqContact<'a> {
    contact: ContactAddr<'a>,
    uri: Uri<'a>,
    expires: u32,
}

/// What a REGISTER does to one existing binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Remove(RemoveReason),
    /// Replaced by the binding of request contact `j`.
    ReplacedBy(usize),
}

/// What one request contact does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Refreshes (or replaces) existing binding `k`.
    Old(usize),
    /// Adds a binding.
    New,
    /// Nothing: expires=0 for an unknown binding, or a later contact names the same one.
    Nothing,
}

/// The request-wide inputs of a REGISTER.
struct ReqInfo<'r> {
    call_id: &'r [u8],
    cseq: u32,
    path: &'r [u8],
    user_agent: &'r [u8],
    src: &'r Source,
    transport: u8,
    /// Sharing tag of new bindings.
    tag: &'r [u8],
    /// The top Via (NAT detection).
    via: &'r Via<'r>,
    keepalive: KeepaliveMode,
    now_s: u32,
    now_ms: Millis,
    node: NodeId,
    worker: u16,
}

pub struct Registrar {
    cfg: RegistrarConfig,
    table: Arc<Usrloc>,
    changes: ChangeProducer,
    node: NodeId,
    worker: u16,
    wheel: TimerWheel<Arc<[u8]>>,
    stats: Arc<RegistrarStats>,
    // Reused scratch space: no allocation per REGISTER once warmed up.
    aor: Vec<u8>,
    path: Vec<u8>,
    fates: Vec<Fate>,
    targets: Vec<Target>,
    batch: ChangeBatch,
    due: Vec<Arc<[u8]>>,
    last_version: u64,
}

/// Bytes a change record may take beyond the strings it carries.
const RECORD_OVERHEAD: usize = 96;

impl Registrar {
    pub fn new(
        cfg: RegistrarConfig,
        table: Arc<Usrloc>,
        changes: ChangeProducer,
        node: NodeId,
        worker: u16,
        now_ms: Millis,
        stats: Arc<RegistrarStats>,
    ) -> Registrar {
        Registrar {
            cfg,
            table,
            changes,
            node,
            worker,
            wheel: TimerWheel::new((now_ms / 1000) as u32, 4096),
            stats,
            aor: Vec::with_capacity(MAX_AOR_LEN),
            path: Vec::with_capacity(4096),
            fates: Vec::with_capacity(1024),
            targets: Vec::with_capacity(MAX_REQUEST_CONTACTS),
            batch: ChangeBatch::with_capacity(64 * 1024),
            due: Vec::with_capacity(1024),
            last_version: 0,
        }
    }

    pub fn stats(&self) -> &Arc<RegistrarStats> {
        &self.stats
    }

    pub fn config(&self) -> &RegistrarConfig {
        &self.cfg
    }

    /// Change records this worker has pushed so far (its ring position).
    pub fn records_pushed(&self) -> u64 {
        self.changes.stats().pushed()
    }

    /// Puts an AoR loaded at start (restart recovery) on this worker's expiry wheel.
    pub fn schedule_expiry(&mut self, key: Arc<[u8]>, expires_at: u32) {
        self.wheel.insert(expires_at, key);
    }

    /// Canonical AoR of a SIP URI: unescaped user, '@', lower-case host. Escaped NULs
    /// stay in the key (RFC 4475 §3.1.1.4): an AoR is never truncated.
    pub(crate) fn canonical_aor(out: &mut Vec<u8>, uri: &Uri<'_>) -> bool {
        out.clear();
        if let Some(user) = uri.user {
            out.extend(unescaped(user));
            out.push(b'@');
        }
        out.extend(unescaped(uri.host).map(|b| b.to_ascii_lowercase()));
        out.len() <= MAX_AOR_LEN
    }

    /// Apply one REGISTER that passed `Message::check_request` (`c` is what it parsed).
    pub fn register(
        &mut self,
        m: &Message<'_>,
        c: &Checked<'_>,
        src: &Source,
        now_ms: Millis,
    ) -> RegReply {
        self.stats.registers.fetch_add(1, Relaxed);
        let r = self.register_inner(m, c, src, now_ms);
        match r {
            RegReply::Ok => self.stats.accepted.fetch_add(1, Relaxed),
            RegReply::Reject(_) => self.stats.rejected.fetch_add(1, Relaxed),
        };
        r
    }

    /// Location lookup for a request to `uri` (OpenSIPS `lookup()`): `f` sees every live
    /// binding of its AoR, highest q first.
    pub fn lookup(&mut self, uri: &Uri<'_>, now_ms: Millis, mut f: impl FnMut(&Binding)) -> Lookup {
        if !uri.is_sip() || uri.user.is_none() || !self.serves(uri.host) {
            return Lookup::NotOurs;
        }
        if !Self::canonical_aor(&mut self.aor, uri) {
            return Lookup::NotFound;
        }
        let now_s = (now_ms / 1000) as u32;
        self.table.read(&self.aor, |rec| {
            let Some(rec) = rec else {
                return Lookup::NotFound;
            };
            let mut live: [Option<&Binding>; 16] = [None; 16];
            let mut n = 0;
            for b in rec.bindings().iter().filter(|b| b.expires_at > now_s) {
                if n < live.len() {
                    live[n] = Some(b);
                    n += 1;
                }
            }
            if n == 0 {
                return Lookup::NoContacts;
            }
            // RFC 3261 §16.6: q-values order the targets (no q ranks as 1.0).
            let q = |b: &Binding| if b.q == Q_NONE { 1000 } else { b.q };
            live[..n].sort_by_key(|b| std::cmp::Reverse(b.map_or(0, q)));
            for b in live[..n].iter().flatten() {
                f(b);
            }
            Lookup::Found(n)
        })
    }

    /// Whether `host` is a domain this node serves.
    pub fn serves(&self, host: &[u8]) -> bool {
        self.cfg.domains.is_empty()
            || self
                .cfg
                .domains
                .iter()
                .any(|d| d.as_bytes().eq_ignore_ascii_case(host))
    }

    fn register_inner(
        &mut self,
        m: &Message<'_>,
        chk: &Checked<'_>,
        src: &Source,
        now_ms: Millis,
    ) -> RegReply {
        let now_s = (now_ms / 1000) as u32;
        // RFC 3261 §10.3 step 1: is the domain of the Request-URI ours?
        let ruri = chk.request_uri;
        if !ruri.is_sip() {
            return RegReply::Reject(Reject::new(416, "Unsupported URI Scheme"));
        }
        if !self.serves(ruri.host) {
            return RegReply::Reject(Reject::new(404, "Domain Not Served"));
        }
        // RFC 3261 §10.3 step 5: the AoR comes from To and must be a SIP(S) URI.
        let to_uri = chk.to.parsed_uri();
        if !matches!(to_uri.scheme, Scheme::Sip | Scheme::Sips) {
            return RegReply::Reject(Reject::new(400, "Address-of-Record Must Be a SIP URI"));
        }
        if !self.serves(to_uri.host) {
            return RegReply::Reject(Reject::new(404, "Not Found"));
        }
        if !Self::canonical_aor(&mut self.aor, &to_uri) {
            return RegReply::Reject(Reject::new(400, "Address-of-Record Too Long"));
        }
        let (call_id, cseq) = (chk.call_id, chk.cseq);
        let header_expires = chk.expires;

        // RFC 3261 §10.3 step 6: collect the contacts; '*' only alone and with Expires: 0.
        let mut star = false;
        let blank = ReqContact {
            contact: ContactAddr {
                addr: sip_wire::NameAddr {
                    display: b"",
                    uri: b"",
                    bracketed: false,
                    params: b"",
                    parsed: to_uri,
                },
                expires: None,
                q: None,
                instance: None,
                reg_id: None,
            },
            uri: to_uri,
            expires: 0,
        };
        let mut contacts = [blank; MAX_REQUEST_CONTACTS];
        let mut n = 0;
        for c in m.contacts() {
            match c {
                Ok(Contact::Star) => star = true,
                Ok(Contact::Addr(a)) => {
                    if n == MAX_REQUEST_CONTACTS {
                        return RegReply::Reject(Reject::new(403, "Too Many Contacts In Request"));
                    }
                    let uri = a.addr.parsed_uri();
                    // RFC 3261 §10.3 step 7: Contact param, else Expires header, else default.
                    let expires = a
                        .expires
                        .or(header_expires)
                        .unwrap_or(self.cfg.default_expires);
                    contacts[n] = ReqContact {
                        contact: a,
                        uri,
                        expires,
                    };
                    n += 1;
                }
                Err(_) => return RegReply::Reject(Reject::new(400, "Malformed Contact")),
            }
        }
        let contacts = &mut contacts[..n];
        if star && (n > 0 || header_expires != Some(0)) {
            // RFC 3261 §10.3 step 6
            return RegReply::Reject(Reject::new(400, "Invalid Wildcard Contact"));
        }
        for c in contacts.iter_mut() {
            // RFC 3261 §10.3 step 7: refuse a too-short interval with 423 and Min-Expires
            // (only below one hour); otherwise raise or shorten it into range.
            if c.expires > 0 && c.expires < self.cfg.min_expires {
                if c.expires < 3600 {
                    return RegReply::Reject(Reject {
                        min_expires: Some(self.cfg.min_expires),
                        ..Reject::new(423, "Interval Too Brief")
                    });
                }
                c.expires = self.cfg.min_expires;
            }
            c.expires = c.expires.min(self.cfg.max_expires);
        }
        if !star && n == 0 {
            // A fetch of the current bindings (RFC 3261 §10.2.3).
            return RegReply::Ok;
        }

        // RFC 3327 §5.3: keep the Path values with the bindings.
        self.path.clear();
        for (k, v) in m.headers_named(HeaderName::Path).enumerate() {
            if k > 0 {
                self.path.extend_from_slice(b",");
            }
            self.path.extend_from_slice(v);
        }
        let user_agent = m.header(HeaderName::UserAgent).unwrap_or_default();
        let user_agent = &user_agent[..user_agent.len().min(MAX_USER_AGENT)];
        let transport = match src.transport {
            Transport::Udp => sipmesh_cluster::usrloc::TRANSPORT_UDP,
            Transport::Tcp => sipmesh_cluster::usrloc::TRANSPORT_TCP,
        };

        // Nothing acknowledged may be missing from the change stream: make sure the ring
        // can take every record this REGISTER may produce before touching the table.
        let per_record = m.len + RECORD_OVERHEAD + MAX_AOR_LEN;
        let bound = (n + self.cfg.max_contacts + 1) * per_record;
        if self.changes.free_bytes() < bound.min(self.changes.capacity() / 2) {
            self.stats.change_ring_busy.fetch_add(1, Relaxed);
            return RegReply::Reject(Reject {
                retry_after: Some(1),
                ..Reject::new(503, "Change Stream Busy")
            });
        }

        let Registrar {
            cfg,
            table,
            changes,
            node,
            worker,
            fates,
            targets,
            batch,
            aor,
            path,
            last_version,
            ..
        } = self;
        let (node, worker) = (*node, *worker);
        let free = changes.free_bytes();
        let contacts = &*contacts;
        let tag = cfg.tagging.pick(m, src.local, to_uri.host);
        let req = ReqInfo {
            call_id,
            cseq: cseq.seq,
            path,
            user_agent,
            src,
            transport,
            tag,
            via: &chk.top_via,
            keepalive: cfg.keepalive,
            now_s,
            now_ms,
            node,
            worker,
        };
        let outcome = table.update(aor, |old| {
            let old = old.map(AorRecord::bindings).unwrap_or(&[]);
            plan_register(
                cfg,
                old,
                contacts,
                star,
                &req,
                *last_version,
                aor,
                fates,
                targets,
                batch,
                free,
            )
        });
        match outcome.value {
            Err(rej) => {
                if rej.code == 503 {
                    self.stats.change_ring_busy.fetch_add(1, Relaxed);
                }
                RegReply::Reject(rej)
            }
            Ok((version, min_exp)) => {
                self.last_version = version;
                if self.changes.push_batch(&self.batch).is_err() {
                    // Unreachable: the batch was sized against the free space, which only
                    // grows until this single producer pushes.
                    debug_assert!(false, "change ring refused a batch sized to fit");
                }
                self.count_batch();
                if let (Some(key), Some(at)) = (outcome.key, min_exp) {
                    self.wheel.insert(at, key);
                }
                RegReply::Ok
            }
        }
    }

    fn count_batch(&self) {
        for rec in self.batch.iter_kinds() {
            match rec {
                Some(RemoveReason::Expired) => self.stats.bindings_expired.fetch_add(1, Relaxed),
                Some(_) => self.stats.bindings_removed.fetch_add(1, Relaxed),
                None => self.stats.bindings_upserted.fetch_add(1, Relaxed),
            };
        }
    }

    /// Write the 200's Contact list (every current binding with its remaining expires,
    /// RFC 3261 §10.3 step 8) and the Path echo (RFC 3327 §5.3).
    pub fn write_bindings(&self, m: &Message<'_>, w: &mut Writer<'_>, now_ms: Millis) {
        let now_s = (now_ms / 1000) as u32;
        self.table.read(&self.aor, |rec| {
            for b in rec.map(AorRecord::bindings).unwrap_or(&[]) {
                if b.expires_at <= now_s {
                    continue;
                }
                w.put(b"Contact: <")
                    .put(b.contact())
                    .put(b">;expires=")
                    .put_u64(u64::from(b.expires_at - now_s));
                if b.q != Q_NONE {
                    write_q(w, b.q);
                }
                if !b.instance().is_empty() {
                    w.put(b";+sip.instance=\"").put(b.instance()).put(b"\"");
                }
                if b.reg_id != 0 {
                    w.put(b";reg-id=").put_u64(u64::from(b.reg_id));
                }
                w.crlf();
            }
        });
        let supports_path = m
            .tokens(HeaderName::Supported)
            .any(|t| t.eq_ignore_ascii_case(b"path"));
        if supports_path {
            for p in m.headers_named(HeaderName::Path) {
                w.header("Path", p);
            }
        }
    }

    /// Remove the bindings whose time has come (timer wheel, one-second resolution).
    pub fn on_tick(&mut self, now_ms: Millis) {
        let now_s = (now_ms / 1000) as u32;
        let due = &mut self.due;
        self.wheel.advance(now_s, |k| due.push(k));
        let mut due = std::mem::take(&mut self.due);
        for key in due.drain(..) {
            self.expire(&key, now_s, now_ms);
        }
        self.due = due;
    }

    fn expire(&mut self, key: &Arc<[u8]>, now_s: u32, now_ms: Millis) {
        let Registrar {
            table,
            changes,
            node,
            worker,
            batch,
            last_version,
            ..
        } = self;
        let (node, worker) = (*node, *worker);
        let free = changes.free_bytes();
        let outcome = table.update(key, |old| {
            batch.clear();
            let Some(old) = old else {
                return Update::Keep(Expiry::Nothing);
            };
            if old.bindings().iter().all(|b| b.expires_at > now_s) {
                // Refreshed since this entry was set: the write that moved the expiry set
                // its own entry, so this stale one is simply dropped.
                return Update::Keep(Expiry::Nothing);
            }
            let mut version = *last_version;
            let mut kept = Vec::with_capacity(old.len());
            for b in old.bindings() {
                if b.expires_at <= now_s {
                    version = next_version(b.version.max(version), now_ms, worker);
                    let rec = remove_record(node, version, now_ms, key, b, RemoveReason::Expired);
                    batch.push(&rec);
                } else {
                    kept.push(b.clone());
                }
            }
            if batch.frame_bytes() > free {
                return Update::Keep(Expiry::Deferred);
            }
            let next_at = kept.iter().map(|b| b.expires_at).min();
            Update::Replace(AorRecord::new(kept), Expiry::Removed { version, next_at })
        });
        match outcome.value {
            Expiry::Nothing => {}
            Expiry::Deferred => {
                // The ring cannot take the records now: try again in a second.
                self.stats.expiry_deferred.fetch_add(1, Relaxed);
                self.wheel.insert(now_s + 1, key.clone());
            }
            Expiry::Removed { version, next_at } => {
                self.last_version = version;
                if self.changes.push_batch(&self.batch).is_err() {
                    // Unreachable: the batch was sized against the free space.
                    debug_assert!(false, "change ring refused a batch sized to fit");
                }
                self.count_batch();
                if let Some(at) = next_at {
                    self.wheel.insert(at, key.clone());
                }
            }
        }
    }

    /// Bindings waiting in this worker's timer wheel.
    pub fn timers(&self) -> usize {
        self.wheel.len()
    }
}

type RegisterResult = Result<(u64, Option<u32>), Reject>;

/// What a timer firing for an AoR did.
enum Expiry {
    /// Nothing was due (a stale entry, or the AoR is gone).
    Nothing,
    /// Bindings were due but the change ring could not take their records.
    Deferred,
    /// Lapsed bindings were removed; `next_at` is when the next one lapses.
    Removed { version: u64, next_at: Option<u32> },
}

/// Decide what one REGISTER does to the bindings of an AoR (RFC 3261 §10.3 steps 6–8),
/// encode the change records into `batch`, and build the new record. Runs inside the table
/// update, possibly more than once: it only computes. Allocates only the new record: the
/// bindings it creates and clones of the ones it keeps.
#[allow(clippy::too_many_arguments)]
fn plan_register(
    cfg: &RegistrarConfig,
    old: &[Binding],
    contacts: &[ReqContact<'_>],
    star: bool,
    req: &ReqInfo<'_>,
    last_version: u64,
    aor: &[u8],
    fates: &mut Vec<Fate>,
    targets: &mut Vec<Target>,
    batch: &mut ChangeBatch,
    free: usize,
) -> Update<RegisterResult> {
    batch.clear();
    fates.clear();
    targets.clear();
    for b in old {
        // A lapsed binding not yet collected by the timer goes now.
        fates.push(if b.expires_at <= req.now_s {
            Fate::Remove(RemoveReason::Expired)
        } else {
            Fate::Keep
        });
    }
    if star {
        // RFC 3261 §10.3 step 6: '*' with Expires: 0 removes every binding.
        for f in fates.iter_mut().filter(|f| **f == Fate::Keep) {
            *f = Fate::Remove(RemoveReason::Unregistered);
        }
    }
    for (j, c) in contacts.iter().enumerate() {
        let instance = c.contact.instance.unwrap_or_default();
        let reg_id = c.contact.reg_id.unwrap_or(0);
        let found = (0..old.len()).find(|&k| {
            matches!(fates[k], Fate::Keep | Fate::ReplacedBy(_))
                && same_binding(&old[k], instance, reg_id, &c.uri)
        });
        match found {
            Some(k) => {
                match fates[k] {
                    Fate::ReplacedBy(j0) => targets[j0] = Target::Nothing,
                    // RFC 3261 §10.3 step 7: with the same Call-ID only a higher CSeq may
                    // update a binding; otherwise the request fails.
                    // The request that wrote this binding, again: a retransmission (no
                    // transaction layer absorbs REGISTERs here). RFC 3261 §17.2.3 would
                    // resend the same answer; the current bindings are that answer.
                    _ if old[k].call_id() == req.call_id && req.cseq == old[k].cseq => {
                        targets.push(Target::Nothing);
                        continue;
                    }
                    _ if old[k].call_id() == req.call_id && req.cseq < old[k].cseq => {
                        return Update::Keep(Err(Reject::new(500, "Out of Order CSeq")));
                    }
                    _ => {}
                }
                if c.expires == 0 {
                    fates[k] = Fate::Remove(RemoveReason::Unregistered);
                    targets.push(Target::Nothing);
                } else {
                    fates[k] = Fate::ReplacedBy(j);
                    targets.push(Target::Old(k));
                }
            }
            None => {
                // A contact named twice in one request: the last one counts.
                for j0 in 0..j {
                    if targets[j0] == Target::New && same_binding_contacts(&contacts[j0], c) {
                        targets[j0] = Target::Nothing;
                    }
                }
                targets.push(if c.expires > 0 {
                    Target::New
                } else {
                    Target::Nothing
                });
            }
        }
    }
    let changed =
        fates.iter().any(|f| *f != Fate::Keep) || targets.iter().any(|t| *t != Target::Nothing);
    if !changed {
        // Nothing to write (a retransmission, or removals of unknown contacts).
        return Update::Keep(Ok((last_version, None)));
    }
    let alive = |fates: &[Fate], targets: &[Target]| {
        fates
            .iter()
            .filter(|f| matches!(f, Fate::Keep | Fate::ReplacedBy(_)))
            .count()
            + targets.iter().filter(|t| **t == Target::New).count()
    };
    let mut n = alive(fates, targets);
    if n > cfg.max_contacts {
        if cfg.max_contacts_policy == MaxContactsPolicy::Reject {
            return Update::Keep(Err(Reject::new(403, "Too Many Registered Contacts")));
        }
        while n > cfg.max_contacts {
            let oldest = (0..old.len())
                .filter(|&k| fates[k] == Fate::Keep)
                .min_by_key(|&k| (old[k].last_modified, old[k].expires_at));
            let Some(k) = oldest else {
                return Update::Keep(Err(Reject::new(403, "Too Many Registered Contacts")));
            };
            fates[k] = Fate::Remove(RemoveReason::Replaced);
            n -= 1;
        }
    }

    // Records, in a fixed order: removals of existing bindings, then refreshes, then new
    // bindings; each with its own version.
    let mut version = last_version;
    let mut bump = |prev: u64| {
        version = next_version(prev.max(version), req.now_ms, req.worker);
        version
    };
    let mut kept: Vec<Binding> = Vec::with_capacity(if n > 1 { n } else { 0 });
    let mut single: Option<Binding> = None;
    let mut store = |b: Binding, kept: &mut Vec<Binding>| {
        if n > 1 {
            kept.push(b)
        } else {
            single = Some(b)
        }
    };
    for (k, b) in old.iter().enumerate() {
        match fates[k] {
            Fate::Keep => store(b.clone(), &mut kept),
            Fate::Remove(reason) => {
                let v = bump(b.version);
                batch.push(&remove_record(req.node, v, req.now_ms, aor, b, reason));
            }
            Fate::ReplacedBy(j) => {
                let c = &contacts[j];
                let v = bump(b.version);
                let reg_id = c.contact.reg_id.unwrap_or(0);
                let instance = c.contact.instance.unwrap_or_default();
                if b.contact() != c.contact.addr.uri
                    || b.instance() != instance
                    || b.reg_id != reg_id
                {
                    // The binding is now known under another (contact, instance, reg-id):
                    // the old one is replaced, and its removal is in the change stream (a
                    // store keyed by that triple must drop its row).
                    batch.push(&remove_record(
                        req.node,
                        v,
                        req.now_ms,
                        aor,
                        b,
                        RemoveReason::Replaced,
                    ));
                }
                let nb = match new_binding(c, req, v) {
                    Ok(nb) => nb,
                    Err(r) => return Update::Keep(Err(r)),
                };
                batch.push(&upsert_record(req.node, v, req.now_ms, aor, &nb));
                store(nb, &mut kept);
            }
        }
    }
    for (c, t) in contacts.iter().zip(targets.iter()) {
        if *t == Target::New {
            let v = bump(0);
            let nb = match new_binding(c, req, v) {
                Ok(nb) => nb,
                Err(r) => return Update::Keep(Err(r)),
            };
            batch.push(&upsert_record(req.node, v, req.now_ms, aor, &nb));
            store(nb, &mut kept);
        }
    }
    if batch.frame_bytes() > free {
        return Update::Keep(Err(Reject {
            retry_after: Some(1),
            ..Reject::new(503, "Change Stream Busy")
        }));
    }
    let rec = match single {
        Some(b) => AorRecord::single(b),
        None => AorRecord::new(kept),
    };
    let min_exp = rec.min_expires_at();
    Update::Replace(rec, Ok((version, min_exp)))
}

fn same_binding_contacts(a: &ReqContact<'_>, b: &ReqContact<'_>) -> bool {
    let (ia, ib) = (
        a.contact.instance.unwrap_or_default(),
        b.contact.instance.unwrap_or_default(),
    );
    if !ia.is_empty() && !ib.is_empty() {
        return ia == ib && a.contact.reg_id == b.contact.reg_id;
    }
    a.uri.equivalent(&b.uri)
}

/// RFC 5626 §6 / RFC 5627: with an instance on both sides, (instance, reg-id) names the
/// binding; otherwise Contact URIs are compared by RFC 3261 §19.1.4.
fn same_binding(b: &Binding, instance: &[u8], reg_id: u32, uri: &Uri<'_>) -> bool {
    if !instance.is_empty() && !b.instance().is_empty() {
        return b.instance() == instance && b.reg_id == reg_id;
    }
    Uri::parse(b.contact()).is_ok_and(|u| u.equivalent(uri))
}

fn new_binding(c: &ReqContact<'_>, req: &ReqInfo<'_>, version: u64) -> Result<Binding, Reject> {
    Binding::try_new(BindingParts {
        contact: c.contact.addr.uri,
        call_id: req.call_id,
        path: req.path,
        instance: c.contact.instance.unwrap_or_default(),
        user_agent: req.user_agent,
        tag: req.tag,
        expires_at: req.now_s.saturating_add(c.expires),
        cseq: req.cseq,
        q: c.contact.q.unwrap_or(Q_NONE),
        reg_id: c.contact.reg_id.unwrap_or(0),
        source: req.src.remote,
        transport: req.transport,
        flags: keepalive_flags(c, req),
        version,
        origin: req.node,
        last_modified: req.now_s,
    })
    .map_err(|_| Reject::new(400, "Header Value Too Long"))
}

/// The NAT flags of a new binding: keepalive for UDP contacts as configured.
fn keepalive_flags(c: &ReqContact<'_>, req: &ReqInfo<'_>) -> u8 {
    let nated = looks_nated(&c.uri, req.via, req.src.remote);
    let mut f = if nated { FLAG_NATED } else { 0 };
    let udp = req.transport == sipmesh_cluster::usrloc::TRANSPORT_UDP;
    if udp
        && match req.keepalive {
            KeepaliveMode::Off => false,
            KeepaliveMode::Nated => nated,
            KeepaliveMode::All => true,
        }
    {
        f |= FLAG_KEEPALIVE;
    }
    f
}

fn upsert_record<'a>(
    origin: NodeId,
    version: u64,
    at_ms: u64,
    aor: &'a [u8],
    b: &'a Binding,
) -> ChangeRecordRef<'a> {
    ChangeRecordRef {
        origin,
        version,
        at_ms,
        change: ChangeRef::BindingUpsert { aor, binding: b },
    }
}

fn remove_record<'a>(
    origin: NodeId,
    version: u64,
    at_ms: u64,
    aor: &'a [u8],
    b: &'a Binding,
    reason: RemoveReason,
) -> ChangeRecordRef<'a> {
    ChangeRecordRef {
        origin,
        version,
        at_ms,
        change: ChangeRef::BindingRemove {
            aor,
            contact: b.contact(),
            instance: b.instance(),
            reg_id: b.reg_id,
            reason,
        },
    }
}

/// `;q=0.5`, `;q=1`, `;q=0.125`
fn write_q(w: &mut Writer<'_>, q: u16) {
    if q >= 1000 {
        w.put(b";q=1");
        return;
    }
    let digits = [
        b'0' + (q / 100) as u8,
        b'0' + (q / 10 % 10) as u8,
        b'0' + (q % 10) as u8,
    ];
    let len = 3 - digits.iter().rev().take_while(|&&d| d == b'0').count();
    w.put(b";q=0");
    if len > 0 {
        w.put(b".").put(&digits[..len]);
    }
}
