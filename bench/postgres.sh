#!/usr/bin/env bash
# hooktrail on PostgreSQL (issue 14): one command, run from anywhere:
#
#     bench/postgres.sh
#
# Builds hooktrail and bench/bare-hyper in release (CARGO_TARGET_DIR=target-bench),
# starts a throw-away PostgreSQL cluster (.ci/postgres.sh, fsync and
# synchronous_commit on) on this machine, so the database competes with
# hooktrail and the load generator for the same CPUs, and measures in one run:
#
#   ingest     durable events/s and p99 at CONNECTIONS [64] connections
#              (wrk -t2 --latency -s bench/post.lua, the 610-byte body of
#              bench/ingest.sh), `serve --role ingest`, no handlers: on
#              SQLite and on PostgreSQL, one after the other;
#   forward    HTTP-forward deliveries/s with two `--role process` nodes:
#              EVENTS [50000] events stored first (ingest node), then both
#              process nodes start and the time until every delivery
#              succeeded (a bare-hyper sink answering 200) is taken;
#   dispatch   receive-to-dispatch p50/p90 when idle: SAMPLES [50] events,
#              one every 100 ms, to an ingest node, run by a separate
#              process node (LISTEN/NOTIFY); each event's first attempt's
#              started_at minus its received_at;
#   rescue     a process node is killed (kill -9) while an attempt runs; the
#              time until the other node starts the delivery again, against
#              the lease (LEASE [5s]) + 5 s.
#
# Knobs: DURATION [10s] CONNECTIONS [64] EVENTS [50000] SAMPLES [50] LEASE [5s]
#        PG_PORT [55442] BENCH_TMPDIR [/var/tmp] KEEP=1 (keep the temp dir)
#        HOOKTRAIL_BIN=PATH (measure this binary instead of building one)
#        PHASES ["ingest forward dispatch rescue"] (the phases to run, e.g. PHASES=forward)
#        PG_STATS=1 (pg_stat_statements over the forward phase, to pg-statements.txt;
#                    plans of statements over 5 ms, auto_explain, to pg-server.log)
# Results: bench/out/pg-<UTC time>/summary.txt (and logs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-10s}
CONNS=${CONNECTIONS:-64}
EVENTS=${EVENTS:-50000}
SAMPLES=${SAMPLES:-50}
LEASE=${LEASE:-5s}
PG_PORT=${PG_PORT:-55442}
PHASES=" ${PHASES:-ingest forward dispatch rescue} "
phase() { [[ "$PHASES" == *" $1 "* ]]; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-bench}"
export BENCH_BODY="$ROOT/bench/payload.json"
OUT="$ROOT/bench/out/pg-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT" "${BENCH_TMPDIR:-/var/tmp}"
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/hooktrail-pgbench.XXXXXX")
chmod 755 "$WORK"
PIDS=()

log() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    bash "$ROOT/.ci/postgres.sh" stop "$WORK/pg" >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v wrk >/dev/null || { apt-get update && apt-get install -y wrk; }
if [ -z "${HOOKTRAIL_BIN:-}" ]; then cargo build --release --bin hooktrail; fi
cargo build --release --locked --manifest-path bench/bare-hyper/Cargo.toml
HT="${HOOKTRAIL_BIN:-$CARGO_TARGET_DIR/release/hooktrail}"
BARE="$CARGO_TARGET_DIR/release/bare-hyper"

SERVER=$(bash .ci/postgres.sh start "$WORK/pg" "$PG_PORT")
if [ "${PG_STATS:-0}" = 1 ]; then
    # pg_stat_statements for the forward phase: loaded at server start; and
    # auto_explain logs the plan of any statement slower than 5 ms (copied
    # to pg-server.log).
    "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/psql" -q "$SERVER/postgres?sslmode=disable" \
        -c "LOAD 'auto_explain'" -c "ALTER SYSTEM SET shared_preload_libraries = pg_stat_statements, auto_explain" \
        -c "ALTER SYSTEM SET auto_explain.log_min_duration = '5ms'"
    bash .ci/postgres.sh halt "$WORK/pg" && bash .ci/postgres.sh resume "$WORK/pg" "$PG_PORT"
fi
PSQL=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/psql
export HOOKTRAIL_DATABASE_URL
newdb() { # name -> sets HOOKTRAIL_DATABASE_URL to a fresh database
    "$PSQL" -q "$SERVER/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" 2>/dev/null
    HOOKTRAIL_DATABASE_URL="$SERVER/$1?sslmode=disable"
}
log "hooktrail on PostgreSQL, $(date -u +'%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
log "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')); PostgreSQL $("$PSQL" --version | awk '{print $3}') on the same CPUs; load $(cut -d' ' -f1-3 /proc/loadavg) at start"
log "hooktrail: $HT"

# config NAME BACKEND EXTRA -> $WORK/NAME/hooktrail.toml
config() {
    local dir="$WORK/$1"
    mkdir -p "$dir"
    local storage="path = \"$dir/db.sqlite\""
    [ "$2" = postgres ] && storage=$'backend = "postgres"\nurl_env = "HOOKTRAIL_DATABASE_URL"'
    cat >"$dir/hooktrail.toml" <<EOF
[server]
listen = "127.0.0.1:0"
ready_file = "$dir/ready.json"
max_backlog = 10000000
[storage]
$storage
[admin]
listen = "127.0.0.1:0"
[processor]
poll_interval = "1s"
lease = "$LEASE"
max_concurrency = 64
[sources.bench]
auth = { type = "none" }
$3
EOF
    echo "$dir/hooktrail.toml"
}
# start CONFIG ROLE LOGNAME -> pid in $STARTED; waits for the ready file
start() {
    local dir; dir=$(dirname "$1")
    rm -f "$dir/ready.json"
    RUST_LOG=warn "$HT" --config "$1" serve --role "$2" 2>>"$OUT/$3.log" &
    STARTED=$!
    PIDS+=("$STARTED")
    for _ in $(seq 1 600); do [ -s "$dir/ready.json" ] && return 0; sleep 0.1; done
    echo "hooktrail ($2) did not start; see $OUT/$3.log" >&2
    exit 1
}
# Stops every hooktrail node started so far (the sink stays).
stop_nodes() {
    for p in "${PIDS[@]}"; do [ "$p" = "${SINK:-}" ] || kill -9 "$p" 2>/dev/null || true; done
}
# CPU seconds (user + system) a process used, with its reaped children
# (the postmaster reaps every backend, so its figure covers closed ones).
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15 + $16 + $17) / t }' "/proc/$1/stat"; }
# PostgreSQL's CPU seconds: the postmaster, its live children (backends,
# WAL writer, checkpointer, autovacuum) and the ones it reaped.
pg_cpu() {
    python3 - "$(head -1 "$WORK/pg/data/postmaster.pid")" "$(getconf CLK_TCK)" <<'EOF'
import os, sys
pm, tick = sys.argv[1], int(sys.argv[2])
total = 0
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, NotADirectoryError):
        continue
    if pid == pm or fields[1] == pm:  # fields[1]: the parent's pid
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
print(f"{total / tick:.2f}")
EOF
}
listen_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$(dirname "$1")/ready.json" "$2"; }

# ---------------------------------------------------------------- ingest
phase ingest && for backend in sqlite postgres; do
    [ "$backend" = postgres ] && newdb bench_ingest
    cfg=$(config "ingest-$backend" "$backend" "")
    start "$cfg" ingest "ingest-$backend"
    pid=$STARTED
    url="http://$(listen_of "$cfg" listen)/hooks/bench"
    wrk -t2 -c"$CONNS" -d"$DURATION" --timeout 10s --latency -s bench/post.lua "$url" >"$OUT/wrk-$backend.txt"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    stored=$("$HT" --config "$cfg" stats --json | python3 -c 'import json,sys; print(sum(r["received"] for r in json.load(sys.stdin) if r["handler"] is None))')
    python3 - "$OUT/wrk-$backend.txt" "$backend" "$DURATION" "$stored" <<'EOF' | tee -a "$OUT/summary.txt"
import re, sys
text = open(sys.argv[1]).read()
m = dict(kv.split("=") for kv in re.search(r"BENCH (.*)", text).group(1).split())
secs = int(m["duration_us"]) / 1e6
ok = int(m["requests"]) - int(m["non2xx"])
print(f"ingest {sys.argv[2]:8} {ok / secs:9.0f} events/s  p50 {int(m['p50_us'])/1000:6.1f} ms  p99 {int(m['p99_us'])/1000:6.1f} ms  "
      f"non-2xx {m['non2xx']}  stored {sys.argv[4]} (>= {ok} acknowledged)")
EOF
done

# ---------------------------------------------------------------- forward
if phase forward; then
"$BARE" 127.0.0.1:0 >"$WORK/sink.addr" 2>"$OUT/sink.log" &
SINK=$!
PIDS+=("$SINK")
for _ in $(seq 1 100); do [ -s "$WORK/sink.addr" ] && break; sleep 0.1; done
sink=$(grep -oE '127\.0\.0\.1:[0-9]+' "$WORK/sink.addr" | head -1)
newdb bench_forward
fwd=$'[handlers.fwd]\ntype = "http"\nurl = "http://'"$sink"$'/sink"\nconcurrency = 64\n[[routes]]\nsource = "bench"\nhandler = "fwd"'
cfg=$(config forward postgres "$fwd")
start "$cfg" ingest forward-ingest
ing=$STARTED
url="http://$(listen_of "$cfg" listen)/hooks/bench"
# Store EVENTS first (each of wrk's two threads stops sending after half as
# many answers; a few more are in flight when they stop). wrk itself runs to
# its -d, so it is stopped once EVENTS are stored.
BENCH_STOP_AFTER=$(( EVENTS / 2 )) wrk -t2 -c"$CONNS" -d"$(( EVENTS / 1000 + 10 ))s" --timeout 10s -s bench/post.lua "$url" >"$OUT/wrk-forward-load.txt" &
loader=$!
while kill -0 "$loader" 2>/dev/null; do
    n=$("$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT count(*) FROM events")
    if [ "$n" -ge "$EVENTS" ]; then kill -INT "$loader" 2>/dev/null || true; break; fi
    sleep 0.2
done
wait "$loader" 2>/dev/null || true
kill -TERM "$ing"; wait "$ing" 2>/dev/null || true
queued=$("$HT" --config "$cfg" stats --json | python3 -c 'import json,sys; print(sum(r["pending"] for r in json.load(sys.stdin) if r["handler"] == "fwd"))')
xacts() { "$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"; }
if [ "${PG_STATS:-0}" = 1 ]; then
    "$PSQL" -qtA "$HOOKTRAIL_DATABASE_URL" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" -c "SELECT pg_stat_statements_reset()" >/dev/null
fi
x0=$(xacts)
pg0=$(pg_cpu)
t0=$(date +%s.%N)
start "$cfg" process forward-process-1
p1=$STARTED
start "$cfg" process forward-process-2
p2=$STARTED
# Gives up (and says why) if the nodes stop making progress for 60 s.
last=-1; since=$(date +%s)
while :; do
    left=$("$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT count(*) FROM deliveries WHERE status IN ('pending','retrying','running')")
    [ "$left" = 0 ] && break
    if [ "$left" != "$last" ]; then last=$left; since=$(date +%s); fi
    if [ $(( $(date +%s) - since )) -ge 60 ]; then
        echo "forward: $left deliveries left and no progress for 60 s; see $OUT/forward-process-*.log" | tee -a "$OUT/summary.txt" >&2
        exit 1
    fi
    sleep 0.2
done
t1=$(date +%s.%N)
ht_cpu=$(echo "$(cpu_of "$p1") + $(cpu_of "$p2")" | bc)
pg1=$(pg_cpu)
x1=$(xacts)
ok=$("$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
python3 -c "import sys; q,ok,a,b=map(float,sys.argv[1:5]); print(f'forward  2 process nodes: {ok/(b-a):9.0f} deliveries/s ({int(ok)} of {int(q)} queued succeeded in {b-a:.1f} s)')" \
    "$queued" "$ok" "$t0" "$t1" | tee -a "$OUT/summary.txt"
python3 -c "import sys; ok,h,p0,p1=map(float,sys.argv[1:5]); print(f'         CPU per delivery: hooktrail {h/ok*1e6:5.0f} us, PostgreSQL {(p1-p0)/ok*1e6:5.0f} us (both process nodes; every backend)')" \
    "$ok" "$ht_cpu" "$pg0" "$pg1" | tee -a "$OUT/summary.txt"
python3 -c "import sys; ok,a,b=map(float,sys.argv[1:4]); print(f'         transactions: {(b-a)/ok:.2f} per delivery')" "$ok" "$x0" "$x1" | tee -a "$OUT/summary.txt"
if [ "${PG_STATS:-0}" = 1 ]; then
    "$PSQL" "$HOOKTRAIL_DATABASE_URL" -c "SELECT calls, round(total_exec_time) AS ms, round((total_exec_time / $ok * 1000)::numeric, 1) AS us_per_delivery,
        rows, left(regexp_replace(query, '\s+', ' ', 'g'), 150) AS query FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT 30" >"$OUT/pg-statements.txt"
    echo "         statements: $OUT/pg-statements.txt"
    cp "$WORK/pg/server.log" "$OUT/pg-server.log" 2>/dev/null || true
fi
stop_nodes
fi

# ---------------------------------------------------------------- dispatch
if phase dispatch; then
newdb bench_dispatch
cfg=$(config dispatch postgres $'[handlers.ok]\ntype = "shell"\ncommand = ["/bin/true"]\n[[routes]]\nsource = "bench"\nhandler = "ok"')
start "$cfg" ingest dispatch-ingest
url="http://$(listen_of "$cfg" listen)/hooks/bench"
start "$cfg" process dispatch-process
sleep 2
for i in $(seq 1 "$SAMPLES"); do
    curl -s -o /dev/null -H 'content-type: application/json' -d "{\"i\":$i}" "$url"
    sleep 0.1
done
sleep 2
"$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT extract(epoch FROM a.started_at - e.received_at) * 1000 FROM attempts a
    JOIN deliveries d ON d.id = a.delivery_id JOIN events e ON e.id = d.event_id WHERE a.number = 1" >"$WORK/dispatch.ms"
python3 - "$WORK/dispatch.ms" <<'EOF' | tee -a "$OUT/summary.txt"
import sys
ms = sorted(float(l) for l in open(sys.argv[1]) if l.strip())
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
print(f"dispatch idle, ingest node -> process node: p50 {q(0.5):6.1f} ms  p90 {q(0.9):6.1f} ms  ({len(ms)} events)")
EOF

stop_nodes
fi

# ---------------------------------------------------------------- rescue
if phase rescue; then
newdb bench_rescue
# The first attempt notes its pid and hangs; the second returns at once.
slow_cmd="[ -e $WORK/rescued ] || { echo \$\$ > $WORK/rescued; exec sleep 600; }"
slow=$(printf '[handlers.slow]\ntype = "shell"\ncommand = ["/bin/sh", "-c", "%s"]\ntimeout = "15m"\n[[routes]]\nsource = "bench"\nhandler = "slow"' "$slow_cmd")
cfg=$(config rescue postgres "$slow")
start "$cfg" ingest rescue-ingest
url="http://$(listen_of "$cfg" listen)/hooks/bench"
start "$cfg" process rescue-a
victim=$STARTED
curl -s -o /dev/null -H 'content-type: application/json' -d '{"rescue":1}' "$url"
for _ in $(seq 1 300); do [ -s "$WORK/rescued" ] && break; sleep 0.1; done
sleep 1 # the attempt's begun mark is committed lazily
start "$cfg" process rescue-b
killed=$(date +%s.%N)
kill -9 "$victim"
for _ in $(seq 1 600); do
    n=$("$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT count(*) FROM attempts WHERE number = 2")
    [ "$n" = 1 ] && break
    sleep 0.1
done
rescued=$("$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "SELECT extract(epoch FROM started_at) FROM attempts WHERE number = 2")
python3 -c "import sys; k,r=map(float,sys.argv[1:3]); print(f'rescue after kill -9: {r-k:5.1f} s (lease {sys.argv[3]}; target: lease + 5 s)')" \
    "$killed" "${rescued:-0}" "$LEASE" | tee -a "$OUT/summary.txt"
kill -9 "$(cat "$WORK/rescued")" 2>/dev/null || true # the orphaned first attempt
stop_nodes
fi

log "targets: ingest >= 15000 events/s with p99 < 50 ms; >= 8000 deliveries/s; idle dispatch p50 < 10 ms; rescue within lease + 5 s"
log "results in $OUT"
