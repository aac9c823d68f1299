#!/usr/bin/env python3
"""Registers COUNT users (PREFIX0..PREFIX<COUNT-1>@example.com) at HOST:PORT over UDP, one
REGISTER at a time with a bounded wait each; prints the number answered 200.

Used by tests that run a SIP client inside a network namespace:
    ip netns exec NS python3 sip_register.py HOST:PORT PREFIX COUNT
"""
import socket
import sys

host, port = sys.argv[1].rsplit(":", 1)
prefix, count = sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host if host != "0.0.0.0" else "", 0))
s.settimeout(1.0)
lport = s.getsockname()[1]
ok = 0
for i in range(count):
    user = f"{prefix}{i}"
    msg = (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{lport};rport;branch=z9hG4bK-{user}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{user}@example.com>;tag=t{i}\r\n"
        f"To: <sip:{user}@example.com>\r\n"
        f"Call-ID: {user}-reg\r\n"
        f"CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@{host}:{lport}>\r\n"
        f"Expires: 600\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()
    for _attempt in range(3):
        s.sendto(msg, (host, int(port)))
        try:
            reply = s.recv(65535)
        except socket.timeout:
            continue
        if reply.startswith(b"SIP/2.0 200"):
            ok += 1
        break
print(ok)
