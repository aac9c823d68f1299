//! `sipload` end to end against a running `sipd`: the bundled register, refresh,
//! unregister, OPTIONS, presence and mixed profiles, a short run each, every call successful; both sides
//! of calls through the proxy, answered and cancelled while ringing.

use std::process::Command;

use sipmesh_tests::{Sipd, TEST_CONFIG, client_ip, repo_root};

fn sipload(sipd: &Sipd, profile: &str, port: u16, calls: u32, rate: u32) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sipload"))
        .arg(sipd.addr.to_string())
        .args([
            "-sf",
            repo_root()
                .join("perf/profiles")
                .join(profile)
                .to_str()
                .unwrap(),
        ])
        .args([
            "-i",
            &client_ip().to_string(),
            "-p",
            &port.to_string(),
            "-t",
            "2",
        ])
        .args([
            "-m",
            &calls.to_string(),
            "-r",
            &rate.to_string(),
            "-timeout",
            "60",
        ])
        .output()
        .expect("sipload runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn value<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or("", str::trim)
}

#[test]
fn sipload_runs_the_register_and_options_profiles_with_no_failure() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let r = sipload(&sipd, "register.xml", 6300, 2000, 2000);
    assert_eq!(value(&r, "successful"), "2000", "{r}");
    assert_eq!(value(&r, "failed"), "0", "{r}");
    assert!(value(&r, "response time").contains("(2000 samples)"), "{r}");
    // Every exchange has its percentiles: here the REGISTER's 200, one per call.
    let ex = r
        .lines()
        .find(|l| l.contains("REGISTER -> 200"))
        .unwrap_or_else(|| panic!("no REGISTER exchange line: {r}"));
    assert!(ex.trim_end().ends_with(" 2000"), "{ex}");
    // Everything sent was received through the worker I/O layer, nothing dropped.
    let io = value(&r, "io");
    assert!(
        io.contains("sent 2000 received 2000") && io.contains("dropped 0"),
        "{io}"
    );
    // Every user of the profile (user1 .. user2000) is registered.
    assert!(
        sipd.wait_change(
            &["op=upsert", "aor=user2000@example.com"],
            std::time::Duration::from_secs(5)
        )
        .is_some()
    );
    let r = sipload(&sipd, "options.xml", 6310, 3000, 3000);
    assert_eq!(value(&r, "successful"), "3000", "{r}");
    // A refresh (same Call-ID, CSeq 2) and a removal (Expires: 0) after each REGISTER.
    let r = sipload(&sipd, "reregister.xml", 6320, 1000, 1000);
    assert_eq!(value(&r, "successful"), "1000", "{r}");
    let r = sipload(&sipd, "unregister.xml", 6330, 1000, 1000);
    assert_eq!(value(&r, "successful"), "1000", "{r}");
    assert!(
        sipd.wait_change(
            &["op=remove", "aor=unreg1000@example.com"],
            std::time::Duration::from_secs(5)
        )
        .is_some()
    );
}

/// Registers bob from `uas`, the address its sipload callee will answer on.
fn register_callee(sipd: &Sipd, uas: std::net::SocketAddr) {
    let sock = std::net::UdpSocket::bind(uas).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let contact = format!("Contact: <sip:bob@{uas}>");
    let reg = sipmesh_tests::register(uas, "UDP", "bob", "bob-reg", 1, &[&contact]);
    sock.send_to(reg.as_bytes(), sipd.addr).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"SIP/2.0 200"));
}

#[test]
fn sipload_plays_both_sides_of_calls_cancelled_while_ringing() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let uas = std::net::SocketAddr::new(client_ip().into(), 6392);
    register_callee(&sipd, uas);
    let profiles = repo_root().join("perf/profiles");
    // The callee keeps the INVITE's Vias (a <nop> assignstr) for its 487.
    let callee = Command::new(env!("CARGO_BIN_EXE_sipload"))
        .args([
            "-sf",
            profiles.join("call-cancel-uas.xml").to_str().unwrap(),
        ])
        .args(["-i", &uas.ip().to_string(), "-p", "6392", "-t", "1"])
        .args(["-m", "300", "-timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The caller's CANCEL and ACK carry the INVITE's branch ([branch-N]).
    let out = Command::new(env!("CARGO_BIN_EXE_sipload"))
        .arg(sipd.addr.to_string())
        .args([
            "-sf",
            profiles.join("call-cancel-uac.xml").to_str().unwrap(),
        ])
        .args([
            "-s",
            "bob",
            "-i",
            &client_ip().to_string(),
            "-p",
            "6382",
            "-t",
            "2",
        ])
        .args(["-m", "300", "-r", "150", "-d", "50", "-timeout", "60"])
        .output()
        .unwrap();
    let caller = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{caller}");
    assert_eq!(value(&caller, "successful"), "300", "{caller}");
    assert_eq!(value(&caller, "retransmissions"), "0", "{caller}");
    let callee = callee.wait_with_output().unwrap();
    let callee = String::from_utf8_lossy(&callee.stdout).into_owned();
    assert_eq!(value(&callee, "successful"), "300", "{callee}");
    assert_eq!(value(&callee, "failed"), "0", "{callee}");
}

#[test]
fn sipload_plays_both_sides_of_calls_through_the_proxy() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    // The callee registers from the port its sipload will answer on.
    let uas = std::net::SocketAddr::new(client_ip().into(), 6390);
    register_callee(&sipd, uas);
    let profiles = repo_root().join("perf/profiles");
    let callee = Command::new(env!("CARGO_BIN_EXE_sipload"))
        .args(["-sf", profiles.join("call-uas.xml").to_str().unwrap()])
        .args(["-i", &uas.ip().to_string(), "-p", "6390", "-t", "1"])
        .args(["-m", "500", "-timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = Command::new(env!("CARGO_BIN_EXE_sipload"))
        .arg(sipd.addr.to_string())
        .args(["-sf", profiles.join("call-uac.xml").to_str().unwrap()])
        .args([
            "-s",
            "bob",
            "-i",
            &client_ip().to_string(),
            "-p",
            "6380",
            "-t",
            "2",
        ])
        .args(["-m", "500", "-r", "250", "-d", "100", "-timeout", "60"])
        .output()
        .unwrap();
    let caller = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{caller}");
    assert_eq!(value(&caller, "successful"), "500", "{caller}");
    let callee = callee.wait_with_output().unwrap();
    let callee = String::from_utf8_lossy(&callee.stdout).into_owned();
    assert_eq!(value(&callee, "successful"), "500", "{callee}");
    assert_eq!(value(&callee, "failed"), "0", "{callee}");
}

#[test]
fn sipload_runs_the_presence_profiles_with_no_failure() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    // PUBLISH, then its removal under the entity tag the 200 gave (an <ereg>).
    let r = sipload(&sipd, "presence-publish.xml", 6340, 1000, 1000);
    assert_eq!(value(&r, "successful"), "1000", "{r}");
    // SUBSCRIBE, the NOTIFY answered, the unsubscription in the dialog (the notifier's
    // tag and Contact), the final NOTIFY answered.
    let r = sipload(&sipd, "presence-subscribe.xml", 6350, 500, 500);
    assert_eq!(value(&r, "successful"), "500", "{r}");
    // The mixed profile: REGISTER, OPTIONS, PUBLISH, SUBSCRIBE and their removals.
    let r = sipload(&sipd, "mixed.xml", 6360, 500, 500);
    assert_eq!(value(&r, "successful"), "500", "{r}");
    let dump = sipd.sipctl_json(&["usrloc", "dump"]);
    assert_eq!(dump.as_array().map(Vec::len), Some(0), "{dump}");
    let l = sipd.sipctl_json(&["presence", "list"]);
    assert_eq!(l["presentities"], 0, "{l}");
    assert_eq!(l["watchers"], 0, "{l}");
}
