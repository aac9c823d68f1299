//! Stateful proxy logic (RFC 3261 §16), sans-IO: how a request is rewritten for one
//! target (§16.6), how a response is passed back (§16.7 step 3, 9) and which response
//! goes upstream when several branches answer (the response context, §16.7).
//!
//! Everything writes into a caller-owned buffer through [`Writer`]: no allocation.

use std::net::SocketAddr;

use sip_wire::{HeaderName, Message, Writer};

/// Default Max-Forwards of a request that carries none (§16.6 step 3).
pub const DEFAULT_MAX_FORWARDS: u8 = 70;

/// How one branch of a request is forwarded.
#[derive(Clone, Copy, Debug)]
pub struct Forward<'a> {
    /// The new Request-URI (a registered contact), or `None` to keep it (§16.6 step 2).
    pub request_uri: Option<&'a [u8]>,
    /// Our Via: sent-by address and transport token (`UDP`, `TCP`) (§16.6 step 8).
    pub via_addr: SocketAddr,
    pub transport: &'a str,
    /// Branch of our Via (unique per branch, with the magic cookie).
    pub branch: &'a [u8],
    /// Our Record-Route URI (e.g. `sip:192.0.2.1:5060;lr`), inserted for requests that
    /// may create a dialog (§16.6 step 4).
    pub record_route: Option<&'a [u8]>,
    /// The first Route value named us and is removed (§16.4).
    pub pop_route: bool,
    /// Route values to put before the request's own (the Path of the target's
    /// registration, RFC 3327 §5.3), as one comma-separated list; may be empty.
    pub push_routes: &'a [u8],
}

/// The rest of a comma-separated header value after its first element.
fn after_first(v: &[u8]) -> Option<&[u8]> {
    sip_wire::write::split_first(v).1
}

/// Writes the request `m` as forwarded to one target (RFC 3261 §16.6): the new
/// Request-URI, our Via on top, Max-Forwards decremented (70 when absent), our
/// Record-Route first, the first Route removed when it was us, the target's Path
/// routes before the others, every other header and the body as received. Returns the
/// length, or `None` when the buffer is too small.
pub fn forward_request(m: &Message<'_>, f: &Forward<'_>, buf: &mut [u8]) -> Option<usize> {
    let method = m.method()?.as_bytes();
    let uri = f.request_uri.or(m.request_uri())?;
    let mf = match m.header(HeaderName::MaxForwards) {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|n| n.saturating_sub(1))?,
        None => u32::from(DEFAULT_MAX_FORWARDS),
    };
    let mut w = Writer::new(buf);
    w.request_line(method, uri);
    // §16.6 step 8: our Via first.
    w.put(b"Via: SIP/2.0/")
        .put_str(f.transport)
        .put(b" ")
        .put_str(&f.via_addr.to_string())
        .put(b";branch=")
        .put(f.branch)
        .crlf();
    // §16.6 step 4: our Record-Route at the top of the Record-Route list.
    if let Some(rr) = f.record_route {
        w.put(b"Record-Route: <").put(rr).put(b">").crlf();
    }
    let mut route_done = f.push_routes.is_empty() && !f.pop_route;
    let mut wrote_mf = false;
    for h in m.headers() {
        match h.name {
            HeaderName::MaxForwards if !wrote_mf => {
                w.put(b"Max-Forwards: ").put_u64(u64::from(mf)).crlf();
                wrote_mf = true;
            }
            HeaderName::MaxForwards | HeaderName::ContentLength => {}
            HeaderName::Route if !route_done => {
                route_done = true;
                let rest = if f.pop_route {
                    after_first(h.value)
                } else {
                    Some(h.value)
                };
                match (f.push_routes.is_empty(), rest) {
                    (true, None) => {}
                    (true, Some(r)) => {
                        w.put(b"Route: ").put(r).crlf();
                    }
                    (false, None) => {
                        w.put(b"Route: ").put(f.push_routes).crlf();
                    }
                    (false, Some(r)) => {
                        w.put(b"Route: ")
                            .put(f.push_routes)
                            .put(b", ")
                            .put(r)
                            .crlf();
                    }
                }
            }
            _ => {
                w.put(h.raw_name).put(b": ").put(h.value).crlf();
            }
        }
    }
    if !route_done && !f.push_routes.is_empty() {
        w.put(b"Route: ").put(f.push_routes).crlf();
    }
    if !wrote_mf {
        w.put(b"Max-Forwards: ").put_u64(u64::from(mf)).crlf();
    }
    w.put(b"Content-Length: ")
        .put_u64(m.body.len() as u64)
        .put(b"\r\n\r\n")
        .put(m.body);
    w.finish()
}

/// Writes the response `m` with our Via (its first value) removed (§16.7 step 3), for
/// the previous hop; `status` replaces its status line (a 503 passed on as 500, §16.7
/// step 6). Returns the length, or `None` when the buffer is too small or the response
/// has no Via left for the previous hop.
pub fn forward_response(
    m: &Message<'_>,
    status: Option<(u16, &[u8])>,
    buf: &mut [u8],
) -> Option<usize> {
    let (code, reason) = match (m.start, status) {
        (sip_wire::StartLine::Response { .. }, Some(s)) => s,
        (sip_wire::StartLine::Response { code, reason }, None) => (code, reason),
        _ => return None,
    };
    let mut w = Writer::new(buf);
    w.put(b"SIP/2.0 ")
        .put_u64(u64::from(code))
        .put(b" ")
        .put(reason)
        .crlf();
    let mut via_done = false;
    let mut vias_left = 0;
    for h in m.headers() {
        match h.name {
            HeaderName::Via if !via_done => {
                via_done = true;
                if let Some(r) = after_first(h.value) {
                    w.put(b"Via: ").put(r).crlf();
                    vias_left += 1;
                }
            }
            HeaderName::ContentLength => {}
            HeaderName::Via => {
                vias_left += 1;
                w.put(h.raw_name).put(b": ").put(h.value).crlf();
            }
            _ => {
                w.put(h.raw_name).put(b": ").put(h.value).crlf();
            }
        }
    }
    if vias_left == 0 {
        return None;
    }
    w.put(b"Content-Length: ")
        .put_u64(m.body.len() as u64)
        .put(b"\r\n\r\n")
        .put(m.body);
    w.finish()
}

/// Writes the CANCEL (§9.1) or the ACK of a non-2xx final response (§17.1.1.3) for a
/// request we forwarded (`req`, as we sent it): the same Request-URI, our Via only,
/// the same Route, From, Call-ID and CSeq number; an ACK takes the To of the response.
pub fn cancel_or_ack(
    req: &Message<'_>,
    method: &[u8],
    to: Option<&[u8]>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut w = Writer::new(buf);
    w.request_line(method, req.request_uri()?);
    let via = req.header(HeaderName::Via)?;
    w.put(b"Via: ")
        .put(sip_wire::write::split_first(via).0)
        .crlf();
    for r in req.headers_named(HeaderName::Route) {
        w.put(b"Route: ").put(r).crlf();
    }
    w.put(b"Max-Forwards: 70\r\n");
    w.put(b"From: ").put(req.header(HeaderName::From)?).crlf();
    w.put(b"To: ")
        .put(to.or(req.header(HeaderName::To))?)
        .crlf();
    w.put(b"Call-ID: ")
        .put(req.header(HeaderName::CallId)?)
        .crlf();
    let cseq = req.header(HeaderName::CSeq)?;
    let num = cseq.split(|b| *b == b' ').next()?;
    w.put(b"CSeq: ").put(num).put(b" ").put(method).crlf();
    w.put(b"Content-Length: 0\r\n\r\n");
    w.finish()
}

/// Most branches a request is forked to.
pub const MAX_BRANCHES: usize = 16;

/// What to do with a response a branch received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send it upstream now (a provisional other than 100, or a 2xx).
    Forward,
    /// Keep it: other branches are still pending.
    Hold,
    /// Every branch is done: send upstream the final response of branch `branch`
    /// (the best, §16.7 step 6), with status `code` (a 503 becomes 500).
    SendBest { branch: usize, code: u16 },
    /// Nothing to send (a 100, or anything after the final response went upstream).
    Drop,
    /// Every branch failed (none with a 6xx) and more targets wait (serial forking): try
    /// the next ones ([`ResponseContext::add_branches`]).
    Next,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Branch {
    #[default]
    Unused,
    Pending {
        provisional: bool,
    },
    Done(u16),
}

/// The response context of one forwarded request (§16.7).
#[derive(Clone, Debug, Default)]
pub struct ResponseContext {
    branches: [Branch; MAX_BRANCHES],
    n: usize,
    final_sent: bool,
}

/// Ranks final responses (§16.7 step 6): 6xx first, then the lowest class, and within
/// 4xx those that let the caller retry (401, 407, 415, 420, 484) before the others; 503
/// ranks as a 5xx.
fn rank(code: u16) -> (u8, u8) {
    let class = (code / 100) as u8;
    let class_rank = match class {
        6 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        5 => 4,
        _ => 5,
    };
    let pref = match code {
        401 | 407 | 415 | 420 | 484 => 0,
        _ => 1,
    };
    (class_rank, pref)
}

impl ResponseContext {
    /// A context for `n` branches (at most [`MAX_BRANCHES`]).
    pub fn new(n: usize) -> ResponseContext {
        let mut c = ResponseContext {
            n: n.min(MAX_BRANCHES),
            ..ResponseContext::default()
        };
        for b in &mut c.branches[..c.n] {
            *b = Branch::Pending { provisional: false };
        }
        c
    }

    /// Branches still waiting for a final response.
    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).filter(|&i| matches!(self.branches[i], Branch::Pending { .. }))
    }

    /// Pending branches that had a provisional response (those a CANCEL can reach).
    pub fn cancellable(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).filter(|&i| self.branches[i] == Branch::Pending { provisional: true })
    }

    /// Whether a final response went upstream.
    pub fn final_sent(&self) -> bool {
        self.final_sent
    }

    /// Branch `i` received a response with `code` (a branch that timed out or failed to
    /// send is given 408 or 503 by the caller, §16.7 step 2 / §16.9).
    pub fn on_response(&mut self, i: usize, code: u16) -> Decision {
        self.on_response_more(i, code, false)
    }

    /// Adds `k` pending branches (the next targets of serial forking); returns the index
    /// of the first, or `None` when there is no room.
    pub fn add_branches(&mut self, k: usize) -> Option<usize> {
        if self.final_sent || self.n + k > MAX_BRANCHES {
            return None;
        }
        let first = self.n;
        for b in &mut self.branches[first..first + k] {
            *b = Branch::Pending { provisional: false };
        }
        self.n += k;
        Some(first)
    }

    /// [`ResponseContext::on_response`], knowing whether more targets wait (`more`):
    /// then a failure of the last pending branch (but a 6xx) asks for them
    /// ([`Decision::Next`]) instead of choosing the best response (RFC 3261 §16.6 step
    /// 10: the next target set is tried when the current one fails).
    pub fn on_response_more(&mut self, i: usize, code: u16, more: bool) -> Decision {
        let Some(b) = self.branches.get_mut(i).filter(|_| i < self.n) else {
            return Decision::Drop;
        };
        match (*b, code) {
            // §16.7 step 5: every 2xx is forwarded, retransmissions included (RFC 6026).
            (Branch::Done(200..=299), 200..=299) => Decision::Forward,
            (Branch::Done(_), _) | (Branch::Unused, _) => Decision::Drop,
            (Branch::Pending { .. }, 100) => Decision::Drop,
            (Branch::Pending { .. }, 101..=199) => {
                *b = Branch::Pending { provisional: true };
                // §16.7 step 5: provisional responses other than 100 go upstream at once.
                if self.final_sent {
                    Decision::Drop
                } else {
                    Decision::Forward
                }
            }
            (Branch::Pending { .. }, 200..=299) => {
                *b = Branch::Done(code);
                // §16.7 step 5: every 2xx goes upstream (several forks may answer).
                self.final_sent = true;
                Decision::Forward
            }
            (Branch::Pending { .. }, _) => {
                *b = Branch::Done(code);
                if self.final_sent {
                    return Decision::Drop;
                }
                // §16.7 step 4/6: when no branch is pending, the best response goes.
                if self.pending().next().is_some() && code / 100 != 6 {
                    return Decision::Hold;
                }
                if more && code / 100 != 6 {
                    return Decision::Next;
                }
                let best = (0..self.n)
                    .filter_map(|j| match self.branches[j] {
                        Branch::Done(c) => Some((rank(c), j, c)),
                        _ => None,
                    })
                    .min();
                match best {
                    Some((_, branch, c)) => {
                        self.final_sent = true;
                        Decision::SendBest {
                            branch,
                            // §16.7 step 6: a 503 is not passed on as such.
                            code: if c == 503 { 500 } else { c },
                        }
                    }
                    None => Decision::Drop,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
