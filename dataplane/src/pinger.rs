//! The worker's side of NAT keepalives: sends the pings the control plane ordered, after
//! checking the ownership segment for the time each ping was due, and records answers
//! to OPTIONS pings (which may reach any worker) in the shared acks.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use sipmesh_cluster::keepalive::{Acks, OrderConsumer, PingMethod, PingOrder};
use sipmesh_cluster::ownership::Segment;

use crate::io::{Dest, Outbox};

/// Counters of one worker's pinger.
#[derive(Debug, Default)]
pub struct PingStats {
    /// Pings sent.
    pub sent: AtomicU64,
    /// Orders not sent: the segment says another node acts on them at their due time
    /// (ownership moved between the order and the send).
    pub fenced: AtomicU64,
    /// Answers to our OPTIONS pings.
    pub answers: AtomicU64,
    /// Pings that did not fit the send buffer.
    pub overflow: AtomicU64,
}

/// One worker's pinger.
pub struct Pinger {
    orders: OrderConsumer,
    segment: Arc<Segment>,
    acks: Arc<Acks>,
    /// Our SIP address (Via sent-by, From host).
    local: SocketAddr,
    node: u16,
    stats: Arc<PingStats>,
}

impl Pinger {
    pub fn new(
        orders: OrderConsumer,
        segment: Arc<Segment>,
        acks: Arc<Acks>,
        local: SocketAddr,
        node: u16,
        stats: Arc<PingStats>,
    ) -> Pinger {
        Pinger {
            orders,
            segment,
            acks,
            local,
            node,
            stats,
        }
    }

    /// Sends every ping ordered so far that this node still acts on.
    pub fn run<O: Outbox>(&mut self, out: &mut O) {
        while let Ok(o) = self.orders.pop() {
            // The same check as the control plane's, for the same due time: a hand-over
            // published in between fences the ping.
            if !self
                .segment
                .acts_on_at(o.tag_slot as usize, o.bucket as usize, o.due_ms)
                .0
            {
                self.stats.fenced.fetch_add(1, Relaxed);
                continue;
            }
            let mut ok = true;
            out.send(Dest::Udp(o.dest), |buf| match o.method {
                PingMethod::Crlf => match buf.get_mut(..4) {
                    Some(b) => {
                        b.copy_from_slice(b"\r\n\r\n");
                        4
                    }
                    None => {
                        ok = false;
                        0
                    }
                },
                PingMethod::Options => match self.options(&o, buf) {
                    Some(n) => n,
                    None => {
                        ok = false;
                        0
                    }
                },
            });
            if ok {
                self.stats.sent.fetch_add(1, Relaxed);
            } else {
                self.stats.overflow.fetch_add(1, Relaxed);
            }
        }
    }

    /// An OPTIONS ping (RFC 3261 §11): the branch names the ack slot and ping under the
    /// process's key, so that the answer can be matched on any worker without state.
    fn options(&self, o: &PingOrder, buf: &mut [u8]) -> Option<usize> {
        let mut branch = [0u8; 64];
        let bn = self.acks.branch(o.ack_slot, o.ping_id, &mut branch);
        let branch = &branch[..bn];
        let seq = o.ping_id as u32;
        let len = buf.len();
        let mut w = &mut buf[..];
        let uri = o.uri();
        w.write_all(b"OPTIONS ").ok()?;
        w.write_all(uri).ok()?;
        w.write_all(b" SIP/2.0\r\nVia: SIP/2.0/UDP ").ok()?;
        write!(w, "{}", self.local).ok()?;
        w.write_all(b";branch=").ok()?;
        w.write_all(branch).ok()?;
        write!(
            w,
            "\r\nMax-Forwards: 70\r\nFrom: <sip:keepalive@{}>;tag=ka{:x}\r\nTo: <",
            self.local, self.node
        )
        .ok()?;
        w.write_all(uri).ok()?;
        w.write_all(b">\r\nCall-ID: ").ok()?;
        w.write_all(&branch[7..]).ok()?;
        write!(
            w,
            "@{}\r\nCSeq: {} OPTIONS\r\nContent-Length: 0\r\n\r\n",
            self.local.ip(),
            seq.max(1)
        )
        .ok()?;
        Some(len - w.len())
    }

    /// A response whose top Via branch may be one of our pings: true when it was.
    pub fn on_response(&self, branch: &[u8]) -> bool {
        let ours = self.acks.on_reply(branch);
        if ours {
            self.stats.answers.fetch_add(1, Relaxed);
        }
        ours
    }
}
