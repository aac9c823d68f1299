//! The cluster mesh as a sans-IO state machine: membership, heartbeats, link-state
//! topology with relaying, per-capability sync state, and realtime replication sequencing.
//!
//! [`Mesh`] takes inputs (the time, envelopes from peers, local change batches, operator
//! commands, snapshot results) and returns [`Action`]s (envelopes to put on a link, streams
//! to open or close, records to apply, snapshots to fetch, events). It never touches a
//! socket, a clock or a table; `crate::grpc` drives it.
//!
//! * **Heartbeats.** Every `heartbeat_interval` a node pings each member over its own
//!   outgoing stream; the member answers on *its* outgoing stream, so an answered ping proves
//!   both directions. A ping unanswered after `heartbeat_timeout` is a miss; `heartbeat_retries`
//!   consecutive misses take the link down, `link_up_after` consecutive answers bring it up
//!   (hysteresis: a link that answers one ping in three never looks up).
//! * **Link state.** Each node floods an advertisement of its up links (sequence-numbered,
//!   per incarnation); a link is usable when both ends list it. Every node computes
//!   reachability and a next hop by breadth-first search; envelopes to a node whose direct
//!   link is down are relayed.
//! * **Replication.** Local change batches get per-origin sequence numbers, are kept in a
//!   bounded replay buffer and sent to every reachable member. A receiver applies an origin's
//!   batches in sequence order only: a batch beyond a gap is parked (bounded) and the gap is
//!   asked for again; a gap the origin can no longer fill, or one that is not filled within
//!   `gap_timeout`, turns into a full sync. Records are applied last-writer-wins by version
//!   by the driver; applying never fires local side effects.
//! * **Sync.** A capability that is not synced buffers incoming batches, fetches a snapshot
//!   from a synced donor (rendezvous-hashed so receivers spread over donors, another donor
//!   on failure), then resumes each origin's stream at the donor's watermark and replays the
//!   buffer. With no donor, a standalone node is synced at once; in a cluster a `seed` may
//!   declare itself synced after `seed_fallback`, and so may the node holding the newest data
//!   when every reachable member is equally unsynced (a cold start needs no hand-picked seed).

pub mod tags;
pub mod types;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use sipmesh_cluster::NodeId;
use sipmesh_cluster::ownership::{BUCKETS, Ownership};

use tags::{DEFAULT_TAG_SLOT, TagRole, TagTransition, TagView, Tags};

pub use types::*;

/// Which members receive this node's replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMode {
    /// Every node holds all data.
    FullSharing,
    /// Replicate only to the HA twin (the member with the same `sip_addr`).
    HaPair,
}

impl ClusterMode {
    /// Config name.
    pub fn name(self) -> &'static str {
        match self {
            ClusterMode::FullSharing => "full-sharing",
            ClusterMode::HaPair => "ha-pair",
        }
    }
}

/// Tunables of the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Cluster id: envelopes of another cluster are dropped at the edge.
    pub cluster_id: u32,
    /// This node.
    pub me: NodeInfo,
    /// Start time of this process (unix ms).
    pub incarnation: u64,
    /// Ping period per link.
    pub heartbeat_interval: Millis,
    /// A ping not answered within this is missed.
    pub heartbeat_timeout: Millis,
    /// Consecutive misses that take a link down.
    pub heartbeat_retries: u32,
    /// Consecutive answers that bring a link up.
    pub link_up_after: u32,
    /// Period of link-state refreshes.
    pub lsa_refresh: Millis,
    /// How long a node without donor waits before a seed (or the cold-start winner)
    /// declares itself synced.
    pub seed_fallback: Millis,
    /// A replication gap not repaired within this turns into a full sync.
    pub gap_timeout: Millis,
    /// Pause before retrying a failed sync.
    pub sync_retry: Millis,
    /// Bytes of sent batches kept for resend requests.
    pub replay_bytes: usize,
    /// Bytes of received batches held back (beyond a gap, or while syncing).
    pub pending_bytes: usize,
    /// Replication targets.
    pub mode: ClusterMode,
    /// Events kept.
    pub history: usize,
    /// This node was told to join through a member: knowing no member yet does not make
    /// it a standalone node (which is synced at once).
    pub joining: bool,
    /// A node restarted with data asks for changes newer than its newest version less
    /// this margin (clock skew between nodes plus replication lag), in ms.
    pub resume_margin: Millis,
    /// Sharing tags configured on this node.
    pub tags: Vec<(String, TagRole)>,
    /// Tag terms recovered from the store: (name, term, holder).
    pub persisted_tags: Vec<(String, u64, Option<NodeId>)>,
    /// A tag whose holder is unreachable this long moves to a candidate (None: never).
    pub tag_failover: Option<Millis>,
    /// An activation takes effect this long after it is made (hand-over boundary).
    pub tag_handover: Millis,
    /// Wall-clock ms at mesh time 0 (0: mesh time is wall-clock time).
    pub wall_at_zero: u64,
}

impl MeshConfig {
    /// Defaults for `me`: 100 ms heartbeats, 250 ms timeout, 3 retries (a dead peer is
    /// reported in about 0.55 s), 3 answers to come back up.
    pub fn new(cluster_id: u32, me: NodeInfo, incarnation: u64) -> MeshConfig {
        MeshConfig {
            cluster_id,
            me,
            incarnation,
            heartbeat_interval: 100,
            heartbeat_timeout: 250,
            heartbeat_retries: 3,
            link_up_after: 3,
            lsa_refresh: 1000,
            seed_fallback: 3000,
            gap_timeout: 2000,
            sync_retry: 500,
            replay_bytes: 64 << 20,
            pending_bytes: 64 << 20,
            mode: ClusterMode::FullSharing,
            history: 256,
            joining: false,
            resume_margin: 10_000,
            tags: Vec::new(),
            persisted_tags: Vec::new(),
            tag_failover: Some(1000),
            tag_handover: 200,
            wall_at_zero: 0,
        }
    }
}

/// A rendezvous assignment and the one before the newest joiners' boundary.
#[derive(Debug)]
struct BucketCache {
    acting: Vec<NodeId>,
    joiners: Vec<NodeId>,
    new: [u64; BUCKETS / 64],
    prev: [u64; BUCKETS / 64],
}

/// The buckets `me` acts on when `acting` split them by rendezvous hashing.
fn assign_buckets(acting: &[NodeId], me: NodeId) -> [u64; BUCKETS / 64] {
    let mut mine = Ownership::default();
    for b in 0..BUCKETS {
        if acting.iter().max_by_key(|n| bucket_weight(b, **n)) == Some(&me) {
            mine.set_bucket(b, true);
        }
    }
    mine.buckets
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put `env` on the outgoing stream to the direct neighbour `link`.
    Send {
        /// Direct neighbour.
        link: NodeId,
        /// The envelope.
        env: Envelope,
    },
    /// Keep an outgoing stream to this member (open it, or re-target it if the URL changed).
    Connect(NodeInfo),
    /// Close the outgoing stream to this member.
    Disconnect(NodeId),
    /// Apply records of a batch to the tables, skipping the first `skip` (already applied).
    Apply {
        /// Capability the records belong to.
        cap: Capability,
        /// The batch.
        batch: Batch,
        /// Records at the front already applied.
        skip: u32,
    },
    /// Fetch a snapshot of `cap` from `donor` and report with [`Mesh::snapshot_done`].
    StartSnapshot {
        /// Capability.
        cap: Capability,
        /// Donor.
        donor: NodeInfo,
        /// Only objects with a newer version (a restarted node's delta); 0: everything.
        since: u64,
    },
    /// Something to log.
    Event(Event),
    /// Write this ownership into the segment the workers read.
    Publish(Box<Ownership>),
    /// Persist these tag terms: (name, term, holder).
    PersistTags(Vec<(String, u64, Option<NodeId>)>),
}

#[derive(Debug, Default)]
struct Link {
    up: bool,
    next_ping_at: Millis,
    ping_seq: u64,
    outstanding: VecDeque<(u64, Millis)>,
    ok_run: u32,
    miss_run: u32,
    rtt: Option<Millis>,
    down_reason: String,
}

#[derive(Debug)]
struct Gap {
    to: u64,
    since: Millis,
}

/// Receive side of one origin's stream.
#[derive(Debug, Default)]
struct Inbound {
    incarnation: u64,
    /// Next sequence number to apply (0 = nothing known yet: accept from 1).
    next_seq: u64,
    pending: BTreeMap<u64, Batch>,
    pending_bytes: usize,
    gap: Option<Gap>,
    /// The origin advertised `last_repl_seq` at this time.
    hint: Option<(u64, Millis)>,
}

#[derive(Debug)]
struct Peer {
    info: NodeInfo,
    link: Link,
    lsa: Option<LinkStateAd>,
    reachable: bool,
    next_hop: Option<NodeId>,
    inbound: Inbound,
}

#[derive(Debug)]
struct CapSync {
    state: SyncState,
    donor: Option<NodeId>,
    since: Millis,
    retry_at: Millis,
    tried: BTreeSet<NodeId>,
    completed: u64,
    failed: u64,
    last_result: String,
    newest_version: u64,
    gaps_repaired: u64,
    records_applied: u64,
    buffer: VecDeque<Batch>,
    buffered_bytes: usize,
    /// When the running snapshot transfer began.
    started_at: Millis,
}

/// Operator view of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Identity.
    pub info: NodeInfo,
    /// The local node.
    pub local: bool,
    /// `up`, `down` or `disabled`.
    pub state: &'static str,
    /// Direct link: `up`, `down`, or `none` for the local node.
    pub link: &'static str,
    /// Next hop (None: local or unreachable).
    pub next_hop: Option<NodeId>,
    /// Advertised capabilities.
    pub caps: Vec<CapAdvert>,
    /// Last heartbeat round trip.
    pub rtt: Option<Millis>,
}

/// Operator view of one capability's sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncView {
    /// Capability.
    pub cap: Capability,
    /// State.
    pub state: SyncState,
    /// Current or last donor.
    pub donor: Option<NodeId>,
    /// Full syncs completed.
    pub completed: u64,
    /// Full syncs failed.
    pub failed: u64,
    /// How the last sync ended.
    pub last_result: String,
    /// Replication gaps repaired by resend.
    pub gaps_repaired: u64,
    /// Replicated records applied.
    pub records_applied: u64,
}

/// Counters of dropped envelopes and repairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Envelopes relayed to another node.
    pub relayed: u64,
    /// Envelopes dropped: no route or hop limit.
    pub unroutable: u64,
    /// Envelopes from unknown or removed nodes.
    pub from_stranger: u64,
    /// Duplicate or stale batches ignored.
    pub duplicate_batches: u64,
    /// Resend requests sent.
    pub resend_requests: u64,
    /// Batches resent to others.
    pub batches_resent: u64,
}

/// The mesh state machine of one node.
#[derive(Debug)]
pub struct Mesh {
    cfg: MeshConfig,
    peers: BTreeMap<NodeId, Peer>,
    removed: BTreeMap<NodeId, u64>,
    /// Removals a join overrode (id, removed incarnation): stale when flooded back to us.
    readmitted: BTreeMap<NodeId, u64>,
    disabled: bool,
    lsa_seq: u64,
    lsa_next: Millis,
    lsa_dirty: bool,
    caps: BTreeMap<Capability, CapSync>,
    out_next_seq: u64,
    replay: VecDeque<Batch>,
    replay_bytes: usize,
    events: VecDeque<Event>,
    actions: Vec<Action>,
    stats: MeshStats,
    now: Millis,
    /// Newest version recovered from the store, until the first sync completes.
    resume_from: Option<u64>,
    tags: Tags,
    /// Last ownership handed to the driver.
    published: Option<Ownership>,
    /// The acting set the bucket assignment was last computed for, and its result.
    /// Rendezvous assignments computed last: (acting set, joiners) → (new, previous).
    bucket_cache: Option<BucketCache>,
    /// Wall-clock ms from which this node acts on its buckets (0: it does not act).
    acting_since: u64,
}

/// Versions are wall-clock milliseconds shifted left by 16 bits (see
/// `sipmesh_cluster::next_version`): a span of `ms` milliseconds in version units.
pub fn version_span(ms: u64) -> u64 {
    ms << 16
}

/// A 64-bit finalizer (splitmix64's): deterministic on every node.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous weight of node `n` for partition bucket `b`.
fn bucket_weight(b: usize, n: NodeId) -> u64 {
    mix64((b as u64) << 16 | u64::from(n.0))
}

/// Rendezvous weight of donor `b` for receiver `a`.
fn hrw(a: NodeId, b: NodeId) -> u64 {
    mix64(u64::from(a.0) << 32 | u64::from(b.0))
}

impl Mesh {
    /// A mesh knowing `members` (from the configuration; may be empty), at time `now`.
    pub fn new(cfg: MeshConfig, members: Vec<NodeInfo>, now: Millis) -> Mesh {
        let caps = Capability::ALL
            .into_iter()
            .map(|c| {
                (
                    c,
                    CapSync {
                        state: SyncState::NotSynced,
                        donor: None,
                        since: now,
                        retry_at: now,
                        tried: BTreeSet::new(),
                        completed: 0,
                        failed: 0,
                        last_result: String::new(),
                        newest_version: 0,
                        gaps_repaired: 0,
                        records_applied: 0,
                        buffer: VecDeque::new(),
                        buffered_bytes: 0,
                        started_at: now,
                    },
                )
            })
            .collect();
        let mut tags = Tags::new(
            cfg.me.id,
            &cfg.tags,
            &cfg.persisted_tags,
            cfg.tag_failover,
            now,
        );
        tags.set_handover(cfg.wall_at_zero, cfg.tag_handover);
        let mut m = Mesh {
            cfg,
            peers: BTreeMap::new(),
            removed: BTreeMap::new(),
            readmitted: BTreeMap::new(),
            disabled: false,
            lsa_seq: 0,
            lsa_next: now,
            lsa_dirty: true,
            caps,
            out_next_seq: 1,
            replay: VecDeque::new(),
            replay_bytes: 0,
            events: VecDeque::new(),
            actions: Vec::new(),
            stats: MeshStats::default(),
            now,
            resume_from: None,
            tags,
            published: None,
            bucket_cache: None,
            acting_since: 0,
        };
        for info in members {
            m.learn(info);
        }
        m.drive_sync();
        m.update_ownership();
        m
    }

    /// This node.
    pub fn me(&self) -> &NodeInfo {
        &self.cfg.me
    }

    /// The configuration.
    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    /// Takes the actions produced so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Counters.
    pub fn stats(&self) -> &MeshStats {
        &self.stats
    }

    fn id(&self) -> NodeId {
        self.cfg.me.id
    }

    fn event(&mut self, node: NodeId, kind: &'static str, reason: String) {
        let ev = Event {
            at: self.now,
            node,
            kind,
            reason,
        };
        if self.events.len() >= self.cfg.history.max(1) {
            self.events.pop_front();
        }
        self.events.push_back(ev.clone());
        self.actions.push(Action::Event(ev));
    }

    /// Adds or updates a member. Returns whether anything changed.
    fn learn(&mut self, info: NodeInfo) -> bool {
        if info.id == self.id() || info.id == FLOOD || self.removed.contains_key(&info.id) {
            return false;
        }
        match self.peers.get_mut(&info.id) {
            Some(p) if p.info == info => false,
            Some(p) => {
                p.info = info.clone();
                self.actions.push(Action::Connect(info));
                self.lsa_dirty = true;
                true
            }
            None => {
                let id = info.id;
                self.peers.insert(
                    id,
                    Peer {
                        info: info.clone(),
                        link: Link {
                            next_ping_at: self.now,
                            ..Link::default()
                        },
                        lsa: None,
                        reachable: false,
                        next_hop: None,
                        inbound: Inbound::default(),
                    },
                );
                self.actions.push(Action::Connect(info.clone()));
                self.event(
                    id,
                    "node-joined",
                    format!("member {} at {}", id.0, info.peer_url),
                );
                self.lsa_dirty = true;
                true
            }
        }
    }

    fn forget(&mut self, id: NodeId, reason: String) {
        if self.peers.remove(&id).is_some() {
            self.actions.push(Action::Disconnect(id));
            self.event(id, "node-removed", reason);
            self.lsa_dirty = true;
            self.recompute_routes();
        }
    }

    // ---------------------------------------------------------------------------------
    // Inputs
    // ---------------------------------------------------------------------------------

    /// Advances the clock: heartbeats, link timeouts, advertisements, gap and sync timers.
    pub fn tick(&mut self, now: Millis) {
        self.now = self.now.max(now);
        let now = self.now;
        let me = self.id();
        let cfg = self.cfg.clone();
        let mut changed = Vec::new();
        let mut pings = Vec::new();
        for (id, p) in &mut self.peers {
            let l = &mut p.link;
            while let Some(&(_, sent)) = l.outstanding.front() {
                if now < sent + cfg.heartbeat_timeout {
                    break;
                }
                l.outstanding.pop_front();
                l.miss_run += 1;
                l.ok_run = 0;
                if l.up && l.miss_run >= cfg.heartbeat_retries {
                    l.up = false;
                    l.down_reason = format!(
                        "{} heartbeats unanswered within {} ms",
                        l.miss_run, cfg.heartbeat_timeout
                    );
                    changed.push((*id, false, l.down_reason.clone()));
                }
            }
            if now >= l.next_ping_at {
                l.ping_seq += 1;
                l.outstanding.push_back((l.ping_seq, now));
                while l.outstanding.len() > cfg.heartbeat_retries as usize + 2 {
                    l.outstanding.pop_front();
                }
                l.next_ping_at = now + cfg.heartbeat_interval;
                pings.push((*id, l.ping_seq));
            }
        }
        for (id, seq) in pings {
            self.actions.push(Action::Send {
                link: id,
                env: Envelope {
                    src: me,
                    dst: id,
                    hop: me,
                    ttl: 1,
                    body: Body::Ping(seq),
                },
            });
        }
        for (id, up, reason) in changed {
            self.link_changed(id, up, reason);
        }
        self.check_gaps();
        self.drive_sync();
        self.check_tag_failover();
        self.update_ownership();
        if self.lsa_dirty || now >= self.lsa_next {
            self.advertise();
        }
    }

    fn check_tag_failover(&mut self) {
        let now = self.now;
        let me = self.id();
        let peers = &self.peers;
        let reachable = |n: NodeId| n == me || peers.get(&n).is_some_and(|p| p.reachable);
        let candidates = |name: &str| -> Vec<NodeId> {
            peers
                .iter()
                .filter(|(_, p)| p.reachable)
                .filter(|(_, p)| {
                    p.lsa.as_ref().is_some_and(|a| {
                        !a.disabled && a.tags.iter().any(|t| t.name == name && t.candidate)
                    })
                })
                .map(|(id, _)| *id)
                .collect()
        };
        if self.disabled {
            return;
        }
        let taken = self.tags.check_failover(now, &reachable, &candidates);
        for name in taken {
            self.lsa_dirty = true;
            self.event(
                me,
                "tag-failover",
                format!("{name}: active here, its holder is unreachable"),
            );
        }
    }

    /// Recomputes what this node acts on and hands it to the driver when it changed:
    /// the default tag (untagged data) is active on every acting node — not disabled,
    /// usrloc synced — and its objects are split over the acting nodes that share the
    /// data by rendezvous hashing of each bucket, so a node joining or leaving moves only
    /// its share; a named tag is active where its current term names this node, once
    /// that node is synced.
    fn update_ownership(&mut self) {
        let me = self.id();
        let synced = |caps: &[CapAdvert]| {
            caps.iter()
                .any(|c| c.cap == Capability::Usrloc && c.state == SyncState::Synced)
        };
        let i_act = !self.disabled && self.sync_state(Capability::Usrloc) == SyncState::Synced;
        let wall = self.cfg.wall_at_zero + self.now;
        let mut o = Ownership::default();
        o.set_tag(DEFAULT_TAG_SLOT, i_act, 0);
        o.set_shared(DEFAULT_TAG_SLOT, true);
        let mut acting: Vec<(NodeId, u64)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.reachable && self.shares_data(p))
            .filter_map(|(id, p)| {
                p.lsa
                    .as_ref()
                    .filter(|a| !a.disabled && synced(&a.caps))
                    .map(|a| (*id, a.acting_since))
            })
            .collect();
        // Becoming an acting node: from a moment just ahead, announced to the others, so
        // that they hand over the buckets that become ours at that boundary (alone, at
        // once: nobody is acting to hand over from).
        if !i_act {
            self.acting_since = 0;
        } else if self.acting_since == 0 {
            self.acting_since = if acting.is_empty() {
                wall
            } else {
                wall + self.cfg.tag_handover
            };
            self.lsa_dirty = true;
        }
        if i_act {
            acting.push((me, self.acting_since));
            acting.sort();
            // Nodes that start acting after now take their share at their boundary; before
            // it the assignment without them holds.
            let joiners: Vec<NodeId> = acting
                .iter()
                .filter(|(_, since)| *since > wall)
                .map(|(id, _)| *id)
                .collect();
            let boundary = acting.iter().map(|(_, s)| *s).filter(|s| *s > wall).max();
            let ids: Vec<NodeId> = acting.iter().map(|(id, _)| *id).collect();
            if self
                .bucket_cache
                .as_ref()
                .is_none_or(|c| c.acting != ids || c.joiners != joiners)
            {
                let before: Vec<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|n| !joiners.contains(n))
                    .collect();
                self.bucket_cache = Some(BucketCache {
                    new: assign_buckets(&ids, me),
                    prev: assign_buckets(&before, me),
                    acting: ids,
                    joiners,
                });
            }
            if let Some(c) = &self.bucket_cache {
                o.buckets = c.new;
                if let Some(at) = boundary {
                    o.buckets_prev = c.prev;
                    o.buckets_from = at;
                }
            }
        }
        // A named tag acts only once this node is synced: a node that (re)starts claiming
        // a tag has by then heard the cluster's claims, so an old term never acts.
        for t in self.tags.list() {
            let (from, until) = t.window.unwrap_or((0, 0));
            o.set_tag_window(t.slot, t.window.is_some() && i_act, t.term, from, until);
        }
        if self.published.as_ref() != Some(&o) {
            self.published = Some(o.clone());
            self.actions.push(Action::Publish(Box::new(o)));
        }
        let changed = self.tags.take_changed();
        if !changed.is_empty() {
            self.lsa_dirty = true;
            self.actions.push(Action::PersistTags(changed));
        }
    }

    fn link_changed(&mut self, id: NodeId, up: bool, reason: String) {
        self.event(
            id,
            if up { "link-up" } else { "link-down" },
            format!("link {} <-> {}: {reason}", self.id().0, id.0),
        );
        self.lsa_dirty = true;
        if up {
            // Database exchange: the new neighbour learns every advertisement we hold.
            let ads: Vec<LinkStateAd> = self.peers.values().filter_map(|p| p.lsa.clone()).collect();
            for ad in ads {
                self.send_direct(id, ad.node.id, FLOOD, Body::LinkState(Box::new(ad)));
            }
        }
        self.advertise();
    }

    fn send_direct(&mut self, link: NodeId, src: NodeId, dst: NodeId, body: Body) {
        let me = self.id();
        self.actions.push(Action::Send {
            link,
            env: Envelope {
                src,
                dst,
                hop: me,
                ttl: MAX_TTL,
                body,
            },
        });
    }

    /// Sends `body` to `dst` along its next hop. Returns false when `dst` is unreachable.
    fn send_to(&mut self, dst: NodeId, body: Body) -> bool {
        let Some(hop) = self.peers.get(&dst).and_then(|p| p.next_hop) else {
            self.stats.unroutable += 1;
            return false;
        };
        let me = self.id();
        self.send_direct(hop, me, dst, body);
        true
    }

    fn own_ad(&self) -> LinkStateAd {
        LinkStateAd {
            node: self.cfg.me.clone(),
            incarnation: self.cfg.incarnation,
            seq: self.lsa_seq,
            up_links: self
                .peers
                .iter()
                .filter(|(_, p)| p.link.up)
                .map(|(id, _)| *id)
                .collect(),
            disabled: self.disabled,
            caps: self
                .caps
                .iter()
                .map(|(c, s)| CapAdvert {
                    cap: *c,
                    state: s.state,
                    newest_version: s.newest_version,
                })
                .collect(),
            acting_since: self.acting_since,
            known: self.peers.values().map(|p| p.info.clone()).collect(),
            removed: self
                .removed
                .iter()
                .map(|(id, inc)| Removal {
                    id: *id,
                    incarnation: *inc,
                })
                .collect(),
            last_repl_seq: self.out_next_seq - 1,
            tags: self.tags.claims(),
        }
    }

    /// Bumps and floods this node's advertisement.
    fn advertise(&mut self) {
        self.lsa_seq += 1;
        self.lsa_dirty = false;
        self.lsa_next = self.now + self.cfg.lsa_refresh;
        let ad = self.own_ad();
        let me = self.id();
        let links: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.link.up)
            .map(|(id, _)| *id)
            .collect();
        for l in links {
            self.send_direct(l, me, FLOOD, Body::LinkState(Box::new(ad.clone())));
        }
        self.recompute_routes();
    }

    /// An envelope arrived on a link stream (already validated and of our cluster).
    pub fn on_envelope(&mut self, now: Millis, env: Envelope) {
        self.now = self.now.max(now);
        let me = self.id();
        if env.src == me && env.dst != FLOOD {
            return;
        }
        // A removed node's advertisements are judged by incarnation in `on_link_state`: a
        // restarted process may join again.
        let from_removed = env.src != me
            && self.is_removed(env.src, None)
            && !matches!(env.body, Body::LinkState(_));
        if self.is_removed(env.hop, None) || from_removed {
            self.stats.from_stranger += 1;
            return;
        }
        if env.dst != me && env.dst != FLOOD {
            // Relay.
            if env.ttl <= 1 {
                self.stats.unroutable += 1;
                return;
            }
            let Some(hop) = self.peers.get(&env.dst).and_then(|p| p.next_hop) else {
                self.stats.unroutable += 1;
                return;
            };
            self.stats.relayed += 1;
            self.actions.push(Action::Send {
                link: hop,
                env: Envelope {
                    hop: me,
                    ttl: env.ttl - 1,
                    ..env
                },
            });
            return;
        }
        match env.body {
            Body::Ping(seq) => {
                if self.peers.contains_key(&env.hop) {
                    self.send_direct(env.hop, me, env.hop, Body::Pong(seq));
                } else {
                    self.stats.from_stranger += 1;
                }
            }
            Body::Pong(seq) => self.on_pong(env.hop, seq),
            Body::LinkState(ad) => self.on_link_state(env.hop, *ad),
            Body::Replicate(batch) => self.on_batch(batch),
            Body::ResendRequest {
                incarnation,
                from,
                to,
            } => self.on_resend_request(env.src, incarnation, from, to),
            Body::ResendUnavailable { incarnation, from } => {
                let inb_inc = self.peers.get(&env.src).map(|p| p.inbound.incarnation);
                if inb_inc == Some(incarnation) {
                    self.event(
                        env.src,
                        "gap",
                        format!("node {} no longer holds records from {from}", env.src.0),
                    );
                    self.resync(
                        Capability::Usrloc,
                        format!("node {} cannot resend", env.src.0),
                    );
                }
            }
        }
    }

    fn on_pong(&mut self, from: NodeId, seq: u64) {
        let now = self.now;
        let need = self.cfg.link_up_after;
        let retries = self.cfg.heartbeat_retries;
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let l = &mut p.link;
        let Some(pos) = l.outstanding.iter().position(|&(s, _)| s == seq) else {
            return; // late: already counted as missed
        };
        let (_, sent) = l.outstanding[pos];
        l.outstanding.drain(..=pos);
        // Answers come back in order: the pings sent before this one were lost. They are
        // misses, or a link answering one ping in three would count only answers.
        let mut lost = None;
        if pos > 0 {
            l.miss_run += pos as u32;
            l.ok_run = 0;
            if l.up && l.miss_run >= retries {
                l.up = false;
                l.down_reason = format!("{} heartbeats in a row unanswered", l.miss_run);
                lost = Some(l.down_reason.clone());
            }
        }
        l.rtt = Some(now.saturating_sub(sent));
        l.ok_run += 1;
        l.miss_run = 0;
        let came_up = !l.up && l.ok_run >= need;
        l.up |= came_up;
        let ok_run = l.ok_run;
        if let Some(reason) = lost {
            self.link_changed(from, false, reason);
        }
        if came_up {
            let reason = format!("{ok_run} heartbeats answered");
            self.link_changed(from, true, reason);
        }
    }

    fn is_removed(&self, id: NodeId, incarnation: Option<u64>) -> bool {
        match (self.removed.get(&id), incarnation) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(&r), Some(inc)) => inc <= r,
        }
    }

    fn on_link_state(&mut self, hop: NodeId, ad: LinkStateAd) {
        let origin = ad.node.id;
        if origin == self.id() || origin == FLOOD || self.is_removed(origin, Some(ad.incarnation)) {
            return;
        }
        if self.removed.contains_key(&origin) {
            // A newer incarnation of a removed node: it may join again.
            self.removed.remove(&origin);
        }
        self.learn(ad.node.clone());
        let newer = match self.peers.get(&origin).and_then(|p| p.lsa.as_ref()) {
            None => true,
            Some(old) => (ad.incarnation, ad.seq) > (old.incarnation, old.seq),
        };
        if !newer {
            return;
        }
        for r in &ad.removed {
            self.apply_removal(
                *r,
                format!("removed by an operator (learned from node {})", origin.0),
            );
        }
        if self.removed.contains_key(&self.id())
            && self.removed.get(&self.id()).copied() >= Some(self.cfg.incarnation)
        {
            return;
        }
        for k in &ad.known {
            self.learn(k.clone());
        }
        let me = self.id();
        // Flood on, except back where it came from and to its origin.
        let links: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| p.link.up && **id != hop && **id != origin)
            .map(|(id, _)| *id)
            .collect();
        for l in links {
            self.actions.push(Action::Send {
                link: l,
                env: Envelope {
                    src: origin,
                    dst: FLOOD,
                    hop: me,
                    ttl: MAX_TTL,
                    body: Body::LinkState(Box::new(ad.clone())),
                },
            });
        }
        let now = self.now;
        let replicates_to_us = match self.cfg.mode {
            ClusterMode::FullSharing => true,
            ClusterMode::HaPair => ad.node.sip_addr == self.cfg.me.sip_addr,
        };
        let was_disabled = self
            .peers
            .get(&origin)
            .and_then(|p| p.lsa.as_ref())
            .is_some_and(|a| a.disabled);
        if let Some(p) = self.peers.get_mut(&origin) {
            // Gap detection when traffic stops: the origin says how far it has sent.
            if ad.incarnation > p.inbound.incarnation && p.inbound.incarnation != 0 {
                p.inbound = Inbound {
                    incarnation: ad.incarnation,
                    next_seq: 1,
                    ..Inbound::default()
                };
            }
            if replicates_to_us
                && ad.incarnation == p.inbound.incarnation
                && p.inbound.next_seq != 0
                && ad.last_repl_seq >= p.inbound.next_seq
                && p.inbound.hint.is_none()
            {
                p.inbound.hint = Some((ad.last_repl_seq, now));
            }
            p.lsa = Some(ad.clone());
        }
        if self.tags.merge(origin, &ad.tags, now) {
            self.lsa_dirty = true;
        }
        if ad.disabled != was_disabled {
            self.event(
                origin,
                if ad.disabled {
                    "node-disabled"
                } else {
                    "node-enabled"
                },
                format!(
                    "node {} {} by an operator",
                    origin.0,
                    if ad.disabled { "disabled" } else { "enabled" }
                ),
            );
        }
        self.recompute_routes();
        self.update_ownership();
    }

    fn apply_removal(&mut self, r: Removal, reason: String) {
        let cur = self.removed.get(&r.id).copied();
        if cur.is_some_and(|c| c >= r.incarnation)
            || self
                .readmitted
                .get(&r.id)
                .is_some_and(|&i| i >= r.incarnation)
        {
            return;
        }
        if r.id == self.id() {
            if r.incarnation >= self.cfg.incarnation {
                self.removed.insert(r.id, r.incarnation);
                self.event(
                    r.id,
                    "node-removed",
                    "this node was removed from the cluster".into(),
                );
            }
            return;
        }
        let peer_inc = self
            .peers
            .get(&r.id)
            .and_then(|p| p.lsa.as_ref())
            .map_or(0, |a| a.incarnation);
        if peer_inc > r.incarnation {
            return; // it was restarted (and joined again) since
        }
        self.removed.insert(r.id, r.incarnation);
        self.lsa_dirty = true;
        if peer_inc <= r.incarnation {
            self.forget(r.id, reason);
        }
    }

    /// Breadth-first search over links both ends advertise; emits node up/down events.
    fn recompute_routes(&mut self) {
        let me = self.id();
        let adj = |id: NodeId, peers: &BTreeMap<NodeId, Peer>| -> Vec<NodeId> {
            if id == me {
                return peers
                    .iter()
                    .filter(|(_, p)| p.link.up)
                    .map(|(i, _)| *i)
                    .collect();
            }
            let Some(ad) = peers.get(&id).and_then(|p| p.lsa.as_ref()) else {
                return Vec::new();
            };
            ad.up_links.clone()
        };
        let lists =
            |a: NodeId, b: NodeId, peers: &BTreeMap<NodeId, Peer>| adj(a, peers).contains(&b);
        let mut hop: BTreeMap<NodeId, NodeId> = BTreeMap::new();
        let mut queue = VecDeque::new();
        // An answered ping already proves both directions of a direct link.
        for n in adj(me, &self.peers) {
            hop.insert(n, n);
            queue.push_back(n);
        }
        while let Some(a) = queue.pop_front() {
            let first = hop[&a];
            let mut next = adj(a, &self.peers);
            next.sort();
            for b in next {
                if b == me || hop.contains_key(&b) || !self.peers.contains_key(&b) {
                    continue;
                }
                if lists(b, a, &self.peers) {
                    hop.insert(b, first);
                    queue.push_back(b);
                }
            }
        }
        let mut events = Vec::new();
        for (id, p) in &mut self.peers {
            let nh = hop.get(id).copied();
            let reachable = nh.is_some();
            if reachable != p.reachable {
                let reason = if reachable {
                    if nh == Some(*id) {
                        "direct link up".to_string()
                    } else {
                        format!("reachable via node {}", nh.map_or(0, |n| n.0))
                    }
                } else if p.link.down_reason.is_empty() {
                    "no path".to_string()
                } else {
                    format!(
                        "direct link down ({}) and no relay path",
                        p.link.down_reason
                    )
                };
                events.push((*id, if reachable { "node-up" } else { "node-down" }, reason));
            } else if reachable && p.next_hop != nh {
                events.push((
                    *id,
                    "route-changed",
                    match nh {
                        Some(n) if n == *id => "direct link up".to_string(),
                        Some(n) => format!("route changed: via node {}", n.0),
                        None => String::new(),
                    },
                ));
            }
            p.reachable = reachable;
            p.next_hop = nh;
        }
        for (id, kind, reason) in events {
            self.event(id, kind, reason);
        }
    }

    // ---------------------------------------------------------------------------------
    // Replication
    // ---------------------------------------------------------------------------------

    /// Whether `p` holds the same data as this node: every member in full sharing, the
    /// twin (same `sip_addr`) in HA pairs. Replication, donors and cold-start elections
    /// only consider these.
    fn shares_data(&self, p: &Peer) -> bool {
        match self.cfg.mode {
            ClusterMode::FullSharing => true,
            ClusterMode::HaPair => p.info.sip_addr == self.cfg.me.sip_addr,
        }
    }

    fn targets(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.reachable && self.shares_data(p))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Change records made on this node (`count` framed records): numbered, kept for
    /// resends, sent to every reachable member.
    pub fn local_batch(&mut self, now: Millis, records: Bytes, count: u32) {
        self.now = self.now.max(now);
        if count == 0 {
            return;
        }
        let batch = Batch {
            origin: self.id(),
            incarnation: self.cfg.incarnation,
            first_seq: self.out_next_seq,
            count,
            records,
            resent: false,
        };
        self.out_next_seq += u64::from(count);
        self.replay_bytes += batch.records.len();
        self.replay.push_back(batch.clone());
        while self.replay_bytes > self.cfg.replay_bytes && self.replay.len() > 1 {
            if let Some(b) = self.replay.pop_front() {
                self.replay_bytes -= b.records.len();
            }
        }
        for t in self.targets() {
            self.send_to(t, Body::Replicate(batch.clone()));
        }
    }

    fn on_resend_request(&mut self, from: NodeId, incarnation: u64, first: u64, last: u64) {
        let available = incarnation == self.cfg.incarnation
            && self.replay.front().is_some_and(|b| b.first_seq <= first);
        if !available {
            self.send_to(
                from,
                Body::ResendUnavailable {
                    incarnation,
                    from: first,
                },
            );
            return;
        }
        let batches: Vec<Batch> = self
            .replay
            .iter()
            .filter(|b| b.end_seq() > first && b.first_seq <= last)
            .cloned()
            .collect();
        for mut b in batches {
            b.resent = true;
            self.stats.batches_resent += 1;
            self.send_to(from, Body::Replicate(b));
        }
    }

    fn on_batch(&mut self, batch: Batch) {
        let cap = Capability::Usrloc;
        if !self.peers.contains_key(&batch.origin) {
            self.stats.from_stranger += 1;
            return;
        }
        let max = self.cfg.pending_bytes;
        let Some(c) = self.caps.get_mut(&cap) else {
            return;
        };
        if c.state != SyncState::Synced {
            // Held until the snapshot is in; over the bound, the watermark resumption
            // finds the hole and asks for it again.
            if c.buffered_bytes + batch.records.len() <= max {
                c.buffered_bytes += batch.records.len();
                c.buffer.push_back(batch);
            }
            return;
        }
        self.receive_batch(cap, batch);
    }

    fn receive_batch(&mut self, cap: Capability, batch: Batch) {
        let now = self.now;
        let max = self.cfg.pending_bytes;
        let origin = batch.origin;
        let Some(p) = self.peers.get_mut(&origin) else {
            return;
        };
        let inb = &mut p.inbound;
        if batch.incarnation < inb.incarnation {
            self.stats.duplicate_batches += 1;
            return;
        }
        if batch.incarnation > inb.incarnation || inb.next_seq == 0 {
            *inb = Inbound {
                incarnation: batch.incarnation,
                next_seq: 1,
                ..Inbound::default()
            };
        }
        if batch.end_seq() <= inb.next_seq {
            self.stats.duplicate_batches += 1;
            return;
        }
        if batch.first_seq > inb.next_seq {
            let first = batch.first_seq;
            if inb.pending_bytes + batch.records.len() > max {
                let reason = format!(
                    "more than {max} bytes held behind a gap from node {}",
                    origin.0
                );
                self.resync(cap, reason);
                return;
            }
            inb.pending_bytes += batch.records.len();
            inb.pending.entry(first).or_insert(batch);
            if inb.gap.is_none() {
                let (from, to, incarnation) = (inb.next_seq, first - 1, inb.incarnation);
                inb.gap = Some(Gap { to, since: now });
                self.request_resend(origin, incarnation, from, to);
            }
            return;
        }
        self.apply_in_order(cap, origin, batch);
    }

    fn request_resend(&mut self, origin: NodeId, incarnation: u64, from: u64, to: u64) {
        self.stats.resend_requests += 1;
        self.event(
            origin,
            "gap",
            format!(
                "missing records {from}..={to} from node {}: asked again",
                origin.0
            ),
        );
        self.send_to(
            origin,
            Body::ResendRequest {
                incarnation,
                from,
                to,
            },
        );
    }

    /// Applies `batch` (which starts at or before the expected sequence number) and then
    /// every parked batch that has become contiguous.
    fn apply_in_order(&mut self, cap: Capability, origin: NodeId, batch: Batch) {
        let mut next = Some(batch);
        let mut applied = 0u64;
        let mut closed_gap = false;
        let mut new_gap = None;
        let mut out = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&origin) else {
                return;
            };
            let inb = &mut p.inbound;
            while let Some(b) = next.take() {
                if b.end_seq() > inb.next_seq {
                    let skip = (inb.next_seq.saturating_sub(b.first_seq)) as u32;
                    applied += u64::from(b.count - skip);
                    inb.next_seq = b.end_seq();
                    out.push(Action::Apply {
                        cap,
                        batch: b,
                        skip,
                    });
                }
                if let Some((&k, _)) = inb.pending.first_key_value()
                    && k <= inb.next_seq
                    && let Some(b) = inb.pending.remove(&k)
                {
                    inb.pending_bytes -= b.records.len();
                    next = Some(b);
                }
            }
            if let Some(g) = &inb.gap
                && inb.next_seq > g.to
            {
                inb.gap = None;
                closed_gap = true;
            }
            if let Some((&k, _)) = inb.pending.first_key_value()
                && inb.gap.is_none()
            {
                inb.gap = Some(Gap {
                    to: k - 1,
                    since: self.now,
                });
                new_gap = Some((inb.incarnation, inb.next_seq, k - 1));
            }
            if inb.hint.is_some_and(|(s, _)| s < inb.next_seq) {
                inb.hint = None;
            }
        }
        self.actions.extend(out);
        if let Some(c) = self.caps.get_mut(&cap) {
            c.records_applied += applied;
            if closed_gap {
                c.gaps_repaired += 1;
            }
        }
        if let Some((inc, from, to)) = new_gap {
            self.request_resend(origin, inc, from, to);
        }
    }

    fn check_gaps(&mut self) {
        // While a snapshot is awaited, batches are held, not sequenced: nothing to repair.
        if self
            .caps
            .get(&Capability::Usrloc)
            .is_some_and(|c| c.state != SyncState::Synced)
        {
            return;
        }
        let now = self.now;
        let timeout = self.cfg.gap_timeout;
        let grace = self.cfg.heartbeat_interval * 3;
        let mut expired = Vec::new();
        let mut hinted = Vec::new();
        for (id, p) in &mut self.peers {
            let inb = &mut p.inbound;
            if let Some(g) = &inb.gap {
                if now >= g.since + timeout {
                    expired.push(*id);
                }
            } else if let Some((seq, at)) = inb.hint
                && now >= at + grace
            {
                inb.hint = None;
                if seq >= inb.next_seq && inb.next_seq != 0 {
                    inb.gap = Some(Gap {
                        to: seq,
                        since: now,
                    });
                    hinted.push((*id, inb.incarnation, inb.next_seq, seq));
                }
            }
        }
        for (id, inc, from, to) in hinted {
            self.request_resend(id, inc, from, to);
        }
        if !expired.is_empty()
            && self
                .caps
                .get(&Capability::Usrloc)
                .is_some_and(|c| c.state == SyncState::Synced)
        {
            let who: Vec<String> = expired.iter().map(|i| i.0.to_string()).collect();
            self.resync(
                Capability::Usrloc,
                format!(
                    "gap from node {} not repaired within {timeout} ms",
                    who.join(",")
                ),
            );
        }
    }

    /// Falls back to a full sync of `cap`: held batches are dropped, the snapshot's
    /// watermarks say where each stream resumes.
    fn resync(&mut self, cap: Capability, reason: String) {
        for p in self.peers.values_mut() {
            p.inbound.pending.clear();
            p.inbound.pending_bytes = 0;
            p.inbound.gap = None;
            p.inbound.hint = None;
        }
        let now = self.now;
        let me = self.id();
        if let Some(c) = self.caps.get_mut(&cap) {
            if c.state == SyncState::Syncing {
                return;
            }
            c.state = SyncState::NotSynced;
            c.since = now;
            c.retry_at = now;
            c.tried.clear();
            c.last_result = reason.clone();
        }
        self.event(me, "sync-needed", format!("{cap}: {reason}"));
        self.lsa_dirty = true;
        self.drive_sync();
    }

    // ---------------------------------------------------------------------------------
    // Sync
    // ---------------------------------------------------------------------------------

    fn drive_sync(&mut self) {
        let now = self.now;
        let me = self.cfg.me.clone();
        for cap in Capability::ALL {
            let Some(c) = self.caps.get(&cap) else {
                continue;
            };
            if c.state != SyncState::NotSynced || now < c.retry_at {
                continue;
            }
            let donors: Vec<NodeId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.reachable && p.link.up && self.shares_data(p))
                .filter(|(_, p)| {
                    p.lsa.as_ref().is_some_and(|a| {
                        !a.disabled
                            && a.caps
                                .iter()
                                .any(|x| x.cap == cap && x.state == SyncState::Synced)
                    })
                })
                .map(|(id, _)| *id)
                .collect();
            if !donors.is_empty() {
                let fresh: Vec<NodeId> = donors
                    .iter()
                    .copied()
                    .filter(|d| !c.tried.contains(d))
                    .collect();
                let pool = if fresh.is_empty() { &donors } else { &fresh };
                let Some(&donor) = pool.iter().max_by_key(|d| hrw(me.id, **d)) else {
                    continue;
                };
                let info = self.peers[&donor].info.clone();
                if let Some(c) = self.caps.get_mut(&cap) {
                    if fresh.is_empty() {
                        c.tried.clear();
                    }
                    c.tried.insert(donor);
                    c.state = SyncState::Syncing;
                    c.started_at = now;
                    c.donor = Some(donor);
                }
                self.lsa_dirty = true;
                // A node that recovered data from its store asks only for what is newer
                // (less a margin for clock skew and replication lag between nodes).
                let margin = version_span(self.cfg.resume_margin);
                let since = self.resume_from.map_or(0, |v| v.saturating_sub(margin));
                let what = if since > 0 {
                    format!("delta sync (versions after {since})")
                } else {
                    "full sync".to_string()
                };
                self.event(
                    me.id,
                    "sync-started",
                    format!("{cap}: {what} from node {}", donor.0),
                );
                self.actions.push(Action::StartSnapshot {
                    cap,
                    donor: info,
                    since,
                });
                continue;
            }
            let members = self.peers.values().filter(|p| self.shares_data(p)).count();
            let waited = now.saturating_sub(c.since) >= self.cfg.seed_fallback;
            let reason = if members == 0 && !self.cfg.joining {
                Some("no other member: nothing to sync".to_string())
            } else if waited && me.seed {
                Some(format!(
                    "seed: no donor within {} ms",
                    self.cfg.seed_fallback
                ))
            } else if waited {
                self.cold_start_winner(cap).map(|n| {
                    format!(
                        "cold start: newest data (version {}) among {n} unsynced reachable nodes",
                        c.newest_version
                    )
                })
            } else {
                None
            };
            if let Some(reason) = reason {
                self.become_synced(cap, reason);
            }
        }
    }

    /// `Some(number of candidates)` when every reachable member is unsynced for `cap` and
    /// this node holds the newest data (then priority, then lowest id).
    fn cold_start_winner(&self, cap: Capability) -> Option<usize> {
        let mine = self.caps.get(&cap)?;
        let key = |v: u64, prio: u32, id: NodeId| (v, prio, std::cmp::Reverse(id));
        let my_key = key(mine.newest_version, self.cfg.me.priority, self.id());
        let mut n = 1;
        for p in self
            .peers
            .values()
            .filter(|p| p.reachable && self.shares_data(p))
        {
            let ad = p.lsa.as_ref()?;
            if ad.disabled {
                continue;
            }
            let adv = ad.caps.iter().find(|x| x.cap == cap)?;
            if adv.state != SyncState::NotSynced {
                return None;
            }
            if key(adv.newest_version, ad.node.priority, ad.node.id) > my_key {
                return None;
            }
            n += 1;
        }
        (n > 1).then_some(n)
    }

    fn become_synced(&mut self, cap: Capability, reason: String) {
        let me = self.id();
        let buffered = match self.caps.get_mut(&cap) {
            Some(c) => {
                c.state = SyncState::Synced;
                c.last_result = reason.clone();
                c.buffered_bytes = 0;
                std::mem::take(&mut c.buffer)
            }
            None => return,
        };
        self.lsa_dirty = true;
        self.event(me, "synced", format!("{cap}: {reason}"));
        for b in buffered {
            self.receive_batch(cap, b);
        }
    }

    /// The driver finished (or gave up) a snapshot transfer.
    pub fn snapshot_done(
        &mut self,
        now: Millis,
        cap: Capability,
        donor: NodeId,
        outcome: SnapshotOutcome,
    ) {
        self.now = self.now.max(now);
        let Some(c) = self.caps.get_mut(&cap) else {
            return;
        };
        if c.state != SyncState::Syncing || c.donor != Some(donor) {
            return;
        }
        match outcome {
            SnapshotOutcome::Verified { watermarks, count } => {
                c.completed += 1;
                self.resume_from = None;
                let took = self.now.saturating_sub(c.started_at);
                // Each stream resumes at the donor's watermark; an origin the donor did
                // not know starts over from its first record.
                for p in self.peers.values_mut() {
                    p.inbound = Inbound::default();
                }
                for w in watermarks {
                    if let Some(p) = self.peers.get_mut(&w.origin) {
                        p.inbound = Inbound {
                            incarnation: w.incarnation,
                            next_seq: w.seq + 1,
                            ..Inbound::default()
                        };
                    }
                }
                self.become_synced(
                    cap,
                    format!(
                        "{count} records from node {} in {}.{:03} s, count and digest verified",
                        donor.0,
                        took / 1000,
                        took % 1000
                    ),
                );
            }
            SnapshotOutcome::Failed(why) => {
                c.failed += 1;
                c.state = SyncState::NotSynced;
                c.retry_at = self.now + self.cfg.sync_retry;
                c.last_result = format!("from node {}: {why}", donor.0);
                self.lsa_dirty = true;
                let me = self.id();
                self.event(
                    me,
                    "sync-failed",
                    format!("{cap}: from node {}: {why}", donor.0),
                );
            }
        }
    }

    /// Where this node's realtime streams stand (the donor side of a snapshot).
    pub fn watermarks(&self) -> Vec<Watermark> {
        let mut w = vec![Watermark {
            origin: self.id(),
            incarnation: self.cfg.incarnation,
            seq: self.out_next_seq - 1,
        }];
        for (id, p) in &self.peers {
            if p.inbound.next_seq > 0 {
                w.push(Watermark {
                    origin: *id,
                    incarnation: p.inbound.incarnation,
                    seq: p.inbound.next_seq - 1,
                });
            }
        }
        w
    }

    /// Whether this node may serve `cap` snapshots.
    pub fn can_donate(&self, cap: Capability) -> bool {
        !self.disabled
            && self
                .caps
                .get(&cap)
                .is_some_and(|c| c.state == SyncState::Synced)
    }

    /// This node recovered data up to version `v` from its store: its first sync asks the
    /// donor only for what is newer than `v` less `resume_margin`.
    pub fn set_resume_point(&mut self, v: u64) {
        self.resume_from = (v > 0).then_some(v);
    }

    /// Records the newest object version held (cold-start election).
    pub fn set_newest_version(&mut self, cap: Capability, v: u64) {
        if let Some(c) = self.caps.get_mut(&cap)
            && c.newest_version != v
        {
            c.newest_version = v;
            self.lsa_dirty = true;
        }
    }

    // ---------------------------------------------------------------------------------
    // Operator commands and membership
    // ---------------------------------------------------------------------------------

    /// A node asks to join through us. Returns every member (us included) on success.
    pub fn on_join(&mut self, now: Millis, info: NodeInfo) -> Result<Vec<NodeInfo>, String> {
        self.now = self.now.max(now);
        if info.id == self.id() {
            return Err(format!(
                "node id {} is already used by {}",
                info.id.0, self.cfg.me.peer_url
            ));
        }
        if let Some(p) = self.peers.get(&info.id)
            && p.reachable
            && p.info.peer_url != info.peer_url
        {
            return Err(format!(
                "node id {} is already used by {}",
                info.id.0, p.info.peer_url
            ));
        }
        if let Some(inc) = self.removed.remove(&info.id) {
            self.readmitted.insert(info.id, inc);
        }
        self.learn(info);
        let mut all = vec![self.cfg.me.clone()];
        all.extend(self.peers.values().map(|p| p.info.clone()));
        Ok(all)
    }

    /// The member list a join returned.
    pub fn on_join_reply(&mut self, now: Millis, members: Vec<NodeInfo>) {
        self.now = self.now.max(now);
        for m in members {
            self.learn(m);
        }
    }

    /// Removes a member cluster-wide.
    pub fn remove_node(&mut self, now: Millis, id: NodeId) -> Result<(), String> {
        self.now = self.now.max(now);
        if id == self.id() {
            return Err("cannot remove the local node: stop it, or disable it".into());
        }
        let Some(p) = self.peers.get(&id) else {
            return Err(format!("node {} is not a member", id.0));
        };
        // A member never heard from is removed up to "now" on this node's wall clock
        // (incarnation + uptime): a process started later may join again.
        let incarnation = p
            .lsa
            .as_ref()
            .map_or(self.cfg.incarnation + self.now, |a| a.incarnation);
        self.readmitted.remove(&id);
        self.apply_removal(
            Removal { id, incarnation },
            "removed by an operator".to_string(),
        );
        self.advertise();
        Ok(())
    }

    /// Takes the local node out of (or back into) the cluster without it looking failed:
    /// heartbeats and replication go on, but it serves no snapshot and peers list it as
    /// disabled.
    pub fn set_enabled(&mut self, now: Millis, enabled: bool) {
        self.now = self.now.max(now);
        if self.disabled != enabled {
            return;
        }
        self.disabled = !enabled;
        let me = self.id();
        self.event(
            me,
            if enabled {
                "node-enabled"
            } else {
                "node-disabled"
            },
            format!(
                "local node {} by an operator",
                if enabled { "enabled" } else { "disabled" }
            ),
        );
        self.advertise();
    }

    /// Operator request (`sipctl tag activate`): this node becomes active for `name` with
    /// the next term; the advertisement goes out at once so the previous holder steps
    /// down within one link-state flood.
    pub fn activate_tag(&mut self, now: Millis, name: &str) -> Result<u64, String> {
        self.now = self.now.max(now);
        if self.disabled {
            return Err("this node is disabled: enable it first".into());
        }
        let term = self.tags.activate(name, self.now, "by an operator")?;
        let me = self.id();
        self.event(
            me,
            "tag-activated",
            format!("{name}: active here with term {term}"),
        );
        self.update_ownership();
        self.advertise();
        Ok(term)
    }

    /// Every sharing tag this node knows.
    pub fn tags(&self) -> Vec<TagView> {
        self.tags.list()
    }

    /// Tag transitions on this node, oldest first.
    pub fn tag_history(&self) -> impl Iterator<Item = &TagTransition> {
        self.tags.history()
    }

    /// The ownership last handed to the driver.
    pub fn ownership(&self) -> Option<&Ownership> {
        self.published.as_ref()
    }

    /// Operator request: full sync of `cap` now.
    pub fn request_sync(&mut self, now: Millis, cap: Capability) -> Result<(), String> {
        self.now = self.now.max(now);
        let synced_peer = self.peers.values().any(|p| {
            p.reachable
                && p.lsa.as_ref().is_some_and(|a| {
                    !a.disabled
                        && a.caps
                            .iter()
                            .any(|x| x.cap == cap && x.state == SyncState::Synced)
                })
        });
        if !synced_peer {
            return Err(format!("no reachable synced donor for {cap}"));
        }
        if self
            .caps
            .get(&cap)
            .is_some_and(|c| c.state == SyncState::Syncing)
        {
            return Err(format!("{cap} is already syncing"));
        }
        self.resync(cap, "requested by an operator".into());
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Views
    // ---------------------------------------------------------------------------------

    /// Every node, the local one first.
    pub fn nodes(&self) -> Vec<NodeView> {
        let own = self.own_ad();
        let mut v = vec![NodeView {
            info: self.cfg.me.clone(),
            local: true,
            state: if self.disabled { "disabled" } else { "up" },
            link: "none",
            next_hop: None,
            caps: own.caps,
            rtt: None,
        }];
        for p in self.peers.values() {
            let disabled = p.lsa.as_ref().is_some_and(|a| a.disabled);
            v.push(NodeView {
                info: p.info.clone(),
                local: false,
                state: match (p.reachable, disabled) {
                    (false, _) => "down",
                    (true, true) => "disabled",
                    (true, false) => "up",
                },
                link: if p.link.up { "up" } else { "down" },
                next_hop: p.next_hop,
                caps: p.lsa.as_ref().map(|a| a.caps.clone()).unwrap_or_default(),
                rtt: p.link.rtt,
            });
        }
        v
    }

    /// The link-state database: (node, advertisement seq, up links), the local node first.
    pub fn topology(&self) -> Vec<(NodeId, u64, Vec<NodeId>)> {
        let own = self.own_ad();
        let mut v = vec![(self.id(), own.seq, own.up_links)];
        for (id, p) in &self.peers {
            if let Some(a) = &p.lsa {
                v.push((*id, a.seq, a.up_links.clone()));
            } else {
                v.push((*id, 0, Vec::new()));
            }
        }
        v
    }

    /// Sync state per capability.
    pub fn sync_status(&self) -> Vec<SyncView> {
        self.caps
            .iter()
            .map(|(cap, c)| SyncView {
                cap: *cap,
                state: c.state,
                donor: c.donor,
                completed: c.completed,
                failed: c.failed,
                last_result: c.last_result.clone(),
                gaps_repaired: c.gaps_repaired,
                records_applied: c.records_applied,
            })
            .collect()
    }

    /// Sync state of one capability.
    pub fn sync_state(&self, cap: Capability) -> SyncState {
        self.caps
            .get(&cap)
            .map_or(SyncState::NotSynced, |c| c.state)
    }

    /// The bounded event history, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    /// The member `id`'s identity.
    pub fn member(&self, id: NodeId) -> Option<&NodeInfo> {
        if id == self.id() {
            return Some(&self.cfg.me);
        }
        self.peers.get(&id).map(|p| &p.info)
    }
}

#[cfg(test)]
mod tests;
