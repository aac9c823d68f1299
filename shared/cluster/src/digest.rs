//! An order-independent digest of a user-location dataset, to verify a full sync.
//!
//! [`Digest`] is a multiset hash: a binding count and the wrapping sum of one 64-bit hash
//! per binding. Sums commute, so two tables holding the same bindings have the same digest
//! whatever the order they were filled in or are walked in, and a digest can be kept up to
//! date incrementally ([`Digest::add`] / [`Digest::remove`]) or combined
//! ([`Digest::merge`], e.g. over shards).
//!
//! The per-binding hash covers the AoR and the binding's Contact, `+sip.instance`, reg-id,
//! version, expiry and CSeq — what identifies a binding and what last-writer-wins and expiry
//! act on. It is FNV-1a 64 over the length-prefixed fields (integers little endian), then
//! the splitmix64 finalizer; it is defined here, byte for byte, so it is the same in every
//! process, on every platform and with every Rust version (unlike `std`'s `DefaultHasher`).
//! It is not a cryptographic hash: it detects divergence, not tampering.

use crate::usrloc::{Binding, Usrloc};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    #[inline]
    fn bytes(&mut self, bytes: &[u8]) {
        for &x in bytes {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(FNV_PRIME);
        }
    }

    /// A variable-length field: its length (u64 little endian), then its bytes.
    #[inline]
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

/// splitmix64's output function (a bijective avalanche mix).
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64-bit hash of one binding of `aor`.
fn binding_hash(aor: &[u8], b: &Binding) -> u64 {
    let mut h = Fnv(FNV_OFFSET);
    h.field(aor);
    h.field(b.contact());
    h.field(b.instance());
    h.bytes(&b.reg_id.to_le_bytes());
    h.bytes(&b.version.to_le_bytes());
    h.bytes(&b.expires_at.to_le_bytes());
    h.bytes(&b.cseq.to_le_bytes());
    mix64(h.0)
}

/// Order-independent digest of a set of bindings: their number and the wrapping sum of
/// their hashes (see the [module documentation](self) for what is hashed).
///
/// Equal datasets give equal digests; different ones differ except with probability about
/// 2⁻⁶⁴ per comparison (a digest is not proof against deliberate collisions).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug, bincode::Encode, bincode::Decode)]
pub struct Digest {
    /// Number of bindings (wrapping).
    pub count: u64,
    /// Wrapping sum of the per-binding hashes.
    pub hash: u64,
}

impl Digest {
    /// Accounts for binding `b` of `aor`.
    #[inline]
    pub fn add(&mut self, aor: &[u8], b: &Binding) {
        self.count = self.count.wrapping_add(1);
        self.hash = self.hash.wrapping_add(binding_hash(aor, b));
    }

    /// Undoes [`Digest::add`] of the same binding (e.g. when it is replaced or removed).
    #[inline]
    pub fn remove(&mut self, aor: &[u8], b: &Binding) {
        self.count = self.count.wrapping_sub(1);
        self.hash = self.hash.wrapping_sub(binding_hash(aor, b));
    }

    /// Adds the bindings accounted for by `other` (the digest of a disjoint part of the
    /// dataset, e.g. another shard).
    #[inline]
    pub fn merge(&mut self, other: Digest) {
        self.count = self.count.wrapping_add(other.count);
        self.hash = self.hash.wrapping_add(other.hash);
    }
}

impl Usrloc {
    /// Digest of every binding of the table (a walk with [`Usrloc::for_each`]: weakly
    /// consistent under concurrent changes, so compare digests of quiescent tables or of a
    /// snapshot). Never allocates.
    pub fn digest(&self) -> Digest {
        let mut d = Digest::default();
        self.for_each(|aor, rec| {
            for b in rec.bindings() {
                d.add(aor, b);
            }
        });
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use crate::usrloc::{AorRecord, BindingParts, Q_NONE, Update};

    fn b(contact: &str, version: u64) -> Binding {
        Binding::new(BindingParts {
            contact: contact.as_bytes(),
            call_id: b"c",
            path: b"",
            instance: b"",
            user_agent: b"",
            tag: b"",
            expires_at: 1_800_000_000,
            cseq: 3,
            q: Q_NONE,
            reg_id: 0,
            source: "192.0.2.1:5060".parse().unwrap(),
            transport: 0,
            flags: 0,
            version,
            origin: NodeId(1),
            last_modified: 0,
        })
    }

    #[test]
    fn hash_primitives_match_reference_vectors() {
        let fnv = |s: &[u8]| {
            let mut h = Fnv(FNV_OFFSET);
            h.bytes(s);
            h.0
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
        // splitmix64 seeded with 0: first output.
        assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        // The binding hash itself is pinned (value computed independently of this code): it
        // must never change between builds, or digests of different versions would differ.
        assert_eq!(
            binding_hash(b"alice@example.com", &b("sip:a@h", 7)),
            0xdcf8_390e_cf47_d6f7
        );
    }

    #[test]
    fn fields_are_separated() {
        // Moving bytes between the AoR and the Contact changes the hash.
        let h1 = binding_hash(b"ab", &b("c", 1));
        let h2 = binding_hash(b"a", &b("bc", 1));
        assert_ne!(h1, h2);
        // Fields outside the digest do not matter; those inside do.
        let x = b("sip:x", 1);
        let mut p = x.parts();
        p.call_id = b"other";
        p.origin = NodeId(9);
        assert_eq!(binding_hash(b"a", &x), binding_hash(b"a", &Binding::new(p)));
        for f in [
            |p: &mut BindingParts<'_>| p.version += 1,
            |p: &mut BindingParts<'_>| p.expires_at += 1,
            |p: &mut BindingParts<'_>| p.cseq += 1,
            |p: &mut BindingParts<'_>| p.reg_id += 1,
            |p: &mut BindingParts<'_>| p.instance = b"i",
        ] {
            let mut p = x.parts();
            f(&mut p);
            assert_ne!(binding_hash(b"a", &x), binding_hash(b"a", &Binding::new(p)));
        }
    }

    #[test]
    fn add_remove_merge() {
        let (x, y, z) = (b("sip:x", 1), b("sip:y", 2), b("sip:z", 3));
        let mut d = Digest::default();
        d.add(b"a", &x);
        d.add(b"a", &y);
        let two = d;
        d.add(b"b", &z);
        d.remove(b"b", &z);
        assert_eq!(d, two);
        d.remove(b"a", &x);
        d.remove(b"a", &y);
        assert_eq!(d, Digest::default());

        let mut other = Digest::default();
        other.add(b"b", &z);
        let mut all = two;
        all.merge(other);
        let mut direct = Digest::default();
        for (aor, b) in [(&b"b"[..], &z), (b"a", &y), (b"a", &x)] {
            direct.add(aor, b);
        }
        assert_eq!(all, direct);
        assert_eq!(all.count, 3);

        let bytes = bincode::encode_to_vec(all, crate::BINCODE_CONFIG).unwrap();
        let (back, _): (Digest, usize) =
            bincode::decode_from_slice(&bytes, crate::BINCODE_CONFIG).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn table_digest_is_order_independent() {
        let items: Vec<(String, Binding)> = (0..200u64)
            .map(|i| (format!("user{}@x", i % 37), b(&format!("sip:{i}@h"), i)))
            .collect();
        let fill = |order: &mut dyn Iterator<Item = &(String, Binding)>| {
            let t = Usrloc::new(0);
            for (aor, b) in order {
                t.update(aor.as_bytes(), |cur| {
                    let mut v = cur.map(|r| r.bindings().to_vec()).unwrap_or_default();
                    v.push(b.clone());
                    Update::Replace(AorRecord::new(v), ())
                });
            }
            t
        };
        let t1 = fill(&mut items.iter());
        let t2 = fill(&mut items.iter().rev());
        let mut x = 0x2545_f491u32;
        let mut shuffled: Vec<_> = items.iter().collect();
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            shuffled.swap(i, x as usize % (i + 1));
        }
        let t3 = fill(&mut shuffled.into_iter());
        let d = t1.digest();
        assert_eq!(d.count, 200);
        assert_eq!(t2.digest(), d);
        assert_eq!(t3.digest(), d);
        let mut by_hand = Digest::default();
        for (aor, b) in &items {
            by_hand.add(aor.as_bytes(), b);
        }
        assert_eq!(by_hand, d);
        // One binding different: another digest.
        t3.update(b"user0@x", |cur| {
            let mut v = cur.unwrap().bindings().to_vec();
            v[0].expires_at += 1;
            Update::Replace(AorRecord::new(v), ())
        });
        assert_ne!(t3.digest(), d);
        assert_eq!(Usrloc::new(0).digest(), Digest::default());
    }
}
