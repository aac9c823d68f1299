//! Socket setup: one `SO_REUSEPORT` UDP socket and TCP listener per worker and address.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use super::IoConfig;

/// Socket buffer size asked for UDP sockets; the kernel caps it at `rmem_max`/`wmem_max`.
const UDP_BUFFER_BYTES: usize = 4 << 20;
const LISTEN_BACKLOG: i32 = 1024;

/// A bound socket and the address it is bound to (the actual port when 0 was configured).
#[derive(Debug)]
pub(crate) struct Bound {
    pub sock: Socket,
    pub local: SocketAddr,
}

/// The sockets of one worker, in configuration order.
#[derive(Debug, Default)]
pub(crate) struct WorkerSockets {
    pub udp: Vec<Bound>,
    pub tcp: Vec<Bound>,
}

/// Bind every worker's sockets. Returns them with the actual UDP and TCP addresses.
pub(crate) fn bind_all(
    cfg: &IoConfig,
) -> io::Result<(Vec<WorkerSockets>, Vec<SocketAddr>, Vec<SocketAddr>)> {
    let mut per_worker: Vec<WorkerSockets> =
        (0..cfg.workers).map(|_| WorkerSockets::default()).collect();
    let mut udp_addrs = Vec::with_capacity(cfg.udp.len());
    for &want in &cfg.udp {
        let mut addr = want;
        for (w, ws) in per_worker.iter_mut().enumerate() {
            let sock = udp_socket(addr).map_err(|e| annotate(e, "UDP", addr, w))?;
            let local = local_addr(&sock).map_err(|e| annotate(e, "UDP", addr, w))?;
            addr.set_port(local.port());
            ws.udp.push(Bound { sock, local });
        }
        udp_addrs.push(addr);
    }
    let mut tcp_addrs = Vec::with_capacity(cfg.tcp.len());
    for &want in &cfg.tcp {
        let mut addr = want;
        for (w, ws) in per_worker.iter_mut().enumerate() {
            let sock = tcp_listener(addr).map_err(|e| annotate(e, "TCP", addr, w))?;
            let local = local_addr(&sock).map_err(|e| annotate(e, "TCP", addr, w))?;
            addr.set_port(local.port());
            ws.tcp.push(Bound { sock, local });
        }
        tcp_addrs.push(addr);
    }
    Ok((per_worker, udp_addrs, tcp_addrs))
}

fn annotate(e: io::Error, what: &str, addr: SocketAddr, worker: usize) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot bind {what} {addr} (worker {worker}): {e}"),
    )
}

fn base_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty.cloexec(), Some(proto))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let sock = base_socket(addr, Type::DGRAM, Protocol::UDP)?;
    // Best effort: the kernel grants what rmem_max/wmem_max allow.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(UDP_BUFFER_BYTES);
    sock.bind(&addr.into())?;
    Ok(sock)
}

fn tcp_listener(addr: SocketAddr) -> io::Result<Socket> {
    // TCP buffers are left to the kernel's autotuning: a fixed SO_RCVBUF would disable it
    // and cost 4 MiB per connection.
    let sock = base_socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock)
}

fn local_addr(sock: &Socket) -> io::Result<SocketAddr> {
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("socket has no IP address"))
}

/// Prepare an accepted TCP socket. Best effort: a failure here is not worth a close.
pub(crate) fn tune_accepted(sock: &Socket) {
    let _ = sock.set_tcp_nodelay(true);
}

/// Report IPv4-mapped IPv6 addresses as IPv4.
pub(crate) fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The peer and local address of an accepted socket.
pub(crate) fn conn_addrs(sock: &Socket) -> Option<(SocketAddr, SocketAddr)> {
    let remote = sock.peer_addr().ok()?.as_socket()?;
    let local = sock.local_addr().ok()?.as_socket()?;
    Some((normalize(remote), normalize(local)))
}
