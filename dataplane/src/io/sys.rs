//! Thin safe wrappers over the Linux system calls the epoll driver and the worker spawner
//! need and that `std`/`socket2` do not offer: epoll, `recvmmsg`/`sendmmsg`, CPU affinity.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::SockAddr;

/// Pin the calling thread to one CPU.
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET only writes inside `set`; it ignores CPUs beyond CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Parse a kernel `sockaddr` (as bytes) into a `SocketAddr`. IPv4-mapped addresses are
/// reported as IPv4.
pub(crate) fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope));
            Some(super::sockets::normalize(v6))
        }
        _ => None,
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An epoll instance.
pub(crate) struct Epoll {
    fd: OwnedFd,
}

pub(crate) const EPOLLIN: u32 = libc::EPOLLIN as u32;
pub(crate) const EPOLLOUT: u32 = libc::EPOLLOUT as u32;

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event that outlives the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Wait up to `timeout_ms` for events; EINTR counts as "no events".
    pub fn wait(&self, events: &mut Events, timeout_ms: i32) -> io::Result<()> {
        let cap = events.buf.len() as libc::c_int;
        // SAFETY: the buffer holds `cap` epoll_events and is exclusively borrowed.
        let rc = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.buf.as_mut_ptr(),
                cap,
                timeout_ms,
            )
        };
        match cvt(rc) {
            Ok(n) => {
                events.len = n as usize;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                events.len = 0;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Buffer of epoll events.
pub(crate) struct Events {
    buf: Vec<libc::epoll_event>,
    len: usize,
}

impl Events {
    pub fn with_capacity(n: usize) -> Events {
        Events {
            buf: vec![libc::epoll_event { events: 0, u64: 0 }; n.max(1)],
            len: 0,
        }
    }

    /// (events, token) of the ready descriptors.
    pub fn get(&self, i: usize) -> (u32, u64) {
        let e = self.buf[i];
        (e.events, e.u64)
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// Preallocated buffers for one `recvmmsg` batch.
pub(crate) struct RecvBatch {
    bufs: Vec<u8>,
    buf_size: usize,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    /// `batch` datagrams of up to `buf_size` octets each.
    pub fn new(batch: usize, buf_size: usize) -> RecvBatch {
        let batch = batch.max(1);
        let mut rb = RecvBatch {
            bufs: vec![0; batch * buf_size],
            buf_size,
            // SAFETY: sockaddr_storage is plain data for which all-zero is valid.
            names: vec![unsafe { std::mem::zeroed() }; batch],
            iovs: Vec::with_capacity(batch),
            hdrs: Vec::with_capacity(batch),
        };
        let base = rb.bufs.as_mut_ptr();
        for i in 0..batch {
            // SAFETY: `i * buf_size` is within `bufs` (batch * buf_size octets).
            let p = unsafe { base.add(i * buf_size) };
            rb.iovs.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: buf_size,
            });
        }
        for i in 0..batch {
            // SAFETY: msghdr/mmsghdr are plain data for which all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = std::ptr::from_mut(&mut rb.names[i]).cast();
            h.msg_hdr.msg_iov = std::ptr::from_mut(&mut rb.iovs[i]);
            h.msg_hdr.msg_iovlen = 1;
            rb.hdrs.push(h);
        }
        rb
    }

    /// Receive up to a batch of datagrams without blocking. `Ok(0)` when none is ready.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for h in &mut self.hdrs {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        loop {
            // SAFETY: every header points at this batch's own name storage and iovec, which
            // point into `bufs`; all of them live as long as `self`, which is exclusively
            // borrowed for the call; vlen is the number of headers.
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            match cvt(rc) {
                Ok(n) => return Ok(n as usize),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Datagram `i` of the last `recv`: payload (at most the buffer size), sender, and
    /// whether the datagram was truncated.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>, bool) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.buf_size);
        let payload = &self.bufs[i * self.buf_size..i * self.buf_size + len];
        let namelen =
            (h.msg_hdr.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: sockaddr_storage is plain data; viewing its first `namelen` (bounded by its
        // size) octets as bytes is valid.
        let name = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&self.names[i]).cast::<u8>(), namelen)
        };
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (payload, sockaddr_from_bytes(name), truncated)
    }
}

/// Preallocated buffers for `sendmmsg` batches (possibly over several sockets).
pub(crate) struct SendBatch {
    bufs: Vec<u8>,
    buf_size: usize,
    addrs: Vec<SockAddr>,
    fds: Vec<RawFd>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

impl SendBatch {
    pub fn new(batch: usize, buf_size: usize) -> SendBatch {
        let batch = batch.max(1);
        let unspecified = SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut sb = SendBatch {
            bufs: vec![0; batch * buf_size],
            buf_size,
            addrs: vec![unspecified; batch],
            fds: vec![-1; batch],
            iovs: Vec::with_capacity(batch),
            hdrs: Vec::with_capacity(batch),
            len: 0,
        };
        let base = sb.bufs.as_mut_ptr();
        for i in 0..batch {
            // SAFETY: `i * buf_size` is within `bufs`.
            let p = unsafe { base.add(i * buf_size) };
            sb.iovs.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: 0,
            });
        }
        for i in 0..batch {
            // SAFETY: mmsghdr is plain data for which all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = std::ptr::from_mut(&mut sb.iovs[i]);
            h.msg_hdr.msg_iovlen = 1;
            sb.hdrs.push(h);
        }
        sb
    }

    pub fn is_full(&self) -> bool {
        self.len == self.hdrs.len()
    }

    /// The buffer of the next free slot (call `commit` to queue it).
    pub fn next_buf(&mut self) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        let i = self.len;
        Some(&mut self.bufs[i * self.buf_size..(i + 1) * self.buf_size])
    }

    /// Queue the next slot: `len` octets of its buffer to `to` on socket `fd`.
    pub fn commit(&mut self, fd: RawFd, to: SocketAddr, len: usize) {
        let i = self.len;
        if i >= self.hdrs.len() {
            return;
        }
        self.addrs[i] = SockAddr::from(to);
        self.fds[i] = fd;
        self.iovs[i].iov_len = len.min(self.buf_size);
        self.len += 1;
    }

    /// Send everything queued; returns (sent, failed). Never blocks: a full socket buffer
    /// drops the rest of that run.
    pub fn flush(&mut self) -> (u64, u64) {
        let (mut sent, mut failed) = (0u64, 0u64);
        for i in 0..self.len {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = self.addrs[i].as_ptr().cast_mut().cast();
            h.msg_namelen = self.addrs[i].len();
        }
        let mut start = 0;
        while start < self.len {
            let fd = self.fds[start];
            let mut end = start + 1;
            while end < self.len && self.fds[end] == fd {
                end += 1;
            }
            // SAFETY: headers start..end point at this batch's iovecs (into `bufs`) and
            // socket addresses, all alive and unaliased for the call; vlen counts them.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(start),
                    (end - start) as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            match cvt(rc) {
                Ok(n) => {
                    // Fewer than asked: the next call reports the error of the first unsent
                    // one (or EAGAIN), handled below.
                    sent += n as u64;
                    start += (n as usize).max(1).min(end - start);
                    if n == 0 {
                        failed += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    failed += (end - start) as u64;
                    start = end;
                }
                Err(_) => {
                    // The first datagram of the run failed (e.g. unreachable address).
                    failed += 1;
                    start += 1;
                }
            }
        }
        self.len = 0;
        (sent, failed)
    }
}

/// An eventfd another thread rings to wake a worker (the persistence thread, when the
/// records a parked reply waits for are durable). The worker waits on it in its ring (a
/// read of 8 octets) or in its epoll set.
pub struct Doorbell {
    fd: OwnedFd,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell").field("fd", &self.fd).finish()
    }
}

impl Doorbell {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Doorbell {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Wakes the worker (adds 1 to the counter; never blocks).
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 octets from a live u64 to a descriptor this value owns.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            )
        };
    }

    /// The descriptor, for the worker's ring or epoll set (valid while `self` lives).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Resets an eventfd's counter (epoll driver; the io_uring driver reads it in the ring).
pub(crate) fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 octets into a live u64; a non-blocking eventfd never blocks.
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast::<libc::c_void>(), 8) };
}
