#!/bin/sh
# Posts ONTRAPORT-style webhooks to hooktrail: the Post Data of a "Send a Webhook"
# element, with merge fields already substituted, form-encoded, token in the URL.
#
#   ONTRAPORT_TOKEN=<token> [BASE_URL=http://127.0.0.1:8080] examples/ontraport/send.sh [contact|note|all]
#
# ONTRAPORT_TOKEN is the token hooktrail.toml reads (auth.secret_env); it travels as
# ?token=... in the URL, because ONTRAPORT only lets you set a URL and Post Data.
#
#   contact.txt  First_Name=[First Name]&Email=[Email] from the ONTRAPORT docs, merged
#   note.txt     the docs' "add a Contact Record Note" Post Data, as typed there (spaces
#                and all), with [Contact ID] merged. It carries ONTRAPORT API
#                credentials in the body: hooktrail stores the body as received.
set -eu
cd "$(dirname "$0")"
BASE_URL="${BASE_URL:-http://127.0.0.1:8080}"
: "${ONTRAPORT_TOKEN:?set ONTRAPORT_TOKEN to the token in hooktrail.toml (auth.secret_env)}"
URL="$BASE_URL/hooks/ontraport"
# Percent-encodes every byte, so any token is safe in the URL.
urlencode() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n' | sed 's/../%&/g'; }

# curl arguments in, the answer out; exits non-zero unless the answer is 2xx.
send() {
    resp=$(curl -sS -w '\n%{http_code}' "$@") || exit 1
    code=$(printf '%s\n' "$resp" | tail -n 1)
    printf 'HTTP %s %s\n' "$code" "$(printf '%s\n' "$resp" | sed '$d')"
    case "$code" in 2??) ;; *) exit 1 ;; esac
}

post_form() {
    echo "POST $URL?token=…  ($1)"
    send -X POST "$URL?token=$(urlencode "$ONTRAPORT_TOKEN")" \
        -H 'Content-Type: application/x-www-form-urlencoded' \
        --data-binary "@$1"
}

case "${1:-all}" in
    contact) post_form contact.txt ;;
    note) post_form note.txt ;;
    all) post_form contact.txt; post_form note.txt ;;
    *) echo "usage: $0 [contact|note|all]" >&2; exit 2 ;;
esac
