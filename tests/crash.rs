//! No acknowledged event is ever lost (README, "What you get"): `kill -9` under load, then a
//! restart on the same database, keeps every event that got a 200; SIGTERM lets
//! in-flight requests finish and exits 0.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::json;

const CLIENTS: usize = 16;
/// Upper bound on requests per client per cycle, so a cycle always ends.
const MAX_PER_CLIENT: usize = 2000;

const SOURCE: &str = "[sources.load]\nauth = { type = \"none\" }\n";

/// What a load run saw: the acknowledged events and any answer that breaks the contract.
#[derive(Default)]
struct LoadResult {
    /// id -> (cycle, client, n) that was posted and acknowledged with 200.
    acked: HashMap<String, (u64, u64, u64)>,
    /// Statuses other than 200 and 503 (503 is an honest "not stored").
    unexpected: Vec<String>,
}

/// Runs `CLIENTS` threads posting distinct events until the daemon dies or each
/// sent `MAX_PER_CLIENT`; calls `stop_the_daemon` once `trigger_acks` were
/// acknowledged, while the clients are still sending.
fn load_until(d: &Daemon, cycle: u64, trigger_acks: usize, stop_the_daemon: impl FnOnce()) -> LoadResult {
    let acks = AtomicUsize::new(0);
    let result = Mutex::new(LoadResult::default());
    std::thread::scope(|s| {
        for client in 0..CLIENTS as u64 {
            let (acks, result) = (&acks, &result);
            s.spawn(move || {
                let mut mine = Vec::new();
                let mut unexpected = Vec::new();
                for n in 0..MAX_PER_CLIENT as u64 {
                    let body = json!({"cycle": cycle, "client": client, "n": n, "email": format!("c{cycle}-{client}-{n}@example.com")});
                    let sent =
                        d.request("POST", "/hooks/load").header("content-type", "application/json").body(body.to_string()).try_send();
                    match sent {
                        Ok(r) if r.status == 200 => {
                            mine.push((r.id(), (cycle, client, n)));
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) if r.status == 503 => {}
                        Ok(r) => unexpected.push(format!("{} {}", r.status, r.text())),
                        // Refused or reset: the daemon is gone.
                        Err(_) => break,
                    }
                }
                let mut res = result.lock().unwrap();
                res.acked.extend(mine);
                res.unexpected.extend(unexpected);
            });
        }
        wait_for(&format!("{trigger_acks} acknowledged events"), Duration::from_secs(120), || acks.load(Ordering::Relaxed) >= trigger_acks);
        stop_the_daemon();
    });
    result.into_inner().unwrap()
}

/// Asserts every acknowledged event is stored with the payload that was posted.
fn assert_all_stored(env: &TestEnv, acked: &HashMap<String, (u64, u64, u64)>) {
    let events = env.events();
    let mut ids = HashSet::new();
    for e in &events {
        assert!(ids.insert(e["id"].as_str().unwrap().to_string()), "event id stored twice: {}", e["id"]);
    }
    let by_id: HashMap<&str, &serde_json::Value> = events.iter().map(|e| (e["id"].as_str().unwrap(), e)).collect();
    let mut lost = Vec::new();
    for (id, (cycle, client, n)) in acked {
        match by_id.get(id.as_str()) {
            None => lost.push(id.clone()),
            Some(e) => {
                let p = &e["payload"];
                assert_eq!((p["cycle"].as_u64(), p["client"].as_u64(), p["n"].as_u64()), (Some(*cycle), Some(*client), Some(*n)), "{id}");
            }
        }
    }
    assert!(lost.is_empty(), "{} of {} acknowledged events were lost: {:?}", lost.len(), acked.len(), &lost[..lost.len().min(10)]);
    assert!(events.len() >= acked.len(), "stored {} < acknowledged {}", events.len(), acked.len());
}

#[test]
fn kill9_under_load_loses_no_acked_event() {
    let env = TestEnv::new(SOURCE);
    let mut acked: HashMap<String, (u64, u64, u64)> = HashMap::new();
    // A different moment in each cycle; at debug-build speed each is a second or two of load.
    for (cycle, trigger) in [(0u64, 1500usize), (1, 3000), (2, 5000)] {
        let d = env.start();
        assert_all_stored(&env, &acked);
        let run = load_until(&d, cycle, trigger, || signal(d.pid(), libc::SIGKILL));
        assert!(run.unexpected.is_empty(), "answers that are neither 200 nor 503: {:?}", run.unexpected);
        assert!(run.acked.len() >= trigger, "cycle {cycle}: only {} acknowledged", run.acked.len());
        let this_cycle = run.acked.len();
        acked.extend(run.acked);
        d.kill9();
        // Events posted in this cycle and stored are at least those acknowledged.
        let d = env.start();
        let stored_this_cycle = env.events().iter().filter(|e| e["payload"]["cycle"] == cycle).count();
        assert!(stored_this_cycle >= this_cycle, "cycle {cycle}: stored {stored_this_cycle} < acknowledged {this_cycle}");
        drop(d);
    }
    let d = env.start();
    assert_all_stored(&env, &acked);
    // The restarted daemon takes new events on the same database.
    let id = d.post_json("/hooks/load", r#"{"after":"restarts"}"#).id();
    assert_eq!(env.show(&id)["payload"], json!({"after": "restarts"}));
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let env = TestEnv::new(SOURCE);
    let mut d = env.start();
    let body = br#"{"email":"in-flight@example.com"}"#;
    let mut s = d.connect();
    write!(
        s,
        "POST /hooks/load HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    // 100 Continue is sent when the handler starts reading the body: from here
    // on, the request is in flight inside the daemon.
    let interim = read_response(&mut s).expect("an interim answer");
    assert_eq!(interim.status, 100, "expected 100 Continue, got {} {:?}", interim.status, interim.text());

    d.sigterm();
    wait_for("the daemon to log SIGTERM", Duration::from_secs(10), || d.log().contains("SIGTERM"));
    wait_for("the listener to stop accepting", Duration::from_secs(10), || TcpStream::connect(d.addr).is_err());

    s.write_all(body).unwrap();
    let r = read_response(&mut s).expect("the in-flight request is answered");
    let id = r.id();
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exits 0, got {status}; log:\n{}", d.log());
    // Stored, and readable with the daemon gone.
    let ev = env.show(&id);
    assert_eq!(ev["body"], std::str::from_utf8(body).unwrap());
}

#[test]
fn sigterm_under_load_exits_zero_and_keeps_every_acked_event() {
    let env = TestEnv::new(SOURCE);
    let mut d = env.start();
    let run = load_until(&d, 0, 300, || d.sigterm());
    assert!(run.unexpected.is_empty(), "answers that are neither 200 nor 503: {:?}", run.unexpected);
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "SIGTERM exits 0, got {status}; log:\n{}", d.log());
    assert!(d.log().contains("stopped cleanly"), "log:\n{}", d.log());
    assert_all_stored(&env, &run.acked);
}
