//! Lock-free latency histogram for control-plane figures (replication lag): log-linear
//! buckets with 32 sub-buckets per power of two (relative error under 3.2 %), values in
//! microseconds, recorded with one relaxed atomic add.

use std::sync::atomic::{AtomicU64, Ordering};

const EXACT: u64 = 64;
const SUB: u64 = 32;
const BUCKETS: usize = 64 + 58 * 32;

/// A histogram of microsecond values.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .field("max", &self.max())
            .finish()
    }
}

fn index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let bits = 64 - u64::from(v.leading_zeros());
    let shift = bits - 6;
    let mant = v >> shift;
    (EXACT + (shift - 1) * SUB + (mant - SUB)) as usize
}

fn lower_bound(i: usize) -> u64 {
    let i = i as u64;
    if i < EXACT {
        return i;
    }
    let shift = (i - EXACT) / SUB + 1;
    let mant = (i - EXACT) % SUB + SUB;
    mant << shift
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, us: u64) {
        let i = index(us).min(BUCKETS - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Largest value recorded.
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// The value at quantile `q` (0..=1): the lower bound of its bucket (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return lower_bound(i);
            }
        }
        self.max()
    }

    /// Forgets every value.
    pub fn reset(&self) {
        for c in self.counts.iter() {
            c.store(0, Ordering::Relaxed);
        }
        self.max.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..200_000u64).chain([1 << 30, 1 << 40, u64::MAX >> 8]) {
            let i = index(v);
            assert!(i >= last, "{v}");
            last = i;
            let lo = lower_bound(i);
            assert!(lo <= v, "{v}: bucket starts at {lo}");
            assert!(v - lo <= v / 32, "{v}: bucket starts at {lo}");
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=1000 {
            h.record(v);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), 1000);
        let p50 = h.quantile(0.5);
        assert!((485..=500).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((960..=990).contains(&p99), "{p99}");
        h.reset();
        assert_eq!(h.count(), 0);
    }
}
