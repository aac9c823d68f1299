//! Matching (RFC 3261 §17.1.3, §17.2.3), our branches, and the table's timers.

use super::*;
use crate::txn::{Action, Kind, Reliability, TimerConfig};
use sip_wire::{Framing, Message};

fn req(method: &str, via: &str, cseq: &str, to_tag: &str) -> String {
    format!(
        "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {via}\r\nMax-Forwards: 70\r\n\
         From: <sip:alice@example.com>;tag=f1\r\nTo: <sip:bob@example.com>{to_tag}\r\n\
         Call-ID: c1@host\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n"
    )
}

fn key(k: &Keys, m: &str) -> TxKey {
    let msg = Message::parse(m.as_bytes(), Framing::Datagram).unwrap();
    let c = msg.check_request().unwrap();
    k.server_key(&c)
}

#[test]
fn server_matching_follows_17_2_3() {
    let k = Keys::new();
    let via = "192.0.2.1:5060;branch=z9hG4bKabc";
    let invite = key(&k, &req("INVITE", via, "1 INVITE", ""));
    // A retransmission matches; so does the ACK of a non-2xx (method ACK counts as
    // INVITE), whatever To tag the ACK carries.
    assert_eq!(invite, key(&k, &req("INVITE", via, "1 INVITE", "")));
    assert_eq!(invite, key(&k, &req("ACK", via, "1 ACK", ";tag=t9")));
    // The sent-by host is compared without case, and the port defaults to 5060.
    assert_eq!(
        invite,
        key(
            &k,
            &req("INVITE", "192.0.2.1;branch=z9hG4bKabc", "1 INVITE", "")
        )
    );
    let host = key(
        &k,
        &req(
            "INVITE",
            "Host.Example:5060;branch=z9hG4bKabc",
            "1 INVITE",
            "",
        ),
    );
    assert_eq!(
        host,
        key(
            &k,
            &req("INVITE", "host.example;branch=z9hG4bKabc", "1 INVITE", "")
        )
    );
    // CANCEL is a transaction of its own, with the same branch.
    assert_ne!(invite, key(&k, &req("CANCEL", via, "1 CANCEL", "")));
    // Another branch or another sent-by: another transaction.
    assert_ne!(
        invite,
        key(
            &k,
            &req("INVITE", "192.0.2.1:5060;branch=z9hG4bKabd", "1 INVITE", "")
        )
    );
    assert_ne!(
        invite,
        key(
            &k,
            &req("INVITE", "192.0.2.2:5060;branch=z9hG4bKabc", "1 INVITE", "")
        )
    );
    // Another process's keys give other hashes (they are never compared across nodes).
    assert_ne!(
        invite,
        key(&Keys::new(), &req("INVITE", via, "1 INVITE", ""))
    );
}

#[test]
fn rfc2543_requests_match_on_the_old_fields() {
    let k = Keys::new();
    let via = "192.0.2.1:5060;branch=old1";
    let invite = key(&k, &req("INVITE", via, "7 INVITE", ""));
    assert_eq!(invite, key(&k, &req("INVITE", via, "7 INVITE", "")));
    // The ACK carries the To tag of our response: it still matches the INVITE.
    assert_eq!(invite, key(&k, &req("ACK", via, "7 ACK", ";tag=ours")));
    assert_ne!(invite, key(&k, &req("INVITE", via, "8 INVITE", "")));
    // No branch at all.
    let nb = key(&k, &req("OPTIONS", "192.0.2.1:5060", "1 OPTIONS", ""));
    assert_eq!(
        nb,
        key(&k, &req("OPTIONS", "192.0.2.1:5060", "1 OPTIONS", ""))
    );
    assert_ne!(
        nb,
        key(&k, &req("OPTIONS", "192.0.2.1:5060", "1 OPTIONS", ";tag=x"))
    );
}

#[test]
fn our_branches_name_node_worker_and_slot_and_resist_forgery() {
    let k = Keys::new();
    let b = BranchId {
        node: 3,
        worker: 1,
        id: TxId {
            slot: 77,
            generation: 9,
        },
    };
    let mut buf = [0u8; 48];
    let n = k.branch(b, &mut buf);
    let s = &buf[..n];
    assert!(s.starts_with(MAGIC), "RFC 3261 §8.1.1.7 magic cookie");
    assert_eq!(k.parse_branch(s), Some(b));
    // Any changed digit, another process's key, someone else's branch: not ours.
    let mut bad = s.to_vec();
    bad[12] = if bad[12] == b'0' { b'1' } else { b'0' };
    assert_eq!(k.parse_branch(&bad), None);
    assert_eq!(Keys::new().parse_branch(s), None);
    assert_eq!(k.parse_branch(b"z9hG4bKabc"), None);
    assert_eq!(k.parse_branch(&s[..n - 1]), None);
}

const CFG: TimerConfig = TimerConfig {
    t1: 500,
    t2: 4000,
    t4: 5000,
    timer_c: 181_000,
};

#[test]
fn the_table_fires_timers_removes_ended_transactions_and_rejects_stale_ids() {
    let k = Keys::new();
    let mut t: TxTable<&'static str> = TxTable::new(1000, 16);
    // A client INVITE over UDP: retransmissions at 1.5, 2.5, 4.5 s...
    let (txn, _) = Transaction::client(Kind::Invite, Reliability::Unreliable, CFG, false, 1000);
    let c = t.insert_client(b"INVITE", txn, "call");
    // A server non-INVITE answered at once over UDP: timer J (32 s) ends it.
    let sk = key(
        &k,
        &req("OPTIONS", "192.0.2.1;branch=z9hG4bKo", "1 OPTIONS", ""),
    );
    let (txn, _) = Transaction::server(Kind::NonInvite, Reliability::Unreliable, CFG);
    let s = t.insert_server(sk, txn, "options");
    let (a, gone) = t.event(s, Event::Send(200), 1000);
    assert_eq!(a.iter().collect::<Vec<_>>(), vec![Action::SendResponse]);
    assert!(gone.is_none());
    assert_eq!(t.find_server(sk), Some(s));
    assert_eq!(t.len(), 2);

    let mut fired = Vec::new();
    let mut now = 1000;
    while now <= 40_000 {
        t.advance(now, |id, a, v| {
            for x in a.iter() {
                fired.push((now, id, x, v.is_err()));
            }
        });
        now += 10;
    }
    let resends: Vec<u64> = fired
        .iter()
        .filter(|f| f.1 == c && f.2 == Action::SendRequest)
        .map(|f| f.0)
        .collect();
    assert_eq!(resends, vec![1500, 2500, 4500, 8500, 16_500, 32_500]);
    assert!(fired.contains(&(
        33_000,
        c,
        Action::TimedOut(Some(crate::txn::Timer::B)),
        true
    )));
    assert!(fired.contains(&(33_000, s, Action::Terminated, true)));
    assert!(t.is_empty());
    assert_eq!(t.find_server(sk), None);
    // Stale ids find nothing, even once the slot is reused.
    let (txn, _) = Transaction::client(Kind::NonInvite, Reliability::Reliable, CFG, false, now);
    let c2 = t.insert_client(b"BYE", txn, "bye");
    assert!(
        c2.slot == c.slot || c2.slot == s.slot,
        "a freed slot is reused"
    );
    assert!(t.get_mut(c).is_none() && t.get_mut(s).is_none());
    assert_eq!(t.find_client(c, b"INVITE"), None);
    // A response to c2 must carry its method in CSeq.
    assert_eq!(t.find_client(c2, b"BYE"), Some(c2));
    assert_eq!(t.find_client(c2, b"CANCEL"), None);
    let (a, v) = t.event(c2, Event::Response(200), now);
    assert_eq!(a.iter().collect::<Vec<_>>(), vec![Action::Pass(200)]);
    // Reliable: timer K is zero, the next tick ends it.
    assert!(v.is_none());
    let mut ended = None;
    t.advance(now, |_, _, v| ended = v.err());
    assert_eq!(ended, Some("bye"));
    assert!(t.is_empty());
}

#[test]
fn a_moved_deadline_is_rescheduled_not_fired_early() {
    let mut t: TxTable<()> = TxTable::new(0, 4);
    let (txn, _) = Transaction::client(Kind::NonInvite, Reliability::Unreliable, CFG, false, 0);
    let c = t.insert_client(b"MESSAGE", txn, ());
    // A final response at 100 ms: timer E (500) is gone, timer K (5.1 s) runs.
    t.event(c, Event::Response(202), 100);
    let mut fired = Vec::new();
    for now in (0..=6000).step_by(10) {
        t.advance(now, |_, a, _| {
            for x in a.iter() {
                fired.push((now, x));
            }
        });
    }
    assert_eq!(fired, vec![(5100, Action::Terminated)]);
}
