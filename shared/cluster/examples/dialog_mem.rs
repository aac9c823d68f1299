//! Memory of the dialog table per live call.
//!
//! `cargo run --release -p sipmesh-cluster --example dialog_mem [N]`
//!
//! Fills the table with N confirmed calls (default 200 000) of realistic sizes (36-byte
//! Call-ID, 10-byte tags, `sip:caller123456@example.com` / `sip:bob123456@example.com`,
//! contacts with an address and port, the INVITE's From and To, both legs' addresses),
//! as the proxy stores them, and reports VmRSS growth per dialog.

use mimalloc::MiMalloc;
use sipmesh_cluster::NodeId;
use sipmesh_cluster::dialog::{Dialog, DialogState, DialogTable, Legs, dialog_key};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn b(s: String) -> Box<[u8]> {
    s.into_bytes().into_boxed_slice()
}

fn a(s: String) -> std::sync::Arc<[u8]> {
    std::sync::Arc::from(s.into_bytes())
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let table = DialogTable::new(0);
    let before = rss_bytes();
    let mut key = Vec::new();
    for i in 0..n {
        let call_id = format!("{i:08x}-4c2a-11ee-9d3b-0242ac120002");
        let from_tag = format!("{:010x}", i * 7919);
        dialog_key(call_id.as_bytes(), from_tag.as_bytes(), &mut key);
        let d = Dialog {
            id: table.next_id(NodeId(1), 0),
            state: DialogState::Confirmed,
            call_id: a(call_id),
            from_tag: a(from_tag.clone()),
            to_tag: b(format!("{:010x}", i * 104_729)),
            early_tags: 1,
            caller: a(format!("sip:caller{i:06}@example.com")),
            callee: a(format!("sip:bob{i:06}@example.com")),
            created_ms: 1_800_000_000_000,
            answered_ms: 1_800_000_002_000,
            ended_ms: 0,
            expires_ms: 1_800_043_200_000,
            end: None,
            origin: NodeId(1),
            version: 1,
            legs: Legs {
                from_hdr: a(format!("<sip:caller{i:06}@example.com>;tag={from_tag}")),
                to_hdr: a(format!("<sip:bob{i:06}@example.com>")),
                caller_contact: a(format!("sip:caller{i:06}@198.51.100.7:5080")),
                callee_contact: b(format!("sip:bob{i:06}@203.0.113.9:5090;transport=udp")),
                caller_addr: Some("198.51.100.7:5080".parse().unwrap()),
                callee_addr: Some("203.0.113.9:5090".parse().unwrap()),
                caller_cseq: 1,
                callee_cseq: 0,
                pings: 0,
            },
        };
        table.insert(&key, d);
    }
    let after = rss_bytes();
    println!(
        "{n} dialogs: VmRSS +{} MiB, {} B per dialog (struct {} B)",
        (after - before) >> 20,
        (after - before) / n.max(1),
        std::mem::size_of::<Dialog>()
    );
}
