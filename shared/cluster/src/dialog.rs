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

use papaya::{Compute, Operation};

use crate::NodeId;

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
}

impl EndReason {
    /// CDR text: `bye`, `cancelled`, `failed-486`, `lifetime`.
    pub fn write(self, out: &mut Vec<u8>) {
        match self {
            EndReason::Bye => out.extend_from_slice(b"bye"),
            EndReason::Cancelled => out.extend_from_slice(b"cancelled"),
            EndReason::Lifetime => out.extend_from_slice(b"lifetime"),
            EndReason::Admin => out.extend_from_slice(b"admin"),
            EndReason::Failed(c) => {
                out.extend_from_slice(b"failed-");
                out.extend_from_slice(c.to_string().as_bytes());
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
    pub call_id: Box<[u8]>,
    /// The caller's (From) tag.
    pub from_tag: Box<[u8]>,
    /// The callee's tag: the confirmed one, else the latest early one.
    pub to_tag: Box<[u8]>,
    /// Early dialogs seen (distinct To tags of provisional responses, forking).
    pub early_tags: u8,
    /// From URI of the INVITE.
    pub caller: Box<[u8]>,
    /// Request-URI of the INVITE as received.
    pub callee: Box<[u8]>,
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
}

/// The two sides of a call, as the proxy saw them: enough to send each a BYE.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Legs {
    /// From header value of the INVITE (the caller's identity and tag).
    pub from_hdr: Box<[u8]>,
    /// To header value of the INVITE (without the callee's tag).
    pub to_hdr: Box<[u8]>,
    /// Contact URI of the caller (the INVITE's).
    pub caller_contact: Box<[u8]>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64) -> Dialog {
        Dialog {
            id,
            state: DialogState::Unconfirmed,
            call_id: Box::from(&b"c1"[..]),
            from_tag: Box::from(&b"f1"[..]),
            to_tag: Box::default(),
            early_tags: 0,
            caller: Box::from(&b"sip:alice@example.com"[..]),
            callee: Box::from(&b"sip:bob@example.com"[..]),
            created_ms: 1000,
            answered_ms: 0,
            ended_ms: 0,
            expires_ms: 1000 + 43_200_000,
            end: None,
            origin: NodeId(1),
            legs: Legs::default(),
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
}
