#!/usr/bin/env bash
# hooktrail ingest benchmark (issue 3): one command, run from anywhere:
#
#     bench/ingest.sh
#
# Builds hooktrail and bench/bare-hyper in release (CARGO_TARGET_DIR=target-bench),
# installs wrk and webhook from Debian if missing, then for each run starts, one
# at a time on loopback, and drives with the same load
# (`wrk -t2 -c64 -d10s --timeout 10s -s bench/post.lua`, a 610-byte Net-Results
# form-webhook JSON body from bench/payload.json):
#
#   bare            bench/bare-hyper: hyper 1.x answering 200 without storing (the ceiling)
#   hooktrail       hooktrail serve, one source with auth none, no handlers, fresh
#                   SQLite DB on disk, RUST_LOG=warn, stderr to a file
#   hooktrail-info  the same with the default log level (info: one line per event)
#                   to a file
#   webhook         adnanh/webhook (Debian package) with a hook running /bin/true
#   hooktrail-slowsync  (not in the default SERVERS) hooktrail as above with every
#                   fdatasync of the log made SLOW_SYNC_MS slower (test hook
#                   HOOKTRAIL_TEST_SYNC_DELAY_MS): a disk that slow, to show the rate
#                   does not follow the disk's latency
#
# It also measures the fdatasync latency of the disk under BENCH_TMPDIR (4 KiB
# O_DSYNC writes with dd), printed with the machine, so figures compare between machines.
#
# and prints a table of medians over the runs plus the issue's targets. After
# each run it prints the server's CPU per request by thread name (from
# /proc/PID/task/*/schedstat: for hooktrail the tokio workers, the writer, the
# sync loops, the checkpointer), where a change to one of them shows, and each
# thread's time waiting on a run queue per request (the same file's second
# field: time it was ready to run but had no CPU).
# For hooktrail it also checks that every 2xx wrk counted is in the database
# (`hooktrail stats --json` after a clean stop): db >= 2xx, and db - 2xx is at most
# the requests still in flight when wrk stopped (<= connections).
#
# Environment knobs (defaults in brackets):
#   RUNS [3]  DURATION [10s]  CONNECTIONS or CONNS [64]  THREADS [2]
#   SERVERS ["bare hooktrail hooktrail-info webhook"]  SLOW_SYNC_MS [1]
#   BENCH_TMPDIR [/var/tmp]  where the temp DBs live (must be a real disk, not tmpfs)
#   QUIET_MAX_WAIT [120]  seconds to wait before each run for other load to drop
#                         below QUIET_BUSY_PCT [15] % of the machine (0 = don't wait)
#   OTHER_MAX [25]  RETRIES [2]  a measurement during which other processes used
#                   more than OTHER_MAX % of a core is redone up to RETRIES times
#                   (kept aside in results-disturbed.tsv); the 'other%' column
#                   shows what the kept one had
#   KEEP=1    keep the temp directory (DBs, configs, logs)
#   TIMELINE=1  hooktrail runs write the durable-ingest timeline
#               (HOOKTRAIL_TIMELINE, src/store/sqlite_timeline.rs) and the script
#               prints where a request's time went (bench/timeline.py)
#   HOOKTRAIL_BIN=PATH  measure this hooktrail binary instead of building one
#                       (to compare a patched build against the baseline)
# Results: bench/out/<UTC time>/ (results.tsv, summary.txt, wrk outputs, logs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNECTIONS:-${CONNS:-64}}
THREADS=${THREADS:-2}
SERVERS=${SERVERS:-"bare hooktrail hooktrail-info webhook"}
SLOW_SYNC_MS=${SLOW_SYNC_MS:-1}
QUIET_MAX_WAIT=${QUIET_MAX_WAIT:-120}
QUIET_BUSY_PCT=${QUIET_BUSY_PCT:-15}
OTHER_MAX=${OTHER_MAX:-25}
RETRIES=${RETRIES:-2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-bench}"
export BENCH_BODY="$ROOT/bench/payload.json"
HZ=$(getconf CLK_TCK)

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$ROOT/bench/out/$STAMP"
mkdir -p "$OUT"
mkdir -p "${BENCH_TMPDIR:-/var/tmp}"
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/hooktrail-bench.XXXXXX")
PID=""

log() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }

cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
need=()
command -v wrk >/dev/null || need+=(wrk)
case " $SERVERS " in *" webhook "*) command -v webhook >/dev/null || need+=(webhook) ;; esac
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "== installing ${need[*]} from Debian"
    $SUDO apt-get update && $SUDO apt-get install -y "${need[@]}"
fi

echo "== building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
if [ -n "${HOOKTRAIL_BIN:-}" ]; then
    echo "   hooktrail: using HOOKTRAIL_BIN=$HOOKTRAIL_BIN (not built)"
else
    cargo build --release --bin hooktrail
fi
cargo build --release --locked --manifest-path bench/bare-hyper/Cargo.toml
HT="${HOOKTRAIL_BIN:-$CARGO_TARGET_DIR/release/hooktrail}"
BARE="$CARGO_TARGET_DIR/release/bare-hyper"

# ---------------------------------------------------------------- machine
fstype=$(df -PT "$WORK" | awk 'NR==2{print $2}')
if [ "$fstype" = tmpfs ]; then
    echo "error: $WORK is on tmpfs; set BENCH_TMPDIR to a directory on a real disk" >&2
    exit 1
fi
# Mean latency of a 4 KiB write with O_DSYNC (a write plus fdatasync), in ms.
fdatasync_ms() {
    local t0 t1
    t0=$(date +%s%N)
    dd if=/dev/zero of="$WORK/.dsync" bs=4k count=1000 oflag=dsync status=none
    t1=$(date +%s%N)
    rm -f "$WORK/.dsync"
    awk -v ns=$((t1 - t0)) 'BEGIN { printf "%.3f", ns / 1000 / 1e6 }'
}
{
    echo "hooktrail ingest benchmark, $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo "hooktrail: $HT"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (src modified)')"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
    echo "db dir:  $WORK on $(df -P "$WORK" | awk 'NR==2{print $1}') ($fstype, $(findmnt -no OPTIONS -T "$WORK" 2>/dev/null || echo '?'))"
    echo "fdatasync: $(fdatasync_ms) ms per 4 KiB O_DSYNC write in $WORK (dd, 1000 writes)"
    echo "tools:   $(wrk -v 2>&1 | head -1 | cut -c1-40), $(command -v webhook >/dev/null && webhook -version 2>&1 | head -1)"
    echo "load:    wrk -t$THREADS -c$CONNS -d$DURATION --timeout 10s --latency -s bench/post.lua ($(tr -d '\n' < "$BENCH_BODY" | wc -c)-byte JSON body), $RUNS run(s)"
} | tee "$OUT/summary.txt"

# ---------------------------------------------------------------- helpers
# busy, steal and total jiffies of the whole machine
cpu_sample() { awk '/^cpu /{print $2+$3+$4+$7+$8, $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# CPU ticks of a process and its reaped children (webhook's /bin/true)
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12+$13+$14+$15}'; }
# CPU seconds of this shell's reaped children, from bash `times` written to a
# file by the caller (`times` inside $(...) would see the subshell's children)
children_cpu() {
    awk 'NR==2{ s=0; for (i=1;i<=2;i++){ split($i,a,"m"); sub("s","",a[2]); s+=a[1]*60+a[2] } print s }' "$1"
}

# Run time (ns) of each live thread of the server, by thread name: the
# per-thread split of its CPU per request (threads that end meanwhile drop out).
thread_cpu() {
    local t
    for t in /proc/"$PID"/task/*; do
        printf '%s %s\n' "$(tr ' ' _ < "$t/comm" 2>/dev/null)" "$(cut -d' ' -f1,2 "$t/schedstat" 2>/dev/null)"
    done
}

# Waits for the machine to be quiet (other engineers compile here).
wait_quiet() {
    local waited=0 a b busy
    while :; do
        a=$(cpu_sample); sleep 2; b=$(cpu_sample)
        busy=$(echo "$a $b" | awk '{d=$6-$3; printf "%.0f", (d > 0) ? 100 * ($4 - $1) / d : 0 }')
        if [ "$busy" -le "$QUIET_BUSY_PCT" ] || [ "$waited" -ge "$QUIET_MAX_WAIT" ]; then
            QUIET_NOTE="machine ${busy}% busy before the run (waited ${waited}s); $(uptime | sed 's/.*load/load/')"
            return
        fi
        [ "$waited" -eq 0 ] && echo "   machine ${busy}% busy (other work); waiting up to ${QUIET_MAX_WAIT}s for it to drop below ${QUIET_BUSY_PCT}%"
        waited=$((waited + 2))
    done
}

wait_until() { # seconds command...
    local t=$(( $1 * 10 )); shift
    while ! "$@" 2>/dev/null; do
        t=$((t - 1))
        if [ "$t" -le 0 ] || ! kill -0 "$PID" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
}

start_bare() {
    local dir=$1
    "$BARE" 127.0.0.1:0 > "$dir/server.log" 2>&1 &
    PID=$!
    wait_until 10 grep -q '^listening on' "$dir/server.log" || { cat "$dir/server.log"; return 1; }
    URL="http://$(sed -n 's/^listening on //p' "$dir/server.log")/hooks/bench"
}

start_hooktrail() { # dir level [sync delay ms]
    local dir=$1 level=$2 sync_delay=${3:-0}
    cat > "$dir/hooktrail.toml" <<EOF
[server]
listen = "127.0.0.1:0"
ready_file = "$dir/ready.json"

[storage]
backend = "sqlite"
path = "$dir/bench.db"

[admin]
listen = "off"

[sources.bench]
auth = { type = "none" }
EOF
    "$HT" --config "$dir/hooktrail.toml" check-config > "$dir/check-config.txt" 2>&1 || { cat "$dir/check-config.txt"; return 1; }
    if [ "$level" = info ]; then
        env -u RUST_LOG "$HT" --config "$dir/hooktrail.toml" serve 2> "$dir/server.log" &
    else
        HOOKTRAIL_TIMELINE=${TIMELINE:+$dir/timeline.txt} HOOKTRAIL_TEST_SYNC_DELAY_MS=$sync_delay RUST_LOG=$level "$HT" --config "$dir/hooktrail.toml" serve 2> "$dir/server.log" &
    fi
    PID=$!
    wait_until 30 test -s "$dir/ready.json" || { cat "$dir/server.log"; return 1; }
    URL="http://$(sed 's/.*"listen":"\([^"]*\)".*/\1/' "$dir/ready.json")/hooks/bench"
}

start_webhook() {
    local dir=$1 port tries=0
    while :; do
        port=$(( 20000 + RANDOM % 30000 ))
        webhook -hooks "$ROOT/bench/webhook-hooks.json" -ip 127.0.0.1 -port "$port" > "$dir/server.log" 2>&1 &
        PID=$!
        URL="http://127.0.0.1:$port/hooks/bench"
        if wait_until 10 curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' --data-binary @"$BENCH_BODY" "$URL"; then
            return 0
        fi
        kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
        tries=$((tries + 1))
        [ "$tries" -lt 5 ] || { cat "$dir/server.log"; return 1; }
    done
}

stop_server() {
    local t=300
    kill -TERM "$PID" 2>/dev/null || true
    while kill -0 "$PID" 2>/dev/null && [ "$t" -gt 0 ]; do sleep 0.1; t=$((t - 1)); done
    kill -0 "$PID" 2>/dev/null && { echo "warning: server $PID did not stop in 30 s; killing" >&2; kill -KILL "$PID"; }
    wait "$PID" 2>/dev/null && STOP_RC=0 || STOP_RC=$?
    PID=""
}

# results.tsv: one line per (run, server)
printf 'run\tserver\treq_s\tp50_ms\tp99_ms\tp999_ms\tmax_ms\tnon2xx\tsock_err\tok_2xx\tdb_events\trss_mb\tsrv_cpu_pct\twrk_cpu_pct\tother_cpu_pct\tsteal_pct\tlog_lines\n' > "$OUT/results.tsv"

run_one() { # run server attempt
    local run=$1 name=$2 dir="$WORK/$2-$1-$3"
    mkdir -p "$dir"
    case $name in
        bare) start_bare "$dir" ;;
        hooktrail) start_hooktrail "$dir" warn ;;
        hooktrail-info) start_hooktrail "$dir" info ;;
        hooktrail-slowsync) start_hooktrail "$dir" warn "$SLOW_SYNC_MS" ;;
        webhook) start_webhook "$dir" ;;
        *) echo "unknown server $name" >&2; return 1 ;;
    esac
    local c0 c1 s0 s1 w0 w1
    times > "$WORK/.times0"
    thread_cpu > "$WORK/.threads0"
    c0=$(cpu_sample); s0=$(proc_ticks "$PID")
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 10s --latency -s bench/post.lua "$URL" > "$OUT/$name-$run.wrk" 2>&1
    times > "$WORK/.times1"
    c1=$(cpu_sample); s1=$(proc_ticks "$PID")
    thread_cpu > "$WORK/.threads1"
    w0=$(children_cpu "$WORK/.times0"); w1=$(children_cpu "$WORK/.times1")
    local rss db=- log_lines=-
    rss=$(awk '/^VmHWM/{printf "%.1f", $2/1024}' "/proc/$PID/status")
    stop_server
    case $name in
        hooktrail*)
            [ "$STOP_RC" = 0 ] || echo "warning: hooktrail exited $STOP_RC on SIGTERM" >&2
            db=$("$HT" --config "$dir/hooktrail.toml" stats --source bench --json | tr -d ' \n' | sed -n 's/.*"received":\([0-9]*\).*/\1/p')
            db=${db:-0}
            log_lines=$(wc -l < "$dir/server.log")
            cp "$dir/server.log" "$OUT/$name-$run.log" 2>/dev/null || true
            [ "$log_lines" -gt 1000 ] && { head -3 "$dir/server.log" > "$OUT/$name-$run.log"; echo "... ($log_lines lines, $(wc -c < "$dir/server.log") bytes)" >> "$OUT/$name-$run.log"; tail -5 "$dir/server.log" >> "$OUT/$name-$run.log"; }
            ;;
        *) cp "$dir/server.log" "$OUT/$name-$run.log" 2>/dev/null || true ;;
    esac
    local line
    line=$(grep '^BENCH ' "$OUT/$name-$run.wrk") || { cat "$OUT/$name-$run.wrk"; return 1; }
    echo "$line" | awk -v run="$run" -v name="$name" -v c0="$c0" -v c1="$c1" -v s0="$s0" -v s1="$s1" -v w0="$w0" -v w1="$w1" \
        -v hz="$HZ" -v rss="$rss" -v db="$db" -v ll="$log_lines" '
        {
            for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            secs = v["duration_us"] / 1e6
            split(c0, a, " "); split(c1, b, " ")
            wall = (b[3] - a[3]) / hz            # machine-wide CPU seconds elapsed (all CPUs)
            busy = (b[1] - a[1]) / hz
            steal = (b[2] - a[2]) / hz
            srv = (s1 - s0) / hz
            wrkc = w1 - w0
            other = busy - srv - wrkc; if (other < 0) other = 0
            ncpu = wall / secs                   # ~ number of CPUs
            sock = v["connect_err"] + v["read_err"] + v["write_err"] + v["timeouts"]
            printf "%s\t%s\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%d\t%d\t%d\t%s\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%s\n",
                run, name, v["requests"] / secs, v["p50_us"] / 1000, v["p99_us"] / 1000, v["p999_us"] / 1000, v["max_us"] / 1000,
                v["non2xx"], sock, v["requests"] - v["non2xx"], db, rss,
                100 * srv / secs, 100 * wrkc / secs, 100 * other / secs, 100 * steal / secs, ll
        }' >> "$OUT/results.tsv"
    # CPU per request by thread name (the tokio workers, the writer, the sync loops...)
    awk -v n="$(sed -n 's/^BENCH requests=\([0-9]*\).*/\1/p' "$OUT/$name-$run.wrk")" -v name="$name" '
        FNR == NR { a[$1] += $2; qa[$1] += $3; next } { b[$1] += $2; qb[$1] += $3 }
        END { if (n > 0) {
            printf "   %-15s CPU per request by thread (µs):", name; for (k in b) if ((b[k] - a[k]) / 1000 / n >= 0.01) printf " %s %.2f", k, (b[k] - a[k]) / 1000 / n; printf "\n"
            printf "   %-15s run-queue wait per request by thread (µs):", name; for (k in b) if ((b[k] - a[k]) / 1000 / n >= 0.01) printf " %s %.2f", k, (qb[k] - qa[k]) / 1000 / n; printf "\n" } }' \
        "$WORK/.threads0" "$WORK/.threads1" > "$OUT/$name-$run.threads"
    tail -1 "$OUT/results.tsv" | awk -F'\t' '{printf "   %-15s %8s req/s  p50 %6s ms  p99 %7s ms  non-2xx %s  sock-err %s  2xx %s  db %s  RSS %s MB  cpu: server %s%% wrk %s%% other %s%% steal %s%%\n", $2, $3, $4, $5, $8, $9, $10, $11, $12, $13, $14, $15, $16}' | tee -a "$OUT/summary.txt"
    cat "$OUT/$name-$run.threads" | tee -a "$OUT/summary.txt"
    if [ -n "${TIMELINE:-}" ] && [ -s "$dir/timeline.txt" ]; then
        python3 "$ROOT/bench/timeline.py" "$dir/timeline.txt" > "$OUT/$name-$run.timeline" 2>&1 || true
        sed 's/^/   /' "$OUT/$name-$run.timeline" | tee -a "$OUT/summary.txt"
    fi
    sleep 2
}

# ---------------------------------------------------------------- runs
for run in $(seq 1 "$RUNS"); do
    QUIET_NOTE=""
    [ "$QUIET_MAX_WAIT" -gt 0 ] && wait_quiet || QUIET_NOTE="$(uptime | sed 's/.*load/load/')"
    log "-- run $run/$RUNS: $QUIET_NOTE"
    for s in $SERVERS; do
        attempt=1
        while :; do
            run_one "$run" "$s" "$attempt"
            other=$(tail -1 "$OUT/results.tsv" | cut -f15)
            [ "$other" -gt "$OTHER_MAX" ] && [ "$attempt" -le "$RETRIES" ] || break
            # Disturbed by other work on the machine: keep the row aside, redo.
            tail -1 "$OUT/results.tsv" >> "$OUT/results-disturbed.tsv"
            sed -i '$d' "$OUT/results.tsv"
            log "   (other processes used ${other}% of a core during that run, above OTHER_MAX=${OTHER_MAX}%: redoing it)"
            attempt=$((attempt + 1))
            [ "$QUIET_MAX_WAIT" -gt 0 ] && wait_quiet
        done
    done
done

# ---------------------------------------------------------------- summary
log ""
log "medians over $RUNS run(s) (cpu columns: % of one core; 'other' = processes other than wrk and the server)"
awk -F'\t' -v servers="$SERVERS" '
    function median(key,   n, i, j, t, arr) {
        n = split(vals[key], arr, " ")
        for (i = 2; i <= n; i++) { t = arr[i] + 0; for (j = i - 1; j >= 1 && arr[j] + 0 > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
        if (n == 0) return "-"
        return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
    }
    NR == 1 { for (i = 1; i <= NF; i++) col[i] = $i; next }
    { for (i = 3; i <= NF; i++) if ($i != "-") vals[$2 SUBSEP col[i]] = vals[$2 SUBSEP col[i]] " " $i }
    END {
        printf "%-15s %9s %8s %8s %8s %9s %9s %8s %10s %10s %7s %7s\n", "server", "req/s", "p50 ms", "p99 ms", "non-2xx", "2xx", "db", "RSS MB", "cpu srv%", "cpu wrk%", "other%", "steal%"
        ns = split(servers, s, " ")
        for (k = 1; k <= ns; k++) {
            n = s[k]
            printf "%-15s %9.0f %8.2f %8.2f %8s %9s %9s %8s %10s %10s %7s %7s\n", n, median(n SUBSEP "req_s"), median(n SUBSEP "p50_ms"), median(n SUBSEP "p99_ms"),
                median(n SUBSEP "non2xx"), median(n SUBSEP "ok_2xx"), median(n SUBSEP "db_events"), median(n SUBSEP "rss_mb"),
                median(n SUBSEP "srv_cpu_pct"), median(n SUBSEP "wrk_cpu_pct"), median(n SUBSEP "other_cpu_pct"), median(n SUBSEP "steal_pct")
            rps[n] = median(n SUBSEP "req_s"); p99[n] = median(n SUBSEP "p99_ms"); rss[n] = median(n SUBSEP "rss_mb")
        }
        print ""
        for (k = 1; k <= ns; k++) {
            h = s[k]; if (h !~ /^hooktrail/) continue
            printf "%s: ", h
            if ("bare" in rps) printf "%.2f x bare-hyper (target >= 0.50: %s)  ", rps[h] / rps["bare"], (rps[h] >= 0.5 * rps["bare"]) ? "MET" : "MISSED"
            if ("webhook" in rps) printf "%.1f x webhook (target >= 5: %s)  ", rps[h] / rps["webhook"], (rps[h] >= 5 * rps["webhook"]) ? "MET" : "MISSED"
            printf "p99 %.2f ms (target < 20: %s)  RSS %.1f MB (target < 50: %s)\n", p99[h], (p99[h] < 20) ? "MET" : "MISSED", rss[h], (rss[h] < 50) ? "MET" : "MISSED"
        }
    }' "$OUT/results.tsv" | tee -a "$OUT/summary.txt"

# durability cross-check per hooktrail run
awk -F'\t' -v conns="$CONNS" 'NR > 1 && $2 ~ /^hooktrail/ {
    d = $11 - $10
    printf "run %s %-15s 2xx counted by wrk %d, events in db %d (db - 2xx = %d): %s\n", $1, $2, $10, $11, d,
        (d >= 0 && d <= conns) ? "ok" : (d < 0 ? "LOST EVENTS" : "more events than expected")
}' "$OUT/results.tsv" | tee -a "$OUT/summary.txt"
log ""
log "results: $OUT"
