//! Tests of the mesh state machine over a simulated network: N [`Mesh`] instances, a
//! virtual clock advancing in [`STEP`] ms, and a delivery loop that hands every
//! `Action::Send` to its neighbour at once (within the step) unless the link is cut or a
//! drop rule eats the envelope. Snapshots are answered by the harness after a delay with
//! the donor's watermarks. No sockets, no sleeps.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use sipmesh_cluster::NodeId;

use super::*;

/// Clock step of the harness.
const STEP: Millis = 10;
const CLUSTER: u32 = 7;
const USRLOC: Capability = Capability::Usrloc;

fn info(id: u16) -> NodeInfo {
    NodeInfo {
        id: NodeId(id),
        peer_url: format!("http://10.0.0.{id}:50051"),
        sip_addr: format!("10.0.0.{id}:5060"),
        seed: false,
        priority: 0,
    }
}

fn incarnation(id: u16) -> u64 {
    1_700_000_000_000 + u64::from(id)
}

fn config(id: u16) -> MeshConfig {
    MeshConfig::new(CLUSTER, info(id), incarnation(id))
}

/// One `Action::Apply` as recorded: (origin, first_seq, skip, count).
type Applied = (u16, u64, u32, u32);

/// Decides whether an envelope from `from` to `to` is lost (true) or delivered.
type DropRule = Box<dyn FnMut(u16, u16, &Envelope) -> bool>;

/// What one node asked the driver to do.
#[derive(Default)]
struct Log {
    events: Vec<Event>,
    applied: Vec<Applied>,
    /// `StartSnapshot`: the `since` of each, in order.
    since: Vec<u64>,
    /// `Publish`: (time, ownership).
    published: Vec<(Millis, Ownership)>,
    /// `PersistTags`, in order.
    persisted_tags: Vec<(String, u64, Option<NodeId>)>,
    /// `StartSnapshot`: (time, donor).
    snapshots: Vec<(Millis, u16)>,
    connects: Vec<u16>,
    disconnects: Vec<u16>,
}

/// A snapshot the harness answers at `due`.
struct SnapshotJob {
    due: Millis,
    node: u16,
    cap: Capability,
    donor: NodeId,
}

/// A directed envelope with the time it was put on the link.
struct Wire {
    at: Millis,
    from: u16,
    to: u16,
    env: Envelope,
}

struct Net {
    now: Millis,
    nodes: BTreeMap<u16, Mesh>,
    logs: BTreeMap<u16, Log>,
    /// Directed links that lose everything.
    cut: BTreeSet<(u16, u16)>,
    /// Consulted for envelopes on links that are not cut.
    drop_rule: Option<DropRule>,
    delivered: Vec<Wire>,
    dropped: Vec<Wire>,
    /// `None`: the test answers snapshots itself.
    snapshot_delay: Option<Millis>,
    /// Outcomes of the next snapshots answered: each entry fails one.
    snapshot_failures: VecDeque<String>,
    jobs: Vec<SnapshotJob>,
    /// The nodes present before the first step got their first tick at time 0.
    started: bool,
}

impl Net {
    fn new() -> Net {
        Net {
            now: 0,
            nodes: BTreeMap::new(),
            logs: BTreeMap::new(),
            cut: BTreeSet::new(),
            drop_rule: None,
            delivered: Vec::new(),
            dropped: Vec::new(),
            snapshot_delay: Some(20),
            snapshot_failures: VecDeque::new(),
            jobs: Vec::new(),
            started: false,
        }
    }

    /// Nodes `1..=n`, each configured with all the others as members.
    fn cluster(n: u16, tweak: impl Fn(&mut MeshConfig)) -> Net {
        let mut net = Net::new();
        for id in 1..=n {
            let mut cfg = config(id);
            tweak(&mut cfg);
            let members = (1..=n).filter(|&m| m != id).map(info).collect();
            net.add(cfg, members);
        }
        net
    }

    /// Starts a node (replacing a running one with the same id) at the current time.
    fn add(&mut self, cfg: MeshConfig, members: Vec<NodeInfo>) {
        let id = cfg.me.id.0;
        self.nodes.insert(id, Mesh::new(cfg, members, self.now));
        self.logs.insert(id, Log::default());
        self.jobs.retain(|j| j.node != id);
        self.settle();
    }

    fn node(&mut self, id: u16) -> &mut Mesh {
        self.nodes.get_mut(&id).expect("no such node")
    }

    fn get(&self, id: u16) -> &Mesh {
        &self.nodes[&id]
    }

    fn log(&self, id: u16) -> &Log {
        &self.logs[&id]
    }

    fn cut(&mut self, a: u16, b: u16) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    fn heal(&mut self, a: u16, b: u16) {
        self.cut.remove(&(a, b));
        self.cut.remove(&(b, a));
    }

    fn ids(&self) -> Vec<u16> {
        self.nodes.keys().copied().collect()
    }

    /// Cuts every link of `a`.
    fn isolate(&mut self, a: u16) {
        for b in self.ids() {
            if b != a {
                self.cut(a, b);
            }
        }
    }

    fn rejoin(&mut self, a: u16) {
        for b in self.ids() {
            if b != a {
                self.heal(a, b);
            }
        }
    }

    /// Advances the clock by one step: ticks, deliveries, due snapshots. The first step
    /// also ticks at the start time, so heartbeats go out at 0, 100, 200, ...
    fn step(&mut self) {
        if !self.started {
            self.started = true;
            let now = self.now;
            for m in self.nodes.values_mut() {
                m.tick(now);
            }
            self.settle();
        }
        self.now += STEP;
        let now = self.now;
        for m in self.nodes.values_mut() {
            m.tick(now);
        }
        self.settle();
        let (due, later): (Vec<SnapshotJob>, Vec<SnapshotJob>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(|j| j.due <= now);
        self.jobs = later;
        for j in due {
            let outcome = if let Some(why) = self.snapshot_failures.pop_front() {
                SnapshotOutcome::Failed(why)
            } else if let Some(d) = self.nodes.get(&j.donor.0) {
                SnapshotOutcome::Verified {
                    watermarks: d.watermarks(),
                    count: 0,
                }
            } else {
                SnapshotOutcome::Failed("donor gone".into())
            };
            if let Some(m) = self.nodes.get_mut(&j.node) {
                m.snapshot_done(now, j.cap, j.donor, outcome);
            }
        }
        self.settle();
    }

    /// Steps until the clock reads `t`.
    fn run_to(&mut self, t: Millis) {
        while self.now < t {
            self.step();
        }
    }

    fn run_for(&mut self, ms: Millis) {
        let t = self.now + ms;
        self.run_to(t);
    }

    /// Steps until `done` holds (checked before the first step too), at most `within` ms.
    /// Returns the time it first held.
    fn run_until(&mut self, within: Millis, done: impl Fn(&Net) -> bool) -> Option<Millis> {
        let limit = self.now + within;
        loop {
            if done(self) {
                return Some(self.now);
            }
            if self.now >= limit {
                return None;
            }
            self.step();
        }
    }

    /// Delivers actions until no node has any left.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut queue = Vec::new();
            for (id, m) in &mut self.nodes {
                queue.extend(m.take_actions().into_iter().map(|a| (*id, a)));
            }
            if queue.is_empty() {
                return;
            }
            for (from, a) in queue {
                self.handle(from, a);
            }
        }
        panic!("the mesh does not settle");
    }

    fn handle(&mut self, from: u16, action: Action) {
        let now = self.now;
        let log = self.logs.get_mut(&from).expect("log");
        match action {
            Action::Send { link, env } => {
                let to = link.0;
                let lost = self.cut.contains(&(from, to))
                    || self.drop_rule.as_mut().is_some_and(|f| f(from, to, &env));
                let wire = Wire {
                    at: now,
                    from,
                    to,
                    env,
                };
                match self.nodes.get_mut(&to) {
                    Some(m) if !lost => {
                        m.on_envelope(now, wire.env.clone());
                        self.delivered.push(wire);
                    }
                    _ => self.dropped.push(wire),
                }
            }
            Action::Connect(i) => log.connects.push(i.id.0),
            Action::Publish(o) => log.published.push((now, *o)),
            Action::PersistTags(t) => log.persisted_tags.extend(t),
            Action::Disconnect(id) => log.disconnects.push(id.0),
            Action::Apply { cap, batch, skip } => {
                assert_eq!(cap, USRLOC);
                log.applied
                    .push((batch.origin.0, batch.first_seq, skip, batch.count));
            }
            Action::StartSnapshot { cap, donor, since } => {
                log.snapshots.push((now, donor.id.0));
                log.since.push(since);
                if let Some(d) = self.snapshot_delay {
                    self.jobs.push(SnapshotJob {
                        due: now + d,
                        node: from,
                        cap,
                        donor: donor.id,
                    });
                }
            }
            Action::Event(e) => log.events.push(e),
        }
    }

    /// A local batch of `count` records (`len` opaque bytes) on node `id`, delivered.
    fn batch(&mut self, id: u16, len: usize, count: u32) {
        let now = self.now;
        let records = Bytes::from(vec![id as u8; len]);
        self.node(id).local_batch(now, records, count);
        self.settle();
    }

    /// Operator request: full sync of usrloc on node `id`, actions delivered.
    fn request_sync(&mut self, id: u16) -> Result<(), String> {
        let now = self.now;
        let r = self.node(id).request_sync(now, USRLOC);
        self.settle();
        r
    }

    /// What node `at` shows about node `of`.
    fn view(&self, at: u16, of: u16) -> Option<NodeView> {
        self.get(at)
            .nodes()
            .into_iter()
            .find(|v| v.info.id == NodeId(of))
    }

    fn sync(&self, id: u16) -> SyncView {
        self.get(id)
            .sync_status()
            .into_iter()
            .find(|s| s.cap == USRLOC)
            .expect("usrloc")
    }

    fn state(&self, id: u16) -> SyncState {
        self.get(id).sync_state(USRLOC)
    }

    fn all_synced(&self) -> bool {
        self.nodes
            .values()
            .all(|m| m.sync_state(USRLOC) == SyncState::Synced)
    }

    /// Events of `kind` that node `at` recorded about node `about`.
    fn events(&self, at: u16, kind: &str, about: u16) -> Vec<&Event> {
        self.log(at)
            .events
            .iter()
            .filter(|e| e.kind == kind && e.node == NodeId(about))
            .collect()
    }

    /// Times of such events at or after `since`.
    fn event_times(&self, at: u16, kind: &str, about: u16, since: Millis) -> Vec<Millis> {
        self.events(at, kind, about)
            .into_iter()
            .map(|e| e.at)
            .filter(|&t| t >= since)
            .collect()
    }

    /// Whether every pair of nodes has its direct link up on both ends and sees the other up.
    fn fully_meshed(&self) -> bool {
        let ids = self.ids();
        ids.iter().all(|&a| {
            ids.iter().filter(|&&b| b != a).all(|&b| {
                self.view(a, b).is_some_and(|v| {
                    v.state == "up" && v.link == "up" && v.next_hop == Some(NodeId(b))
                })
            })
        })
    }

    /// Envelopes put on the wire (delivered) from `from` to `to` whose body matches.
    fn count_delivered(
        &self,
        from: u16,
        to: u16,
        since: Millis,
        body: impl Fn(&Body) -> bool,
    ) -> usize {
        self.delivered
            .iter()
            .filter(|w| w.from == from && w.to == to && w.at >= since && body(&w.env.body))
            .count()
    }
}

/// `n` nodes, full mesh, every capability synced (cold start: node 1 wins).
fn synced_cluster(n: u16, tweak: impl Fn(&mut MeshConfig)) -> Net {
    let mut net = Net::cluster(n, tweak);
    let at = net.run_until(6000, Net::all_synced);
    assert!(at.is_some(), "cluster of {n} not synced within 6 s");
    assert!(net.fully_meshed());
    net
}

fn is_ping(b: &Body) -> bool {
    matches!(b, Body::Ping(_))
}

fn is_pong(b: &Body) -> bool {
    matches!(b, Body::Pong(_))
}

fn is_replicate(b: &Body) -> bool {
    matches!(b, Body::Replicate(_))
}

/// The donor `node` prefers among `candidates` (rendezvous hashing, as `drive_sync` does).
fn preferred_donor(node: u16, candidates: &[u16]) -> u16 {
    *candidates
        .iter()
        .max_by_key(|&&d| hrw(NodeId(node), NodeId(d)))
        .expect("candidates")
}

// -------------------------------------------------------------------------------------
// 1. Formation and cold start
// -------------------------------------------------------------------------------------

#[test]
fn three_members_link_up_and_cold_start_elects_one_then_the_others_full_sync() {
    let mut net = Net::cluster(3, |_| {});
    let cfg = net.get(1).config().clone();
    let up_at = Millis::from(cfg.link_up_after - 1) * cfg.heartbeat_interval;
    assert_eq!(up_at, 200);

    // Pings at 0 and 100 answered: two answers are not enough.
    net.run_to(up_at - STEP);
    for a in 1..=3 {
        for b in (1..=3).filter(|&b| b != a) {
            let v = net.view(a, b).expect("member listed");
            assert_eq!(
                (v.state, v.link, v.next_hop),
                ("down", "down", None),
                "{a} -> {b}"
            );
        }
    }
    // The third answer (ping sent at 200) brings every link up.
    net.step();
    assert_eq!(net.now, up_at);
    assert!(net.fully_meshed());
    for a in 1..=3u16 {
        for b in (1..=3).filter(|&b| b != a) {
            assert_eq!(
                net.event_times(a, "link-up", b, 0),
                vec![up_at],
                "{a} -> {b}"
            );
            assert_eq!(
                net.event_times(a, "node-up", b, 0),
                vec![up_at],
                "{a} -> {b}"
            );
            assert_eq!(net.view(a, b).unwrap().rtt, Some(0));
        }
        let local = &net.get(a).nodes()[0];
        assert!(local.local);
        assert_eq!((local.state, local.link), ("up", "none"));
    }

    // Nobody is a seed and nobody holds data: nothing happens before seed_fallback.
    net.run_to(cfg.seed_fallback - STEP);
    for id in 1..=3 {
        assert_eq!(net.state(id), SyncState::NotSynced, "node {id}");
    }
    // Cold start: equal versions and priorities, lowest id wins at exactly seed_fallback.
    net.step();
    assert_eq!(net.now, cfg.seed_fallback);
    assert_eq!(net.state(1), SyncState::Synced);
    assert!(
        net.sync(1).last_result.starts_with("cold start"),
        "{}",
        net.sync(1).last_result
    );
    assert_eq!(net.state(2), SyncState::NotSynced);
    assert_eq!(net.state(3), SyncState::NotSynced);

    // The others see node 1 synced in its advertisement and full-sync from it.
    let done = net.run_until(500, Net::all_synced).expect("all synced");
    assert_eq!(done, cfg.seed_fallback + STEP + 20);
    assert!(net.log(1).snapshots.is_empty());
    for id in [2, 3] {
        assert_eq!(
            net.log(id).snapshots,
            vec![(cfg.seed_fallback + STEP, 1)],
            "node {id}"
        );
        let s = net.sync(id);
        assert_eq!(
            (s.state, s.donor, s.completed, s.failed),
            (SyncState::Synced, Some(NodeId(1)), 1, 0)
        );
        assert!(s.last_result.contains("verified"), "{}", s.last_result);
    }
    assert_eq!(net.sync(1).completed, 0);

    // Advertisements carry the new state: every node sees every other synced.
    net.run_for(100);
    for a in 1..=3 {
        for b in (1..=3).filter(|&b| b != a) {
            let caps = net.view(a, b).unwrap().caps;
            assert_eq!(caps.len(), 1);
            assert_eq!(
                (caps[0].cap, caps[0].state),
                (USRLOC, SyncState::Synced),
                "{a} sees {b}"
            );
        }
    }
}

#[test]
fn a_node_without_members_is_synced_at_once() {
    let mut m = Mesh::new(config(9), Vec::new(), 0);
    assert_eq!(m.sync_state(USRLOC), SyncState::Synced);
    assert!(m.can_donate(USRLOC));
    assert_eq!(
        m.sync_status()[0].last_result,
        "no other member: nothing to sync"
    );
    let synced: Vec<_> = m
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e.kind),
            _ => None,
        })
        .collect();
    assert_eq!(synced, vec!["synced"]);
    assert_eq!(m.nodes().len(), 1);
}

#[test]
fn cold_start_prefers_newest_data_then_priority_then_lowest_id() {
    // Newest data beats priority: node 3 holds version 50, node 2 has priority 9.
    let mut net = Net::cluster(3, |c| {
        if c.me.id == NodeId(2) {
            c.me.priority = 9;
        }
    });
    net.node(3).set_newest_version(USRLOC, 50);
    net.run_until(6000, Net::all_synced).expect("synced");
    assert!(
        net.sync(3)
            .last_result
            .starts_with("cold start: newest data (version 50)")
    );
    assert_eq!(
        net.log(1).snapshots.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        net.log(2).snapshots.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![3]
    );

    // Equal data: the highest priority wins, not the lowest id.
    let mut net = Net::cluster(3, |c| {
        if c.me.id == NodeId(2) {
            c.me.priority = 9;
        }
    });
    net.run_until(6000, Net::all_synced).expect("synced");
    assert!(net.sync(2).last_result.starts_with("cold start"));
    assert!(net.log(2).snapshots.is_empty());
    assert_eq!(
        net.log(1).snapshots.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        net.log(3).snapshots.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![2]
    );
}

// -------------------------------------------------------------------------------------
// 2. Failure detection
// -------------------------------------------------------------------------------------

#[test]
fn a_dead_node_is_reported_down_within_a_second_and_back_after_link_up_after_answers() {
    let mut net = synced_cluster(3, |_| {});
    let cfg = net.get(1).config().clone();
    // Cut between two pings (pings go out at multiples of 100 ms).
    net.run_to(5050);
    let t_cut = net.now;
    net.isolate(2);

    net.run_until(2000, |n| {
        !n.event_times(1, "node-down", 2, t_cut).is_empty()
            && !n.event_times(3, "node-down", 2, t_cut).is_empty()
    })
    .expect("node 2 reported down");
    // Not before `heartbeat_retries` pings sent after the cut could time out; at most one
    // interval more (the cut may fall just after a ping) and one harness step.
    let earliest =
        Millis::from(cfg.heartbeat_retries - 1) * cfg.heartbeat_interval + cfg.heartbeat_timeout;
    let latest =
        Millis::from(cfg.heartbeat_retries) * cfg.heartbeat_interval + cfg.heartbeat_timeout + STEP;
    for at in [1, 3] {
        let down = net.event_times(at, "node-down", 2, t_cut);
        assert_eq!(down.len(), 1, "node {at}");
        let delay = down[0] - t_cut;
        println!("failure detection: node {at} reported node 2 down {delay} ms after the cut");
        assert!(
            (earliest..=latest).contains(&delay) && delay < 1000,
            "node {at}: {delay} ms not in {earliest}..={latest}"
        );
        let link_down = net.events(at, "link-down", 2);
        assert_eq!(link_down.len(), 1);
        assert_eq!(link_down[0].at, down[0]);
        assert!(
            link_down[0]
                .reason
                .contains("3 heartbeats unanswered within 250 ms"),
            "{}",
            link_down[0].reason
        );
        let v = net.view(at, 2).unwrap();
        assert_eq!((v.state, v.link, v.next_hop), ("down", "down", None));
    }
    // With the pings sent at 5100, 5200, 5300 lost, the third times out at 5550.
    assert_eq!(net.event_times(1, "node-down", 2, t_cut), vec![5550]);
    // The isolated node sees the others down too; nodes 1 and 3 still see each other.
    assert_eq!(net.view(2, 1).unwrap().state, "down");
    assert_eq!(net.view(2, 3).unwrap().state, "down");
    assert_eq!(net.view(1, 3).unwrap().state, "up");
    assert!(net.event_times(1, "node-down", 3, 0).is_empty());

    // Heal: the link comes back only after `link_up_after` consecutive answers.
    net.run_for(1000);
    let t_heal = net.now;
    net.rejoin(2);
    net.run_until(2000, |n| {
        !n.event_times(1, "node-up", 2, t_heal).is_empty()
            && !n.event_times(3, "node-up", 2, t_heal).is_empty()
    })
    .expect("node 2 back up");
    for at in [1, 3] {
        let up = net.event_times(at, "node-up", 2, t_heal)[0];
        assert_eq!(net.event_times(at, "link-up", 2, t_heal), vec![up]);
        let pongs = net
            .delivered
            .iter()
            .filter(|w| {
                w.from == 2 && w.to == at && w.at > t_heal && w.at <= up && is_pong(&w.env.body)
            })
            .count();
        println!(
            "node {at}: node 2 back up {} ms after the heal, after {pongs} answered pings",
            up - t_heal
        );
        assert!(
            pongs >= cfg.link_up_after as usize,
            "up after only {pongs} answers"
        );
        assert!(up - t_heal >= Millis::from(cfg.link_up_after - 1) * cfg.heartbeat_interval);
        let v = net.view(at, 2).unwrap();
        assert_eq!((v.state, v.link, v.next_hop), ("up", "up", Some(NodeId(2))));
    }
    net.run_for(1000);
    assert!(net.fully_meshed());
}

// -------------------------------------------------------------------------------------
// 3. Hysteresis
// -------------------------------------------------------------------------------------

/// Two nodes; from `start` on, node 1's ping number `seq` to node 2 is lost when
/// `lost(seq)`. Returns node 1's link events about node 2 after `start` and whether the
/// link was up at every step / at no step of the 10 s that follow.
fn ping_loss(start: Millis, lost: fn(u64) -> bool) -> (Vec<&'static str>, bool, bool, Net) {
    let mut net = Net::cluster(2, |_| {});
    net.run_to(start);
    net.drop_rule = Some(Box::new(move |from, to, env| {
        from == 1 && to == 2 && matches!(env.body, Body::Ping(seq) if lost(seq))
    }));
    let (mut always_up, mut never_up) = (true, true);
    let end = start + 10_000;
    while net.now < end {
        net.step();
        let up = net.view(1, 2).unwrap().link == "up";
        always_up &= up;
        never_up &= !up;
    }
    let events = net
        .log(1)
        .events
        .iter()
        .filter(|e| {
            e.node == NodeId(2) && e.at > start && (e.kind == "link-up" || e.kind == "link-down")
        })
        .map(|e| e.kind)
        .collect();
    (events, always_up, never_up, net)
}

#[test]
fn lossy_links_do_not_flap() {
    // An up link loses every other ping: misses never reach `retries` in a row, it stays up.
    let (ev, always_up, _, net) = ping_loss(1000, |s| s % 2 == 0);
    assert!(ev.is_empty(), "{ev:?}");
    assert!(always_up);
    let lost = net.dropped.iter().filter(|w| is_ping(&w.env.body)).count();
    assert!((49..=51).contains(&lost), "{lost} pings lost");

    // Two in three lost on an up link: still at most two misses in a row, still up.
    let (ev, always_up, _, _) = ping_loss(1000, |s| s % 3 != 0);
    assert!(ev.is_empty(), "{ev:?}");
    assert!(always_up);

    // A link that starts down and answers one ping in two never has `link_up_after`
    // consecutive answers: it never comes up.
    let (ev, _, never_up, net) = ping_loss(0, |s| s % 2 == 0);
    assert!(ev.is_empty(), "{ev:?}");
    assert!(never_up);
    assert!(net.count_delivered(2, 1, 0, is_pong) >= 49);
    assert_eq!(net.view(1, 2).unwrap().state, "down");

    // Nor does one answering one ping in three (the module's promise).
    let (ev, _, never_up, net) = ping_loss(0, |s| s % 3 != 0);
    assert!(ev.is_empty(), "{ev:?}");
    assert!(never_up);
    assert!(net.count_delivered(2, 1, 0, is_pong) >= 33);

    // Three losses in a row on an up link take it down once, even though an answer comes
    // back before they time out; one answer in four never brings it back.
    let (ev, _, _, _) = ping_loss(1000, |s| s % 4 != 0);
    assert_eq!(ev, vec!["link-down"]);
}

// -------------------------------------------------------------------------------------
// 4. Relaying
// -------------------------------------------------------------------------------------

#[test]
fn a_node_without_direct_link_is_reached_through_a_relay() {
    let mut net = Net::cluster(3, |_| {});
    net.cut(1, 3);
    net.run_until(6000, Net::all_synced).expect("synced");
    net.run_for(500);

    for (a, b) in [(1, 3), (3, 1)] {
        let v = net.view(a, b).unwrap();
        assert_eq!(
            (v.state, v.link, v.next_hop),
            ("up", "down", Some(NodeId(2))),
            "{a} -> {b}"
        );
    }
    assert_eq!(net.view(1, 2).unwrap().next_hop, Some(NodeId(2)));
    // Node 3 had no direct link to the cold-start winner: it synced from node 2.
    assert_eq!(
        net.log(3).snapshots.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![2]
    );

    let relayed = net.get(2).stats().relayed;
    net.batch(1, 8, 1);
    assert_eq!(net.log(3).applied, vec![(1, 1, 0, 1)]);
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 1)]);
    assert_eq!(net.get(2).stats().relayed, relayed + 1);
    assert_eq!(net.get(1).stats().unroutable, 0);
    assert_eq!(net.sync(3).records_applied, 1);
}

// -------------------------------------------------------------------------------------
// 5-7. Replication gaps
// -------------------------------------------------------------------------------------

/// Drops the first (not resent) copy of node 1's batch starting at `seq`.
fn drop_batch(seq: u64) -> DropRule {
    Box::new(move |from, _, env| {
        from == 1 && matches!(&env.body, Body::Replicate(b) if b.first_seq == seq && !b.resent)
    })
}

#[test]
fn a_lost_batch_is_asked_again_and_applied_in_order() {
    let mut net = synced_cluster(2, |_| {});
    net.drop_rule = Some(drop_batch(3));
    net.batch(1, 8, 2); // 1..=2
    net.step();
    net.batch(1, 8, 3); // 3..=5, lost
    net.step();
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 2)]);
    assert_eq!(net.get(2).stats().resend_requests, 0);
    net.batch(1, 8, 1); // 6: parked, gap 3..=5 asked again, resent, then 6 applied
    assert_eq!(
        net.log(2).applied,
        vec![(1, 1, 0, 2), (1, 3, 0, 3), (1, 6, 0, 1)]
    );
    let requests: Vec<_> = net
        .delivered
        .iter()
        .filter_map(|w| match w.env.body {
            Body::ResendRequest {
                incarnation,
                from,
                to,
            } => Some((w.from, incarnation, from, to)),
            _ => None,
        })
        .collect();
    assert_eq!(requests, vec![(2, incarnation(1), 3, 5)]);
    assert_eq!(
        net.dropped
            .iter()
            .filter(|w| is_replicate(&w.env.body))
            .count(),
        1
    );
    assert_eq!(net.get(2).stats().resend_requests, 1);
    assert_eq!(net.get(1).stats().batches_resent, 1);
    let s = net.sync(2);
    assert_eq!(
        (s.gaps_repaired, s.records_applied, s.state),
        (1, 6, SyncState::Synced)
    );
    let gap = net.events(2, "gap", 1);
    assert_eq!(gap.len(), 1);
    assert!(
        gap[0].reason.contains("missing records 3..=5"),
        "{}",
        gap[0].reason
    );

    // The stream goes on normally; no full sync was needed.
    net.batch(1, 8, 1);
    assert_eq!(net.log(2).applied.last(), Some(&(1, 7, 0, 1)));
    assert_eq!(net.log(2).snapshots.len(), 1);
    net.run_for(3000);
    assert_eq!(net.log(2).snapshots.len(), 1);
    assert_eq!(net.get(2).stats().resend_requests, 1);
}

#[test]
fn a_gap_the_origin_cannot_fill_turns_into_a_full_sync() {
    let mut net = synced_cluster(2, |c| c.replay_bytes = 10);
    let before = net.sync(2);
    net.drop_rule = Some(drop_batch(2));
    net.batch(1, 8, 1); // 1
    net.batch(1, 8, 1); // 2: lost; 1 leaves the replay buffer
    net.batch(1, 8, 1); // 3: parked; 2 asked again; only 3 is left to resend
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 1)]);
    let gaps = net.events(2, "gap", 1);
    assert_eq!(gaps.len(), 2);
    assert!(
        gaps[1].reason.contains("no longer holds records from 2"),
        "{}",
        gaps[1].reason
    );
    assert_eq!(net.get(1).stats().batches_resent, 0);
    assert_eq!(net.state(2), SyncState::Syncing);
    assert_eq!(net.log(2).snapshots.last(), Some(&(net.now, 1)));
    assert!(net.sync(2).last_result.contains("node 1 cannot resend"));

    // Snapshot in (20 ms later): synced again, resuming after the donor's watermark (3).
    let synced = net
        .run_until(200, |n| n.state(2) == SyncState::Synced)
        .expect("synced again");
    assert_eq!(net.sync(2).completed, before.completed + 1);
    assert!(net.events(2, "synced", 2).iter().any(|e| e.at == synced));
    net.batch(1, 8, 1); // 4
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 1), (1, 4, 0, 1)]);
    net.run_for(3000);
    assert_eq!(net.log(2).snapshots.len(), 2);
    assert_eq!(net.log(2).applied.len(), 2);
}

#[test]
fn a_lost_last_batch_is_noticed_through_the_origins_advertisement() {
    let mut net = synced_cluster(2, |_| {});
    let cfg = net.get(1).config().clone();
    net.run_for(500);
    net.drop_rule = Some(drop_batch(2));
    net.batch(1, 8, 1);
    net.step();
    net.batch(1, 8, 1); // lost, and nothing follows
    let t_lost = net.now;
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 1)]);

    let repaired = net
        .run_until(3000, |n| n.log(2).applied.len() == 2)
        .expect("repaired");
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 1), (1, 2, 0, 1)]);
    // The repair waits for node 1's next advertisement (`last_repl_seq` = 2) plus the
    // grace of three heartbeat intervals.
    let ad_at = net
        .delivered
        .iter()
        .find(|w| {
            w.from == 1
                && w.at >= t_lost
                && matches!(&w.env.body, Body::LinkState(ad) if ad.last_repl_seq == 2)
        })
        .map(|w| w.at)
        .expect("advertisement after the loss");
    let grace = 3 * cfg.heartbeat_interval;
    println!("last batch lost at {t_lost}, advertised at {ad_at}, repaired at {repaired}");
    assert_eq!(repaired, ad_at + grace);
    assert!(repaired - t_lost <= cfg.lsa_refresh + grace + STEP);
    let gap = net.events(2, "gap", 1);
    assert_eq!(gap.len(), 1);
    assert!(
        gap[0].reason.contains("missing records 2..=2"),
        "{}",
        gap[0].reason
    );
    let s = net.sync(2);
    assert_eq!(
        (s.gaps_repaired, s.records_applied, s.state),
        (1, 2, SyncState::Synced)
    );
    assert_eq!(net.get(2).stats().resend_requests, 1);
    net.run_for(3000);
    assert_eq!(net.get(2).stats().resend_requests, 1);
    assert_eq!(net.log(2).snapshots.len(), 1);
}

// -------------------------------------------------------------------------------------
// 8-9. Full sync
// -------------------------------------------------------------------------------------

#[test]
fn live_batches_wait_for_the_snapshot_and_resume_after_its_watermark() {
    let mut net = synced_cluster(3, |_| {});
    net.snapshot_delay = None; // answered by hand
    let applied_before = net.sync(3).records_applied;
    net.request_sync(3).expect("request_sync");
    net.settle();
    assert_eq!(net.state(3), SyncState::Syncing);
    let (_, donor) = *net.log(3).snapshots.last().unwrap();
    assert_eq!(donor, preferred_donor(3, &[1, 2]));
    assert_eq!(net.request_sync(3), Err("usrloc is already syncing".into()));

    net.batch(1, 8, 2); // 1..=2: in the donor's snapshot
    let watermarks = net.get(donor).watermarks();
    assert!(watermarks.contains(&Watermark {
        origin: NodeId(1),
        incarnation: incarnation(1),
        seq: 2
    }));
    net.batch(1, 8, 2); // 3..=4: after the snapshot began
    net.run_for(50);
    net.batch(1, 8, 1); // 5
    // Held for 2 s (an advertisement refresh and a gap timeout included): nothing applied.
    net.run_for(2000);
    assert!(net.log(3).applied.is_empty(), "{:?}", net.log(3).applied);
    assert_eq!(net.log(2).applied.len() + net.log(1).applied.len(), 3);
    assert_eq!(net.state(3), SyncState::Syncing);

    let dup = net.get(3).stats().duplicate_batches;
    let now = net.now;
    net.node(3).snapshot_done(
        now,
        USRLOC,
        NodeId(donor),
        SnapshotOutcome::Verified {
            watermarks,
            count: 2,
        },
    );
    net.settle();
    assert_eq!(net.state(3), SyncState::Synced);
    assert_eq!(net.log(3).applied, vec![(1, 3, 0, 2), (1, 5, 0, 1)]);
    assert!(net.get(3).stats().duplicate_batches > dup);
    let s = net.sync(3);
    assert_eq!((s.completed, s.records_applied), (2, applied_before + 3));
    assert!(
        s.last_result
            .contains(&format!("2 records from node {donor}"))
    );
    net.batch(1, 8, 1);
    assert_eq!(net.log(3).applied.last(), Some(&(1, 6, 0, 1)));
    net.run_for(3000);
    assert_eq!(net.log(3).applied.len(), 3);
    assert_eq!(net.log(3).snapshots.len(), 2);
}

#[test]
fn a_watermark_inside_a_buffered_batch_skips_its_applied_front() {
    let mut net = synced_cluster(2, |_| {});
    net.snapshot_delay = None;
    net.request_sync(2).expect("request_sync");
    net.settle();
    net.batch(1, 8, 2); // 1..=2
    net.batch(1, 8, 3); // 3..=5
    net.batch(1, 8, 1); // 6
    let now = net.now;
    // The donor's snapshot holds records up to 3.
    net.node(2).snapshot_done(
        now,
        USRLOC,
        NodeId(1),
        SnapshotOutcome::Verified {
            watermarks: vec![Watermark {
                origin: NodeId(1),
                incarnation: incarnation(1),
                seq: 3,
            }],
            count: 3,
        },
    );
    net.settle();
    assert_eq!(net.log(2).applied, vec![(1, 3, 1, 3), (1, 6, 0, 1)]);
    assert_eq!(net.sync(2).records_applied, 3);
}

#[test]
fn a_failed_sync_is_retried_with_the_other_donor() {
    let mut net = Net::cluster(3, |_| {});
    net.isolate(3);
    net.run_until(6000, |n| {
        n.state(1) == SyncState::Synced && n.state(2) == SyncState::Synced
    })
    .expect("1 and 2 synced");
    net.run_for(3000);
    // Alone and no seed: node 3 waits.
    assert_eq!(net.state(3), SyncState::NotSynced);
    assert!(net.log(3).snapshots.is_empty());

    let cfg = net.get(3).config().clone();
    net.snapshot_failures.push_back("stalled".into());
    net.rejoin(3);
    net.run_until(2000, |n| n.sync(3).failed == 1)
        .expect("first sync failed");
    let first = net.log(3).snapshots.clone();
    assert_eq!(first.len(), 1);
    let (t1, d1) = first[0];
    assert_eq!(d1, preferred_donor(3, &[1, 2]));
    let s = net.sync(3);
    assert_eq!(
        (s.state, s.failed, s.completed),
        (SyncState::NotSynced, 1, 0)
    );
    assert_eq!(s.last_result, format!("from node {d1}: stalled"));
    assert_eq!(net.events(3, "sync-failed", 3).len(), 1);
    let t_fail = net.now;
    assert_eq!(t_fail, t1 + 20);

    net.run_until(2000, |n| n.state(3) == SyncState::Synced)
        .expect("synced");
    let snaps = &net.log(3).snapshots;
    assert_eq!(snaps.len(), 2);
    let (t2, d2) = snaps[1];
    assert_ne!(d2, d1, "retried with the donor that failed");
    assert!([1, 2].contains(&d2));
    assert_eq!(t2, t_fail + cfg.sync_retry);
    let s = net.sync(3);
    assert_eq!(
        (s.state, s.failed, s.completed, s.donor),
        (SyncState::Synced, 1, 1, Some(NodeId(d2)))
    );
}

// -------------------------------------------------------------------------------------
// 10. Seed fallback
// -------------------------------------------------------------------------------------

#[test]
fn a_seed_without_reachable_members_declares_itself_synced_after_seed_fallback() {
    let mut net = Net::new();
    net.run_to(100);
    let mut seed = config(1);
    seed.me.seed = true;
    let fallback = seed.seed_fallback;
    net.add(seed, vec![info(2), info(3)]); // neither exists
    net.add(config(4), vec![info(5)]); // not a seed, same situation
    net.run_to(100 + fallback - STEP);
    assert_eq!(net.state(1), SyncState::NotSynced);
    assert_eq!(net.state(4), SyncState::NotSynced);
    net.step();
    assert_eq!(net.state(1), SyncState::Synced);
    let synced = net.events(1, "synced", 1);
    assert_eq!(synced.len(), 1);
    assert_eq!(synced[0].at, 100 + fallback);
    assert!(
        synced[0].reason.contains("seed: no donor within 3000 ms"),
        "{}",
        synced[0].reason
    );
    assert!(net.log(1).snapshots.is_empty());

    net.run_for(10_000);
    assert_eq!(net.state(4), SyncState::NotSynced);
    assert!(net.events(4, "synced", 4).is_empty());
    assert_eq!(net.view(1, 2).unwrap().state, "down");
}

// -------------------------------------------------------------------------------------
// 11-13. Membership and operator commands
// -------------------------------------------------------------------------------------

#[test]
fn a_node_joining_through_one_member_is_learned_by_all_and_syncs_from_a_donor() {
    let mut net = synced_cluster(2, |_| {});
    let mut cfg = config(3);
    cfg.joining = true;
    net.add(cfg, Vec::new());
    net.run_for(5000);
    // Told to join: knowing nobody does not make it a standalone node.
    assert_eq!(net.state(3), SyncState::NotSynced);
    let now = net.now;
    // Id conflicts are refused.
    assert!(net.node(2).on_join(now, info(2)).is_err());
    let mut impostor = info(1);
    impostor.peer_url = "http://10.9.9.9:50051".into();
    assert!(net.node(2).on_join(now, impostor).is_err());

    let members = net.node(2).on_join(now, info(3)).expect("join");
    let mut ids: Vec<u16> = members.iter().map(|m| m.id.0).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    net.node(3).on_join_reply(now, members);
    net.settle();
    assert!(net.log(2).connects.contains(&3));
    let mut c3 = net.log(3).connects.clone();
    c3.sort();
    assert_eq!(c3, vec![1, 2]);

    let t_join = net.now;
    net.run_until(3000, |n| n.fully_meshed() && n.all_synced())
        .expect("three nodes up and synced");
    println!(
        "joined node meshed and synced {} ms after the join",
        net.now - t_join
    );
    // Node 1 learned node 3 from node 2's flooded advertisement.
    assert!(net.log(1).connects.contains(&3));
    assert_eq!(net.events(1, "node-joined", 3).len(), 1);
    assert!(net.events(1, "node-joined", 3)[0].at > t_join);
    // Node 3 took the cluster's data from a donor.
    let s = net.sync(3);
    assert_eq!(s.completed, 1);
    assert!(matches!(s.donor, Some(NodeId(1 | 2))));
    assert_eq!(net.log(3).snapshots.len(), 1);
    // ... and replication reaches it.
    net.batch(1, 8, 1);
    assert_eq!(net.log(3).applied, vec![(1, 1, 0, 1)]);
}

#[test]
fn a_removed_node_is_forgotten_everywhere_and_may_come_back_restarted() {
    let mut net = synced_cluster(4, |_| {});
    let now = net.now;
    assert_eq!(
        net.node(1).remove_node(now, NodeId(1)),
        Err("cannot remove the local node: stop it, or disable it".into())
    );
    assert_eq!(
        net.node(1).remove_node(now, NodeId(9)),
        Err("node 9 is not a member".into())
    );
    net.node(1).remove_node(now, NodeId(3)).expect("remove");
    net.settle();
    for at in [1, 2, 4] {
        assert_eq!(net.log(at).disconnects, vec![3], "node {at}");
        assert!(net.view(at, 3).is_none(), "node {at} still lists node 3");
        assert_eq!(net.events(at, "node-removed", 3).len(), 1);
    }
    // Node 3 (still running, never told) keeps talking: ignored.
    let strangers: Vec<u64> = [1, 2, 4]
        .map(|id| net.get(id).stats().from_stranger)
        .to_vec();
    net.batch(3, 8, 1);
    net.run_for(1000);
    for (i, at) in [1, 2, 4].into_iter().enumerate() {
        assert!(
            net.get(at).stats().from_stranger > strangers[i],
            "node {at}"
        );
        assert!(
            net.log(at).applied.is_empty(),
            "node {at} applied {:?}",
            net.log(at).applied
        );
        assert!(net.view(at, 3).is_none());
    }
    assert_eq!(net.view(3, 1).unwrap().state, "down");

    // Restarted (newer incarnation), it joins through node 2 and is a member again.
    net.run_for(2000);
    let mut cfg = config(3);
    cfg.incarnation += 60_000;
    cfg.joining = true;
    let restarted = cfg.incarnation;
    net.add(cfg, Vec::new());
    let now = net.now;
    let members = net.node(2).on_join(now, info(3)).expect("join");
    net.node(3).on_join_reply(now, members);
    let t_join = net.now;
    net.run_until(5000, |n| n.fully_meshed() && n.all_synced())
        .expect("restarted node 3 back in the cluster");
    println!(
        "restarted node 3 meshed and synced {} ms after its join",
        net.now - t_join
    );
    assert_eq!(net.sync(3).completed, 1);
    assert_eq!(net.log(1).connects.iter().filter(|&&c| c == 3).count(), 2);

    // A removal of the old incarnation still in flight (an advertisement node 4 sent before
    // it heard of the restart; the harness has no latency, so it is replayed by hand) is
    // stale: node 1 keeps node 3.
    let mut ad = net.get(4).own_ad();
    ad.seq += 1;
    ad.removed = vec![Removal {
        id: NodeId(3),
        incarnation: incarnation(3),
    }];
    let stale = Envelope {
        src: NodeId(4),
        dst: FLOOD,
        hop: NodeId(4),
        ttl: MAX_TTL,
        body: Body::LinkState(Box::new(ad)),
    };
    let now = net.now;
    net.node(1).on_envelope(now, stale);
    net.settle();
    let strangers = net.get(1).stats().from_stranger;
    net.run_for(3000);
    assert!(net.fully_meshed());
    assert_eq!(net.get(1).stats().from_stranger, strangers);
    assert!(net.event_times(1, "link-down", 3, t_join).is_empty());
    assert_eq!(net.view(1, 3).unwrap().caps[0].state, SyncState::Synced);
    assert!(
        net.get(1)
            .topology()
            .iter()
            .any(|(id, _, _)| *id == NodeId(3))
    );
    net.batch(3, 8, 1);
    for at in [1, 2, 4] {
        assert_eq!(net.log(at).applied, vec![(3, 1, 0, 1)], "node {at}");
    }
    // Everyone holds the new incarnation's advertisement and no tombstone for it.
    for at in [1, 2, 4] {
        let m = net.get(at);
        let ad = m.peers[&NodeId(3)].lsa.as_ref().expect("advertisement");
        assert_eq!(ad.incarnation, restarted, "node {at}");
        assert!(!m.removed.contains_key(&NodeId(3)), "node {at}");
        assert!(m.own_ad().removed.is_empty(), "node {at}");
    }
}

/// The member a restarted node joined through may hear the old removal again (from a node
/// that has not seen the new incarnation yet) before the newcomer's first advertisement:
/// whatever the timing, the join holds.
#[test]
fn a_rejoin_holds_at_any_phase_of_the_advertisement_refresh() {
    for offset in (0..1000).step_by(50) {
        let mut net = synced_cluster(3, |_| {});
        let now = net.now;
        net.node(1).remove_node(now, NodeId(3)).expect("remove");
        net.settle();
        net.run_for(3000 + offset);
        let mut cfg = config(3);
        cfg.incarnation += 60_000;
        cfg.joining = true;
        net.add(cfg, Vec::new());
        let now = net.now;
        let members = net.node(2).on_join(now, info(3)).expect("join");
        net.node(3).on_join_reply(now, members);
        net.run_for(3000);
        assert!(
            net.fully_meshed() && net.all_synced(),
            "join {offset} ms into the refresh period"
        );
        assert_eq!(
            net.log(2).disconnects,
            vec![3],
            "join {offset} ms into the refresh period"
        );
    }
}

#[test]
fn a_disabled_node_is_listed_disabled_not_down_and_serves_no_snapshot() {
    let mut net = synced_cluster(3, |_| {});
    let off = preferred_donor(3, &[1, 2]);
    let other = 3 - off;
    let now = net.now;
    net.node(off).set_enabled(now, false);
    net.settle();
    assert!(!net.get(off).can_donate(USRLOC));
    assert_eq!(net.get(off).nodes()[0].state, "disabled");
    for at in (1..=3).filter(|&a| a != off) {
        assert_eq!(net.view(at, off).unwrap().state, "disabled", "at node {at}");
        assert_eq!(net.events(at, "node-disabled", off).len(), 1);
    }
    // Heartbeats go on: it never looks failed; replication still reaches it.
    net.run_for(2000);
    for at in (1..=3).filter(|&a| a != off) {
        assert_eq!(net.view(at, off).unwrap().state, "disabled");
        assert!(net.events(at, "node-down", off).is_empty());
    }
    net.batch(other, 8, 1);
    assert_eq!(net.log(off).applied, vec![(other, 1, 0, 1)]);

    // Node 3 would pick `off` by rendezvous hashing; it picks the other one.
    net.request_sync(3).expect("request_sync");
    net.settle();
    assert_eq!(net.log(3).snapshots.last().map(|s| s.1), Some(other));
    net.run_until(500, |n| n.state(3) == SyncState::Synced)
        .expect("synced");

    let now = net.now;
    net.node(off).set_enabled(now, true);
    net.settle();
    assert!(net.get(off).can_donate(USRLOC));
    for at in (1..=3).filter(|&a| a != off) {
        assert_eq!(net.view(at, off).unwrap().state, "up");
        assert_eq!(net.events(at, "node-enabled", off).len(), 1);
    }
    net.request_sync(3).expect("request_sync");
    net.settle();
    assert_eq!(net.log(3).snapshots.last().map(|s| s.1), Some(off));
}

// -------------------------------------------------------------------------------------
// 14. HA pair
// -------------------------------------------------------------------------------------

#[test]
fn ha_pair_mode_replicates_only_to_the_twin() {
    let mut net = synced_cluster(3, |c| {
        c.mode = ClusterMode::HaPair;
        if c.me.id == NodeId(2) {
            c.me.sip_addr = info(1).sip_addr;
        }
    });
    // Members were configured with their own addresses; advertisements corrected node 2's.
    assert_eq!(
        net.get(1).member(NodeId(2)).unwrap().sip_addr,
        "10.0.0.1:5060"
    );
    let since = net.now;
    net.batch(1, 8, 1);
    net.batch(1, 8, 2);
    assert_eq!(net.log(2).applied, vec![(1, 1, 0, 1), (1, 2, 0, 2)]);
    assert!(net.log(3).applied.is_empty());
    assert_eq!(net.count_delivered(1, 3, since, is_replicate), 0);
    assert_eq!(net.count_delivered(1, 2, since, is_replicate), 2);

    // Node 3 is no target: node 1's advertised `last_repl_seq` must not make it ask for
    // the batches it was never meant to get.
    net.run_for(3000);
    assert!(net.log(3).applied.is_empty(), "{:?}", net.log(3).applied);
    assert_eq!(net.get(3).stats().resend_requests, 0);
    // Without a twin node 3 shares data with no one: it never pulled a snapshot.
    assert!(
        net.log(3).snapshots.is_empty(),
        "{:?}",
        net.log(3).snapshots
    );
    assert_eq!(net.get(3).sync_state(Capability::Usrloc), SyncState::Synced);
    // Node 2 synced from its twin.
    assert!(
        net.log(2).snapshots.iter().all(|s| s.1 == 1),
        "{:?}",
        net.log(2).snapshots
    );
    // Node 3's own batches go nowhere (no twin).
    net.batch(3, 8, 1);
    assert!(net.log(1).applied.is_empty() && net.log(2).applied.len() == 2);
}

#[test]
fn a_member_never_heard_from_is_removed_until_a_process_started_later_joins() {
    let mut net = synced_cluster(2, |_| {});
    let now = net.now;
    // Node 9 is announced (a join through node 1) but never speaks.
    net.node(1).on_join(now, info(9)).expect("join");
    net.run_for(100);
    assert!(
        net.view(2, 9).is_some(),
        "node 2 learned node 9 from node 1"
    );
    let now = net.now;
    net.node(2).remove_node(now, NodeId(9)).expect("remove");
    net.run_for(100);
    assert!(net.view(1, 9).is_none() && net.view(2, 9).is_none());

    // A process with node 9's id that was already running at the removal stays out...
    let mut old = config(9);
    old.joining = true;
    net.add(old, vec![info(1)]);
    net.run_for(2000);
    assert!(net.view(1, 9).is_none(), "{:?}", net.view(1, 9));
    assert!(net.view(2, 9).is_none());

    // ...one started after it joins again (a removed node comes back only by joining).
    let mut newer = config(9);
    newer.incarnation = incarnation(2) + net.now + 60_000;
    newer.joining = true;
    net.add(newer, Vec::new());
    let now = net.now;
    let members = net.node(1).on_join(now, info(9)).expect("join");
    net.node(9).on_join_reply(now, members);
    net.run_until(5000, |n| n.view(1, 9).is_some_and(|v| v.state == "up"))
        .expect("a restarted node 9 is a member again");
}

#[test]
fn the_synced_event_gives_the_transfer_time() {
    let net = synced_cluster(3, |_| {});
    let ev: Vec<&Event> = net.events(2, "synced", 2);
    let last = ev.last().expect("node 2 synced");
    assert!(
        last.reason.contains(" records from node 1 in ")
            && last.reason.ends_with(" s, count and digest verified"),
        "{}",
        last.reason
    );
}

#[test]
fn a_node_that_recovered_its_store_asks_only_for_what_is_newer_then_for_everything() {
    let mut net = synced_cluster(2, |_| {});
    // Node 3 restarts with data up to version V recovered from its store.
    let v = (1_800_000_000_000u64 << 16) | 3;
    let mut cfg = config(3);
    cfg.joining = true;
    net.add(cfg, Vec::new());
    let now = net.now;
    net.node(3).set_resume_point(v);
    let members = net.node(1).on_join(now, info(3)).expect("join");
    net.node(3).on_join_reply(now, members);
    net.run_until(5000, Net::all_synced).expect("node 3 synced");
    assert_eq!(net.log(3).since, vec![v - version_span(10_000)]);
    assert!(
        net.events(3, "sync-started", 3)[0]
            .reason
            .contains("delta sync (versions after"),
        "{:?}",
        net.events(3, "sync-started", 3)
    );
    // Once synced, a later sync (here an operator's) asks for everything.
    net.request_sync(3).expect("request");
    net.run_until(5000, Net::all_synced).expect("synced again");
    assert_eq!(net.log(3).since, vec![v - version_span(10_000), 0]);
}

// ---------------------------------------------------------------------------------------
// Sharing tags and ownership
// ---------------------------------------------------------------------------------------

fn tag(net: &Net, at: u16, name: &str) -> TagView {
    net.get(at)
        .tags()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("node {at} does not know tag {name}"))
}

/// Whether node `at` acts for the tag once any hand-over under way has taken effect.
fn owns_tag(net: &Net, at: u16, name: &str) -> bool {
    let slot = tag(net, at, name).slot;
    let later = net.now + 10_000;
    net.get(at)
        .ownership()
        .is_some_and(|o| o.acts_on_at(slot, 0, later))
}

fn vip_cluster(n: u16, failover: Option<Millis>) -> Net {
    synced_cluster(n, |c| {
        let role = if c.me.id == NodeId(1) {
            TagRole::Active
        } else {
            TagRole::Backup
        };
        c.tags = vec![("vip".into(), role)];
        c.tag_failover = failover;
    })
}

#[test]
fn activation_moves_a_tag_and_the_holder_steps_down() {
    let mut net = vip_cluster(3, None);
    for at in 1..=3 {
        let t = tag(&net, at, "vip");
        assert_eq!((t.term, t.holder), (1, Some(NodeId(1))), "node {at}");
    }
    assert!(owns_tag(&net, 1, "vip") && !owns_tag(&net, 2, "vip"));
    let now = net.now;
    assert_eq!(net.node(2).activate_tag(now, "vip"), Ok(2));
    let t0 = net.now;
    net.run_until(1000, |n| {
        (1..=3).all(|at| tag(n, at, "vip").holder == Some(NodeId(2)))
    })
    .expect("everyone learns the new term");
    // One advertisement flood: same step (no heartbeat round needed).
    assert!(net.now - t0 <= 20, "took {} ms", net.now - t0);
    assert!(owns_tag(&net, 2, "vip") && !owns_tag(&net, 1, "vip") && !owns_tag(&net, 3, "vip"));
    let h: Vec<&TagTransition> = net.get(1).tag_history().collect();
    let last = h.last().unwrap();
    assert_eq!((last.became, last.term), ("backup", 2));
    assert_eq!(last.reason, "activated on node 2, term 2");
    // Persisted where it changed.
    assert!(
        net.log(1)
            .persisted_tags
            .contains(&("vip".into(), 2, Some(NodeId(2))))
    );
    // Activating again where it is active keeps the term; a bad name is refused.
    let now = net.now;
    assert_eq!(net.node(2).activate_tag(now, "vip"), Ok(2));
    assert!(net.node(2).activate_tag(now, "bad name").is_err());
}

/// The hand-over boundary: the activation takes effect `tag_handover` after it is made;
/// the old holder acts until then and not after, the new one from then on, so at every
/// instant exactly one node acts — whenever each of them heard of the change.
#[test]
fn an_activation_hands_over_at_a_boundary_both_nodes_agree_on() {
    let mut net = vip_cluster(3, None);
    let slot = tag(&net, 1, "vip").slot;
    let now = net.now;
    net.node(2).activate_tag(now, "vip").unwrap();
    let boundary = now + 200;
    assert_eq!(tag(&net, 2, "vip").window, Some((boundary, u64::MAX)));
    net.run_until(1000, |n| tag(n, 1, "vip").holder == Some(NodeId(2)))
        .unwrap();
    assert!(
        net.now < boundary,
        "the old holder heard before the boundary"
    );
    assert_eq!(tag(&net, 1, "vip").window, Some((0, boundary)));
    let acts = |net: &Net, at: u16, t: u64| {
        net.get(at)
            .ownership()
            .is_some_and(|o| o.acts_on_at(slot, 0, t))
    };
    for t in [
        now,
        boundary - 1,
        boundary,
        boundary + 1,
        boundary + 100_000,
    ] {
        let who: Vec<u16> = (1..=3).filter(|&n| acts(&net, n, t)).collect();
        assert_eq!(who, vec![if t < boundary { 1 } else { 2 }], "at {t}");
    }
    // Claims carry the boundary: a node that learns late still agrees on it.
    assert!((1..=3).all(|n| {
        net.get(n)
            .tags()
            .iter()
            .all(|t| t.name != "vip" || t.holder == Some(NodeId(2)))
    }));
}

#[test]
fn a_restarted_node_cannot_take_a_tag_back_with_an_old_term() {
    let mut net = vip_cluster(3, None);
    let now = net.now;
    net.node(2).activate_tag(now, "vip").unwrap();
    net.node(3).activate_tag(now + 1, "vip").unwrap();
    net.run_for(200);
    // Node 3 activated after node 2 heard term 2? Both claimed term 2 or node 3 term 3.
    let t = tag(&net, 1, "vip");
    let (term, holder) = (t.term, t.holder);
    assert!((1..=3).all(|at| tag(&net, at, "vip").holder == holder));
    // Node 1 restarts, configured active, remembering that it held the tag at term 1.
    let mut cfg = config(1);
    cfg.incarnation += 60_000;
    cfg.tags = vec![("vip".into(), TagRole::Active)];
    cfg.persisted_tags = vec![("vip".into(), 1, Some(NodeId(1)))];
    cfg.tag_failover = None;
    net.add(cfg, vec![info(2), info(3)]);
    net.run_for(2000);
    for at in 1..=3 {
        let t = tag(&net, at, "vip");
        assert_eq!((t.term, t.holder), (term, holder), "node {at}");
    }
    assert!(!owns_tag(&net, 1, "vip"));
}

#[test]
fn after_a_partition_heals_the_higher_term_wins_and_equal_terms_go_to_the_lower_id() {
    // Failover on: the side without the holder elects its own.
    let mut net = vip_cluster(3, Some(1000));
    net.isolate(1);
    let t_cut = net.now;
    net.run_until(3000, |n| tag(n, 2, "vip").holder == Some(NodeId(2)))
        .expect("node 2 (lowest reachable candidate) takes over");
    let took = net.now - t_cut;
    println!("failover after the holder was cut off: {took} ms");
    // Detection (about 0.5 s) plus tags.failover_ms (1 s).
    assert!(took <= 1700, "{took} ms");
    assert_eq!(tag(&net, 2, "vip").term, 2);
    // Node 1 alone still believes in term 1.
    assert!(owns_tag(&net, 1, "vip"));
    net.rejoin(1);
    net.run_until(3000, |n| tag(n, 1, "vip").holder == Some(NodeId(2)))
        .expect("node 1 hears term 2 and steps down");
    assert!(!owns_tag(&net, 1, "vip") && owns_tag(&net, 2, "vip"));
    let reason = &net.get(1).tag_history().last().unwrap().reason;
    assert_eq!(reason, "activated on node 2, term 2");

    // Without failover, an operator activates on both sides of a partition: same term.
    let mut net = vip_cluster(3, None);
    net.cut(1, 3);
    net.cut(2, 3);
    net.run_for(1000);
    let now = net.now;
    net.node(3).activate_tag(now, "vip").unwrap();
    net.node(2).activate_tag(now, "vip").unwrap();
    net.run_for(200);
    assert_eq!(tag(&net, 3, "vip").holder, Some(NodeId(3)));
    assert_eq!(tag(&net, 1, "vip").holder, Some(NodeId(2)));
    net.heal(1, 3);
    net.heal(2, 3);
    net.run_until(3000, |n| {
        (1..=3).all(|at| tag(n, at, "vip").holder == Some(NodeId(2)))
    })
    .expect("term 2 on both sides: the lower id, node 2, wins");
    assert!(!owns_tag(&net, 3, "vip") && owns_tag(&net, 2, "vip"));
}

fn buckets_of(net: &Net, at: u16) -> BTreeSet<usize> {
    let o = net.get(at).ownership().expect("published");
    (0..BUCKETS).filter(|b| o.bucket_mine(*b)).collect()
}

#[test]
fn buckets_are_split_by_rendezvous_and_only_a_leaving_nodes_share_moves() {
    let mut net = synced_cluster(3, |_| {});
    // Until each node has heard the others say "synced", it covers for them.
    net.run_until(2000, |n| {
        (1..=3).all(|at| buckets_of(n, at).len() < BUCKETS / 2)
    })
    .expect("split");
    let (b1, b2, b3) = (
        buckets_of(&net, 1),
        buckets_of(&net, 2),
        buckets_of(&net, 3),
    );
    assert_eq!(b1.len() + b2.len() + b3.len(), BUCKETS, "every bucket once");
    assert!(b1.is_disjoint(&b2) && b1.is_disjoint(&b3) && b2.is_disjoint(&b3));
    for b in [&b1, &b2, &b3] {
        assert!(
            (250..=430).contains(&b.len()),
            "about a third each: {}",
            b.len()
        );
    }
    // Every node acts on the default tag (untagged data), split by bucket.
    for at in 1..=3 {
        let o = net.get(at).ownership().unwrap();
        let later = net.now + 10_000;
        assert!(o.acts_on_at(
            DEFAULT_TAG_SLOT,
            *buckets_of(&net, at).first().unwrap(),
            later
        ));
    }
    // Node 3 leaves: its buckets go to 1 and 2, which keep all of theirs.
    net.isolate(3);
    net.run_until(2000, |n| {
        buckets_of(n, 1).len() + buckets_of(n, 2).len() == BUCKETS
    })
    .expect("redistributed");
    let (c1, c2) = (buckets_of(&net, 1), buckets_of(&net, 2));
    assert!(b1.is_subset(&c1) && b2.is_subset(&c2));
    assert_eq!(c1.union(&c2).count(), BUCKETS);
    assert!(c1.is_disjoint(&c2));
    // It comes back: exactly its old share returns to it.
    net.rejoin(3);
    net.run_until(3000, |n| buckets_of(n, 3) == b3 && buckets_of(n, 1) == b1)
        .expect("the same share comes back");
    // A disabled node acts on nothing; the others cover for it.
    let now = net.now;
    net.node(3).set_enabled(now, false);
    net.run_until(2000, |n| {
        buckets_of(n, 1).len() + buckets_of(n, 2).len() == BUCKETS
    })
    .expect("covered");
    assert!(!net.get(3).ownership().unwrap().tag_active(DEFAULT_TAG_SLOT));
}

/// A node that joins and becomes synced takes its share of the buckets at a boundary it
/// announces ahead: before it the others keep acting on them, from it on the newcomer
/// does, so at every instant each bucket is acted on by exactly one node.
#[test]
fn a_joining_node_takes_its_buckets_at_a_boundary_without_gap_or_overlap() {
    let mut net = synced_cluster(3, |_| {});
    net.run_until(2000, |n| {
        (1..=3).all(|at| buckets_of(n, at).len() < BUCKETS / 2)
    })
    .expect("split");
    let t_join = net.now;
    let mut cfg = config(4);
    cfg.joining = true;
    net.add(cfg, Vec::new());
    let members = net.node(1).on_join(t_join, info(4)).expect("join");
    net.node(4).on_join_reply(t_join, members);
    net.run_until(5000, |n| {
        (1..=4).all(|at| n.get(at).ownership().is_some_and(|o| o.buckets_from > 0))
            && buckets_of(n, 4).len() > 150
    })
    .expect("node 4 announced its boundary to everyone");
    let boundary = net.get(4).ownership().unwrap().buckets_from;
    assert!(
        (1..=3).all(|at| net.get(at).ownership().unwrap().buckets_from == boundary),
        "every node hands over at the same instant"
    );
    assert!(net.now < boundary, "heard before the boundary");
    let acts = |net: &Net, at: u16, b: usize, t: u64| {
        net.get(at)
            .ownership()
            .is_some_and(|o| o.acts_on_at(DEFAULT_TAG_SLOT, b, t))
    };
    for t in (boundary - 50..boundary + 50).chain([t_join, boundary + 100_000]) {
        for b in 0..BUCKETS {
            let n = (1..=4).filter(|&at| acts(&net, at, b, t)).count();
            assert_eq!(n, 1, "bucket {b} at {t} (boundary {boundary})");
        }
    }
    // Before the boundary node 4 acts on nothing; after it on about a quarter.
    assert!((0..BUCKETS).all(|b| !acts(&net, 4, b, boundary - 1)));
    let mine = (0..BUCKETS).filter(|&b| acts(&net, 4, b, boundary)).count();
    assert!((180..=340).contains(&mine), "{mine}");
}
