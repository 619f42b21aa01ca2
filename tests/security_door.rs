//! Who may come in, and how fast, through the real binary (issue 5): the IP
//! allowlist with and without trusted proxies (a forged `X-Forwarded-For` gets
//! nobody in), per-address and per-source rate limits (429 + `Retry-After`),
//! and the global backpressure bounds: a full backlog and a nearly full disk
//! each answer 503 + `Retry-After` instead of queueing work that cannot drain.
//!
//! Addresses in `X-Forwarded-For` are only header text here: every request goes
//! to the daemon on 127.0.0.1.

mod common;

use common::*;

const NONE: &str = "auth = { type = \"none\" }";

/// POSTs `{}` as JSON, with an `X-Forwarded-For` header when `xff` is given.
fn post_from(d: &Daemon, path: &str, xff: Option<&str>) -> Resp {
    let mut r = d.request("POST", path).header("content-type", "application/json");
    if let Some(x) = xff {
        r = r.header("x-forwarded-for", x);
    }
    r.body("{}").send()
}

/// `Retry-After` as whole seconds; panics when absent or not a number.
fn retry_after(r: &Resp) -> u64 {
    let v = r.header("retry-after").unwrap_or_else(|| panic!("{} without Retry-After: {}", r.status, r.text()));
    v.parse().unwrap_or_else(|_| panic!("Retry-After {v:?} is not a number of seconds"))
}

#[test]
fn allow_ips_admits_listed_addresses_and_answers_403_to_others() {
    let env = TestEnv::new(&format!(
        "[sources.local]\n{NONE}\nallow_ips = [\"127.0.0.1/32\"]\n[sources.tennet]\n{NONE}\nallow_ips = [\"10.0.0.0/8\"]\n"
    ));
    let d = env.start();
    let id = post_from(&d, "/hooks/local", None).id();
    assert_eq!(env.show(&id)["remote_addr"], "127.0.0.1");
    assert_status(&post_from(&d, "/hooks/tennet", None), 403, "address 127.0.0.1 is not allowed to post to source `tennet`");
    wait_rejected(&env, "tennet", 1);
    assert_eq!(env.events().len(), 1);
}

#[test]
fn forged_forwarded_for_gets_nobody_in_without_trusted_proxies() {
    let env = TestEnv::new(&format!(
        "[sources.local]\n{NONE}\nallow_ips = [\"127.0.0.1/32\"]\n[sources.tennet]\n{NONE}\nallow_ips = [\"10.0.0.0/8\"]\n"
    ));
    let d = env.start();
    // The peer (127.0.0.1) is no trusted proxy: its X-Forwarded-For is ignored.
    for xff in ["10.1.2.3", "10.1.2.3, 10.0.0.1", "10.1.2.3:443"] {
        assert_status(&post_from(&d, "/hooks/tennet", Some(xff)), 403, "address 127.0.0.1 is not allowed");
    }
    wait_rejected(&env, "tennet", 3);
    assert!(env.events().is_empty());
    // …and it does not change the recorded address of an allowed request either.
    let id = post_from(&d, "/hooks/local", Some("10.1.2.3")).id();
    let ev = env.show(&id);
    assert_eq!(ev["remote_addr"], "127.0.0.1");
}

#[test]
fn trusted_proxy_forwarded_client_is_allowed_and_recorded_but_forged_left_entries_are_not() {
    let env =
        TestEnv::with_server("trusted_proxies = [\"127.0.0.1/32\"]", &format!("[sources.tennet]\n{NONE}\nallow_ips = [\"10.0.0.0/8\"]\n"));
    let d = env.start();
    let id = post_from(&d, "/hooks/tennet", Some("10.1.2.3")).id();
    assert_eq!(env.show(&id)["remote_addr"], "10.1.2.3");
    // A proxy appends the address it saw: what the client itself wrote stays on
    // the left and is not believed. The right-most untrusted entry decides.
    assert_status(&post_from(&d, "/hooks/tennet", Some("10.6.6.6, 203.0.113.7")), 403, "address 203.0.113.7 is not allowed");
    // Chains of trusted proxies are walked from the right.
    let id = post_from(&d, "/hooks/tennet", Some("10.1.2.4, 127.0.0.1")).id();
    assert_eq!(env.show(&id)["remote_addr"], "10.1.2.4");
    // A trusted peer that forwards nothing is itself the client.
    assert_status(&post_from(&d, "/hooks/tennet", None), 403, "address 127.0.0.1 is not allowed");
    // Garbage in the header falls back to the last address that could be read.
    assert_status(&post_from(&d, "/hooks/tennet", Some("not-an-ip")), 403, "address 127.0.0.1 is not allowed");
    wait_rejected(&env, "tennet", 3);
    assert_eq!(env.events().len(), 2);
}

/// Sends up to `max` requests until one is refused; returns (accepted, refusal).
fn until_refused(d: &Daemon, path: &str, max: usize, mut xff: impl FnMut(usize) -> Option<String>) -> (usize, Resp) {
    for i in 0..max {
        let r = post_from(d, path, xff(i).as_deref());
        if r.status != 200 {
            return (i, r);
        }
    }
    panic!("{max} requests to {path} were all accepted; no rate limit applied");
}

#[test]
fn per_address_rate_limit_answers_429_with_retry_after_and_spares_other_addresses() {
    let env = TestEnv::with_server(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &format!("[sources.lim]\n{NONE}\nper_ip_rate_limit = {{ per_second = 1, burst = 3 }}\n"),
    );
    let d = env.start();
    let (accepted, r) = until_refused(&d, "/hooks/lim", 50, |_| Some("192.0.2.10".into()));
    assert!(accepted >= 3, "the burst of 3 was not honoured: refused after {accepted}");
    assert_status(&r, 429, "rate limit for address 192.0.2.10 exceeded");
    assert!(retry_after(&r) >= 1);
    // Another client has its own bucket.
    post_from(&d, "/hooks/lim", Some("198.51.100.20")).id();
    wait_rejected(&env, "lim", 1);
    assert_eq!(env.events().len(), accepted + 1);
}

#[test]
fn per_source_rate_limit_answers_429_with_retry_after_whatever_the_address() {
    let env = TestEnv::with_server(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &format!("[sources.lim]\n{NONE}\nrate_limit = {{ per_second = 1, burst = 3 }}\n[sources.free]\n{NONE}\n"),
    );
    let d = env.start();
    // Every request from a different address: the source's bucket still empties.
    let (accepted, r) = until_refused(&d, "/hooks/lim", 50, |i| Some(format!("192.0.2.{}", i + 1)));
    assert!(accepted >= 3, "the burst of 3 was not honoured: refused after {accepted}");
    assert_status(&r, 429, "rate limit of source `lim` exceeded");
    assert!(retry_after(&r) >= 1);
    // Other sources are not affected.
    post_from(&d, "/hooks/free", None).id();
    wait_rejected(&env, "lim", 1);
    assert_eq!(env.events_where(&["--source", "lim"]).len(), accepted);
}

#[test]
fn backlog_above_max_backlog_answers_503_with_retry_after() {
    // `--role ingest`: nothing processes, so every routed delivery stays pending.
    let env = TestEnv::with_server(
        "max_backlog = 2",
        &format!(
            "[sources.q]\n{NONE}\n[handlers.slow]\ntype = \"shell\"\ncommand = [\"sleep\", \"30\"]\nconcurrency = 1\n\
             [[routes]]\nsource = \"q\"\nhandler = \"slow\"\n"
        ),
    );
    let d = env.daemon().arg("--role").arg("ingest").start();
    for _ in 0..3 {
        post_from(&d, "/hooks/q", None).id();
    }
    let r = post_from(&d, "/hooks/q", None);
    assert_status(&r, 503, "(server.max_backlog = 2)");
    assert!(r.error().contains("3 deliveries wait to be processed"), "{}", r.error());
    assert!(retry_after(&r) >= 1);
    wait_rejected(&env, "q", 1);
    assert_eq!(env.events().len(), 3);
}

#[test]
fn nearly_full_disk_answers_503_with_retry_after_and_stores_nothing() {
    if sqlite_only("the free space of the database volume (storage.min_free_bytes)") {
        return;
    }
    let env = TestEnv::new(&format!("[sources.a]\n{NONE}\n"));
    // No test can fill the real disk; instead ask for more free space than any
    // disk has, so the real free space is below the bound.
    let d = env.daemon().env("HOOKTRAIL__STORAGE__MIN_FREE_BYTES", "9000000000000000000").start();
    let r = post_from(&d, "/hooks/a", None);
    assert_status(&r, 503, "storage nearly full");
    assert!(r.error().contains("below storage.min_free_bytes (9000000000000000000)"), "{}", r.error());
    assert!(retry_after(&r) >= 1);
    // Refused before the body is read: a GET ping is refused the same way.
    assert_status(&d.get("/hooks/a?email=a%40b.c"), 503, "storage nearly full");
    wait_rejected(&env, "a", 2);
    assert!(env.events().is_empty());
}

/// Bytes an unprivileged writer may still use on the volume holding `dir`
/// (`f_bavail × f_frsize`, what the daemon's disk guard compares).
#[allow(clippy::unnecessary_cast)] // the field types differ between platforms
fn free_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("a temp dir path has no NUL");
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // points to writable memory of the size statvfs(3) fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(rc, 0, "statvfs({}) failed: {}", dir.display(), std::io::Error::last_os_error());
    // SAFETY: statvfs returned 0, so it initialized the struct.
    let st = unsafe { st.assume_init() };
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
}

/// A post that gets in with `min_free_bytes = 0` proves nothing by itself: no
/// volume has less than 0 bytes free, so it passes whatever the daemon makes
/// of the key (the 64 MiB default, say, on any disk with room). What shows
/// that 0 switches the check off is a pair on one volume: the daemon says at
/// start that the check is off (a 0 read as any floor would name that floor
/// instead) and stores a post, while a daemon on the same database whose floor
/// is above the volume's free space (read here with statvfs) names that floor
/// and answers 503, so the same setting does reach a check that bites here.
#[test]
fn min_free_bytes_zero_disables_the_disk_check() {
    if sqlite_only("the free space of the database volume (storage.min_free_bytes)") {
        return;
    }
    let env = TestEnv::new(&format!("[sources.a]\n{NONE}\n"));
    let off = env.daemon().env("HOOKTRAIL__STORAGE__MIN_FREE_BYTES", "0").start();
    let id = post_from(&off, "/hooks/a", None).id();
    // The daemon's log is written by a background thread: wait for the line.
    let said_off = wait_until(START_TIMEOUT, || off.log().contains("storage.min_free_bytes = 0: the free-disk check is off"));
    assert!(said_off, "no start line saying the check is off:\n{}", off.log());
    assert!(!off.log().contains("refusing new events below"), "a floor is enforced with min_free_bytes = 0:\n{}", off.log());
    off.kill9();

    // Twice today's free space (at least 1 GiB more): other writers on the
    // volume cannot free that much while the test runs.
    let free = free_bytes(env.dir());
    let floor = free.saturating_mul(2).max(free + (1 << 30));
    let on = env.daemon().env("HOOKTRAIL__STORAGE__MIN_FREE_BYTES", &floor.to_string()).start();
    let floor_line = format!("refusing new events below {floor} bytes free");
    assert!(wait_until(START_TIMEOUT, || on.log().contains(&floor_line)), "no start line naming the floor {floor}:\n{}", on.log());
    let r = post_from(&on, "/hooks/a", None);
    assert_status(&r, 503, "storage nearly full");
    assert!(r.error().contains(&format!("below storage.min_free_bytes ({floor})")), "{}", r.error());
    wait_rejected(&env, "a", 1);
    let stored: Vec<_> = env.events().iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(stored, [id], "only the post taken with the check off is stored");
}

/// Posts `{}` with the given token, from the address in `X-Forwarded-For`.
fn post_token(d: &Daemon, token: &str, xff: &str) -> Resp {
    d.request("POST", "/hooks/lim")
        .header("content-type", "application/json")
        .header("x-webhook-token", token)
        .header("x-forwarded-for", xff)
        .body("{}")
        .send()
}

#[test]
fn unauthenticated_requests_do_not_use_up_the_sources_rate_limit() {
    let env = TestEnv::with_server(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "[sources.lim]\nauth = { type = \"header_token\", header = \"X-Webhook-Token\", secret_env = \"LIM_TOKEN\" }\nrate_limit = { per_second = 1, burst = 3 }\n",
    );
    let d = env.daemon().env("LIM_TOKEN", "right-token").start();
    // An attacker without the token, from several addresses, more times than the burst.
    for i in 0..6 {
        let r = post_token(&d, "wrong", &format!("203.0.113.{}", i % 2 + 1));
        assert_status(&r, 401, "invalid token in x-webhook-token header");
    }
    // The real sender still has its whole burst.
    for _ in 0..3 {
        post_token(&d, "right-token", "192.0.2.10").id();
    }
    let r = post_token(&d, "right-token", "192.0.2.10");
    assert_status(&r, 429, "rate limit of source `lim` exceeded");
    wait_rejected(&env, "lim", 7);
    assert_eq!(env.events().len(), 3, "only the authenticated posts were stored");
}

#[test]
fn an_address_that_keeps_failing_authentication_is_refused_unchecked_and_others_are_not() {
    let env = TestEnv::with_server(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "[sources.lim]\nauth = { type = \"header_token\", header = \"X-Webhook-Token\", secret_env = \"LIM_TOKEN\" }\n",
    );
    let d = env.daemon().env("LIM_TOKEN", "right-token").start();
    let mut failures = 0;
    let blocked = loop {
        let r = post_token(&d, "wrong", "203.0.113.9");
        if r.status != 401 {
            break r;
        }
        failures += 1;
        assert!(failures <= 20, "more than 20 wrong tokens from one address were all checked");
    };
    assert_eq!(failures, 20, "the burst of failed authentications is 20");
    assert_status(&blocked, 429, "too many failed authentications from address 203.0.113.9");
    assert!(retry_after(&blocked) >= 1);
    // While blocked, even the right token is refused unchecked: a block is no oracle.
    assert_status(&post_token(&d, "right-token", "203.0.113.9"), 429, "too many failed authentications");
    // The real sender at another address is not affected.
    post_token(&d, "right-token", "192.0.2.10").id();
    wait_rejected(&env, "lim", 22);
    assert_eq!(env.events().len(), 1);
    wait_for("the block to be logged", std::time::Duration::from_secs(15), || env.log().contains("too many failed authentications"));
}
