//! The ownership segment: which sharing tags are active on this node and which partition
//! buckets this node acts on, published by the control plane and read by the workers
//! before every externally visible action.
//!
//! The segment is a `#[repr(C)]` block of atomics in a shared mapping — a file under
//! `/dev/shm` (so `sipctl` and a restarted process can read it too) or an anonymous
//! mapping in tests. Every field is an atomic, so a concurrent read is never undefined;
//! a generation counter used as a sequence lock makes a reader see the bits of one
//! publication only: the writer makes the generation odd, stores the bits, makes it even
//! again; a reader retries while the generation is odd or changed under it. A check costs
//! a handful of atomic loads and no lock.
//!
//! Hand-over at a boundary: a change of who acts is published ahead of the instant it
//! takes effect. A tag slot carries the wall-clock window `[from, until)` in which this
//! node acts for it, and the bucket assignment carries the previous assignment and the
//! instant it gives way to the new one. An action is checked at the time it is *due*
//! (e.g. the scheduled time of a keepalive ping), so two nodes that agree on the
//! boundary never both act, nor both skip, whatever the moment each one learned of it.
//!
//! This module is one of the crate's two islands of `unsafe` (the mapping is viewed as the
//! layout); each block says why it is sound.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use memmap2::{MmapMut, MmapOptions};

/// Partition buckets (objects hash into one of these).
pub const BUCKETS: usize = 1024;
/// Sharing-tag slots.
pub const TAG_SLOTS: usize = 256;
const BUCKET_WORDS: usize = BUCKETS / 64;
const TAG_WORDS: usize = TAG_SLOTS / 64;
const MAGIC: u64 = u64::from_le_bytes(*b"SIPMOWN1");
const LAYOUT_VERSION: u32 = 2;

/// The layout of the segment.
#[repr(C)]
pub struct Layout {
    magic: AtomicU64,
    version: AtomicU32,
    node_id: AtomicU32,
    /// Sequence lock: odd while a publication is being written.
    generation: AtomicU64,
    /// Bit `i`: sharing tag slot `i` is active here.
    tags: [AtomicU64; TAG_WORDS],
    /// Bit `i`: tag slot `i` is active on several nodes at once, which split its objects
    /// by bucket (the node-wide default tag); clear: one active node acts on all of them.
    shared: [AtomicU64; TAG_WORDS],
    /// Bit `b`: this node acts on partition bucket `b` from `buckets_from` on.
    buckets: [AtomicU64; BUCKET_WORDS],
    /// The assignment before `buckets_from`.
    buckets_prev: [AtomicU64; BUCKET_WORDS],
    /// Wall-clock ms at which `buckets` replaces `buckets_prev`.
    buckets_from: AtomicU64,
    /// Term under which each tag slot's state was decided.
    terms: [AtomicU64; TAG_SLOTS],
    /// Wall-clock ms from which this node acts for each tag slot.
    from: [AtomicU64; TAG_SLOTS],
    /// Wall-clock ms from which it no longer does.
    until: [AtomicU64; TAG_SLOTS],
}

/// Size of the segment in bytes.
pub const SEGMENT_BYTES: usize = std::mem::size_of::<Layout>();

/// What one publication says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// Active tag slots.
    pub tags: [u64; TAG_WORDS],
    /// Tag slots whose objects are split by bucket.
    pub shared: [u64; TAG_WORDS],
    /// Buckets this node acts on from `buckets_from` on.
    pub buckets: [u64; BUCKET_WORDS],
    /// Buckets it acts on before `buckets_from`.
    pub buckets_prev: [u64; BUCKET_WORDS],
    /// Wall-clock ms of the bucket hand-over (0: `buckets` always).
    pub buckets_from: u64,
    /// Term of each tag slot.
    pub terms: Vec<u64>,
    /// Wall-clock window `[from, until)` of each tag slot (while its bit is set).
    pub from: Vec<u64>,
    /// See `from`.
    pub until: Vec<u64>,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            tags: [0; TAG_WORDS],
            shared: [0; TAG_WORDS],
            buckets: [0; BUCKET_WORDS],
            buckets_prev: [0; BUCKET_WORDS],
            buckets_from: 0,
            terms: vec![0; TAG_SLOTS],
            from: vec![0; TAG_SLOTS],
            until: vec![u64::MAX; TAG_SLOTS],
        }
    }
}

#[inline]
fn bit(words: &[u64], i: usize) -> bool {
    words[i / 64] >> (i % 64) & 1 == 1
}

impl Ownership {
    /// Marks tag slot `slot` active with `term`, for all time.
    pub fn set_tag(&mut self, slot: usize, active: bool, term: u64) {
        self.set_tag_window(slot, active, term, 0, u64::MAX);
    }

    /// Marks tag slot `slot` active with `term` in the wall-clock window `[from, until)`.
    pub fn set_tag_window(&mut self, slot: usize, active: bool, term: u64, from: u64, until: u64) {
        if slot < TAG_SLOTS {
            self.from[slot] = from;
            self.until[slot] = until;
            let (w, b) = (slot / 64, slot % 64);
            if active {
                self.tags[w] |= 1 << b;
            } else {
                self.tags[w] &= !(1 << b);
            }
            self.terms[slot] = term;
        }
    }

    /// Marks tag slot `slot` as split by bucket among its active nodes.
    pub fn set_shared(&mut self, slot: usize, shared: bool) {
        if slot < TAG_SLOTS {
            let (w, b) = (slot / 64, slot % 64);
            if shared {
                self.shared[w] |= 1 << b;
            } else {
                self.shared[w] &= !(1 << b);
            }
        }
    }

    /// Whether this node acts, at wall-clock `at_ms`, on an object of tag slot `tag` in
    /// bucket `bucket`.
    pub fn acts_on_at(&self, tag: usize, bucket: usize, at_ms: u64) -> bool {
        tag < TAG_SLOTS
            && bucket < BUCKETS
            && bit(&self.tags, tag)
            && self.from[tag] <= at_ms
            && at_ms < self.until[tag]
            && (!bit(&self.shared, tag)
                || bit(
                    if at_ms < self.buckets_from {
                        &self.buckets_prev
                    } else {
                        &self.buckets
                    },
                    bucket,
                ))
    }

    /// What this publication means at wall-clock `at_ms`: the tags acting then and the
    /// bucket assignment then, with no pending hand-over (for operators).
    pub fn at(&self, at_ms: u64) -> Ownership {
        let mut o = self.clone();
        for slot in 0..TAG_SLOTS {
            let acting =
                bit(&self.tags, slot) && self.from[slot] <= at_ms && at_ms < self.until[slot];
            o.set_tag_window(slot, acting, self.terms[slot], 0, u64::MAX);
        }
        if at_ms < self.buckets_from {
            o.buckets = self.buckets_prev;
        }
        o.buckets_prev = [0; BUCKET_WORDS];
        o.buckets_from = 0;
        o
    }

    /// Marks bucket `b` as acted on here.
    pub fn set_bucket(&mut self, b: usize, mine: bool) {
        if b < BUCKETS {
            if mine {
                self.buckets[b / 64] |= 1 << (b % 64);
            } else {
                self.buckets[b / 64] &= !(1 << (b % 64));
            }
        }
    }

    /// Whether tag slot `slot` is active.
    pub fn tag_active(&self, slot: usize) -> bool {
        slot < TAG_SLOTS && self.tags[slot / 64] >> (slot % 64) & 1 == 1
    }

    /// Whether bucket `b` is acted on here.
    pub fn bucket_mine(&self, b: usize) -> bool {
        b < BUCKETS && self.buckets[b / 64] >> (b % 64) & 1 == 1
    }

    /// Buckets acted on here.
    pub fn bucket_count(&self) -> usize {
        self.buckets.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// Longest sharing tag name.
pub const MAX_TAG_NAME: usize = 64;

/// Whether `name` is a sharing tag name: 1 to 64 of A-Z a-z 0-9 - _ .
pub fn is_tag_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAG_NAME
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// Bucket of an object key (AoR, dialog id ...): FNV-1a, then a multiplicative mix.
pub fn bucket_of(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize) % BUCKETS
}

enum Backing {
    /// A file (under /dev/shm), kept mapped.
    File { _map: MmapMut, path: PathBuf },
    /// An anonymous mapping (tests, or no file wanted).
    Anon { _map: MmapMut },
}

/// A mapped segment. Cloning the `Arc` around it shares it between threads; the mapping
/// lives as long as the value, the file stays for inspection until the next start
/// truncates it.
pub struct Segment {
    layout: *const Layout,
    backing: Backing,
}

// SAFETY: `layout` points into a mapping owned by `backing` for the value's whole life;
// every field behind it is an atomic, so shared access from several threads is sound.
unsafe impl Send for Segment {}
// SAFETY: as above: only atomic operations go through the pointer.
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path())
            .field("generation", &self.generation())
            .finish()
    }
}

fn check_map(map: &MmapMut) -> std::io::Result<*const Layout> {
    let ptr = map.as_ptr();
    if map.len() < SEGMENT_BYTES || !(ptr as usize).is_multiple_of(std::mem::align_of::<Layout>()) {
        return Err(std::io::Error::other(
            "ownership segment: mapping too small or misaligned",
        ));
    }
    Ok(ptr.cast::<Layout>())
}

impl Segment {
    /// Creates (or truncates) the segment file at `path` for node `node_id` and maps it.
    /// Nothing is owned until the first publication.
    pub fn create(path: &Path, node_id: u16) -> std::io::Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("ownership segment {}: {e}", path.display()),
                )
            })?;
        file.set_len(SEGMENT_BYTES as u64)?;
        let s = Segment::map_file(&file, path)?;
        s.init(node_id);
        Ok(s)
    }

    /// Maps a file of at least `SEGMENT_BYTES`.
    fn map_file(file: &std::fs::File, path: &Path) -> std::io::Result<Segment> {
        // SAFETY: the caller checked (or set) the file's size to the layout's. The
        // segment's writer is the node that created the file; everyone else (sipctl) only
        // reads, through atomics. Changes to the file by another writer could not make an
        // atomic load unsound, only wrong.
        let map = unsafe { MmapOptions::new().len(SEGMENT_BYTES).map_mut(file)? };
        let layout = check_map(&map)?;
        Ok(Segment {
            layout,
            backing: Backing::File {
                _map: map,
                path: path.to_path_buf(),
            },
        })
    }

    /// An anonymous segment (in-process only).
    pub fn anonymous(node_id: u16) -> std::io::Result<Segment> {
        let map = MmapOptions::new().len(SEGMENT_BYTES).map_anon()?;
        let layout = check_map(&map)?;
        let s = Segment {
            layout,
            backing: Backing::Anon { _map: map },
        };
        s.init(node_id);
        Ok(s)
    }

    /// Maps an existing segment file read-only in spirit (for `sipctl`): checks the magic
    /// and version.
    pub fn open(path: &Path) -> std::io::Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() < SEGMENT_BYTES as u64 {
            return Err(std::io::Error::other(format!(
                "{}: not an ownership segment (too short)",
                path.display()
            )));
        }
        let s = Segment::map_file(&file, path)?;
        if s.l().magic.load(Ordering::Acquire) != MAGIC
            || s.l().version.load(Ordering::Acquire) != LAYOUT_VERSION
        {
            return Err(std::io::Error::other(format!(
                "{}: not an ownership segment of this version",
                path.display()
            )));
        }
        Ok(s)
    }

    fn l(&self) -> &Layout {
        // SAFETY: `layout` points into the mapping owned by `self.backing`, which lives as
        // long as `self`, is at least `SEGMENT_BYTES` long and suitably aligned (checked
        // at creation); `Layout` holds only atomics, valid for any bit pattern.
        unsafe { &*self.layout }
    }

    fn init(&self, node_id: u16) {
        let l = self.l();
        l.generation.store(0, Ordering::Release);
        l.node_id.store(u32::from(node_id), Ordering::Relaxed);
        l.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        l.magic.store(MAGIC, Ordering::Release);
    }

    /// The file backing the segment, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::File { path, .. } => Some(path),
            Backing::Anon { .. } => None,
        }
    }

    /// The node that owns the segment.
    pub fn node_id(&self) -> u16 {
        self.l().node_id.load(Ordering::Relaxed) as u16
    }

    /// Publications so far (even: stable).
    pub fn generation(&self) -> u64 {
        self.l().generation.load(Ordering::Acquire)
    }

    /// Writer side (the control plane only): publishes `o` as one generation.
    pub fn publish(&self, o: &Ownership) {
        let l = self.l();
        let g = l.generation.load(Ordering::Relaxed);
        l.generation.store(g.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (a, v) in l.tags.iter().zip(o.tags) {
            a.store(v, Ordering::Relaxed);
        }
        for (a, v) in l.shared.iter().zip(o.shared) {
            a.store(v, Ordering::Relaxed);
        }
        for (a, v) in l.buckets.iter().zip(o.buckets) {
            a.store(v, Ordering::Relaxed);
        }
        for (a, v) in l.buckets_prev.iter().zip(o.buckets_prev) {
            a.store(v, Ordering::Relaxed);
        }
        l.buckets_from.store(o.buckets_from, Ordering::Relaxed);
        for (a, v) in l.terms.iter().zip(&o.terms) {
            a.store(*v, Ordering::Relaxed);
        }
        for (a, v) in l.from.iter().zip(&o.from) {
            a.store(*v, Ordering::Relaxed);
        }
        for (a, v) in l.until.iter().zip(&o.until) {
            a.store(*v, Ordering::Relaxed);
        }
        l.generation
            .store((g | 1).wrapping_add(1), Ordering::Release);
    }

    /// Runs `f` until it observes one stable generation; returns its result and the
    /// generation.
    #[inline]
    fn read<R>(&self, mut f: impl FnMut(&Layout) -> R) -> (R, u64) {
        let l = self.l();
        loop {
            let g1 = l.generation.load(Ordering::Acquire);
            if g1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let r = f(l);
            fence(Ordering::Acquire);
            let g2 = l.generation.load(Ordering::Relaxed);
            if g1 == g2 {
                return (r, g1);
            }
        }
    }

    /// Whether this node acts, at wall-clock `at_ms`, on an object of tag slot `tag` and
    /// bucket `bucket`: the tag is active here in a window holding `at_ms` and — for a
    /// tag shared by several active nodes — the bucket is assigned here at `at_ms`, all
    /// in one publication. `at_ms` is when the action is due, not when it runs. The
    /// returned generation fences the action (act only if it is still current).
    #[inline]
    pub fn acts_on_at(&self, tag: usize, bucket: usize, at_ms: u64) -> (bool, u64) {
        let (tw, tb) = (tag / 64, tag % 64);
        let (bw, bb) = (bucket / 64, bucket % 64);
        if tag >= TAG_SLOTS || bucket >= BUCKETS {
            return (false, self.generation());
        }
        self.read(|l| {
            l.tags[tw].load(Ordering::Relaxed) >> tb & 1 == 1
                && l.from[tag].load(Ordering::Relaxed) <= at_ms
                && at_ms < l.until[tag].load(Ordering::Relaxed)
                && (l.shared[tw].load(Ordering::Relaxed) >> tb & 1 == 0 || {
                    let words = if at_ms < l.buckets_from.load(Ordering::Relaxed) {
                        &l.buckets_prev
                    } else {
                        &l.buckets
                    };
                    words[bw].load(Ordering::Relaxed) >> bb & 1 == 1
                })
        })
    }

    /// The whole publication (for `sipctl` and tests).
    pub fn snapshot(&self) -> (Ownership, u64) {
        self.read(|l| Ownership {
            tags: std::array::from_fn(|i| l.tags[i].load(Ordering::Relaxed)),
            shared: std::array::from_fn(|i| l.shared[i].load(Ordering::Relaxed)),
            buckets: std::array::from_fn(|i| l.buckets[i].load(Ordering::Relaxed)),
            buckets_prev: std::array::from_fn(|i| l.buckets_prev[i].load(Ordering::Relaxed)),
            buckets_from: l.buckets_from.load(Ordering::Relaxed),
            terms: l.terms.iter().map(|t| t.load(Ordering::Relaxed)).collect(),
            from: l.from.iter().map(|t| t.load(Ordering::Relaxed)).collect(),
            until: l.until.iter().map(|t| t.load(Ordering::Relaxed)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn publish_and_check() {
        let s = Segment::anonymous(3).unwrap();
        assert_eq!(s.node_id(), 3);
        assert!(
            !s.acts_on_at(0, 0, 1).0,
            "nothing is owned before a publication"
        );
        let mut o = Ownership::default();
        o.set_tag(2, true, 7);
        o.set_shared(2, true);
        o.set_tag(4, true, 9);
        o.set_bucket(5, true);
        o.set_bucket(1023, true);
        s.publish(&o);
        // An exclusive tag: every bucket.
        assert!(s.acts_on_at(4, 6, 1).0 && o.acts_on_at(4, 6, 1));
        assert_eq!(s.generation(), 2);
        assert!(s.acts_on_at(2, 5, 1).0);
        assert!(s.acts_on_at(2, 1023, 1).0);
        assert!(!s.acts_on_at(2, 6, 1).0 && !o.acts_on_at(2, 6, 1));
        assert!(!s.acts_on_at(3, 5, 1).0);
        assert!(!s.acts_on_at(TAG_SLOTS, 5, 1).0 && !s.acts_on_at(2, BUCKETS, 1).0);
        let (snap, g) = s.snapshot();
        assert_eq!(g, 2);
        assert_eq!(snap, o);
        assert_eq!(snap.terms[2], 7);
        assert_eq!(snap.bucket_count(), 2);
    }

    /// A hand-over at a boundary: the check answers by the time an action is due, so
    /// the node giving a tag away and the one taking it never overlap nor leave a gap,
    /// and a bucket moving between assignments changes hands at `buckets_from`.
    #[test]
    fn windows_and_bucket_hand_over_decide_by_the_due_time() {
        let (giver, taker) = (
            Segment::anonymous(1).unwrap(),
            Segment::anonymous(2).unwrap(),
        );
        let boundary = 10_000;
        let mut g = Ownership::default();
        g.set_tag_window(3, true, 4, 0, boundary);
        let mut t = Ownership::default();
        t.set_tag_window(3, true, 5, boundary, u64::MAX);
        giver.publish(&g);
        taker.publish(&t);
        for at in [0, 1, boundary - 1, boundary, boundary + 1, u64::MAX - 1] {
            let (a, b) = (giver.acts_on_at(3, 7, at).0, taker.acts_on_at(3, 7, at).0);
            assert!(a ^ b, "exactly one node acts at {at}");
            assert_eq!(b, at >= boundary);
            assert_eq!(a, g.acts_on_at(3, 7, at));
        }
        // Buckets of a shared tag: the previous assignment until the hand-over.
        let mut o = Ownership::default();
        o.set_tag(0, true, 0);
        o.set_shared(0, true);
        o.set_bucket(5, true);
        o.buckets_prev = o.buckets;
        o.set_bucket(5, false);
        o.set_bucket(6, true);
        o.buckets_from = boundary;
        let s = Segment::anonymous(1).unwrap();
        s.publish(&o);
        assert!(s.acts_on_at(0, 5, boundary - 1).0 && !s.acts_on_at(0, 5, boundary).0);
        assert!(!s.acts_on_at(0, 6, boundary - 1).0 && s.acts_on_at(0, 6, boundary).0);
        assert_eq!(s.snapshot().0, o);
    }

    #[test]
    fn a_file_segment_is_readable_by_another_mapping() {
        let path = std::env::temp_dir().join(format!("sipmesh-own-{}", std::process::id()));
        let w = Segment::create(&path, 9).unwrap();
        let mut o = Ownership::default();
        o.set_tag(0, true, 1);
        o.set_shared(0, true);
        for b in 0..BUCKETS / 2 {
            o.set_bucket(b, true);
        }
        w.publish(&o);
        let r = Segment::open(&path).unwrap();
        assert_eq!(r.node_id(), 9);
        assert_eq!(r.snapshot().0, o);
        assert!(r.acts_on_at(0, 10, 1).0 && !r.acts_on_at(0, BUCKETS - 1, 1).0);
        std::fs::write(&path, b"short").unwrap();
        drop((w, r));
        assert!(Segment::open(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }

    /// The reader/writer protocol under contention: the writer alternates between two
    /// publications that differ in every word; readers must only ever see one of them
    /// whole, never a mix.
    #[test]
    fn readers_never_see_a_torn_publication() {
        let s = Arc::new(Segment::anonymous(1).unwrap());
        let mut a = Ownership::default();
        let mut b = Ownership::default();
        for i in 0..TAG_SLOTS {
            a.set_tag(i, i % 2 == 0, 1);
            b.set_tag(i, i % 2 == 1, 2);
            a.set_shared(i, i % 3 == 0);
            b.set_shared(i, i % 3 != 0);
        }
        for i in 0..BUCKETS {
            a.set_bucket(i, i % 3 == 0);
            b.set_bucket(i, i % 3 != 0);
        }
        s.publish(&a);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (s, stop, a, b) = (s.clone(), stop.clone(), a.clone(), b.clone());
                std::thread::spawn(move || {
                    let mut seen = [0u64; 2];
                    let mut last_gen = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let (o, g) = s.snapshot();
                        assert!(g >= last_gen, "generations go forward");
                        last_gen = g;
                        if o == a {
                            seen[0] += 1;
                        } else if o == b {
                            seen[1] += 1;
                        } else {
                            panic!("a torn publication at generation {g}");
                        }
                        // The single-bit check agrees with the publication it came from.
                        let (x, g2) = s.acts_on_at(0, 0, 1);
                        assert_eq!(x, g2 % 4 == 2, "generation {g2}");
                    }
                    seen
                })
            })
            .collect();
        for i in 0..200_000 {
            s.publish(if i % 2 == 0 { &b } else { &a });
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            let seen = r.join().unwrap();
            assert!(seen[0] + seen[1] > 0);
        }
    }

    #[test]
    fn buckets_spread_keys_evenly() {
        let mut counts = vec![0u32; BUCKETS];
        for i in 0..200_000 {
            counts[bucket_of(format!("user{i}@example.com").as_bytes())] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // 195 per bucket on average.
        assert!(*min > 120 && *max < 280, "{min}..{max}");
    }
}
