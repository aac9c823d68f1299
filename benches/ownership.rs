//! The ownership check on the hot path: `Segment::acts_on_at` (a few atomic loads under the
//! segment's sequence lock), alone and with the key's bucket hash; and the same while
//! another thread keeps publishing (readers retry when a publication is under way).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sipmesh_cluster::ownership::{BUCKETS, Ownership, Segment, bucket_of};

fn segment() -> Arc<Segment> {
    let s = Arc::new(Segment::anonymous(1).unwrap());
    let mut o = Ownership::default();
    o.set_tag(0, true, 1);
    o.set_shared(0, true);
    for b in (0..BUCKETS).step_by(2) {
        o.set_bucket(b, true);
    }
    s.publish(&o);
    s
}

fn bench(c: &mut Criterion) {
    let s = segment();
    let mut g = c.benchmark_group("ownership");
    g.throughput(Throughput::Elements(1));
    let mut b = 0usize;
    g.bench_function("acts_on", |bch| {
        bch.iter(|| {
            b = (b + 1) % BUCKETS;
            black_box(s.acts_on_at(0, black_box(b), 1))
        })
    });
    let keys: Vec<Vec<u8>> = (0..1024)
        .map(|i| format!("user{i:07}@example.com").into_bytes())
        .collect();
    let mut i = 0usize;
    g.bench_function("bucket_of + acts_on (AoR key)", |bch| {
        bch.iter(|| {
            i = (i + 1) % keys.len();
            black_box(s.acts_on_at(0, bucket_of(black_box(&keys[i])), 1))
        })
    });
    // A writer publishing continuously on the other core.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut o = Ownership::default();
            o.set_tag(0, true, 1);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                o.set_bucket((n % BUCKETS as u64) as usize, n.is_multiple_of(2));
                s.publish(&o);
                n += 1;
            }
            n
        })
    };
    g.bench_function("acts_on while publishing", |bch| {
        bch.iter(|| {
            b = (b + 1) % BUCKETS;
            black_box(s.acts_on_at(0, black_box(b), 1))
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
