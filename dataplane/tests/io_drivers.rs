//! Real-socket tests of both I/O drivers on loopback. Every test binds port 0 and reads
//! the actual port from `Workers`, so tests do not collide. Every wait is bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sipmesh_dataplane::io::{
    Backend, Dest, Handler, IoConfig, IoStatsSnapshot, Millis, Outbox, Source, Transport, Workers,
    spawn_workers,
};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    ticks: AtomicU64,
    oversize_head_len: AtomicU64,
}

/// Replies "ECHO " + message to where it came from; "OVERSIZE <head length>" to an
/// oversize datagram; "CLOSE..." closes the connection after the reply.
struct Echo {
    shared: Arc<Shared>,
}

fn reply_to(src: &Source) -> Dest {
    match (src.transport, src.conn) {
        (Transport::Tcp, Some(id)) => Dest::Conn(id),
        _ => Dest::Udp(src.remote),
    }
}

fn write_parts(b: &mut [u8], parts: &[&[u8]]) -> usize {
    let mut n = 0;
    for p in parts {
        if n + p.len() > b.len() {
            return 0;
        }
        b[n..n + p.len()].copy_from_slice(p);
        n += p.len();
    }
    n
}

impl Handler for Echo {
    fn on_message<O: Outbox>(&mut self, msg: &[u8], src: &Source, _now: Millis, out: &mut O) {
        out.send(reply_to(src), |b| write_parts(b, &[b"ECHO ", msg]));
        if msg.starts_with(b"CLOSE")
            && let Some(id) = src.conn
        {
            out.close(id);
        }
    }

    fn on_oversize<O: Outbox>(&mut self, head: &[u8], src: &Source, _now: Millis, out: &mut O) {
        self.shared
            .oversize_head_len
            .store(head.len() as u64, Ordering::Relaxed);
        let text = format!("OVERSIZE {}", head.len());
        out.send(reply_to(src), |b| write_parts(b, &[text.as_bytes()]));
    }

    fn on_tick<O: Outbox>(&mut self, _now: Millis, _out: &mut O) {
        self.shared.ticks.fetch_add(1, Ordering::Relaxed);
    }
}

struct Server {
    workers: Option<Workers>,
    shutdown: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Server {
    fn start(backend: Backend, tweak: impl FnOnce(&mut IoConfig)) -> Server {
        let mut cfg = IoConfig {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            workers: 1,
            pin_cores: false,
            backend,
            max_message_size: 65_535,
            tcp_max_connections: 100,
            tcp_idle_timeout_ms: 60_000,
            tick_ms: 10,
            ..IoConfig::default()
        };
        tweak(&mut cfg);
        let shared = Arc::new(Shared::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&shared);
        let workers = spawn_workers(
            &cfg,
            move |_| Echo {
                shared: Arc::clone(&s),
            },
            Arc::clone(&shutdown),
        )
        .expect("spawn workers");
        assert!(
            workers.backends().iter().all(|&b| b == backend),
            "{:?}",
            workers.backends()
        );
        Server {
            workers: Some(workers),
            shutdown,
            shared,
        }
    }

    fn workers(&self) -> &Workers {
        self.workers.as_ref().unwrap()
    }

    fn udp(&self, i: usize) -> SocketAddr {
        self.workers().udp_addrs()[i]
    }

    fn tcp(&self) -> SocketAddr {
        self.workers().tcp_addrs()[0]
    }

    fn totals(&self) -> IoStatsSnapshot {
        self.workers().totals()
    }

    /// Wait until the summed stats satisfy `pred`.
    fn wait_stats(&self, what: &str, pred: impl Fn(&IoStatsSnapshot) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !pred(&self.totals()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.totals()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
        if let Some(w) = self.workers.take() {
            let r = w.join();
            if !std::thread::panicking() {
                r.expect("workers exit cleanly");
            }
        }
    }
}

fn udp_client(server: SocketAddr) -> UdpSocket {
    let bind: SocketAddr = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .unwrap();
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.connect(server).unwrap();
    s
}

fn recv_retry(s: &UdpSocket, buf: &mut [u8]) -> usize {
    loop {
        match s.recv(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("no UDP reply: {e}"),
        }
    }
}

fn tcp_client(server: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&server, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) => panic!(
                "connection closed after {got} of {n} octets: {:?}",
                String::from_utf8_lossy(&buf[..got])
            ),
            Ok(k) => got += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("read failed after {got} of {n} octets: {e}"),
        }
    }
    buf
}

/// Whether the peer closes the connection (EOF or reset) within `within`.
fn closes_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true, // reset
        }
    }
}

fn sip(method: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} sip:a@example.com SIP/2.0\r\nCall-ID: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn echo_of(msg: &[u8]) -> Vec<u8> {
    [b"ECHO ".as_slice(), msg].concat()
}

// ---------------------------------------------------------------- UDP

fn udp_round_trip_v4(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let c = udp_client(srv.udp(0));
    let msg = sip("OPTIONS", "");
    c.send(&msg).unwrap();
    let mut buf = [0u8; 2048];
    let n = recv_retry(&c, &mut buf);
    assert_eq!(&buf[..n], &echo_of(&msg)[..]);
    srv.wait_stats("udp_tx", |s| s.udp_rx == 1 && s.udp_tx == 1);
}

fn ipv6_udp_and_tcp_round_trip(backend: Backend) {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let srv = Server::start(backend, |c| {
        c.udp = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        c.tcp = vec!["[::1]:0".parse().unwrap()];
    });
    let v6 = srv.udp(1);
    assert!(v6.is_ipv6());
    let c = udp_client(v6);
    let msg = sip("OPTIONS", "v6");
    c.send(&msg).unwrap();
    let mut buf = [0u8; 2048];
    let n = recv_retry(&c, &mut buf);
    assert_eq!(&buf[..n], &echo_of(&msg)[..]);
    // And the IPv4 socket of the same worker still answers.
    let c4 = udp_client(srv.udp(0));
    c4.send(&msg).unwrap();
    let n = recv_retry(&c4, &mut buf);
    assert_eq!(&buf[..n], &echo_of(&msg)[..]);
    // TCP over IPv6.
    let mut s = tcp_client(srv.tcp());
    s.write_all(&msg).unwrap();
    assert_eq!(read_exact(&mut s, msg.len() + 5), echo_of(&msg));
}

fn udp_reuseport_spreads_over_workers(backend: Backend) {
    let srv = Server::start(backend, |c| c.workers = 3);
    let flows = 64;
    let clients: Vec<UdpSocket> = (0..flows).map(|_| udp_client(srv.udp(0))).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send(&sip("OPTIONS", &format!("flow {i}"))).unwrap();
    }
    let mut buf = [0u8; 2048];
    for (i, c) in clients.iter().enumerate() {
        let n = recv_retry(c, &mut buf);
        assert_eq!(
            &buf[..n],
            &echo_of(&sip("OPTIONS", &format!("flow {i}")))[..]
        );
    }
    let per_worker: Vec<u64> = srv
        .workers()
        .stats()
        .iter()
        .map(|s| s.snapshot().udp_rx)
        .collect();
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        flows as u64,
        "{per_worker:?}"
    );
    assert!(
        per_worker.iter().filter(|&&n| n > 0).count() >= 2,
        "one worker got everything: {per_worker:?}"
    );
}

fn udp_oversize_reaches_on_oversize(backend: Backend) {
    let srv = Server::start(backend, |c| c.max_message_size = 1000);
    let c = udp_client(srv.udp(0));
    let mut big = sip("MESSAGE", &"x".repeat(1400));
    big.truncate(1500);
    c.send(&big).unwrap();
    let mut buf = [0u8; 2048];
    let n = recv_retry(&c, &mut buf);
    assert_eq!(&buf[..n], b"OVERSIZE 1000");
    assert_eq!(srv.shared.oversize_head_len.load(Ordering::Relaxed), 1000);
    // Exactly the maximum is not oversize (the 1005-octet echo does not fit: none is sent).
    c.send(&[b'A'; 1000]).unwrap();
    srv.wait_stats("udp_rx", |s| s.udp_rx == 1);
    assert_eq!(srv.totals().udp_oversize, 1);
    // A reply of exactly the maximum size is sent.
    c.send(&[b'B'; 995]).unwrap();
    let n = recv_retry(&c, &mut buf);
    assert_eq!(n, 1000);
}

// ---------------------------------------------------------------- TCP

fn tcp_two_messages_in_one_write(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let mut s = tcp_client(srv.tcp());
    let (a, b) = (sip("OPTIONS", "one"), sip("INFO", "second body"));
    s.write_all(&[a.clone(), b.clone()].concat()).unwrap();
    let want = [echo_of(&a), echo_of(&b)].concat();
    assert_eq!(read_exact(&mut s, want.len()), want);
    srv.wait_stats("tcp_rx_msgs", |s| s.tcp_rx_msgs == 2 && s.tcp_accepted == 1);
}

fn tcp_message_split_across_writes(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let mut s = tcp_client(srv.tcp());
    let m = sip("INVITE", "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n");
    for part in [&m[..10], &m[10..50], &m[50..]] {
        s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let want = echo_of(&m);
    assert_eq!(read_exact(&mut s, want.len()), want);
    // A message bigger than the initial receive buffer, in pieces.
    let big = sip("MESSAGE", &"y".repeat(40_000));
    for chunk in big.chunks(7000) {
        s.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let want = echo_of(&big);
    assert_eq!(read_exact(&mut s, want.len()), want);
    assert_eq!(srv.totals().tcp_rx_msgs, 2);
}

fn tcp_pipelined_burst(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let mut s = tcp_client(srv.tcp());
    let msgs: Vec<Vec<u8>> = (0..2000)
        .map(|i| sip("MESSAGE", &format!("{i:>1000}")))
        .collect();
    let stream: Vec<u8> = msgs.concat();
    let want: Vec<u8> = msgs.iter().flat_map(|m| echo_of(m)).collect();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for chunk in stream.chunks(32 * 1024) {
            w.write_all(chunk).unwrap();
        }
    });
    assert!(
        read_exact(&mut s, want.len()) == want,
        "echo stream differs"
    );
    writer.join().unwrap();
    assert_eq!(srv.totals().tcp_rx_msgs, 2000);
}

fn tcp_ping_gets_one_crlf_pong(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let mut s = tcp_client(srv.tcp());
    s.write_all(b"\r\n\r\n").unwrap();
    assert_eq!(read_exact(&mut s, 2), b"\r\n");
    // Nothing more comes, and the connection still works.
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut extra = [0u8; 16];
    match s.read(&mut extra) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("unexpected after pong: {other:?}"),
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
    let m = sip("OPTIONS", "");
    s.write_all(&m).unwrap();
    let want = echo_of(&m);
    assert_eq!(read_exact(&mut s, want.len()), want);
    assert_eq!(srv.totals().tcp_pings, 1);
}

fn tcp_invalid_framing_closes(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let mut s = tcp_client(srv.tcp());
    // A valid message first: its reply is still delivered before the close.
    let ok = sip("OPTIONS", "");
    s.write_all(&ok).unwrap();
    let want = echo_of(&ok);
    assert_eq!(read_exact(&mut s, want.len()), want);
    s.write_all(b"INVITE sip:a@example.com SIP/2.0\r\nCall-ID: x\r\n\r\n")
        .unwrap();
    assert!(
        closes_within(&mut s, WAIT),
        "connection stayed open after invalid framing"
    );
    srv.wait_stats("tcp_closed_invalid", |s| s.tcp_closed_invalid == 1);
}

fn tcp_handler_close_after_reply(backend: Backend) {
    let srv = Server::start(backend, |_| {});
    let mut s = tcp_client(srv.tcp());
    let m = sip("CLOSE", "bye");
    s.write_all(&m).unwrap();
    let want = echo_of(&m);
    assert_eq!(read_exact(&mut s, want.len()), want);
    assert!(closes_within(&mut s, WAIT));
    srv.wait_stats("tcp_closed_local", |s| s.tcp_closed_local == 1);
}

fn tcp_idle_connection_closes(backend: Backend) {
    let srv = Server::start(backend, |c| c.tcp_idle_timeout_ms = 200);
    let mut busy = tcp_client(srv.tcp());
    let mut idle = tcp_client(srv.tcp());
    let started = Instant::now();
    // Keep one connection busy for a while with pings; the other stays silent.
    for _ in 0..6 {
        busy.write_all(b"\r\n\r\n").unwrap();
        assert_eq!(read_exact(&mut busy, 2), b"\r\n");
        std::thread::sleep(Duration::from_millis(60));
    }
    assert!(closes_within(&mut idle, WAIT), "idle connection not closed");
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "closed before the idle timeout"
    );
    // The busy one survived past the timeout.
    let m = sip("OPTIONS", "");
    busy.write_all(&m).unwrap();
    assert_eq!(read_exact(&mut busy, m.len() + 5), echo_of(&m));
    srv.wait_stats("tcp_closed_idle", |s| s.tcp_closed_idle >= 1);
}

fn tcp_connection_limit_enforced(backend: Backend) {
    let srv = Server::start(backend, |c| c.tcp_max_connections = 2);
    let m = sip("OPTIONS", "");
    let want = echo_of(&m);
    let mut kept: Vec<TcpStream> = (0..2).map(|_| tcp_client(srv.tcp())).collect();
    for s in &mut kept {
        s.write_all(&m).unwrap();
        assert_eq!(read_exact(s, want.len()), want);
    }
    let mut third = tcp_client(srv.tcp());
    assert!(
        closes_within(&mut third, WAIT),
        "connection over the limit stayed open"
    );
    srv.wait_stats("tcp_rejected_over_limit", |s| {
        s.tcp_rejected_over_limit == 1
    });
    // Free a slot: a new connection is served again.
    drop(kept.pop());
    srv.wait_stats("tcp_closed_peer", |s| s.tcp_closed_peer == 1);
    let mut fourth = tcp_client(srv.tcp());
    fourth.write_all(&m).unwrap();
    assert_eq!(read_exact(&mut fourth, want.len()), want);
    assert_eq!(srv.totals().tcp_accepted, 3);
}

// ---------------------------------------------------------------- ticks, shutdown

fn tick_runs_when_idle(backend: Backend) {
    let srv = Server::start(backend, |c| c.tick_ms = 10);
    let deadline = Instant::now() + WAIT;
    while srv.shared.ticks.load(Ordering::Relaxed) < 5 {
        assert!(Instant::now() < deadline, "on_tick not called while idle");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(srv.totals().ticks >= 5);
}

fn shutdown_joins(backend: Backend) {
    let mut srv = Server::start(backend, |c| {
        c.workers = 2;
        c.tick_ms = 20;
    });
    // Some open state at shutdown: a connection with a partial message, a datagram.
    let mut s = tcp_client(srv.tcp());
    s.write_all(b"OPTIONS sip:a SIP/2.0\r\n").unwrap();
    udp_client(srv.udp(0)).send(&sip("OPTIONS", "")).unwrap();
    srv.wait_stats("accept", |s| s.tcp_accepted == 1);
    srv.shutdown.store(true, Ordering::Relaxed);
    let workers = srv.workers.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(workers.join()).unwrap());
    rx.recv_timeout(WAIT)
        .expect("workers did not exit in time")
        .expect("clean exit");
    assert!(
        closes_within(&mut s, WAIT),
        "connection left open after shutdown"
    );
}

fn bind_error_names_address(backend: Backend) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = IoConfig {
        udp: vec![],
        tcp: vec![addr],
        workers: 1,
        pin_cores: false,
        backend,
        max_message_size: 4096,
        tcp_max_connections: 10,
        tcp_idle_timeout_ms: 1000,
        tick_ms: 10,
        ..IoConfig::default()
    };
    let err = spawn_workers(
        &cfg,
        |_| Echo {
            shared: Arc::default(),
        },
        Arc::new(AtomicBool::new(false)),
    )
    .expect_err("bind on a taken port must fail");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

macro_rules! for_both_backends {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            use super::*;
            $(#[test] fn $name() { super::$name(Backend::IoUring) })*
        }
        mod epoll {
            use super::*;
            $(#[test] fn $name() { super::$name(Backend::Epoll) })*
        }
    };
}

for_both_backends!(
    udp_round_trip_v4,
    ipv6_udp_and_tcp_round_trip,
    udp_reuseport_spreads_over_workers,
    udp_oversize_reaches_on_oversize,
    tcp_two_messages_in_one_write,
    tcp_message_split_across_writes,
    tcp_pipelined_burst,
    tcp_ping_gets_one_crlf_pong,
    tcp_invalid_framing_closes,
    tcp_handler_close_after_reply,
    tcp_idle_connection_closes,
    tcp_connection_limit_enforced,
    tick_runs_when_idle,
    shutdown_joins,
    bind_error_names_address,
);

#[test]
fn auto_backend_reports_what_runs() {
    let shutdown = Arc::new(AtomicBool::new(false));
    let cfg = IoConfig {
        udp: vec!["127.0.0.1:0".parse().unwrap()],
        backend: Backend::Auto,
        workers: 2,
        ..IoConfig::default()
    };
    let w = spawn_workers(
        &cfg,
        |_| Echo {
            shared: Arc::default(),
        },
        Arc::clone(&shutdown),
    )
    .unwrap();
    assert_eq!(w.backends().len(), 2);
    assert!(
        w.backends()
            .iter()
            .all(|b| matches!(b, Backend::IoUring | Backend::Epoll))
    );
    shutdown.store(true, Ordering::Relaxed);
    w.join().unwrap();
}
