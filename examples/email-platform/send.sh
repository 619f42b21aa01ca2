#!/bin/sh
# Posts the email platform's "Send a webhook" test event to hooktrail, with the
# authentication header you add in the step's Headers section.
#
#   EMAIL_WEBHOOK_TOKEN=<token> [BASE_URL=http://127.0.0.1:8080] examples/email-platform/send.sh
#
# EMAIL_WEBHOOK_TOKEN is the token hooktrail.toml reads (auth.secret_env); it travels
# in the X-Api-Key header. test-event.json is the test data exactly as the platform's
# docs show it. Run the script twice: the second answer is "duplicate" with the first
# event's id (dedup on /id), as when the platform re-sends an event.
set -eu
cd "$(dirname "$0")"
BASE_URL="${BASE_URL:-http://127.0.0.1:8080}"
: "${EMAIL_WEBHOOK_TOKEN:?set EMAIL_WEBHOOK_TOKEN to the token in hooktrail.toml (auth.secret_env)}"
URL="$BASE_URL/hooks/email-platform"

# curl arguments in, the answer out; exits non-zero unless the answer is 2xx.
send() {
    resp=$(curl -sS -w '\n%{http_code}' "$@") || exit 1
    code=$(printf '%s\n' "$resp" | tail -n 1)
    printf 'HTTP %s %s\n' "$code" "$(printf '%s\n' "$resp" | sed '$d')"
    case "$code" in 2??) ;; *) exit 1 ;; esac
}

echo "POST $URL  (test-event.json)"
send -X POST "$URL" \
    -H 'Content-Type: application/json' \
    -H "X-Api-Key: $EMAIL_WEBHOOK_TOKEN" \
    --data-binary @test-event.json
