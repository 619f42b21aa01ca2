//! Connection hygiene through the real binary (issue 5): slow clients are cut
//! off without holding up others, bodies are limited while streaming (a 100 MB
//! upload costs the daemon no memory), header size and connection count are
//! capped.
//!
//! Slow clients here pace their own writes (that is what they test); every
//! wait for the daemon polls with a deadline.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const SOURCE: &str = "[sources.a]\nauth = { type = \"none\" }\n";

/// What a slow client saw at the end: the daemon closed on it, or answered.
#[derive(Debug)]
enum CutOff {
    Closed,
    Answered(u16),
}

/// Reads until the daemon answers or closes; panics if it does neither before the read timeout.
fn how_it_ended(s: &mut TcpStream) -> CutOff {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => CutOff::Closed,
        Ok(n) => {
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            CutOff::Answered(status)
        }
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => CutOff::Closed,
        Err(e) => panic!("the daemon neither answered nor closed a slow connection: {e}"),
    }
}

/// Trickles header bytes, one every 100 ms, until a write fails (the daemon
/// closed the connection) or `limit` passes. Returns the stream and whether it was cut.
fn trickle_headers(mut s: TcpStream, limit: Duration) -> (TcpStream, bool) {
    let start = Instant::now();
    if s.write_all(b"POST /hooks/a HTTP/1.1\r\nHost: slow\r\nX-Slow: ").is_err() {
        return (s, true);
    }
    while start.elapsed() < limit {
        if s.write_all(b"z").is_err() {
            return (s, true);
        }
        thread::sleep(Duration::from_millis(100));
    }
    (s, false)
}

#[test]
fn slowloris_trickling_headers_is_cut_off_while_normal_clients_are_served() {
    let env = TestEnv::with_server("header_read_timeout = \"1s\"", SOURCE);
    let d = env.start();
    let slow: Vec<_> = (0..5)
        .map(|_| {
            let s = d.connect();
            thread::spawn(move || trickle_headers(s, Duration::from_secs(60)))
        })
        .collect();
    // Normal clients keep being served while the slow ones trickle.
    let mut served_during = 0;
    let mut normal = 0;
    while slow.iter().any(|t| !t.is_finished()) {
        d.post_json("/hooks/a", r#"{"normal":true}"#).id();
        normal += 1;
        if slow.iter().any(|t| !t.is_finished()) {
            served_during += 1;
        }
        thread::sleep(Duration::from_millis(50)); // pace the normal client, not a wait
    }
    assert!(served_during >= 1, "no normal request completed while the slow clients were trickling");
    for t in slow {
        let (mut s, cut) = t.join().unwrap();
        assert!(cut, "a client trickling headers for 60 s was never cut off");
        match how_it_ended(&mut s) {
            CutOff::Closed | CutOff::Answered(408) => {}
            CutOff::Answered(other) => panic!("a slowloris client got {other}, expected 408 or a closed connection"),
        }
    }
    // The daemon is fine and still serving; nothing of the slow requests was stored.
    d.post_json("/hooks/a", "{}").id();
    assert_eq!(env.events().len(), normal + 1);
}

#[test]
fn idle_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let env = TestEnv::with_server("header_read_timeout = \"1s\"", SOURCE);
    let d = env.start();
    let mut idle = d.connect();
    assert!(matches!(how_it_ended(&mut idle), CutOff::Closed | CutOff::Answered(408)));
}

#[test]
fn body_trickled_past_request_timeout_gets_408_and_nothing_is_stored() {
    let env = TestEnv::with_server("request_timeout = \"2s\"", SOURCE);
    let d = env.start();
    let mut s = d.connect();
    s.write_all(b"POST /hooks/a HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\":\"")
        .unwrap();
    let mut writer = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = thread::spawn(move || {
        let start = Instant::now();
        while !stop2.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            if writer.write_all(b"x").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let r = read_response(&mut s).expect("a response to the slow body");
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    assert_status(&r, 408, "request body not received within 2s");
    wait_rejected(&env, "a", 1);
    assert!(env.events().is_empty());
}

/// VmRSS of a process in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
    kb * 1024
}

/// Samples the daemon's RSS every 10 ms until dropped; `max()` is the peak seen.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = Some(thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        }));
        RssSampler { peak, stop, thread }
    }
    fn max(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak.load(Ordering::Relaxed)
    }
}

const HUNDRED_MB: usize = 100 * 1024 * 1024;
const MB: u64 = 1024 * 1024;

/// Streams a 100 MB body (chunked or with Content-Length) from a writer thread
/// while this thread reads the answer; returns it and the daemon's peak RSS.
fn upload_100mb(d: &Daemon, chunked: bool) -> (Resp, u64) {
    let sampler = RssSampler::start(d.pid());
    let mut s = d.connect();
    let framing = if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {HUNDRED_MB}") };
    s.write_all(format!("POST /hooks/a HTTP/1.1\r\nHost: big\r\nContent-Type: application/json\r\n{framing}\r\n\r\n").as_bytes()).unwrap();
    let mut writer = s.try_clone().unwrap();
    let t = thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < HUNDRED_MB {
            let ok = if chunked {
                writer.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_ok()
                    && writer.write_all(&chunk).is_ok()
                    && writer.write_all(b"\r\n").is_ok()
            } else {
                writer.write_all(&chunk).is_ok()
            };
            if !ok {
                return sent; // the daemon stopped reading and closed: expected
            }
            sent += chunk.len();
        }
        if chunked {
            let _ = writer.write_all(b"0\r\n\r\n");
        }
        sent
    });
    let r = read_response(&mut s).expect("an answer to the 100 MB upload");
    drop(s);
    let sent = t.join().unwrap();
    eprintln!("upload (chunked = {chunked}): {} MiB written before the daemon stopped reading", sent >> 20);
    (r, sampler.max())
}

#[test]
fn hundred_megabyte_chunked_body_is_refused_with_413_without_buffering_it() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let (r, peak) = upload_100mb(&d, true);
    assert_status(&r, 413, "request body exceeds server.max_body_bytes (1048576 bytes)");
    assert!(peak < 100 * MB, "daemon RSS reached {} MB during a 100 MB upload", peak / MB);
    wait_rejected(&env, "a", 1);
    assert!(env.events().is_empty());
    d.post_json("/hooks/a", "{}").id();
}

#[test]
fn hundred_megabyte_body_with_content_length_is_refused_with_413_before_reading_it() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let (r, peak) = upload_100mb(&d, false);
    assert_status(&r, 413, "request body exceeds server.max_body_bytes (1048576 bytes)");
    assert!(peak < 100 * MB, "daemon RSS reached {} MB during a 100 MB upload", peak / MB);
    wait_rejected(&env, "a", 1);
    assert!(env.events().is_empty());
}

#[test]
fn body_of_exactly_max_body_bytes_is_accepted_and_one_more_byte_is_413() {
    let env = TestEnv::with_server("max_body_bytes = 4096", SOURCE);
    let d = env.start();
    let exact = json_of_len(4096);
    let id = d.post_json("/hooks/a", exact.as_str()).id();
    assert_eq!(env.show(&id)["body"].as_str().map(str::len), Some(4096));
    assert_status(&d.post_json("/hooks/a", json_of_len(4097).as_str()), 413, "exceeds server.max_body_bytes (4096 bytes)");
    // The same through chunked framing, where no Content-Length announces the size.
    d.raw(&chunked_request("/hooks/a", &exact, 1000)).id();
    assert_status(&d.raw(&chunked_request("/hooks/a", &json_of_len(4097), 1000)), 413, "exceeds server.max_body_bytes (4096 bytes)");
    assert_eq!(env.events().len(), 2);
}

#[test]
fn oversized_request_head_is_refused_with_431_and_normal_heads_pass() {
    let env = TestEnv::with_server("max_header_bytes = 8192", SOURCE);
    let d = env.start();
    let big = "h".repeat(16 * 1024);
    let r = d.request("POST", "/hooks/a").header("content-type", "application/json").header("x-big", &big).body("{}").try_send();
    match r {
        Ok(r) => assert_status(&r, 431, "request head exceeds server.max_header_bytes (8192 bytes)"),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "unexpected error {e}"),
    }
    // Many headers adding up past the limit are refused the same way.
    let mut req = String::from("POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n");
    for i in 0..400 {
        req.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(40)));
    }
    req.push_str("\r\n{}");
    assert_status(&d.raw(req.as_bytes()), 431, "request head exceeds server.max_header_bytes (8192 bytes)");
    // A request with a few KiB of headers is fine.
    d.request("POST", "/hooks/a").header("content-type", "application/json").header("x-medium", &"m".repeat(4000)).body("{}").send().id();
    assert_eq!(env.events().len(), 1);
}

#[test]
fn connections_beyond_max_connections_wait_until_one_closes() {
    let env = TestEnv::with_server("max_connections = 2\nheader_read_timeout = \"60s\"", SOURCE);
    let d = env.start();
    let keep_alive = b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    // Two keep-alive connections, each proven accepted by a served request, hold both slots.
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = d.connect();
            s.write_all(keep_alive).unwrap();
            assert_eq!(read_response(&mut s).unwrap().status, 200);
            s
        })
        .collect();
    let mut third = d.connect();
    third.write_all(keep_alive).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut byte = [0u8; 1];
    match third.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a third connection was served while max_connections = 2 were open: {other:?}"),
    }
    // Closing one held connection frees its slot for the waiting one.
    drop(held.remove(0));
    third.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let r = read_response(&mut third).expect("the waiting connection is served once a slot frees");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(env.events().len(), 3);
}

/// The daemon's log holds no panic.
fn assert_no_panic(env: &TestEnv) {
    let log = env.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// `hooktrail_requests_rejected_total{source="",reason=REASON}` from the admin
/// listener: refusals made before any source was known.
fn unrouted_rejections(env: &TestEnv, reason: &str) -> u64 {
    let ready: serde_json::Value = serde_json::from_slice(&std::fs::read(env.ready_file()).unwrap()).unwrap();
    let url = format!("http://{}/metrics", ready["admin"].as_str().expect("an admin address"));
    let text = reqwest::blocking::Client::builder().no_proxy().build().unwrap().get(url).send().unwrap().text().unwrap();
    let series = format!("hooktrail_requests_rejected_total{{source=\"\",reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok()).unwrap_or(0)
}

/// A request whose head (request line to the blank line included) is exactly
/// `len` bytes, with the body `{}`.
fn head_of_len(len: usize) -> Vec<u8> {
    let start = "POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = len - start.len() - end.len();
    format!("{start}{}{end}{{}}", "p".repeat(pad)).into_bytes()
}

/// Issue 11 item 8: `request_timeout` is the whole request, so a client
/// trickling its head is cut off at `request_timeout` even when
/// `header_read_timeout` is far longer.
#[test]
fn headers_trickled_past_request_timeout_are_cut_off_before_header_read_timeout() {
    let env = TestEnv::with_server("request_timeout = \"1s\"\nheader_read_timeout = \"60s\"", SOURCE);
    let d = env.start();
    // Trickling for up to 20 s: the old head timeout (60 s) would not have cut it.
    let (mut s, cut) = trickle_headers(d.connect(), Duration::from_secs(20));
    assert!(cut, "a head trickled for 20 s was not cut off with request_timeout = 1s");
    match how_it_ended(&mut s) {
        CutOff::Closed | CutOff::Answered(408) => {}
        CutOff::Answered(other) => panic!("a client trickling its head got {other}, expected 408 or a closed connection"),
    }
    d.post_json("/hooks/a", "{}").id();
    assert_eq!(env.events().len(), 1, "nothing of the trickled request was stored");
    assert_no_panic(&env);
}

/// Issue 11 item 13: `max_header_bytes` is exact: a head of exactly the limit
/// passes, one byte more is 431 with JSON naming the limit, and a 100 KB
/// header under the 64 KiB default is refused too.
#[test]
fn request_head_of_max_header_bytes_passes_and_one_byte_more_is_431() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    assert_status(&d.raw(&head_of_len(100 * 1024)), 431, "request head exceeds server.max_header_bytes (65536 bytes)");
    assert_status(&d.raw(&head_of_len(64 * 1024 + 1)), 431, "request head exceeds server.max_header_bytes (65536 bytes)");
    d.raw(&head_of_len(64 * 1024)).id();
    assert_eq!(env.events().len(), 1);
    assert_eq!(unrouted_rejections(&env, "too_large"), 2, "the 431s are counted");
    assert_no_panic(&env);
    drop(d);

    let env = TestEnv::with_server("max_header_bytes = 8192", SOURCE);
    let d = env.start();
    d.raw(&head_of_len(8192)).id();
    let r = d.raw(&head_of_len(8193));
    assert_status(&r, 431, "request head exceeds server.max_header_bytes (8192 bytes)");
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(env.events().len(), 1);
    assert_no_panic(&env);
}

/// Issue 11 item 14: the answers hyper writes itself (400 for a head it
/// cannot parse, 414, 431) are JSON naming the problem, counted as rejections
/// (source unknown), also after a served request on the same connection.
#[test]
fn refusals_hyper_makes_itself_are_json_naming_the_problem_and_counted() {
    let env = TestEnv::with_server("max_header_bytes = 131072", SOURCE);
    let d = env.start();
    let malformed = [
        &b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nthis line has no colon\r\n\r\n"[..],
        b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"GET /hooks/a?x=1 HTTP/9.9\r\nHost: x\r\n\r\n",
    ];
    for req in malformed {
        let r = d.raw(req);
        assert_status(&r, 400, "request head is malformed");
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "{}", String::from_utf8_lossy(req));
    }
    let long_target = format!("GET /hooks/a?q={} HTTP/1.1\r\nHost: x\r\n\r\n", "q".repeat(70_000));
    assert_status(&d.raw(long_target.as_bytes()), 414, "request target is longer than 65534 bytes");
    let mut many = String::from("POST /hooks/a HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_status(&d.raw(many.as_bytes()), 431, "has more than 100 header fields");

    // Keep-alive: a served request, then a malformed head on the same connection.
    let mut s = d.connect();
    s.write_all(b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}").unwrap();
    read_response(&mut s).unwrap().id();
    s.write_all(b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n").unwrap();
    assert_status(&read_response(&mut s).unwrap(), 400, "request head is malformed");

    assert_eq!(env.events().len(), 1, "only the well-formed request was stored");
    assert_eq!(unrouted_rejections(&env, "malformed"), 5);
    assert_eq!(unrouted_rejections(&env, "too_large"), 2);
    let log = env.log();
    assert!(log.contains("request rejected") && log.contains("status=414"), "refusals are logged:\n{log}");
    assert_no_panic(&env);
}

/// Issue 11 item 14: a HEAD cannot carry a body (RFC 9110), so its 405 says
/// it is JSON and how long the JSON would be; the refusal is counted for the
/// source like any other.
#[test]
fn head_request_gets_405_labelled_as_json_with_the_length_of_the_error() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let head = d.request("HEAD", "/hooks/a").send();
    assert_eq!(head.status, 405);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(head.header("allow").as_deref(), Some("GET, POST, PUT"));
    let delete = d.request("DELETE", "/hooks/a").send();
    assert_status(&delete, 405, "is not accepted; use POST, PUT or GET");
    let expected = delete.text().replace("DELETE", "HEAD");
    assert_eq!(head.header("content-length"), Some(expected.len().to_string()), "the length of {expected}");
    wait_rejected(&env, "a", 2);
    assert!(env.events().is_empty());
}

/// Issue 11 item 17: a compressed body would be stored as compressed bytes
/// under a JSON or form type, so content codings and transfer codings other
/// than chunked are refused with 415; nothing is stored.
#[test]
fn compressed_bodies_are_refused_with_415_and_nothing_is_stored() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let te = b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    assert_status(&d.raw(te), 415, "transfer coding `gzip` is not supported");
    let ce = d.request("POST", "/hooks/a").header("content-type", "application/json").header("content-encoding", "gzip").body("{}").send();
    assert_status(&ce, 415, "content coding `gzip` is not supported; send the body uncompressed");
    let identity =
        d.request("POST", "/hooks/a").header("content-type", "application/json").header("content-encoding", "identity").body("{}");
    identity.send().id();
    wait_rejected(&env, "a", 2);
    assert_eq!(env.events().len(), 1);
    assert_no_panic(&env);
}

/// Issue 11 item 17 (decided, README "Receiving"): an HTTP/1.1 request without
/// `Host` is accepted. hooktrail serves one site per listener and routes by
/// path only, so a missing `Host` changes nothing; refusing it (as RFC 9112
/// asks of general servers) would only lose a lead from an odd sender.
#[test]
fn http11_request_without_host_is_accepted() {
    let env = TestEnv::new(SOURCE);
    let d = env.start();
    let id = d.raw(b"POST /hooks/a HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").id();
    assert_eq!(env.show(&id)["body"], "{}");
}
