//! Validated domain types of the cluster mesh. Protobuf messages are converted into these
//! once, at the edge (`crate::grpc::convert`); everything behind the edge trusts them.

use std::fmt;

use bytes::Bytes;
use sipmesh_cluster::NodeId;

/// Milliseconds of the mesh's clock (monotonic in the driver, virtual in tests).
pub type Millis = u64;

/// Identity and addresses of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node id (never 0).
    pub id: NodeId,
    /// gRPC URL peers use (`http://IP:PORT`).
    pub peer_url: String,
    /// SIP address (`IP:PORT`); nodes with equal `sip_addr` are HA twins.
    pub sip_addr: String,
    /// May declare itself synced when no donor is reachable.
    pub seed: bool,
    /// Tie-breaker in cold-start elections (higher wins).
    pub priority: u32,
}

/// A replicated data class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// User location (registrations).
    Usrloc,
}

impl Capability {
    /// Every capability this build replicates. Dialogs and presence join the list when
    /// their tables exist.
    pub const ALL: [Capability; 1] = [Capability::Usrloc];

    /// Wire and operator name.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Usrloc => "usrloc",
        }
    }

    /// Parses a wire or operator name.
    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Sync state of one capability on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Holds no verified copy of the cluster's data.
    NotSynced,
    /// A full sync is running.
    Syncing,
    /// Holds the data and may serve as a donor.
    Synced,
}

impl SyncState {
    /// Operator name.
    pub fn name(self) -> &'static str {
        match self {
            SyncState::NotSynced => "not-synced",
            SyncState::Syncing => "syncing",
            SyncState::Synced => "synced",
        }
    }
}

/// One capability as a node advertises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapAdvert {
    /// Which data class.
    pub cap: Capability,
    /// Its sync state on the advertising node.
    pub state: SyncState,
    /// Newest object version the node holds (cold-start election).
    pub newest_version: u64,
}

/// A removed member: advertisements of `id` with an incarnation up to `incarnation` are
/// ignored; a restarted process (newer incarnation) may join again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removal {
    /// The removed node.
    pub id: NodeId,
    /// Its incarnation when it was removed.
    pub incarnation: u64,
}

/// A link-state advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStateAd {
    /// The advertising node.
    pub node: NodeInfo,
    /// Its start time (unix ms): orders advertisements across restarts.
    pub incarnation: u64,
    /// Per-incarnation sequence number.
    pub seq: u64,
    /// Peers whose heartbeats it sees answered.
    pub up_links: Vec<NodeId>,
    /// Taken out by an operator.
    pub disabled: bool,
    /// Its capabilities.
    pub caps: Vec<CapAdvert>,
    /// Members it knows.
    pub known: Vec<NodeInfo>,
    /// Members removed cluster-wide.
    pub removed: Vec<Removal>,
    /// Last replication sequence number it sent (gap detection when traffic stops).
    pub last_repl_seq: u64,
    /// What it knows of every sharing tag.
    pub tags: Vec<super::tags::TagClaim>,
    /// Wall-clock ms from which it acts on its share of the partition buckets (a node that
    /// becomes synced announces a moment just ahead, so that the others hand its buckets
    /// over at that boundary); 0 while it does not act.
    pub acting_since: u64,
}

/// A batch of change records from one origin, sequence numbers
/// `first_seq .. first_seq + count`. `records` holds `count` frames, each a `u32` LE length
/// and the bincode encoding of a `ChangeRecord` (the change ring's frame format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Node that made the changes.
    pub origin: NodeId,
    /// The origin's incarnation.
    pub incarnation: u64,
    /// Sequence number of the first record.
    pub first_seq: u64,
    /// Number of records.
    pub count: u32,
    /// The framed records.
    pub records: Bytes,
    /// Sent again in answer to a resend request.
    pub resent: bool,
}

impl Batch {
    /// Sequence number after the last record.
    pub fn end_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }
}

/// What an envelope carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Heartbeat.
    Ping(u64),
    /// Heartbeat answer.
    Pong(u64),
    /// Link-state advertisement (flooded).
    LinkState(Box<LinkStateAd>),
    /// Change records.
    Replicate(Batch),
    /// Ask the origin to send `from ..= to` again.
    ResendRequest {
        /// Origin incarnation the range belongs to.
        incarnation: u64,
        /// First missing sequence number.
        from: u64,
        /// Last missing sequence number.
        to: u64,
    },
    /// The origin no longer holds records from `from`: full sync needed.
    ResendUnavailable {
        /// Origin incarnation.
        incarnation: u64,
        /// First record requested.
        from: u64,
    },
}

impl Body {
    /// Short name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Ping(_) => "ping",
            Body::Pong(_) => "pong",
            Body::LinkState(_) => "link-state",
            Body::Replicate(_) => "replicate",
            Body::ResendRequest { .. } => "resend-request",
            Body::ResendUnavailable { .. } => "resend-unavailable",
        }
    }
}

/// Destination meaning "every node" (flooded link-state advertisements).
pub const FLOOD: NodeId = NodeId(0);

/// Hop limit of envelopes a node originates.
pub const MAX_TTL: u8 = 16;

/// One message between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Originating node.
    pub src: NodeId,
    /// Final destination ([`FLOOD`] for advertisements).
    pub dst: NodeId,
    /// Node that put it on this link.
    pub hop: NodeId,
    /// Hops left.
    pub ttl: u8,
    /// Content.
    pub body: Body,
}

/// Something the operator or the tests should know about, kept in a bounded history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Mesh clock when it happened.
    pub at: Millis,
    /// Node concerned.
    pub node: NodeId,
    /// `node-up`, `node-down`, `link-up`, `link-down`, `node-joined`, `node-removed`,
    /// `node-disabled`, `node-enabled`, `sync-started`, `synced`, `sync-failed`, `gap`.
    pub kind: &'static str,
    /// Human-readable reason.
    pub reason: String,
}

/// Where a donor's realtime stream stood when its snapshot began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    /// Origin node.
    pub origin: NodeId,
    /// Its incarnation.
    pub incarnation: u64,
    /// Last record of that origin the donor had applied.
    pub seq: u64,
}

/// Result of a snapshot transfer, as reported by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Received and verified (count and digest agree with the donor's).
    Verified {
        /// The donor's realtime position at the start.
        watermarks: Vec<Watermark>,
        /// Records received.
        count: u64,
    },
    /// Failed: stalled, disconnected, or did not verify.
    Failed(String),
}
