//! Write-behind: a thread that turns the change stream into RocksDB writes, off the
//! worker cores.
//!
//! It receives framed change records (the workers' own, drained by the control plane, and
//! peers' records once applied) and, for each, writes the *current* state of the row the
//! record touches, read from the table: the binding if the table still holds it, a delete
//! otherwise. So rows converge on the table whatever order local and replicated records
//! arrive in, and a record never resurrects what a later change removed.
//!
//! * `async`: a write batch every `flush_ms` (no sync), the write-ahead log synced every
//!   `wal_sync_ms`. A process crash loses only what had not reached RocksDB (at most
//!   the drain period plus `flush_ms` plus the batch write); a power failure also what the last WAL sync had
//!   not covered. After each write the workers learn how many of their records are
//!   stored; a worker more than `async_max_unwritten` records ahead holds its REGISTER
//!   replies back, so a store that falls behind slows registrations down instead of
//!   widening what a crash can lose.
//! * `sync`: group commit. Whatever arrived while the previous write was syncing goes
//!   into the next batch, written with a WAL sync; then each worker learns how many of
//!   its records are durable and releases the REGISTER replies that waited for them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rocksdb::WriteBatch;
use sipmesh_cluster::ChangeRecord;
use sipmesh_cluster::presence::PresenceTable;
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::durable::DurableShared;

use super::{Store, contact_key, encode_binding, encode_row, publication_row, record_key};
use crate::grpc::convert::frames;
use crate::metrics::Histogram;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Batched writes, periodic WAL sync; replies do not wait.
    Async,
    /// A REGISTER is answered once its records are in the synced WAL.
    Sync,
}

impl Durability {
    /// Config name.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Async => "async",
            Durability::Sync => "sync",
        }
    }

    /// Parses a config name.
    pub fn parse(s: &str) -> Option<Durability> {
        match s {
            "async" => Some(Durability::Async),
            "sync" => Some(Durability::Sync),
            _ => None,
        }
    }
}

/// Tunables of the write-behind.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    pub durability: Durability,
    /// `async`: batch period.
    pub flush_ms: u64,
    /// `async`: WAL sync period.
    pub wal_sync_ms: u64,
}

/// Counters.
#[derive(Debug, Default)]
pub struct PersistStats {
    /// Records turned into row writes.
    pub records: AtomicU64,
    /// Write batches.
    pub batches: AtomicU64,
    /// WAL syncs (sync writes included).
    pub wal_syncs: AtomicU64,
    /// Write errors (each is logged).
    pub errors: AtomicU64,
    /// Time of each batch write (µs), sync included.
    pub write_us: Histogram,
}

enum Msg {
    /// Framed records; `true` when they were applied from a peer (realtime or snapshot),
    /// where a replacement may come without the removal of the replaced binding's row.
    Records(Bytes, bool),
    /// Per worker: records drained so far (durable once what came before is written).
    Positions(Vec<u64>),
}

/// Handle of the write-behind thread. Dropping every sender (and this) stops it after a
/// final synced write.
pub struct Persister {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<PersistStats>,
    pub durability: Durability,
}

/// A sending end for another thread (snapshot application).
#[derive(Clone)]
pub struct PersistSender(Sender<Msg>);

impl PersistSender {
    /// Framed records this node's workers made (their change stream names every row a
    /// change touches, removals of replaced bindings included).
    pub fn records(&self, frames: Bytes) {
        if !frames.is_empty() {
            let _ = self.0.send(Msg::Records(frames, false));
        }
    }

    /// Framed records applied from a peer. A peer's upsert may replace in the table a
    /// binding this node held under another row key (a snapshot carries no removals; two
    /// nodes may register the same instance concurrently), so the rows of the AoRs they
    /// touch are checked against the table and stale ones deleted.
    pub fn applied(&self, frames: Bytes) {
        if !frames.is_empty() {
            let _ = self.0.send(Msg::Records(frames, true));
        }
    }

    /// Every record drained so far from worker `i`'s ring numbers `positions[i]`.
    pub fn positions(&self, positions: Vec<u64>) {
        let _ = self.0.send(Msg::Positions(positions));
    }
}

impl Persister {
    /// Starts the thread. `gates` (sync mode) are the workers' durability states, in
    /// worker order.
    pub fn start(
        store: Arc<Store>,
        usrloc: Arc<Usrloc>,
        presence: Option<Arc<PresenceTable>>,
        cfg: PersistConfig,
        gates: Vec<Arc<DurableShared>>,
    ) -> std::io::Result<Persister> {
        let (tx, rx) = channel();
        let stats = Arc::new(PersistStats::default());
        let st = stats.clone();
        let durability = cfg.durability;
        let thread = std::thread::Builder::new()
            .name("sipd-persist".into())
            .spawn(move || run(store, usrloc, presence, cfg, gates, rx, st))?;
        Ok(Persister {
            tx,
            thread: Some(thread),
            stats,
            durability,
        })
    }

    /// Another sending end.
    pub fn sender(&self) -> PersistSender {
        PersistSender(self.tx.clone())
    }

    /// Stops after writing (and syncing) everything sent before. Returns once every
    /// [`PersistSender`] is dropped too (the node drops the control plane's first).
    pub fn stop(mut self) {
        let (dead, _) = channel();
        self.tx = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    store: Arc<Store>,
    usrloc: Arc<Usrloc>,
    presence: Option<Arc<PresenceTable>>,
    cfg: PersistConfig,
    gates: Vec<Arc<DurableShared>>,
    rx: Receiver<Msg>,
    stats: Arc<PersistStats>,
) {
    let sync = cfg.durability == Durability::Sync;
    let flush = Duration::from_millis(cfg.flush_ms.max(1));
    let wal_every = Duration::from_millis(cfg.wal_sync_ms.max(1));
    let mut last_wal_sync = Instant::now();
    let mut unsynced = false;
    let mut open = true;
    while open {
        // Wait for work (async: wake up for the periodic WAL sync too).
        let first = if sync || !unsynced {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(wal_every.saturating_sub(last_wal_sync.elapsed()))
        };
        let mut batch = WriteBatch::default();
        let mut positions: Option<Vec<u64>> = None;
        let mut n = 0u64;
        let mut touched = Touched::new();
        let mut take = |m: Msg, batch: &mut WriteBatch, positions: &mut Option<Vec<u64>>| match m {
            Msg::Records(f, peer) => {
                n += add_rows(
                    &store,
                    &usrloc,
                    presence.as_deref(),
                    &f,
                    batch,
                    peer.then_some(&mut touched),
                )
            }
            Msg::Positions(p) => *positions = Some(p),
        };
        match first {
            Ok(m) => take(m, &mut batch, &mut positions),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        if open {
            if sync {
                // Group commit: everything that queued up meanwhile.
                while let Ok(m) = rx.try_recv() {
                    take(m, &mut batch, &mut positions);
                }
            } else {
                let deadline = Instant::now() + flush;
                loop {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(m) => take(m, &mut batch, &mut positions),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            }
        }
        drop_stale(&store, &usrloc, &touched, &mut batch);
        let last = !open;
        if !batch.is_empty() {
            let t = Instant::now();
            let with_sync = sync || last;
            match store.write(batch, with_sync) {
                Ok(()) => {
                    stats.records.fetch_add(n, Ordering::Relaxed);
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    if with_sync {
                        stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
                        last_wal_sync = Instant::now();
                        unsynced = false;
                    } else {
                        unsynced = true;
                    }
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("sipd: persistence: {e}");
                    // Nothing is released as durable after a failed write.
                    continue;
                }
            }
            stats.write_us.record(t.elapsed().as_micros() as u64);
        }
        if !sync && unsynced && (last_wal_sync.elapsed() >= wal_every || last) {
            match store.sync_wal() {
                Ok(()) => {
                    stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
                    unsynced = false;
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("sipd: persistence: {e}");
                }
            }
            last_wal_sync = Instant::now();
        }
        if let Some(p) = positions {
            for (g, pos) in gates.iter().zip(p) {
                g.publish(pos);
            }
        }
    }
}

/// Per AoR, the row keys the records of one batch named.
type Touched = HashMap<Box<[u8]>, Vec<Vec<u8>>>;

/// Adds a row write per framed record; returns how many.
fn add_rows(
    store: &Store,
    usrloc: &Usrloc,
    presence: Option<&PresenceTable>,
    frames_buf: &[u8],
    batch: &mut WriteBatch,
    mut touched: Option<&mut Touched>,
) -> u64 {
    let cf = store.contacts();
    let mut n = 0;
    for f in frames(frames_buf) {
        let Ok((rec, _)) = ChangeRecord::decode_from_slice(f) else {
            continue;
        };
        let Some((aor, key)) = record_key(&rec) else {
            // Presence: the row named takes what the table holds now.
            if let Some(t) = presence
                && presence_rows(store, t, &rec.change, batch)
            {
                n += 1;
            }
            continue;
        };
        let (contact, instance, reg_id) = match &rec.change {
            sipmesh_cluster::Change::BindingUpsert { binding, .. } => {
                (binding.contact(), binding.instance(), binding.reg_id)
            }
            sipmesh_cluster::Change::BindingRemove {
                contact,
                instance,
                reg_id,
                ..
            } => (&contact[..], &instance[..], *reg_id),
            _ => continue,
        };
        let now_value = usrloc.read(aor, |r| {
            r.and_then(|r| {
                r.bindings().iter().find(|b| {
                    b.contact() == contact && b.instance() == instance && b.reg_id == reg_id
                })
            })
            .map(encode_binding)
        });
        match now_value {
            Some(v) => batch.put_cf(cf, &key, v),
            None => batch.delete_cf(cf, &key),
        }
        if let Some(t) = touched.as_deref_mut() {
            match t.get_mut(aor) {
                Some(keys) => keys.push(key),
                None => {
                    t.insert(aor.into(), vec![key]);
                }
            }
        }
        n += 1;
    }
    n
}

/// Writes (or deletes) the presence rows a record names, as the table holds them now.
/// False when the record is not a presence one (dialogs are not stored).
fn presence_rows(
    store: &Store,
    t: &PresenceTable,
    change: &sipmesh_cluster::Change,
    batch: &mut WriteBatch,
) -> bool {
    use sipmesh_cluster::Change;
    let (pcf, wcf) = store.presence_families();
    let mut publication = |key: &[u8], etag: &[u8]| {
        let row = publication_row(key, etag);
        match t.presentity(key).and_then(|p| p.find(etag).map(encode_row)) {
            Some(v) => batch.put_cf(pcf, &row, v),
            None => batch.delete_cf(pcf, &row),
        }
    };
    match change {
        Change::PublishUpsert {
            key,
            replaces,
            publication: p,
        } => {
            publication(key, &p.etag);
            if !replaces.is_empty() {
                publication(key, replaces);
            }
        }
        Change::PublishRemove { key, etag, .. } => publication(key, etag),
        Change::WatcherUpsert { key, .. } | Change::WatcherEnd { key, .. } => {
            match t.watcher(key).map(|w| encode_row(&*w)) {
                Some(v) => batch.put_cf(wcf, key, v),
                None => batch.delete_cf(wcf, key),
            }
        }
        _ => return false,
    }
    true
}

/// Deletes, for every AoR the batch touched, the rows the table no longer holds: those in
/// the store and those the batch itself wrote. A replicated upsert (a full-sync snapshot
/// carries no remove records) can replace in the table a binding stored under another key
/// (another Contact with the same instance and reg-id, or the same Contact without an
/// instance); no record names that key again, and recovery would bring the binding back.
fn drop_stale(store: &Store, usrloc: &Usrloc, touched: &Touched, batch: &mut WriteBatch) {
    let cf = store.contacts();
    for (aor, named) in touched {
        let held: Vec<Vec<u8>> = usrloc.read(aor, |r| {
            r.map_or(&[][..], |r| r.bindings())
                .iter()
                .map(|b| contact_key(aor, b.contact(), b.instance(), b.reg_id))
                .collect()
        });
        let stored = store.contact_keys_of(aor).unwrap_or_else(|e| {
            eprintln!("sipd: persistence: {e}");
            Vec::new()
        });
        let candidates = named.iter().map(|k| &k[..]);
        for k in candidates.chain(stored.iter().map(|k| &k[..])) {
            if !held.iter().any(|h| h[..] == *k) {
                batch.delete_cf(cf, k);
            }
        }
    }
}
