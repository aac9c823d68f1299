//! The control plane's runtime: a tokio runtime on its own thread serving the `Peer` and
//! `Admin` gRPC services, driving the sans-IO [`Mesh`], draining the workers' change rings
//! into replication, applying peers' records to the tables and moving snapshots.
//!
//! The mesh is owned by one task; gRPC handlers talk to it through a bounded channel (a
//! peer that sends faster than the mesh consumes is slowed down by HTTP/2 flow control),
//! and each outgoing link has its own bounded queue: when it is full, envelopes are
//! dropped and counted, and the receiver's gap detection asks for them again.

pub mod convert;
mod services;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use sipmesh_cluster::change::{Change, ChangeRecord, ChangeRecordRef, ChangeRef};
use sipmesh_cluster::ring::{ChangeConsumer, ChangeProducer};
use sipmesh_cluster::usrloc::{Applied, Usrloc};
use sipmesh_cluster::{Digest, NodeId};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::config::Config;
use crate::mesh::{
    Action, Batch, Capability, Event, Mesh, MeshConfig, Millis, NodeInfo, SnapshotOutcome,
};
use crate::metrics::Histogram;
use crate::node::format_change;
use crate::pb;
use crate::store::Store;
use crate::store::persist::{PersistSender, PersistStats, Persister};
use sipmesh_cluster::dialog::{DialogTable, Profiles};
use sipmesh_cluster::ownership::Segment;
use sipmesh_cluster::presence::PresenceTable;
use sipmesh_dataplane::stateful::{
    ORDER_ADMIN, ORDER_LIFETIME, ORDER_PING, ping_rounds_due, push_end_order,
};

mod keepalive;
pub(crate) use keepalive::Keepalive;
pub use keepalive::{KeepaliveAttach, KeepaliveStatus, TagSlots, refresh_tag_slots, tag_slot};

/// Largest replication batch (bytes of framed records) the drain builds.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Snapshot chunk size.
const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;
/// Envelopes queued per outgoing link.
const LINK_QUEUE: usize = 4096;
/// Inputs queued for the mesh task.
const MESH_QUEUE: usize = 16 * 1024;

/// Work run on the mesh task with the mesh and the time.
pub(crate) type MeshFn = Box<dyn FnOnce(&mut Mesh, Millis) + Send>;

/// Work run on the mesh task with the keepalive scheduler (None: keepalives off).
pub(crate) type KeepaliveFn = Box<dyn FnOnce(Option<&mut Keepalive>) + Send>;

/// An input of the mesh task.
pub(crate) enum Input {
    Envelope(crate::mesh::Envelope),
    With(MeshFn),
    Keepalive(KeepaliveFn),
    SnapshotDone(Capability, NodeId, SnapshotOutcome),
}

/// Counters of the control plane's own work.
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Change records drained from the workers' rings.
    pub drained: AtomicU64,
    /// Replicated records applied to the tables.
    pub applied: AtomicU64,
    /// Replicated records that did not decode (dropped).
    pub bad_records: AtomicU64,
    /// Envelopes refused at the edge.
    pub bad_envelopes: AtomicU64,
    /// Envelopes dropped because a link queue was full.
    pub link_queue_full: AtomicU64,
    /// Replication lag of applied records: wall-clock time of the apply minus the time
    /// the origin made the change (which has millisecond resolution: ±0.5 ms).
    pub lag_us: Histogram,
}

/// What the gRPC services share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub cluster_id: u32,
    pub me: NodeId,
    pub usrloc: Arc<Usrloc>,
    pub tx: mpsc::Sender<Input>,
    pub stats: Arc<ControlStats>,
    pub clock: Clock,
    /// The store, for `sipctl db`.
    pub store: Option<Arc<Store>>,
    /// Write-behind of replicated records once applied.
    pub persist: Option<PersistSender>,
    /// Its counters.
    pub persist_stats: Option<Arc<PersistStats>>,
    /// Its durability mode (`async` | `sync`).
    pub durability: &'static str,
    /// The ownership segment the workers read.
    pub segment: Arc<Segment>,
    /// The control plane's change ring (expiry sweep).
    pub control_ring: Arc<std::sync::Mutex<ChangeProducer>>,
    /// Sweep period and grace (seconds past expiry).
    pub sweep: (Duration, u32),
    /// Sharing tag name → segment slot.
    pub tag_slots: TagSlots,
    /// The calls the proxy tracks.
    pub dialogs: Option<Arc<DialogTable>>,
    /// The workers' rings of calls to end.
    pub dialog_orders: Arc<std::sync::Mutex<Vec<rtrb::Producer<u8>>>>,
    /// Dialog profiles.
    pub profiles: Option<Arc<Profiles>>,
    /// In-dialog ping period (0: none).
    pub dialog_ping_ms: u64,
    /// The CDR writer's ring for calls other nodes ended.
    pub cdrs: Option<Arc<std::sync::Mutex<rtrb::Producer<u8>>>>,
    /// Presentities and watchers (None: presence off).
    pub presence: Option<Arc<PresenceTable>>,
}

impl Shared {
    /// Runs `f` on the mesh task and returns its result.
    pub async fn query<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Mesh, Millis) -> R + Send + 'static,
    ) -> Result<R, tonic::Status> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Input::With(Box::new(move |m, now| {
                let _ = otx.send(f(m, now));
            })))
            .await
            .map_err(|_| tonic::Status::unavailable("node is stopping"))?;
        orx.await
            .map_err(|_| tonic::Status::unavailable("node is stopping"))
    }
}

/// The mesh clock: milliseconds since the process started (monotonic).
#[derive(Clone, Copy)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub fn now(&self) -> Millis {
        self.0.elapsed().as_millis() as Millis
    }
}

/// Options of the control plane that are not in the configuration file.
#[derive(Debug, Clone, Default)]
pub struct ControlOptions {
    /// Print every drained change record.
    pub dump_changes: bool,
    /// Newest object version recovered from the store (cold-start election, and where a
    /// restarted node's first sync resumes).
    pub newest_version: u64,
    /// Sharing-tag terms recovered from the store: (name, term, holder).
    pub persisted_tags: Vec<(String, u64, Option<u16>)>,
}

/// What the control plane works with besides the tables and rings.
pub struct Attached<'a> {
    /// The store (`sipctl db`, tag terms).
    pub store: Option<Arc<Store>>,
    /// The write-behind.
    pub persister: Option<&'a Persister>,
    /// The ownership segment it publishes into.
    pub segment: Arc<Segment>,
    /// Its own change ring (drained with the workers').
    pub control_ring: ChangeProducer,
    /// NAT keepalives (None: off).
    pub keepalive: Option<KeepaliveAttach>,
    /// The calls the proxy tracks (None: no proxy).
    pub dialogs: Option<DialogAttach>,
}

/// What the control plane works with for calls.
pub struct DialogAttach {
    /// Every live call.
    pub table: Arc<DialogTable>,
    /// The workers' rings of calls to end.
    pub end_orders: Vec<rtrb::Producer<u8>>,
    /// Dialog profiles.
    pub profiles: Arc<Profiles>,
    /// The CDR writer's ring for calls other nodes ended.
    pub cdrs: rtrb::Producer<u8>,
    /// The presence tables (None: presence off); its orders share the workers' rings.
    pub presence: Option<Arc<PresenceTable>>,
}

/// The running control plane.
pub struct ControlPlane {
    thread: Option<JoinHandle<()>>,
    /// Its counters.
    pub stats: Arc<ControlStats>,
    /// The gRPC address it listens on.
    pub grpc_addr: std::net::SocketAddr,
}

impl ControlPlane {
    /// Binds the gRPC listener (errors are reported here, before anything runs) and starts
    /// the runtime thread. It drains `rings` until `workers_done` is set and they are
    /// empty, then stops.
    pub fn start(
        config: &Config,
        usrloc: Arc<Usrloc>,
        rings: Vec<ChangeConsumer>,
        opts: ControlOptions,
        workers_done: Arc<AtomicBool>,
        attached: Attached<'_>,
    ) -> std::io::Result<ControlPlane> {
        let Attached {
            store,
            persister,
            segment,
            control_ring,
            keepalive,
            dialogs,
        } = attached;
        let dialog_ping_ms = config.proxy.dialog_ping_ms;
        let (dialog_table, dialog_orders, profiles, cdrs, presence) = match dialogs {
            Some(d) => (
                Some(d.table),
                d.end_orders,
                Some(d.profiles),
                Some(Arc::new(std::sync::Mutex::new(d.cdrs))),
                d.presence,
            ),
            None => (None, Vec::new(), None, None, None),
        };
        let control_ring = Arc::new(std::sync::Mutex::new(control_ring));
        let sweep = (
            Duration::from_secs(config.cluster.expiry_sweep_s),
            config.cluster.expiry_grace_s,
        );
        let persist = persister.map(Persister::sender);
        let persist_stats = persister.map(|p| p.stats.clone());
        let durability = persister.map_or("", |p| p.durability.name());
        let listener = TcpListener::bind(config.cluster.grpc_listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("gRPC listen {}: {e}", config.cluster.grpc_listen),
            )
        })?;
        listener.set_nonblocking(true)?;
        let grpc_addr = listener.local_addr()?;
        let stats = Arc::new(ControlStats::default());
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let c = &config.cluster;
        let me = NodeInfo {
            id: NodeId(config.node_id),
            peer_url: if c.peer_url.is_empty() && c.grpc_listen.port() == 0 {
                format!("http://{grpc_addr}")
            } else {
                config.peer_url()
            },
            sip_addr: config.sip_addr(),
            seed: c.seed,
            priority: c.priority,
        };
        let mut mc = MeshConfig::new(c.cluster_id, me, incarnation);
        mc.heartbeat_interval = c.heartbeat_interval_ms;
        mc.heartbeat_timeout = c.heartbeat_timeout_ms;
        mc.heartbeat_retries = c.heartbeat_retries;
        mc.link_up_after = c.link_up_after;
        mc.lsa_refresh = c.link_state_refresh_ms;
        mc.seed_fallback = c.seed_fallback_ms;
        mc.gap_timeout = c.gap_timeout_ms;
        mc.replay_bytes = c.replay_buffer_bytes;
        mc.mode = c.mode;
        mc.joining = !c.join.is_empty();
        mc.resume_margin = c.resume_margin_ms;
        mc.tags = c.tags.clone();
        mc.tag_failover = (c.tag_failover_ms > 0).then_some(c.tag_failover_ms);
        mc.tag_handover = c.tag_handover_ms;
        mc.persisted_tags = opts
            .persisted_tags
            .iter()
            .map(|(n, t, h)| (n.clone(), *t, h.map(NodeId)))
            .collect();
        let members: Vec<NodeInfo> = c
            .members
            .iter()
            .map(|(id, url)| NodeInfo {
                id: NodeId(*id),
                peer_url: url.clone(),
                sip_addr: String::new(),
                seed: false,
                priority: 0,
            })
            .collect();
        let join = c.join.clone();
        let sync_timeout = Duration::from_millis(c.sync_timeout_ms);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sipd-control")
            .enable_all()
            .build()?;
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("sipd-control".into())
            .spawn(move || {
                let (tx, rx) = mpsc::channel(MESH_QUEUE);
                let clock = Clock(Instant::now());
                let mut mc = mc;
                // Tag hand-overs are agreed in wall-clock time.
                mc.wall_at_zero = wall_ms().saturating_sub(clock.now());
                let ka = keepalive.map(|k| Keepalive::new(k, mc.me.id));
                let shared = Shared {
                    cluster_id: mc.cluster_id,
                    me: mc.me.id,
                    usrloc,
                    tx,
                    stats: st,
                    clock,
                    store,
                    persist,
                    persist_stats,
                    durability,
                    segment,
                    control_ring,
                    sweep,
                    tag_slots: TagSlots::default(),
                    dialogs: dialog_table,
                    dialog_orders: Arc::new(std::sync::Mutex::new(dialog_orders)),
                    profiles,
                    dialog_ping_ms,
                    cdrs,
                    presence,
                };
                runtime.block_on(run(
                    mc,
                    members,
                    join,
                    sync_timeout,
                    listener,
                    shared,
                    rx,
                    rings,
                    opts,
                    workers_done,
                    ka,
                ));
                runtime.shutdown_timeout(Duration::from_millis(200));
            })?;
        Ok(ControlPlane {
            thread: Some(thread),
            stats,
            grpc_addr,
        })
    }

    /// Waits for the runtime thread (after the workers stopped and the flag was set).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mc: MeshConfig,
    members: Vec<NodeInfo>,
    join: Vec<String>,
    sync_timeout: Duration,
    listener: TcpListener,
    shared: Shared,
    rx: mpsc::Receiver<Input>,
    rings: Vec<ChangeConsumer>,
    opts: ControlOptions,
    workers_done: Arc<AtomicBool>,
    ka: Option<Keepalive>,
) {
    let clock = shared.clock;
    let tx = shared.tx.clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => Some(tokio::spawn(services::serve(shared.clone(), l, stop_rx))),
        Err(e) => {
            eprintln!("sipd: gRPC listener: {e}");
            None
        }
    };
    let me = mc.me.clone();
    for url in join {
        tokio::spawn(join_through(url, me.clone(), mc.cluster_id, tx.clone()));
    }
    let mut mesh = Mesh::new(mc, members, clock.now());
    mesh.set_newest_version(Capability::Usrloc, opts.newest_version);
    mesh.set_resume_point(opts.newest_version);
    mesh_loop(
        mesh,
        shared,
        rx,
        rings,
        opts,
        workers_done,
        sync_timeout,
        ka,
    )
    .await;
    let _ = stop_tx.send(());
    if let Some(s) = server {
        let _ = tokio::time::timeout(Duration::from_millis(500), s).await;
    }
}

/// Asks `url` to adopt this node until one answers (or refuses for good).
async fn join_through(url: String, me: NodeInfo, cluster_id: u32, tx: mpsc::Sender<Input>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let ch = Endpoint::from_shared(url.clone())
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            pb::peer_client::PeerClient::new(ch)
                .join(pb::JoinRequest {
                    cluster_id,
                    node: Some(convert::node_info_pb(&me)),
                })
                .await
        };
        match attempt.await {
            Ok(reply) => {
                let members: Vec<NodeInfo> = reply
                    .into_inner()
                    .members
                    .into_iter()
                    .filter_map(|m| convert::node_info("members", Some(m)).ok())
                    .collect();
                eprintln!("sipd: joined through {url}: {} members", members.len());
                let _ = tx
                    .send(Input::With(Box::new(move |m, now| {
                        m.on_join_reply(now, members)
                    })))
                    .await;
                return;
            }
            Err(s)
                if s.code() == tonic::Code::AlreadyExists
                    || s.code() == tonic::Code::InvalidArgument =>
            {
                eprintln!("sipd: join through {url} refused: {}", s.message());
                return;
            }
            Err(_) => {}
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

struct LinkHandle {
    url: String,
    tx: mpsc::Sender<pb::Envelope>,
    task: tokio::task::JoinHandle<()>,
}

#[allow(clippy::too_many_arguments)]
async fn mesh_loop(
    mut mesh: Mesh,
    shared: Shared,
    mut rx: mpsc::Receiver<Input>,
    mut rings: Vec<ChangeConsumer>,
    opts: ControlOptions,
    workers_done: Arc<AtomicBool>,
    sync_timeout: Duration,
    mut ka: Option<Keepalive>,
) {
    if let Some(k) = ka.as_mut() {
        // What the store loaded.
        k.observe_all(&shared.usrloc);
    }
    let mut links: HashMap<NodeId, LinkHandle> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain = tokio::time::interval(Duration::from_millis(2));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(shared.sweep.0);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.tick().await;
    let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
    let mut lifetimes = tokio::time::interval(Duration::from_secs(1));
    lifetimes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Vec::with_capacity(4096);
    let mut buf = BytesMut::with_capacity(MAX_BATCH_BYTES + 4096);
    let clock = shared.clock;
    loop {
        tokio::select! {
            inp = rx.recv() => match inp {
                Some(Input::Envelope(env)) => mesh.on_envelope(clock.now(), env),
                Some(Input::With(f)) => f(&mut mesh, clock.now()),
                Some(Input::Keepalive(f)) => f(ka.as_mut()),
                Some(Input::SnapshotDone(cap, donor, outcome)) => {
                    mesh.snapshot_done(clock.now(), cap, donor, outcome);
                    if let Some(k) = ka.as_mut() {
                        k.observe_all(&shared.usrloc);
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                mesh.tick(clock.now());
                refresh_tag_slots(&shared.tag_slots, &mesh.tags());
                if let Some(k) = ka.as_mut() {
                    k.tick(wall_ms(), &shared.usrloc, &shared.segment, &shared.tag_slots, &shared.control_ring);
                }
            }
            _ = lifetimes.tick() => {
                end_expired_dialogs(&shared);
                expire_presence(&shared);
            }
            _ = sweep.tick() => {
                if sweeping.as_ref().is_none_or(|h| h.is_finished()) {
                    sweeping = Some(spawn_sweep(&shared, mesh.me().id));
                }
            }
            _ = drain.tick() => {
                let stopping = workers_done.load(Ordering::SeqCst);
                drain_rings(&mut mesh, &mut rings, &mut scratch, &mut buf, &opts, &shared, &mut ka);
                if stopping && rings.iter().all(|r| r.is_empty()) {
                    dispatch(&mut mesh, &mut links, &shared, sync_timeout, &mut ka);
                    // Let the last batches reach the link queues' streams.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
        dispatch(&mut mesh, &mut links, &shared, sync_timeout, &mut ka);
    }
    for (_, l) in links {
        l.task.abort();
    }
}

fn drain_rings(
    mesh: &mut Mesh,
    rings: &mut [ChangeConsumer],
    scratch: &mut Vec<u8>,
    buf: &mut BytesMut,
    opts: &ControlOptions,
    shared: &Shared,
    ka: &mut Option<Keepalive>,
) {
    let mut count = 0u32;
    let mut total = 0u64;
    let stdout = std::io::stdout();
    let mut flush = |buf: &mut BytesMut, count: &mut u32| {
        if *count > 0 {
            let records: Bytes = buf.split().freeze();
            if let Some(p) = &shared.persist {
                p.records(records.clone());
            }
            mesh.local_batch(shared.clock.now(), records, *count);
            *count = 0;
        }
    };
    for r in rings.iter_mut() {
        while r.pop_frame(scratch) {
            if let Some(k) = ka.as_mut() {
                k.observe_frame(&shared.usrloc, scratch);
            }
            buf.put_u32_le(scratch.len() as u32);
            buf.put_slice(scratch);
            count += 1;
            total += 1;
            if opts.dump_changes
                && let Ok((rec, _)) = ChangeRecord::decode_from_slice(scratch)
            {
                let _ = writeln!(stdout.lock(), "{}", format_change(&rec));
            }
            if buf.len() >= MAX_BATCH_BYTES {
                flush(buf, &mut count);
            }
        }
    }
    flush(buf, &mut count);
    if total > 0 {
        // Sync durability: once written, these positions release the parked replies.
        if let Some(p) = &shared.persist {
            p.positions(rings.iter().map(|r| r.stats().popped()).collect());
        }
        shared.stats.drained.fetch_add(total, Ordering::Relaxed);
        if opts.dump_changes {
            let _ = stdout.lock().flush();
        }
    }
}

fn dispatch(
    mesh: &mut Mesh,
    links: &mut HashMap<NodeId, LinkHandle>,
    shared: &Shared,
    sync_timeout: Duration,
    ka: &mut Option<Keepalive>,
) {
    for a in mesh.take_actions() {
        match a {
            Action::Send { link, env } => {
                if let Some(l) = links.get(&link)
                    && l.tx
                        .try_send(convert::envelope_pb(shared.cluster_id, &env))
                        .is_err()
                {
                    shared.stats.link_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            Action::Connect(info) => {
                if links.get(&info.id).is_some_and(|l| l.url == info.peer_url) {
                    continue;
                }
                if let Some(old) = links.remove(&info.id) {
                    old.task.abort();
                }
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                let task = tokio::spawn(link_task(info.peer_url.clone(), rx));
                links.insert(
                    info.id,
                    LinkHandle {
                        url: info.peer_url,
                        tx,
                        task,
                    },
                );
            }
            Action::Disconnect(id) => {
                if let Some(l) = links.remove(&id) {
                    l.task.abort();
                }
            }
            Action::Apply { cap, batch, skip } => apply_batch(shared, cap, &batch, skip, ka),
            Action::StartSnapshot { cap, donor, since } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let id = donor.id;
                    let outcome = fetch_snapshot(&shared, cap, donor, since, sync_timeout).await;
                    if let SnapshotOutcome::Failed(why) = &outcome {
                        eprintln!("sipd: cluster: snapshot of {cap} from node {}: {why}", id.0);
                    }
                    let _ = shared.tx.send(Input::SnapshotDone(cap, id, outcome)).await;
                });
            }
            Action::Event(e) => log_event(&e),
            Action::Publish(o) => shared.segment.publish(&o),
            Action::PersistTags(tags) => {
                if let Some(store) = &shared.store {
                    let rows: Vec<(String, u64, Option<u16>)> = tags
                        .into_iter()
                        .map(|(n, t, h)| (n, t, h.map(|h| h.0)))
                        .collect();
                    if let Err(e) = store.save_tag_terms(&rows) {
                        eprintln!("sipd: cluster: cannot persist tag terms: {e}");
                    }
                }
            }
        }
    }
}

/// Calls past their lifetime limit that this node acts on are handed to a worker to end
/// (a BYE to each side, the CDR); answered calls due an in-dialog ping round get one.
fn end_expired_dialogs(shared: &Shared) {
    use sipmesh_cluster::ownership::bucket_of;
    let Some(table) = &shared.dialogs else { return };
    let Ok(mut orders) = shared.dialog_orders.lock() else {
        return;
    };
    let n = orders.len();
    if n == 0 || table.is_empty() {
        return;
    }
    let now = wall_ms();
    table.for_each(|key, d| {
        let ping = ping_rounds_due(d.answered_ms, now, shared.dialog_ping_ms) > d.legs.pings;
        if d.expires_ms > now && !ping {
            return;
        }
        let bucket = bucket_of(&d.call_id);
        if !shared
            .segment
            .acts_on_at(crate::mesh::tags::DEFAULT_TAG_SLOT, bucket, now)
            .0
        {
            return;
        }
        // A full ring: the call is still there, and ordered again in a second.
        let order = if d.expires_ms <= now {
            ORDER_LIFETIME
        } else {
            ORDER_PING
        };
        let _ = push_end_order(&mut orders[bucket % n], order, key);
    });
}

/// Presence changes a peer made: into the tables (newest version wins), with no side
/// effect of their own; the watchers of what changed that this node acts on are then
/// notified by a worker, on the control plane's order (the worker checks ownership).
/// Returns whether a presence table changed (the record is then persisted).
fn apply_presence(shared: &Shared, rec: &ChangeRecord) -> bool {
    use sipmesh_dataplane::presence::winfo_key;
    let Some(t) = &shared.presence else {
        return false;
    };
    let (changed, notify) = match &rec.change {
        Change::PublishUpsert {
            key,
            replaces,
            publication,
        } => (t.apply_publish(key, replaces, publication), key.to_vec()),
        Change::PublishRemove { key, etag, .. } => (t.apply_unpublish(key, etag), key.to_vec()),
        Change::WatcherUpsert { key, watcher } => (
            t.apply_watcher(key, watcher, false),
            winfo_key(&watcher.presentity),
        ),
        Change::WatcherEnd { key, watcher, .. } => (
            t.apply_watcher(key, watcher, true),
            winfo_key(&watcher.presentity),
        ),
        Change::DialogUpsert { dialog, .. } | Change::DialogEnd { dialog, .. } => {
            // BLF: the watchers of both sides of a call a peer tracks.
            for uri in [&dialog.caller, &dialog.callee] {
                if let Some(k) = sipmesh_dataplane::presence::dialog_presentity(uri) {
                    order_notify(shared, t, &k);
                }
            }
            return false;
        }
        _ => return false,
    };
    if changed {
        order_notify(shared, t, &notify);
    }
    changed
}

/// Orders a worker to notify the watchers of presentity `pkey` (when it has any).
fn order_notify(shared: &Shared, t: &PresenceTable, pkey: &[u8]) {
    use sipmesh_cluster::ownership::bucket_of;
    if t.watcher_count(pkey) == 0 {
        return;
    }
    let Ok(mut orders) = shared.dialog_orders.lock() else {
        return;
    };
    let n = orders.len();
    if n > 0 {
        let _ = push_end_order(
            &mut orders[bucket_of(pkey) % n],
            sipmesh_dataplane::presence::ORDER_NOTIFY,
            pkey,
        );
    }
}

/// Publications and watchers past their time, in buckets this node acts on, are handed
/// to a worker to remove (and notify: the final NOTIFY of a watcher, the new state of a
/// presentity). A full ring: ordered again in a second.
fn expire_presence(shared: &Shared) {
    use sipmesh_cluster::ownership::bucket_of;
    use sipmesh_dataplane::presence::{ORDER_PUBLICATION_EXPIRED, ORDER_WATCHER_EXPIRED};
    let Some(t) = &shared.presence else { return };
    let Ok(mut orders) = shared.dialog_orders.lock() else {
        return;
    };
    let n = orders.len();
    if n == 0 {
        return;
    }
    let now = wall_ms();
    let acts = |key: &[u8]| {
        shared
            .segment
            .acts_on_at(crate::mesh::tags::DEFAULT_TAG_SLOT, bucket_of(key), now)
            .0
    };
    let mut k = Vec::new();
    t.for_each_presentity(|pkey, p| {
        if p.next_expiry() > now || !acts(pkey) {
            return;
        }
        for x in p.pubs.iter().filter(|x| x.expires_ms <= now) {
            k.clear();
            k.extend_from_slice(pkey);
            k.push(0);
            k.extend_from_slice(&x.etag);
            let _ = push_end_order(
                &mut orders[bucket_of(pkey) % n],
                ORDER_PUBLICATION_EXPIRED,
                &k,
            );
        }
    });
    t.for_each_watcher(|key, w| {
        if w.expires_ms <= now && acts(&w.call_id) {
            let _ = push_end_order(
                &mut orders[bucket_of(&w.call_id) % n],
                ORDER_WATCHER_EXPIRED,
                key,
            );
        }
    });
}

/// Hands the call with id `id` to a worker to end (an operator's `sipctl dialog end`).
pub(crate) fn end_dialog(shared: &Shared, id: u64) -> Result<(), String> {
    use sipmesh_cluster::ownership::bucket_of;
    let table = shared
        .dialogs
        .as_ref()
        .ok_or("the proxy is off on this node")?;
    let key = table.key_of(id).ok_or(format!("no dialog {id:016x}"))?;
    let d = table.get(&key).ok_or(format!("no dialog {id:016x}"))?;
    let mut orders = shared
        .dialog_orders
        .lock()
        .map_err(|_| "dialog orders unavailable".to_string())?;
    let n = orders.len().max(1);
    let ring = orders
        .get_mut(bucket_of(&d.call_id) % n)
        .ok_or("no worker")?;
    if push_end_order(ring, ORDER_ADMIN, &key) {
        Ok(())
    } else {
        Err("the worker's order ring is full; try again".into())
    }
}

/// The owner-gated expiry sweep, on a blocking thread (it walks the table).
fn spawn_sweep(shared: &Shared, me: NodeId) -> tokio::task::JoinHandle<()> {
    use sipmesh_cluster::ownership::bucket_of;
    let (usrloc, segment, ring, slots) = (
        shared.usrloc.clone(),
        shared.segment.clone(),
        shared.control_ring.clone(),
        shared.tag_slots.clone(),
    );
    let grace = shared.sweep.1;
    tokio::task::spawn_blocking(move || {
        let Ok(mut ring) = ring.lock() else { return };
        let Ok(slots) = slots.read() else { return };
        let now_ms = wall_ms();
        let r = sipmesh_cluster::sweep::sweep_expired(
            &usrloc,
            now_ms,
            grace,
            me,
            |aor, b| {
                tag_slot(&slots, b.tag())
                    .is_some_and(|slot| segment.acts_on_at(slot as usize, bucket_of(aor), now_ms).0)
            },
            &mut ring,
        );
        if r.removed > 0 || r.deferred > 0 {
            eprintln!(
                "sipd: expiry sweep: {} bindings past their expiry removed ({} deferred, {} left to their owner)",
                r.removed, r.deferred, r.not_owner
            );
        }
    })
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn log_event(e: &Event) {
    eprintln!("sipd: cluster: {} node {}: {}", e.kind, e.node.0, e.reason);
}

fn apply_batch(
    shared: &Shared,
    cap: Capability,
    batch: &Batch,
    skip: u32,
    ka: &mut Option<Keepalive>,
) {
    match cap {
        Capability::Usrloc => {
            let mut n = 0;
            let now_us = wall_us();
            let mut applied = BytesMut::new();
            for f in convert::frames(&batch.records).skip(skip as usize) {
                match ChangeRecord::decode_from_slice(f) {
                    Ok((rec, _)) => {
                        apply_dialog(shared, &rec);
                        let presence = apply_presence(shared, &rec);
                        if (presence || shared.usrloc.apply_remote(&rec) != Applied::Kept)
                            && shared.persist.is_some()
                        {
                            applied.put_u32_le(f.len() as u32);
                            applied.put_slice(f);
                        }
                        if let Some(k) = ka.as_mut() {
                            k.observe(&shared.usrloc, &rec);
                        }
                        if !batch.resent {
                            let made_us = rec.at_ms.saturating_mul(1000).saturating_add(500);
                            shared.stats.lag_us.record(now_us.saturating_sub(made_us));
                        }
                        n += 1;
                    }
                    Err(_) => {
                        shared.stats.bad_records.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            shared.stats.applied.fetch_add(n, Ordering::Relaxed);
            if let Some(p) = &shared.persist {
                p.applied(applied.freeze());
            }
        }
    }
}

/// A peer's dialog record: into the dialog table (newest version wins). A call that
/// ended elsewhere leaves the table, out of its profiles; its CDR is written here when
/// this node acts on the dialog at its end (then the node that ended it did not).
fn apply_dialog(shared: &Shared, rec: &ChangeRecord) {
    use sipmesh_cluster::ownership::bucket_of;
    let (key, d, ended) = match &rec.change {
        Change::DialogUpsert { key, dialog } => (key, dialog, false),
        Change::DialogEnd { key, dialog } => (key, dialog, true),
        _ => return,
    };
    let Some(table) = &shared.dialogs else { return };
    let was = table.get(key);
    if !table.apply_remote(key, d, ended) {
        return;
    }
    if let Some(p) = &shared.profiles {
        match (&was, ended) {
            (None, false) => p.add(d, 1),
            (Some(w), true) => p.add(w, -1),
            _ => {}
        }
    }
    if ended
        && shared
            .segment
            .acts_on_at(
                crate::mesh::tags::DEFAULT_TAG_SLOT,
                bucket_of(&d.call_id),
                d.ended_ms,
            )
            .0
        && let Some(c) = &shared.cdrs
        && let Ok(mut ring) = c.lock()
    {
        let mut line = Vec::with_capacity(512);
        d.cdr_line(shared.me.0, &mut line);
        let _ = sipmesh_cluster::ring::push_bytes(&mut ring, &[&line]);
    }
}

/// Opens (and re-opens) the outgoing `Link` stream to one member and feeds it from `rx`.
/// While the member cannot be reached, queued envelopes are discarded: heartbeats notice.
async fn link_task(url: String, mut rx: mpsc::Receiver<pb::Envelope>) {
    loop {
        let ep = match Endpoint::from_shared(url.clone()) {
            Ok(ep) => ep
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true),
            Err(e) => {
                eprintln!("sipd: cluster: bad peer URL {url}: {e}");
                return;
            }
        };
        if let Ok(ch) = ep.connect().await {
            let (itx, irx) = mpsc::channel::<pb::Envelope>(LINK_QUEUE);
            let mut client = pb::peer_client::PeerClient::new(ch)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20);
            let call = client.link(ReceiverStream::new(irx));
            tokio::pin!(call);
            loop {
                tokio::select! {
                    _ = &mut call => break,
                    m = rx.recv() => match m {
                        None => return,
                        Some(env) => { let _ = itx.try_send(env); }
                    }
                }
            }
        }
        let pause = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                m = rx.recv() => if m.is_none() { return },
            }
        }
    }
}

/// Receiver side of a full sync: pulls, applies and verifies a snapshot.
async fn fetch_snapshot(
    shared: &Shared,
    cap: Capability,
    donor: NodeInfo,
    since: u64,
    timeout: Duration,
) -> SnapshotOutcome {
    let fail = |m: String| SnapshotOutcome::Failed(m);
    let ch = match Endpoint::from_shared(donor.peer_url.clone()) {
        Ok(ep) => match ep.connect_timeout(timeout).connect().await {
            Ok(ch) => ch,
            Err(e) => return fail(format!("connect: {e}")),
        },
        Err(e) => return fail(format!("bad URL: {e}")),
    };
    let mut client = pb::peer_client::PeerClient::new(ch).max_decoding_message_size(16 << 20);
    let req = pb::SnapshotRequest {
        cluster_id: shared.cluster_id,
        node_id: u32::from(shared.me.0),
        capability: cap.name().to_string(),
        since_version: since,
    };
    let mut stream = match tokio::time::timeout(timeout, client.snapshot(req)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return fail(format!("refused: {}", s.message())),
        Err(_) => return fail(format!("no answer within {} ms", timeout.as_millis())),
    };
    let mut watermarks = None;
    let mut digest = Digest::default();
    loop {
        let msg = match tokio::time::timeout(timeout, stream.message()).await {
            Err(_) => return fail(format!("stalled: nothing for {} ms", timeout.as_millis())),
            Ok(Err(s)) => return fail(format!("transfer: {}", s.message())),
            Ok(Ok(None)) => return fail("the stream ended before its end marker".into()),
            Ok(Ok(Some(m))) => m,
        };
        use pb::snapshot_chunk::Body as B;
        match msg.body {
            Some(B::Begin(b)) if watermarks.is_none() => {
                match b.watermarks.iter().map(convert::watermark).collect() {
                    Ok(w) => watermarks = Some(w),
                    Err(e) => return fail(e.0),
                }
            }
            Some(B::Records(r)) if watermarks.is_some() => {
                if let Err(e) = convert::check_frames(&r.records, r.count) {
                    return fail(e.0);
                }
                let sh = shared.clone();
                let applied =
                    tokio::task::spawn_blocking(move || apply_snapshot_chunk(&sh, &r.records))
                        .await;
                match applied {
                    Ok(Ok(d)) => digest.merge(d),
                    Ok(Err(e)) => return fail(e),
                    Err(e) => return fail(format!("apply: {e}")),
                }
            }
            Some(B::End(e)) if watermarks.is_some() => {
                if e.count != digest.count || e.digest != digest.hash {
                    return fail(format!(
                        "verification failed: donor sent {} records (digest {:016x}), received {} (digest {:016x})",
                        e.count, e.digest, digest.count, digest.hash
                    ));
                }
                shared
                    .stats
                    .applied
                    .fetch_add(digest.count, Ordering::Relaxed);
                return SnapshotOutcome::Verified {
                    watermarks: watermarks.unwrap_or_default(),
                    count: digest.count,
                };
            }
            _ => return fail("chunks out of order".into()),
        }
    }
}

/// Applies one chunk of snapshot records; returns the digest of the bindings it held
/// (the live calls that follow them are taken as they come, not counted).
fn apply_snapshot_chunk(shared: &Shared, records: &[u8]) -> Result<Digest, String> {
    let (usrloc, persist) = (&shared.usrloc, shared.persist.as_ref());
    let mut d = Digest::default();
    let mut applied = BytesMut::new();
    for f in convert::frames(records) {
        let (rec, _) = ChangeRecord::decode_from_slice(f).map_err(|e| format!("record: {e}"))?;
        match rec.change.as_ref() {
            ChangeRef::BindingUpsert { aor, binding } => d.add(aor, binding),
            ChangeRef::DialogUpsert { .. } => {
                apply_dialog(shared, &rec);
                continue;
            }
            ChangeRef::PublishUpsert { .. } | ChangeRef::WatcherUpsert { .. } => {
                if apply_presence(shared, &rec) && persist.is_some() {
                    applied.put_u32_le(f.len() as u32);
                    applied.put_slice(f);
                }
                continue;
            }
            ChangeRef::BindingRemove { .. }
            | ChangeRef::DialogEnd { .. }
            | ChangeRef::PublishRemove { .. }
            | ChangeRef::WatcherEnd { .. } => {
                return Err("a snapshot holds only bindings, live calls and presence".into());
            }
        }
        if usrloc.apply_remote(&rec) != Applied::Kept && persist.is_some() {
            applied.put_u32_le(f.len() as u32);
            applied.put_slice(f);
        }
    }
    if let Some(p) = persist {
        p.applied(applied.freeze());
    }
    Ok(d)
}

/// Donor side: walks the table (weakly consistent while writes go on) into framed chunks
/// sent on `tx`, then the count and digest of exactly what was sent; the live calls
/// (`dialogs`) follow the bindings, outside the count (they come and go too fast to
/// verify).
pub(crate) fn walk_snapshot(
    usrloc: &Usrloc,
    dialogs: Option<&DialogTable>,
    presence: Option<&PresenceTable>,
    since: u64,
    tx: &mpsc::Sender<Result<pb::SnapshotChunk, tonic::Status>>,
) {
    use pb::snapshot_chunk::Body as B;
    let mut buf = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES + 4096);
    let mut scratch = Vec::with_capacity(1024);
    let mut count = 0u32;
    let mut digest = Digest::default();
    let mut closed = false;
    let send = |buf: &mut Vec<u8>, count: &mut u32, closed: &mut bool| {
        if *count == 0 || *closed {
            return;
        }
        let chunk = pb::SnapshotChunk {
            body: Some(B::Records(pb::SnapshotRecords {
                count: *count,
                records: Bytes::copy_from_slice(buf),
            })),
        };
        buf.clear();
        *count = 0;
        if tx.blocking_send(Ok(chunk)).is_err() {
            *closed = true;
        }
    };
    // One record into the current chunk, the chunk out when full.
    let mut add = |rec: ChangeRecordRef<'_>| {
        if rec.encode_into_vec(&mut scratch).is_err() {
            return !closed;
        }
        buf.extend_from_slice(&(scratch.len() as u32).to_le_bytes());
        buf.extend_from_slice(&scratch);
        count += 1;
        if buf.len() >= SNAPSHOT_CHUNK_BYTES {
            send(&mut buf, &mut count, &mut closed);
        }
        !closed
    };
    let mut open = true;
    usrloc.snapshot_records(|rec| {
        if !open || rec.version <= since {
            return;
        }
        if let ChangeRef::BindingUpsert { aor, binding } = rec.change {
            digest.add(aor, binding);
        }
        open = add(rec);
    });
    // Every live call, whatever `since` says: dialogs are not on the receiver's disk.
    if let Some(t) = dialogs {
        t.for_each(|key, d| {
            if open {
                open = add(ChangeRecordRef {
                    origin: d.origin,
                    version: d.version,
                    at_ms: d.created_ms,
                    change: ChangeRef::DialogUpsert { key, dialog: d },
                });
            }
        });
    }
    // And every presentity and watcher, the same way (not on the receiver's disk either).
    if let Some(t) = presence {
        t.for_each_presentity(|key, p| {
            for x in &p.pubs {
                if open {
                    open = add(ChangeRecordRef {
                        origin: x.origin,
                        version: x.version,
                        at_ms: x.published_ms,
                        change: ChangeRef::PublishUpsert {
                            key,
                            replaces: b"",
                            publication: x,
                        },
                    });
                }
            }
        });
        t.for_each_watcher(|key, w| {
            if open {
                open = add(ChangeRecordRef {
                    origin: w.origin,
                    version: w.version,
                    at_ms: w.created_ms,
                    change: ChangeRef::WatcherUpsert { key, watcher: w },
                });
            }
        });
    }
    send(&mut buf, &mut count, &mut closed);
    if !closed {
        let _ = tx.blocking_send(Ok(pb::SnapshotChunk {
            body: Some(B::End(pb::SnapshotEnd {
                count: digest.count,
                digest: digest.hash,
            })),
        }));
    }
}
