#!/usr/bin/env bash
# Restart persistence figures: load N distinct contacts into one node (async store), stop
# it, measure bytes on disk per contact (before and after `sipctl db compact`), then restart
# it on the same data directory and measure the recovery (contacts loaded, seconds, rate)
# and the time until it serves.
#
#   perf/scripts/store-bench.sh [--contacts N] [--workers W]
#
# Loopback only (127.0.0.71 server, 127.0.0.72 SIPp); SIPp runs are bounded by -m and
# -timeout; only processes started here are signalled, by PID.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PERF="$(cd "$HERE/.." && pwd)"
REPO="$(cd "$PERF/.." && pwd)"
SIPD="${SIPD_BIN:-$REPO/target/release/sipd}"
SIPCTL="${SIPCTL_BIN:-$REPO/target/release/sipctl}"
N=1000000; WORKERS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --contacts) N="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        *) echo "store-bench.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ ! -x "$SIPD" ] || [ ! -x "$SIPCTL" ]; then
    (cd "$REPO" && cargo build --release -q -p sipmesh-controlplane --bin sipd --bin sipctl)
fi
OUT="$(mktemp -d "${TMPDIR:-/tmp}/sipmesh-store.XXXXXX")"
PID=""
stop_node() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID"
        for _ in $(seq 300); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$PID" 2>/dev/null && kill -KILL "$PID" || true
    fi
    PID=""
}
cleanup() { stop_node; rm -rf "$OUT/data"; }
trap cleanup EXIT
start_node() { # log
    local t0; t0=$(date +%s.%N)
    "$SIPD" --sip 127.0.0.71:5060 --grpc 127.0.0.71:50051 --workers "$WORKERS" --no-pin \
        --data-dir "$OUT/data" --segment "$OUT/segment" > /dev/null 2> "$OUT/$1" &
    PID=$!
    for _ in $(seq 1200); do grep -q " listening " "$OUT/$1" 2>/dev/null && break; sleep 0.05; done
    local t1; t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}

echo "machine: $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%d)"
start_node first.err > /dev/null
half=$(( N / 2 ))
for i in 0 1; do
    m=$half; [ "$i" = 1 ] && m=$(( N - half ))
    sed "s/user\[call_number\]/s${i}user[call_number]/g" "$PERF/profiles/register.xml" > "$OUT/reg$i.xml"
    timeout --kill-after=5 300 sipp 127.0.0.71:5060 -sf "$OUT/reg$i.xml" -t u1 -i 127.0.0.72 \
        -p $(( 5070 + 4 * i )) -r 25000 -rp 1000 -m "$m" -l 101000 -timeout 240s \
        -buff_size 4194304 -nostdin -trace_stat -stf "$OUT/sipp$i.csv" -fd 1 > "$OUT/sipp$i.out" 2>&1 &
done
wait %2 %3 2>/dev/null || wait
count=$("$SIPCTL" --server 127.0.0.71:50051 --json sync status | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["count"])')
echo "loaded: $count contacts"
stop_node
raw=$(du -sb "$OUT/data" | cut -f1)
start_node second.err > "$OUT/serve_s"
grep "recovery:" "$OUT/second.err" | tail -1
echo "restart: serving after $(cat "$OUT/serve_s") s (process start to listening)"
"$SIPCTL" --server 127.0.0.71:50051 db compact > /dev/null
compacted=$(du -sb "$OUT/data" | cut -f1)
python3 -c "
n=$count; r=$raw; c=$compacted
print(f'on disk: {r/1048576:.1f} MiB after the load ({r/n:.0f} B/contact), {c/1048576:.1f} MiB after compaction ({c/n:.0f} B/contact)')
"
echo "artifacts: $OUT"
