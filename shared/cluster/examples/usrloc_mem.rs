//! Memory and speed of the user-location table at scale.
//!
//! `cargo run --release -p sipmesh-cluster --example usrloc_mem [N] [wheel_slots] [pad]`
//!
//! `pad` appends that many bytes (a `;x=...` URI parameter) to every contact, to see how
//! sensitive the figure is to allocator size classes.
//!
//! Loads N AoRs (default 1,000,000) with one binding each (realistic sizes: AoR
//! `user123456@example.com`, contact `sip:user123456@192.0.2.10:5060;transport=udp`, 36-byte
//! Call-ID, no Path/instance/User-Agent) plus one timer-wheel entry per binding holding the
//! table's key `Arc`, as the registrar does; reports VmRSS growth per contact and times
//! insert / refresh / lookup.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mimalloc::MiMalloc;
use sipmesh_cluster::usrloc::{BindingParts, Q_NONE, TRANSPORT_UDP};
use sipmesh_cluster::{AorRecord, Binding, NodeId, TimerWheel, Update, Usrloc, next_version};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

struct Gen {
    pad: usize,
    aor: String,
    contact: String,
    call_id: String,
}

impl Gen {
    fn new(pad: usize) -> Self {
        Gen {
            pad,
            aor: String::new(),
            contact: String::new(),
            call_id: String::new(),
        }
    }

    fn set(&mut self, i: u32) {
        self.aor.clear();
        self.contact.clear();
        self.call_id.clear();
        let _ = write!(self.aor, "user{i:06}@example.com");
        let _ = write!(self.contact, "sip:user{i:06}@192.0.2.10:5060;transport=udp");
        if self.pad > 0 {
            self.contact.push_str(";x=");
            for _ in 3..self.pad.max(3) {
                self.contact.push('p');
            }
        }
        let _ = write!(
            self.call_id,
            "{i:08x}-d9cb-469f-a165-{:012x}",
            i.wrapping_mul(2_654_435_761)
        );
    }

    fn parts(&self, expires_at: u32, cseq: u32, version: u64, now: u32) -> BindingParts<'_> {
        BindingParts {
            contact: self.contact.as_bytes(),
            call_id: self.call_id.as_bytes(),
            path: b"",
            instance: b"",
            user_agent: b"",
            tag: b"",
            expires_at,
            cseq,
            q: Q_NONE,
            reg_id: 0,
            source: SocketAddr::from(([192, 0, 2, 10], 5060)),
            transport: TRANSPORT_UDP,
            flags: 0,
            version,
            origin: NodeId(1),
            last_modified: now,
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let slots: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4096);
    let pad: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let now: u32 = 1_700_000_000;
    let now_ms = now as u64 * 1000;

    let mut g = Gen::new(pad);
    g.set(123_456);
    println!(
        "n={n} aor={}B contact={}B call_id={}B size_of::<Binding>()={} wheel_slots={slots}",
        g.aor.len(),
        g.contact.len(),
        g.call_id.len(),
        std::mem::size_of::<Binding>()
    );

    let rss0 = rss_bytes();
    let table = Usrloc::new(n as usize);
    let mut wheel: TimerWheel<Arc<[u8]>> = TimerWheel::new(now, slots);
    let rss_empty = rss_bytes();

    // Insert.
    let t = Instant::now();
    let mut version = 0u64;
    for i in 0..n {
        g.set(i);
        let expires_at = now + 600 + i % 3600;
        version = next_version(version, now_ms, 0);
        let o = table.update(g.aor.as_bytes(), |_| {
            Update::Replace(
                AorRecord::single(Binding::new(g.parts(expires_at, 1, version, now))),
                (),
            )
        });
        if let Some(key) = o.key {
            wheel.insert(expires_at, key);
        }
    }
    let insert = t.elapsed();
    let rss1 = rss_bytes();
    let grown = rss1.saturating_sub(rss0);
    println!(
        "insert:  {:>7.1} ns/op  ({:.2} s total)",
        insert.as_nanos() as f64 / n as f64,
        insert.as_secs_f64()
    );
    println!(
        "VmRSS before {} MiB, empty table {} MiB, loaded {} MiB",
        rss0 >> 20,
        rss_empty >> 20,
        rss1 >> 20
    );
    println!(
        "=> {:.1} bytes RSS per contact (table {}, bindings {}, wheel items {}, wheel reserved {} B)",
        grown as f64 / n as f64,
        table.aors(),
        table.bindings(),
        wheel.len(),
        wheel.reserved_bytes()
    );

    // Lookup.
    let t = Instant::now();
    let mut hits = 0u64;
    for i in 0..n {
        g.set(i);
        hits += table.read(g.aor.as_bytes(), |r| {
            r.map_or(0, |r| {
                (r.bindings()[0].contact().len() == g.contact.len()) as u64
            })
        });
    }
    let lookup = t.elapsed();
    assert_eq!(hits, n as u64);
    println!(
        "lookup:  {:>7.1} ns/op (incl. key formatting)",
        lookup.as_nanos() as f64 / n as f64
    );

    // Lookup from both cores at once.
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..2u32 {
            let table = &table;
            s.spawn(move || {
                let mut g = Gen::new(pad);
                let mut hits = 0u32;
                for i in (th..n).step_by(2) {
                    g.set(i);
                    hits += table.read(g.aor.as_bytes(), |r| r.is_some() as u32);
                }
                assert_eq!(hits, n / 2 + (th < n % 2) as u32);
            });
        }
    });
    let lookup2 = t.elapsed();
    println!(
        "lookup x2 threads: {:>7.1} ns/op aggregate",
        lookup2.as_nanos() as f64 / n as f64
    );

    // Refresh: same contact and Call-ID, new CSeq/expiry/version (copy-on-write record).
    let t = Instant::now();
    for i in 0..n {
        g.set(i);
        version = next_version(version, now_ms + 1000, 0);
        let o = table.update(g.aor.as_bytes(), |cur| match cur {
            Some(rec) => {
                let mut b = rec.bindings()[0].clone();
                b.cseq += 1;
                b.expires_at += 3600;
                b.version = version;
                b.last_modified = now + 1;
                Update::Replace(AorRecord::single(b), ())
            }
            None => Update::Keep(()),
        });
        debug_assert!(o.key.is_some());
    }
    let refresh = t.elapsed();
    let rss2 = rss_bytes();
    println!(
        "refresh: {:>7.1} ns/op",
        refresh.as_nanos() as f64 / n as f64
    );
    println!(
        "VmRSS after refresh {} MiB => {:.1} bytes per contact",
        rss2 >> 20,
        rss2.saturating_sub(rss0) as f64 / n as f64
    );

    // Expire everything through the wheel (the registrar's expiry path).
    let t = Instant::now();
    let mut fired = 0u64;
    let mut removed = 0u64;
    wheel.advance(now + 10_000, |key| {
        fired += 1;
        let o = table.update(&key, |cur| match cur {
            Some(r) if r.min_expires_at().is_some_and(|e| e <= now + 10_000) => Update::Remove(()),
            _ => Update::Keep(()),
        });
        removed += (o.applied == sipmesh_cluster::Applied::Removed) as u64;
    });
    let expire = t.elapsed();
    println!(
        "expire:  {:>7.1} ns/op (fired {fired}, removed {removed}, left {} AoRs)",
        expire.as_nanos() as f64 / n as f64,
        table.aors()
    );
}
