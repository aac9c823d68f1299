//! `sipload` end to end against a running `sipd`: the bundled register and OPTIONS
//! profiles, a short run each, every call successful.

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
}
