//! The node's configuration: a TOML file (or the embedded defaults), validated once into
//! typed values. Every error names the field it is about.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::mesh::ClusterMode;
use crate::mesh::tags::{TagRole, check_tag_name};
use crate::store::persist::Durability;
use sipmesh_cluster::keepalive::PingMethod;
use sipmesh_dataplane::io::{Backend, IoConfig};
use sipmesh_dataplane::registrar::{KeepaliveMode, MaxContactsPolicy, RegistrarConfig, TagRules};

/// The embedded defaults: what `sipd` runs with when given no file.
pub const DEFAULT_TOML: &str = include_str!("../sipd.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node: NodeSection,
    tags: TagsSection,
    grpc: GrpcSection,
    cluster: ClusterSection,
    listen: ListenSection,
    workers: WorkersSection,
    sip: SipSection,
    tcp: TcpSection,
    registrar: RegistrarSection,
    proxy: ProxySection,
    dialog: DialogSection,
    presence: PresenceSection,
    cdr: CdrSection,
    nat: NatSection,
    store: StoreSection,
    usrloc: UsrlocSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    enabled: bool,
    data_dir: String,
    durability: String,
    flush_ms: u64,
    wal_sync_ms: u64,
    async_max_unwritten: u64,
    park_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    id: u16,
    cluster: u32,
    peer_url: String,
    sip_addr: String,
    seed: bool,
    priority: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsSection {
    list: Vec<String>,
    failover_ms: u64,
    segment: String,
    handover_ms: u64,
    header: String,
    listeners: Vec<String>,
    domains: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxySection {
    enabled: bool,
    record_route: bool,
    forking: String,
    t1_ms: u64,
    t2_ms: u64,
    t4_ms: u64,
    timer_c_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DialogSection {
    lifetime_s: u64,
    ping_interval_s: u64,
    profiles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceSection {
    enabled: bool,
    min_expires: u32,
    max_expires: u32,
    default_expires: u32,
    max_watchers: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CdrSection {
    enabled: bool,
    path: String,
    rotate_bytes: u64,
    rotate_s: u64,
}

/// The stateful proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub enabled: bool,
    pub record_route: bool,
    pub timers: sipmesh_dataplane::txn::TimerConfig,
    /// Lifetime limit of a call.
    pub dialog_lifetime_ms: u64,
    /// In-dialog ping period (0: none).
    pub dialog_ping_ms: u64,
    /// Dialog profiles: (name, what they count by).
    pub profiles: Vec<(String, sipmesh_cluster::dialog::ProfileKey)>,
    /// Contacts tried by q, one set at a time.
    pub serial_forking: bool,
}

/// Call detail records.
#[derive(Debug, Clone)]
pub struct CdrConfig {
    pub enabled: bool,
    pub path: std::path::PathBuf,
    pub rotate_bytes: u64,
    pub rotate_s: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NatSection {
    keepalive: String,
    ping_enabled: bool,
    ping_method: String,
    ping_interval_ms: u64,
    ping_max_misses: u32,
    max_tracked: usize,
}

/// NAT keepalive settings.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Runtime-changeable pinging settings.
    pub ping: sipmesh_cluster::keepalive::Settings,
    /// Contacts whose answers are tracked at most.
    pub max_tracked: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcSection {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberEntry {
    id: u16,
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    nodes: Vec<MemberEntry>,
    join: Vec<String>,
    mode: String,
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    heartbeat_retries: u32,
    link_up_after: u32,
    link_state_refresh_ms: u64,
    seed_fallback_ms: u64,
    gap_timeout_ms: u64,
    sync_timeout_ms: u64,
    resume_margin_ms: u64,
    expiry_sweep_s: u64,
    expiry_grace_s: u32,
    replay_buffer_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenSection {
    udp: Vec<String>,
    tcp: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkersSection {
    count: usize,
    pin: bool,
    backend: String,
    tick_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SipSection {
    max_message_size: usize,
    server_header: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSection {
    max_connections: usize,
    idle_timeout_s: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistrarSection {
    default_expires: u32,
    min_expires: u32,
    max_expires: u32,
    max_contacts: usize,
    max_contacts_policy: String,
    domains: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsrlocSection {
    initial_capacity: usize,
    change_ring_bytes: usize,
}

/// A configuration error, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "configuration: {}", self.message)
        } else {
            write!(f, "configuration field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The cluster settings of one node.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub cluster_id: u32,
    pub grpc_listen: SocketAddr,
    /// Empty: derived from `grpc_listen` ([`Config::peer_url`]).
    pub peer_url: String,
    /// Empty: the first UDP listen address ([`Config::sip_addr`]).
    pub sip_addr: String,
    pub seed: bool,
    pub priority: u32,
    /// Members known at start: (node id, URL).
    pub members: Vec<(u16, String)>,
    /// URLs to join through at start.
    pub join: Vec<String>,
    pub mode: ClusterMode,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub heartbeat_retries: u32,
    pub link_up_after: u32,
    pub link_state_refresh_ms: u64,
    pub seed_fallback_ms: u64,
    pub gap_timeout_ms: u64,
    pub sync_timeout_ms: u64,
    pub resume_margin_ms: u64,
    pub expiry_sweep_s: u64,
    pub expiry_grace_s: u32,
    pub replay_buffer_bytes: usize,
    /// Sharing tags configured here.
    pub tags: Vec<(String, TagRole)>,
    /// 0: no automatic failover.
    pub tag_failover_ms: u64,
    /// Ownership segment path ("" = the default under /dev/shm).
    pub segment: String,
    /// Delay between a tag activation and the moment it takes effect.
    pub tag_handover_ms: u64,
}

/// Parses `name=active|backup`.
pub fn parse_tag(s: &str) -> Result<(String, TagRole), String> {
    let Some((name, role)) = s.split_once('=') else {
        return Err(format!("`{s}` is not NAME=active|backup"));
    };
    let name = name.split('/').next().unwrap_or(name);
    check_tag_name(name)?;
    let role = match role {
        "active" => TagRole::Active,
        "backup" => TagRole::Backup,
        other => return Err(format!("`{other}` is not active or backup")),
    };
    Ok((name.to_string(), role))
}

/// Checks a peer URL: `http://HOST:PORT` with an explicit port.
pub fn check_peer_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("`{url}` does not start with http://"));
    };
    let rest = rest.trim_end_matches('/');
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("`{url}` has no port"));
    };
    if host.is_empty() || host.contains('/') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("`{url}` is not http://HOST:PORT"));
    }
    Ok(())
}

/// Restart persistence.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub enabled: bool,
    pub data_dir: std::path::PathBuf,
    pub durability: Durability,
    pub flush_ms: u64,
    pub wal_sync_ms: u64,
    pub async_max_unwritten: u64,
    pub park_bytes: usize,
}

/// The validated configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub nat: NatConfig,
    pub proxy: ProxySettings,
    /// The presence server (None: off; PUBLISH and SUBSCRIBE are routed).
    pub presence: Option<sipmesh_dataplane::presence::PresenceConfig>,
    pub cdr: CdrConfig,
    pub node_id: u16,
    pub cluster: ClusterConfig,
    pub io: IoConfig,
    pub server_header: String,
    pub registrar: RegistrarConfig,
    pub usrloc_capacity: usize,
    pub change_ring_bytes: usize,
}

/// Merge `overlay` onto `base` table by table, so a file need only name what it changes.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn addrs(field: &str, v: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<SocketAddr>().map_err(|e| {
                err(
                    &format!("{field}[{i}]"),
                    format!("`{s}` is not an IP:port address ({e})"),
                )
            })
        })
        .collect()
}

impl Config {
    /// The URL peers reach this node at.
    pub fn peer_url(&self) -> String {
        if self.cluster.peer_url.is_empty() {
            format!("http://{}", self.cluster.grpc_listen)
        } else {
            self.cluster.peer_url.clone()
        }
    }

    /// The ownership segment's file.
    pub fn segment_path(&self) -> std::path::PathBuf {
        if self.cluster.segment.is_empty() {
            format!(
                "/dev/shm/sipmesh-c{}-n{}.own",
                self.cluster.cluster_id, self.node_id
            )
            .into()
        } else {
            self.cluster.segment.clone().into()
        }
    }

    /// The SIP address advertised to peers.
    pub fn sip_addr(&self) -> String {
        if !self.cluster.sip_addr.is_empty() {
            return self.cluster.sip_addr.clone();
        }
        self.io
            .udp
            .first()
            .or(self.io.tcp.first())
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// The embedded defaults.
    pub fn defaults() -> Config {
        Config::from_toml("").expect("embedded defaults are valid")
    }

    /// Parse a configuration file's text: the embedded defaults overlaid with it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut base: toml::Table = DEFAULT_TOML
            .parse()
            .map_err(|e| err("", format!("embedded defaults: {e}")))?;
        let overlay: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err("", e.to_string()))?;
        merge(&mut base, overlay);
        let f: FileConfig = FileConfig::deserialize(base).map_err(|e| {
            // The toml error names the unknown or mistyped key.
            err("", e.to_string().trim_end().to_string())
        })?;
        Config::validate(f)
    }

    fn validate(f: FileConfig) -> Result<Config, ConfigError> {
        if f.node.id == 0 {
            return Err(err("node.id", "must be between 1 and 65535"));
        }
        let c = &f.cluster;
        let grpc_listen = f.grpc.listen.parse::<SocketAddr>().map_err(|e| {
            err(
                "grpc.listen",
                format!("`{}` is not an IP:port address ({e})", f.grpc.listen),
            )
        })?;
        if !f.node.peer_url.is_empty() {
            check_peer_url(&f.node.peer_url).map_err(|m| err("node.peer_url", m))?;
        }
        if !f.node.sip_addr.is_empty() && f.node.sip_addr.parse::<SocketAddr>().is_err() {
            return Err(err(
                "node.sip_addr",
                format!("`{}` is not an IP:port address", f.node.sip_addr),
            ));
        }
        let mut members = Vec::new();
        for (i, m) in c.nodes.iter().enumerate() {
            if m.id == 0 {
                return Err(err(
                    &format!("cluster.nodes[{i}].id"),
                    "must be between 1 and 65535",
                ));
            }
            check_peer_url(&m.url).map_err(|e| err(&format!("cluster.nodes[{i}].url"), e))?;
            members.push((m.id, m.url.clone()));
        }
        for (i, u) in c.join.iter().enumerate() {
            check_peer_url(u).map_err(|e| err(&format!("cluster.join[{i}]"), e))?;
        }
        let mode = match c.mode.as_str() {
            "full-sharing" => ClusterMode::FullSharing,
            "ha-pair" => ClusterMode::HaPair,
            other => {
                return Err(err(
                    "cluster.mode",
                    format!("`{other}` is not one of full-sharing, ha-pair"),
                ));
            }
        };
        for (field, v, lo, hi) in [
            (
                "cluster.heartbeat_interval_ms",
                c.heartbeat_interval_ms,
                10,
                60_000,
            ),
            (
                "cluster.heartbeat_timeout_ms",
                c.heartbeat_timeout_ms,
                10,
                60_000,
            ),
            (
                "cluster.heartbeat_retries",
                u64::from(c.heartbeat_retries),
                1,
                100,
            ),
            ("cluster.link_up_after", u64::from(c.link_up_after), 1, 100),
            (
                "cluster.link_state_refresh_ms",
                c.link_state_refresh_ms,
                50,
                600_000,
            ),
            ("cluster.seed_fallback_ms", c.seed_fallback_ms, 0, 3_600_000),
            ("cluster.gap_timeout_ms", c.gap_timeout_ms, 10, 600_000),
            ("cluster.sync_timeout_ms", c.sync_timeout_ms, 100, 600_000),
            (
                "cluster.resume_margin_ms",
                c.resume_margin_ms,
                0,
                86_400_000,
            ),
            ("cluster.expiry_sweep_s", c.expiry_sweep_s, 1, 86_400),
            (
                "cluster.expiry_grace_s",
                u64::from(c.expiry_grace_s),
                0,
                86_400,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(err(field, format!("{v} is outside {lo}..={hi}")));
            }
        }
        if c.replay_buffer_bytes < 1 << 16 {
            return Err(err("cluster.replay_buffer_bytes", "must be at least 65536"));
        }
        let mut tags: Vec<(String, TagRole)> = Vec::new();
        for (i, t) in f.tags.list.iter().enumerate() {
            let (name, role) = parse_tag(t).map_err(|e| err(&format!("tags.list[{i}]"), e))?;
            if tags.iter().any(|(n, _)| *n == name) {
                return Err(err(
                    &format!("tags.list[{i}]"),
                    format!("tag `{name}` is listed twice"),
                ));
            }
            tags.push((name, role));
        }
        if f.tags.failover_ms > 3_600_000 {
            return Err(err("tags.failover_ms", "must be at most 3600000"));
        }
        if f.tags.handover_ms > 60_000 {
            return Err(err("tags.handover_ms", "must be at most 60000"));
        }
        let rule = |field: &str, i: usize, v: &str| -> Result<(String, String), ConfigError> {
            let f = format!("{field}[{i}]");
            let (k, t) = v
                .rsplit_once('=')
                .ok_or_else(|| err(&f, format!("`{v}` is not KEY=tag")))?;
            check_tag_name(t).map_err(|e| err(&f, e))?;
            Ok((k.to_string(), t.to_string()))
        };
        let mut tag_listeners = Vec::new();
        for (i, v) in f.tags.listeners.iter().enumerate() {
            let (a, t) = rule("tags.listeners", i, v)?;
            let a = a.parse::<SocketAddr>().map_err(|e| {
                err(
                    &format!("tags.listeners[{i}]"),
                    format!("`{a}` is not an IP:port address ({e})"),
                )
            })?;
            tag_listeners.push((a, t));
        }
        let mut tag_domains = Vec::new();
        for (i, v) in f.tags.domains.iter().enumerate() {
            let (d, t) = rule("tags.domains", i, v)?;
            tag_domains.push((d.to_ascii_lowercase(), t));
        }
        let tag_header = f.tags.header.trim();
        if !tag_header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b))
        {
            return Err(err(
                "tags.header",
                format!("`{tag_header}` is not a header name"),
            ));
        }
        let tagging = TagRules {
            header: (!tag_header.is_empty()).then(|| tag_header.to_string()),
            listeners: tag_listeners,
            domains: tag_domains,
        };
        let n = &f.nat;
        let keepalive = match n.keepalive.as_str() {
            "off" => KeepaliveMode::Off,
            "nated" => KeepaliveMode::Nated,
            "all" => KeepaliveMode::All,
            other => {
                return Err(err(
                    "nat.keepalive",
                    format!("`{other}` is not one of off, nated, all"),
                ));
            }
        };
        let Some(method) = PingMethod::parse(&n.ping_method) else {
            return Err(err(
                "nat.ping_method",
                format!("`{}` is not one of options, crlf", n.ping_method),
            ));
        };
        if !(100..=3_600_000).contains(&n.ping_interval_ms) {
            return Err(err(
                "nat.ping_interval_ms",
                "must be between 100 and 3600000",
            ));
        }
        if n.max_tracked > 100_000_000 {
            return Err(err("nat.max_tracked", "must be at most 100000000"));
        }
        let nat = NatConfig {
            ping: sipmesh_cluster::keepalive::Settings {
                enabled: n.ping_enabled,
                method,
                interval_ms: n.ping_interval_ms,
                max_misses: n.ping_max_misses,
            },
            max_tracked: n.max_tracked,
        };
        let cluster = ClusterConfig {
            tags,
            tag_failover_ms: f.tags.failover_ms,
            tag_handover_ms: f.tags.handover_ms,
            segment: f.tags.segment.clone(),
            cluster_id: f.node.cluster,
            grpc_listen,
            peer_url: f.node.peer_url.clone(),
            sip_addr: f.node.sip_addr.clone(),
            seed: f.node.seed,
            priority: f.node.priority,
            members,
            join: c.join.clone(),
            mode,
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_timeout_ms: c.heartbeat_timeout_ms,
            heartbeat_retries: c.heartbeat_retries,
            link_up_after: c.link_up_after,
            link_state_refresh_ms: c.link_state_refresh_ms,
            seed_fallback_ms: c.seed_fallback_ms,
            gap_timeout_ms: c.gap_timeout_ms,
            sync_timeout_ms: c.sync_timeout_ms,
            resume_margin_ms: c.resume_margin_ms,
            expiry_sweep_s: c.expiry_sweep_s,
            expiry_grace_s: c.expiry_grace_s,
            replay_buffer_bytes: c.replay_buffer_bytes,
        };
        let st = &f.store;
        if st.enabled && st.data_dir.is_empty() {
            return Err(err(
                "store.data_dir",
                "must name a directory when the store is enabled",
            ));
        }
        let Some(durability) = Durability::parse(&st.durability) else {
            return Err(err(
                "store.durability",
                format!("`{}` is not one of async, sync", st.durability),
            ));
        };
        if !(1..=1000).contains(&st.flush_ms) {
            return Err(err("store.flush_ms", "must be between 1 and 1000"));
        }
        if !(1..=60_000).contains(&st.wal_sync_ms) {
            return Err(err("store.wal_sync_ms", "must be between 1 and 60000"));
        }
        if st.async_max_unwritten == 0 {
            return Err(err(
                "store.async_max_unwritten",
                "must be at least 1 (durability = \"sync\" waits for every record)",
            ));
        }
        if st.park_bytes < f.sip.max_message_size {
            return Err(err(
                "store.park_bytes",
                format!(
                    "must hold at least one message of sip.max_message_size ({})",
                    f.sip.max_message_size
                ),
            ));
        }
        let store = StoreConfig {
            enabled: st.enabled,
            data_dir: st.data_dir.clone().into(),
            durability,
            flush_ms: st.flush_ms,
            wal_sync_ms: st.wal_sync_ms,
            async_max_unwritten: st.async_max_unwritten,
            park_bytes: st.park_bytes,
        };
        let udp = addrs("listen.udp", &f.listen.udp)?;
        let tcp = addrs("listen.tcp", &f.listen.tcp)?;
        if udp.is_empty() && tcp.is_empty() {
            return Err(err("listen", "at least one UDP or TCP address is needed"));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = if f.workers.count == 0 {
            cores
        } else {
            f.workers.count
        };
        if workers > 1024 {
            return Err(err("workers.count", format!("{workers} is more than 1024")));
        }
        let backend = match f.workers.backend.as_str() {
            "auto" => Backend::Auto,
            "io_uring" | "io-uring" => Backend::IoUring,
            "epoll" => Backend::Epoll,
            other => {
                return Err(err(
                    "workers.backend",
                    format!("`{other}` is not one of auto, io_uring, epoll"),
                ));
            }
        };
        if !(1..=1000).contains(&f.workers.tick_ms) {
            return Err(err("workers.tick_ms", "must be between 1 and 1000"));
        }
        if !(1500..=65_535).contains(&f.sip.max_message_size) {
            return Err(err(
                "sip.max_message_size",
                "must be between 1500 and 65535 octets",
            ));
        }
        if f.tcp.max_connections == 0 {
            return Err(err("tcp.max_connections", "must be at least 1"));
        }
        if f.tcp.idle_timeout_s == 0 {
            return Err(err("tcp.idle_timeout_s", "must be at least 1"));
        }
        let r = &f.registrar;
        if r.min_expires == 0 {
            return Err(err("registrar.min_expires", "must be at least 1"));
        }
        if r.min_expires > r.max_expires {
            return Err(err(
                "registrar.min_expires",
                format!(
                    "{} exceeds registrar.max_expires ({})",
                    r.min_expires, r.max_expires
                ),
            ));
        }
        if r.default_expires < r.min_expires || r.default_expires > r.max_expires {
            return Err(err(
                "registrar.default_expires",
                format!(
                    "{} is outside [min_expires, max_expires] = [{}, {}]",
                    r.default_expires, r.min_expires, r.max_expires
                ),
            ));
        }
        if r.max_contacts == 0 || r.max_contacts > 1000 {
            return Err(err("registrar.max_contacts", "must be between 1 and 1000"));
        }
        let policy = match r.max_contacts_policy.as_str() {
            "reject" => MaxContactsPolicy::Reject,
            "replace-oldest" => MaxContactsPolicy::ReplaceOldest,
            other => {
                return Err(err(
                    "registrar.max_contacts_policy",
                    format!("`{other}` is not one of reject, replace-oldest"),
                ));
            }
        };
        for (i, d) in r.domains.iter().enumerate() {
            if d.is_empty()
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(err(
                    &format!("registrar.domains[{i}]"),
                    format!("`{d}` is not a host name"),
                ));
            }
        }
        if f.usrloc.change_ring_bytes < 1 << 16 {
            return Err(err("usrloc.change_ring_bytes", "must be at least 65536"));
        }
        if f.sip.server_header.bytes().any(|b| b < b' ' || b == 0x7f) {
            return Err(err(
                "sip.server_header",
                "must not contain control characters",
            ));
        }
        let p = &f.proxy;
        if !(1..=10_000).contains(&p.t1_ms) {
            return Err(err("proxy.t1_ms", "must be between 1 and 10000"));
        }
        if p.t2_ms < p.t1_ms || p.t2_ms > 60_000 {
            return Err(err(
                "proxy.t2_ms",
                "must be at least proxy.t1_ms and at most 60000",
            ));
        }
        if !(1..=60_000).contains(&p.t4_ms) {
            return Err(err("proxy.t4_ms", "must be between 1 and 60000"));
        }
        // RFC 3261 §16.6 step 11: timer C is more than 3 minutes.
        if !(180_001..=3_600_000).contains(&p.timer_c_ms) {
            return Err(err(
                "proxy.timer_c_ms",
                "must be more than 180000 (RFC 3261 §16.6) and at most 3600000",
            ));
        }
        if !(1..=604_800).contains(&f.dialog.lifetime_s) {
            return Err(err("dialog.lifetime_s", "must be between 1 and 604800"));
        }
        let c = &f.cdr;
        if c.enabled && c.path.is_empty() {
            return Err(err("cdr.path", "must name a file when CDRs are enabled"));
        }
        if c.rotate_bytes < 4096 {
            return Err(err("cdr.rotate_bytes", "must be at least 4096"));
        }
        if c.rotate_s == 0 {
            return Err(err("cdr.rotate_s", "must be at least 1"));
        }
        let cdr = CdrConfig {
            enabled: c.enabled,
            path: c.path.clone().into(),
            rotate_bytes: c.rotate_bytes,
            rotate_s: c.rotate_s,
        };
        let mut profiles = Vec::new();
        for (i, p) in f.dialog.profiles.iter().enumerate() {
            let field = format!("dialog.profiles[{i}]");
            let (name, key) = p.split_once('=').unwrap_or((p.as_str(), "none"));
            check_tag_name(name).map_err(|_| {
                err(
                    &field,
                    format!("`{name}` is not a profile name (1..64 of A-Z a-z 0-9 - _ .)"),
                )
            })?;
            let Some(key) = sipmesh_cluster::dialog::ProfileKey::parse(key) else {
                return Err(err(
                    &field,
                    format!("`{key}` is not one of none, from_user, to_user, to_domain"),
                ));
            };
            if profiles.iter().any(|(n, _)| n == name) {
                return Err(err(&field, format!("profile `{name}` is defined twice")));
            }
            profiles.push((name.to_string(), key));
        }
        let serial_forking = match p.forking.as_str() {
            "parallel" => false,
            "serial" => true,
            other => {
                return Err(err(
                    "proxy.forking",
                    format!("`{other}` is not one of parallel, serial"),
                ));
            }
        };
        if f.dialog.ping_interval_s > 86_400 {
            return Err(err("dialog.ping_interval_s", "must be at most 86400"));
        }
        let ps = &f.presence;
        if ps.enabled && !p.enabled {
            return Err(err(
                "presence.enabled",
                "needs proxy.enabled = true (NOTIFYs are client transactions of the proxy)",
            ));
        }
        if ps.min_expires == 0 || ps.min_expires > ps.max_expires {
            return Err(err(
                "presence.min_expires",
                "must be at least 1 and at most presence.max_expires",
            ));
        }
        if ps.default_expires < ps.min_expires || ps.default_expires > ps.max_expires {
            return Err(err(
                "presence.default_expires",
                "must be between presence.min_expires and presence.max_expires",
            ));
        }
        if ps.max_watchers == 0 {
            return Err(err("presence.max_watchers", "must be at least 1"));
        }
        let presence = ps
            .enabled
            .then_some(sipmesh_dataplane::presence::PresenceConfig {
                min_expires: ps.min_expires,
                max_expires: ps.max_expires,
                default_expires: ps.default_expires,
                max_watchers: ps.max_watchers,
            });
        let proxy = ProxySettings {
            dialog_ping_ms: f.dialog.ping_interval_s * 1000,
            serial_forking,
            profiles,
            dialog_lifetime_ms: f.dialog.lifetime_s * 1000,
            enabled: p.enabled,
            record_route: p.record_route,
            timers: sipmesh_dataplane::txn::TimerConfig {
                t1: p.t1_ms,
                t2: p.t2_ms,
                t4: p.t4_ms,
                timer_c: p.timer_c_ms,
            },
        };
        Ok(Config {
            store,
            nat,
            proxy,
            presence,
            cdr,
            node_id: f.node.id,
            cluster,
            io: IoConfig {
                udp,
                tcp,
                workers,
                pin_cores: f.workers.pin,
                backend,
                max_message_size: f.sip.max_message_size,
                tcp_max_connections: f.tcp.max_connections,
                tcp_idle_timeout_ms: f.tcp.idle_timeout_s * 1000,
                tick_ms: f.workers.tick_ms,
                ..IoConfig::default()
            },
            server_header: f.sip.server_header,
            registrar: RegistrarConfig {
                default_expires: r.default_expires,
                min_expires: r.min_expires,
                max_expires: r.max_expires,
                max_contacts: r.max_contacts,
                max_contacts_policy: policy,
                domains: r.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                keepalive,
                tagging,
            },
            usrloc_capacity: f.usrloc.initial_capacity,
            change_ring_bytes: f.usrloc.change_ring_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_loopback_5060_with_one_worker_per_core() {
        let c = Config::defaults();
        assert_eq!(c.io.udp, vec!["127.0.0.1:5060".parse().unwrap()]);
        assert_eq!(c.io.tcp, vec!["127.0.0.1:5060".parse().unwrap()]);
        assert_eq!(
            c.io.workers,
            std::thread::available_parallelism().unwrap().get()
        );
        assert_eq!(c.registrar.default_expires, 3600);
    }

    #[test]
    fn a_file_overrides_only_what_it_names() {
        let c = Config::from_toml("[registrar]\nmax_contacts = 3\n[workers]\ncount = 2\n").unwrap();
        assert_eq!(c.registrar.max_contacts, 3);
        assert_eq!(c.io.workers, 2);
        assert_eq!(c.registrar.min_expires, 60);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[registrar]\nmin_expires = 5000\nmax_expires = 100\n",
                "registrar.min_expires",
            ),
            ("[listen]\nudp = [\"nonsense\"]\n", "listen.udp[0]"),
            ("[workers]\nbackend = \"kqueue\"\n", "workers.backend"),
            (
                "[registrar]\nmax_contacts_policy = \"drop\"\n",
                "registrar.max_contacts_policy",
            ),
            ("[sip]\nmax_message_size = 100\n", "sip.max_message_size"),
            ("[registrar]\nmax_contacts = \"ten\"\n", "max_contacts"),
            ("[registrar]\nmax_contact = 3\n", "max_contact"),
            (
                "[usrloc]\nchange_ring_bytes = 10\n",
                "usrloc.change_ring_bytes",
            ),
            ("[node]\nid = 0\n", "node.id"),
            ("[proxy]\nenabled = false\n", "presence.enabled"),
            ("[presence]\nmin_expires = 0\n", "presence.min_expires"),
            (
                "[presence]\ndefault_expires = 10\n",
                "presence.default_expires",
            ),
            ("[presence]\nmax_watchers = 0\n", "presence.max_watchers"),
            ("[grpc]\nlisten = \"x\"\n", "grpc.listen"),
            ("[node]\npeer_url = \"ftp://a:1\"\n", "node.peer_url"),
            (
                "[cluster]\nnodes = [{ id = 2, url = \"http://a\" }]\n",
                "cluster.nodes[0].url",
            ),
            ("[cluster]\njoin = [\"nope\"]\n", "cluster.join[0]"),
            ("[cluster]\nmode = \"mesh\"\n", "cluster.mode"),
            ("[tags]\nlist = [\"vip=primary\"]\n", "tags.list[0]"),
            ("[tags]\nlist = [\"v p=active\"]\n", "tags.list[0]"),
            (
                "[tags]\nlist = [\"vip=active\", \"vip/1=backup\"]\n",
                "tags.list[1]",
            ),
            ("[store]\ndurability = \"fsync\"\n", "store.durability"),
            ("[store]\ndata_dir = \"\"\n", "store.data_dir"),
            ("[store]\npark_bytes = 10\n", "store.park_bytes"),
            (
                "[cluster]\nheartbeat_retries = 0\n",
                "cluster.heartbeat_retries",
            ),
        ];
        for (text, field) in cases {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.to_string().contains(field), "{text:?} -> {e}");
        }
    }
}
