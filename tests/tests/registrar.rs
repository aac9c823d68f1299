//! A real sipd on loopback: REGISTER over UDP (IPv4 and IPv6) and TCP, expiry seen in the
//! change stream, keep-alives, limits, and a node that keeps serving after bad input.

use std::net::SocketAddr;
use std::time::Duration;

use sipmesh_tests::*;

#[test]
fn udp_register_refresh_fetch_unregister() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let c = UdpClient::new(sipd.addr);
    let me = c.local();
    let contact = format!("Contact: <sip:alice@{me}>;expires=600");
    let r = c.request(&register(me, "UDP", "alice", "u1", 1, &[&contact]));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        header_values(&r, "Contact"),
        vec![format!("<sip:alice@{me}>;expires=600").as_str()]
    );
    // RFC 3581: rport filled with the source port, received added.
    assert!(r.contains(&format!(";rport={};", me.port())), "{r}");
    let line = sipd
        .wait_change(
            &["op=upsert", "aor=alice@example.com"],
            Duration::from_secs(5),
        )
        .expect("upsert record");
    assert!(line.contains(&format!("source={me}")), "{line}");

    let r = c.request(&register(me, "UDP", "alice", "u2", 1, &[]));
    assert_eq!(
        header_values(&r, "Contact").len(),
        1,
        "fetch lists the binding"
    );

    let r = c.request(&register(
        me,
        "UDP",
        "alice",
        "u1",
        2,
        &[&format!("Contact: <sip:alice@{me}>;expires=0")],
    ));
    assert_eq!(status(&r), 200);
    assert!(header_values(&r, "Contact").is_empty());
    sipd.wait_change(
        &["op=remove", "aor=alice@example.com", "reason=Unregistered"],
        Duration::from_secs(5),
    )
    .expect("remove record");
}

#[test]
fn udp_over_ipv6() {
    let addr: SocketAddr = format!("[::1]:{}", 20000 + std::process::id() % 20000)
        .parse()
        .unwrap();
    let sipd = Sipd::start_on(addr, TEST_CONFIG, &[]);
    let c = UdpClient::new(sipd.addr);
    let me = c.local();
    let r = c.request(&register(
        me,
        "UDP",
        "v6",
        "v1",
        1,
        &[&format!("Contact: <sip:v6@{me}>")],
    ));
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains("<sip:v6@[::1]:"), "{r}");
}

#[test]
fn tcp_register_on_the_same_connection_with_pipelining_and_keepalive() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let mut c = TcpClient::connect(sipd.addr);
    let me = c.local();
    let a = register(
        me,
        "TCP",
        "bob",
        "t1",
        1,
        &[&format!("Contact: <sip:bob@{me};transport=tcp>")],
    );
    let b = register(
        me,
        "TCP",
        "bob",
        "t1",
        2,
        &[&format!("Contact: <sip:bob2@{me};transport=tcp>")],
    );
    // Two requests in one write, then one split across writes.
    c.send(format!("{a}{b}").as_bytes());
    let r1 = c.recv().expect("first reply");
    let r2 = c.recv().expect("second reply");
    assert_eq!((status(&r1), status(&r2)), (200, 200), "{r1}\n{r2}");
    assert_eq!(header_values(&r2, "Contact").len(), 2);
    let third = register(me, "TCP", "bob", "t1", 3, &[]);
    let (x, y) = third.split_at(40);
    c.send(x.as_bytes());
    std::thread::sleep(Duration::from_millis(100));
    c.send(y.as_bytes());
    assert_eq!(status(&c.recv().expect("third reply")), 200);
    // RFC 5626 §3.5.1: a CRLFCRLF ping is answered with a CRLF pong.
    c.send(b"\r\n\r\n");
    assert_eq!(c.read_raw(2), b"\r\n");
    let line = sipd
        .wait_change(
            &["op=upsert", "aor=bob@example.com"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(line.contains(&format!("source={me}")));
}

#[test]
fn tcp_broken_framing_and_oversize_close_the_connection() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let mut c = TcpClient::connect(sipd.addr);
    c.send(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: -5\r\n\r\n");
    assert!(c.closed_within(Duration::from_secs(3)));
    let mut c = TcpClient::connect(sipd.addr);
    let big = format!(
        "OPTIONS sip:x SIP/2.0\r\nContent-Length: 10000\r\n\r\n{}",
        "x".repeat(10_000)
    );
    c.send(big.as_bytes());
    assert!(c.closed_within(Duration::from_secs(3)));
}

#[test]
fn bindings_expire_by_timer_and_the_change_stream_says_so() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let c = UdpClient::new(sipd.addr);
    let me = c.local();
    let r = c.request(&register(
        me,
        "UDP",
        "carol",
        "e1",
        1,
        &[&format!("Contact: <sip:carol@{me}>;expires=1")],
    ));
    assert_eq!(
        header_values(&r, "Contact"),
        vec![format!("<sip:carol@{me}>;expires=1").as_str()]
    );
    let line = sipd
        .wait_change(
            &["op=remove", "aor=carol@example.com", "reason=Expired"],
            Duration::from_secs(5),
        )
        .expect("expiry record");
    assert!(line.contains(&format!("contact=sip:carol@{me}")));
    let r = c.request(&register(me, "UDP", "carol", "e2", 1, &[]));
    assert!(
        header_values(&r, "Contact").is_empty(),
        "expired binding is gone: {r}"
    );
}

#[test]
fn oversize_udp_gets_513_and_garbage_is_dropped_while_the_node_keeps_serving() {
    let mut sipd = Sipd::start(TEST_CONFIG, &[]);
    let c = UdpClient::new(sipd.addr);
    let me = c.local();
    let big = format!(
        "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport;branch=z9hG4bKbig\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: big\r\nCSeq: 1 OPTIONS\r\nContent-Length: 6000\r\n\r\n{}",
        "x".repeat(6000)
    );
    let r = c.request(&big);
    assert!(r.starts_with("SIP/2.0 513 "), "{r}");
    for junk in [
        &b"\x00\x01\x02garbage"[..],
        b"SIP/2.0",
        b"\r\n\r\n",
        b"INVITE",
        &[0xffu8; 3000],
    ] {
        c.send(junk);
    }
    assert!(
        c.recv_within(Duration::from_millis(300)).is_none(),
        "garbage gets no reply"
    );
    let opt = format!(
        "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport;branch=z9hG4bKok\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:example.com>\r\nCall-ID: ok\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    assert_eq!(status(&c.request(&opt)), 200);
    assert!(sipd.alive());
}

#[test]
fn many_users_over_udp_and_a_clean_shutdown() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let c = UdpClient::new(sipd.addr);
    let me = c.local();
    for i in 0..500 {
        let r = c.request(&register(
            me,
            "UDP",
            &format!("user{i}"),
            &format!("m{i}"),
            1,
            &[&format!("Contact: <sip:user{i}@{me}>")],
        ));
        assert_eq!(status(&r), 200);
    }
    sipd.wait_change(&["aor=user499@example.com"], Duration::from_secs(5))
        .unwrap();
    let upserts = sipd
        .change_lines()
        .iter()
        .filter(|l| l.contains("op=upsert"))
        .count();
    assert_eq!(upserts, 500, "one record per acknowledged binding");
    let stderr = sipd.stderr.clone();
    assert_eq!(sipd.stop(), Some(0));
    assert!(
        stderr.lock().unwrap().contains("500 bindings in 500 AoRs"),
        "{}",
        stderr.lock().unwrap()
    );
}

#[test]
fn both_backends_serve_the_same() {
    for backend in ["io_uring", "epoll"] {
        let sipd = Sipd::start(TEST_CONFIG, &["--backend", backend]);
        assert!(
            sipd.stderr
                .lock()
                .unwrap()
                .contains(&format!("({backend},{backend})")),
            "{backend}"
        );
        let c = UdpClient::new(sipd.addr);
        let me = c.local();
        let r = c.request(&register(
            me,
            "UDP",
            "dora",
            "b1",
            1,
            &[&format!("Contact: <sip:dora@{me}>")],
        ));
        assert_eq!(status(&r), 200, "{backend}: {r}");
        let mut t = TcpClient::connect(sipd.addr);
        let tm = t.local();
        t.send(
            register(
                tm,
                "TCP",
                "dora",
                "b2",
                1,
                &[&format!("Contact: <sip:dora@{tm};transport=tcp>")],
            )
            .as_bytes(),
        );
        let r = t.recv().expect("tcp reply");
        assert_eq!(header_values(&r, "Contact").len(), 2, "{backend}: {r}");
    }
}

#[test]
fn bad_configuration_is_refused_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("sipmesh-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.toml");
    std::fs::write(&p, "[registrar]\nmin_expires = 900\nmax_expires = 60\n").unwrap();
    let out = std::process::Command::new(sipd_bin())
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("registrar.min_expires"));
    let out = std::process::Command::new(sipd_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config FILE"));
}
