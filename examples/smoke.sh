#!/bin/sh
# Runs every example against the real binary: check-config, `serve` on a loopback port
# with a throw-away database, the example's send.sh, then checks what was stored
# (`events show --json`): status, normalized payload, raw body, redacted secrets,
# dedup, the Lead Liaison response template, and 401 for a wrong token.
#
#   cargo build && examples/smoke.sh [netresults|email-platform|ontraport|leadliaison]...
#
# Env: HOOKTRAIL_BIN (default target/debug/hooktrail), PORT (default 18080).
# Needs curl and jq. Stops only the daemon it started.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${HOOKTRAIL_BIN:-$ROOT/target/debug/hooktrail}
PORT=${PORT:-18080}
export BASE_URL="http://127.0.0.1:$PORT"
# Test tokens. The ONTRAPORT one has characters that must be percent-encoded in a URL.
export NR_TOKEN=smoke-nr-token
export EMAIL_WEBHOOK_TOKEN=smoke-email-token
export ONTRAPORT_TOKEN='smoke ot/token&x=1'
export LEADLIAISON_TOKEN=smoke-ll-token

WORK=$(mktemp -d)
PID=
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

EX=
fail() {
    echo "FAIL [$EX]: $*" >&2
    if [ -f "$WORK/$EX.log" ]; then echo "--- daemon log (tail)" >&2; tail -n 20 "$WORK/$EX.log" >&2; fi
    exit 1
}

cfg() { echo "$ROOT/examples/$EX/hooktrail.toml"; }
ht() { HOOKTRAIL__STORAGE__PATH="$WORK/$EX.db" "$BIN" --config "$(cfg)" "$@"; }

start() {
    EX=$1
    echo "== $EX"
    "$BIN" --config "$(cfg)" check-config >/dev/null || fail "check-config"
    rm -f "$WORK/ready"
    HOOKTRAIL__SERVER__LISTEN="127.0.0.1:$PORT" HOOKTRAIL__ADMIN__LISTEN=off \
        HOOKTRAIL__STORAGE__PATH="$WORK/$EX.db" HOOKTRAIL__SERVER__READY_FILE="$WORK/ready" \
        "$BIN" --config "$(cfg)" serve 2>"$WORK/$EX.log" &
    PID=$!
    i=0
    while [ ! -s "$WORK/ready" ]; do
        kill -0 "$PID" 2>/dev/null || { PID=; fail "daemon exited at start"; }
        i=$((i + 1)); [ "$i" -lt 100 ] || fail "daemon not ready after 10s"
        sleep 0.1
    done
}

stop() {
    kill -TERM "$PID"
    rc=0; wait "$PID" || rc=$?
    PID=
    [ "$rc" -eq 0 ] || fail "daemon exited $rc on SIGTERM"
}

# Runs send.sh; its "HTTP 200 {...}" lines go to $WORK/answers.
send() {
    "$ROOT/examples/$EX/send.sh" "$@" | tee "$WORK/answers.all" || fail "send.sh $* did not get 2xx"
    sed -n 's/^HTTP 200 //p' "$WORK/answers.all" >"$WORK/answers"
}
answer() { sed -n "${1}p" "$WORK/answers"; }
id_of() { answer "$1" | jq -r .id; }

# expect ID JQ-FILTER [jq args...]: the stored event must satisfy the filter.
expect() {
    id=$1; filter=$2; shift 2
    ht events show "$id" --json >"$WORK/event.json" || fail "events show $id"
    jq -e "$@" "$filter" "$WORK/event.json" >/dev/null || { cat "$WORK/event.json" >&2; fail "$id: $filter"; }
}
stored_count() { ht events list --json --limit 1000 | jq length; }

# refused EXPECTED-STATUS curl-args...: the request gets that status, nothing is stored.
refused() {
    want=$1; shift
    before=$(stored_count)
    code=$(curl -sS -o "$WORK/refused" -w '%{http_code}' "$@")
    [ "$code" = "$want" ] || fail "expected $want, got $code: $(cat "$WORK/refused")"
    jq -e '.error | length > 0' "$WORK/refused" >/dev/null || fail "no JSON error body"
    [ "$(stored_count)" = "$before" ] || fail "a refused request was stored"
    echo "refused as expected: HTTP $code $(cat "$WORK/refused")"
}

common='.status == "done" and .source == $src and .method == $m and .deliveries == []'

run_netresults() {
    start netresults
    D=$ROOT/examples/netresults
    send all
    for n in 1 2 3; do [ "$(answer $n | jq -r .status)" = accepted ] || fail "answer $n not accepted"; done
    expect "$(id_of 1)" "$common"' and .payload == $want[0] and .body == $raw and .headers["x-webhook-token"] == "[redacted]" and .content_type == "application/json"' \
        --arg src netresults --arg m POST --slurpfile want "$D/form.json" --rawfile raw "$D/form.json"
    expect "$(id_of 2)" "$common"' and .payload == $want[0] and .body == $raw' \
        --arg src netresults --arg m POST --slurpfile want "$D/campaign.json" --rawfile raw "$D/campaign.json"
    expect "$(id_of 2)" '[.payload.CampaignActionQualification[].Campaign[].CampaignAction[].Contacts[][]] == [1234567, 12345678, 123456789]'
    expect "$(id_of 3)" "$common"' and .payload == $want[0]' --arg src netresults --arg m POST --slurpfile want "$D/alert.json"
    first=$(id_of 1)
    send form
    [ "$(answer 1)" = "{\"id\":\"$first\",\"status\":\"duplicate\"}" ] || fail "resent form not a duplicate of $first: $(answer 1)"
    # Campaign webhooks carry no form_completion_id, so a resend is a new event.
    send campaign
    [ "$(answer 1 | jq -r .status)" = accepted ] || fail "campaign resend should be accepted"
    [ "$(stored_count)" = 4 ] || fail "expected 4 stored events"
    refused 401 -X POST "$BASE_URL/hooks/netresults" -H 'Content-Type: application/json' -H 'X-Webhook-Token: wrong' --data-binary "@$D/form.json"
    refused 401 -X POST "$BASE_URL/hooks/netresults" -H 'Content-Type: application/json' --data-binary "@$D/form.json"
    stop
}

run_email_platform() {
    start email-platform
    D=$ROOT/examples/email-platform
    send
    id=$(id_of 1)
    [ "$(answer 1 | jq -r .status)" = accepted ] || fail "not accepted"
    expect "$id" "$common"' and .payload == $want[0] and .body == $raw and .headers["x-api-key"] == "[redacted]"' \
        --arg src email-platform --arg m POST --slurpfile want "$D/test-event.json" --rawfile raw "$D/test-event.json"
    # The platform re-sends until it gets a 2xx: the same id must not be queued twice.
    send
    [ "$(answer 1)" = "{\"id\":\"$id\",\"status\":\"duplicate\"}" ] || fail "re-send not a duplicate of $id: $(answer 1)"
    [ "$(stored_count)" = 1 ] || fail "expected 1 stored event"
    refused 401 -X POST "$BASE_URL/hooks/email-platform" -H 'Content-Type: application/json' -H 'X-Api-Key: wrong' --data-binary "@$D/test-event.json"
    stop
}

run_ontraport() {
    start ontraport
    D=$ROOT/examples/ontraport
    send all
    expect "$(id_of 1)" "$common"' and .payload == {"First_Name": "Daniel", "Email": "dgolden@mid-corp.com"} and .body == $raw and .query == "token=[redacted]" and .content_type == "application/x-www-form-urlencoded"' \
        --arg src ontraport --arg m POST --rawfile raw "$D/contact.txt"
    expect "$(id_of 2)" "$common"' and .payload == {"Api-Appid": "1_111111_111111111", "Api-Key": "22222222222222", "id": "0", "data": "Note inserted by webhook using new API.", "author": "1", "contact_id": "12345"} and .body == $raw and .query == "token=[redacted]"' \
        --arg src ontraport --arg m POST --rawfile raw "$D/note.txt"
    refused 401 -X POST "$BASE_URL/hooks/ontraport?token=wrong" -H 'Content-Type: application/x-www-form-urlencoded' --data-binary "@$D/contact.txt"
    refused 401 -X POST "$BASE_URL/hooks/ontraport" -H 'Content-Type: application/x-www-form-urlencoded' --data-binary "@$D/contact.txt"
    stop
}

run_leadliaison() {
    start leadliaison
    D=$ROOT/examples/leadliaison
    send all
    lead='{"first_name": "Daniel", "last_name": "Golden", "email": "dgolden@mid-corp.com", "company": "MidSize Corp"}'
    for n in 1 2 3 4; do
        answer $n | jq -e --arg id "$(id_of $n)" '. == {"id": $id, "status": "accepted", "email": "dgolden@mid-corp.com"}' >/dev/null ||
            fail "answer $n is not the response template: $(answer $n)"
    done
    expect "$(id_of 1)" "$common"' and .payload == '"$lead"' and .body == $raw and .query == "token=[redacted]"' \
        --arg src leadliaison --arg m POST --rawfile raw "$D/form.txt"
    expect "$(id_of 2)" "$common"' and .payload == $want[0] and .payload == '"$lead"' and .body == $raw' \
        --arg src leadliaison --arg m POST --slurpfile want "$D/lead.json" --rawfile raw "$D/lead.json"
    expect "$(id_of 3)" "$common"' and .payload == {"lead": '"$lead"'} and .body == $raw and .content_type == "application/xml"' \
        --arg src leadliaison-xml --arg m POST --rawfile raw "$D/lead.xml"
    expect "$(id_of 4)" "$common"' and .payload == '"$lead"' and (.query | startswith("token=[redacted]&first_name=Daniel&"))' \
        --arg src leadliaison --arg m GET
    refused 401 "$BASE_URL/hooks/leadliaison?token=wrong&email=a%40b.c"
    refused 401 -X POST "$BASE_URL/hooks/leadliaison-xml" -H 'Content-Type: application/xml' --data-binary "@$D/lead.xml"
    stop
}

[ -x "$BIN" ] || { echo "no binary at $BIN; run cargo build first" >&2; exit 1; }
[ $# -gt 0 ] || set -- netresults email-platform ontraport leadliaison
for ex in "$@"; do
    case "$ex" in
        netresults) run_netresults ;;
        email-platform) run_email_platform ;;
        ontraport) run_ontraport ;;
        leadliaison) run_leadliaison ;;
        *) echo "unknown example: $ex" >&2; exit 2 ;;
    esac
done
echo "OK: $*"
