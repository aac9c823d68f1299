#!/usr/bin/env bash
# Rate sweep: for each repetition, step the target rate up until the first step that is
# not clean, then move on. Clean = 0 failed calls, all calls completed, retransmissions
# <= 0.1% of calls, sustained (median 1-s) rate >= 95% of target (a step that passes "0 failed" only
# thanks to SIPp retransmitting lost requests is not a sustained rate).
#
#   perf/scripts/sweep.sh --mode options --server sipd --backend io_uring --reps 3 \
#       --rates "40000 60000 80000" [--secs 5] [--sipp 2] [--out DIR] [--tag T] [-- extra run-load args]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FIRST=1; MODE=options; SERVER=sipd; BACKEND=auto; REPS=3; RATES="20000 40000 60000 80000"
SECS=5; NSIPP=2; OUT="${TMPDIR:-/tmp}/sipmesh-perf"; TAG=sweep; EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) MODE="$2"; shift 2 ;;
        --server) SERVER="$2"; shift 2 ;;
        --backend) BACKEND="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --first-rep) FIRST="$2"; shift 2 ;;
        --rates) RATES="$2"; shift 2 ;;
        --secs) SECS="$2"; shift 2 ;;
        --sipp) NSIPP="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "sweep.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
for rep in $(seq "$FIRST" $((FIRST + REPS - 1))); do
    for r in $RATES; do
        line=$("$HERE/run-load.sh" --mode "$MODE" --server "$SERVER" --backend "$BACKEND" \
            --rate "$r" --calls $(( r * SECS )) --sipp "$NSIPP" --out "$OUT" \
            --tag "$TAG-rep$rep" "${EXTRA[@]}")
        echo "$line" | cut -f2-35
        clean=$(echo "$line" | awk -F'\t' '{ print ($11 == "PASS" && $17 <= $10 / 1000 && $19 >= 0.95 * $9) ? 1 : 0 }')
        [ "$clean" = 1 ] || break
    done
done
