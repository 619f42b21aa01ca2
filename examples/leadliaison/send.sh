#!/bin/sh
# Sends Lead Liaison-style webhooks to hooktrail: one per Request Type of a Lead
# Liaison webhook, token in the URL.
#
#   LEADLIAISON_TOKEN=<token> [BASE_URL=http://127.0.0.1:8080] examples/leadliaison/send.sh [form|json|xml|get|all]
#
# LEADLIAISON_TOKEN is the token hooktrail.toml reads (auth.secret_env); it travels as
# ?token=... in the URL, because a Lead Liaison webhook has a URL field but no headers.
#
#   form  POST form.txt, a FORM/URL template (param_1=val_1&param_2=val_2), fields merged
#   json  POST lead.json, a JSON template
#   xml   POST lead.xml, an XML template, to /hooks/leadliaison-xml
#   get   GET with the fields inserted into the URL's query string (a ping URL)
#
# The field names are examples: a template holds whatever names you give it.
# Each answer is the source's response template, for Lead Liaison's Response Mapping:
#   {"id":"evt_…","status":"accepted","email":"dgolden@mid-corp.com"}
set -eu
cd "$(dirname "$0")"
BASE_URL="${BASE_URL:-http://127.0.0.1:8080}"
: "${LEADLIAISON_TOKEN:?set LEADLIAISON_TOKEN to the token in hooktrail.toml (auth.secret_env)}"
# Percent-encodes every byte, so any token is safe in the URL.
urlencode() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n' | sed 's/../%&/g'; }
TOKEN_Q="token=$(urlencode "$LEADLIAISON_TOKEN")"

# curl arguments in, the answer out; exits non-zero unless the answer is 2xx.
send() {
    resp=$(curl -sS -w '\n%{http_code}' "$@") || exit 1
    code=$(printf '%s\n' "$resp" | tail -n 1)
    printf 'HTTP %s %s\n' "$code" "$(printf '%s\n' "$resp" | sed '$d')"
    case "$code" in 2??) ;; *) exit 1 ;; esac
}

form() {
    echo "POST $BASE_URL/hooks/leadliaison?token=…  (form.txt, FORM/URL)"
    send -X POST "$BASE_URL/hooks/leadliaison?$TOKEN_Q" \
        -H 'Content-Type: application/x-www-form-urlencoded' \
        --data-binary @form.txt
}
json() {
    echo "POST $BASE_URL/hooks/leadliaison?token=…  (lead.json, JSON)"
    send -X POST "$BASE_URL/hooks/leadliaison?$TOKEN_Q" \
        -H 'Content-Type: application/json' \
        --data-binary @lead.json
}
xml() {
    echo "POST $BASE_URL/hooks/leadliaison-xml?token=…  (lead.xml, XML)"
    send -X POST "$BASE_URL/hooks/leadliaison-xml?$TOKEN_Q" \
        -H 'Content-Type: application/xml' \
        --data-binary @lead.xml
}
get() {
    echo "GET $BASE_URL/hooks/leadliaison?token=…&first_name=Daniel&…  (GET)"
    send "$BASE_URL/hooks/leadliaison?$TOKEN_Q&first_name=Daniel&last_name=Golden&email=dgolden%40mid-corp.com&company=MidSize%20Corp"
}

case "${1:-all}" in
    form) form ;;
    json) json ;;
    xml) xml ;;
    get) get ;;
    all) form; json; xml; get ;;
    *) echo "usage: $0 [form|json|xml|get|all]" >&2; exit 2 ;;
esac
