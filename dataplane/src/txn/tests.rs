//! Every timer and transition with virtual time (RFC 3261 §17, RFC 6026 §7.1).

use super::*;
use Action::*;
use Reliability::*;

const CFG: TimerConfig = TimerConfig {
    t1: 500,
    t2: 4000,
    t4: 5000,
    timer_c: 181_000,
};

fn acts(a: Actions) -> Vec<Action> {
    a.iter().collect()
}

/// Runs the transaction's timers from `from` to `to` in 1 ms steps; returns (time, action).
fn run(t: &mut Transaction, from: Millis, to: Millis) -> Vec<(Millis, Action)> {
    let mut v = Vec::new();
    for now in from..=to {
        for a in t.on_timers(now).iter() {
            v.push((now, a));
        }
    }
    v
}

#[test]
fn invite_client_timer_a_doubles_and_timer_b_times_out_after_64_t1() {
    // RFC 3261 §17.1.1.2
    let (mut t, a) = Transaction::client(Kind::Invite, Unreliable, CFG, false, 0);
    assert_eq!(acts(a), vec![SendRequest]);
    assert_eq!(t.state(), State::Calling);
    assert_eq!(t.timer(Timer::B), Some(32_000));
    let v = run(&mut t, 0, 40_000);
    let resends: Vec<Millis> = v
        .iter()
        .filter(|(_, a)| *a == SendRequest)
        .map(|(t, _)| *t)
        .collect();
    // 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s: intervals 500, 1000, 2000, 4000, 8000, 16000.
    assert_eq!(resends, vec![500, 1500, 3500, 7500, 15_500, 31_500]);
    assert_eq!(
        v.last().copied(),
        Some((32_000, Terminated)),
        "timer B: the TU treats it as a 408"
    );
    assert!(v.contains(&(32_000, TimedOut(Some(Timer::B)))));
    assert_eq!(t.state(), State::Terminated);
}

#[test]
fn invite_client_provisional_stops_retransmissions_and_final_non_2xx_is_acked_with_timer_d() {
    let (mut t, _) = Transaction::client(Kind::Invite, Unreliable, CFG, false, 0);
    assert_eq!(acts(t.on_event(Event::Response(180), 700)), vec![Pass(180)]);
    assert_eq!(t.state(), State::Proceeding);
    assert_eq!((t.timer(Timer::A), t.timer(Timer::B)), (None, None));
    assert!(
        run(&mut t, 701, 100_000).is_empty(),
        "no retransmission, no timeout"
    );
    // 486: ACK, pass up, Completed with timer D ≥ 32 s.
    assert_eq!(
        acts(t.on_event(Event::Response(486), 100_001)),
        vec![SendAck, Pass(486)]
    );
    assert_eq!(t.state(), State::Completed);
    assert_eq!(t.timer(Timer::D), Some(132_001));
    // A retransmitted 486 is ACKed again, not passed up.
    assert_eq!(
        acts(t.on_event(Event::Response(486), 110_000)),
        vec![SendAck]
    );
    assert_eq!(run(&mut t, 110_001, 132_001), vec![(132_001, Terminated)]);
    // Over TCP timer D is zero.
    let (mut t, a) = Transaction::client(Kind::Invite, Reliable, CFG, false, 0);
    assert_eq!(acts(a), vec![SendRequest]);
    assert_eq!(
        t.timer(Timer::A),
        None,
        "no timer A on a reliable transport"
    );
    t.on_event(Event::Response(603), 10);
    assert_eq!(t.timer(Timer::D), Some(10));
}

#[test]
fn invite_client_2xx_goes_to_accepted_passes_retransmissions_and_timer_m_ends_it() {
    // RFC 6026 §7.2
    let (mut t, _) = Transaction::client(Kind::Invite, Unreliable, CFG, false, 0);
    assert_eq!(acts(t.on_event(Event::Response(200), 100)), vec![Pass(200)]);
    assert_eq!(t.state(), State::Accepted);
    assert_eq!((t.timer(Timer::A), t.timer(Timer::B)), (None, None));
    // A retransmitted 2xx still goes up (the ACK is the TU's, end to end); nothing else.
    assert_eq!(acts(t.on_event(Event::Response(200), 600)), vec![Pass(200)]);
    assert!(t.on_event(Event::Response(486), 700).is_empty());
    assert_eq!(run(&mut t, 101, 32_100), vec![(32_100, Terminated)]);
}

#[test]
fn proxy_timer_c_restarts_on_provisional_and_reports_whether_one_came() {
    // RFC 3261 §16.6 step 11, §16.7 step 2, §16.8
    let (mut t, _) = Transaction::client(Kind::Invite, Reliable, CFG, true, 0);
    assert_eq!(t.timer(Timer::C), Some(181_000));
    t.on_event(Event::Response(180), 60_000);
    assert_eq!(t.timer(Timer::C), Some(241_000));
    assert_eq!(
        run(&mut t, 60_001, 241_000),
        vec![(241_000, TimerC { provisional: true })]
    );
    // Without a provisional response (and no timer B: reliable, B still runs 32 s).
    let (mut t, _) = Transaction::client(Kind::Invite, Reliable, CFG, true, 0);
    let v = run(&mut t, 0, 32_000);
    assert!(v.contains(&(32_000, TimedOut(Some(Timer::B)))));
    // A non-proxy INVITE client has no timer C.
    let (t, _) = Transaction::client(Kind::Invite, Reliable, CFG, false, 0);
    assert_eq!(t.timer(Timer::C), None);
}

#[test]
fn non_invite_client_timer_e_caps_at_t2_and_timer_f_times_out() {
    // RFC 3261 §17.1.2.2
    let (mut t, a) = Transaction::client(Kind::NonInvite, Unreliable, CFG, false, 0);
    assert_eq!(acts(a), vec![SendRequest]);
    let v = run(&mut t, 0, 32_000);
    let resends: Vec<Millis> = v
        .iter()
        .filter(|(_, a)| *a == SendRequest)
        .map(|(t, _)| *t)
        .collect();
    // 500, 1000, 2000, 4000, 4000, ...
    assert_eq!(
        resends,
        vec![
            500, 1500, 3500, 7500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500
        ]
    );
    assert!(v.contains(&(32_000, TimedOut(Some(Timer::F)))));
    assert_eq!(t.state(), State::Terminated);
}

#[test]
fn non_invite_client_proceeding_retransmits_every_t2_and_final_waits_timer_k() {
    let (mut t, _) = Transaction::client(Kind::NonInvite, Unreliable, CFG, false, 0);
    assert_eq!(acts(t.on_event(Event::Response(100), 100)), vec![Pass(100)]);
    assert_eq!(t.state(), State::Proceeding);
    // Timer E still armed at 500: fires, then every T2.
    let v = run(&mut t, 101, 9000);
    assert_eq!(
        v,
        vec![(500, SendRequest), (4500, SendRequest), (8500, SendRequest)]
    );
    assert_eq!(
        acts(t.on_event(Event::Response(200), 9000)),
        vec![Pass(200)]
    );
    assert_eq!(t.state(), State::Completed);
    assert_eq!(t.timer(Timer::K), Some(14_000), "T4");
    assert!(
        t.on_event(Event::Response(200), 9100).is_empty(),
        "absorbed"
    );
    assert_eq!(run(&mut t, 9001, 14_000), vec![(14_000, Terminated)]);
    // Reliable: K = 0.
    let (mut t, _) = Transaction::client(Kind::NonInvite, Reliable, CFG, false, 0);
    assert_eq!(t.timer(Timer::E), None);
    t.on_event(Event::Response(404), 50);
    assert_eq!(t.timer(Timer::K), Some(50));
}

#[test]
fn invite_server_sends_100_absorbs_retransmissions_and_retransmits_final_with_g_until_ack() {
    // RFC 3261 §17.2.1
    let (mut t, a) = Transaction::server(Kind::Invite, Unreliable, CFG);
    assert_eq!(acts(a), vec![SendResponse]);
    assert_eq!((t.state(), t.last_status()), (State::Proceeding, 100));
    // A retransmitted INVITE gets the latest provisional again.
    assert_eq!(
        acts(t.on_event(Event::RequestRetransmission, 10)),
        vec![SendResponse]
    );
    t.on_event(Event::Send(180), 20);
    assert_eq!(t.last_status(), 180);
    assert_eq!(acts(t.on_event(Event::Send(486), 1000)), vec![SendResponse]);
    assert_eq!(t.state(), State::Completed);
    assert_eq!(t.timer(Timer::H), Some(33_000));
    let v = run(&mut t, 1001, 9000);
    let g: Vec<Millis> = v.iter().map(|(t, _)| *t).collect();
    // G: 500, 1000, 2000, 4000 (capped at T2).
    assert_eq!(g, vec![1500, 2500, 4500, 8500]);
    assert_eq!(
        acts(t.on_event(Event::RequestRetransmission, 9000)),
        vec![SendResponse]
    );
    // The ACK: Confirmed, timer I = T4, then gone; later ACKs absorbed.
    assert!(t.on_event(Event::Ack, 9100).is_empty());
    assert_eq!(t.state(), State::Confirmed);
    assert_eq!((t.timer(Timer::G), t.timer(Timer::H)), (None, None));
    assert_eq!(t.timer(Timer::I), Some(14_100));
    assert!(t.on_event(Event::Ack, 9200).is_empty());
    assert_eq!(run(&mut t, 9101, 14_100), vec![(14_100, Terminated)]);
}

#[test]
fn invite_server_timer_h_gives_up_when_no_ack_comes() {
    let (mut t, _) = Transaction::server(Kind::Invite, Reliable, CFG);
    t.on_event(Event::Send(404), 0);
    assert_eq!(t.timer(Timer::G), None, "no timer G over TCP");
    let v = run(&mut t, 1, 32_000);
    assert_eq!(
        v,
        vec![(32_000, TimedOut(Some(Timer::H))), (32_000, Terminated)]
    );
    // Reliable: timer I is zero.
    let (mut t, _) = Transaction::server(Kind::Invite, Reliable, CFG);
    t.on_event(Event::Send(404), 0);
    t.on_event(Event::Ack, 5);
    assert_eq!(t.timer(Timer::I), Some(5));
}

#[test]
fn invite_server_2xx_goes_to_accepted_and_timer_l_ends_it() {
    // RFC 6026 §7.1
    let (mut t, _) = Transaction::server(Kind::Invite, Unreliable, CFG);
    assert_eq!(acts(t.on_event(Event::Send(200), 100)), vec![SendResponse]);
    assert_eq!(t.state(), State::Accepted);
    assert!(
        t.on_event(Event::RequestRetransmission, 200).is_empty(),
        "a retransmitted INVITE is absorbed"
    );
    // The TU retransmits its 2xx through the transaction.
    assert_eq!(acts(t.on_event(Event::Send(200), 600)), vec![SendResponse]);
    assert_eq!(run(&mut t, 101, 32_100), vec![(32_100, Terminated)]);
}

#[test]
fn non_invite_server_absorbs_in_trying_answers_again_later_and_timer_j_ends_it() {
    // RFC 3261 §17.2.2
    let (mut t, a) = Transaction::server(Kind::NonInvite, Unreliable, CFG);
    assert!(a.is_empty());
    assert_eq!(t.state(), State::Trying);
    assert!(t.on_event(Event::RequestRetransmission, 10).is_empty());
    t.on_event(Event::Send(100), 20);
    assert_eq!(t.state(), State::Proceeding);
    assert_eq!(
        acts(t.on_event(Event::RequestRetransmission, 30)),
        vec![SendResponse]
    );
    t.on_event(Event::Send(200), 40);
    assert_eq!((t.state(), t.last_status()), (State::Completed, 200));
    assert_eq!(t.timer(Timer::J), Some(32_040));
    assert_eq!(
        acts(t.on_event(Event::RequestRetransmission, 50)),
        vec![SendResponse]
    );
    // A second final response from the TU is not sent.
    assert!(t.on_event(Event::Send(500), 60).is_empty());
    assert_eq!(run(&mut t, 41, 32_040), vec![(32_040, Terminated)]);
    // Reliable: J = 0.
    let (mut t, _) = Transaction::server(Kind::NonInvite, Reliable, CFG);
    t.on_event(Event::Send(404), 7);
    assert_eq!(t.timer(Timer::J), Some(7));
}

#[test]
fn a_transport_error_informs_the_tu_and_terminates() {
    for (role, kind) in [
        (Role::Client, Kind::Invite),
        (Role::Client, Kind::NonInvite),
        (Role::Server, Kind::Invite),
        (Role::Server, Kind::NonInvite),
    ] {
        let mut t = match role {
            Role::Client => Transaction::client(kind, Unreliable, CFG, true, 0).0,
            Role::Server => Transaction::server(kind, Unreliable, CFG).0,
        };
        assert_eq!(
            acts(t.on_event(Event::TransportError, 1)),
            vec![TimedOut(None), Terminated]
        );
        assert_eq!(t.next_deadline(), None);
        assert!(t.on_event(Event::Response(200), 2).is_empty());
    }
}

#[test]
fn next_deadline_is_the_earliest_timer() {
    let (t, _) = Transaction::client(Kind::Invite, Unreliable, CFG, true, 1000);
    assert_eq!(t.next_deadline(), Some(1500));
    let (t, _) = Transaction::client(Kind::Invite, Reliable, CFG, true, 1000);
    assert_eq!(t.next_deadline(), Some(33_000));
    assert_eq!((t.role(), t.kind()), (Role::Client, Kind::Invite));
}
