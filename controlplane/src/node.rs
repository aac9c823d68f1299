//! Starting a node: the shared tables, the change rings, the workers, and the control
//! thread that drains the change stream.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{Change, ChangeRecord};
use sipmesh_cluster::ring::{ChangeConsumer, ChangeProducer, change_ring};
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::core::{Core, CoreConfig, CoreStats};
use sipmesh_dataplane::io::{self, Workers};
use sipmesh_dataplane::registrar::{Registrar, RegistrarStats};

use crate::config::Config;

/// Options that are not part of the configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print every drained change record on standard output, one line each.
    pub dump_changes: bool,
}

/// A running node.
pub struct Node {
    pub config: Config,
    pub workers: Workers,
    pub usrloc: Arc<Usrloc>,
    pub core_stats: Vec<Arc<CoreStats>>,
    pub registrar_stats: Vec<Arc<RegistrarStats>>,
    pub changes_drained: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
    control: Option<JoinHandle<()>>,
}

impl Node {
    /// Bind every socket, start the workers and the control thread.
    pub fn start(
        config: Config,
        opts: RunOptions,
        shutdown: Arc<AtomicBool>,
    ) -> std::io::Result<Node> {
        let n = config.io.workers;
        let usrloc = Arc::new(Usrloc::new(config.usrloc_capacity));
        let mut producers = Vec::with_capacity(n);
        let mut consumers = Vec::with_capacity(n);
        for _ in 0..n {
            let (p, c) = change_ring(config.change_ring_bytes);
            producers.push(Some(p));
            consumers.push(c);
        }
        let producers: Arc<Mutex<Vec<Option<ChangeProducer>>>> = Arc::new(Mutex::new(producers));
        let core_stats: Vec<Arc<CoreStats>> = (0..n).map(|_| Arc::default()).collect();
        let registrar_stats: Vec<Arc<RegistrarStats>> = (0..n).map(|_| Arc::default()).collect();
        let make = {
            let usrloc = usrloc.clone();
            let core_stats = core_stats.clone();
            let registrar_stats = registrar_stats.clone();
            let reg_cfg = config.registrar.clone();
            let core_cfg = CoreConfig {
                server_header: config.server_header.clone(),
            };
            let node = NodeId(config.node_id);
            move |i: usize| {
                // Start-up only: each worker takes its ring's producing half once.
                let producer = producers
                    .lock()
                    .ok()
                    .and_then(|mut v| v.get_mut(i).and_then(Option::take));
                let producer = producer.expect("one change ring per worker");
                let registrar = Registrar::new(
                    reg_cfg.clone(),
                    usrloc.clone(),
                    producer,
                    node,
                    i as u16,
                    io::now_millis(),
                    registrar_stats[i].clone(),
                );
                Core::new(core_cfg.clone(), registrar, core_stats[i].clone())
            }
        };
        let workers = io::spawn_workers(&config.io, make, shutdown.clone())?;
        let changes_drained = Arc::new(AtomicU64::new(0));
        let control = {
            let shutdown = shutdown.clone();
            let drained = changes_drained.clone();
            std::thread::Builder::new()
                .name("sipd-control".into())
                .spawn(move || drain_loop(consumers, shutdown, drained, opts))?
        };
        Ok(Node {
            config,
            workers,
            usrloc,
            core_stats,
            registrar_stats,
            changes_drained,
            shutdown,
            control: Some(control),
        })
    }

    pub fn shutdown_flag(&self) -> &Arc<AtomicBool> {
        &self.shutdown
    }

    /// Stop the workers, drain what is left of the change stream, join everything.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shutdown.store(true, Ordering::SeqCst);
        let r = self.workers.join();
        if let Some(c) = self.control.take() {
            let _ = c.join();
        }
        r
    }
}

/// The control thread: drain every worker's change ring. Replication and persistence
/// consume this stream in later stages; here it is counted and, on request, printed.
fn drain_loop(
    mut rings: Vec<ChangeConsumer>,
    shutdown: Arc<AtomicBool>,
    drained: Arc<AtomicU64>,
    opts: RunOptions,
) {
    let stdout = std::io::stdout();
    loop {
        let stopping = shutdown.load(Ordering::SeqCst);
        let mut got = 0u64;
        for r in &mut rings {
            got += r.drain(|rec| {
                if opts.dump_changes {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{}", format_change(&rec));
                }
            }) as u64;
        }
        if got > 0 {
            drained.fetch_add(got, Ordering::Relaxed);
            if opts.dump_changes {
                let _ = stdout.lock().flush();
            }
        }
        // Workers are joined before the flag is seen twice here; one last pass after
        // they stop picks up the final records.
        if stopping && rings.iter().all(|r| r.is_empty() && r.is_abandoned()) {
            break;
        }
        if got == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One line per record: `change origin=1 version=... op=upsert aor=... contact=...`.
pub fn format_change(rec: &ChangeRecord) -> String {
    let s = |b: &[u8]| String::from_utf8_lossy(b).escape_debug().to_string();
    match &rec.change {
        Change::BindingUpsert { aor, binding } => format!(
            "change origin={} version={} at_ms={} op=upsert aor={} contact={} expires_at={} cseq={} call_id={} source={}",
            rec.origin.0,
            rec.version,
            rec.at_ms,
            s(aor),
            s(binding.contact()),
            binding.expires_at,
            binding.cseq,
            s(binding.call_id()),
            binding.source(),
        ),
        Change::BindingRemove {
            aor,
            contact,
            reason,
            ..
        } => format!(
            "change origin={} version={} at_ms={} op=remove aor={} contact={} reason={:?}",
            rec.origin.0,
            rec.version,
            rec.at_ms,
            s(aor),
            s(contact),
            reason
        ),
    }
}
