//! Request forwarding, response relaying and best-response selection (RFC 3261 §16).

use super::*;
use sip_wire::Framing;

const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKa1\r\n\
Max-Forwards: 69\r\n\
Route: <sip:192.0.2.1:5060;lr>, <sip:edge.example;lr>\r\n\
From: <sip:alice@example.com>;tag=f1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: c1@host\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@192.0.2.10:5062>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

fn parse(s: &str) -> Message<'_> {
    Message::parse(s.as_bytes(), Framing::Datagram).unwrap()
}

fn fwd<'a>(branch: &'a [u8]) -> Forward<'a> {
    Forward {
        request_uri: Some(b"sip:bob@10.0.0.5:5060;ob"),
        via_addr: "192.0.2.1:5060".parse().unwrap(),
        transport: "UDP",
        branch,
        record_route: Some(b"sip:192.0.2.1:5060;lr"),
        pop_route: true,
        push_routes: b"",
    }
}

#[test]
fn a_forwarded_request_follows_16_6() {
    let m = parse(INVITE);
    let mut buf = [0u8; 4096];
    let n = forward_request(&m, &fwd(b"z9hG4bKsm1"), &mut buf).unwrap();
    let out = std::str::from_utf8(&buf[..n]).unwrap();
    let lines: Vec<&str> = out.split("\r\n").collect();
    // Step 2: the new Request-URI; step 8: our Via on top of the received one.
    assert_eq!(lines[0], "INVITE sip:bob@10.0.0.5:5060;ob SIP/2.0");
    assert_eq!(
        lines[1],
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsm1"
    );
    // Step 4: our Record-Route with lr.
    assert_eq!(lines[2], "Record-Route: <sip:192.0.2.1:5060;lr>");
    assert!(out.contains("\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport;branch=z9hG4bKa1\r\n"));
    // Step 3: Max-Forwards decremented.
    assert!(out.contains("\r\nMax-Forwards: 68\r\n"));
    // §16.4: the Route that named us is gone, the next one stays.
    assert!(out.contains("\r\nRoute: <sip:edge.example;lr>\r\n"));
    assert!(!out.contains("192.0.2.1:5060;lr>,"));
    // The body and everything else as received.
    assert!(out.ends_with("\r\nContent-Length: 4\r\n\r\nv=0\n"));
    assert!(out.contains("\r\nContent-Type: application/sdp\r\n"));
    let f = parse(out);
    assert!(f.check_request().is_ok());
    assert_eq!(f.vias().count(), 2);
}

#[test]
fn path_routes_go_first_and_a_missing_max_forwards_is_70() {
    let req = INVITE.replace("Max-Forwards: 69\r\n", "").replace(
        "Route: <sip:192.0.2.1:5060;lr>, <sip:edge.example;lr>\r\n",
        "",
    );
    let m = parse(&req);
    let mut f = fwd(b"z9hG4bKsm2");
    f.pop_route = false;
    f.push_routes = b"<sip:p1.example;lr>,<sip:p2.example;lr>";
    f.record_route = None;
    let mut buf = [0u8; 4096];
    let n = forward_request(&m, &f, &mut buf).unwrap();
    let out = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(out.contains("\r\nRoute: <sip:p1.example;lr>,<sip:p2.example;lr>\r\n"));
    assert!(
        out.contains("\r\nMax-Forwards: 70\r\n"),
        "§16.6 step 3: added with 70"
    );
    assert!(!out.contains("Record-Route"));
    // With Routes of its own, the Path routes come before them.
    let m = parse(INVITE);
    f.pop_route = true;
    let n = forward_request(&m, &f, &mut buf).unwrap();
    let out = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(
        out.contains(
            "\r\nRoute: <sip:p1.example;lr>,<sip:p2.example;lr>, <sip:edge.example;lr>\r\n"
        )
    );
    // A buffer too small: nothing.
    assert_eq!(forward_request(&m, &f, &mut [0u8; 100]), None);
}

#[test]
fn a_relayed_response_loses_our_via_only() {
    let resp = "SIP/2.0 180 Ringing\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsm1, SIP/2.0/UDP 192.0.2.10:5062;rport=5062;branch=z9hG4bKa1\r\n\
From: <sip:alice@example.com>;tag=f1\r\n\
To: <sip:bob@example.com>;tag=b7\r\n\
Call-ID: c1@host\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";
    let m = parse(resp);
    let mut buf = [0u8; 2048];
    let n = forward_response(&m, None, &mut buf).unwrap();
    let out = std::str::from_utf8(&buf[..n]).unwrap().to_string();
    assert!(out.starts_with(
        "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 192.0.2.10:5062;rport=5062;branch=z9hG4bKa1\r\n"
    ));
    assert_eq!(parse(&out).vias().count(), 1);
    // Our Via on its own line.
    let two_lines = resp.replace(
        ", SIP/2.0/UDP 192.0.2.10",
        "\r\nVia: SIP/2.0/UDP 192.0.2.10",
    );
    let n = forward_response(&parse(&two_lines), None, &mut buf).unwrap();
    assert_eq!(&buf[..n], out.as_bytes());
    // No Via left for anyone: not forwarded (§16.7 step 3).
    let only_ours = resp.replace(
        ", SIP/2.0/UDP 192.0.2.10:5062;rport=5062;branch=z9hG4bKa1",
        "",
    );
    assert_eq!(forward_response(&parse(&only_ours), None, &mut buf), None);
}

#[test]
fn the_best_response_waits_for_every_branch_and_6xx_and_2xx_do_not() {
    use Decision::*;
    // §16.7: 486 and 404 from two forks: the 4xx... both 4xx, none preferred: the first.
    let mut c = ResponseContext::new(3);
    assert_eq!(c.on_response(0, 100), Drop);
    assert_eq!(c.on_response(0, 180), Forward);
    assert_eq!(c.cancellable().collect::<Vec<_>>(), vec![0]);
    assert_eq!(c.on_response(0, 486), Hold);
    assert_eq!(c.on_response(1, 503), Hold);
    assert_eq!(c.pending().collect::<Vec<_>>(), vec![2]);
    // A 407 is preferred among 4xx (the caller can retry with credentials).
    assert_eq!(
        c.on_response(2, 407),
        SendBest {
            branch: 2,
            code: 407
        }
    );
    assert!(c.final_sent());
    assert_eq!(c.on_response(2, 407), Drop, "a retransmission");
    // Only 5xx: a 503 goes up as 500 (§16.7 step 6).
    let mut c = ResponseContext::new(2);
    assert_eq!(c.on_response(0, 503), Hold);
    assert_eq!(
        c.on_response(1, 503),
        SendBest {
            branch: 0,
            code: 500
        }
    );
    // A 6xx ends it at once.
    let mut c = ResponseContext::new(3);
    assert_eq!(
        c.on_response(1, 603),
        SendBest {
            branch: 1,
            code: 603
        }
    );
    assert_eq!(c.on_response(0, 200), Forward, "a 2xx always goes up");
    // 2xx: forwarded at once, and every later 2xx too; later failures are dropped.
    let mut c = ResponseContext::new(3);
    assert_eq!(c.on_response(0, 200), Forward);
    assert_eq!(c.on_response(1, 200), Forward);
    assert_eq!(c.on_response(2, 480), Drop);
    assert_eq!(c.on_response(2, 180), Drop);
    // 3xx ranks before 4xx and 5xx; a timed-out branch is a 408.
    let mut c = ResponseContext::new(3);
    c.on_response(0, 408);
    c.on_response(1, 302);
    assert_eq!(
        c.on_response(2, 500),
        SendBest {
            branch: 1,
            code: 302
        }
    );
    // Out of range.
    assert_eq!(ResponseContext::new(1).on_response(5, 200), Drop);
}

#[test]
fn cancel_and_ack_copy_what_9_1_and_17_1_1_3_require() {
    let m = parse(INVITE);
    let mut fbuf = [0u8; 4096];
    let n = forward_request(&m, &fwd(b"z9hG4bKsm9"), &mut fbuf).unwrap();
    let sent = parse(std::str::from_utf8(&fbuf[..n]).unwrap());
    let mut buf = [0u8; 2048];
    let n = cancel_or_ack(&sent, b"CANCEL", None, &mut buf).unwrap();
    let c = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(c.starts_with("CANCEL sip:bob@10.0.0.5:5060;ob SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsm9\r\n"));
    assert_eq!(parse(c).vias().count(), 1, "our Via only");
    assert!(c.contains("\r\nRoute: <sip:edge.example;lr>\r\n"));
    assert!(c.contains("\r\nTo: <sip:bob@example.com>\r\n"));
    assert!(c.contains("\r\nCSeq: 1 CANCEL\r\n"));
    assert!(parse(c).check_request().is_ok());
    let n = cancel_or_ack(
        &sent,
        b"ACK",
        Some(b"<sip:bob@example.com>;tag=b7"),
        &mut buf,
    )
    .unwrap();
    let a = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(a.starts_with("ACK sip:bob@10.0.0.5:5060;ob SIP/2.0\r\n"));
    assert!(a.contains("\r\nTo: <sip:bob@example.com>;tag=b7\r\n"));
    assert!(a.contains("\r\nCSeq: 1 ACK\r\n"));
    // A 503 passed on as 500.
    let resp = "SIP/2.0 503 Busy\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nVia: SIP/2.0/UDP b;branch=z9hG4bK2\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n";
    let n = forward_response(
        &parse(resp),
        Some((500, b"Server Internal Error")),
        &mut buf,
    )
    .unwrap();
    assert!(buf[..n].starts_with(b"SIP/2.0 500 Server Internal Error\r\nVia: SIP/2.0/UDP b;"));
}

#[test]
fn serial_forking_asks_for_the_next_targets_until_one_answers_or_none_is_left() {
    use Decision::*;
    let mut c = ResponseContext::new(1);
    // The first target fails, more wait: next.
    assert_eq!(c.on_response_more(0, 486, true), Next);
    assert!(!c.final_sent());
    assert_eq!(c.add_branches(2), Some(1));
    assert_eq!(c.pending().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(c.on_response_more(1, 480, false), Hold);
    // The last one fails and nothing is left: the best of all three (486 over 480 and
    // 404: the first of the 4xx).
    assert_eq!(
        c.on_response_more(2, 404, false),
        SendBest {
            branch: 0,
            code: 486
        }
    );
    // A 6xx stops the search even with targets left.
    let mut c = ResponseContext::new(1);
    assert_eq!(
        c.on_response_more(0, 603, true),
        SendBest {
            branch: 0,
            code: 603
        }
    );
    assert_eq!(c.add_branches(1), None, "after the final response");
    // No room beyond MAX_BRANCHES.
    let mut c = ResponseContext::new(MAX_BRANCHES);
    assert_eq!(c.add_branches(1), None);
}
