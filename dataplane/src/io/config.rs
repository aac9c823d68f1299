//! Typed configuration of the worker I/O layer (parsing lives elsewhere).

use std::net::SocketAddr;

/// Which I/O driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// io_uring when a ring can be set up, else epoll.
    Auto,
    /// io_uring only: failing to set it up is an error.
    IoUring,
    /// epoll + non-blocking sockets (`recvmmsg`/`sendmmsg` for UDP).
    Epoll,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// What the worker I/O layer listens on and how it behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoConfig {
    /// UDP addresses; every worker binds its own `SO_REUSEPORT` socket on each. Port 0 is
    /// allowed: worker 0 picks a free port and the others bind the same one (see
    /// [`Workers::udp_addrs`](super::Workers::udp_addrs)).
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses, same rules as `udp`.
    pub tcp: Vec<SocketAddr>,
    /// Number of worker threads (at least 1).
    pub workers: usize,
    /// Pin worker N to core N % ncpu.
    pub pin_cores: bool,
    pub backend: Backend,
    /// Largest SIP message accepted (UDP datagram, or one framed TCP message), octets.
    pub max_message_size: usize,
    /// Open TCP connections per process, split evenly across workers.
    pub tcp_max_connections: usize,
    /// A TCP connection that received no byte for this long is closed.
    pub tcp_idle_timeout_ms: u64,
    /// `Handler::on_tick` runs at least this often; the shutdown flag is checked as often.
    pub tick_ms: u64,
    /// Worker threads are named `<thread_name>-N` (also in their log lines).
    pub thread_name: &'static str,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            udp: Vec::new(),
            tcp: Vec::new(),
            workers: 1,
            pin_cores: false,
            backend: Backend::Auto,
            max_message_size: 65_535,
            tcp_max_connections: 10_000,
            tcp_idle_timeout_ms: 120_000,
            tick_ms: 10,
            thread_name: "sipd-worker",
        }
    }
}

impl IoConfig {
    /// The TCP connection limit of worker `index`: the process limit split evenly, the
    /// remainder going to the first workers.
    pub fn tcp_limit_for(&self, index: usize) -> usize {
        let w = self.workers.max(1);
        self.tcp_max_connections / w + usize::from(index < self.tcp_max_connections % w)
    }

    pub(crate) fn validate(&self) -> std::io::Result<()> {
        let bad = |m: &str| {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                m.to_owned(),
            ))
        };
        if self.workers == 0 {
            return bad("io: workers must be at least 1");
        }
        if self.max_message_size == 0 || self.max_message_size > 1 << 24 {
            return bad("io: max_message_size must be in 1..=16 MiB");
        }
        if self.tick_ms == 0 {
            return bad("io: tick_ms must be at least 1");
        }
        if self.udp.is_empty() && self.tcp.is_empty() {
            return bad("io: no UDP or TCP address configured");
        }
        Ok(())
    }
}
