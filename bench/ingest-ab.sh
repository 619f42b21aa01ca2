#!/usr/bin/env bash
# Interleaved A/B of hooktrail builds (or of one build under different
# environment switches) with bench/ingest.sh, the way BENCHMARKS.md's ingest
# sections take them: each round runs every variant once, back to back, each
# run measuring bare hyper and hooktrail in the same invocation, so a ratio
# and the CPU per request compare within one moment of the machine's load.
#
#     bench/ingest-ab.sh ROUNDS NAME=BINARY[:ENV=V,ENV=V...] ...
#
# e.g. (the base is a release build of main, copied out of its target dir):
#
#     bench/ingest-ab.sh 3 base=/tmp/hooktrail-main new=target/release/hooktrail
#     bench/ingest-ab.sh 3 base=/tmp/hooktrail-main tpc=/tmp/exp:HOOKTRAIL_EXP_TPC=2
#
# Each run is `SERVERS="bare hooktrail" RUNS=1 DURATION=8s QUIET_MAX_WAIT=0
# RETRIES=0 bench/ingest.sh` (override any of them in the environment). One
# line per run: bare and hooktrail req/s, their ratio, hooktrail's p99, RSS
# and the other processes' CPU, then hooktrail's CPU and run-queue wait per
# request by thread; and the results directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[ $# -ge 2 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
rounds=$1
shift
export SERVERS=${SERVERS:-"bare hooktrail"} RUNS=${RUNS:-1} DURATION=${DURATION:-8s}
export QUIET_MAX_WAIT=${QUIET_MAX_WAIT:-0} RETRIES=${RETRIES:-0}

for r in $(seq 1 "$rounds"); do
    for v in "$@"; do
        name=${v%%=*}
        rest=${v#*=}
        bin=${rest%%:*}
        envs=()
        if [ "$rest" != "$bin" ]; then
            IFS=, read -ra envs <<< "${rest#*:}"
        fi
        [ -x "$bin" ] || { echo "error: $name: $bin is not an executable" >&2; exit 1; }
        before=$(ls -d bench/out/*/ 2>/dev/null | sort | tail -1 || true)
        env "${envs[@]}" HOOKTRAIL_BIN="$bin" bench/ingest.sh > /dev/null 2>&1 || echo "warning: $name: bench/ingest.sh failed" >&2
        res=$(ls -d bench/out/*/ | sort | tail -1)
        [ "$res" != "$before" ] || { echo "error: $name: no results directory" >&2; exit 1; }
        awk -F'\t' -v r="$r" -v name="$name" -v res="$res" '
            $2 == "bare" { bare = $3 }
            $2 == "hooktrail" { ht = $3; p99 = $5; rss = $12; other = $15 }
            END {
                printf "round %s %-10s bare %7s  hooktrail %7s  %.3fx  p99 %s ms  RSS %s MB  other %s%%  %s\n",
                    r, name, bare, ht, (bare > 0 ? ht / bare : 0), p99, rss, other, res
            }' "$res/results.tsv"
        grep 'hooktrail .*CPU per request' "$res/summary.txt" | tail -1 | sed 's/.*(µs):/    CPU per request (µs):/'
        grep 'hooktrail .*run-queue wait' "$res/summary.txt" | tail -1 | sed 's/.*(µs):/    run-queue wait per request (µs):/'
    done
done
