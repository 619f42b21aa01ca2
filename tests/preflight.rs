//! Handlers that cannot run, and failures, are loud: `check-config` names a
//! shell handler whose program is missing, not executable or has a missing
//! interpreter by its key path; `serve` still starts (a deploy may install the
//! script later) but logs it at ERROR, at start and on reload; a retry logs at
//! WARN and a delivery that ends `failed` at ERROR, its last attempt reading
//! `failure`; and no error text repeats the status or exit code recorded beside it.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const OPEN_SOURCE: &str = "[sources.s]\nauth = { type = \"none\" }\n";

/// Tiny backoff so every retry path ends in well under a second.
fn retry(max_attempts: u32) -> String {
    format!(
        "[processor]\npoll_interval = \"100ms\"\n\n\
         [retry]\nmax_attempts = {max_attempts}\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\n"
    )
}

fn shell(name: &str, command: &[&str]) -> String {
    let cmd: Vec<String> = command.iter().map(|c| toml_str(c)).collect();
    format!("[handlers.{name}]\ntype = \"shell\"\ncommand = [{}]\n\n[[routes]]\nsource = \"s\"\nhandler = \"{name}\"\n", cmd.join(", "))
}

fn write_script(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().expect("a script path has a parent")).expect("creating the script's directory");
    std::fs::write(path, text).expect("writing the script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The daemon's JSON log lines (`HOOKTRAIL_LOG_FORMAT=json`).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The `attempt finished` lines of one event, in order.
fn attempt_lines(log: &str, event_id: &str) -> Vec<Value> {
    json_lines(log).into_iter().filter(|l| l["message"] == "attempt finished" && l["event_id"] == event_id).collect()
}

#[test]
fn check_config_names_each_shell_handler_that_cannot_run_by_its_key_path() {
    let env = TestEnv::new("");
    let dir = env.dir();
    write_script(&dir.join("scripts/ok.sh"), "#!/bin/sh\nexit 0\n", 0o755);
    write_script(&dir.join("scripts/plain.sh"), "#!/bin/sh\nexit 0\n", 0o644);
    write_script(&dir.join("scripts/py.sh"), "#!/usr/bin/pythonX-hooktrail-none\nprint(1)\n", 0o755);
    write_script(&dir.join("scripts/envpy.sh"), "#!/usr/bin/env hooktrail-no-such-interpreter\nprint(1)\n", 0o755);
    write_script(&dir.join("scripts/crlf.sh"), "#!/bin/sh\r\nexit 0\r\n", 0o755);
    let body = [
        OPEN_SOURCE,
        // Relative paths are resolved against the config file's directory.
        &shell("good", &["./scripts/ok.sh"]),
        &shell("missing", &["./scripts/missing.sh"]),
        &shell("plain", &["./scripts/plain.sh"]),
        &shell("python", &["scripts/py.sh"]),
        &shell("envpy", &["./scripts/envpy.sh"]),
        &shell("crlf", &["./scripts/crlf.sh"]),
        &shell("bare", &["hooktrail-no-such-program"]),
        &shell("onpath", &["sh", "-c", "exit 0"]),
    ]
    .concat();
    let env_text = std::fs::read_to_string(env.config_path()).unwrap();
    env.write_config(&format!("{env_text}\n{body}"));

    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 1, "a handler that cannot run fails check-config: {out:?}");
    let d = dir.display();
    for line in [
        format!("error: handlers.missing.command[0]: {d}/scripts/missing.sh does not exist"),
        format!("error: handlers.plain.command[0]: {d}/scripts/plain.sh is not executable by this user"),
        format!("error: handlers.python.command[0]: {d}/scripts/py.sh: its interpreter /usr/bin/pythonX-hooktrail-none does not exist"),
        format!("error: handlers.envpy.command[0]: {d}/scripts/envpy.sh: its interpreter `hooktrail-no-such-interpreter` (through /usr/bin/env) is not found in $PATH"),
        format!("error: handlers.crlf.command[0]: {d}/scripts/crlf.sh: its `#!` line ends in a carriage return"),
        "error: handlers.bare.command[0]: `hooktrail-no-such-program` is not found in $PATH".to_string(),
    ] {
        assert!(out.stdout.lines().any(|l| l.starts_with(&line)), "missing {line:?} in:\n{}", out.stdout);
    }
    assert!(!out.stdout.contains("handlers.good") && !out.stdout.contains("handlers.onpath"), "runnable handlers are fine: {}", out.stdout);
    assert!(out.stdout.contains("6 problem(s)"), "{}", out.stdout);

    // Once every script is in place, the same config is ok.
    let fixed = format!("{env_text}\n{OPEN_SOURCE}{}", shell("good", &["./scripts/ok.sh"]));
    env.write_config(&fixed);
    let out = env.cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn serve_logs_a_missing_script_at_error_on_start_and_reload_and_runs_it_once_installed() {
    let env = TestEnv::new(&[OPEN_SOURCE, &retry(1000), &shell("late", &["./hooks/late.sh"])].concat());
    let script = env.dir().join("hooks/late.sh");
    let d = env.daemon().env("HOOKTRAIL_LOG_FORMAT", "json").start();
    let errors = |log: &str| {
        json_lines(log)
            .into_iter()
            .filter(|l| l["level"] == "ERROR" && l["message"].as_str().is_some_and(|m| m.contains("handlers.late.command[0]")))
            .collect::<Vec<_>>()
    };
    wait_for("the start-up ERROR line", Duration::from_secs(10), || errors(&d.log()).len() == 1);
    let first = errors(&d.log()).remove(0);
    // Resolved against the config file's directory (not the daemon's working directory).
    let shown = format!("{} does not exist", script.display());
    assert!(first["message"].as_str().is_some_and(|m| m.contains(&shown)), "{first}");

    let id = d.post_json("/hooks/s", r#"{"a":1}"#).id();
    let mut ev = Value::Null;
    wait_for("a failed attempt", SETTLE, || {
        ev = env.show(&id);
        ev["deliveries"][0]["attempts"].as_array().is_some_and(|a| !a.is_empty())
    });
    let a = &attempts(delivery(&ev, "late"))[0];
    assert_eq!(a["outcome"], "retry", "a missing script stays retryable: {a:#}");
    assert!(a["error"].as_str().is_some_and(|e| e.contains(&shown)), "{a:#}");

    signal(d.pid(), libc::SIGHUP);
    wait_for("the reload's ERROR line", Duration::from_secs(10), || errors(&d.log()).len() == 2);

    // A deploy installs the script: the next retry runs it.
    write_script(&script, "#!/bin/sh\necho installed\n", 0o755);
    let ev = wait_settled(&env, &id);
    let late = delivery(&ev, "late");
    assert_eq!(late["status"], "succeeded", "{ev:#}");
    assert_eq!(attempts(late).last().unwrap()["output"], "installed\n");
}

#[test]
fn a_failed_delivery_logs_its_retry_at_warn_and_its_end_at_error_and_reads_failure() {
    let env = TestEnv::new(&[OPEN_SOURCE, &retry(2), &shell("flaky", &["/bin/sh", "-c", "echo down; exit 1"])].concat());
    let d = env.daemon().env("HOOKTRAIL_LOG_FORMAT", "json").start();
    let id = d.post_json("/hooks/s", r#"{"a":1}"#).id();
    let ev = wait_settled(&env, &id);
    let mut lines = Vec::new();
    wait_for("both attempt lines", Duration::from_secs(10), || {
        lines = attempt_lines(&d.log(), &id);
        lines.len() == 2
    });
    assert_eq!((&lines[0]["level"], &lines[0]["outcome"], &lines[0]["handler"]), (&"WARN".into(), &"retry".into(), &"flaky".into()));
    assert!(lines[0]["next"].as_str().is_some_and(|n| n.starts_with("retry at ")), "{}", lines[0]);
    assert_eq!((&lines[1]["level"], &lines[1]["outcome"], &lines[1]["next"]), (&"ERROR".into(), &"failure".into(), &"failed".into()));
    assert_eq!(lines[1]["error"], "giving up after 2 attempt(s) (max_attempts = 2)", "{}", lines[1]);
    assert_eq!(lines[1]["exit_code"], 1, "{}", lines[1]);
    let flaky = delivery(&ev, "flaky");
    assert_eq!(flaky["status"], "failed", "{ev:#}");
    let a = attempts(flaky);
    assert_eq!(a.len(), 2, "{flaky:#}");
    assert_eq!((&a[0]["outcome"], &a[0]["exit_code"]), (&Value::from("retry"), &Value::from(1)));
    assert!(a[0]["error"].is_null(), "the exit code is recorded beside, not restated: {:#}", a[0]);
    assert_eq!(a[1]["outcome"], "failure", "the attempt that ends the delivery: {:#}", a[1]);
    assert_eq!(a[1]["error"], "giving up after 2 attempt(s) (max_attempts = 2)");
}

#[test]
fn an_http_status_is_written_once_not_again_in_the_error() {
    let peer = FakePeer::start(|_, _| PeerReply::new(503, "busy"));
    let handler =
        format!("[handlers.fwd]\ntype = \"http\"\nurl = {}\n\n[[routes]]\nsource = \"s\"\nhandler = \"fwd\"\n", toml_str(&peer.url("/in")));
    let env = TestEnv::new(&[OPEN_SOURCE, &retry(2), &handler].concat());
    let d = env.start();
    let id = d.post_json("/hooks/s", r#"{"a":1}"#).id();
    let ev = wait_settled(&env, &id);
    let a = attempts(delivery(&ev, "fwd"));
    assert_eq!(a.len(), 2, "{ev:#}");
    for at in a {
        assert_eq!(at["http_status"], 503);
        assert!(!at["error"].as_str().unwrap_or("").contains("503"), "{at:#}");
    }
    assert_eq!(a[1]["error"], "giving up after 2 attempt(s) (max_attempts = 2)");
    let shown = env.cli(&["events", "show", &id]);
    assert_eq!(shown.code, 0, "{shown:?}");
    assert!(shown.stdout.contains("HTTP 503"), "{}", shown.stdout);
    for line in shown.stdout.lines() {
        assert!(line.matches("HTTP 503").count() <= 1, "said twice: {line:?}");
    }
}

#[test]
fn a_transport_error_does_not_repeat_the_handlers_url() {
    // A port with nothing listening: bind, note, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{closed}/in?key=sekrit-in-url");
    let handler = format!("[handlers.fwd]\ntype = \"http\"\nurl = {}\n\n[[routes]]\nsource = \"s\"\nhandler = \"fwd\"\n", toml_str(&url));
    let env = TestEnv::new(&[OPEN_SOURCE, &retry(1), &handler].concat());
    let d = env.start();
    let id = d.post_json("/hooks/s", r#"{"a":1}"#).id();
    let ev = wait_settled(&env, &id);
    let a = attempts(delivery(&ev, "fwd"));
    assert_eq!(a.len(), 1, "{ev:#}");
    let error = a[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("could not connect"), "{error}");
    assert!(!error.contains("sekrit") && !error.contains("/in"), "the URL is the handler's own, not repeated: {error}");
    assert!(!d.log().contains("sekrit"), "nor logged");
}
