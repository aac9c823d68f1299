//! sip-echo: the "what can this box do" ceiling for SIPp load tests.
//!
//! Every UDP datagram received is answered with a fixed `SIP/2.0 200 OK` that copies the
//! request's Via, From, To, Call-ID and CSeq header lines verbatim (enough for SIPp to
//! match it to its call) plus `Content-Length: 0`. No parsing beyond splitting header lines,
//! no state, no allocation on the hot path. N threads, each with its own SO_REUSEPORT socket,
//! blocking recvmmsg(MSG_WAITFORONE) / sendmmsg in batches of 64, replies to the source
//! address (like `rport`).
//!
//! Usage: sip-echo ADDR [THREADS] [--pin]
//!   e.g. sip-echo 127.0.0.51:5060 2
//! Stops on SIGINT/SIGTERM and prints the number of replies on stderr.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const BATCH: usize = 64;
const BUF: usize = 4096;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn die(what: &str) -> ! {
    eprintln!("sip-echo: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}

fn socket(addr: SocketAddrV4) -> libc::c_int {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            die("socket");
        }
        let one: libc::c_int = 1;
        let sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, &one as *const _ as _, sz);
        let buf: libc::c_int = 8 << 20;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &buf as *const _ as _, sz);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &buf as *const _ as _, sz);
        // Wake up periodically so SIGTERM is noticed even when idle.
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as _,
            std::mem::size_of::<libc::timeval>() as _,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as _,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
            sin_zero: [0; 8],
        };
        if libc::bind(fd, &sa as *const _ as _, std::mem::size_of_val(&sa) as _) < 0 {
            die("bind");
        }
        fd
    }
}

/// Header lines copied into the reply (long and compact forms).
fn wanted(name: &[u8]) -> bool {
    const NAMES: &[&[u8]] = &[b"via", b"v", b"from", b"f", b"to", b"t", b"call-id", b"i", b"cseq"];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Build the 200 OK for `req` into `out`; returns its length (0: not a request, no reply).
fn build_reply(req: &[u8], out: &mut [u8]) -> usize {
    if req.starts_with(b"SIP/2.0 ") || req.len() < 8 {
        return 0;
    }
    let mut n = 0;
    let mut put = |b: &[u8], n: &mut usize| -> bool {
        if *n + b.len() > out.len() {
            return false;
        }
        out[*n..*n + b.len()].copy_from_slice(b);
        *n += b.len();
        true
    };
    put(b"SIP/2.0 200 OK\r\n", &mut n);
    let mut lines = req.split(|&c| c == b'\n');
    lines.next(); // request line
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break; // end of headers
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else { continue };
        let name = line[..colon].trim_ascii();
        if wanted(name) && (!put(line, &mut n) || !put(b"\r\n", &mut n)) {
            return 0;
        }
    }
    if !put(b"Content-Length: 0\r\n\r\n", &mut n) {
        return 0;
    }
    n
}

fn worker(fd: libc::c_int, count: Arc<AtomicU64>) {
    let mut rbuf = vec![[0u8; BUF]; BATCH];
    let mut wbuf = vec![[0u8; BUF]; BATCH];
    let mut addrs: [libc::sockaddr_in; BATCH] = unsafe { std::mem::zeroed() };
    let mut riov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut wiov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut rmsg: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let mut wmsg: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let mut total = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            riov[i] = libc::iovec { iov_base: rbuf[i].as_mut_ptr() as _, iov_len: BUF };
            rmsg[i].msg_hdr.msg_iov = &mut riov[i];
            rmsg[i].msg_hdr.msg_iovlen = 1;
            rmsg[i].msg_hdr.msg_name = &mut addrs[i] as *mut _ as _;
            rmsg[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as _;
            rmsg[i].msg_len = 0;
        }
        let got = unsafe {
            libc::recvmmsg(fd, rmsg.as_mut_ptr(), BATCH as _, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if got <= 0 {
            continue; // timeout (EAGAIN), EINTR
        }
        let mut k = 0;
        for i in 0..got as usize {
            let len = build_reply(&rbuf[i][..rmsg[i].msg_len as usize], &mut wbuf[k]);
            if len == 0 {
                continue;
            }
            wiov[k] = libc::iovec { iov_base: wbuf[k].as_mut_ptr() as _, iov_len: len };
            wmsg[k].msg_hdr.msg_iov = &mut wiov[k];
            wmsg[k].msg_hdr.msg_iovlen = 1;
            wmsg[k].msg_hdr.msg_name = &mut addrs[i] as *mut _ as _;
            wmsg[k].msg_hdr.msg_namelen = rmsg[i].msg_hdr.msg_namelen;
            k += 1;
        }
        let mut off = 0;
        while off < k {
            let s = unsafe { libc::sendmmsg(fd, wmsg[off..].as_mut_ptr(), (k - off) as _, 0) };
            if s <= 0 {
                break; // drop the rest, like a UDP server under overload
            }
            off += s as usize;
        }
        total += off as u64;
        if total >= 4096 {
            count.fetch_add(total, Ordering::Relaxed);
            total = 0;
        }
    }
    count.fetch_add(total, Ordering::Relaxed);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddrV4 = args
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: sip-echo IPv4:PORT [THREADS] [--pin]");
            std::process::exit(2)
        });
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let pin = args.iter().any(|a| a == "--pin");
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let count = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for t in 0..threads {
        let fd = socket(addr);
        let c = count.clone();
        hs.push(std::thread::spawn(move || {
            if pin {
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(t, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
                }
            }
            worker(fd, c)
        }));
    }
    eprintln!("sip-echo: listening udp {addr} with {threads} threads");
    for h in hs {
        let _ = h.join();
    }
    eprintln!("sip-echo: stopped; {} replies", count.load(Ordering::Relaxed));
}
