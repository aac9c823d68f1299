//! The whole receive → parse → logic → reply path through the real drivers and real UDP
//! sockets, with a counting global allocator: OPTIONS and REGISTER fetches allocate
//! nothing, REGISTER refreshes only their table insert. One `#[test]`, because the counter
//! is process-wide.
use sipmesh_cluster::NodeId;
use sipmesh_cluster::ring::change_ring;
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::core::{Core, CoreConfig, CoreStats};
use sipmesh_dataplane::io::{self, Backend, IoConfig};
use sipmesh_dataplane::registrar::{Registrar, RegistrarConfig, RegistrarStats};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;
fn round_trips(sock: &UdpSocket, to: SocketAddr, msgs: &[Vec<u8>], buf: &mut [u8]) {
    for m in msgs {
        sock.send_to(m, to).unwrap();
        let (n, _) = sock.recv_from(buf).expect("reply");
        assert!(
            buf[..n].starts_with(b"SIP/2.0 200 OK\r\n"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}
#[test]
fn driver_hot_path_allocations() {
    for backend in [Backend::IoUring, Backend::Epoll] {
        let table = Arc::new(Usrloc::new(1024));
        let (producer, mut consumer) = change_ring(1 << 24);
        let producer = std::sync::Mutex::new(Some(producer));
        let cfg = IoConfig {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            tcp: vec![],
            workers: 1,
            backend,
            max_message_size: 65_535,
            tick_ms: 5,
            ..IoConfig::default()
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let t = table.clone();
        let workers = io::spawn_workers(
            &cfg,
            move |i| {
                let p = producer.lock().unwrap().take().unwrap();
                let reg = Registrar::new(
                    RegistrarConfig::default(),
                    t.clone(),
                    p,
                    NodeId(1),
                    i as u16,
                    io::now_millis(),
                    Arc::new(RegistrarStats::default()),
                );
                Core::new(CoreConfig::default(), reg, Arc::new(CoreStats::default()))
            },
            shutdown.clone(),
        )
        .unwrap();
        let server = workers.udp_addrs()[0];
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let me = sock.local_addr().unwrap();
        let opt = format!(
            "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport;branch=z9hG4bKa\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: a1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes();
        let reg = |cseq: u32, contact: bool| {
            let c = if contact {
                format!("Contact: <sip:alice@{me}>\r\n")
            } else {
                String::new()
            };
            format!(
                "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport;branch=z9hG4bKr{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=1\r\nTo: <sip:alice@example.com>\r\nCall-ID: r1\r\nCSeq: {cseq} REGISTER\r\n{c}Content-Length: 0\r\n\r\n"
            )
            .into_bytes()
        };
        let n = 1000u32;
        let options: Vec<Vec<u8>> = (0..n).map(|_| opt.clone()).collect();
        let fetches: Vec<Vec<u8>> = (0..n).map(|i| reg(100_000 + i, false)).collect();
        let refreshes: Vec<Vec<u8>> = (2..2 + n).map(|i| reg(i, true)).collect();
        let mut buf = vec![0u8; 65_536];
        // Warm up every path once (first-use growth of scratch buffers, the AoR entry).
        round_trips(
            &sock,
            server,
            &[opt.clone(), reg(1, true), reg(99_999, false)],
            &mut buf,
        );
        consumer.drain(|_| {});
        let region = Region::new(GLOBAL);
        round_trips(&sock, server, &options, &mut buf);
        let opt_allocs = region.change().allocations;
        let region = Region::new(GLOBAL);
        round_trips(&sock, server, &fetches, &mut buf);
        let fetch_allocs = region.change().allocations;
        let region = Region::new(GLOBAL);
        round_trips(&sock, server, &refreshes, &mut buf);
        let refresh_allocs = region.change().allocations;
        shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
        workers.join().unwrap();
        eprintln!(
            "{backend:?}: allocations per message: OPTIONS {:.3}, REGISTER fetch {:.3}, REGISTER refresh {:.3}",
            opt_allocs as f64 / f64::from(n),
            fetch_allocs as f64 / f64::from(n),
            refresh_allocs as f64 / f64::from(n)
        );
        assert_eq!(opt_allocs, 0, "{backend:?}: OPTIONS round trips allocated");
        assert_eq!(fetch_allocs, 0, "{backend:?}: REGISTER fetches allocated");
        assert!(
            refresh_allocs as f64 / f64::from(n) <= 2.2,
            "{backend:?}: refresh allocated {refresh_allocs}"
        );
    }
}
