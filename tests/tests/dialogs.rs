//! Calls ended from the middle, on a running `sipd`, with two UDP sockets for the two
//! phones: `sipctl dialog end ID` and the dialog lifetime limit each send a BYE to both
//! sides and write the call's CDR.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use sipmesh_tests::*;

struct Phone {
    sock: UdpSocket,
    addr: SocketAddr,
}

impl Phone {
    fn new() -> Phone {
        let sock = UdpSocket::bind((client_ip(), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = sock.local_addr().unwrap();
        Phone { sock, addr }
    }

    fn send(&self, to: SocketAddr, m: &str) {
        self.sock.send_to(m.as_bytes(), to).unwrap();
    }

    /// The next message that starts with `start` (others are skipped: 100 Trying ...).
    fn expect(&self, start: &str) -> String {
        let mut buf = [0u8; 65_535];
        loop {
            let (n, _) = self
                .sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for {start}: {e}"));
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.starts_with(start) {
                return m;
            }
        }
    }
}

fn header<'a>(m: &'a str, name: &str) -> Vec<&'a str> {
    m.split("\r\n")
        .filter_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
        .collect()
}

/// A 2xx (or other) answer to request `req`, copying what RFC 3261 §8.2.6.2 and §12.1.1
/// say to copy.
fn answer(req: &str, status: &str, to_tag: &str, contact: Option<SocketAddr>) -> String {
    let mut r = format!("SIP/2.0 {status}\r\n");
    for h in ["Via", "Record-Route", "From", "Call-ID", "CSeq"] {
        for v in header(req, h) {
            r.push_str(&format!("{h}: {v}\r\n"));
        }
    }
    let to = header(req, "To")[0];
    if to.contains(";tag=") || to_tag.is_empty() {
        r.push_str(&format!("To: {to}\r\n"));
    } else {
        r.push_str(&format!("To: {to};tag={to_tag}\r\n"));
    }
    if let Some(c) = contact {
        r.push_str(&format!("Contact: <sip:bob@{c}>\r\n"));
    }
    r + "Content-Length: 0\r\n\r\n"
}

/// Sets up a confirmed call alice → bob through `sipd`; returns the Call-ID.
fn call(sipd: &Sipd, alice: &Phone, bob: &Phone, n: u32) -> String {
    let call_id = format!("end-{n}@test");
    let invite = format!(
        "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKinv{n}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=al{n}\r\nTo: <sip:bob@example.com>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{a}>\r\nContent-Length: 0\r\n\r\n",
        a = alice.addr
    );
    alice.send(sipd.addr, &invite);
    let inv = bob.expect("INVITE ");
    bob.send(
        sipd.addr,
        &answer(&inv, "200 OK", &format!("bo{n}"), Some(bob.addr)),
    );
    let ok = alice.expect("SIP/2.0 200");
    // The ACK follows the route set (our Record-Route) to bob's Contact.
    let rr = header(&ok, "Record-Route").join(", ");
    let ack = format!(
        "ACK sip:bob@{b} SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKack{n}\r\n\
         Route: {rr}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=al{n}\r\n\
         To: <sip:bob@example.com>;tag=bo{n}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        a = alice.addr,
        b = bob.addr
    );
    alice.send(sipd.addr, &ack);
    bob.expect("ACK ");
    call_id
}

/// Alice, and Bob registered with the node at `registrar`.
fn phones(registrar: SocketAddr) -> (Phone, Phone) {
    let (alice, bob) = (Phone::new(), Phone::new());
    let contact = format!("Contact: <sip:bob@{}>", bob.addr);
    let reg = register(
        bob.addr,
        "UDP",
        "bob",
        "bob-reg",
        1,
        &[&contact, "Expires: 3600"],
    );
    bob.send(registrar, &reg);
    bob.expect("SIP/2.0 200");
    (alice, bob)
}

fn cdrs(sipd: &Sipd, n: usize) -> Vec<serde_json::Value> {
    wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&sipd.cdr_file).unwrap_or_default();
        (text.lines().count() >= n).then(|| {
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        })
    })
    .expect("CDRs")
}

#[test]
fn an_operator_and_the_lifetime_limit_end_calls_with_a_bye_to_each_side() {
    let config = format!("{TEST_CONFIG}\n[dialog]\nlifetime_s = 3\n");
    let sipd = Sipd::start(&config, &[]);
    let (alice, bob) = phones(sipd.addr);

    // 1. The operator ends the call.
    let call_id = call(&sipd, &alice, &bob, 1);
    let list = sipd.sipctl_json(&["dialog", "list"]);
    assert_eq!(list["total"], 1, "{list}");
    let d = &list["dialogs"][0];
    assert_eq!(d["state"], "confirmed");
    assert_eq!(d["call_id"], call_id.as_str());
    let id = d["id"].as_str().unwrap().to_string();
    let shown = sipd.sipctl_json(&["dialog", "show", &id]);
    assert_eq!(shown["to_tag"], "bo1");
    // Dialog profiles count it (the default ones: calls, caller, callee).
    assert_eq!(sipd.sipctl_json(&["profile", "get", "calls"])["total"], 1);
    let by_caller = sipd.sipctl_json(&["profile", "get", "caller"]);
    assert_eq!(by_caller["counts"][0]["value"], "alice", "{by_caller}");
    assert_eq!(
        sipd.sipctl_json(&["profile", "get", "callee", "bob"])["total"],
        1
    );
    assert_eq!(
        sipd.sipctl_json(&["profile", "get", "callee", "carol"])["total"],
        0
    );
    assert!(sipd.sipctl(&["profile", "get", "nope"]).is_err());
    let out = sipd.sipctl(&["dialog", "end", &id]).unwrap();
    assert!(out.contains("a BYE goes to each side"), "{out}");
    let to_bob = bob.expect("BYE ");
    let to_alice = alice.expect("BYE ");
    assert!(to_bob.starts_with(&format!("BYE sip:bob@{} SIP/2.0\r\n", bob.addr)));
    assert_eq!(
        header(&to_bob, "From"),
        vec!["<sip:alice@example.com>;tag=al1"]
    );
    assert!(to_alice.starts_with(&format!("BYE sip:alice@{} SIP/2.0\r\n", alice.addr)));
    assert_eq!(
        header(&to_alice, "From"),
        vec!["<sip:bob@example.com>;tag=bo1"]
    );
    bob.send(sipd.addr, &answer(&to_bob, "200 OK", "", None));
    alice.send(sipd.addr, &answer(&to_alice, "200 OK", "", None));
    let v = cdrs(&sipd, 1);
    assert_eq!(v[0]["end_reason"], "admin");
    assert_eq!(v[0]["hung_up_by"], "proxy");
    assert_eq!(v[0]["call_id"], call_id.as_str());
    assert_eq!(sipd.sipctl_json(&["dialog", "list"])["total"], 0);
    assert_eq!(sipd.sipctl_json(&["profile", "get", "calls"])["total"], 0);
    assert!(sipd.sipctl(&["dialog", "end", &id]).is_err(), "gone");

    // 2. The lifetime limit (3 s) ends the next one.
    let call_id = call(&sipd, &alice, &bob, 2);
    let to_bob = bob.expect("BYE ");
    let to_alice = alice.expect("BYE ");
    assert!(to_bob.contains(&format!("Call-ID: {call_id}")));
    assert!(to_alice.contains(&format!("Call-ID: {call_id}")));
    bob.send(sipd.addr, &answer(&to_bob, "200 OK", "", None));
    alice.send(sipd.addr, &answer(&to_alice, "200 OK", "", None));
    let v = cdrs(&sipd, 2);
    assert_eq!(v[1]["end_reason"], "lifetime");
    let dur = v[1]["duration_ms"].as_u64().unwrap();
    assert!(
        (3000..5500).contains(&dur),
        "ended {dur} ms after the answer"
    );
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn dialogs_replicate_and_a_peer_ends_a_call_after_its_node_died() {
    let n1 = Sipd::start(TEST_CONFIG, &["--node-id", "1"]);
    let j1 = n1.grpc.to_string();
    let mut n2 = Sipd::start(TEST_CONFIG, &["--node-id", "2", "--join", &j1]);
    assert!(
        wait_for(Duration::from_secs(15), || (n2.usrloc_status()["state"]
            == "synced")
            .then_some(()))
        .is_some()
    );
    let (alice, bob) = phones(n1.addr);

    // A call through node 1 ends with a BYE: node 2 saw it come and go, and exactly one
    // node wrote its CDR (the one acting on its bucket).
    let call_id = call(&n1, &alice, &bob, 1);
    let seen = wait_for(Duration::from_secs(5), || {
        let d = n2.sipctl_json(&["dialog", "list"]);
        (d["total"] == 1 && d["dialogs"][0]["state"] == "confirmed").then_some(d)
    })
    .expect("node 2 holds the replicated dialog");
    assert_eq!(seen["dialogs"][0]["call_id"], call_id.as_str());
    assert_eq!(seen["dialogs"][0]["origin"], 1);
    assert_eq!(n2.sipctl_json(&["profile", "get", "calls"])["total"], 1);
    let bye = format!(
        "BYE sip:bob@{b} SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKbye1\r\n\
         Route: <sip:{p};lr>\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=al1\r\n\
         To: <sip:bob@example.com>;tag=bo1\r\nCall-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        a = alice.addr,
        b = bob.addr,
        p = n1.addr
    );
    alice.send(n1.addr, &bye);
    let fbye = bob.expect("BYE ");
    bob.send(n1.addr, &answer(&fbye, "200 OK", "", None));
    alice.expect("SIP/2.0 200");
    assert!(
        wait_for(Duration::from_secs(5), || (n2
            .sipctl_json(&["dialog", "list"])["total"]
            == 0)
            .then_some(()))
        .is_some(),
        "the end is replicated"
    );
    assert_eq!(n2.sipctl_json(&["profile", "get", "calls"])["total"], 0);
    assert!(
        wait_for(Duration::from_secs(5), || (lines(&n1.cdr_file)
            + lines(&n2.cdr_file)
            == 1)
            .then_some(()))
        .is_some()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lines(&n1.cdr_file) + lines(&n2.cdr_file),
        1,
        "one CDR, not two"
    );

    // Another call through node 1; node 1 dies; node 2 ends the call from its replica:
    // a BYE to each phone from node 2, and the CDR there.
    let call_id = call(&n1, &alice, &bob, 2);
    let id = wait_for(Duration::from_secs(5), || {
        let d = n2.sipctl_json(&["dialog", "list"]);
        (d["total"] == 1 && d["dialogs"][0]["state"] == "confirmed")
            .then(|| d["dialogs"][0]["id"].as_str().unwrap().to_string())
    })
    .expect("replicated");
    // A node that joins now learns the live call from its full sync.
    let n3 = Sipd::start(TEST_CONFIG, &["--node-id", "3", "--join", &j1]);
    let synced = wait_for(Duration::from_secs(15), || {
        let d = n3.sipctl_json(&["dialog", "list"]);
        (n3.usrloc_status()["state"] == "synced" && d["total"] == 1).then_some(d)
    })
    .expect("node 3 synced with the live call");
    assert_eq!(synced["dialogs"][0]["call_id"], call_id.as_str());
    assert_eq!(n3.sipctl_json(&["profile", "get", "calls"])["total"], 1);
    drop(n3);
    let mut n1 = n1;
    n1.kill9();
    assert!(
        wait_for(Duration::from_secs(5), || (n2.sipctl_json(&["ownership"])
            ["buckets_mine"]
            == 1024)
            .then_some(()))
        .is_some(),
        "node 2 acts on everything once node 1 is gone"
    );
    let before = lines(&n2.cdr_file);
    n2.sipctl(&["dialog", "end", &id]).unwrap();
    let mut buf = [0u8; 65_535];
    for phone in [&bob, &alice] {
        let (k, from) = phone.sock.recv_from(&mut buf).expect("a BYE from node 2");
        let m = String::from_utf8_lossy(&buf[..k]);
        assert!(m.starts_with("BYE "), "{m}");
        assert!(m.contains(&format!("Call-ID: {call_id}")));
        assert_eq!(from, n2.addr, "sent by the surviving node");
    }
    let v = wait_for(Duration::from_secs(5), || {
        (lines(&n2.cdr_file) > before).then(|| std::fs::read_to_string(&n2.cdr_file).unwrap())
    })
    .expect("node 2 wrote the CDR");
    let last: serde_json::Value = serde_json::from_str(v.lines().last().unwrap()).unwrap();
    assert_eq!(last["call_id"], call_id.as_str());
    assert_eq!(last["end_reason"], "admin");
    assert_eq!(last["node"], 2);
    assert!(n2.alive());
}
