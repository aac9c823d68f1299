//! Versioned change records.
//!
//! Every mutation of shared state becomes a [`ChangeRecord`] encoded with bincode 2 and
//! [`crate::BINCODE_CONFIG`] (`config::standard()`). Producers (worker threads) encode the
//! borrowed [`ChangeRecordRef`] without allocating; its encoding is byte-identical to the
//! owned [`ChangeRecord`]'s, which is what consumers decode.
//!
//! Decoding is total: malformed bytes give a `DecodeError`, never a panic, and a bad length
//! prefix never makes the decoder allocate more than [`MAX_FIELD_LEN`] bytes per field.

use bincode::de::{Decode, Decoder};
use bincode::error::{DecodeError, EncodeError};

use crate::dialog::Dialog;
use crate::presence::{PresenceEnd, Publication, Watcher};
use crate::usrloc::{Binding, MAX_FIELD_LEN, decode_bytes_into};
use crate::{BINCODE_CONFIG, NodeId};

/// Why a binding was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub enum RemoveReason {
    /// The UA unregistered it (Expires: 0).
    Unregistered,
    /// It expired.
    Expired,
    /// It was replaced (e.g. same +sip.instance/reg-id with a new contact, or max-contacts).
    Replaced,
    /// Removed by an administrator.
    Admin,
    /// It stopped answering NAT keepalive pings.
    Unreachable,
}

/// One change, owned form (what a consumer decodes).
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode)]
pub enum Change {
    /// A binding was created or refreshed (the full new binding).
    BindingUpsert {
        /// Canonical AoR.
        aor: Box<[u8]>,
        /// The binding as stored.
        binding: Binding,
    },
    /// A binding was removed.
    BindingRemove {
        /// Canonical AoR.
        aor: Box<[u8]>,
        /// Contact URI of the removed binding.
        contact: Box<[u8]>,
        /// Its `+sip.instance` (may be empty).
        instance: Box<[u8]>,
        /// Its reg-id (0 = none).
        reg_id: u32,
        /// Why.
        reason: RemoveReason,
    },
    /// A call's dialog was created or changed (the full new state).
    DialogUpsert {
        /// Dialog key (Call-ID, a zero octet, the caller's tag).
        key: Box<[u8]>,
        /// The dialog as stored.
        dialog: Dialog,
    },
    /// A call ended (its final state, for the CDR); the dialog leaves the table.
    DialogEnd {
        /// Dialog key.
        key: Box<[u8]>,
        /// The final state.
        dialog: Dialog,
    },
    /// A publication was made, refreshed or modified (RFC 3903).
    PublishUpsert {
        /// Presentity key (event package, a zero octet, the AoR).
        key: Box<[u8]>,
        /// The entity tag it replaces (refresh, modification), empty for a new one.
        replaces: Box<[u8]>,
        /// The publication.
        publication: Publication,
    },
    /// A publication went away.
    PublishRemove {
        /// Presentity key.
        key: Box<[u8]>,
        /// Its entity tag.
        etag: Box<[u8]>,
        /// Why.
        reason: PresenceEnd,
    },
    /// A subscription was made or changed (RFC 6665).
    WatcherUpsert {
        /// Watcher key (Call-ID, our tag, the subscriber's tag).
        key: Box<[u8]>,
        /// The watcher.
        watcher: Watcher,
    },
    /// A subscription ended (its final state).
    WatcherEnd {
        /// Watcher key.
        key: Box<[u8]>,
        /// The final state.
        watcher: Watcher,
        /// Why.
        reason: PresenceEnd,
    },
}

fn decode_box<D: Decoder>(d: &mut D) -> Result<Box<[u8]>, DecodeError> {
    let mut v = Vec::new();
    decode_bytes_into(d, &mut v, MAX_FIELD_LEN)?;
    Ok(v.into_boxed_slice())
}

// Manual so that byte-string lengths are bounded whatever the decoder's limit.
impl<Ctx> Decode<Ctx> for Change {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        match u32::decode(d)? {
            0 => Ok(Change::BindingUpsert {
                aor: decode_box(d)?,
                binding: Binding::decode(d)?,
            }),
            1 => Ok(Change::BindingRemove {
                aor: decode_box(d)?,
                contact: decode_box(d)?,
                instance: decode_box(d)?,
                reg_id: u32::decode(d)?,
                reason: RemoveReason::decode(d)?,
            }),
            2 => Ok(Change::DialogUpsert {
                key: decode_box(d)?,
                dialog: Dialog::decode(d)?,
            }),
            3 => Ok(Change::DialogEnd {
                key: decode_box(d)?,
                dialog: Dialog::decode(d)?,
            }),
            4 => Ok(Change::PublishUpsert {
                key: decode_box(d)?,
                replaces: decode_box(d)?,
                publication: Publication::decode(d)?,
            }),
            5 => Ok(Change::PublishRemove {
                key: decode_box(d)?,
                etag: decode_box(d)?,
                reason: PresenceEnd::decode(d)?,
            }),
            6 => Ok(Change::WatcherUpsert {
                key: decode_box(d)?,
                watcher: Watcher::decode(d)?,
            }),
            7 => Ok(Change::WatcherEnd {
                key: decode_box(d)?,
                watcher: Watcher::decode(d)?,
                reason: PresenceEnd::decode(d)?,
            }),
            found => Err(DecodeError::UnexpectedVariant {
                type_name: "Change",
                allowed: &bincode::error::AllowedEnumVariants::Range { min: 0, max: 7 },
                found,
            }),
        }
    }
}

bincode::impl_borrow_decode!(Change);

impl Change {
    /// The object this change is about: the AoR of a binding, the key of a dialog.
    pub fn aor(&self) -> &[u8] {
        match self {
            Change::BindingUpsert { aor, .. } | Change::BindingRemove { aor, .. } => aor,
            Change::DialogUpsert { key, .. }
            | Change::DialogEnd { key, .. }
            | Change::PublishUpsert { key, .. }
            | Change::PublishRemove { key, .. }
            | Change::WatcherUpsert { key, .. }
            | Change::WatcherEnd { key, .. } => key,
        }
    }

    /// Borrowed form.
    pub fn as_ref(&self) -> ChangeRef<'_> {
        match self {
            Change::BindingUpsert { aor, binding } => ChangeRef::BindingUpsert { aor, binding },
            Change::BindingRemove {
                aor,
                contact,
                instance,
                reg_id,
                reason,
            } => ChangeRef::BindingRemove {
                aor,
                contact,
                instance,
                reg_id: *reg_id,
                reason: *reason,
            },
            Change::DialogUpsert { key, dialog } => ChangeRef::DialogUpsert { key, dialog },
            Change::DialogEnd { key, dialog } => ChangeRef::DialogEnd { key, dialog },
            Change::PublishUpsert {
                key,
                replaces,
                publication,
            } => ChangeRef::PublishUpsert {
                key,
                replaces,
                publication,
            },
            Change::PublishRemove { key, etag, reason } => ChangeRef::PublishRemove {
                key,
                etag,
                reason: *reason,
            },
            Change::WatcherUpsert { key, watcher } => ChangeRef::WatcherUpsert { key, watcher },
            Change::WatcherEnd {
                key,
                watcher,
                reason,
            } => ChangeRef::WatcherEnd {
                key,
                watcher,
                reason: *reason,
            },
        }
    }
}

/// A versioned change, owned form (what a consumer decodes).
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct ChangeRecord {
    /// Node where the change was made.
    pub origin: NodeId,
    /// Version (see [`next_version`]); for upserts equal to the binding's version.
    pub version: u64,
    /// Wall-clock time of the change, unix milliseconds.
    pub at_ms: u64,
    /// The change.
    pub change: Change,
}

impl ChangeRecord {
    /// Borrowed form.
    pub fn as_ref(&self) -> ChangeRecordRef<'_> {
        ChangeRecordRef {
            origin: self.origin,
            version: self.version,
            at_ms: self.at_ms,
            change: self.change.as_ref(),
        }
    }

    /// Decodes one record from the start of `bytes`; returns it and the bytes consumed.
    pub fn decode_from_slice(bytes: &[u8]) -> Result<(ChangeRecord, usize), DecodeError> {
        bincode::decode_from_slice(bytes, BINCODE_CONFIG)
    }

    /// Encodes into a new vector (consumer side convenience; producers use the ring).
    pub fn encode_to_vec(&self) -> Vec<u8> {
        self.as_ref().encode_to_vec()
    }
}

/// One change, borrowed form (what a producer encodes, without allocating).
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode)]
pub enum ChangeRef<'a> {
    /// See [`Change::BindingUpsert`].
    BindingUpsert {
        /// Canonical AoR.
        aor: &'a [u8],
        /// The binding as stored.
        binding: &'a Binding,
    },
    /// See [`Change::BindingRemove`].
    BindingRemove {
        /// Canonical AoR.
        aor: &'a [u8],
        /// Contact URI of the removed binding.
        contact: &'a [u8],
        /// Its `+sip.instance` (may be empty).
        instance: &'a [u8],
        /// Its reg-id (0 = none).
        reg_id: u32,
        /// Why.
        reason: RemoveReason,
    },
    /// See [`Change::DialogUpsert`].
    DialogUpsert {
        /// Dialog key.
        key: &'a [u8],
        /// The dialog.
        dialog: &'a Dialog,
    },
    /// See [`Change::DialogEnd`].
    DialogEnd {
        /// Dialog key.
        key: &'a [u8],
        /// The final state.
        dialog: &'a Dialog,
    },
    /// See [`Change::PublishUpsert`].
    PublishUpsert {
        /// Presentity key.
        key: &'a [u8],
        /// The entity tag it replaces (empty: none).
        replaces: &'a [u8],
        /// The publication.
        publication: &'a Publication,
    },
    /// See [`Change::PublishRemove`].
    PublishRemove {
        /// Presentity key.
        key: &'a [u8],
        /// Its entity tag.
        etag: &'a [u8],
        /// Why.
        reason: PresenceEnd,
    },
    /// See [`Change::WatcherUpsert`].
    WatcherUpsert {
        /// Watcher key.
        key: &'a [u8],
        /// The watcher.
        watcher: &'a Watcher,
    },
    /// See [`Change::WatcherEnd`].
    WatcherEnd {
        /// Watcher key.
        key: &'a [u8],
        /// The final state.
        watcher: &'a Watcher,
        /// Why.
        reason: PresenceEnd,
    },
}

impl ChangeRef<'_> {
    /// Owned copy.
    pub fn to_owned_change(&self) -> Change {
        match *self {
            ChangeRef::BindingUpsert { aor, binding } => Change::BindingUpsert {
                aor: aor.into(),
                binding: binding.clone(),
            },
            ChangeRef::BindingRemove {
                aor,
                contact,
                instance,
                reg_id,
                reason,
            } => Change::BindingRemove {
                aor: aor.into(),
                contact: contact.into(),
                instance: instance.into(),
                reg_id,
                reason,
            },
            ChangeRef::DialogUpsert { key, dialog } => Change::DialogUpsert {
                key: key.into(),
                dialog: dialog.clone(),
            },
            ChangeRef::DialogEnd { key, dialog } => Change::DialogEnd {
                key: key.into(),
                dialog: dialog.clone(),
            },
            ChangeRef::PublishUpsert {
                key,
                replaces,
                publication,
            } => Change::PublishUpsert {
                key: key.into(),
                replaces: replaces.into(),
                publication: publication.clone(),
            },
            ChangeRef::PublishRemove { key, etag, reason } => Change::PublishRemove {
                key: key.into(),
                etag: etag.into(),
                reason,
            },
            ChangeRef::WatcherUpsert { key, watcher } => Change::WatcherUpsert {
                key: key.into(),
                watcher: watcher.clone(),
            },
            ChangeRef::WatcherEnd {
                key,
                watcher,
                reason,
            } => Change::WatcherEnd {
                key: key.into(),
                watcher: watcher.clone(),
                reason,
            },
        }
    }
}

/// A versioned change, borrowed form; encodes byte-identically to [`ChangeRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, bincode::Encode)]
pub struct ChangeRecordRef<'a> {
    /// Node where the change was made.
    pub origin: NodeId,
    /// Version (see [`next_version`]).
    pub version: u64,
    /// Wall-clock time of the change, unix milliseconds.
    pub at_ms: u64,
    /// The change.
    pub change: ChangeRef<'a>,
}

impl ChangeRecordRef<'_> {
    /// Exact encoded size in bytes (one encoding pass into a counting writer, no allocation).
    pub fn encoded_len(&self) -> usize {
        let mut w = bincode::enc::write::SizeWriter::default();
        match bincode::encode_into_writer(self, &mut w, BINCODE_CONFIG) {
            Ok(()) => w.bytes_written,
            Err(_) => usize::MAX,
        }
    }

    /// Encodes into `out` (cleared first; allocates only if `out` is too small).
    pub fn encode_into_vec(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.clear();
        bincode::encode_into_std_write(self, out, BINCODE_CONFIG).map(|_| ())
    }

    /// Encodes into a new vector.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        // Writing into a Vec cannot fail.
        let _ = self.encode_into_vec(&mut v);
        v
    }

    /// Owned copy.
    pub fn to_owned_record(&self) -> ChangeRecord {
        ChangeRecord {
            origin: self.origin,
            version: self.version,
            at_ms: self.at_ms,
            change: self.change.to_owned_change(),
        }
    }
}

/// Next version number for a change made on this node.
///
/// Returns `max(prev + 1, (now_ms << 16) | worker)`: strictly greater than `prev` (the
/// previous version of the same object, or the worker's last issued version) and, while
/// clocks behave, ordered by wall-clock millisecond across the node, the low 16 bits
/// separating workers within one millisecond. A clock stepping backwards only makes versions
/// advance by 1 until time catches up. Saturates at `u64::MAX` (reached in year ~10 000 000).
#[inline]
pub fn next_version(prev: u64, now_ms: u64, worker: u16) -> u64 {
    let clock = now_ms.checked_shl(16).map_or(u64::MAX, |c| {
        if now_ms >> 48 != 0 {
            u64::MAX
        } else {
            c | worker as u64
        }
    });
    prev.saturating_add(1).max(clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usrloc::{BindingParts, Q_NONE};

    fn sample_binding() -> Binding {
        Binding::new(BindingParts {
            contact: b"sip:user123456@192.0.2.10:5060;transport=udp",
            call_id: b"0f8fad5b-d9cb-469f-a165-70867728950e",
            path: b"<sip:edge1.example.com;lr>",
            instance: b"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>",
            user_agent: b"Linphone/5.0",
            tag: b"",
            expires_at: 1_800_000_000,
            cseq: 7,
            q: Q_NONE,
            reg_id: 1,
            source: "192.0.2.10:5060".parse().unwrap(),
            transport: 0,
            flags: 3,
            version: next_version(0, 1_700_000_000_123, 1),
            origin: NodeId(3),
            last_modified: 1_700_000_000,
        })
    }

    fn samples() -> Vec<ChangeRecord> {
        let b = sample_binding();
        vec![
            ChangeRecord {
                origin: NodeId(3),
                version: b.version,
                at_ms: 1_700_000_000_123,
                change: Change::BindingUpsert {
                    aor: (*b"user123456@example.com").into(),
                    binding: b,
                },
            },
            ChangeRecord {
                origin: NodeId(u16::MAX),
                version: u64::MAX,
                at_ms: 0,
                change: Change::BindingRemove {
                    aor: (*b"a\0b@example.com").into(),
                    contact: (*b"sip:a@192.0.2.1").into(),
                    instance: Box::default(),
                    reg_id: 0,
                    reason: RemoveReason::Expired,
                },
            },
            ChangeRecord {
                origin: NodeId(2),
                version: 77,
                at_ms: 1_800_000_000_000,
                change: Change::DialogUpsert {
                    key: (*b"c1\0f1").into(),
                    dialog: crate::dialog::sample_dialog(),
                },
            },
            ChangeRecord {
                origin: NodeId(2),
                version: 78,
                at_ms: 1_800_000_000_001,
                change: Change::DialogEnd {
                    key: (*b"c1\0f1").into(),
                    dialog: crate::dialog::Dialog {
                        state: crate::dialog::DialogState::Terminated,
                        end: Some((
                            crate::dialog::EndReason::Failed(486),
                            crate::dialog::Party::Callee,
                        )),
                        legs: crate::dialog::Legs {
                            caller_addr: Some("[2001:db8::1]:5060".parse().unwrap()),
                            ..crate::dialog::sample_dialog().legs
                        },
                        ..crate::dialog::sample_dialog()
                    },
                },
            },
            ChangeRecord {
                origin: NodeId(3),
                version: 79,
                at_ms: 1_800_000_000_002,
                change: Change::PublishUpsert {
                    key: (*b"presence\0alice@example.com").into(),
                    replaces: (*b"e0").into(),
                    publication: crate::presence::Publication {
                        etag: (*b"e1").into(),
                        content_type: (*b"application/pidf+xml").into(),
                        body: (*b"<presence/>").into(),
                        published_ms: 5,
                        expires_ms: 6,
                        version: 79,
                        origin: NodeId(3),
                    },
                },
            },
            ChangeRecord {
                origin: NodeId(3),
                version: 80,
                at_ms: 1_800_000_000_003,
                change: Change::PublishRemove {
                    key: (*b"presence\0alice@example.com").into(),
                    etag: (*b"e1").into(),
                    reason: PresenceEnd::Expired,
                },
            },
            ChangeRecord {
                origin: NodeId(3),
                version: 81,
                at_ms: 1_800_000_000_004,
                change: Change::WatcherUpsert {
                    key: (*b"c\0l\0r").into(),
                    watcher: crate::presence::tests::watcher("c", 81),
                },
            },
            ChangeRecord {
                origin: NodeId(3),
                version: 82,
                at_ms: 1_800_000_000_005,
                change: Change::WatcherEnd {
                    key: (*b"c\0l\0r").into(),
                    watcher: crate::presence::tests::watcher("c", 82),
                    reason: PresenceEnd::Rejected,
                },
            },
        ]
    }

    #[test]
    fn borrowed_encoding_is_identical_and_decodes_to_owned() {
        for rec in samples() {
            let owned = bincode::encode_to_vec(&rec, BINCODE_CONFIG).unwrap();
            let borrowed = rec.as_ref().encode_to_vec();
            assert_eq!(owned, borrowed);
            assert_eq!(rec.as_ref().encoded_len(), owned.len());
            let (back, n) = ChangeRecord::decode_from_slice(&borrowed).unwrap();
            assert_eq!(n, borrowed.len());
            assert_eq!(back, rec);
            assert_eq!(back.as_ref().to_owned_record(), rec);
        }
        // Built directly as a ChangeRef from table data (no owned record involved).
        let b = sample_binding();
        let r = ChangeRecordRef {
            origin: NodeId(3),
            version: 9,
            at_ms: 10,
            change: ChangeRef::BindingUpsert {
                aor: b"x@y",
                binding: &b,
            },
        };
        let (back, _) = ChangeRecord::decode_from_slice(&r.encode_to_vec()).unwrap();
        assert_eq!(back.change.aor(), b"x@y");
        assert_eq!(
            back.change,
            Change::BindingUpsert {
                aor: (*b"x@y").into(),
                binding: b
            }
        );
    }

    #[test]
    fn decode_garbage_never_panics() {
        for rec in samples() {
            let good = rec.encode_to_vec();
            for n in 0..good.len() {
                assert!(ChangeRecord::decode_from_slice(&good[..n]).is_err());
            }
            let mut x = 0x9e37_79b9u32;
            for i in 0..good.len() {
                for _ in 0..32 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let mut bad = good.clone();
                    bad[i] = x as u8;
                    let _ = ChangeRecord::decode_from_slice(&bad);
                }
            }
        }
        // Unknown variant, unknown reason, huge length.
        assert!(ChangeRecord::decode_from_slice(&[1, 1, 1, 7]).is_err());
        assert!(ChangeRecord::decode_from_slice(&[1, 1, 1, 1, 0, 0, 0, 0, 9]).is_err());
        let huge = [1, 1, 1, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert!(ChangeRecord::decode_from_slice(&huge).is_err());
        let mut x = 1u32;
        for len in 0..200 {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = ChangeRecord::decode_from_slice(&v);
        }
    }

    #[test]
    fn versions_increase() {
        let mut v = 0;
        for i in 0..1000u64 {
            let n = next_version(v, 1_700_000_000_000 + i / 10, 2);
            assert!(n > v);
            v = n;
        }
        // Clock going backwards: still strictly increasing.
        let n = next_version(v, 1, 2);
        assert_eq!(n, v + 1);
        // Different workers in the same millisecond get different versions.
        assert_ne!(next_version(0, 5, 1), next_version(0, 5, 2));
        assert!(next_version(0, 6, 0) > next_version(0, 5, u16::MAX));
        assert_eq!(next_version(u64::MAX, 0, 0), u64::MAX);
        assert_eq!(next_version(0, u64::MAX, 0), u64::MAX);
    }
}
