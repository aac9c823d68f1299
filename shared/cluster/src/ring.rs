//! Per-worker change ring: single producer (a worker), single consumer (the control plane),
//! lock-free, bounded, byte-framed.
//!
//! A frame is a little-endian `u32` payload length followed by the bincode encoding of a
//! [`ChangeRecord`]. Frames are published whole (one commit), so the consumer never sees a
//! partial frame. [`ChangeProducer::push`] encodes straight into the ring's memory: no heap
//! allocation, no intermediate copy.
//!
//! Backpressure: nothing acknowledged may be lost, so a worker checks
//! [`ChangeProducer::free_bytes`] against the [`ChangeProducer::frame_len`] of the records a
//! mutation will produce *before* mutating the table, and answers 503 when they don't fit.
//! Free space only grows between that check and the push (the consumer only frees space).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bincode::de::read::Reader;
use bincode::enc::write::Writer;
use bincode::error::{DecodeError, EncodeError};

use crate::BINCODE_CONFIG;
use crate::change::{ChangeRecord, ChangeRecordRef, ChangeRef, RemoveReason};

/// Bytes of the frame header (payload length, `u32` LE).
pub const FRAME_HEADER: usize = 4;

/// The ring could not take a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull {
    /// Bytes the frame needed (header included).
    pub needed: usize,
    /// Bytes that were free.
    pub free: usize,
}

impl fmt::Display for RingFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "change ring full: frame of {} bytes, {} free",
            self.needed, self.free
        )
    }
}

impl std::error::Error for RingFull {}

#[derive(Debug, Default)]
#[repr(align(64))]
struct ProducerCounters {
    pushed: AtomicU64,
    pushed_bytes: AtomicU64,
    full: AtomicU64,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct ConsumerCounters {
    popped: AtomicU64,
    bad_frames: AtomicU64,
}

/// Counters of one ring, readable from any thread (relaxed, monotonic).
#[derive(Debug, Default)]
pub struct RingStats {
    p: ProducerCounters,
    c: ConsumerCounters,
}

impl RingStats {
    /// Frames pushed.
    pub fn pushed(&self) -> u64 {
        self.p.pushed.load(Ordering::Relaxed)
    }
    /// Bytes pushed (headers included).
    pub fn pushed_bytes(&self) -> u64 {
        self.p.pushed_bytes.load(Ordering::Relaxed)
    }
    /// Pushes refused because the ring was full.
    pub fn full(&self) -> u64 {
        self.p.full.load(Ordering::Relaxed)
    }
    /// Frames consumed (including bad ones).
    pub fn popped(&self) -> u64 {
        self.c.popped.load(Ordering::Relaxed)
    }
    /// Frames that did not decode (skipped by [`ChangeConsumer::pop`]); should stay 0.
    pub fn bad_frames(&self) -> u64 {
        self.c.bad_frames.load(Ordering::Relaxed)
    }
}

/// Appends one frame to a byte ring: a `u32` LE length, then `parts` one after the
/// other, published whole. False (nothing written) when the ring lacks room. The framing
/// of every byte ring between threads (CDR lines, dialog orders, worker mailboxes);
/// never allocates.
pub fn push_bytes(p: &mut rtrb::Producer<u8>, parts: &[&[u8]]) -> bool {
    let len: usize = parts.iter().map(|x| x.len()).sum();
    let Ok(len32) = u32::try_from(len) else {
        return false;
    };
    let Ok(mut chunk) = p.write_chunk(FRAME_HEADER + len) else {
        return false;
    };
    let (a, b) = chunk.as_mut_slices();
    let head = len32.to_le_bytes();
    let bytes = parts.iter().flat_map(|x| x.iter());
    for (x, v) in a
        .iter_mut()
        .chain(b.iter_mut())
        .zip(head.iter().chain(bytes))
    {
        *x = *v;
    }
    chunk.commit_all();
    true
}

/// Takes the next frame of [`push_bytes`] into `out` (cleared first); false when the
/// ring holds no complete frame. Allocates only while `out` grows.
pub fn pop_bytes(c: &mut rtrb::Consumer<u8>, out: &mut Vec<u8>) -> bool {
    let Ok(h) = c.read_chunk(FRAME_HEADER) else {
        return false;
    };
    let (a, b) = h.as_slices();
    let mut l = [0u8; FRAME_HEADER];
    for (d, s) in l.iter_mut().zip(a.iter().chain(b)) {
        *d = *s;
    }
    let n = u32::from_le_bytes(l) as usize;
    let Ok(chunk) = c.read_chunk(FRAME_HEADER + n) else {
        return false;
    };
    let (a, b) = chunk.as_slices();
    out.clear();
    out.extend(a.iter().chain(b).skip(FRAME_HEADER));
    chunk.commit_all();
    true
}

/// Creates a ring of `capacity_bytes` bytes (allocated once, here).
pub fn change_ring(capacity_bytes: usize) -> (ChangeProducer, ChangeConsumer) {
    let (tx, rx) = rtrb::RingBuffer::new(capacity_bytes);
    let stats = Arc::new(RingStats::default());
    (
        ChangeProducer {
            tx,
            stats: Arc::clone(&stats),
        },
        ChangeConsumer {
            rx,
            stats,
            scratch: Vec::new(),
        },
    )
}

/// Producing half (owned by one worker thread).
pub struct ChangeProducer {
    tx: rtrb::Producer<u8>,
    stats: Arc<RingStats>,
}

impl fmt::Debug for ChangeProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeProducer")
            .field("capacity", &self.capacity())
            .field("free", &self.free_bytes())
            .finish()
    }
}

/// Writer over the (up to) two slices of a ring chunk.
struct SplitWriter<'a> {
    a: &'a mut [u8],
    b: &'a mut [u8],
    pos: usize,
}

impl Writer for SplitWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self.pos + bytes.len();
        if end > self.a.len() + self.b.len() {
            return Err(EncodeError::UnexpectedEnd);
        }
        let alen = self.a.len();
        if end <= alen {
            self.a[self.pos..end].copy_from_slice(bytes);
        } else if self.pos >= alen {
            self.b[self.pos - alen..end - alen].copy_from_slice(bytes);
        } else {
            let (x, y) = bytes.split_at(alen - self.pos);
            self.a[self.pos..].copy_from_slice(x);
            self.b[..y.len()].copy_from_slice(y);
        }
        self.pos = end;
        Ok(())
    }
}

/// Reader over the (up to) two slices of a ring chunk.
struct SplitReader<'a> {
    a: &'a [u8],
    b: &'a [u8],
}

impl Reader for SplitReader<'_> {
    #[inline]
    fn read(&mut self, bytes: &mut [u8]) -> Result<(), DecodeError> {
        let n = bytes.len();
        if n > self.a.len() + self.b.len() {
            return Err(DecodeError::UnexpectedEnd {
                additional: n - self.a.len() - self.b.len(),
            });
        }
        if n <= self.a.len() {
            let (x, rest) = self.a.split_at(n);
            bytes.copy_from_slice(x);
            self.a = rest;
        } else {
            let k = self.a.len();
            bytes[..k].copy_from_slice(self.a);
            let (y, rest) = self.b.split_at(n - k);
            bytes[k..].copy_from_slice(y);
            self.a = rest;
            self.b = &[];
        }
        Ok(())
    }
}

impl ChangeProducer {
    /// Size in bytes `rec` takes in the ring (header included).
    pub fn frame_len(rec: &ChangeRecordRef<'_>) -> usize {
        FRAME_HEADER.saturating_add(rec.encoded_len())
    }

    /// Bytes currently free. Only grows until the next push.
    #[inline]
    pub fn free_bytes(&self) -> usize {
        self.tx.slots()
    }

    /// Total capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.tx.buffer().capacity()
    }

    /// Appends one record as one frame, or fails without writing anything. Never allocates.
    pub fn push(&mut self, rec: &ChangeRecordRef<'_>) -> Result<(), RingFull> {
        let payload = rec.encoded_len();
        let needed = FRAME_HEADER.saturating_add(payload);
        let full = |free: usize, stats: &RingStats| {
            stats.p.full.fetch_add(1, Ordering::Relaxed);
            Err(RingFull { needed, free })
        };
        let Ok(len32) = u32::try_from(payload) else {
            return full(self.tx.slots(), &self.stats);
        };
        let mut chunk = match self.tx.write_chunk(needed) {
            Ok(c) => c,
            Err(rtrb::chunks::ChunkError::TooFewSlots(free)) => return full(free, &self.stats),
        };
        let (a, b) = chunk.as_mut_slices();
        let mut w = SplitWriter { a, b, pos: 0 };
        let ok = w.write(&len32.to_le_bytes()).is_ok()
            && bincode::encode_into_writer(rec, &mut w, BINCODE_CONFIG).is_ok()
            && w.pos == needed;
        if !ok {
            // Unreachable with an exact size; dropping the chunk publishes nothing.
            debug_assert!(false, "encoded size mismatch");
            return full(needed, &self.stats);
        }
        chunk.commit_all();
        self.stats.p.pushed.fetch_add(1, Ordering::Relaxed);
        self.stats
            .p
            .pushed_bytes
            .fetch_add(needed as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Appends every record of `batch`, all or nothing, published at once (the consumer sees
    /// either none or all of them). Never allocates. An empty batch always succeeds.
    pub fn push_batch(&mut self, batch: &ChangeBatch) -> Result<(), RingFull> {
        let needed = batch.frame_bytes();
        if needed == 0 {
            return Ok(());
        }
        let mut chunk = match self.tx.write_chunk(needed) {
            Ok(c) => c,
            Err(rtrb::chunks::ChunkError::TooFewSlots(free)) => {
                self.stats.p.full.fetch_add(1, Ordering::Relaxed);
                return Err(RingFull { needed, free });
            }
        };
        let (a, b) = chunk.as_mut_slices();
        let (x, y) = batch.buf.split_at(a.len());
        a.copy_from_slice(x);
        b.copy_from_slice(y);
        chunk.commit_all();
        self.stats
            .p
            .pushed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats
            .p
            .pushed_bytes
            .fetch_add(needed as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The ring's counters (shared with the consumer).
    pub fn stats(&self) -> &Arc<RingStats> {
        &self.stats
    }

    /// Whether the consumer has been dropped.
    pub fn is_abandoned(&self) -> bool {
        self.tx.is_abandoned()
    }
}

/// Records prepared ahead of a push, already encoded and framed.
///
/// A worker fills a batch inside a [`crate::Usrloc::update`] closure (clearing it first, since
/// the closure may run more than once), compares [`ChangeBatch::frame_bytes`] with the free
/// space it saw before the update, and after the update commits pushes it whole with
/// [`ChangeProducer::push_batch`]. Reusing one batch allocates nothing once its buffers have
/// reached their working size.
#[derive(Clone, Debug, Default)]
pub struct ChangeBatch {
    buf: Vec<u8>,
    kinds: Vec<Option<RemoveReason>>,
}

impl ChangeBatch {
    /// An empty batch with room for `bytes` bytes of frames (allocated here, once).
    pub fn with_capacity(bytes: usize) -> ChangeBatch {
        ChangeBatch {
            buf: Vec::with_capacity(bytes),
            kinds: Vec::with_capacity(bytes / 64),
        }
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.kinds.clear();
    }

    /// Appends one record (framed). Allocates only if the buffers must grow.
    pub fn push(&mut self, rec: &ChangeRecordRef<'_>) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; FRAME_HEADER]);
        // Writing into a Vec cannot fail.
        let _ = bincode::encode_into_std_write(rec, &mut self.buf, BINCODE_CONFIG);
        let payload = self.buf.len() - start - FRAME_HEADER;
        match u32::try_from(payload) {
            Ok(len) => self.buf[start..start + FRAME_HEADER].copy_from_slice(&len.to_le_bytes()),
            // Not representable in a frame (> 4 GiB): drop it; `push_batch` would refuse it
            // anyway and records are bounded far below that by the field limits.
            Err(_) => {
                self.buf.truncate(start);
                return;
            }
        }
        self.kinds.push(match rec.change {
            ChangeRef::BindingUpsert { .. } => None,
            ChangeRef::BindingRemove { reason, .. } => Some(reason),
            // Dialog and presence records: other tables.
            _ => None,
        });
    }

    /// Bytes the batch takes in the ring (headers included).
    pub fn frame_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Kind of each record, in order: `None` for an upsert, `Some(reason)` for a removal.
    pub fn iter_kinds(&self) -> impl Iterator<Item = Option<RemoveReason>> + '_ {
        self.kinds.iter().copied()
    }

    /// The framed bytes, exactly as they will appear in the ring.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Consuming half (owned by the control-plane thread).
pub struct ChangeConsumer {
    rx: rtrb::Consumer<u8>,
    stats: Arc<RingStats>,
    scratch: Vec<u8>,
}

impl fmt::Debug for ChangeConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeConsumer")
            .field("pending", &self.pending_bytes())
            .finish()
    }
}

impl ChangeConsumer {
    /// Payload length of the next complete frame, if any.
    fn next_len(&mut self) -> Option<usize> {
        let chunk = self.rx.read_chunk(FRAME_HEADER).ok()?;
        let (a, b) = chunk.as_slices();
        let mut h = [0u8; FRAME_HEADER];
        let k = a.len().min(FRAME_HEADER);
        h[..k].copy_from_slice(&a[..k]);
        h[k..].copy_from_slice(&b[..FRAME_HEADER - k]);
        // Not committed: peeking only.
        Some(u32::from_le_bytes(h) as usize)
    }

    /// Removes the next frame and decodes it. `None` when the ring holds no complete frame;
    /// `Some(Err(_))` for a frame that does not decode (it is consumed and counted).
    pub fn try_pop(&mut self) -> Option<Result<ChangeRecord, DecodeError>> {
        let len = self.next_len()?;
        let chunk = self.rx.read_chunk(FRAME_HEADER + len).ok()?;
        let (a, b) = chunk.as_slices();
        let (a, b) = if a.len() >= FRAME_HEADER {
            (&a[FRAME_HEADER..], b)
        } else {
            (&[][..], &b[FRAME_HEADER - a.len()..])
        };
        let mut reader = SplitReader { a, b };
        let res = bincode::decode_from_reader::<ChangeRecord, _, _>(&mut reader, BINCODE_CONFIG)
            .and_then(|rec| {
                if reader.a.is_empty() && reader.b.is_empty() {
                    Ok(rec)
                } else {
                    Err(DecodeError::Other("trailing bytes in change frame"))
                }
            });
        chunk.commit_all();
        self.stats.c.popped.fetch_add(1, Ordering::Relaxed);
        if res.is_err() {
            self.stats.c.bad_frames.fetch_add(1, Ordering::Relaxed);
        }
        Some(res)
    }

    /// Removes and decodes the next record; frames that fail to decode are skipped (and
    /// counted in [`RingStats::bad_frames`]). `None` when empty.
    pub fn pop(&mut self) -> Option<ChangeRecord> {
        loop {
            match self.try_pop()? {
                Ok(rec) => return Some(rec),
                Err(_) => continue,
            }
        }
    }

    /// Removes the next frame without decoding it, copying its payload (the bincode bytes of
    /// a [`ChangeRecord`]) into `out` (cleared first). Returns `false` when empty. Useful to
    /// forward records verbatim (replication, persistence).
    pub fn pop_frame(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(len) = self.next_len() else {
            return false;
        };
        let Ok(chunk) = self.rx.read_chunk(FRAME_HEADER + len) else {
            return false;
        };
        let (a, b) = chunk.as_slices();
        out.clear();
        out.extend(a.iter().chain(b).skip(FRAME_HEADER));
        chunk.commit_all();
        self.stats.c.popped.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Pops every complete record currently in the ring, in order, passing each to `f`.
    /// Returns how many were passed.
    pub fn drain(&mut self, mut f: impl FnMut(ChangeRecord)) -> usize {
        let mut n = 0;
        while let Some(rec) = self.pop() {
            f(rec);
            n += 1;
        }
        n
    }

    /// Bytes waiting to be consumed.
    pub fn pending_bytes(&self) -> usize {
        self.rx.slots()
    }

    /// Whether no byte is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The ring's counters (shared with the producer).
    pub fn stats(&self) -> &Arc<RingStats> {
        &self.stats
    }

    /// Whether the producer has been dropped (then, once empty, nothing more will come).
    pub fn is_abandoned(&self) -> bool {
        self.rx.is_abandoned()
    }

    /// Like [`ChangeConsumer::pop_frame`], into a buffer owned by the consumer and reused
    /// across calls; returns the payload, or `None` when empty.
    pub fn pop_frame_scratch(&mut self) -> Option<&[u8]> {
        let mut buf = std::mem::take(&mut self.scratch);
        let got = self.pop_frame(&mut buf);
        self.scratch = buf;
        got.then_some(&self.scratch[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use crate::change::{Change, ChangeRef, RemoveReason};
    use crate::usrloc::{Binding, BindingParts, Q_NONE};

    fn binding(i: u64) -> Binding {
        let contact = format!("sip:user{i}@192.0.2.10:5060;transport=udp");
        let call_id = format!("{i:032x}-callid");
        Binding::new(BindingParts {
            contact: contact.as_bytes(),
            call_id: call_id.as_bytes(),
            path: &b"<sip:edge;lr>"[..(i % 14) as usize],
            instance: b"",
            user_agent: b"",
            tag: b"",
            expires_at: i as u32,
            cseq: i as u32,
            q: Q_NONE,
            reg_id: 0,
            source: "192.0.2.10:5060".parse().unwrap(),
            transport: 0,
            flags: 0,
            version: i,
            origin: NodeId(1),
            last_modified: 0,
        })
    }

    fn record(i: u64, b: &Binding, aor: &[u8]) -> ChangeRecord {
        let change = if i.is_multiple_of(3) {
            Change::BindingRemove {
                aor: aor.into(),
                contact: b.contact().into(),
                instance: b.instance().into(),
                reg_id: 0,
                reason: RemoveReason::Unregistered,
            }
        } else {
            Change::BindingUpsert {
                aor: aor.into(),
                binding: b.clone(),
            }
        };
        ChangeRecord {
            origin: NodeId(1),
            version: i,
            at_ms: i * 10,
            change,
        }
    }

    #[test]
    fn push_pop_and_full() {
        let (mut p, mut c) = change_ring(256);
        assert_eq!(p.capacity(), 256);
        assert!(c.pop().is_none());
        let b = binding(1);
        let r = ChangeRecordRef {
            origin: NodeId(1),
            version: 1,
            at_ms: 2,
            change: ChangeRef::BindingUpsert {
                aor: b"a@b",
                binding: &b,
            },
        };
        let fl = ChangeProducer::frame_len(&r);
        let mut pushed = 0;
        while p.free_bytes() >= fl {
            p.push(&r).unwrap();
            pushed += 1;
        }
        let e = p.push(&r).unwrap_err();
        assert_eq!(
            e,
            RingFull {
                needed: fl,
                free: p.free_bytes()
            }
        );
        assert_eq!((p.stats().pushed(), p.stats().full()), (pushed, 1));
        assert_eq!(c.pending_bytes(), pushed as usize * fl);
        let mut n = 0;
        c.drain(|rec| {
            assert_eq!(rec, r.to_owned_record());
            n += 1;
        });
        assert_eq!(n, pushed);
        assert!(c.is_empty());
        assert_eq!(p.free_bytes(), 256);
        // Raw frame access.
        p.push(&r).unwrap();
        let payload = c.pop_frame_scratch().unwrap().to_vec();
        assert_eq!(payload, r.encode_to_vec());
        assert!(c.pop_frame_scratch().is_none());
        // A frame larger than the whole ring is refused.
        let (mut p, _c) = change_ring(16);
        assert!(p.push(&r).is_err());
    }

    #[test]
    fn two_threads_wraparound() {
        const N: u64 = 20_000;
        // Small ring with frame sizes that don't divide it: frames straddle the wrap point.
        let (mut p, mut c) = change_ring(1000);
        let prod = std::thread::spawn(move || {
            let aor = b"user@example.com".to_vec();
            for i in 0..N {
                let b = binding(i);
                let rec = record(i, &b, &aor);
                loop {
                    let r = rec.as_ref();
                    if p.free_bytes() >= ChangeProducer::frame_len(&r) {
                        p.push(&r).unwrap();
                        break;
                    }
                    std::thread::yield_now();
                }
            }
            p.stats().pushed()
        });
        let mut i = 0u64;
        let aor = b"user@example.com".to_vec();
        while i < N {
            match c.pop() {
                Some(rec) => {
                    let b = binding(i);
                    assert_eq!(rec, record(i, &b, &aor));
                    i += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        assert_eq!(prod.join().unwrap(), N);
        assert!(c.pop().is_none());
        assert_eq!(c.stats().bad_frames(), 0);
        assert_eq!(c.stats().popped(), N);
        assert!(c.is_abandoned());
    }

    #[test]
    fn batches_are_all_or_nothing() {
        let (mut p, mut c) = change_ring(700);
        let mut batch = ChangeBatch::with_capacity(4096);
        let aor = b"user@example.com".to_vec();
        let mut expected = Vec::new();
        for round in 0..50u64 {
            batch.clear();
            let recs: Vec<ChangeRecord> = (0..3)
                .map(|k| {
                    let i = round * 3 + k;
                    record(i, &binding(i), &aor)
                })
                .collect();
            for r in &recs {
                batch.push(&r.as_ref());
            }
            assert_eq!(batch.len(), 3);
            let kinds: Vec<_> = batch.iter_kinds().collect();
            assert_eq!(kinds[0].is_some(), round * 3 % 3 == 0);
            let frame_sum: usize = recs
                .iter()
                .map(|r| ChangeProducer::frame_len(&r.as_ref()))
                .sum();
            assert_eq!(batch.frame_bytes(), frame_sum);
            assert_eq!(batch.as_bytes().len(), frame_sum);
            if p.free_bytes() < batch.frame_bytes() {
                let full = p.stats().full();
                assert!(p.push_batch(&batch).is_err());
                assert_eq!(p.stats().full(), full + 1);
                // Nothing partial was published.
                let mut n = 0;
                c.drain(|r| {
                    assert_eq!(r, expected.remove(0));
                    n += 1;
                });
                assert!(expected.is_empty());
                assert!(n > 0);
            }
            p.push_batch(&batch).unwrap();
            expected.extend(recs);
        }
        c.drain(|r| assert_eq!(r, expected.remove(0)));
        assert!(expected.is_empty());
        assert_eq!(p.stats().pushed(), 150);
        batch.clear();
        assert!(batch.is_empty());
        p.push_batch(&batch).unwrap();
        assert!(c.pop().is_none());
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        // Forge frames through a raw byte ring of the same layout.
        let (mut tx, rx) = rtrb::RingBuffer::<u8>::new(64);
        let mut c = ChangeConsumer {
            rx,
            stats: Arc::default(),
            scratch: Vec::new(),
        };
        tx.push_entire_slice(&[3, 0, 0, 0, 1, 2, 3]).unwrap();
        assert!(c.try_pop().unwrap().is_err());
        // Header announcing more than is there: treated as "nothing complete yet".
        tx.push_entire_slice(&[200, 0, 0, 0, 1]).unwrap();
        assert!(c.try_pop().is_none());
        assert_eq!(c.stats().bad_frames(), 1);
    }
}
