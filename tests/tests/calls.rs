//! Calls through the proxy with real SIPp on both sides: a SIPp UAS registered as
//! bob@example.com, a SIPp UAC calling it through `sipd` (INVITE → 180 → 200 → ACK →
//! BYE → 200, the route set learnt from Record-Route) — every call must succeed, the
//! node lists the live calls while they run, and writes one CDR per call.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
        let contact = format!("Contact: <sip:bob@{uas}>");
        let reg = register(
            uas,
            "UDP",
            "bob",
            "bob-reg",
            1,
            &[&contact, "Expires: 3600"],
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
    let caller = Command::new("sipp")
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
        .args(["-timeout", "150s", "-timeout_error", "-nostdin"])
        .args(["-max_socket", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sipp");
    // While the calls run, the node lists them (dialog tracking).
    let mut most_live = 0;
    let mut seen_confirmed = false;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        let d = sipd.sipctl_json(&["dialog", "list"]);
        most_live = most_live.max(d["total"].as_u64().unwrap_or(0));
        seen_confirmed |= d["dialogs"].as_array().is_some_and(|v| {
            v.iter()
                .any(|x| x["state"] == "confirmed" && x["callee"] == "sip:bob@example.com")
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = caller.wait_with_output().expect("sipp");
    let _ = callee.kill();
    let _ = callee.wait();
    assert_sipp_ok(&out, "UAC");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ok = stdout
        .lines()
        .rfind(|l| l.contains("Successful call"))
        .unwrap_or_default()
        .to_string();
    println!("{ok}");
    println!("at most {most_live} live dialogs listed during the run");
    assert!(
        most_live > 0 && seen_confirmed,
        "sipctl dialog list showed the calls"
    );
    // Every call ended with a BYE from the caller: one CDR each, and no dialog left.
    let cdrs = wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&sipd.cdr_file).unwrap_or_default();
        (text.lines().count() == CALLS as usize).then_some(text)
    })
    .expect("one CDR per call");
    for line in cdrs.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["end_reason"], "bye", "{line}");
        assert_eq!(r["hung_up_by"], "caller", "{line}");
        assert_eq!(r["callee"], "sip:bob@example.com");
        assert!(r["answer_ms"].as_u64().unwrap() >= r["setup_ms"].as_u64().unwrap());
        assert!(r["duration_ms"].as_u64().unwrap() >= 150, "{line}");
    }
    assert_eq!(sipd.sipctl_json(&["dialog", "list"])["total"], 0);
    assert!(sipd.alive());
}
