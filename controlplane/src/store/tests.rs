//! Tests of the store and of its write-behind thread, on a real RocksDB in temporary
//! directories.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::{DB, IteratorMode, WriteBatch};
use sipmesh_cluster::usrloc::{
    Binding, BindingParts, Q_NONE, TRANSPORT_TCP, TRANSPORT_TLS, TRANSPORT_UDP, Usrloc,
};
use sipmesh_cluster::{Change, ChangeRecord, NodeId, RemoveReason};
use sipmesh_dataplane::durable::DurableShared;

use super::persist::{Durability, PersistConfig, Persister};
use super::*;

/// A temporary directory, removed when dropped (declare it first so that it outlives the
/// stores opened in it).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("sipmesh-store-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A binding with every string set from its arguments; `call_id` follows the version so
/// that two versions of one binding differ in content.
fn bind(contact: &str, instance: &str, reg_id: u32, expires_at: u32, version: u64) -> Binding {
    Binding::new(BindingParts {
        contact: contact.as_bytes(),
        call_id: format!("call-{version}@host").as_bytes(),
        path: b"<sip:edge.example.com;lr>",
        instance: instance.as_bytes(),
        user_agent: b"ua/1",
        tag: b"",
        expires_at,
        cseq: version as u32,
        q: Q_NONE,
        reg_id,
        source: "192.0.2.7:5060".parse().unwrap(),
        transport: TRANSPORT_UDP,
        flags: 0,
        version,
        origin: NodeId(2),
        last_modified: 10,
    })
}

fn upsert(aor: &[u8], b: &Binding) -> ChangeRecord {
    ChangeRecord {
        origin: b.origin,
        version: b.version,
        at_ms: u64::from(b.last_modified) * 1000,
        change: Change::BindingUpsert {
            aor: aor.into(),
            binding: b.clone(),
        },
    }
}

fn remove(aor: &[u8], b: &Binding, version: u64) -> ChangeRecord {
    ChangeRecord {
        origin: NodeId(2),
        version,
        at_ms: 0,
        change: Change::BindingRemove {
            aor: aor.into(),
            contact: b.contact().into(),
            instance: b.instance().into(),
            reg_id: b.reg_id,
            reason: RemoveReason::Unregistered,
        },
    }
}

/// Frames as the drain hands them over: u32 LE length, then the record.
fn frames_of(recs: &[&ChangeRecord]) -> Bytes {
    let mut out = Vec::new();
    for r in recs {
        let v = r.encode_to_vec();
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(&v);
    }
    Bytes::from(out)
}

/// (AoR, contact, instance, reg-id) of a contact key.
type KeyParts = (&'static [u8], &'static [u8], &'static [u8], u32);

fn key_of(aor: &[u8], b: &Binding) -> Vec<u8> {
    contact_key(aor, b.contact(), b.instance(), b.reg_id)
}

/// Puts contact rows directly.
fn put_rows(store: &Store, rows: &[(&[u8], &Binding)]) {
    let mut batch = WriteBatch::default();
    for (aor, b) in rows {
        batch.put_cf(store.contacts(), key_of(aor, b), encode_binding(b));
    }
    store.write(batch, true).unwrap();
}

/// Every contact row, in key order.
fn rows(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .db
        .iterator_cf(store.contacts(), IteratorMode::Start)
        .map(|r| {
            let (k, v) = r.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

fn row(store: &Store, aor: &[u8], b: &Binding) -> Option<Binding> {
    store
        .db
        .get_cf(store.contacts(), key_of(aor, b))
        .unwrap()
        .map(|v| decode_binding(&v).unwrap())
}

fn sort_bindings(v: &mut [Binding]) {
    v.sort_by(|a, b| {
        (a.contact(), a.instance(), a.reg_id).cmp(&(b.contact(), b.instance(), b.reg_id))
    });
}

/// The table's content: AoR → bindings in (contact, instance, reg-id) order.
fn table(u: &Usrloc) -> BTreeMap<Vec<u8>, Vec<Binding>> {
    let mut m = BTreeMap::new();
    u.for_each(|k, r| {
        let mut v = r.bindings().to_vec();
        sort_bindings(&mut v);
        m.insert(k.to_vec(), v);
    });
    m
}

fn expect(entries: &[(&[u8], Vec<&Binding>)]) -> BTreeMap<Vec<u8>, Vec<Binding>> {
    entries
        .iter()
        .map(|(aor, bs)| {
            let mut v: Vec<Binding> = bs.iter().map(|b| (*b).clone()).collect();
            sort_bindings(&mut v);
            (aor.to_vec(), v)
        })
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// 1. Value encoding and its version octet.
#[test]
fn binding_values_round_trip_and_other_versions_are_refused() {
    let v4 = Binding::new(BindingParts {
        contact: b"sip:alice@192.0.2.1:5061;transport=tls;ob?X-H=a%20b",
        call_id: b"0f8fad5b-d9cb-469f@host",
        path: b"<sip:p1.example.com;lr>,<sip:p2.example.com;lr>",
        instance: b"\"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>\"",
        user_agent: b"Phone/2.0\0nul",
        tag: b"",
        expires_at: 1_800_000_000,
        cseq: 4242,
        q: 750,
        reg_id: 3,
        source: "198.51.100.9:5061".parse().unwrap(),
        transport: TRANSPORT_TLS,
        flags: 0xa5,
        version: 0x0123_4567_89ab_cdef,
        origin: NodeId(513),
        last_modified: 1_799_999_000,
    });
    let mut p = v4.parts();
    p.source = "[2001:db8::17]:5080".parse().unwrap();
    p.transport = TRANSPORT_TCP;
    p.q = Q_NONE;
    p.reg_id = 0;
    p.flags = 1;
    p.tag = b"vip";
    let v6 = Binding::new(p);
    assert_eq!(v6.tag(), b"vip");

    // A row written by format 1 (no trailing tag) still reads, untagged.
    let v1 = {
        let mut v = encode_binding(&v4);
        assert_eq!(
            v.pop(),
            Some(0),
            "an empty tag is one zero octet at the end"
        );
        v[0] = 1;
        v
    };
    assert_eq!(decode_binding(&v1).unwrap(), v4);

    for b in [&v4, &v6] {
        let v = encode_binding(b);
        assert_eq!(v[0], FORMAT_VERSION);
        assert_eq!(FORMAT_VERSION, 2);
        let d = decode_binding(&v).unwrap();
        assert_eq!(&d, b);
        assert_eq!(d.contact(), b.contact());
        assert_eq!(d.call_id(), b"0f8fad5b-d9cb-469f@host");
        assert_eq!(d.path(), b"<sip:p1.example.com;lr>,<sip:p2.example.com;lr>");
        assert_eq!(
            d.instance(),
            b"\"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>\""
        );
        assert_eq!(d.user_agent(), b"Phone/2.0\0nul");
        assert_eq!(
            (d.expires_at, d.cseq, d.last_modified),
            (1_800_000_000, 4242, 1_799_999_000)
        );
        assert_eq!((d.version, d.origin), (0x0123_4567_89ab_cdef, NodeId(513)));
    }
    let d4 = decode_binding(&encode_binding(&v4)).unwrap();
    assert_eq!(
        d4.source(),
        "198.51.100.9:5061".parse::<std::net::SocketAddr>().unwrap()
    );
    assert_eq!(
        (d4.q, d4.reg_id, d4.transport, d4.flags),
        (750, 3, TRANSPORT_TLS, 0xa5)
    );
    let d6 = decode_binding(&encode_binding(&v6)).unwrap();
    assert_eq!(
        d6.source(),
        "[2001:db8::17]:5080"
            .parse::<std::net::SocketAddr>()
            .unwrap()
    );
    assert_eq!(
        (d6.q, d6.reg_id, d6.transport, d6.flags),
        (Q_NONE, 0, TRANSPORT_TCP, 1)
    );

    let good = encode_binding(&v4);
    // Another version octet in front of an otherwise valid binding.
    let mut newer = good.clone();
    newer[0] = 3;
    let e = decode_binding(&newer).unwrap_err().0;
    assert!(e.contains("format version 3"), "{e}");
    assert!(e.contains("newer"), "{e}");
    assert!(!e.contains("older"), "{e}");
    let mut newest = good.clone();
    newest[0] = 255;
    let e = decode_binding(&newest).unwrap_err().0;
    assert!(e.contains("format version 255"), "{e}");
    assert!(e.contains("newer"), "{e}");
    let mut older = good.clone();
    older[0] = 0;
    let e = decode_binding(&older).unwrap_err().0;
    assert!(e.contains("format version 0"), "{e}");
    assert!(e.contains("older"), "{e}");
    assert!(!e.contains("newer"), "{e}");

    assert_eq!(
        decode_binding(&[]).unwrap_err(),
        StoreError("an empty contact value".into())
    );
    // Every truncation (the version octet alone included) is refused.
    for n in 1..good.len() {
        let e = decode_binding(&good[..n]).unwrap_err().0;
        assert!(e.starts_with("a contact value does not decode"), "{n}: {e}");
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(
        decode_binding(&trailing).unwrap_err(),
        StoreError("a contact value has 1 octets after the binding".into())
    );
    trailing.extend_from_slice(b"xyz");
    assert_eq!(
        decode_binding(&trailing).unwrap_err(),
        StoreError("a contact value has 4 octets after the binding".into())
    );
}

// 2. Keys.
#[test]
fn contact_keys_round_trip_differ_and_group_by_aor() {
    assert_eq!(
        contact_key(b"a\0", b"sip:x", b"", 7),
        [
            &[0, 2, b'a', 0][..],
            &[0, 5],
            b"sip:x",
            &[0, 0],
            &[0, 0, 0, 7]
        ]
        .concat()
    );

    let long_contact = vec![b'c'; 60_000];
    let long_aor = vec![b'\0'; 4_000];
    for aor in [
        &b""[..],
        b"a",
        b"\0",
        b"a\0b@example.com",
        b"\0\0\0",
        &long_aor,
    ] {
        for contact in [&b"sip:a@192.0.2.1"[..], b"", b"sip:\0", &long_contact] {
            let k = contact_key(aor, contact, b"<urn:uuid:1>", 0xdead_beef);
            assert_eq!(key_aor(&k), Some(aor));
            assert_eq!(k.len(), 10 + aor.len() + contact.len() + 12);
            assert_eq!(&k[k.len() - 4..], &[0xde, 0xad, 0xbe, 0xef]);
        }
    }
    assert_eq!(key_aor(b""), None);
    assert_eq!(key_aor(&[0]), None);
    assert_eq!(key_aor(&[0, 5, b'a']), None);
    assert_eq!(key_aor(&[0, 0]), Some(&b""[..]));

    // Any difference in (AoR, contact, instance, reg-id) gives another key, also when
    // the concatenated bytes are the same.
    let parts: [KeyParts; 9] = [
        (b"a", b"sip:x", b"", 0),
        (b"a", b"sip:y", b"", 0),
        (b"a", b"sip:x", b"i", 0),
        (b"a", b"sip:x", b"", 1),
        (b"a", b"sip:x", b"i", 1),
        (b"ab", b"c", b"", 0),
        (b"a", b"bc", b"", 0),
        (b"a", b"b", b"c", 0),
        (b"", b"ab", b"c", 0),
    ];
    let keys: HashSet<Vec<u8>> = parts
        .iter()
        .map(|(a, c, i, r)| contact_key(a, c, i, *r))
        .collect();
    assert_eq!(keys.len(), parts.len());

    // Rows of AoRs that are prefixes of each other, written interleaved.
    let tmp = TempDir::new("keys_group");
    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let aors: [&[u8]; 4] = [b"ab", b"a\0", b"a", b""];
    let mut written = Vec::new();
    for i in 0..3u64 {
        for aor in aors {
            // Contacts chosen so that, without the length prefixes, rows would interleave.
            let contact = match i {
                0 => "b".to_string(),
                1 => "\0z".to_string(),
                _ => format!("sip:{i}"),
            };
            let b = bind(&contact, "", i as u32, 1000, 10 + i);
            put_rows(&store, &[(aor, &b)]);
            written.push((aor, b));
        }
    }
    let all = rows(&store);
    assert_eq!(all.len(), 12);
    let order: Vec<&[u8]> = all.iter().map(|(k, _)| key_aor(k).unwrap()).collect();
    let mut runs = order.clone();
    runs.dedup();
    assert_eq!(runs, [&b""[..], b"a", b"a\0", b"ab"]);
    for (aor, b) in &written {
        let k = key_of(aor, b);
        assert!(k.starts_with(&[&(aor.len() as u16).to_be_bytes()[..], aor].concat()));
    }
    for aor in aors {
        let mut want: Vec<Vec<u8>> = written
            .iter()
            .filter(|(a, _)| *a == aor)
            .map(|(a, b)| key_of(a, b))
            .collect();
        want.sort();
        let got: Vec<Vec<u8>> = store
            .contact_keys_of(aor)
            .unwrap()
            .iter()
            .map(|k| k.to_vec())
            .collect();
        assert_eq!(got, want);
    }
    assert_eq!(store.contact_keys_of(b"a\0\0").unwrap().len(), 0);
    assert_eq!(store.contact_keys_of(b"b").unwrap().len(), 0);
    // Recovery relies on it: each AoR comes back whole.
    let u = Usrloc::new(0);
    let r = store.load_contacts(&u, 0, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (12, 4, 0));
    assert_eq!((u.aors(), u.bindings()), (4, 12));
    for aor in aors {
        let want: Vec<&Binding> = written
            .iter()
            .filter(|(a, _)| *a == aor)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(table(&u)[aor], expect(&[(aor, want)])[aor]);
    }
}

// 3. Format marker and identity.
#[test]
fn format_marker_and_identity_are_checked() {
    let tmp = TempDir::new("identity");
    let dir = tmp.path();
    drop(Store::open(dir, 1, 1).unwrap());
    let s = Store::open(dir, 1, 1).unwrap();
    assert_eq!(s.dir(), dir);
    put_rows(&s, &[(b"a", &bind("sip:a", "", 0, 100, 1))]);
    drop(s);

    let e = Store::open(dir, 2, 1).err().unwrap().0;
    assert!(e.contains("belongs to node 1 of cluster 1"), "{e}");
    assert!(e.contains("this is node 2 of cluster 1"), "{e}");
    let e = Store::open(dir, 1, 9).err().unwrap().0;
    assert!(e.contains("belongs to node 1 of cluster 1"), "{e}");
    assert!(e.contains("this is node 1 of cluster 9"), "{e}");
    // A refused open changes nothing.
    let s = Store::open(dir, 1, 1).unwrap();
    assert_eq!(rows(&s).len(), 1);
    drop(s);

    // Another format marker.
    {
        let db = DB::open_cf(&rocksdb::Options::default(), dir, FAMILIES).unwrap();
        let node = db.cf_handle(CF_NODE).unwrap();
        db.put_cf(node, b"format", [9]).unwrap();
    }
    let e = Store::open(dir, 1, 1).err().unwrap().0;
    assert!(e.contains("store format [9]"), "{e}");
    assert!(e.contains("reads format 2"), "{e}");

    // No marker, but contacts: not a store this build wrote.
    {
        let db = DB::open_cf(&rocksdb::Options::default(), dir, FAMILIES).unwrap();
        let node = db.cf_handle(CF_NODE).unwrap();
        db.delete_cf(node, b"format").unwrap();
    }
    let e = Store::open(dir, 1, 1).err().unwrap().0;
    assert!(e.contains("holds contacts but no format marker"), "{e}");

    // Marker restored: usable again.
    {
        let db = DB::open_cf(&rocksdb::Options::default(), dir, FAMILIES).unwrap();
        let node = db.cf_handle(CF_NODE).unwrap();
        db.put_cf(node, b"format", [FORMAT_VERSION]).unwrap();
    }
    let s = Store::open(dir, 1, 1).unwrap();
    assert_eq!(rows(&s).len(), 1);
    drop(s);

    // A format 1 store opens (its rows read as untagged) and is marked format 2.
    let marker = || {
        let db = DB::open_cf(&rocksdb::Options::default(), dir, FAMILIES).unwrap();
        let node = db.cf_handle(CF_NODE).unwrap();
        db.get_cf(node, b"format").unwrap().unwrap()
    };
    {
        let db = DB::open_cf(&rocksdb::Options::default(), dir, FAMILIES).unwrap();
        let node = db.cf_handle(CF_NODE).unwrap();
        db.put_cf(node, b"format", [1]).unwrap();
    }
    let s = Store::open(dir, 1, 1).unwrap();
    assert_eq!(rows(&s).len(), 1);
    drop(s);
    assert_eq!(marker(), [FORMAT_VERSION]);
}

// 4. Recovery.
#[test]
fn load_contacts_loads_live_rows_and_deletes_expired_ones() {
    let tmp = TempDir::new("load");
    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let now = 100;
    let alice: &[u8] = b"alice@example.com";
    let bob: &[u8] = b"bob\0@example.com";
    let carol: &[u8] = b"carol@example.com";
    let dave: &[u8] = b"dave@example.com";
    let a1 = bind("sip:a1@192.0.2.1", "", 0, 1000, 11);
    let a2 = bind("sip:a2@192.0.2.1", "", 0, 50, 99); // expired, the newest version
    let a3 = bind("sip:a3@192.0.2.1", "<urn:uuid:1>", 1, 2000, 12);
    let a4 = bind("sip:a3@192.0.2.1", "<urn:uuid:1>", 2, 700, 13);
    let b1 = bind("sip:b1@192.0.2.2", "", 0, 500, 20);
    let b2 = bind("sip:b2@192.0.2.2", "", 0, 101, 21);
    let c1 = bind("sip:c1@192.0.2.3", "", 0, now, 30); // expires exactly now: dead
    let c2 = bind("sip:c2@192.0.2.3", "", 0, 3000, 31);
    let d1 = bind("sip:d1@192.0.2.4", "", 0, 40, 40); // the AoR's only binding: dead
    put_rows(
        &store,
        &[
            (alice, &a1),
            (alice, &a2),
            (alice, &a3),
            (alice, &a4),
            (bob, &b1),
            (bob, &b2),
            (carol, &c1),
            (carol, &c2),
            (dave, &d1),
        ],
    );

    let want = expect(&[
        (alice, vec![&a1, &a3, &a4]),
        (bob, vec![&b1, &b2]),
        (carol, vec![&c2]),
    ]);
    let u = Usrloc::new(0);
    let r = store.load_contacts(&u, now, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (6, 3, 3));
    assert_eq!(r.newest_version, 31);
    assert!(r.seconds >= 0.0);
    assert_eq!((u.aors(), u.bindings()), (3, 6));
    assert_eq!(table(&u), want);
    let mut exp: Vec<(Vec<u8>, u32)> = r.expiries.iter().map(|(k, t)| (k.to_vec(), *t)).collect();
    exp.sort();
    assert_eq!(
        exp,
        [
            (alice.to_vec(), 700),
            (bob.to_vec(), 101),
            (carol.to_vec(), 3000)
        ]
    );
    // The expiry keys are the table's own keys.
    for (k, _) in &r.expiries {
        assert!(Arc::ptr_eq(k, &u.key(k).unwrap()));
    }
    assert!(u.read(dave, |r| r.is_none()));

    // The expired rows are gone; the live ones are left as they were.
    assert_eq!(row(&store, alice, &a2), None);
    assert_eq!(row(&store, carol, &c1), None);
    assert_eq!(row(&store, dave, &d1), None);
    assert_eq!(row(&store, alice, &a4), Some(a4.clone()));
    assert_eq!(rows(&store).len(), 6);

    let u2 = Usrloc::new(0);
    let r = store.load_contacts(&u2, now, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (6, 3, 0));
    assert_eq!(r.newest_version, 31);
    assert_eq!(table(&u2), want);
    drop(store);

    // And after a reopen.
    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let u3 = Usrloc::new(0);
    let r = store.load_contacts(&u3, now, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (6, 3, 0));
    assert_eq!(table(&u3), want);
}

#[test]
fn load_contacts_refuses_a_row_of_another_version() {
    let tmp = TempDir::new("load_version");
    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let b = bind("sip:a", "", 0, 1000, 1);
    let mut v = encode_binding(&b);
    v[0] = 3;
    let mut batch = WriteBatch::default();
    batch.put_cf(store.contacts(), key_of(b"a", &b), v);
    store.write(batch, false).unwrap();
    let e = store
        .load_contacts(&Usrloc::new(0), 0, |_, _| {})
        .unwrap_err()
        .0;
    assert!(e.contains("format version 3"), "{e}");
    assert!(e.contains(&tmp.path().display().to_string()), "{e}");
}

fn async_config() -> PersistConfig {
    PersistConfig {
        durability: Durability::Async,
        flush_ms: 2,
        wal_sync_ms: 20,
    }
}

// 5. Write-behind, async.
#[test]
fn persister_async_writes_the_tables_current_state() {
    let tmp = TempDir::new("persist_async");
    let store = Arc::new(Store::open(tmp.path(), 1, 1).unwrap());
    let u = Arc::new(Usrloc::new(0));
    let p = Persister::start(store.clone(), u.clone(), None, async_config(), Vec::new()).unwrap();
    assert_eq!(p.durability, Durability::Async);
    let tx = p.sender();
    let records = |n| {
        let stats = p.stats.clone();
        wait_until("records written", Duration::from_secs(5), move || {
            stats.records.load(Ordering::Relaxed) == n
        });
    };

    let alice: &[u8] = b"alice@example.com";
    let bob: &[u8] = b"bob@example.com";
    let carol: &[u8] = b"carol\0@example.com";
    let a1 = bind("sip:a1@192.0.2.1", "", 0, 5000, 10);
    let a2 = bind("sip:a2@192.0.2.1", "<urn:uuid:2>", 4, 5000, 11);
    let b1 = bind("sip:b1@192.0.2.2", "", 0, 5000, 12);
    let c1 = bind("sip:c1@192.0.2.3", "", 0, 5000, 13);
    let recs = [
        upsert(alice, &a1),
        upsert(alice, &a2),
        upsert(bob, &b1),
        upsert(carol, &c1),
    ];
    for r in &recs {
        u.apply_remote(r);
    }
    // One garbled frame in the middle: skipped.
    let mut buf = frames_of(&[&recs[0], &recs[1]]).to_vec();
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&[0xff, 0xff, 0xff]);
    buf.extend_from_slice(&frames_of(&[&recs[2], &recs[3]]));
    tx.records(Bytes::from(buf));
    tx.records(Bytes::new());
    records(4);
    assert_eq!(row(&store, alice, &a1), Some(a1.clone()));
    assert_eq!(row(&store, alice, &a2), Some(a2.clone()));
    assert_eq!(row(&store, bob, &b1), Some(b1.clone()));
    assert_eq!(row(&store, carol, &c1), Some(c1.clone()));

    // Removals: one binding of two, and an AoR's only binding.
    let rm_a2 = remove(alice, &a2, 20);
    let rm_c1 = remove(carol, &c1, 21);
    u.apply_remote(&rm_a2);
    u.apply_remote(&rm_c1);
    assert!(u.read(carol, |r| r.is_none()));
    tx.records(frames_of(&[&rm_a2, &rm_c1]));
    records(6);
    assert_eq!(row(&store, alice, &a2), None);
    assert_eq!(row(&store, carol, &c1), None);
    assert_eq!(row(&store, alice, &a1), Some(a1.clone()));

    // Current state wins: a newer bob binding is in the table and on disk; then an older
    // upsert's record arrives (a late replicated one): the row stays the newer binding.
    let b1_new = bind("sip:b1@192.0.2.2", "", 0, 6000, 30);
    let b1_old = bind("sip:b1@192.0.2.2", "", 0, 5500, 25);
    let up_new = upsert(bob, &b1_new);
    let up_old = upsert(bob, &b1_old);
    u.apply_remote(&up_new);
    tx.records(frames_of(&[&up_new]));
    records(7);
    assert_eq!(row(&store, bob, &b1), Some(b1_new.clone()));
    u.apply_remote(&up_old); // kept out by last writer wins
    tx.records(frames_of(&[&up_old]));
    // And the first upsert of bob again, from an earlier drain.
    tx.records(frames_of(&[&recs[2]]));
    records(9);
    assert_eq!(row(&store, bob, &b1), Some(b1_new.clone()));
    // A record of a removed binding does not resurrect it.
    tx.records(frames_of(&[&recs[3]]));
    records(10);
    assert_eq!(row(&store, carol, &c1), None);

    let stats = p.stats.clone();
    drop(tx);
    p.stop();
    assert_eq!(stats.records.load(Ordering::Relaxed), 10);
    assert_eq!(stats.errors.load(Ordering::Relaxed), 0);
    assert!(stats.batches.load(Ordering::Relaxed) >= 5);
    assert!(stats.wal_syncs.load(Ordering::Relaxed) >= 1);

    // Reopen: the same bindings as the table.
    assert_eq!(Arc::strong_count(&store), 1);
    drop(store);
    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let fresh = Usrloc::new(0);
    let r = store.load_contacts(&fresh, 1000, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (2, 2, 0));
    assert_eq!(r.newest_version, 30);
    let want = expect(&[(alice, vec![&a1]), (bob, vec![&b1_new])]);
    assert_eq!(table(&u), want);
    assert_eq!(table(&fresh), want);
}

// 6. Write-behind, sync.
#[test]
fn persister_sync_publishes_durable_positions_after_the_write() {
    let tmp = TempDir::new("persist_sync");
    let store = Arc::new(Store::open(tmp.path(), 1, 1).unwrap());
    let u = Arc::new(Usrloc::new(0));
    let gates = vec![DurableShared::new().unwrap(), DurableShared::new().unwrap()];
    let cfg = PersistConfig {
        durability: Durability::Sync,
        flush_ms: 2,
        wal_sync_ms: 20,
    };
    let p = Persister::start(store.clone(), u.clone(), None, cfg, gates.clone()).unwrap();
    assert_eq!(p.durability, Durability::Sync);
    let tx = p.sender();

    let mut written = Vec::new();
    for i in 0..5u64 {
        let aor = format!("user{}@example.com", i % 2);
        let b = bind(&format!("sip:u{i}@192.0.2.9"), "", 0, 9000, 100 + i);
        let rec = upsert(aor.as_bytes(), &b);
        u.apply_remote(&rec);
        tx.records(frames_of(&[&rec]));
        written.push((aor, b));
    }
    // Worker 0 waits for its records, worker 1 does not.
    gates[0].waiting.store(true, Ordering::SeqCst);
    tx.positions(vec![3, 5]);
    wait_until("durable positions", Duration::from_secs(2), || {
        gates[0].durable.load(Ordering::Acquire) == 3
            && gates[1].durable.load(Ordering::Acquire) == 5
    });
    // Published only once written: every row is there.
    for (aor, b) in &written {
        assert_eq!(row(&store, aor.as_bytes(), b).as_ref(), Some(b));
    }
    assert!(p.stats.wal_syncs.load(Ordering::Relaxed) >= 1);
    assert_eq!(p.stats.records.load(Ordering::Relaxed), 5);
    assert_eq!(p.stats.errors.load(Ordering::Relaxed), 0);
    // Only the waiting worker's doorbell was rung (the eventfd's counter, as the kernel
    // reports it).
    for (g, rung) in gates.iter().zip([true, false]) {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", g.doorbell.as_raw_fd()))
            .unwrap();
        let count = info
            .lines()
            .find_map(|l| l.strip_prefix("eventfd-count:"))
            .map(|c| u64::from_str_radix(c.trim(), 16).unwrap());
        if rung {
            assert!(count >= Some(1), "{info}");
        } else {
            assert_eq!(count, Some(0), "{info}");
        }
    }

    // Positions never go backwards.
    tx.positions(vec![1, 1]);
    let stats = p.stats.clone();
    drop(tx);
    p.stop();
    assert_eq!(gates[0].durable.load(Ordering::Acquire), 3);
    assert_eq!(gates[1].durable.load(Ordering::Acquire), 5);
    assert_eq!(stats.records.load(Ordering::Relaxed), 5);

    drop(store);
    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let fresh = Usrloc::new(0);
    let r = store.load_contacts(&fresh, 1000, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (5, 2, 0));
    assert_eq!(r.newest_version, 104);
    assert_eq!(table(&fresh), table(&u));
    assert_eq!(fresh.bindings(), 5);
}

// 7. Statistics and checkpoints.
#[test]
fn stats_name_every_family_and_checkpoints_reopen() {
    let tmp = TempDir::new("checkpoint");
    let store = Store::open(&tmp.join("db"), 1, 1).unwrap();
    let alice: &[u8] = b"alice@example.com";
    let bob: &[u8] = b"bob@example.com";
    let a1 = bind("sip:a1", "", 0, 5000, 1);
    let a2 = bind("sip:a2", "<urn:uuid:a>", 1, 6000, 2);
    let b1 = bind("sip:b1", "", 0, 7000, 3);
    put_rows(&store, &[(alice, &a1), (alice, &a2), (bob, &b1)]);

    let st = store.stats();
    let names: Vec<&str> = st.iter().map(|f| f.name).collect();
    assert_eq!(
        names,
        [
            "contacts",
            "dialogs",
            "presentities",
            "watchers",
            "tag_terms",
            "node"
        ]
    );
    assert_eq!(names, FAMILIES);
    let keys: Vec<u64> = st.iter().map(|f| f.keys).collect();
    assert_eq!(keys, [3, 0, 0, 0, 0, 2]);
    assert!(st[0].memtable_bytes > 0);
    store.compact().unwrap();
    let st = store.stats();
    assert!(st[0].sst_bytes > 0);
    assert_eq!(st[0].keys, 3);

    let cp = tmp.join("cp");
    store.checkpoint(&cp).unwrap();
    // Into an existing directory: refused.
    let existing = tmp.join("existing");
    std::fs::create_dir_all(&existing).unwrap();
    let e = store.checkpoint(&existing).unwrap_err().0;
    assert!(
        e.starts_with(&format!("checkpoint into {}", existing.display())),
        "{e}"
    );
    assert!(store.checkpoint(&cp).is_err());

    // Changes after the checkpoint are not in it.
    put_rows(&store, &[(bob, &bind("sip:b2", "", 0, 7000, 4))]);
    drop(store);

    let e = Store::open(&cp, 2, 1).err().unwrap().0;
    assert!(e.contains("belongs to node 1 of cluster 1"), "{e}");
    let copy = Store::open(&cp, 1, 1).unwrap();
    let u = Usrloc::new(0);
    let r = copy.load_contacts(&u, 0, |_, _| {}).unwrap();
    assert_eq!((r.loaded, r.aors, r.expired), (3, 2, 0));
    assert_eq!(
        table(&u),
        expect(&[(alice, vec![&a1, &a2]), (bob, vec![&b1])])
    );
}

// A replicated upsert (a full-sync snapshot carries no removes) can replace, in the table,
// a binding stored under another key: same instance and reg-id with another Contact, or
// the same Contact without an instance. Recovery must not bring the replaced one back,
// also when the replacing binding is removed later (its remove names only its own key).
#[test]
fn a_binding_replaced_under_another_key_stays_replaced_after_a_restart() {
    let tmp = TempDir::new("replaced_key");
    let store = Arc::new(Store::open(tmp.path(), 1, 1).unwrap());
    let u = Arc::new(Usrloc::new(0));
    let p = Persister::start(store.clone(), u.clone(), None, async_config(), Vec::new()).unwrap();
    let tx = p.sender();
    let stats = p.stats.clone();
    let records = |n| {
        wait_until("records written", Duration::from_secs(5), || {
            stats.records.load(Ordering::Relaxed) == n
        })
    };
    let alice: &[u8] = b"alice@example.com";
    let bob: &[u8] = b"bob@example.com";
    let dave: &[u8] = b"dave@example.com";
    let a_old = bind("sip:a@192.0.2.1;ob", "<urn:uuid:a>", 1, 5000, 10);
    let a_new = bind("sip:a@198.51.100.1;ob", "<urn:uuid:a>", 1, 5000, 20);
    let b_old = bind("sip:b@192.0.2.2", "<urn:uuid:b>", 1, 5000, 11);
    let b_new = bind("sip:b@192.0.2.2", "", 0, 5000, 21);
    let b_other = bind("sip:b2@192.0.2.2", "", 0, 5000, 12);
    let d_old = bind("sip:d@192.0.2.4", "<urn:uuid:d>", 1, 5000, 13);
    let d_new = bind("sip:d@198.51.100.4", "<urn:uuid:d>", 1, 5000, 22);
    let first = [
        upsert(alice, &a_old),
        upsert(bob, &b_old),
        upsert(bob, &b_other),
        upsert(dave, &d_old),
    ];
    for r in &first {
        u.apply_remote(r);
    }
    tx.applied(frames_of(&first.iter().collect::<Vec<_>>()));
    records(4);
    assert_eq!(rows(&store).len(), 4);
    let second = [
        upsert(alice, &a_new),
        upsert(bob, &b_new),
        upsert(dave, &d_new),
    ];
    for r in &second {
        assert_ne!(u.apply_remote(r), sipmesh_cluster::usrloc::Applied::Kept);
    }
    tx.applied(frames_of(&second.iter().collect::<Vec<_>>()));
    records(7);
    // The replaced rows are gone already; the AoR's other binding is left alone.
    assert_eq!(row(&store, alice, &a_old), None);
    assert_eq!(row(&store, bob, &b_old), None);
    assert_eq!(row(&store, dave, &d_old), None);
    assert_eq!(row(&store, bob, &b_other), Some(b_other.clone()));
    assert_eq!(rows(&store).len(), 4);
    let rm = remove(dave, &d_new, 30);
    u.apply_remote(&rm);
    assert!(u.read(dave, |r| r.is_none()));
    tx.applied(frames_of(&[&rm]));
    records(8);
    let want = expect(&[(alice, vec![&a_new]), (bob, vec![&b_new, &b_other])]);
    assert_eq!(table(&u), want);
    drop(tx);
    p.stop();
    drop(store);

    let store = Store::open(tmp.path(), 1, 1).unwrap();
    let fresh = Usrloc::new(0);
    let r = store.load_contacts(&fresh, 1000, |_, _| {}).unwrap();
    assert_eq!(table(&fresh), want);
    assert_eq!((r.loaded, r.aors, r.expired), (3, 2, 0));
    assert_eq!(r.newest_version, 21);
    assert_eq!(rows(&store).len(), 3);
}

// The same, when the replaced binding's row is still in the batch being gathered (not yet
// in the store) as the replacing record arrives: a long batch period makes both records
// land in one batch, the first one processed while the table still held the old binding.
#[test]
fn a_binding_replaced_within_one_batch_is_not_written() {
    let tmp = TempDir::new("replaced_batch");
    let store = Arc::new(Store::open(tmp.path(), 1, 1).unwrap());
    let u = Arc::new(Usrloc::new(0));
    let cfg = PersistConfig {
        durability: Durability::Async,
        flush_ms: 400,
        wal_sync_ms: 1000,
    };
    let p = Persister::start(store.clone(), u.clone(), None, cfg, Vec::new()).unwrap();
    let tx = p.sender();
    let aor: &[u8] = b"erin@example.com";
    let old = bind("sip:e@192.0.2.5;ob", "<urn:uuid:e>", 1, 5000, 10);
    let new = bind("sip:e@198.51.100.5;ob", "<urn:uuid:e>", 1, 5000, 20);
    let up_old = upsert(aor, &old);
    u.apply_remote(&up_old);
    tx.applied(frames_of(&[&up_old]));
    std::thread::sleep(Duration::from_millis(50));
    let up_new = upsert(aor, &new);
    u.apply_remote(&up_new);
    tx.applied(frames_of(&[&up_new]));
    let stats = p.stats.clone();
    drop(tx);
    p.stop();
    assert_eq!(stats.records.load(Ordering::Relaxed), 2);
    assert_eq!(stats.batches.load(Ordering::Relaxed), 1);
    assert_eq!(row(&store, aor, &old), None);
    assert_eq!(row(&store, aor, &new), Some(new.clone()));
    assert_eq!(rows(&store).len(), 1);
}
