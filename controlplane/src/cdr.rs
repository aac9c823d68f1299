//! The CDR writer: drains the workers' CDR rings (one JSON line per finished call) into
//! a file, rotated by size and age. Off the workers' path: file I/O happens on this
//! thread only.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sipmesh_cluster::ring::pop_bytes;

use crate::config::CdrConfig;

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct CdrStats {
    /// Lines written.
    pub written: AtomicU64,
    /// Files rotated.
    pub rotations: AtomicU64,
    /// Write errors (the lines are lost; the next write retries the file).
    pub errors: AtomicU64,
}

/// The running writer.
pub struct CdrWriter {
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<CdrStats>,
}

struct Out {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    bytes: u64,
    opened: Instant,
}

impl Out {
    fn open(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        let len = f.metadata()?.len();
        Ok((BufWriter::with_capacity(256 * 1024, f), len))
    }

    fn rotate(&mut self, stats: &CdrStats) {
        if let Some(mut f) = self.file.take() {
            let _ = f.flush();
        }
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        // The time, and a sequence number: two rotations in one millisecond stay apart.
        let seq = stats.rotations.load(Ordering::Relaxed);
        let mut to = self.path.clone().into_os_string();
        to.push(format!(".{ms}-{seq}"));
        if std::fs::rename(&self.path, &to).is_ok() {
            stats.rotations.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes = 0;
        self.opened = Instant::now();
    }

    fn write(&mut self, line: &[u8], cfg: &CdrConfig, stats: &CdrStats) {
        if self.bytes > 0
            && (self.bytes + line.len() as u64 > cfg.rotate_bytes
                || self.opened.elapsed() >= Duration::from_secs(cfg.rotate_s))
        {
            self.rotate(stats);
        }
        if self.file.is_none() {
            match Out::open(&self.path) {
                Ok((f, len)) => {
                    self.file = Some(f);
                    self.bytes = len;
                }
                Err(e) => {
                    if stats.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("sipd: cdr: {}: {e}", self.path.display());
                    }
                    return;
                }
            }
        }
        if let Some(f) = self.file.as_mut() {
            match f.write_all(line) {
                Ok(()) => {
                    self.bytes += line.len() as u64;
                    stats.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.file = None;
                }
            }
        }
    }
}

impl CdrWriter {
    /// Starts the writer on the workers' rings; it stops after `done` is set and the
    /// rings are drained.
    pub fn start(
        cfg: CdrConfig,
        mut rings: Vec<rtrb::Consumer<u8>>,
        done: Arc<AtomicBool>,
    ) -> std::io::Result<CdrWriter> {
        let stats = Arc::new(CdrStats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("sipd-cdr".into())
            .spawn(move || {
                let mut out = Out {
                    path: cfg.path.clone(),
                    file: None,
                    bytes: 0,
                    opened: Instant::now(),
                };
                let mut line = Vec::with_capacity(4096);
                loop {
                    let stopping = done.load(Ordering::SeqCst);
                    let mut n = 0;
                    for r in &mut rings {
                        while pop_bytes(r, &mut line) {
                            n += 1;
                            if cfg.enabled {
                                out.write(&line, &cfg, &st);
                            }
                        }
                    }
                    if n > 0
                        && let Some(f) = out.file.as_mut()
                        && f.flush().is_err()
                    {
                        st.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if stopping && n == 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Some(mut f) = out.file.take() {
                    let _ = f.flush();
                }
            })?;
        Ok(CdrWriter {
            thread: Some(thread),
            stats,
        })
    }

    /// Waits for the writer (after the workers stopped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(p: &mut rtrb::Producer<u8>, line: &[u8]) {
        assert!(sipmesh_cluster::ring::push_bytes(p, &[line]));
    }

    #[test]
    fn lines_reach_the_file_and_the_file_rotates_by_size() {
        let dir = std::env::temp_dir().join(format!("sipmesh-cdr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/cdr.jsonl");
        let (mut p1, c1) = rtrb::RingBuffer::new(1 << 16);
        let (mut p2, c2) = rtrb::RingBuffer::new(1 << 16);
        let done = Arc::new(AtomicBool::new(false));
        let w = CdrWriter::start(
            CdrConfig {
                enabled: true,
                path: path.clone(),
                rotate_bytes: 4096,
                rotate_s: 3600,
            },
            vec![c1, c2],
            done.clone(),
        )
        .unwrap();
        let line = format!("{{\"call_id\":\"{}\"}}\n", "x".repeat(90));
        for _ in 0..50 {
            push(&mut p1, line.as_bytes());
            push(&mut p2, line.as_bytes());
        }
        let stats = w.stats.clone();
        done.store(true, Ordering::SeqCst);
        w.join();
        assert_eq!(stats.written.load(Ordering::Relaxed), 100);
        // 100 lines of 104 octets in files of at most 4096: rotated twice.
        assert_eq!(stats.rotations.load(Ordering::Relaxed), 2);
        let mut total = 0;
        for e in std::fs::read_dir(path.parent().unwrap()).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            assert!(text.len() <= 4096);
            for l in text.lines() {
                assert_eq!(l, line.trim_end());
                total += 1;
            }
        }
        assert_eq!(total, 100);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
