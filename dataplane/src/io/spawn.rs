//! Worker threads: bind every socket, start one thread per worker, pick its driver.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::epoll::EpollDriver;
use super::sockets::{WorkerSockets, bind_all};
use super::stats::{IoStats, IoStatsSnapshot};
use super::sys::pin_to_cpu;
use super::uring::UringDriver;
use super::{Backend, Handler, IoConfig};

/// How long `spawn_workers` waits for a worker to set up its driver and handler.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    stats: Vec<Arc<IoStats>>,
    backends: Vec<Backend>,
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
}

impl Workers {
    /// Wait for every worker to exit (set the shutdown flag first). Fails if one panicked.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for (i, t) in self.threads.into_iter().enumerate() {
            if t.join().is_err() && result.is_ok() {
                result = Err(io::Error::other(format!("worker {i} panicked")));
            }
        }
        result
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Counters of each worker, by worker index.
    pub fn stats(&self) -> &[Arc<IoStats>] {
        &self.stats
    }

    /// Counters summed over all workers.
    pub fn totals(&self) -> IoStatsSnapshot {
        self.stats
            .iter()
            .fold(IoStatsSnapshot::default(), |a, s| a + s.snapshot())
    }

    /// The driver each worker runs (`IoUring` or `Epoll`, never `Auto`), by worker index.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The UDP addresses listened on, in configuration order, with the actual port when
    /// port 0 was configured.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// The TCP addresses listened on, like [`Workers::udp_addrs`].
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }
}

/// When a worker must stop: the caller's shutdown flag, or a failed start.
pub(crate) struct Stop {
    shutdown: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
}

impl Stop {
    pub(crate) fn requested(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed) || self.abort.load(Ordering::Relaxed)
    }
}

/// Bind all sockets (before returning), then start one thread per worker
/// (`sipd-worker-N`, after [`IoConfig::thread_name`]).
/// Each thread sets up its driver, builds its handler with `make(N)` and runs until
/// `shutdown` is set (checked at least once per tick).
pub fn spawn_workers<H, F>(
    cfg: &IoConfig,
    make: F,
    shutdown: Arc<AtomicBool>,
) -> io::Result<Workers>
where
    H: Handler + 'static,
    F: Fn(usize) -> H + Send + Sync + 'static,
{
    cfg.validate()?;
    let (socks, udp_addrs, tcp_addrs) = bind_all(cfg)?;
    let make = Arc::new(make);
    let abort = Arc::new(AtomicBool::new(false));
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, io::Result<Backend>)>();
    let mut threads = Vec::with_capacity(cfg.workers);
    let mut spawn_error = None;
    for (index, ws) in socks.into_iter().enumerate() {
        let cfg = cfg.clone();
        let make = Arc::clone(&make);
        let stats = Arc::new(IoStats::default());
        let stop = Stop {
            shutdown: Arc::clone(&shutdown),
            abort: Arc::clone(&abort),
        };
        let ready = ready_tx.clone();
        let thread_stats = Arc::clone(&stats);
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{index}", cfg.thread_name))
            .spawn(move || worker_main(index, ncpu, ws, &cfg, &*make, &thread_stats, &stop, ready));
        match spawned {
            Ok(t) => threads.push((t, stats)),
            Err(e) => {
                spawn_error = Some(e);
                break;
            }
        }
    }
    drop(ready_tx);

    let mut backends = vec![Backend::Auto; threads.len()];
    let mut failure = spawn_error;
    for _ in 0..threads.len() {
        if failure.is_some() {
            break;
        }
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok((i, Ok(b))) => backends[i] = b,
            Ok((i, Err(e))) => {
                failure = Some(io::Error::new(
                    e.kind(),
                    format!("{}-{i}: {e}", cfg.thread_name),
                ))
            }
            Err(_) => {
                failure = Some(io::Error::other(
                    "a worker did not start (panicked or timed out)",
                ))
            }
        }
    }
    if let Some(e) = failure {
        abort.store(true, Ordering::Relaxed);
        for (t, _) in threads {
            let _ = t.join();
        }
        return Err(e);
    }
    let (threads, stats) = threads.into_iter().unzip();
    Ok(Workers {
        threads,
        stats,
        backends,
        udp_addrs,
        tcp_addrs,
    })
}

enum Driver {
    Uring(Box<UringDriver>),
    Epoll(Box<EpollDriver>),
}

/// Set up the driver for this worker, logging which one runs and why.
fn setup_driver(index: usize, ws: WorkerSockets, cfg: &IoConfig) -> io::Result<(Driver, Backend)> {
    let name = format!("{}-{index}", cfg.thread_name);
    match cfg.backend {
        Backend::Epoll => {
            let d = EpollDriver::setup(ws, cfg, index)?;
            eprintln!("{name}: io backend epoll (configured)");
            Ok((Driver::Epoll(Box::new(d)), Backend::Epoll))
        }
        Backend::IoUring => match UringDriver::setup(ws, cfg, index) {
            Ok(d) => {
                eprintln!(
                    "{name}: io backend io_uring ({}, configured)",
                    d.ring_flags()
                );
                Ok((Driver::Uring(Box::new(d)), Backend::IoUring))
            }
            Err((e, _)) => Err(io::Error::new(
                e.kind(),
                format!("io_uring setup failed: {e}"),
            )),
        },
        Backend::Auto => match UringDriver::setup(ws, cfg, index) {
            Ok(d) => {
                eprintln!("{name}: io backend io_uring ({}, auto)", d.ring_flags());
                Ok((Driver::Uring(Box::new(d)), Backend::IoUring))
            }
            Err((why, ws)) => {
                let d = EpollDriver::setup(ws, cfg, index)?;
                eprintln!("{name}: io backend epoll (auto: io_uring setup failed: {why})");
                Ok((Driver::Epoll(Box::new(d)), Backend::Epoll))
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn worker_main<H: Handler, F: Fn(usize) -> H>(
    index: usize,
    ncpu: usize,
    ws: WorkerSockets,
    cfg: &IoConfig,
    make: &F,
    stats: &IoStats,
    stop: &Stop,
    ready: mpsc::Sender<(usize, io::Result<Backend>)>,
) {
    if cfg.pin_cores {
        let cpu = index % ncpu.max(1);
        if let Err(e) = pin_to_cpu(cpu) {
            eprintln!("{}-{index}: cannot pin to CPU {cpu}: {e}", cfg.thread_name);
        }
    }
    let (driver, backend) = match setup_driver(index, ws, cfg) {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send((index, Err(e)));
            return;
        }
    };
    let mut handler = make(index);
    let _ = ready.send((index, Ok(backend)));
    drop(ready);
    match driver {
        Driver::Uring(d) => (*d).run(&mut handler, stats, stop),
        Driver::Epoll(d) => (*d).run(&mut handler, stats, stop),
    }
}
