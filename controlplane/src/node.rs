//! Starting a node: the shared tables, the change rings, the workers, and the control
//! plane that drains the change stream into replication and serves gRPC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::{Change, ChangeRecord};
use sipmesh_cluster::ownership::Segment;
use sipmesh_cluster::ring::{ChangeConsumer, ChangeProducer, change_ring};
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::core::{Core, CoreConfig, CoreStats};
use sipmesh_dataplane::io::{self, Workers};
use sipmesh_dataplane::pinger::{PingStats, Pinger};
use sipmesh_dataplane::registrar::{KeepaliveMode, Registrar, RegistrarStats};
use std::net::SocketAddr;

use sipmesh_cluster::keepalive::{Acks, order_ring};

use sipmesh_dataplane::durable::{DurableShared, Gate};

use crate::config::Config;
use crate::grpc::{
    Attached, ControlOptions, ControlPlane, ControlStats, DialogAttach, KeepaliveAttach,
};
use sipmesh_cluster::dialog::{DialogTable, Profiles};
use sipmesh_cluster::presence::PresenceTable;
use sipmesh_dataplane::mailbox::mailboxes;
use sipmesh_dataplane::presence::{PresenceShare, PresenceStats};
use sipmesh_dataplane::stateful::{DialogShare, Proxy, ProxyConfig, ProxyStats};

use crate::cdr::CdrWriter;

/// Bytes of each worker's CDR ring (about 3 000 CDRs).
const CDR_RING_BYTES: usize = 1 << 20;
use sipmesh_dataplane::txn::table::Keys;

/// Bytes of each worker-to-worker mailbox ring.
const MAILBOX_BYTES: usize = 1 << 20;

/// Ping orders a worker's ring holds.
const ORDER_RING: usize = 4096;
use crate::store::persist::{Durability, PersistConfig, PersistStats, Persister};
use crate::store::{LoadReport, Store};

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
    /// Keepalive counters per worker.
    pub ping_stats: Vec<Arc<PingStats>>,
    /// Proxy counters per worker.
    pub proxy_stats: Vec<Arc<ProxyStats>>,
    pub registrar_stats: Vec<Arc<RegistrarStats>>,
    pub control_stats: Arc<ControlStats>,
    /// The gRPC address the control plane listens on.
    pub grpc_addr: std::net::SocketAddr,
    /// Write-behind counters (None: no store).
    pub persist_stats: Option<Arc<PersistStats>>,
    /// What recovery loaded at start.
    pub recovered: LoadReport,
    /// The ownership segment.
    pub segment: Arc<Segment>,
    shutdown: Arc<AtomicBool>,
    workers_done: Arc<AtomicBool>,
    cdr: Option<CdrWriter>,
    /// Every live call.
    pub dialogs: Arc<DialogTable>,
    control: Option<ControlPlane>,
    persister: Option<Persister>,
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
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
        let presence = Arc::new(PresenceTable::new(4096));
        // Recovery: what the store holds is in the table before anything is served.
        let mut recovered = LoadReport::default();
        let mut persisted_tags = Vec::new();
        let store = if config.store.enabled {
            let store = Store::open(
                &config.store.data_dir,
                config.node_id,
                config.cluster.cluster_id,
            )
            .map_err(other)?;
            let now_s = (io::now_millis() / 1000) as u32;
            recovered = store
                .load_contacts(&usrloc, now_s, |loaded, expired| {
                    eprintln!("sipd: recovery: {loaded} contacts loaded, {expired} expired so far");
                })
                .map_err(other)?;
            if recovered.loaded > 0 || recovered.expired > 0 {
                eprintln!(
                    "sipd: recovery: {} contacts in {} AoRs loaded from {} in {:.2} s ({:.0}/s); {} had expired and were dropped",
                    recovered.loaded,
                    recovered.aors,
                    config.store.data_dir.display(),
                    recovered.seconds,
                    recovered.loaded as f64 / recovered.seconds.max(1e-6),
                    recovered.expired
                );
            }
            let (pubs, watchers, gone) = store
                .load_presence(&presence, io::now_millis())
                .map_err(other)?;
            if pubs + watchers + gone > 0 {
                eprintln!(
                    "sipd: recovery: {pubs} publications and {watchers} watchers loaded; {gone} had expired and were dropped"
                );
            }
            persisted_tags = store.load_tag_terms().map_err(other)?;
            Some(Arc::new(store))
        } else {
            None
        };
        // The ownership segment: nothing is owned until the control plane publishes.
        let segment = Arc::new(Segment::create(&config.segment_path(), config.node_id)?);
        // With a store, every worker's REGISTER replies go through a durability gate: no
        // slack in sync mode, `async_max_unwritten` records in async mode.
        let slack = match config.store.durability {
            Durability::Sync => 0,
            Durability::Async => config.store.async_max_unwritten,
        };
        let gates: Vec<Arc<DurableShared>> = if store.is_some() {
            (0..n)
                .map(|_| DurableShared::new())
                .collect::<std::io::Result<_>>()?
        } else {
            Vec::new()
        };
        let persister = match &store {
            Some(st) => Some(Persister::start(
                st.clone(),
                usrloc.clone(),
                config.presence.is_some().then(|| presence.clone()),
                PersistConfig {
                    durability: config.store.durability,
                    flush_ms: config.store.flush_ms,
                    wal_sync_ms: config.store.wal_sync_ms,
                },
                gates.clone(),
            )?),
            None => None,
        };
        // Loaded AoRs go on the workers' expiry wheels, spread evenly.
        let mut expiries: Vec<Vec<(Arc<[u8]>, u32)>> = (0..n).map(|_| Vec::new()).collect();
        for (k, (aor, at)) in std::mem::take(&mut recovered.expiries)
            .into_iter()
            .enumerate()
        {
            expiries[k % n.max(1)].push((aor, at));
        }
        let expiries = Arc::new(Mutex::new(expiries));
        let mut producers = Vec::with_capacity(n);
        let mut consumers = Vec::with_capacity(n);
        for _ in 0..n {
            let (p, c) = change_ring(config.change_ring_bytes);
            producers.push(Some(p));
            consumers.push(c);
        }
        // The control plane's own changes (the expiry sweep) go through a ring like the
        // workers', drained with theirs.
        let (control_ring, control_consumer) = change_ring(config.change_ring_bytes);
        consumers.push(control_consumer);
        // Each worker's dialog changes: a ring of their own (replicated like the rest;
        // after the registrar rings and the control ring, so durability positions stay
        // the workers').
        let dialog_changes = worker_rings(n, config.change_ring_bytes, &mut consumers);
        // And their presence changes: one more ring each.
        let presence_changes = worker_rings(n, config.change_ring_bytes, &mut consumers);
        let presence_stats: Vec<Arc<PresenceStats>> = (0..n).map(|_| Arc::default()).collect();
        let producers: Arc<Mutex<Vec<Option<ChangeProducer>>>> = Arc::new(Mutex::new(producers));
        // NAT keepalives: the control plane schedules, each worker sends from its ring.
        let acks = Arc::new(Acks::new(config.nat.max_tracked, {
            use std::hash::{BuildHasher, Hasher};
            std::hash::RandomState::new().build_hasher().finish()
        }));
        let mut order_tx = Vec::with_capacity(n);
        let mut order_rx = Vec::with_capacity(n);
        for _ in 0..n {
            let (p, c) = order_ring(ORDER_RING);
            order_tx.push(p);
            order_rx.push(Some(c));
        }
        let order_rx = Arc::new(Mutex::new(order_rx));
        let ping_stats: Vec<Arc<PingStats>> = (0..n).map(|_| Arc::default()).collect();
        let ping_from: SocketAddr = config
            .sip_addr()
            .parse()
            .ok()
            .or(config.io.udp.first().copied())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)));
        // Responses reaching another worker's socket are steered to the owner.
        let mailboxes = Arc::new(Mutex::new(
            mailboxes(n, MAILBOX_BYTES)
                .into_iter()
                .map(Some)
                .collect::<Vec<_>>(),
        ));
        let keys = Arc::new(Keys::new());
        // Calls: one table for the node; each worker hands finished calls to the CDR
        // writer over a ring of its own.
        let dialogs = Arc::new(DialogTable::new(4096));
        let profiles = Arc::new(Profiles::new(config.proxy.profiles.clone()));
        let mut end_tx = Vec::with_capacity(n);
        let dialog_orders = Arc::new(Mutex::new(
            (0..n)
                .map(|_| {
                    let (p, c) = rtrb::RingBuffer::new(1 << 16);
                    end_tx.push(p);
                    Some(c)
                })
                .collect::<Vec<_>>(),
        ));
        let mut cdr_rx = Vec::with_capacity(n);
        let cdr_tx = Arc::new(Mutex::new(
            (0..n)
                .map(|_| {
                    let (p, c) = rtrb::RingBuffer::new(CDR_RING_BYTES);
                    cdr_rx.push(c);
                    Some(p)
                })
                .collect::<Vec<_>>(),
        ));
        let proxy_stats: Vec<Arc<ProxyStats>> = (0..n).map(|_| Arc::default()).collect();
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
            let gates = gates.clone();
            let park_bytes = config.store.park_bytes;
            let max_msg = config.io.max_message_size;
            let (segment, acks, ping_stats) = (segment.clone(), acks.clone(), ping_stats.clone());
            let (proxy_cfg, keys, proxy_stats) =
                (config.proxy.clone(), keys.clone(), proxy_stats.clone());
            let (dialogs, cdr_tx, dialog_orders) =
                (dialogs.clone(), cdr_tx.clone(), dialog_orders.clone());
            let profiles = profiles.clone();
            let dialog_changes = dialog_changes.clone();
            let (presence, presence_changes, presence_stats, presence_cfg) = (
                presence.clone(),
                presence_changes.clone(),
                presence_stats.clone(),
                config.presence.clone(),
            );
            move |i: usize| {
                // Start-up only: each worker takes its ring's producing half once.
                let producer = take_slot(&producers, i, "one change ring per worker");
                let mut registrar = Registrar::new(
                    reg_cfg.clone(),
                    usrloc.clone(),
                    producer,
                    node,
                    i as u16,
                    io::now_millis(),
                    registrar_stats[i].clone(),
                );
                let mine = expiries
                    .lock()
                    .ok()
                    .map(|mut v| std::mem::take(&mut v[i]))
                    .unwrap_or_default();
                for (aor, at) in mine {
                    registrar.schedule_expiry(aor, at);
                }
                let orders = take_slot(&order_rx, i, "one order ring per worker");
                let core = Core::new(core_cfg.clone(), registrar, core_stats[i].clone())
                    .with_pinger(Pinger::new(
                        orders,
                        segment.clone(),
                        acks.clone(),
                        ping_from,
                        node.0,
                        ping_stats[i].clone(),
                    ));
                let core = if proxy_cfg.enabled {
                    let mb = take_slot(&mailboxes, i, "one mailbox per worker");
                    let proxy = Proxy::new(
                        ProxyConfig {
                            timers: proxy_cfg.timers,
                            local: ping_from,
                            record_route: proxy_cfg.record_route,
                            dialog_lifetime_ms: proxy_cfg.dialog_lifetime_ms,
                            dialog_ping_ms: proxy_cfg.dialog_ping_ms,
                            serial_forking: proxy_cfg.serial_forking,
                        },
                        keys.clone(),
                        node.0,
                        i as u16,
                        io::now_millis(),
                        proxy_stats[i].clone(),
                    )
                    .with_dialogs(DialogShare {
                        table: dialogs.clone(),
                        cdrs: take_slot(&cdr_tx, i, "one CDR ring per worker"),
                        segment: segment.clone(),
                        profiles: profiles.clone(),
                        changes: take_slot(&dialog_changes, i, "one dialog change ring per worker"),
                        orders: take_slot(&dialog_orders, i, "one dialog order ring per worker"),
                    });
                    let proxy = match &presence_cfg {
                        Some(pc) => proxy.with_presence(PresenceShare {
                            table: presence.clone(),
                            changes: take_slot(
                                &presence_changes,
                                i,
                                "one presence change ring per worker",
                            ),
                            segment: segment.clone(),
                            config: pc.clone(),
                            stats: presence_stats[i].clone(),
                        }),
                        None => proxy,
                    };
                    core.with_proxy(proxy).with_mailbox(mb)
                } else {
                    core
                };
                match gates.get(i) {
                    Some(g) => {
                        core.with_durability_gate(Gate::new(g.clone(), park_bytes, max_msg, slack))
                    }
                    None => core,
                }
            }
        };
        let workers_done = Arc::new(AtomicBool::new(false));
        // The control plane writes the CDRs of calls other nodes ended and this one acts
        // on, through a ring of its own.
        let (cdr_control, cdr_control_rx) = rtrb::RingBuffer::new(CDR_RING_BYTES);
        cdr_rx.push(cdr_control_rx);
        let cdr = CdrWriter::start(config.cdr.clone(), cdr_rx, workers_done.clone())?;
        // The gRPC listener is bound first, so that a taken port fails the start cleanly.
        let control = ControlPlane::start(
            &config,
            usrloc.clone(),
            consumers,
            ControlOptions {
                dump_changes: opts.dump_changes,
                newest_version: recovered.newest_version,
                persisted_tags,
            },
            workers_done.clone(),
            Attached {
                store: store.clone(),
                persister: persister.as_ref(),
                segment: segment.clone(),
                control_ring,
                dialogs: Some(DialogAttach {
                    table: dialogs.clone(),
                    end_orders: end_tx,
                    profiles: profiles.clone(),
                    cdrs: cdr_control,
                    presence: config.presence.is_some().then(|| presence.clone()),
                }),
                keepalive: Some(KeepaliveAttach {
                    orders: order_tx,
                    acks,
                    worker_stats: ping_stats.clone(),
                    settings: config.nat.ping,
                    observe_local: config.registrar.keepalive != KeepaliveMode::Off,
                }),
            },
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
            ping_stats,
            proxy_stats,
            registrar_stats,
            control_stats: control.stats.clone(),
            grpc_addr: control.grpc_addr,
            persist_stats: persister.as_ref().map(|p| p.stats.clone()),
            recovered,
            segment,
            shutdown,
            workers_done,
            cdr: Some(cdr),
            dialogs,
            control: Some(control),
            persister,
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
        if let Some(c) = self.cdr.take() {
            c.join();
        }
        // Then the write-behind writes (and syncs) what it was given.
        if let Some(p) = self.persister.take() {
            p.stop();
        }
        r
    }
}

/// A per-worker slot taken once at start-up: worker `i` takes its half of a ring.
fn take_slot<T>(slots: &Mutex<Vec<Option<T>>>, i: usize, what: &str) -> T {
    slots
        .lock()
        .ok()
        .and_then(|mut v| v.get_mut(i).and_then(Option::take))
        .expect(what)
}

/// One change ring per worker: the consuming halves join `consumers` (drained by the
/// control plane), the producing halves wait for their workers.
fn worker_rings(
    n: usize,
    bytes: usize,
    consumers: &mut Vec<ChangeConsumer>,
) -> Arc<Mutex<Vec<Option<ChangeProducer>>>> {
    Arc::new(Mutex::new(
        (0..n)
            .map(|_| {
                let (p, c) = change_ring(bytes);
                consumers.push(c);
                Some(p)
            })
            .collect(),
    ))
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
        Change::DialogUpsert { dialog, .. } | Change::DialogEnd { dialog, .. } => format!(
            "change origin={} version={} at_ms={} op={} dialog={:016x} state={} call_id={}",
            rec.origin.0,
            rec.version,
            rec.at_ms,
            if matches!(rec.change, Change::DialogEnd { .. }) {
                "dialog-end"
            } else {
                "dialog"
            },
            dialog.id,
            dialog.state.as_str(),
            s(&dialog.call_id),
        ),
        Change::PublishUpsert {
            key,
            replaces,
            publication,
        } => format!(
            "change origin={} version={} at_ms={} op=publish presentity={} etag={} replaces={} expires_ms={}",
            rec.origin.0,
            rec.version,
            rec.at_ms,
            s(key),
            s(&publication.etag),
            s(replaces),
            publication.expires_ms,
        ),
        Change::PublishRemove { key, etag, reason } => format!(
            "change origin={} version={} at_ms={} op=unpublish presentity={} etag={} reason={:?}",
            rec.origin.0,
            rec.version,
            rec.at_ms,
            s(key),
            s(etag),
            reason,
        ),
        Change::WatcherUpsert { watcher, .. } | Change::WatcherEnd { watcher, .. } => format!(
            "change origin={} version={} at_ms={} op={} watcher={:016x} presentity={} from={} expires_ms={}",
            rec.origin.0,
            rec.version,
            rec.at_ms,
            if matches!(rec.change, Change::WatcherEnd { .. }) {
                "watcher-end"
            } else {
                "watcher"
            },
            watcher.id,
            s(&watcher.presentity),
            s(&watcher.watcher_uri),
            watcher.expires_ms,
        ),
    }
}
