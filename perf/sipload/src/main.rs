//! `sipload`: runs the client side of a SIPp XML scenario from several threads, each with
//! a UDP socket of its own served by the project's worker I/O layer (io_uring with a
//! multishot receive and batched sends, or epoll with `recvmmsg`/`sendmmsg`), at a target
//! call rate, and reports what SIPp reports: calls made, succeeded and failed (by reason),
//! retransmissions, the rate achieved, and response-time percentiles (HDR histograms):
//! the steps marked `rtd`, and every message exchange (from a message sent to the next
//! one received).
//!
//! ```text
//! sipload HOST:PORT -sf SCENARIO.xml [-s SERVICE] [-i LOCAL_IP] [-p FIRST_PORT]
//!         [-t THREADS] [-r CALLS_PER_S] [-m CALLS] [-l MAX_LIVE] [-d PAUSE_MS]
//!         [-timeout S] [-inf FILE.csv] [-io auto|io_uring|epoll]
//! sipload -sf SERVER_SCENARIO.xml [-i LOCAL_IP] [-p PORT] [-m CALLS] [-timeout S]
//! ```
//!
//! A scenario that starts with `<recv request=...>` is a server (a UAS): each request
//! with a new Call-ID that matches its first step starts a call, and its responses go
//! back to where the request came from; `-m` calls end the run (or `-timeout`).
//!
//! Exit status 0 when every call succeeded, 1 when some failed, 2 on a usage error.
//! Bounded: at most `-m` calls and `-timeout` seconds (default 60).

mod calls;
mod scenario;
mod sip;
mod template;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use calls::{Gen, Live, Report};
use scenario::{Expect, Scenario, Step};
use sipmesh_dataplane::io::{Backend, IoConfig, spawn_workers};

const USAGE: &str = "usage: sipload HOST:PORT -sf SCENARIO.xml [-s SERVICE] [-i LOCAL_IP] \
[-p FIRST_PORT] [-t THREADS] [-r CALLS_PER_S] [-m CALLS] [-l MAX_LIVE] [-d PAUSE_MS] \
[-timeout S] [-inf FILE.csv] [-io auto|io_uring|epoll]";

pub struct Opts {
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
    fields: Vec<Vec<String>>,
    backend: Backend,
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
    let mut backend = Backend::Auto;
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
            "-io" => {
                backend = match val("-io").as_str() {
                    "auto" => Backend::Auto,
                    "io_uring" => Backend::IoUring,
                    "epoll" => Backend::Epoll,
                    v => fail(format!("-io: `{v}` is not auto, io_uring or epoll")),
                }
            }
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
    if port == 0 || u32::from(port) + threads as u32 > 65_536 {
        fail(format!(
            "-p: {port}: each thread binds a port from it up (1..=65535)"
        ));
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
        fields,
        backend,
    }
}

/// What a step's message is, for the report: a request's method or a response's status.
fn label(step: &Step) -> String {
    match step {
        Step::Send { template, .. } => {
            let first = template.split("\r\n").next().unwrap_or("");
            match first.strip_prefix("SIP/2.0 ") {
                Some(r) => r.split(' ').next().unwrap_or("?").to_string(),
                None => first.split(' ').next().unwrap_or("?").to_string(),
            }
        }
        Step::Recv {
            what: Expect::Response(c),
            ..
        } => c.to_string(),
        Step::Recv {
            what: Expect::Request(m),
            ..
        } => m.clone(),
        _ => String::new(),
    }
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() {
    let o = Arc::new(parse_args());
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
    let shutdown = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<Report>();
    let mut workers = Vec::with_capacity(o.threads);
    for i in 0..o.threads {
        let local = SocketAddr::new(o.local_ip, o.port + i as u16);
        let cfg = IoConfig {
            udp: vec![local],
            workers: 1,
            backend: o.backend,
            tick_ms: 1,
            // 16 KiB datagrams at most: the driver's send budget then holds 512 of them.
            max_message_size: 16 << 10,
            thread_name: "sipload",
            ..IoConfig::default()
        };
        let (o2, live, done) = (o.clone(), live.clone(), done_tx.clone());
        let make = move |_| Gen::new(o2.clone(), i, local, live.clone(), t0, done.clone());
        match spawn_workers(&cfg, make, shutdown.clone()) {
            Ok(w) => workers.push(w),
            Err(e) => {
                shutdown.store(true, Ordering::Relaxed);
                fail(format!("{local}: {e}"))
            }
        }
    }
    drop(done_tx);
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
    // Each thread hands its report over when its calls are done or at the run's timeout.
    let mut total = Report::new(&o.scenario.steps);
    let mut missing = 0;
    for _ in 0..o.threads {
        match done_rx.recv_timeout(o.timeout + Duration::from_secs(10)) {
            Ok(r) => total.merge(r),
            Err(_) => missing += 1,
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    shutdown.store(true, Ordering::Relaxed);
    let mut io = sipmesh_dataplane::io::IoStatsSnapshot::default();
    let mut backends = Vec::new();
    for w in workers {
        io = io + w.totals();
        backends.extend(w.backends().iter().map(|b| b.as_str()));
        if let Err(e) = w.join() {
            eprintln!("sipload: {e}");
        }
    }
    drop(progress);
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
    if missing > 0 {
        println!("  {:<30} {missing}", "threads that did not report");
    }
    println!("retransmissions   {}", total.retrans);
    println!("elapsed           {elapsed:.2} s");
    println!(
        "rate              {:.0} calls/s",
        (total.ok + failed) as f64 / elapsed.max(1e-9)
    );
    let r = &total.rtd;
    println!(
        "response time     p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({} samples)",
        ms(r, 0.5),
        ms(r, 0.9),
        ms(r, 0.99),
        r.max() as f64 / 1000.0,
        r.len()
    );
    println!("exchanges         (ms: p50 p90 p99 p99.9 max, samples)");
    let steps = &o.scenario.steps;
    for (k, h) in total.exchanges.iter().enumerate() {
        let Some(h) = h.as_ref().filter(|h| !h.is_empty()) else {
            continue;
        };
        let before = steps[..k]
            .iter()
            .rev()
            .find(|s| matches!(s, Step::Send { .. }))
            .map_or_else(String::new, label);
        println!(
            "  step {k:<3} {:<22} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.3}  {}",
            format!("{before} -> {}", label(&steps[k])),
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0,
            h.len()
        );
    }
    backends.sort_unstable();
    backends.dedup();
    println!(
        "io                {} sent {} received {} send waits {} dropped {} unparsable {}",
        backends.join(","),
        io.udp_tx,
        io.udp_rx,
        total.send_waits,
        io.tx_dropped,
        total.unparsable
    );
    std::process::exit(if failed == 0 && missing == 0 && total.ok == o.calls {
        0
    } else {
        1
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use calls::{expects, late_optional, only_sends_left};

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
