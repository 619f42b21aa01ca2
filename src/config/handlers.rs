//! `[retry]`, `[processor]` and `[handlers.NAME]`: what runs for a stored
//! event and how often it is tried. A handler table is tagged by `type`, and
//! each type takes only its own keys plus the ones every handler shares
//! (timeout, concurrency, the retry keys), so a key of another type (a `url`
//! on a shell handler) is reported, not silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::check::{join, keys_of, Checker, Problem};
use super::values::{Dur, RateLimit, RawRate, RawSecretRef, RawSecrets};
use super::Config;
use crate::crypto::Secret;

/// When a delivery is tried again and when it is given up (README "Retries").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            max_age: Duration::from_secs(12 * 3600),
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(3600),
        }
    }
}

/// What a handler with `ordering` does when the head of a key fails for
/// good (README "Ordered processing").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// The next delivery of the key runs.
    #[default]
    Continue,
    /// The key waits until the failed delivery is replayed and succeeds, or is skipped.
    Block,
}

/// `ordering = { key = PTR, on_failure = … }` (README "Ordered processing").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    /// JSON pointer into the normalized payload; its value is the key.
    pub key: String,
    pub on_failure: OnFailure,
}

/// How the processor finds, holds and runs deliveries.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// How often a processor looks for work it was not told about
    /// (another process's events, retries coming due, expired leases).
    pub poll_interval: Duration,
    /// How long a claimed delivery stays ours without renewal.
    pub lease: Duration,
    /// Deliveries running at once across all handlers.
    pub max_concurrency: usize,
    /// How long running deliveries may finish after SIGTERM.
    pub shutdown_grace: Duration,
}

/// What a shell handler writes to its stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinMode {
    Json,
    Raw,
    Envelope,
    None,
}

/// What an http handler sends as the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    Raw,
    Json,
    Envelope,
}

/// Which CRM API a crm_upsert handler speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrmProvider {
    Hubspot,
    Salesforce,
    Http,
}

/// One configured handler: what every kind shares, and its kind.
#[derive(Debug)]
pub struct HandlerConfig {
    pub name: String,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Deliveries sharing a key run one at a time, in event-id order.
    pub ordering: Option<Ordering>,
    pub kind: HandlerKind,
}

/// The part of a handler that depends on its `type`.
#[derive(Debug)]
pub enum HandlerKind {
    Shell(ShellSpec),
    Http(HttpSpec),
    Crm(CrmSpec),
}

/// `type = "shell"`: a command run directly, payload on stdin, env and a file.
#[derive(Debug)]
pub struct ShellSpec {
    /// As configured; `command[0]` is what the user wrote (for messages).
    pub command: Vec<String>,
    /// What runs: `command[0]` with a relative path (one holding a `/`)
    /// resolved against `workdir`, else the config file's directory; a bare
    /// name stays bare and is looked up in `$PATH` (README, "Shell handler").
    pub program: PathBuf,
    pub stdin: StdinMode,
    /// Env var name -> JSON pointer into the normalized payload.
    pub env: BTreeMap<String, String>,
    pub permanent_exit_codes: Vec<i32>,
    /// Resolved against the config file's directory when relative.
    pub workdir: Option<PathBuf>,
}

/// `type = "http"`: forward the event to a URL.
#[derive(Debug)]
pub struct HttpSpec {
    pub url: String,
    pub method: String,
    /// Values with `${VAR}` already expanded from the daemon's environment.
    pub headers: Vec<(String, Secret)>,
    pub body: BodyMode,
    pub rate_limit: Option<RateLimit>,
    pub sign_secrets: Vec<Secret>,
}

/// `type = "crm_upsert"`: records built from the payload, upserted in batches.
#[derive(Debug)]
pub struct CrmSpec {
    pub provider: CrmProvider,
    pub base_url: String,
    pub token: Option<Secret>,
    pub id_property: String,
    pub records: String,
    /// CRM property -> JSON pointer relative to the record.
    pub fields: BTreeMap<String, String>,
    pub batch_size: usize,
    pub method: String,
    pub url_template: Option<String>,
    pub body_template: Option<String>,
    pub headers: Vec<(String, Secret)>,
    pub rate_limit: Option<RateLimit>,
}

const DEFAULT_CONCURRENCY: usize = 4;
/// Scripts get longer than requests: they often call something slow themselves.
const DEFAULT_SHELL_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Polling faster than this only burns CPU; in-process work is signalled anyway.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// A lease is renewed every third of its length; shorter ones would renew constantly.
const MIN_LEASE: Duration = Duration::from_secs(1);
const DEFAULT_MAX_CONCURRENCY: usize = 64;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const HUBSPOT_BASE_URL: &str = "https://api.hubapi.com";
const DEFAULT_ID_PROPERTY: &str = "email";
const DEFAULT_BATCH_SIZE: usize = 100;
/// HubSpot refuses batch requests of more than 100 inputs.
const HUBSPOT_MAX_BATCH: usize = 100;

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub(super) struct RawRetry {
    max_attempts: Option<u32>,
    max_age: Option<Dur>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawProcessor {
    poll_interval: Option<Dur>,
    lease: Option<Dur>,
    max_concurrency: Option<usize>,
    shutdown_grace: Option<Dur>,
}

/// Keys every handler type takes, besides `type`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawShared {
    timeout: Option<Dur>,
    concurrency: Option<usize>,
    max_attempts: Option<u32>,
    max_age: Option<Dur>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
    ordering: Option<RawOrdering>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawOrdering {
    key: Option<String>,
    on_failure: Option<String>,
}

impl RawShared {
    fn retry(&self) -> RawRetry {
        RawRetry {
            max_attempts: self.max_attempts,
            max_age: self.max_age,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
        }
    }
}

/// A handler table's own keys, by its `type`. Taken apart by the checker
/// (`Checker::split_tagged`) rather than by serde's `#[serde(tag = "type")]`:
/// serde buffers an internally tagged table before picking the variant, so
/// neither serde_ignored nor serde_path_to_error sees inside it, and a
/// foreign key would pass silently and a bad value lose its key path.
enum RawHandler {
    Shell(RawShell),
    Http(RawHttp),
    Crm(RawCrm),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawShell {
    command: Option<Vec<String>>,
    stdin: Option<String>,
    env: BTreeMap<String, String>,
    permanent_exit_codes: Vec<i32>,
    workdir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawHttp {
    url: Option<String>,
    method: Option<String>,
    headers: BTreeMap<String, String>,
    body: Option<String>,
    rate_limit: Option<RawRate>,
    sign: Option<RawSign>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCrm {
    provider: Option<String>,
    base_url: Option<String>,
    token_env: Option<String>,
    id_property: Option<String>,
    records: Option<String>,
    fields: BTreeMap<String, String>,
    batch_size: Option<usize>,
    method: Option<String>,
    url_template: Option<String>,
    body_template: Option<String>,
    headers: BTreeMap<String, String>,
    rate_limit: Option<RawRate>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSign {
    scheme: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    secret: Option<String>,
    secrets: Option<Vec<RawSecretRef>>,
}

impl RawSign {
    fn secrets(&self) -> RawSecrets {
        RawSecrets {
            secret_env: self.secret_env.clone(),
            secret_file: self.secret_file.clone(),
            secret: self.secret.clone(),
            secrets: self.secrets.clone(),
        }
    }
}

pub(super) fn retry_policy(ck: &mut Checker, path: &str, r: &RawRetry, base: &RetryPolicy) -> Option<RetryPolicy> {
    let p = RetryPolicy {
        max_attempts: r.max_attempts.unwrap_or(base.max_attempts),
        max_age: r.max_age.map_or(base.max_age, |d| d.0),
        initial_backoff: r.initial_backoff.map_or(base.initial_backoff, |d| d.0),
        max_backoff: r.max_backoff.map_or(base.max_backoff, |d| d.0),
    };
    let mut ok = true;
    if p.max_attempts == 0 {
        ck.error(join(path, "max_attempts"), "must be at least 1");
        ok = false;
    }
    if p.max_backoff < p.initial_backoff {
        ck.error(join(path, "max_backoff"), "must not be shorter than initial_backoff");
        ok = false;
    }
    ok.then_some(p)
}

pub(super) fn processor_config(ck: &mut Checker, r: RawProcessor) -> Option<ProcessorConfig> {
    let lease = r.lease.map_or(DEFAULT_LEASE, |d| d.0);
    if lease < MIN_LEASE {
        ck.error("processor.lease", "must be at least 1s");
    }
    Some(ProcessorConfig {
        poll_interval: r.poll_interval.map_or(DEFAULT_POLL_INTERVAL, |d| d.0).max(MIN_POLL_INTERVAL),
        lease,
        max_concurrency: r.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY).max(1),
        shutdown_grace: r.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
    })
}

/// Checks every `[handlers.NAME]` table; `default_retry` is the `[retry]` policy.
pub(super) fn handlers(ck: &mut Checker, value: Option<Value>, default_retry: &RetryPolicy) -> BTreeMap<String, Arc<HandlerConfig>> {
    let mut handlers = BTreeMap::new();
    match value {
        None => {}
        Some(Value::Object(map)) => {
            for (name, v) in map {
                if let Some(h) = handler_config(ck, &name, v, default_retry) {
                    handlers.insert(name, Arc::new(h));
                }
            }
        }
        Some(_) => ck.error("handlers", "must be a table of tables ([handlers.NAME])"),
    }
    handlers
}

fn handler_config(ck: &mut Checker, name: &str, value: Value, default_retry: &RetryPolicy) -> Option<HandlerConfig> {
    let p = format!("handlers.{name}");
    let before = ck.problems.len();
    let tagged = ck.split_tagged::<RawShared>(&p, value, "type")?;
    let shared = ck.section::<RawShared>(&p, Some(Value::Object(tagged.shared)))?;
    let retry = retry_policy(ck, &p, &shared.retry(), default_retry);
    let concurrency = shared.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if concurrency == 0 {
        ck.error(join(&p, "concurrency"), "must be at least 1");
    }
    let ordering = shared.ordering.as_ref().and_then(|o| ordering(ck, &join(&p, "ordering"), o));
    let kind = raw_handler(ck, &p, tagged.kind.as_deref(), tagged.own).and_then(|raw| match raw {
        RawHandler::Shell(r) => shell_spec(ck, &p, &r).map(HandlerKind::Shell),
        RawHandler::Http(r) => http_spec(ck, &p, &r).map(HandlerKind::Http),
        RawHandler::Crm(r) => crm_spec(ck, &p, &r).map(HandlerKind::Crm),
    });
    if ck.problems.len() > before {
        return None;
    }
    let kind = kind?;
    let default_timeout = match kind {
        HandlerKind::Shell(_) => DEFAULT_SHELL_TIMEOUT,
        HandlerKind::Http(_) | HandlerKind::Crm(_) => DEFAULT_REQUEST_TIMEOUT,
    };
    Some(HandlerConfig {
        name: name.to_string(),
        retry: retry?,
        timeout: shared.timeout.map_or(default_timeout, |d| d.0),
        concurrency,
        ordering,
        kind,
    })
}

/// Checks `ordering`: a JSON pointer for `key` (the empty pointer, the
/// whole payload, is refused: every event would share one key) and
/// `on_failure`.
fn ordering(ck: &mut Checker, p: &str, r: &RawOrdering) -> Option<Ordering> {
    let key = match r.key.as_deref() {
        None | Some("") => {
            ck.error(join(p, "key"), "is required: a JSON pointer into the payload, like \"/contact_id\"");
            return None;
        }
        Some(k) => k,
    };
    let pointer_ok = ck.pointer(&join(p, "key"), key);
    let on_failure = ck.one_of(
        join(p, "on_failure"),
        r.on_failure.as_deref().unwrap_or("continue"),
        &[("continue", OnFailure::Continue), ("block", OnFailure::Block)],
        "continue, block",
    )?;
    pointer_ok.then(|| Ordering { key: key.to_string(), on_failure })
}

/// The own keys of a handler of type `kind`; a key that is not that type's is reported.
fn raw_handler(ck: &mut Checker, p: &str, kind: Option<&str>, own: Map<String, Value>) -> Option<RawHandler> {
    let shared = keys_of::<RawShared>();
    match kind {
        None => {
            ck.error(join(p, "type"), "is required: shell, http or crm_upsert");
            None
        }
        Some("shell") => ck.kind_section(p, own, "a shell handler", "type", shared).map(RawHandler::Shell),
        Some("http") => ck.kind_section(p, own, "an http handler", "type", shared).map(RawHandler::Http),
        Some("crm_upsert") => ck.kind_section(p, own, "a crm_upsert handler", "type", shared).map(RawHandler::Crm),
        Some(other) => {
            ck.error(join(p, "type"), format!("unknown handler type `{other}`; expected shell, http or crm_upsert"));
            None
        }
    }
}

fn shell_spec(ck: &mut Checker, p: &str, r: &RawShell) -> Option<ShellSpec> {
    let command = match &r.command {
        Some(c) if !c.is_empty() && !c[0].is_empty() => c.clone(),
        _ => {
            ck.error(join(p, "command"), "is required: an array like [\"/usr/local/bin/on-form.sh\", \"--verbose\"]");
            return None;
        }
    };
    let stdin = ck.one_of(
        join(p, "stdin"),
        r.stdin.as_deref().unwrap_or("json"),
        &[("json", StdinMode::Json), ("raw", StdinMode::Raw), ("envelope", StdinMode::Envelope), ("none", StdinMode::None)],
        "json, raw, envelope, none",
    )?;
    for (var, ptr) in &r.env {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            ck.error(format!("{p}.env.{var}"), "is not a valid environment variable name");
        }
        if var.starts_with("HOOKTRAIL_") {
            ck.error(format!("{p}.env.{var}"), "names starting with HOOKTRAIL_ are reserved");
        }
        ck.pointer(&format!("{p}.env.{var}"), ptr);
    }
    let base = absolute(&ck.base_dir);
    let workdir = r.workdir.as_ref().map(|w| base.join(w));
    let program = resolve_program(&command[0], workdir.as_deref().unwrap_or(&base));
    Some(ShellSpec { command, program, stdin, env: r.env.clone(), permanent_exit_codes: r.permanent_exit_codes.clone(), workdir })
}

/// `dir` made absolute against the current directory (the config file's
/// directory is relative when `--config` is), so a resolved path reads the
/// same in every message and never depends on a later working directory.
fn absolute(dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        return std::env::current_dir().unwrap_or_default();
    }
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Where `command[0]` is: absolute as is; a relative path holding a `/`
/// against `base`; a bare name unchanged (found in `$PATH` when run).
fn resolve_program(first: &str, base: &Path) -> PathBuf {
    let p = Path::new(first);
    if p.is_absolute() || !first.contains('/') {
        return p.to_path_buf();
    }
    // `./scripts/x.sh` reads as `<base>/scripts/x.sh` in messages.
    base.join(p.components().filter(|c| *c != std::path::Component::CurDir).collect::<PathBuf>())
}

impl Config {
    /// What is wrong with a handler that the config's syntax cannot show: a
    /// shell handler whose program is missing, not executable, or names an
    /// interpreter that does not exist. Not a load error: the daemon starts
    /// (and reloads) anyway, since a deploy may install the script later,
    /// and until then each attempt fails as a retry; `check-config` reports
    /// these as errors and `serve` logs them at ERROR (README, "Shell handler").
    pub fn preflight(&self) -> Vec<Problem> {
        self.handlers
            .values()
            .filter_map(|h| match &h.kind {
                HandlerKind::Shell(spec) => {
                    spec.preflight().err().map(|message| Problem { path: format!("handlers.{}.command[0]", h.name), message })
                }
                _ => None,
            })
            .collect()
    }
}

impl ShellSpec {
    /// Checks that the program can be run by this process's user: it exists,
    /// is a regular file, is executable (`access(X_OK)`), and a `#!` script's
    /// interpreter exists too (through `/usr/bin/env NAME`, NAME in `$PATH`).
    /// The error says which, naming the resolved path.
    pub fn preflight(&self) -> Result<(), String> {
        let first = &self.command[0];
        let program = if first.contains('/') {
            self.program.clone()
        } else {
            find_in_path(first).ok_or_else(|| format!("`{first}` is not found in $PATH ({})", path_var()))?
        };
        check_executable(&program)?;
        let Some((interpreter, arg)) = shebang(&program) else { return Ok(()) };
        let shown = program.display();
        if interpreter.ends_with('\r') || arg.as_ref().is_some_and(|a| a.ends_with('\r')) {
            return Err(format!("{shown}: its `#!` line ends in a carriage return (Windows line endings); convert the script to LF"));
        }
        let interp = Path::new(&interpreter);
        let interp =
            if interp.is_relative() { self.workdir.as_deref().unwrap_or(Path::new(".")).join(interp) } else { interp.to_path_buf() };
        if let Err(e) = check_executable(&interp) {
            return Err(format!("{shown}: its interpreter {e}"));
        }
        // `#!/usr/bin/env python3`: env exists; what it runs must too.
        if interp.file_name().is_some_and(|n| n == "env") {
            if let Some(name) = arg.filter(|a| !a.starts_with('-') && !a.contains('/')) {
                if find_in_path(&name).is_none() {
                    return Err(format!(
                        "{shown}: its interpreter `{name}` (through {}) is not found in $PATH ({})",
                        interp.display(),
                        path_var()
                    ));
                }
            }
        }
        Ok(())
    }
}

fn path_var() -> String {
    std::env::var("PATH").unwrap_or_default()
}

/// The first executable regular file named `name` in `$PATH`, as `execvp` finds it.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| check_executable(p).is_ok())
}

/// `PATH does not exist`, `… is not a regular file`, `… is not executable`.
fn check_executable(p: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    let shown = p.display();
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(format!("{shown} does not exist")),
        Err(e) => return Err(format!("{shown} cannot be read: {e}")),
        Ok(m) if !m.is_file() => return Err(format!("{shown} is not a regular file")),
        Ok(_) => {}
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return Err(format!("{shown} holds a NUL byte")) };
    // SAFETY: access(2) reads a NUL-terminated path and touches nothing else.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(format!("{shown} is not executable by this user (uid {})", unsafe { libc::geteuid() }));
    }
    Ok(())
}

/// A script's `#!` line as the kernel reads it: the interpreter, and its one
/// optional argument (split at the first space or tab). `None` for a binary
/// or a file this user cannot read (it may be executable without being readable).
fn shebang(p: &Path) -> Option<(String, Option<String>)> {
    use std::io::Read as _;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(p).and_then(|mut f| f.read(&mut head)).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let line = String::from_utf8_lossy(line);
    let line = line.trim_start_matches([' ', '\t']);
    let (interp, rest) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], Some(line[i..].trim_matches([' ', '\t']).to_string()).filter(|a| !a.is_empty())),
        None => (line, None),
    };
    (!interp.is_empty()).then(|| (interp.to_string(), rest))
}

/// Expands `${VAR}` from the daemon's environment; an unset variable is a problem.
fn expand_vars(ck: &mut Checker, path: &str, s: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            ck.error(path, "unclosed `${`");
            return None;
        };
        let var = &after[..end];
        match ck.secret_var(var) {
            Some(v) => out.push_str(&v),
            None => {
                ck.error(path, format!("environment variable `{var}` is not set"));
                return None;
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn headers(ck: &mut Checker, p: &str, h: &BTreeMap<String, String>) -> Vec<(String, Secret)> {
    h.iter()
        .filter_map(|(k, v)| {
            let path = format!("{p}.headers.{k}");
            if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                ck.error(&path, "is not a valid header name");
                return None;
            }
            let v = expand_vars(ck, &path, v)?;
            if hyper::header::HeaderValue::from_str(&v).is_err() {
                ck.error(&path, "is not a valid header value");
                return None;
            }
            Some((k.clone(), Secret::new(v.into_bytes())))
        })
        .collect()
}

fn check_url(ck: &mut Checker, path: &str, url: &str) -> bool {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => true,
        _ => {
            ck.error(path, format!("`{url}` is not an http:// or https:// URL"));
            false
        }
    }
}

fn http_spec(ck: &mut Checker, p: &str, r: &RawHttp) -> Option<HttpSpec> {
    let url = match &r.url {
        Some(u) => u.clone(),
        None => {
            ck.error(join(p, "url"), "is required");
            return None;
        }
    };
    check_url(ck, &join(p, "url"), &url);
    let method = r.method.clone().unwrap_or_else(|| "POST".into()).to_ascii_uppercase();
    if reqwest::Method::from_bytes(method.as_bytes()).is_err() {
        ck.error(join(p, "method"), format!("`{method}` is not an HTTP method"));
    }
    let body = ck.one_of(
        join(p, "body"),
        r.body.as_deref().unwrap_or("raw"),
        &[("raw", BodyMode::Raw), ("json", BodyMode::Json), ("envelope", BodyMode::Envelope)],
        "raw, json, envelope",
    )?;
    let headers = headers(ck, p, &r.headers);
    let rate_limit = r.rate_limit.as_ref().and_then(|x| ck.rate(&join(p, "rate_limit"), x));
    let sign_secrets = match &r.sign {
        None => Vec::new(),
        Some(s) => {
            let sp = join(p, "sign");
            match s.scheme.as_deref() {
                Some("standard_webhooks") => {}
                other => ck.error(join(&sp, "scheme"), format!("{:?} is not supported; use \"standard_webhooks\"", other.unwrap_or(""))),
            }
            let secrets = ck.secrets(&sp, &s.secrets());
            for s in &secrets {
                if crate::crypto::standard_webhooks_key(s).is_none() {
                    ck.error(&sp, "signing secret must be `whsec_<base64>`");
                }
            }
            secrets
        }
    };
    Some(HttpSpec { url, method, headers, body, rate_limit, sign_secrets })
}

fn crm_spec(ck: &mut Checker, p: &str, r: &RawCrm) -> Option<CrmSpec> {
    let provider = match r.provider.as_deref() {
        Some("hubspot") => CrmProvider::Hubspot,
        Some("salesforce") => CrmProvider::Salesforce,
        Some("http") => CrmProvider::Http,
        other => {
            ck.error(join(p, "provider"), format!("{:?} is not one of hubspot, salesforce, http", other.unwrap_or("")));
            return None;
        }
    };
    let base_url = match (&r.base_url, provider) {
        (Some(u), _) => {
            check_url(ck, &join(p, "base_url"), u);
            u.trim_end_matches('/').to_string()
        }
        (None, CrmProvider::Hubspot) => HUBSPOT_BASE_URL.to_string(),
        (None, CrmProvider::Http) => String::new(),
        (None, CrmProvider::Salesforce) => {
            ck.error(join(p, "base_url"), "is required for salesforce (your instance URL)");
            return None;
        }
    };
    let token = match &r.token_env {
        Some(var) => match ck.secret_var(var) {
            Some(v) if hyper::header::HeaderValue::from_str(&format!("Bearer {v}")).is_err() => {
                ck.error(join(p, "token_env"), format!("environment variable `{var}` does not hold a usable token (control characters?)"));
                None
            }
            Some(v) if !v.is_empty() => Some(Secret::new(v.into_bytes())),
            _ => {
                ck.error(join(p, "token_env"), format!("environment variable `{var}` is not set"));
                None
            }
        },
        None if provider != CrmProvider::Http => {
            ck.error(join(p, "token_env"), "is required");
            None
        }
        None => None,
    };
    let id_property = r.id_property.clone().unwrap_or_else(|| DEFAULT_ID_PROPERTY.into());
    let records = r.records.clone().unwrap_or_else(|| "/".into());
    if !records.starts_with('/') {
        ck.error(join(p, "records"), "must be a path starting with `/` (\"/\" = the whole payload)");
    }
    if r.fields.is_empty() {
        ck.error(join(p, "fields"), "is required: CRM property = JSON pointer");
    }
    for (k, ptr) in &r.fields {
        ck.pointer(&format!("{p}.fields.{k}"), ptr);
    }
    if !r.fields.contains_key(&id_property) {
        ck.error(join(p, "id_property"), format!("`{id_property}` must also be a key of fields, so every record has its id"));
    }
    let batch_size = r.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
    if batch_size == 0 {
        ck.error(join(p, "batch_size"), "must be at least 1");
    }
    if provider == CrmProvider::Hubspot && batch_size > HUBSPOT_MAX_BATCH {
        ck.error(join(p, "batch_size"), format!("{batch_size} is more than HubSpot accepts in one batch ({HUBSPOT_MAX_BATCH})"));
    }
    match (&r.url_template, provider) {
        (None, CrmProvider::Http) => {
            ck.error(join(p, "url_template"), "is required for provider = \"http\" (e.g. \"https://crm.example.com/contacts/{id}\")")
        }
        // `{id}` becomes a percent-encoded id, so a template that is a URL with
        // a plain id in its place stays one with any id.
        (Some(t), CrmProvider::Http) => {
            check_url(ck, &join(p, "url_template"), &t.replace("{id}", "id"));
        }
        (_, CrmProvider::Hubspot | CrmProvider::Salesforce) => {
            for (key, set) in
                [("method", r.method.is_some()), ("url_template", r.url_template.is_some()), ("body_template", r.body_template.is_some())]
            {
                if set {
                    ck.warn(join(p, key), "is used only with provider = \"http\"; ignored");
                }
            }
        }
    }
    if provider == CrmProvider::Http {
        if let Some(m) = &r.method {
            if reqwest::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err() {
                ck.error(join(p, "method"), format!("`{m}` is not an HTTP method"));
            }
        }
    }
    let headers = headers(ck, p, &r.headers);
    let rate_limit = r.rate_limit.as_ref().and_then(|x| ck.rate(&join(p, "rate_limit"), x));
    let method =
        r.method.clone().unwrap_or_else(|| if provider == CrmProvider::Http { "PUT".into() } else { "POST".into() }).to_ascii_uppercase();
    Some(CrmSpec {
        provider,
        base_url,
        token,
        id_property,
        records,
        fields: r.fields.clone(),
        batch_size: batch_size.max(1),
        method,
        url_template: r.url_template.clone(),
        body_template: r.body_template.clone(),
        headers,
        rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_paths_resolve_like_the_readme_says() {
        let base = Path::new("/etc/hooktrail");
        assert_eq!(resolve_program("/usr/bin/x", base), Path::new("/usr/bin/x"), "absolute: as is");
        assert_eq!(resolve_program("./scripts/x.sh", base), Path::new("/etc/hooktrail/scripts/x.sh"));
        assert_eq!(resolve_program("scripts/x.sh", base), Path::new("/etc/hooktrail/scripts/x.sh"));
        assert_eq!(resolve_program("../bin/x", base), Path::new("/etc/hooktrail/../bin/x"));
        assert_eq!(resolve_program("jq", base), Path::new("jq"), "a bare name is left to $PATH");
    }

    #[test]
    fn shebang_lines_are_read_as_the_kernel_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        // (file head, expected interpreter and argument)
        type Case = (&'static [u8], Option<(&'static str, Option<&'static str>)>);
        let cases: [Case; 6] = [
            (b"#!/bin/sh\necho", Some(("/bin/sh", None))),
            (b"#! /usr/bin/env  python3 \nx", Some(("/usr/bin/env", Some("python3")))),
            (b"#!/bin/bash -e -u\n", Some(("/bin/bash", Some("-e -u")))),
            (b"#!/bin/sh\r\n", Some(("/bin/sh\r", None))),
            (b"\x7fELF\x02\x01", None),
            (b"#!\n", None),
        ];
        for (i, (text, want)) in cases.into_iter().enumerate() {
            let p = dir.path().join(format!("s{i}"));
            std::fs::write(&p, text).unwrap();
            let got = shebang(&p);
            assert_eq!(got.as_ref().map(|(a, b)| (a.as_str(), b.as_deref())), want, "{:?}", String::from_utf8_lossy(text));
        }
    }
}
