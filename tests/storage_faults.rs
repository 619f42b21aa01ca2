//! Storage faults that must never turn into a 200 that is lost (README
//! "Storage faults"): the database file deleted or moved while the daemon
//! runs, a damaged page in the middle of the file, and a filesystem that
//! stops answering. Each test runs the real binary and checks the status and
//! message, that nothing refused was stored, that nothing acknowledged was
//! lost, and that nothing panicked.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const CONFIG: &str = "[sources.forms]\nauth = { type = \"none\" }\n";

/// GET on the admin listener of the daemon last started in `env`.
fn admin_get(env: &TestEnv, path: &str) -> Resp {
    let ready: Value =
        serde_json::from_slice(&std::fs::read(env.ready_file()).expect("reading the ready file")).expect("ready file is JSON");
    let addr = ready["admin"].as_str().unwrap_or_else(|| panic!("ready file has no \"admin\" address: {ready}"));
    let http = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("building the admin client");
    let r = http.get(format!("http://{addr}{path}")).send().unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Resp { status, headers, body: r.bytes().expect("reading the admin answer").to_vec() }
}

/// Posts `n` events and returns their ids, each answered 200.
fn post_many(d: &Daemon, n: usize) -> Vec<String> {
    (0..n).map(|i| d.post_json("/hooks/forms", &format!(r#"{{"n":{i}}}"#)).id()).collect()
}

/// `path` with `suffix` appended (`db.sqlite` → `db.sqlite-wal`).
fn side(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Runs `hooktrail serve`, which must exit (non-zero) on its own within the
/// start deadline; returns its stderr.
fn serve_must_refuse(env: &TestEnv) -> String {
    let out = env.dir().join("refused.log");
    let log = std::fs::File::create(&out).expect("creating the log");
    let mut child = env.command(&["serve"]).stdout(log.try_clone().expect("cloning the log")).stderr(log).spawn().expect("spawning serve");
    let mut status = None;
    let exited = wait_until(START_TIMEOUT, || {
        status = child.try_wait().expect("polling serve");
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(exited, "serve started instead of refusing; its log:\n{text}");
    assert!(!status.expect("checked above").success(), "serve exited 0 instead of refusing: {text}");
    text
}

/// Checks what a daemon says once its database file is gone from its path.
fn assert_lost(env: &TestEnv, d: &Daemon) {
    let db = env.db_path().display().to_string();
    let r = d.post_json("/hooks/forms", r#"{"n":"right after"}"#);
    assert_eq!(r.status, 503, "an event written into a file that is no longer at its path is not acknowledged: {}", r.text());
    assert!(r.error().contains("deleted or replaced"), "{}", r.text());
    assert!(!r.error().contains(&db), "the sender is not told the file path: {}", r.text());
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");

    let ready = admin_get(env, "/readyz");
    assert_eq!(ready.status, 503, "{}", ready.text());
    let storage = ready.json()["storage"].as_str().unwrap_or_default().to_string();
    assert!(
        storage.contains(&format!("database file `{db}` was deleted or replaced while open; restart hooktrail after restoring it")),
        "/readyz names the fault: {storage}"
    );
    wait_for("the fault logged at ERROR", Duration::from_secs(10), || d.log().lines().any(|l| l.contains("ERROR") && l.contains(&db)));
}

/// Starts a daemon on the database as it is now: every event in `acked` is
/// there, none posted as `{"n":"refused"}` is, and no daemon panicked.
fn assert_restart_has_every_acked_event(env: &TestEnv, acked: &[String]) {
    let _d = env.start();
    let stored = env.events();
    for id in acked {
        assert!(stored.iter().any(|e| e["id"] == id.as_str()), "acknowledged event {id} is missing");
    }
    assert!(!stored.iter().any(|e| e["payload"]["n"] == "refused"), "a refused event was stored");
    assert!(!env.log().contains("panicked"), "{}", env.log());
}

#[test]
fn deleting_the_database_file_while_running_gets_503_and_loses_no_acknowledged_event() {
    if sqlite_only("the database file and the SQLite writer's fault hooks") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    let mut d = env.start();
    let acked = post_many(&d, 25);

    std::fs::remove_file(env.db_path()).expect("deleting the database file");
    assert_lost(&env, &d);
    // Known lost by now: this one is refused before anything is written.
    let refused = d.post_json("/hooks/forms", r#"{"n":"refused"}"#);
    assert_eq!(refused.status, 503, "{}", refused.text());

    // While the daemon runs, the deleted file is still open: the log says
    // how to copy it back, and copying it is how nothing is lost.
    let fd = deleted_fd(d.pid(), &env.db_path()).expect("the daemon still has the deleted file open");
    let how = format!("/proc/{}/fd/", d.pid());
    wait_for("the ERROR line to say how to recover", Duration::from_secs(15), || d.log().contains(&how));
    let saved = env.dir().join("saved.sqlite");
    std::fs::copy(&fd, &saved).expect("copying the deleted file from /proc");

    // A clean stop leaves the -wal file in place (closing would have
    // checkpointed into the deleted file and removed it) ...
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    assert!(side(&env.db_path(), "-wal").exists(), "the write-ahead log is kept");
    // ... so a restart refuses to start empty beside it.
    let why = serve_must_refuse(&env);
    assert!(why.contains("the database file is missing but its write-ahead log"), "{why}");
    assert!(!env.db_path().exists(), "the refused start created no empty database");

    // Put back, every acknowledged event is there; the refused one is not.
    std::fs::rename(&saved, env.db_path()).expect("putting the file back");
    assert_restart_has_every_acked_event(&env, &acked);
}

#[test]
fn moving_the_database_file_while_running_gets_503_and_a_restart_is_refused_until_it_is_back() {
    if sqlite_only("the database file and the SQLite writer's fault hooks") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    let mut d = env.start();
    let acked = post_many(&d, 25);

    let moved = env.dir().join("moved.sqlite");
    std::fs::rename(env.db_path(), &moved).expect("moving the database file");
    assert_lost(&env, &d);
    let refused = d.post_json("/hooks/forms", r#"{"n":"refused"}"#);
    assert_eq!(refused.status, 503, "{}", refused.text());

    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let why = serve_must_refuse(&env);
    let db = env.db_path().display().to_string();
    assert!(why.contains(&format!("cannot open database `{db}`")), "{why}");
    assert!(why.contains(&format!("`{db}-wal`")) && why.contains("Put the database file back"), "{why}");
    assert!(!env.db_path().exists(), "the refused start created no empty database");

    std::fs::rename(&moved, env.db_path()).expect("moving the file back");
    assert_restart_has_every_acked_event(&env, &acked);
}

#[test]
fn a_commit_that_lands_in_a_file_deleted_meanwhile_is_not_acknowledged() {
    if sqlite_only("the database file and the SQLite writer's fault hooks") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    // Every commit waits 2 s before COMMIT: the file is deleted while this
    // request's transaction is open, and its COMMIT lands in the deleted file.
    let d = env.daemon().env("HOOKTRAIL_TEST_COMMIT_DELAY_MS", "2000").start();
    let r = std::thread::scope(|s| {
        let post = s.spawn(|| d.post_json("/hooks/forms", r#"{"n":"in flight"}"#));
        std::fs::remove_file(env.db_path()).expect("deleting the database file");
        post.join().expect("the request thread")
    });
    assert_eq!(r.status, 503, "a commit into a file no longer at its path is not durable there: {}", r.text());
    assert!(r.error().contains("deleted or replaced"), "{}", r.text());
    assert!(!env.log().contains("panicked"), "{}", env.log());
}

/// The `/proc/PID/fd/N` through which `pid` still holds `path` after its deletion.
fn deleted_fd(pid: u32, path: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(path.parent()?).ok()?;
    let want = format!("{} (deleted)", dir.join(path.file_name()?).display());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want))
        .map(|e| e.path())
}

#[test]
fn a_damaged_page_in_the_middle_of_the_file_is_found_at_start_and_ingest_answers_503() {
    if sqlite_only("the database file and the SQLite writer's fault hooks") {
        return;
    }
    let env = TestEnv::new("[sources.forms]\nauth = { type = \"none\" }\n[sources.late]\nauth = { type = \"none\" }\n");
    let (ids, page) = stored_then_damaged(&env);
    let d = env.start();
    let r = d.post_json("/hooks/late", r#"{"n":"late"}"#);
    assert_eq!(r.status, 503, "page {page} is damaged, yet: {}", r.text());
    assert!(r.error().contains("the database is damaged"), "{}", r.text());
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");

    let ready = admin_get(&env, "/readyz");
    assert_eq!(ready.status, 503, "{}", ready.text());
    let storage = ready.json()["storage"].as_str().unwrap_or_default().to_string();
    assert!(storage.contains("is damaged (quick_check:") && storage.contains("Recovering a damaged database"), "{storage}");
    assert!(d.log().lines().any(|l| l.contains("ERROR") && l.contains("is damaged")), "{}", d.log());

    // Nothing was stored for the refused request, and what is readable
    // still reads (the first event lives pages away from the damage).
    assert!(env.events_where(&["--source", "late"]).is_empty(), "a refused event was stored");
    assert_eq!(env.show(&ids[0])["payload"]["n"], 0);

    // `export` saves every readable event, reading around the damaged page,
    // and says on stderr that some could not be read.
    let out = env.cli(&["export"]);
    assert_eq!(out.code, 0, "{out:?}");
    let exported: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).expect("export writes JSON lines")).collect();
    assert!(exported.len() < ids.len() && exported.len() >= ids.len() - 4, "all but the few events on page {page}: {}", exported.len());
    assert!(exported.iter().all(|e| ids.contains(&e["id"].as_str().unwrap_or_default().to_string())));
    assert!(out.stderr.contains("could not be read (damaged pages)"), "{}", out.stderr);
    assert!(!env.log().contains("panicked") && !out.stderr.contains("panicked"), "{}", env.log());
}

/// Stores 400 events to source `forms`, stops the daemon and damages a page
/// in the middle of the file; returns the ids and the page's number.
fn stored_then_damaged(env: &TestEnv) -> (Vec<String>, usize) {
    let mut d = env.start();
    // Rows of ~1.2 KB: three to a 4 KiB page, so the events table spans
    // over a hundred pages and one in the middle holds only events.
    let pad = "x".repeat(1200);
    let ids: Vec<String> = (0..400).map(|i| d.post_json("/hooks/forms", &format!(r#"{{"n":{i},"pad":"{pad}"}}"#)).id()).collect();
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let page = damage_a_table_page(&env.db_path());
    (ids, page)
}

/// Overwrites with garbage the first table b-tree leaf page (type 0x0D) at
/// or after the middle of the file; returns its number (1-based).
fn damage_a_table_page(db: &Path) -> usize {
    let mut bytes = std::fs::read(db).expect("reading the database");
    let size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        n => n as usize,
    };
    let pages = bytes.len() / size;
    assert!(pages > 40, "the database is big enough to have a middle ({pages} pages)");
    let index = (pages / 2..pages).find(|&i| bytes[i * size] == 0x0D).expect("a table leaf page in the second half");
    for (k, b) in bytes[index * size..(index + 1) * size].iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(31).wrapping_add(7);
    }
    std::fs::write(db, bytes).expect("writing the damaged database");
    index + 1
}

#[test]
fn a_commit_stuck_past_commit_timeout_answers_503_and_metrics_still_answer() {
    if sqlite_only("the database file and the SQLite writer's fault hooks") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    // The test hooks stall every commit and every read far longer than any
    // deadline here, as a frozen filesystem would.
    let d = env
        .daemon()
        .env("HOOKTRAIL__STORAGE__COMMIT_TIMEOUT", "1s")
        .env("HOOKTRAIL_TEST_COMMIT_DELAY_MS", "600000")
        .env("HOOKTRAIL_TEST_READ_DELAY_MS", "600000")
        .start();

    let r = d.post_json("/hooks/forms", r#"{"n":"stuck"}"#);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error(), "storage unavailable: the commit did not finish within 1s; retry shortly");
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");

    // The scrape answers (the HTTP client gives up after 30 s) and says its
    // queue figures are missing rather than waiting for them.
    let m = admin_get(&env, "/metrics");
    assert_eq!(m.status, 200, "{}", m.text());
    assert!(m.text().contains("\nhooktrail_queue_depth_age_seconds -1\n"), "{}", m.text());
    assert!(m.text().contains("hooktrail_backlog_deliveries"), "{}", m.text());
    let ready = admin_get(&env, "/readyz");
    assert_eq!(ready.status, 503, "a writer that cannot commit is not ready: {}", ready.text());

    // The stuck transaction never committed: nothing is stored.
    d.kill9();
    assert!(env.events().is_empty(), "{:?}", env.events());
    assert!(!env.log().contains("panicked"), "{}", env.log());
}

#[test]
fn storage_commit_timeout_must_be_a_positive_duration() {
    for (value, problem) in [("\"0s\"", "storage.commit_timeout: must be more than 0"), ("\"soon\"", "invalid duration `soon`")] {
        let env = TestEnv::raw(&format!(
            "[storage]\npath = \"db.sqlite\"\ncommit_timeout = {value}\n[sources.a]\nauth = {{ type = \"none\" }}\n"
        ));
        let out = env.cli(&["check-config"]);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stdout.contains(problem), "{out:?}");
    }
}
