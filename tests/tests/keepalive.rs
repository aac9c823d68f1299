//! NAT keepalives across real `sipd` processes, counted by a UDP socket that stands in for
//! the phones (it answers every OPTIONS ping with 200 and notes who pinged which contact
//! when).
//!
//! - HA: two nodes share the tag `vip`; 10 000 contacts registered under it are pinged
//!   only by the active node; `sipctl tag activate vip` on the backup moves all pinging
//!   there within 1 s, with no contact missing an interval and none pinged twice.
//! - Load balancing: three active nodes split untagged contacts by bucket; each pings
//!   about a third; killing one moves its share to the other two.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sipmesh_tests::{Sipd, TEST_CONFIG, client_ip, register, wait_for};

const INTERVAL_MS: u64 = 2000;

fn config(extra: &str) -> String {
    format!(
        "{TEST_CONFIG}
[nat]
keepalive = \"nated\"
ping_interval_ms = {INTERVAL_MS}
ping_max_misses = 3
{extra}"
    )
}

/// One ping seen by the phones: contact index, ms since the start, pinging node's address.
type Ping = (usize, u64, SocketAddr);

struct Phones {
    sock: Arc<UdpSocket>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Ping>>>,
    t0: Instant,
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

impl Phones {
    /// Registers `n` contacts `sip:kaI@10.9.x.y:5060` (private addresses behind this
    /// socket: NATed) with `registrar`, then answers pings until stopped.
    fn start(n: usize, registrar: SocketAddr) -> Phones {
        let sock = Arc::new(UdpSocket::bind((client_ip(), 0)).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let local = sock.local_addr().unwrap();
        // Register in windows of 200 outstanding requests; a REGISTER unanswered for
        // 500 ms is sent again (a retransmission: same Call-ID and CSeq).
        let mut buf = vec![0u8; 65_535];
        let msg = |i: usize| {
            let contact = format!("Contact: <sip:ka{i}@10.9.{}.{}:5060>", i / 200, i % 200 + 1);
            register(
                local,
                "UDP",
                &format!("ka{i}"),
                &format!("reg-{i}"),
                1,
                &[&contact, "Expires: 3600"],
            )
        };
        let mut pending: HashMap<usize, Instant> = HashMap::new();
        let mut done = 0;
        let mut next = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while done < n {
            assert!(Instant::now() < deadline, "registered {done} of {n}");
            while next < n && pending.len() < 200 {
                sock.send_to(msg(next).as_bytes(), registrar).unwrap();
                pending.insert(next, Instant::now());
                next += 1;
            }
            if let Ok((k, _)) = sock.recv_from(&mut buf) {
                let r = String::from_utf8_lossy(&buf[..k]);
                if r.starts_with("SIP/2.0") {
                    assert!(r.starts_with("SIP/2.0 200"), "{r}");
                    let i = header(&r, "Call-ID")
                        .and_then(|c| c.strip_prefix("reg-"))
                        .and_then(|c| c.parse::<usize>().ok())
                        .expect("our Call-ID");
                    if pending.remove(&i).is_some() {
                        done += 1;
                    }
                }
            }
            for (i, at) in pending.iter_mut() {
                if at.elapsed() > Duration::from_millis(500) {
                    sock.send_to(msg(*i).as_bytes(), registrar).unwrap();
                    *at = Instant::now();
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let thread = {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65_535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((k, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let m = String::from_utf8_lossy(&buf[..k]).into_owned();
                    let Some(rest) = m.strip_prefix("OPTIONS sip:ka") else {
                        continue;
                    };
                    let i: usize = rest
                        .split('@')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .expect("a keepalive R-URI");
                    seen.push((i, t0.elapsed().as_millis() as u64, from));
                    let mut r = String::from("SIP/2.0 200 OK\r\n");
                    for h in ["Via", "From", "To", "Call-ID", "CSeq"] {
                        r.push_str(&format!("{h}: {}\r\n", header(&m, h).unwrap()));
                    }
                    r.push_str("Content-Length: 0\r\n\r\n");
                    let _ = sock.send_to(r.as_bytes(), from);
                }
                seen
            })
        };
        Phones {
            sock,
            stop,
            thread: Some(thread),
            t0,
        }
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn finish(mut self) -> Vec<Ping> {
        self.stop.store(true, Ordering::Relaxed);
        let v = self.thread.take().unwrap().join().unwrap();
        let _ = &self.sock;
        v
    }
}

fn count(node: &Sipd) -> u64 {
    node.usrloc_status()["count"].as_u64().unwrap_or(0)
}

#[test]
fn ha_pair_only_the_active_node_pings_and_activation_moves_pinging_without_gap_or_double() {
    const N: usize = 10_000;
    let cfg = config("[tags]\ndomains = [\"example.com=vip\"]\n");
    let n1 = Sipd::start(&cfg, &["--node-id", "1", "--tag", "vip=active"]);
    let j1 = n1.grpc.to_string();
    let n2 = Sipd::start(
        &cfg,
        &["--node-id", "2", "--tag", "vip=backup", "--join", &j1],
    );
    assert!(
        wait_for(Duration::from_secs(15), || (n2.usrloc_status()["state"]
            == "synced")
            .then_some(()))
        .is_some()
    );
    let phones = Phones::start(N, n1.addr);
    assert!(
        wait_for(Duration::from_secs(30), || (count(&n2) == N as u64)
            .then_some(()))
        .is_some(),
        "replicated {} of {N}",
        count(&n2)
    );
    // Two intervals under node 1.
    std::thread::sleep(Duration::from_millis(2 * INTERVAL_MS + 200));
    let t_act = phones.now_ms();
    let out = n2.sipctl(&["tag", "activate", "vip"]).unwrap();
    assert!(out.contains("active here with term 2"), "{out}");
    std::thread::sleep(Duration::from_millis(2 * INTERVAL_MS + 500));
    let t_end = phones.now_ms();
    let mut pings = phones.finish();
    pings.retain(|p| p.1 <= t_end);

    let (a1, a2) = (n1.addr, n2.addr);
    let mut per: HashMap<usize, Vec<(u64, SocketAddr)>> = HashMap::new();
    for &(i, t, from) in &pings {
        assert!(from == a1 || from == a2, "a ping from {from}");
        per.entry(i).or_default().push((t, from));
    }
    assert_eq!(per.len(), N, "every contact was pinged");
    let mut last_from_1 = 0;
    let mut first_from_2 = u64::MAX;
    let (mut doubles, mut gaps) = (0, 0);
    for (i, v) in &mut per {
        v.sort();
        // The first ping comes within an interval of the registration; from then on one
        // ping per interval: never two within half an interval, never a whole interval
        // (plus scheduling slack) skipped.
        assert!(
            v[0].0 <= INTERVAL_MS + 500,
            "contact {i}: first ping at {}",
            v[0].0
        );
        for w in v.windows(2) {
            let gap = w[1].0 - w[0].0;
            if gap < INTERVAL_MS / 2 {
                doubles += 1;
                eprintln!("contact {i}: pinged twice: {w:?}");
            }
            if gap > INTERVAL_MS + 500 {
                gaps += 1;
                eprintln!("contact {i}: interval missed: {w:?}");
            }
        }
        let last = v.last().unwrap().0;
        assert!(
            t_end - last <= INTERVAL_MS + 500,
            "contact {i}: silent since {last}"
        );
        for &(t, from) in v.iter() {
            if from == a1 {
                last_from_1 = last_from_1.max(t);
            } else {
                first_from_2 = first_from_2.min(t);
            }
            // Before the activation only node 1 pings.
            assert!(
                from == a1 || t >= t_act,
                "node 2 pinged {i} at {t} < {t_act}"
            );
        }
    }
    let from2 = pings.iter().filter(|p| p.2 == a2).count();
    println!(
        "{} pings: {} from node 1, {from2} from node 2; activation at {t_act} ms, node 1's last \
         ping at {last_from_1} ms, node 2's first at {first_from_2} ms",
        pings.len(),
        pings.len() - from2
    );
    assert_eq!((doubles, gaps), (0, 0));
    // All pinging moved within 1 s of the activation.
    assert!(
        last_from_1 < t_act + 1000,
        "node 1 still pinged at {last_from_1}"
    );
    assert!(first_from_2 < t_act + 1000);
    // Answers were counted (no contact removed for want of them).
    let st = n2.sipctl_json(&["ping"]);
    assert!(st["answers"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["removed"], 0, "{st}");
    assert_eq!(count(&n1), N as u64);
}

#[test]
fn three_active_nodes_split_the_pinging_and_a_dead_nodes_share_moves() {
    const N: usize = 3_000;
    let cfg = config("");
    let n1 = Sipd::start(&cfg, &["--node-id", "1"]);
    let j1 = n1.grpc.to_string();
    let n2 = Sipd::start(&cfg, &["--node-id", "2", "--join", &j1]);
    let mut n3 = Sipd::start(&cfg, &["--node-id", "3", "--join", &j1]);
    for n in [&n2, &n3] {
        assert!(
            wait_for(Duration::from_secs(15), || (n.usrloc_status()["state"]
                == "synced")
                .then_some(()))
            .is_some()
        );
    }
    // Every node acts on about a third of the buckets.
    assert!(
        wait_for(Duration::from_secs(10), || {
            let mine: Vec<u64> = [&n1, &n2, &n3]
                .iter()
                .map(|n| {
                    n.sipctl_json(&["ownership"])["buckets_mine"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            (mine.iter().sum::<u64>() == 1024 && mine.iter().all(|m| *m > 250)).then_some(())
        })
        .is_some()
    );
    let phones = Phones::start(N, n1.addr);
    assert!(
        wait_for(Duration::from_secs(30), || (count(&n3) == N as u64)
            .then_some(()))
        .is_some()
    );
    std::thread::sleep(Duration::from_millis(2 * INTERVAL_MS + 200));
    let t_kill = phones.now_ms();
    n3.kill9();
    let killed = Instant::now();
    // The survivors take the dead node's buckets once they detect its death.
    assert!(
        wait_for(Duration::from_secs(5), || {
            let mine: u64 = [&n1, &n2]
                .iter()
                .map(|n| {
                    n.sipctl_json(&["ownership"])["buckets_mine"]
                        .as_u64()
                        .unwrap()
                })
                .sum();
            (mine == 1024).then_some(())
        })
        .is_some()
    );
    println!(
        "the survivors act on all 1024 buckets {} ms after the kill",
        killed.elapsed().as_millis()
    );
    std::thread::sleep(
        Duration::from_millis(2 * INTERVAL_MS + 1500).saturating_sub(killed.elapsed()),
    );
    let t_end = phones.now_ms();
    let mut pings = phones.finish();
    pings.retain(|p| p.1 <= t_end);

    // One full interval before the kill: shares per node.
    let window = (t_kill - INTERVAL_MS, t_kill);
    let mut share: HashMap<SocketAddr, usize> = HashMap::new();
    let mut owner_before: HashMap<usize, SocketAddr> = HashMap::new();
    for &(i, t, from) in &pings {
        if t >= window.0 && t < window.1 {
            *share.entry(from).or_default() += 1;
            owner_before.insert(i, from);
        }
    }
    println!("pings per node in the interval before the kill: {share:?}");
    for n in [&n1, &n2, &n3] {
        let s = share.get(&n.addr).copied().unwrap_or(0);
        assert!(s > N / 5 && s < N / 2, "node {}: {s} of {N}", n.addr);
    }
    // Each contact once per interval (a ping due at the window's edge may fall on either
    // side of it).
    let total = share.values().sum::<usize>();
    assert!(
        total.abs_diff(N) <= N / 100,
        "{total} pings in one interval"
    );
    // The dead node's contacts are pinged again by the others: within the failure
    // detection time plus one interval of the kill, and from then on every interval.
    let mut resumed_max = 0;
    for (i, from) in owner_before.iter().filter(|(_, f)| **f == n3.addr) {
        let next = pings
            .iter()
            .filter(|p| p.0 == *i && p.1 > t_kill)
            .map(|p| (p.1, p.2))
            .min()
            .unwrap_or_else(|| panic!("contact {i} of {from} was never pinged again"));
        assert!(next.1 == n1.addr || next.1 == n2.addr);
        resumed_max = resumed_max.max(next.0 - t_kill);
    }
    println!("the dead node's contacts were all pinged again within {resumed_max} ms");
    assert!(resumed_max <= 1500 + INTERVAL_MS, "{resumed_max} ms");
    // Nobody pinged twice: consecutive pings of a contact are an interval apart.
    let mut per: HashMap<usize, Vec<u64>> = HashMap::new();
    for &(i, t, from) in &pings {
        assert!(
            from != n3.addr || t < t_kill + 100,
            "the dead node pinged at {t}"
        );
        per.entry(i).or_default().push(t);
    }
    assert_eq!(per.len(), N);
    for (i, v) in &mut per {
        v.sort();
        assert!(
            v.windows(2).all(|w| w[1] - w[0] >= INTERVAL_MS / 2),
            "contact {i} pinged twice: {v:?}"
        );
    }
}
