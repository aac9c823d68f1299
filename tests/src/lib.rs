//! Harness for end-to-end tests: real `sipd` processes on loopback addresses of their own,
//! real UDP and TCP sockets, bounded waits, and processes stopped by PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of the `sipd` binary of this build, building it if needed.
pub fn sipd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>/sipd
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .to_path_buf();
        let bin = profile_dir.join("sipd");
        // Build (or confirm up to date) the sipd of this source tree: a test must never
        // run a stale binary. Cargo has released its lock by the time tests run.
        {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "-p",
                "sipmesh-controlplane",
                "--bin",
                "sipd",
                "--bin",
                "sipctl",
            ])
            .current_dir(repo_root());
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build for sipd");
            assert!(st.success(), "building sipd failed");
        }
        bin
    })
    .clone()
}

/// A loopback address of this test process alone (127.64.0.0/10 keyed by PID), so that
/// tests running in parallel never share an address and port.
pub fn own_ip() -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        64 + ((pid >> 16) & 0x3f) as u8,
        ((pid >> 8) & 0xff) as u8,
        (pid & 0xff) as u8,
    )
}

/// Another loopback address of this test process, for clients that must sit on a
/// well-known port themselves; each call gives a new one (up to four per process).
pub fn client_ip() -> Ipv4Addr {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let k = NEXT.fetch_add(1, Ordering::SeqCst) as u32 % 4;
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        (128 + ((pid >> 16) & 0x0f) + 16 * k) as u8,
        ((pid >> 8) & 0xff) as u8,
        (pid & 0xff) as u8,
    )
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(5060);

/// Path of the `sipctl` binary of this build (built together with `sipd`).
pub fn sipctl_bin() -> PathBuf {
    sipd_bin().with_file_name("sipctl")
}

/// A running sipd, stopped (SIGTERM, then SIGKILL after 10 s) when dropped.
pub struct Sipd {
    child: Child,
    pub addr: SocketAddr,
    /// Its gRPC control-plane address.
    pub grpc: SocketAddr,
    /// The wrapper it was started through (also used to run `sipctl` for it).
    wrapper: Vec<String>,
    /// The data directory the harness chose (removed on drop).
    own_data: Option<PathBuf>,
    /// The ownership segment file the harness chose (removed on drop).
    pub own_segment: PathBuf,
    /// The CDR file the harness chose (removed on drop, with its rotated files).
    pub cdr_file: PathBuf,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    stdout_rx: Receiver<String>,
    pub stderr: Arc<Mutex<String>>,
}

impl Sipd {
    /// Start sipd with `config` (TOML overlay on the defaults) listening on a fresh port
    /// of `own_ip()` for UDP and TCP, with `--dump-changes`.
    pub fn start(config: &str, extra_args: &[&str]) -> Sipd {
        let port = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let addr = SocketAddr::new(IpAddr::V4(own_ip()), port);
        Sipd::start_on(addr, config, extra_args)
    }

    pub fn start_on(addr: SocketAddr, config: &str, extra_args: &[&str]) -> Sipd {
        Sipd::start_wrapped(&[], addr, config, extra_args)
    }

    /// Start sipd through `wrapper` (a program and its arguments that exec sipd's
    /// command line, e.g. one that installs a seccomp filter first).
    pub fn start_wrapped(
        wrapper: &[&str],
        addr: SocketAddr,
        config: &str,
        extra_args: &[&str],
    ) -> Sipd {
        let dir = std::env::temp_dir().join(format!(
            "sipmesh-test-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cfg_path = dir.join("sipd.toml");
        std::fs::write(&cfg_path, config).expect("write config");
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(sipd_bin());
                c
            }
            None => Command::new(sipd_bin()),
        };
        // The gRPC port sits 40000 above the SIP port on the same address unless given
        // (or chosen by the system when that does not fit); the address actually bound is
        // read from sipd's start-up line.
        let grpc = match extra_args.iter().position(|a| *a == "--grpc") {
            Some(i) => extra_args[i + 1].parse().expect("--grpc IP:PORT"),
            None => SocketAddr::new(addr.ip(), addr.port().checked_add(40000).unwrap_or(0)),
        };
        if !extra_args.contains(&"--grpc") {
            cmd.arg("--grpc").arg(grpc.to_string());
        }
        // An ownership segment of its own, in the test's directory.
        let own_segment = dir.join("ownership");
        if !extra_args.contains(&"--segment") {
            cmd.arg("--segment").arg(&own_segment);
        }
        // Call detail records in the test's directory.
        let cdr_file = dir.join("cdr.jsonl");
        if !extra_args.contains(&"--cdr") {
            cmd.arg("--cdr").arg(&cdr_file);
        }
        // A store of its own, removed with the process, unless the test names one.
        let own_data = if extra_args.contains(&"--data-dir") || extra_args.contains(&"--no-store") {
            None
        } else {
            let d = dir.join("data");
            let _ = std::fs::remove_dir_all(&d);
            cmd.arg("--data-dir").arg(&d);
            Some(d)
        };
        let mut child = cmd
            .arg("--config")
            .arg(&cfg_path)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--dump-changes")
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sipd");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = channel();
        {
            let mut err = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(&mut err);
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    stderr.lock().unwrap().push_str(&line);
                    if line.contains(" listening ") {
                        let _ = ready_tx.send(());
                    }
                    line.clear();
                }
            });
        }
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, stdout_rx) = channel();
        {
            let out = child.stdout.take().expect("stdout");
            let lines = stdout_lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let s = Sipd {
            child,
            addr,
            grpc,
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            own_data,
            own_segment,
            cdr_file,
            stdout_lines,
            stdout_rx,
            stderr,
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("sipd did not start: {}", s.stderr.lock().unwrap());
        }
        let bound = s
            .stderr
            .lock()
            .unwrap()
            .split_whitespace()
            .skip_while(|w| *w != "grpc")
            .nth(1)
            .and_then(|a| a.parse().ok());
        let mut s = s;
        if let Some(g) = bound {
            s.grpc = g;
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `sipctl --server <this node> ARGS`; returns its standard output, or the error
    /// output when it fails.
    pub fn sipctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(sipctl_bin());
                c
            }
            None => Command::new(sipctl_bin()),
        };
        let out = cmd
            .arg("--server")
            .arg(self.grpc.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `sipctl --json ARGS` for this node, parsed (panics when it fails).
    pub fn sipctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self
            .sipctl(&a)
            .unwrap_or_else(|e| panic!("sipctl {args:?}: {e}"));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("sipctl {args:?} printed {out:?}: {e}"))
    }

    /// The `usrloc` row of `sipctl sync status`: state, donor, count, digest, repairs.
    pub fn usrloc_status(&self) -> serde_json::Value {
        self.sipctl_json(&["sync", "status"])
            .as_array()
            .and_then(|caps| caps.iter().find(|c| c["name"] == "usrloc").cloned())
            .expect("a usrloc capability")
    }

    /// Kills the process with SIGKILL (only this harness's own child, by PID) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait (bounded) for a change-record line containing every needle.
    pub fn wait_change(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let matches = |l: &str| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self
            .stdout_lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| matches(l))
        {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_rx.recv_timeout(left) {
                Ok(l) if matches(&l) => return Some(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    pub fn change_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().unwrap().clone()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<i32> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return st.code();
        }
        // Only the process this harness started, by its PID.
        let pid = self.child.id() as libc::pid_t;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Sipd {
    fn drop(&mut self) {
        self.terminate();
        if let Some(d) = &self.own_data {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&self.own_segment);
        let _ = std::fs::remove_file(&self.cdr_file);
    }
}

/// A UDP SIP client with bounded receive.
pub struct UdpClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
}

impl UdpClient {
    pub fn bind(local: SocketAddr, server: SocketAddr) -> UdpClient {
        let sock = UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind {local}: {e}"));
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        UdpClient { sock, server }
    }

    pub fn new(server: SocketAddr) -> UdpClient {
        let ip = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let local: SocketAddr = match server.ip() {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(client_ip()), 0),
            IpAddr::V6(_) => ip.parse().unwrap(),
        };
        UdpClient::bind(local, server)
    }

    pub fn local(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    pub fn send(&self, msg: &[u8]) {
        self.sock.send_to(msg, self.server).unwrap();
    }

    /// The next datagram, or None after the timeout.
    pub fn recv(&self) -> Option<String> {
        let mut b = vec![0u8; 65_536];
        match self.sock.recv_from(&mut b) {
            Ok((n, _)) => Some(String::from_utf8_lossy(&b[..n]).into_owned()),
            Err(_) => None,
        }
    }

    pub fn recv_within(&self, t: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(t)).unwrap();
        let r = self.recv();
        self.sock
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        r
    }

    pub fn request(&self, msg: &str) -> String {
        self.send(msg.as_bytes());
        self.recv().unwrap_or_else(|| panic!("no reply to:\n{msg}"))
    }

    /// REGISTERs `user@example.com` with one Contact at this client's address for
    /// `expires` seconds; returns the reply.
    pub fn register_contact(&self, user: &str, call_id: &str, cseq: u32, expires: u32) -> String {
        let contact = format!("Contact: <sip:{user}@{}>", self.local());
        let expires = format!("Expires: {expires}");
        self.request(&register(
            self.local(),
            "UDP",
            user,
            call_id,
            cseq,
            &[&contact, &expires],
        ))
    }
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP SIP client reading whole messages (framed by Content-Length).
pub struct TcpClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl TcpClient {
    pub fn connect(server: SocketAddr) -> TcpClient {
        let stream =
            TcpStream::connect_timeout(&server, Duration::from_secs(3)).expect("tcp connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        TcpClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    pub fn send(&mut self, b: &[u8]) {
        self.stream.write_all(b).unwrap();
    }

    /// Read until `n` bytes are buffered or EOF/timeout; returns what was read.
    pub fn read_raw(&mut self, n: usize) -> Vec<u8> {
        let mut tmp = [0u8; 4096];
        while self.buf.len() < n {
            match self.stream.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(k) => self.buf.extend_from_slice(&tmp[..k]),
            }
        }
        let k = n.min(self.buf.len());
        self.buf.drain(..k).collect()
    }

    /// The next SIP message on the stream.
    pub fn recv(&mut self) -> Option<String> {
        let mut tmp = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let cl = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        (n.trim().eq_ignore_ascii_case("content-length")
                            || n.trim().eq_ignore_ascii_case("l"))
                        .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                let total = end + 4 + cl;
                if self.buf.len() >= total {
                    let m = String::from_utf8_lossy(&self.buf[..total]).into_owned();
                    self.buf.drain(..total);
                    return Some(m);
                }
            }
            match self.stream.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(k) => self.buf.extend_from_slice(&tmp[..k]),
            }
        }
    }

    /// True when the server closed the connection (EOF) within the timeout.
    pub fn closed_within(&mut self, t: Duration) -> bool {
        self.stream.set_read_timeout(Some(t)).unwrap();
        let mut tmp = [0u8; 1024];
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// The status code of a reply (0 when it is not a status line).
/// SIPp exits 0 only when every call succeeded: otherwise fail with the end of its
/// screen and its errors.
pub fn assert_sipp_ok(out: &std::process::Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "SIPp ({what}) reported failed calls:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn status(reply: &str) -> u16 {
    reply.get(8..11).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Values of a header field in a reply, by exact name (case-insensitive).
pub fn header_values<'a>(reply: &'a str, name: &str) -> Vec<&'a str> {
    reply
        .split("\r\n")
        .filter_map(|l| {
            l.split_once(": ")
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .collect()
}

/// A REGISTER from `via` (host:port) for `user@example.com`.
pub fn register(
    via: SocketAddr,
    transport: &str,
    user: &str,
    call_id: &str,
    cseq: u32,
    extra: &[&str],
) -> String {
    let mut m = format!(
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/{transport} {via};rport;branch=z9hG4bK{call_id}x{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@example.com>;tag=t{cseq}\r\nTo: <sip:{user}@example.com>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
    );
    for e in extra {
        m.push_str(e);
        m.push_str("\r\n");
    }
    m.push_str("Content-Length: 0\r\n\r\n");
    m
}

/// Test configuration: two workers, short minimum interval so expiry can be observed.
pub const TEST_CONFIG: &str = "\
[workers]
count = 2
pin = false
tick_ms = 10

[registrar]
min_expires = 1

[sip]
max_message_size = 4096
";
