#!/usr/bin/env bash
# Cluster figures on loopback: replication lag under a sustained REGISTER load, and the
# time and throughput of a full sync while the donor keeps taking writes.
#
#   perf/scripts/cluster-bench.sh lag  [--rate R] [--calls M] [--workers N]
#   perf/scripts/cluster-bench.sh sync [--contacts N] [--write-rate R] [--workers N]
#
# lag:  node 1 (127.0.0.61) and node 2 (127.0.0.62, joined through node 1). SIPp registers
#       M distinct users on node 1 at R/s; node 2's control plane measures, for every
#       record it applies, apply time minus the origin's change time (1 ms resolution).
#       Prints samples, p50, p99, max, and node 1's server CPU per REGISTER.
# sync: node 1 is loaded with N distinct contacts; then, while SIPp keeps registering new
#       users on node 1 at R/s, node 2 joins and full-syncs from it. Prints the records
#       transferred, the sync time (sync-started -> synced events on node 2) and records/s,
#       and checks that both nodes end with equal counts and digests once writes stop.
#
# Loopback only; every SIPp run is bounded by -m and -timeout; only processes started
# here are signalled, by PID.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PERF="$(cd "$HERE/.." && pwd)"
REPO="$(cd "$PERF/.." && pwd)"
SIPD="${SIPD_BIN:-$REPO/target/release/sipd}"
SIPCTL="${SIPCTL_BIN:-$REPO/target/release/sipctl}"
MODE="${1:-}"; shift || true
RATE=10000; CALLS=200000; WORKERS=1; CONTACTS=1000000; WRATE=2000
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE="$2"; shift 2 ;;
        --calls) CALLS="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --contacts) CONTACTS="$2"; shift 2 ;;
        --write-rate) WRATE="$2"; shift 2 ;;
        *) echo "cluster-bench.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$MODE" in lag|sync) ;; *) sed -n '2,20p' "$0"; exit 2 ;; esac
if [ ! -x "$SIPD" ] || [ ! -x "$SIPCTL" ]; then
    (cd "$REPO" && cargo build --release -q -p sipmesh-controlplane --bin sipd --bin sipctl)
fi
OUT="$(mktemp -d "${TMPDIR:-/tmp}/sipmesh-cluster.XXXXXX")"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$OUT"/data*
}
trap cleanup EXIT

start_node() { # id ip [join]
    local id=$1 ip=$2; shift 2
    "$SIPD" --node-id "$id" --sip "$ip:5060" --grpc "$ip:50051" --workers "$WORKERS" --no-pin \
        --data-dir "$OUT/data$id" --segment "$OUT/segment$id" "$@" \
        > "$OUT/node$id.out" 2> "$OUT/node$id.err" &
    PIDS+=($!)
    for _ in $(seq 100); do grep -q " listening " "$OUT/node$id.err" 2>/dev/null && return; sleep 0.1; done
    echo "node $id did not start"; cat "$OUT/node$id.err"; exit 1
}
ctl() { local ip=$1; shift; "$SIPCTL" --server "$ip:50051" --json "$@"; }
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
wait_synced() { # ip
    for _ in $(seq 600); do
        s=$(ctl "$1" sync status | jget 'd[0]["state"]')
        [ "$s" = synced ] && return 0
        sleep 0.1
    done
    echo "node at $1 did not sync"; exit 1
}
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
sipp_reg() { # server-ip local-ip port rate calls prefix
    local scen="$OUT/reg-$6.xml"
    sed "s/user\[call_number\]/$6user[call_number]/g" "$PERF/profiles/register.xml" > "$scen"
    local t=$(( $5 / $4 * 2 + 20 ))
    timeout --kill-after=5 $(( t + 20 )) sipp "$1:5060" -sf "$scen" -t u1 -i "$2" -p "$3" \
        -r "$4" -rp 1000 -m "$5" -l $(( $4 * 4 + 1000 )) -timeout "${t}s" -buff_size 4194304 \
        -nostdin -trace_stat -stf "$OUT/sipp-$6.csv" -fd 1 > "$OUT/sipp-$6.out" 2>&1 || true
    awk -F';' 'NR==1 { for (i=1;i<=NF;i++) c[$i]=i } END { print $c["SuccessfulCall(C)"], $c["FailedCall(C)"] }' "$OUT/sipp-$6.csv"
}

echo "machine: $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%d)"
if [ "$MODE" = lag ]; then
    start_node 1 127.0.0.61
    start_node 2 127.0.0.62 --join 127.0.0.61:50051
    wait_synced 127.0.0.61; wait_synced 127.0.0.62
    ctl 127.0.0.62 sync status --reset-lag > /dev/null
    c0=$(cpu_ticks "${PIDS[0]}"); d0=$(cpu_ticks "${PIDS[1]}")
    read -r ok fail < <(sipp_reg 127.0.0.61 127.0.0.63 5070 "$RATE" "$CALLS" lag)
    sleep 0.5
    c1=$(cpu_ticks "${PIDS[0]}"); d1=$(cpu_ticks "${PIDS[1]}")
    ctl 127.0.0.62 sync status > "$OUT/lag.json"
    tck=$(getconf CLK_TCK)
    python3 - "$OUT/lag.json" "$ok" "$fail" "$c0" "$c1" "$tck" "$RATE" "$d0" "$d1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))[0]
ok, fail, c0, c1, tck, rate, d0, d1 = map(int, sys.argv[2:])
cpu = (c1 - c0) / tck
cpu2 = (d1 - d0) / tck
print(f"lag rate={rate}/s ok={ok} fail={fail} samples={d['lag_samples']} "
      f"p50={d['lag_p50_us']/1000:.2f}ms p99={d['lag_p99_us']/1000:.2f}ms max={d['lag_max_us']/1000:.2f}ms "
      f"node1_cpu={cpu:.2f}s ({cpu*1e6/max(ok,1):.1f} us/REGISTER incl. replication) "
      f"node2_cpu={cpu2:.2f}s ({cpu2*1e6/max(d['lag_samples'],1):.1f} us/record applied)")
PY
else
    start_node 1 127.0.0.61
    wait_synced 127.0.0.61
    half=$(( CONTACTS / 2 ))
    t0=$(date +%s.%N)
    sipp_reg 127.0.0.61 127.0.0.63 5070 25000 "$half" a > "$OUT/load-a" &
    la=$!
    sipp_reg 127.0.0.61 127.0.0.63 5074 25000 "$(( CONTACTS - half ))" b > "$OUT/load-b"
    wait "$la"
    t1=$(date +%s.%N)
    echo "loaded node 1: $(cat "$OUT/load-a") + $(cat "$OUT/load-b") (ok fail) in $(python3 -c "print(round($t1-$t0,1))") s; $(ctl 127.0.0.61 sync status | jget 'd[0]["count"]') contacts"
    # Writes keep coming while node 2 syncs.
    wcalls=$(( WRATE * 30 ))
    sipp_reg 127.0.0.61 127.0.0.63 5076 "$WRATE" "$wcalls" w > "$OUT/load-w" &
    lw=$!
    sleep 1
    start_node 2 127.0.0.62 --join 127.0.0.61:50051
    wait_synced 127.0.0.62
    ctl 127.0.0.62 events > "$OUT/events2.json"
    ctl 127.0.0.62 sync status > "$OUT/sync2.json"
    python3 - "$OUT/events2.json" "$OUT/sync2.json" "$WRATE" <<'PY'
import json, sys
ev = json.load(open(sys.argv[1])); st = json.load(open(sys.argv[2]))[0]
start = [e for e in ev if e["kind"] == "sync-started"][-1]["at_ms"]
done = [e for e in ev if e["kind"] == "synced"][-1]
secs = (done["at_ms"] - start) / 1000
n = int(done["reason"].split()[1])
print(f"full sync: {n} records in {secs:.2f} s = {n/secs:,.0f} records/s while node 1 took {sys.argv[3]} REGISTER/s; {done['reason']}")
PY
    wait "$lw"
    sleep 1
    a=$(ctl 127.0.0.61 sync status | jget '(d[0]["count"], d[0]["digest"])')
    b=$(ctl 127.0.0.62 sync status | jget '(d[0]["count"], d[0]["digest"])')
    echo "after writes stopped: node 1 $a, node 2 $b"
    [ "$a" = "$b" ] && echo "digests equal" || echo "DIGESTS DIFFER"
    echo "RSS: node 1 $(awk '/VmRSS/ {print $2}' /proc/${PIDS[0]}/status) KiB, node 2 $(awk '/VmRSS/ {print $2}' /proc/${PIDS[1]}/status) KiB"
fi
echo "artifacts: $OUT"
