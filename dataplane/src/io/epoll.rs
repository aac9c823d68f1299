//! The epoll driver: level-triggered epoll over non-blocking sockets. UDP is read in
//! `recvmmsg` batches and replies are collected and sent with `sendmmsg`; TCP uses
//! accept/read/write on readiness. Same contract and stats as the io_uring driver.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use super::conn::{CloseReason, Conn, Conns, begin_close, pick_udp, process_stream};
use super::sockets::{Bound, WorkerSockets, conn_addrs, tune_accepted};
use super::spawn::Stop;
use super::stats::{IoStats, bump};
use super::sys::{EPOLLIN, EPOLLOUT, Epoll, Events, RecvBatch, SendBatch, eventfd_drain};
use super::{ConnId, Dest, Handler, IoConfig, Millis, Outbox, Source, Transport, now_millis};

/// Datagrams per `recvmmsg` / `sendmmsg`.
const BATCH: usize = 32;
/// `recvmmsg` calls per readiness event before other sockets get a turn.
const RX_ROUNDS: usize = 8;
/// `read` calls per readiness event on one connection.
const TCP_READS: usize = 8;
/// Accepts per readiness event on one listener.
const ACCEPTS: usize = 64;

// epoll token: kind in the top 8 bits, a 24-bit generation, a 32-bit index.
const TK_UDP: u64 = 1;
const TK_LISTEN: u64 = 2;
const TK_CONN: u64 = 3;
/// The handler's doorbell (an eventfd).
const TK_BELL: u64 = 4;

fn token(kind: u64, generation: u32, idx: u32) -> u64 {
    (kind << 56) | (u64::from(generation & 0xff_ffff) << 32) | u64::from(idx)
}

fn token_split(t: u64) -> (u64, u32, u32) {
    (t >> 56, ((t >> 32) & 0xff_ffff) as u32, t as u32)
}

struct EpollOut<'a> {
    tx: &'a mut SendBatch,
    udp_fds: &'a [RawFd],
    udp_locals: &'a [SocketAddr],
    cur_udp: Option<usize>,
    conns: &'a mut Conns,
    scratch: &'a mut [u8],
    stats: &'a IoStats,
}

fn flush_udp(tx: &mut SendBatch, stats: &IoStats) {
    let (sent, failed) = tx.flush();
    bump(&stats.udp_tx, sent);
    bump(&stats.tx_errors, failed);
}

impl Outbox for EpollOut<'_> {
    fn send(&mut self, to: Dest, fill: impl FnOnce(&mut [u8]) -> usize) {
        match to {
            Dest::Udp(addr) => {
                let Some(sock) = pick_udp(self.udp_locals, self.cur_udp, addr) else {
                    bump(&self.stats.tx_errors, 1);
                    return;
                };
                if self.tx.is_full() {
                    flush_udp(self.tx, self.stats);
                }
                let Some(buf) = self.tx.next_buf() else {
                    bump(&self.stats.tx_dropped, 1);
                    return;
                };
                let len = fill(buf).min(buf.len());
                if len > 0 {
                    self.tx.commit(self.udp_fds[sock], addr, len);
                }
            }
            Dest::Conn(id) => {
                let n = fill(self.scratch).min(self.scratch.len());
                if n > 0 {
                    self.conns.queue(id, &self.scratch[..n], self.stats);
                }
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        self.conns.close(conn, CloseReason::Local, self.stats);
    }
}

/// A worker's epoll driver, set up and ready to run.
pub(crate) struct EpollDriver {
    ep: Epoll,
    events: Events,
    udp: Vec<Bound>,
    udp_fds: Vec<RawFd>,
    udp_locals: Vec<SocketAddr>,
    tcp: Vec<Bound>,
    rx: RecvBatch,
    tx: SendBatch,
    conns: Conns,
    scratch: Vec<u8>,
    tmp: Vec<u32>,
    max: usize,
    tick_ms: u64,
}

impl EpollDriver {
    pub(crate) fn setup(
        socks: WorkerSockets,
        cfg: &IoConfig,
        index: usize,
    ) -> io::Result<EpollDriver> {
        let ep = Epoll::new()?;
        for (i, b) in socks.udp.iter().enumerate() {
            ep.add(b.sock.as_raw_fd(), EPOLLIN, token(TK_UDP, 0, i as u32))?;
        }
        for (i, b) in socks.tcp.iter().enumerate() {
            ep.add(b.sock.as_raw_fd(), EPOLLIN, token(TK_LISTEN, 0, i as u32))?;
        }
        let max = cfg.max_message_size;
        Ok(EpollDriver {
            ep,
            events: Events::with_capacity(256),
            udp_fds: socks.udp.iter().map(|b| b.sock.as_raw_fd()).collect(),
            udp_locals: socks.udp.iter().map(|b| b.local).collect(),
            udp: socks.udp,
            tcp: socks.tcp,
            // One octet more than the maximum so that an oversize datagram shows.
            rx: RecvBatch::new(BATCH, max + 1),
            tx: SendBatch::new(BATCH, max),
            conns: Conns::new(
                cfg.tcp_limit_for(index),
                max,
                cfg.tcp_idle_timeout_ms,
                cfg.tick_ms,
            ),
            scratch: vec![0; max],
            tmp: Vec::with_capacity(64),
            max,
            tick_ms: cfg.tick_ms,
        })
    }

    /// An outbox over the whole driver (for calls made while nothing else is borrowed:
    /// ticks and wake-ups).
    fn out<'a>(&'a mut self, stats: &'a IoStats) -> EpollOut<'a> {
        EpollOut {
            tx: &mut self.tx,
            udp_fds: &self.udp_fds,
            udp_locals: &self.udp_locals,
            cur_udp: None,
            conns: &mut self.conns,
            scratch: &mut self.scratch,
            stats,
        }
    }

    pub(crate) fn run<H: Handler>(mut self, handler: &mut H, stats: &IoStats, stop: &Stop) {
        let mut next_tick = now_millis();
        let bell = handler.doorbell();
        if let Some(fd) = bell
            && let Err(e) = self.ep.add(fd, EPOLLIN, token(TK_BELL, 0, 0))
        {
            eprintln!("sipd: worker cannot wait on its doorbell: {e}");
        }
        loop {
            let now = now_millis();
            if now >= next_tick {
                bump(&stats.ticks, 1);
                handler.on_tick(now, &mut self.out(stats));
                self.sweep_idle(now, stats);
                next_tick = now + self.tick_ms;
            }
            if stop.requested() {
                break;
            }
            flush_udp(&mut self.tx, stats);
            self.service_dirty(stats);

            let wait = next_tick.saturating_sub(now_millis()).min(i32::MAX as u64) as i32;
            if let Err(e) = self.ep.wait(&mut self.events, wait) {
                eprintln!("sipd: epoll_wait failed, worker stops: {e}");
                break;
            }
            let now = now_millis();
            for i in 0..self.events.len() {
                let (ev, tok) = self.events.get(i);
                let (kind, generation, idx) = token_split(tok);
                match kind {
                    TK_UDP => self.udp_ready(idx as usize, handler, stats, now),
                    TK_LISTEN => self.accept_ready(idx as usize, stats, now),
                    TK_BELL => {
                        if let Some(fd) = bell {
                            eventfd_drain(fd);
                        }
                        handler.on_wake(now, &mut self.out(stats));
                    }
                    TK_CONN => {
                        if self.conns.generation(idx).map(|g| g & 0xff_ffff) != Some(generation) {
                            continue; // stale event of a closed connection
                        }
                        if ev & !EPOLLOUT != 0 {
                            self.conn_readable(idx, handler, stats, now);
                        }
                        self.service(idx, stats);
                    }
                    _ => {}
                }
            }
        }
    }

    fn udp_ready<H: Handler>(&mut self, i: usize, handler: &mut H, stats: &IoStats, now: Millis) {
        let Some(fd) = self.udp.get(i).map(|b| b.sock.as_raw_fd()) else {
            return;
        };
        for _ in 0..RX_ROUNDS {
            let n = match self.rx.recv(fd) {
                Ok(n) => n,
                Err(_) => {
                    bump(&stats.udp_rx_errors, 1);
                    return;
                }
            };
            for k in 0..n {
                let (payload, remote, truncated) = self.rx.get(k);
                let Some(remote) = remote else {
                    bump(&stats.udp_rx_errors, 1);
                    continue;
                };
                let src = Source {
                    transport: Transport::Udp,
                    remote,
                    local: self.udp_locals[i],
                    conn: None,
                };
                let mut out = EpollOut {
                    tx: &mut self.tx,
                    udp_fds: &self.udp_fds,
                    udp_locals: &self.udp_locals,
                    cur_udp: Some(i),
                    conns: &mut self.conns,
                    scratch: &mut self.scratch,
                    stats,
                };
                if truncated || payload.len() > self.max {
                    bump(&stats.udp_oversize, 1);
                    handler.on_oversize(
                        &payload[..payload.len().min(self.max)],
                        &src,
                        now,
                        &mut out,
                    );
                } else {
                    bump(&stats.udp_rx, 1);
                    handler.on_message(payload, &src, now, &mut out);
                }
            }
            flush_udp(&mut self.tx, stats);
            if n < BATCH {
                return;
            }
        }
    }

    fn accept_ready(&mut self, i: usize, stats: &IoStats, now: Millis) {
        for _ in 0..ACCEPTS {
            let Some(listener) = self.tcp.get(i) else {
                return;
            };
            let sock = match listener.sock.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    bump(&stats.accept_errors, 1);
                    return;
                }
            };
            if self.conns.at_limit() {
                bump(&stats.tcp_rejected_over_limit, 1);
                continue; // dropping the socket closes it
            }
            let Some((remote, local)) = conn_addrs(&sock) else {
                bump(&stats.accept_errors, 1);
                continue;
            };
            if sock.set_nonblocking(true).is_err() {
                bump(&stats.accept_errors, 1);
                continue;
            }
            tune_accepted(&sock);
            let fd = sock.as_raw_fd();
            let max = self.max;
            let Some(id) = self.conns.insert(|id| {
                let src = Source {
                    transport: Transport::Tcp,
                    remote,
                    local,
                    conn: Some(id),
                };
                let mut c = Conn::new(sock, src, max, now);
                c.ep_events = EPOLLIN;
                c
            }) else {
                continue;
            };
            if self
                .ep
                .add(fd, EPOLLIN, token(TK_CONN, id.generation, id.slot))
                .is_err()
            {
                bump(&stats.accept_errors, 1);
                self.conns.remove(id.slot);
                continue;
            }
            bump(&stats.tcp_accepted, 1);
        }
    }

    fn conn_readable<H: Handler>(
        &mut self,
        slot: u32,
        handler: &mut H,
        stats: &IoStats,
        now: Millis,
    ) {
        let max = self.max;
        for _ in 0..TCP_READS {
            let Some(c) = self.conns.slot_mut(slot) else {
                return;
            };
            if c.closing {
                return;
            }
            let Some(off) = c.prepare_rx(max) else {
                begin_close(c, CloseReason::Invalid, stats);
                return;
            };
            let space = c.rbuf.len() - off;
            let n = match (&c.sock).read(&mut c.rbuf[off..]) {
                Ok(0) => {
                    begin_close(c, CloseReason::Peer, stats);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.aborted = true;
                    begin_close(c, CloseReason::Peer, stats);
                    return;
                }
            };
            c.rend += n;
            c.last_rx = now;
            let rbuf = std::mem::take(&mut c.rbuf);
            let (start, end, src) = (c.rstart, c.rend, c.src);
            let mut out = EpollOut {
                tx: &mut self.tx,
                udp_fds: &self.udp_fds,
                udp_locals: &self.udp_locals,
                cur_udp: None,
                conns: &mut self.conns,
                scratch: &mut self.scratch,
                stats,
            };
            let (used, broken) =
                process_stream(&rbuf[start..end], max, &src, now, handler, &mut out, stats);
            let Some(c) = self.conns.slot_mut(slot) else {
                return;
            };
            c.rbuf = rbuf;
            c.rstart += used;
            if broken {
                begin_close(c, CloseReason::Invalid, stats);
                return;
            }
            if n < space {
                return; // drained; level-triggered epoll reports more
            }
        }
    }

    /// Write what is queued, update the epoll interest, close when done.
    fn service(&mut self, slot: u32, stats: &IoStats) {
        let Some(c) = self.conns.slot_mut(slot) else {
            return;
        };
        if c.aborted {
            c.wq.clear();
            c.wbuf.clear();
            c.woff = 0;
        }
        while !c.aborted && c.stage_write() {
            match c
                .sock
                .send_with_flags(&c.wbuf[c.woff..], libc::MSG_NOSIGNAL)
            {
                Ok(n) => {
                    c.woff += n;
                    bump(&stats.tcp_tx_bytes, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    bump(&stats.tx_errors, 1);
                    c.aborted = true;
                    begin_close(c, CloseReason::Peer, stats);
                }
            }
        }
        if c.closing && (c.aborted || c.write_idle()) {
            let _ = self.ep.delete(c.sock.as_raw_fd());
            self.conns.remove(slot);
            return;
        }
        // Read interest while open, write interest while bytes wait.
        let events =
            if c.closing { 0 } else { EPOLLIN } | if c.write_idle() { 0 } else { EPOLLOUT };
        if events != c.ep_events {
            let tok = token(TK_CONN, c.src.conn.map_or(0, |id| id.generation), slot);
            if self.ep.modify(c.sock.as_raw_fd(), events, tok).is_ok() {
                c.ep_events = events;
            }
        }
    }

    fn service_dirty(&mut self, stats: &IoStats) {
        let mut dirty = std::mem::take(&mut self.tmp);
        self.conns.take_dirty(&mut dirty);
        for &slot in &dirty {
            self.service(slot, stats);
        }
        dirty.clear();
        self.tmp = dirty;
    }

    /// Close connections idle for the timeout (`Conns::close_idle` decides when to look).
    fn sweep_idle(&mut self, now: Millis, stats: &IoStats) {
        self.conns.close_idle(now, stats, &mut self.tmp);
        self.service_dirty(stats);
    }
}
