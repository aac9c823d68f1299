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
    let (alice, bob) = (Phone::new(), Phone::new());
    let reg = register(
        bob.addr,
        "UDP",
        "bob",
        "bob-reg",
        1,
        &[&format!("Contact: <sip:bob@{}>", bob.addr), "Expires: 3600"],
    );
    bob.send(sipd.addr, &reg);
    bob.expect("SIP/2.0 200");

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
