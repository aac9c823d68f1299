//! Starting a node: the shared tables, the change rings, the workers, and the control
//! plane that drains the change stream into replication and serves gRPC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{Change, ChangeRecord};
use sipmesh_cluster::ring::{ChangeProducer, change_ring};
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::core::{Core, CoreConfig, CoreStats};
use sipmesh_dataplane::io::{self, Workers};
use sipmesh_dataplane::registrar::{Registrar, RegistrarStats};

use crate::config::Config;
use crate::grpc::{ControlOptions, ControlPlane, ControlStats};

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
    pub control_stats: Arc<ControlStats>,
    /// The gRPC address the control plane listens on.
    pub grpc_addr: std::net::SocketAddr,
    shutdown: Arc<AtomicBool>,
    workers_done: Arc<AtomicBool>,
    control: Option<ControlPlane>,
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
        let workers_done = Arc::new(AtomicBool::new(false));
        // The gRPC listener is bound first, so that a taken port fails the start cleanly.
        let control = ControlPlane::start(
            &config,
            usrloc.clone(),
            consumers,
            ControlOptions {
                dump_changes: opts.dump_changes,
            },
            workers_done.clone(),
        )?;
        let workers = match io::spawn_workers(&config.io, make, shutdown.clone()) {
            Ok(w) => w,
            Err(e) => {
                workers_done.store(true, Ordering::SeqCst);
                control.join();
                return Err(e);
            }
        };
        Ok(Node {
            config,
            workers,
            usrloc,
            core_stats,
            registrar_stats,
            control_stats: control.stats.clone(),
            grpc_addr: control.grpc_addr,
            shutdown,
            workers_done,
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
        // Workers are gone: the control plane drains what they left and stops.
        self.workers_done.store(true, Ordering::SeqCst);
        if let Some(c) = self.control.take() {
            c.join();
        }
        r
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
