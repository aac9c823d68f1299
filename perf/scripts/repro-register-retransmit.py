#!/usr/bin/env python3
"""Reproduce: sipd answers a UDP *retransmission* of a REGISTER (byte-identical: same
Call-ID, CSeq and Via branch) with `500 Out of Order CSeq` instead of repeating the 200.

A client whose first 200 OK was lost (UDP) retransmits after T1 and then sees the 500, so the
registration fails although the binding exists. Under load (perf/RESULTS-load.md) every
lost 200 became a failed SIPp call this way.

    sipd --listen 127.0.0.61:5060 --no-pin &   # an address no load run uses
    python3 perf/scripts/repro-register-retransmit.py [127.0.0.61] [5060]
Loopback only; sends two datagrams.
"""
import socket
import sys

host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.61"
port = int(sys.argv[2]) if len(sys.argv) > 2 else 5060
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.52", 0))
s.settimeout(2)
lp = s.getsockname()[1]
req = (
    "REGISTER sip:example.com SIP/2.0\r\n"
    f"Via: SIP/2.0/UDP 127.0.0.52:{lp};branch=z9hG4bK-retrans-1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:retrans@example.com>;tag=abc\r\n"
    "To: <sip:retrans@example.com>\r\n"
    "Call-ID: retrans-test-1@127.0.0.52\r\n"
    "CSeq: 1 REGISTER\r\n"
    f"Contact: <sip:retrans@127.0.0.52:{lp}>\r\n"
    "Expires: 3600\r\n"
    "Content-Length: 0\r\n\r\n"
).encode()
for attempt in ("original", "retransmission (same bytes)"):
    s.sendto(req, (host, port))
    reply = s.recv(65535).decode(errors="replace")
    print(f"{attempt}: {reply.splitlines()[0]}")
