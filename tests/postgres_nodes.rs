//! Several nodes on one PostgreSQL database (README "Several nodes:
//! PostgreSQL"), with real processes: `serve --role ingest` and `--role
//! process` daemons sharing one database, killed with `kill -9` mid-work.
//!
//! PostgreSQL only: run with `HOOKTRAIL_TEST_BACKEND=postgres` (CI does);
//! on the default SQLite run each test says it was skipped and returns.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;

/// How long events may take to be processed across nodes (debug build, busy 2-core box).
const SETTLE_ALL: Duration = Duration::from_secs(60);

fn postgres_only() -> bool {
    if backend() == Backend::Postgres {
        return false;
    }
    eprintln!("skipped: several nodes share a database only on PostgreSQL (run with HOOKTRAIL_TEST_BACKEND=postgres)");
    true
}

/// A shell handler appending `$HOOKTRAIL_EVENT_ID` to `runs` (one line per
/// attempt; O_APPEND writes this short are atomic).
fn recording_handler(runs: &std::path::Path) -> String {
    format!(
        "[handlers.record]\ntype = \"shell\"\ncommand = [\"/bin/sh\", \"-c\", \"echo $HOOKTRAIL_EVENT_ID >> {}\"]\nconcurrency = 4\n\
         [[routes]]\nsource = \"in\"\nhandler = \"record\"\n",
        runs.display()
    )
}

fn runs_of(path: &std::path::Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *seen.entry(line.to_string()).or_default() += 1;
    }
    seen
}

#[test]
fn two_ingest_and_two_process_nodes_run_every_acked_event_exactly_once() {
    if postgres_only() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let env = TestEnv::new(&format!(
        "[processor]\npoll_interval = \"200ms\"\n[sources.in]\nauth = {{ type = \"none\" }}\n{}",
        recording_handler(&runs)
    ));
    let ingest = [env.daemon().arg("--role").arg("ingest").start(), env.daemon().arg("--role").arg("ingest").start()];
    let _process = [env.daemon().arg("--role").arg("process").start(), env.daemon().arg("--role").arg("process").start()];

    // Both listeners at once, 4 clients each.
    let acked: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|client| {
                let d = &ingest[client % 2];
                s.spawn(move || {
                    (0..25).map(|n| d.post_json("/hooks/in", &format!(r#"{{"client":{client},"n":{n}}}"#)).id()).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(acked.len(), 200);
    assert_eq!(acked.iter().collect::<BTreeSet<_>>().len(), 200, "every event got its own id");

    let want: BTreeSet<String> = acked.iter().cloned().collect();
    let mut seen = BTreeMap::new();
    let all_ran = wait_until(SETTLE_ALL, || {
        seen = runs_of(&runs);
        want.iter().all(|id| seen.contains_key(id))
    });
    assert!(all_ran, "{} of 200 acknowledged events ran; log:\n{}", want.iter().filter(|id| seen.contains_key(*id)).count(), env.log());
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "each delivery runs exactly once when nothing crashes: {twice:?}");
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want, "nothing ran that was not acknowledged");
    wait_for("every event to show done", SETTLE_ALL, || env.events().iter().all(|e| e["status"] == "done"));
    assert_eq!(env.events().len(), 200);
}

#[test]
fn the_same_dedup_key_posted_to_two_nodes_at_once_stores_one_event() {
    if postgres_only() {
        return;
    }
    let env = TestEnv::new("[sources.in]\nauth = { type = \"none\" }\ndedup = { key = \"/order\", window = \"1h\" }\n");
    let nodes = [env.daemon().arg("--role").arg("ingest").start(), env.daemon().arg("--role").arg("ingest").start()];
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(2));
        let answers: Vec<Resp> = std::thread::scope(|s| {
            let hs: Vec<_> = nodes
                .iter()
                .map(|d| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        d.post_json("/hooks/in", &format!(r#"{{"order":"o-{round}"}}"#))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let statuses: BTreeSet<String> = answers.iter().map(|r| r.json()["status"].as_str().unwrap_or("?").to_string()).collect();
        assert!(answers.iter().all(|r| r.status == 200), "round {round}: {:?}", answers.iter().map(Resp::text).collect::<Vec<_>>());
        assert_eq!(answers[0].id(), answers[1].id(), "round {round}: both nodes answer with the one event's id");
        assert_eq!(statuses, BTreeSet::from(["accepted".to_string(), "duplicate".to_string()]), "round {round}");
    }
    assert_eq!(env.events().len(), 20, "one event per key");
    assert_eq!(env.stat("in", "duplicates"), 20);
}

/// A 2 s lease, a 200 ms poll and one shell handler `slow` running `script`
/// (with a 10 min timeout) for source `in`.
fn slow_shell_env(script: &str) -> TestEnv {
    TestEnv::new(&format!(
        "[processor]\npoll_interval = \"200ms\"\nlease = \"2s\"\n[sources.in]\nauth = {{ type = \"none\" }}\n\
         [handlers.slow]\ntype = \"shell\"\ncommand = [\"/bin/sh\", \"-c\", {script}]\ntimeout = \"10m\"\n\
         [[routes]]\nsource = \"in\"\nhandler = \"slow\"\n",
        script = toml_str(script)
    ))
}

#[test]
fn kill9_of_a_process_node_mid_attempt_runs_it_on_the_other_after_the_lease_with_the_interrupted_attempt() {
    if postgres_only() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let second: PathBuf = dir.path().join("second");
    // The first attempt marks that it began, then hangs; the next one succeeds.
    let script = format!(
        "if [ -e {started} ]; then echo second run > {second}; exit 0; fi; touch {started}; sleep 300",
        started = started.display(),
        second = second.display()
    );
    let env = slow_shell_env(&script);
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let first = env.daemon().arg("--role").arg("process").start();
    let id = ingest.post_json("/hooks/in", r#"{"n":1}"#).id();
    wait_for("the first attempt to begin", SETTLE_ALL, || started.exists());
    // Its mark (`Store::started`) is committed lazily; kill the node only
    // once it is, so the attempt counts as begun, not merely claimed.
    let db = env.postgres().expect("a PostgreSQL env");
    wait_for("the attempt's begun mark", SETTLE_ALL, || db.scalar("SELECT held FROM deliveries").as_deref() == Some("false"));
    first.kill9();

    let _other = env.daemon().arg("--role").arg("process").start();
    wait_for("the other node to run the delivery", SETTLE_ALL, || second.exists());
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let attempts = delivery(&ev, "slow")["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2, "{ev:#}");
    assert_eq!(attempts[0]["outcome"], "retry", "the interrupted attempt is in the history: {ev:#}");
    assert!(attempts[0]["error"].as_str().is_some_and(|e| e.contains("lease")), "{ev:#}");
    assert_eq!((attempts[1]["number"].as_u64(), attempts[1]["outcome"].as_str()), (Some(2), Some("success")), "{ev:#}");
}

#[test]
fn the_password_is_never_in_an_error_or_log_when_the_database_refuses_it() {
    if postgres_only() {
        return;
    }
    let env = TestEnv::new("[sources.in]\nauth = { type = \"none\" }\n");
    let good = env.database_env().expect("a PostgreSQL env").1;
    let wrong = good.replace("hooktrail-test-pw", "Wr0ng-S3cret-pw");
    assert_ne!(good, wrong, "the test server's URL carries the password .ci/postgres.sh sets");
    for args in [&["serve"][..], &["events", "list"][..], &["stats"][..]] {
        let mut c = env.command(args);
        c.env(PG_URL_VAR, &wrong).env("RUST_LOG", "trace");
        let out = run(c);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("password authentication failed"), "{args:?} says why: {out:?}");
        assert!(out.stderr.contains(PG_URL_VAR), "{args:?} names the variable: {out:?}");
        assert!(!format!("{out:?}").contains("Wr0ng-S3cret-pw"), "{args:?}: the password is never shown: {out:?}");
    }
    let mut c = env.command(&["check-config"]);
    c.env(PG_URL_VAR, &wrong);
    let out = run(c);
    assert!(!format!("{out:?}").contains("Wr0ng-S3cret-pw"), "check-config: {out:?}");
}

/// A PostgreSQL server of the test's own (`.ci/postgres.sh`), for a test
/// that stops it: stopping the shared one would fail every other test.
/// Stopped and removed on drop.
struct OwnServer {
    dir: tempfile::TempDir,
    port: u16,
    url: String,
}

impl OwnServer {
    fn script(cmd: &str, dir: &std::path::Path, port: u16) -> String {
        let out = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres.sh"))
            .args([cmd, &dir.join("pg").to_string_lossy(), &port.to_string()])
            .output()
            .expect("running .ci/postgres.sh");
        assert!(out.status.success(), ".ci/postgres.sh {cmd} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn start() -> OwnServer {
        let dir = tempfile::Builder::new().prefix("hooktrail-own-pg-").tempdir().unwrap();
        // World-readable, so the server (as `postgres` under root) may enter it.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = Self::script("start", dir.path(), port);
        OwnServer { dir, port, url }
    }

    fn halt(&self) {
        Self::script("halt", self.dir.path(), self.port);
    }

    fn resume(&self) {
        Self::script("resume", self.dir.path(), self.port);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres.sh"))
            .args(["stop", &self.dir.path().join("pg").to_string_lossy()])
            .output();
    }
}

/// `/readyz` of the daemon whose ready file `env` holds.
fn readyz(env: &TestEnv) -> u16 {
    let ready: serde_json::Value = serde_json::from_slice(&std::fs::read(env.ready_file()).unwrap()).unwrap();
    let admin = ready["admin"].as_str().expect("the ready file names the admin listener");
    reqwest::blocking::get(format!("http://{admin}/readyz")).map(|r| r.status().as_u16()).unwrap_or(0)
}

#[test]
fn postgresql_stopped_under_load_gets_503_never_200_loses_nothing_and_processing_resumes() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    if postgres_only() {
        return;
    }
    let server = OwnServer::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let env = TestEnv::on_postgres_server(
        &server.url,
        &format!("[processor]\npoll_interval = \"200ms\"\n[sources.in]\nauth = {{ type = \"none\" }}\n{}", recording_handler(&runs)),
    );
    let d = env.start();
    assert_eq!(readyz(&env), 200);

    let (acks, refused, stop) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicBool::new(false));
    let acked = Mutex::new(Vec::new());
    let unexpected = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for client in 0..4 {
            let (d, acks, refused, stop, acked, unexpected) = (&d, &acks, &refused, &stop, &acked, &unexpected);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let r = d.post_json("/hooks/in", &format!(r#"{{"client":{client},"n":{n}}}"#));
                    match r.status {
                        200 => {
                            acked.lock().unwrap().push(r.id());
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        503 => {
                            assert!(r.header("retry-after").is_some(), "503 carries Retry-After");
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => unexpected.lock().unwrap().push(format!("{other} {}", r.text())),
                    }
                }
            });
        }
        wait_for("some events acknowledged", SETTLE_ALL, || acks.load(Ordering::Relaxed) >= 50);
        server.halt();
        let before = acks.load(Ordering::Relaxed);
        wait_for("503s while the database is down", SETTLE_ALL, || refused.load(Ordering::Relaxed) >= 20);
        assert!(acks.load(Ordering::Relaxed) <= before + 8, "200s while the database was down (at most the in-flight commits)");
        wait_for("/readyz to fail while the database is down", SETTLE_ALL, || readyz(&env) == 503);
        server.resume();
        let back = acks.load(Ordering::Relaxed);
        wait_for("ingest to resume without a restart", SETTLE_ALL, || acks.load(Ordering::Relaxed) >= back + 50);
        stop.store(true, Ordering::Relaxed);
    });
    let unexpected = unexpected.into_inner().unwrap();
    assert!(unexpected.is_empty(), "only 200 or 503: {unexpected:?}");
    wait_for("/readyz to pass again", SETTLE_ALL, || readyz(&env) == 200);

    let acked: BTreeSet<String> = acked.into_inner().unwrap().into_iter().collect();
    let mut seen = BTreeMap::new();
    let all_ran = wait_until(SETTLE_ALL, || {
        seen = runs_of(&runs);
        acked.iter().all(|id| seen.contains_key(id))
    });
    let missing: Vec<_> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(all_ran, "processing resumed for every acknowledged event; missing {missing:?}\n{}", env.log());
    let stored: BTreeSet<String> = env.events().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert!(acked.is_subset(&stored), "every acknowledged event is stored");
    drop(d);
}

/// Issue 15 across nodes: events of 20 keys posted to an ingest node, run
/// by two process nodes at once with `ordering = { key = "/key" }`. Each
/// run appends `start|end KEY EVENT NODE` (NODE: the daemon that ran it,
/// the handler's parent process) to one file: per key, one at a time and
/// in id order, every delivery exactly once, both nodes ran some, and
/// several keys were in flight at once.
#[test]
fn two_process_nodes_run_each_keys_deliveries_one_at_a_time_in_id_order() {
    if postgres_only() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let script = dir.path().join("crm.sh");
    // Sleeps 0–7 ms, picked from the last character of the event id.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nlog() {{ printf '%s %s %s %s\\n' \"$1\" \"$KEY\" \"$HOOKTRAIL_EVENT_ID\" \"$PPID\" >> {log}; }}\nlog start\n\
             c=${{HOOKTRAIL_EVENT_ID#${{HOOKTRAIL_EVENT_ID%?}}}}\nn=$(printf '%d' \"'$c\")\nsleep 0.00$((n % 8))\nlog end\n",
            log = log.display()
        ),
    )
    .unwrap();
    let env = TestEnv::new(&format!(
        "[processor]\npoll_interval = \"200ms\"\nmax_concurrency = 8\n[sources.in]\nauth = {{ type = \"none\" }}\n\
         [handlers.crm]\ntype = \"shell\"\ncommand = [\"/bin/sh\", {script}]\nenv = {{ KEY = \"/key\" }}\nconcurrency = 8\n\
         ordering = {{ key = \"/key\" }}\n[[routes]]\nsource = \"in\"\nhandler = \"crm\"\n",
        script = toml_str(&script.to_string_lossy())
    ));
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let nodes = [env.daemon().arg("--role").arg("process").start(), env.daemon().arg("--role").arg("process").start()];
    const EVENTS: usize = 1000;
    const KEYS: usize = 20;
    std::thread::scope(|s| {
        for t in 0..8 {
            let d = &ingest;
            s.spawn(move || {
                for i in (t..EVENTS).step_by(8) {
                    let r = d.post_json("/hooks/in", &format!(r#"{{"key":"k{:02}","n":{i}}}"#, i % KEYS));
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            });
        }
    });
    let lines = || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>();
    wait_for("every delivery to end", Duration::from_secs(300), || lines().len() >= 2 * EVENTS);
    let lines = lines();
    assert_eq!(lines.len(), 2 * EVENTS, "each delivery ran exactly once");
    let mut in_flight: BTreeMap<String, String> = BTreeMap::new();
    let mut last_id: BTreeMap<String, String> = BTreeMap::new();
    let mut ran_by: BTreeMap<String, usize> = BTreeMap::new();
    let mut most_keys_in_flight = 0;
    for l in &lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(f.len(), 4, "a log line is `what key id node`: {l:?}");
        let (what, key, id, node) = (f[0], f[1].to_string(), f[2].to_string(), f[3].to_string());
        match what {
            "start" => {
                assert!(!in_flight.contains_key(&key), "{id} started while {} of key {key} ran", in_flight[&key]);
                if let Some(prev) = last_id.get(&key) {
                    assert!(*prev < id, "key {key}: {id} ran after {prev}, out of id order");
                }
                last_id.insert(key.clone(), id.clone());
                in_flight.insert(key, id);
                most_keys_in_flight = most_keys_in_flight.max(in_flight.len());
                *ran_by.entry(node).or_default() += 1;
            }
            "end" => assert_eq!(in_flight.remove(&key), Some(id), "an end without its start"),
            other => panic!("unexpected line {other}"),
        }
    }
    assert_eq!(last_id.len(), KEYS);
    assert!(most_keys_in_flight > 1, "keys never ran in parallel (at most {most_keys_in_flight} in flight)");
    let pids: BTreeSet<String> = nodes.iter().map(|d| d.pid().to_string()).collect();
    assert_eq!(ran_by.keys().cloned().collect::<BTreeSet<_>>(), pids, "both process nodes ran deliveries: {ran_by:?}");
    wait_for("every event to show done", SETTLE_ALL, || env.events_where(&["--status", "done"]).len() == EVENTS);
}

/// One acknowledged post: which client sent it, its number, and the dedup
/// key it carried (`None` for the source without dedup).
#[derive(Debug, Clone)]
struct Acked {
    client: usize,
    n: u64,
    key: Option<String>,
}

/// Issue 14: two ingest nodes and two process nodes on one database; eight
/// clients post to both listeners at once (half of them with a dedup key,
/// so both ingest paths are loaded); one ingest node is killed with
/// `kill -9` while its clients are mid-request. The other keeps answering,
/// and every event either node acknowledged is stored with the payload that
/// was posted, keeps its dedup key, and is processed exactly once.
#[test]
fn kill9_of_one_ingest_node_under_load_loses_no_acked_event() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    if postgres_only() {
        return;
    }
    const CLIENTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let env = TestEnv::new(&format!(
        "[processor]\npoll_interval = \"200ms\"\n[sources.in]\nauth = {{ type = \"none\" }}\n\
         [sources.keyed]\nauth = {{ type = \"none\" }}\ndedup = {{ key = \"/key\", window = \"1h\" }}\n\
         {}[[routes]]\nsource = \"keyed\"\nhandler = \"record\"\n",
        recording_handler(&runs)
    ));
    let ingest = [env.daemon().arg("--role").arg("ingest").start(), env.daemon().arg("--role").arg("ingest").start()];
    let _process = [env.daemon().arg("--role").arg("process").start(), env.daemon().arg("--role").arg("process").start()];
    let (victim, survivor) = (&ingest[0], &ingest[1]);

    // Acknowledgements per node; id -> what was posted.
    let acks = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let (stop, killed) = (AtomicBool::new(false), AtomicBool::new(false));
    let acked: Mutex<BTreeMap<String, Acked>> = Mutex::new(BTreeMap::new());
    let unexpected = Mutex::new(Vec::new());
    let cut_off = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for client in 0..CLIENTS {
            let node = client % 2;
            let (d, acks, stop, killed, acked, unexpected, cut_off) = (&ingest[node], &acks, &stop, &killed, &acked, &unexpected, &cut_off);
            s.spawn(move || {
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let key = (client % 4 >= 2).then(|| format!("c{client}-n{n}"));
                    let (path, body) = match &key {
                        Some(k) => ("/hooks/keyed", format!(r#"{{"client":{client},"n":{n},"key":"{k}"}}"#)),
                        None => ("/hooks/in", format!(r#"{{"client":{client},"n":{n}}}"#)),
                    };
                    match d.request("POST", path).header("content-type", "application/json").body(body).try_send() {
                        Ok(r) if r.status == 200 => {
                            acked.lock().unwrap().insert(r.id(), Acked { client, n, key });
                            acks[node].fetch_add(1, Ordering::Relaxed);
                        }
                        // An honest "not stored" (overload); never after a kill, which refuses.
                        Ok(r) if r.status == 503 => {}
                        Ok(r) => unexpected.lock().unwrap().push(format!("node {node}: {} {}", r.status, r.text())),
                        Err(e) => {
                            if node == 0 && killed.load(Ordering::Relaxed) {
                                // The killed node's clients stop at their first refused or cut request.
                                cut_off.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            unexpected.lock().unwrap().push(format!("node {node}: transport error {e}"));
                            return;
                        }
                    }
                }
            });
        }
        wait_for("load on both ingest nodes", SETTLE_ALL, || acks.iter().all(|a| a.load(Ordering::Relaxed) >= 300));
        killed.store(true, Ordering::Relaxed);
        signal(victim.pid(), libc::SIGKILL);
        let before = acks[1].load(Ordering::Relaxed);
        wait_for("the other ingest node to keep answering", SETTLE_ALL, || acks[1].load(Ordering::Relaxed) >= before + 300);
        stop.store(true, Ordering::Relaxed);
    });
    let unexpected = unexpected.into_inner().unwrap();
    assert!(unexpected.is_empty(), "only 200 or 503 (and a cut connection to the killed node): {unexpected:?}");
    assert_eq!(cut_off.load(Ordering::Relaxed), CLIENTS / 2, "every client of the killed node was still posting when it died");
    let acked = acked.into_inner().unwrap();

    // Stored, with what was posted.
    let stored: BTreeMap<String, serde_json::Value> =
        env.events().into_iter().map(|e| (e["id"].as_str().unwrap().to_string(), e["payload"].clone())).collect();
    let lost: Vec<&String> = acked.keys().filter(|id| !stored.contains_key(*id)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged events were lost: {:?}", lost.len(), acked.len(), &lost[..lost.len().min(10)]);
    for (id, a) in &acked {
        let p = &stored[id];
        assert_eq!((p["client"].as_u64(), p["n"].as_u64()), (Some(a.client as u64), Some(a.n)), "{id}");
    }
    // The dedup keys the killed node acknowledged are kept: the survivor
    // answers each again with the first event's id.
    for (id, a) in acked.iter().filter(|(_, a)| a.client % 2 == 0) {
        let Some(key) = &a.key else { continue };
        let r = survivor.post_json("/hooks/keyed", &format!(r#"{{"client":{},"n":{},"key":"{key}"}}"#, a.client, a.n));
        assert_eq!(r.json(), serde_json::json!({"id": id, "status": "duplicate"}), "key {key}");
    }
    // Processed, each once (no process node crashed).
    let mut seen = BTreeMap::new();
    let all_ran = wait_until(SETTLE_ALL, || {
        seen = runs_of(&runs);
        acked.keys().all(|id| seen.contains_key(id))
    });
    let missing = acked.keys().filter(|id| !seen.contains_key(*id)).count();
    assert!(all_ran, "{missing} of {} acknowledged events never ran; log:\n{}", acked.len(), env.log());
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "each delivery runs exactly once when no process node crashes: {twice:?}");
}

/// Issue 14: `events replay` and `events skip` run while two process nodes
/// claim and finish the same keys, events and deliveries. They lock rows in
/// the order claims and finishes do (key head, delivery, event; events in
/// id order), and try again after a deadlock PostgreSQL broke, so no
/// operator command and no node ever reports one.
#[test]
fn replays_and_skips_beside_two_busy_process_nodes_never_deadlock() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    if postgres_only() {
        return;
    }
    // Events with `"fail": "1"` fail for good (exit 3) in both handlers, each time they run.
    let fails = toml_str("[ \"$FAIL\" = 1 ] && exit 3; exit 0");
    let env = TestEnv::new(&format!(
        "[processor]\npoll_interval = \"100ms\"\nmax_concurrency = 16\n[sources.in]\nauth = {{ type = \"none\" }}\n\
         [handlers.ord]\ntype = \"shell\"\ncommand = [\"/bin/sh\", \"-c\", {fails}]\nenv = {{ FAIL = \"/fail\" }}\n\
         permanent_exit_codes = [3]\nconcurrency = 8\nordering = {{ key = \"/key\", on_failure = \"block\" }}\n\
         [handlers.plain]\ntype = \"shell\"\ncommand = [\"/bin/sh\", \"-c\", {fails}]\nenv = {{ FAIL = \"/fail\" }}\n\
         permanent_exit_codes = [3]\nconcurrency = 8\n\
         [[routes]]\nsource = \"in\"\nhandler = \"ord\"\n[[routes]]\nsource = \"in\"\nhandler = \"plain\"\n"
    ));
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let _nodes = [env.daemon().arg("--role").arg("process").start(), env.daemon().arg("--role").arg("process").start()];
    const ROUNDS: usize = 12;
    let stop = AtomicBool::new(false);
    let (replays, skips) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let trouble = Mutex::new(Vec::new());
    // `TestEnv` stays on this thread: the operators build their commands from its parts.
    let (config, (url_var, url)) = (env.config_path().to_path_buf(), env.database_env().expect("a PostgreSQL env"));
    let cli = |args: &[&str]| {
        let mut c = clean_command();
        c.arg("--config").arg(&config).args(args).env(url_var, &url);
        run(c)
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            for n in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let fail = if n % 3 == 0 { "1" } else { "0" };
                let r = ingest.post_json("/hooks/in", &format!(r#"{{"key":"k{}","fail":"{fail}","n":{n}}}"#, n % 5));
                assert_eq!(r.status, 200, "{}", r.text());
            }
        });
        // Bulk replays of every failed event, over and over.
        s.spawn(|| {
            for _ in 0..ROUNDS {
                let out = cli(&["events", "replay", "--status", "failed"]);
                if out.code != 0 || format!("{out:?}").contains("deadlock") {
                    trouble.lock().unwrap().push(format!("replay: {out:?}"));
                }
                replays.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Skips of failed (blocking) deliveries, as an operator would.
        s.spawn(|| {
            for _ in 0..ROUNDS {
                let listed = cli(&["events", "list", "--json", "--status", "failed", "--limit", "5"]);
                let failed: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout).unwrap_or_else(|e| panic!("{e}: {listed:?}"));
                for e in failed {
                    let id = e["id"].as_str().unwrap();
                    let out = cli(&["events", "skip", id, "--handler", "ord"]);
                    // A replay may have re-queued it since it was listed: an honest refusal.
                    let raced = out.code == 1 && out.stderr.contains(", not failed; only a failed delivery can be skipped");
                    if (out.code != 0 && !raced) || format!("{out:?}").contains("deadlock") {
                        trouble.lock().unwrap().push(format!("skip {id}: {out:?}"));
                    }
                    skips.fetch_add(usize::from(out.code == 0), Ordering::Relaxed);
                }
            }
        });
        wait_for("the replays and skips", Duration::from_secs(300), || replays.load(Ordering::Relaxed) == ROUNDS);
        stop.store(true, Ordering::Relaxed);
    });
    let trouble = trouble.into_inner().unwrap();
    assert!(trouble.is_empty(), "operator commands failed beside the processing nodes: {trouble:#?}");
    assert!(skips.load(Ordering::Relaxed) > 0, "some failed deliveries were skipped");
    let log = env.log();
    let deadlocks: Vec<&str> = log.lines().filter(|l| l.contains("deadlock")).collect();
    assert!(deadlocks.is_empty(), "the nodes hit deadlocks: {deadlocks:#?}");
    assert!(env.stat("in", "received") > 0);
}

/// A transaction of the test's own on `url`, on a thread with a runtime of
/// its own, run statement by statement: what a node's claim does, step by
/// step, while a command runs beside it.
struct Session {
    tx: std::sync::mpsc::Sender<(String, std::sync::mpsc::Sender<Result<u64, String>>)>,
}

impl Session {
    fn open(url: String) -> Session {
        let (tx, rx) = std::sync::mpsc::channel::<(String, std::sync::mpsc::Sender<Result<u64, String>>)>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connecting to the test database");
                tokio::spawn(conn);
                while let Ok((sql, reply)) = rx.recv() {
                    let done = client.execute(sql.as_str(), &[]).await.map_err(|e| match e.as_db_error() {
                        Some(db) => format!("{} ({})", db.message(), db.code().code()),
                        None => e.to_string(),
                    });
                    let _ = reply.send(done);
                }
            })
        });
        Session { tx }
    }

    /// Runs `sql`; the rows it touched, or the server's message and SQLSTATE.
    fn run(&self, sql: &str) -> Result<u64, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx.send((sql.to_string(), reply)).expect("the session thread is alive");
        answer.recv().expect("the session thread answers")
    }
}

/// Issue 14, the lock order of `events replay` and `events skip`: a node's
/// claim locks a key's head row, then the head's delivery, then its event.
/// This test's own transaction does exactly that, step by step, while the
/// command runs beside it: the command waits for the head row instead of
/// taking the event first, so neither side meets a deadlock (PostgreSQL
/// would abort one of them, 40P01) and both succeed.
#[test]
fn replay_and_skip_lock_a_keys_head_before_its_delivery_and_event_as_claims_do() {
    if postgres_only() {
        return;
    }
    let env = TestEnv::new(
        "[sources.in]\nauth = { type = \"none\" }\n\
         [handlers.ord]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\nordering = { key = \"/key\", on_failure = \"block\" }\n\
         [[routes]]\nsource = \"in\"\nhandler = \"ord\"\n",
    );
    let db = env.postgres().expect("a PostgreSQL env");
    // An ingest node alone: the deliveries stay pending, each event heads its key.
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let replayed = ingest.post_json("/hooks/in", r#"{"key":"k1"}"#).id();
    let skipped = ingest.post_json("/hooks/in", r#"{"key":"k2"}"#).id();
    // Only a failed delivery can be skipped: the second one failed for good.
    let fail = format!("UPDATE deliveries SET status = 'failed', attempts = 1 WHERE event_id = '{skipped}'");
    assert_eq!(Session::open(db.url()).run(&fail), Ok(1));

    let waiting = || db.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'");
    for (event, key, args) in [
        (&replayed, "k1", vec!["events", "replay", replayed.as_str()]),
        (&skipped, "k2", vec!["events", "skip", skipped.as_str(), "--handler", "ord"]),
    ] {
        // A claim on another node: the head row, the delivery, and (below) the event.
        let claim = Session::open(db.url());
        // Were there a cycle, this side would find it first (10 ms against the
        // command's 1 s) and be the one aborted: each side must keep the order.
        claim.run("SET deadlock_timeout = '10ms'").unwrap();
        claim.run("BEGIN").unwrap();
        assert_eq!(claim.run(&format!("SELECT 1 FROM order_heads WHERE handler = 'ord' AND key = '{key}' FOR UPDATE")), Ok(1));
        assert_eq!(claim.run(&format!("SELECT 1 FROM deliveries WHERE event_id = '{event}' FOR UPDATE")), Ok(1));
        let mut cmd = env.command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        wait_for(&format!("`{}` to wait for the claim's locks", args.join(" ")), SETTLE_ALL, || waiting().as_deref() == Some("1"));
        let locked = claim.run(&format!("SELECT 1 FROM events WHERE id = '{event}' FOR UPDATE"));
        assert_eq!(locked, Ok(1), "the claim locks the event (no deadlock on the node's side)");
        assert_eq!(claim.run("COMMIT"), Ok(0));
        let mut out = String::new();
        let mut err = String::new();
        std::io::Read::read_to_string(cmd.stdout.as_mut().unwrap(), &mut out).unwrap();
        std::io::Read::read_to_string(cmd.stderr.as_mut().unwrap(), &mut err).unwrap();
        let status = cmd.wait().unwrap();
        assert!(status.success(), "`{}` failed beside a claim: {status}\n{out}\n{err}", args.join(" "));
        assert!(!err.contains("deadlock"), "{err}");
    }
    let ev = env.show(&skipped);
    assert_eq!(delivery(&ev, "ord")["status"], "skipped", "{ev:#}");
    let ev = env.show(&replayed);
    assert_eq!(delivery(&ev, "ord")["status"], "pending", "{ev:#}");
}

/// Whether process `pid` still runs (a zombie waiting for its reaper does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().to_string()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Kills a leftover handler process when a test fails before hooktrail did.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if running(self.0) {
            // SAFETY: kill(2) only sends a signal, to a process this test's handler started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// Issue 14, handlers left running on PostgreSQL: a process node killed
/// with `kill -9` mid-attempt leaves its shell handler running (nothing
/// enforces its timeout any more) and its payload file (lead data) behind.
/// Nodes note themselves beside the config file (README "Several nodes:
/// PostgreSQL"), so the next node started on this machine with that config
/// kills the handler's process group and removes the file; the delivery
/// then runs again, once, after the lease.
#[test]
fn a_process_node_restarted_after_kill9_stops_the_handler_its_predecessor_left_and_removes_its_payload_file() {
    if postgres_only() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, payload_file) = (dir.path().join("pid"), dir.path().join("payload"));
    // The first attempt notes its pid and payload file, then hangs; the next one succeeds.
    let script = format!(
        "if [ -e {pid} ]; then exit 0; fi; echo \"$HOOKTRAIL_PAYLOAD_FILE\" > {payload}; echo $$ > {pid}.new; mv {pid}.new {pid}; exec sleep 300",
        pid = pid_file.display(),
        payload = payload_file.display()
    );
    let env = slow_shell_env(&script);
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let first = env.daemon().arg("--role").arg("process").start();
    let id = ingest.post_json("/hooks/in", r#"{"email":"lead@example.com"}"#).id();
    wait_for("the first attempt to begin", SETTLE_ALL, || pid_file.exists());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let _cleanup = KillOnDrop(pid);
    let payload = PathBuf::from(std::fs::read_to_string(&payload_file).unwrap().trim());
    assert!(payload.is_file(), "the handler's payload file {} exists while it runs", payload.display());
    // Its begun mark is committed lazily: kill once it is, so the history shows the attempt.
    let db = env.postgres().expect("a PostgreSQL env");
    wait_for("the attempt's begun mark", SETTLE_ALL, || db.scalar("SELECT held FROM deliveries").as_deref() == Some("false"));

    first.kill9();
    assert!(running(pid), "kill -9 of the node leaves its handler running (what the next start must stop)");
    assert!(payload.is_file(), "and its payload file");

    let _next = env.daemon().arg("--role").arg("process").start();
    wait_for("the restarted node to stop the handler left running", SETTLE_ALL, || !running(pid));
    wait_for("the restarted node to remove the payload file left behind", SETTLE_ALL, || !payload.exists());
    // The log is written by a background thread: the line may land a little later.
    let logged = wait_until(SETTLE_ALL, || env.log().contains("killed a handler's process group left running by a daemon that died"));
    assert!(logged, "{}", env.log());
    let ev = wait_settled(&env, &id);
    assert_eq!(ev["status"], "done", "{ev:#}");
    let attempts = delivery(&ev, "slow")["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2, "the interrupted attempt, then the one that succeeded: {ev:#}");
}

/// Issue 15: the ordered claim and the finish batch are functions the
/// daemon creates at every start (README "Several nodes: PostgreSQL"). A
/// database whose schema an earlier version made has none: two process
/// nodes starting on it at the same moment both come up (one creates them
/// while the other waits for the schema lock) and run every delivery, each
/// key's in id order.
#[test]
fn process_nodes_starting_together_on_a_schema_without_the_functions_create_them_and_run_in_order() {
    if postgres_only() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let env = TestEnv::new(&format!(
        "[processor]\npoll_interval = \"200ms\"\n[sources.in]\nauth = {{ type = \"none\" }}\n\
         [handlers.ord]\ntype = \"shell\"\ncommand = [\"/bin/sh\", \"-c\", \"echo \\\"$KEY $HOOKTRAIL_EVENT_ID\\\" >> {log}\"]\n\
         env = {{ KEY = \"/key\" }}\nconcurrency = 4\nordering = {{ key = \"/key\" }}\n\
         [[routes]]\nsource = \"in\"\nhandler = \"ord\"\n",
        log = log.display()
    ));
    let db = env.postgres().expect("a PostgreSQL env");
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    let ids: Vec<String> = (0..60).map(|i| ingest.post_json("/hooks/in", &format!(r#"{{"key":"k{}","n":{i}}}"#, i % 3)).id()).collect();
    // What an earlier version's schema has: every table, no function.
    let functions = "SELECT count(*) FROM pg_proc WHERE proname IN ('hooktrail_claim_ordered', 'hooktrail_finish')";
    assert_eq!(db.scalar(functions).as_deref(), Some("2"), "the ingest node's start created them");
    Session::open(db.url()).run("DROP FUNCTION hooktrail_claim_ordered, hooktrail_finish").unwrap();
    assert_eq!(db.scalar(functions).as_deref(), Some("0"));

    // Both spawned before either could have created them (`start` waits for
    // one node's ready file; these two share a config, so they are spawned
    // as bare processes and watched through their logs).
    let mut nodes: Vec<Killed> = (0..2)
        .map(|n| {
            let log = std::fs::File::create(dir.path().join(format!("node{n}.log"))).unwrap();
            let child = env
                .command(&["serve", "--role", "process"])
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawning a process node");
            Killed(child)
        })
        .collect();
    let node_log = |n: usize| std::fs::read_to_string(dir.path().join(format!("node{n}.log"))).unwrap_or_default();
    for (n, node) in nodes.iter_mut().enumerate() {
        wait_for(&format!("node {n} to start its processor"), SETTLE_ALL, || {
            if let Some(status) = node.0.try_wait().unwrap() {
                panic!("node {n} exited ({status}) while starting; its log:\n{}", node_log(n));
            }
            node_log(n).contains("processor started")
        });
    }
    assert_eq!(db.scalar(functions).as_deref(), Some("2"));
    let lines = || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>();
    wait_for("every delivery to run", SETTLE_ALL, || lines().len() >= ids.len());
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for l in lines() {
        let (key, id) = l.split_once(' ').unwrap_or_else(|| panic!("a line is `key id`: {l:?}"));
        if let Some(prev) = last.get(key) {
            assert!(prev.as_str() < id, "key {key}: {id} ran after {prev}");
        }
        last.insert(key.to_string(), id.to_string());
    }
    assert_eq!(lines().len(), ids.len(), "each delivery ran once");
    wait_for("every event to show done", SETTLE_ALL, || env.events_where(&["--status", "done"]).len() == ids.len());
    for (n, mut node) in nodes.into_iter().enumerate() {
        assert!(node.0.try_wait().unwrap().is_none(), "node {n} is still up; its log:\n{}", node_log(n));
        assert!(!node_log(n).contains("ERROR"), "node {n} logged an error:\n{}", node_log(n));
    }
}

/// A child process killed (SIGKILL) when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The plans PostgreSQL picks for the ordered claim's statements once
/// ANALYZE has seen a real mix: one handler without a key beside one with
/// 500 keys. Two statements of `hooktrail_claim_ordered` had generic plans
/// that read far more than they need: the probe for a due unkeyed delivery
/// became a sequential scan of all `deliveries` (ANALYZE saw the other
/// handler's unkeyed rows, so a match looked one row away; an all-keyed
/// handler has none), and the due heads were merge-joined with a walk of
/// `deliveries_pkey` across their id range instead of one probe each
/// (BENCHMARKS.md, "Quiet-machine runs at the end of stop 15": a third of
/// the 50-key rate, 30% of the 1,000-key rate). The plans are read from
/// `auto_explain`, sent to this session as notices, with the generic plan
/// forced as a busy node's cached plan would be. At this size the planner
/// picks the sequential scan with the old probe (this test fails on it),
/// but not the merge join with the old head scan: that one showed only at
/// the benchmark's size, where `PG_ANALYZE=1 bench/ordering.sh` shows it.
#[test]
fn the_ordered_claims_statements_probe_deliveries_by_index_after_analyze() {
    if postgres_only() {
        return;
    }
    let env = TestEnv::new(
        "[sources.in]\nauth = { type = \"none\" }\n\
         [handlers.plain]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\n\
         [handlers.ord]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\nordering = { key = \"/key\" }\n\
         [[routes]]\nsource = \"in\"\nhandler = \"plain\"\n\
         [[routes]]\nsource = \"in\"\nhandler = \"ord\"\n",
    );
    let db = env.postgres().expect("a PostgreSQL env");
    let ingest = env.daemon().arg("--role").arg("ingest").start();
    std::thread::scope(|s| {
        for t in 0..8 {
            let ingest = &ingest;
            s.spawn(move || {
                for i in (t..4000).step_by(8) {
                    ingest.post_json("/hooks/in", &format!(r#"{{"key":"k{}","n":{i}}}"#, i % 500)).id();
                }
            });
        }
    });
    assert_eq!(db.scalar("SELECT count(*) FROM deliveries").as_deref(), Some("8000"));
    Session::open(db.url()).run("ANALYZE").unwrap();

    let url = db.url();
    let plans: Vec<String> = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connecting to the test database");
            let (notices_tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
            let driver = tokio::spawn(async move {
                while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    if let Ok(tokio_postgres::AsyncMessage::Notice(n)) = m {
                        let _ = notices_tx.send(n.message().to_string());
                    }
                }
            });
            client
                .batch_execute(
                    "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
                     SET auto_explain.log_level = notice; SET client_min_messages = notice; SET plan_cache_mode = force_generic_plan",
                )
                .await
                .expect("auto_explain is loaded in this session");
            for _ in 0..3 {
                client
                    .batch_execute(
                        "SELECT count(*) FROM hooktrail_claim_ordered('ord', 1000, 'plan-test', 60000000, 'retry', 'interrupted', 'processing', false, true)",
                    )
                    .await
                    .expect("the claim runs");
            }
            drop(client);
            let _ = driver.await;
            let mut plans = Vec::new();
            while let Ok(p) = notices.try_recv() {
                plans.push(p);
            }
            plans
        })
    })
    .join()
    .unwrap();
    let nested: Vec<&String> = plans.iter().filter(|p| p.contains("FROM deliveries") || p.contains("order_heads")).collect();
    assert!(
        nested.iter().any(|p| p.contains("order_key IS NULL")) && nested.iter().any(|p| p.contains("SKIP LOCKED")),
        "auto_explain showed the claim's unkeyed probe and head scan: {plans:#?}"
    );
    for p in &nested {
        assert!(!p.contains("Seq Scan on deliveries"), "a claim statement scans all deliveries:\n{p}");
        assert!(!(p.contains("Merge") && p.contains("deliveries_pkey")), "a claim statement walks deliveries_pkey in a merge join:\n{p}");
    }
}
