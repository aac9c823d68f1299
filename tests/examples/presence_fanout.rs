//! NOTIFY fan-out: one PUBLISH to N watchers, on a running `sipd`.
//!
//! `cargo run --release -p sipmesh-tests --example presence_fanout -- [WATCHERS] [ROUNDS]`
//!
//! Starts a release `sipd` (2 workers, no store) on loopback, subscribes WATCHERS
//! watchers (default 1000) to one presentity from 8 UDP sockets (a thread each, answering
//! every NOTIFY with 200), then publishes ROUNDS times (default 20; an initial PUBLISH,
//! then modifications under the entity tag), each once every watcher has heard the last.
//! Prints, per round, the time from sending the PUBLISH to the first, median and last
//! NOTIFY received, and the server's CPU per NOTIFY over the rounds.

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sipmesh_tests::*;

const SOCKETS: usize = 8;

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

/// A larger receive buffer (up to the system's limit): a burst of NOTIFYs must not
/// overflow the watchers' sockets.
fn big_rcvbuf(sock: &UdpSocket) {
    let _ = socket2::SockRef::from(sock).set_recv_buffer_size(4 << 20);
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split(' ').collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let watchers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let config = format!(
        "{TEST_CONFIG}\n[presence]\nmax_watchers = {}\n",
        watchers + 10
    );
    let sipd = Sipd::start(&config, &["--no-store"]);
    let server = sipd.addr;
    // Round marks seen by the watcher threads: (round, when).
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let per = watchers.div_ceil(SOCKETS);
    let mut threads = Vec::new();
    for s in 0..SOCKETS {
        let sock = UdpSocket::bind((client_ip(), 0)).unwrap();
        big_rcvbuf(&sock);
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let me = sock.local_addr().unwrap();
        let n = per.min(watchers.saturating_sub(s * per));
        for i in 0..n {
            let call = format!("fan-{s}-{i}");
            let m = format!(
                "SUBSCRIBE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport;branch=z9hG4bK{call}\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:{call}@example.com>;tag=t{call}\r\nTo: <sip:alice@example.com>\r\n\
                 Call-ID: {call}\r\nCSeq: 1 SUBSCRIBE\r\nContact: <sip:{call}@{me}>\r\nEvent: presence\r\n\
                 Expires: 3600\r\nContent-Length: 0\r\n\r\n"
            );
            sock.send_to(m.as_bytes(), server).unwrap();
            if i % 200 == 199 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let tx = tx.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65_535];
            let mut idle = 0;
            // Ends after 3 s without traffic (the run is over).
            while idle < 10 {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    idle += 1;
                    continue;
                };
                idle = 0;
                let at = Instant::now();
                let m = String::from_utf8_lossy(&buf[..n]);
                if !m.starts_with("NOTIFY ") {
                    continue;
                }
                let _ = sock.send_to(ok(&m).as_bytes(), from);
                let round = m
                    .split("<tuple id=\"r")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|r| r.parse::<usize>().ok());
                let _ = tx.send((round.map_or(0, |r| r + 1), at));
            }
        }));
    }
    drop(tx);
    // The immediate NOTIFYs (round 0).
    let mut initial = 0;
    while initial < watchers {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(_) => initial += 1,
            Err(_) => panic!("only {initial} of {watchers} subscriptions notified"),
        }
    }
    let publisher = UdpSocket::bind((client_ip(), 0)).unwrap();
    publisher
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let me: SocketAddr = publisher.local_addr().unwrap();
    let mut etag = String::new();
    let (cpu0, mut notifies) = (cpu_ticks(sipd.pid()), 0usize);
    let mut lasts = Vec::new();
    for r in 0..rounds {
        let body = format!(
            "<?xml version=\"1.0\"?><presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
             entity=\"sip:alice@example.com\"><tuple id=\"r{r}\"><status><basic>open</basic>\
             </status></tuple></presence>"
        );
        let if_match = if etag.is_empty() {
            String::new()
        } else {
            format!("SIP-If-Match: {etag}\r\n")
        };
        let m = format!(
            "PUBLISH sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport;branch=z9hG4bKfp{r}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=fp\r\nTo: <sip:alice@example.com>\r\n\
             Call-ID: fanout-pub\r\nCSeq: {} PUBLISH\r\nEvent: presence\r\nExpires: 3600\r\n{if_match}\
             Content-Type: application/pidf+xml\r\nContent-Length: {}\r\n\r\n{body}",
            r + 1,
            body.len()
        );
        let t0 = Instant::now();
        publisher.send_to(m.as_bytes(), server).unwrap();
        let mut buf = [0u8; 8192];
        let (n, _) = publisher.recv_from(&mut buf).expect("200 to the PUBLISH");
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        etag = header_values(&reply, "SIP-ETag")
            .first()
            .expect("an entity tag")
            .to_string();
        let mut times = Vec::with_capacity(watchers);
        while times.len() < watchers {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok((round, at)) if round == r + 1 => times.push(at.duration_since(t0)),
                Ok(_) => {}
                Err(_) => panic!("round {r}: {} of {watchers} NOTIFYs", times.len()),
            }
        }
        notifies += times.len();
        times.sort();
        println!(
            "round {r:2}: {watchers} NOTIFYs, first {:7.2} ms, median {:7.2} ms, last {:7.2} ms",
            times[0].as_secs_f64() * 1e3,
            times[times.len() / 2].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
        lasts.push(times[times.len() - 1]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = cpu_ticks(sipd.pid()) - cpu0;
    let tick = 1e6 / 100.0;
    lasts.sort();
    println!(
        "{watchers} watchers, {rounds} rounds: last NOTIFY median {:.2} ms (min {:.2}, max {:.2}); \
         server CPU {:.1} us per NOTIFY (incl. its 200 and the idle 200 ms between rounds)",
        lasts[lasts.len() / 2].as_secs_f64() * 1e3,
        lasts[0].as_secs_f64() * 1e3,
        lasts[lasts.len() - 1].as_secs_f64() * 1e3,
        cpu as f64 * tick / notifies.max(1) as f64
    );
    assert_eq!(sipd.stop(), Some(0));
    for t in threads {
        let _ = t.join();
    }
}
