//! `sipload`: runs the client side of a SIPp XML scenario from several threads, each with
//! a UDP socket of its own, at a target call rate, and reports what SIPp reports: calls
//! made, succeeded and failed (by reason), retransmissions, the rate achieved, and the
//! response-time percentiles of the steps marked `rtd`.
//!
//! ```text
//! sipload HOST:PORT -sf SCENARIO.xml [-s SERVICE] [-i LOCAL_IP] [-p FIRST_PORT]
//!         [-t THREADS] [-r CALLS_PER_S] [-m CALLS] [-l MAX_LIVE] [-d PAUSE_MS]
//!         [-timeout S] [-inf FILE.csv]
//! sipload -sf SERVER_SCENARIO.xml [-i LOCAL_IP] [-p PORT] [-m CALLS] [-timeout S]
//! ```
//!
//! A scenario that starts with `<recv request=...>` is a server (a UAS): each request
//! with a new Call-ID that matches its first step starts a call, and its responses go
//! back to where the request came from; `-m` calls end the run (or `-timeout`).
//!
//! Exit status 0 when every call succeeded, 1 when some failed, 2 on a usage error.
//! Bounded: at most `-m` calls and `-timeout` seconds (default 60).

mod scenario;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use scenario::{Expect, Scenario, Step};

const USAGE: &str = "usage: sipload HOST:PORT -sf SCENARIO.xml [-s SERVICE] [-i LOCAL_IP] \
[-p FIRST_PORT] [-t THREADS] [-r CALLS_PER_S] [-m CALLS] [-l MAX_LIVE] [-d PAUSE_MS] \
[-timeout S] [-inf FILE.csv]";

#[derive(Clone)]
struct Opts {
    remote: SocketAddr,
    scenario: Arc<Scenario>,
    service: String,
    local_ip: std::net::IpAddr,
    port: u16,
    threads: usize,
    rate: f64,
    calls: u64,
    limit: usize,
    pause_ms: u64,
    timeout: Duration,
    fields: Arc<Vec<Vec<String>>>,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("sipload: {msg}");
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut args = std::env::args().skip(1);
    let mut remote = None;
    let mut sf = None;
    let mut service = "service".to_string();
    let mut local_ip: std::net::IpAddr = [127, 0, 0, 1].into();
    let mut port = 5080u16;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut rate = 10.0;
    let mut calls = 1u64;
    let mut limit = 10_000usize;
    let mut pause_ms = 0u64;
    let mut timeout = Duration::from_secs(60);
    let mut inf = None;
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(format!("{name} needs a value\n{USAGE}")))
        };
        let num = |name: &str, v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| fail(format!("{name}: `{v}` is not a number")))
        };
        match a.as_str() {
            "-sf" => sf = Some(val("-sf")),
            "-s" => service = val("-s"),
            "-i" => {
                let v = val("-i");
                local_ip = v
                    .parse()
                    .unwrap_or_else(|_| fail(format!("-i: `{v}` is not an IP address")))
            }
            "-p" => port = num("-p", val("-p")) as u16,
            "-t" => threads = num("-t", val("-t")).max(1) as usize,
            "-r" => {
                let v = val("-r");
                rate = v
                    .parse()
                    .unwrap_or_else(|_| fail(format!("-r: `{v}` is not a rate")))
            }
            "-m" => calls = num("-m", val("-m")),
            "-l" => limit = num("-l", val("-l")).max(1) as usize,
            "-d" => pause_ms = num("-d", val("-d")),
            "-timeout" => {
                let v = val("-timeout");
                timeout = Duration::from_secs(num("-timeout", v.trim_end_matches('s').to_string()))
            }
            "-inf" => inf = Some(val("-inf")),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            s if remote.is_none() && !s.starts_with('-') => {
                remote =
                    Some(s.parse::<SocketAddr>().unwrap_or_else(|_| {
                        fail(format!("`{s}` is not HOST:PORT (an IP address)"))
                    }))
            }
            other => fail(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    let sf = sf.unwrap_or_else(|| fail(format!("-sf SCENARIO.xml is needed\n{USAGE}")));
    let text = std::fs::read_to_string(&sf).unwrap_or_else(|e| fail(format!("{sf}: {e}")));
    let scenario = Scenario::parse(&text).unwrap_or_else(|e| fail(format!("{sf}: {e}")));
    let remote = match remote {
        Some(r) => r,
        // A server answers whoever calls it.
        None if scenario.is_server() => SocketAddr::from(([0, 0, 0, 0], 0)),
        None => fail(USAGE),
    };
    let fields = match inf {
        None => Vec::new(),
        Some(f) => {
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| fail(format!("{f}: {e}")));
            let mut lines = text.lines();
            // SIPp's first line names the order (SEQUENTIAL, RANDOM ...).
            let first = lines.next().unwrap_or_default();
            let data: Vec<Vec<String>> = if first.contains(';') {
                text.lines()
            } else {
                lines
            }
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split(';').map(str::to_string).collect())
            .collect();
            if data.is_empty() {
                fail(format!("{f}: no data lines"));
            }
            data
        }
    };
    Opts {
        remote,
        scenario: Arc::new(scenario),
        service,
        local_ip,
        port,
        threads: threads.min(calls.max(1) as usize),
        rate,
        calls,
        limit,
        pause_ms,
        timeout,
        fields: Arc::new(fields),
    }
}

/// Totals shared by the threads (for the progress line).
#[derive(Default)]
struct Live {
    started: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    retrans: AtomicU64,
}

/// What one thread reports at the end.
#[derive(Default)]
struct Report {
    ok: u64,
    failed: HashMap<String, u64>,
    retrans: u64,
    rtd_us: Vec<u32>,
}

struct Sent {
    bytes: Vec<u8>,
    next: Instant,
    interval: Duration,
    invite: bool,
    first: Instant,
}

struct Call {
    number: u64,
    /// Where its messages go: the remote (client) or whoever sent its first request
    /// (server).
    peer: SocketAddr,
    call_id: String,
    step: usize,
    start: Instant,
    /// The last message received (for `[last_*:]`).
    last: String,
    routes: String,
    next_url: String,
    peer_tag: String,
    sent: Option<Sent>,
    pause_until: Option<Instant>,
    /// Steps already passed that received a message (retransmissions of theirs are
    /// ignored).
    seen_codes: Vec<u16>,
    /// CSeqs of the requests received (a retransmission of one is not unexpected).
    seen_requests: Vec<String>,
    /// Call variables (`<assignstr>` in a `<nop>`), `[$name]` in a message.
    vars: Vec<(String, String)>,
}

fn header_lines<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let head = msg.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .skip(1)
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .collect()
}

fn header_value<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    header_lines(msg, name)
        .first()
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())
}

fn angle(v: &str) -> &str {
    match (v.find('<'), v.find('>')) {
        (Some(a), Some(b)) if b > a => &v[a + 1..b],
        _ => v.split(';').next().unwrap_or(v).trim(),
    }
}

struct Ctx<'a> {
    o: &'a Opts,
    local: SocketAddr,
    pid: u32,
}

/// Fills a template for `call`: keywords replaced, lines that became empty in the head
/// dropped, `[len]` set to the body's length.
fn render(t: &str, call: &Call, step: usize, ctx: &Ctx<'_>) -> Vec<u8> {
    let out = expand(t, call, step, ctx);
    // Lines of the head that became empty (an absent [last_Record-Route:]) go.
    let (head, body) = match out.find("\r\n\r\n") {
        Some(i) => (&out[..i], &out[i + 4..]),
        None => (out.as_str(), ""),
    };
    let head: Vec<&str> = head.split("\r\n").filter(|l| !l.is_empty()).collect();
    let mut msg = head.join("\r\n");
    msg.push_str("\r\n\r\n");
    msg.push_str(body);
    msg.replace("\u{0}LEN\u{0}", &body.len().to_string())
        .into_bytes()
}

/// The keywords of a template replaced (`[len]` by a placeholder that `render` fills).
fn expand(t: &str, call: &Call, step: usize, ctx: &Ctx<'_>) -> String {
    let o = ctx.o;
    let ipv = if ctx.local.is_ipv4() { "4" } else { "6" };
    let mut out = String::with_capacity(t.len() + 256);
    let mut rest = t;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find(']') else {
            out.push_str(&rest[i..]);
            rest = "";
            break;
        };
        let key = &rest[i + 1..i + j];
        match key {
            "service" => out.push_str(&o.service),
            "remote_ip" => out.push_str(&o.remote.ip().to_string()),
            "remote_port" => out.push_str(&o.remote.port().to_string()),
            "local_ip" | "media_ip" => out.push_str(&ctx.local.ip().to_string()),
            "local_port" => out.push_str(&ctx.local.port().to_string()),
            "media_port" => out.push_str("6000"),
            "local_ip_type" | "media_ip_type" => out.push_str(ipv),
            "transport" => out.push_str("UDP"),
            "pid" => out.push_str(&ctx.pid.to_string()),
            "call_number" => out.push_str(&call.number.to_string()),
            "call_id" => out.push_str(&call.call_id),
            "branch" => {
                out.push_str(&format!("z9hG4bK-{}-{}-{}", ctx.pid, call.number, step));
            }
            // The branch of the message N steps back (a CANCEL, the ACK of a non-2xx),
            // as SIPp numbers them.
            k if k.starts_with("branch-") && k[7..].parse::<usize>().is_ok() => {
                let back: usize = k[7..].parse().unwrap_or(0);
                out.push_str(&format!(
                    "z9hG4bK-{}-{}-{}",
                    ctx.pid,
                    call.number,
                    step.saturating_sub(back)
                ));
            }
            k if k.starts_with("hdrtoken:") => {
                let v = header_value(&call.last, &k[9..]).unwrap_or("");
                out.push_str(v.split_whitespace().next().unwrap_or(""));
            }
            "last_cseq_number" => {
                let cseq = header_value(&call.last, "CSeq").unwrap_or("");
                out.push_str(cseq.split_whitespace().next().unwrap_or(""));
            }
            k if k.starts_with('$') => {
                if let Some((_, v)) = call.vars.iter().find(|(n, _)| n == &k[1..]) {
                    out.push_str(v);
                }
            }
            "peer_tag_param" => {
                if !call.peer_tag.is_empty() {
                    out.push_str(";tag=");
                    out.push_str(&call.peer_tag);
                }
            }
            "routes" => {
                if !call.routes.is_empty() {
                    out.push_str("Route: ");
                    out.push_str(&call.routes);
                }
            }
            "next_url" => out.push_str(&call.next_url),
            "len" => out.push_str("\u{0}LEN\u{0}"),
            k if k.starts_with("last_") && k.ends_with(':') => {
                let name = &k[5..k.len() - 1];
                out.push_str(&header_lines(&call.last, name).join("\r\n"));
            }
            k if k.starts_with("field") => {
                let n: usize = k[5..].parse().unwrap_or(usize::MAX);
                if !o.fields.is_empty() {
                    let line = &o.fields[(call.number as usize - 1) % o.fields.len()];
                    out.push_str(line.get(n).map_or("", String::as_str));
                }
            }
            _ => {
                // Not a keyword: keep it as written.
                out.push('[');
                out.push_str(key);
                out.push(']');
            }
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

/// Timer of an unanswered request: doubling from its `retrans` interval, capped at 4 s
/// for non-INVITE (RFC 3261 timers A and E).
fn retransmit(s: &mut Sent, now: Instant) {
    s.next = now + s.interval;
    s.interval = if s.invite {
        s.interval * 2
    } else {
        (s.interval * 2).min(Duration::from_millis(4000))
    };
}

fn run_thread(o: Opts, index: usize, live: Arc<Live>, t0: Instant) -> Report {
    let sock = UdpSocket::bind((o.local_ip, o.port + index as u16)).unwrap_or_else(|e| {
        fail(format!(
            "bind {}:{}: {e}",
            o.local_ip,
            o.port + index as u16
        ))
    });
    sock.set_nonblocking(true).ok();
    let local = sock.local_addr().expect("bound");
    let ctx = Ctx {
        o: &o,
        local,
        pid: std::process::id(),
    };
    let steps = &o.scenario.steps;
    let threads = o.threads as u64;
    // This thread makes calls index+1, index+1+T, ...
    let mine = (o.calls + threads - 1 - index as u64) / threads;
    let rate = if o.scenario.is_server() {
        0.0
    } else {
        o.rate / threads as f64
    };
    let mut served = 0u64;
    let mut made = 0u64;
    let mut calls: HashMap<String, Call> = HashMap::new();
    // Calls to advance now (new, or a message just moved them on), and the instants the
    // others wait for (a pause's end, a retransmission, their timeout): a loop touches
    // only the calls that have something to do, never all of them.
    let mut ready: Vec<String> = Vec::new();
    let mut timers: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
    let mut report = Report::default();
    let mut buf = vec![0u8; 65_535];
    let deadline = t0 + o.timeout;
    let give_up = Duration::from_secs(32);
    loop {
        let now = Instant::now();
        if now >= deadline {
            for _ in calls.drain() {
                *report.failed.entry("run timeout".into()).or_default() += 1;
                live.failed.fetch_add(1, Ordering::Relaxed);
            }
            break;
        }
        // New calls at the rate asked, within the limit of live calls.
        let due = ((now - t0).as_secs_f64() * rate) as u64 + 1;
        while !o.scenario.is_server()
            && made < mine.min(due)
            && calls.len() < o.limit / o.threads + 1
        {
            let number = made * threads + index as u64 + 1;
            made += 1;
            live.started.fetch_add(1, Ordering::Relaxed);
            let call = Call {
                number,
                peer: o.remote,
                call_id: format!("{number}-{}@{}", ctx.pid, local.ip()),
                step: 0,
                start: now,
                last: String::new(),
                routes: String::new(),
                next_url: String::new(),
                peer_tag: String::new(),
                sent: None,
                pause_until: None,
                seen_codes: Vec::new(),
                seen_requests: Vec::new(),
                vars: Vec::new(),
            };
            ready.push(call.call_id.clone());
            calls.insert(call.call_id.clone(), call);
        }
        while timers.peek().is_some_and(|Reverse((t, _))| *t <= now) {
            if let Some(Reverse((_, id))) = timers.pop() {
                ready.push(id);
            }
        }
        // Advance the calls that can: sends, pauses, timers.
        let mut done: Vec<(String, Result<(), String>)> = Vec::new();
        for id in std::mem::take(&mut ready) {
            let Some(c) = calls.get_mut(&id) else {
                continue;
            };
            loop {
                if c.step >= steps.len() {
                    done.push((id.clone(), Ok(())));
                    break;
                }
                match &steps[c.step] {
                    Step::Send { template, retrans } => {
                        let bytes = render(template, c, c.step, &ctx);
                        let _ = sock.send_to(&bytes, c.peer);
                        let invite = bytes.starts_with(b"INVITE ");
                        c.sent = retrans.map(|ms| Sent {
                            bytes,
                            next: now + Duration::from_millis(ms),
                            interval: Duration::from_millis(ms * 2),
                            invite,
                            first: now,
                        });
                        c.step += 1;
                    }
                    Step::Nop(assign) => {
                        for (name, t) in assign {
                            let v = expand(t, c, c.step, &ctx);
                            c.vars.retain(|(n, _)| n != name);
                            c.vars.push((name.clone(), v));
                        }
                        c.step += 1;
                    }
                    Step::Pause(ms) => {
                        let until = *c
                            .pause_until
                            .get_or_insert(now + Duration::from_millis(ms.unwrap_or(o.pause_ms)));
                        if now >= until {
                            c.pause_until = None;
                            c.step += 1;
                        } else {
                            timers.push(Reverse((until, id.clone())));
                            break;
                        }
                    }
                    Step::Recv { .. } => {
                        if let Some(s) = c.sent.as_mut()
                            && now >= s.next
                        {
                            if now - s.first > give_up {
                                done.push((
                                    id.clone(),
                                    Err("no answer (retransmissions exhausted)".into()),
                                ));
                                break;
                            }
                            let _ = sock.send_to(&s.bytes, c.peer);
                            retransmit(s, now);
                            report.retrans += 1;
                            live.retrans.fetch_add(1, Ordering::Relaxed);
                        }
                        if now - c.start > give_up + give_up {
                            done.push((id.clone(), Err("recv timeout".into())));
                            break;
                        }
                        let wake = c.start + give_up + give_up + Duration::from_millis(1);
                        let wake = c.sent.as_ref().map_or(wake, |s| s.next.min(wake));
                        timers.push(Reverse((wake, id.clone())));
                        break;
                    }
                }
            }
        }
        for (id, r) in done {
            // A call may have been advanced twice in one batch (ready twice): counted once.
            if calls.remove(&id).is_none() {
                continue;
            }
            match r {
                Ok(()) => {
                    report.ok += 1;
                    live.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    *report.failed.entry(e).or_default() += 1;
                    live.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let finished = if o.scenario.is_server() {
            served >= mine
        } else {
            made >= mine
        };
        if finished && calls.is_empty() {
            break;
        }
        // Receive what came.
        let mut got = 0;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            got += 1;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let Some(cid) = header_value(&text, "Call-ID").or_else(|| header_value(&text, "i"))
            else {
                continue;
            };
            // A server: a new call starts with a request matching the first step.
            if !calls.contains_key(cid)
                && o.scenario.is_server()
                && served < mine
                && let Some(Step::Recv {
                    what: Expect::Request(m),
                    ..
                }) = steps.first()
                && text.starts_with(&format!("{m} "))
            {
                served += 1;
                live.started.fetch_add(1, Ordering::Relaxed);
                calls.insert(
                    cid.to_string(),
                    Call {
                        number: served * threads - (threads - 1 - index as u64),
                        peer: from,
                        call_id: cid.to_string(),
                        step: 0,
                        start: Instant::now(),
                        last: String::new(),
                        routes: String::new(),
                        next_url: String::new(),
                        peer_tag: String::new(),
                        sent: None,
                        pause_until: None,
                        seen_codes: Vec::new(),
                        seen_requests: Vec::new(),
                        vars: Vec::new(),
                    },
                );
            }
            let Some(c) = calls.get_mut(cid) else {
                continue;
            };
            let first = text.split("\r\n").next().unwrap_or("");
            let (code, method) = match first.strip_prefix("SIP/2.0 ") {
                Some(r) => (r.get(..3).and_then(|s| s.parse::<u16>().ok()), None),
                None => (None, first.split(' ').next()),
            };
            // The step it answers: the current recv, or a later optional-skipped one.
            let mut k = c.step;
            let mut matched = None;
            while let Some(Step::Recv { what, optional, .. }) = steps.get(k) {
                if expects(what, code, method) {
                    matched = Some(k);
                    break;
                }
                if !optional {
                    break;
                }
                k += 1;
            }
            let Some(k) = matched else {
                // A retransmission of something already received is ignored, and so is a
                // late message of an optional step already passed; anything else is
                // unexpected, as SIPp counts it.
                let cseq = header_value(&text, "CSeq").unwrap_or("");
                if code.is_some_and(|x| c.seen_codes.contains(&x))
                    || (code.is_none() && c.seen_requests.iter().any(|q| q == cseq))
                    || late_optional(steps, c.step, code, method)
                    || only_sends_left(steps, c.step)
                {
                    continue;
                }
                let what = code.map_or_else(
                    || format!("unexpected {}", method.unwrap_or("?")),
                    |x| format!("unexpected {x}"),
                );
                *report.failed.entry(what).or_default() += 1;
                live.failed.fetch_add(1, Ordering::Relaxed);
                let id = c.call_id.clone();
                calls.remove(&id);
                continue;
            };
            let Step::Recv { rtd, rrs, .. } = &steps[k] else {
                continue;
            };
            if *rtd {
                let us = c.start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                if report.rtd_us.len() < 10_000_000 {
                    report.rtd_us.push(us);
                }
            }
            if *rrs {
                let rr: Vec<&str> = header_lines(&text, "Record-Route")
                    .iter()
                    .filter_map(|l| l.split_once(':').map(|(_, v)| v.trim()))
                    .collect();
                // RFC 3261 §12.1.2: the caller's route set is the Record-Route reversed.
                let mut rr = rr
                    .join(", ")
                    .split(", ")
                    .map(str::to_string)
                    .collect::<Vec<_>>();
                rr.reverse();
                c.routes = rr.join(", ");
                c.next_url = header_value(&text, "Contact")
                    .or_else(|| header_value(&text, "m"))
                    .map(|v| angle(v).to_string())
                    .unwrap_or_default();
            }
            // The peer's tag: the To tag of a response, the From tag of a request (a
            // NOTIFY in a subscription: its To tag is ours).
            let (long, short) = if code.is_some() {
                ("To", "t")
            } else {
                ("From", "f")
            };
            if let Some(v) = header_value(&text, long).or_else(|| header_value(&text, short))
                && let Some(i) = v.find(";tag=")
            {
                c.peer_tag = v[i + 5..].split(';').next().unwrap_or("").to_string();
            }
            match code {
                Some(x) => {
                    c.seen_codes.push(x);
                    // A final response ends the retransmissions of the request.
                    if x >= 200 || c.sent.as_ref().is_some_and(|s| s.invite) {
                        c.sent = None;
                    }
                }
                // A server: the request it waited for (an ACK) ends the retransmissions
                // of its response.
                None => {
                    c.sent = None;
                    let cseq = header_value(&text, "CSeq").unwrap_or("").to_string();
                    c.seen_requests.push(cseq);
                }
            }
            ready.push(c.call_id.clone());
            c.last = text;
            c.step = k + 1;
        }
        if got == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    report
}

/// Whether a message (a response `code` or a request `method`) is what `what` waits for.
fn expects(what: &Expect, code: Option<u16>, method: Option<&str>) -> bool {
    match (what, code, method) {
        (Expect::Response(w), Some(got), _) => *w == got,
        (Expect::Request(w), _, Some(m)) => w == m,
        _ => false,
    }
}

/// Whether the call at step `at` waits for nothing more: only its last sends are left
/// (made at the next turn of the loop). A message then is for a call that SIPp would have
/// finished already (a 200 to a CANCEL after the 487), ignored as SIPp ignores messages
/// of dead calls.
fn only_sends_left(steps: &[Step], at: usize) -> bool {
    !steps
        .get(at..)
        .unwrap_or(&[])
        .iter()
        .any(|s| matches!(s, Step::Recv { .. }))
}

/// Whether a message matches a `recv` before step `at` that a later message overtook (a
/// 180 relayed after the 200 by another process of a proxy) and is to be ignored, as
/// SIPp does with "old non-mandatory receptions": an optional step with no mandatory step
/// between it and the call's current one, or an `optional="global"` one, or any step of
/// a named transaction (`response_txn`) when the message is a provisional response.
fn late_optional(steps: &[Step], at: usize, code: Option<u16>, method: Option<&str>) -> bool {
    let mut contiguous = true;
    for s in steps[..at.min(steps.len())].iter().rev() {
        if let Step::Recv {
            what,
            optional,
            global,
            txn,
            ..
        } = s
            && expects(what, code, method)
        {
            let provisional = code.is_some_and(|c| (100..200).contains(&c));
            if (*optional && (contiguous || *global)) || (*txn && provisional) {
                return true;
            }
        }
        if !matches!(s, Step::Recv { optional: true, .. }) {
            contiguous = false;
        }
    }
    false
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn main() {
    let o = parse_args();
    let live = Arc::new(Live::default());
    let t0 = Instant::now();
    eprintln!(
        "sipload: {} ({} steps) -> {}, {} calls at {}/s from {} threads",
        o.scenario.name,
        o.scenario.steps.len(),
        o.remote,
        o.calls,
        o.rate,
        o.threads
    );
    let handles: Vec<_> = (0..o.threads)
        .map(|i| {
            let (o, live) = (o.clone(), live.clone());
            std::thread::spawn(move || run_thread(o, i, live, t0))
        })
        .collect();
    // A progress line every second.
    let progress = {
        let live = live.clone();
        let total = o.calls;
        std::thread::spawn(move || {
            let mut last = 0;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let (ok, failed) = (
                    live.ok.load(Ordering::Relaxed),
                    live.failed.load(Ordering::Relaxed),
                );
                eprintln!(
                    "sipload: {:>6.1} s  started {}  ok {}  failed {}  retrans {}  ({}/s)",
                    t0.elapsed().as_secs_f64(),
                    live.started.load(Ordering::Relaxed),
                    ok,
                    failed,
                    live.retrans.load(Ordering::Relaxed),
                    ok + failed - last
                );
                last = ok + failed;
                if last >= total {
                    return;
                }
            }
        })
    };
    let mut total = Report::default();
    for h in handles {
        let r = h.join().expect("a sipload thread");
        total.ok += r.ok;
        total.retrans += r.retrans;
        for (k, v) in r.failed {
            *total.failed.entry(k).or_default() += v;
        }
        total.rtd_us.extend(r.rtd_us);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    drop(progress);
    total.rtd_us.sort_unstable();
    let failed: u64 = total.failed.values().sum();
    println!("scenario          {}", o.scenario.name);
    println!("calls             {}", total.ok + failed);
    println!("successful        {}", total.ok);
    println!("failed            {failed}");
    let mut reasons: Vec<_> = total.failed.iter().collect();
    reasons.sort();
    for (k, v) in reasons {
        println!("  {k:<30} {v}");
    }
    println!("retransmissions   {}", total.retrans);
    println!("elapsed           {elapsed:.2} s");
    println!(
        "rate              {:.0} calls/s",
        (total.ok + failed) as f64 / elapsed.max(1e-9)
    );
    let r = &total.rtd_us;
    println!(
        "response time     p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({} samples)",
        pct(r, 0.5),
        pct(r, 0.9),
        pct(r, 0.99),
        pct(r, 1.0),
        r.len()
    );
    std::process::exit(if failed == 0 && total.ok == o.calls {
        0
    } else {
        1
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(f: &str) -> Scenario {
        let path = format!("{}/../profiles/{f}", env!("CARGO_MANIFEST_DIR"));
        Scenario::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_late_optional_response_is_not_unexpected() {
        // call-uac: 0 INVITE, 1 100?, 2 180?, 3 200 (all three of the "invite"
        // transaction), 4 ACK, 5 pause, 6 BYE, 7 200. At the hold after the ACK, or
        // waiting for the BYE's 200: a 180 or a 100 that the 200 overtook.
        let s = load("call-uac.xml");
        assert!(late_optional(&s.steps, 5, Some(180), None));
        assert!(late_optional(&s.steps, 7, Some(100), None));
        // Not before its step has been passed, and not a final response of a mandatory
        // step.
        assert!(!late_optional(&s.steps, 1, Some(180), None));
        assert!(!late_optional(&s.steps, 7, Some(486), None));
        assert!(!late_optional(&s.steps, 5, Some(200), None));
        assert!(!late_optional(&s.steps, 7, None, Some("BYE")));
        // A plain optional step only while no mandatory one has been passed since:
        // call-cancel-uac's 200 to the CANCEL (5, optional) while at the 487 (6), not
        // once the 487 has been passed.
        let c = load("call-cancel-uac.xml");
        assert!(late_optional(&c.steps, 6, Some(200), None));
        assert!(!late_optional(&c.steps, 7, Some(200), None));
        // ... but at 7 only the ACK is left to send: the call is as good as over.
        assert!(only_sends_left(&c.steps, 7));
        assert!(!only_sends_left(&c.steps, 6));
        assert!(!only_sends_left(&s.steps, 5));
        assert!(expects(&Expect::Response(200), Some(200), None));
        assert!(!expects(&Expect::Request("ACK".into()), Some(200), None));
    }
}
