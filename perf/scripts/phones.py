#!/usr/bin/env python3
"""A stand-in for N NATed phones behind one UDP socket, for keepalive load runs.

    phones.py LOCAL_IP SERVER_IP:PORT COUNT SECONDS [--no-answer]

Registers COUNT users (ph0..ph<COUNT-1>@example.com) with private Contact addresses
(10.x.y.z, so the server sees them as NATed) through one socket, 500 REGISTERs in flight
at most (unanswered ones are sent again after 1 s), then answers every OPTIONS ping with
200 OK (unless --no-answer) for SECONDS seconds and prints one JSON line: registered,
pings received, pings per second over the window, distinct contacts pinged.
Bounded: at most 120 s of registration, then SECONDS.
"""
import json
import socket
import sys
import time

local_ip, server, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
answer = "--no-answer" not in sys.argv
host, port = server.rsplit(":", 1)
dst = (host, int(port))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((local_ip, 0))
lport = s.getsockname()[1]


def register(i):
    user = f"ph{i}"
    return (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local_ip}:{lport};rport;branch=z9hG4bK-{user}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{user}@example.com>;tag=t{i}\r\n"
        f"To: <sip:{user}@example.com>\r\n"
        f"Call-ID: {user}-reg\r\n"
        f"CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:5060>\r\n"
        f"Expires: 3600\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def header(lines, name):
    for l in lines:
        if l.lower().startswith(name.lower() + ":"):
            return l
    return None


pending = {}
nxt = 0
done = 0
deadline = time.time() + 120
s.settimeout(0.05)
while done < count and time.time() < deadline:
    while nxt < count and len(pending) < 500:
        s.sendto(register(nxt), dst)
        pending[nxt] = time.time()
        nxt += 1
    try:
        data, _ = s.recvfrom(65535)
        if data.startswith(b"SIP/2.0 200"):
            for l in data.split(b"\r\n"):
                if l.startswith(b"Call-ID: ph"):
                    i = int(l[len(b"Call-ID: ph"):].split(b"-")[0])
                    if pending.pop(i, None) is not None:
                        done += 1
    except socket.timeout:
        pass
    now = time.time()
    for i, t in list(pending.items()):
        if now - t > 1.0:
            s.sendto(register(i), dst)
            pending[i] = now

pings = 0
seen = set()
start = time.time()
end = start + seconds
s.settimeout(0.2)
while time.time() < end:
    try:
        data, frm = s.recvfrom(65535)
    except socket.timeout:
        continue
    if not data.startswith(b"OPTIONS "):
        if data == b"\r\n\r\n":
            pings += 1
        continue
    pings += 1
    lines = data.decode(errors="replace").split("\r\n")
    seen.add(lines[0].split(" ")[1])
    if answer:
        r = "SIP/2.0 200 OK\r\n"
        for h in ("Via", "From", "To", "Call-ID", "CSeq"):
            v = header(lines, h)
            if v:
                r += v + "\r\n"
        s.sendto((r + "Content-Length: 0\r\n\r\n").encode(), frm)
elapsed = time.time() - start
print(json.dumps({"registered": done, "pings": pings, "pings_per_s": round(pings / elapsed),
                  "contacts_pinged": len(seen)}))
