//! Durable ingest without waiting on the disk in the writer (README
//! "Durability"): commits run with `synchronous=NORMAL`, and no 200 is sent
//! before an `fdatasync` of the write-ahead log that began after its commit
//! completed. The daemon runs with an injected slow sync
//! (`HOOKTRAIL_TEST_SYNC_DELAY_MS`) and writes its order of events to a trace
//! file (`HOOKTRAIL_TEST_SYNC_TRACE`): `commit N` when commit N returned,
//! `sync begin N` / `sync end N` around a sync covering commits up to N,
//! `ack N` when commit N's answers are released.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

/// Long enough that an answer sent right after the commit would certainly
/// arrive before the sync ends.
const SYNC_DELAY_MS: &str = "300";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Commit(u64),
    SyncBegin(u64),
    SyncEnd(u64),
    Ack(u64),
}

fn trace(path: &Path) -> Vec<Step> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (what, n) = l.rsplit_once(' ').unwrap_or_else(|| panic!("trace line {l:?}"));
            let n: u64 = n.parse().unwrap_or_else(|_| panic!("trace line {l:?}"));
            match what {
                "commit" => Step::Commit(n),
                "sync begin" => Step::SyncBegin(n),
                "sync end" => Step::SyncEnd(n),
                "ack" => Step::Ack(n),
                _ => panic!("unknown trace line {l:?}"),
            }
        })
        .collect()
}

fn last_commit(steps: &[Step]) -> u64 {
    steps.iter().filter_map(|s| if let Step::Commit(n) = s { Some(*n) } else { None }).max().unwrap_or(0)
}

/// Highest commit covered by a completed sync.
fn synced_up_to(steps: &[Step]) -> u64 {
    steps.iter().filter_map(|s| if let Step::SyncEnd(n) = s { Some(*n) } else { None }).max().unwrap_or(0)
}

/// The rule over a whole trace: every `sync begin N` comes after `commit N`
/// (it began after that commit returned), and every `ack N` after a
/// `sync end M` with M >= N (a sync covering the commit completed first).
/// (Syncs may overlap: a sync covering up to M began after commit M
/// returned, so once it completed every commit up to M is on disk.)
fn assert_order(steps: &[Step]) {
    let mut committed = 0;
    let mut synced = 0;
    let mut open_syncs = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Commit(n) => committed = committed.max(n),
            Step::SyncBegin(n) => {
                assert!(n <= committed, "step {i}: sync begin {n} before commit {n} returned: {steps:?}");
                open_syncs.push(n);
            }
            Step::SyncEnd(n) => {
                let at = open_syncs.iter().position(|&b| b == n);
                assert!(at.is_some(), "step {i}: sync end {n} without its begin: {steps:?}");
                open_syncs.remove(at.expect("checked"));
                synced = synced.max(n);
            }
            Step::Ack(n) => {
                assert!(n <= synced, "step {i}: ack {n} before a sync covering it completed (synced up to {synced}): {steps:?}")
            }
        }
    }
}

#[test]
fn no_200_precedes_the_completion_of_a_sync_that_covers_its_commit() {
    if sqlite_only("the SQLite writer's WAL sync (PostgreSQL acknowledges after its own synchronous commit)") {
        return;
    }
    let env = TestEnv::new(&open_source("lead"));
    let trace_path = env.dir().join("sync-trace.txt");
    let d = env
        .daemon()
        .env("HOOKTRAIL_TEST_SYNC_DELAY_MS", SYNC_DELAY_MS)
        .env("HOOKTRAIL_TEST_SYNC_TRACE", &trace_path.to_string_lossy())
        .start();

    // One at a time, so this request's commit is the next one in the trace:
    // when its 200 arrives, a sync covering that commit has completed.
    let mut acked = Vec::new();
    for n in 0..5 {
        let before = last_commit(&trace(&trace_path));
        let r = d.post_json("/hooks/lead", &json!({ "n": n, "email": format!("seq{n}@example.com") }).to_string());
        assert_eq!(r.status, 200, "{}", r.text());
        let at_200 = trace(&trace_path);
        let mine = before + 1;
        assert_eq!(last_commit(&at_200), mine, "one commit per request (nothing else writes here): {at_200:?}");
        assert!(synced_up_to(&at_200) >= mine, "the 200 for commit {mine} arrived before a sync covering it completed: {at_200:?}");
        acked.push(r.id());
    }

    // Many at once: commits overlap the syncs; the order still holds for each.
    let ids = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for client in 0..16 {
            let (d, ids) = (&d, &ids);
            s.spawn(move || {
                for n in 0..8 {
                    let body = json!({ "client": client, "n": n, "email": format!("c{client}-{n}@example.com") });
                    let r = d.post_json("/hooks/lead", &body.to_string());
                    assert_eq!(r.status, 200, "{}", r.text());
                    ids.lock().unwrap().push(r.id());
                }
            });
        }
    });
    acked.extend(ids.into_inner().unwrap());

    let steps = trace(&trace_path);
    assert_order(&steps);
    let acks = steps.iter().filter(|s| matches!(s, Step::Ack(_))).count() as u64;
    assert_eq!(acks, last_commit(&steps), "every commit is acknowledged once: {steps:?}");

    drop(d);
    let stored: std::collections::HashSet<String> =
        env.events().iter().map(|e| e["id"].as_str().expect("an event has an id").to_string()).collect();
    for id in &acked {
        assert!(stored.contains(id), "acknowledged event {id} is not stored");
    }
    assert_eq!(stored.len(), acked.len());
}

/// The `-wal` file is where every commit is until a checkpoint copies it
/// into the database: once it is deleted (or replaced) under the daemon, a
/// sync of it makes nothing durable at the configured path, so nothing more
/// is acknowledged. (What the deleted log held and no checkpoint had copied
/// yet is lost with it: the daemon can only stop it from getting worse.)
#[test]
fn deleting_the_write_ahead_log_while_running_gets_503_and_nothing_more_is_acknowledged() {
    if sqlite_only("the SQLite write-ahead log file") {
        return;
    }
    let env = TestEnv::new(&open_source("lead"));
    let mut wal = env.db_path().into_os_string();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let d = env.start();
    let r = d.post_json("/hooks/lead", r#"{"n":"before"}"#);
    assert_eq!(r.status, 200, "{}", r.text());

    std::fs::remove_file(&wal).expect("deleting the write-ahead log");
    let refused = d.post_json("/hooks/lead", r#"{"n":"refused"}"#);
    assert_eq!(refused.status, 503, "a commit into a log no longer at its path is not acknowledged: {}", refused.text());
    assert!(refused.error().contains("deleted or replaced"), "{}", refused.text());
    assert!(refused.header("retry-after").is_some(), "503 carries Retry-After");
    let again = d.post_json("/hooks/lead", r#"{"n":"refused"}"#);
    assert_eq!(again.status, 503, "the fault is sticky: {}", again.text());
    let wal_text = wal.display().to_string();
    wait_for("an ERROR line naming the write-ahead log", std::time::Duration::from_secs(10), || {
        d.log().lines().any(|l| l.contains("ERROR") && l.contains(&wal_text))
    });

    drop(d);
    let _d = env.start();
    let stored = env.events();
    assert!(!stored.iter().any(|e| e["payload"]["n"] == "refused"), "a refused event is stored: {stored:?}");
}
