//! The keepalive scheduler with virtual time.

use super::*;
use crate::NodeId;
use crate::usrloc::{AorRecord, BindingParts, FLAG_KEEPALIVE, Q_NONE, TRANSPORT_TCP, Update};

const T0: u64 = 1_800_000_000_000;

fn binding(contact: &str, flags: u8, transport: u8) -> Binding {
    Binding::new(BindingParts {
        contact: contact.as_bytes(),
        call_id: b"c",
        path: b"",
        instance: b"",
        user_agent: b"",
        tag: b"",
        expires_at: u32::MAX,
        cseq: 1,
        q: Q_NONE,
        reg_id: 0,
        source: "198.51.100.7:40000".parse().unwrap(),
        transport,
        flags,
        version: 1,
        origin: NodeId(1),
        last_modified: 0,
    })
}

fn table(n: usize) -> (Usrloc, Vec<Arc<[u8]>>) {
    let u = Usrloc::new(n);
    let mut keys = Vec::new();
    for i in 0..n {
        let aor = format!("user{i}@example.com");
        let b = binding(
            &format!("sip:user{i}@10.0.0.1:5060"),
            FLAG_KEEPALIVE,
            TRANSPORT_UDP,
        );
        u.update(aor.as_bytes(), |_| {
            Update::Replace(AorRecord::single(b.clone()), ())
        });
        keys.push(u.key(aor.as_bytes()).unwrap());
    }
    (u, keys)
}

fn settings(interval_ms: u64) -> Settings {
    Settings {
        enabled: true,
        method: PingMethod::Options,
        interval_ms,
        max_misses: 0,
    }
}

/// Runs `s` from `from` to `to` in steps of `step` ms, collecting its orders.
fn run(
    s: &mut Scheduler,
    u: &Usrloc,
    from: u64,
    to: u64,
    step: u64,
    owner: impl Fn(&[u8], usize, u64) -> Option<u16>,
) -> Vec<PingOrder> {
    let mut out = Vec::new();
    let mut t = from;
    while t <= to {
        s.advance(t, u, &owner, |a| {
            if let Action::Ping(o) = a {
                out.push(o);
            }
            true
        });
        t += step;
    }
    out
}

fn all(_: &[u8], _: usize, _: u64) -> Option<u16> {
    Some(0)
}

#[test]
fn every_contact_is_pinged_once_per_interval_spread_evenly() {
    let (u, keys) = table(10_000);
    let acks = Arc::new(Acks::new(20_000, 7));
    let mut s = Scheduler::new(settings(1000), acks);
    for k in &keys {
        s.observe(k);
        s.observe(k);
    }
    let orders = run(&mut s, &u, T0, T0 + 3000, 10, all);
    // Three intervals (the first tick only sets the cursor).
    assert_eq!(orders.len(), 30_000);
    let mut per_uri: HashMap<Vec<u8>, Vec<u64>> = HashMap::new();
    for o in &orders {
        per_uri.entry(o.uri().to_vec()).or_default().push(o.due_ms);
        assert_eq!(o.dest, "198.51.100.7:40000".parse().unwrap());
    }
    assert_eq!(per_uri.len(), 10_000);
    for due in per_uri.values() {
        assert_eq!(due.len(), 3);
        assert!(due.windows(2).all(|w| w[1] - w[0] == 1000), "{due:?}");
    }
    // Spread: every 100 ms of an interval gets about a tenth of the pings.
    let mut tenths = [0u32; 10];
    for o in &orders {
        tenths[((o.due_ms % 1000) / 100) as usize] += 1;
    }
    for n in tenths {
        assert!((2700..3300).contains(&n), "{tenths:?}");
    }
}

#[test]
fn a_hand_over_at_a_boundary_pings_nobody_twice_and_skips_nobody() {
    let (u, keys) = table(5_000);
    let (mut a, mut b) = (
        Scheduler::new(settings(1000), Arc::new(Acks::new(10_000, 1))),
        Scheduler::new(settings(1000), Arc::new(Acks::new(10_000, 2))),
    );
    for k in &keys {
        a.observe(k);
        b.observe(k);
    }
    let boundary = T0 + 1_537;
    // Different tick phases and periods on the two nodes.
    let mut orders = run(&mut a, &u, T0, T0 + 3000, 10, |_, _, due| {
        (due < boundary).then_some(0)
    });
    let from_a = orders.len();
    orders.extend(run(&mut b, &u, T0 + 3, T0 + 3003, 7, |_, _, due| {
        (due >= boundary).then_some(0)
    }));
    assert!(from_a > 0 && from_a < orders.len());
    let mut per_uri: HashMap<Vec<u8>, Vec<u64>> = HashMap::new();
    for o in &orders {
        per_uri.entry(o.uri().to_vec()).or_default().push(o.due_ms);
    }
    for due in per_uri.values_mut() {
        due.sort();
        assert!(due.windows(2).all(|w| w[1] - w[0] == 1000), "{due:?}");
        assert!(due.len() >= 2);
    }
}

#[test]
fn unanswered_options_pings_remove_the_binding_answered_ones_do_not() {
    let (u, keys) = table(2);
    let acks = Arc::new(Acks::new(16, 99));
    let mut s = Scheduler::new(
        Settings {
            max_misses: 2,
            ..settings(1000)
        },
        acks.clone(),
    );
    for k in &keys {
        s.observe(k);
    }
    let mut removed = Vec::new();
    let mut t = T0;
    for _ in 0..500 {
        s.advance(t, &u, all, |a| {
            match a {
                // user0 answers every ping, user1 none.
                Action::Ping(o) if o.uri().starts_with(b"sip:user0@") => {
                    let mut br = [0u8; 64];
                    let n = acks.branch(o.ack_slot, o.ping_id, &mut br);
                    assert!(acks.on_reply(&br[..n]));
                }
                Action::Ping(_) => {}
                Action::Remove { aor, keys } => {
                    removed.push((
                        aor.clone(),
                        keys,
                        u.read(&aor, |r| r.unwrap().bindings()[0].clone()),
                    ));
                    u.update(&aor, |_| Update::<()>::Remove(()));
                }
            }
            true
        });
        t += 10;
    }
    // Pinged at ~1 s, missed at ~2 s and ~3 s: removed at the third due time.
    assert_eq!(removed.len(), 1);
    assert_eq!(&*removed[0].0, b"user1@example.com");
    assert_eq!(removed[0].1, vec![contact_key(&removed[0].2)]);
    let st = s.stats();
    assert_eq!((st.removed, st.missed), (1, 2));
    // The removed contact's slot is free again, its stale answers do not count.
    assert_eq!(st.tracked, 1);
}

#[test]
fn branches_are_authenticated_and_stale_generations_ignored() {
    let acks = Acks::new(4, 1234);
    let mut br = [0u8; 64];
    let n = acks.branch(3, 1 << 32 | 5, &mut br);
    let b = br[..n].to_vec();
    assert!(b.starts_with(BRANCH_PREFIX));
    assert!(acks.on_reply(&b));
    assert!(acks.answered(3, 1 << 32 | 5) && !acks.answered(3, 1 << 32 | 6));
    // Another key (another process) or a changed field: refused.
    assert!(!Acks::new(4, 999).on_reply(&b));
    let mut forged = b.clone();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    assert!(!acks.on_reply(&forged));
    assert!(!acks.on_reply(b"z9hG4bK.ka.3.zz.1"));
    assert!(!acks.on_reply(b"z9hG4bKother"));
    // Out of range slot.
    let n = acks.branch(9, 1, &mut br);
    assert!(!acks.on_reply(&br[..n]));
    // A new generation of slot 3: answers to the old one do not count.
    acks.reset(3, 2);
    assert!(acks.on_reply(&b));
    assert!(!acks.answered(3, 2 << 32 | 1));
}

#[test]
fn only_udp_keepalive_bindings_are_pinged_and_others_leave_the_wheel() {
    let u = Usrloc::new(4);
    let put = |aor: &str, b: Binding| {
        u.update(aor.as_bytes(), |_| {
            Update::Replace(AorRecord::single(b.clone()), ())
        });
        u.key(aor.as_bytes()).unwrap()
    };
    let k1 = put(
        "a@x",
        binding("sip:a@10.0.0.1", FLAG_KEEPALIVE, TRANSPORT_UDP),
    );
    let k2 = put("b@x", binding("sip:b@10.0.0.1", 0, TRANSPORT_UDP));
    let k3 = put(
        "c@x",
        binding("sip:c@10.0.0.1", FLAG_KEEPALIVE, TRANSPORT_TCP),
    );
    let mut s = Scheduler::new(settings(500), Arc::new(Acks::new(4, 1)));
    for k in [&k1, &k2, &k3] {
        s.observe(k);
    }
    assert_eq!(s.stats().aors, 3);
    let orders = run(&mut s, &u, T0, T0 + 1000, 10, all);
    assert!(orders.iter().all(|o| o.uri() == b"sip:a@10.0.0.1"));
    assert_eq!(orders.len(), 2);
    assert_eq!(s.stats().aors, 1);
    // Unregistered: it leaves at its next due time.
    u.update(b"a@x", |_| Update::<()>::Remove(()));
    assert!(run(&mut s, &u, T0 + 1010, T0 + 2000, 10, all).is_empty());
    assert_eq!(s.stats().aors, 0);
}

#[test]
fn runtime_interval_and_disable() {
    let (u, keys) = table(100);
    let mut s = Scheduler::new(settings(1000), Arc::new(Acks::new(200, 1)));
    for k in &keys {
        s.observe(k);
    }
    assert_eq!(run(&mut s, &u, T0, T0 + 1000, 10, all).len(), 100);
    s.set(settings(250));
    assert_eq!(run(&mut s, &u, T0 + 1010, T0 + 2000, 10, all).len(), 400);
    s.set(Settings {
        enabled: false,
        ..settings(250)
    });
    assert!(run(&mut s, &u, T0 + 2010, T0 + 3000, 10, all).is_empty());
    s.set(settings(250));
    // Resumes from the moment it is enabled, without a burst for the pause.
    assert_eq!(run(&mut s, &u, T0 + 5000, T0 + 5250, 10, all).len(), 100);
}

#[test]
fn a_long_contact_uri_is_pinged_at_its_source_address() {
    let long = format!("sip:{}@10.0.0.1", "x".repeat(PING_URI_MAX));
    let b = binding(&long, FLAG_KEEPALIVE, TRANSPORT_UDP);
    let o = PingOrder::new(&b, 0, (0, 0), 0, 0, PingMethod::Options);
    assert_eq!(o.uri(), b"sip:198.51.100.7:40000");
}
