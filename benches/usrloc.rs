//! The user-location table: insert of new AoRs, refresh (replace the binding of an
//! existing AoR) and lookup hit, on 1 thread and on 2 threads.
//!
//! Keys and bindings are built before the timer starts; the timed loops only call
//! `Usrloc::update` / `Usrloc::read`. The 2-thread variants use `iter_custom`: two scoped
//! threads, released together by a barrier, each do `iters` operations; the sample time
//! is the slower thread's, and the throughput is declared as 2 elements per iteration, so
//! criterion's elements/s is the *total* operations/s of both threads (its time is per
//! pair of operations).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Barrier, LazyLock};
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
fn populated() -> (Usrloc, Vec<Vec<u8>>) {
    LazyLock::force(&SPARE);
    let table = Usrloc::new(POPULATION);
    let keys: Vec<Vec<u8>> = (0..POPULATION).map(aor).collect();
    for (i, k) in keys.iter().enumerate() {
        insert(&table, k, binding(i, 1));
    }
    assert_eq!(table.aors(), POPULATION);
    (table, keys)
}

/// Runs `work(input, barrier)` on two scoped threads, one input each; each returns its
/// own duration, timed after the barrier; the slower one is the sample.
fn two_threads<T, W>(inputs: [T; 2], work: W) -> Duration
where
    T: Send,
    W: Fn(T, &Barrier) -> Duration + Sync,
{
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let h: Vec<_> = inputs
            .into_iter()
            .map(|input| {
                let (work, barrier) = (&work, &barrier);
                s.spawn(move || work(input, barrier))
            })
            .collect();
        h.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn bench_insert(c: &mut Criterion) {
    LazyLock::force(&SPARE);
    let mut g = c.benchmark_group("usrloc_insert");
    // A fresh table per sample, pre-sized like a configured registrar; the keys and
    // bindings of the sample are built before the timer starts.
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
            let table = Usrloc::new(2 * n);
            let keys: Vec<Vec<u8>> = (0..2 * n).map(aor).collect();
            let inputs: [(&[Vec<u8>], Vec<Binding>); 2] = [0, 1].map(|t| {
                let bindings = (t * n..(t + 1) * n).map(|i| binding(i, 1)).collect();
                (&keys[t * n..(t + 1) * n], bindings)
            });
            let t = two_threads(inputs, |(keys, mut mine), barrier| {
                barrier.wait();
                let start = Instant::now();
                for (k, b) in keys.iter().zip(mine.drain(..)) {
                    insert(&table, k, b);
                }
                start.elapsed()
            });
            drop(table);
            t
        })
    });
    g.finish();
}

fn bench_refresh(c: &mut Criterion) {
    let (table, keys) = populated();
    let mut g = c.benchmark_group("usrloc_refresh");
    g.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    g.bench_function("1_thread", |b| {
        b.iter_custom(|iters| {
            let n = iters as usize;
            // Round-robin over the population: each op hits another AoR.
            let mut todo: Vec<(usize, Option<Binding>)> = (0..n)
                .map(|k| {
                    let i = (next + k) % POPULATION;
                    (i, Some(binding(i, 2)))
                })
                .collect();
            next = (next + n) % POPULATION;
            let start = Instant::now();
            for (i, b) in &mut todo {
                refresh(&table, &keys[*i], b);
            }
            start.elapsed()
        })
    });
    g.throughput(Throughput::Elements(2));
    for (name, shared) in [("2_threads_disjoint", false), ("2_threads_shared", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let n = iters as usize;
                // Disjoint: thread 0 refreshes the even AoRs, thread 1 the odd ones.
                // Shared: both walk every AoR, half the population apart.
                let key_of = |t: usize, k: usize| {
                    if shared {
                        (k + t * POPULATION / 2) % POPULATION
                    } else {
                        (2 * k + t) % POPULATION
                    }
                };
                let inputs: [Vec<(usize, Option<Binding>)>; 2] = [0, 1].map(|t| {
                    (0..n)
                        .map(|k| {
                            let i = key_of(t, k);
                            (i, Some(binding(i, 2)))
                        })
                        .collect()
                });
                two_threads(inputs, |mut mine, barrier| {
                    barrier.wait();
                    let start = Instant::now();
                    for (i, b) in &mut mine {
                        refresh(&table, &keys[*i], b);
                    }
                    let d = start.elapsed();
                    drop(mine);
                    d
                })
            })
        });
    }
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let (table, keys) = populated();
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
            two_threads([0, POPULATION / 2], |mut i, barrier| {
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
        })
    });
    g.finish();
}

criterion_group!(benches, bench_insert, bench_refresh, bench_lookup);
criterion_main!(benches);
