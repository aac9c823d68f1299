#!/usr/bin/env bash
# Presence load: one release sipd (127.0.0.74:5060, 2 workers, no store) and one SIPp
# instance running a presence profile at RATE calls/s for CALLS calls.
#
#   perf/scripts/presence-bench.sh publish|subscribe [--rate R] [--calls N] [--timeout S]
#       [--gen sipp|sipload]
#
# publish:   perf/profiles/presence-publish.xml, a distinct presentity per call: an
#            initial PUBLISH and its removal (2 transactions per call).
# subscribe: perf/profiles/presence-subscribe.xml, every call watching alice: SUBSCRIBE,
#            the NOTIFY, the unsubscription and the final NOTIFY (4 transactions per call).
#
# --gen sipload runs the project's generator (2 threads) instead of one SIPp instance.
# Prints one line: rate asked, successful and failed calls, retransmissions, SIPp's mean
# rate, transactions per second, server CPU per transaction and RSS before/after.
# Loopback only; SIPp bounded by -m and -timeout; only processes started here are
# stopped, by PID.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SIPD_BIN="${SIPD_BIN:-$REPO/target/release/sipd}"
MODE="${1:-}"
shift || true
RATE=1000
CALLS=""
TIMEOUT=""
GEN=sipp
SIPLOAD_BIN="${SIPLOAD_BIN:-$REPO/target/release/sipload}"
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE=$2; shift 2 ;;
        --calls) CALLS=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --gen) GEN=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$MODE" in
    publish) PROFILE=presence-publish.xml; TX=2 ;;
    subscribe) PROFILE=presence-subscribe.xml; TX=4 ;;
    *) echo "usage: presence-bench.sh publish|subscribe [--rate R] [--calls N]" >&2; exit 2 ;;
esac
CALLS="${CALLS:-$((RATE * 10))}"
TIMEOUT="${TIMEOUT:-$(( CALLS / RATE * 2 + 20 ))}"
[ -x "$SIPD_BIN" ] || (cd "$REPO" && cargo build --release -q -p sipmesh-controlplane)
RUN="$(mktemp -d "${TMPDIR:-/tmp}/sipmesh-presence.XXXXXX")"
SRV=127.0.0.74
CLI=127.0.0.75
# Every watcher of the subscribe profile watches alice: no limit on her watchers.
printf '[presence]\nmax_watchers = 10000000\n' > "$RUN/sipd.toml"
"$SIPD_BIN" --config "$RUN/sipd.toml" --listen $SRV:5060 --grpc $SRV:50074 \
    --segment "$RUN/own" --no-store --workers 2 --no-pin > "$RUN/sipd.log" 2>&1 &
SIPD=$!
cleanup() {
    kill "$SIPD" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT
sleep 1
cpu() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SIPD/stat"; }
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$SIPD/status"; }
c0=$(cpu); r0=$(rss)
if [ "$GEN" = sipload ]; then
    [ -x "$SIPLOAD_BIN" ] || (cd "$REPO" && cargo build --release -q -p sipload)
    timeout $((TIMEOUT + 30)) "$SIPLOAD_BIN" $SRV:5060 -sf "$REPO/perf/profiles/$PROFILE" \
        -s alice -i $CLI -p 5076 -t 2 -r "$RATE" -m "$CALLS" -l 200000 -timeout "$TIMEOUT" \
        > "$RUN/sipload.out" 2>&1 || true
    c1=$(cpu); r1=$(rss)
    TCK=$(getconf CLK_TCK)
    python3 - "$RUN/sipload.out" "$c0" "$c1" "$TCK" "$r0" "$r1" "$RATE" "$TX" "$MODE" <<'PY'
import sys
path, c0, c1, tck, r0, r1, rate, tx, mode = sys.argv[1:10]
rep = {}
for l in open(path):
    k, _, v = l.partition("  ")
    rep.setdefault(k.strip(), v.strip())
ok, failed = int(rep.get("successful", 0)), int(rep.get("failed", 0))
retrans = int(rep.get("retransmissions", 0))
cps = float(rep.get("rate", "0").split()[0])
cpu = (float(c1) - float(c0)) / float(tck)
tx = int(tx)
print(f"{mode} gen=sipload rate={rate} ok={ok} failed={failed} retrans={retrans} "
      f"cps={cps:.0f} transactions_per_s={cps * tx:.0f} server_cpu_s={cpu:.2f} "
      f"us_per_transaction={1e6 * cpu / max(ok * tx, 1):.2f} rss_kib={r0}->{r1}")
PY
    exit 0
fi
timeout $((TIMEOUT + 30)) sipp $SRV:5060 -sf "$REPO/perf/profiles/$PROFILE" -s alice \
    -i $CLI -p 5076 -r "$RATE" -m "$CALLS" -l 200000 -timeout "${TIMEOUT}s" \
    -timeout_error -nostdin -buff_size 4194304 -trace_stat -stf "$RUN/stat.csv" \
    > "$RUN/sipp.out" 2>&1 || true
c1=$(cpu); r1=$(rss)
TCK=$(getconf CLK_TCK)
python3 - "$RUN/stat.csv" "$c0" "$c1" "$TCK" "$r0" "$r1" "$RATE" "$TX" "$MODE" <<'PY'
import csv, sys
path, c0, c1, tck, r0, r1, rate, tx, mode = sys.argv[1:10]
rows = list(csv.reader(open(path), delimiter=';'))
h, last = rows[0], rows[-1]
g = lambda k: last[h.index(k)]
ok, failed = int(g("SuccessfulCall(C)")), int(g("FailedCall(C)"))
retrans = int(g("Retransmissions(C)"))
cps = float(g("CallRate(C)"))
cpu = (float(c1) - float(c0)) / float(tck)
tx = int(tx)
print(f"{mode} rate={rate} ok={ok} failed={failed} retrans={retrans} sipp_cps={cps:.0f} "
      f"transactions_per_s={cps * tx:.0f} server_cpu_s={cpu:.2f} "
      f"us_per_transaction={1e6 * cpu / max(ok * tx, 1):.2f} rss_kib={r0}->{r1}")
PY
