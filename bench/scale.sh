#!/usr/bin/env bash
# hooktrail scale benchmark (issue 13): one command, run from anywhere:
#
#     bench/scale.sh            # 10,000,000 events (about 10 GB on disk; the fill takes minutes)
#     N=200000 bench/scale.sh   # a quick run
#
# 1. Fills a database with N unique Net-Results-like form events,
#    written directly (`hooktrail bench-fill`, a hidden command: posting ten
#    million would take hours), spread over the past year, each with one
#    succeeded `crm` delivery and its attempt. It is left at the schema before
#    migration 4, so the first start measures the back-fill of counters and
#    the search index.
# 2. Starts the daemon on it (first start: migration; second: plain start-up),
#    asks every question $REPS times and reports the median: `stats`,
#    `stats --since 24h`, `events list --limit 20`, `--match` and `--search`
#    for one lead, `/api/events` with a filter, `/api/events?search=`, the page
#    with a search, `/api/stats`, `/metrics` (queue depth).
# 3. Ingest at 64 connections (unique form posts, bench/form.lua, wrk -t2 -c64
#    for $DURATION, one source, no handlers), alternately into a fresh empty
#    database and into the full one, INGEST_RUNS times each; medians.
# 4. RSS of the daemon on the full database, then `prune` of the older half
#    (daemon running), file size before and after, and `hooktrail compact`.
#
# With BACKEND=postgres (a throw-away PostgreSQL cluster on the same CPUs, .ci/postgres.sh):
# after step 2 on SQLite, the full store is moved with `export | import` into PostgreSQL
# (both timed) and step 2's questions are asked of it too, side by side; then `prune` of
# the older half on both. Steps 3 and 4's ingest, RSS and compact are SQLite's only
# (bench/postgres.sh measures PostgreSQL ingest).
#
# Environment knobs [defaults]: N [10000000]  DURATION [10s]  REPS [5]  INGEST_RUNS [3]
#   BACKEND [sqlite] or postgres; PG_PORT [55453] for its cluster
#   BENCH_TMPDIR [/var/tmp] (a real disk)  KEEP=1 keep the databases
#   HOOKTRAIL_BIN=PATH  measure this binary instead of building one
# Results: bench/out/scale-<UTC time>/summary.txt
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N=${N:-10000000}
DURATION=${DURATION:-10s}
REPS=${REPS:-5}
INGEST_RUNS=${INGEST_RUNS:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-bench}"
OUT="$ROOT/bench/out/scale-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT" "${BENCH_TMPDIR:-/var/tmp}"
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/hooktrail-scale.XXXXXX")
PID=""

log() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
cleanup() {
    [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    [ "${BACKEND:-sqlite}" = postgres ] && bash "$ROOT/.ci/postgres.sh" stop "$WORK/pg" > /dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
if [ -z "${HOOKTRAIL_BIN:-}" ]; then cargo build --release --bin hooktrail; fi
HT="${HOOKTRAIL_BIN:-$CARGO_TARGET_DIR/release/hooktrail}"

now_ms() { date +%s%3N; }
# Median of the numbers on stdin.
median() { sort -n | awk '{a[NR]=$1} END{ if (NR==0) print "?"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
# Milliseconds one run of a command takes (output discarded; a failure stops the bench).
time_ms() { local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
# Median milliseconds of REPS runs.
med_ms() { for _ in $(seq "$REPS"); do time_ms "$@"; done | median; }

config() { # dir
    cat > "$1/hooktrail.toml" <<TOML
[server]
listen = "127.0.0.1:0"
ready_file = "$1/ready.json"
[storage]
path = "$1/hooktrail.db"
[admin]
listen = "127.0.0.1:0"
[sources.netresults]
auth = { type = "none" }
TOML
}

start() { # dir -> sets PID and START_MS (milliseconds until the ready file)
    local dir=$1 t0 t=6000
    rm -f "$dir/ready.json"
    t0=$(now_ms)
    RUST_LOG=warn "$HT" --config "$dir/hooktrail.toml" serve 2>> "$dir/server.log" &
    PID=$!
    while [ ! -s "$dir/ready.json" ]; do
        kill -0 "$PID" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
        t=$((t - 1)); [ "$t" -gt 0 ] || { echo "no ready file after 10 minutes" >&2; exit 1; }
        sleep 0.1
    done
    START_MS=$(( $(now_ms) - t0 ))
}
addr() { sed "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/" "$1/ready.json"; }
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=""; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$PID/status"; }
hwm_kb() { awk '/^VmHWM/{print $2}' "/proc/$PID/status"; }
size_mb() { du -cm "$1"/hooktrail.db* | awk 'END{print $1}'; }

ingest() { # dir -> events/s
    local url line
    url="http://$(addr "$1" listen)/hooks/netresults"
    line=$(wrk -t2 -c64 -d"$DURATION" --timeout 10s -s bench/form.lua "$url" | grep '^BENCH')
    echo "$line" >> "$OUT/wrk.txt"
    echo "$line" | awk '{ for (i=2;i<=NF;i++){ split($i,kv,"="); v[kv[1]]=kv[2] } if (v["non2xx"]+v["connect_err"]+v["read_err"]+v["write_err"]+v["timeouts"] > 0) print "errors:" $0 > "/dev/stderr"; printf "%.0f", v["requests"] / (v["duration_us"] / 1e6) }'
}

log "hooktrail scale benchmark, $(date -u +'%Y-%m-%d %H:%M UTC'), N=$N"
log "binary:  $HT ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
log "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); db dir $WORK; load $(cut -d' ' -f1-3 /proc/loadavg)"

FULL="$WORK/full"
mkdir -p "$FULL"; config "$FULL"

t0=$(now_ms)
"$HT" --config "$FULL/hooktrail.toml" bench-fill --events "$N" --old-schema 2>> "$OUT/fill.log"
log "fill (written directly):       $N events in $(( ($(now_ms) - t0) / 1000 )) s, $(size_mb "$FULL") MB"

start "$FULL"; stop
log "first start (migration 5):     $START_MS ms (back-fills counters and the search index of $N events)"
start "$FULL"
log "start-up:                      $START_MS ms"

questions() { # dir: every operator question, REPS times each, medians
    C=(--config "$1/hooktrail.toml")
    ADMIN="http://$(addr "$1" admin)"
    q "stats" "$HT" "${C[@]}" stats
    q "stats --since 24h" "$HT" "${C[@]}" stats --since 24h
    q "events list --limit 20" "$HT" "${C[@]}" events list --limit 20
    q "events list --match (a lead)" "$HT" "${C[@]}" events list --limit 20 --match "/email_address/0=$LEAD"
    q "events list --search (a lead)" "$HT" "${C[@]}" events list --limit 20 --search "$LEAD"
    q "/api/events?source&status" curl -sf "$ADMIN/api/events?source=netresults&status=done&limit=20"
    q "/api/events?match=" curl -sf "$ADMIN/api/events?match=%2Femail_address%2F0%3D${LEAD/@/%40}"
    q "/api/events?search=" curl -sf "$ADMIN/api/events?search=${LEAD/@/%40}"
    q "page with a search" curl -sf "$ADMIN/?search=${LEAD/@/%40}"
    q "/api/stats" curl -sf "$ADMIN/api/stats"
    q "/metrics (queue depth)" curl -sf "$ADMIN/metrics"
    found=$("$HT" "${C[@]}" events list --json --search "$LEAD" | grep -c '"id"' || true)
    [ "$found" = 1 ] || log "WARNING: --search $LEAD found $found events, expected 1"
}
LEAD="lead$((N / 2))@example$(( (N / 2) % 997 )).com"
q() { log "$(printf '%-30s %6s ms' "$1" "$(med_ms "${@:2}")")"; }
questions "$FULL"

if [ "${BACKEND:-sqlite}" = postgres ]; then
    stop
    PG_PORT=${PG_PORT:-55453}
    chmod 755 "$WORK"  # the cluster runs as the postgres user
    export HOOKTRAIL_DATABASE_URL
    HOOKTRAIL_DATABASE_URL="$(bash .ci/postgres.sh start "$WORK/pg" "$PG_PORT")/postgres?sslmode=disable"
    PGD="$WORK/pgstore"; mkdir -p "$PGD"; config "$PGD"
    sed -i "s|^path = .*|backend = \"postgres\"\nurl_env = \"HOOKTRAIL_DATABASE_URL\"|" "$PGD/hooktrail.toml"
    log "PostgreSQL $("$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/psql" --version | awk '{print $3}') on the same CPUs (.ci/postgres.sh)"
    t0=$(now_ms)
    "$HT" --config "$FULL/hooktrail.toml" export > "$WORK/export.jsonl"
    log "export (SQLite):               $(( $(now_ms) - t0 )) ms, $(du -m "$WORK/export.jsonl" | cut -f1) MB"
    t0=$(now_ms)
    "$HT" --config "$PGD/hooktrail.toml" import "$WORK/export.jsonl" >> "$OUT/import.txt" 2>> "$OUT/import.log"
    log "import into PostgreSQL:        $(( $(now_ms) - t0 )) ms ($(cat "$OUT/import.txt"))"
    rm -f "$WORK/export.jsonl"
    start "$PGD"
    log "PostgreSQL start-up:           $START_MS ms; the same questions:"
    questions "$PGD"
    t0=$(now_ms)
    "$HT" --config "$PGD/hooktrail.toml" export > /dev/null
    log "export (PostgreSQL):           $(( $(now_ms) - t0 )) ms"
    for d in "$FULL" "$PGD"; do
        t0=$(now_ms)
        "$HT" --config "$d/hooktrail.toml" prune --older-than 182d > "$OUT/prune-$(basename "$d").txt"
        log "prune --older-than 182d ($(basename "$d")): $(( $(now_ms) - t0 )) ms ($(cat "$OUT/prune-$(basename "$d").txt"))"
    done
    log "results: $OUT"
    exit 0
fi

stop
empties=(); fulls=()
for r in $(seq "$INGEST_RUNS"); do
    EMPTY="$WORK/empty$r"; mkdir -p "$EMPTY"; config "$EMPTY"
    start "$EMPTY"; empties+=("$(ingest "$EMPTY")"); stop; rm -rf "$EMPTY"
    start "$FULL"; fulls+=("$(ingest "$FULL")")
    [ "$r" = "$INGEST_RUNS" ] || stop
done
empty_rate=$(printf '%s\n' "${empties[@]}" | median); full_rate=$(printf '%s\n' "${fulls[@]}" | median)
log "ingest, empty database:        $empty_rate events/s (median of ${empties[*]}; 64 connections, $DURATION, unique form posts)"
log "ingest, $N events:  $full_rate events/s (median of ${fulls[*]}) = $(awk -v a="$full_rate" -v b="$empty_rate" 'BEGIN{printf "%.0f", 100*a/b}')% of empty (target >= 95%)"
log "RSS after the last ingest run: $(( $(rss_kb) / 1024 )) MB (peak $(( $(hwm_kb) / 1024 )) MB; target < 64 MB)"

before=$(size_mb "$FULL")
t0=$(now_ms)
"$HT" "${C[@]}" prune --older-than 182d >> "$OUT/prune.txt"
log "prune --older-than 182d:       $(( $(now_ms) - t0 )) ms ($(cat "$OUT/prune.txt")), daemon running"
stop
log "file size:                     $before MB before prune, $(size_mb "$FULL") MB after"
t0=$(now_ms)
"$HT" "${C[@]}" compact >> "$OUT/compact.txt"
log "compact:                       $(( $(now_ms) - t0 )) ms, $(size_mb "$FULL") MB after ($(cat "$OUT/compact.txt"))"
log "results: $OUT"
