#!/usr/bin/env bash
# The event-log page in a real browser (issue 7): installs Debian's chromium
# and the pinned playwright-core, then runs the Rust integration test that
# drives the page. Here the test must run: a skip is a failure.
# Called from .ci/run; needs root (apt-get) when chromium is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "browser: installing chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
/usr/bin/chromium --version
if ! command -v node >/dev/null 2>&1; then
    echo "browser: installing nodejs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node --version
(cd tests/browser && npm ci --no-audit --no-fund)

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
cargo test --test ops browser_ -- --nocapture 2>&1 | tee "$out"
if grep -q "SKIPPED" "$out"; then
    echo "browser: the browser test skipped itself; it must run in CI"
    exit 1
fi
grep -q "test browser_filters_opens_an_event_and_replays_it ... ok" "$out"
grep -q "test browser_bulk_replays_failed_events_after_confirmation_and_refuses_a_forged_post ... ok" "$out"
echo "browser: ok"
