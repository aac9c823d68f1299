#!/usr/bin/env bash
# Calls through the proxy with dialog tracking: one release sipd (127.0.0.71:5060, 2
# workers, no store, CDRs on), a SIPp callee (call-uas.xml) registered as bob, a SIPp
# caller (call-uac.xml) at RATE calls/s for CALLS calls with a PAUSE ms hold time. Prints
# one line: rate asked, successful and failed calls, SIPp's mean rate, server CPU per
# call, server RSS before/after, CDR lines, and the most live dialogs seen.
#
#   perf/scripts/call-bench.sh [--rate R] [--calls N] [--pause MS] [--timeout S]
#
# Loopback only; every SIPp run bounded by -m and -timeout; only processes started here
# are stopped, by PID.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SIPD_BIN="${SIPD_BIN:-$REPO/target/release/sipd}"
SIPCTL_BIN="${SIPCTL_BIN:-$REPO/target/release/sipctl}"
RATE=1000
CALLS=""
PAUSE=1000
TIMEOUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE=$2; shift 2 ;;
        --calls) CALLS=$2; shift 2 ;;
        --pause) PAUSE=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
CALLS="${CALLS:-$((RATE * 10))}"
TIMEOUT="${TIMEOUT:-$(( CALLS / RATE * 2 + PAUSE / 1000 + 20 ))}"
[ -x "$SIPD_BIN" ] || (cd "$REPO" && cargo build --release -q -p sipmesh-controlplane)
RUN="$(mktemp -d "${TMPDIR:-/tmp}/sipmesh-calls.XXXXXX")"
SRV=127.0.0.71
UAS=127.0.0.72
UAC=127.0.0.73
"$SIPD_BIN" --listen $SRV:5060 --grpc $SRV:50071 --segment "$RUN/own" --no-store \
    --cdr "$RUN/cdr.jsonl" --workers 2 --no-pin > "$RUN/sipd.log" 2>&1 &
SIPD=$!
UAS_PID=""
cleanup() {
    [ -n "$UAS_PID" ] && kill "$UAS_PID" 2>/dev/null || true
    kill "$SIPD" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT
sleep 1
# Register bob from the port SIPp will answer on, then hand the port to SIPp.
python3 - "$UAS" "$SRV" <<'PY'
import socket, sys
uas, srv = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((uas, 5090)); s.settimeout(5)
m = (f"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {uas}:5090;rport;branch=z9hG4bKreg1\r\n"
     f"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=r1\r\nTo: <sip:bob@example.com>\r\n"
     f"Call-ID: bob-reg\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@{uas}:5090>\r\nExpires: 3600\r\n"
     f"Content-Length: 0\r\n\r\n")
s.sendto(m.encode(), (srv, 5060))
assert s.recv(4096).startswith(b"SIP/2.0 200")
PY
timeout $((TIMEOUT + 30)) sipp -sf "$REPO/perf/profiles/call-uas.xml" -i $UAS -p 5090 \
    -timeout "${TIMEOUT}s" -nostdin -max_socket 5000 > /dev/null 2>&1 &
UAS_PID=$!
sleep 0.5
cpu() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SIPD/stat"; }
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$SIPD/status"; }
c0=$(cpu); r0=$(rss)
timeout $((TIMEOUT + 30)) sipp $SRV:5060 -sf "$REPO/perf/profiles/call-uac.xml" -s bob \
    -i $UAC -p 5080 -r "$RATE" -m "$CALLS" -d "$PAUSE" -l 200000 -timeout "${TIMEOUT}s" \
    -timeout_error -nostdin -max_socket 5000 -trace_stat -stf "$RUN/uac.csv" \
    > "$RUN/uac.out" 2>&1 &
UAC_PID=$!
most=0
while kill -0 $UAC_PID 2>/dev/null; do
    n=$("$SIPCTL_BIN" --server $SRV:50071 --json dialog list 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])' 2>/dev/null || echo 0)
    [ "$n" -gt "$most" ] && most=$n && rmost=$(rss)
    sleep 0.5
done
wait $UAC_PID || true
c1=$(cpu); r1=$(rss)
TCK=$(getconf CLK_TCK)
python3 - "$RUN/uac.csv" "$c0" "$c1" "$TCK" "$r0" "$r1" "$most" "${rmost:-0}" "$RATE" "$RUN/cdr.jsonl" <<'PY'
import csv, sys
path, c0, c1, tck, r0, r1, most, rmost, rate, cdr = sys.argv[1:11]
rows = list(csv.reader(open(path), delimiter=';'))
h, last = rows[0], rows[-1]
g = lambda k: last[h.index(k)]
ok, failed = int(g("SuccessfulCall(C)")), int(g("FailedCall(C)"))
cps = float(g("CallRate(C)"))
cpu = (float(c1) - float(c0)) / float(tck)
try:
    cdrs = sum(1 for _ in open(cdr))
except OSError:
    cdrs = 0
print(f"rate={rate} ok={ok} failed={failed} sipp_cps={cps:.0f} server_cpu_s={cpu:.2f} "
      f"us_per_call={1e6 * cpu / max(ok, 1):.1f} rss_kib={r0}->{r1} most_live_dialogs={most} "
      f"rss_at_most_kib={rmost} cdrs={cdrs}")
PY
