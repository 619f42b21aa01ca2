//! Shared harness for the integration tests: every test runs the real
//! `hooktrail` binary against a temp dir holding its config, database, ready
//! file and captured stderr, and talks real HTTP to it on an ephemeral port.
//!
//! - [`TestEnv`]: the temp dir and config; runs CLI commands on the same database.
//! - [`Daemon`]: a running `hooktrail serve`; killed (SIGKILL) on drop so no test
//!   leaks a process, whatever it asserted.
//! - [`Req`]/[`Resp`]: a tiny blocking HTTP client (reqwest) that hands back
//!   status, headers and body for every status, 4xx/5xx included.
//! - [`read_response`]: for raw `TcpStream` cases (trickled or chunked bodies).
//! - [`wait_until`]/[`wait_for`]: poll a condition with a deadline; never sleep and hope.
//! - [`assert_status`], [`wait_rejected`]: what every rejection test checks
//!   (status and error text; the rejection counted).
//! - [`fast_retries`], [`open_source`], [`route`]: config pieces for tests that wait for deliveries.
//! - [`FakePeer`] (with [`hubspot_ok`]): a recording HTTP peer on loopback.
//! - [`sign`]: HMAC signatures computed as the providers document them.
//!
//! - [`backend`]/[`sqlite_only`]: which database the daemons use
//!   (`HOOKTRAIL_TEST_BACKEND=postgres` runs every suite on a fresh
//!   PostgreSQL database per [`TestEnv`], see `pg.rs`), and the tests that
//!   check what only a SQLite file has.
//!
//! Each test binary uses a different subset of this module.
#![allow(dead_code)]

pub mod pg;
pub mod sign;
#[allow(unused_imports)] // not every test binary signs
pub use sign::*;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_hooktrail");

/// How long a daemon may take to open storage and bind (debug build, busy 2-core box).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_until`], but panics naming `what` when the deadline passes.
pub fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(wait_until(timeout, cond), "timed out after {timeout:?} waiting for {what}");
}

/// Quotes a string as a TOML basic string (JSON string syntax is a subset).
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// How long a rejection may take to show in `stats` (counts are flushed with
/// the writer's next batch, at most every half second).
pub const STATS_WAIT: Duration = Duration::from_secs(10);

/// Asserts an error answer: `status`, and a JSON `"error"` message containing `want`.
pub fn assert_status(r: &Resp, status: u16, want: &str) {
    assert_eq!(r.status, status, "expected {status} ({want}), got {} {}", r.status, r.text());
    let e = r.error();
    assert!(e.contains(want), "error {e:?} does not mention {want:?}");
}

/// Waits until `stats` counts `n` rejections for `source`, and no more.
pub fn wait_rejected(env: &TestEnv, source: &str, n: u64) {
    let mut seen = 0;
    let ok = wait_until(STATS_WAIT, || {
        seen = env.stat(source, "rejected");
        seen >= n
    });
    assert!(ok, "stats for `{source}` should count {n} rejection(s), saw {seen}");
    assert_eq!(env.stat(source, "rejected"), n, "stats for `{source}` counted more rejections than were sent");
}

/// `[processor]` polling every 100 ms plus `processor_keys`, and a `[retry]`
/// policy of `max_attempts` with backoff from 100 ms up to `max_backoff`:
/// every retry path ends in about a second.
pub fn fast_retries(max_attempts: u32, max_backoff: &str, processor_keys: &str) -> String {
    format!(
        "[processor]\npoll_interval = \"100ms\"\n{processor_keys}\n\n\
         [retry]\nmax_attempts = {max_attempts}\ninitial_backoff = \"100ms\"\nmax_backoff = {}\n",
        toml_str(max_backoff)
    )
}

/// A source that accepts anyone.
pub fn open_source(name: &str) -> String {
    format!("[sources.{name}]\nauth = {{ type = \"none\" }}\n")
}

/// A `[[routes]]` entry from `source` to `handler`, every event.
pub fn route(source: &str, handler: &str) -> String {
    format!("[[routes]]\nsource = \"{source}\"\nhandler = \"{handler}\"\n")
}

/// A JSON document of exactly `len` bytes.
pub fn json_of_len(len: usize) -> String {
    let pad = len - r#"{"pad":""}"#.len();
    format!(r#"{{"pad":"{}"}}"#, "p".repeat(pad))
}

/// A raw chunked POST of `body` as JSON to `path`, in chunks of `chunk` bytes
/// (the last may be shorter, so limits are checked across chunk boundaries);
/// `Connection: close`, as [`Daemon::raw`] sends one request per connection.
pub fn chunked_request(path: &str, body: &str, chunk: usize) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in body.as_bytes().chunks(chunk) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// The database the suites run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `HOOKTRAIL_TEST_BACKEND` (`sqlite`, the default, or `postgres`).
pub fn backend() -> Backend {
    match std::env::var("HOOKTRAIL_TEST_BACKEND").as_deref() {
        Err(_) | Ok("sqlite") | Ok("") => Backend::Sqlite,
        Ok("postgres") => Backend::Postgres,
        Ok(other) => panic!("HOOKTRAIL_TEST_BACKEND = `{other}`; the integration suites run on `sqlite` or `postgres`"),
    }
}

/// For a test of something only the SQLite backend has (the database file,
/// its volume's free space, files beside it): true, with the reason on
/// stderr, when the suites run on PostgreSQL, and the test then returns.
pub fn sqlite_only(what: &str) -> bool {
    if backend() == Backend::Sqlite {
        return false;
    }
    eprintln!("skipped on PostgreSQL: this test checks {what}, which only the SQLite backend has");
    true
}

/// The variable the daemon's `storage.url_env` names under PostgreSQL.
pub const PG_URL_VAR: &str = "HOOKTRAIL_DATABASE_URL";

/// A temp dir with a config file and (once a daemon ran) a database.
pub struct TestEnv {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// Number of daemons started so far (each gets its own log file).
    starts: std::cell::Cell<u32>,
    /// Under PostgreSQL: this env's own database, dropped with it.
    pg: Option<pg::PgDatabase>,
}

impl TestEnv {
    /// A config made of the harness's `[server]`, `[storage]` and `[admin]`
    /// sections plus `body` (sources, handlers, routes).
    pub fn new(body: &str) -> Self {
        Self::with_server("", body)
    }

    /// Like [`TestEnv::new`], with extra `[server]` keys (e.g. `request_timeout = "1s"`).
    pub fn with_server(server_extra: &str, body: &str) -> Self {
        let db = (backend() == Backend::Postgres).then(pg::PgDatabase::create);
        Self::with_database(db, server_extra, body)
    }

    /// Like [`TestEnv::new`], on SQLite whatever the suites run on (the
    /// source of an export moved to the configured backend).
    pub fn on_sqlite(body: &str) -> Self {
        Self::with_database(None, "", body)
    }

    /// Like [`TestEnv::new`], on a fresh database of the PostgreSQL server
    /// at `server` (a test that stops its own server).
    pub fn on_postgres_server(server: &str, body: &str) -> Self {
        Self::with_database(Some(pg::PgDatabase::create_on(server)), "", body)
    }

    fn with_database(db: Option<pg::PgDatabase>, server_extra: &str, body: &str) -> Self {
        let mut env = Self::empty();
        env.pg = db;
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nready_file = {ready}\n{server_extra}\n\n\
             {storage}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             {body}\n",
            ready = toml_str(&env.ready_file().to_string_lossy()),
            storage = env.storage_section(),
        );
        env.write_config(&text);
        env
    }

    /// The `[storage]` section this env's daemons use: the SQLite file in
    /// the temp dir, or (under PostgreSQL) the env's own database.
    pub fn storage_section(&self) -> String {
        match &self.pg {
            Some(_) => format!("[storage]\nbackend = \"postgres\"\nurl_env = \"{PG_URL_VAR}\"\n"),
            None => format!("[storage]\npath = {}\n", toml_str(&self.db_path().to_string_lossy())),
        }
    }

    /// A temp dir whose config file is exactly `text` (for check-config tests).
    pub fn raw(text: &str) -> Self {
        let env = Self::empty();
        env.write_config(text);
        env
    }

    fn empty() -> Self {
        let dir = tempfile::Builder::new().prefix("hooktrail-test-").tempdir().expect("creating a temp dir");
        let config = dir.path().join("hooktrail.toml");
        TestEnv { dir, config, starts: std::cell::Cell::new(0), pg: None }
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("writing the config");
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> &Path {
        &self.config
    }
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("db.sqlite")
    }
    pub fn ready_file(&self) -> PathBuf {
        self.dir.path().join("ready.json")
    }

    /// Everything every daemon of this env wrote to stderr so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.starts.get() {
            if let Ok(bytes) = std::fs::read(self.log_path(n)) {
                all.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        all
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("daemon-{n}.log"))
    }

    /// Starts `hooktrail serve` with default options.
    pub fn start(&self) -> Daemon {
        self.daemon().start()
    }

    /// A daemon to configure (env vars, extra args, limits) before starting it.
    pub fn daemon(&self) -> DaemonBuilder<'_> {
        DaemonBuilder { env: self, vars: Vec::new(), args: Vec::new(), max_file_size: None }
    }

    /// This env's PostgreSQL database, when the suites run on PostgreSQL.
    pub fn postgres(&self) -> Option<&pg::PgDatabase> {
        self.pg.as_ref()
    }

    /// The variable holding this env's database URL (PostgreSQL), for a
    /// command built by hand from [`clean_command`].
    pub fn database_env(&self) -> Option<(&'static str, String)> {
        self.pg.as_ref().map(|db| (PG_URL_VAR, db.url()))
    }

    /// A `hooktrail --config <this config> ARGS…` command with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = clean_command();
        c.arg("--config").arg(&self.config).args(args);
        if let Some(db) = &self.pg {
            c.env(PG_URL_VAR, db.url());
        }
        c
    }

    /// Runs a CLI command to completion.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        run(self.command(args))
    }

    /// Runs a CLI command that must succeed and print one JSON document.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert_eq!(out.code, 0, "hooktrail {args:?} failed: {out:?}");
        // Without serde_json's 127-level guard: an event may hold a payload
        // 128 levels deep (the most ingest accepts), inside the record.
        let mut de = serde_json::Deserializer::from_str(&out.stdout);
        de.disable_recursion_limit();
        let doc = serde::Deserialize::deserialize(&mut de).and_then(|v: Value| de.end().map(|()| v));
        doc.unwrap_or_else(|e| panic!("hooktrail {args:?} did not print JSON ({e}): {out:?}"))
    }

    /// Every stored event (`events list --json`), newest first.
    pub fn events(&self) -> Vec<Value> {
        self.events_where(&[])
    }

    /// `events list --json --limit 100000` plus `filters`.
    pub fn events_where(&self, filters: &[&str]) -> Vec<Value> {
        let mut args = vec!["events", "list", "--json", "--limit", "100000"];
        args.extend_from_slice(filters);
        match self.cli_json(&args) {
            Value::Array(list) => list,
            other => panic!("events list --json printed a non-array: {other}"),
        }
    }

    /// `events show ID --json`.
    pub fn show(&self, id: &str) -> Value {
        self.cli_json(&["events", "show", id, "--json"])
    }

    /// `stats --json` rows.
    pub fn stats(&self) -> Vec<Value> {
        match self.cli_json(&["stats", "--json"]) {
            Value::Array(rows) => rows,
            other => panic!("stats --json printed a non-array: {other}"),
        }
    }

    /// The per-source total row of `stats --json` (handler null), if any.
    pub fn source_stats(&self, source: &str) -> Option<Value> {
        self.stats().into_iter().find(|r| r["source"] == source && r["handler"].is_null())
    }

    /// One counter (`received`, `rejected`, `duplicates`, …) of a source's stats; 0 when absent.
    pub fn stat(&self, source: &str, field: &str) -> u64 {
        self.source_stats(source).and_then(|r| r[field].as_u64()).unwrap_or(0)
    }
}

/// A command for the binary with no inherited `HOOKTRAIL*` settings.
pub fn clean_command() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HOOKTRAIL") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// What a finished CLI command printed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(mut c: Command) -> CliOutput {
    let out = c.output().expect("running hooktrail");
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub struct DaemonBuilder<'a> {
    env: &'a TestEnv,
    vars: Vec<(String, String)>,
    args: Vec<String>,
    max_file_size: Option<u64>,
}

impl DaemonBuilder<'_> {
    /// An environment variable for the daemon (secrets, `RUST_LOG`, `HOOKTRAIL__…`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.vars.push((key.into(), value.into()));
        self
    }

    /// An argument after `serve` (e.g. `--role ingest`).
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// `RLIMIT_FSIZE` for the daemon, with `SIGXFSZ` ignored: writes that would
    /// grow any file past `bytes` fail with `EFBIG`, as on a full disk.
    pub fn max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = Some(bytes);
        self
    }

    /// Spawns the daemon and waits (with a deadline) for its ready file.
    pub fn start(self) -> Daemon {
        let env = self.env;
        let _ = std::fs::remove_file(env.ready_file());
        let n = env.starts.get() + 1;
        env.starts.set(n);
        let log_path = env.log_path(n);
        let log = File::create(&log_path).expect("creating the daemon log");
        let mut c = env.command(&["serve"]);
        c.args(&self.args).env("RUST_LOG", "info").stdout(log.try_clone().expect("cloning the log handle")).stderr(log);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        if let Some(limit) = self.max_file_size {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: between fork and exec only async-signal-safe calls are made.
            unsafe {
                c.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    // Soft limit only, so a test may lift it again without privileges.
                    let lim = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: libc::RLIM_INFINITY };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = c.spawn().expect("spawning hooktrail serve");
        let mut d = Daemon { child, addr: "0.0.0.0:0".parse().expect("literal address"), log_path, http: http_client() };
        let ready = env.ready_file();
        let mut parsed: Option<Value> = None;
        let up = wait_until(START_TIMEOUT, || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("hooktrail serve exited ({status}) before it was ready; its log:\n{}", d.log());
            }
            parsed = std::fs::read(&ready).ok().and_then(|b| serde_json::from_slice(&b).ok());
            parsed.is_some()
        });
        assert!(up, "hooktrail serve did not write {} within {START_TIMEOUT:?}; its log:\n{}", ready.display(), d.log());
        let info = parsed.expect("checked above");
        if self.args.windows(2).any(|w| w[0] == "--role" && w[1] == "process") {
            // A process node has no public listener.
            return d;
        }
        d.addr = info["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("ready file has no usable \"listen\" address: {info}"));
        d
    }
}

fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("building the test HTTP client")
}

/// A running `hooktrail serve`. Dropping it kills the process (SIGKILL).
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    log_path: PathBuf,
    http: reqwest::blocking::Client,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What this daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// A request to build; `path` may carry a query string.
    pub fn request(&self, method: &str, path: &str) -> Req {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method name");
        Req { inner: self.http.request(m, self.url(path)) }
    }

    /// POSTs `body` with a `Content-Type`.
    pub fn post(&self, path: &str, content_type: &str, body: impl Into<Vec<u8>>) -> Resp {
        self.request("POST", path).header("content-type", content_type).body(body).send()
    }

    pub fn post_json(&self, path: &str, body: &str) -> Resp {
        self.post(path, "application/json", body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path).send()
    }

    /// A raw TCP connection to the public listener (5 s read timeout by default).
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connecting to the daemon");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("setting a read timeout");
        s
    }

    /// Sends raw request bytes on a new connection and reads one response.
    pub fn raw(&self, request: &[u8]) -> Resp {
        let mut s = self.connect();
        s.write_all(request).expect("writing the raw request");
        read_response(&mut s).expect("reading the response")
    }

    /// SIGKILL, then reap. Nothing runs in the daemon after this returns.
    pub fn kill9(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (and returns at once).
    pub fn sigterm(&self) {
        signal(self.child.id(), libc::SIGTERM);
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        let exited = wait_until(timeout, || {
            status = self.child.try_wait().expect("polling the daemon");
            status.is_some()
        });
        assert!(exited, "hooktrail did not exit within {timeout:?}; its log:\n{}", self.log());
        status.expect("checked above")
    }

    /// Changes the running daemon's `RLIMIT_FSIZE` (see [`DaemonBuilder::max_file_size`]);
    /// `None` lifts it.
    pub fn set_max_file_size(&self, bytes: Option<u64>) {
        let v = bytes.map_or(libc::RLIM_INFINITY, |b| b as libc::rlim_t);
        let lim = libc::rlimit { rlim_cur: v, rlim_max: libc::RLIM_INFINITY };
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: prlimit(2) on our own child with a valid rlimit and no old-value pointer.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit failed: {}", std::io::Error::last_os_error());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_now();
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid we spawned and still hold (not yet reaped).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed: {}", std::io::Error::last_os_error());
}

/// A request being built (wraps reqwest's blocking builder).
pub struct Req {
    inner: reqwest::blocking::RequestBuilder,
}

impl Req {
    pub fn header(self, name: &str, value: &str) -> Self {
        Req { inner: self.inner.header(name, value) }
    }
    pub fn body(self, body: impl Into<Vec<u8>>) -> Self {
        Req { inner: self.inner.body(body.into()) }
    }
    /// Sends; panics on a transport error (connection refused, reset…).
    pub fn send(self) -> Resp {
        self.try_send().unwrap_or_else(|e| panic!("HTTP request failed: {e}"))
    }
    pub fn try_send(self) -> Result<Resp, reqwest::Error> {
        let r = self.inner.send()?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes()?.to_vec();
        Ok(Resp { status, headers, body })
    }
}

/// A response with everything a test may look at.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
    /// The `"error"` message of an error answer; panics if the body has none.
    pub fn error(&self) -> String {
        match self.json().get("error") {
            Some(Value::String(s)) => s.clone(),
            _ => panic!("no \"error\" string in {} {:?}", self.status, self.text()),
        }
    }
    /// The event id of a 200 answer; panics otherwise.
    pub fn id(&self) -> String {
        assert_eq!(self.status, 200, "expected 200, got {} {:?}", self.status, self.text());
        self.json()["id"].as_str().unwrap_or_else(|| panic!("no id in {:?}", self.text())).to_string()
    }
}

/// Reads one HTTP/1.1 response (1xx included) from a raw stream: the head,
/// then `Content-Length` bytes of body (or up to EOF without one).
pub fn read_response(stream: &mut TcpStream) -> std::io::Result<Resp> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status line {status_line:?}")))?;
    let mut headers = reqwest::header::HeaderMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) =
                (reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()), reqwest::header::HeaderValue::from_str(v.trim()))
            {
                headers.append(k, v);
            }
        }
    }
    let mut body = Vec::new();
    if (100..200).contains(&status) {
        // An interim response has no body.
    } else if let Some(len) = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Resp { status, headers, body })
}

/// Sample bodies from the senders in `shared/seeds/`, as they send them.
pub mod seeds {
    /// Net-Results / Paminga form webhook.
    pub const NETRESULTS_FORM: &str = r#"{
"contact_id": "749746728",
"form_id": "1c051a75-f78c-4961-b8d5-b233229ae125",
"form_completion_id": "4453534",
"referrer": "",
"ip": "73.158.92.120",
"submission_time": "2020-12-04T20:58:01+00:00",
"submission_values": {
"first_name": ["Daniel"],
"last_name": ["Golden"],
"email_address": ["dgolden@mid-corp.com"],
"company_name": ["MidSize Corp"]
},
"landing_page_url": ""
}"#;

    /// Net-Results / Paminga campaign webhook (a batch of contact ids).
    pub const NETRESULTS_CAMPAIGN: &str = r#"{
"CampaignActionQualification": [{
"Campaign": [{
"campaign_id": 12345,
"campaign_name": "Your Amazing Lead Gen Campaign",
"campaign_description": "Quite the description you've authored there...",
"campaign_status_type": "Launched",
"campaign_hold_status_type": "Active",
"campaign_configuration": "Nurturing",
"campaign_configuration_id": 1,
"campaign_duration": "Perpetual",
"campaign_type": "Perpetual",
"campaign_type_id": 2,
"campaign_launch_date": "2019-07-05T16:30:00+00:00",
"campaign_retirement_date": null,
"campaign_modify_date": "2019-01-15T16:28:02+00:00",
"product_id": 12345,
"campaign_frequency": 0,
"folder_campaign_id": 1234,
"rbac_role_id": null,
"archived": false,
"CampaignAction": [{
"campaign_action_id": "123456",
"campaign_action_name": "Campaign Start",
"Contacts": {"2019-08-02T15:45:22+00:00": [1234567, 12345678, 123456789]}
}]
}]
}]
}"#;

    /// The email platform's "Send a webhook" test event.
    pub const EMAIL_TEST_EVENT: &str = r#"{"id":"test_evt_GppedVq2CWTWxUUxrm26bic0C",
"event":"automation.webhook.send",
"timestamp":"2024-05-28T12:56:40Z",
"idClient":3,
"data":{
"type":"member",
"id":54321,
"email":"john.doe@example.org",
"firstname":"John",
"lastname":"Doe"
}
}"#;

    /// ONTRAPORT "Send a Webhook" post data (`First_Name=[First Name]&Email=[Email]`, merged).
    pub const ONTRAPORT_FORM: &str = "First_Name=Daniel&Email=dgolden%40mid-corp.com&address=2040+Alameda+Padre+Serra&city=Santa%20Barbara";
}

/// One request as a [`FakePeer`] received it.
#[derive(Debug, Clone)]
pub struct PeerRequest {
    pub at: std::time::Instant,
    pub method: String,
    /// The request target: path and query string.
    pub path: String,
    /// Names lower-cased, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl PeerRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("peer got a non-JSON body ({e}): {:?}", self.text()))
    }
}

/// What a [`FakePeer`] answers.
#[derive(Debug, Clone)]
pub struct PeerReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl PeerReply {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        PeerReply { status, headers: Vec::new(), body: body.into() }
    }
    /// A JSON answer (`content-type: application/json`).
    pub fn json(status: u16, body: &Value) -> Self {
        Self::new(status, body.to_string()).header("content-type", "application/json")
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type PeerRespond = dyn Fn(&PeerRequest, usize) -> PeerReply + Send + Sync;

/// A fake peer (forward target, CRM) on loopback: HTTP/1.1 with keep-alive,
/// one thread per connection, recording every request before answering it.
pub struct FakePeer {
    pub addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<PeerRequest>>>,
}

impl FakePeer {
    /// `respond(request, n)`, where `n` counts the requests to that path so
    /// far, this one included (1 = the first).
    pub fn start(respond: impl Fn(&PeerRequest, usize) -> PeerReply + Send + Sync + 'static) -> FakePeer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the fake peer");
        let addr = listener.local_addr().expect("fake peer address");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let respond: std::sync::Arc<PeerRespond> = std::sync::Arc::new(respond);
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (log, respond) = (log.clone(), respond.clone());
                std::thread::spawn(move || {
                    let _ = serve_peer(conn, &log, respond.as_ref());
                });
            }
        });
        FakePeer { addr, seen }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<PeerRequest> {
        self.seen.lock().expect("fake peer log").clone()
    }

    /// The requests to exactly `path`.
    pub fn requests_to(&self, path: &str) -> Vec<PeerRequest> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }
}

fn serve_peer(stream: TcpStream, log: &std::sync::Mutex<Vec<PeerRequest>>, respond: &PeerRespond) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let at = std::time::Instant::now();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let find = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        let req = PeerRequest { at, method, path, headers, body };
        let n = {
            let mut log = log.lock().expect("fake peer log");
            log.push(req.clone());
            log.iter().filter(|r| r.path == req.path).count()
        };
        let r = respond(&req, n);
        let mut head = format!("HTTP/1.1 {} X\r\ncontent-length: {}\r\n", r.status, r.body.len());
        for (k, v) in &r.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(r.body.as_bytes())?;
        out.flush()?;
    }
}

/// Where HubSpot takes a batch upsert of contacts.
pub const HUBSPOT_PATH: &str = "/crm/v3/objects/contacts/batch/upsert";

/// HubSpot's answer to a batch upsert: one result per input.
pub fn hubspot_ok(req: &PeerRequest) -> PeerReply {
    let inputs = req.json()["inputs"].as_array().cloned().unwrap_or_default();
    let results: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| serde_json::json!({"id": (1000 + i).to_string(), "properties": input["properties"], "new": true}))
        .collect();
    PeerReply::json(200, &serde_json::json!({"status": "COMPLETE", "results": results}))
}

/// How long a delivery may take to end (`done` or `failed`) in these tests.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Polls `events show ID` until the event is `done` or `failed`; returns it.
pub fn wait_settled(env: &TestEnv, id: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(SETTLE, || {
        last = env.show(id);
        last["status"] == "done" || last["status"] == "failed"
    });
    assert!(ok, "event {id} did not settle within {SETTLE:?}; last seen:\n{last:#}\ndaemon log:\n{}", env.log());
    last
}

/// The event's delivery to `handler` (from `events show --json`).
pub fn delivery<'a>(ev: &'a Value, handler: &str) -> &'a Value {
    ev["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["handler"] == handler))
        .unwrap_or_else(|| panic!("event has no delivery to `{handler}`: {ev:#}"))
}

/// A delivery's attempts, oldest first.
pub fn attempts(d: &Value) -> &Vec<Value> {
    d["attempts"].as_array().unwrap_or_else(|| panic!("delivery without an attempts array: {d:#}"))
}
