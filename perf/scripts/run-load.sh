#!/usr/bin/env bash
# One bounded SIPp load run against sipd (or the sip-echo ceiling) on loopback.
#
#   perf/scripts/run-load.sh --mode register|options [--server sipd|echo]
#       [--backend auto|io_uring|epoll] [--workers N] [--pin|--no-pin]
#       [--rate R] [--calls M] [--timeout S] [--sipp N] [--out DIR] [--tag TEXT]
#       [--store none|async|sync]
#
# --store: sipd's restart persistence: none (in memory only, --no-store), async (the
# default) or sync durability, in a fresh data directory of the run (removed after).
# Starts the server on 127.0.0.51:5060, runs N SIPp instances (127.0.0.52, local ports
# 5070, 5072, ...; the total rate R and call count M are split evenly between them), waits
# for them, stops the server (by its PID only) and prints ONE tab-separated result line
# (also appended to $OUT/results.tsv). Artifacts of the run are kept in $OUT/runs/<id>/.
#
# Measured:
#   ok/fail/retrans   SIPp SuccessfulCall(C) / FailedCall(C) / Retransmissions(C), summed
#   rate              sum of the instances' cumulative CallRate(C) (calls/s, incl. ramp/tail)
#   rate_p50          sum of the instances' median 1-s CallRate(P) (sustained calls/s)
#   srv_cpu_s         server utime+stime from /proc/PID/stat, after minus before the SIPp run
#   srv_us_req        srv_cpu_s / successful calls, in microseconds
#   sipp_cpu_pct      SIPp user+sys / SIPp wall time (100 = one core busy), max over instances
#   machine_busy_s    server + SIPp + other (CPU seconds during the SIPp run)
#   other_cpu_s       CPU of all other processes during the run (/proc/*/stat deltas; a
#                     lower bound: processes that start and exit inside the run are missed)
#                     = outside load, e.g. other engineers' builds
#   rss_kib           server VmRSS before -> after (KiB)
#   worker_split      CPU seconds per server thread (shows how SO_REUSEPORT spread the flows)
#   udp_*buf_err      system-wide /proc/net/snmp Udp RcvbufErrors/SndbufErrors during the run
#   srv_sock_drops    sum of the server sockets' drop counters (ss -m "d"), at the end
#   sipp_side_drops_est  udp_rcvbuf_err - srv_sock_drops: replies dropped at SIPp's socket
#
# Safety: loopback only (127.0.0.5x), every run bounded by -m and -timeout, plus an
# outer `timeout` on each SIPp process; only processes started here are signalled.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PERF="$(cd "$HERE/.." && pwd)"

MODE=options
SERVER=sipd
BACKEND=auto
WORKERS=2
PIN=0
RATE=10000
CALLS=""
TIMEOUT=""
NSIPP=1
OUT="${TMPDIR:-/tmp}/sipmesh-perf"
TAG=""
STORE=async
REPO="$(cd "$PERF/.." && pwd)"
SIPD_BIN="${SIPD_BIN:-$REPO/target/release/sipd}"
ECHO_BIN="${ECHO_BIN:-$PERF/echo/target/release/sip-echo}"
SRV_IP=127.0.0.51
SRV_PORT=5060
CLI_IP=127.0.0.52

while [ $# -gt 0 ]; do
    case "$1" in
        --mode) MODE="$2"; shift 2 ;;
        --server) SERVER="$2"; shift 2 ;;
        --backend) BACKEND="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --pin) PIN=1; shift ;;
        --no-pin) PIN=0; shift ;;
        --rate) RATE="$2"; shift 2 ;;
        --calls) CALLS="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --sipp) NSIPP="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --store) STORE="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "run-load.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

case "$MODE" in register|options) ;; *) echo "--mode register|options" >&2; exit 2 ;; esac
# Build what is measured (release) unless a binary was named.
if [ "$SERVER" = sipd ] && [ ! -x "$SIPD_BIN" ]; then
    (cd "$REPO" && cargo build --release -q -p sipmesh-controlplane --bin sipd)
fi
if [ "$SERVER" = echo ] && [ ! -x "$ECHO_BIN" ]; then
    (cd "$PERF/echo" && cargo build --release -q)
fi
SCEN="$PERF/profiles/$MODE.xml"
# Default: ~8 s of traffic at the target rate; timeout = twice that + 10 s.
CALLS="${CALLS:-$((RATE * 8))}"
TIMEOUT="${TIMEOUT:-$(( CALLS / RATE * 2 + 10 ))}"
TICK=$(getconf CLK_TCK)

ID="$(date -u +%H%M%S)-$MODE-$SERVER-$BACKEND-$STORE-r$RATE-s$NSIPP-$$"
RUN="$OUT/runs/$ID"
mkdir -p "$RUN"

proc_cpu_ticks() { # utime+stime of a whole process (all threads)
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
udp_errs() { # system-wide UDP RcvbufErrors SndbufErrors (loopback: both directions)
    awk '/^Udp:/ { if (!h) { for (i = 2; i <= NF; i++) c[$i] = i; h = 1 } else print $c["RcvbufErrors"], $c["SndbufErrors"] }' /proc/net/snmp
}
procs_snapshot() { # "pid:starttime ticks" (utime+stime) for every live process
    cat /proc/[0-9]*/stat 2>/dev/null |
        awk '{ pid = $1; sub(/^.*\) /, ""); print pid ":" $20, $12 + $13 }'
}
# NOT /proc/stat: on this Firecracker guest its tick-sampled user/system counters read far
# too low and io_uring waits show up as iowait. Instead: CPU of every process alive at the
# end of the run (new ones in full, old ones as a delta). Processes that started AND ended
# inside the run window are missed, so other_cpu_s is a lower bound.
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
threads_cpu() { # "tid:comm:ticks" per thread
    for t in /proc/"$1"/task/*; do
        awk -v tid="${t##*/}" '{ c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c);
             r = $0; sub(/^.*\) /, "", r); split(r, f, " ");
             gsub(/ /, "_", c); print tid ":" c ":" f[12] + f[13] }' "$t/stat" 2>/dev/null || true
    done
}

# ---- start the server -------------------------------------------------------------------
SRV_PID=""
cleanup() {
    if [ -n "$SRV_PID" ] && kill -0 "$SRV_PID" 2>/dev/null; then
        kill -TERM "$SRV_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SRV_PID" 2>/dev/null && kill -KILL "$SRV_PID" 2>/dev/null || true
    fi
    rm -rf "$RUN/data"
}
trap cleanup EXIT

if [ "$SERVER" = sipd ]; then
    args=(--listen "$SRV_IP:$SRV_PORT" --workers "$WORKERS" --backend "$BACKEND"
          --grpc "$SRV_IP:50051" --segment "$RUN/segment")
    case "$STORE" in
        none) args+=(--no-store) ;;
        async|sync) args+=(--data-dir "$RUN/data" --durability "$STORE") ;;
        *) echo "--store none|async|sync" >&2; exit 2 ;;
    esac
    [ "$PIN" = 1 ] || args+=(--no-pin)
    echo "$SIPD_BIN ${args[*]}" > "$RUN/server.cmd"
    "$SIPD_BIN" "${args[@]}" > "$RUN/server.out" 2> "$RUN/server.err" &
    SRV_PID=$!
else
    eargs=("$SRV_IP:$SRV_PORT" "$WORKERS")
    [ "$PIN" = 1 ] && eargs+=(--pin)
    echo "$ECHO_BIN ${eargs[*]}" > "$RUN/server.cmd"
    "$ECHO_BIN" "${eargs[@]}" > "$RUN/server.out" 2> "$RUN/server.err" &
    SRV_PID=$!
fi
# Wait until it listens on UDP.
for _ in $(seq 50); do
    if ss -Hnul "src $SRV_IP:$SRV_PORT" 2>/dev/null | grep -q .; then break; fi
    sleep 0.1
done
sleep 0.3
kill -0 "$SRV_PID" 2>/dev/null || { echo "server died at start:"; cat "$RUN/server.err"; exit 1; }

# ---- run SIPp ----------------------------------------------------------------------------
srv0=$(proc_cpu_ticks "$SRV_PID")
rss0=$(rss_kib "$SRV_PID")
threads_cpu "$SRV_PID" > "$RUN/threads.before"
procs_snapshot > "$RUN/procs.before"
udp0=$(udp_errs)
t0=$(date +%s.%N)

# Local ports of the SIPp instances. The kernel spreads SO_REUSEPORT traffic by a hash of
# the 4-tuple: on the measured boot 5070 and 5074 landed on different workers of a
# 2-worker server (5072 on the same one as 5070), so with --sipp 2 each worker gets one flow.
# Check worker_split in the result line.
read -r -a PORTS <<< "${SIPP_PORTS:-5070 5074 5072 5076 5078 5080 5082 5084}"
pids=()
for i in $(seq 0 $((NSIPP - 1))); do
    r=$(( RATE / NSIPP )); m=$(( CALLS / NSIPP ))
    port=${PORTS[$i]}
    d="$RUN/sipp$i"; mkdir -p "$d"
    scen="$SCEN"
    if [ "$MODE" = register ] && [ "$i" -gt 0 ]; then
        # Distinct AoRs across instances: instance i registers user<N>i<i>@example.com.
        scen="$d/register.xml"
        sed "s/user\[call_number\]/user[call_number]i$i/g" "$SCEN" > "$scen"
    fi
    cmd=(sipp "$SRV_IP:$SRV_PORT" -sf "$scen" -t u1 -i "$CLI_IP" -p "$port" -cp $((8888 + i))
         -r "$r" -rp 1000 -m "$m" -l $(( r * 4 + 1000 ))
         -timeout "${TIMEOUT}s" -buff_size 4194304 -nostdin
         -trace_stat -stf "$d/stat.csv" -fd 1
         -trace_screen -screen_file "$d/screen.log"
         -trace_err -error_file "$d/errors.log")
    echo "${cmd[*]}" > "$d/cmd"
    ( cd "$d" && /usr/bin/time -o "$d/time" -f "%e %U %S" \
        timeout --kill-after=5 $(( TIMEOUT + 20 )) "${cmd[@]}" > "$d/stdout" 2> "$d/stderr" ) &
    pids+=($!)
done
rcs=()
for p in "${pids[@]}"; do
    if wait "$p"; then rcs+=(0); else rcs+=($?); fi
done

t1=$(date +%s.%N)
procs_snapshot > "$RUN/procs.after"
udp1=$(udp_errs)
# Per-socket drop counters (skmem ...,dN) of the server's and SIPp's sockets.
ss -Huanm "src $SRV_IP:$SRV_PORT" > "$RUN/ss.server" 2>/dev/null || true
srv_drops=$(grep -o ',d[0-9]*)' "$RUN/ss.server" | tr -dc '0-9\n' | awk '{ t += $1 } END { print t + 0 }')
kill -0 "$SRV_PID" 2>/dev/null && alive=1 || alive=0
if [ "$alive" = 1 ]; then
    srv1=$(proc_cpu_ticks "$SRV_PID")
    rss1=$(rss_kib "$SRV_PID")
    threads_cpu "$SRV_PID" > "$RUN/threads.after"
else
    srv1=$srv0; rss1=0; : > "$RUN/threads.after"
fi
cleanup
SRV_PID_DONE=$SRV_PID; SRV_PID=""
wait "$SRV_PID_DONE" 2>/dev/null || true

# ---- collect -----------------------------------------------------------------------------
ok=0; fail=0; retr=0; rate=0; created=0; sipp_cpu=0; sipp_pct_max=0; unexp=0; tmo=0
for i in $(seq 0 $((NSIPP - 1))); do
    d="$RUN/sipp$i"
    if [ -s "$d/stat.csv" ]; then
        read -r s f rt cr tc ue to < <(awk -F';' '
            NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
            { last = $0 }
            END { n = split(last, v, ";");
                  print v[col["SuccessfulCall(C)"]], v[col["FailedCall(C)"]],
                        v[col["Retransmissions(C)"]], v[col["CallRate(C)"]],
                        v[col["TotalCallCreated"]], v[col["FailedUnexpectedMessage(C)"]],
                        v[col["FailedMaxUDPRetrans(C)"]] }' "$d/stat.csv")
    else
        s=0; f=0; rt=0; cr=0; tc=0; ue=0; to=0
    fi
    # Sustained rate: median of the 1-s periodic CallRate(P) rows, without the first
    # and last (partial) periods.
    crp=$(awk -F';' 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
                     { r = $col["CallRate(P)"] + 0; if (r > 0) v[n++] = r }
                     END { m = 0; for (i = 1; i < n - 1; i++) w[m++] = v[i];
                           if (m == 0) { print 0; exit }
                           for (i = 1; i < m; i++) { x = w[i]; for (j = i - 1; j >= 0 && w[j] > x; j--) w[j + 1] = w[j]; w[j + 1] = x }
                           w2[0] = 0; for (i = 0; i < m; i++) w2[i + 1] = w[i]; for (i = 1; i <= m; i++) w[i] = w2[i]
                           print (m % 2) ? w[(m + 1) / 2] : (w[m / 2] + w[m / 2 + 1]) / 2 }' \
          "$d/stat.csv" 2>/dev/null || echo 0)
    rate_p50=$(awk -v a="${rate_p50:-0}" -v b="$crp" 'BEGIN { printf "%.0f", a + b }')
    # last line: GNU time prepends "Command exited with non-zero status N" on failure
    read -r wall u sy < <(tail -n 1 "$d/time") || { wall=1; u=0; sy=0; }
    ok=$((ok + s)); fail=$((fail + f)); retr=$((retr + rt)); created=$((created + tc))
    unexp=$((unexp + ue)); tmo=$((tmo + to))
    rate=$(awk -v a="$rate" -v b="$cr" 'BEGIN { printf "%.0f", a + b }')
    sipp_cpu=$(awk -v a="$sipp_cpu" -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f", a + u + s }')
    pct=$(awk -v u="$u" -v s="$sy" -v w="$wall" 'BEGIN { printf "%.0f", (w > 0) ? 100 * (u + s) / w : 0 }')
    [ "$pct" -gt "$sipp_pct_max" ] && sipp_pct_max=$pct
done
incomplete=$(( CALLS - ok - fail ))
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
srv_cpu=$(awk -v a="$srv0" -v b="$srv1" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }')
# Δ CPU of all processes alive at the end (the server included, SIPp already reaped).
live=$(awk -v t="$TICK" 'NR == FNR { b[$1] = $2; next } { d += $2 - ($1 in b ? b[$1] : 0) }
       END { printf "%.2f", d / t }' "$RUN/procs.before" "$RUN/procs.after")
other=$(awk -v l="$live" -v s="$srv_cpu" 'BEGIN { printf "%.2f", l - s }')
busy=$(awk -v l="$live" -v p="$sipp_cpu" 'BEGIN { printf "%.2f", l + p }')
us_req=$(awk -v c="$srv_cpu" -v n="$ok" 'BEGIN { printf "%.2f", (n > 0) ? 1e6 * c / n : 0 }')
split=$(join -t: -j1 <(sort "$RUN/threads.before") <(sort "$RUN/threads.after") 2>/dev/null |
        awk -F: -v t="$TICK" '{ d = ($5 - $3) / t; if (d >= 0.05) printf "%s=%.1f,", $2, d }')
split="${split%,}"
verdict=PASS
[ "$fail" -gt 0 ] && verdict=FAIL
[ "$incomplete" -gt 0 ] && verdict=FAIL
[ "$alive" = 0 ] && verdict=CRASH
read -r rb0 sb0 <<< "$udp0"; read -r rb1 sb1 <<< "$udp1"
udp_rcvbuf_err=$((rb1 - rb0)); udp_sndbuf_err=$((sb1 - sb0))
srv_stop="$(tail -1 "$RUN/server.err" 2>/dev/null | tr '\t' ' ')"

HDR="date_utc\ttag\tmode\tserver\tbackend\tworkers\tpin\tsipp_n\ttarget_rate\tcalls\tverdict\tok\tfail\tincomplete\tunexpected\tmax_retrans_fail\tretrans\trate\trate_p50\twall_s\tsrv_cpu_s\tsrv_us_req\tsipp_cpu_s\tsipp_cpu_pct_max\tmachine_busy_s\tother_cpu_s\trss0_kib\trss1_kib\tworker_split\tudp_rcvbuf_err\tudp_sndbuf_err\tsrv_sock_drops\tsipp_side_drops_est\trun_dir\tserver_last_line"
LINE="$(date -u +%FT%TZ)\t$TAG\t$MODE\t$SERVER\t$BACKEND\t$WORKERS\t$PIN\t$NSIPP\t$RATE\t$CALLS\t$verdict\t$ok\t$fail\t$incomplete\t$unexp\t$tmo\t$retr\t$rate\t$rate_p50\t$wall\t$srv_cpu\t$us_req\t$sipp_cpu\t$sipp_pct_max\t$busy\t$other\t$rss0\t$rss1\t$split\t$udp_rcvbuf_err\t$udp_sndbuf_err\t$srv_drops\t$((udp_rcvbuf_err - srv_drops))\t$RUN\t$srv_stop"
[ -s "$OUT/results.tsv" ] || echo -e "$HDR" > "$OUT/results.tsv"
echo -e "$LINE" >> "$OUT/results.tsv"
echo -e "$LINE"
