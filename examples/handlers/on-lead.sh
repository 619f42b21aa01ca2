#!/bin/sh
# A hooktrail shell handler to copy: import a form lead, once per event.
#
# Configure it like this (see hooktrail.toml in this directory):
#
#   [handlers.import_lead]
#   type = "shell"
#   command = ["/usr/local/bin/on-lead.sh", "--out", "/var/lib/leads/leads.tsv"]
#   stdin = "json"
#   env = { EMAIL = "/submission_values/email_address/0", FIRST_NAME = "/submission_values/first_name/0" }
#   permanent_exit_codes = [65]
#
# What hooktrail gives this script (README.md, "Shell handler"):
#   stdin                   the payload (stdin = "json": normalized JSON; "raw": the body
#                           as received; "envelope": id, source, headers, query, payload)
#   HOOKTRAIL_PAYLOAD_FILE  a file holding the normalized JSON (deleted after the attempt)
#   HOOKTRAIL_EVENT_ID      evt_…, stable across retries and replays: use it to deduplicate
#   HOOKTRAIL_SOURCE, HOOKTRAIL_HANDLER, HOOKTRAIL_RECEIVED_AT, HOOKTRAIL_CONTENT_TYPE
#   HOOKTRAIL_ATTEMPT       1 on the first attempt, then 2, 3, …
#   EMAIL, FIRST_NAME       from the `env` mapping; unset when the payload lacks them
#
# Exit codes are the contract:
#   0   done: the delivery succeeded
#   65  this event can never succeed (listed in permanent_exit_codes): failed, no retry
#   any other code, a signal or a timeout: hooktrail retries with backoff
# Everything printed (stdout and stderr, first 64 KiB) is kept with the attempt, so
# say why you failed.
#
# Payload values are data. They arrive only through stdin, the environment and the
# payload file; never paste one into `eval`, `sh -c` or an unquoted expansion.
set -u

out=./leads.tsv
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        *) echo "usage: on-lead.sh [--out FILE]" >&2; exit 64 ;;
    esac
done

# Read the whole payload even if unused, so hooktrail's write to stdin completes.
payload=$(cat)
bytes=$(printf '%s' "$payload" | wc -c)
echo "event $HOOKTRAIL_EVENT_ID from $HOOKTRAIL_SOURCE, attempt $HOOKTRAIL_ATTEMPT, $bytes bytes of $HOOKTRAIL_CONTENT_TYPE"

# A lead without an email will never import: fail for good instead of retrying.
if [ -z "${EMAIL:-}" ]; then
    echo "no email in event $HOOKTRAIL_EVENT_ID; not importable" >&2
    exit 65
fi

# Delivery is at-least-once (a crash or a replay runs it again): make it idempotent.
if [ -f "$out" ] && grep -q "^$HOOKTRAIL_EVENT_ID	" "$out"; then
    echo "already imported; nothing to do"
    exit 0
fi

# One short append per event. A failure here (disk full, permissions) is temporary:
# exit with a code that is not in permanent_exit_codes, and hooktrail retries.
if ! printf '%s\t%s\t%s\t%s\n' "$HOOKTRAIL_EVENT_ID" "$EMAIL" "${FIRST_NAME:-}" "$HOOKTRAIL_RECEIVED_AT" >> "$out"; then
    echo "cannot write $out; will be retried" >&2
    exit 75
fi
echo "imported $EMAIL"
exit 0
