//! SIP transaction state machines (RFC 3261 §17, with the RFC 6026 "Accepted" state),
//! sans-IO: a transaction takes events (a response from the network, a retransmitted
//! request, the transaction user's response, an ACK, a transport error) and the time, and
//! says what to do — send the request, the ACK or the latest response (again), pass a
//! response or a timeout up, end. It holds no bytes: its owner keeps the message it
//! retransmits and a timer wheel keyed by [`Transaction::next_deadline`].
//!
//! Timers (RFC 3261 §17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2, table 4): A, B, D (INVITE
//! client), E, F, K (non-INVITE client), G, H, I (INVITE server), J (non-INVITE server),
//! L (INVITE server) and M (INVITE client, RFC 6026 §7.1, §7.2), and C (a proxy's
//! INVITE client, §16.6 step 11).
//! Over a reliable transport the retransmission timers (A, E, G) are not set and the
//! wait timers D, I, J, K are zero.

pub mod table;

/// Milliseconds (virtual or wall-clock).
pub type Millis = u64;

/// T1, T2, T4 (RFC 3261 §17.1.1.1, table 4) and the proxy's timer C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerConfig {
    /// RTT estimate (default 500 ms).
    pub t1: Millis,
    /// Longest retransmit interval of non-INVITE requests and INVITE responses (4 s).
    pub t2: Millis,
    /// Longest time a message stays in the network (5 s).
    pub t4: Millis,
    /// Proxy INVITE timer, more than 3 minutes (§16.6 step 11).
    pub timer_c: Millis,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: 500,
            t2: 4000,
            t4: 5000,
            timer_c: 181_000,
        }
    }
}

/// Whether the transport retransmits by itself (TCP, TLS, SCTP) or not (UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reliability {
    /// UDP: the transaction retransmits.
    Unreliable,
    /// TCP and friends: no retransmissions, no waiting for them.
    Reliable,
}

/// INVITE or any other method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// INVITE.
    Invite,
    /// Every other method (ACK and CANCEL excepted: ACK is not a transaction, CANCEL is a
    /// non-INVITE one).
    NonInvite,
}

/// Client or server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We sent the request.
    Client,
    /// We received it.
    Server,
}

/// RFC 3261 §17 states (Accepted: RFC 6026).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Calling,
    Trying,
    Proceeding,
    Accepted,
    Completed,
    Confirmed,
    Terminated,
}

/// The timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    A,
    B,
    C,
    D,
    E,
    F,
    G,
    H,
    I,
    J,
    K,
    L,
    M,
}

const TIMERS: usize = 13;

impl Timer {
    fn index(self) -> usize {
        self as usize
    }

    const ALL: [Timer; TIMERS] = [
        Timer::A,
        Timer::B,
        Timer::C,
        Timer::D,
        Timer::E,
        Timer::F,
        Timer::G,
        Timer::H,
        Timer::I,
        Timer::J,
        Timer::K,
        Timer::L,
        Timer::M,
    ];
}

/// An input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Client: a response with this status arrived.
    Response(u16),
    /// Server: the request arrived again.
    RequestRetransmission,
    /// Server (INVITE): the ACK of a non-2xx final response arrived.
    Ack,
    /// Server: the transaction user sends a response with this status.
    Send(u16),
    /// The transport failed to send.
    TransportError,
}

/// An output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Client: send the request (again).
    SendRequest,
    /// Client (INVITE): send the ACK for the non-2xx final response (§17.1.1.3).
    SendAck,
    /// Server: send the latest response (again).
    SendResponse,
    /// Client: hand this response to the transaction user.
    Pass(u16),
    /// The transaction gave up: client timer B or F (the TU acts as if a 408 had come,
    /// §8.1.3.1), server timer H (no ACK came), or a transport error (`None`).
    TimedOut(Option<Timer>),
    /// Proxy timer C fired (§16.8): with a provisional response seen the proxy cancels
    /// the branch, without one it treats it as a 408.
    TimerC {
        /// A provisional response had arrived.
        provisional: bool,
    },
    /// The transaction ended; its state can be dropped.
    Terminated,
}

/// At most this many actions come out of one input.
pub const MAX_ACTIONS: usize = 3;

/// The actions of one input (inline, no allocation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    items: [Option<Action>; MAX_ACTIONS],
    len: usize,
}

impl Actions {
    fn push(&mut self, a: Action) {
        if self.len < MAX_ACTIONS {
            self.items[self.len] = Some(a);
            self.len += 1;
        }
    }

    /// The actions, in order.
    pub fn iter(&self) -> impl Iterator<Item = Action> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Armed {
    at: Millis,
    /// Current retransmission interval (A, E, G).
    interval: Millis,
}

/// One transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    role: Role,
    kind: Kind,
    rel: Reliability,
    cfg: TimerConfig,
    state: State,
    timers: [Option<Armed>; TIMERS],
    /// Client: a provisional response arrived (timer C's decision).
    provisional: bool,
    /// Latest response status (server: sent; client: received).
    last: u16,
    /// Proxy client INVITE: timer C runs.
    proxy: bool,
}

impl Transaction {
    /// A client transaction that sends its request now (§17.1.1.2, §17.1.2.2). `proxy`:
    /// an INVITE sent by a proxy also runs timer C.
    pub fn client(
        kind: Kind,
        rel: Reliability,
        cfg: TimerConfig,
        proxy: bool,
        now: Millis,
    ) -> (Transaction, Actions) {
        let mut t = Transaction {
            role: Role::Client,
            kind,
            rel,
            cfg,
            state: match kind {
                Kind::Invite => State::Calling,
                Kind::NonInvite => State::Trying,
            },
            timers: [None; TIMERS],
            provisional: false,
            last: 0,
            proxy: proxy && kind == Kind::Invite,
        };
        let mut out = Actions::default();
        out.push(Action::SendRequest);
        let unreliable = rel == Reliability::Unreliable;
        match kind {
            Kind::Invite => {
                if unreliable {
                    t.arm(Timer::A, now, cfg.t1);
                }
                t.arm(Timer::B, now, 64 * cfg.t1);
                if t.proxy {
                    t.arm(Timer::C, now, cfg.timer_c);
                }
            }
            Kind::NonInvite => {
                if unreliable {
                    t.arm(Timer::E, now, cfg.t1);
                }
                t.arm(Timer::F, now, 64 * cfg.t1);
            }
        }
        (t, out)
    }

    /// A server transaction for a request just received (§17.2.1, §17.2.2). An INVITE
    /// server transaction answers 100 Trying at once (the TU of a proxy does not answer
    /// within 200 ms): the first action is `SendResponse` of a 100 the owner builds.
    pub fn server(kind: Kind, rel: Reliability, cfg: TimerConfig) -> (Transaction, Actions) {
        let mut out = Actions::default();
        let (state, last) = match kind {
            Kind::Invite => {
                out.push(Action::SendResponse);
                (State::Proceeding, 100)
            }
            Kind::NonInvite => (State::Trying, 0),
        };
        (
            Transaction {
                role: Role::Server,
                kind,
                rel,
                cfg,
                state,
                timers: [None; TIMERS],
                provisional: false,
                last,
                proxy: false,
            },
            out,
        )
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Client or server.
    pub fn role(&self) -> Role {
        self.role
    }

    /// INVITE or not.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Latest response status sent (server) or received (client); 0: none.
    pub fn last_status(&self) -> u16 {
        self.last
    }

    /// Whether timer `t` is running, and when it fires.
    pub fn timer(&self, t: Timer) -> Option<Millis> {
        self.timers[t.index()].map(|a| a.at)
    }

    /// When the next timer fires.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.iter().flatten().map(|a| a.at).min()
    }

    fn arm(&mut self, t: Timer, now: Millis, after: Millis) {
        self.timers[t.index()] = Some(Armed {
            at: now + after,
            interval: after,
        });
    }

    fn stop(&mut self, t: Timer) {
        self.timers[t.index()] = None;
    }

    fn wait(&self, unreliable: Millis) -> Millis {
        match self.rel {
            Reliability::Unreliable => unreliable,
            Reliability::Reliable => 0,
        }
    }

    fn terminate(&mut self, out: &mut Actions) {
        self.state = State::Terminated;
        self.timers = [None; TIMERS];
        out.push(Action::Terminated);
    }

    /// Feeds one event.
    pub fn on_event(&mut self, ev: Event, now: Millis) -> Actions {
        let mut out = Actions::default();
        if self.state == State::Terminated {
            return out;
        }
        if ev == Event::TransportError {
            // §17.1.1.2 / §17.1.2.2 / §17.2.1 / §17.2.2: inform the TU, terminate.
            out.push(Action::TimedOut(None));
            self.terminate(&mut out);
            return out;
        }
        match (self.role, self.kind) {
            (Role::Client, Kind::Invite) => self.client_invite(ev, now, &mut out),
            (Role::Client, Kind::NonInvite) => self.client_non_invite(ev, now, &mut out),
            (Role::Server, Kind::Invite) => self.server_invite(ev, now, &mut out),
            (Role::Server, Kind::NonInvite) => self.server_non_invite(ev, now, &mut out),
        }
        out
    }

    fn client_invite(&mut self, ev: Event, now: Millis, out: &mut Actions) {
        let Event::Response(code) = ev else { return };
        match (self.state, code) {
            // §17.1.1.2: a provisional response stops retransmissions; timer C restarts
            // (§16.7 step 2).
            (State::Calling | State::Proceeding, 100..=199) => {
                self.state = State::Proceeding;
                self.stop(Timer::A);
                self.stop(Timer::B);
                self.provisional = true;
                if self.proxy {
                    self.arm(Timer::C, now, self.cfg.timer_c);
                }
                self.last = code;
                out.push(Action::Pass(code));
            }
            // RFC 6026 §7.2: a 2xx moves to Accepted, where its retransmissions (and
            // those of other forks' 2xx) still pass up for 64*T1 (timer M); the ACK is
            // the TU's, end to end.
            (State::Calling | State::Proceeding, 200..=299) => {
                self.state = State::Accepted;
                self.timers = [None; TIMERS];
                self.last = code;
                out.push(Action::Pass(code));
                self.arm(Timer::M, now, 64 * self.cfg.t1);
            }
            (State::Accepted, 200..=299) => out.push(Action::Pass(code)),
            // §17.1.1.2: a final non-2xx: ACK it, pass it up, wait (timer D) to absorb
            // its retransmissions.
            (State::Calling | State::Proceeding, 300..=699) => {
                self.state = State::Completed;
                self.timers = [None; TIMERS];
                self.last = code;
                out.push(Action::SendAck);
                out.push(Action::Pass(code));
                let d = self.wait(32_000.max(64 * self.cfg.t1));
                self.arm(Timer::D, now, d);
            }
            // A retransmitted final response: ACK again, not passed up.
            (State::Completed, 300..=699) => out.push(Action::SendAck),
            _ => {}
        }
    }

    fn client_non_invite(&mut self, ev: Event, now: Millis, out: &mut Actions) {
        let Event::Response(code) = ev else { return };
        match (self.state, code) {
            (State::Trying | State::Proceeding, 100..=199) => {
                self.state = State::Proceeding;
                self.last = code;
                out.push(Action::Pass(code));
            }
            // §17.1.2.2: a final response: pass it up, absorb retransmissions for T4.
            (State::Trying | State::Proceeding, 200..=699) => {
                self.state = State::Completed;
                self.timers = [None; TIMERS];
                self.last = code;
                out.push(Action::Pass(code));
                let k = self.wait(self.cfg.t4);
                self.arm(Timer::K, now, k);
            }
            _ => {}
        }
    }

    fn server_invite(&mut self, ev: Event, now: Millis, out: &mut Actions) {
        match (self.state, ev) {
            // §17.2.1: a retransmitted INVITE gets the latest provisional response again;
            // in Completed the final response again; in Accepted it is absorbed
            // (RFC 6026 §7.1).
            (State::Proceeding | State::Completed, Event::RequestRetransmission) => {
                out.push(Action::SendResponse)
            }
            (State::Proceeding, Event::Send(code @ 100..=199)) => {
                self.last = code;
                out.push(Action::SendResponse);
            }
            // RFC 6026 §7.1: a 2xx moves to Accepted; timer L absorbs retransmitted
            // INVITEs while the TU retransmits the 2xx end to end.
            (State::Proceeding, Event::Send(code @ 200..=299)) => {
                self.last = code;
                self.state = State::Accepted;
                out.push(Action::SendResponse);
                self.arm(Timer::L, now, 64 * self.cfg.t1);
            }
            (State::Accepted, Event::Send(code @ 200..=299)) => {
                self.last = code;
                out.push(Action::SendResponse);
            }
            // §17.2.1: a final non-2xx: retransmit it (timer G) until the ACK comes, give
            // up after timer H.
            (State::Proceeding, Event::Send(code @ 300..=699)) => {
                self.last = code;
                self.state = State::Completed;
                out.push(Action::SendResponse);
                if self.rel == Reliability::Unreliable {
                    self.arm(Timer::G, now, self.cfg.t1);
                }
                self.arm(Timer::H, now, 64 * self.cfg.t1);
            }
            (State::Completed, Event::Ack) => {
                self.state = State::Confirmed;
                self.stop(Timer::G);
                self.stop(Timer::H);
                let i = self.wait(self.cfg.t4);
                self.arm(Timer::I, now, i);
            }
            _ => {}
        }
    }

    fn server_non_invite(&mut self, ev: Event, now: Millis, out: &mut Actions) {
        match (self.state, ev) {
            // §17.2.2: retransmissions are absorbed in Trying, answered with the latest
            // response in Proceeding and Completed.
            (State::Proceeding | State::Completed, Event::RequestRetransmission) => {
                out.push(Action::SendResponse)
            }
            (State::Trying | State::Proceeding, Event::Send(code @ 100..=199)) => {
                self.last = code;
                self.state = State::Proceeding;
                out.push(Action::SendResponse);
            }
            (State::Trying | State::Proceeding, Event::Send(code @ 200..=699)) => {
                self.last = code;
                self.state = State::Completed;
                out.push(Action::SendResponse);
                let j = self.wait(64 * self.cfg.t1);
                self.arm(Timer::J, now, j);
            }
            _ => {}
        }
    }

    /// Fires every timer due at `now`.
    pub fn on_timers(&mut self, now: Millis) -> Actions {
        let mut out = Actions::default();
        for t in Timer::ALL {
            if self.state == State::Terminated {
                break;
            }
            if let Some(a) = self.timers[t.index()]
                && a.at <= now
            {
                self.fire(t, a, now, &mut out);
            }
        }
        out
    }

    fn fire(&mut self, t: Timer, a: Armed, now: Millis, out: &mut Actions) {
        self.stop(t);
        match t {
            // §17.1.1.2: timer A doubles each time (no cap for INVITE).
            Timer::A if self.state == State::Calling => {
                out.push(Action::SendRequest);
                self.arm(Timer::A, now, 2 * a.interval);
            }
            // §17.1.2.2: timer E doubles up to T2 in Trying; T2 in Proceeding.
            Timer::E if matches!(self.state, State::Trying | State::Proceeding) => {
                out.push(Action::SendRequest);
                let next = if self.state == State::Trying {
                    (2 * a.interval).min(self.cfg.t2)
                } else {
                    self.cfg.t2
                };
                self.arm(Timer::E, now, next);
            }
            // §17.2.1: timer G doubles up to T2.
            Timer::G if self.state == State::Completed => {
                out.push(Action::SendResponse);
                self.arm(Timer::G, now, (2 * a.interval).min(self.cfg.t2));
            }
            // Timeouts: the TU treats B and F as a 408 (§8.1.3.1, §17.1.1.2, §17.1.2.2);
            // H means the ACK never came (§17.2.1).
            Timer::B | Timer::F | Timer::H => {
                out.push(Action::TimedOut(Some(t)));
                self.terminate(out);
            }
            Timer::C => {
                out.push(Action::TimerC {
                    provisional: self.provisional,
                });
            }
            Timer::D | Timer::I | Timer::J | Timer::K | Timer::L | Timer::M => self.terminate(out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
