//! `sipd`: one sipmesh node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mimalloc::MiMalloc;
use sipmesh_controlplane::config::{Config, DEFAULT_TOML, check_peer_url, parse_tag};
use sipmesh_controlplane::node::{Node, RunOptions};
use sipmesh_controlplane::store::persist::Durability;
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
        --sip ADDR         the same as --listen
        --udp ADDR         listen on ADDR for UDP only; repeatable
        --tcp ADDR         listen on ADDR for TCP only; repeatable
    -w, --workers N        worker threads (0 = one per core)
        --backend B        auto | io_uring | epoll
        --no-pin           do not pin workers to cores
        --node-id N        node id (1..65535), overriding node.id
        --grpc ADDR        gRPC listen address for peers and sipctl
                           (default 127.0.0.1:50051)
        --peer-url URL     URL peers reach this node at (default http://<grpc>)
        --join URL         join the cluster through this member (any one is
                           enough); repeatable; `IP:PORT` means http://IP:PORT
        --seed             this node may declare itself synced when no donor
                           answers within cluster.seed_fallback_ms
        --cluster-id N     cluster id (default 1)
        --data-dir DIR     where the store (RocksDB) lives (default ./data)
        --durability M     async (default) or sync: answer a REGISTER only once its
                           change is in the synced write-ahead log
        --no-store         keep everything in memory only
        --cdr FILE         where call detail records go (default ./cdr/cdr.jsonl)
        --tag NAME=ROLE    a sharing tag of this node, ROLE active or backup;
                           repeatable (adds to tags.list)
        --segment PATH     the ownership segment file (default
                           /dev/shm/sipmesh-c<cluster>-n<node>.own)
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
    let mut node_id: Option<String> = None;
    let mut grpc: Option<String> = None;
    let mut peer_url: Option<String> = None;
    let mut cluster_id: Option<String> = None;
    let mut join: Vec<String> = Vec::new();
    let mut seed = false;
    let mut data_dir: Option<String> = None;
    let mut cdr: Option<String> = None;
    let mut durability: Option<String> = None;
    let mut no_store = false;
    let mut tags: Vec<String> = Vec::new();
    let mut segment: Option<String> = None;
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(format!("{name} needs a value")))
        };
        match a.as_str() {
            "-c" | "--config" => config_path = Some(value(&a)),
            "-l" | "--listen" | "--sip" => listen.push(value(&a)),
            "--node-id" => node_id = Some(value(&a)),
            "--grpc" => grpc = Some(value(&a)),
            "--peer-url" => peer_url = Some(value(&a)),
            "--cluster-id" => cluster_id = Some(value(&a)),
            "--join" => join.push(value(&a)),
            "--seed" => seed = true,
            "--data-dir" => data_dir = Some(value(&a)),
            "--durability" => durability = Some(value(&a)),
            "--no-store" => no_store = true,
            "--cdr" => cdr = Some(value(&a)),
            "--tag" => tags.push(value(&a)),
            "--segment" => segment = Some(value(&a)),
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
    if let Some(n) = node_id {
        cfg.node_id = match n.parse::<u16>() {
            Ok(v) if v != 0 => v,
            _ => fail(format!("--node-id: `{n}` is not a node id (1..65535)")),
        };
    }
    if let Some(n) = cluster_id {
        cfg.cluster.cluster_id = n
            .parse()
            .unwrap_or_else(|_| fail(format!("--cluster-id: `{n}` is not a number")));
    }
    if let Some(g) = grpc {
        cfg.cluster.grpc_listen = g
            .parse()
            .unwrap_or_else(|e| fail(format!("--grpc: `{g}` is not an IP:port address ({e})")));
    }
    if let Some(u) = peer_url {
        check_peer_url(&u).unwrap_or_else(|e| fail(format!("--peer-url: {e}")));
        cfg.cluster.peer_url = u;
    }
    for j in join {
        let url = if j.starts_with("http://") {
            j
        } else {
            format!("http://{j}")
        };
        check_peer_url(&url).unwrap_or_else(|e| fail(format!("--join: {e}")));
        cfg.cluster.join.push(url);
    }
    if seed {
        cfg.cluster.seed = true;
    }
    if let Some(d) = data_dir {
        if d.is_empty() {
            fail("--data-dir: needs a directory");
        }
        cfg.store.data_dir = d.into();
    }
    if let Some(c) = cdr {
        if c.is_empty() {
            fail("--cdr: needs a file");
        }
        cfg.cdr.path = c.into();
    }
    if let Some(d) = durability {
        cfg.store.durability = Durability::parse(&d)
            .unwrap_or_else(|| fail(format!("--durability: `{d}` is not one of async, sync")));
    }
    if no_store {
        cfg.store.enabled = false;
    }
    for t in tags {
        let (name, role) = parse_tag(&t).unwrap_or_else(|e| fail(format!("--tag: {e}")));
        cfg.cluster.tags.retain(|(n, _)| *n != name);
        cfg.cluster.tags.push((name, role));
    }
    if let Some(p) = segment {
        if p.is_empty() {
            fail("--segment: needs a path");
        }
        cfg.cluster.segment = p;
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
        "sipd: node {} listening udp {:?} tcp {:?} grpc {} with {} workers ({})",
        node.config.node_id,
        node.workers.udp_addrs(),
        node.workers.tcp_addrs(),
        node.grpc_addr,
        node.workers.len(),
        backends.join(",")
    );
    while !shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let usrloc = node.usrloc.clone();
    let drained = node.control_stats.clone();
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
        drained.drained.load(Ordering::Relaxed)
    );
}
