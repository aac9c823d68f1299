//! Sans-IO harness: a `Core` fed with bytes and virtual time, its sends collected.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use sipmesh_cluster::NodeId;
use sipmesh_cluster::change::ChangeRecord;
use sipmesh_cluster::ring::{ChangeConsumer, change_ring};
use sipmesh_cluster::usrloc::Usrloc;
use sipmesh_dataplane::core::{Core, CoreConfig, CoreStats};
use sipmesh_dataplane::io::{ConnId, Dest, Handler, Millis, Outbox, Source, Transport};
use sipmesh_dataplane::registrar::{Registrar, RegistrarConfig, RegistrarStats};

/// Collects what the core sends, in a buffer allocated once.
pub struct VecOutbox {
    pub buf: Vec<u8>,
    pub sent: Vec<(Dest, usize, usize)>,
    pub closed: Vec<ConnId>,
    /// Datagrams one call may send (like a driver's send buffers; default: unlimited).
    pub limit: usize,
}

impl VecOutbox {
    pub fn new() -> Self {
        VecOutbox {
            buf: vec![0; 1 << 20],
            sent: Vec::with_capacity(1024),
            closed: Vec::new(),
            limit: usize::MAX,
        }
    }

    pub fn clear(&mut self) {
        self.sent.clear();
        self.closed.clear();
    }

    pub fn last(&self) -> Option<(Dest, &[u8])> {
        self.sent
            .last()
            .map(|&(d, off, len)| (d, &self.buf[off..off + len]))
    }

    pub fn last_text(&self) -> String {
        self.last()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }
}

impl Outbox for VecOutbox {
    fn room(&self) -> usize {
        self.limit.saturating_sub(self.sent.len())
    }

    fn send(&mut self, to: Dest, fill: impl FnOnce(&mut [u8]) -> usize) {
        let off = self.sent.last().map_or(0, |&(_, o, l)| o + l);
        let n = fill(&mut self.buf[off..off + 65_535]);
        if n > 0 {
            self.sent.push((to, off, n));
        }
    }

    fn close(&mut self, conn: ConnId) {
        self.closed.push(conn);
    }
}

pub struct Harness {
    pub core: Core,
    pub out: VecOutbox,
    pub changes: ChangeConsumer,
    pub table: Arc<Usrloc>,
    pub now: Millis,
    pub stats: Arc<CoreStats>,
    pub reg_stats: Arc<RegistrarStats>,
}

pub const T0: Millis = 1_800_000_000_000;

pub fn udp_source(addr: &str) -> Source {
    Source {
        transport: Transport::Udp,
        remote: addr.parse().unwrap(),
        local: "127.0.0.1:5060".parse::<SocketAddr>().unwrap(),
        conn: None,
    }
}

impl Harness {
    pub fn new(cfg: RegistrarConfig) -> Harness {
        Harness::with_ring(cfg, 1 << 20)
    }

    pub fn with_ring(cfg: RegistrarConfig, ring_bytes: usize) -> Harness {
        let table = Arc::new(Usrloc::new(1024));
        let (p, c) = change_ring(ring_bytes);
        let reg_stats = Arc::new(RegistrarStats::default());
        let stats = Arc::new(CoreStats::default());
        let reg = Registrar::new(cfg, table.clone(), p, NodeId(7), 0, T0, reg_stats.clone());
        Harness {
            core: Core::new(CoreConfig::default(), reg, stats.clone()),
            out: VecOutbox::new(),
            changes: c,
            table,
            now: T0,
            stats,
            reg_stats,
        }
    }

    /// Send one message from `src`, return the reply text (empty when none).
    pub fn send_from(&mut self, msg: &str, src: &Source) -> String {
        self.out.clear();
        self.core
            .on_message(msg.as_bytes(), src, self.now, &mut self.out);
        self.out.last_text()
    }

    pub fn send(&mut self, msg: &str) -> String {
        self.send_from(msg, &udp_source("192.0.2.10:5062"))
    }

    pub fn advance(&mut self, ms: Millis) {
        self.now += ms;
        self.out.clear();
        self.core.on_tick(self.now, &mut self.out);
    }

    pub fn drain(&mut self) -> Vec<ChangeRecord> {
        let mut v = Vec::new();
        self.changes.drain(|r| v.push(r));
        v
    }
}

/// A REGISTER for `user@example.com`; `extra` lines are appended to the headers.
pub fn register(user: &str, call_id: &str, cseq: u32, extra: &[&str]) -> String {
    let mut m = format!(
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bK{call_id}{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@example.com>;tag=f{cseq}\r\nTo: <sip:{user}@example.com>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
    );
    for e in extra {
        m.push_str(e);
        m.push_str("\r\n");
    }
    m.push_str("Content-Length: 0\r\n\r\n");
    m
}

/// Reading replies: the same helpers the end-to-end tests use.
#[allow(unused_imports)]
pub use sipmesh_tests::{header_values, status};
