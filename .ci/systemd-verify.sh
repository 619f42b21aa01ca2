#!/usr/bin/env bash
# Checks the systemd integration (issue 7): `systemd-analyze verify` on
# systemd/hooktrail.service must pass without a single warning, and the
# sysusers/tmpfiles snippets must apply cleanly to an empty root.
# Called from .ci/run; needs root only to install systemd when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-verify: installing systemd"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
systemd-analyze --version | head -n 1

cargo build --quiet --bin hooktrail
bin="$(pwd)/target/debug/hooktrail"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# verify insists that ExecStart= exists. Point it at the binary just built and
# change nothing else, after checking the unit names the documented path.
unit=systemd/hooktrail.service
grep -qx 'ExecStart=/usr/local/bin/hooktrail serve' "$unit" || { echo "systemd-verify: $unit must run /usr/local/bin/hooktrail serve"; exit 1; }
mkdir "$tmp/unit"
sed "s|^ExecStart=/usr/local/bin/hooktrail |ExecStart=$bin |" "$unit" > "$tmp/unit/hooktrail.service"
out="$(systemd-analyze verify --man=no "$tmp/unit/hooktrail.service" 2>&1)" || { echo "$out"; echo "systemd-verify: FAILED"; exit 1; }
if [ -n "$out" ]; then
    echo "$out"
    echo "systemd-verify: systemd-analyze verify printed warnings; fix them"
    exit 1
fi
for key in Type=notify WatchdogSec= 'ExecReload=/bin/kill -HUP $MAINPID' StateDirectory=hooktrail User=hooktrail \
    ProtectSystem=strict NoNewPrivileges=yes PrivateTmp=yes ProtectHome=yes; do
    grep -q "^$key" "$unit" || { echo "systemd-verify: $unit lacks $key"; exit 1; }
done

# The user and the config directory, created in a scratch root.
mkdir -p "$tmp/root/etc"
systemd-sysusers --root="$tmp/root" "$PWD/systemd/hooktrail.sysusers"
grep -q "^hooktrail:" "$tmp/root/etc/passwd" || { echo "systemd-verify: sysusers did not create the user"; exit 1; }
systemd-tmpfiles --root="$tmp/root" --create "$PWD/systemd/hooktrail.tmpfiles"
test -d "$tmp/root/etc/hooktrail"

echo "systemd-verify: ok"
