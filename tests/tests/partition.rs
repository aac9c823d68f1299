//! Three `sipd` processes, each in a network namespace this test makes, joined by one veth
//! link per pair with static routes between node addresses, so that single links can be
//! cut. Checks relaying around a cut link and gap repair after a partition heals.
//!
//! Needs root (network namespaces) and `ip` (iproute2; `tests/run.sh` installs it).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sipmesh_tests::{Sipd, TEST_CONFIG, repo_root, wait_for};

/// The namespaces and links of one test run; removed on drop (also after a failure).
struct Net {
    tag: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn ns(&self, n: u8) -> String {
        format!("{}n{n}", self.tag)
    }

    fn veth(&self, a: u8, b: u8) -> String {
        format!("{}v{a}{b}", self.tag)
    }

    /// Node `n` has address 10.77.0.n on its loopback; pair (a, b) gets 10.78.ab.0/30.
    fn build() -> Net {
        let tag = format!("sm{}", std::process::id() % 100_000);
        let net = Net { tag };
        for n in 1..=3u8 {
            let ns = net.ns(n);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{n}/32"),
                "dev",
                "lo",
            ]);
        }
        for (a, b) in [(1u8, 2u8), (1, 3), (2, 3)] {
            let (va, vb) = (net.veth(a, b), net.veth(b, a));
            let (na, nb) = (net.ns(a), net.ns(b));
            ip(&[
                "link", "add", &va, "netns", &na, "type", "veth", "peer", "name", &vb, "netns", &nb,
            ]);
            let sub = format!("10.78.{a}{b}");
            ip(&["-n", &na, "addr", "add", &format!("{sub}.1/30"), "dev", &va]);
            ip(&["-n", &nb, "addr", "add", &format!("{sub}.2/30"), "dev", &vb]);
            ip(&["-n", &na, "link", "set", &va, "up"]);
            ip(&["-n", &nb, "link", "set", &vb, "up"]);
            ip(&[
                "-n",
                &na,
                "route",
                "add",
                &format!("10.77.0.{b}/32"),
                "via",
                &format!("{sub}.2"),
            ]);
            ip(&[
                "-n",
                &nb,
                "route",
                "add",
                &format!("10.77.0.{a}/32"),
                "via",
                &format!("{sub}.1"),
            ]);
        }
        net
    }

    /// Cuts (or restores) the link between `a` and `b` (`a` < `b`).
    fn set_link(&self, a: u8, b: u8, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns(a), "link", "set", &self.veth(a, b), state]);
        ip(&["-n", &self.ns(b), "link", "set", &self.veth(b, a), state]);
        if up {
            // Bringing a link up drops its routes' nexthop state; put the routes back.
            let sub = format!("10.78.{a}{b}");
            let _ = Command::new("ip")
                .args([
                    "-n",
                    &self.ns(a),
                    "route",
                    "replace",
                    &format!("10.77.0.{b}/32"),
                    "via",
                    &format!("{sub}.2"),
                ])
                .status();
            let _ = Command::new("ip")
                .args([
                    "-n",
                    &self.ns(b),
                    "route",
                    "replace",
                    &format!("10.77.0.{a}/32"),
                    "via",
                    &format!("{sub}.1"),
                ])
                .status();
        }
    }

    fn start(&self, n: u8, extra: &[&str]) -> Sipd {
        let ns = self.ns(n);
        let addr = format!("10.77.0.{n}:5060").parse().unwrap();
        let grpc = format!("10.77.0.{n}:50051");
        let mut args = vec![
            "--node-id",
            match n {
                1 => "1",
                2 => "2",
                _ => "3",
            },
            "--grpc",
            &grpc,
        ];
        args.extend_from_slice(extra);
        Sipd::start_wrapped(&["ip", "netns", "exec", &ns], addr, TEST_CONFIG, &args)
    }

    /// Registers `count` users named `prefix<i>` on node `n` from inside its namespace.
    fn register(&self, n: u8, prefix: &str, count: u32) -> u32 {
        let script = repo_root().join("tests/data/sip_register.py");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(n), "python3"])
            .arg(script)
            .arg(format!("10.77.0.{n}:5060"))
            .arg(prefix)
            .arg(count.to_string())
            .output()
            .expect("run sip_register.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in 1..=3u8 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
        }
    }
}

fn node_view(node: &Sipd, id: u64) -> Value {
    node.sipctl_json(&["node", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn relaying_around_a_cut_link_and_gap_repair_after_a_partition() {
    let net = Net::build();
    let n1 = net.start(1, &[]);
    let n2 = net.start(2, &["--join", "10.77.0.1:50051"]);
    let n3 = net.start(3, &["--join", "10.77.0.2:50051"]);
    let nodes = [&n1, &n2, &n3];
    for (i, n) in nodes.iter().enumerate() {
        let ok = wait_for(Duration::from_secs(15), || {
            let all_up = (1..=3u64)
                .filter(|id| *id != i as u64 + 1)
                .all(|id| node_view(n, id)["link"] == "up");
            (all_up && n.usrloc_status()["state"] == "synced").then_some(())
        });
        assert!(
            ok.is_some(),
            "node {} never saw the full mesh: {}",
            i + 1,
            n.sipctl_json(&["node", "list"])
        );
    }

    // Cut 1-3: node 1 still reaches node 3, through node 2.
    net.set_link(1, 3, false);
    let via = wait_for(Duration::from_secs(5), || {
        let v = node_view(&n1, 3);
        (v["link"] == "down" && v["state"] == "up" && v["next_hop"] == 2).then_some(v)
    });
    assert!(
        via.is_some(),
        "node 1's view of node 3: {}",
        node_view(&n1, 3)
    );
    // Each end notices on its own heartbeat schedule.
    let v31 = wait_for(Duration::from_secs(5), || {
        let v = node_view(&n3, 1);
        (v["link"] == "down" && v["state"] == "up" && v["next_hop"] == 2).then_some(v)
    });
    assert!(
        v31.is_some(),
        "node 3's view of node 1: {}",
        node_view(&n3, 1)
    );
    assert_eq!(net.register(1, "relayed", 50), 50);
    let got = wait_for(Duration::from_secs(5), || {
        (n3.usrloc_status()["count"] == 50).then_some(())
    });
    assert!(
        got.is_some(),
        "node 3 has {} contacts",
        n3.usrloc_status()["count"]
    );
    let ev = n1.sipctl_json(&["events"]);
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "link-down" && e["node_id"] == 3),
        "{ev}"
    );

    // Isolate node 1 (cut 1-2 as well), register there, heal: the others notice the
    // records they missed from node 1's advertisement and get them resent.
    net.set_link(1, 2, false);
    let alone = wait_for(Duration::from_secs(5), || {
        (node_view(&n2, 1)["state"] == "down"
            && node_view(&n3, 1)["state"] == "down"
            && node_view(&n1, 2)["state"] == "down"
            && node_view(&n1, 3)["state"] == "down")
            .then_some(())
    });
    assert!(
        alone.is_some(),
        "node 1 not reported down: {}",
        node_view(&n2, 1)
    );
    assert_eq!(net.register(1, "isolated", 40), 40);
    assert_eq!(n1.usrloc_status()["count"], 90);
    assert_eq!(n2.usrloc_status()["count"], 50);
    net.set_link(1, 2, true);
    net.set_link(1, 3, true);
    let healed = wait_for(Duration::from_secs(10), || {
        let (a, b, c) = (n1.usrloc_status(), n2.usrloc_status(), n3.usrloc_status());
        (b["count"] == 90
            && c["count"] == 90
            && a["digest"] == b["digest"]
            && a["digest"] == c["digest"])
            .then_some((b, c))
    });
    let (b, c) = healed.unwrap_or_else(|| {
        panic!(
            "not converged: {} / {} / {}",
            n1.usrloc_status(),
            n2.usrloc_status(),
            n3.usrloc_status()
        )
    });
    for s in [&b, &c] {
        // Repaired by resend from node 1's replay buffer, not by a full sync.
        assert!(s["gaps_repaired"].as_u64().unwrap() >= 1, "{s}");
        assert_eq!(s["syncs_completed"], 1, "{s}");
    }
    drop((n1, n2, n3));
}
