//! The io_uring driver: one ring per worker (SINGLE_ISSUER|DEFER_TASKRUN), multishot
//! `RecvMsgMulti` on the UDP sockets with a provided buffer ring, `Send` with a destination
//! address from a preallocated send pool, multishot accept, and single-shot `Recv`/`Send`
//! per TCP connection. One `io_uring_enter` per loop iteration submits everything queued
//! and waits for completions or the next tick.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use socket2::{SockAddr, Socket};

use super::conn::{CloseReason, Conn, Conns, begin_close, pick_udp, process_stream};
use super::sockets::{Bound, WorkerSockets, conn_addrs, tune_accepted};
use super::spawn::Stop;
use super::stats::{IoStats, bump};
use super::sys::sockaddr_from_bytes;
use super::{ConnId, Dest, Handler, IoConfig, Millis, Outbox, Source, Transport, now_millis};

const SQ_ENTRIES: u32 = 512;
const CQ_ENTRIES: u32 = 4096;
/// Provided-buffer group id of the UDP receive buffers.
const BGID: u16 = 0;
/// Memory budget per worker for UDP receive buffers and for the send pool.
const RX_BUDGET: usize = 8 << 20;
const TX_BUDGET: usize = 8 << 20;
/// How long teardown waits for cancelled operations to complete.
const TEARDOWN_MS: u64 = 1000;
/// Size of `struct io_uring_recvmsg_out` (namelen, controllen, payloadlen, flags).
const RECVMSG_OUT_HEADER: usize = 16;

// user_data: operation kind in the high 32 bits, an index in the low 32.
const UD_UDP_RECV: u64 = 1;
const UD_UDP_SEND: u64 = 2;
const UD_ACCEPT: u64 = 3;
const UD_TCP_RECV: u64 = 4;
const UD_TCP_SEND: u64 = 5;
const UD_CANCEL: u64 = 6;
const UD_DOORBELL: u64 = 7;

fn ud(kind: u64, idx: u32) -> u64 {
    (kind << 32) | u64::from(idx)
}

fn ud_split(v: u64) -> (u64, u32) {
    (v >> 32, v as u32)
}

/// Page-aligned, zeroed heap memory that the kernel reads or writes through raw pointers.
/// Rust code only forms references to parts the kernel is not using.
struct RawBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl RawBuf {
    fn new(len: usize) -> io::Result<RawBuf> {
        let layout = Layout::from_size_align(len.max(1), 4096)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer too large"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(ptr)
            .map(|ptr| RawBuf { ptr, layout })
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "io_uring buffers"))
    }

    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A provided buffer ring (IORING_REGISTER_PBUF_RING) of equal-sized buffers.
struct BufRing {
    ring: RawBuf,
    data: RawBuf,
    entries: u16,
    buf_size: usize,
    /// Our copy of the tail; published to the kernel by `publish`.
    tail: u16,
}

impl BufRing {
    fn new(entries: u16, buf_size: usize) -> io::Result<BufRing> {
        debug_assert!(entries.is_power_of_two());
        let ring = RawBuf::new(usize::from(entries) * std::mem::size_of::<BufRingEntry>())?;
        let data = RawBuf::new(usize::from(entries) * buf_size)?;
        let mut br = BufRing {
            ring,
            data,
            entries,
            buf_size,
            tail: 0,
        };
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: `self.ring` holds `entries` page-aligned BufRingEntry slots and lives as
        // long as the ring uses it: the driver drops the io_uring before the BufRing (field
        // order), and leaks both if operations are still in flight at teardown.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.ring.ptr() as u64,
                self.entries,
                BGID,
                0,
            )
        }
    }

    /// Hand buffer `bid` (back) to the kernel; visible after `publish`.
    fn push(&mut self, bid: u16) {
        if bid >= self.entries {
            return;
        }
        let idx = usize::from(self.tail & (self.entries - 1));
        let base = self.ring.ptr().cast::<BufRingEntry>();
        // SAFETY: `idx < entries`, so the slot is inside the ring memory. The kernel only
        // reads slots between its head and the published tail, and this one is past the
        // published tail. Entry 0 overlaps the tail field, which the setters do not touch.
        let entry = unsafe { &mut *base.add(idx) };
        // SAFETY: `bid < entries`, so the buffer lies inside `data`.
        entry.set_addr(unsafe { self.data.ptr().add(usize::from(bid) * self.buf_size) } as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publish the tail to the kernel.
    fn publish(&self) {
        let base = self.ring.ptr().cast::<BufRingEntry>().cast_const();
        // SAFETY: `base` is the first entry of the ring; `tail` returns the address of the
        // shared tail field, a u16 the kernel reads atomically; AtomicU16 has the same layout.
        let tail = unsafe { &*BufRingEntry::tail(base).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` octets of buffer `bid`, which the kernel has completed into.
    fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.entries {
            return &[];
        }
        let len = len.min(self.buf_size);
        // SAFETY: the buffer lies inside `data`; the kernel handed it to us in a CQE and does
        // not touch it again until we `push` it back, which needs `&mut self`.
        unsafe {
            std::slice::from_raw_parts(self.data.ptr().add(usize::from(bid) * self.buf_size), len)
        }
    }
}

/// Fixed-size send buffers with the destination address of each, allocated at start.
struct SendPool {
    mem: RawBuf,
    slot_size: usize,
    addrs: Vec<SockAddr>,
    free: Vec<u32>,
}

impl SendPool {
    fn new(slots: usize, slot_size: usize) -> io::Result<SendPool> {
        let unspecified = SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok(SendPool {
            mem: RawBuf::new(slots * slot_size)?,
            slot_size,
            addrs: vec![unspecified; slots],
            free: (0..slots as u32).rev().collect(),
        })
    }

    /// The buffer of a slot taken from `free`.
    fn buf_mut(&mut self, slot: u32) -> &mut [u8] {
        let slot = (slot as usize).min(self.addrs.len() - 1);
        // SAFETY: the slot lies inside `mem`; it was taken off the free list, so no send
        // in flight reads it, and `&mut self` keeps other Rust references away.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.ptr().add(slot * self.slot_size),
                self.slot_size,
            )
        }
    }
}

/// Everything the outbox needs besides the ring.
struct Tx {
    pool: SendPool,
    conns: Conns,
    /// Where `Dest::Conn` messages are written before being queued on the connection.
    scratch: Vec<u8>,
    udp_fds: Vec<RawFd>,
    udp_locals: Vec<SocketAddr>,
    /// Operations in flight (a multishot one counts until its last CQE).
    inflight: usize,
}

impl Tx {
    /// An operation ended (its last CQE was reaped).
    fn op_done(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }
}

/// Push an SQE, submitting first if the queue is full. Returns false if it cannot be queued.
///
/// # Safety
/// Every buffer, address and msghdr the entry points at must stay valid and unmoved until
/// its (last) completion is reaped.
unsafe fn push_sqe(ring: &mut IoUring, e: &squeue::Entry) -> bool {
    // SAFETY: forwarded from the caller.
    if unsafe { ring.submission().push(e) }.is_ok() {
        return true;
    }
    let _ = ring.submit();
    // SAFETY: as above.
    unsafe { ring.submission().push(e) }.is_ok()
}

struct UringOut<'a> {
    ring: &'a mut IoUring,
    tx: &'a mut Tx,
    stats: &'a IoStats,
    cur_udp: Option<usize>,
}

impl Outbox for UringOut<'_> {
    fn room(&self) -> usize {
        self.tx.pool.free.len()
    }

    fn send(&mut self, to: Dest, fill: impl FnOnce(&mut [u8]) -> usize) {
        match to {
            Dest::Udp(addr) => {
                let Some(sock) = pick_udp(&self.tx.udp_locals, self.cur_udp, addr) else {
                    bump(&self.stats.tx_errors, 1);
                    return;
                };
                let Some(slot) = self.tx.pool.free.pop() else {
                    bump(&self.stats.tx_dropped, 1);
                    return;
                };
                let buf = self.tx.pool.buf_mut(slot);
                let len = fill(buf).min(buf.len());
                let ptr = buf.as_ptr();
                if len == 0 {
                    self.tx.pool.free.push(slot);
                    return;
                }
                let dest = &mut self.tx.pool.addrs[slot as usize];
                *dest = SockAddr::from(addr);
                let e = opcode::Send::new(Fd(self.tx.udp_fds[sock]), ptr, len as u32)
                    .dest_addr(dest.as_ptr().cast())
                    .dest_addr_len(dest.len())
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud(UD_UDP_SEND, slot));
                // SAFETY: the buffer and the address live in the send pool, which outlives
                // the ring's use of them; the slot returns to the free list only on completion.
                if unsafe { push_sqe(self.ring, &e) } {
                    self.tx.inflight += 1;
                } else {
                    self.tx.pool.free.push(slot);
                    bump(&self.stats.tx_dropped, 1);
                }
            }
            Dest::Conn(id) => {
                let n = fill(&mut self.tx.scratch).min(self.tx.scratch.len());
                if n > 0 {
                    self.tx.conns.queue(id, &self.tx.scratch[..n], self.stats);
                }
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        self.tx.conns.close(conn, CloseReason::Local, self.stats);
    }
}

/// A worker's io_uring driver, set up and ready to run.
pub(crate) struct UringDriver {
    // Field order matters: the ring is dropped before the memory it points into.
    ring: IoUring,
    bufs: BufRing,
    msghdr: Box<libc::msghdr>,
    udp: Vec<Bound>,
    /// Per UDP socket: multishot receive armed; when to re-arm after an error.
    udp_armed: Vec<bool>,
    udp_retry_at: Vec<Millis>,
    tcp: Vec<Bound>,
    tcp_armed: Vec<bool>,
    tcp_retry_at: Vec<Millis>,
    tx: Tx,
    cqes: Vec<cqueue::Entry>,
    tmp: Vec<u32>,
    max: usize,
    tick_ms: u64,
    /// Whether the ring got SINGLE_ISSUER|DEFER_TASKRUN.
    fast_flags: bool,
    /// The handler's doorbell (an eventfd the handler owns and keeps open while `run`
    /// runs), the 8 octets its read lands in, and whether that read is in flight.
    doorbell: Option<RawFd>,
    doorbell_buf: Box<[u8; 8]>,
    doorbell_armed: bool,
}

/// A ring with SINGLE_ISSUER|DEFER_TASKRUN, or without flags where the kernel refuses them
/// (EINVAL). The bool says which.
fn build_ring() -> io::Result<(IoUring, bool)> {
    let fast = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES);
    match fast {
        Ok(ring) => Ok((ring, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((
            IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(SQ_ENTRIES)?,
            false,
        )),
        Err(e) => Err(e),
    }
}

fn pow2_floor(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

impl UringDriver {
    /// Build the ring and register the buffers. Must run on the worker thread (the ring is
    /// single-issuer). Gives the sockets back on failure, for the epoll fallback.
    pub(crate) fn setup(
        socks: WorkerSockets,
        cfg: &IoConfig,
        index: usize,
    ) -> Result<UringDriver, (io::Error, WorkerSockets)> {
        match Self::setup_inner(cfg) {
            Ok((ring, fast_flags, bufs, pool)) => Ok(Self::assemble(
                ring, fast_flags, bufs, pool, socks, cfg, index,
            )),
            Err(e) => Err((e, socks)),
        }
    }

    /// The ring's setup flags, for the log.
    pub(crate) fn ring_flags(&self) -> &'static str {
        if self.fast_flags {
            "SINGLE_ISSUER|DEFER_TASKRUN"
        } else {
            "no setup flags"
        }
    }

    fn setup_inner(cfg: &IoConfig) -> io::Result<(IoUring, bool, BufRing, SendPool)> {
        let (ring, fast_flags) = build_ring()?;
        let max = cfg.max_message_size;
        // io_uring_recvmsg_out header, the peer's address, then the payload; one octet more
        // than the maximum so that an oversize datagram shows.
        let buf_size = RECVMSG_OUT_HEADER + std::mem::size_of::<libc::sockaddr_storage>() + max + 1;
        let entries = pow2_floor((RX_BUDGET / buf_size).clamp(16, 4096)) as u16;
        let bufs = BufRing::new(entries, buf_size)?;
        bufs.register(&ring)?;
        let slots = (TX_BUDGET / max.max(1)).clamp(64, 1024);
        let pool = SendPool::new(slots, max)?;
        Ok((ring, fast_flags, bufs, pool))
    }

    fn assemble(
        ring: IoUring,
        fast_flags: bool,
        bufs: BufRing,
        pool: SendPool,
        socks: WorkerSockets,
        cfg: &IoConfig,
        index: usize,
    ) -> UringDriver {
        // SAFETY: msghdr is plain data for which all-zero is valid.
        let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msghdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        let nudp = socks.udp.len();
        let ntcp = socks.tcp.len();
        let cq_cap = ring.params().cq_entries() as usize;
        UringDriver {
            ring,
            bufs,
            msghdr,
            udp_armed: vec![false; nudp],
            udp_retry_at: vec![0; nudp],
            tcp_armed: vec![false; ntcp],
            tcp_retry_at: vec![0; ntcp],
            tx: Tx {
                pool,
                conns: Conns::new(
                    cfg.tcp_limit_for(index),
                    cfg.max_message_size,
                    cfg.tcp_idle_timeout_ms,
                    cfg.tick_ms,
                ),
                scratch: vec![0; cfg.max_message_size],
                udp_fds: socks.udp.iter().map(|b| b.sock.as_raw_fd()).collect(),
                udp_locals: socks.udp.iter().map(|b| b.local).collect(),
                inflight: 0,
            },
            udp: socks.udp,
            tcp: socks.tcp,
            cqes: Vec::with_capacity(cq_cap),
            tmp: Vec::with_capacity(64),
            max: cfg.max_message_size,
            tick_ms: cfg.tick_ms,
            fast_flags,
            doorbell: None,
            doorbell_buf: Box::new([0; 8]),
            doorbell_armed: false,
        }
    }

    /// Run until `shutdown` is set, then cancel everything and drain the ring.
    pub(crate) fn run<H: Handler>(mut self, handler: &mut H, stats: &IoStats, stop: &Stop) {
        let mut next_tick = now_millis();
        self.doorbell = handler.doorbell();
        loop {
            let now = now_millis();
            if now >= next_tick {
                bump(&stats.ticks, 1);
                let mut out = UringOut {
                    ring: &mut self.ring,
                    tx: &mut self.tx,
                    stats,
                    cur_udp: None,
                };
                handler.on_tick(now, &mut out);
                self.sweep_idle(now, stats);
                next_tick = now + self.tick_ms;
            }
            if stop.requested() {
                break;
            }
            self.service_dirty(stats);
            self.arm(now, stats);

            let wait = next_tick.saturating_sub(now_millis());
            let ts = Timespec::new()
                .sec(wait / 1000)
                .nsec(((wait % 1000) * 1_000_000) as u32);
            let args = SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    eprintln!("sipd: io_uring_enter failed, worker stops: {e}");
                    break;
                }
            }

            self.cqes.clear();
            self.cqes.extend(self.ring.completion());
            let now = now_millis();
            for i in 0..self.cqes.len() {
                let cqe = self.cqes[i].clone();
                self.complete(&cqe, handler, stats, now);
            }
            self.bufs.publish();
        }
        self.teardown();
    }

    /// Arm multishot receives and accepts that are not armed.
    fn arm(&mut self, now: Millis, stats: &IoStats) {
        for i in 0..self.udp.len() {
            if self.udp_armed[i] || now < self.udp_retry_at[i] {
                continue;
            }
            let e =
                opcode::RecvMsgMulti::new(Fd(self.udp[i].sock.as_raw_fd()), &*self.msghdr, BGID)
                    .build()
                    .user_data(ud(UD_UDP_RECV, i as u32));
            // SAFETY: the msghdr is boxed (stable address) and owned by the driver, as are
            // the socket and the buffer ring; teardown drains every operation before they go.
            if unsafe { push_sqe(&mut self.ring, &e) } {
                self.udp_armed[i] = true;
                self.tx.inflight += 1;
            } else {
                bump(&stats.udp_rx_errors, 1);
            }
        }
        for i in 0..self.tcp.len() {
            if self.tcp_armed[i] || now < self.tcp_retry_at[i] {
                continue;
            }
            let e = opcode::AcceptMulti::new(Fd(self.tcp[i].sock.as_raw_fd()))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(ud(UD_ACCEPT, i as u32));
            // SAFETY: the entry points at no memory; the listener outlives the operation.
            if unsafe { push_sqe(&mut self.ring, &e) } {
                self.tcp_armed[i] = true;
                self.tx.inflight += 1;
            }
        }
        if let Some(fd) = self.doorbell
            && !self.doorbell_armed
        {
            let e = opcode::Read::new(Fd(fd), self.doorbell_buf.as_mut_ptr(), 8)
                .build()
                .user_data(ud(UD_DOORBELL, 0));
            // SAFETY: the 8-octet buffer is boxed (stable address) and owned by the driver;
            // the eventfd is kept open by the handler while `run` runs, and teardown drains
            // every operation before `run` returns.
            if unsafe { push_sqe(&mut self.ring, &e) } {
                self.doorbell_armed = true;
                self.tx.inflight += 1;
            }
        }
    }

    fn complete<H: Handler>(
        &mut self,
        cqe: &cqueue::Entry,
        handler: &mut H,
        stats: &IoStats,
        now: Millis,
    ) {
        let (kind, idx) = ud_split(cqe.user_data());
        let res = cqe.result();
        let flags = cqe.flags();
        match kind {
            UD_UDP_RECV => self.udp_recv(idx as usize, res, flags, handler, stats, now),
            UD_UDP_SEND => {
                self.tx.op_done();
                if res < 0 {
                    bump(&stats.tx_errors, 1);
                } else {
                    bump(&stats.udp_tx, 1);
                }
                self.tx.pool.free.push(idx);
            }
            UD_ACCEPT => self.accept(idx as usize, res, flags, stats, now),
            UD_TCP_RECV => {
                self.tx.op_done();
                self.tcp_recv(idx, res, handler, stats, now);
                self.service(idx, stats);
            }
            UD_TCP_SEND => {
                self.tx.op_done();
                if let Some(c) = self.tx.conns.slot_mut(idx) {
                    c.send_inflight = false;
                    let left = c.wbuf.len().saturating_sub(c.woff);
                    if res > 0 {
                        c.woff += res as usize;
                        bump(&stats.tcp_tx_bytes, res as u64);
                    } else if left > 0 {
                        bump(&stats.tx_errors, 1);
                        c.aborted = true;
                        begin_close(c, CloseReason::Peer, stats);
                    }
                }
                self.service(idx, stats);
            }
            UD_CANCEL => self.tx.op_done(),
            UD_DOORBELL => {
                self.tx.op_done();
                self.doorbell_armed = false;
                if res >= 0 {
                    let mut out = UringOut {
                        ring: &mut self.ring,
                        tx: &mut self.tx,
                        stats,
                        cur_udp: None,
                    };
                    handler.on_wake(now, &mut out);
                }
            }
            _ => {}
        }
    }

    fn udp_recv<H: Handler>(
        &mut self,
        i: usize,
        res: i32,
        flags: u32,
        handler: &mut H,
        stats: &IoStats,
        now: Millis,
    ) {
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res >= 0 && i < self.udp.len() {
                let data = self.bufs.get(bid, res as usize);
                match RecvMsgOut::parse(data, &self.msghdr) {
                    Ok(m) => match sockaddr_from_bytes(m.name_data()) {
                        Some(remote) => {
                            let src = Source {
                                transport: Transport::Udp,
                                remote,
                                local: self.tx.udp_locals[i],
                                conn: None,
                            };
                            let payload = m.payload_data();
                            let mut out = UringOut {
                                ring: &mut self.ring,
                                tx: &mut self.tx,
                                stats,
                                cur_udp: Some(i),
                            };
                            if m.is_payload_truncated() || payload.len() > self.max {
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
                        None => bump(&stats.udp_rx_errors, 1),
                    },
                    Err(()) => bump(&stats.udp_rx_errors, 1),
                }
            }
            self.bufs.push(bid);
        }
        if !cqueue::more(flags) {
            self.tx.op_done();
            if let Some(armed) = self.udp_armed.get_mut(i) {
                *armed = false;
                // Out of buffers: they are back after this batch, re-arm at once. Other
                // errors: retry on the next tick rather than spin.
                if res < 0 && res != -libc::ENOBUFS {
                    bump(&stats.udp_rx_errors, 1);
                    self.udp_retry_at[i] = now + self.tick_ms;
                }
            }
        }
    }

    fn accept(&mut self, i: usize, res: i32, flags: u32, stats: &IoStats, now: Millis) {
        if res >= 0 {
            // SAFETY: a successful accept CQE carries a new descriptor that nothing else owns.
            let sock = Socket::from(unsafe { OwnedFd::from_raw_fd(res) });
            self.adopt(sock, stats, now);
        } else {
            bump(&stats.accept_errors, 1);
        }
        if !cqueue::more(flags) {
            self.tx.op_done();
            if let Some(armed) = self.tcp_armed.get_mut(i) {
                *armed = false;
                if res < 0 {
                    self.tcp_retry_at[i] = now + self.tick_ms;
                }
            }
        }
    }

    fn adopt(&mut self, sock: Socket, stats: &IoStats, now: Millis) {
        if self.tx.conns.at_limit() {
            bump(&stats.tcp_rejected_over_limit, 1);
            return; // dropping the socket closes it
        }
        let Some((remote, local)) = conn_addrs(&sock) else {
            bump(&stats.accept_errors, 1);
            return;
        };
        tune_accepted(&sock);
        let max = self.max;
        let id = self.tx.conns.insert(|id| {
            let src = Source {
                transport: Transport::Tcp,
                remote,
                local,
                conn: Some(id),
            };
            Conn::new(sock, src, max, now)
        });
        if let Some(id) = id {
            bump(&stats.tcp_accepted, 1);
            self.service(id.slot, stats);
        }
    }

    fn tcp_recv<H: Handler>(
        &mut self,
        slot: u32,
        res: i32,
        handler: &mut H,
        stats: &IoStats,
        now: Millis,
    ) {
        let max = self.max;
        let Some(c) = self.tx.conns.slot_mut(slot) else {
            return;
        };
        c.recv_inflight = false;
        if c.closing {
            return;
        }
        if res == 0 {
            begin_close(c, CloseReason::Peer, stats);
            return;
        }
        if res < 0 {
            c.aborted = true;
            begin_close(c, CloseReason::Peer, stats);
            return;
        }
        c.rend = (c.rend + res as usize).min(c.rbuf.len());
        c.last_rx = now;
        let rbuf = std::mem::take(&mut c.rbuf);
        let (start, end, src) = (c.rstart, c.rend, c.src);
        let mut out = UringOut {
            ring: &mut self.ring,
            tx: &mut self.tx,
            stats,
            cur_udp: None,
        };
        let (used, broken) =
            process_stream(&rbuf[start..end], max, &src, now, handler, &mut out, stats);
        if let Some(c) = self.tx.conns.slot_mut(slot) {
            c.rbuf = rbuf;
            c.rstart += used;
            if broken {
                begin_close(c, CloseReason::Invalid, stats);
            }
        }
    }

    /// Start what a connection needs next: a send of queued bytes, the next receive, or
    /// the close once nothing is in flight.
    fn service(&mut self, slot: u32, stats: &IoStats) {
        let max = self.max;
        let Some(c) = self.tx.conns.slot_mut(slot) else {
            return;
        };
        let fd = c.sock.as_raw_fd();
        if c.aborted {
            c.wq.clear();
            if !c.send_inflight {
                c.wbuf.clear();
                c.woff = 0;
            }
        }
        if !c.aborted && !c.send_inflight && c.stage_write() {
            let rest = &c.wbuf[c.woff..];
            let e = opcode::Send::new(
                Fd(fd),
                rest.as_ptr(),
                rest.len().min(u32::MAX as usize) as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(UD_TCP_SEND, slot));
            // SAFETY: `wbuf` is not touched (no push, no swap) while `send_inflight` is set,
            // and the connection is not removed until no operation is in flight.
            if unsafe { push_sqe(&mut self.ring, &e) } {
                c.send_inflight = true;
                self.tx.inflight += 1;
            } else {
                bump(&stats.tx_errors, 1);
                c.aborted = true;
                begin_close(c, CloseReason::Peer, stats);
            }
        }
        if !c.closing && !c.recv_inflight {
            match c.prepare_rx(max) {
                Some(off) => {
                    let len = c.rbuf.len() - off;
                    // SAFETY: `off < rbuf.len()`, so the pointer stays inside the buffer.
                    let ptr = unsafe { c.rbuf.as_mut_ptr().add(off) };
                    let e = opcode::Recv::new(Fd(fd), ptr, len as u32)
                        .build()
                        .user_data(ud(UD_TCP_RECV, slot));
                    // SAFETY: `rbuf` is neither moved nor resized while `recv_inflight` is set
                    // (it is processed only after the completion), and the connection is not
                    // removed until no operation is in flight.
                    if unsafe { push_sqe(&mut self.ring, &e) } {
                        c.recv_inflight = true;
                        self.tx.inflight += 1;
                    } else {
                        begin_close(c, CloseReason::Peer, stats);
                    }
                }
                None => begin_close(c, CloseReason::Invalid, stats),
            }
        }
        if c.closing && !c.send_inflight && (c.aborted || c.write_idle()) {
            if c.recv_inflight {
                if !c.cancel_sent {
                    let e = opcode::AsyncCancel::new(ud(UD_TCP_RECV, slot))
                        .build()
                        .user_data(ud(UD_CANCEL, 0));
                    // SAFETY: the entry points at no memory.
                    if unsafe { push_sqe(&mut self.ring, &e) } {
                        c.cancel_sent = true;
                        self.tx.inflight += 1;
                    }
                }
            } else {
                self.tx.conns.remove(slot);
            }
        }
    }

    fn service_dirty(&mut self, stats: &IoStats) {
        let mut dirty = std::mem::take(&mut self.tmp);
        self.tx.conns.take_dirty(&mut dirty);
        for &slot in &dirty {
            self.service(slot, stats);
        }
        dirty.clear();
        self.tmp = dirty;
    }

    /// Close connections idle for the timeout (`Conns::close_idle` decides when to look).
    fn sweep_idle(&mut self, now: Millis, stats: &IoStats) {
        self.tx.conns.close_idle(now, stats, &mut self.tmp);
        self.service_dirty(stats);
    }

    /// Cancel every operation and reap until none is in flight, so that no kernel operation
    /// outlives the memory and sockets it uses. If the kernel does not finish in time, the
    /// memory is leaked rather than freed under it.
    fn teardown(mut self) {
        let e = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(ud(UD_CANCEL, 1));
        // SAFETY: the entry points at no memory.
        if unsafe { push_sqe(&mut self.ring, &e) } {
            self.tx.inflight += 1;
        }
        let deadline = now_millis() + TEARDOWN_MS;
        while self.tx.inflight > 0 && now_millis() < deadline {
            let ts = Timespec::new().nsec(50_000_000);
            let args = SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                )
            {
                break;
            }
            self.cqes.clear();
            self.cqes.extend(self.ring.completion());
            for i in 0..self.cqes.len() {
                let cqe = self.cqes[i].clone();
                let (kind, idx) = ud_split(cqe.user_data());
                let (res, flags) = (cqe.result(), cqe.flags());
                match kind {
                    UD_UDP_RECV | UD_ACCEPT => {
                        if kind == UD_ACCEPT && res >= 0 {
                            // SAFETY: a new descriptor nobody else owns; close it.
                            drop(unsafe { OwnedFd::from_raw_fd(res) });
                        }
                        if let Some(bid) = cqueue::buffer_select(flags) {
                            self.bufs.push(bid);
                        }
                        if !cqueue::more(flags) {
                            self.tx.op_done();
                        }
                    }
                    UD_UDP_SEND => {
                        self.tx.op_done();
                        self.tx.pool.free.push(idx);
                    }
                    UD_TCP_RECV | UD_TCP_SEND => {
                        self.tx.op_done();
                        if let Some(c) = self.tx.conns.slot_mut(idx) {
                            if kind == UD_TCP_RECV {
                                c.recv_inflight = false;
                            } else {
                                c.send_inflight = false;
                            }
                        }
                    }
                    _ => self.tx.op_done(),
                }
            }
        }
        if self.tx.inflight > 0 {
            eprintln!(
                "sipd: io_uring teardown: {} operations still in flight, leaking their buffers",
                self.tx.inflight
            );
            std::mem::forget(self);
        }
    }
}
