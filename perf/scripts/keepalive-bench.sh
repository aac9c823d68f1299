#!/usr/bin/env bash
# Server CPU per NAT keepalive ping: one release sipd (127.0.0.61:5060, 2 workers, no
# store) pings COUNT NATed contacts every INTERVAL ms; a stand-in for the phones
# (phones.py) registers them and answers the OPTIONS pings. Over the answering window,
# the server's CPU (utime+stime from /proc) and its ping counters (sipctl ping) give
# pings/s and µs of server CPU per ping (the OPTIONS sent, the scheduling, and the
# answer received). A second window of the same length with pinging disabled
# (`sipctl ping disable`) gives the idle baseline, subtracted in `net_us_per_ping`.
#
#   perf/scripts/keepalive-bench.sh [--count N] [--interval MS] [--method options|crlf]
#                                   [--seconds S]
#
# Loopback only; sipd is stopped by its PID; the run is bounded by phones.py's limits.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SIPD_BIN="${SIPD_BIN:-$REPO/target/release/sipd}"
SIPCTL_BIN="${SIPCTL_BIN:-$REPO/target/release/sipctl}"
COUNT=100000
INTERVAL=20000
METHOD=options
SECONDS_RUN=30
while [ $# -gt 0 ]; do
    case "$1" in
        --count) COUNT=$2; shift 2 ;;
        --interval) INTERVAL=$2; shift 2 ;;
        --method) METHOD=$2; shift 2 ;;
        --seconds) SECONDS_RUN=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
RUN="$(mktemp -d "${TMPDIR:-/tmp}/sipmesh-ka.XXXXXX")"
cat > "$RUN/sipd.toml" <<CFG
[listen]
udp = ["127.0.0.61:5060"]
tcp = []
[workers]
count = 2
pin = false
[grpc]
listen = "127.0.0.61:50061"
[tags]
segment = "$RUN/own"
[nat]
keepalive = "all"
ping_method = "$METHOD"
ping_interval_ms = $INTERVAL
ping_max_misses = 0
CFG
"$SIPD_BIN" -c "$RUN/sipd.toml" --no-store > "$RUN/sipd.log" 2>&1 &
SIPD=$!
trap 'kill $SIPD 2>/dev/null || true; wait $SIPD 2>/dev/null || true; rm -rf "$RUN"' EXIT
sleep 1
cpu() { awk '{print $14 + $15}' "/proc/$SIPD/stat"; }
ping_json() { "$SIPCTL_BIN" --server 127.0.0.61:50061 --json ping; }
NOANS=""
[ "$METHOD" = crlf ] && NOANS="--no-answer"
# Registration takes its time; the measured window starts one interval later (every
# contact on the wheel) and lasts SECONDS_RUN.
python3 "$HERE/phones.py" 127.0.0.62 127.0.0.61:5060 "$COUNT" \
    "$(( 2 * SECONDS_RUN + INTERVAL / 1000 + 2 ))" $NOANS > "$RUN/phones.json" &
PHONES=$!
# Wait for the registrations, then one interval.
for _ in $(seq 1 240); do
    n=$(ping_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["aors"])')
    [ "$n" -ge "$COUNT" ] && break
    sleep 0.5
done
sleep $(( INTERVAL / 1000 + 1 ))
c0=$(cpu); p0=$(ping_json); t0=$(date +%s.%N)
sleep "$SECONDS_RUN"
c1=$(cpu); p1=$(ping_json); t1=$(date +%s.%N)
"$SIPCTL_BIN" --server 127.0.0.61:50061 ping disable > /dev/null
sleep "$SECONDS_RUN"
c2=$(cpu)
wait $PHONES
TCK=$(getconf CLK_TCK)
python3 - "$c0" "$c1" "$t0" "$t1" "$TCK" "$p0" "$p1" "$RUN/phones.json" "$METHOD" "$COUNT" "$INTERVAL" "$c2" <<'PY'
import json, sys
c0, c1, t0, t1, tck = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
p0, p1 = json.loads(sys.argv[6]), json.loads(sys.argv[7])
phones = json.load(open(sys.argv[8]))
sent = p1["sent"] - p0["sent"]
answers = p1["answers"] - p0["answers"]
cpu = (c1 - c0) / tck
idle = (float(sys.argv[12]) - c1) / tck
wall = t1 - t0
print(f"method={sys.argv[9]} contacts={sys.argv[10]} interval_ms={sys.argv[11]} "
      f"pings_per_s={sent / wall:.0f} answers_per_s={answers / wall:.0f} "
      f"server_cpu_pct={100 * cpu / wall:.1f} idle_cpu_pct={100 * idle / wall:.1f} "
      f"us_per_ping={1e6 * cpu / max(sent, 1):.2f} net_us_per_ping={1e6 * (cpu - idle) / max(sent, 1):.2f} "
      f"missed={p1['missed'] - p0['missed']} ring_full={p1['ring_full']} phones={json.dumps(phones)}")
PY
