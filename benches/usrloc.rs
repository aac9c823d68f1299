//! The user-location table: insert of new AoRs, refresh (replace the binding of an
//! existing AoR) and lookup hit, on 1 thread and on 2 threads.
//!
//! Keys and bindings are built before the timer starts; the timed loops only call
//! `Usrloc::update` / `Usrloc::read`. The 2-thread variants use `iter_custom`: two
//! long-lived threads, released together by a barrier, each do `iters` operations; the
//! sample time is the slower thread's, and the throughput is declared as 2 elements per iteration, so
//! criterion's elements/s is the *total* operations/s of both threads (its time is per
//! pair of operations).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier, LazyLock, mpsc};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mimalloc::MiMalloc;
use sipmesh_cluster::NodeId;
use sipmesh_cluster::usrloc::{
    AorRecord, Binding, BindingParts, Q_NONE, TRANSPORT_UDP, Update, Usrloc,
};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// AoRs in the table for the refresh and lookup benchmarks.
const POPULATION: usize = 100_000;

fn aor(i: usize) -> Vec<u8> {
    format!("user{i:07}@example.com").into_bytes()
}

/// Used when `Usrloc::update` re-runs a closure whose prebuilt binding was already taken.
static SPARE: LazyLock<Binding> = LazyLock::new(|| binding(0, 2));

/// A binding as a softphone REGISTER produces it (~150 bytes of strings).
fn binding(i: usize, cseq: u32) -> Binding {
    let contact = format!("sip:user{i:07}@192.0.2.{}:5062;transport=udp", i % 250);
    let call_id = format!("{i:016x}a84b4c76e66710@192.0.2.10");
    let source: SocketAddr = format!("192.0.2.{}:5062", i % 250).parse().unwrap();
    Binding::new(BindingParts {
        contact: contact.as_bytes(),
        call_id: call_id.as_bytes(),
        path: b"",
        instance: b"<urn:uuid:2a8c6f1e-4b3d-4e7a-9c15-0d6b8f2e1a37>",
        user_agent: b"Linphone/5.2.0",
        tag: b"",
        expires_at: 1_800_003_600,
        cseq,
        q: Q_NONE,
        reg_id: 0,
        source,
        transport: TRANSPORT_UDP,
        flags: 0,
        version: u64::from(cseq),
        origin: NodeId(1),
        last_modified: 1_800_000_000,
    })
}

/// Inserts `binding` as the only binding of `key` (which must be absent).
#[inline]
fn insert(table: &Usrloc, key: &[u8], b: Binding) {
    let mut b = Some(b);
    let out = table.update(key, |old| {
        debug_assert!(old.is_none());
        // `update` may run the closure again (the AoR or the table changed under it): the
        // prebuilt binding was moved into the first attempt, use a copy then.
        let b = b.take().unwrap_or_else(|| SPARE.clone());
        Update::Replace(AorRecord::single(b), ())
    });
    black_box(out.applied);
}

/// Replaces the record of `key` (present) with one holding `b`.
#[inline]
fn refresh(table: &Usrloc, key: &[u8], b: &mut Option<Binding>) {
    let out = table.update(key, |old| {
        // The registrar checks Call-ID / CSeq against the current binding first.
        let cur = old.map_or(0, |r| r.bindings()[0].cseq);
        let nb = b.take().unwrap_or_else(|| SPARE.clone());
        Update::Replace(AorRecord::single(nb), cur)
    });
    black_box(out.value);
}

#[inline]
fn lookup(table: &Usrloc, key: &[u8]) -> u32 {
    table.read(key, |r| r.map_or(0, |r| r.bindings()[0].expires_at))
}

/// A table holding `POPULATION` AoRs, with their keys.
fn populated() -> (Arc<Usrloc>, Arc<[Vec<u8>]>) {
    LazyLock::force(&SPARE);
    let table = Usrloc::new(POPULATION);
    let keys: Vec<Vec<u8>> = (0..POPULATION).map(aor).collect();
    for (i, k) in keys.iter().enumerate() {
        insert(&table, k, binding(i, 1));
    }
    assert_eq!(table.aors(), POPULATION);
    (Arc::new(table), keys.into())
}

/// One sample's work for one thread: prepare (untimed), wait at the barrier, return the
/// duration of the timed part.
type Job = Box<dyn FnOnce(&Barrier) -> Duration + Send>;

/// Two long-lived threads (like a node's workers: same threads, hence the same allocator
/// heaps, from one sample to the next; fresh threads per sample would turn every free
/// into a cross-thread free of an exited thread's memory).
struct Pair {
    jobs: Vec<mpsc::Sender<(Job, Arc<Barrier>)>>,
    done: mpsc::Receiver<Duration>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pair {
    fn new() -> Pair {
        let (done_tx, done) = mpsc::channel();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for t in 0..2 {
            let (tx, rx) = mpsc::channel::<(Job, Arc<Barrier>)>();
            let done_tx = done_tx.clone();
            jobs.push(tx);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-{t}"))
                    .spawn(move || {
                        for (job, barrier) in rx {
                            let d = job(&barrier);
                            if done_tx.send(d).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawn bench thread"),
            );
        }
        Pair {
            jobs,
            done,
            threads,
        }
    }

    /// Runs one job per thread, released together; the slower thread's time is the
    /// sample.
    fn run(&self, jobs: [Job; 2]) -> Duration {
        let barrier = Arc::new(Barrier::new(2));
        for (tx, job) in self.jobs.iter().zip(jobs) {
            tx.send((job, barrier.clone())).expect("bench thread alive");
        }
        let a = self.done.recv().expect("bench thread result");
        let b = self.done.recv().expect("bench thread result");
        a.max(b)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn bench_insert(c: &mut Criterion) {
    LazyLock::force(&SPARE);
    let pair = Pair::new();
    let mut g = c.benchmark_group("usrloc_insert");
    // A fresh table per sample, pre-sized like a configured registrar; the keys and
    // bindings of the sample are built before the timer starts (by the thread that then
    // inserts them).
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_thread", |b| {
        b.iter_custom(|iters| {
            let n = iters as usize;
            let table = Usrloc::new(n);
            let keys: Vec<Vec<u8>> = (0..n).map(aor).collect();
            let mut bindings: Vec<Binding> = (0..n).map(|i| binding(i, 1)).collect();
            let start = Instant::now();
            for (k, b) in keys.iter().zip(bindings.drain(..)) {
                insert(&table, k, b);
            }
            let t = start.elapsed();
            drop(table);
            t
        })
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("2_threads_disjoint", |b| {
        b.iter_custom(|iters| {
            let n = iters as usize;
            let table = Arc::new(Usrloc::new(2 * n));
            let jobs = [0, 1].map(|t| -> Job {
                let table = table.clone();
                Box::new(move |barrier: &Barrier| {
                    let keys: Vec<Vec<u8>> = (t * n..(t + 1) * n).map(aor).collect();
                    let mut mine: Vec<Binding> =
                        (t * n..(t + 1) * n).map(|i| binding(i, 1)).collect();
                    barrier.wait();
                    let start = Instant::now();
                    for (k, b) in keys.iter().zip(mine.drain(..)) {
                        insert(&table, k, b);
                    }
                    start.elapsed()
                })
            });
            let t = pair.run(jobs);
            assert_eq!(table.aors(), 2 * n);
            t
        })
    });
    g.finish();
}

/// Refreshes of `iters` AoRs: prebuilds (untimed) then replaces the binding of
/// `key_of(k)` for k in 0..iters.
fn refresh_run(
    table: &Usrloc,
    keys: &[Vec<u8>],
    iters: u64,
    key_of: impl Fn(usize) -> usize,
) -> Duration {
    let mut todo: Vec<(usize, Option<Binding>)> = (0..iters as usize)
        .map(|k| {
            let i = key_of(k);
            (i, Some(binding(i, 2)))
        })
        .collect();
    let start = Instant::now();
    for (i, b) in &mut todo {
        refresh(table, &keys[*i], b);
    }
    start.elapsed()
}

fn bench_refresh(c: &mut Criterion) {
    let (table, keys) = populated();
    let pair = Pair::new();
    let mut g = c.benchmark_group("usrloc_refresh");
    g.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    g.bench_function("1_thread", |b| {
        b.iter_custom(|iters| {
            // Round-robin over the population: each op hits another AoR.
            let base = next;
            next = (next + iters as usize) % POPULATION;
            refresh_run(&table, &keys, iters, |k| (base + k) % POPULATION)
        })
    });
    g.throughput(Throughput::Elements(2));
    for (name, shared) in [("2_threads_disjoint", false), ("2_threads_shared", true)] {
        let mut next = 0usize;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Disjoint: thread 0 refreshes the even AoRs, thread 1 the odd ones.
                // Shared: both walk every AoR, half the population apart.
                let base = next;
                next = (next + iters as usize) % POPULATION;
                let jobs = [0usize, 1].map(|t| -> Job {
                    let (table, keys) = (table.clone(), keys.clone());
                    Box::new(move |barrier: &Barrier| {
                        let key_of = move |k: usize| {
                            if shared {
                                (base + k + t * POPULATION / 2) % POPULATION
                            } else {
                                (2 * (base + k) + t) % POPULATION
                            }
                        };
                        let mut todo: Vec<(usize, Option<Binding>)> = (0..iters as usize)
                            .map(|k| {
                                let i = key_of(k);
                                (i, Some(binding(i, 2)))
                            })
                            .collect();
                        barrier.wait();
                        let start = Instant::now();
                        for (i, b) in &mut todo {
                            refresh(&table, &keys[*i], b);
                        }
                        start.elapsed()
                    })
                });
                pair.run(jobs)
            })
        });
    }
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let (table, keys) = populated();
    let pair = Pair::new();
    let mut g = c.benchmark_group("usrloc_lookup_hit");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("1_thread", |b| {
        b.iter(|| {
            i += 1;
            if i == POPULATION {
                i = 0;
            }
            black_box(lookup(&table, black_box(&keys[i])))
        })
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("2_threads_shared", |b| {
        b.iter_custom(|iters| {
            let jobs = [0, POPULATION / 2].map(|mut i| -> Job {
                let (table, keys) = (table.clone(), keys.clone());
                Box::new(move |barrier: &Barrier| {
                    let mut acc = 0u64;
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        i += 1;
                        if i == POPULATION {
                            i = 0;
                        }
                        acc += u64::from(lookup(&table, black_box(&keys[i])));
                    }
                    let d = start.elapsed();
                    black_box(acc);
                    d
                })
            });
            pair.run(jobs)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_insert, bench_refresh, bench_lookup);
criterion_main!(benches);
