#!/usr/bin/env bash
# Side-by-side benchmark runner: sipd, Kamailio and the UDP echo ceiling on loopback, each
# started here with a known configuration, and the highest call rate each sustains with
# no failure, found by stepping and bisecting the generator's rate.
#
#   perf/run.sh PROFILE [--target sipd|kamailio|echo|all] [--gen sipp|sipload]
#       [--max-rate R] [--start-rate R] [--step-seconds S] [--max-steps N] [--hold MS]
#       [--max-retrans-pct P] [--out DIR] [--tag TEXT] [--keep]
#
# PROFILE: options (OPTIONS answered 200 statelessly), register (REGISTER of a distinct
#   user per call, perf/profiles/register.xml), call (call-uac.xml through the proxy to
#   a callee registered as bob playing call-uas.xml; --hold MS between ACK and BYE,
#   default 1000), publish (presence-publish.xml: a PIDF PUBLISH for a distinct user,
#   then its removal) or subscribe (presence-subscribe.xml -s alice: SUBSCRIBE, the
#   NOTIFY answered, the unsubscription, the final NOTIFY answered). One "operation"
#   (calls, ok, fail, rates, srv_us_op) is one call of the profile: options, register:
#   one transaction; call: INVITE, ACK, BYE; publish: 2 transactions (2 PUBLISH);
#   subscribe: 4 transactions (2 SUBSCRIBE, 2 NOTIFY sent by the server).
# --target: sipd (release binary, 2 workers, --no-store, 127.0.0.64:5060; publish and
#   subscribe: presence on, as by default, for every domain (registrar.domains empty),
#   presence.max_watchers raised: every subscribe call watches alice), kamailio
#   (Debian package, installed with apt-get when missing; its own configuration written
#   into the run directory: 4 children, usrloc in memory, tm + rr + registrar + dialog;
#   publish and subscribe: also presence + presence_xml (kamailio-presence-modules),
#   subscriptions and presentities in memory only (subs_db_mode 0, publ_cache 2),
#   force_active 1 (no authorization rules, like sipd), SUBSCRIBE answered 200, NOTIFYs
#   sent by tm; their required db_url is a fresh SQLite file per step with Kamailio's
#   own schema (kamailio-sqlite-modules), untouched per request in these modes;
#   127.0.0.65:5060), echo (perf/echo's sip-echo, 2 threads, 127.0.0.66:5060; the
#   options profile only), or all three in turn.
# --gen: sipload (default; the project's generator, -t 2, callee -t 1) or sipp (SIPp,
#   one instance per side). Generators on 127.0.0.91 (caller, ports 5070..) and
#   127.0.0.92 (callee, port 5090).
# Search: each step restarts the server (fresh state), sends S seconds of traffic
#   (default 6: -m = rate * S, -timeout S + 8 + hold, an outer `timeout` 20 s longer),
#   and passes when every call succeeded (the callee's too), none is left over, the
#   server is alive, the sustained rate reached 95 % of the rate asked and
#   retransmissions stayed under P % of the calls (--max-retrans-pct, default 1: an
#   overloaded UDP server can still end a step with 0 failures because the generator
#   retransmitted for it, with response times of seconds; --max-retrans-pct 100 is the
#   bare 0-failure rule, 0 asks for no retransmission at all). Rates double from
#   --start-rate (per profile default) until a step fails or --max-rate is reached, then
#   bisect between the best pass and the lowest failure until they are within 5 %; at
#   most --max-steps steps (default 9) per target. A step that did not pass while other
#   processes took more than a fifth of a core (other_cpu_s > 0.2 * wall_s: a build
#   sharing the machine) is run once more at the same rate. The result is the highest
#   passing step.
#
# Recorded per step and for the result ($OUT/results.tsv, one tab-separated line each;
# step = "final" for the result), and a markdown table row per target on standard output
# (also in $OUT/summary.md):
#   rate_asked, rate_achieved (median of the 1-s rates of calls started, without the
#   first and the last second), rate_mean (calls / generator wall time, tail included),
#   ok / fail / incomplete / retrans (caller and callee summed), p50_ms / p99_ms
#   (response time of the profile's rtd step: sipload's report, in microseconds, or
#   SIPp's -trace_rtt, in whole milliseconds), srv_cpu_s (utime+stime from /proc/PID/stat
#   of the server and of every process it forked, across the traffic), srv_us_op
#   (srv_cpu_s / successful calls), srv_rss_kib and srv_pss_kib (VmRSS and Pss summed
#   over the server's processes after the traffic: Kamailio's processes share memory, Pss
#   counts shared pages once; srv_pss_before_kib: before it), gen_cpu_s (generators'
#   user+sys), other_cpu_s (CPU of every other process alive at the end of the step: a
#   lower bound, e.g. builds sharing the machine), udp_rcvbuf_err (system-wide),
#   srv_state (calls: sipd's CDR lines, Kamailio's processed dialogs; register on
#   Kamailio: its registered users; publish on Kamailio: PUBLISH requests received;
#   subscribe on Kamailio: NOTIFYs sent). --out default: ${TMPDIR:-/tmp}/sipmesh-run.
#
# Binaries: SIPD_BIN, SIPLOAD_BIN (default: ${CARGO_TARGET_DIR:-target}/release, built
# with cargo when missing) and ECHO_BIN (perf/echo's release build). Kamailio runs
# with -DD (its main process stays this script's child, its PID in the pid file) and is
# stopped by that PID; every process it forked is checked gone. Loopback only; every
# step bounded by -m, -timeout and an outer timeout; only processes started here are
# signalled, by PID. Artifacts of each step are kept in $OUT/runs/<id>/ (server logs,
# generator output; --keep also keeps SIPp's raw rtt files).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PROFILES="$HERE/profiles"

usage() { awk 'NR > 1 && /^set -euo/ { exit } NR > 1' "$0"; }

PROFILE=""
TARGET=sipd
GEN=sipload
MAX_RATE=""
START_RATE=""
STEP_S=6
MAX_STEPS=9
HOLD=1000
OUT="${TMPDIR:-/tmp}/sipmesh-run"
TAG=""
MAX_RETRANS_PCT=1
KEEP=0
WORKERS=2
CHILDREN=4
while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGET="$2"; shift 2 ;;
        --gen) GEN="$2"; shift 2 ;;
        --max-rate) MAX_RATE="$2"; shift 2 ;;
        --start-rate) START_RATE="$2"; shift 2 ;;
        --step-seconds) STEP_S="$2"; shift 2 ;;
        --max-steps) MAX_STEPS="$2"; shift 2 ;;
        --hold) HOLD="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --max-retrans-pct) MAX_RETRANS_PCT="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$PROFILE" ] || { echo "run.sh: one PROFILE only" >&2; exit 2; }
           PROFILE="$1"; shift ;;
    esac
done
case "$PROFILE" in
    options) : "${START_RATE:=20000}"; : "${MAX_RATE:=320000}"; GRAIN=1000 ;;
    register) : "${START_RATE:=20000}"; : "${MAX_RATE:=320000}"; GRAIN=1000 ;;
    call) : "${START_RATE:=2000}"; : "${MAX_RATE:=32000}"; GRAIN=100 ;;
    publish) : "${START_RATE:=4000}"; : "${MAX_RATE:=64000}"; GRAIN=250 ;;
    subscribe) : "${START_RATE:=2000}"; : "${MAX_RATE:=32000}"; GRAIN=100 ;;
    "") usage; exit 2 ;;
    *) echo "run.sh: PROFILE is options, register, call, publish or subscribe" >&2; exit 2 ;;
esac
PRESENCE=0
case "$PROFILE" in publish|subscribe) PRESENCE=1 ;; esac
case "$TARGET" in
    sipd|kamailio|echo) TARGETS=("$TARGET") ;;
    all) TARGETS=(sipd kamailio echo) ;;
    *) echo "run.sh: --target sipd|kamailio|echo|all" >&2; exit 2 ;;
esac
case "$GEN" in sipp|sipload) ;; *) echo "run.sh: --gen sipp|sipload" >&2; exit 2 ;; esac
for v in "$MAX_RATE" "$START_RATE" "$STEP_S" "$MAX_STEPS" "$HOLD"; do
    case "$v" in ''|*[!0-9]*) echo "run.sh: rates, seconds, steps and hold are integers" >&2; exit 2 ;; esac
done
case "$MAX_RETRANS_PCT" in ''|*[!0-9.]*) echo "run.sh: --max-retrans-pct is a number" >&2; exit 2 ;; esac
[ "$START_RATE" -le "$MAX_RATE" ] || START_RATE=$MAX_RATE
[ "$STEP_S" -ge 3 ] || { echo "run.sh: --step-seconds 3 at least" >&2; exit 2; }

# ---- addresses (loopback only; no other script uses 127.0.0.64-66 or .91/.92) ----------
SIPD_IP=127.0.0.64
KAM_IP=127.0.0.65
ECHO_IP=127.0.0.66
SIP_PORT=5060
GRPC_PORT=50064
UAC_IP=127.0.0.91
UAC_PORT=5070
UAS_IP=127.0.0.92
UAS_PORT=5090

# ---- binaries -------------------------------------------------------------------------
BIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/release"
SIPD_BIN="${SIPD_BIN:-$BIN_DIR/sipd}"
SIPLOAD_BIN="${SIPLOAD_BIN:-$BIN_DIR/sipload}"
ECHO_BIN="${ECHO_BIN:-$HERE/echo/target/release/sip-echo}"
need_targets=" ${TARGETS[*]} "
if [[ "$need_targets" == *" sipd "* ]] && [ ! -x "$SIPD_BIN" ]; then
    (cd "$REPO" && cargo build --release -q -p sipmesh-controlplane --bin sipd)
fi
if [ "$GEN" = sipload ] && [ ! -x "$SIPLOAD_BIN" ]; then
    (cd "$REPO" && cargo build --release -q -p sipload)
fi
if [[ "$need_targets" == *" echo "* ]] && [ "$PROFILE" = options ] && [ ! -x "$ECHO_BIN" ]; then
    (cd "$HERE/echo" && CARGO_TARGET_DIR="$HERE/echo/target" cargo build --release -q)
fi
if [[ "$need_targets" == *" kamailio "* ]]; then
    # The presence profiles also need presence + presence_xml and db_sqlite.
    kam_missing=()
    command -v kamailio > /dev/null || kam_missing+=(kamailio)
    if [ "$PRESENCE" = 1 ]; then
        for p in kamailio-presence-modules kamailio-sqlite-modules; do
            dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || kam_missing+=("$p")
        done
    fi
    if [ "${#kam_missing[@]}" -gt 0 ]; then
        echo "run.sh: installing ${kam_missing[*]} (Debian packages)" >&2
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get install -y -q "${kam_missing[@]}" > /dev/null || {
            $SUDO apt-get update -q > /dev/null && $SUDO apt-get install -y -q "${kam_missing[@]}" > /dev/null; }
    fi
fi
if [ "$GEN" = sipp ] && ! command -v sipp > /dev/null; then
    echo "run.sh: SIPp is missing (Debian package sip-tester)" >&2; exit 1
fi
KAM_MODULES="$(dirname "$(dpkg -L kamailio 2>/dev/null | grep -m1 '/modules/tm\.so$' || echo /usr/lib/x86_64-linux-gnu/kamailio/modules/tm.so)")"

TICK=$(getconf CLK_TCK)
RUN_ID="$(date -u +%Y%m%d-%H%M%S)-$PROFILE-$TARGET-$GEN-$$"
RUN="$OUT/runs/$RUN_ID"
mkdir -p "$RUN"

# ---- measurement helpers --------------------------------------------------------------
tree_pids() { # the process and its descendants (one level is enough: Kamailio forks once)
    local root=$1
    echo "$root"
    awk '{ pid = $1; sub(/^.*\) /, ""); print pid, $2 }' /proc/[0-9]*/stat 2>/dev/null |
        awk -v r="$root" '$2 == r { print $1 }'
}
tree_cpu_ticks() { # utime+stime summed over the given PIDs (all threads of each)
    local t=0 p v
    for p in "$@"; do
        v=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo "$t"
}
tree_mem_kib() { # "rss pss" summed over the given PIDs
    local r=0 s=0 p a b
    for p in "$@"; do
        a=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        b=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        r=$((r + ${a:-0})); s=$((s + ${b:-0}))
    done
    echo "$r $s"
}
procs_snapshot() { # "pid:starttime ticks" for every live process (zombies have ended)
    cat /proc/[0-9]*/stat 2>/dev/null |
        awk '{ pid = $1; sub(/^.*\) /, ""); if ($1 != "Z") print pid ":" $20, $12 + $13 }'
}
udp_rcvbuf_errs() {
    awk '/^Udp:/ { if (!h) { for (i = 2; i <= NF; i++) c[$i] = i; h = 1 } else print $c["RcvbufErrors"] }' /proc/net/snmp
}
wait_udp() { # IP PORT: until something listens there (5 s at most)
    for _ in $(seq 50); do
        ss -Hnul "src $1:$2" 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    return 1
}
median() { sort -g | awk '{ v[n++] = $1 } END { if (!n) { print 0; exit }
    print (n % 2) ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2 }'; }
percentiles() { # p50 p99 of the numbers on standard input (nearest rank)
    sort -g | awk '{ v[n++] = $1 } END { if (!n) { print "0 0"; exit }
        i = int((n - 1) * 0.5 + 0.5); j = int((n - 1) * 0.99 + 0.5); print v[i], v[j] }'
}

# ---- processes started here, stopped by PID on exit --------------------------------------
SRV_PID=""
SRV_KIND=""
SRV_TREE=()   # "pid:starttime" of the server's processes
GEN_PIDS=()
starttime() { awk '{ sub(/^.*\) /, ""); print $20 }' "/proc/$1/stat" 2>/dev/null || true; }
stop_server() {
    [ -n "$SRV_PID" ] || return 0
    if kill -0 "$SRV_PID" 2>/dev/null; then
        kill -TERM "$SRV_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SRV_PID" 2>/dev/null && kill -KILL "$SRV_PID" 2>/dev/null || true
    fi
    wait "$SRV_PID" 2>/dev/null || true
    # Every process of the server (Kamailio's children) must be gone: the same PID with
    # the same start time is still ours.
    local e p st left=""
    for _ in $(seq 50); do
        left=""
        for e in "${SRV_TREE[@]}"; do
            p=${e%%:*}; st=${e#*:}
            [ "$(starttime "$p")" = "$st" ] && left+=" $p"
        done
        [ -z "$left" ] && break
        sleep 0.1
    done
    if [ -n "$left" ]; then
        echo "run.sh: $SRV_KIND processes left after stop:$left; killing them" >&2
        for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
    fi
    SRV_PID=""; SRV_TREE=()
}
stop_generator() { # PID of a time(1) started here: its timeout child leads a process
    # group of its own (timeout and the generator); TERM to that group, then to time(1)
    local p=$1 c
    for c in $(awk '{ pid = $1; sub(/^.*\) /, ""); print pid, $2 }' /proc/[0-9]*/stat 2>/dev/null |
               awk -v r="$p" '$2 == r { print $1 }'); do
        kill -TERM -- "-$c" 2>/dev/null || kill -TERM "$c" 2>/dev/null || true
    done
    kill -TERM "$p" 2>/dev/null || true
}
cleanup() {
    local p
    for p in "${GEN_PIDS[@]}"; do stop_generator "$p"; done
    stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- servers ---------------------------------------------------------------------------
write_kamailio_cfg() { # DIR
    local presence_def=""
    [ "$PRESENCE" = 1 ] && presence_def="#!define WITH_PRESENCE"
    cat > "$1/kamailio.cfg" <<EOF
#!KAMAILIO
# Written by perf/run.sh for one benchmark step: Kamailio as the reference server
# ($CHILDREN UDP children, usrloc in memory, tm + rr + registrar + dialog). OPTIONS to the
# server: a stateless 200. REGISTER: save("location"). Calls: lookup("location"),
# record_route, dlg_manage, t_relay; in-dialog requests: loose_route, t_relay.
# WITH_PRESENCE (publish, subscribe profiles): presence + presence_xml, subscriptions
# and presentities in memory only (subs_db_mode 0, publ_cache 2), force_active (no
# authorization rules); PUBLISH and SUBSCRIBE (also in-dialog): t_newtran,
# handle_publish/handle_subscribe, t_release; NOTIFYs are tm's local requests. The
# modules need a database (SQLite, Kamailio's schema, WAL): opened and checked at start,
# no file access per request in these modes.
$presence_def
debug=-1
log_stderror=yes
fork=yes
children=$CHILDREN
disable_tcp=yes
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=no
listen=udp:$KAM_IP:$SIP_PORT
alias="example.com"
maxbuffer=4194304
mpath="$KAM_MODULES/"

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "dialog.so"
loadmodule "ctl.so"
loadmodule "counters.so"
#!ifdef WITH_PRESENCE
loadmodule "db_sqlite.so"
loadmodule "presence.so"
loadmodule "presence_xml.so"
#!endif

modparam("ctl", "binrpc", "unix:$1/ctl.sock")
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "hash_size", 16)
modparam("registrar", "max_expires", 3600)
modparam("rr", "append_fromtag", 1)
modparam("dialog", "hash_size", 16384)
modparam("dialog", "default_timeout", 3600)
#!ifdef WITH_PRESENCE
modparam("presence", "db_url", "sqlite://$1/presence.sqlite")
modparam("presence", "server_address", "sip:$KAM_IP:$SIP_PORT")
modparam("presence", "subs_db_mode", 0)
modparam("presence", "publ_cache", 2)
modparam("presence", "db_update_period", 100)
modparam("presence", "clean_period", 100)
modparam("presence", "subs_htable_size", 14)
modparam("presence", "pres_htable_size", 14)
modparam("presence", "max_expires", 3600)
modparam("presence", "subs_respond_200", 1)
modparam("presence_xml", "db_url", "sqlite://$1/presence.sqlite")
modparam("presence_xml", "force_active", 1)
#!endif

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (is_method("OPTIONS") && uri == myself && \$rU == \$null) {
        sl_send_reply("200", "OK");
        exit;
    }
    if (has_totag()) {
        if (loose_route()) {
            t_relay();
            exit;
        }
        if (is_method("ACK")) {
            if (t_check_trans()) {
                t_relay();
            }
            exit;
        }
#!ifdef WITH_PRESENCE
        if (is_method("SUBSCRIBE") && uri == myself) {
            route(PRESENCE);
        }
#!endif
        sl_send_reply("404", "Not here");
        exit;
    }
    if (is_method("CANCEL")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    t_check_trans();
#!ifdef WITH_PRESENCE
    if (is_method("PUBLISH|SUBSCRIBE")) {
        route(PRESENCE);
    }
#!endif
    if (is_method("REGISTER")) {
        if (!save("location")) {
            sl_reply_error();
        }
        exit;
    }
    if (is_method("INVITE")) {
        record_route();
        dlg_manage();
    }
    if (!lookup("location")) {
        sl_send_reply("404", "Not Found");
        exit;
    }
    if (!t_relay()) {
        sl_reply_error();
    }
    exit;
}
#!ifdef WITH_PRESENCE

route[PRESENCE] {
    if (!t_newtran()) {
        sl_reply_error();
        exit;
    }
    if (is_method("PUBLISH")) {
        handle_publish();
    } else {
        handle_subscribe();
    }
    t_release();
    exit;
}
#!endif
EOF
}

kamailio_presence_db() { # DIR: a fresh SQLite database with Kamailio's own schema files
    # (version + presence tables: presentity, active_watchers, watchers, xcap, pua), WAL
    local sql
    sql="$(dirname "$(dpkg -L kamailio-sqlite-modules 2>/dev/null | grep -m1 '/presence-create\.sql$' || echo /usr/share/kamailio/db_sqlite/presence-create.sql)")"
    rm -f "$1/presence.sqlite"*
    python3 - "$1/presence.sqlite" "$sql/standard-create.sql" "$sql/presence-create.sql" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA journal_mode=WAL")
for f in sys.argv[2:]:
    with open(f) as s:
        c.executescript(s.read())
c.commit()
c.close()
PY
}

SRV_IP=""
start_server() { # KIND DIR
    local kind=$1 d=$2
    SRV_KIND=$kind
    case "$kind" in
        sipd)
            SRV_IP=$SIPD_IP
            local args=(--listen "$SIPD_IP:$SIP_PORT" --workers "$WORKERS" --no-pin --no-store
                        --grpc "$SIPD_IP:$GRPC_PORT" --segment "$d/segment" --cdr "$d/cdr.jsonl")
            if [ "$PRESENCE" = 1 ]; then
                # Presence is on by default (registrar.domains empty: every domain is
                # served); every subscribe call watches alice: no limit on her watchers.
                printf '[presence]\nenabled = true\nmax_watchers = 10000000\n' > "$d/sipd.toml"
                args+=(--config "$d/sipd.toml")
            fi
            echo "$SIPD_BIN ${args[*]}" > "$d/server.cmd"
            "$SIPD_BIN" "${args[@]}" > "$d/server.out" 2> "$d/server.err" &
            SRV_PID=$!
            ;;
        kamailio)
            SRV_IP=$KAM_IP
            write_kamailio_cfg "$d"
            if [ "$PRESENCE" = 1 ] && ! kamailio_presence_db "$d" 2> "$d/presence-db.err"; then
                echo "run.sh: cannot create the presence database:" >&2
                tail -5 "$d/presence-db.err" >&2
                return 1
            fi
            if ! kamailio -c -f "$d/kamailio.cfg" > "$d/kamailio-check.log" 2>&1; then
                echo "run.sh: kamailio -c rejects the configuration:" >&2
                tail -5 "$d/kamailio-check.log" >&2
                return 1
            fi
            # -DD: the main process stays in the foreground (a child of this script) and
            # forks its UDP children and timers; 4 GiB of shared memory (only the pages
            # touched count) for usrloc, transactions and dialogs at the highest rates.
            local args=(-f "$d/kamailio.cfg" -P "$d/kamailio.pid" -DD -E -m 4096 -M 64 -w "$d")
            echo "kamailio ${args[*]}" > "$d/server.cmd"
            kamailio "${args[@]}" > "$d/server.out" 2> "$d/server.err" &
            SRV_PID=$!
            ;;
        echo)
            SRV_IP=$ECHO_IP
            echo "$ECHO_BIN $ECHO_IP:$SIP_PORT $WORKERS" > "$d/server.cmd"
            "$ECHO_BIN" "$ECHO_IP:$SIP_PORT" "$WORKERS" > "$d/server.out" 2> "$d/server.err" &
            SRV_PID=$!
            ;;
    esac
    if ! wait_udp "$SRV_IP" "$SIP_PORT"; then
        echo "run.sh: $kind does not listen on $SRV_IP:$SIP_PORT:" >&2
        tail -5 "$d/server.err" >&2
        return 1
    fi
    sleep 0.5
    kill -0 "$SRV_PID" 2>/dev/null || { echo "run.sh: $kind died at start" >&2; tail -5 "$d/server.err" >&2; return 1; }
    if [ "$kind" = kamailio ]; then
        # Its children are forked by now (the ctl socket is the last thing it opens).
        for _ in $(seq 50); do [ -S "$d/ctl.sock" ] && break; sleep 0.1; done
        sleep 0.3
        local pf; pf=$(cat "$d/kamailio.pid" 2>/dev/null || true)
        [ "$pf" = "$SRV_PID" ] || echo "run.sh: kamailio pid file says '$pf', started $SRV_PID" >&2
    fi
    local p
    SRV_TREE=()
    for p in $(tree_pids "$SRV_PID"); do SRV_TREE+=("$p:$(starttime "$p")"); done
}

register_bob() { # SERVER_IP CALL_ID: bob's contact is the callee's address and port
    python3 - "$UAS_IP" "$UAS_PORT" "$1" "$SIP_PORT" "$2" <<'PY'
import socket, sys
uas, port, srv, sport, cid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((uas, port)); s.settimeout(5)
m = (f"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {uas}:{port};rport;branch=z9hG4bK{cid}\r\n"
     f"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=r1\r\nTo: <sip:bob@example.com>\r\n"
     f"Call-ID: {cid}\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@{uas}:{port}>\r\nExpires: 3600\r\n"
     f"Content-Length: 0\r\n\r\n")
s.sendto(m.encode(), (srv, sport))
r = s.recv(4096)
if not r.startswith(b"SIP/2.0 200"):
    sys.exit("bob's REGISTER: " + r.split(b"\r\n")[0].decode(errors="replace"))
PY
}

# ---- generators ------------------------------------------------------------------------
# Result of the last step, read by the search.
S_VERDICT=""; S_LINE=""; S_NOISY=0
STEP_NO=0

sipp_stat() { # STAT.CSV -> "ok fail retrans rate_mean created"
    if [ -s "$1" ]; then
        awk -F';' 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next } { l = $0 }
            END { split(l, v, ";"); print v[c["SuccessfulCall(C)"]] + 0, v[c["FailedCall(C)"]] + 0,
                  v[c["Retransmissions(C)"]] + 0, v[c["CallRate(C)"]] + 0, v[c["TotalCallCreated"]] + 0 }' "$1"
    else
        echo "0 0 0 0 0"
    fi
}
sipp_rate_p50() { # STAT.CSV: median 1-s CallRate(P) without the first and last periods
    [ -s "$1" ] || { echo 0; return; }
    awk -F';' 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
               { r = $c["CallRate(P)"] + 0; if (r > 0) v[n++] = r }
               END { for (i = 1; i < n - 1; i++) print v[i] }' "$1" | median
}
sipload_report() { # STDOUT KEY -> value
    awk -v k="$2" 'index($0, k) == 1 { sub(k, ""); gsub(/^ +/, ""); print; exit }' "$1"
}
sipload_rate_p50() { # STDERR M: median of the 1-s increments of "started" while calls
    # were still being started, without the first second
    awk -v m="$2" '/ started / { for (i = 1; i <= NF; i++) if ($i == "started") s = $(i + 1);
                    d = s - p; p = s; n++; if (n > 1 && s < m) print d }' "$1" | median
}

run_step() { # TARGET RATE
    local target=$1 rate=$2
    STEP_NO=$((STEP_NO + 1))
    local d="$RUN/$target-s$STEP_NO-r$rate"
    mkdir -p "$d"
    local m=$((rate * STEP_S))
    local hold_s=0
    [ "$PROFILE" = call ] && hold_s=$(( (HOLD + 999) / 1000 ))
    local tmo=$((STEP_S + 8 + hold_s))
    local outer=$((tmo + 20))
    local limit=$(( rate * (4 + hold_s) + 1000 ))
    S_VERDICT=ERROR; S_LINE=""; S_NOISY=0

    if ! start_server "$target" "$d"; then
        stop_server; return 1
    fi
    local srv_pids=("$SRV_PID")
    local e
    srv_pids=(); for e in "${SRV_TREE[@]}"; do srv_pids+=("${e%%:*}"); done

    local uas_pid=""
    if [ "$PROFILE" = call ]; then
        if ! register_bob "$SRV_IP" "bob-$$-$STEP_NO" 2> "$d/register-bob.err"; then
            echo "run.sh: $(cat "$d/register-bob.err")" >&2
            stop_server; return 1
        fi
        mkdir -p "$d/uas"
        if [ "$GEN" = sipload ]; then
            (cd "$d/uas" && exec /usr/bin/time -o "$d/uas/time" -f "%e %U %S" \
                timeout --kill-after=5 "$outer" "$SIPLOAD_BIN" -sf "$PROFILES/call-uas.xml" \
                -i "$UAS_IP" -p "$UAS_PORT" -t 1 -m "$m" -timeout "$tmo" \
                > "$d/uas/stdout" 2> "$d/uas/stderr") &
        else
            (cd "$d/uas" && exec /usr/bin/time -o "$d/uas/time" -f "%e %U %S" \
                timeout --kill-after=5 "$outer" sipp -sf "$PROFILES/call-uas.xml" \
                -i "$UAS_IP" -p "$UAS_PORT" -m "$m" -l "$limit" -timeout "${tmo}s" \
                -buff_size 4194304 -nostdin -trace_stat -stf "$d/uas/stat.csv" -fd 1 \
                -trace_err -error_file "$d/uas/errors.log" \
                > "$d/uas/stdout" 2> "$d/uas/stderr") &
        fi
        uas_pid=$!
        GEN_PIDS+=("$uas_pid")
        sleep 0.5
    fi

    local cpu0 cpu1 mem0 mem1 udp0 udp1 t0 t1
    mem0=$(tree_mem_kib "${srv_pids[@]}")
    cpu0=$(tree_cpu_ticks "${srv_pids[@]}")
    procs_snapshot > "$d/procs.before"
    udp0=$(udp_rcvbuf_errs)
    t0=$(date +%s.%N)

    local scen="$PROFILES/$PROFILE.xml" cargs=()
    case "$PROFILE" in
        call) scen="$PROFILES/call-uac.xml"; cargs=(-s bob -d "$HOLD") ;;
        publish) scen="$PROFILES/presence-publish.xml" ;;
        subscribe) scen="$PROFILES/presence-subscribe.xml"; cargs=(-s alice) ;;
    esac
    mkdir -p "$d/uac"
    if [ "$GEN" = sipload ]; then
        local cmd=("$SIPLOAD_BIN" "$SRV_IP:$SIP_PORT" -sf "$scen" "${cargs[@]}" -i "$UAC_IP"
                   -p "$UAC_PORT" -t 2 -r "$rate" -m "$m" -l "$limit" -timeout "$tmo")
    else
        local cmd=(sipp "$SRV_IP:$SIP_PORT" -sf "$scen" "${cargs[@]}" -t u1 -i "$UAC_IP"
                   -p "$UAC_PORT" -r "$rate" -rp 1000 -m "$m" -l "$limit" -timeout "${tmo}s"
                   -buff_size 4194304 -nostdin -trace_stat -stf "$d/uac/stat.csv" -fd 1
                   -trace_rtt -rtt_freq 1000 -trace_err -error_file "$d/uac/errors.log")
    fi
    echo "${cmd[*]}" > "$d/uac/cmd"
    # time(1) outermost: it counts the generator's CPU even when the outer timeout ends it.
    (cd "$d/uac" && exec /usr/bin/time -o "$d/uac/time" -f "%e %U %S" \
        timeout --kill-after=5 "$outer" "${cmd[@]}" \
        > "$d/uac/stdout" 2> "$d/uac/stderr") &
    local uac_pid=$!
    GEN_PIDS+=("$uac_pid")
    wait "$uac_pid" || true
    [ -n "$uas_pid" ] && { wait "$uas_pid" || true; }
    GEN_PIDS=()

    t1=$(date +%s.%N)
    procs_snapshot > "$d/procs.after"
    udp1=$(udp_rcvbuf_errs)
    local alive=1
    kill -0 "$SRV_PID" 2>/dev/null || alive=0
    cpu1=$(tree_cpu_ticks "${srv_pids[@]}")
    mem1=$(tree_mem_kib "${srv_pids[@]}")
    local state="-"
    if [ "$alive" = 1 ] && [ "$target" = kamailio ]; then
        kamcmd -s "unix:$d/ctl.sock" stats.get_statistics all > "$d/kamailio.stats" 2>&1 || true
        case "$PROFILE" in
            call) state="dialogs=$(awk '/dialog:processed_dialogs/ { print $3 }' "$d/kamailio.stats")" ;;
            register) state="aors=$(awk '/usrloc:registered_users/ { print $3 }' "$d/kamailio.stats")" ;;
            publish) state="publish=$(awk '/core:rcv_requests_publish/ { print $3 }' "$d/kamailio.stats")" ;;
            subscribe) state="notifies=$(awk '/tmx:UAC_transactions/ { print $3 }' "$d/kamailio.stats")" ;;
        esac
    fi
    if [ "$target" = sipd ] && [ "$PROFILE" = call ]; then
        state="cdrs=$(wc -l < "$d/cdr.jsonl" 2>/dev/null || echo 0)"
    fi
    stop_server
    local srv_err_lines
    srv_err_lines=$(grep -c -i -E "error|critical|out of memory" "$d/server.err" 2>/dev/null || true)

    # ---- collect ----
    local ok=0 fail=0 retr=0 rmean=0 rate50=0 p50=0 p99=0 gcpu=0 uok=0 ufail=0 uretr=0
    if [ "$GEN" = sipload ]; then
        ok=$(sipload_report "$d/uac/stdout" "successful"); ok=${ok:-0}
        fail=$(sipload_report "$d/uac/stdout" "failed"); fail=${fail:-0}
        retr=$(sipload_report "$d/uac/stdout" "retransmissions"); retr=${retr:-0}
        rmean=$(sipload_report "$d/uac/stdout" "rate" | awk '{ print $1 + 0 }')
        read -r p50 p99 < <(sipload_report "$d/uac/stdout" "response time" |
            awk '{ for (i = 1; i < NF; i++) { if ($i == "p50") a = $(i + 1); if ($i == "p99") b = $(i + 1) } print a + 0, b + 0 }')
        rate50=$(sipload_rate_p50 "$d/uac/stderr" "$m")
        if [ -n "$uas_pid" ]; then
            uok=$(sipload_report "$d/uas/stdout" "successful"); uok=${uok:-0}
            ufail=$(sipload_report "$d/uas/stdout" "failed"); ufail=${ufail:-0}
            uretr=$(sipload_report "$d/uas/stdout" "retransmissions"); uretr=${uretr:-0}
        fi
    else
        read -r ok fail retr rmean _ < <(sipp_stat "$d/uac/stat.csv")
        rate50=$(sipp_rate_p50 "$d/uac/stat.csv")
        local rtt
        rtt=$(ls "$d"/uac/*_rtt.csv 2>/dev/null | head -1 || true)
        if [ -n "$rtt" ]; then
            read -r p50 p99 < <(awk -F';' 'NR > 1 && $2 != "" { print $2 }' "$rtt" | percentiles)
            [ "$KEEP" = 1 ] || gzip -q "$rtt"
        fi
        if [ -n "$uas_pid" ]; then
            read -r uok ufail uretr _ _ < <(sipp_stat "$d/uas/stat.csv")
        fi
    fi
    [ "$PROFILE" = call ] || { uok=$ok; }
    local g
    for g in uac uas; do
        [ -s "$d/$g/time" ] || continue
        gcpu=$(tail -n 1 "$d/$g/time" | awk -v a="$gcpu" '{ printf "%.2f", a + $2 + $3 }')
    done
    local incomplete=$((m - ok - fail))
    [ "$incomplete" -lt 0 ] && incomplete=0
    fail=$((fail + ufail)); retr=$((retr + uretr))
    local wall srv_cpu us_op live other rss pss
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    srv_cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }')
    us_op=$(awk -v c="$srv_cpu" -v n="$ok" 'BEGIN { printf "%.1f", (n > 0) ? 1e6 * c / n : 0 }')
    live=$(awk -v t="$TICK" 'NR == FNR { b[$1] = $2; next } { d += $2 - ($1 in b ? b[$1] : 0) }
           END { printf "%.2f", d / t }' "$d/procs.before" "$d/procs.after")
    other=$(awk -v l="$live" -v s="$srv_cpu" 'BEGIN { v = l - s; printf "%.2f", v < 0 ? 0 : v }')
    read -r rss pss <<< "$mem1"
    local pss0; pss0=$(echo "$mem0" | awk '{ print $2 }')
    local verdict=PASS
    if [ "$alive" = 0 ]; then verdict=CRASH
    elif [ "$fail" -gt 0 ] || [ "$ok" -lt "$m" ]; then verdict=FAIL
    elif [ "$PROFILE" = call ] && [ "$uok" -lt "$m" ]; then verdict=FAIL
    elif awk -v r="$retr" -v m="$m" -v p="$MAX_RETRANS_PCT" 'BEGIN { exit !(r > m * p / 100) }'; then
        verdict=RETRANS
    elif awk -v a="$rate50" -v r="$rate" 'BEGIN { exit !(a < 0.95 * r) }'; then verdict=SLOW
    fi
    S_VERDICT=$verdict
    awk -v o="$other" -v w="$wall" 'BEGIN { exit !(o > 0.2 * w) }' && S_NOISY=1
    rate50=$(awk -v v="$rate50" 'BEGIN { printf "%.0f", v }')
    rmean=$(awk -v v="$rmean" 'BEGIN { printf "%.0f", v }')
    local udp_err=$((udp1 - udp0))
    S_LINE="$TAG\t$PROFILE\t$target\t$GEN\t$STEP_NO\t$rate\t$m\t$verdict\t$ok\t$fail\t$incomplete\t$retr\t$rate50\t$rmean\t$p50\t$p99\t$wall\t$srv_cpu\t$us_op\t$rss\t$pss\t$pss0\t${#srv_pids[@]}\t$gcpu\t$other\t$udp_err\t$srv_err_lines\t$state\t$d"
    echo -e "$(date -u +%FT%TZ)\t$S_LINE" >> "$OUT/results.tsv"
    printf '  %-8s step %d  rate %6d: %-7s ok %d fail %d incomplete %d retrans %d  achieved %s/s  p50 %s p99 %s ms  server %s s CPU (%s us/op) PSS %d MiB  gen %s s  other %s s %s\n' \
        "$target" "$STEP_NO" "$rate" "$verdict" "$ok" "$fail" "$incomplete" "$retr" "$rate50" \
        "$p50" "$p99" "$srv_cpu" "$us_op" $((pss / 1024)) "$gcpu" "$other" \
        "$([ "$state" = - ] || echo "$state")"
    return 0
}

HDR="date_utc\ttag\tprofile\ttarget\tgen\tstep\trate_asked\tcalls\tverdict\tok\tfail\tincomplete\tretrans\trate_achieved\trate_mean\tp50_ms\tp99_ms\twall_s\tsrv_cpu_s\tsrv_us_op\tsrv_rss_kib\tsrv_pss_kib\tsrv_pss_before_kib\tsrv_procs\tgen_cpu_s\tother_cpu_s\tudp_rcvbuf_err\tsrv_log_errors\tsrv_state\tstep_dir"
[ -s "$OUT/results.tsv" ] || echo -e "$HDR" > "$OUT/results.tsv"

round_rate() { # to the profile's grain, at least one grain
    awk -v r="$1" -v g="$GRAIN" 'BEGIN { v = int(r / g + 0.5) * g; if (v < g) v = g; print v }'
}

# ---- the search, per target --------------------------------------------------------------
declare -A BEST_RATE BEST_LINE
search() { # TARGET
    local target=$1
    local lo=0 hi=0 rate=$START_RATE n=0 best="" retried=""
    echo "== $PROFILE on $target (generator $GEN, $STEP_S s steps, at most $MAX_STEPS)"
    while [ "$n" -lt "$MAX_STEPS" ]; do
        n=$((n + 1))
        if ! run_step "$target" "$rate"; then
            echo "run.sh: step failed to run on $target; stopping its search" >&2
            break
        fi
        if [ "$S_VERDICT" != PASS ] && [ "$S_NOISY" = 1 ] && [ "$retried" != "$rate" ]; then
            echo "  (other processes were busy during that step: once more at $rate)"
            retried=$rate
            continue
        fi
        if [ "$S_VERDICT" = PASS ]; then
            if [ "$rate" -gt "$lo" ]; then lo=$rate; best=$S_LINE; fi
        else
            if [ "$hi" = 0 ] || [ "$rate" -lt "$hi" ]; then hi=$rate; fi
        fi
        local next
        if [ "$hi" = 0 ]; then
            [ "$rate" -ge "$MAX_RATE" ] && break
            next=$((rate * 2)); [ "$next" -gt "$MAX_RATE" ] && next=$MAX_RATE
        elif [ "$lo" = 0 ]; then
            next=$(round_rate $((hi / 2)))
            [ "$next" -ge "$hi" ] && break
        else
            # Within 5 % (or one grain): done.
            awk -v l="$lo" -v h="$hi" -v g="$GRAIN" 'BEGIN { exit !(h - l <= g || h <= l * 1.05) }' && break
            next=$(round_rate $(((lo + hi) / 2)))
            { [ "$next" -le "$lo" ] || [ "$next" -ge "$hi" ]; } && break
        fi
        rate=$next
    done
    BEST_RATE[$target]=$lo
    if [ -n "$best" ]; then
        BEST_LINE[$target]=$best
        # The result: the highest passing step's figures, step = final.
        echo -e "$(date -u +%FT%TZ)\t$best" | awk -F'\t' -v OFS='\t' '{ $6 = "final"; print }' >> "$OUT/results.tsv"
    else
        BEST_LINE[$target]=""
        echo -e "$(date -u +%FT%TZ)\t$TAG\t$PROFILE\t$target\t$GEN\tfinal\t0\t0\tNONE" >> "$OUT/results.tsv"
    fi
}

T_START=$(date -u +%FT%TZ)
for t in "${TARGETS[@]}"; do
    if [ "$t" = echo ] && [ "$PROFILE" != options ]; then
        echo "== $PROFILE on echo: not applicable (the echo ceiling answers 200 to anything; it only means something for options)"
        continue
    fi
    search "$t"
done

# ---- summary -----------------------------------------------------------------------------
field() { # LINE N (1-based, of S_LINE without the date)
    echo -e "$1" | awk -F'\t' -v n="$2" '{ print $n }'
}
{
    echo
    echo "### perf/run.sh $PROFILE --target $TARGET --gen $GEN ($T_START .. $(date -u +%FT%TZ), $(nproc) cores, $STEP_S s steps; a pass: 0 failures, retransmissions <= $MAX_RETRANS_PCT % of the calls)"
    echo
    echo "| profile | target | max rate at 0 failures (asked / achieved, calls/s) | p50 / p99 ms | server CPU s | server µs/op | RSS / PSS MiB | generator CPU s | retrans | other CPU s |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for t in "${TARGETS[@]}"; do
        [ "$t" = echo ] && [ "$PROFILE" != options ] && continue
        l="${BEST_LINE[$t]:-}"
        if [ -z "$l" ]; then
            echo "| $PROFILE | $t | no passing step | | | | | | | |"
            continue
        fi
        echo "| $PROFILE | $t | $(field "$l" 6) / $(field "$l" 13) | $(field "$l" 15) / $(field "$l" 16) | $(field "$l" 18) | $(field "$l" 19) | $(( $(field "$l" 20) / 1024 )) / $(( $(field "$l" 21) / 1024 )) | $(field "$l" 24) | $(field "$l" 12) | $(field "$l" 25) |"
    done
    if [ "$TARGET" = all ]; then
        s=${BEST_RATE[sipd]:-0}; k=${BEST_RATE[kamailio]:-0}; e=${BEST_RATE[echo]:-0}
        ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
        echo
        echo "| profile | generator | sipd calls/s | Kamailio calls/s | sipd / Kamailio | echo ceiling calls/s | sipd / echo |"
        echo "|---|---|---|---|---|---|---|"
        if [ "$PROFILE" = options ]; then
            echo "| $PROFILE | $GEN | $s | $k | $(ratio "$s" "$k") | $e | $(ratio "$s" "$e") |"
        else
            echo "| $PROFILE | $GEN | $s | $k | $(ratio "$s" "$k") | n/a | n/a |"
        fi
    fi
} | tee -a "$OUT/summary.md"
echo
echo "results: $OUT/results.tsv  steps: $RUN"
