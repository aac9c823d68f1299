//! Worker mailboxes: a message that belongs to another worker's transaction (a response
//! the kernel handed to this worker's socket) is passed to that worker over a
//! single-producer single-consumer ring — one ring per ordered pair of workers, no lock,
//! no allocation once warm. The owner drains its rings before each message it handles
//! and on every tick.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use sipmesh_cluster::ring::{pop_bytes, push_bytes};

use crate::io::{Source, Transport};

/// Bytes in front of each message (after the ring's length): remote (family, 16 address
/// octets, port), local (same), transport.
const HEADER: usize = 2 * 19 + 1;

/// One worker's mailbox: rings to every other worker and from every other worker.
pub struct Mailbox {
    me: u16,
    to: Vec<Option<rtrb::Producer<u8>>>,
    from: Vec<rtrb::Consumer<u8>>,
    scratch: Vec<u8>,
    /// Messages that did not fit the destination ring.
    pub full: u64,
}

/// Mailboxes of `n` workers, each ring `bytes` long.
pub fn mailboxes(n: usize, bytes: usize) -> Vec<Mailbox> {
    let mut boxes: Vec<Mailbox> = (0..n)
        .map(|i| Mailbox {
            me: i as u16,
            to: (0..n).map(|_| None).collect(),
            from: Vec::new(),
            scratch: Vec::with_capacity(64 * 1024),
            full: 0,
        })
        .collect();
    for src in 0..n {
        for dst in 0..n {
            if src != dst {
                let (p, c) = rtrb::RingBuffer::new(bytes);
                boxes[src].to[dst] = Some(p);
                boxes[dst].from.push(c);
            }
        }
    }
    boxes
}

fn put_addr(out: &mut [u8], a: SocketAddr) {
    let (fam, octets) = match a.ip() {
        IpAddr::V4(v) => (4u8, v.to_ipv6_mapped().octets()),
        IpAddr::V6(v) => (6u8, v.octets()),
    };
    out[0] = fam;
    out[1..17].copy_from_slice(&octets);
    out[17..19].copy_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[1..17]);
    let v6 = Ipv6Addr::from(o);
    let ip = match (b[0], v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, u16::from_be_bytes([b[17], b[18]]))
}

impl Mailbox {
    /// This worker's index.
    pub fn worker(&self) -> u16 {
        self.me
    }

    /// Passes `msg` (as received from `src`) to worker `to`; false when there is no such
    /// worker or its ring is full (the message is dropped and counted: UDP senders
    /// retransmit).
    pub fn send(&mut self, to: u16, src: &Source, msg: &[u8]) -> bool {
        let Some(Some(p)) = self.to.get_mut(to as usize) else {
            return false;
        };
        let mut head = [0u8; HEADER];
        put_addr(&mut head[..19], src.remote);
        put_addr(&mut head[19..38], src.local);
        head[38] = match src.transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
        };
        if !push_bytes(p, &[&head, msg]) {
            self.full += 1;
            return false;
        }
        true
    }

    /// Takes the next message waiting for this worker: `f` gets its bytes and source.
    /// Returns false when every ring is empty.
    pub fn recv(&mut self, f: impl FnOnce(&[u8], &Source)) -> bool {
        for c in &mut self.from {
            if !pop_bytes(c, &mut self.scratch) || self.scratch.len() < HEADER {
                continue;
            }
            let src = Source {
                remote: get_addr(&self.scratch[..19]),
                local: get_addr(&self.scratch[19..38]),
                transport: if self.scratch[38] == 1 {
                    Transport::Tcp
                } else {
                    Transport::Udp
                },
                // A connection belongs to the worker that accepted it.
                conn: None,
            };
            f(&self.scratch[HEADER..], &src);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_worker_they_are_sent_to_with_their_source() {
        let mut b = mailboxes(3, 4096);
        let src = Source {
            transport: Transport::Udp,
            remote: "198.51.100.7:5070".parse().unwrap(),
            local: "[2001:db8::1]:5060".parse().unwrap(),
            conn: None,
        };
        assert!(b[0].send(2, &src, b"SIP/2.0 200 OK\r\n\r\n"));
        assert!(b[1].send(2, &src, b"second"));
        assert!(!b[0].send(0, &src, b"to myself"));
        assert!(!b[0].send(9, &src, b"nobody"));
        let mut got = Vec::new();
        while b[2].recv(|m, s| got.push((m.to_vec(), *s))) {}
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (b"SIP/2.0 200 OK\r\n\r\n".to_vec(), src));
        assert_eq!(got[1].0, b"second");
        assert!(!b[1].recv(|_, _| {}));
        // A full ring refuses whole messages only.
        let big = vec![b'x'; 3000];
        assert!(b[0].send(1, &src, &big));
        assert!(!b[0].send(1, &src, &big));
        assert_eq!(b[0].full, 1);
        assert!(b[1].recv(|m, _| assert_eq!(m.len(), 3000)));
        assert!(b[0].send(1, &src, &big), "room again once read");
    }
}
