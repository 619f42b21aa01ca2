#!/usr/bin/env bash
# The Debian package, end to end (issue 16): build it, install it with dpkg -i,
# then as the packaged `hooktrail` user run check-config and a short serve on
# the packaged config, post one event and read it back, stop with SIGTERM.
# Needs root (dpkg -i, runuser). Called from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

deb=$(bash packaging/deb/build.sh)
echo "deb: built $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb --info "$deb" > /tmp/hooktrail-deb.info; sed -n 's/^ *\(Package\|Version\|Architecture\):/deb:   &/p' /tmp/hooktrail-deb.info
dpkg-deb --contents "$deb" > /tmp/hooktrail-deb.contents
grep -q './etc/hooktrail/hooktrail.toml' /tmp/hooktrail-deb.contents
dpkg -i "$deb"
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    dpkg --purge hooktrail >/dev/null 2>&1 || true
}
trap cleanup EXIT

test "$(command -v hooktrail)" = /usr/bin/hooktrail
getent passwd hooktrail >/dev/null || { echo "deb: the hooktrail user was not created"; exit 1; }
grep -qx /etc/hooktrail/hooktrail.toml /var/lib/dpkg/info/hooktrail.conffiles || { echo "deb: the config is not a conffile"; exit 1; }
test "$(stat -c '%U:%G %a' /etc/hooktrail)" = "root:hooktrail 750"
test "$(stat -c '%G %a' /etc/hooktrail/hooktrail.toml)" = "hooktrail 640"

as_user() { runuser -u hooktrail -- "$@"; }
as_user hooktrail check-config --config /etc/hooktrail/hooktrail.toml

# A short serve on the packaged config, on ephemeral ports (a ready file says which);
# setpriv execs the daemon itself as the user, so SIGTERM reaches it directly.
ready=/var/lib/hooktrail/ci-ready.json
rm -f "$ready"
HOOKTRAIL__SERVER__LISTEN=127.0.0.1:0 HOOKTRAIL__ADMIN__LISTEN=127.0.0.1:0 HOOKTRAIL__SERVER__READY_FILE="$ready" \
    setpriv --reuid=hooktrail --regid=hooktrail --init-groups hooktrail serve --config /etc/hooktrail/hooktrail.toml > /tmp/hooktrail-deb.log 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -s "$ready" ] && break; sleep 0.1; done
[ -s "$ready" ] || { cat /tmp/hooktrail-deb.log; echo "deb: serve did not become ready"; exit 1; }
listen=$(sed -n 's/.*"listen":"\([^"]*\)".*/\1/p' "$ready")
admin=$(sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' "$ready")
curl -fsS "http://$admin/readyz" >/dev/null
id=$(curl -fsS -H 'Content-Type: application/json' -d "{\"form_completion_id\":\"deb-$$-$(date +%s%N)\",\"email\":\"a@example.com\"}" "http://$listen/hooks/demo" \
    | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
[ -n "$id" ] || { echo "deb: the post was not accepted"; exit 1; }
shown=$(as_user hooktrail events show "$id" --config /etc/hooktrail/hooktrail.toml)
grep -q "a@example.com" <<< "$shown" || { echo "$shown"; echo "deb: events show does not show the stored event"; exit 1; }
kill -TERM "$pid"
wait "$pid" || { cat /tmp/hooktrail-deb.log; echo "deb: serve did not stop cleanly"; exit 1; }
pid=
test "$(stat -c '%U' /var/lib/hooktrail/hooktrail.db)" = hooktrail
rm -f "$ready"
echo "deb: ok (installed, check-config and serve as the hooktrail user, event $id stored)"
