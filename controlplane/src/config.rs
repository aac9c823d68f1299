//! The node's configuration: a TOML file (or the embedded defaults), validated once into
//! typed values. Every error names the field it is about.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;
use sipmesh_dataplane::io::{Backend, IoConfig};
use sipmesh_dataplane::registrar::{MaxContactsPolicy, RegistrarConfig};

/// The embedded defaults: what `sipd` runs with when given no file.
pub const DEFAULT_TOML: &str = include_str!("../sipd.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node: NodeSection,
    listen: ListenSection,
    workers: WorkersSection,
    sip: SipSection,
    tcp: TcpSection,
    registrar: RegistrarSection,
    usrloc: UsrlocSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    id: u16,
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

/// The validated configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u16,
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
        Ok(Config {
            node_id: f.node.id,
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
            },
            server_header: f.sip.server_header,
            registrar: RegistrarConfig {
                default_expires: r.default_expires,
                min_expires: r.min_expires,
                max_expires: r.max_expires,
                max_contacts: r.max_contacts,
                max_contacts_policy: policy,
                domains: r.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
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
        ];
        for (text, field) in cases {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.to_string().contains(field), "{text:?} -> {e}");
        }
    }
}
