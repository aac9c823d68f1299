//! The user-location table: canonical AoR bytes → the contacts registered for it.
//!
//! Readers ([`Usrloc::read`]) are lock-free; writers ([`Usrloc::update`]) perform an atomic
//! read-modify-write of one AoR record (copy-on-write: a changed record is a new
//! [`AorRecord`], the old one is reclaimed once no reader can see it any more).
//!
//! Memory layout is tuned for ~1M single-contact AoRs: a [`Binding`] is 64 bytes plus one
//! packed heap buffer holding all of its variable-length data, and an [`AorRecord`] with one
//! binding holds it inline (no separate allocation).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bincode::de::read::Reader;
use bincode::de::{Decode, Decoder};
use bincode::enc::write::Writer;
use bincode::enc::{Encode, Encoder};
use bincode::error::{DecodeError, EncodeError};
use papaya::{Compute, Operation};

use crate::NodeId;

/// `q` value meaning "no q parameter was given".
pub const Q_NONE: u16 = u16::MAX;

/// Maximum length of each variable-length field of a [`Binding`] (lengths are stored as `u16`).
pub const MAX_FIELD_LEN: usize = u16::MAX as usize;

/// Maximum length of a binding's sharing tag name (its length is stored as `u8`).
pub const MAX_TAG_LEN: usize = u8::MAX as usize;

/// [`Binding::flags`] bit: the contact gets NAT keepalive pings (set at registration).
pub const FLAG_KEEPALIVE: u8 = 1;
/// [`Binding::flags`] bit: the registration looked NATed (source differs from Contact/Via).
pub const FLAG_NATED: u8 = 2;

/// Transport code: UDP.
pub const TRANSPORT_UDP: u8 = 0;
/// Transport code: TCP.
pub const TRANSPORT_TCP: u8 = 1;
/// Transport code: TLS.
pub const TRANSPORT_TLS: u8 = 2;
/// Transport code: SCTP.
pub const TRANSPORT_SCTP: u8 = 3;
/// Transport code: WS.
pub const TRANSPORT_WS: u8 = 4;
/// Transport code: WSS.
pub const TRANSPORT_WSS: u8 = 5;

const TAG_V4: u8 = 4;
const TAG_V6: u8 = 6;

/// Borrowed inputs of [`Binding::new`].
#[derive(Clone, Copy, Debug)]
pub struct BindingParts<'a> {
    /// Contact URI as received, including URI parameters and escaped headers.
    pub contact: &'a [u8],
    /// Call-ID of the REGISTER.
    pub call_id: &'a [u8],
    /// Raw comma-joined Path header values (may be empty).
    pub path: &'a [u8],
    /// `+sip.instance` value (may be empty).
    pub instance: &'a [u8],
    /// User-Agent (may be empty).
    pub user_agent: &'a [u8],
    /// Sharing tag the binding was created under (empty: the node-wide default tag);
    /// at most [`MAX_TAG_LEN`] bytes.
    pub tag: &'a [u8],
    /// Absolute expiry, unix seconds.
    pub expires_at: u32,
    /// CSeq number of the REGISTER.
    pub cseq: u32,
    /// q in thousandths (0..=1000), or [`Q_NONE`].
    pub q: u16,
    /// RFC 5626 reg-id (0 = none).
    pub reg_id: u32,
    /// Source address of the REGISTER (IPv6 flow info and scope id are not kept).
    pub source: SocketAddr,
    /// Transport of the REGISTER (`TRANSPORT_*`).
    pub transport: u8,
    /// Free-form flags.
    pub flags: u8,
    /// Version of this binding (see [`crate::next_version`]).
    pub version: u64,
    /// Node that made the last change.
    pub origin: NodeId,
    /// Last modification, unix seconds.
    pub last_modified: u32,
}

/// A variable-length field of [`BindingParts`] was longer than [`MAX_FIELD_LEN`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldTooLong {
    /// Name of the offending field.
    pub field: &'static str,
    /// Its length.
    pub len: usize,
}

impl fmt::Display for FieldTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "binding field `{}` is {} bytes long (max {MAX_FIELD_LEN})",
            self.field, self.len
        )
    }
}

impl std::error::Error for FieldTooLong {}

/// One registered contact, in a compact form (64 bytes + one heap buffer).
///
/// All variable-length data lives in one boxed buffer laid out as
/// `[ipv6 octets, IPv6 sources only][contact][call_id][path][instance][user_agent][tag]`;
/// an IPv4 source address is kept inline.
///
/// The fixed fields are public; the strings and the source address are read through
/// accessors. To change a string, rebuild with [`Binding::parts`] + [`Binding::new`].
#[derive(Clone, PartialEq, Eq)]
pub struct Binding {
    data: Box<[u8]>,
    /// Version of this binding (see [`crate::next_version`]).
    pub version: u64,
    /// Absolute expiry, unix seconds.
    pub expires_at: u32,
    /// CSeq number of the REGISTER.
    pub cseq: u32,
    /// RFC 5626 reg-id (0 = none).
    pub reg_id: u32,
    /// Last modification, unix seconds.
    pub last_modified: u32,
    /// q in thousandths (0..=1000), or [`Q_NONE`].
    pub q: u16,
    port: u16,
    /// Node that made the last change.
    pub origin: NodeId,
    /// Lengths of contact, call_id, path, instance (user_agent takes the rest).
    lens: [u16; 4],
    /// Transport of the REGISTER (`TRANSPORT_*`).
    pub transport: u8,
    /// Free-form flags.
    pub flags: u8,
    /// IPv4 source octets (unused for IPv6).
    ip4: [u8; 4],
    /// `TAG_V4` or `TAG_V6`.
    family: u8,
    /// Length of the sharing tag at the end of `data`.
    tag_len: u8,
}

impl Binding {
    /// Builds a binding, copying the strings into one packed allocation.
    ///
    /// # Panics
    ///
    /// If a string is longer than [`MAX_FIELD_LEN`]; use [`Binding::try_new`] for input that
    /// was not length-checked.
    pub fn new(parts: BindingParts<'_>) -> Binding {
        match Binding::try_new(parts) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// Builds a binding, copying the strings into one packed allocation; fails if a string is
    /// longer than [`MAX_FIELD_LEN`].
    pub fn try_new(p: BindingParts<'_>) -> Result<Binding, FieldTooLong> {
        let fields: [(&'static str, &[u8]); 5] = [
            ("contact", p.contact),
            ("call_id", p.call_id),
            ("path", p.path),
            ("instance", p.instance),
            ("user_agent", p.user_agent),
        ];
        if p.tag.len() > MAX_TAG_LEN {
            return Err(FieldTooLong {
                field: "tag",
                len: p.tag.len(),
            });
        }
        let mut total = p.tag.len();
        for (field, s) in fields {
            if s.len() > MAX_FIELD_LEN {
                return Err(FieldTooLong {
                    field,
                    len: s.len(),
                });
            }
            total += s.len();
        }
        let (family, ip4, ip_len) = match p.source.ip() {
            IpAddr::V4(ip) => (TAG_V4, ip.octets(), 0),
            IpAddr::V6(_) => (TAG_V6, [0; 4], 16),
        };
        let mut data = Vec::with_capacity(ip_len + total);
        if let IpAddr::V6(ip) = p.source.ip() {
            data.extend_from_slice(&ip.octets());
        }
        for (_, s) in fields {
            data.extend_from_slice(s);
        }
        data.extend_from_slice(p.tag);
        Ok(Binding {
            data: data.into_boxed_slice(),
            version: p.version,
            expires_at: p.expires_at,
            cseq: p.cseq,
            reg_id: p.reg_id,
            last_modified: p.last_modified,
            q: p.q,
            port: p.source.port(),
            origin: p.origin,
            // Checked above: each length fits in u16.
            lens: [
                p.contact.len() as u16,
                p.call_id.len() as u16,
                p.path.len() as u16,
                p.instance.len() as u16,
            ],
            transport: p.transport,
            flags: p.flags,
            ip4,
            family,
            // Checked above: fits in u8.
            tag_len: p.tag.len() as u8,
        })
    }

    /// Borrowed view of all fields (e.g. to rebuild a modified binding).
    pub fn parts(&self) -> BindingParts<'_> {
        BindingParts {
            contact: self.contact(),
            call_id: self.call_id(),
            path: self.path(),
            instance: self.instance(),
            user_agent: self.user_agent(),
            tag: self.tag(),
            expires_at: self.expires_at,
            cseq: self.cseq,
            q: self.q,
            reg_id: self.reg_id,
            source: self.source(),
            transport: self.transport,
            flags: self.flags,
            version: self.version,
            origin: self.origin,
            last_modified: self.last_modified,
        }
    }

    /// Bytes of `data` taken by the IPv6 address (0 for IPv4).
    #[inline]
    fn ip_len(&self) -> usize {
        if self.family == TAG_V6 { 16 } else { 0 }
    }

    #[inline]
    fn field(&self, i: usize) -> &[u8] {
        let mut start = self.ip_len();
        for l in self.lens.iter().take(i) {
            start += *l as usize;
        }
        let end = if i < 4 {
            start + self.lens[i] as usize
        } else {
            self.data.len().saturating_sub(self.tag_len as usize)
        };
        self.data.get(start..end).unwrap_or(&[])
    }

    /// Contact URI as received (with URI parameters and escaped headers).
    #[inline]
    pub fn contact(&self) -> &[u8] {
        self.field(0)
    }

    /// Call-ID.
    #[inline]
    pub fn call_id(&self) -> &[u8] {
        self.field(1)
    }

    /// Raw comma-joined Path header values (empty when none).
    #[inline]
    pub fn path(&self) -> &[u8] {
        self.field(2)
    }

    /// `+sip.instance` value (empty when none).
    #[inline]
    pub fn instance(&self) -> &[u8] {
        self.field(3)
    }

    /// User-Agent (empty when none).
    #[inline]
    pub fn user_agent(&self) -> &[u8] {
        self.field(4)
    }

    /// Sharing tag the binding was created under (empty: the node-wide default tag).
    #[inline]
    pub fn tag(&self) -> &[u8] {
        let start = self.data.len().saturating_sub(self.tag_len as usize);
        self.data.get(start..).unwrap_or(&[])
    }

    /// Whether the contact gets NAT keepalive pings.
    #[inline]
    pub fn keepalive(&self) -> bool {
        self.flags & FLAG_KEEPALIVE != 0
    }

    /// IP address the REGISTER came from.
    pub fn source_ip(&self) -> IpAddr {
        if self.family == TAG_V6 {
            let mut o = [0u8; 16];
            if let Some(s) = self.data.get(..16) {
                o.copy_from_slice(s);
            }
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.ip4))
        }
    }

    /// Port the REGISTER came from.
    #[inline]
    pub fn source_port(&self) -> u16 {
        self.port
    }

    /// Socket address the REGISTER came from.
    pub fn source(&self) -> SocketAddr {
        SocketAddr::new(self.source_ip(), self.port)
    }

    /// Bytes of the packed variable-length buffer (heap usage besides the struct itself).
    pub fn heap_len(&self) -> usize {
        self.data.len()
    }
}

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        f.debug_struct("Binding")
            .field("contact", &s(self.contact()))
            .field("call_id", &s(self.call_id()))
            .field("path", &s(self.path()))
            .field("instance", &s(self.instance()))
            .field("user_agent", &s(self.user_agent()))
            .field("tag", &s(self.tag()))
            .field("expires_at", &self.expires_at)
            .field("cseq", &self.cseq)
            .field("q", &self.q)
            .field("reg_id", &self.reg_id)
            .field("source", &self.source())
            .field("transport", &self.transport)
            .field("flags", &self.flags)
            .field("version", &self.version)
            .field("origin", &self.origin)
            .field("last_modified", &self.last_modified)
            .finish()
    }
}

// Wire form (bincode 2): family tag u8 (4|6), ip octets (4|16, raw), port u16, contact,
// call_id, path, instance, user_agent (each a byte slice: varint length + bytes),
// expires_at u32, cseq u32, q u16, reg_id u32, transport u8, flags u8, version u64,
// origin NodeId, last_modified u32, tag (byte slice). Encoding borrows and never allocates.
impl Encode for Binding {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.family.encode(e)?;
        if self.family == TAG_V6 {
            e.writer().write(self.data.get(..16).unwrap_or(&[]))?;
        } else {
            e.writer().write(&self.ip4)?;
        }
        self.port.encode(e)?;
        self.contact().encode(e)?;
        self.call_id().encode(e)?;
        self.path().encode(e)?;
        self.instance().encode(e)?;
        self.user_agent().encode(e)?;
        self.expires_at.encode(e)?;
        self.cseq.encode(e)?;
        self.q.encode(e)?;
        self.reg_id.encode(e)?;
        self.transport.encode(e)?;
        self.flags.encode(e)?;
        self.version.encode(e)?;
        self.origin.encode(e)?;
        self.last_modified.encode(e)?;
        self.tag().encode(e)
    }
}

/// Reads a bincode byte slice (varint length + bytes) of at most `max` bytes, appending it to
/// `out`. Returns its length. Never allocates more than `max` bytes for a bad length.
pub(crate) fn decode_bytes_into<D: Decoder>(
    d: &mut D,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<usize, DecodeError> {
    let len = u64::decode(d)?;
    if len > max as u64 {
        return Err(DecodeError::Other("byte string too long"));
    }
    let len = len as usize;
    d.claim_bytes_read(len)?;
    let start = out.len();
    out.resize(start + len, 0);
    d.reader().read(&mut out[start..])?;
    Ok(len)
}

impl<Ctx> Decode<Ctx> for Binding {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let family = u8::decode(d)?;
        let mut ip4 = [0u8; 4];
        let mut data = Vec::with_capacity(96);
        match family {
            TAG_V4 => {
                d.claim_bytes_read(4)?;
                d.reader().read(&mut ip4)?;
            }
            TAG_V6 => {
                data.resize(16, 0);
                d.claim_bytes_read(16)?;
                d.reader().read(&mut data)?;
            }
            _ => return Err(DecodeError::Other("bad address family tag in binding")),
        }
        let port = u16::decode(d)?;
        let mut lens = [0u16; 4];
        for l in &mut lens {
            *l = decode_bytes_into(d, &mut data, MAX_FIELD_LEN)? as u16;
        }
        decode_bytes_into(d, &mut data, MAX_FIELD_LEN)?;
        let (expires_at, cseq, q, reg_id) = (
            u32::decode(d)?,
            u32::decode(d)?,
            u16::decode(d)?,
            u32::decode(d)?,
        );
        let (transport, flags, version, origin, last_modified) = (
            u8::decode(d)?,
            u8::decode(d)?,
            u64::decode(d)?,
            NodeId::decode(d)?,
            u32::decode(d)?,
        );
        // Bounded by MAX_TAG_LEN: fits in u8.
        let tag_len = decode_bytes_into(d, &mut data, MAX_TAG_LEN)? as u8;
        Ok(Binding {
            data: data.into_boxed_slice(),
            port,
            lens,
            expires_at,
            cseq,
            q,
            reg_id,
            transport,
            flags,
            version,
            origin,
            last_modified,
            ip4,
            family,
            tag_len,
        })
    }
}

bincode::impl_borrow_decode!(Binding);

/// All bindings of one AoR (immutable; a change builds a new record).
///
/// A single binding — the common case — is stored inline (the record is 64 bytes and lives
/// inside the table entry); several bindings live in one boxed slice.
#[derive(Clone, PartialEq, Eq)]
pub struct AorRecord {
    repr: Repr,
}

/// Invariant: `Many` never holds exactly one binding (so derived equality is structural).
#[derive(Clone, PartialEq, Eq)]
enum Repr {
    One(Binding),
    Many(Box<[Binding]>),
}

impl Default for AorRecord {
    fn default() -> Self {
        AorRecord {
            repr: Repr::Many(Box::default()),
        }
    }
}

impl fmt::Debug for AorRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.bindings()).finish()
    }
}

impl AorRecord {
    /// A record holding `bindings` (no allocation for 0 or 1 binding; otherwise a `Vec` with
    /// spare capacity is shrunk).
    pub fn new(mut bindings: Vec<Binding>) -> AorRecord {
        if bindings.len() == 1
            && let Some(b) = bindings.pop()
        {
            return AorRecord::single(b);
        }
        AorRecord {
            repr: Repr::Many(bindings.into_boxed_slice()),
        }
    }

    /// A record holding exactly one binding (stored inline, no allocation).
    pub fn single(binding: Binding) -> AorRecord {
        AorRecord {
            repr: Repr::One(binding),
        }
    }

    /// The bindings, in insertion order.
    #[inline]
    pub fn bindings(&self) -> &[Binding] {
        match &self.repr {
            Repr::One(b) => std::slice::from_ref(b),
            Repr::Many(v) => v,
        }
    }

    /// Number of bindings.
    #[inline]
    pub fn len(&self) -> usize {
        self.bindings().len()
    }

    /// Whether the record holds no binding (such a record is never stored in [`Usrloc`]).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.bindings().is_empty()
    }

    /// Earliest `expires_at` of the bindings (`None` when empty).
    pub fn min_expires_at(&self) -> Option<u32> {
        self.bindings().iter().map(|b| b.expires_at).min()
    }

    /// The binding whose contact URI is byte-equal to `contact`.
    pub fn find_contact(&self, contact: &[u8]) -> Option<&Binding> {
        self.bindings().iter().find(|b| b.contact() == contact)
    }

    /// Takes the bindings out.
    pub fn into_vec(self) -> Vec<Binding> {
        match self.repr {
            Repr::One(b) => vec![b],
            Repr::Many(v) => v.into_vec(),
        }
    }
}

impl From<Vec<Binding>> for AorRecord {
    fn from(v: Vec<Binding>) -> AorRecord {
        AorRecord::new(v)
    }
}

impl From<Box<[Binding]>> for AorRecord {
    fn from(bindings: Box<[Binding]>) -> AorRecord {
        if bindings.len() == 1 {
            AorRecord::new(bindings.into_vec())
        } else {
            AorRecord {
                repr: Repr::Many(bindings),
            }
        }
    }
}

impl FromIterator<Binding> for AorRecord {
    fn from_iter<I: IntoIterator<Item = Binding>>(iter: I) -> AorRecord {
        AorRecord::new(iter.into_iter().collect())
    }
}

/// What an [`Usrloc::update`] closure decides.
#[derive(Debug)]
pub enum Update<R> {
    /// Leave the AoR unchanged.
    Keep(R),
    /// Store this record (a record with no binding removes the AoR).
    Replace(AorRecord, R),
    /// Remove the AoR (no-op when absent).
    Remove(R),
}

/// What [`Usrloc::update`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing changed.
    Kept,
    /// The AoR was absent and has been inserted.
    Inserted,
    /// The AoR's record was replaced.
    Replaced,
    /// The AoR was removed.
    Removed,
}

/// Result of [`Usrloc::update`].
#[derive(Debug)]
pub struct Outcome<R> {
    /// The value returned by the closure invocation whose decision was applied.
    pub value: R,
    /// The key stored in the table for this AoR (shared, no copy), or `None` when the AoR
    /// was absent and nothing was inserted. After a removal it is the removed key.
    pub key: Option<Arc<[u8]>>,
    /// What was done.
    pub applied: Applied,
}

/// Decision computed on the first (plain lookup) pass, reused by the atomic pass if the entry
/// it was computed for is still current.
enum Pre<R> {
    Insert(AorRecord, R),
    Replace(*const AorRecord, AorRecord, R),
    Remove(*const AorRecord, R),
}

/// The user-location table: canonical AoR bytes (may contain NUL octets) → [`AorRecord`].
pub struct Usrloc {
    map: papaya::HashMap<Arc<[u8]>, AorRecord>,
    bindings: AtomicI64,
}

impl fmt::Debug for Usrloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Usrloc")
            .field("aors", &self.aors())
            .field("bindings", &self.bindings())
            .finish()
    }
}

impl Default for Usrloc {
    fn default() -> Self {
        Usrloc::new(0)
    }
}

impl Usrloc {
    /// A table pre-sized for `capacity` AoRs.
    pub fn new(capacity: usize) -> Self {
        Usrloc {
            map: papaya::HashMap::builder().capacity(capacity).build(),
            bindings: AtomicI64::new(0),
        }
    }

    /// Lock-free read of one AoR. The reference is valid for the duration of `f` (keep `f`
    /// short: memory retired meanwhile by writers is reclaimed only after it returns).
    #[inline]
    pub fn read<R>(&self, aor: &[u8], f: impl FnOnce(Option<&AorRecord>) -> R) -> R {
        let guard = self.map.guard();
        f(self.map.get(aor, &guard))
    }

    /// The key stored for `aor` (a reference-count increment, no allocation).
    pub fn key(&self, aor: &[u8]) -> Option<Arc<[u8]>> {
        let guard = self.map.guard();
        self.map.get_key_value(aor, &guard).map(|(k, _)| k.clone())
    }

    /// Atomic read-modify-write of one AoR.
    ///
    /// `f` sees the current record (or `None`) and decides. Under contention on the same AoR,
    /// **`f` may run several times** (each time with the then-current record); only the
    /// decision and value of the invocation whose input was still current are applied and
    /// returned, the others are dropped. `f` should therefore have no side effects other than
    /// computing its result.
    ///
    /// [`Update::Keep`] never writes; [`Update::Remove`] or a `Replace` with an empty record on
    /// an absent AoR is a no-op; an AoR whose last binding is removed disappears. Allocation:
    /// only the inserted record, the table entry and — for a new AoR — the key.
    pub fn update<R>(
        &self,
        aor: &[u8],
        mut f: impl FnMut(Option<&AorRecord>) -> Update<R>,
    ) -> Outcome<R> {
        let guard = self.map.guard();
        // First pass: plain lookup and decision, so that a `Keep` (or a no-op on an absent
        // AoR) costs no write and no allocation, and an existing key is reused.
        let (key, pre) = match self.map.get_key_value(aor, &guard) {
            Some((k, v)) => {
                let ptr: *const AorRecord = v;
                match f(Some(v)) {
                    Update::Keep(value) => {
                        return Outcome {
                            value,
                            key: Some(k.clone()),
                            applied: Applied::Kept,
                        };
                    }
                    Update::Replace(rec, r) if !rec.is_empty() => {
                        (k.clone(), Pre::Replace(ptr, rec, r))
                    }
                    Update::Replace(_, r) | Update::Remove(r) => (k.clone(), Pre::Remove(ptr, r)),
                }
            }
            None => match f(None) {
                Update::Replace(rec, r) if !rec.is_empty() => (Arc::from(aor), Pre::Insert(rec, r)),
                Update::Keep(value) | Update::Replace(_, value) | Update::Remove(value) => {
                    return Outcome {
                        value,
                        key: None,
                        applied: Applied::Kept,
                    };
                }
            },
        };

        // Second pass: atomic compute. The guard held since the lookup keeps the looked-up
        // entry alive, so pointer equality reliably means "unchanged since the first pass".
        let mut pre = Some(pre);
        let mut on_none: Option<R> = None;
        let mut on_some: Option<(*const AorRecord, R)> = None;
        let mut aborted_on_some = false;
        let result = self.map.compute(
            key,
            |entry: Option<(&Arc<[u8]>, &AorRecord)>| {
                let cur: Option<*const AorRecord> = entry.map(|(_, v)| v as *const AorRecord);
                let decision = match pre.take() {
                    Some(Pre::Insert(rec, r)) if cur.is_none() => Update::Replace(rec, r),
                    Some(Pre::Replace(p, rec, r)) if cur == Some(p) => Update::Replace(rec, r),
                    Some(Pre::Remove(p, r)) if cur == Some(p) => Update::Remove(r),
                    _ => f(entry.map(|(_, v)| v)),
                };
                match (cur, decision) {
                    (None, Update::Replace(rec, r)) if !rec.is_empty() => {
                        on_none = Some(r);
                        Operation::Insert(rec)
                    }
                    (None, Update::Keep(r) | Update::Replace(_, r) | Update::Remove(r)) => {
                        aborted_on_some = false;
                        Operation::Abort(r)
                    }
                    (Some(_), Update::Keep(r)) => {
                        aborted_on_some = true;
                        Operation::Abort(r)
                    }
                    (Some(p), Update::Replace(rec, r)) if !rec.is_empty() => {
                        on_some = Some((p, r));
                        Operation::Insert(rec)
                    }
                    (Some(p), Update::Replace(_, r) | Update::Remove(r)) => {
                        on_some = Some((p, r));
                        Operation::Remove
                    }
                }
            },
            &guard,
        );
        let take_some = |old: &AorRecord, on_some: Option<(*const AorRecord, R)>| -> R {
            match on_some {
                Some((p, r)) => {
                    debug_assert!(std::ptr::eq(p, old));
                    r
                }
                None => unreachable!("papaya applied a decision that was never computed"),
            }
        };
        match result {
            Compute::Inserted(k, v) => {
                self.bindings.fetch_add(v.len() as i64, Ordering::Relaxed);
                let value = on_none.expect("papaya inserted without an insert decision");
                Outcome {
                    value,
                    key: Some(k.clone()),
                    applied: Applied::Inserted,
                }
            }
            Compute::Updated {
                old: (k, old),
                new: (_, new),
            } => {
                self.bindings
                    .fetch_add(new.len() as i64 - old.len() as i64, Ordering::Relaxed);
                let value = take_some(old, on_some);
                Outcome {
                    value,
                    key: Some(k.clone()),
                    applied: Applied::Replaced,
                }
            }
            Compute::Removed(k, old) => {
                self.bindings.fetch_sub(old.len() as i64, Ordering::Relaxed);
                let value = take_some(old, on_some);
                Outcome {
                    value,
                    key: Some(k.clone()),
                    applied: Applied::Removed,
                }
            }
            Compute::Aborted(value) => {
                let key = if aborted_on_some { self.key(aor) } else { None };
                Outcome {
                    value,
                    key,
                    applied: Applied::Kept,
                }
            }
        }
    }

    /// Number of AoRs (approximate under concurrent updates).
    pub fn aors(&self) -> usize {
        self.map.len()
    }

    /// Number of bindings over all AoRs (approximate under concurrent updates).
    pub fn bindings(&self) -> usize {
        self.bindings.load(Ordering::Relaxed).max(0) as usize
    }

    /// Walks every AoR (weakly consistent: concurrent changes may or may not be seen, each AoR
    /// is seen at most once). For snapshots and dumps; do not call from a worker's hot path.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<[u8]>, &AorRecord)) {
        let guard = self.map.guard();
        for (k, v) in self.map.iter(&guard) {
            f(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BINCODE_CONFIG;

    pub(crate) fn binding(contact: &str, call_id: &str, expires_at: u32) -> Binding {
        Binding::new(BindingParts {
            contact: contact.as_bytes(),
            call_id: call_id.as_bytes(),
            path: b"",
            instance: b"",
            user_agent: b"",
            tag: b"",
            expires_at,
            cseq: 1,
            q: Q_NONE,
            reg_id: 0,
            source: "192.0.2.10:5060".parse().unwrap(),
            transport: TRANSPORT_UDP,
            flags: 0,
            version: 1,
            origin: NodeId(1),
            last_modified: 0,
        })
    }

    #[test]
    fn binding_is_compact() {
        assert_eq!(std::mem::size_of::<Binding>(), 64);
        assert_eq!(std::mem::size_of::<AorRecord>(), 64);
        let b = binding("sip:a", "c", 1);
        let one = AorRecord::new(vec![b.clone()]);
        assert_eq!(one, AorRecord::single(b.clone()));
        assert_eq!(one, AorRecord::from(vec![b.clone()].into_boxed_slice()));
        assert_eq!(one.bindings(), std::slice::from_ref(&b));
        let two: AorRecord = [b.clone(), b.clone()].into_iter().collect();
        assert_eq!(two.len(), 2);
        assert_eq!(two.clone().into_vec(), vec![b.clone(), b]);
        assert!(AorRecord::default().is_empty());
    }

    #[test]
    fn binding_accessors_roundtrip() {
        let src: SocketAddr = "[2001:db8::1]:5070".parse().unwrap();
        let p = BindingParts {
            contact: b"sip:alice@[2001:db8::1]:5070;transport=tcp?X-H=a%20b",
            call_id: b"abc@host",
            path: b"<sip:p1;lr>,<sip:p2;lr>",
            instance: b"\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\"",
            user_agent: b"UA/1.0\0with nul",
            tag: b"vip-1",
            expires_at: 1_700_000_000,
            cseq: 42,
            q: 500,
            reg_id: 2,
            source: src,
            transport: TRANSPORT_TCP,
            flags: 0x81,
            version: 99,
            origin: NodeId(7),
            last_modified: 1_699_999_000,
        };
        let b = Binding::new(p);
        assert_eq!(b.contact(), p.contact);
        assert_eq!(b.call_id(), p.call_id);
        assert_eq!(b.path(), p.path);
        assert_eq!(b.instance(), p.instance);
        assert_eq!(b.user_agent(), p.user_agent);
        assert_eq!(b.tag(), b"vip-1");
        assert_eq!(b.source(), src);
        assert_eq!(
            (b.expires_at, b.cseq, b.q, b.reg_id),
            (1_700_000_000, 42, 500, 2)
        );
        assert_eq!(
            (b.transport, b.flags, b.version, b.origin),
            (1, 0x81, 99, NodeId(7))
        );
        assert_eq!(b.last_modified, 1_699_999_000);
        assert_eq!(Binding::new(b.parts()), b);

        let bytes = bincode::encode_to_vec(&b, BINCODE_CONFIG).unwrap();
        let (d, n): (Binding, usize) = bincode::decode_from_slice(&bytes, BINCODE_CONFIG).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(d, b);
        assert!(format!("{b:?}").contains("alice"));

        let v4 = binding("sip:a@192.0.2.1", "c", 5);
        let bytes = bincode::encode_to_vec(&v4, BINCODE_CONFIG).unwrap();
        let (d, _): (Binding, usize) = bincode::decode_from_slice(&bytes, BINCODE_CONFIG).unwrap();
        assert_eq!(d, v4);
        assert_eq!(d.source(), "192.0.2.10:5060".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn too_long_field_is_rejected() {
        let long = vec![b'x'; MAX_FIELD_LEN + 1];
        let b = binding("sip:a@b", "c", 1);
        let mut p = b.parts();
        p.user_agent = &long;
        assert_eq!(Binding::try_new(p).unwrap_err().field, "user_agent");
        p.user_agent = &long[..MAX_FIELD_LEN];
        assert_eq!(
            Binding::try_new(p).unwrap().user_agent().len(),
            MAX_FIELD_LEN
        );
    }

    #[test]
    fn decode_garbage_never_panics() {
        let b = binding("sip:user@192.0.2.1:5060", "call-id", 10);
        let good = bincode::encode_to_vec(&b, BINCODE_CONFIG).unwrap();
        // Every truncation and many single-byte corruptions must give an error or a value.
        for n in 0..good.len() {
            let r = bincode::decode_from_slice::<Binding, _>(&good[..n], BINCODE_CONFIG);
            assert!(r.is_err());
        }
        let mut x = 0x1234_5678u32;
        for i in 0..good.len() {
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let mut bad = good.clone();
                bad[i] = x as u8;
                let _ = bincode::decode_from_slice::<Binding, _>(&bad, BINCODE_CONFIG);
            }
        }
        // A huge length prefix is refused without allocating it.
        let mut bad = vec![4, 1, 2, 3, 4, 0xc4, 0x13];
        bad.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert!(bincode::decode_from_slice::<Binding, _>(&bad, BINCODE_CONFIG).is_err());
    }

    #[test]
    fn update_insert_replace_remove() {
        let t = Usrloc::new(16);
        let aor: &[u8] = b"alice@example.com\0x";
        // Keep / Remove on an absent AoR: no-op, nothing allocated.
        let o = t.update(aor, |cur| {
            assert!(cur.is_none());
            Update::Remove(1)
        });
        assert_eq!(
            (o.value, o.applied, o.key.is_none()),
            (1, Applied::Kept, true)
        );
        assert_eq!(t.aors(), 0);

        let o = t.update(aor, |_| {
            Update::Replace(AorRecord::single(binding("sip:a", "c1", 10)), 2)
        });
        assert_eq!((o.value, o.applied), (2, Applied::Inserted));
        let key = o.key.unwrap();
        assert_eq!(&*key, aor);
        assert_eq!((t.aors(), t.bindings()), (1, 1));

        let o = t.update(aor, |cur| {
            let mut v = cur.unwrap().bindings().to_vec();
            v.push(binding("sip:b", "c2", 5));
            Update::Replace(AorRecord::new(v), 3)
        });
        assert_eq!((o.value, o.applied), (3, Applied::Replaced));
        assert!(Arc::ptr_eq(&o.key.unwrap(), &key), "existing key is reused");
        assert_eq!((t.aors(), t.bindings()), (1, 2));
        t.read(aor, |r| {
            let r = r.unwrap();
            assert_eq!(r.len(), 2);
            assert_eq!(r.min_expires_at(), Some(5));
            assert!(r.find_contact(b"sip:b").is_some());
        });
        assert!(Arc::ptr_eq(&t.key(aor).unwrap(), &key));

        let o = t.update(aor, |_| Update::Keep(4));
        assert_eq!((o.value, o.applied), (4, Applied::Kept));
        assert!(o.key.is_some());

        // Removing the last binding via an empty record removes the AoR.
        let o = t.update(aor, |_| Update::Replace(AorRecord::default(), 5));
        assert_eq!((o.value, o.applied), (5, Applied::Removed));
        assert_eq!((t.aors(), t.bindings()), (0, 0));
        assert!(t.read(aor, |r| r.is_none()));
        assert!(t.read(b"alice@example.com", |r| r.is_none()));
    }

    #[test]
    fn for_each_sees_everything() {
        let t = Usrloc::new(0);
        for i in 0..1000u32 {
            let aor = format!("user{i}@example.com");
            t.update(aor.as_bytes(), |_| {
                Update::Replace(AorRecord::single(binding("sip:x", "c", i)), ())
            });
        }
        let mut n = 0;
        let mut sum = 0u64;
        t.for_each(|k, r| {
            assert!(k.starts_with(b"user"));
            n += 1;
            sum += r.bindings()[0].expires_at as u64;
        });
        assert_eq!((n, sum), (1000, 999 * 1000 / 2));
        assert_eq!(t.bindings(), 1000);
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        // Two threads each append their own bindings to the same 64 AoRs (read-modify-write);
        // every append must survive, and the closure-run counts must reflect retries only.
        const AORS: usize = 64;
        const PER_THREAD: usize = 200;
        let t = Arc::new(Usrloc::new(AORS));
        let handles: Vec<_> = (0..2)
            .map(|tid| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        for a in 0..AORS {
                            let aor = format!("aor{a}@example.com");
                            let contact = format!("sip:t{tid}-{i}@h");
                            let o = t.update(aor.as_bytes(), |cur| {
                                let mut v = cur.map(|r| r.bindings().to_vec()).unwrap_or_default();
                                v.push(binding(&contact, "c", i as u32));
                                Update::Replace(AorRecord::new(v), i)
                            });
                            assert_eq!(o.value, i);
                            assert_ne!(o.applied, Applied::Kept);
                        }
                    }
                    // Then remove this thread's bindings again, half of them.
                    for a in 0..AORS {
                        let aor = format!("aor{a}@example.com");
                        t.update(aor.as_bytes(), |cur| {
                            let v: Vec<Binding> = cur
                                .unwrap()
                                .bindings()
                                .iter()
                                .filter(|b| {
                                    !(b.contact().starts_with(format!("sip:t{tid}-").as_bytes())
                                        && b.expires_at % 2 == 0)
                                })
                                .cloned()
                                .collect();
                            Update::Replace(AorRecord::new(v), ())
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(t.aors(), AORS);
        assert_eq!(t.bindings(), AORS * PER_THREAD);
        for a in 0..AORS {
            let aor = format!("aor{a}@example.com");
            t.read(aor.as_bytes(), |r| {
                let r = r.unwrap();
                assert_eq!(r.len(), PER_THREAD);
                for tid in 0..2 {
                    for i in (1..PER_THREAD).step_by(2) {
                        let c = format!("sip:t{tid}-{i}@h");
                        assert!(r.find_contact(c.as_bytes()).is_some(), "{c} lost");
                    }
                }
            });
        }
        // Finally remove every AoR from both threads at once.
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let mut removed = 0;
                    for a in 0..AORS {
                        let aor = format!("aor{a}@example.com");
                        let o = t.update(aor.as_bytes(), |_| Update::Remove(()));
                        removed += (o.applied == Applied::Removed) as usize;
                    }
                    removed
                })
            })
            .collect();
        let removed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(removed, AORS);
        assert_eq!((t.aors(), t.bindings()), (0, 0));
    }
}
