//! Sharing tags across two real `sipd` processes: `sipctl tag activate` moves a tag and
//! the holder steps down (both ownership segments agree), the holder's death moves it by
//! itself, and the terms survive a restart so a stale node cannot take the tag back.

use std::time::{Duration, Instant};

use serde_json::Value;
use sipmesh_tests::{Sipd, TEST_CONFIG};

fn vip(node: &Sipd) -> Value {
    node.sipctl_json(&["tag", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "vip")
        .cloned()
        .unwrap_or(Value::Null)
}

fn owns_vip_slot(node: &Sipd) -> bool {
    let slot = vip(node)["slot"].as_u64().unwrap();
    node.sipctl_json(&["ownership"])["active_tag_slots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s.as_u64() == Some(slot))
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    sipmesh_tests::wait_for(limit, || f().then_some(())).is_some()
}

#[test]
fn a_tag_moves_on_activation_and_on_failure_and_its_term_survives_a_restart() {
    let n1 = Sipd::start(TEST_CONFIG, &["--node-id", "1", "--tag", "vip=active"]);
    let j1 = n1.grpc.to_string();
    let dir2 = std::env::temp_dir().join(format!("sipmesh-tags-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir2);
    let d2 = dir2.display().to_string();
    let n2_args = [
        "--node-id",
        "2",
        "--tag",
        "vip=backup",
        "--join",
        &j1,
        "--data-dir",
        &d2,
    ];
    let mut n2 = Sipd::start(TEST_CONFIG, &n2_args);
    assert!(
        wait_for(Duration::from_secs(10), || vip(&n2)["holder"] == 1
            && owns_vip_slot(&n1)),
        "{} / {}",
        vip(&n1),
        vip(&n2)
    );
    assert!(!owns_vip_slot(&n2));
    // A named tag acts only on a synced node: let node 2 finish its sync first.
    assert!(wait_for(Duration::from_secs(10), || {
        n2.sipctl_json(&["sync", "status"])[0]["state"] == "synced"
    }));

    // The operator moves it to node 2.
    let out = n2.sipctl(&["tag", "activate", "vip"]).unwrap();
    assert_eq!(out.trim(), "tag vip active here with term 2");
    let t0 = Instant::now();
    assert!(wait_for(Duration::from_secs(5), || vip(&n1)["holder"] == 2
        && !owns_vip_slot(&n1)));
    println!(
        "node 1 stepped down {} ms after the activation",
        t0.elapsed().as_millis()
    );
    assert!(wait_for(Duration::from_secs(5), || owns_vip_slot(&n2)));
    let hist = n1.sipctl_json(&["tag", "history"]);
    let last = hist.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["became"], "backup");
    assert_eq!(last["reason"], "activated on node 2, term 2");

    // Node 2 dies: node 1 (the only other candidate) takes the tag with term 3.
    n2.kill9();
    let t0 = Instant::now();
    assert!(wait_for(Duration::from_secs(10), || vip(&n1)["holder"]
        == 1
        && owns_vip_slot(&n1)));
    println!(
        "failover to node 1 {} ms after node 2 was killed",
        t0.elapsed().as_millis()
    );
    assert_eq!(vip(&n1)["term"], 3);
    // The segment file says the same, read without the server.
    let out = std::process::Command::new(sipmesh_tests::sipctl_bin())
        .args(["--json", "ownership", "--segment"])
        .arg(&n1.own_segment)
        .output()
        .unwrap();
    let seg: Value = serde_json::from_slice(&out.stdout).unwrap();
    let slot = vip(&n1)["slot"].clone();
    assert!(
        seg["active_tag_slots"].as_array().unwrap().contains(&slot),
        "{seg}"
    );
    assert_eq!(seg["node_id"], 1);
    let last = n1
        .sipctl_json(&["tag", "history"])
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last["reason"],
        "activated on this node: failover, node 2 unreachable"
    );

    // Node 2 comes back from its store, configured active, remembering term 2: it must
    // not take the tag back.
    let n2 = Sipd::start(
        TEST_CONFIG,
        &[
            "--node-id",
            "2",
            "--tag",
            "vip=active",
            "--join",
            &j1,
            "--data-dir",
            &d2,
        ],
    );
    assert!(wait_for(Duration::from_secs(10), || vip(&n2)["term"] == 3));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vip(&n2)["holder"], 1, "{}", vip(&n2));
    assert!(!owns_vip_slot(&n2) && owns_vip_slot(&n1));
    drop(n2);
    let _ = std::fs::remove_dir_all(&dir2);
}
