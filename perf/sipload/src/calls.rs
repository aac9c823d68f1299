//! One generator thread: a [`Handler`] of the project's worker I/O layer (io_uring, or
//! epoll with `recvmmsg`/`sendmmsg`), so datagrams arrive from a multishot receive into
//! a buffer ring and leave in batches. Calls live in a slab whose buffers are reused, a
//! ready list and a timer heap say which calls have something to do, and messages are
//! filled from compiled templates: once warm, a message sent or received allocates
//! nothing.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sipmesh_dataplane::io::{Dest, Handler, Millis, Outbox, Source};

use crate::Opts;
use crate::scenario::{Expect, Step};
use crate::sip::{angle, hash, header_either, header_lines, header_value, start_line, tag};
use crate::template::{Consts, Fill, Pieces, Template, Vals};

/// Totals shared by the threads (for the progress line).
#[derive(Default)]
pub struct Live {
    pub started: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub retrans: AtomicU64,
}

/// Response times are recorded in microseconds, up to a minute, to 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What one thread reports at the end.
pub struct Report {
    pub ok: u64,
    pub failed: HashMap<String, u64>,
    pub retrans: u64,
    /// Call start to each `rtd` step.
    pub rtd: Histogram<u64>,
    /// Per `recv` step: from the first transmission of the call's last message sent to
    /// this message's arrival (a transaction's response time, or the peer's turn).
    pub exchanges: Vec<Option<Histogram<u64>>>,
    /// Times a send waited for a free send buffer.
    pub send_waits: u64,
    /// Datagrams that were not UTF-8 SIP or had no Call-ID.
    pub unparsable: u64,
}

impl Report {
    pub fn new(steps: &[Step]) -> Report {
        Report {
            ok: 0,
            failed: HashMap::new(),
            retrans: 0,
            rtd: histogram(),
            exchanges: steps
                .iter()
                .map(|s| matches!(s, Step::Recv { .. }).then(histogram))
                .collect(),
            send_waits: 0,
            unparsable: 0,
        }
    }

    pub fn merge(&mut self, r: Report) {
        self.ok += r.ok;
        self.retrans += r.retrans;
        for (k, v) in r.failed {
            *self.failed.entry(k).or_default() += v;
        }
        let _ = self.rtd.add(&r.rtd);
        for (mine, theirs) in self.exchanges.iter_mut().zip(r.exchanges) {
            if let (Some(a), Some(b)) = (mine.as_mut(), theirs) {
                let _ = a.add(&b);
            }
        }
        self.send_waits += r.send_waits;
        self.unparsable += r.unparsable;
    }
}

/// A request sent and retransmitted until answered (RFC 3261 timers A and E).
struct Sent {
    /// Retransmitting (the last message sent was a request or a reliable response).
    active: bool,
    next: Instant,
    interval: Duration,
    invite: bool,
    first: Instant,
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

struct Call {
    generation: u32,
    live: bool,
    /// Where its messages go: the remote (client) or whoever sent its first request
    /// (server).
    peer: SocketAddr,
    step: usize,
    start: Instant,
    vals: Vals,
    /// The last message sent, for retransmissions.
    bytes: Vec<u8>,
    sent: Sent,
    /// When the last message was first sent (exchange latencies).
    sent_at: Option<Instant>,
    pause_until: Option<Instant>,
    /// The earliest timer armed for this call in the heap (later entries are stale).
    timer_at: Option<Instant>,
    /// Status codes received (a retransmission of one is ignored).
    seen_codes: Vec<u16>,
    /// CSeqs (hashed) of the requests received (a retransmission of one is not
    /// unexpected).
    seen_requests: Vec<u64>,
}

/// A call is named by its slab slot and the slot's generation (a stale name is ignored).
type CallRef = (u32, u32);

pub struct Gen {
    o: Arc<Opts>,
    index: usize,
    live: Arc<Live>,
    t0: Instant,
    deadline: Instant,
    pid: u32,
    local: SocketAddr,
    /// Per step: the compiled message of a send, the assignments of a nop.
    sends: Vec<Option<Template>>,
    assigns: Vec<Vec<(usize, Pieces)>>,
    nvars: usize,
    calls: Vec<Call>,
    free: Vec<u32>,
    /// Call-ID hash → slot.
    by_id: HashMap<u64, u32>,
    live_calls: usize,
    ready: Vec<CallRef>,
    ready_next: Vec<CallRef>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    next_sweep: Instant,
    made: u64,
    served: u64,
    mine: u64,
    rate: f64,
    limit: usize,
    report: Option<Report>,
    done: mpsc::Sender<Report>,
    scratch: Vec<u8>,
    body: Vec<u8>,
    rr: Vec<(usize, usize)>,
}

/// Sends are held back while fewer send buffers than this are free, so that a burst of new
/// calls leaves room for the calls already running.
const NEW_CALL_ROOM: usize = 64;
/// RFC 3261 timers B and F (64 × T1): a request unanswered this long fails.
const GIVE_UP: Duration = Duration::from_secs(32);

impl Gen {
    pub fn new(
        o: Arc<Opts>,
        index: usize,
        local: SocketAddr,
        live: Arc<Live>,
        t0: Instant,
        done: mpsc::Sender<Report>,
    ) -> Gen {
        let steps = &o.scenario.steps;
        let vars: Vec<String> = {
            let mut v: Vec<String> = Vec::new();
            for s in steps {
                if let Step::Nop(a) = s {
                    for (n, _) in a {
                        if !v.contains(n) {
                            v.push(n.clone());
                        }
                    }
                }
            }
            v
        };
        let pid = std::process::id();
        let consts = Consts {
            service: &o.service,
            remote: o.remote,
            local,
            pid,
            vars: &vars,
        };
        let sends = steps
            .iter()
            .map(|s| match s {
                Step::Send { template, .. } => Some(Template::compile(template, &consts)),
                _ => None,
            })
            .collect();
        let assigns = steps
            .iter()
            .map(|s| match s {
                Step::Nop(a) => a
                    .iter()
                    .map(|(n, t)| {
                        let i = vars.iter().position(|v| v == n).unwrap_or(0);
                        (i, Pieces::compile(t, &consts))
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        let threads = o.threads as u64;
        // This thread makes calls index+1, index+1+T, ...
        let mine = (o.calls + threads - 1 - index as u64) / threads;
        let rate = if o.scenario.is_server() {
            0.0
        } else {
            o.rate / threads as f64
        };
        let limit = o.limit / o.threads + 1;
        Gen {
            report: Some(Report::new(steps)),
            deadline: t0 + o.timeout,
            nvars: vars.len(),
            o,
            index,
            live,
            t0,
            pid,
            local,
            sends,
            assigns,
            calls: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            live_calls: 0,
            ready: Vec::new(),
            ready_next: Vec::new(),
            timers: BinaryHeap::new(),
            next_sweep: t0 + Duration::from_secs(1),
            made: 0,
            served: 0,
            mine,
            rate,
            limit,
            done,
            scratch: Vec::new(),
            body: Vec::new(),
            rr: Vec::new(),
        }
    }

    fn report(&mut self) -> &mut Report {
        self.report.get_or_insert_with(|| Report::new(&[]))
    }

    /// A slot for a new call, its values reset.
    fn alloc(&mut self, number: u64, peer: SocketAddr, now: Instant) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.calls.push(Call {
                    generation: 0,
                    live: false,
                    peer,
                    step: 0,
                    start: now,
                    vals: Vals::default(),
                    bytes: Vec::new(),
                    sent: Sent {
                        active: false,
                        next: now,
                        interval: Duration::ZERO,
                        invite: false,
                        first: now,
                    },
                    sent_at: None,
                    pause_until: None,
                    timer_at: None,
                    seen_codes: Vec::new(),
                    seen_requests: Vec::new(),
                });
                (self.calls.len() - 1) as u32
            }
        };
        let c = &mut self.calls[slot as usize];
        c.live = true;
        c.peer = peer;
        c.step = 0;
        c.start = now;
        c.vals.reset(number, self.nvars);
        c.sent.active = false;
        c.sent_at = None;
        c.pause_until = None;
        c.timer_at = None;
        c.seen_codes.clear();
        c.seen_requests.clear();
        self.live_calls += 1;
        slot
    }

    /// Ends a call: counted once, its slot freed (stale references to it are ignored).
    fn end(&mut self, slot: u32, result: Result<(), &str>) {
        let c = &mut self.calls[slot as usize];
        if !c.live {
            return;
        }
        c.live = false;
        c.generation = c.generation.wrapping_add(1);
        let key = hash(&c.vals.call_id);
        if self.by_id.get(&key) == Some(&slot) {
            self.by_id.remove(&key);
        }
        self.free.push(slot);
        self.live_calls -= 1;
        match result {
            Ok(()) => {
                self.report().ok += 1;
                self.live.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let r = self.report();
                match r.failed.get_mut(e) {
                    Some(n) => *n += 1,
                    None => {
                        r.failed.insert(e.to_string(), 1);
                    }
                }
                self.live.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn arm(&mut self, slot: u32, at: Instant) {
        let c = &mut self.calls[slot as usize];
        if c.timer_at.is_none_or(|t| at < t) {
            c.timer_at = Some(at);
            self.timers.push(Reverse((at, slot, c.generation)));
        }
        // Entries of calls answered or ended stay until due; when they outnumber the live
        // calls' own (one each), they go: the heap stays within twice the live calls
        // (plus a constant), at an amortised constant cost per timer.
        if self.timers.len() > 2 * self.live_calls + 1024 {
            let calls = &self.calls;
            self.timers.retain(|Reverse((t, s, g))| {
                let c = &calls[*s as usize];
                c.live && c.generation == *g && c.timer_at == Some(*t)
            });
        }
    }

    /// Whether this thread has made (or served) all its calls and none is left.
    fn finished(&self) -> bool {
        let all = if self.o.scenario.is_server() {
            self.served >= self.mine
        } else {
            self.made >= self.mine
        };
        all && self.live_calls == 0
    }

    /// Hands the report over once.
    fn finish(&mut self) {
        if let Some(r) = self.report.take() {
            let _ = self.done.send(r);
        }
    }

    /// Starts the calls due, runs the timers due and advances every ready call.
    fn pump<O: Outbox>(&mut self, out: &mut O) {
        if self.report.is_none() {
            return;
        }
        let now = Instant::now();
        if now >= self.deadline {
            for s in 0..self.calls.len() as u32 {
                self.end(s, Err("run timeout"));
            }
            self.finish();
            return;
        }
        // New calls at the rate asked, within the limit of live calls and while the
        // driver has send buffers to spare.
        if !self.o.scenario.is_server() {
            let due = ((now - self.t0).as_secs_f64() * self.rate) as u64 + 1;
            let threads = self.o.threads as u64;
            while self.made < self.mine.min(due)
                && self.live_calls < self.limit
                && out.room() > NEW_CALL_ROOM
            {
                let number = self.made * threads + self.index as u64 + 1;
                self.made += 1;
                self.live.started.fetch_add(1, Ordering::Relaxed);
                let slot = self.alloc(number, self.o.remote, now);
                let c = &mut self.calls[slot as usize];
                let _ = std::fmt::Write::write_fmt(
                    &mut c.vals.call_id,
                    format_args!("{number}-{}@{}", self.pid, self.local.ip()),
                );
                self.by_id.insert(hash(&c.vals.call_id), slot);
                self.ready.push((slot, c.generation));
            }
        }
        while let Some(&Reverse((t, slot, generation))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let c = &mut self.calls[slot as usize];
            if c.live && c.generation == generation && c.timer_at == Some(t) {
                c.timer_at = None;
                self.ready.push((slot, generation));
            }
        }
        // Calls waiting for a request that never comes (nothing to retransmit).
        if now >= self.next_sweep {
            self.next_sweep = now + Duration::from_secs(1);
            for s in 0..self.calls.len() as u32 {
                let c = &self.calls[s as usize];
                if c.live && now - c.start > GIVE_UP + GIVE_UP {
                    self.end(s, Err("recv timeout"));
                }
            }
        }
        let mut ready = std::mem::take(&mut self.ready_next);
        std::mem::swap(&mut ready, &mut self.ready);
        for (slot, generation) in ready.drain(..) {
            let c = &self.calls[slot as usize];
            if c.live && c.generation == generation {
                self.advance(slot, now, out);
            }
        }
        self.ready_next = ready;
        if self.finished() {
            self.finish();
        }
    }

    /// Runs a call's steps until it waits (for a message, a pause, a send buffer) or ends.
    fn advance<O: Outbox>(&mut self, slot: u32, now: Instant, out: &mut O) {
        let o = Arc::clone(&self.o);
        let steps = &o.scenario.steps;
        let fill = Fill {
            pid: self.pid,
            fields: &o.fields,
        };
        loop {
            let c = &mut self.calls[slot as usize];
            if c.step >= steps.len() {
                self.end(slot, Ok(()));
                return;
            }
            match &steps[c.step] {
                Step::Send { retrans, .. } => {
                    if out.room() == 0 {
                        self.report().send_waits += 1;
                        let g = self.calls[slot as usize].generation;
                        self.ready.push((slot, g));
                        return;
                    }
                    let Some(t) = &self.sends[c.step] else {
                        return;
                    };
                    t.fill(&c.vals, c.step, &fill, &mut self.body, &mut c.bytes);
                    let bytes = &c.bytes;
                    out.send(Dest::Udp(c.peer), |buf| {
                        let n = bytes.len().min(buf.len());
                        buf[..n].copy_from_slice(&bytes[..n]);
                        n
                    });
                    c.sent_at = Some(now);
                    c.sent.active = retrans.is_some();
                    if let Some(ms) = retrans {
                        c.sent.next = now + Duration::from_millis(*ms);
                        c.sent.interval = Duration::from_millis(ms * 2);
                        c.sent.invite = c.bytes.starts_with(b"INVITE ");
                        c.sent.first = now;
                    }
                    c.step += 1;
                }
                Step::Nop(_) => {
                    for (i, p) in &self.assigns[c.step] {
                        self.scratch.clear();
                        p.fill(&c.vals, c.step, 0, &fill, &mut self.scratch);
                        let v = &mut c.vals.vars[*i];
                        v.clear();
                        v.push_str(&String::from_utf8_lossy(&self.scratch));
                    }
                    c.step += 1;
                }
                Step::Pause(ms) => {
                    let until = *c
                        .pause_until
                        .get_or_insert(now + Duration::from_millis(ms.unwrap_or(self.o.pause_ms)));
                    if now >= until {
                        c.pause_until = None;
                        c.step += 1;
                    } else {
                        self.arm(slot, until);
                        return;
                    }
                }
                Step::Recv { .. } => {
                    if c.sent.active && now >= c.sent.next {
                        if now - c.sent.first > GIVE_UP {
                            self.end(slot, Err("no answer (retransmissions exhausted)"));
                            return;
                        }
                        if out.room() == 0 {
                            self.report().send_waits += 1;
                            let g = self.calls[slot as usize].generation;
                            self.ready.push((slot, g));
                            return;
                        }
                        let bytes = &c.bytes;
                        out.send(Dest::Udp(c.peer), |buf| {
                            let n = bytes.len().min(buf.len());
                            buf[..n].copy_from_slice(&bytes[..n]);
                            n
                        });
                        retransmit(&mut c.sent, now);
                        self.report().retrans += 1;
                        self.live.retrans.fetch_add(1, Ordering::Relaxed);
                    }
                    let c = &self.calls[slot as usize];
                    if c.sent.active {
                        let next = c.sent.next;
                        self.arm(slot, next);
                    }
                    return;
                }
            }
        }
    }

    /// A datagram arrived: find its call (or start one, for a server), match it against
    /// the step it answers, and move the call on.
    fn receive(&mut self, msg: &[u8], from: SocketAddr) {
        let Ok(text) = std::str::from_utf8(msg) else {
            self.report().unparsable += 1;
            return;
        };
        let Some(cid) = header_either(text, "Call-ID", "i") else {
            self.report().unparsable += 1;
            return;
        };
        let o = Arc::clone(&self.o);
        let steps = &o.scenario.steps;
        let key = hash(cid);
        let mut slot = self
            .by_id
            .get(&key)
            .copied()
            .filter(|&s| self.calls[s as usize].vals.call_id == cid);
        // A server: a new call starts with a request matching the first step.
        if slot.is_none()
            && self.o.scenario.is_server()
            && self.served < self.mine
            && let Some(Step::Recv {
                what: Expect::Request(m),
                ..
            }) = steps.first()
            && text.starts_with(m.as_str())
            && text.as_bytes().get(m.len()) == Some(&b' ')
        {
            let threads = self.o.threads as u64;
            self.served += 1;
            self.live.started.fetch_add(1, Ordering::Relaxed);
            let number = self.served * threads - (threads - 1 - self.index as u64);
            let s = self.alloc(number, from, Instant::now());
            self.calls[s as usize].vals.call_id.push_str(cid);
            self.by_id.insert(key, s);
            slot = Some(s);
        }
        let Some(slot) = slot else {
            return;
        };
        let (code, method) = start_line(text);
        let c = &mut self.calls[slot as usize];
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
            let cseq = hash(header_value(text, "CSeq").unwrap_or(""));
            if code.is_some_and(|x| c.seen_codes.contains(&x))
                || (code.is_none() && c.seen_requests.contains(&cseq))
                || late_optional(steps, c.step, code, method)
                || only_sends_left(steps, c.step)
            {
                return;
            }
            let what = code.map_or_else(
                || format!("unexpected {}", method.unwrap_or("?")),
                |x| format!("unexpected {x}"),
            );
            self.end(slot, Err(&what));
            return;
        };
        let Step::Recv { rtd, rrs, .. } = &steps[k] else {
            return;
        };
        let now = Instant::now();
        let report = self.report.as_mut();
        if let Some(r) = report {
            if *rtd {
                r.rtd.saturating_record(us(now - c.start));
            }
            if let (Some(at), Some(Some(h))) = (c.sent_at, r.exchanges.get_mut(k)) {
                h.saturating_record(us(now - at));
            }
        }
        if *rrs {
            // RFC 3261 §12.1.2: the caller's route set is the Record-Route reversed.
            self.rr.clear();
            for l in header_lines(text, "Record-Route") {
                let v = l.split_once(':').map_or("", |(_, v)| v.trim());
                let base = v.as_ptr() as usize - text.as_ptr() as usize;
                let mut at = 0;
                for part in v.split(", ") {
                    self.rr.push((base + at, base + at + part.len()));
                    at += part.len() + 2;
                }
            }
            c.vals.routes.clear();
            for (i, &(a, b)) in self.rr.iter().rev().enumerate() {
                if i > 0 {
                    c.vals.routes.push_str(", ");
                }
                c.vals.routes.push_str(&text[a..b]);
            }
            c.vals.next_url.clear();
            if let Some(v) = header_either(text, "Contact", "m") {
                c.vals.next_url.push_str(angle(v));
            }
        }
        // The peer's tag: the To tag of a response, the From tag of a request (a NOTIFY in
        // a subscription: its To tag is ours).
        let party = if code.is_some() {
            header_either(text, "To", "t")
        } else {
            header_either(text, "From", "f")
        };
        if let Some(t) = party.and_then(tag) {
            c.vals.peer_tag.clear();
            c.vals.peer_tag.push_str(t);
        }
        match code {
            Some(x) => {
                c.seen_codes.push(x);
                // A final response ends the retransmissions of the request; so does a
                // provisional one of an INVITE (RFC 3261 §17.1.1.2).
                if x >= 200 || c.sent.invite {
                    c.sent.active = false;
                }
            }
            // A server: the request it waited for (an ACK) ends the retransmissions of its
            // response.
            None => {
                c.sent.active = false;
                c.seen_requests
                    .push(hash(header_value(text, "CSeq").unwrap_or("")));
            }
        }
        c.vals.last.clear();
        c.vals.last.push_str(text);
        c.step = k + 1;
        self.ready.push((slot, c.generation));
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl Handler for Gen {
    fn on_message<O: Outbox>(&mut self, msg: &[u8], src: &Source, _now: Millis, out: &mut O) {
        if self.report.is_none() {
            return;
        }
        self.receive(msg, src.remote);
        self.pump(out);
    }

    fn on_oversize<O: Outbox>(&mut self, _head: &[u8], _src: &Source, _now: Millis, out: &mut O) {
        self.report().unparsable += 1;
        self.pump(out);
    }

    fn on_tick<O: Outbox>(&mut self, _now: Millis, out: &mut O) {
        self.pump(out);
    }
}

/// Whether a message (a response `code` or a request `method`) is what `what` waits for.
pub fn expects(what: &Expect, code: Option<u16>, method: Option<&str>) -> bool {
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
pub fn only_sends_left(steps: &[Step], at: usize) -> bool {
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
pub fn late_optional(steps: &[Step], at: usize, code: Option<u16>, method: Option<&str>) -> bool {
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

#[cfg(test)]
mod tests {
    use std::alloc::System;
    use std::io::Write as _;

    use sipmesh_dataplane::io::{ConnId, Transport};
    use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

    use super::*;
    use crate::scenario::Scenario;

    #[global_allocator]
    static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

    /// Keeps the messages sent in fixed buffers (the test allocates nothing either).
    struct Wire {
        msgs: [[u8; 2048]; 8],
        lens: [usize; 8],
        n: usize,
        total: u64,
    }

    impl Outbox for Wire {
        fn send(&mut self, _to: Dest, fill: impl FnOnce(&mut [u8]) -> usize) {
            let len = fill(&mut self.msgs[self.n]);
            self.lens[self.n] = len;
            self.n += 1;
            self.total += 1;
        }
        fn close(&mut self, _conn: ConnId) {}
    }

    /// The callee's side: a 180 and a 200 (with a route set and a contact) to an
    /// INVITE, a 200 to a BYE, nothing to an ACK.
    fn answer(req: &str, replies: &mut [[u8; 2048]; 2]) -> [usize; 2] {
        let mut lens = [0; 2];
        let (_, method) = start_line(req);
        let codes: &[&str] = match method {
            Some("INVITE") => &["180 Ringing", "200 OK"],
            Some("BYE") => &["200 OK"],
            _ => &[],
        };
        for (i, code) in codes.iter().enumerate() {
            let mut w = &mut replies[i][..];
            let total = w.len();
            let _ = write!(w, "SIP/2.0 {code}\r\n");
            for name in ["Via", "From", "Call-ID", "CSeq"] {
                for l in header_lines(req, name) {
                    let _ = write!(w, "{l}\r\n");
                }
            }
            let _ = write!(
                w,
                "To: {};tag=callee\r\nRecord-Route: <sip:127.0.0.1;lr>\r\n\
                 Contact: <sip:bob@127.0.0.2:5090>\r\nContent-Length: 0\r\n\r\n",
                header_value(req, "To").unwrap_or("")
            );
            lens[i] = total - w.len();
        }
        lens
    }

    #[test]
    fn once_warm_a_call_allocates_nothing() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../profiles/call-uac.xml"
        ))
        .unwrap();
        let remote: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let o = Arc::new(Opts {
            remote,
            scenario: Arc::new(Scenario::parse(&text).unwrap()),
            service: "bob".into(),
            local_ip: [127, 0, 0, 3].into(),
            port: 5070,
            threads: 1,
            rate: 1e9,
            calls: 3000,
            limit: 1,
            pause_ms: 0,
            timeout: Duration::from_secs(60),
            fields: Vec::new(),
            backend: sipmesh_dataplane::io::Backend::Auto,
        });
        let (tx, rx) = mpsc::channel();
        let local: SocketAddr = "127.0.0.3:5070".parse().unwrap();
        let mut g = Gen::new(o, 0, local, Arc::new(Live::default()), Instant::now(), tx);
        let src = Source {
            transport: Transport::Udp,
            remote,
            local,
            conn: None,
        };
        let mut wire = Wire {
            msgs: [[0; 2048]; 8],
            lens: [0; 8],
            n: 0,
            total: 0,
        };
        let mut replies = [[0u8; 2048]; 2];
        // Runs calls until `upto` are done: every message the generator sends is answered
        // at once (each answer may start the next call).
        let mut run = |g: &mut Gen, upto: u64| {
            let below = |g: &Gen| g.report.as_ref().is_some_and(|r| r.ok < upto);
            while below(g) {
                g.on_tick(0, &mut wire);
                while wire.n > 0 && below(g) {
                    wire.n -= 1;
                    let k = wire.n;
                    let req = std::str::from_utf8(&wire.msgs[k][..wire.lens[k]]).unwrap();
                    let lens = answer(req, &mut replies);
                    for (r, len) in replies.iter().zip(lens) {
                        if len > 0 {
                            g.on_message(&r[..len], &src, 0, &mut wire);
                        }
                    }
                }
            }
        };
        run(&mut g, 1500);
        assert_eq!(g.report.as_ref().map(|r| r.ok), Some(1500));
        let region = Region::new(GLOBAL);
        run(&mut g, 2999);
        let stats = region.change();
        assert_eq!(g.report.as_ref().map(|r| r.ok), Some(2999));
        assert_eq!(
            (stats.allocations, stats.reallocations),
            (0, 0),
            "1 499 calls (INVITE, 180, 200, ACK, BYE, 200 each) after 1 500 to warm up"
        );
        run(&mut g, 3000);
        let r = rx.try_recv().expect("the report once every call is done");
        assert_eq!((r.ok, r.failed.len()), (3000, 0));
        assert_eq!(wire.total, 3 * 3000, "INVITE, ACK and BYE of each call");
        // Both exchanges of the INVITE and the BYE's 200 were measured.
        assert_eq!(r.exchanges[2].as_ref().unwrap().len(), 3000);
        assert_eq!(r.exchanges[3].as_ref().unwrap().len(), 3000);
    }
}
