//! End-to-end sans-IO handling by `Core::on_message`: one REGISTER refresh, one OPTIONS.
//!
//! The `Core` is built as in `dataplane/tests/common/mod.rs` (a `Registrar` on a shared
//! `Usrloc`, a change ring), with an `Outbox` that writes every reply into one reused
//! buffer. Virtual time stands still, so the Date header cache always hits.
//!
//! A refresh is a REGISTER of an already bound contact with the same Call-ID and a higher
//! CSeq: the CSeq is a zero-padded 10-digit field bumped in place before each call, so
//! every call is a genuine refresh (200 OK, one upsert record on the change ring, one
//! timer-wheel entry). The change ring is drained between chunks of `CHUNK` messages with
//! the timer stopped: in production its consumer is the control plane, on another thread,
//! so the figures are the worker's cost only.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mimalloc::MiMalloc;
use sipmesh_benches::msgs;
use sipmesh_cluster::NodeId;
use sipmesh_cluster::ring::{ChangeConsumer, change_ring};
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::core::{Core, CoreConfig, CoreStats};
use sipmesh_dataplane::io::{ConnId, Dest, Handler, Millis, Outbox, Source, Transport};
use sipmesh_dataplane::registrar::{Registrar, RegistrarConfig, RegistrarStats};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const T0: Millis = 1_800_000_000_000;
/// Change ring size; a chunk of refreshes produces well under a quarter of it.
const RING_BYTES: usize = 8 << 20;
/// Messages between two (untimed) drains of the change ring.
const CHUNK: u64 = 4096;

/// Writes each reply into one buffer allocated once; keeps the last destination/length.
struct BenchOutbox {
    buf: Vec<u8>,
    last: Option<(Dest, usize)>,
    closed: usize,
}

impl BenchOutbox {
    fn new() -> Self {
        BenchOutbox {
            buf: vec![0; 65_535],
            last: None,
            closed: 0,
        }
    }

    fn last_reply(&self) -> &[u8] {
        self.last.map_or(&[][..], |(_, n)| &self.buf[..n])
    }
}

impl Outbox for BenchOutbox {
    #[inline]
    fn send(&mut self, to: Dest, fill: impl FnOnce(&mut [u8]) -> usize) {
        let n = fill(&mut self.buf);
        if n > 0 {
            self.last = Some((to, n));
        }
    }

    fn close(&mut self, _conn: ConnId) {
        self.closed += 1;
    }
}

struct Bench {
    core: Core,
    out: BenchOutbox,
    changes: ChangeConsumer,
    table: Arc<Usrloc>,
    reg_stats: Arc<RegistrarStats>,
    src: Source,
    now: Millis,
}

impl Bench {
    fn new(aors: usize) -> Bench {
        let table = Arc::new(Usrloc::new(aors.max(1024)));
        let (p, c) = change_ring(RING_BYTES);
        let reg_stats = Arc::new(RegistrarStats::default());
        let reg = Registrar::new(
            RegistrarConfig::default(),
            table.clone(),
            p,
            NodeId(7),
            0,
            T0,
            reg_stats.clone(),
        );
        Bench {
            core: Core::new(CoreConfig::default(), reg, Arc::new(CoreStats::default())),
            out: BenchOutbox::new(),
            changes: c,
            table,
            reg_stats,
            src: Source {
                transport: Transport::Udp,
                remote: "192.0.2.10:5062".parse().unwrap(),
                local: "198.51.100.1:5060".parse::<SocketAddr>().unwrap(),
                conn: None,
            },
            now: T0,
        }
    }

    #[inline]
    fn send(&mut self, msg: &[u8]) {
        self.core
            .on_message(msg, &self.src, self.now, &mut self.out);
    }

    fn drain(&mut self) {
        while self.changes.pop_frame_scratch().is_some() {}
    }

    fn expect_200(&self, what: &str) {
        let r = self.out.last_reply();
        assert!(
            r.starts_with(b"SIP/2.0 200 "),
            "{what}: {}",
            String::from_utf8_lossy(r)
        );
    }
}

/// One REGISTER per AoR, with its CSeq field and next CSeq.
struct Registers {
    msgs: Vec<(Vec<u8>, usize, u32)>,
}

impl Registers {
    /// Registers `n` users (untimed) and returns their refresh messages.
    fn bind(b: &mut Bench, n: usize) -> Registers {
        let mut msgs = Vec::with_capacity(n);
        for i in 0..n {
            let user = if n == 1 {
                "alice".to_string()
            } else {
                format!("u{i:06}")
            };
            let (m, at) = msgs::register_for(&user);
            b.send(&m);
            b.expect_200("initial REGISTER");
            msgs.push((m, at, 2));
            if (i as u64).is_multiple_of(CHUNK) {
                b.drain();
            }
        }
        b.drain();
        assert_eq!(b.table.aors(), n);
        Registers { msgs }
    }
}

/// `iters` refreshes round-robin over `regs`, timed in chunks with the ring drained
/// in between.
fn refreshes(b: &mut Bench, regs: &mut Registers, next: &mut usize, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    let n = regs.msgs.len();
    while left > 0 {
        let chunk = left.min(CHUNK);
        let start = Instant::now();
        for _ in 0..chunk {
            let (m, at, cseq) = &mut regs.msgs[*next];
            msgs::put_cseq(&mut m[*at..], *cseq);
            *cseq += 1;
            b.send(black_box(m));
            *next += 1;
            if *next == n {
                *next = 0;
            }
        }
        total += start.elapsed();
        black_box(b.out.last);
        b.drain();
        left -= chunk;
    }
    total
}

fn bench_register(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    for (name, aors) in [
        ("register_refresh", 1),
        ("register_refresh_10k_aors", 10_000),
    ] {
        let mut b = Bench::new(aors);
        let mut regs = Registers::bind(&mut b, aors);
        // One refresh first, checked: 200 OK.
        let mut next = 0;
        refreshes(&mut b, &mut regs, &mut next, 1);
        b.expect_200("refresh");
        let before = b
            .reg_stats
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed);
        g.bench_function(name, |bn| {
            bn.iter_custom(|iters| refreshes(&mut b, &mut regs, &mut next, iters))
        });
        // Every refresh was accepted (no 500 out-of-order CSeq, no 503 ring full).
        b.expect_200("last refresh");
        let after = b
            .reg_stats
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(before, after, "{name}: refreshes were rejected");
        assert_eq!(b.table.aors(), aors);
        assert_eq!(b.table.bindings(), aors);
        assert_eq!(b.out.closed, 0);
    }
    g.finish();
}

fn bench_options(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    let mut b = Bench::new(0);
    let msg = msgs::OPTIONS.as_bytes();
    b.send(msg);
    b.expect_200("OPTIONS");
    g.bench_function("options", |bn| {
        bn.iter(|| {
            b.send(black_box(msg));
            black_box(b.out.last)
        })
    });
    b.expect_200("OPTIONS");
    g.finish();
}

criterion_group!(benches, bench_register, bench_options);
criterion_main!(benches);
