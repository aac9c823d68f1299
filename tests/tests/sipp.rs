//! SIPp, the outside client, registers distinct users over UDP and TCP with the bundled
//! load profile; every call must succeed and every binding must be in the table and in
//! the change stream.

use std::process::Command;
use std::time::Duration;

use sipmesh_tests::*;

fn sipp(sipd: &Sipd, transport: &str, calls: u32, rate: u32, port: u16) -> std::process::Output {
    let profile = repo_root().join("perf/profiles/register.xml");
    let local = client_ip().to_string();
    // Bounded in count (-m) and time (-timeout); loopback only.
    Command::new("sipp")
        .arg(sipd.addr.to_string())
        .args(["-sf", profile.to_str().unwrap()])
        .args(["-t", transport, "-i", &local, "-p", &port.to_string()])
        .args([
            "-m",
            &calls.to_string(),
            "-r",
            &rate.to_string(),
            "-l",
            "500",
        ])
        .args([
            "-timeout",
            "90s",
            "-timeout_error",
            "-nostdin",
            "-max_socket",
            "2000",
        ])
        .output()
        .expect("sipp is installed (Debian package sip-tester; tests/run.sh installs it)")
}

fn run(transport: &str, calls: u32) {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let out = sipp(&sipd, transport, calls, 1000, 5070);
    assert_sipp_ok(&out, transport);
    let last = format!("aor=user{calls}@example.com");
    assert!(
        sipd.wait_change(&["op=upsert", &last], Duration::from_secs(10))
            .is_some()
    );
    let upserts = sipd
        .change_lines()
        .iter()
        .filter(|l| l.contains("op=upsert"))
        .count();
    assert_eq!(upserts, calls as usize, "one record per registered user");
    let stderr = sipd.stderr.clone();
    assert_eq!(sipd.stop(), Some(0));
    let text = stderr.lock().unwrap().clone();
    assert!(
        text.contains(&format!("{calls} bindings in {calls} AoRs")),
        "{text}"
    );
}

#[test]
fn sipp_registers_distinct_users_over_udp() {
    run("u1", 3000);
}

#[test]
fn sipp_registers_distinct_users_over_tcp() {
    run("t1", 1000);
}

#[test]
fn sipp_registers_over_one_tcp_connection_per_user() {
    run("tn", 1000);
}
