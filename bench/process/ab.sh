#!/usr/bin/env bash
# Case (a) of bench/process.sh alone, for an A/B of hooktrail builds:
#
#     bench/process/ab.sh BIN_A BIN_B ...
#
# Seeds one SQLite DB with EVENTS (10,000) events routed to the shell handler `sh`
# (/bin/true, concurrency SHELL_CONCURRENCY [8]) through BIN_A's ingest role, waits
# until the search index covers them (NOWAIT=1: don't), then ROUNDS [3] times: the
# bare spawn rate, then each build on its own copy of that DB, back to back. Prints
# per run the deliveries/s (from the first attempt), the CPU per delivery (children
# included), the daemon's own CPU per delivery, and that by thread name in µs
# (from schedstat, ns resolution: the writer's share shows a few µs). Needs process-bench built
# (bench/process.sh builds it; PB=path overrides).
set -euo pipefail
ROUNDS=${ROUNDS:-3}; EVENTS=${EVENTS:-10000}; CONC=${SHELL_CONCURRENCY:-8}
PB=${PB:-${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target-bench}/release/process-bench}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/hooktrail-ab.XXXXXX")
trap 'rm -rf "$W"' EXIT
cfg() { cat <<C
[server]
listen = "127.0.0.1:0"
[storage]
path = "$1"
[admin]
listen = "127.0.0.1:0"
[processor]
poll_interval = "1s"
max_concurrency = 64
[retry]
max_attempts = 3
initial_backoff = "1s"
max_backoff = "1s"
[sources.bench]
auth = { type = "none" }
[handlers.sh]
type = "shell"
command = ["/bin/true"]
concurrency = $CONC
C
if [ "${2:-}" = route ]; then printf "[[routes]]\nsource = \"bench\"\nhandler = \"sh\"\n"; fi
}
cfg "$W/seed.db" route > "$W/ingest.toml"
HOOKTRAIL__SERVER__READY_FILE="$W/ready" "$1" --config "$W/ingest.toml" serve --role ingest 2>"$W/ingest.log" &
D=$!
for _ in $(seq 300); do [ -s "$W/ready" ] && break; sleep 0.05; done
ADDR=$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$W/ready")
"$PB" post "http://$ADDR/hooks/bench" "$EVENTS" 32 >/dev/null
[ "${NOWAIT:-0}" = 1 ] || "$PB" wait-indexed "$W/seed.db" 120
kill -TERM $D; wait $D || true
for r in $(seq "$ROUNDS"); do
  "$PB" spawn-rate "$EVENTS" "$CONC" bare > "$W/bare.out" 2>&1
  echo "round $r bare $(sed -n 's/^spawn_rate //p' "$W/bare.out")/s $(sed -n 's/^cpu_ms_per_spawn //p' "$W/bare.out") ms"
  for b in "$@"; do
    rm -rf "$W"/run.db*; cp "$W/seed.db" "$W/run.db"
    cfg "$W/run.db" > "$W/run.toml"
    "$PB" dispatch "$W/run.db" sh "$EVENTS" 600 -- "$b" --config "$W/run.toml" serve --role process >"$W/d.out" 2>"$W/d.log" || { tail "$W/d.log"; exit 1; }
    echo "round $r $(basename "$b") $(sed -n 's/^dispatch_rate_after_start //p' "$W/d.out")/s cpu $(sed -n 's/^cpu_ms_per_delivery //p' "$W/d.out") daemon $(sed -n 's/^daemon_cpu_ms_per_delivery //p' "$W/d.out") µs/delivery: $(sed -n 's/^daemon_thread_us_per_delivery //p' "$W/d.out")"
  done
done
