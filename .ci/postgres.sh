#!/usr/bin/env bash
# Starts a throw-away PostgreSQL cluster for the tests (README "Tests"):
# initdb in DIR, then pg_ctl on 127.0.0.1:PORT with password (SCRAM) auth
# over TCP. As root (CI), the server runs as the `postgres` user. Prints the
# server URL for HOOKTRAIL_TEST_PG_URL (no database: each test makes its own).
#
#   bash .ci/postgres.sh start [DIR] [PORT]   # prints the URL
#   bash .ci/postgres.sh stop  [DIR]
#   bash .ci/postgres.sh halt  [DIR]          # stops the server, keeps its data
#   bash .ci/postgres.sh resume [DIR] [PORT]  # starts a halted server again
set -euo pipefail
cmd=${1:-start}
dir=${2:-/tmp/hooktrail-test-pg}
port=${3:-55432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "postgres.sh: no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install -y postgresql)" >&2
    exit 1
fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
password=hooktrail-test-pw

serve() {
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=64MB" start >/dev/null
}

case "$cmd" in
halt)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
resume)
    serve
    ;;
stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
start)
    if [ -d "$dir/data" ]; then as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "$password" >"$dir/pw"
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; fi
    as_pg "$bin/initdb" -D "$dir/data" -U hooktrail --pwfile="$dir/pw" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log"
    # fsync and synchronous_commit stay on: the tests check durability.
    serve
    echo "postgres://hooktrail:$password@127.0.0.1:$port"
    ;;
*)
    echo "usage: postgres.sh start|stop|halt|resume [DIR] [PORT]" >&2
    exit 2
    ;;
esac
