//! Every RFC 4475 torture message sent over UDP to a running node: the node answers each
//! as the RFC and the corpus manifest describe, or drops it (responses, unanswerable
//! requests), and keeps serving.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sipmesh_tests::*;

/// (file, expected status; 0 = no reply)
const EXPECTED: &[(&str, u16)] = &[
    ("wsinv.dat", 405), // INVITE: well formed, not served by a registrar (Allow given)
    ("intmeth.dat", 501), // unknown method
    ("esc01.dat", 405),
    ("escnull.dat", 200), // two distinct contacts registered
    ("esc02.dat", 501),   // RE%47IST%45R is not REGISTER
    ("lwsdisp.dat", 200),
    ("longreq.dat", 405),
    ("dblreq.dat", 200), // REGISTER handled, trailing INVITE octets ignored
    ("semiuri.dat", 200),
    ("transports.dat", 200),
    ("mpart01.dat", 405),
    ("unreason.dat", 0), // responses: nothing to match, dropped
    ("noreason.dat", 0),
    ("badinv01.dat", 400),
    ("clerr.dat", 400),
    ("ncl.dat", 400),
    ("scalar02.dat", 400),
    ("scalarlg.dat", 0),
    ("quotbal.dat", 400),
    ("ltgtruri.dat", 400),
    ("lwsruri.dat", 400),
    ("lwsstart.dat", 400),
    ("trws.dat", 400),
    ("escruri.dat", 400),
    ("baddate.dat", 400),
    ("regbadct.dat", 400),
    ("badaspec.dat", 400),
    ("baddn.dat", 400),
    ("badvers.dat", 505),
    ("mismatch01.dat", 400),
    ("mismatch02.dat", 501),
    ("bigcode.dat", 0),
    ("badbranch.dat", 200), // tolerated (RFC 2543 style branch)
    ("insuf.dat", 400),
    ("unkscm.dat", 416),
    ("novelsc.dat", 416),
    ("unksm2.dat", 400), // AoR must be a SIP URI
    ("bext01.dat", 420),
    ("invut.dat", 405),
    ("regaut01.dat", 200),
    ("multi01.dat", 400),
    ("mcl01.dat", 400),
    ("bcast.dat", 0),
    ("zeromf.dat", 483),
    ("cparam01.dat", 200),
    ("cparam02.dat", 200),
    ("regescrt.dat", 200),
    ("sdp01.dat", 405),
    ("inv2543.dat", 405),
    ("test.dat", 0), // no Via: unanswerable, dropped
];

#[test]
fn the_node_answers_every_torture_message_as_described() {
    // The expectations are those of a registrar (the UAS role: 405 for an INVITE, 501
    // for an unknown method, Require checked); as a proxy the node would route the
    // valid requests instead (404 for users it does not know).
    let config = format!(
        "{}\n[proxy]\nenabled = false\n[presence]\nenabled = false\n",
        TEST_CONFIG.replace("4096", "65535")
    );
    let mut sipd = Sipd::start(&config, &[]);
    // The corpus's Vias name port 5060 (or ask for rport): the client sits on 5060 of an
    // address of its own, so replies sent by RFC 3261 §18.2.2 reach it.
    let ip = IpAddr::V4(client_ip());
    let client5060 = UdpClient::bind(SocketAddr::new(ip, 5060), sipd.addr);
    // quotbal.dat's Via names port 5050.
    let client5050 = UdpClient::bind(SocketAddr::new(ip, 5050), sipd.addr);
    let dir = repo_root().join("tests/data/rfc4475");
    let manifest = std::fs::read_to_string(dir.join("manifest.tsv")).unwrap();
    assert_eq!(
        manifest.lines().count() - 1,
        EXPECTED.len(),
        "every corpus file has an expectation"
    );
    let mut failures = Vec::new();
    for &(file, want) in EXPECTED {
        let data = std::fs::read(dir.join(file)).unwrap();
        let client = if data.windows(6).any(|w| w == b":5050;") {
            &client5050
        } else {
            &client5060
        };
        client.send(&data);
        let got = if want == 0 {
            client.recv_within(Duration::from_millis(300))
        } else {
            client.recv()
        };
        let code = got.as_deref().map_or(0, status);
        if code != want {
            failures.push(format!("{file}: want {want}, got {code}: {got:?}"));
        }
        if file == "bext01.dat" {
            let r = got.unwrap_or_default();
            assert_eq!(
                header_values(&r, "Unsupported"),
                vec!["nothingSupportsThis", "nothingSupportsThisEither"]
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(sipd.alive());
    assert!(
        sipd.wait_change(
            &[
                "op=upsert",
                "aor=null-\\0-null@example.com",
                "contact=sip:%00@"
            ],
            Duration::from_secs(3)
        )
        .is_some()
    );
    assert!(
        sipd.wait_change(
            &[
                "op=upsert",
                "aor=null-\\0-null@example.com",
                "contact=sip:%00%00@"
            ],
            Duration::from_secs(3)
        )
        .is_some()
    );
}

#[test]
fn fetches_show_url_parameters_and_escaped_headers_as_registered() {
    let sipd = Sipd::start(TEST_CONFIG, &[]);
    let client = UdpClient::bind(SocketAddr::new(IpAddr::V4(client_ip()), 5060), sipd.addr);
    let dir = repo_root().join("tests/data/rfc4475");
    for (file, fetch_user, expect) in [
        // RFC 4475 §3.3.12: unknownparam is a contact parameter, not a URI parameter.
        (
            "cparam01.dat",
            "watson",
            "<sip:+19725552222@gw1.example.net>;expires=",
        ),
        // §3.3.13: inside <> it is a URI parameter and stays one.
        (
            "cparam02.dat",
            "watson",
            "<sip:+19725552222@gw1.example.net;unknownparam>;expires=",
        ),
        // §3.3.14: the escaped Route header stays in the contact URI.
        (
            "regescrt.dat",
            "user",
            "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>;expires=",
        ),
    ] {
        let data = std::fs::read(dir.join(file)).unwrap();
        client.send(&data);
        let r = client.recv().unwrap();
        assert_eq!(status(&r), 200, "{file}: {r}");
        let me = client.local();
        let fetch = register(me, "UDP", fetch_user, &format!("fetch-{file}"), 1, &[]);
        let r = client.request(&fetch);
        assert!(
            header_values(&r, "Contact")
                .iter()
                .any(|c| c.starts_with(expect)),
            "{file}: {r}"
        );
    }
}
