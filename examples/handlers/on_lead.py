#!/usr/bin/env python3
"""A hooktrail shell handler in Python to copy: import a form lead, once per event.

Configure it like this (see hooktrail.toml in this directory):

    [handlers.import_lead_py]
    type = "shell"
    command = ["/usr/local/bin/on_lead.py", "--out", "/var/lib/leads/leads.tsv"]
    stdin = "json"
    env = { EMAIL = "/submission_values/email_address/0", FIRST_NAME = "/submission_values/first_name/0" }
    permanent_exit_codes = [65]

hooktrail runs this file directly (no shell). It gives it the payload on stdin
(stdin = "json": the normalized JSON), the same JSON in the file named by
HOOKTRAIL_PAYLOAD_FILE, the HOOKTRAIL_* variables (EVENT_ID, SOURCE, HANDLER,
ATTEMPT, RECEIVED_AT, CONTENT_TYPE) and the `env` mappings (unset when the
payload lacks the value).

Exit codes are the contract: 0 = done; 65 (in permanent_exit_codes) = this
event can never succeed, no retry; anything else (75 below, an uncaught
exception's 1, a signal, a timeout) = hooktrail retries with backoff.
Everything printed is kept with the attempt (first 64 KiB).
"""

import argparse
import json
import os
import sys

EX_OK = 0
EX_PERMANENT = 65  # EX_DATAERR: listed in permanent_exit_codes
EX_RETRY = 75  # EX_TEMPFAIL: any code not listed there is retried


def main() -> int:
    parser = argparse.ArgumentParser(description="Import a lead from a hooktrail event.")
    parser.add_argument("--out", default="./leads.tsv", help="TSV ledger of imported leads")
    args = parser.parse_args()

    event_id = os.environ["HOOKTRAIL_EVENT_ID"]
    attempt = int(os.environ["HOOKTRAIL_ATTEMPT"])
    try:
        payload = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        # stdin = "json" is always valid JSON; with "raw", a sender may send anything.
        print(f"payload is not JSON: {e}", file=sys.stderr)
        return EX_PERMANENT
    # The same document is in HOOKTRAIL_PAYLOAD_FILE, for tools that want a path.
    form_id = payload.get("form_id", "-") if isinstance(payload, dict) else "-"
    print(f"event {event_id} from {os.environ['HOOKTRAIL_SOURCE']}, attempt {attempt}, form {form_id}")

    email = os.environ.get("EMAIL", "")
    if not email:
        print(f"no email in event {event_id}; not importable", file=sys.stderr)
        return EX_PERMANENT

    # Delivery is at-least-once (a crash or a replay runs it again): be idempotent.
    try:
        with open(args.out, encoding="utf-8") as f:
            if any(line.split("\t", 1)[0] == event_id for line in f):
                print("already imported; nothing to do")
                return EX_OK
    except FileNotFoundError:
        pass

    row = "\t".join([event_id, email, os.environ.get("FIRST_NAME", ""), os.environ["HOOKTRAIL_RECEIVED_AT"]])
    try:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(row + "\n")
    except OSError as e:
        print(f"cannot write {args.out}: {e}; will be retried", file=sys.stderr)
        return EX_RETRY
    print(f"imported {email}")
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
