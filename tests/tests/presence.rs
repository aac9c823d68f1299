//! The presence server on running `sipd` processes: SIPp publishes and subscribes with
//! the bundled profiles (every call must succeed); a watcher socket hears publications
//! and `sipctl presence` shows them; in a two-node cluster every watcher hears of a
//! publication exactly once, from the node that acts on it.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use sipmesh_tests::*;

fn sipp(sipd: &Sipd, profile: &str, service: &str, calls: u32, port: u16) -> std::process::Output {
    let profile = repo_root().join("perf/profiles").join(profile);
    let local = client_ip().to_string();
    // Bounded in count (-m) and time (-timeout); loopback only.
    Command::new("sipp")
        .arg(sipd.addr.to_string())
        .args(["-sf", profile.to_str().unwrap(), "-s", service])
        .args(["-i", &local, "-p", &port.to_string()])
        .args(["-m", &calls.to_string(), "-r", "500", "-l", "500"])
        .args(["-timeout", "60s", "-timeout_error", "-nostdin"])
        .output()
        .expect("sipp is installed (Debian package sip-tester; tests/run.sh installs it)")
}

#[test]
fn sipp_publishes_and_watches_with_no_failure() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    assert_sipp_ok(
        &sipp(&sipd, "presence-publish.xml", "x", 1000, 5070),
        "publisher",
    );
    assert_sipp_ok(
        &sipp(&sipd, "presence-subscribe.xml", "alice", 1000, 5072),
        "watcher",
    );
    assert_sipp_ok(&sipp(&sipd, "mixed.xml", "alice", 500, 5074), "mixed");
    // Every publication was removed and every subscription ended.
    let l = sipd.sipctl_json(&["presence", "list"]);
    assert_eq!(l["presentities"], 0, "{l}");
    assert_eq!(l["watchers"], 0, "{l}");
    assert_eq!(sipd.stop(), Some(0));
}

/// A UDP endpoint: a watcher (it answers every NOTIFY with 200) or a publisher.
struct Endpoint {
    sock: UdpSocket,
    addr: SocketAddr,
}

impl Endpoint {
    fn new() -> Endpoint {
        let sock = UdpSocket::bind((client_ip(), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        Endpoint { sock, addr }
    }

    fn send(&self, to: SocketAddr, m: &str) {
        self.sock.send_to(m.as_bytes(), to).unwrap();
    }

    /// Messages received within `t` (NOTIFYs answered with 200 as they come), with
    /// their senders.
    fn collect(&self, t: Duration) -> Vec<(SocketAddr, String)> {
        let mut v = Vec::new();
        let mut buf = [0u8; 65_535];
        let end = Instant::now() + t;
        while Instant::now() < end {
            if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if m.starts_with("NOTIFY ") {
                    self.send(from, &ok(&m));
                }
                v.push((from, m));
            }
        }
        v
    }
}

fn ok(req: &str) -> String {
    let mut r = "SIP/2.0 200 OK\r\n".to_string();
    for l in req.split("\r\n").skip(1) {
        if ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
            .iter()
            .any(|p| l.starts_with(p))
        {
            r.push_str(l);
            r.push_str("\r\n");
        }
    }
    r + "Content-Length: 0\r\n\r\n"
}

fn subscribe(w: &Endpoint, call: &str) -> String {
    format!(
        "SUBSCRIBE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bK{call}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:{call}@example.com>;tag=t-{call}\r\nTo: <sip:alice@example.com>\r\n\
         Call-ID: {call}\r\nCSeq: 1 SUBSCRIBE\r\nContact: <sip:{call}@{a}>\r\nEvent: presence\r\n\
         Expires: 600\r\nContent-Length: 0\r\n\r\n",
        a = w.addr
    )
}

fn publish(p: &Endpoint, n: u32, basic: &str) -> String {
    let body = format!(
        "<?xml version=\"1.0\"?><presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
         entity=\"sip:alice@example.com\"><tuple id=\"t{n}\"><status><basic>{basic}</basic>\
         </status></tuple></presence>"
    );
    format!(
        "PUBLISH sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {a};rport;branch=z9hG4bKpub{n}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=p{n}\r\nTo: <sip:alice@example.com>\r\n\
         Call-ID: pub-{n}\r\nCSeq: 1 PUBLISH\r\nEvent: presence\r\nExpires: 600\r\n\
         Content-Type: application/pidf+xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        a = p.addr
    )
}

fn call_id(m: &str) -> String {
    header_values(m, "Call-ID")[0].to_string()
}

#[test]
fn a_watcher_hears_a_publication_and_sipctl_shows_both() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let (w, p) = (Endpoint::new(), Endpoint::new());
    w.send(sipd.addr, &subscribe(&w, "watch-1"));
    let got = w.collect(Duration::from_millis(600));
    assert!(
        got.iter().any(|(_, m)| m.starts_with("SIP/2.0 200")),
        "{got:?}"
    );
    let first = got.iter().find(|(_, m)| m.starts_with("NOTIFY ")).unwrap();
    assert!(
        first.1.contains("<basic>closed</basic>"),
        "offline: {}",
        first.1
    );
    p.send(sipd.addr, &publish(&p, 1, "open"));
    let got = w.collect(Duration::from_millis(600));
    let n: Vec<_> = got
        .iter()
        .filter(|(_, m)| m.starts_with("NOTIFY "))
        .collect();
    assert_eq!(n.len(), 1, "{got:?}");
    assert!(n[0].1.contains("<basic>open</basic>"), "{}", n[0].1);
    let show = sipd.sipctl_json(&["presence", "show", "sip:alice@example.com"]);
    assert!(
        show["document"].as_str().unwrap().contains("open"),
        "{show}"
    );
    assert_eq!(
        show["publications"][0]["publications"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let watchers = sipd.sipctl_json(&["presence", "watchers", "sip:alice@example.com"]);
    assert_eq!(
        watchers[0]["watcher"], "sip:watch-1@example.com",
        "{watchers}"
    );
    assert_eq!(watchers[0]["event"], "presence");
    assert_eq!(sipd.stop(), Some(0));
}

#[test]
fn in_a_cluster_each_watcher_hears_a_publication_once() {
    let n1 = Sipd::start(TEST_CONFIG, &["--node-id", "1"]);
    let j1 = n1.grpc.to_string();
    let n2 = Sipd::start(TEST_CONFIG, &["--node-id", "2", "--join", &j1]);
    assert!(
        wait_for(Duration::from_secs(15), || (n2.usrloc_status()["state"]
            == "synced")
            .then_some(()))
        .is_some()
    );
    // 40 subscriptions taken by node 1 (their immediate NOTIFYs come from it).
    let w = Endpoint::new();
    for i in 0..40 {
        w.send(n1.addr, &subscribe(&w, &format!("cw-{i}")));
    }
    let got = w.collect(Duration::from_secs(1));
    let initial = got.iter().filter(|(_, m)| m.starts_with("NOTIFY ")).count();
    assert_eq!(initial, 40, "{got:?}");
    // Node 2 holds them too (replicated).
    assert!(
        wait_for(Duration::from_secs(5), || (n2
            .sipctl_json(&["presence", "list"])["watchers"]
            == 40)
            .then_some(()))
        .is_some()
    );
    // A publication through node 2: each subscription hears it once, from the node
    // that acts on its bucket.
    let p = Endpoint::new();
    p.send(n2.addr, &publish(&p, 1, "open"));
    let got = w.collect(Duration::from_secs(2));
    let mut per: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    for (from, m) in got.iter().filter(|(_, m)| m.starts_with("NOTIFY ")) {
        assert!(m.contains("<basic>open</basic>"), "{m}");
        per.entry(call_id(m)).or_default().push(*from);
    }
    assert_eq!(per.len(), 40, "every watcher heard it: {per:?}");
    assert!(per.values().all(|v| v.len() == 1), "once each: {per:?}");
    let senders: std::collections::HashSet<_> = per.values().map(|v| v[0]).collect();
    assert_eq!(
        senders.len(),
        2,
        "both nodes act on some watchers: {senders:?}"
    );
    assert_eq!(n2.stop(), Some(0));
    assert_eq!(n1.stop(), Some(0));
}

#[test]
fn publications_and_watchers_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("sipmesh-presence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    let a = SocketAddr::new(own_ip().into(), 7201);
    let n = Sipd::start_on(a, TEST_CONFIG, &["--data-dir", &d]);
    let (w, p) = (Endpoint::new(), Endpoint::new());
    w.send(a, &subscribe(&w, "keep-1"));
    let got = w.collect(Duration::from_millis(600));
    assert!(got.iter().any(|(_, m)| m.starts_with("NOTIFY ")), "{got:?}");
    p.send(a, &publish(&p, 1, "open"));
    let got = w.collect(Duration::from_millis(600));
    assert!(
        got.iter().any(|(_, m)| m.contains("<basic>open</basic>")),
        "{got:?}"
    );
    assert_eq!(n.stop(), Some(0));
    // Back from the store: the publication and the subscription.
    let n = Sipd::start_on(a, TEST_CONFIG, &["--data-dir", &d]);
    let err = n.stderr.lock().unwrap().clone();
    assert!(
        err.contains("recovery: 1 publications and 1 watchers loaded"),
        "{err}"
    );
    let show = n.sipctl_json(&["presence", "show", "sip:alice@example.com"]);
    assert!(
        show["document"].as_str().unwrap().contains("open"),
        "{show}"
    );
    // A second device publishes: the watcher of before the restart hears both tuples.
    p.send(a, &publish(&p, 2, "closed"));
    let got = w.collect(Duration::from_millis(600));
    let notify = got
        .iter()
        .find(|(_, m)| m.starts_with("NOTIFY "))
        .unwrap_or_else(|| panic!("no NOTIFY after the restart: {got:?}"));
    assert!(
        notify.1.contains("id=\"t1\"") && notify.1.contains("id=\"t2\""),
        "{}",
        notify.1
    );
    assert_eq!(n.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
