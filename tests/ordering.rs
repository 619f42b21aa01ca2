//! Ordered processing per key (issue 15) through the real binary: shell
//! handlers with `ordering = { key = PTR, on_failure = … }` that log what
//! they run to a file, asserting on that file and on `events show --json`.
//!
//! Proven here: per key one at a time in event-id order while keys run in
//! parallel (2,000 events over 20 keys), a head retrying holds only its key,
//! `block` then replay / skip unblocks, `blocked_by` in `events show --json`
//! and the admin API, `kill -9` mid-attempt runs the same head again first,
//! `events skip` refusals, and `check-config` on the `ordering` keys.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A daemon config: `processor_and_retry` (see `fast_retries`), an open
/// source `leads` routed to the handler `crm` (its TOML).
fn leads_to_crm(processor_and_retry: &str, crm: &str) -> TestEnv {
    TestEnv::new(&[processor_and_retry, &open_source("leads"), crm, &route("leads", "crm")].join("\n"))
}

/// A scratch directory for handler scripts and what they write.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Self {
        Work { dir: tempfile::Builder::new().prefix("hooktrail-order-").tempdir().expect("creating a work dir") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The lines the handler appended to `run.log` so far.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("run.log")).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// A shell handler `name` running `body` under `/bin/sh` with `$W` the
    /// work dir and `$KEY` the payload's `/key`; `extra` adds TOML keys.
    fn shell(&self, name: &str, body: &str, extra: &str) -> String {
        let script = self.path(&format!("{name}.sh"));
        std::fs::write(&script, format!("#!/bin/sh\nW=\"$1\"\n{body}\n")).expect("writing a handler script");
        format!(
            "[handlers.{name}]\ntype = \"shell\"\ncommand = [\"/bin/sh\", {}, {}]\nenv = {{ KEY = \"/key\", FAIL = \"/fail\" }}\n{extra}\n",
            toml_str(&script.to_string_lossy()),
            toml_str(&self.dir.path().to_string_lossy()),
        )
    }
}

/// Appends one line `WHAT KEY EVENT ATTEMPT` to `$W/run.log` (one short
/// `O_APPEND` write: lines of concurrent handlers never interleave).
const LOG: &str = r#"log() { printf '%s %s %s %s\n' "$1" "$KEY" "$HOOKTRAIL_EVENT_ID" "$HOOKTRAIL_ATTEMPT" >> "$W/run.log"; }"#;

/// One parsed line of `run.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    what: String,
    key: String,
    id: String,
    attempt: u32,
}

fn parse(lines: &[String]) -> Vec<Line> {
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "a log line is `what key id attempt`: {l:?}");
            Line { what: f[0].into(), key: f[1].into(), id: f[2].into(), attempt: f[3].parse().expect("attempt number") }
        })
        .collect()
}

fn post(d: &Daemon, body: Value) -> String {
    let r = d.post_json("/hooks/leads", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    r.id()
}

fn wait_event(env: &TestEnv, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(SETTLE, || {
        last = env.show(id);
        done(&last)
    });
    assert!(ok, "timed out waiting for {what} ({id}); last seen:\n{last:#}\ndaemon log:\n{}", env.log());
    last
}

/// The `run` lines (attempts begun) as (id, attempt), in file order.
fn runs(lines: &[Line]) -> Vec<(String, u32)> {
    lines.iter().filter(|l| l.what == "run").map(|l| (l.id.clone(), l.attempt)).collect()
}

#[test]
fn two_thousand_events_over_twenty_keys_run_one_at_a_time_per_key_in_id_order_and_keys_in_parallel() {
    let w = Work::new();
    // Sleeps 0–7 ms, picked from the last character of the event id (random
    // part of a ULID): no process but `sleep` per delivery.
    let body = format!(
        "{LOG}\nlog start\nc=${{HOOKTRAIL_EVENT_ID#${{HOOKTRAIL_EVENT_ID%?}}}}\nn=$(printf '%d' \"'$c\")\nsleep 0.00$((n % 8))\nlog end"
    );
    let env = leads_to_crm(
        &fast_retries(3, "200ms", "max_concurrency = 8"),
        &w.shell("crm", &body, "concurrency = 8\nordering = { key = \"/key\" }"),
    );
    let d = env.start();
    const EVENTS: usize = 2000;
    const KEYS: usize = 20;
    // Posted from 8 threads at once, keys interleaved.
    std::thread::scope(|s| {
        for t in 0..8 {
            let d = &d;
            s.spawn(move || {
                for i in (t..EVENTS).step_by(8) {
                    post(d, json!({"key": format!("k{:02}", i % KEYS), "n": i}));
                }
            });
        }
    });
    wait_for("every delivery to end", Duration::from_secs(300), || w.lines().len() >= 2 * EVENTS);
    let lines = parse(&w.lines());
    assert_eq!(lines.len(), 2 * EVENTS, "each delivery ran exactly once");
    let mut in_flight: BTreeMap<String, String> = BTreeMap::new();
    let mut last_id: BTreeMap<String, String> = BTreeMap::new();
    let mut most_keys_in_flight = 0;
    for l in &lines {
        match l.what.as_str() {
            "start" => {
                assert!(!in_flight.contains_key(&l.key), "{} started while {} of key {} ran", l.id, in_flight[&l.key], l.key);
                if let Some(prev) = last_id.get(&l.key) {
                    assert!(*prev < l.id, "key {}: {} ran after {}, out of id order", l.key, l.id, prev);
                }
                last_id.insert(l.key.clone(), l.id.clone());
                in_flight.insert(l.key.clone(), l.id.clone());
                most_keys_in_flight = most_keys_in_flight.max(in_flight.len());
            }
            "end" => assert_eq!(in_flight.remove(&l.key).as_deref(), Some(l.id.as_str()), "an end without its start"),
            other => panic!("unexpected line {other}"),
        }
    }
    assert_eq!(last_id.len(), KEYS);
    assert!(most_keys_in_flight > 1, "keys never ran in parallel (at most {most_keys_in_flight} in flight)");
    let events = env.events_where(&["--status", "done"]);
    assert_eq!(events.len(), EVENTS, "every event done");
}

#[test]
fn a_head_failing_twice_before_success_holds_only_its_key() {
    let w = Work::new();
    // The head of key `a` fails (retry) until its third attempt and until
    // every event of key `b` has run: its success proves `b` ran meanwhile.
    let body = format!(
        "{LOG}\nlog run\nif [ \"$FAIL\" = yes ]; then\n  if [ \"$HOOKTRAIL_ATTEMPT\" -lt 3 ] || [ ! -e \"$W/b-done\" ]; then exit 1; fi\nfi\n[ \"$KEY\" = b ] && [ \"$(grep -c '^run b ' \"$W/run.log\")\" -ge 3 ] && touch \"$W/b-done\"\nexit 0"
    );
    let env = leads_to_crm(&fast_retries(30, "200ms", ""), &w.shell("crm", &body, "concurrency = 4\nordering = { key = \"/key\" }"));
    let d = env.start();
    let a1 = post(&d, json!({"key": "a", "fail": "yes"}));
    let a2 = post(&d, json!({"key": "a"}));
    let b: Vec<String> = (0..3).map(|i| post(&d, json!({"key": "b", "n": i}))).collect();
    let a3 = post(&d, json!({"key": "a"}));
    for id in [&a1, &a2, &a3].into_iter().chain(&b) {
        wait_event(&env, id, "the event to be done", |ev| ev["status"] == "done");
    }
    let ev = env.show(&a1);
    let tries = attempts(delivery(&ev, "crm"));
    assert!(tries.len() >= 3, "the head failed twice before succeeding: {ev:#}");
    let runs = runs(&parse(&w.lines()));
    let a_runs: Vec<&(String, u32)> = runs.iter().filter(|(id, _)| [&a1, &a2, &a3].contains(&id)).collect();
    let a_ids: Vec<&str> = a_runs.iter().map(|(id, _)| id.as_str()).collect();
    let head_tries = tries.len();
    let mut want = vec![a1.as_str(); head_tries];
    want.extend([a2.as_str(), a3.as_str()]);
    assert_eq!(a_ids, want, "a2 and a3 ran only after the head succeeded, in order");
    let last_head = runs.iter().position(|r| *r == (a1.clone(), head_tries as u32)).expect("the head's last run");
    for id in &b {
        let at = runs.iter().position(|(r, _)| r == id).expect("b ran");
        assert!(at < last_head, "key b finished while the head of a retried");
    }
}

/// With a poll interval of an hour, only wake-ups move a key on: a head's
/// finish must wake the processor for the key's next delivery (on
/// PostgreSQL the finishes are committed in batches after the slot that ran
/// the head was offered again).
#[test]
fn a_keys_next_delivery_runs_after_its_head_without_waiting_for_the_poll() {
    let w = Work::new();
    let body = format!("{LOG}\nlog run\nsleep 0.2");
    let env = leads_to_crm(
        &fast_retries(3, "200ms", "").replace("poll_interval = \"100ms\"", "poll_interval = \"1h\""),
        &w.shell("crm", &body, "concurrency = 4\nordering = { key = \"/key\" }"),
    );
    let d = env.start();
    let ids: Vec<String> = (0..4).map(|n| post(&d, json!({"key": "a", "n": n}))).collect();
    for id in &ids {
        wait_event(&env, id, "the event to be done without a poll", |ev| ev["status"] == "done");
    }
    let ran: Vec<String> = runs(&parse(&w.lines())).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ran, ids, "one at a time, in id order");
}

/// `on_failure = "block"` with permanent exit code 3: payloads with
/// `"fail": "yes"` fail for good until `$W/healed` exists.
fn blocking(w: &Work) -> TestEnv {
    let body = format!("{LOG}\nlog run\nif [ \"$FAIL\" = yes ] && [ ! -e \"$W/healed\" ]; then exit 3; fi\nexit 0");
    leads_to_crm(
        &fast_retries(3, "200ms", ""),
        &w.shell("crm", &body, "permanent_exit_codes = [3]\nordering = { key = \"/key\", on_failure = \"block\" }"),
    )
}

#[test]
fn with_block_a_failed_head_blocks_its_key_until_replayed_and_succeeded_or_skipped() {
    let w = Work::new();
    let env = blocking(&w);
    let d = env.start();
    let a1 = post(&d, json!({"key": "a", "fail": "yes"}));
    let a2 = post(&d, json!({"key": "a"}));
    let a3 = post(&d, json!({"key": "a"}));
    let b1 = post(&d, json!({"key": "b"}));
    wait_event(&env, &a1, "the head to fail", |ev| ev["status"] == "failed");
    let ev = wait_event(&env, &a2, "a2 to show blocked_by", |ev| delivery(ev, "crm").get("blocked_by").is_some());
    assert_eq!(delivery(&ev, "crm")["blocked_by"], a1.as_str());
    assert_eq!(delivery(&ev, "crm")["status"], "pending");
    assert_eq!(ev["status"], "pending");
    let text = env.cli(&["events", "show", &a2]);
    assert!(text.stdout.contains(&format!("delivery crm: pending after 0 attempt(s), blocked by {a1}")), "{text:?}");
    wait_event(&env, &b1, "the other key to run on", |ev| ev["status"] == "done");
    // The admin API shows it too, and metrics count the blocked key.
    let admin = admin_addr(&env);
    let api: Value = reqwest::blocking::get(format!("http://{admin}/api/events/{a3}")).expect("admin api").json().expect("json");
    assert_eq!(delivery(&api, "crm")["blocked_by"], a1.as_str(), "{api:#}");
    let metrics = reqwest::blocking::get(format!("http://{admin}/metrics")).expect("metrics").text().expect("text");
    assert!(metrics.contains("hooktrail_blocked_keys{handler=\"crm\"} 1"), "{metrics}");
    let page = reqwest::blocking::get(format!("http://{admin}/events/{a2}")).expect("page").text().expect("text");
    assert!(page.contains(&format!("Blocked by <a href=\"/events/{a1}\">{a1}</a>")), "the page names the blocker:\n{page}");
    assert!(runs(&parse(&w.lines())).iter().all(|(id, _)| *id != a2 && *id != a3), "nothing later of key a ran");

    // Healed and replayed: the head runs again first, then the key runs on, in order.
    std::fs::write(w.path("healed"), "").expect("marker");
    let out = env.cli(&["events", "replay", &a1]);
    assert_eq!(out.code, 0, "{out:?}");
    for id in [&a1, &a2, &a3] {
        wait_event(&env, id, "the key to run on after the replay", |ev| ev["status"] == "done");
    }
    let a_runs: Vec<String> = runs(&parse(&w.lines())).into_iter().map(|(id, _)| id).filter(|id| [&a1, &a2, &a3].contains(&id)).collect();
    assert_eq!(a_runs, [a1.clone(), a1.clone(), a2.clone(), a3.clone()], "the head twice, then the rest in order");

    // Block, then skip.
    std::fs::remove_file(w.path("healed")).expect("marker");
    let c1 = post(&d, json!({"key": "c", "fail": "yes"}));
    let c2 = post(&d, json!({"key": "c"}));
    wait_event(&env, &c2, "c2 to be blocked by c1", |ev| delivery(ev, "crm")["blocked_by"] == c1.as_str());
    let out = env.cli(&["events", "skip", &c1, "--handler", "crm"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("skipped"), "{out:?}");
    wait_event(&env, &c2, "c2 to run after the skip", |ev| ev["status"] == "done");
    let ev = env.show(&c1);
    assert_eq!(delivery(&ev, "crm")["status"], "skipped");
    assert_eq!(ev["status"], "failed", "skipped counts as failed");
    let metrics = reqwest::blocking::get(format!("http://{admin}/metrics")).expect("metrics").text().expect("text");
    assert!(metrics.contains("hooktrail_blocked_keys{handler=\"crm\"} 0"), "{metrics}");
}

#[test]
fn events_skip_refuses_unknown_ids_unknown_handlers_and_deliveries_that_did_not_fail_and_changes_nothing() {
    let w = Work::new();
    let env = blocking(&w);
    let d = env.start();
    let ok = post(&d, json!({"key": "a"}));
    wait_event(&env, &ok, "the event to be done", |ev| ev["status"] == "done");
    let before = env.show(&ok);
    let cases: [(&[&str], &str); 4] = [
        (&["events", "skip", "evt_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--handler", "crm"], "no event `evt_01ARZ3NDEKTSV4RRFFQ69G5FAV` is stored"),
        (&["events", "skip", &ok, "--handler", "nope"], "has no delivery to handler `nope`"),
        (&["events", "skip", &ok, "--handler", "crm"], "is succeeded, not failed"),
        (&["events", "skip", "not-an-id", "--handler", "crm"], "is not an event id"),
    ];
    for (args, want) in cases {
        let out = env.cli(args);
        assert_ne!(out.code, 0, "{args:?} must fail: {out:?}");
        assert!(out.stderr.contains(want), "{args:?}: stderr should say {want:?}: {out:?}");
    }
    assert_eq!(env.show(&ok), before, "nothing changed");
}

#[test]
fn kill9_mid_attempt_then_after_the_lease_the_same_head_runs_again_before_anything_later_of_its_key() {
    let w = Work::new();
    // The first run of the head writes its pid and hangs; any later run ends at once.
    let body = format!(
        "{LOG}\nlog run\nif [ \"$FAIL\" = yes ] && [ ! -e \"$W/first-run\" ]; then\n  touch \"$W/first-run\"\n  echo $$ > \"$W/blocked.tmp\" && mv \"$W/blocked.tmp\" \"$W/blocked.pid\"\n  exec sleep 600\nfi\nexit 0"
    );
    let env = leads_to_crm(
        &fast_retries(3, "200ms", "lease = \"2s\""),
        &w.shell("crm", &body, "timeout = \"60s\"\nordering = { key = \"/key\" }"),
    );
    let d = env.start();
    let a1 = post(&d, json!({"key": "a", "fail": "yes"}));
    let a2 = post(&d, json!({"key": "a"}));
    wait_for("the head to start", SETTLE, || w.path("blocked.pid").exists());
    // Its begun mark (`Store::started`) is committed lazily; on PostgreSQL
    // kill the node only once it is, so the attempt counts as begun, not
    // merely claimed (SQLite's lands with the writer's next commit, in time).
    if let Some(db) = env.postgres() {
        wait_for("the attempt's begun mark", SETTLE, || {
            db.scalar("SELECT bool_and(NOT held) FROM deliveries WHERE status = 'running'").as_deref() == Some("true")
        });
    }
    d.kill9();
    let pid: i32 = std::fs::read_to_string(w.path("blocked.pid")).expect("pid").trim().parse().expect("a pid");
    // SAFETY: plain kill(2) of the process group the dead daemon's handler left.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    assert_eq!(delivery(&env.show(&a2), "crm")["status"], "pending", "a2 waited behind the running head");
    let _d = env.start();
    wait_event(&env, &a2, "the key to finish after the restart", |ev| ev["status"] == "done");
    assert_eq!(env.show(&a1)["status"], "done");
    let runs = runs(&parse(&w.lines()));
    assert_eq!(runs, [(a1.clone(), 1), (a1.clone(), 2), (a2.clone(), 1)], "the same head again first, then a2");
}

#[test]
fn sighup_taking_ordering_off_keeps_queued_deliveries_of_a_key_in_order_and_new_ones_run_unordered() {
    let w = Work::new();
    // Every run waits for `$W/go`: the first run holds its key while the config changes.
    let body = format!("{LOG}\nlog start\nwhile [ ! -e \"$W/go\" ]; do sleep 0.01; done\nlog end");
    let handler = w.shell("crm", &body, "concurrency = 4\nordering = { key = \"/key\" }");
    let env = leads_to_crm(&fast_retries(3, "200ms", ""), &handler);
    let d = env.start();
    let queued: Vec<String> = (0..4).map(|i| post(&d, json!({"key": "a", "n": i}))).collect();
    wait_for("the head to start", SETTLE, || !w.lines().is_empty());
    let text = std::fs::read_to_string(env.config_path()).expect("config");
    env.write_config(&text.replace("ordering = { key = \"/key\" }", ""));
    signal(d.pid(), libc::SIGHUP);
    wait_for("the reload", SETTLE, || d.log().contains("SIGHUP: configuration reloaded"));
    // Received after the reload: not ordered, so they may run beside each other.
    let fresh: Vec<String> = (0..3).map(|i| post(&d, json!({"key": "a", "n": 10 + i}))).collect();
    wait_for("the new, unordered events to start together", SETTLE, || {
        let started = parse(&w.lines()).iter().filter(|l| l.what == "start" && fresh.contains(&l.id)).count();
        started >= 2
    });
    std::fs::write(w.path("go"), "").expect("marker");
    for id in queued.iter().chain(&fresh) {
        wait_event(&env, id, "every event to be done", |ev| ev["status"] == "done");
    }
    // The deliveries queued before the reload kept their keys: one at a time, in id order.
    let lines: Vec<Line> = parse(&w.lines()).into_iter().filter(|l| queued.contains(&l.id)).collect();
    let want: Vec<(String, String)> =
        queued.iter().flat_map(|id| [("start".to_string(), id.clone()), ("end".to_string(), id.clone())]).collect();
    let got: Vec<(String, String)> = lines.into_iter().map(|l| (l.what, l.id)).collect();
    assert_eq!(got, want, "queued deliveries of one key ran one at a time, in id order, across the reload");
}

#[test]
fn check_config_names_the_ordering_key_path_of_each_problem() {
    let env = TestEnv::raw(
        "[handlers.a]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\nordering = { key = \"contact_id\" }\n\n\
         [handlers.b]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\nordering = { key = \"/id\", on_failure = \"stop\" }\n\n\
         [handlers.c]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\nordering = { on_failure = \"block\", keyy = \"/x\" }\n\n\
         [handlers.d]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\nordering = { key = \"/contact/id\", on_failure = \"block\" }\n",
    );
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 1, "{out:?}");
    for want in [
        "handlers.a.ordering.key: `contact_id` is not a JSON pointer",
        "handlers.b.ordering.on_failure: `stop` is not one of continue, block",
        "handlers.c.ordering.key: is required",
        "handlers.c.ordering.keyy",
    ] {
        assert!(out.stdout.contains(want), "check-config should say {want:?}:\n{}", out.stdout);
    }
    assert!(!out.stdout.contains("handlers.d"), "a valid ordering is accepted:\n{}", out.stdout);
}

/// The admin listener's address, from the ready file the harness asks for.
fn admin_addr(env: &TestEnv) -> String {
    let ready: Value = serde_json::from_slice(&std::fs::read(env.ready_file()).expect("ready file")).expect("ready json");
    ready["admin"].as_str().unwrap_or_else(|| panic!("no admin address in {ready}")).to_string()
}
