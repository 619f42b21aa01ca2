#!/usr/bin/env bash
# hooktrail ordered-processing benchmark (issue 15): one command, run from anywhere:
#
#     bench/ordering.sh                    # SQLite
#     BACKEND=postgres bench/ordering.sh   # PostgreSQL (a throw-away cluster, .ci/postgres.sh)
#
# Builds hooktrail and bench/process (helpers) in release (CARGO_TARGET_DIR=target-bench),
# then, RUNS times, in one run on one database:
#
#   store   `serve --role ingest` on a fresh SQLite DB on disk (or a fresh PostgreSQL
#           database on a cluster started for the run, on the same CPUs); EVENTS (100,000) webhook
#           events posted over 32 keep-alive connections, each with `key_1000` (1,000
#           distinct values) and `key_50` (50), routed to three HTTP forward handlers:
#           `plain` (no ordering), `k1000` (ordering on /key_1000) and `k50` (ordering
#           on /key_50). Each handler has an EVENTS-delivery backlog before it starts.
#           On SQLite the store's search indexer catches up before it stops (with the
#           sqlite3 shell, when installed), so no handler run pays for indexing.
#   then, for each handler in turn, `serve --role process` with only that handler
#           (concurrency HTTP_CONCURRENCY [64]) forwarding to `process-bench target`, a
#           hyper server on loopback answering 200 at once: timed from spawning the
#           daemon until the DB says all EVENTS deliveries of it finished.
#
# Prints deliveries/s of each, and the ordered rates as a share of `plain` measured in
# the same run; also the CPU time per delivery (daemon, user + system), whose ratio
# moves far less than the rates when other work shares the machine. Targets: k1000 >= 70% of plain, k50 >= 30% of plain.
#
# Environment knobs (defaults in brackets):
#   RUNS [1]  EVENTS [100000]  HTTP_CONCURRENCY [64]
#   BACKEND [sqlite] or postgres; with postgres: NODES [1] `--role process` nodes per
#             handler (2: the keys are shared between two nodes), PG_PORT [55452]
#             PG_ANALYZE [1]: ANALYZE the stored backlog before the handlers run (0: leave it
#             to autovacuum, which may or may not run during a handler)
#   BENCH_TMPDIR [/var/tmp]  where the DBs live (a real disk, not tmpfs)
#   KEEP=1    keep the temp directory (DBs, configs, logs)
#   HOOKTRAIL_BIN=PATH  measure this hooktrail binary instead of building one
# Results: bench/out/<UTC time>-ordering/ (results.tsv, summary.txt, logs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-1}
EVENTS=${EVENTS:-100000}
HTTP_CONC=${HTTP_CONCURRENCY:-64}
BACKEND=${BACKEND:-sqlite}
NODES=${NODES:-1}
PG_PORT=${PG_PORT:-55452}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-bench}"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$ROOT/bench/out/$STAMP-ordering"
mkdir -p "$OUT" "${BENCH_TMPDIR:-/var/tmp}"
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/hooktrail-ordering-bench.XXXXXX")
chmod 755 "$WORK"
DPID=""
TPID=""
PG_NODES=()

log() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() {
    if [ -n "$DPID" ]; then stop "$DPID"; fi
    if [ -n "$TPID" ]; then stop "$TPID"; fi
    for p in "${PG_NODES[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [ "$BACKEND" = postgres ]; then bash "$ROOT/.ci/postgres.sh" stop "$WORK/pg" >/dev/null 2>&1 || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
if [ -n "${HOOKTRAIL_BIN:-}" ]; then
    echo "   hooktrail: using HOOKTRAIL_BIN=$HOOKTRAIL_BIN (not built)"
else
    cargo build --release --bin hooktrail
fi
cargo build --release --locked --manifest-path bench/process/Cargo.toml
BIN="${HOOKTRAIL_BIN:-$CARGO_TARGET_DIR/release/hooktrail}"
PB="$CARGO_TARGET_DIR/release/process-bench"

if [ "$BACKEND" = postgres ]; then
    SERVER=$(bash .ci/postgres.sh start "$WORK/pg" "$PG_PORT")
    PSQL=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/psql
    export HOOKTRAIL_DATABASE_URL
fi
# newdb NAME: a fresh PostgreSQL database for one run (HOOKTRAIL_DATABASE_URL).
newdb() {
    "$PSQL" -q "$SERVER/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" \
        -c "ALTER DATABASE $1 SET track_functions = 'pl'" 2>/dev/null
    HOOKTRAIL_DATABASE_URL="$SERVER/$1?sslmode=disable"
}
sql() { "$PSQL" -tA "$HOOKTRAIL_DATABASE_URL" -c "$1"; }
# Calls of the ordered claim's and the finish batch's functions so far (0 0 for a version
# without them), counted with `track_functions` (set on each bench database).
FUNCTION_CALLS="SELECT coalesce(sum(calls) FILTER (WHERE funcname = 'hooktrail_claim_ordered'), 0) || ' ' ||
    coalesce(sum(calls) FILTER (WHERE funcname = 'hooktrail_finish'), 0) FROM pg_stat_user_functions"
# CPU seconds (user + system) a live process used so far.
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
# `PID CPU-seconds` of each live process of the PostgreSQL cluster (the postmaster's children).
pg_cpus() {
    local pm
    pm=$(head -1 "$WORK/pg/data/postmaster.pid" 2>/dev/null) || return 0
    for p in $(pgrep -P "$pm"); do echo "$p $(cpu_of "$p" 2>/dev/null || echo 0)"; done
}
# pg_dispatch HANDLER CONFIG: like `process-bench dispatch` on PostgreSQL: NODES process
# nodes started at once, timed until no delivery of HANDLER is unfinished (polled every
# 50 ms); prints dispatch_rate, cpu_ms_per_delivery (the nodes' CPU, not the server's) and
# commits_per_delivery (the database's committed transactions over the run, pg_stat_database's
# xact_commit, less this script's own polls, per delivery; read-only ones included) and
# wal_syncs_per_delivery (the cluster's WAL flushes to disk, pg_stat_wal's wal_sync: what a
# synchronous commit waits for, whatever it shares it with).
pg_dispatch() {
    local h=$1 config=$2 queued left t0 t1 cpu=0 failed first c0 c1 s0 s1 gap polls=0 pg0 pgcpu f0 f1
    queued=$(sql "SELECT count(*) FROM deliveries WHERE handler = '$h' AND status = 'pending'")
    [ "$queued" = "$EVENTS" ] || { echo "$queued deliveries of $h queued, expected $EVENTS" >&2; return 1; }
    c0=$(sql "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    s0=$(sql "SELECT wal_sync FROM pg_stat_wal")
    f0=$(sql "$FUNCTION_CALLS")
    PG_NODES=()
    pg0=$(pg_cpus)
    t0=$(date +%s.%N)
    for n in $(seq "$NODES"); do
        RUST_LOG=${NODE_LOG:-warn} "$BIN" --config "$config" serve --role process 2>>"$RUN/$h.log" &
        PG_NODES+=($!)
    done
    while :; do
        left=$(sql "SELECT EXISTS (SELECT 1 FROM deliveries WHERE handler = '$h' AND status IN ('pending', 'retrying', 'running'))")
        polls=$((polls + 1))
        [ "$left" = f ] && break
        for p in "${PG_NODES[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a process node exited" >&2; return 1; }; done
        sleep 0.05
    done
    t1=$(date +%s.%N)
    for p in "${PG_NODES[@]}"; do cpu=$(awk "BEGIN { print $cpu + $(cpu_of "$p") }"); done
    # The server's CPU over the run: its processes alive now (the nodes' backends among
    # them), less what those alive at the start had used then.
    pgcpu=$( { echo "$pg0" | sed 's/^/0 /'; pg_cpus | sed 's/^/1 /'; } |
        awk 'NF == 3 { if ($1 == 0) a[$2] = $3; else s += $3 - ($2 in a ? a[$2] : 0) } END { print s + 0 }')
    for p in "${PG_NODES[@]}"; do stop "$p"; done
    PG_NODES=()
    # Each stopped node flushed its statistics as it exited (its backends end just after it);
    # the first read also counts itself.
    sleep 0.3
    c1=$(sql "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    s1=$(sql "SELECT wal_sync FROM pg_stat_wal")
    f1=$(sql "$FUNCTION_CALLS")
    failed=$(sql "SELECT count(*) FROM deliveries WHERE handler = '$h' AND status <> 'succeeded'")
    [ "$failed" = 0 ] || { echo "$failed deliveries of $h did not succeed" >&2; return 1; }
    first=$(sql "SELECT extract(epoch FROM min(a.started_at)) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.handler = '$h'")
    # A key's cycle: from the end of one delivery's attempt to the start of the key's next
    # (the nodes' clocks, one machine), median and 90th percentile.
    gap=$(sql "SELECT coalesce(round(percentile_cont(0.5) WITHIN GROUP (ORDER BY g)::numeric, 2) || ' ' || round(percentile_cont(0.9) WITHIN GROUP (ORDER BY g)::numeric, 2), '- -')
               FROM (SELECT 1000 * extract(epoch FROM a.started_at - lag(a.started_at + a.duration_ms * interval '1 millisecond')
                            OVER (PARTITION BY d.order_key ORDER BY d.event_id)) AS g
                     FROM attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.handler = '$h' AND d.order_key IS NOT NULL) x
               WHERE g IS NOT NULL")
    echo "key_gap_ms $gap"
    echo "$f0 $f1" | awk -v n="$EVENTS" '{ printf "claims_per_delivery %.3f\nfinish_batches_per_delivery %.3f\n", ($3 - $1) / n, ($4 - $2) / n }'
    awk "BEGIN { printf \"server_cpu_ms_per_delivery %.3f\\n\", 1000 * $pgcpu / $EVENTS }"
    awk "BEGIN { printf \"dispatch_rate %.0f\\ndispatch_rate_after_start %.0f\\ncpu_ms_per_delivery %.3f\\ncommits_per_delivery %.3f\\nwal_syncs_per_delivery %.3f\\n\", $EVENTS / ($t1 - $t0), $EVENTS / ($t1 - $first), 1000 * $cpu / $EVENTS, ($c1 - $c0 - $polls - 1) / $EVENTS, ($s1 - $s0) / $EVENTS }"
}

start_daemon() { # start_daemon NAME CONFIG ROLE
    local name=$1 config=$2 role=$3 ready="$WORK/$1.ready"
    rm -f "$ready"
    HOOKTRAIL__SERVER__READY_FILE="$ready" "$BIN" --config "$config" serve --role "$role" 2>"$RUN/$name.log" &
    DPID=$!
    for _ in $(seq 300); do [ -s "$ready" ] && break; sleep 0.05; done
    [ -s "$ready" ] || { echo "$name did not start; log:"; cat "$RUN/$name.log"; exit 1; }
    DADDR=$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$ready")
}

common_config() {
    cat <<CONF
[server]
listen = "127.0.0.1:0"

[storage]
$(if [ "$BACKEND" = postgres ]; then printf 'backend = "postgres"\nurl_env = "HOOKTRAIL_DATABASE_URL"'; else printf 'path = "%s"' "$1"; fi)

[admin]
listen = "127.0.0.1:0"

[processor]
poll_interval = "1s"
max_concurrency = $HTTP_CONC

[retry]
max_attempts = 3
initial_backoff = "1s"
max_backoff = "1s"

[sources.bench]
auth = { type = "none" }
CONF
}
handler() { # handler NAME ORDERING_KEY|""
    printf '[handlers.%s]\ntype = "http"\nurl = "http://%s/bulk"\nbody = "raw"\nconcurrency = %s\n' "$1" "$TADDR" "$HTTP_CONC"
    if [ -n "$2" ]; then printf 'ordering = { key = "%s" }\n' "$2"; fi
    printf '\n'
}
route() { printf '[[routes]]\nsource = "bench"\nhandler = "%s"\n\n' "$1"; }
value() { sed -n "s/^$1 //p" "$2"; }

log "== hooktrail ordered-processing benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "   machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(uname -sr)"
log "   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
log "   EVENTS=$EVENTS (backlog per handler) HTTP_CONCURRENCY=$HTTP_CONC, DBs in $WORK"
log "   backend: $BACKEND$([ "$BACKEND" = postgres ] && echo ", $NODES process node(s) per handler, PostgreSQL $("$PSQL" --version | awk '{print $3}') on the same CPUs")"
printf 'run\tplain_per_s\tk1000_per_s\tk50_per_s\tk1000_pct\tk50_pct\n' >"$OUT/results.tsv"

for run in $(seq "$RUNS"); do
    log "== run $run/$RUNS"
    RUN="$WORK/run$run"
    mkdir -p "$RUN"
    "$PB" target >"$RUN/target.out" 2>&1 &
    TPID=$!
    for _ in $(seq 100); do grep -q '^listening on' "$RUN/target.out" && break; sleep 0.05; done
    TADDR=$(sed -n 's/^listening on //p' "$RUN/target.out")
    DB="$RUN/bulk.db"
    if [ "$BACKEND" = postgres ]; then newdb "bench_ordering_$run"; fi
    { common_config "$DB"; handler plain ""; handler k1000 /key_1000; handler k50 /key_50; route plain; route k1000; route k50; } >"$RUN/ingest.toml"
    start_daemon ingest "$RUN/ingest.toml" ingest
    "$PB" post-keyed "http://$DADDR/hooks/bench" "$EVENTS" 32 >"$RUN/post.out" 2>&1 || { cat "$RUN/post.out"; exit 1; }
    if [ "$BACKEND" = sqlite ] && command -v sqlite3 >/dev/null; then
        # The store's search indexer catches up before it stops: otherwise the first
        # handler run (`plain`) would also index every stored event, and the others not.
        for _ in $(seq 1200); do
            [ "$(sqlite3 -cmd ".timeout 2000" "$DB" "SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'search_upto'), 0) >= (SELECT coalesce(max(seq), 0) FROM events)")" = 1 ] && break
            sleep 0.1
        done
    fi
    stop "$DPID"; DPID=""
    # The tables' statistics, as autovacuum gathers them at some point of any real
    # run (here it used to land in the middle of a handler's run, or not at all,
    # and the plans it led to halved some runs: BENCHMARKS.md, "Quiet-machine runs
    # at the end of stop 15"). PG_ANALYZE=0 leaves them to autovacuum.
    if [ "$BACKEND" = postgres ] && [ "${PG_ANALYZE:-1}" = 1 ]; then sql "ANALYZE" >/dev/null; fi
    log "   stored $EVENTS events, 3 deliveries each ($(value post_rate "$RUN/post.out")/s through --role ingest)"
    declare -A RATE CPU
    for h in plain k1000 k50; do
        key=""; [ "$h" = k1000 ] && key=/key_1000; [ "$h" = k50 ] && key=/key_50
        { common_config "$DB"; handler "$h" "$key"; } >"$RUN/$h.toml"
        if [ "$BACKEND" = postgres ]; then
            pg_dispatch "$h" "$RUN/$h.toml" >"$RUN/$h.out" || { tail -5 "$RUN/$h.log"; exit 1; }
        else
            "$PB" dispatch "$DB" "$h" "$EVENTS" 900 -- "$BIN" --config "$RUN/$h.toml" serve --role process \
                >"$RUN/$h.out" 2>"$RUN/$h.log" || { tail -5 "$RUN/$h.log"; exit 1; }
        fi
        RATE[$h]=$(value dispatch_rate "$RUN/$h.out")
        CPU[$h]=$(value cpu_ms_per_delivery "$RUN/$h.out")
        if [ "$h" != plain ] && [ "$BACKEND" = postgres ]; then
            log "   $h: a key's next delivery starts $(value key_gap_ms "$RUN/$h.out" | awk '{ print $1 " ms (median), " $2 " ms (p90)" }') after its previous one ended"
        fi
        log "   $h: ${RATE[$h]} deliveries/s ($(value dispatch_rate_after_start "$RUN/$h.out")/s from the first attempt), ${CPU[$h]} ms CPU per delivery$([ "$BACKEND" = postgres ] && echo " (PostgreSQL $(value server_cpu_ms_per_delivery "$RUN/$h.out") ms), $(value commits_per_delivery "$RUN/$h.out") commits and $(value wal_syncs_per_delivery "$RUN/$h.out") WAL syncs per delivery; $(value claims_per_delivery "$RUN/$h.out") ordered-claim and $(value finish_batches_per_delivery "$RUN/$h.out") finish-batch calls per delivery")"
    done
    P1000=$(( 100 * RATE[k1000] / RATE[plain] ))
    P50=$(( 100 * RATE[k50] / RATE[plain] ))
    log "   ordered at 1,000 keys: $P1000% of unordered; at 50 keys: $P50%"
    # CPU per delivery hardly moves when other work shares the machine: the
    # share of unordered's rate each reaches when the CPUs are the limit.
    log "   by CPU per delivery: 1,000 keys $(awk "BEGIN { printf \"%.0f\", 100 * ${CPU[plain]} / ${CPU[k1000]} }")%, 50 keys $(awk "BEGIN { printf \"%.0f\", 100 * ${CPU[plain]} / ${CPU[k50]} }")% of unordered"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "${RATE[plain]}" "${RATE[k1000]}" "${RATE[k50]}" "$P1000" "$P50" >>"$OUT/results.tsv"
    for f in "$RUN"/*.log; do cp "$f" "$OUT/run$run-$(basename "$f")"; done
    stop "$TPID"; TPID=""
    # A finished run's database goes: nothing reads it again.
    if [ "$BACKEND" = postgres ]; then
        "$PSQL" -q "$SERVER/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS bench_ordering_$run WITH (FORCE)" 2>/dev/null
    fi
done

median() { awk -F'\t' -v c="$1" 'NR > 1 { print $c }' "$OUT/results.tsv" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
verdict() { if awk "BEGIN { exit !($1) }"; then echo met; else echo MISSED; fi; }
M_PLAIN=$(median 2); M_K1000=$(median 3); M_K50=$(median 4); M_P1000=$(median 5); M_P50=$(median 6)
log ""
log "== medians of $RUNS run(s), backlog $EVENTS deliveries per handler"
log "   unordered:              $M_PLAIN deliveries/s"
log "   ordered, 1,000 keys:    $M_K1000 deliveries/s = $M_P1000% of unordered   target >= 70%: $(verdict "$M_P1000 >= 70")"
log "   ordered, 50 keys:       $M_K50 deliveries/s = $M_P50% of unordered   target >= 30%: $(verdict "$M_P50 >= 30")"
log "   results: $OUT"
