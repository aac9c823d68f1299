//! The presence tables: presentities (the publications of one resource for one event
//! package, RFC 3903) and watchers (subscription dialogs, RFC 6665), with an index from a
//! presentity to its watchers for the NOTIFY fan-out. Lock-free reads and atomic
//! read-modify-writes (papaya), shared by every worker and the control plane.
//!
//! Values are immutable: a change builds a new one, and every change is a versioned change
//! record ([`crate::Change::PublishUpsert`] and the others) replicated like usrloc's. A
//! replica applies them by version with no side effect of its own (no NOTIFY).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bincode::de::{Decode, Decoder};
use bincode::enc::{Encode, Encoder};
use bincode::error::{DecodeError, EncodeError};
use papaya::{Compute, Operation};

use crate::NodeId;
use crate::dialog::{dec_addr, enc_addr};
use crate::usrloc::{MAX_FIELD_LEN, decode_bytes_into};

/// The key of a presentity: the event package, a zero octet, the canonical AoR.
pub fn presentity_key(event: &[u8], aor: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(event);
    out.push(0);
    out.extend_from_slice(aor);
}

/// The event package and AoR of a presentity key.
pub fn split_presentity_key(key: &[u8]) -> (&[u8], &[u8]) {
    match key.iter().position(|&b| b == 0) {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => (key, &[]),
    }
}

/// The key of a watcher: its subscription dialog (Call-ID, our tag, the subscriber's tag).
pub fn watcher_key(call_id: &[u8], local_tag: &[u8], remote_tag: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(call_id);
    out.push(0);
    out.extend_from_slice(local_tag);
    out.push(0);
    out.extend_from_slice(remote_tag);
}

/// One publication (RFC 3903): event state a publisher keeps alive under an entity tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// The entity tag (cluster-unique; a refresh or modification issues a new one).
    pub etag: Arc<[u8]>,
    /// Content-Type of the body.
    pub content_type: Arc<[u8]>,
    /// The document as published.
    pub body: Arc<[u8]>,
    /// Wall-clock ms the body was published (aggregation order: oldest first).
    pub published_ms: u64,
    /// Wall-clock ms it expires.
    pub expires_ms: u64,
    /// Version (see [`crate::next_version`]).
    pub version: u64,
    /// Node that took the PUBLISH.
    pub origin: NodeId,
}

/// The live publications of one resource for one event package.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Presentity {
    /// Oldest first.
    pub pubs: Vec<Publication>,
}

impl Presentity {
    /// The publication with entity tag `etag`.
    pub fn find(&self, etag: &[u8]) -> Option<&Publication> {
        self.pubs.iter().find(|p| &p.etag[..] == etag)
    }

    /// The earliest expiry of its publications (`u64::MAX`: none).
    pub fn next_expiry(&self) -> u64 {
        self.pubs
            .iter()
            .map(|p| p.expires_ms)
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// State of a subscription (RFC 6665 §4.1.3 Subscription-State values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubState {
    /// Authorized: NOTIFYs carry state.
    Active,
    /// Waiting for authorization.
    Pending,
    /// Over (the final NOTIFY was sent).
    Terminated,
}

impl SubState {
    /// The Subscription-State token.
    pub fn as_str(self) -> &'static str {
        match self {
            SubState::Active => "active",
            SubState::Pending => "pending",
            SubState::Terminated => "terminated",
        }
    }
}

/// One subscription: the notifier's side of a subscription dialog (RFC 6665 §4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watcher {
    /// Cluster-unique id: node (16 bits), worker (8 bits), counter (40 bits).
    pub id: u64,
    /// The presentity key (event package and AoR) it watches.
    pub presentity: Arc<[u8]>,
    /// Call-ID of the subscription dialog.
    pub call_id: Arc<[u8]>,
    /// Our tag (the To tag of our 200, the From tag of our NOTIFYs).
    pub local_tag: Arc<[u8]>,
    /// The subscriber's tag.
    pub remote_tag: Arc<[u8]>,
    /// The watcher's URI (From of its SUBSCRIBE).
    pub watcher_uri: Arc<[u8]>,
    /// From header value of the SUBSCRIBE (the To of our NOTIFYs).
    pub from_hdr: Arc<[u8]>,
    /// To header value of the SUBSCRIBE without a tag (the From of our NOTIFYs, tagged).
    pub to_hdr: Arc<[u8]>,
    /// The remote target: Contact URI of the last SUBSCRIBE (RFC 3261 §12.1.1).
    pub contact: Arc<[u8]>,
    /// The route set (Record-Route of the SUBSCRIBE, in order, comma separated; our
    /// NOTIFYs carry it as Route).
    pub routes: Arc<[u8]>,
    /// Where NOTIFYs go: the first route's address, else where the SUBSCRIBE came from.
    pub addr: Option<SocketAddr>,
    /// State.
    pub state: SubState,
    /// Wall-clock ms it was created.
    pub created_ms: u64,
    /// Wall-clock ms it expires.
    pub expires_ms: u64,
    /// Highest CSeq of the subscriber's requests.
    pub remote_cseq: u32,
    /// CSeq of our latest NOTIFY.
    pub local_cseq: u32,
    /// Version (see [`crate::next_version`]).
    pub version: u64,
    /// Node that took the SUBSCRIBE.
    pub origin: NodeId,
}

impl Watcher {
    /// Its key (see [`watcher_key`]).
    pub fn key(&self, out: &mut Vec<u8>) {
        watcher_key(&self.call_id, &self.local_tag, &self.remote_tag, out);
    }
}

fn decode_arc<D: Decoder>(d: &mut D) -> Result<Arc<[u8]>, DecodeError> {
    let mut v = Vec::new();
    decode_bytes_into(d, &mut v, MAX_FIELD_LEN)?;
    Ok(Arc::from(v))
}

// Wire form (bincode 2): etag, content type, body, times, version, origin.
impl Encode for Publication {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.etag[..].encode(e)?;
        self.content_type[..].encode(e)?;
        self.body[..].encode(e)?;
        self.published_ms.encode(e)?;
        self.expires_ms.encode(e)?;
        self.version.encode(e)?;
        self.origin.encode(e)
    }
}

impl<Ctx> Decode<Ctx> for Publication {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(Publication {
            etag: decode_arc(d)?,
            content_type: decode_arc(d)?,
            body: decode_arc(d)?,
            published_ms: u64::decode(d)?,
            expires_ms: u64::decode(d)?,
            version: u64::decode(d)?,
            origin: NodeId::decode(d)?,
        })
    }
}

bincode::impl_borrow_decode!(Publication);

// Wire form (bincode 2): id, the byte strings in declaration order, address, state,
// times, CSeqs, version, origin. Byte strings are bounded on decode.
impl Encode for Watcher {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.id.encode(e)?;
        for s in [
            &self.presentity,
            &self.call_id,
            &self.local_tag,
            &self.remote_tag,
            &self.watcher_uri,
            &self.from_hdr,
            &self.to_hdr,
            &self.contact,
            &self.routes,
        ] {
            s[..].encode(e)?;
        }
        enc_addr(self.addr).encode(e)?;
        (match self.state {
            SubState::Active => 0u8,
            SubState::Pending => 1,
            SubState::Terminated => 2,
        })
        .encode(e)?;
        self.created_ms.encode(e)?;
        self.expires_ms.encode(e)?;
        self.remote_cseq.encode(e)?;
        self.local_cseq.encode(e)?;
        self.version.encode(e)?;
        self.origin.encode(e)
    }
}

impl<Ctx> Decode<Ctx> for Watcher {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let id = u64::decode(d)?;
        let (presentity, call_id, local_tag) = (decode_arc(d)?, decode_arc(d)?, decode_arc(d)?);
        let (remote_tag, watcher_uri, from_hdr) = (decode_arc(d)?, decode_arc(d)?, decode_arc(d)?);
        let (to_hdr, contact, routes) = (decode_arc(d)?, decode_arc(d)?, decode_arc(d)?);
        let (f, o, p): (u8, [u8; 16], u16) = Decode::decode(d)?;
        let state = match u8::decode(d)? {
            0 => SubState::Active,
            1 => SubState::Pending,
            2 => SubState::Terminated,
            _ => return Err(DecodeError::Other("bad subscription state")),
        };
        Ok(Watcher {
            id,
            presentity,
            call_id,
            local_tag,
            remote_tag,
            watcher_uri,
            from_hdr,
            to_hdr,
            contact,
            routes,
            addr: dec_addr(f, o, p)?,
            state,
            created_ms: u64::decode(d)?,
            expires_ms: u64::decode(d)?,
            remote_cseq: u32::decode(d)?,
            local_cseq: u32::decode(d)?,
            version: u64::decode(d)?,
            origin: NodeId::decode(d)?,
        })
    }
}

bincode::impl_borrow_decode!(Watcher);

/// Why a publication or a watcher went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub enum PresenceEnd {
    /// The publisher removed it (Expires: 0) / the subscriber unsubscribed.
    Removed,
    /// It expired.
    Expired,
    /// A NOTIFY was answered 481 or timed out (watchers only).
    Rejected,
    /// A newer entity tag replaced it (publications only).
    Replaced,
}

type Keys = Arc<papaya::HashSet<Box<[u8]>>>;

/// One atomic read-modify-write of a copy-on-write table entry: `f` gets the current
/// value and returns the new one (`None`: leave it); a new value that is `gone` removes
/// the entry. Returns whether the table changed, and the last value `f` made.
fn compute<V: Clone>(
    map: &papaya::HashMap<Box<[u8]>, Arc<V>>,
    key: &[u8],
    f: &mut impl FnMut(Option<&V>) -> Option<V>,
    gone: impl Fn(&V) -> bool,
) -> (bool, Option<V>) {
    let g = map.guard();
    let mut last = None;
    let r = map.compute(
        Box::from(key),
        |e: Option<(&Box<[u8]>, &Arc<V>)>| match f(e.map(|(_, v)| &**v)) {
            None => Operation::Abort(()),
            Some(n) if gone(&n) => {
                let present = e.is_some();
                last = Some(n);
                if present {
                    Operation::Remove
                } else {
                    Operation::Abort(())
                }
            }
            Some(n) => {
                last = Some(n.clone());
                Operation::Insert(Arc::new(n))
            }
        },
        &g,
    );
    (!matches!(r, Compute::Aborted(())), last)
}

/// Every presentity and watcher of the node (its own and its peers').
pub struct PresenceTable {
    presentities: papaya::HashMap<Box<[u8]>, Arc<Presentity>>,
    watchers: papaya::HashMap<Box<[u8]>, Arc<Watcher>>,
    /// Presentity key → keys of its watchers (a concurrent set: a presentity may have
    /// thousands, each added and removed in constant time).
    index: papaya::HashMap<Box<[u8]>, Keys>,
    ids: AtomicU64,
}

impl Default for PresenceTable {
    fn default() -> Self {
        PresenceTable::new(0)
    }
}

impl std::fmt::Debug for PresenceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceTable")
            .field("presentities", &self.presentities.len())
            .field("watchers", &self.watchers.len())
            .finish()
    }
}

impl PresenceTable {
    /// Tables sized for `capacity` entries each.
    pub fn new(capacity: usize) -> PresenceTable {
        PresenceTable {
            presentities: papaya::HashMap::with_capacity(capacity),
            watchers: papaya::HashMap::with_capacity(capacity),
            index: papaya::HashMap::with_capacity(capacity),
            ids: AtomicU64::new(1),
        }
    }

    /// A new cluster-unique id (watchers, entity tags) made by `worker` of `node`.
    pub fn next_id(&self, node: NodeId, worker: u16) -> u64 {
        let n = self.ids.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1);
        u64::from(node.0) << 48 | u64::from(worker & 0xff) << 40 | n
    }

    /// Presentities with at least one live publication.
    pub fn presentities(&self) -> usize {
        self.presentities.len()
    }

    /// Watchers.
    pub fn watchers(&self) -> usize {
        self.watchers.len()
    }

    /// The presentity of `key`.
    pub fn presentity(&self, key: &[u8]) -> Option<Arc<Presentity>> {
        let g = self.presentities.guard();
        self.presentities.get(key, &g).cloned()
    }

    /// Atomic read-modify-write of one presentity: `f` gets the current value (`None`:
    /// none) and returns the new one, or `None` to leave it; a presentity left with no
    /// publication leaves the table. Returns the new value (empty when removed), `None`
    /// when `f` left it. `f` may run more than once under contention.
    pub fn update_presentity(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&Presentity>) -> Option<Presentity>,
    ) -> Option<Presentity> {
        let (done, last) = compute(&self.presentities, key, &mut f, |p| p.pubs.is_empty());
        // Leaving nothing where there was nothing is still reported (empty).
        if done || last.as_ref().is_some_and(|p| p.pubs.is_empty()) {
            last
        } else {
            None
        }
    }

    /// The watcher of `key`.
    pub fn watcher(&self, key: &[u8]) -> Option<Arc<Watcher>> {
        let g = self.watchers.guard();
        self.watchers.get(key, &g).cloned()
    }

    /// Keys of the watchers of presentity `pkey`.
    pub fn watchers_of(&self, pkey: &[u8]) -> Vec<Box<[u8]>> {
        let g = self.index.guard();
        match self.index.get(pkey, &g) {
            Some(set) => set.pin().iter().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// How many watchers presentity `pkey` has.
    pub fn watcher_count(&self, pkey: &[u8]) -> usize {
        let g = self.index.guard();
        self.index.get(pkey, &g).map_or(0, |set| set.len())
    }

    // The set of a presentity stays when its last watcher goes (at most one small set per
    // presentity ever watched): removing it could race with a concurrent add.
    fn index_add(&self, pkey: &[u8], key: &[u8]) {
        let g = self.index.guard();
        let set =
            self.index
                .get_or_insert_with(Box::from(pkey), || Arc::new(papaya::HashSet::new()), &g);
        set.pin().insert(Box::from(key));
    }

    fn index_remove(&self, pkey: &[u8], key: &[u8]) {
        let g = self.index.guard();
        if let Some(set) = self.index.get(pkey, &g) {
            set.pin().remove(key);
        }
    }

    /// Atomic read-modify-write of one watcher, as [`PresenceTable::update_presentity`]:
    /// `f` returns the new value (a `Terminated` one leaves the table) or `None` to leave
    /// it. The index follows. Returns the new value.
    pub fn update_watcher(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&Watcher>) -> Option<Watcher>,
    ) -> Option<Watcher> {
        let (done, last) = compute(&self.watchers, key, &mut f, |w| {
            w.state == SubState::Terminated
        });
        let w = if done { last? } else { return None };
        if w.state == SubState::Terminated {
            self.index_remove(&w.presentity, key);
        } else {
            self.index_add(&w.presentity, key);
        }
        Some(w)
    }

    /// A replicated publication: added (replacing the one of entity tag `replaces`, if
    /// any) unless a version as new is there. Returns whether the table changed.
    pub fn apply_publish(&self, key: &[u8], replaces: &[u8], p: &Publication) -> bool {
        self.update_presentity(key, |cur| {
            let mut n = cur.cloned().unwrap_or_default();
            if n.find(&p.etag).is_some_and(|c| c.version >= p.version) {
                return None;
            }
            n.pubs
                .retain(|x| x.etag != p.etag && (replaces.is_empty() || &x.etag[..] != replaces));
            let at = n
                .pubs
                .iter()
                .position(|x| x.published_ms > p.published_ms)
                .unwrap_or(n.pubs.len());
            n.pubs.insert(at, p.clone());
            Some(n)
        })
        .is_some()
    }

    /// A replicated removal of the publication `etag`. Returns whether the table changed.
    pub fn apply_unpublish(&self, key: &[u8], etag: &[u8]) -> bool {
        self.update_presentity(key, |cur| {
            let cur = cur?;
            cur.find(etag)?;
            let mut n = cur.clone();
            n.pubs.retain(|x| &x.etag[..] != etag);
            Some(n)
        })
        .is_some()
    }

    /// A replicated watcher state (`ended`: it went away): taken when newer than ours.
    /// Returns whether the table changed. No local side effect.
    pub fn apply_watcher(&self, key: &[u8], w: &Watcher, ended: bool) -> bool {
        self.update_watcher(key, |cur| {
            if cur.is_some_and(|c| c.version >= w.version) || (cur.is_none() && ended) {
                return None;
            }
            let mut n = w.clone();
            if ended {
                n.state = SubState::Terminated;
            }
            Some(n)
        })
        .is_some()
    }

    /// Visits every presentity with its key (no copy).
    pub fn for_each_presentity(&self, mut f: impl FnMut(&[u8], &Presentity)) {
        let g = self.presentities.guard();
        for (k, v) in self.presentities.iter(&g) {
            f(k, v);
        }
    }

    /// Visits every watcher with its key (no copy).
    pub fn for_each_watcher(&self, mut f: impl FnMut(&[u8], &Watcher)) {
        let g = self.watchers.guard();
        for (k, v) in self.watchers.iter(&g) {
            f(k, v);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn publication(etag: &str, at: u64, version: u64) -> Publication {
        Publication {
            etag: Arc::from(etag.as_bytes()),
            content_type: Arc::from(&b"application/pidf+xml"[..]),
            body: Arc::from(&b"<presence/>"[..]),
            published_ms: at,
            expires_ms: at + 3_600_000,
            version,
            origin: NodeId(1),
        }
    }

    pub(crate) fn watcher(call_id: &str, version: u64) -> Watcher {
        Watcher {
            id: 7,
            presentity: Arc::from(&b"presence\0alice@example.com"[..]),
            call_id: Arc::from(call_id.as_bytes()),
            local_tag: Arc::from(&b"l1"[..]),
            remote_tag: Arc::from(&b"r1"[..]),
            watcher_uri: Arc::from(&b"sip:bob@example.com"[..]),
            from_hdr: Arc::from(&b"<sip:bob@example.com>;tag=r1"[..]),
            to_hdr: Arc::from(&b"<sip:alice@example.com>"[..]),
            contact: Arc::from(&b"sip:bob@192.0.2.1:5060"[..]),
            routes: Arc::from(&b""[..]),
            addr: Some("192.0.2.1:5060".parse().unwrap()),
            state: SubState::Active,
            created_ms: 1,
            expires_ms: 2,
            remote_cseq: 1,
            local_cseq: 3,
            version,
            origin: NodeId(2),
        }
    }

    fn round<T: Encode + Decode<()> + PartialEq + std::fmt::Debug>(v: &T) {
        let b = bincode::encode_to_vec(v, crate::BINCODE_CONFIG).unwrap();
        let (back, n): (T, usize) = bincode::decode_from_slice(&b, crate::BINCODE_CONFIG).unwrap();
        assert_eq!(n, b.len());
        assert_eq!(&back, v);
        for cut in 0..b.len() {
            assert!(bincode::decode_from_slice::<T, _>(&b[..cut], crate::BINCODE_CONFIG).is_err());
        }
    }

    #[test]
    fn encodings_round_trip_and_truncations_fail() {
        round(&publication("e1", 5, 9));
        round(&watcher("c1", 4));
    }

    #[test]
    fn publications_keep_the_newest_version_and_aggregation_order() {
        let t = PresenceTable::new(16);
        let k = b"presence\0alice@example.com";
        assert!(t.apply_publish(k, b"", &publication("b", 20, 2)));
        assert!(t.apply_publish(k, b"", &publication("a", 10, 1)));
        let p = t.presentity(k).unwrap();
        let order: Vec<&[u8]> = p.pubs.iter().map(|p| &p.etag[..]).collect();
        assert_eq!(order, [&b"a"[..], b"b"]);
        // An older version of "b" is ignored; a refresh under a new tag replaces "a".
        assert!(!t.apply_publish(k, b"", &publication("b", 20, 1)));
        assert!(t.apply_publish(k, b"a", &publication("c", 30, 3)));
        let p = t.presentity(k).unwrap();
        assert!(p.find(b"a").is_none() && p.find(b"c").is_some());
        assert!(t.apply_unpublish(k, b"b"));
        assert!(t.apply_unpublish(k, b"c"));
        assert!(t.presentity(k).is_none());
        assert!(!t.apply_unpublish(k, b"c"));
        assert_eq!(
            split_presentity_key(k),
            (&b"presence"[..], &b"alice@example.com"[..])
        );
    }

    #[test]
    fn watchers_follow_versions_and_the_index() {
        let t = PresenceTable::new(16);
        let w = watcher("c1", 5);
        let mut k = Vec::new();
        w.key(&mut k);
        assert!(t.apply_watcher(&k, &w, false));
        assert_eq!(t.watcher_count(&w.presentity), 1);
        assert!(!t.apply_watcher(&k, &watcher("c1", 4), false));
        // An end older than what we hold is ignored; a newer one removes it.
        assert!(!t.apply_watcher(&k, &watcher("c1", 5), true));
        assert!(t.apply_watcher(&k, &watcher("c1", 6), true));
        assert!(t.watcher(&k).is_none());
        assert_eq!(t.watcher_count(&w.presentity), 0);
        // The end of a watcher never seen adds nothing.
        assert!(!t.apply_watcher(&k, &watcher("c1", 9), true));
        assert_eq!(t.watchers(), 0);
    }
}
