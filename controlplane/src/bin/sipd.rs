//! `sipd`: one sipmesh node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mimalloc::MiMalloc;
use sipmesh_controlplane::config::{Config, DEFAULT_TOML};
use sipmesh_controlplane::node::{Node, RunOptions};
use sipmesh_dataplane::io::Backend;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const HELP: &str = "\
sipd - sipmesh SIP registrar node

USAGE:
    sipd [OPTIONS]

With no options sipd runs on its embedded defaults: UDP and TCP on 127.0.0.1:5060,
one worker per core.

OPTIONS:
    -c, --config FILE      TOML configuration; keys it leaves out keep their defaults
                           (see --print-defaults)
    -l, --listen ADDR      listen on ADDR (IP:port) for UDP and TCP instead of the
                           configured addresses; repeatable
        --udp ADDR         listen on ADDR for UDP only; repeatable
        --tcp ADDR         listen on ADDR for TCP only; repeatable
    -w, --workers N        worker threads (0 = one per core)
        --backend B        auto | io_uring | epoll
        --no-pin           do not pin workers to cores
        --dump-changes     print every change record (binding added, refreshed,
                           removed, expired) on standard output
        --check-config     validate the configuration and exit
        --print-defaults   print the embedded default configuration and exit
    -h, --help             this text
    -V, --version          version

SIGNALS:
    SIGINT, SIGTERM        stop: workers finish, the change stream is drained
";

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("sipd: {msg}");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut config_path: Option<String> = None;
    let mut listen: Vec<String> = Vec::new();
    let mut udp: Vec<String> = Vec::new();
    let mut tcp: Vec<String> = Vec::new();
    let mut workers: Option<String> = None;
    let mut backend: Option<String> = None;
    let mut no_pin = false;
    let mut opts = RunOptions::default();
    let mut check_only = false;
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(format!("{name} needs a value")))
        };
        match a.as_str() {
            "-c" | "--config" => config_path = Some(value(&a)),
            "-l" | "--listen" => listen.push(value(&a)),
            "--udp" => udp.push(value(&a)),
            "--tcp" => tcp.push(value(&a)),
            "-w" | "--workers" => workers = Some(value(&a)),
            "--backend" => backend = Some(value(&a)),
            "--no-pin" => no_pin = true,
            "--dump-changes" => opts.dump_changes = true,
            "--check-config" => check_only = true,
            "--print-defaults" => {
                print!("{DEFAULT_TOML}");
                return;
            }
            "-h" | "--help" => {
                print!("{HELP}");
                return;
            }
            "-V" | "--version" => {
                println!("sipd {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            other => fail(format!("unknown option `{other}` (see --help)")),
        }
    }
    let text = match &config_path {
        Some(p) => {
            std::fs::read_to_string(p).unwrap_or_else(|e| fail(format!("cannot read {p}: {e}")))
        }
        None => String::new(),
    };
    let mut cfg = Config::from_toml(&text).unwrap_or_else(|e| fail(e));
    let parse = |opt: &str, v: &[String]| -> Vec<std::net::SocketAddr> {
        v.iter()
            .map(|s| {
                s.parse().unwrap_or_else(|e| {
                    fail(format!("{opt}: `{s}` is not an IP:port address ({e})"))
                })
            })
            .collect()
    };
    if !listen.is_empty() || !udp.is_empty() || !tcp.is_empty() {
        let both = parse("--listen", &listen);
        cfg.io.udp = both.iter().copied().chain(parse("--udp", &udp)).collect();
        cfg.io.tcp = both.iter().copied().chain(parse("--tcp", &tcp)).collect();
    }
    if let Some(w) = workers {
        let n: usize = w
            .parse()
            .unwrap_or_else(|_| fail(format!("--workers: `{w}` is not a number")));
        cfg.io.workers = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
    }
    if let Some(b) = backend {
        cfg.io.backend = match b.as_str() {
            "auto" => Backend::Auto,
            "io_uring" | "io-uring" => Backend::IoUring,
            "epoll" => Backend::Epoll,
            _ => fail(format!(
                "--backend: `{b}` is not one of auto, io_uring, epoll"
            )),
        };
    }
    if no_pin {
        cfg.io.pin_cores = false;
    }
    if check_only {
        println!("configuration ok");
        return;
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, shutdown.clone()) {
            fail(format!("cannot install signal handler: {e}"));
        }
    }
    let node = Node::start(cfg, opts, shutdown.clone()).unwrap_or_else(|e| fail(e));
    let backends: Vec<&str> = node.workers.backends().iter().map(|b| b.as_str()).collect();
    eprintln!(
        "sipd: node {} listening udp {:?} tcp {:?} with {} workers ({})",
        node.config.node_id,
        node.workers.udp_addrs(),
        node.workers.tcp_addrs(),
        node.workers.len(),
        backends.join(",")
    );
    while !shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let usrloc = node.usrloc.clone();
    let drained = node.changes_drained.clone();
    let stats: Vec<_> = node.core_stats.clone();
    if let Err(e) = node.stop() {
        eprintln!("sipd: worker error: {e}");
    }
    let req: u64 = stats
        .iter()
        .map(|s| s.requests.load(Ordering::Relaxed))
        .sum();
    eprintln!(
        "sipd: stopped; {req} requests, {} bindings in {} AoRs, {} change records drained",
        usrloc.bindings(),
        usrloc.aors(),
        drained.load(Ordering::Relaxed)
    );
}
