//! The inspection CLI on the daemon's database while `serve` runs (README, "Command line"):
//! `events list` filters, `events show` human and JSON, `stats --json`, and
//! clear errors for an unknown id, a missing database, or a duration reaching
//! back past any date (CLI and admin API).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// netresults events are routed to a handler; with `--role ingest` no
/// processor runs, so they stay `pending` while ontraport's (unrouted) are `done`.
const CONFIG: &str = r#"
[sources.netresults]
auth = { type = "none" }
[sources.ontraport]
auth = { type = "none" }
[handlers.crm]
type = "shell"
command = ["/bin/true"]
[[routes]]
source = "netresults"
handler = "crm"
"#;

const ANN_NR: &str = r#"{"form_completion_id":"2","submission_values":{"email_address":["ann@example.com"],"first_name":["Ann"]}}"#;

/// A running daemon with four events; `ids` oldest first:
/// 0 netresults (Daniel), 1 ontraport (Daniel), 2 netresults (Ann), 3 ontraport (Ann).
struct Populated {
    // Fields drop in order: the daemon is killed before its temp dir goes.
    d: Daemon,
    env: TestEnv,
    ids: Vec<String>,
}

fn populated() -> Populated {
    let env = TestEnv::new(CONFIG);
    let d = env.daemon().arg("--role").arg("ingest").start();
    let form = "application/x-www-form-urlencoded";
    let ids = vec![
        d.post_json("/hooks/netresults", seeds::NETRESULTS_FORM).id(),
        d.post("/hooks/ontraport", form, seeds::ONTRAPORT_FORM).id(),
        d.post_json("/hooks/netresults", ANN_NR).id(),
        d.post("/hooks/ontraport", form, "First_Name=Ann&Email=ann%40example.com").id(),
    ];
    Populated { d, env, ids }
}

fn ids_of(list: &[Value]) -> Vec<String> {
    list.iter().map(|e| e["id"].as_str().expect("every listed event has an id").to_string()).collect()
}

impl Populated {
    /// Ids listed by `events list --json ARGS…`.
    fn list(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["events", "list", "--json"];
        all.extend_from_slice(args);
        match self.env.cli_json(&all) {
            Value::Array(list) => ids_of(&list),
            other => panic!("not an array: {other}"),
        }
    }
    /// Ids by position (oldest = 0), newest first as lists print them.
    fn newest_first(&self, positions: &[usize]) -> Vec<String> {
        positions.iter().map(|&i| self.ids[i].clone()).collect()
    }
}

#[test]
fn events_list_json_is_newest_first_with_the_spec_field_names() {
    let p = populated();
    let list = p.env.events();
    assert_eq!(ids_of(&list), p.newest_first(&[3, 2, 1, 0]));
    for e in &list {
        for key in ["id", "source", "status", "received_at", "method", "content_type", "query", "remote_addr", "payload"] {
            assert!(e.get(key).is_some(), "list element lacks `{key}`: {e}");
        }
    }
    let first = &list[3];
    assert_eq!(first["source"], "netresults");
    assert_eq!(first["status"], "pending");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["content_type"], "application/json");
    assert_eq!(first["remote_addr"], "127.0.0.1");
    assert_eq!(first["payload"]["form_completion_id"], "4453534");
    assert_eq!(list[2]["payload"]["Email"], "dgolden@mid-corp.com");
    assert_eq!(list[2]["status"], "done");

    // The human listing names every event too.
    let out = p.env.cli(&["events", "list"]);
    assert_eq!(out.code, 0, "{out:?}");
    for id in &p.ids {
        assert!(out.stdout.contains(id.as_str()), "{id} missing from:\n{}", out.stdout);
    }
    assert!(out.stdout.contains("netresults") && out.stdout.contains("pending"), "{}", out.stdout);
}

#[test]
fn events_list_filters_by_source_status_handler_since_limit_and_match() {
    let p = populated();
    assert_eq!(p.list(&["--source", "ontraport"]), p.newest_first(&[3, 1]));
    assert_eq!(p.list(&["--source", "nobody"]), Vec::<String>::new());
    assert_eq!(p.list(&["--status", "pending"]), p.newest_first(&[2, 0]));
    assert_eq!(p.list(&["--status", "done"]), p.newest_first(&[3, 1]));
    assert_eq!(p.list(&["--status", "failed"]), Vec::<String>::new());
    assert_eq!(p.list(&["--handler", "crm"]), p.newest_first(&[2, 0]));
    assert_eq!(p.list(&["--limit", "2"]), p.newest_first(&[3, 2]));
    assert_eq!(p.list(&["--limit", "1", "--source", "netresults"]), p.newest_first(&[2]));

    assert_eq!(p.list(&["--since", "1h"]), p.newest_first(&[3, 2, 1, 0]));
    let third = p.env.show(&p.ids[2]);
    let at = third["received_at"].as_str().unwrap();
    assert_eq!(p.list(&["--since", at]), p.newest_first(&[3, 2]), "--since an RFC 3339 time is inclusive");
    assert_eq!(p.list(&["--since", "2999-01-01T00:00:00Z"]), Vec::<String>::new());

    assert_eq!(p.list(&["--match", "/submission_values/email_address/0=dgolden@mid-corp.com"]), p.newest_first(&[0]));
    assert_eq!(p.list(&["--match", "/Email=ann@example.com"]), p.newest_first(&[3]));
    assert_eq!(p.list(&["--match", "/First_Name=Ann", "--match", "/Email=ann@example.com"]), p.newest_first(&[3]));
    assert_eq!(p.list(&["--match", "/First_Name=Ann", "--match", "/Email=dgolden@mid-corp.com"]), Vec::<String>::new());
    assert_eq!(p.list(&["--match", "/form_completion_id=2", "--source", "netresults"]), p.newest_first(&[2]));

    for (args, needle) in [
        (vec!["events", "list", "--status", "sleeping"], "`sleeping` is not one of"),
        (vec!["events", "list", "--since", "last tuesday"], "neither a duration"),
        (vec!["events", "list", "--match", "email=x"], "not a JSON pointer"),
    ] {
        let out = p.env.cli(&args);
        assert_ne!(out.code, 0, "{args:?} should fail");
        assert!(out.stderr.contains(needle), "{args:?}: stderr should say {needle:?}: {out:?}");
    }
}

#[test]
fn events_list_search_finds_a_lead_by_email_name_or_id_in_json_and_form_events() {
    let p = populated();
    // Daniel came as Net-Results JSON (0) and as an ONTRAPORT form (1), Ann likewise (2, 3).
    assert_eq!(p.list(&["--search", "dgolden@mid-corp.com"]), p.newest_first(&[1, 0]));
    assert_eq!(p.list(&["--search", "ANN@EXAMPLE.COM"]), p.newest_first(&[3, 2]), "ignoring case; a form's decoded value");
    assert_eq!(p.list(&["--search", "ann"]), p.newest_first(&[3, 2]), "a name");
    assert_eq!(p.list(&["--search", "4453534"]), p.newest_first(&[0]), "an id");
    assert_eq!(p.list(&["--search", "golden"]), p.newest_first(&[0]), "the last name, not inside `dgolden`");
    assert_eq!(p.list(&["--search", "olden"]), Vec::<String>::new(), "whole words only");
    assert_eq!(p.list(&["--search", "ann", "--source", "ontraport"]), p.newest_first(&[3]), "with other filters");
    assert_eq!(p.list(&["--search", "ann", "--limit", "1"]), p.newest_first(&[3]));

    let before = p.env.events().len();
    let out = p.env.cli(&["events", "list", "--search", "@-."]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--search `@-.` has no letter or digit to search for"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(p.env.events().len(), before, "nothing stored or changed");
}

#[test]
fn events_show_prints_the_whole_event_as_json_and_for_humans() {
    let p = populated();
    let id = &p.ids[0];
    let ev = p.env.show(id);
    for key in [
        "id",
        "source",
        "status",
        "received_at",
        "method",
        "content_type",
        "query",
        "headers",
        "remote_addr",
        "body",
        "payload",
        "deliveries",
    ] {
        assert!(ev.get(key).is_some(), "events show --json lacks `{key}`: {ev}");
    }
    assert_eq!(ev["id"], id.as_str());
    assert_eq!(ev["body"], seeds::NETRESULTS_FORM);
    assert!(ev["headers"].is_object());
    let deliveries = ev["deliveries"].as_array().expect("deliveries is an array");
    assert_eq!(deliveries.len(), 1, "{ev}");
    assert_eq!(deliveries[0]["handler"], "crm");
    assert_eq!(deliveries[0]["status"], "pending");
    assert_eq!(deliveries[0]["attempts"], json!([]));
    let done = p.env.show(&p.ids[1]);
    assert_eq!(done["deliveries"], json!([]), "an unrouted event has no deliveries");

    let out = p.env.cli(&["events", "show", id]);
    assert_eq!(out.code, 0, "{out:?}");
    for needle in
        [id.as_str(), "netresults", "pending", "application/json", "dgolden@mid-corp.com", "\"form_completion_id\": \"4453534\"", "crm"]
    {
        assert!(out.stdout.contains(needle), "human show lacks {needle:?}:\n{}", out.stdout);
    }
}

#[test]
fn stats_json_counts_per_source_and_handler() {
    let p = populated();
    // One refused request, counted but not stored.
    assert_eq!(p.d.post("/hooks/ontraport", "text/plain", "hi").status, 415);
    wait_rejected(&p.env, "ontraport", 1);

    let rows = p.env.stats();
    for r in &rows {
        for key in ["source", "handler", "received", "duplicates", "rejected", "pending", "processing", "succeeded", "retrying", "failed"] {
            assert!(r.get(key).is_some(), "stats row lacks `{key}`: {r}");
        }
    }
    let row = |source: &str, handler: Value| {
        rows.iter()
            .find(|r| r["source"] == source && r["handler"] == handler)
            .unwrap_or_else(|| panic!("no row {source}/{handler}: {rows:?}"))
    };
    let nr = row("netresults", Value::Null);
    assert_eq!((nr["received"].as_u64(), nr["pending"].as_u64(), nr["rejected"].as_u64()), (Some(2), Some(2), Some(0)), "{nr}");
    let op = row("ontraport", Value::Null);
    assert_eq!((op["received"].as_u64(), op["succeeded"].as_u64(), op["rejected"].as_u64()), (Some(2), Some(2), Some(1)), "{op}");
    let crm = row("netresults", json!("crm"));
    assert_eq!((crm["received"].as_u64(), crm["pending"].as_u64()), (Some(2), Some(2)), "{crm}");

    let only = p.env.cli_json(&["stats", "--source", "ontraport", "--json"]);
    let only = only.as_array().unwrap();
    assert!(!only.is_empty() && only.iter().all(|r| r["source"] == "ontraport"), "{only:?}");

    let out = p.env.cli(&["stats"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("SOURCE") && out.stdout.contains("netresults") && out.stdout.contains("crm"), "{}", out.stdout);
}

#[test]
fn events_show_unknown_or_malformed_id_is_a_clear_error() {
    let p = populated();
    let missing = "evt_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let out = p.env.cli(&["events", "show", missing, "--json"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&format!("no event {missing}")), "{out:?}");
    assert!(out.stdout.is_empty(), "nothing printed as if found: {out:?}");

    let out = p.env.cli(&["events", "show", "not-an-id"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("`not-an-id` is not an event id"), "{out:?}");
}

#[test]
fn inspection_commands_without_a_database_say_so() {
    if sqlite_only("that a command never creates the database file") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    for args in [vec!["events", "list"], vec!["events", "show", "evt_01ARZ3NDEKTSV4RRFFQ69G5FAV"], vec!["stats", "--json"]] {
        let out = env.cli(&args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("there is no database file here"), "{args:?}: {out:?}");
        assert!(out.stderr.contains(env.db_path().to_str().unwrap()), "{args:?} names the path: {out:?}");
    }
    assert!(!env.db_path().exists(), "an inspection command must not create the database");

    let mut c = clean_command();
    c.args(["--config", "/nonexistent/hooktrail.toml", "events", "list"]);
    let out = run(c);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("/nonexistent/hooktrail.toml") && out.stderr.contains("not found"), "{out:?}");
}

#[test]
fn config_flag_works_after_the_subcommand_and_hooktrail_config_is_read() {
    let p = populated();
    let cfg = p.env.config_path().to_str().unwrap().to_string();

    let mut c = clean_command();
    c.args(["events", "list", "--json", "--config", &cfg]).envs(p.env.database_env());
    let out = run(c);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(ids_of(serde_json::from_str::<Value>(&out.stdout).unwrap().as_array().unwrap()).len(), 4);

    let mut c = clean_command();
    c.args(["stats", "--json"]).env("HOOKTRAIL_CONFIG", &cfg).current_dir(p.env.dir()).envs(p.env.database_env());
    let out = run(c);
    assert_eq!(out.code, 0, "{out:?}");
    let rows: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(rows.as_array().unwrap().iter().any(|r| r["source"] == "netresults"), "{rows}");
}

#[test]
fn durations_reaching_back_past_any_date_are_refused_with_a_message_not_a_panic() {
    // Issue 11 item 4: these overflowed `now - duration`; the CLI exited 101
    // and the admin API dropped the connection.
    let p = populated();
    let absurd = "99999999999h";
    for args in [
        vec!["prune", "--older-than", absurd],
        vec!["prune", "--older-than", absurd, "--dry-run"],
        vec!["events", "list", "--since", absurd],
        vec!["events", "replay", "--status", "failed", "--since", absurd],
        vec!["stats", "--since", absurd],
        vec!["export", "--since", absurd],
    ] {
        let out = p.env.cli(&args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(&format!("`{absurd}` reaches back further than a date can")), "{args:?}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    assert_eq!(p.list(&[]).len(), 4, "nothing was pruned");

    let ready: Value = serde_json::from_slice(&std::fs::read(p.env.ready_file()).unwrap()).unwrap();
    let admin = ready["admin"].as_str().expect("the admin address");
    let http = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
    for path in [format!("/api/events?since={absurd}"), format!("/api/stats?since={absurd}")] {
        let r = http.get(format!("http://{admin}{path}")).send().unwrap_or_else(|e| panic!("{path}: the connection failed: {e}"));
        assert_eq!(r.status().as_u16(), 400, "{path}");
        let body: Value = r.json().expect("a JSON error");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("since: ") && error.contains("reaches back further than a date can"), "{path}: {body}");
    }
    assert!(!p.d.log().contains("panicked"), "{}", p.d.log());
    assert_eq!(p.list(&["--since", "1h"]).len(), 4, "an ordinary --since still works");

    // A config duration that long is refused at load, naming its key.
    let env = TestEnv::new(&format!("{CONFIG}\n[processor]\nlease = \"{absurd}\"\n"));
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains(&format!("error: processor.lease: duration `{absurd}` is longer than 1000 years")), "{out:?}");
}

/// Issue 16: `STATUS` padding was ignored (its `Display` wrote past the
/// width), so BYTES and CONTENT-TYPE sat left of their headers. Every value
/// must start in its header's column, and LEAD shows the first email address
/// of the payload, whatever the sender calls the field.
#[test]
fn events_list_columns_start_under_their_headers_and_lead_shows_the_email() {
    let p = populated();
    let out = p.env.cli(&["events", "list"]);
    assert_eq!(out.code, 0, "{out:?}");
    let mut lines = out.stdout.lines();
    let header = lines.next().expect("a header line");
    let names = ["ID", "RECEIVED", "SOURCE", "STATUS", "BYTES", "CONTENT-TYPE", "LEAD"];
    let starts: Vec<usize> = names.iter().map(|n| header.find(n).unwrap_or_else(|| panic!("no {n} in {header:?}"))).collect();
    let rows: Vec<Vec<char>> = lines.map(|l| l.chars().collect()).collect();
    assert_eq!(rows.len(), 4, "{}", out.stdout);
    for row in &rows {
        let text: String = row.iter().collect();
        for (name, &at) in names.iter().zip(&starts) {
            if *name == "BYTES" {
                // Right-aligned: the number ends where the header ends.
                let end = at + name.len() - 1;
                assert!(row[end].is_ascii_digit() && row[end + 1] == ' ', "{name} not under its header:\n{header}\n{text}");
                continue;
            }
            assert!(row[at] != ' ' && (at == 0 || row[at - 1] == ' '), "{name} does not start under its header:\n{header}\n{text}");
        }
    }
    let lead = |id: &str| {
        let row = out.stdout.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("no row for {id}"));
        row.chars().skip(starts[6]).collect::<String>()
    };
    assert_eq!(lead(&p.ids[0]), "dgolden@mid-corp.com", "netresults: /submission_values/email_address/0");
    assert_eq!(lead(&p.ids[1]), "dgolden@mid-corp.com", "ontraport: /Email");
    assert_eq!(lead(&p.ids[2]), "ann@example.com");
    assert_eq!(lead(&p.ids[3]), "ann@example.com");
}

/// Issue 16: with no config found, the error names every place looked at,
/// in order, and how to pass one; nothing is created.
#[test]
fn a_missing_config_lists_every_place_looked_and_how_to_pass_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = clean_command();
    c.args(["events", "list"]).current_dir(dir.path());
    let out = run(c);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    for needle in
        ["--config PATH", "$HOOKTRAIL_CONFIG", "./config/hooktrail.toml", "/etc/hooktrail/hooktrail.toml", "hooktrail --config PATH"]
    {
        assert!(out.stderr.contains(needle), "stderr lacks {needle:?}: {}", out.stderr);
    }
    assert!(out.stderr.contains("not set"), "says HOOKTRAIL_CONFIG is unset: {}", out.stderr);

    let mut c = clean_command();
    c.args(["check-config"]).env("HOOKTRAIL_CONFIG", dir.path().join("absent.toml")).current_dir(dir.path());
    let out = run(c);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&format!("{}: not found", dir.path().join("absent.toml").display())), "{}", out.stderr);
    assert!(out.stderr.contains("not consulted ($HOOKTRAIL_CONFIG names the file)"), "{}", out.stderr);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing created");
}

/// Issue 16: every flag and argument of every command says what it does,
/// and every command's help ends with examples.
#[test]
fn every_flag_and_argument_in_help_has_a_description_and_each_help_ends_with_examples() {
    let commands: [&[&str]; 11] = [
        &[],
        &["serve"],
        &["check-config"],
        &["events"],
        &["events", "list"],
        &["events", "show"],
        &["events", "replay"],
        &["stats"],
        &["prune"],
        &["export"],
        &["import"],
    ];
    for cmd in commands {
        let mut c = clean_command();
        c.args(cmd).arg("-h");
        let out = run(c);
        assert_eq!(out.code, 0, "{cmd:?}: {out:?}");
        let mut in_args = false;
        let mut seen = 0;
        for line in out.stdout.lines() {
            if line == "Arguments:" || line == "Options:" {
                in_args = true;
                continue;
            }
            if !line.starts_with(' ') {
                in_args = false;
            }
            let item = line.trim_start();
            if in_args && (item.starts_with('-') || item.starts_with('<') || item.starts_with('[')) {
                seen += 1;
                assert!(item.contains("  ") && !item.ends_with(' '), "{cmd:?}: no description for {item:?}:\n{}", out.stdout);
            }
        }
        assert!(seen > 0, "{cmd:?}: no options found in:\n{}", out.stdout);
        let examples = out.stdout.rfind("Examples:").unwrap_or_else(|| panic!("{cmd:?}: no Examples in:\n{}", out.stdout));
        assert!(out.stdout[examples..].contains("hooktrail "), "{cmd:?}: the help ends with examples:\n{}", out.stdout);
    }
}

#[test]
fn prune_then_compact_gives_the_freed_space_back_to_the_file_system() {
    if sqlite_only("the size of the database file") {
        return;
    }
    // No routes: every event is done at once, so prune may delete it.
    let env = TestEnv::new(&open_source("bulk"));
    let mut d = env.start();
    let pad = "x".repeat(20_000);
    for n in 0..200 {
        let r = d.post_json("/hooks/bulk", &format!(r#"{{"n":{n},"pad":"{pad}"}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    d.sigterm();
    d.wait_exit(Duration::from_secs(30));
    let size = || std::fs::metadata(env.db_path()).expect("the database file").len();
    let full = size();
    assert!(full > 4_000_000, "200 events of 20 KB: {full} bytes");

    let out = env.cli(&["prune", "--older-than", "0s"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("pruned 200 finished event(s)"), "{out:?}");
    let out = env.cli(&["compact"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("returned the free pages") && out.stdout.contains("bytes after"), "{out:?}");
    let compacted = size();
    assert!(compacted < full / 10, "the file went from {full} to {compacted} bytes");
    assert_eq!(env.events().len(), 0, "nothing else changed");
}

/// README "Disk space" (PostgreSQL): `compact` vacuums the tables now (what
/// autovacuum does by itself later), says so, and changes no event.
#[test]
fn compact_on_postgresql_vacuums_the_tables_and_changes_no_event() {
    if backend() != Backend::Postgres {
        eprintln!("skipped on SQLite: prune_then_compact_gives_the_freed_space_back_to_the_file_system covers it");
        return;
    }
    let env = TestEnv::new(&open_source("bulk"));
    let mut d = env.start();
    for n in 0..20 {
        let r = d.post_json("/hooks/bulk", &format!(r#"{{"n":{n}}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    d.sigterm();
    d.wait_exit(Duration::from_secs(30));
    let out = env.cli(&["prune", "--older-than", "0s"]);
    assert_eq!(out.code, 0, "{out:?}");
    let left = env.events();
    let out = env.cli(&["compact"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("vacuumed the tables"), "{out:?}");
    assert_eq!(env.events(), left, "nothing else changed");
}

#[test]
fn the_daemon_gives_space_freed_by_prune_back_to_the_file_system_by_itself() {
    if sqlite_only("the size of the database file") {
        return;
    }
    let env = TestEnv::new(&open_source("bulk"));
    let d = env.start();
    let pad = "x".repeat(20_000);
    for n in 0..150 {
        let r = d.post_json("/hooks/bulk", &format!(r#"{{"n":{n},"pad":"{pad}"}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let size = || std::fs::metadata(env.db_path()).map(|m| m.len()).unwrap_or(0);
    wait_for("the events to reach the database file", Duration::from_secs(30), || size() > 3_000_000);
    let full = size();
    let out = env.cli(&["prune", "--older-than", "0s"]);
    assert!(out.stdout.contains("pruned 150 finished event(s)"), "{out:?}");
    // Housekeeping every 5 s returns up to 4 MiB, then the checkpoint cuts the file.
    let mut now = full;
    let shrank = wait_until(Duration::from_secs(60), || {
        now = size();
        now < full / 4
    });
    assert!(shrank, "the file stayed at {now} bytes (was {full}) with the daemon running");
    assert_eq!(env.events().len(), 0);
    drop(d);
}

const MOVED: &str = r#"
[sources.web]
auth = { type = "none" }
[sources.raw]
auth = { type = "none" }
accept_any = true
[sources.queued]
auth = { type = "none" }
[handlers.ok]
type = "shell"
command = ["/bin/true"]
[handlers.no]
type = "shell"
command = ["/bin/false"]
permanent_exit_codes = [1]
[handlers.later]
type = "shell"
command = ["/bin/false"]
initial_backoff = "1h"
[handlers.next]
type = "shell"
command = ["/bin/true"]
[[routes]]
source = "web"
handler = "ok"
[[routes]]
source = "web"
handler = "later"
[[routes]]
source = "raw"
handler = "no"
[[routes]]
source = "queued"
handler = "next"
"#;

/// README "Command line" (`import`): `export` of a SQLite store read by
/// `import` into the configured store (PostgreSQL under
/// `HOOKTRAIL_TEST_BACKEND=postgres`) gives the same `events show --json`
/// for every event: ids, times, body bytes, deliveries, attempts. Importing
/// again skips every id; a delivery that was waiting runs there.
#[test]
fn export_then_import_gives_the_same_events_and_an_id_already_there_is_skipped() {
    let from = TestEnv::on_sqlite(MOVED);
    let d = from.start();
    let web = d.post_json("/hooks/web", r#"{"email":"a@b.c","n":[1,2.5,null]}"#).id();
    let raw = d.post("/hooks/raw", "application/octet-stream", b"\x00\xff\xfe not utf-8".to_vec()).id();
    let form = d.post("/hooks/web", "application/x-www-form-urlencoded", "email=b%40c.d&tag=1&tag=2").id();
    for id in [&web, &form] {
        wait_for("a first attempt of `later`", SETTLE, || {
            let ev = from.show(id);
            ev["status"] == "retrying" && delivery(&ev, "ok")["status"] == "succeeded"
        });
    }
    assert_eq!(wait_settled(&from, &raw)["status"], "failed");
    drop(d);
    let d = from.daemon().arg("--role").arg("ingest").start();
    let queued = d.post_json("/hooks/queued", r#"{"q":1}"#).id();
    drop(d);
    let ids = [web, raw, form, queued.clone()];

    let export = from.cli(&["export"]);
    assert_eq!(export.code, 0, "{export:?}");
    let file = from.dir().join("events.jsonl");
    std::fs::write(&file, &export.stdout).unwrap();
    let file = file.to_str().unwrap();

    let to = TestEnv::new(MOVED);
    let out = to.cli(&["import", file]);
    assert_eq!((out.code, out.stdout.trim()), (0, "imported 4 event(s); skipped 0 already stored"), "{out:?}");
    for id in &ids {
        assert_eq!(to.show(id), from.show(id), "events show --json {id} after the move");
    }
    let again = to.cli(&["import", file]);
    assert_eq!((again.code, again.stdout.trim()), (0, "imported 0 event(s); skipped 4 already stored"), "{again:?}");
    assert_eq!(to.events().len(), 4, "nothing stored twice");

    let _d = to.start();
    let ev = wait_settled(&to, &queued);
    assert_eq!((ev["status"].as_str(), delivery(&ev, "next")["attempts"].as_array().map(Vec::len)), (Some("done"), Some(1)), "{ev:#}");
}

/// `import` of a line that is not an event names the line and fails; what
/// came before it is imported.
#[test]
fn import_names_the_line_that_is_not_an_event() {
    let from = TestEnv::on_sqlite(MOVED);
    let d = from.daemon().arg("--role").arg("ingest").start();
    let id = d.post_json("/hooks/queued", r#"{"q":1}"#).id();
    drop(d);
    let export = from.cli(&["export"]).stdout;
    let file = from.dir().join("events.jsonl");
    std::fs::write(&file, format!("{export}{{\"id\":\"nope\"}}\n")).unwrap();
    let to = TestEnv::new(MOVED);
    let out = to.cli(&["import", file.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("line 2: not an event as `export` writes it"), "{out:?}");
    assert_eq!(out.stdout.trim(), "imported 1 event(s); skipped 0 already stored");
    assert_eq!(to.show(&id)["id"], id.as_str());
}

/// `import` keeps several lines on their way at once; a bad line still
/// stops it there, after every line before it is stored, and nothing after
/// it is.
#[test]
fn import_of_many_events_stores_every_line_before_a_bad_one_and_none_after() {
    let from = TestEnv::on_sqlite(MOVED);
    let d = from.daemon().arg("--role").arg("ingest").start();
    let ids: Vec<String> = (0..150).map(|i| d.post_json("/hooks/queued", &format!(r#"{{"q":{i}}}"#)).id()).collect();
    let late = d.post_json("/hooks/queued", r#"{"q":"after the bad line"}"#).id();
    drop(d);
    let export = from.cli(&["export"]).stdout;
    let (before, after): (Vec<&str>, Vec<&str>) = export.lines().partition(|l| !l.contains(late.as_str()));
    assert_eq!((before.len(), after.len()), (150, 1), "one line per event");
    let file = from.dir().join("events.jsonl");
    std::fs::write(&file, format!("{}\n{{\"id\":\"nope\"}}\n{}\n", before.join("\n"), after[0])).unwrap();
    let to = TestEnv::new(MOVED);
    let out = to.cli(&["import", file.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("line 151: not an event as `export` writes it"), "{out:?}");
    assert_eq!(out.stdout.trim(), "imported 150 event(s); skipped 0 already stored");
    let stored: Vec<String> = to.events().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(stored.len(), 150, "{stored:?}");
    assert!(ids.iter().all(|id| stored.contains(id)), "every line before the bad one");
    assert!(!stored.contains(&late), "nothing after it");
}
