//! Restart persistence: RocksDB under the data directory, fed by the change stream.
//!
//! * One column family per data class: `contacts`, `dialogs`, `presentities`, `watchers`,
//!   `tag_terms`, and `node` (format marker and node identity). Dialogs get their family
//!   now and their rows when they are stored.
//! * A publication row is keyed by its presentity key (event package, a zero octet, the
//!   AoR), a zero octet and its entity tag; a watcher row by the watcher key. Values: the
//!   format version octet and the bincode encoding.
//! * A contact row is keyed by (AoR, contact, `+sip.instance`, reg-id), each part length
//!   prefixed, so an AoR's rows are adjacent; its value is a format version octet and the
//!   bincode encoding of the binding. A value of another version is refused, never misread.
//! * The directory carries a format marker and the identity (node id, cluster id) of the
//!   node that wrote it: opening it as another node, or with a build that does not know its
//!   format, fails with a message that says so.
//!
//! [`persist`] is the write-behind thread; [`Store::load_contacts`] is the recovery.

pub mod persist;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use sipmesh_cluster::presence::{PresenceTable, Publication, Watcher};
use sipmesh_cluster::usrloc::{AorRecord, Binding, Update, Usrloc};
use sipmesh_cluster::{BINCODE_CONFIG, Change, ChangeRecord};

/// Version of every value this build writes (first octet).
pub const FORMAT_VERSION: u8 = 2;
/// Contact rows of format 1 lack the binding's sharing tag (added last in format 2); they
/// are read as untagged.
const FORMAT_V1: u8 = 1;
/// Version octet of the identity and tag-term rows (unchanged since format 1).
const ROW_V1: u8 = 1;

/// Column families.
pub const CF_CONTACTS: &str = "contacts";
pub const CF_DIALOGS: &str = "dialogs";
pub const CF_PRESENTITIES: &str = "presentities";
pub const CF_WATCHERS: &str = "watchers";
pub const CF_TAG_TERMS: &str = "tag_terms";
pub const CF_NODE: &str = "node";
pub const FAMILIES: [&str; 6] = [
    CF_CONTACTS,
    CF_DIALOGS,
    CF_PRESENTITIES,
    CF_WATCHERS,
    CF_TAG_TERMS,
    CF_NODE,
];

const KEY_FORMAT: &[u8] = b"format";
const KEY_IDENTITY: &[u8] = b"identity";

/// A store error, with a message an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

fn db_err(dir: &Path, what: &str, e: rocksdb::Error) -> StoreError {
    StoreError(format!("data directory {}: {what}: {e}", dir.display()))
}

/// The node's RocksDB.
pub struct Store {
    db: DB,
    dir: PathBuf,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Bindings loaded into the table.
    pub loaded: u64,
    /// AoRs loaded.
    pub aors: u64,
    /// Bindings that expired while the node was down (deleted, no change record).
    pub expired: u64,
    /// Newest binding version loaded (0: none).
    pub newest_version: u64,
    /// Every loaded AoR with its earliest expiry, for the workers' timer wheels.
    pub expiries: Vec<(Arc<[u8]>, u32)>,
    /// Seconds the load took.
    pub seconds: f64,
}

/// Size and row count of one column family.
#[derive(Debug, Clone)]
pub struct FamilyStats {
    pub name: &'static str,
    /// RocksDB's estimate of the number of keys.
    pub keys: u64,
    /// Bytes of SST files.
    pub sst_bytes: u64,
    /// Bytes in memtables.
    pub memtable_bytes: u64,
}

fn options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // A write-heavy workload of small values: large memtables, level compaction with
    // dynamic level sizes, LZ4, background work on two threads, WAL and SST writes
    // synced in 1 MiB steps so a sync never has a large backlog.
    o.increase_parallelism(2);
    o.set_max_background_jobs(2);
    o.set_write_buffer_size(64 << 20);
    o.set_max_write_buffer_number(4);
    o.set_level_compaction_dynamic_level_bytes(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_bytes_per_sync(1 << 20);
    o.set_wal_bytes_per_sync(1 << 20);
    o.set_keep_log_file_num(4);
    o
}

/// Key of a contact row: (AoR, contact, instance) each as a big-endian u16 length and the
/// bytes, then the reg-id as a big-endian u32.
pub fn contact_key(aor: &[u8], contact: &[u8], instance: &[u8], reg_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + aor.len() + contact.len() + instance.len());
    for part in [aor, contact, instance] {
        k.extend_from_slice(&(part.len().min(u16::MAX as usize) as u16).to_be_bytes());
        k.extend_from_slice(part);
    }
    k.extend_from_slice(&reg_id.to_be_bytes());
    k
}

/// The AoR part of a contact key.
pub fn key_aor(key: &[u8]) -> Option<&[u8]> {
    let n = u16::from_be_bytes([*key.first()?, *key.get(1)?]) as usize;
    key.get(2..2 + n)
}

/// A contact row's value: the format version, then the binding.
pub fn encode_binding(b: &Binding) -> Vec<u8> {
    let mut v = vec![FORMAT_VERSION];
    // Encoding into a Vec cannot fail.
    let _ = bincode::encode_into_std_write(b, &mut v, BINCODE_CONFIG);
    v
}

/// Reads a contact row's value, refusing a version this build does not know.
pub fn decode_binding(v: &[u8]) -> Result<Binding, StoreError> {
    match v.first() {
        None => Err(StoreError("an empty contact value".into())),
        Some(&FORMAT_VERSION) => decode_binding_body(&v[1..]),
        // Format 1 is format 2 without the trailing tag: an empty tag is one zero octet.
        Some(&FORMAT_V1) => decode_binding_body(&[&v[1..], &[0u8][..]].concat()),
        Some(&other) => Err(StoreError(format!(
            "a contact value has format version {other}; this sipd reads version {FORMAT_VERSION} \
             (written by a {} sipd)",
            if other > FORMAT_VERSION {
                "newer"
            } else {
                "older"
            }
        ))),
    }
}

fn decode_binding_body(v: &[u8]) -> Result<Binding, StoreError> {
    let (b, used): (Binding, usize) = bincode::decode_from_slice(v, BINCODE_CONFIG)
        .map_err(|e| StoreError(format!("a contact value does not decode: {e}")))?;
    if used != v.len() {
        return Err(StoreError(format!(
            "a contact value has {} octets after the binding",
            v.len() - used
        )));
    }
    Ok(b)
}

/// The row of publication `etag` of presentity `pkey`.
pub fn publication_row(pkey: &[u8], etag: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(pkey.len() + 1 + etag.len());
    k.extend_from_slice(pkey);
    k.push(0);
    k.extend_from_slice(etag);
    k
}

/// A presence row's value: the format version octet and the bincode encoding.
pub fn encode_row<T: bincode::Encode>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Writing into a Vec cannot fail.
    let _ = bincode::encode_into_std_write(v, &mut out, BINCODE_CONFIG);
    out
}

fn decode_row<T: bincode::Decode<()>>(v: &[u8]) -> Option<T> {
    let (&ver, body) = v.split_first()?;
    if ver != FORMAT_VERSION {
        return None;
    }
    bincode::decode_from_slice(body, BINCODE_CONFIG)
        .ok()
        .map(|(x, _)| x)
}

/// The contact row a change record touches: (AoR, key); `None` for a dialog or presence
/// record (not stored yet).
pub fn record_key(rec: &ChangeRecord) -> Option<(&[u8], Vec<u8>)> {
    match &rec.change {
        Change::BindingUpsert { aor, binding } => Some((
            aor,
            contact_key(aor, binding.contact(), binding.instance(), binding.reg_id),
        )),
        Change::BindingRemove {
            aor,
            contact,
            instance,
            reg_id,
            ..
        } => Some((aor, contact_key(aor, contact, instance, *reg_id))),
        _ => None,
    }
}

impl Store {
    /// Opens (or creates) the store of node `node_id` in cluster `cluster_id`.
    pub fn open(dir: &Path, node_id: u16, cluster_id: u32) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError(format!(
                "data directory {}: cannot create: {e}",
                dir.display()
            ))
        })?;
        let cfs = FAMILIES
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, options()));
        let db =
            DB::open_cf_descriptors(&options(), dir, cfs).map_err(|e| db_err(dir, "open", e))?;
        let s = Store {
            db,
            dir: dir.to_path_buf(),
        };
        s.check_format()?;
        s.check_identity(node_id, cluster_id)?;
        Ok(s)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every family is created at open.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn check_format(&self) -> Result<(), StoreError> {
        let node = self.cf(CF_NODE);
        match self
            .db
            .get_cf(node, KEY_FORMAT)
            .map_err(|e| db_err(&self.dir, "read format", e))?
        {
            Some(v) if v.as_slice() == [FORMAT_VERSION] => Ok(()),
            // Format 1 rows stay readable; from now on format 2 rows are written, which
            // an older sipd would refuse, so the marker moves on.
            Some(v) if v.as_slice() == [FORMAT_V1] => self
                .db
                .put_cf(node, KEY_FORMAT, [FORMAT_VERSION])
                .map_err(|e| db_err(&self.dir, "write format", e)),
            Some(v) => Err(StoreError(format!(
                "data directory {} has store format {:?}; this sipd reads format {FORMAT_VERSION} \
                 (move the directory away, or run the sipd that wrote it)",
                self.dir.display(),
                v
            ))),
            None => {
                // A new directory (or one that never got past its first open).
                if self
                    .db
                    .iterator_cf(self.cf(CF_CONTACTS), IteratorMode::Start)
                    .next()
                    .is_some()
                {
                    return Err(StoreError(format!(
                        "data directory {} holds contacts but no format marker: not a sipd store",
                        self.dir.display()
                    )));
                }
                self.db
                    .put_cf(node, KEY_FORMAT, [FORMAT_VERSION])
                    .map_err(|e| db_err(&self.dir, "write format", e))
            }
        }
    }

    fn check_identity(&self, node_id: u16, cluster_id: u32) -> Result<(), StoreError> {
        let node = self.cf(CF_NODE);
        let mine = {
            let mut v = vec![ROW_V1];
            let _ = bincode::encode_into_std_write((node_id, cluster_id), &mut v, BINCODE_CONFIG);
            v
        };
        match self
            .db
            .get_cf(node, KEY_IDENTITY)
            .map_err(|e| db_err(&self.dir, "read identity", e))?
        {
            None => self
                .db
                .put_cf(node, KEY_IDENTITY, &mine)
                .map_err(|e| db_err(&self.dir, "write identity", e)),
            Some(v) if v == mine => Ok(()),
            Some(v) => {
                let theirs: Option<(u16, u32)> = v
                    .get(1..)
                    .and_then(|b| bincode::decode_from_slice(b, BINCODE_CONFIG).ok())
                    .map(|(x, _)| x);
                Err(StoreError(match theirs {
                    Some((n, c)) => format!(
                        "data directory {} belongs to node {n} of cluster {c}; this is node {node_id} \
                         of cluster {cluster_id}",
                        self.dir.display()
                    ),
                    None => format!(
                        "data directory {} has an identity this sipd cannot read",
                        self.dir.display()
                    ),
                }))
            }
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Recovery: loads every live contact into `usrloc` (which should be empty), deletes
    /// those that expired while the node was down (no change record, so no side effect
    /// anywhere), and reports progress every second through `progress(loaded, expired)`.
    pub fn load_contacts(
        &self,
        usrloc: &Usrloc,
        now_s: u32,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<LoadReport, StoreError> {
        let t0 = Instant::now();
        let mut last = t0;
        let cf = self.cf(CF_CONTACTS);
        let mut report = LoadReport::default();
        let mut dead = WriteBatch::default();
        let mut cur_aor: Vec<u8> = Vec::new();
        let mut cur: Vec<Binding> = Vec::new();
        let flush = |aor: &[u8], bindings: &mut Vec<Binding>, report: &mut LoadReport| {
            if bindings.is_empty() {
                return;
            }
            let min = bindings.iter().map(|b| b.expires_at).min().unwrap_or(0);
            let rec = AorRecord::new(std::mem::take(bindings));
            report.loaded += rec.len() as u64;
            report.aors += 1;
            let out = usrloc.update(aor, |_| Update::Replace(rec.clone(), ()));
            if let Some(k) = out.key {
                report.expiries.push((k, min));
            }
        };
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_err(&self.dir, "read contacts", e))?;
            let Some(aor) = key_aor(&k) else {
                return Err(StoreError(format!(
                    "data directory {}: a contact key is malformed",
                    self.dir.display()
                )));
            };
            let b = decode_binding(&v)
                .map_err(|e| StoreError(format!("data directory {}: {e}", self.dir.display())))?;
            if aor != cur_aor.as_slice() {
                flush(&cur_aor, &mut cur, &mut report);
                cur_aor.clear();
                cur_aor.extend_from_slice(aor);
            }
            if b.expires_at <= now_s {
                report.expired += 1;
                dead.delete_cf(cf, &k);
                continue;
            }
            report.newest_version = report.newest_version.max(b.version);
            cur.push(b);
            if last.elapsed().as_secs() >= 1 {
                last = Instant::now();
                progress(report.loaded + cur.len() as u64, report.expired);
            }
        }
        flush(&cur_aor, &mut cur, &mut report);
        if !dead.is_empty() {
            self.db
                .write(dead)
                .map_err(|e| db_err(&self.dir, "delete expired contacts", e))?;
        }
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Recovery of presence: every live publication and watcher into `t`; those that
    /// expired while the node was down are deleted. Returns (publications, watchers,
    /// expired).
    pub fn load_presence(
        &self,
        t: &PresenceTable,
        now_ms: u64,
    ) -> Result<(u64, u64, u64), StoreError> {
        let bad = |what: &str| {
            StoreError(format!(
                "data directory {}: a {what} row is malformed",
                self.dir.display()
            ))
        };
        let mut dead = WriteBatch::default();
        let (mut pubs, mut watchers, mut expired) = (0, 0, 0);
        let cf = self.cf(CF_PRESENTITIES);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_err(&self.dir, "read presentities", e))?;
            let i = k
                .iter()
                .rposition(|&b| b == 0)
                .ok_or_else(|| bad("publication"))?;
            let p: Publication = decode_row(&v).ok_or_else(|| bad("publication"))?;
            if p.expires_ms <= now_ms {
                expired += 1;
                dead.delete_cf(cf, &k);
            } else if t.apply_publish(&k[..i], b"", &p) {
                pubs += 1;
            }
        }
        let cf = self.cf(CF_WATCHERS);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_err(&self.dir, "read watchers", e))?;
            let w: Watcher = decode_row(&v).ok_or_else(|| bad("watcher"))?;
            if w.expires_ms <= now_ms {
                expired += 1;
                dead.delete_cf(cf, &k);
            } else if t.apply_watcher(&k, &w, false) {
                watchers += 1;
            }
        }
        if !dead.is_empty() {
            self.db
                .write(dead)
                .map_err(|e| db_err(&self.dir, "delete expired presence", e))?;
        }
        Ok((pubs, watchers, expired))
    }

    /// The presentities and watchers column families (for write batches).
    pub fn presence_families(&self) -> (&rocksdb::ColumnFamily, &rocksdb::ColumnFamily) {
        (self.cf(CF_PRESENTITIES), self.cf(CF_WATCHERS))
    }

    /// Writes a batch; `sync` waits for the write-ahead log to reach the disk.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| db_err(&self.dir, "write", e))
    }

    /// Syncs the write-ahead log.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db
            .flush_wal(true)
            .map_err(|e| db_err(&self.dir, "sync the write-ahead log", e))
    }

    /// Keys of the contact rows of `aor` (adjacent: they share the AoR's length-prefixed
    /// first part, and no other AoR's key starts with it).
    pub fn contact_keys_of(&self, aor: &[u8]) -> Result<Vec<Box<[u8]>>, StoreError> {
        let mut prefix = contact_key(aor, &[], &[], 0);
        prefix.truncate(prefix.len() - 8);
        let mut keys = Vec::new();
        let from = IteratorMode::From(&prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.contacts(), from) {
            let (k, _) = item.map_err(|e| db_err(&self.dir, "read contacts", e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            keys.push(k);
        }
        Ok(keys)
    }

    /// Sharing-tag terms: (name, term, holder); a row of another version is refused.
    pub fn load_tag_terms(&self) -> Result<Vec<(String, u64, Option<u16>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_TAG_TERMS), IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| db_err(&self.dir, "read tag terms", e))?;
            let name = String::from_utf8(k.to_vec()).map_err(|_| {
                StoreError(format!(
                    "data directory {}: a tag name is not UTF-8",
                    self.dir.display()
                ))
            })?;
            let (term, holder): (u64, u16) = match v.first() {
                Some(&ROW_V1) => bincode::decode_from_slice(&v[1..], BINCODE_CONFIG)
                    .map(|(x, _)| x)
                    .map_err(|e| {
                        StoreError(format!(
                            "data directory {}: tag {name}: {e}",
                            self.dir.display()
                        ))
                    })?,
                _ => {
                    return Err(StoreError(format!(
                        "data directory {}: tag {name} has a format this sipd does not read",
                        self.dir.display()
                    )));
                }
            };
            out.push((name, term, (holder != 0).then_some(holder)));
        }
        Ok(out)
    }

    /// Persists sharing-tag terms (synced: a term must never go backwards after a crash).
    pub fn save_tag_terms(&self, tags: &[(String, u64, Option<u16>)]) -> Result<(), StoreError> {
        let cf = self.cf(CF_TAG_TERMS);
        let mut b = WriteBatch::default();
        for (name, term, holder) in tags {
            let mut v = vec![ROW_V1];
            let _ = bincode::encode_into_std_write(
                (*term, holder.unwrap_or(0)),
                &mut v,
                BINCODE_CONFIG,
            );
            b.put_cf(cf, name.as_bytes(), v);
        }
        self.write(b, true)
    }

    /// The contacts column family (for write batches).
    pub fn contacts(&self) -> &rocksdb::ColumnFamily {
        self.cf(CF_CONTACTS)
    }

    /// Per column family: estimated keys, SST bytes, memtable bytes.
    pub fn stats(&self) -> Vec<FamilyStats> {
        FAMILIES
            .iter()
            .map(|name| {
                let cf = self.cf(name);
                let p = |prop: &str| {
                    self.db
                        .property_int_value_cf(cf, prop)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                FamilyStats {
                    name,
                    keys: p("rocksdb.estimate-num-keys"),
                    sst_bytes: p("rocksdb.total-sst-files-size"),
                    memtable_bytes: p("rocksdb.cur-size-all-mem-tables"),
                }
            })
            .collect()
    }

    /// Flushes memtables and compacts every column family.
    pub fn compact(&self) -> Result<(), StoreError> {
        for name in FAMILIES {
            let cf = self.cf(name);
            self.db
                .flush_cf(cf)
                .map_err(|e| db_err(&self.dir, "flush", e))?;
            self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// A consistent copy of the store in `target` (a RocksDB checkpoint: hard links where
    /// possible). `target` must not exist.
    pub fn checkpoint(&self, target: &Path) -> Result<(), StoreError> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db)
            .map_err(|e| db_err(&self.dir, "checkpoint", e))?;
        cp.create_checkpoint(target)
            .map_err(|e| StoreError(format!("checkpoint into {}: {e}", target.display())))
    }
}

#[cfg(test)]
mod tests;
