//! Calls through the proxy with real SIPp on both sides: a SIPp UAS registered as
//! bob@example.com, a SIPp UAC calling it through `sipd` (INVITE → 180 → 200 → ACK →
//! BYE → 200, the route set learnt from Record-Route) — every call must succeed.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use sipmesh_tests::*;

#[test]
fn sipp_uac_calls_a_registered_sipp_uas_through_the_proxy_with_no_failure() {
    const CALLS: u32 = 10_000;
    let mut sipd = Sipd::start(TEST_CONFIG, &[]);
    // The callee registers from the address and port SIPp will answer on (so its
    // Contact is where it registered from), then SIPp takes the port over.
    let uas: SocketAddr = SocketAddr::new(client_ip().into(), 5090);
    {
        let sock = UdpSocket::bind(uas).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let reg = register(
            uas,
            "UDP",
            "bob",
            "bob-reg",
            1,
            &[&format!("Contact: <sip:bob@{uas}>"), "Expires: 3600"],
        );
        sock.send_to(reg.as_bytes(), sipd.addr).unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"SIP/2.0 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let profiles = repo_root().join("perf/profiles");
    // Bounded in time (-timeout); stopped by its PID below.
    let mut callee = Command::new("sipp")
        .args(["-sf", profiles.join("call-uas.xml").to_str().unwrap()])
        .args(["-i", &uas.ip().to_string(), "-p", "5090"])
        .args(["-timeout", "180s", "-nostdin", "-max_socket", "2000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp is installed (Debian package sip-tester; tests/run.sh installs it)");
    std::thread::sleep(Duration::from_millis(300));
    let caller_ip = client_ip().to_string();
    // Bounded in count (-m) and time (-timeout).
    let out = Command::new("sipp")
        .arg(sipd.addr.to_string())
        .args(["-sf", profiles.join("call-uac.xml").to_str().unwrap()])
        .args(["-s", "bob", "-i", &caller_ip, "-p", "5080"])
        .args([
            "-m",
            &CALLS.to_string(),
            "-r",
            "400",
            "-l",
            "2000",
            "-d",
            "200",
        ])
        .args([
            "-timeout",
            "150s",
            "-timeout_error",
            "-nostdin",
            "-max_socket",
            "2000",
        ])
        .output()
        .expect("sipp");
    let _ = callee.kill();
    let _ = callee.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "SIPp UAC reported failed calls:\n{}\n{}",
        stdout.lines().rev().take(60).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = stdout
        .lines()
        .rfind(|l| l.contains("Successful call"))
        .unwrap_or_default()
        .to_string();
    println!("{ok}");
    assert!(sipd.alive());
}
