//! The processor through the real binary (issue 4): real shell handlers as
//! child processes, asserting on `events show --json` (deliveries, attempts)
//! and on what the handler itself saw and did.
//!
//! Proven here: every shell exit-code path, timeout killing the whole process
//! group, no shell interpolation of payload values, stdin modes and the
//! `HOOKTRAIL_*` environment with pointer mappings and hidden secrets, replay
//! (single and bulk), routes with and without `match`, a `kill -9` mid-handler
//! followed by a restart, `--role ingest` + `--role process` on one database,
//! graceful stop with grace period and release, `stats`/`prune`/`export`, and
//! the copyable handlers in `examples/handlers/`. Issue 11: a hostile
//! `Retry-After`, bulk replay that must name what it replays, and what a
//! `kill -9` leaves (handler process groups, payload files) cleared at the
//! next start.
//! The HTTP forward handler is in `tests/process_http.rs`.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Fast processor and retry settings (2 attempts), plus `processor` keys.
fn fast(processor: &str) -> String {
    fast_retries(2, "200ms", processor)
}

/// A scratch directory for handler scripts and what they write.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Self {
        Work { dir: tempfile::Builder::new().prefix("hooktrail-work-").tempdir().expect("creating a work dir") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("reading {name} written by a handler: {e}"))
    }

    fn read_string(&self, name: &str) -> String {
        String::from_utf8(self.read(name)).expect("handler output is UTF-8")
    }

    /// A `[handlers.NAME]` table for a shell handler running `body` as a
    /// `/bin/sh` script whose `$W` is this work dir. `extra` adds TOML keys.
    fn shell(&self, name: &str, body: &str, extra: &str) -> String {
        let script = self.path(&format!("{name}.sh"));
        std::fs::write(&script, format!("#!/bin/sh\nW=\"$1\"\n{body}\n")).expect("writing a handler script");
        format!(
            "[handlers.{name}]\ntype = \"shell\"\ncommand = [\"/bin/sh\", {}, {}]\n{extra}\n",
            toml_str(&script.to_string_lossy()),
            toml_str(&self.dir.path().to_string_lossy()),
        )
    }
}

/// Source `leads` routed to a shell handler `import` (timeout 2 s, lease 2 s)
/// that, unless `done` holds, runs `first`, writes its pid to `blocked.pid`
/// and blocks; once `done` holds it prints `then` and succeeds.
fn blocking_import(w: &Work, done: &str, then: &str, first: &str, extra: &str) -> String {
    let script = format!(
        "if {done}; then echo \"{then}\"; exit 0; fi\n{first}\necho $$ > \"$W/blocked.tmp\" && mv \"$W/blocked.tmp\" \"$W/blocked.pid\"\nexec sleep 600"
    );
    [
        fast("lease = \"2s\"").as_str(),
        &open_source("leads"),
        &w.shell("import", &script, &format!("timeout = \"2s\"\n{extra}")),
        &route("leads", "import"),
    ]
    .concat()
}

/// Polls `events show` until `done(event)` holds; returns that event JSON.
fn wait_event(env: &TestEnv, id: &str, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(timeout, || {
        last = env.show(id);
        done(&last)
    });
    assert!(ok, "timed out after {timeout:?} waiting for {what} of {id}; last seen:\n{last:#}\ndaemon log:\n{}", env.log());
    last
}

fn handlers_of(ev: &Value) -> BTreeSet<String> {
    ev["deliveries"]
        .as_array()
        .expect("deliveries array")
        .iter()
        .map(|d| d["handler"].as_str().expect("handler name").to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Whether a process is gone. A killed orphan whose init does not reap it
/// (some containers) stays a zombie: dead, holding only its pid.
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses: "pid (comm) S …".
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state == "Z"),
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
}

/// SIGKILLs a process a test's handler left behind (the daemon that ran it was kill -9'd).
fn kill_leftover(pid: i32) {
    // SAFETY: kill(2) only sends a signal; a pid that already exited fails with ESRCH.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Parses `/proc/PID/environ` bytes (NUL-separated `K=V`).
fn environ(bytes: &[u8]) -> std::collections::BTreeMap<String, String> {
    bytes
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn shell_exit_codes_decide_success_permanent_failure_and_retry() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell("ok", r#"echo "stdout says hello on attempt $HOOKTRAIL_ATTEMPT"; echo "stderr says hi" >&2; exit 0"#, ""),
        &w.shell("perm", r#"echo "this lead can never be imported" >&2; exit 3"#, "permanent_exit_codes = [3, 4]"),
        &w.shell("flaky", r#"echo "try $HOOKTRAIL_ATTEMPT"; echo "upstream down" >&2; exit 1"#, "permanent_exit_codes = [3]"),
        &route("leads", "ok"),
        &route("leads", "perm"),
        &route("leads", "flaky"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"email":"a@b.c"}"#).id();
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "failed", "some delivery failed, so the event did: {ev:#}");

    let ok = delivery(&ev, "ok");
    assert_eq!(ok["status"], "succeeded");
    let a = attempts(ok);
    assert_eq!(a.len(), 1, "{ok:#}");
    assert_eq!(a[0]["number"], 1);
    assert_eq!(a[0]["outcome"], "success");
    assert_eq!(a[0]["exit_code"], 0);
    assert!(a[0]["error"].is_null(), "{ok:#}");
    let out = a[0]["output"].as_str().expect("output");
    assert!(out.contains("stdout says hello on attempt 1"), "stdout captured: {out:?}");
    assert!(out.contains("stderr says hi"), "stderr captured: {out:?}");

    let perm = delivery(&ev, "perm");
    assert_eq!(perm["status"], "failed");
    let a = attempts(perm);
    assert_eq!(a.len(), 1, "a permanent exit code is not retried: {perm:#}");
    assert_eq!(a[0]["outcome"], "failure");
    assert_eq!(a[0]["exit_code"], 3);
    assert!(a[0]["error"].as_str().is_some_and(|e| e.contains("permanent_exit_codes")), "{perm:#}");
    assert!(a[0]["output"].as_str().is_some_and(|o| o.contains("this lead can never be imported")), "{perm:#}");

    let flaky = delivery(&ev, "flaky");
    assert_eq!(flaky["status"], "failed");
    let a = attempts(flaky);
    assert_eq!(a.len(), 2, "retried once, then max_attempts = 2 reached: {flaky:#}");
    for (i, at) in a.iter().enumerate() {
        let n = i + 1;
        assert_eq!(at["number"], n);
        assert_eq!(at["outcome"], if n == 2 { "failure" } else { "retry" }, "the attempt that ends the delivery reads failure");
        assert_eq!(at["exit_code"], 1);
        let out = at["output"].as_str().expect("output");
        assert!(out.contains(&format!("try {n}")) && out.contains("upstream down"), "attempt {n} output: {out:?}");
    }
    assert!(a[1]["error"].as_str().is_some_and(|e| e.contains("max_attempts")), "the last attempt says why it gave up: {flaky:#}");
}

/// A script may print a NUL byte: the attempt is recorded (with U+FFFD in
/// its place) on every backend, and the delivery does not run again.
#[test]
fn a_nul_byte_in_handler_output_is_recorded_and_the_delivery_runs_once() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell("nul", r#"printf 'before\000after\n'; echo run >> "$W/runs"; exit 0"#, ""),
        &route("leads", "nul"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"email":"a@b.c"}"#).id();
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let a = attempts(delivery(&ev, "nul"));
    assert_eq!(a.len(), 1, "{ev:#}");
    assert_eq!(a[0]["output"].as_str().expect("output").trim_end(), "before\u{FFFD}after");
    assert_eq!(w.read_string("runs"), "run\n", "the attempt ran once");
}

#[test]
fn shell_timeout_kills_the_whole_process_group() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell(
            "slow",
            // A background grandchild, then a foreground child: both in the handler's group.
            r#"sleep 1000 &
echo $! > "$W/grandchild.tmp" && mv "$W/grandchild.tmp" "$W/grandchild.pid"
echo "started, waiting forever"
sleep 1000"#,
            "timeout = \"1s\"\nmax_attempts = 1",
        ),
        &route("leads", "slow"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"n":1}"#).id();
    let ev = wait_settled(&env, &id);
    let slow = delivery(&ev, "slow");
    assert_eq!(slow["status"], "failed", "max_attempts = 1: {slow:#}");
    let a = attempts(slow);
    assert_eq!(a.len(), 1);
    // A timeout is retryable, but with max_attempts = 1 this attempt ends the delivery.
    assert_eq!(a[0]["outcome"], "failure", "the last attempt reads failure: {slow:#}");
    assert!(a[0]["exit_code"].is_null());
    assert!(a[0]["error"].as_str().is_some_and(|e| e.contains("timed out")), "{slow:#}");
    assert!(a[0]["output"].as_str().is_some_and(|o| o.contains("started, waiting forever")), "output before the kill is kept: {slow:#}");

    let pid = read_pid(&w.path("grandchild.pid")).expect("the script recorded its grandchild's pid");
    let gone = wait_until(Duration::from_secs(10), || process_gone(pid));
    if !gone {
        kill_leftover(pid);
    }
    assert!(gone, "the background grandchild {pid} outlived the timed-out attempt");
}

#[test]
fn payload_values_reach_the_script_verbatim_and_are_never_interpreted_by_a_shell() {
    let w = Work::new();
    let wd = w.dir.path().to_string_lossy().into_owned();
    std::fs::write(w.path("keep"), "must survive").unwrap();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell(
            "careful",
            r#"cat > "$W/stdin.bin"
cp "$HOOKTRAIL_PAYLOAD_FILE" "$W/payload.json"
printf '%s' "$NAME" > "$W/env-NAME"
printf '%s' "$NICK" > "$W/env-NICK"
printf '%s' "$NOTE" > "$W/env-NOTE"
printf '%s' "$QUOTE" > "$W/env-QUOTE""#,
            "stdin = \"raw\"\nenv = { NAME = \"/name\", NICK = \"/nick\", NOTE = \"/note\", QUOTE = \"/q/0\" }",
        ),
        &route("leads", "careful"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let name = format!("$(touch {wd}/pwned-dollar)");
    let nick = format!("`touch {wd}/pwned-backtick`");
    let note = format!("x; rm -f {wd}/keep; touch {wd}/pwned-semicolon");
    let quote = format!("'\"; touch {wd}/pwned-quote; echo \"' && touch {wd}/pwned-and | touch {wd}/pwned-pipe\n$((1+1))");
    let payload = json!({"name": name, "nick": nick, "note": note, "q": [quote]});
    let body = serde_json::to_vec_pretty(&payload).unwrap();
    let id = d.post("/hooks/leads", "application/json", body.clone()).id();
    let ev = wait_settled(&env, &id);
    assert_eq!(delivery(&ev, "careful")["status"], "succeeded", "{ev:#}");

    for marker in ["pwned-dollar", "pwned-backtick", "pwned-semicolon", "pwned-quote", "pwned-and", "pwned-pipe"] {
        assert!(!w.path(marker).exists(), "a payload value was run by a shell: {marker} exists");
    }
    assert!(w.path("keep").exists(), "a payload value was run by a shell: `rm` removed the keep file");
    assert_eq!(w.read("stdin.bin"), body, "stdin = raw delivers the exact bytes received");
    assert_eq!(w.read_string("payload.json"), payload.to_string(), "HOOKTRAIL_PAYLOAD_FILE holds the normalized JSON");
    assert_eq!(w.read_string("env-NAME"), name);
    assert_eq!(w.read_string("env-NICK"), nick);
    assert_eq!(w.read_string("env-NOTE"), note);
    assert_eq!(w.read_string("env-QUOTE"), quote);
}

/// The normalized JSON the script gets on stdin and in its payload file is
/// the payload printed compact with its keys sorted, whatever the body's
/// kind: a JSON body (printed from its parsed value) or a form or XML body
/// (the text stored at receive time, handed over as it is): unicode,
/// escapes and key order as printing gives them, byte for byte.
#[test]
fn the_normalized_payload_reaches_stdin_and_the_file_as_its_compact_sorted_print_for_json_form_and_xml_bodies() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell(
            "dump",
            r#"cat > "$W/$HOOKTRAIL_EVENT_ID.stdin"
cp "$HOOKTRAIL_PAYLOAD_FILE" "$W/$HOOKTRAIL_EVENT_ID.file""#,
            "stdin = \"json\"",
        ),
        &route("leads", "dump"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let json_body = r#"{
  "zeta": "caf\u00e9 \ud83d\ude00 \/ \" \\ \n \u001F \u007f",
  "alpha": [1.5e3, -0.25, 18446744073709551615, -9223372036854775808, true, null],
  "mid": {"b": "ümläut 日本", "a": {}}
}"#;
    let form_body =
        "zeta=caf%C3%A9+%F0%9F%98%80&alpha=%22quoted%22+back%5Cslash&mid=line%0Abreak%01&alpha=second&b%C3%A9=%E6%97%A5%E6%9C%AC";
    let xml_body = r#"<lead><zeta>café &amp; &lt;tag&gt; "q" \</zeta><alpha n="1">日本</alpha></lead>"#;
    let ids = [
        d.post("/hooks/leads", "application/json", json_body).id(),
        d.post("/hooks/leads", "application/x-www-form-urlencoded", form_body).id(),
        d.post("/hooks/leads", "application/xml", xml_body).id(),
    ];
    for id in &ids {
        let ev = wait_settled(&env, id);
        assert_eq!(delivery(&ev, "dump")["status"], "succeeded", "{ev:#}");
        let printed = serde_json::to_string(&ev["payload"]).expect("printing");
        assert!(printed.len() > 20, "a payload was normalized: {ev:#}");
        assert_eq!(w.read_string(&format!("{id}.stdin")), printed, "stdin: the payload printed compact, keys sorted: {ev:#}");
        assert_eq!(w.read_string(&format!("{id}.file")), printed, "the payload file: the same bytes: {ev:#}");
    }
    let json_seen = w.read_string(&format!("{}.stdin", ids[0]));
    let want = r#"{"alpha":[1500.0,-0.25,18446744073709551615,-9223372036854775808,true,null],"mid":{"a":{},"b":"ümläut 日本"},"zeta":"café 😀 / \" \\ \n \u001f "#;
    assert_eq!(json_seen, format!("{want}\u{7f}\"}}"), "escapes, unicode and key order as printing writes them");
    let form_seen = w.read_string(&format!("{}.stdin", ids[1]));
    assert!(form_seen.starts_with(r#"{"alpha":["\"quoted\" back\\slash","second"],"bé":"#), "{form_seen}");
}

#[test]
fn shell_stdin_modes_environment_and_pointer_mappings_and_no_daemon_secrets() {
    let w = Work::new();
    // Each handler dumps its stdin, its exact environment and its payload file.
    let dump = r#"mkdir -p "$W/$HOOKTRAIL_HANDLER"
cat > "$W/$HOOKTRAIL_HANDLER/stdin"
cat /proc/$$/environ > "$W/$HOOKTRAIL_HANDLER/environ"
cp "$HOOKTRAIL_PAYLOAD_FILE" "$W/$HOOKTRAIL_HANDLER/payload""#;
    let mapping = r#"env = { EMAIL = "/submission_values/email_address/0", FIRST = "/submission_values/first_name", FORM = "/form_id", MISSING_FIELD = "/no/such/field" }"#;
    let config = [
        fast("").as_str(),
        "[sources.netresults]\nauth = { type = \"header_token\", header = \"X-Webhook-Token\", secret_env = \"NR_TOKEN\" }\n",
        &w.shell("in_json", dump, &format!("stdin = \"json\"\n{mapping}")),
        &w.shell("in_raw", dump, "stdin = \"raw\""),
        &w.shell("in_envelope", dump, "stdin = \"envelope\""),
        &w.shell("in_none", dump, "stdin = \"none\""),
        // Configured only so that its `${FWD_TOKEN}` makes FWD_TOKEN a daemon secret.
        "[handlers.unused_forward]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/never\"\nheaders = { Authorization = \"Bearer ${FWD_TOKEN}\" }\n",
        &route("netresults", "in_json"),
        &route("netresults", "in_raw"),
        &route("netresults", "in_envelope"),
        &route("netresults", "in_none"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env
        .daemon()
        .env("NR_TOKEN", "nr-secret-token-value")
        .env("FWD_TOKEN", "fwd-secret-token-value")
        .env("MISSING_FIELD", "inherited-from-the-daemon")
        .start();
    let id = d
        .request("POST", "/hooks/netresults?campaign=spring")
        .header("content-type", "application/json")
        .header("x-webhook-token", "nr-secret-token-value")
        .body(seeds::NETRESULTS_FORM)
        .send()
        .id();
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let payload: Value = serde_json::from_str(seeds::NETRESULTS_FORM).unwrap();
    assert_eq!(ev["payload"], payload);

    // stdin per mode.
    assert_eq!(w.read_string("in_json/stdin"), payload.to_string(), "json: the normalized payload");
    assert_eq!(w.read_string("in_raw/stdin"), seeds::NETRESULTS_FORM, "raw: the body bytes as received");
    assert!(w.read("in_none/stdin").is_empty(), "none: nothing on stdin");
    let envelope: Value = serde_json::from_slice(&w.read("in_envelope/stdin")).expect("envelope is JSON");
    let keys: BTreeSet<&str> = envelope.as_object().expect("envelope object").keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["id", "source", "received_at", "content_type", "headers", "query", "payload"]));
    assert_eq!(envelope["id"], id.as_str());
    assert_eq!(envelope["source"], "netresults");
    assert_eq!(envelope["received_at"], ev["received_at"]);
    assert_eq!(envelope["content_type"], "application/json");
    assert_eq!(envelope["query"], "campaign=spring");
    assert_eq!(envelope["headers"], ev["headers"], "the stored (redacted) headers");
    assert!(!envelope.to_string().contains("nr-secret-token-value"), "the auth token is redacted in the envelope");
    assert_eq!(envelope["payload"], payload);

    for handler in ["in_json", "in_raw", "in_envelope", "in_none"] {
        let vars = environ(&w.read(&format!("{handler}/environ")));
        let get = |k: &str| vars.get(k).map(String::as_str);
        assert_eq!(get("HOOKTRAIL_EVENT_ID"), Some(id.as_str()), "{handler}");
        assert_eq!(get("HOOKTRAIL_SOURCE"), Some("netresults"), "{handler}");
        assert_eq!(get("HOOKTRAIL_HANDLER"), Some(handler));
        assert_eq!(get("HOOKTRAIL_ATTEMPT"), Some("1"), "{handler}: attempts are 1-based");
        assert_eq!(get("HOOKTRAIL_RECEIVED_AT"), ev["received_at"].as_str(), "{handler}");
        assert_eq!(get("HOOKTRAIL_CONTENT_TYPE"), Some("application/json"), "{handler}");
        let file = get("HOOKTRAIL_PAYLOAD_FILE").unwrap_or_else(|| panic!("{handler}: no HOOKTRAIL_PAYLOAD_FILE"));
        assert_eq!(
            w.read_string(&format!("{handler}/payload")),
            payload.to_string(),
            "{handler}: the payload file holds the normalized JSON"
        );
        assert!(!Path::new(file).exists(), "{handler}: the payload file {file} is removed after the attempt");
        assert!(!vars.contains_key("NR_TOKEN"), "{handler}: a source secret_env leaked into the handler");
        assert!(!vars.contains_key("FWD_TOKEN"), "{handler}: a ${{VAR}} header secret leaked into the handler");
        for (k, v) in &vars {
            assert!(!v.contains("secret-token-value"), "{handler}: {k} carries a daemon secret");
        }
    }
    let vars = environ(&w.read("in_json/environ"));
    assert_eq!(vars.get("EMAIL").map(String::as_str), Some("dgolden@mid-corp.com"), "a string pointer maps to its text");
    assert_eq!(vars.get("FIRST").map(String::as_str), Some(r#"["Daniel"]"#), "a non-string maps to its JSON text");
    assert_eq!(vars.get("FORM").map(String::as_str), Some("1c051a75-f78c-4961-b8d5-b233229ae125"));
    assert!(!vars.contains_key("MISSING_FIELD"), "a pointer that does not resolve leaves the variable unset, even if the daemon had it");
    let raw_vars = environ(&w.read("in_raw/environ"));
    assert!(!raw_vars.contains_key("EMAIL"), "mappings are per handler");
}

#[test]
fn large_stdin_reaches_a_reader_whole_a_non_reader_does_not_hang_and_output_keeps_its_order() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("bulk"),
        // Reads all of stdin, well past what a pipe holds (64 KiB).
        &w.shell("reader", r#"cat > "$W/stdin.json""#, "stdin = \"raw\""),
        // Never reads stdin and exits at once: the rest of the payload must
        // not block anything.
        &w.shell("ignorer", "exit 0", "stdin = \"raw\""),
        // stdout and stderr, interleaved.
        &w.shell("talker", "echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2", "stdin = \"none\""),
        &route("bulk", "reader"),
        &route("bulk", "ignorer"),
        &route("bulk", "talker"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let big = format!(r#"{{"notes":"{}"}}"#, "0123456789abcdef".repeat(20_000));
    assert!(big.len() > 300_000);
    let id = d.post_json("/hooks/bulk", &big).id();
    let ev = wait_settled(&env, &id);
    for h in ["reader", "ignorer", "talker"] {
        assert_eq!(delivery(&ev, h)["status"], "succeeded", "{h}: {ev:#}");
    }
    assert_eq!(w.read("stdin.json"), big.as_bytes(), "the whole body reached the reader's stdin");
    let talk = attempts(delivery(&ev, "talker"))[0]["output"].as_str().unwrap_or_default().to_string();
    assert_eq!(talk, "out-1\nerr-1\nout-2\nerr-2\n", "stdout and stderr are kept in the order written");
    drop(d);
}

#[test]
fn replay_reruns_failed_deliveries_keeping_history_and_bulk_replay_selects_by_source() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("a"),
        &open_source("b"),
        &open_source("c"),
        &w.shell(
            "picky",
            r#"if [ -e "$W/fixed" ]; then echo "imported"; exit 0; fi; echo "CRM says no" >&2; exit 3"#,
            "permanent_exit_codes = [3]",
        ),
        &w.shell("flaky", r#"echo "attempt $HOOKTRAIL_ATTEMPT"; exit 1"#, ""),
        &route("a", "picky"),
        &route("b", "picky"),
        &route("c", "flaky"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let ea = d.post_json("/hooks/a", r#"{"n":"a1"}"#).id();
    let eb = d.post_json("/hooks/b", r#"{"n":"b1"}"#).id();
    let ec = d.post_json("/hooks/a", r#"{"n":"a2"}"#).id();
    let ef = d.post_json("/hooks/c", r#"{"n":"c1"}"#).id();
    for id in [&ea, &eb, &ec, &ef] {
        assert_eq!(wait_settled(&env, id)["status"], "failed");
    }
    assert_eq!(attempts(delivery(&env.show(&ef), "flaky")).len(), 2);

    // By id, still broken: runs again, the attempt count continues.
    let out = env.cli(&["events", "replay", &ea]);
    assert_eq!(out.code, 0, "{out:?}");
    let ev =
        wait_event(&env, &ea, "the replayed attempt", SETTLE, |ev| ev["status"] == "failed" && attempts(delivery(ev, "picky")).len() == 2);
    let a = attempts(delivery(&ev, "picky"));
    assert_eq!((a[0]["number"].clone(), a[1]["number"].clone()), (json!(1), json!(2)));
    assert!(a.iter().all(|x| x["outcome"] == "failure" && x["exit_code"] == 3), "{ev:#}");

    // An exhausted delivery gets a fresh max_attempts budget on replay: two more attempts.
    let out = env.cli(&["events", "replay", &ef]);
    assert_eq!(out.code, 0, "{out:?}");
    let ev =
        wait_event(&env, &ef, "two more attempts", SETTLE, |ev| ev["status"] == "failed" && attempts(delivery(ev, "flaky")).len() == 4);
    let a = attempts(delivery(&ev, "flaky"));
    let numbers: Vec<u64> = a.iter().map(|x| x["number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1, 2, 3, 4], "history kept, numbers continue: {ev:#}");
    assert!(a[3]["output"].as_str().is_some_and(|o| o.contains("attempt 4")), "HOOKTRAIL_ATTEMPT continues too: {ev:#}");

    // Bulk: only failed events of source `a`.
    std::fs::write(w.path("fixed"), "").unwrap();
    let out = env.cli(&["events", "replay", "--status", "failed", "--source", "a"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("re-queued 2 deliveries of 2 event(s)"), "{out:?}");
    for (id, n) in [(&ea, 3), (&ec, 2)] {
        let ev = wait_settled(&env, id);
        assert_eq!(ev["status"], "done", "{ev:#}");
        let a = attempts(delivery(&ev, "picky"));
        assert_eq!(a.len(), n, "{ev:#}");
        assert!(a[..n - 1].iter().all(|x| x["outcome"] == "failure"), "earlier failures kept: {ev:#}");
        assert_eq!(a[n - 1]["outcome"], "success");
        assert_eq!(a[n - 1]["number"], n);
        assert!(a[n - 1]["output"].as_str().is_some_and(|o| o.contains("imported")));
    }
    let other = env.show(&eb);
    assert_eq!(other["status"], "failed", "source b was not selected: {other:#}");
    assert_eq!(attempts(delivery(&other, "picky")).len(), 1, "{other:#}");
}

#[test]
fn routes_with_and_without_match_decide_which_handlers_get_an_event() {
    let w = Work::new();
    let mark = r#"touch "$W/ran.$HOOKTRAIL_EVENT_ID.$HOOKTRAIL_HANDLER""#;
    let names = ["all", "eq", "exists", "absent", "one_of", "prefix", "regex", "both"];
    let mut config = vec![fast(""), open_source("leads"), open_source("orphan")];
    for n in names {
        config.push(w.shell(n, mark, ""));
    }
    config.push(
        r#"
[[routes]]
source = "leads"
handler = "all"

[[routes]]
source = "leads"
handler = "eq"
match = [{ pointer = "/form_id", equals = "F1" }]

[[routes]]
source = "leads"
handler = "exists"
match = [{ pointer = "/utm/campaign", exists = true }]

[[routes]]
source = "leads"
handler = "absent"
match = [{ pointer = "/utm", exists = false }]

[[routes]]
source = "leads"
handler = "one_of"
match = [{ pointer = "/country", in = ["US", "CA"] }]

[[routes]]
source = "leads"
handler = "prefix"
match = [{ pointer = "/email", prefix = "sales@" }]

[[routes]]
source = "leads"
handler = "regex"
match = [{ pointer = "/email", regex = '@example\.org$' }]

[[routes]]
source = "leads"
handler = "both"
match = [{ pointer = "/form_id", equals = "F1" }, { pointer = "/country", equals = "CA" }]
"#
        .to_string(),
    );
    let env = TestEnv::new(&config.concat());
    let d = env.start();
    let cases = [
        (
            json!({"form_id": "F1", "country": "CA", "email": "sales@example.org", "utm": {"campaign": "spring"}}),
            set(&["all", "eq", "exists", "one_of", "prefix", "regex", "both"]),
        ),
        (json!({"form_id": "F2", "country": "DE", "email": "bob@example.com"}), set(&["all", "absent"])),
        (json!({"form_id": "F1", "country": "US", "email": "ceo@example.org", "utm": {}}), set(&["all", "eq", "one_of", "regex"])),
    ];
    let ids: Vec<String> = cases.iter().map(|(p, _)| d.post_json("/hooks/leads", &p.to_string()).id()).collect();
    for (id, (payload, want)) in ids.iter().zip(&cases) {
        let ev = wait_settled(&env, id);
        assert_eq!(ev["status"], "done", "{ev:#}");
        assert_eq!(&handlers_of(&ev), want, "deliveries for {payload}");
        for n in names {
            let ran = w.path(&format!("ran.{id}.{n}")).exists();
            assert_eq!(ran, want.contains(n), "handler `{n}` ran = {ran} for {payload}");
        }
        assert!(ev["deliveries"].as_array().unwrap().iter().all(|d| d["status"] == "succeeded"), "{ev:#}");
    }

    let id = d.post_json("/hooks/orphan", r#"{"form_id":"F1"}"#).id();
    let ev = env.show(&id);
    assert_eq!(ev["status"], "done", "an event no route selects is done at once: {ev:#}");
    assert_eq!(ev["deliveries"], json!([]));
}

#[test]
fn kill9_while_a_handler_runs_then_restart_runs_the_delivery_again() {
    let w = Work::new();
    let config = blocking_import(&w, r#"[ -e "$W/first-run" ]"#, "second run completes", "touch \"$W/first-run\"", "");
    let env = TestEnv::new(&config);
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"email":"a@b.c"}"#).id();
    let pid_file = w.path("blocked.pid");
    wait_for("the handler to start", SETTLE, || pid_file.exists());
    // Its begun mark (`Store::started`) is committed lazily; on PostgreSQL
    // kill the daemon only once it is, so the attempt counts as begun, not
    // merely claimed (SQLite's lands with the writer's next commit, in time).
    if let Some(db) = env.postgres() {
        wait_for("the attempt's begun mark", SETTLE, || {
            db.scalar("SELECT bool_and(NOT held) FROM deliveries WHERE status = 'running'").as_deref() == Some("true")
        });
    }
    d.kill9();
    // The handler's own process group outlives a SIGKILLed daemon; end it.
    let blocked = read_pid(&pid_file).expect("handler pid");
    kill_leftover(blocked);
    let ev = env.show(&id);
    assert_eq!(delivery(&ev, "import")["status"], "running", "the delivery was mid-attempt: {ev:#}");

    let _d = env.start();
    // The dead daemon no longer renews its lease (processor.lease = 2s): once it expires, the delivery runs again.
    let ev = wait_event(&env, &id, "the delivery to run again after its lease expired", SETTLE, |ev| ev["status"] == "done");
    let imp = delivery(&ev, "import");
    assert_eq!(imp["status"], "succeeded");
    let a = attempts(imp);
    assert_eq!(a.len(), 2, "the interrupted attempt stays in the history: {imp:#}");
    assert_eq!(a[0]["number"], 1);
    assert_eq!(a[0]["outcome"], "retry");
    assert!(a[0]["error"].as_str().is_some_and(|e| e.contains("lease expired")), "{imp:#}");
    assert_eq!(a[1]["number"], 2);
    assert_eq!(a[1]["outcome"], "success");
    assert!(a[1]["output"].as_str().is_some_and(|o| o.contains("second run completes")), "{imp:#}");
}

/// A `hooktrail serve --role process` (no public listener, so the harness's
/// `start` that waits for a listen address does not apply). Killed on drop.
struct ProcessRole {
    child: Child,
}

impl ProcessRole {
    fn start(env: &TestEnv) -> Self {
        let ready = env.dir().join("ready-process.json");
        let log = File::create(env.dir().join("process-role.log")).expect("creating the log");
        let mut c = env.command(&["serve", "--role", "process"]);
        c.env("HOOKTRAIL__SERVER__READY_FILE", &ready)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log);
        let mut child = c.spawn().expect("spawning hooktrail serve --role process");
        wait_for("the --role process daemon's ready file", START_TIMEOUT, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("--role process exited ({st}): {}", std::fs::read_to_string(env.dir().join("process-role.log")).unwrap_or_default());
            }
            ready.exists()
        });
        ProcessRole { child }
    }
}

impl Drop for ProcessRole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kill9_with_deliveries_held_for_a_slot_records_no_phantom_attempt_for_them() {
    let w = Work::new();
    let config = blocking_import(&w, r#"[ -e "$W/restarted" ]"#, "ran $HOOKTRAIL_EVENT_ID", "", "concurrency = 1");
    let env = TestEnv::new(&config);
    let d = env.start();
    let running = d.post_json("/hooks/leads", r#"{"n":1}"#).id();
    wait_for("the first attempt to start", SETTLE, || w.path("blocked.pid").exists());
    let held = d.post_json("/hooks/leads", r#"{"n":2}"#).id();
    wait_for("the second delivery to be claimed ahead", SETTLE, || delivery(&env.show(&held), "import")["status"] == "running");
    // Its attempt cannot begin: concurrency = 1 and the first one blocks.
    d.kill9();
    kill_leftover(read_pid(&w.path("blocked.pid")).expect("handler pid"));
    std::fs::write(w.path("restarted"), "").unwrap();

    let _d = env.start();
    let ev = wait_settled(&env, &running);
    let a = attempts(delivery(&ev, "import")).clone();
    assert_eq!(a.len(), 2, "the attempt that was running is in the history as interrupted: {ev:#}");
    assert!(a[0]["error"].as_str().is_some_and(|e| e.contains("lease expired")), "{ev:#}");
    assert_eq!(a[1]["number"], 2);

    let ev = wait_settled(&env, &held);
    let a = attempts(delivery(&ev, "import")).clone();
    assert_eq!(a.len(), 1, "the held delivery never ran before the crash, so it has no interrupted attempt: {ev:#}");
    assert_eq!(a[0]["number"], 1, "and its first run is attempt 1: {ev:#}");
    assert_eq!(a[0]["outcome"], "success");
}

#[test]
fn ingest_and_process_roles_share_one_database() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell("record", r#"echo "$PPID" > "$W/ran-by.$HOOKTRAIL_EVENT_ID""#, ""),
        &route("leads", "record"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let first = ingest.post_json("/hooks/leads", r#"{"n":1}"#).id();
    let ev = env.show(&first);
    assert_eq!(ev["status"], "pending", "an ingest-only daemon stores but does not process: {ev:#}");
    assert_eq!(attempts(delivery(&ev, "record")).len(), 0);

    let processor = ProcessRole::start(&env);
    let second = ingest.post_json("/hooks/leads", r#"{"n":2}"#).id();
    for id in [&first, &second] {
        let ev = wait_settled(&env, id);
        assert_eq!(ev["status"], "done", "{ev:#}");
        let a = attempts(delivery(&ev, "record"));
        assert_eq!((a.len(), a[0]["outcome"].as_str()), (1, Some("success")), "{ev:#}");
        let ran_by = read_pid(&w.path(&format!("ran-by.{id}"))).expect("the handler recorded its parent");
        assert_eq!(ran_by as u32, processor.child.id(), "the --role process daemon ran the handler, not the ingest one");
    }
}

#[test]
fn sigterm_lets_running_deliveries_finish_within_grace_then_releases_the_rest() {
    let w = Work::new();
    let config = [
        fast("shutdown_grace = \"5s\"").as_str(),
        &open_source("leads"),
        &w.shell(
            "stuck",
            r#"if [ -e "$W/stuck-ran" ]; then echo "ran after restart"; exit 0; fi
touch "$W/stuck-ran"
echo $$ > "$W/stuck.tmp" && mv "$W/stuck.tmp" "$W/stuck.pid"
exec sleep 600"#,
            "",
        ),
        &w.shell(
            "finishing",
            r#"touch "$W/finishing-started"
while [ ! -e "$W/go" ]; do sleep 0.05; done
echo "finished during the grace period""#,
            "",
        ),
        &route("leads", "stuck"),
        &route("leads", "finishing"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let mut d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"n":1}"#).id();
    wait_for("both handlers to start", SETTLE, || w.path("stuck.pid").exists() && w.path("finishing-started").exists());
    let stuck_pid = read_pid(&w.path("stuck.pid")).expect("pid");

    d.sigterm();
    std::fs::write(w.path("go"), "").unwrap();
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}; log:\n{}", d.log());
    let gone = wait_until(Duration::from_secs(10), || process_gone(stuck_pid));
    if !gone {
        kill_leftover(stuck_pid);
    }
    assert!(gone, "the attempt still running after the grace period was not stopped");

    let ev = env.show(&id);
    let fin = delivery(&ev, "finishing");
    assert_eq!(fin["status"], "succeeded", "it finished within the grace period: {ev:#}");
    assert!(attempts(fin)[0]["output"].as_str().is_some_and(|o| o.contains("finished during the grace period")));
    let stuck = delivery(&ev, "stuck");
    assert_eq!(stuck["status"], "pending", "released for the next start, not failed: {ev:#}");
    assert!(attempts(stuck).iter().all(|a| a["outcome"] == "retry"), "an interrupted attempt is never a failure: {ev:#}");
    let interrupted = attempts(stuck);
    assert_eq!(interrupted.len(), 1, "the interrupted attempt is in the paper trail: {ev:#}");
    assert!(
        interrupted[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("interrupted by shutdown") && e.contains("released for the next start")),
        "{ev:#}"
    );

    let _d = env.start();
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let stuck = delivery(&ev, "stuck");
    let last = attempts(stuck).last().expect("an attempt");
    assert_eq!(last["outcome"], "success");
    assert!(last["output"].as_str().is_some_and(|o| o.contains("ran after restart")), "{ev:#}");
}

/// README "Leases, crashes and stopping": up to three times `concurrency`
/// deliveries wait claimed ahead, so a slot that frees up during a claim's
/// round trip still finds one; no more than that are held.
#[test]
fn three_rounds_per_slot_are_claimed_ahead_and_no_more() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &w.shell(
            "slow",
            r#"echo "$HOOKTRAIL_EVENT_ID" >> "$W/started"
i=0; while [ ! -e "$W/go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"#,
            "concurrency = 1",
        ),
        &route("leads", "slow"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let ids: Vec<String> = (0..6).map(|n| d.post_json("/hooks/leads", &format!(r#"{{"n":{n}}}"#)).id()).collect();
    let held = || ids.iter().filter(|id| delivery(&env.show(id), "slow")["status"] == "running").count();
    // One runs; at least two more wait for its slot (before, only one did).
    wait_for("one attempt to run and at least two more deliveries to be held for its slot", SETTLE, || held() >= 3);
    let started = w.read_string("started");
    assert_eq!(started.lines().count(), 1, "concurrency = 1: one attempt at a time; started: {started}");
    let n = held();
    assert!(n <= 4, "at most one running and three waiting are held; held {n}");
    for id in &ids {
        let ev = env.show(id);
        let del = delivery(&ev, "slow");
        assert!(del["status"] == "running" || del["status"] == "pending", "nothing finished before go: {ev:#}");
        if !started.contains(id.as_str()) {
            assert!(attempts(del).is_empty(), "a delivery held for the slot has no attempt yet: {ev:#}");
        }
    }

    std::fs::write(w.path("go"), "").unwrap();
    for id in &ids {
        let ev = wait_settled(&env, id);
        assert_eq!(ev["status"], "done", "{ev:#}");
        assert_eq!(attempts(delivery(&ev, "slow")).len(), 1, "each ran once: {ev:#}");
    }
}

#[test]
fn deliveries_claimed_ahead_wait_for_a_slot_and_are_released_unstarted_on_shutdown() {
    let w = Work::new();
    let config = [
        fast("shutdown_grace = \"10s\"").as_str(),
        &open_source("leads"),
        &w.shell(
            "slow",
            r#"echo "$HOOKTRAIL_EVENT_ID" >> "$W/started"
i=0; while [ ! -e "$W/go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
echo "done $HOOKTRAIL_EVENT_ID""#,
            "concurrency = 1",
        ),
        &route("leads", "slow"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let mut d = env.start();
    let ids: Vec<String> = (0..2).map(|n| d.post_json("/hooks/leads", &format!(r#"{{"n":{n}}}"#)).id()).collect();
    // One runs; the other is claimed ahead (held with a lease, up to three
    // times `concurrency` of them) and waits for the handler's only slot.
    wait_for("one attempt to start and one more delivery to be held", SETTLE, || {
        ids.iter().all(|id| delivery(&env.show(id), "slow")["status"] == "running")
    });
    let started = w.read_string("started");
    assert_eq!(started.lines().count(), 1, "concurrency = 1: one attempt at a time; started: {started}");
    let first = started.trim().to_string();

    d.sigterm();
    // The running attempt may end only once shutdown has begun (the daemon
    // logs it just before cancelling), else its freed slot could start the
    // held delivery before the signal was even read.
    wait_for("the daemon to begin shutting down", SETTLE, || d.log().contains("SIGTERM: shutting down"));
    std::fs::write(w.path("go"), "").unwrap();
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}; log:\n{}", d.log());
    assert_eq!(w.read_string("started").lines().count(), 1, "no held delivery starts once shutdown began");
    for id in &ids {
        let ev = env.show(id);
        let del = delivery(&ev, "slow");
        if *id == first {
            assert_eq!(del["status"], "succeeded", "the running attempt finished within the grace period: {ev:#}");
        } else {
            assert_eq!(del["status"], "pending", "a held delivery goes back to pending: {ev:#}");
            assert_eq!(attempts(del).len(), 0, "it never started, so the paper trail has no attempt: {ev:#}");
        }
    }

    let _d = env.start();
    for id in &ids {
        let ev = wait_settled(&env, id);
        assert_eq!(ev["status"], "done", "{ev:#}");
        let del = delivery(&ev, "slow");
        let tries = attempts(del);
        assert_eq!(tries.len(), 1, "one attempt each, none lost to the release: {ev:#}");
        assert_eq!(tries[0]["number"], 1, "releasing gave the attempt number back: {ev:#}");
    }
}

#[test]
fn stats_prune_and_export_reflect_deliveries() {
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("orders"),
        &w.shell("ok", "echo fine", ""),
        &w.shell("bad", "echo broken >&2; exit 3", "permanent_exit_codes = [3]"),
        // Retries an hour later: stays `retrying` for the whole test.
        &w.shell("later", "exit 1", "max_attempts = 5\ninitial_backoff = \"1h\"\nmax_backoff = \"1h\""),
        r#"
[[routes]]
source = "orders"
handler = "ok"
match = [{ pointer = "/kind", equals = "ok" }]

[[routes]]
source = "orders"
handler = "bad"
match = [{ pointer = "/kind", equals = "bad" }]

[[routes]]
source = "orders"
handler = "later"
match = [{ pointer = "/kind", equals = "later" }]
"#,
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let e_ok = d.post_json("/hooks/orders", r#"{"kind":"ok"}"#).id();
    let e_bad = d.post_json("/hooks/orders", r#"{"kind":"bad"}"#).id();
    let e_later = d.post_json("/hooks/orders", r#"{"kind":"later"}"#).id();
    assert_eq!(wait_settled(&env, &e_ok)["status"], "done");
    assert_eq!(wait_settled(&env, &e_bad)["status"], "failed");
    wait_event(&env, &e_later, "the retry wait", SETTLE, |ev| ev["status"] == "retrying");

    let rows = env.stats();
    let row = |h: Option<&str>| {
        rows.iter()
            .find(|r| r["source"] == "orders" && r["handler"].as_str() == h)
            .unwrap_or_else(|| panic!("no stats row for {h:?}: {rows:#?}"))
            .clone()
    };
    let counts = |r: &Value| -> Vec<u64> {
        ["received", "pending", "processing", "succeeded", "retrying", "failed"].iter().map(|k| r[*k].as_u64().unwrap_or(0)).collect()
    };
    assert_eq!(counts(&row(None)), [3, 0, 0, 1, 1, 1], "source total: {rows:#?}");
    assert_eq!(counts(&row(Some("ok"))), [1, 0, 0, 1, 0, 0], "{rows:#?}");
    assert_eq!(counts(&row(Some("bad"))), [1, 0, 0, 0, 0, 1], "{rows:#?}");
    assert_eq!(counts(&row(Some("later"))), [1, 0, 0, 0, 1, 0], "{rows:#?}");

    let failed: Vec<Value> = env.events_where(&["--status", "failed"]);
    assert_eq!(failed.iter().map(|e| e["id"].as_str().unwrap()).collect::<Vec<_>>(), [e_bad.as_str()]);
    let by_handler = env.events_where(&["--handler", "later"]);
    assert_eq!(by_handler.iter().map(|e| e["id"].as_str().unwrap()).collect::<Vec<_>>(), [e_later.as_str()]);

    // export: one JSON document per line, oldest first, with deliveries and attempts.
    let out = env.cli(&["export"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).expect("each export line is JSON")).collect();
    assert_eq!(lines.iter().map(|e| e["id"].as_str().unwrap()).collect::<Vec<_>>(), [e_ok.as_str(), e_bad.as_str(), e_later.as_str()]);
    for line in &lines {
        let id = line["id"].as_str().unwrap();
        let shown = env.show(id);
        assert_eq!(line["deliveries"], shown["deliveries"], "export carries the same deliveries and attempts as events show");
        assert_eq!(line["body"], shown["body"]);
    }
    let bad_attempt = &lines[1]["deliveries"][0]["attempts"][0];
    assert_eq!((bad_attempt["exit_code"].clone(), bad_attempt["outcome"].clone()), (json!(3), json!("failure")));

    // prune: nothing is that old yet; then every finished event, never the retrying one.
    let out = env.cli(&["prune", "--older-than", "1h"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(env.events().len(), 3);
    let out = env.cli(&["prune", "--older-than", "0s", "--dry-run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("would prune 2 finished event(s)") && out.stdout.contains("nothing deleted"), "{out:?}");
    let listed: Vec<&str> =
        out.stdout.lines().filter(|l| l.starts_with("would prune evt_")).map(|l| l.split(' ').nth(2).unwrap()).collect();
    assert_eq!(listed, [e_ok.as_str(), e_bad.as_str()], "the dry run lists each event it would delete: {out:?}");
    assert_eq!(env.events().len(), 3, "--dry-run deletes nothing");
    let out = env.cli(&["prune", "--older-than", "0s"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("pruned 2 "), "{out:?}");
    let left: Vec<String> = env.events().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(left, std::slice::from_ref(&e_later), "only the unfinished event is kept");
    assert_eq!(env.show(&e_later)["status"], "retrying");
}

/// `examples/handlers/` as an integrator would configure them.
#[test]
fn example_handlers_follow_the_exit_code_contract() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/handlers");
    let w = Work::new();
    let mut kinds = vec![("sh", examples.join("on-lead.sh"))];
    let python = std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    if python {
        kinds.push(("py", examples.join("on_lead.py")));
    } else {
        eprintln!("python3 not found: examples/handlers/on_lead.py not exercised");
    }
    let mut config = vec![fast(""), open_source("forms")];
    for (kind, path) in &kinds {
        let out = w.path(&format!("leads-{kind}.tsv"));
        config.push(format!(
            "[handlers.lead_{kind}]\ntype = \"shell\"\ncommand = [{}, \"--out\", {}]\nstdin = \"json\"\n\
             env = {{ EMAIL = \"/submission_values/email_address/0\", FIRST_NAME = \"/submission_values/first_name/0\" }}\n\
             permanent_exit_codes = [65]\n",
            toml_str(&path.to_string_lossy()),
            toml_str(&out.to_string_lossy()),
        ));
        config.push(route("forms", &format!("lead_{kind}")));
    }
    let env = TestEnv::new(&config.concat());
    let d = env.start();
    let good = d.post_json("/hooks/forms", seeds::NETRESULTS_FORM).id();
    let no_email = d.post_json("/hooks/forms", r#"{"submission_values":{"first_name":["Nobody"]}}"#).id();

    let ev = wait_settled(&env, &good);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let ev_bad = wait_settled(&env, &no_email);
    assert_eq!(ev_bad["status"], "failed", "{ev_bad:#}");
    for (kind, _) in &kinds {
        let h = format!("lead_{kind}");
        let a = attempts(delivery(&ev_bad, &h));
        assert_eq!(a.len(), 1, "{h}: a lead without an email is a permanent failure: {ev_bad:#}");
        assert_eq!((a[0]["exit_code"].clone(), a[0]["outcome"].clone()), (json!(65), json!("failure")), "{h}");
        assert!(a[0]["output"].as_str().is_some_and(|o| o.contains("no email")), "{h}: says why: {ev_bad:#}");
    }

    // At-least-once: a replayed event must not be imported twice.
    let out = env.cli(&["events", "replay", &good]);
    assert_eq!(out.code, 0, "{out:?}");
    let ev = wait_event(&env, &good, "the replay", SETTLE, |ev| {
        ev["status"] == "done" && ev["deliveries"].as_array().unwrap().iter().all(|d| attempts(d).len() == 2)
    });
    for (kind, _) in &kinds {
        let a = attempts(delivery(&ev, &format!("lead_{kind}")));
        assert!(a[1]["output"].as_str().is_some_and(|o| o.contains("already imported")), "{kind}: {ev:#}");
        let lines = w.read_string(&format!("leads-{kind}.tsv"));
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 1, "{kind}: one line per event, even when replayed: {lines:?}");
        let fields: Vec<&str> = lines[0].split('\t').collect();
        assert_eq!(fields, [good.as_str(), "dgolden@mid-corp.com", "Daniel", ev["received_at"].as_str().unwrap()], "{kind}");
    }
}

#[test]
fn a_hostile_retry_after_leaves_the_delivery_retrying_at_max_age_without_a_panic() {
    // Issue 11 item 4: `Retry-After: 99999999999999` overflowed the date
    // arithmetic; the attempt's task panicked and the delivery sat `running`.
    let peer = FakePeer::start(|_, _| PeerReply::new(503, "come back in three million years").header("retry-after", "99999999999999"));
    let config = [
        fast("").as_str(),
        &open_source("leads"),
        &format!("[handlers.fwd]\ntype = \"http\"\nurl = {}\nmax_age = \"1h\"\n", toml_str(&peer.url("/in"))),
        &route("leads", "fwd"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let before = chrono::Utc::now();
    let id = d.post_json("/hooks/leads", r#"{"email":"a@b.c"}"#).id();

    let ev = wait_event(&env, &id, "the delivery to wait for its retry", SETTLE, |ev| delivery(ev, "fwd")["status"] == "retrying");
    let del = delivery(&ev, "fwd");
    let a = attempts(del);
    assert_eq!(a.len(), 1, "{del:#}");
    assert_eq!((&a[0]["outcome"], &a[0]["http_status"]), (&json!("retry"), &json!(503)), "{del:#}");
    // The wait asked for is cut to max_age: the last try comes when it runs out.
    let next = chrono::DateTime::parse_from_rfc3339(del["next_attempt_at"].as_str().expect("a next attempt time")).expect("RFC 3339");
    let after = chrono::Utc::now();
    let hour = chrono::Duration::hours(1);
    assert!(next >= before + hour && next <= after + hour, "next attempt {next} is not max_age (1h) after the delivery was queued");
    assert_eq!(peer.requests().len(), 1, "no second request before then");
    let log = env.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("attempt finished"), "the attempt was recorded: {log}");
}

#[test]
fn bulk_replay_must_name_what_it_replays_and_an_unknown_id_is_named() {
    // `events replay --source forms` re-queued every delivery, succeeded ones
    // included: a CRM handler re-sent every contact.
    let w = Work::new();
    let config = [
        fast("").as_str(),
        &open_source("forms"),
        &w.shell("crm", r#"echo "$HOOKTRAIL_EVENT_ID" >> "$W/sent"; echo sent"#, ""),
        &w.shell("notify", r#"if [ -e "$W/fixed" ]; then echo notified; exit 0; fi; exit 3"#, "permanent_exit_codes = [3]"),
        &route("forms", "crm"),
        &route("forms", "notify"),
    ]
    .concat();
    let env = TestEnv::new(&config);
    let d = env.start();
    let ids = [d.post_json("/hooks/forms", r#"{"n":1}"#).id(), d.post_json("/hooks/forms", r#"{"n":2}"#).id()];
    for id in &ids {
        assert_eq!(wait_settled(&env, id)["status"], "failed");
    }
    let statuses = |id: &str| -> Vec<(String, String, usize)> {
        let ev = env.show(id);
        ["crm", "notify"]
            .iter()
            .map(|h| {
                let d = delivery(&ev, h);
                (h.to_string(), d["status"].as_str().unwrap_or_default().to_string(), attempts(d).len())
            })
            .collect()
    };
    let settled = vec![("crm".to_string(), "succeeded".to_string(), 1), ("notify".to_string(), "failed".to_string(), 1)];
    let unchanged = |what: &str| {
        for id in &ids {
            assert_eq!(statuses(id), settled, "{what} changed {id}");
        }
        assert_eq!(w.read_string("sent").lines().count(), 2, "{what} re-sent a contact");
    };

    // A selection without --status failed or --all is refused, and changes nothing.
    for args in [&["events", "replay", "--source", "forms"][..], &["events", "replay"], &["events", "replay", "--status", "done"]] {
        let out = env.cli(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains("--status failed") && out.stderr.contains("--all"), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        unchanged(&format!("{args:?}"));
    }

    // An unknown id is named; the known one beside it is not re-queued either.
    let missing = "evt_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let out = env.cli(&["events", "replay", &ids[0], missing]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&format!("no event {missing}")) && out.stderr.contains("nothing re-queued"), "{out:?}");
    assert!(!out.stdout.contains("re-queued"), "{out:?}");
    unchanged("replaying an unknown id");

    // --dry-run shows what --status failed / --all would take and changes nothing.
    let out = env.cli(&["events", "replay", "--status", "failed", "--source", "forms", "--dry-run"]);
    assert_eq!(out.code, 0, "{out:?}");
    for id in &ids {
        assert!(out.stdout.contains(&format!("would re-queue {id} notify (failed, 1 attempt(s))")), "{out:?}");
    }
    assert!(!out.stdout.contains(" crm "), "succeeded deliveries are not part of --status failed: {out:?}");
    assert!(out.stdout.contains("would re-queue 2 deliveries of 2 event(s); nothing changed"), "{out:?}");
    let out = env.cli(&["events", "replay", "--all", "--source", "forms", "--dry-run"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&format!("would re-queue {} crm (succeeded, 1 attempt(s))", ids[1])), "{out:?}");
    assert!(out.stdout.contains("would re-queue 4 deliveries of 2 event(s); nothing changed"), "{out:?}");
    unchanged("--dry-run");

    // --status failed re-runs the failed deliveries only: no contact is sent twice.
    std::fs::write(w.path("fixed"), "").unwrap();
    let out = env.cli(&["events", "replay", "--status", "failed", "--source", "forms"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("re-queued 2 deliveries of 2 event(s)"), "{out:?}");
    for id in &ids {
        assert_eq!(wait_settled(&env, id)["status"], "done");
        assert_eq!(statuses(id), [("crm".to_string(), "succeeded".to_string(), 1), ("notify".to_string(), "succeeded".to_string(), 2)]);
    }
    assert_eq!(w.read_string("sent").lines().count(), 2, "the CRM handler ran once per event");
}

/// SIGKILLs the listed processes when dropped, so a failing test leaves no sleeper behind.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            kill_leftover(*pid);
        }
    }
}

/// Source `leads` routed to shell handler `import` (lease 2 s): until
/// `$W/restarted` exists it writes its payload file's path, starts a child
/// in its group, records both pids and blocks; then it succeeds.
fn orphan_maker(w: &Work) -> String {
    let script = r#"if [ -e "$W/restarted" ]; then echo "second run"; exit 0; fi
echo "$HOOKTRAIL_PAYLOAD_FILE" > "$W/payload-path"
sleep 600 &
echo $! > "$W/child.pid"
echo $$ > "$W/leader.tmp" && mv "$W/leader.tmp" "$W/leader.pid"
wait"#;
    [fast("lease = \"2s\"").as_str(), &open_source("leads"), &w.shell("import", script, "timeout = \"60s\""), &route("leads", "import")]
        .concat()
}

#[test]
fn after_kill9_the_next_start_kills_the_handler_process_group_the_dead_daemon_left() {
    if sqlite_only("the marks daemons leave beside the database file") {
        return;
    }
    // Issue 11 item 9: after kill -9 a handler kept running with no timeout,
    // beside its own re-run.
    let w = Work::new();
    let env = TestEnv::new(&orphan_maker(&w));
    let d = env.start();
    let id = d.post_json("/hooks/leads", r#"{"email":"a@b.c"}"#).id();
    wait_for("the handler to start", SETTLE, || w.path("leader.pid").exists());
    let (leader, child) = (read_pid(&w.path("leader.pid")).unwrap(), read_pid(&w.path("child.pid")).unwrap());
    let _cleanup = KillOnDrop(vec![leader, child]);
    // The handler carries the daemon's mark (`<pid>.<start>`), and the
    // daemon is noted beside the database.
    let mark = environ(&std::fs::read(format!("/proc/{leader}/environ")).unwrap()).get("HOOKTRAIL_DAEMON").cloned();
    let dead = mark.unwrap_or_else(|| panic!("the handler has no HOOKTRAIL_DAEMON"));
    assert!(dead.starts_with(&format!("{}.", d.pid())), "{dead}");
    let noted = PathBuf::from(format!("{}.handlers", env.db_path().display())).join(&dead);
    assert!(noted.exists(), "{}", noted.display());
    d.kill9();
    assert!(!process_gone(leader) && !process_gone(child), "the handler outlives a SIGKILLed daemon");

    std::fs::write(w.path("restarted"), "").unwrap();
    let _d = env.start();
    wait_for("the dead daemon's handler group to be killed", SETTLE, || process_gone(leader) && process_gone(child));
    assert!(!noted.exists(), "the dead daemon's note is gone");
    // The daemon's log is written by a background thread: the line may land
    // after the processes are gone and the note removed.
    let (pgid, daemon) = (format!("pgid={leader}"), format!("daemon={dead}"));
    let logged = wait_until(SETTLE, || {
        let log = env.log();
        log.contains("killed a handler's process group left running by a daemon that died") && log.contains(&pgid) && log.contains(&daemon)
    });
    assert!(logged, "the log names the killed group ({pgid}, {daemon}): {}", env.log());
    // And the delivery still runs again once the dead daemon's lease expires.
    let ev = wait_event(&env, &id, "the re-run", SETTLE, |ev| ev["status"] == "done");
    assert!(attempts(delivery(&ev, "import")).last().unwrap()["output"].as_str().is_some_and(|o| o.contains("second run")), "{ev:#}");
}

#[test]
fn after_kill9_the_next_start_removes_the_payload_files_the_dead_daemon_left() {
    if sqlite_only("the marks daemons leave beside the database file (PostgreSQL: tests/postgres_nodes.rs)") {
        return;
    }
    // Issue 11 item 10: `hooktrail-payload-*.json` (lead data) stayed in
    // $TMPDIR or /dev/shm after kill -9. TMPDIR is the test's own directory,
    // so no other process's files are touched.
    let w = Work::new();
    let tmp = w.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let env = TestEnv::new(&orphan_maker(&w));
    let d = env.daemon().env("TMPDIR", tmp.to_str().unwrap()).start();
    d.post_json("/hooks/leads", r#"{"email":"dgolden@mid-corp.com"}"#).id();
    wait_for("the handler to start", SETTLE, || w.path("leader.pid").exists());
    let _cleanup = KillOnDrop(vec![read_pid(&w.path("leader.pid")).unwrap(), read_pid(&w.path("child.pid")).unwrap()]);
    let payload = PathBuf::from(w.read_string("payload-path").trim());
    assert_eq!(payload.parent(), Some(tmp.as_path()), "the payload file is in $TMPDIR");
    d.kill9();
    assert!(std::fs::read_to_string(&payload).unwrap().contains("dgolden@mid-corp.com"), "the dead daemon left its payload file");
    // Files that may be in use stay: one named by a live process (this
    // test), and one named by a version that put no owner in the name.
    let me = std::fs::read_to_string("/proc/self/stat").unwrap();
    let my_start = me.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().to_string();
    let in_use = tmp.join(format!("hooktrail-payload-{}.{my_start}-Ab12Cd.json", std::process::id()));
    let older_version = tmp.join("hooktrail-payload-Ab12Cd.json");
    for f in [&in_use, &older_version] {
        std::fs::write(f, "{}").unwrap();
    }

    std::fs::write(w.path("restarted"), "").unwrap();
    let _d = env.daemon().env("TMPDIR", tmp.to_str().unwrap()).start();
    wait_for("the dead daemon's payload file to be removed", SETTLE, || !payload.exists());
    assert!(in_use.exists() && older_version.exists(), "files that may be in use are left alone");
    // The line is logged after the removal, through the log's own thread.
    wait_for("the removal to be logged", SETTLE, || env.log().contains("removed payload files left by a daemon that died"));
}
