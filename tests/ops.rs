//! Operations through the real binary (README, "Running in production"; issue 7): systemd
//! notifications on a test `NOTIFY_SOCKET`, SIGHUP reload under traffic, the
//! admin listener's endpoints with and without the token, metrics that move,
//! `/api/events` filters and paging, HTML escaping on the event-log page,
//! background retention, JSON logs, and the page driven by headless Chromium.

mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ADMIN_TOKEN: &str = "adm-7f3c9e1b5d2a4c6e8f0a1b3c5d7e9f11";

/// `forms` events go to `ok` (always succeeds, echoes its stdin), `stuck`
/// events to `stuck` (always fails, next try in an hour), `bare` has no route.
const CONFIG: &str = r#"
[sources.forms]
auth = { type = "none" }
[sources.stuck]
auth = { type = "none" }
[sources.bare]
auth = { type = "none" }
[handlers.ok]
type = "shell"
command = ["/bin/cat"]
[handlers.stuck]
type = "shell"
command = ["/bin/false"]
initial_backoff = "1h"
max_backoff = "1h"
[[routes]]
source = "forms"
handler = "ok"
[[routes]]
source = "stuck"
handler = "stuck"
"#;

/// A blocking client for the admin listener, with or without the token.
struct Admin {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Admin {
    /// The admin listener of the daemon last started in `env` (from its ready file).
    fn of(env: &TestEnv, token: Option<&str>) -> Admin {
        let ready: Value =
            serde_json::from_slice(&std::fs::read(env.ready_file()).expect("reading the ready file")).expect("ready file is JSON");
        let addr = ready["admin"].as_str().unwrap_or_else(|| panic!("ready file has no \"admin\" address: {ready}"));
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("building the admin client");
        Admin { base: format!("http://{addr}"), token: token.map(str::to_string), http }
    }

    fn anon(&self) -> Admin {
        Admin { base: self.base.clone(), token: None, http: self.http.clone() }
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("a method name");
        let mut rb = self.http.request(m, format!("{}{path}", self.base)).body(body.to_string());
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Resp { status, headers, body: r.bytes().expect("reading the admin answer").to_vec() }
    }

    fn get(&self, path: &str) -> Resp {
        self.send("GET", path, &[], "")
    }

    fn post(&self, path: &str) -> Resp {
        self.send("POST", path, &[], "")
    }

    /// GET that must answer 200 with JSON.
    fn json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {} {}", r.status, r.text());
        r.json()
    }

    fn event(&self, id: &str) -> Value {
        self.json(&format!("/api/events/{id}"))
    }

    fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {} {}", r.status, r.text());
        r.text()
    }

    /// Waits until event `id` has `status`.
    fn wait_status(&self, id: &str, status: &str) {
        wait_for(&format!("event {id} to be {status}"), Duration::from_secs(20), || self.event(id)["status"] == status);
    }
}

/// Attempts recorded for the event's delivery to `handler`.
fn attempts(ev: &Value, handler: &str) -> usize {
    ev["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["handler"] == handler))
        .and_then(|d| d["attempts"].as_array())
        .map_or(0, Vec::len)
}

/// The value of one series (`name{labels}` exactly as rendered) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn pct(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).expect("encoding a value")[2..].to_string()
}

/// A daemon started through `sh` so that `WATCHDOG_PID` can name its own pid
/// (`exec` keeps it); killed on drop.
struct Wrapped {
    child: Child,
}

impl Drop for Wrapped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hooktrail serve` started through `sh -c "PRELUDE WATCHDOG_PID=$$ exec …"`
/// (so `WATCHDOG_PID` names the daemon's own pid), with a 1 s watchdog and
/// `NOTIFY_SOCKET` at `sock`, and none of the caller's HOOKTRAIL variables.
fn wrapped_command(env: &TestEnv, sock: &Path, prelude: &str) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{prelude}WATCHDOG_PID=$$ exec \"$@\""))
        .arg("sh")
        .arg(BIN)
        .arg("--config")
        .arg(env.config_path())
        .arg("serve");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HOOKTRAIL") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("NOTIFY_SOCKET", sock).env("WATCHDOG_USEC", "1000000").env("RUST_LOG", "info").envs(env.database_env()).stdin(Stdio::null());
    cmd
}

/// Reads notify datagrams until one holds the line `want`; returns all lines seen.
fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == want);
                seen.extend(msg.lines().map(str::to_string));
                if hit {
                    return seen;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
    panic!("no {want} on NOTIFY_SOCKET within {timeout:?}; saw {seen:?}");
}

#[test]
fn systemd_gets_ready_watchdog_reloading_and_stopping_on_notify_socket() {
    let env = TestEnv::new(CONFIG);
    let sock_path = env.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("binding the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("setting a timeout");
    let log = std::fs::File::create(env.dir().join("wrapped.log")).expect("creating the log");
    let mut cmd = wrapped_command(&env, &sock_path, "");
    cmd.stdout(log.try_clone().expect("cloning the log")).stderr(log);
    let mut d = Wrapped { child: cmd.spawn().expect("spawning hooktrail through sh") };

    recv_until(&sock, "READY=1", START_TIMEOUT);
    // READY comes after the listeners are bound: the ready file names both.
    let ready: Value = serde_json::from_slice(&std::fs::read(env.ready_file()).expect("ready file written before READY=1")).unwrap();
    assert!(ready["listen"].is_string() && ready["admin"].is_string(), "{ready}");

    // WATCHDOG_USEC=1s: earned pings every half second.
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(10));
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(10));

    signal(d.child.id(), libc::SIGHUP);
    let seen = recv_until(&sock, "RELOADING=1", Duration::from_secs(10));
    assert!(seen.iter().any(|l| l.starts_with("MONOTONIC_USEC=")), "systemd 253+ wants MONOTONIC_USEC with RELOADING: {seen:?}");
    recv_until(&sock, "READY=1", Duration::from_secs(10));

    signal(d.child.id(), libc::SIGTERM);
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    let mut status = None;
    wait_for("the daemon to exit after SIGTERM", Duration::from_secs(30), || {
        status = d.child.try_wait().expect("polling the daemon");
        status.is_some()
    });
    assert!(status.expect("checked above").success(), "hooktrail did not exit 0 after SIGTERM");
}

/// Sets the soft `RLIMIT_FSIZE` of a running process (`None` lifts it).
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let v = bytes.map_or(libc::RLIM_INFINITY, |b| b as libc::rlim_t);
    let lim = libc::rlimit { rlim_cur: v, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit(2) on our own child with a valid rlimit and no old-value pointer.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit failed: {}", std::io::Error::last_os_error());
}

#[test]
fn readiness_fails_while_storage_cannot_commit_and_recovers_with_it() {
    if sqlite_only("a database file that cannot be written (a file size limit on the daemon)") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    // SIGXFSZ ignored, no limit yet.
    let d = env.daemon().max_file_size(u64::MAX).start();
    let admin = Admin::of(&env, None);
    let r = admin.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.text());

    // Every write now fails with EFBIG, as on a full disk.
    d.set_max_file_size(Some(1));
    let r = admin.get("/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["ready"], false);
    assert!(body["storage"].as_str().is_some_and(|s| s != "ok" && !s.is_empty()), "the storage check names its failure: {body}");
    assert_eq!(body["listener"], "ok", "only storage is failing: {body}");
    assert_eq!(admin.get("/healthz").status, 200, "liveness is not readiness: the process is up");

    d.set_max_file_size(None);
    let r = admin.get("/readyz");
    assert_eq!(r.status, 200, "ready again once storage commits: {}", r.text());
}

#[test]
fn systemd_watchdog_pings_are_withheld_while_storage_cannot_commit() {
    if sqlite_only("a database file that cannot be written (a file size limit on the daemon)") {
        return;
    }
    let env = TestEnv::new(CONFIG);
    let sock_path = env.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("binding the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("setting a timeout");
    // SIGXFSZ ignored (inherited across exec), so a write past the limit fails
    // with EFBIG instead of killing the daemon. The log goes through a pipe:
    // the file size limit below would stop a log file too.
    let mut cmd = wrapped_command(&env, &sock_path, "trap '' XFSZ; ");
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut d = Wrapped { child: cmd.spawn().expect("spawning hooktrail through sh") };
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = d.child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut all = sink.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    let read_log = || log.lock().unwrap().clone();
    recv_until(&sock, "READY=1", START_TIMEOUT);
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(10));

    limit_file_size(d.child.id(), Some(1));
    wait_for("the daemon to withhold a watchdog ping", Duration::from_secs(20), || {
        read_log().lines().any(|l| l.contains("withholding the systemd watchdog ping") && l.contains("storage"))
    });

    // Storage back: earned pings resume, so systemd never needed to restart it.
    limit_file_size(d.child.id(), None);
    let mut buf = [0u8; 4096];
    while sock.recv(&mut buf).is_ok() {} // drop what was queued before the fix
    recv_until(&sock, "WATCHDOG=1", Duration::from_secs(20));
}

#[test]
fn sighup_adds_a_source_while_requests_keep_flowing_and_a_broken_config_is_refused() {
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let url_a = d.url("/hooks/forms");
    let url_new = d.url("/hooks/fresh");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let flow = {
        let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = http.post(&url_a).header("content-type", "application/json").body(r#"{"n":1}"#).send();
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.lock().unwrap().push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("transport: {e}")),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let after = |n: u64| {
        let target = sent.load(Ordering::Relaxed) + n;
        wait_for("requests to keep flowing", Duration::from_secs(30), || sent.load(Ordering::Relaxed) >= target);
    };
    after(20);
    assert_eq!(d.post_json("/hooks/fresh", "{}").status, 404, "the new source must not exist before the reload");

    let original = std::fs::read_to_string(env.config_path()).unwrap();
    env.write_config(&format!("{original}\n[sources.fresh]\nauth = {{ type = \"none\" }}\n"));
    signal(d.pid(), libc::SIGHUP);
    let http = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
    wait_for("the new source to accept events", Duration::from_secs(15), || {
        http.post(&url_new).header("content-type", "application/json").body("{}").send().is_ok_and(|r| r.status() == 200)
    });
    wait_for("the reload to be logged", Duration::from_secs(15), || d.log().contains("SIGHUP: configuration reloaded"));
    after(20);

    // A config with an error is refused; the running one (with `fresh`) stays.
    env.write_config(&format!("{original}\n[sources.fresh]\nauth = {{ type = \"none\" }}\n[handlers.broken]\ntype = \"nope\"\n"));
    signal(d.pid(), libc::SIGHUP);
    wait_for("the broken config to be refused", Duration::from_secs(15), || d.log().contains("configuration refused"));
    let log = d.log();
    let refusal = &log[log.find("configuration refused").expect("checked above")..];
    assert!(log.contains("ERROR") && refusal.contains("handlers.broken"), "the refusal is an error naming the problem: {refusal}");
    after(20);
    assert_eq!(d.post_json("/hooks/fresh", "{}").status, 200, "the running config was kept");

    stop.store(true, Ordering::Relaxed);
    flow.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across reloads: {:?}",
        failures.len(),
        sent.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn admin_endpoints_need_the_token_when_one_is_set() {
    let env = TestEnv::new(CONFIG);
    let d = env.daemon().env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN).start();
    let id = d.post_json("/hooks/forms", r#"{"email":"a@example.com"}"#).id();
    let admin = Admin::of(&env, Some(ADMIN_TOKEN));
    let anon = admin.anon();
    let wrong = Admin { token: Some("adm-not-the-token".into()), ..admin.anon() };
    admin.wait_status(&id, "done");

    for path in ["/healthz", "/readyz"] {
        assert_eq!(anon.get(path).status, 200, "{path} is open to probes");
    }
    assert_eq!(anon.get("/readyz").json()["ready"], true);

    let gets = [
        "/metrics".to_string(),
        "/api/events".into(),
        format!("/api/events/{id}"),
        "/api/stats".into(),
        "/".into(),
        format!("/events/{id}"),
    ];
    for path in &gets {
        for (who, client) in [("no token", &anon), ("a wrong token", &wrong)] {
            let r = client.get(path);
            assert_eq!(r.status, 401, "GET {path} with {who}: {}", r.text());
        }
        assert_eq!(admin.get(path).status, 200, "GET {path} with the token");
    }
    let r = anon.get("/api/events");
    assert!(r.error().contains("token"), "the 401 says what is missing");
    assert!(r.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
    assert!(anon.get("/").text().contains("name=\"token\""), "people get the login form");

    let replay = format!("/api/events/{id}/replay");
    assert_eq!(anon.post(&replay).status, 401);
    assert_eq!(wrong.post(&replay).status, 401);
    let r = admin.post(&replay);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["requeued"], 1);
    wait_for("the replayed delivery to run", Duration::from_secs(20), || attempts(&admin.event(&id), "ok") == 2);

    // The page's login form: a wrong token is refused, the right one sets a
    // cookie that is HttpOnly, SameSite=Strict and not the token itself.
    let form = "application/x-www-form-urlencoded";
    let r = anon.send("POST", "/login", &[("content-type", form)], "token=nope&next=%2F");
    assert_eq!(r.status, 401);
    let r = anon.send("POST", "/login", &[("content-type", form)], &format!("token={ADMIN_TOKEN}&next=%2Fevents%2F{id}"));
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location").as_deref(), Some(format!("/events/{id}").as_str()));
    let set = r.header("set-cookie").expect("login sets a cookie");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    assert!(!set.contains(ADMIN_TOKEN), "the cookie must not carry the token: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let page = anon.send("GET", &format!("/events/{id}"), &[("cookie", &cookie)], "");
    assert_eq!(page.status, 200);
    assert!(page.text().contains(&id));
    assert_eq!(anon.send("GET", "/api/stats", &[("cookie", "hooktrail_admin=1.deadbeef")], "").status, 401, "forged cookie");
    // Another site cannot make a logged-in browser press replay.
    let origin = admin.base.replace("127.0.0.1", "evil.example");
    let r = anon.send("POST", &format!("/events/{id}/replay"), &[("cookie", &cookie), ("origin", &origin)], "");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = anon.send("POST", &format!("/events/{id}/replay"), &[("cookie", &cookie), ("origin", &admin.base)], "");
    assert_eq!(r.status, 303, "{}", r.text());
}

#[test]
fn guessing_the_admin_token_is_slowed_down_per_address() {
    let env = TestEnv::new(CONFIG);
    let d = env.daemon().env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN).start();
    let admin = Admin::of(&env, Some(ADMIN_TOKEN));
    let anon = admin.anon();
    let form = "application/x-www-form-urlencoded";
    // Several tokens in one request are refused, the right one among them
    // included, and count as a wrong try: a request tests one guess.
    let two = [("authorization", "Bearer guess-x"), ("authorization", &*format!("Bearer {ADMIN_TOKEN}"))];
    assert_eq!(anon.send("GET", "/api/stats", &two, "").status, 401);
    // Nine more wrong tokens, by header and by the login form, are each just refused.
    for n in 1..10 {
        let r = if n % 2 == 0 {
            anon.send("GET", "/api/stats", &[("authorization", &format!("Bearer guess-{n}"))], "")
        } else {
            anon.send("POST", "/login", &[("content-type", form)], &format!("token=guess-{n}&next=%2F"))
        };
        assert_eq!(r.status, 401, "wrong token {n}: {}", r.text());
    }
    // Then this address's tokens are refused unchecked, even the right one,
    // so the block cannot be used to tell a right guess from a wrong one.
    let r = anon.send("GET", "/api/stats", &[("authorization", "Bearer guess-10")], "");
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.error().contains("too many wrong admin tokens"), "{}", r.text());
    let wait: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("a Retry-After in seconds");
    assert!((1..=6).contains(&wait), "Retry-After {wait}");
    assert_eq!(admin.get("/api/stats").status, 429, "the right token is not even checked while blocked");
    let r = anon.send("POST", "/login", &[("content-type", form)], &format!("token={ADMIN_TOKEN}&next=%2F"));
    assert_eq!(r.status, 429, "the login form is blocked too: {}", r.text());
    assert!(r.text().contains("too many wrong admin tokens"), "the page says why");
    assert!(r.header("set-cookie").is_none(), "no session while blocked");
    // Nothing else is disturbed: probes, and webhooks on the public listener.
    assert_eq!(anon.get("/healthz").status, 200);
    let id = d.post_json("/hooks/forms", r#"{"email":"a@example.com"}"#).id();
    assert!(id.starts_with("evt_"));
    // The log is written in the background: wait for the line, then check it all.
    wait_for("the block to be logged", Duration::from_secs(10), || d.log().contains("too many wrong tokens"));
    assert!(!d.log().contains(ADMIN_TOKEN) && !d.log().contains("guess-"), "tokens never reach the log");
    // After the wait, one try is checked again: a wrong one blocks the
    // address at once, so past the burst it is one guess per wait.
    wait_for("the block to lift", Duration::from_secs(wait + 5), || {
        anon.send("GET", "/api/stats", &[("authorization", "Bearer guess-11")], "").status == 401
    });
    assert_eq!(admin.get("/api/stats").status, 429, "blocked again right after one more wrong try");
    wait_for("the block to lift again", Duration::from_secs(wait + 5), || admin.get("/api/stats").status == 200);
}

#[test]
fn admin_without_a_token_is_loopback_only() {
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let id = d.post_json("/hooks/bare", "{}").id();
    let admin = Admin::of(&env, None);
    for path in
        ["/healthz", "/readyz", "/metrics", "/api/events", &format!("/api/events/{id}"), "/api/stats", "/", &format!("/events/{id}")]
    {
        let r = admin.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    }
    // A browser sent here by a foreign name (DNS rebinding) is refused.
    let r = admin.send("GET", "/api/events", &[("host", "rebind.attacker.example")], "");
    assert_eq!(r.status, 403, "{}", r.text());

    let db = toml_str(&env.db_path().to_string_lossy());
    let open = TestEnv::raw(&format!("[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {db}\n[admin]\nlisten = \"0.0.0.0:0\"\n"));
    let out = open.cli(&["check-config"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("admin.listen") && out.stdout.contains("HOOKTRAIL_ADMIN_TOKEN"), "{out:?}");
    let served = run(open.command(&["serve"]));
    assert_ne!(served.code, 0, "serve must refuse a non-loopback admin listener without a token: {served:?}");
    assert!(served.stderr.contains("admin.listen"), "{served:?}");
    let ok = run({
        let mut c = open.command(&["check-config"]);
        c.env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN);
        c
    });
    assert_eq!(ok.code, 0, "with a token any address is fine: {ok:?}");
}

#[test]
fn readiness_checks_storage_listener_and_processor_of_this_role() {
    let env = TestEnv::new(CONFIG);
    let all = env.start();
    let admin = Admin::of(&env, None);
    let r = admin.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"ready": true, "storage": "ok", "listener": "ok", "processor": "ok"}));
    assert!(metric(&admin.metrics(), "hooktrail_processor_last_round_seconds").is_some_and(|s| (0.0..5.0).contains(&s)));
    drop(all);

    // `--role ingest` runs no processor: readiness does not wait for one.
    let _ingest = env.daemon().arg("--role").arg("ingest").start();
    let admin = Admin::of(&env, None);
    let r = admin.get("/readyz").json();
    assert_eq!(r["ready"], true, "{r}");
    assert_eq!(r["processor"], "not run by this process");
    assert!(metric(&admin.metrics(), "hooktrail_processor_last_round_seconds").is_none());
}

#[test]
fn metrics_move_as_events_are_received_rejected_and_delivered() {
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let before = admin.metrics();
    assert_eq!(metric(&before, "hooktrail_queue_depth{handler=\"stuck\",status=\"retrying\"}"), Some(0.0), "{before}");
    assert_eq!(metric(&before, "hooktrail_events_received_total{source=\"forms\",outcome=\"accepted\"}"), None);

    let ok: Vec<String> = (0..2).map(|i| d.post_json("/hooks/forms", &format!("{{\"n\":{i}}}")).id()).collect();
    let stuck = d.post_json("/hooks/stuck", "{}").id();
    assert_eq!(d.post("/hooks/forms", "image/png", "x").status, 415);
    for id in &ok {
        admin.wait_status(id, "done");
    }
    admin.wait_status(&stuck, "retrying");

    let m = admin.metrics();
    let v = |s: &str| metric(&m, s).unwrap_or_else(|| panic!("no series {s} in:\n{m}"));
    assert_eq!(v("hooktrail_events_received_total{source=\"forms\",outcome=\"accepted\"}"), 2.0);
    assert_eq!(v("hooktrail_events_received_total{source=\"stuck\",outcome=\"accepted\"}"), 1.0);
    assert_eq!(v("hooktrail_requests_rejected_total{source=\"forms\",reason=\"content_type\"}"), 1.0);
    assert_eq!(v("hooktrail_delivery_attempts_total{handler=\"ok\",outcome=\"success\"}"), 2.0);
    assert_eq!(v("hooktrail_delivery_attempts_total{handler=\"stuck\",outcome=\"retry\"}"), 1.0);
    assert_eq!(v("hooktrail_delivery_seconds_count{handler=\"ok\"}"), 2.0);
    assert!(v("hooktrail_commit_seconds_count") >= 3.0);
    assert_eq!(v("hooktrail_queue_depth{handler=\"stuck\",status=\"retrying\"}"), 1.0);
    assert_eq!(v("hooktrail_queue_depth{handler=\"ok\",status=\"pending\"}"), 0.0);
    assert!(v("hooktrail_oldest_pending_seconds{handler=\"stuck\"}") > 0.0);
    assert_eq!(v("hooktrail_oldest_pending_seconds{handler=\"ok\"}"), 0.0);
    assert_eq!(v("hooktrail_backlog_deliveries"), 1.0);
    for family in ["hooktrail_commit_seconds histogram", "hooktrail_delivery_seconds histogram", "hooktrail_queue_depth gauge"] {
        assert!(m.contains(&format!("# TYPE {family}")), "missing # TYPE {family}");
    }
    // Every sample line is `name{labels} number` or `name number`.
    for line in m.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (_, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
    }
}

#[test]
fn api_events_search_and_the_page_search_box_find_a_lead_and_plain_text_in_payload_match_searches() {
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let daniel = d.post_json("/hooks/forms", seeds::NETRESULTS_FORM).id();
    let ann = d.post("/hooks/bare", "application/x-www-form-urlencoded", "name=Ann+Lee&email=ann%40example.com").id();
    admin.wait_status(&daniel, "done");

    let ids =
        |r: &Value| -> Vec<String> { r["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect() };
    assert_eq!(ids(&admin.json(&format!("/api/events?search={}", pct("dgolden@mid-corp.com")))), [daniel.as_str()]);
    assert_eq!(ids(&admin.json(&format!("/api/events?search={}", pct("ann lee")))), [ann.as_str()], "a form's decoded values");
    assert_eq!(ids(&admin.json("/api/events?search=ANN&source=forms")), Vec::<String>::new(), "with other filters");
    let cli = env.events_where(&["--search", "dgolden@mid-corp.com"]);
    assert_eq!(cli.len(), 1);
    assert_eq!(cli[0]["id"], daniel.as_str(), "the API and `events list --search` agree");

    // The page's search box, and plain text typed into "Payload match".
    for path in [format!("/?search={}", pct("dgolden@mid-corp.com")), format!("/?match={}", pct("dgolden@mid-corp.com"))] {
        let r = admin.get(&path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let page = r.text();
        assert!(page.contains(&daniel) && !page.contains(&ann), "{path} lists Daniel's event only");
        assert!(page.contains("name=\"search\" id=\"search\" value=\"dgolden@mid-corp.com\""), "{path}: the search box shows the search");
    }

    let r = admin.get("/api/events?search=%40-.");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("search: `@-.` has no letter or digit to search for"), "{}", r.text());
    assert_eq!(ids(&admin.json("/api/events")).len(), 2, "nothing stored or changed");
}

#[test]
fn api_events_filters_like_the_cli_pages_with_a_cursor_and_replays() {
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let daniel = d.post_json("/hooks/forms", seeds::NETRESULTS_FORM).id();
    let ann = d.post_json("/hooks/forms", r#"{"submission_values":{"email_address":["ann@example.com"]}}"#).id();
    let others: Vec<String> = (0..3).map(|_| d.post_json("/hooks/bare", r#"{"k":"a=b"}"#).id()).collect();
    admin.wait_status(&daniel, "done");
    admin.wait_status(&ann, "done");

    let m = "/submission_values/email_address/0=dgolden@mid-corp.com";
    let r = admin.json(&format!("/api/events?match={}", pct(m)));
    let ids: Vec<&str> = r["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![daniel.as_str()]);
    assert_eq!(r["next"], Value::Null);
    let cli = env.events_where(&["--match", m]);
    assert_eq!(cli.len(), 1);
    assert_eq!(cli[0]["id"], daniel.as_str(), "the API and `events list --match` agree");
    // A value may itself contain `=`; several matches must all hold.
    let r = admin.json(&format!("/api/events?match={}&source=bare", pct("/k=a=b")));
    assert_eq!(r["events"].as_array().unwrap().len(), 3);
    let r = admin.json(&format!("/api/events?match={}&match={}", pct(m), pct("/form_id=nope")));
    assert!(r["events"].as_array().unwrap().is_empty());
    let r = admin.json("/api/events?source=forms&status=done&handler=ok&since=1h");
    assert_eq!(r["events"].as_array().unwrap().len(), 2);
    let listed = &r["events"][0];
    assert_eq!(listed["id"], ann.as_str(), "newest first");
    for field in ["id", "source", "status", "received_at", "method", "content_type", "query", "remote_addr", "payload"] {
        assert!(listed.get(field).is_some(), "list element lacks {field}: {listed}");
    }

    // Paging: limit 2 over five events, following `next` to the end.
    let mut seen = Vec::new();
    let mut path = "/api/events?limit=2".to_string();
    loop {
        let page = admin.json(&path);
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 2);
        seen.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(c) => path = format!("/api/events?limit=2&cursor={c}"),
            None => break,
        }
    }
    let mut expected: Vec<String> = [daniel.clone(), ann.clone()].into_iter().chain(others).collect();
    expected.reverse();
    assert_eq!(seen, expected);

    let ev = admin.event(&daniel);
    for field in ["body", "headers", "payload", "deliveries"] {
        assert!(ev.get(field).is_some(), "/api/events/ID lacks {field}");
    }
    assert_eq!(ev["body"], seeds::NETRESULTS_FORM);
    assert_eq!(ev["deliveries"][0]["handler"], "ok");
    assert_eq!(ev["deliveries"][0]["attempts"][0]["outcome"], "success");

    let r = admin.post(&format!("/api/events/{daniel}/replay?handler=ok"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"id": daniel, "requeued": 1}));
    wait_for("the replay to add attempt 2", Duration::from_secs(20), || {
        let ev = admin.event(&daniel);
        attempts(&ev, "ok") == 2 && ev["status"] == "done"
    });
    assert_eq!(admin.event(&daniel)["deliveries"][0]["attempts"][1]["number"], 2);

    let stats = admin.json("/api/stats?source=forms");
    let total = stats.as_array().unwrap().iter().find(|r| r["handler"].is_null()).expect("a source total row");
    assert_eq!(total["received"], 2);

    assert_eq!(admin.get("/api/events/evt_01J00000000000000000000000").status, 404);
    assert_eq!(admin.get("/api/events/nonsense").status, 404);
    assert_eq!(admin.post("/api/events/evt_01J00000000000000000000000/replay").status, 404);
    assert_eq!(admin.post(&format!("/api/events/{daniel}/replay?handler=nope")).status, 404);
    for bad in ["status=nope", "limit=0", "match=nopointer", "cursor=x", "sorce=forms"] {
        let r = admin.get(&format!("/api/events?{bad}"));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(!r.error().is_empty());
    }
    assert_eq!(admin.get("/api/events/x/replay").status, 405);
}

#[test]
fn event_log_page_escapes_html_from_payloads_and_handler_output() {
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let evil = r#"{"name":"<script>alert(1)</script>","x":"\"><img src=x onerror=alert(2)>"}"#;
    let id = d
        .request("POST", "/hooks/forms?q=%3Cscript%3Eq()%3C/script%3E")
        .header("content-type", "application/json")
        .header("x-evil", "<script>h()</script>")
        .body(evil)
        .send()
        .id();
    admin.wait_status(&id, "done");

    for path in ["/".to_string(), format!("/events/{id}"), format!("/?match={}", pct("/name=<script>alert(1)</script>"))] {
        let r = admin.get(&path);
        assert_eq!(r.status, 200, "{path}");
        let html = r.text();
        assert!(!html.contains("<script"), "{path} contains a raw <script>:\n{html}");
        assert!(!html.contains("<img"), "{path} contains a raw <img>");
        assert!(html.contains("&lt;script&gt;"), "{path} shows the payload escaped");
        let csp = r.header("content-security-policy").expect("pages carry a CSP");
        assert!(csp.contains("default-src 'none'") && !csp.contains("script-src"), "{csp}");
        assert_eq!(r.header("x-content-type-options").as_deref(), Some("nosniff"));
    }
    let detail = admin.get(&format!("/events/{id}")).text();
    // The handler (cat) echoed the payload: its output is escaped too.
    assert!(detail.contains("class=\"attempt\""), "{detail}");
    assert!(detail.matches("&lt;script&gt;alert(1)&lt;/script&gt;").count() >= 3, "payload, body and output: {detail}");
    assert!(detail.contains("&lt;script&gt;h()&lt;/script&gt;"), "headers escaped");
    let list = admin.get(&format!("/?match={}", pct("/name=<script>alert(1)</script>"))).text();
    assert!(list.contains(&id), "the match filter finds the event");
    assert!(list.contains("value=\"/name=&lt;script&gt;"), "the filter field echoes the value escaped");
}

#[test]
fn retention_prunes_only_finished_events_past_the_age() {
    let env = TestEnv::new(&format!("{CONFIG}\n[handlers.permanent]\ntype = \"shell\"\ncommand = [\"/bin/false\"]\npermanent_exit_codes = [1]\n[sources.doomed]\nauth = {{ type = \"none\" }}\n[[routes]]\nsource = \"doomed\"\nhandler = \"permanent\"\n"));
    let text = std::fs::read_to_string(env.config_path()).unwrap().replace("[storage]\n", "[storage]\nretention = \"4s\"\n");
    env.write_config(&text);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let received = Instant::now();
    let done = d.post_json("/hooks/forms", "{}").id();
    let unrouted = d.post_json("/hooks/bare", "{}").id();
    let failed = d.post_json("/hooks/doomed", "{}").id();
    let retrying = d.post_json("/hooks/stuck", "{}").id();
    admin.wait_status(&done, "done");
    admin.wait_status(&failed, "failed");
    admin.wait_status(&retrying, "retrying");

    wait_for("finished events past the age to be pruned", Duration::from_secs(30), || {
        [&done, &unrouted, &failed].iter().all(|id| admin.get(&format!("/api/events/{id}")).status == 404)
    });
    // Not before the age: `received` was taken before the posts, so seeing
    // them gone any earlier than 4 s after it means they went too soon.
    assert!(received.elapsed() >= Duration::from_secs(4), "pruned before the retention age");
    assert_eq!(admin.event(&retrying)["status"], "retrying", "unfinished work is never pruned");
    wait_for("the retention pass to be logged", Duration::from_secs(15), || d.log().contains("retention: deleted finished events"));
    // A fresh event is kept while young.
    let fresh = d.post_json("/hooks/bare", "{}").id();
    assert_eq!(admin.get(&format!("/api/events/{fresh}")).status, 200);
}

#[test]
fn json_logs_are_one_object_per_line_with_event_ids_and_no_secrets() {
    let source_secret = "src-5ecret-9d8c7b6a5f4e3d2c1b0a";
    let env = TestEnv::new(&format!(
        "{CONFIG}\n[sources.guarded]\nauth = {{ type = \"header_token\", header = \"X-Token\", secret_env = \"GUARD_TOKEN\" }}\n[[routes]]\nsource = \"guarded\"\nhandler = \"ok\"\n"
    ));
    let d = env
        .daemon()
        .env("HOOKTRAIL_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .env("GUARD_TOKEN", source_secret)
        .env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN)
        .start();
    let admin = Admin::of(&env, Some(ADMIN_TOKEN));
    let id = d
        .request("POST", "/hooks/guarded")
        .header("content-type", "application/json")
        .header("x-token", source_secret)
        .body("{}")
        .send()
        .id();
    assert_eq!(
        d.request("POST", "/hooks/guarded").header("content-type", "application/json").header("x-token", "wrong").body("{}").send().status,
        401
    );
    admin.wait_status(&id, "done");
    assert_eq!(admin.post(&format!("/api/events/{id}/replay")).status, 200);
    wait_for("the replayed attempt", Duration::from_secs(20), || attempts(&admin.event(&id), "ok") == 2);
    let form = "application/x-www-form-urlencoded";
    let login = admin.anon().send("POST", "/login", &[("content-type", form)], &format!("token={ADMIN_TOKEN}"));
    assert_eq!(login.status, 303);
    wait_for("the attempt lines to be logged", Duration::from_secs(10), || d.log().matches("attempt finished").count() >= 2);

    let log = d.log();
    let mut stored = 0;
    let mut attempts_logged = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v.is_object() && v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        match v["message"].as_str() {
            Some("event stored") if v["source"] == "guarded" => {
                assert_eq!(v["event_id"], id.as_str(), "{line}");
                stored += 1;
            }
            Some("attempt finished") => {
                assert_eq!(v["event_id"], id.as_str(), "{line}");
                attempts_logged += 1;
            }
            _ => {}
        }
    }
    assert_eq!(stored, 1, "one line per received event");
    assert_eq!(attempts_logged, 2, "one line per attempt");
    for secret in [source_secret, ADMIN_TOKEN] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
}

/// The browser test's directory (package.json, the script, node_modules).
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    p.exists().then_some(p)
}

/// Runs `tests/browser/<script>` with node in `chromium` (a fresh profile),
/// the admin URL and token plus `vars` in its environment, and returns the
/// JSON summary it prints last. Installs the script's node_modules first when
/// they are missing (`.ci/browser.sh` does it in CI).
fn run_browser_script(script: &str, chromium: &Path, admin: &Admin, vars: &[(&str, &str)]) -> Value {
    let dir = browser_dir();
    if !dir.join("node_modules/playwright-core").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("running npm ci in tests/browser");
        assert!(
            out.status.success(),
            "Chromium is installed but tests/browser has no node_modules and `npm ci` failed; run .ci/browser.sh:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let profile = tempfile::tempdir().expect("a Chromium profile dir");
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script))
        .current_dir(&dir)
        .env("ADMIN_URL", &admin.base)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("CHROMIUM", chromium)
        .env("PROFILE_DIR", profile.path());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("running node tests/browser/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser script failed:\nstdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("browser script's last line is not JSON ({e}): {stdout}"))
}

#[test]
fn browser_filters_opens_an_event_and_replays_it() {
    let Some(chromium) = chromium() else {
        println!("SKIPPED browser_filters_opens_an_event_and_replays_it: no Chromium at /usr/bin/chromium (set CHROMIUM=…); .ci/browser.sh installs it");
        return;
    };
    let env = TestEnv::new(CONFIG);
    let d = env.daemon().env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN).start();
    let admin = Admin::of(&env, Some(ADMIN_TOKEN));
    let target = d.post_json("/hooks/forms", r#"{"email":"lead@example.com","note":"<script>alert(1)</script>"}"#).id();
    let other = d.post_json("/hooks/forms", r#"{"email":"other@example.com"}"#).id();
    let unrelated = d.post_json("/hooks/bare", r#"{"email":"lead@example.com"}"#).id();
    for id in [&target, &other, &unrelated] {
        admin.wait_status(id, "done");
    }
    assert_eq!(attempts(&admin.event(&target), "ok"), 1);

    let result = run_browser_script("page.test.mjs", &chromium, &admin, &[("TARGET_ID", &target)]);
    assert_eq!(result["filtered_rows"], 1, "{result}");
    assert_eq!(result["attempts_before"], 1, "{result}");
    assert_eq!(result["attempts_after"], 2, "{result}");
    assert_eq!(result["dialogs"], 0, "a payload script ran in the page: {result}");
    // The daemon agrees: pressing replay ran the delivery again.
    let ev = admin.event(&target);
    assert_eq!(attempts(&ev, "ok"), 2);
    assert_eq!(ev["deliveries"][0]["attempts"][1]["outcome"], "success");
    assert_eq!(attempts(&admin.event(&other), "ok"), 1, "only the opened event was replayed");
}

/// Issue 11 item 11: logout ends the session on the server, so a copy of the
/// cookie (taken before logout) stops working at once.
#[test]
fn logout_revokes_the_session_so_a_copied_cookie_stops_working() {
    let env = TestEnv::new(CONFIG);
    let _d = env.daemon().env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN).start();
    let anon = Admin::of(&env, None);
    let form = "application/x-www-form-urlencoded";
    let login = || {
        let r = anon.send("POST", "/login", &[("content-type", form)], &format!("token={ADMIN_TOKEN}&next=%2F"));
        assert_eq!(r.status, 303, "{}", r.text());
        r.header("set-cookie").expect("login sets a cookie").split(';').next().unwrap().to_string()
    };
    let cookie = login();
    let copied = cookie.clone();
    assert_eq!(anon.send("GET", "/api/events", &[("cookie", &cookie)], "").status, 200, "the session works");
    let other = login();

    let r = anon.send("POST", "/logout", &[("cookie", &cookie), ("origin", &anon.base)], "");
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location").as_deref(), Some("/login"));
    assert!(r.header("set-cookie").is_some_and(|c| c.contains("Max-Age=0")), "the browser is told to forget it");

    let r = anon.send("GET", "/api/events", &[("cookie", &copied)], "");
    assert_eq!(r.status, 401, "a copied cookie still works after logout: {}", r.text());
    assert!(r.error().contains("admin token"), "{}", r.text());
    let page = anon.send("GET", "/", &[("cookie", &copied)], "");
    assert_eq!(page.status, 401);
    assert!(page.text().contains("name=\"token\""), "the page asks to log in again");
    assert_eq!(anon.send("GET", "/api/events", &[("cookie", &other)], "").status, 200, "another session is untouched");
    assert_eq!(anon.send("GET", "/api/events", &[("cookie", &login())], "").status, 200, "logging in again works");
    assert!(env.events().is_empty());
    assert!(!env.log().contains("panicked"));
}

/// Whether the daemon still holds this connection open (it sent nothing, so
/// a read would block), rather than having closed it.
fn still_open(s: &std::net::TcpStream) -> bool {
    use std::io::Read as _;
    s.set_nonblocking(true).expect("non-blocking");
    let mut byte = [0u8; 1];
    matches!((&*s).read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// Issue 11 item 12: idle connections cannot starve health probes. The admin
/// listener keeps 64 connections; each newcomer past that closes the oldest
/// idle one. So with 200 idle connections opened first, the probe is answered
/// while the newest 63 are still open (the probe holds the 64th slot) and
/// exactly the 137 oldest were closed to make room, not by any timeout.
#[test]
fn idle_connections_to_the_admin_listener_do_not_starve_health_probes() {
    const BUDGET: usize = 64;
    const IDLE: usize = 200;
    let env = TestEnv::new(CONFIG);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let addr = admin.base.trim_start_matches("http://").to_string();
    let idle: Vec<std::net::TcpStream> =
        (0..IDLE).map(|_| std::net::TcpStream::connect(&addr).expect("connecting to the admin listener")).collect();

    let r = admin.get("/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let closed = IDLE - (BUDGET - 1);
    wait_for("the oldest idle connections to be closed", Duration::from_secs(10), || idle[..closed].iter().all(|s| !still_open(s)));
    let open = idle[closed..].iter().filter(|s| still_open(s)).count();
    assert_eq!(open, BUDGET - 1, "the newest idle connections are kept; only the oldest were closed for room");

    // Everything else still works: readiness, and webhooks on the public listener.
    assert_eq!(admin.get("/readyz").status, 200);
    d.post_json("/hooks/forms", "{}").id();
    wait_for("making room to be logged", Duration::from_secs(15), || env.log().contains("closed the oldest idle one"));
    assert!(!env.log().contains("panicked"));
}

/// Issue 16: `broken` and `other` events go to `fails` (always fails, one
/// attempt, so they end `failed` at once); `forms` events to `ok`.
const FAILING: &str = r#"
[processor]
poll_interval = "100ms"
[sources.forms]
auth = { type = "none" }
[sources.broken]
auth = { type = "none" }
[sources.other]
auth = { type = "none" }
[handlers.ok]
type = "shell"
command = ["/bin/cat"]
[handlers.fails]
type = "shell"
command = ["/bin/false"]
max_attempts = 1
[[routes]]
source = "forms"
handler = "ok"
[[routes]]
source = "broken"
handler = "fails"
[[routes]]
source = "other"
handler = "fails"
"#;

/// Three failed `broken` events, one failed `other` event and one done
/// `forms` event, each with one attempt.
fn failed_events(admin: &Admin, d: &Daemon) -> (Vec<String>, String, String) {
    let broken: Vec<String> = (0..3).map(|i| d.post_json("/hooks/broken", &format!(r#"{{"n":{i}}}"#)).id()).collect();
    let other = d.post_json("/hooks/other", r#"{"n":9}"#).id();
    let done = d.post_json("/hooks/forms", r#"{"email":"lead@example.com"}"#).id();
    for id in broken.iter().chain([&other]) {
        admin.wait_status(id, "failed");
    }
    admin.wait_status(&done, "done");
    (broken, other, done)
}

/// Every event in `ids` is `status` with `n` attempts to its one handler.
fn assert_attempts(admin: &Admin, ids: &[String], status: &str, n: usize) {
    for id in ids {
        let ev = admin.event(id);
        let made = ev["deliveries"][0]["attempts"].as_array().map_or(0, Vec::len);
        assert_eq!((ev["status"].as_str(), made), (Some(status), n), "{id}: {ev}");
    }
}

/// Issue 16: `POST /api/replay` re-queues the failed deliveries of the
/// failed events matching its filters (as `events replay --status failed`),
/// lists them without changing anything on `dry_run=true`, refuses a bulk
/// selection that does not say `status=failed`, and refuses a cross-site POST.
#[test]
fn api_bulk_replay_requeues_failed_events_of_the_filter_dry_run_changes_nothing_cross_site_refused() {
    let env = TestEnv::new(FAILING);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let (broken, other, done) = failed_events(&admin, &d);

    // Dry run: lists with counts, changes nothing.
    let r = admin.post("/api/replay?status=failed&source=broken&dry_run=true");
    assert_eq!(r.status, 200, "{}", r.text());
    let plan = r.json();
    assert_eq!(
        (plan["dry_run"].as_bool(), plan["events"].as_u64(), plan["deliveries"].as_u64(), plan["requeued"].as_u64()),
        (Some(true), Some(3), Some(3), Some(0)),
        "{plan}"
    );
    let mut listed: Vec<&str> = plan["would_requeue"].as_array().unwrap().iter().map(|d| d["event_id"].as_str().unwrap()).collect();
    listed.sort();
    let mut want: Vec<&str> = broken.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(listed, want, "{plan}");
    assert_eq!(plan["would_requeue"][0]["handler"], "fails");
    assert_eq!(plan["would_requeue"][0]["status"], "failed");
    assert_eq!(plan["would_requeue"][0]["attempt_count"], 1);
    assert_attempts(&admin, &broken, "failed", 1);

    // A bulk selection must say status=failed; no paging; no unknown names.
    for (q, says) in [
        ("source=broken", "status=failed"),
        ("status=done&source=broken", "status=failed"),
        ("status=failed&limit=1", "unknown query parameter `limit`"),
        ("status=failed&dry_run=maybe", "dry_run"),
        ("status=failed&all=true", "unknown query parameter `all`"),
    ] {
        let r = admin.post(&format!("/api/replay?{q}"));
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert!(r.error().contains(says), "{q}: {}", r.text());
    }
    assert_eq!(admin.get("/api/replay?status=failed").status, 405, "a GET changes nothing");

    // Cross-site: refused before anything is read or changed.
    for headers in [[("origin", "http://evil.example")], [("sec-fetch-site", "cross-site")]] {
        let r = admin.send("POST", "/api/replay?status=failed&source=broken", &headers, "");
        assert_eq!(r.status, 403, "{headers:?}: {}", r.text());
        assert!(r.error().contains("cross-site"), "{}", r.text());
    }
    assert_attempts(&admin, &broken, "failed", 1);
    assert_attempts(&admin, std::slice::from_ref(&other), "failed", 1);

    // The real thing, from this site: the count matches the dry run.
    let base = admin.base.clone();
    let r = admin.send("POST", "/api/replay?status=failed&source=broken", &[("origin", &base), ("sec-fetch-site", "same-origin")], "");
    assert_eq!(r.status, 200, "{}", r.text());
    let done_replay = r.json();
    assert_eq!((done_replay["events"].as_u64(), done_replay["requeued"].as_u64()), (Some(3), Some(3)), "{done_replay}");
    wait_for("the three replayed deliveries to fail again", Duration::from_secs(20), || {
        broken.iter().all(|id| {
            let ev = admin.event(id);
            ev["status"] == "failed" && attempts(&ev, "fails") == 2
        })
    });
    assert_attempts(&admin, std::slice::from_ref(&other), "failed", 1);
    assert_attempts(&admin, std::slice::from_ref(&done), "done", 1);

    // Filtered by handler: the `ok` handler has no failed delivery.
    let r = admin.post("/api/replay?status=failed&handler=ok&dry_run=1");
    assert_eq!(r.json()["deliveries"], 0, "{}", r.text());
    assert!(!env.log().contains("panicked"));
}

/// Issue 16: the page's bulk replay without a browser: the list offers
/// "Replay failed (N)" for its filters, the confirmation page counts, a
/// confirmation whose count no longer holds is asked again (409, nothing
/// re-queued), a cross-site form POST is refused (403, nothing re-queued),
/// and a confirmed one re-queues and redirects back with the count.
#[test]
fn page_bulk_replay_confirms_the_count_rechecks_it_and_refuses_cross_site_posts() {
    let env = TestEnv::new(FAILING);
    let d = env.start();
    let admin = Admin::of(&env, None);
    let (broken, other, _done) = failed_events(&admin, &d);

    let list = admin.get("/?source=broken");
    assert_eq!(list.status, 200);
    assert!(list.text().contains("Replay failed (3)"), "{}", list.text());
    let all = admin.get("/").text();
    assert!(all.contains("Replay failed (4)"), "no filter: every failed event");
    assert!(!admin.get("/?source=forms").text().contains("bulk-replay"), "nothing failed, no button");
    assert!(!admin.get("/?source=broken&status=done").text().contains("bulk-replay"));

    let confirm = admin.get("/replay?source=broken");
    assert_eq!(confirm.status, 200, "{}", confirm.text());
    let page = confirm.text();
    assert!(
        page.contains("<strong id=\"bulk-deliveries\">3</strong> failed deliveries of <strong id=\"bulk-events\">3</strong> events?"),
        "{page}"
    );
    assert!(page.contains("name=\"expect\" value=\"3\""), "{page}");
    assert!(page.contains("<code>status=failed</code>"), "{page}");
    assert_attempts(&admin, &broken, "failed", 1);
    let refused = admin.get("/replay?source=broken&status=done");
    assert_eq!(refused.status, 400);
    assert!(refused.text().contains("failed events only"), "{}", refused.text());

    let form = "application/x-www-form-urlencoded";
    let base = admin.base.clone();
    let same = [("content-type", form), ("origin", base.as_str()), ("sec-fetch-site", "same-origin")];
    // A forged form from another site, with the right count.
    for evil in [("origin", "http://evil.example"), ("sec-fetch-site", "cross-site")] {
        let r = admin.send("POST", "/replay", &[("content-type", form), evil], "source=broken&expect=3");
        assert_eq!(r.status, 403, "{evil:?}: {}", r.text());
        assert!(r.error().contains("cross-site"), "{}", r.text());
    }
    // A stale confirmation: asked again, nothing re-queued.
    let r = admin.send("POST", "/replay", &same, "source=broken&expect=2");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("id=\"count-changed\""), "{}", r.text());
    let r = admin.send("POST", "/replay", &same, "source=broken");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("lacks the count"), "{}", r.text());
    assert_attempts(&admin, &broken, "failed", 1);

    let r = admin.send("POST", "/replay", &same, "source=broken&status=&expect=3");
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location").as_deref(), Some("/?source=broken&requeued=3"));
    let flash = admin.get("/?source=broken&requeued=3");
    assert_eq!(flash.status, 200);
    assert!(flash.text().contains("Re-queued 3 failed deliveries."), "{}", flash.text());
    wait_for("the three replayed deliveries to fail again", Duration::from_secs(20), || {
        broken.iter().all(|id| {
            let ev = admin.event(id);
            ev["status"] == "failed" && attempts(&ev, "fails") == 2
        })
    });
    assert_attempts(&admin, &[other], "failed", 1);
    assert!(!env.log().contains("panicked"));
}

/// Issue 16, in a real browser: filter to a source with failed events, press
/// "Replay failed (N)", see the count, confirm, see the flash, and the events
/// are re-queued; then a page on another origin posts the same form and is
/// refused, re-queuing nothing.
#[test]
fn browser_bulk_replays_failed_events_after_confirmation_and_refuses_a_forged_post() {
    let Some(chromium) = chromium() else {
        println!("SKIPPED browser_bulk_replays_failed_events_after_confirmation_and_refuses_a_forged_post: no Chromium at /usr/bin/chromium (set CHROMIUM=…); .ci/browser.sh installs it");
        return;
    };
    let env = TestEnv::new(FAILING);
    let d = env.daemon().env("HOOKTRAIL_ADMIN_TOKEN", ADMIN_TOKEN).start();
    let admin = Admin::of(&env, Some(ADMIN_TOKEN));
    let (broken, other, _done) = failed_events(&admin, &d);

    let failed = broken.len().to_string();
    let result = run_browser_script("bulk.test.mjs", &chromium, &admin, &[("SOURCE", "broken"), ("FAILED", &failed)]);
    assert_eq!(result["button"], "Replay failed (3)", "{result}");
    assert_eq!(result["confirm_deliveries"], 3, "{result}");
    assert_eq!(result["confirm_events"], 3, "{result}");
    assert_eq!(result["flash"], "Re-queued 3 failed deliveries. Reload to follow the new attempts.", "{result}");
    assert_eq!(result["forged_status"], 403, "{result}");
    assert!(result["forged_body"].as_str().unwrap_or("").contains("cross-site"), "{result}");
    // The daemon agrees: the confirmed replay ran each delivery once more
    // (and it failed again), the forged one re-queued nothing, and the
    // failed event of another source was left alone.
    assert_attempts(&admin, &broken, "failed", 2);
    assert_attempts(&admin, &[other], "failed", 1);
}
