//! The dialog table: every call the proxy forwards, from its INVITE to its end, keyed by
//! Call-ID and the caller's tag (RFC 3261 §12: a dialog is Call-ID, local and remote
//! tag; the callee's tag is learnt from its responses). Lock-free reads and atomic
//! read-modify-writes (papaya), shared by the workers that see the call's messages and
//! the control plane that lists them.
//!
//! States (RFC 3261 §12, RFC 4235 §3.7.1 wording): `unconfirmed` (INVITE forwarded, no
//! answer with a tag yet), `early` (a provisional response with a To tag; forked calls
//! may have several early dialogs, the tags are kept), `confirmed` (a 2xx), `terminated`
//! (BYE, CANCEL, a final failure, or the lifetime limit).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bincode::de::{Decode, Decoder};
use bincode::enc::{Encode, Encoder};
use bincode::error::{DecodeError, EncodeError};
use papaya::{Compute, Operation};

use crate::NodeId;
use crate::usrloc::{MAX_FIELD_LEN, decode_bytes_into};

/// Where a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogState {
    /// INVITE forwarded, no tagged answer yet.
    Unconfirmed,
    /// A provisional response with a To tag.
    Early,
    /// A 2xx.
    Confirmed,
    /// Over.
    Terminated,
}

impl DialogState {
    /// Operator name.
    pub fn as_str(self) -> &'static str {
        match self {
            DialogState::Unconfirmed => "unconfirmed",
            DialogState::Early => "early",
            DialogState::Confirmed => "confirmed",
            DialogState::Terminated => "terminated",
        }
    }
}

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// A BYE.
    Bye,
    /// The caller cancelled before an answer.
    Cancelled,
    /// A final failure response (its status).
    Failed(u16),
    /// The lifetime limit ran out.
    Lifetime,
    /// An operator ended it (`sipctl dialog end`).
    Admin,
    /// One side stopped answering in-dialog pings (or answered 481).
    PingTimeout,
}

impl EndReason {
    /// CDR text: `bye`, `cancelled`, `failed-486`, `lifetime`.
    pub fn write(self, out: &mut Vec<u8>) {
        match self {
            EndReason::Bye => out.extend_from_slice(b"bye"),
            EndReason::Cancelled => out.extend_from_slice(b"cancelled"),
            EndReason::Lifetime => out.extend_from_slice(b"lifetime"),
            EndReason::Admin => out.extend_from_slice(b"admin"),
            EndReason::PingTimeout => out.extend_from_slice(b"ping-timeout"),
            EndReason::Failed(c) => {
                use std::io::Write;
                let _ = write!(out, "failed-{c}");
            }
        }
    }
}

/// Who ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    /// The caller (From of the INVITE).
    Caller,
    /// The callee.
    Callee,
    /// This proxy (lifetime limit, timeout).
    Proxy,
}

impl Party {
    /// Operator name.
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Caller => "caller",
            Party::Callee => "callee",
            Party::Proxy => "proxy",
        }
    }
}

/// One call (immutable; a change builds a new value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dialog {
    /// Cluster-unique id: node (16 bits), worker (8 bits), counter (40 bits).
    pub id: u64,
    /// Where the call is.
    pub state: DialogState,
    /// Call-ID.
    pub call_id: Arc<[u8]>,
    /// The caller's (From) tag.
    pub from_tag: Arc<[u8]>,
    /// The callee's tag: the confirmed one, else the latest early one.
    pub to_tag: Box<[u8]>,
    /// Early dialogs seen (distinct To tags of provisional responses, forking).
    pub early_tags: u8,
    /// From URI of the INVITE.
    pub caller: Arc<[u8]>,
    /// Request-URI of the INVITE as received.
    pub callee: Arc<[u8]>,
    /// Wall-clock ms the INVITE was forwarded.
    pub created_ms: u64,
    /// Wall-clock ms the 2xx was relayed (0: never).
    pub answered_ms: u64,
    /// Wall-clock ms it ended (0: not yet).
    pub ended_ms: u64,
    /// When the lifetime limit ends the call (wall-clock ms).
    pub expires_ms: u64,
    /// Why and by whom it ended.
    pub end: Option<(EndReason, Party)>,
    /// Node whose proxy created it.
    pub origin: NodeId,
    /// What ending the call from the middle needs (a BYE to each side).
    pub legs: Legs,
    /// Version of this state (see [`crate::next_version`]): replicas keep the newest.
    pub version: u64,
}

fn enc_state(s: DialogState) -> u8 {
    match s {
        DialogState::Unconfirmed => 0,
        DialogState::Early => 1,
        DialogState::Confirmed => 2,
        DialogState::Terminated => 3,
    }
}

fn enc_end(e: Option<(EndReason, Party)>) -> (u8, u16, u8) {
    let Some((r, p)) = e else { return (0, 0, 0) };
    let (k, c) = match r {
        EndReason::Bye => (1, 0),
        EndReason::Cancelled => (2, 0),
        EndReason::Failed(c) => (3, c),
        EndReason::Lifetime => (4, 0),
        EndReason::Admin => (5, 0),
        EndReason::PingTimeout => (6, 0),
    };
    let p = match p {
        Party::Caller => 0,
        Party::Callee => 1,
        Party::Proxy => 2,
    };
    (k, c, p)
}

pub(crate) fn enc_addr(a: Option<std::net::SocketAddr>) -> (u8, [u8; 16], u16) {
    match a {
        None => (0, [0; 16], 0),
        Some(std::net::SocketAddr::V4(v)) => (4, v.ip().to_ipv6_mapped().octets(), v.port()),
        Some(std::net::SocketAddr::V6(v)) => (6, v.ip().octets(), v.port()),
    }
}

pub(crate) fn dec_addr(
    fam: u8,
    o: [u8; 16],
    port: u16,
) -> Result<Option<std::net::SocketAddr>, DecodeError> {
    let v6 = std::net::Ipv6Addr::from(o);
    match fam {
        0 => Ok(None),
        4 => Ok(Some(std::net::SocketAddr::new(
            std::net::IpAddr::V4(
                v6.to_ipv4_mapped()
                    .ok_or(DecodeError::Other("bad IPv4 address"))?,
            ),
            port,
        ))),
        6 => Ok(Some(std::net::SocketAddr::new(
            std::net::IpAddr::V6(v6),
            port,
        ))),
        _ => Err(DecodeError::Other("bad address family in dialog")),
    }
}

// Wire form (bincode 2): id, state, byte strings (call_id, from_tag, to_tag, caller,
// callee, from_hdr, to_hdr, caller_contact, callee_contact), early_tags, times, end
// (kind, code, party), origin, both addresses (family, 16 octets, port), CSeqs, pings,
// version. Byte strings are bounded on decode.
impl Encode for Dialog {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.id.encode(e)?;
        enc_state(self.state).encode(e)?;
        for s in [
            &self.call_id[..],
            &self.from_tag[..],
            &self.to_tag[..],
            &self.caller[..],
            &self.callee[..],
            &self.legs.from_hdr[..],
            &self.legs.to_hdr[..],
            &self.legs.caller_contact[..],
            &self.legs.callee_contact[..],
        ] {
            s.encode(e)?;
        }
        self.early_tags.encode(e)?;
        self.created_ms.encode(e)?;
        self.answered_ms.encode(e)?;
        self.ended_ms.encode(e)?;
        self.expires_ms.encode(e)?;
        enc_end(self.end).encode(e)?;
        self.origin.encode(e)?;
        enc_addr(self.legs.caller_addr).encode(e)?;
        enc_addr(self.legs.callee_addr).encode(e)?;
        self.legs.caller_cseq.encode(e)?;
        self.legs.callee_cseq.encode(e)?;
        self.legs.pings.encode(e)?;
        self.version.encode(e)
    }
}

impl<Ctx> Decode<Ctx> for Dialog {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        let id = u64::decode(d)?;
        let state = match u8::decode(d)? {
            0 => DialogState::Unconfirmed,
            1 => DialogState::Early,
            2 => DialogState::Confirmed,
            3 => DialogState::Terminated,
            _ => return Err(DecodeError::Other("bad dialog state")),
        };
        let mut s = || -> Result<Box<[u8]>, DecodeError> {
            let mut v = Vec::new();
            decode_bytes_into(d, &mut v, MAX_FIELD_LEN)?;
            Ok(v.into_boxed_slice())
        };
        let (call_id, from_tag, to_tag, caller, callee) = (s()?, s()?, s()?, s()?, s()?);
        let (from_hdr, to_hdr, caller_contact, callee_contact) = (s()?, s()?, s()?, s()?);
        let a = Arc::<[u8]>::from;
        let (call_id, from_tag, caller, callee) = (a(call_id), a(from_tag), a(caller), a(callee));
        let (from_hdr, to_hdr, caller_contact) = (a(from_hdr), a(to_hdr), a(caller_contact));
        let early_tags = u8::decode(d)?;
        let (created_ms, answered_ms, ended_ms, expires_ms) = (
            u64::decode(d)?,
            u64::decode(d)?,
            u64::decode(d)?,
            u64::decode(d)?,
        );
        let (k, c, p): (u8, u16, u8) = Decode::decode(d)?;
        let party = match p {
            0 => Party::Caller,
            1 => Party::Callee,
            _ => Party::Proxy,
        };
        let end = match k {
            0 => None,
            1 => Some((EndReason::Bye, party)),
            2 => Some((EndReason::Cancelled, party)),
            3 => Some((EndReason::Failed(c), party)),
            4 => Some((EndReason::Lifetime, party)),
            5 => Some((EndReason::Admin, party)),
            6 => Some((EndReason::PingTimeout, party)),
            _ => return Err(DecodeError::Other("bad dialog end reason")),
        };
        let origin = NodeId::decode(d)?;
        let (f1, o1, p1): (u8, [u8; 16], u16) = Decode::decode(d)?;
        let (f2, o2, p2): (u8, [u8; 16], u16) = Decode::decode(d)?;
        Ok(Dialog {
            id,
            state,
            call_id,
            from_tag,
            to_tag,
            early_tags,
            caller,
            callee,
            created_ms,
            answered_ms,
            ended_ms,
            expires_ms,
            end,
            origin,
            legs: Legs {
                from_hdr,
                to_hdr,
                caller_contact,
                callee_contact,
                caller_addr: dec_addr(f1, o1, p1)?,
                callee_addr: dec_addr(f2, o2, p2)?,
                caller_cseq: u32::decode(d)?,
                callee_cseq: u32::decode(d)?,
                pings: u32::decode(d)?,
            },
            version: u64::decode(d)?,
        })
    }
}

bincode::impl_borrow_decode!(Dialog);

/// The two sides of a call, as the proxy saw them: enough to send each a BYE.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Legs {
    /// From header value of the INVITE (the caller's identity and tag).
    pub from_hdr: Arc<[u8]>,
    /// To header value of the INVITE (without the callee's tag).
    pub to_hdr: Arc<[u8]>,
    /// Contact URI of the caller (the INVITE's).
    pub caller_contact: Arc<[u8]>,
    /// Contact URI of the callee (the 2xx's).
    pub callee_contact: Box<[u8]>,
    /// Where the caller's requests came from (a BYE to it goes there, NAT included).
    pub caller_addr: Option<std::net::SocketAddr>,
    /// Where the callee was reached.
    pub callee_addr: Option<std::net::SocketAddr>,
    /// Highest CSeq number seen from the caller.
    pub caller_cseq: u32,
    /// Highest CSeq number seen from the callee.
    pub callee_cseq: u32,
    /// In-dialog ping rounds sent (the proxy's own CSeq numbers go above both sides').
    pub pings: u32,
}

impl Dialog {
    /// Seconds between the answer and the end (0 when never answered).
    pub fn duration_ms(&self) -> u64 {
        if self.answered_ms == 0 || self.ended_ms < self.answered_ms {
            0
        } else {
            self.ended_ms - self.answered_ms
        }
    }
}

/// Appends `s` as a JSON string (RFC 8259 §7 escapes; other octets as they are).
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                use std::io::Write;
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

impl Dialog {
    /// The call detail record of a finished call, as one JSON object and a newline,
    /// written into `out` (cleared first): dialog id, caller, callee, Call-ID, setup /
    /// answer / end time (unix ms), duration, end reason, who hung up, the node writing it.
    pub fn cdr_line(&self, node: u16, out: &mut Vec<u8>) {
        use std::io::Write;
        out.clear();
        // Writing into a Vec cannot fail; it allocates only while `out` grows.
        let _ = write!(out, "{{\"dialog_id\":\"{:016x}\",\"caller\":", self.id);
        json_str(out, &self.caller);
        out.extend_from_slice(b",\"callee\":");
        json_str(out, &self.callee);
        out.extend_from_slice(b",\"call_id\":");
        json_str(out, &self.call_id);
        let (reason, by) = self.end.unwrap_or((EndReason::Bye, Party::Proxy));
        let _ = write!(
            out,
            ",\"setup_ms\":{},\"answer_ms\":{},\"end_ms\":{},\"duration_ms\":{},\"end_reason\":\"",
            self.created_ms,
            self.answered_ms,
            self.ended_ms,
            self.duration_ms()
        );
        reason.write(out);
        let _ = writeln!(
            out,
            "\",\"hung_up_by\":\"{}\",\"node\":{node}}}",
            by.as_str()
        );
    }
}

/// The key of a dialog: Call-ID, a zero octet, the caller's tag.
pub fn dialog_key(call_id: &[u8], from_tag: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(call_id);
    out.push(0);
    out.extend_from_slice(from_tag);
}

/// Every live dialog of one node.
pub struct DialogTable {
    map: papaya::HashMap<Box<[u8]>, Arc<Dialog>>,
    ids: AtomicU64,
}

impl Default for DialogTable {
    fn default() -> Self {
        DialogTable::new(0)
    }
}

impl std::fmt::Debug for DialogTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialogTable")
            .field("len", &self.len())
            .finish()
    }
}

impl DialogTable {
    /// A table sized for `capacity` calls.
    pub fn new(capacity: usize) -> DialogTable {
        DialogTable {
            map: papaya::HashMap::with_capacity(capacity),
            ids: AtomicU64::new(1),
        }
    }

    /// A new cluster-unique id for a dialog made by `worker` of `node`.
    pub fn next_id(&self, node: NodeId, worker: u16) -> u64 {
        let n = self.ids.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1);
        u64::from(node.0) << 48 | u64::from(worker & 0xff) << 40 | n
    }

    /// Live dialogs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The dialog of `key`.
    pub fn get(&self, key: &[u8]) -> Option<Arc<Dialog>> {
        let g = self.map.guard();
        self.map.get(key, &g).cloned()
    }

    /// Adds `d` under `key` unless a dialog is there already; true when added.
    pub fn insert(&self, key: &[u8], d: Dialog) -> bool {
        let g = self.map.guard();
        self.map.try_insert(Box::from(key), Arc::new(d), &g).is_ok()
    }

    /// Atomic read-modify-write of one dialog: `f` returns the new value, or `None` to
    /// leave it. A terminated dialog is removed from the table; the final value is
    /// returned (for the CDR). `f` may run more than once under contention.
    pub fn update(
        &self,
        key: &[u8],
        mut f: impl FnMut(&Dialog) -> Option<Dialog>,
    ) -> Option<Dialog> {
        let g = self.map.guard();
        let mut last: Option<Dialog> = None;
        let r = self.map.compute(
            Box::from(key),
            |e: Option<(&Box<[u8]>, &Arc<Dialog>)>| match e {
                None => Operation::Abort(()),
                Some((_, d)) => match f(d) {
                    None => Operation::Abort(()),
                    Some(n) if n.state == DialogState::Terminated => {
                        last = Some(n);
                        Operation::Remove
                    }
                    Some(n) => {
                        last = Some(n.clone());
                        Operation::Insert(Arc::new(n))
                    }
                },
            },
            &g,
        );
        match r {
            Compute::Removed(..) | Compute::Updated { .. } | Compute::Inserted(..) => last,
            Compute::Aborted(()) => None,
        }
    }

    /// A replicated state of the dialog of `key`: taken when newer than ours (last
    /// writer wins by version); `ended`: the call is over, the dialog leaves the table.
    /// Returns whether the table changed. No local side effect (no record, no CDR).
    pub fn apply_remote(&self, key: &[u8], d: &Dialog, ended: bool) -> bool {
        let g = self.map.guard();
        let r = self.map.compute(
            Box::from(key),
            |e: Option<(&Box<[u8]>, &Arc<Dialog>)>| match e {
                Some((_, cur)) if cur.version >= d.version => Operation::Abort(()),
                Some(_) if ended => Operation::Remove,
                None if ended => Operation::Abort(()),
                _ => Operation::Insert(Arc::new(d.clone())),
            },
            &g,
        );
        !matches!(r, Compute::Aborted(()))
    }

    /// Every live dialog (a snapshot, for operators).
    pub fn snapshot(&self) -> Vec<Arc<Dialog>> {
        let g = self.map.guard();
        self.map.iter(&g).map(|(_, v)| v.clone()).collect()
    }

    /// Visits every live dialog with its key (no copy).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &Dialog)) {
        let g = self.map.guard();
        for (k, v) in self.map.iter(&g) {
            f(k, v);
        }
    }

    /// The key of the dialog with id `id`.
    pub fn key_of(&self, id: u64) -> Option<Vec<u8>> {
        let g = self.map.guard();
        self.map
            .iter(&g)
            .find(|(_, v)| v.id == id)
            .map(|(k, _)| k.to_vec())
    }

    /// The dialog with id `id`.
    pub fn find_id(&self, id: u64) -> Option<Arc<Dialog>> {
        let g = self.map.guard();
        self.map
            .iter(&g)
            .find(|(_, v)| v.id == id)
            .map(|(_, v)| v.clone())
    }
}

/// What a dialog profile counts calls by (OpenSIPS `set_dlg_profile`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileKey {
    /// One counter for all calls.
    None,
    /// The caller's user part (From URI).
    FromUser,
    /// The callee's user part (Request-URI of the INVITE).
    ToUser,
    /// The callee's domain.
    ToDomain,
}

impl ProfileKey {
    /// `none`, `from_user`, `to_user`, `to_domain`.
    pub fn parse(s: &str) -> Option<ProfileKey> {
        match s {
            "none" | "" => Some(ProfileKey::None),
            "from_user" => Some(ProfileKey::FromUser),
            "to_user" => Some(ProfileKey::ToUser),
            "to_domain" => Some(ProfileKey::ToDomain),
            _ => None,
        }
    }

    /// The value a dialog counts under.
    pub fn value(self, d: &Dialog) -> &[u8] {
        fn user(uri: &[u8]) -> &[u8] {
            let rest = uri
                .strip_prefix(b"sips:")
                .or_else(|| uri.strip_prefix(b"sip:"))
                .unwrap_or(uri);
            match rest.iter().position(|&b| b == b'@') {
                Some(at) => &rest[..at],
                None => b"",
            }
        }
        fn domain(uri: &[u8]) -> &[u8] {
            let rest = uri
                .strip_prefix(b"sips:")
                .or_else(|| uri.strip_prefix(b"sip:"))
                .unwrap_or(uri);
            let rest = match rest.iter().position(|&b| b == b'@') {
                Some(at) => &rest[at + 1..],
                None => rest,
            };
            let end = rest
                .iter()
                .position(|&b| b == b';' || b == b'?' || b == b'>')
                .unwrap_or(rest.len());
            &rest[..end]
        }
        match self {
            ProfileKey::None => b"",
            ProfileKey::FromUser => user(&d.caller),
            ProfileKey::ToUser => user(&d.callee),
            ProfileKey::ToDomain => domain(&d.callee),
        }
    }
}

/// A profile's counter key: the profile's index and the value counted.
type ProfileSlot = (u16, Box<[u8]>);

/// Named counters of live calls, optionally per value (calls per caller, per callee
/// ...), readable at any time. Lock-free: one atomic compute per (profile, value).
#[derive(Debug)]
pub struct Profiles {
    defs: Vec<(String, ProfileKey)>,
    /// (profile, value) → live calls; a value whose count falls to 0 leaves the map (a
    /// profile by caller would otherwise keep one entry per caller ever seen).
    counts: papaya::HashMap<ProfileSlot, i64>,
}

impl Profiles {
    /// Profiles `defs`: (name, what it counts by).
    pub fn new(defs: Vec<(String, ProfileKey)>) -> Profiles {
        Profiles {
            defs,
            counts: papaya::HashMap::new(),
        }
    }

    /// The profiles defined.
    pub fn defs(&self) -> &[(String, ProfileKey)] {
        &self.defs
    }

    /// A call starts (`+1`) or ends (`-1`) in every profile.
    pub fn add(&self, d: &Dialog, delta: i64) {
        let g = self.counts.guard();
        for (i, (_, k)) in self.defs.iter().enumerate() {
            // One atomic read-modify-write per key: an entry leaves the map at 0 with no
            // window for a concurrent change to be lost.
            self.counts.compute(
                (i as u16, Box::from(k.value(d))),
                |e: Option<(&ProfileSlot, &i64)>| {
                    let n = e.map_or(0, |(_, c)| *c) + delta;
                    match (e, n) {
                        (None, 0) => Operation::Abort(()),
                        (Some(_), 0) => Operation::Remove,
                        _ => Operation::Insert(n),
                    }
                },
                &g,
            );
        }
    }

    /// Values with live calls (for tests and operators).
    pub fn entries(&self) -> usize {
        self.counts.len()
    }

    /// Live calls of profile `name`: per value (`value` None: every value with calls).
    pub fn get(&self, name: &str, value: Option<&[u8]>) -> Option<Vec<(Vec<u8>, i64)>> {
        let i = self.defs.iter().position(|(n, _)| n == name)? as u16;
        let g = self.counts.guard();
        let mut out: Vec<(Vec<u8>, i64)> = match value {
            Some(v) => vec![(
                v.to_vec(),
                self.counts
                    .get(&(i, Box::from(v)), &g)
                    .copied()
                    .unwrap_or(0),
            )],
            None => self
                .counts
                .iter(&g)
                .filter(|((p, _), c)| *p == i && **c != 0)
                .map(|((_, v), c)| (v.to_vec(), *c))
                .collect(),
        };
        out.sort();
        Some(out)
    }
}

/// A confirmed call of realistic contents (tests).
#[cfg(test)]
pub(crate) fn sample_dialog() -> Dialog {
    Dialog {
        id: 0x0001_0100_0000_002a,
        state: DialogState::Confirmed,
        call_id: Arc::from(&b"a84b4c76e66710@pc33.example.com"[..]),
        from_tag: Arc::from(&b"1928301774"[..]),
        to_tag: Box::from(&b"a6c85cf"[..]),
        early_tags: 1,
        caller: Arc::from(&b"sip:alice@example.com"[..]),
        callee: Arc::from(&b"sip:bob@example.com"[..]),
        created_ms: 1_800_000_000_000,
        answered_ms: 1_800_000_002_000,
        ended_ms: 0,
        expires_ms: 1_800_043_200_000,
        end: None,
        origin: NodeId(1),
        legs: Legs {
            from_hdr: Arc::from(&b"Alice <sip:alice@example.com>;tag=1928301774"[..]),
            to_hdr: Arc::from(&b"Bob <sip:bob@example.com>"[..]),
            caller_contact: Arc::from(&b"sip:alice@198.51.100.7:5080"[..]),
            callee_contact: Box::from(&b"sip:bob@203.0.113.9:5090"[..]),
            caller_addr: Some("198.51.100.7:5080".parse().unwrap()),
            callee_addr: None,
            caller_cseq: 314159,
            callee_cseq: 0,
            pings: 2,
        },
        version: 99,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_keep_the_newest_state_and_drop_ended_calls() {
        let t = DialogTable::new(4);
        let d = sample_dialog();
        assert!(t.apply_remote(b"k", &d, false));
        assert!(!t.apply_remote(b"k", &d, false), "same version: kept");
        let older = Dialog {
            version: 50,
            state: DialogState::Early,
            ..d.clone()
        };
        assert!(!t.apply_remote(b"k", &older, false));
        assert_eq!(t.get(b"k").unwrap().state, DialogState::Confirmed);
        let newer = Dialog {
            version: 100,
            answered_ms: 1,
            ..d.clone()
        };
        assert!(t.apply_remote(b"k", &newer, false));
        assert_eq!(t.get(b"k").unwrap().answered_ms, 1);
        // An end older than what we hold does not end it; a newer one does.
        assert!(!t.apply_remote(
            b"k",
            &Dialog {
                version: 90,
                ..d.clone()
            },
            true
        ));
        assert!(t.apply_remote(
            b"k",
            &Dialog {
                version: 101,
                ..d.clone()
            },
            true
        ));
        assert!(t.is_empty());
        // An end for a call we never heard of changes nothing.
        assert!(!t.apply_remote(b"x", &d, true));
        assert!(t.is_empty());
    }

    fn d(id: u64) -> Dialog {
        Dialog {
            id,
            state: DialogState::Unconfirmed,
            call_id: Arc::from(&b"c1"[..]),
            from_tag: Arc::from(&b"f1"[..]),
            to_tag: Box::default(),
            early_tags: 0,
            caller: Arc::from(&b"sip:alice@example.com"[..]),
            callee: Arc::from(&b"sip:bob@example.com"[..]),
            created_ms: 1000,
            answered_ms: 0,
            ended_ms: 0,
            expires_ms: 1000 + 43_200_000,
            end: None,
            origin: NodeId(1),
            legs: Legs::default(),
            version: 1,
        }
    }

    #[test]
    fn a_dialog_goes_through_its_states_and_leaves_when_terminated() {
        let t = DialogTable::new(4);
        let mut k = Vec::new();
        dialog_key(b"c1", b"f1", &mut k);
        let id = t.next_id(NodeId(3), 1);
        assert_eq!(id >> 48, 3);
        assert_eq!((id >> 40) & 0xff, 1);
        assert!(t.insert(&k, d(id)));
        assert!(!t.insert(&k, d(id + 1)), "one dialog per key");
        let early = t
            .update(&k, |d| {
                Some(Dialog {
                    state: DialogState::Early,
                    to_tag: Box::from(&b"t1"[..]),
                    early_tags: 1,
                    ..d.clone()
                })
            })
            .unwrap();
        assert_eq!(early.state, DialogState::Early);
        assert_eq!(t.get(&k).unwrap().to_tag.as_ref(), b"t1");
        assert!(t.update(&k, |_| None).is_none());
        t.update(&k, |d| {
            Some(Dialog {
                state: DialogState::Confirmed,
                answered_ms: 2000,
                ..d.clone()
            })
        });
        assert_eq!(t.find_id(id).unwrap().state, DialogState::Confirmed);
        assert_eq!(t.snapshot().len(), 1);
        let last = t
            .update(&k, |d| {
                Some(Dialog {
                    state: DialogState::Terminated,
                    ended_ms: 62_000,
                    end: Some((EndReason::Bye, Party::Callee)),
                    ..d.clone()
                })
            })
            .unwrap();
        assert_eq!(last.duration_ms(), 60_000);
        assert!(t.is_empty(), "a terminated dialog leaves the table");
        assert!(t.update(&k, |d| Some(d.clone())).is_none());
        let mut r = Vec::new();
        EndReason::Failed(486).write(&mut r);
        assert_eq!(r, b"failed-486");
    }

    #[test]
    fn profiles_count_live_calls_per_value() {
        let p = Profiles::new(vec![
            ("calls".into(), ProfileKey::None),
            ("caller".into(), ProfileKey::FromUser),
            ("callee".into(), ProfileKey::ToUser),
            ("domain".into(), ProfileKey::ToDomain),
        ]);
        let mut a = d(1);
        let mut b = d(2);
        b.caller = Arc::from(&b"sip:carol@example.com"[..]);
        a.callee = Arc::from(&b"sip:bob@example.net;user=phone"[..]);
        p.add(&a, 1);
        p.add(&b, 1);
        p.add(&d(3), 1);
        assert_eq!(p.get("calls", None).unwrap(), vec![(vec![], 3)]);
        assert_eq!(
            p.get("caller", None).unwrap(),
            vec![(b"alice".to_vec(), 2), (b"carol".to_vec(), 1)]
        );
        assert_eq!(
            p.get("caller", Some(b"alice")).unwrap(),
            vec![(b"alice".to_vec(), 2)]
        );
        assert_eq!(
            p.get("caller", Some(b"nobody")).unwrap(),
            vec![(b"nobody".to_vec(), 0)]
        );
        assert_eq!(
            p.get("domain", None).unwrap(),
            vec![(b"example.com".to_vec(), 2), (b"example.net".to_vec(), 1)]
        );
        p.add(&a, -1);
        assert_eq!(p.get("caller", Some(b"alice")).unwrap()[0].1, 1);
        assert_eq!(p.get("callee", None).unwrap(), vec![(b"bob".to_vec(), 2)]);
        assert!(p.get("nope", None).is_none());
        // Values whose calls all ended leave the map: nothing is kept per caller ever seen.
        let before = p.entries();
        p.add(&b, -1);
        assert_eq!(p.entries(), before - 1, "carol's caller entry is gone");
        p.add(&d(3), -1);
        assert_eq!(p.entries(), 0);
        assert_eq!(p.get("calls", None).unwrap(), vec![]);
        assert_eq!(ProfileKey::parse("to_domain"), Some(ProfileKey::ToDomain));
        assert_eq!(ProfileKey::parse("x"), None);
    }
}
