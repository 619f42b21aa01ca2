#!/bin/sh
# Posts the sample Net-Results / Paminga webhooks to hooktrail, as those platforms send them.
#
#   NR_TOKEN=<token> [BASE_URL=http://127.0.0.1:8080] examples/netresults/send.sh [form|campaign|alert|all]
#
# NR_TOKEN is the token hooktrail.toml reads (auth.secret_env = "NR_TOKEN");
# it travels in the X-Webhook-Token header. Default: all three requests.
#
#   form.json      the form webhook, exactly as in the Net-Results/Paminga docs (minus the
#                  stray `;` after the closing brace on the Net-Results page)
#   campaign.json  the campaign webhook, exactly as in the docs: a batch of contact ids
#   alert.json     an alert webhook. The docs name alert webhooks but show no sample,
#                  so this shape is ASSUMED (a minimal plausible one), not documented.
set -eu
cd "$(dirname "$0")"
BASE_URL="${BASE_URL:-http://127.0.0.1:8080}"
: "${NR_TOKEN:?set NR_TOKEN to the token in hooktrail.toml (auth.secret_env)}"
URL="$BASE_URL/hooks/netresults"

# curl arguments in, the answer out; exits non-zero unless the answer is 2xx.
send() {
    resp=$(curl -sS -w '\n%{http_code}' "$@") || exit 1
    code=$(printf '%s\n' "$resp" | tail -n 1)
    printf 'HTTP %s %s\n' "$code" "$(printf '%s\n' "$resp" | sed '$d')"
    case "$code" in 2??) ;; *) exit 1 ;; esac
}

post_json() {
    echo "POST $URL  ($1)"
    send -X POST "$URL" \
        -H 'Content-Type: application/json' \
        -H "X-Webhook-Token: $NR_TOKEN" \
        --data-binary "@$1"
}

case "${1:-all}" in
    form) post_json form.json ;;
    campaign) post_json campaign.json ;;
    alert) post_json alert.json ;;
    all) post_json form.json; post_json campaign.json; post_json alert.json ;;
    *) echo "usage: $0 [form|campaign|alert|all]" >&2; exit 2 ;;
esac
