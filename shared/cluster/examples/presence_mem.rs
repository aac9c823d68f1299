//! Memory of the presence tables per presentity and per watcher.
//!
//! `cargo run --release -p sipmesh-cluster --example presence_mem [N]`
//!
//! Fills the tables with N presentities of one publication each (a PIDF document of about
//! 300 bytes: one tuple with status, contact and note, as softphones publish), then
//! N watchers of realistic sizes (36-byte Call-ID, 16-byte tags, From/To/Contact of a
//! softphone, one per presentity), as the presence server stores them, and reports VmRSS
//! growth per presentity and per watcher.

use std::sync::Arc;

use mimalloc::MiMalloc;
use sipmesh_cluster::NodeId;
use sipmesh_cluster::presence::{
    PresenceTable, Presentity, Publication, SubState, Watcher, presentity_key, watcher_key,
};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn a(s: String) -> Arc<[u8]> {
    Arc::from(s.into_bytes())
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let table = PresenceTable::new(0);
    let ct: Arc<[u8]> = Arc::from(&b"application/pidf+xml"[..]);
    let before = rss_bytes();
    let mut key = Vec::new();
    let mut body_bytes = 0;
    for i in 0..n {
        let aor = format!("user{i:06}@example.com");
        presentity_key(b"presence", aor.as_bytes(), &mut key);
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
             entity=\"sip:{aor}\"><tuple id=\"t{i:08x}\"><status><basic>open</basic></status>\
             <contact priority=\"0.8\">sip:{aor}</contact><note>Available</note></tuple></presence>"
        );
        body_bytes += body.len();
        let p = Publication {
            etag: a(format!("{:016x}", i as u64 * 7919)),
            content_type: ct.clone(),
            body: a(body),
            published_ms: 1_800_000_000_000,
            expires_ms: 1_800_003_600_000,
            version: 1,
            origin: NodeId(1),
        };
        table.update_presentity(&key, |_| {
            Some(Presentity {
                pubs: vec![p.clone()],
            })
        });
    }
    let mid = rss_bytes();
    for i in 0..n {
        let aor = format!("user{i:06}@example.com");
        presentity_key(b"presence", aor.as_bytes(), &mut key);
        let call_id = format!("{i:08x}-4c2a-11ee-9d3b-0242ac120002");
        let local = format!("{:016x}", i as u64 * 104_729);
        let remote = format!("{:016x}", i as u64 * 15_485_863);
        let w = Watcher {
            id: table.next_id(NodeId(1), 0),
            presentity: Arc::from(&key[..]),
            call_id: a(call_id.clone()),
            local_tag: a(local.clone()),
            remote_tag: a(remote.clone()),
            watcher_uri: a(format!("sip:watcher{i:06}@example.com")),
            from_hdr: a(format!("<sip:watcher{i:06}@example.com>;tag={remote}")),
            to_hdr: a(format!("<sip:{aor}>")),
            contact: a(format!("sip:watcher{i:06}@198.51.100.7:5080;transport=udp")),
            routes: Arc::from(&b""[..]),
            addr: Some("198.51.100.7:5080".parse().unwrap()),
            state: SubState::Active,
            created_ms: 1_800_000_000_000,
            expires_ms: 1_800_003_600_000,
            remote_cseq: 1,
            local_cseq: 1,
            version: 1,
            origin: NodeId(1),
        };
        let mut wk = Vec::new();
        watcher_key(
            call_id.as_bytes(),
            local.as_bytes(),
            remote.as_bytes(),
            &mut wk,
        );
        table.update_watcher(&wk, |_| Some(w.clone()));
    }
    let after = rss_bytes();
    println!(
        "{n} presentities: VmRSS +{} MiB, {} B per presentity (one publication of {} B)",
        (mid - before) >> 20,
        (mid - before) / n.max(1),
        body_bytes / n.max(1),
    );
    println!(
        "{n} watchers: VmRSS +{} MiB, {} B per watcher (struct {} B)",
        (after - mid) >> 20,
        (after - mid) / n.max(1),
        std::mem::size_of::<Watcher>()
    );
    assert_eq!(table.presentities(), n);
    assert_eq!(table.watchers(), n);
}
