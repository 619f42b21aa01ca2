//! Typed configuration: loaded once (at start and on reload) from TOML plus
//! `HOOKTRAIL__…` environment overrides, validated with key paths, then frozen
//! into [`Config`] and shared by `Arc`. Hot paths never parse config.
//!
//! Loading never stops at the first problem: every section, source, handler and
//! route is deserialized on its own so `check-config` can list every problem.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::crypto::{HmacAlgorithm, Secret};

/// A duration written as `"500ms"`, `"30s"`, `"12h"`, `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// The longest duration a key takes: 1000 years (of 365.25 days, as
/// humantime counts them). Each is added to the clock somewhere (a lease, a
/// dedup window, max_age), and the sum must still be a date.
pub const MAX_DURATION: Duration = Duration::from_secs(1000 * 31_557_600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| serde::de::Error::custom(format!("invalid duration `{s}` ({e}); write e.g. \"500ms\", \"30s\", \"12h\"")))?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!("duration `{s}` is longer than 1000 years")));
        }
        Ok(Dur(d))
    }
}

/// One problem found while loading, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a configuration. Never empty.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in configuration:\n  {}", .0.len(), .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct ConfigErrors(pub Vec<Problem>, pub Vec<Problem>);

impl ConfigErrors {
    fn one(message: String) -> Self {
        ConfigErrors(vec![Problem { path: String::new(), message }], Vec::new())
    }
    /// Warnings found alongside the problems.
    pub fn warnings(&self) -> &[Problem] {
        &self.1
    }
}

/// A validated, frozen configuration plus the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Arc<Config>,
    pub warnings: Vec<Problem>,
}

#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub admin: AdminConfig,
    pub retry: RetryPolicy,
    pub processor: ProcessorConfig,
    /// Sorted by name.
    pub sources: Vec<Arc<SourceConfig>>,
    pub handlers: BTreeMap<String, Arc<HandlerConfig>>,
    pub routes: Vec<RouteConfig>,
    /// Environment variables the config reads secrets from; kept out of
    /// handler processes' environments.
    pub secret_vars: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: u64,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpNet>,
    /// Unprocessed deliveries above which new events get 503.
    pub max_backlog: u64,
    /// Written once storage is open and listeners are bound: `{"listen":…,"admin":…}`
    /// (for scripts and tests that bind port 0).
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub backend: Backend,
    pub path: PathBuf,
    pub retention: Option<Duration>,
    /// Free bytes on the database's volume below which ingest answers 503
    /// instead of accepting events it may not be able to commit; 0 disables.
    pub min_free_bytes: u64,
    /// How long an insert waits for its commit before answering 503
    /// (README "Storage faults"); the commit may still land later.
    pub commit_timeout: Duration,
}

/// Default `storage.min_free_bytes`: room for SQLite's WAL and a few checkpoints.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token: Option<Secret>,
    pub token_env: String,
}

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

#[derive(Debug)]
pub struct SourceConfig {
    pub name: String,
    pub path: String,
    pub auth: AuthSpec,
    pub allow_ips: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    pub per_ip_rate_limit: Option<RateLimit>,
    pub dedup: Option<DedupSpec>,
    pub response: Option<ResponseSpec>,
    pub accept_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The governor quota, for inbound (ingest) and outbound (handler) limiters alike.
    pub fn quota(&self) -> governor::Quota {
        let per = std::num::NonZeroU32::new(self.per_second).expect("validated: per_second >= 1");
        let burst = std::num::NonZeroU32::new(self.burst).expect("validated: burst >= 1");
        governor::Quota::per_second(per).allow_burst(burst)
    }
}

#[derive(Debug, Clone)]
pub struct DedupSpec {
    pub key: DedupKey,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub enum DedupKey {
    Pointer(String),
    /// Lower-cased header name.
    Header(String),
}

#[derive(Debug, Clone)]
pub struct ResponseSpec {
    pub status: u16,
    pub body: String,
    pub content_type: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigEncoding {
    Hex,
    Base64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedContent {
    Body,
    TimestampDotBody,
}

#[derive(Debug, Clone)]
pub struct HmacSpec {
    /// Lower-cased header name.
    pub header: String,
    pub algorithm: HmacAlgorithm,
    pub encoding: SigEncoding,
    pub prefix: String,
    pub timestamp_header: Option<String>,
    pub signed_content: SignedContent,
    pub tolerance: Duration,
    pub secrets: Vec<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    StandardWebhooks,
    Github,
    Stripe,
    Shopify,
    Slack,
}

#[derive(Debug, Clone)]
pub enum AuthSpec {
    None,
    /// `header` is lower-cased.
    HeaderToken {
        header: String,
        secrets: Vec<Secret>,
    },
    QueryToken {
        param: String,
        secrets: Vec<Secret>,
    },
    Basic {
        username: String,
        secrets: Vec<Secret>,
    },
    Hmac(HmacSpec),
    Preset {
        preset: Preset,
        tolerance: Duration,
        secrets: Vec<Secret>,
    },
}

impl AuthSpec {
    /// Header names (lower-case) whose values are secrets or signatures and must be
    /// redacted before storing.
    pub fn secret_headers(&self) -> Vec<String> {
        // Signatures are redacted like tokens: with the stored body, a kept
        // signature would let anyone who can read events or an export replay
        // the delivery (forever, for schemes without a timestamp).
        let preset_header = |p: &Preset| match p {
            Preset::StandardWebhooks => "webhook-signature",
            Preset::Github => "x-hub-signature-256",
            Preset::Stripe => "stripe-signature",
            Preset::Shopify => "x-shopify-hmac-sha256",
            Preset::Slack => "x-slack-signature",
        };
        match self {
            AuthSpec::HeaderToken { header, .. } => vec![header.clone()],
            AuthSpec::Hmac(h) => vec![h.header.clone()],
            AuthSpec::Preset { preset, .. } => vec![preset_header(preset).to_string()],
            _ => Vec::new(),
        }
    }
    /// Query parameter whose value is a secret.
    pub fn secret_param(&self) -> Option<&str> {
        match self {
            AuthSpec::QueryToken { param, .. } => Some(param),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinMode {
    Json,
    Raw,
    Envelope,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    Raw,
    Json,
    Envelope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrmProvider {
    Hubspot,
    Salesforce,
    Http,
}

#[derive(Debug)]
pub struct HandlerConfig {
    pub name: String,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub concurrency: usize,
    pub kind: HandlerKind,
}

#[derive(Debug)]
pub enum HandlerKind {
    Shell(ShellSpec),
    Http(HttpSpec),
    Crm(CrmSpec),
}

#[derive(Debug)]
pub struct ShellSpec {
    pub command: Vec<String>,
    pub stdin: StdinMode,
    /// Env var name -> JSON pointer into the normalized payload.
    pub env: BTreeMap<String, String>,
    pub permanent_exit_codes: Vec<i32>,
    pub workdir: Option<PathBuf>,
}

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

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub source: String,
    pub handler: String,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub pointer: String,
    pub test: ConditionTest,
}

#[derive(Debug, Clone)]
pub enum ConditionTest {
    Equals(Value),
    Exists(bool),
    In(Vec<Value>),
    Regex(regex::Regex),
    Prefix(String),
}

impl Condition {
    pub fn holds(&self, payload: &Value) -> bool {
        let found = payload.pointer(&self.pointer);
        match &self.test {
            ConditionTest::Exists(want) => found.is_some() == *want,
            ConditionTest::Equals(v) => found.is_some_and(|f| loosely_equal(f, v)),
            ConditionTest::In(vs) => found.is_some_and(|f| vs.iter().any(|v| loosely_equal(f, v))),
            ConditionTest::Regex(re) => found.and_then(scalar_text).is_some_and(|s| re.is_match(&s)),
            ConditionTest::Prefix(p) => found.and_then(scalar_text).is_some_and(|s| s.starts_with(p.as_str())),
        }
    }
}

/// Form senders send every value as a string; `equals = 5` should still match `"5"`.
fn loosely_equal(found: &Value, want: &Value) -> bool {
    if found == want {
        return true;
    }
    match (scalar_text(found), scalar_text(want)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Raw (serde) shapes. Every field optional so that one missing key is one
// problem, not the end of loading.
// ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    request_timeout: Option<Dur>,
    header_read_timeout: Option<Dur>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    trusted_proxies: Vec<String>,
    max_backlog: Option<u64>,
    ready_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawStorage {
    backend: Option<String>,
    path: Option<PathBuf>,
    url: Option<String>,
    retention: Option<Dur>,
    min_free_bytes: Option<u64>,
    commit_timeout: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAdmin {
    listen: Option<String>,
    token_env: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct RawRetry {
    max_attempts: Option<u32>,
    max_age: Option<Dur>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawProcessor {
    poll_interval: Option<Dur>,
    lease: Option<Dur>,
    max_concurrency: Option<usize>,
    shutdown_grace: Option<Dur>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct RawSecretRef {
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    secret: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAuth {
    #[serde(rename = "type")]
    kind: Option<String>,
    header: Option<String>,
    param: Option<String>,
    username: Option<String>,
    algorithm: Option<String>,
    encoding: Option<String>,
    prefix: Option<String>,
    timestamp_header: Option<String>,
    signed_content: Option<String>,
    tolerance: Option<Dur>,
    #[serde(flatten)]
    secret: RawSecretRef,
    secrets: Option<Vec<RawSecretRef>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRate {
    per_second: Option<u32>,
    burst: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawDedup {
    key: Option<String>,
    window: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawResponse {
    status: Option<u16>,
    body: Option<String>,
    content_type: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSource {
    path: Option<String>,
    auth: Option<RawAuth>,
    allow_ips: Vec<String>,
    rate_limit: Option<RawRate>,
    per_ip_rate_limit: Option<RawRate>,
    dedup: Option<RawDedup>,
    response: Option<RawResponse>,
    accept_any: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawHandler {
    #[serde(rename = "type")]
    kind: Option<String>,
    // retry overrides
    max_attempts: Option<u32>,
    max_age: Option<Dur>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
    timeout: Option<Dur>,
    concurrency: Option<usize>,
    // shell
    command: Option<Vec<String>>,
    stdin: Option<String>,
    env: BTreeMap<String, String>,
    permanent_exit_codes: Vec<i32>,
    workdir: Option<PathBuf>,
    // http
    url: Option<String>,
    method: Option<String>,
    headers: BTreeMap<String, String>,
    body: Option<String>,
    rate_limit: Option<RawRate>,
    sign: Option<RawSign>,
    // crm
    provider: Option<String>,
    base_url: Option<String>,
    token_env: Option<String>,
    id_property: Option<String>,
    records: Option<String>,
    fields: BTreeMap<String, String>,
    batch_size: Option<usize>,
    url_template: Option<String>,
    body_template: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSign {
    scheme: Option<String>,
    #[serde(flatten)]
    secret: RawSecretRef,
    secrets: Option<Vec<RawSecretRef>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRoute {
    source: Option<String>,
    handler: Option<String>,
    #[serde(rename = "match")]
    conditions: Vec<RawCondition>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCondition {
    pointer: Option<String>,
    equals: Option<Value>,
    exists: Option<bool>,
    #[serde(rename = "in")]
    one_of: Option<Vec<Value>>,
    regex: Option<String>,
    prefix: Option<String>,
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

type EnvLookup = Box<dyn Fn(&str) -> Option<String>>;

/// Collects problems and warnings while validating.
struct Checker {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    /// Every environment variable read for a secret.
    secret_vars: std::collections::BTreeSet<String>,
    /// Looks up environment variables; a parameter so tests need not mutate the process env.
    env: EnvLookup,
    base_dir: PathBuf,
}

impl Checker {
    /// Reads an environment variable that holds a secret, remembering its name.
    fn secret_var(&mut self, var: &str) -> Option<String> {
        self.secret_vars.insert(var.to_string());
        (self.env)(var)
    }

    /// Records a problem. A key already reported (say, `auth` with a wrong
    /// type) is not reported again by a later check (say, "auth is required").
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let already = self.problems.iter().any(|p| p.path == path || p.path.starts_with(&format!("{path}.")));
        if already && !path.is_empty() {
            return;
        }
        self.problems.push(Problem { path, message: message.into() });
    }
    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem { path: path.into(), message: message.into() });
    }

    /// Deserializes one subtree, recording unknown keys and type errors with their path.
    fn section<T: DeserializeOwned + Default>(&mut self, prefix: &str, value: Option<Value>) -> Option<T> {
        let Some(value) = value else { return Some(T::default()) };
        let whole = value.clone();
        let mut unknown = Vec::new();
        let mut note = |p: serde_ignored::Path| unknown.push(p.to_string());
        let de = serde_ignored::Deserializer::new(value, &mut note);
        let result: Result<T, _> = serde_path_to_error::deserialize(de);
        for key in unknown {
            self.error(join(prefix, &key), "unknown key");
        }
        let Err(first) = result else { return result.ok() };
        let Value::Object(map) = whole else {
            self.type_error(prefix, first);
            return None;
        };
        // Report every bad key of the table, not just the first, then build
        // the table from its good keys so its other checks still run.
        let mut good = serde_json::Map::new();
        for (k, v) in map {
            let single = Value::Object(serde_json::Map::from_iter([(k.clone(), v.clone())]));
            match serde_path_to_error::deserialize::<_, T>(single) {
                Ok(_) => {
                    good.insert(k, v);
                }
                Err(e) => self.type_error(prefix, e),
            }
        }
        serde_json::from_value(Value::Object(good)).ok()
    }

    fn type_error(&mut self, prefix: &str, e: serde_path_to_error::Error<serde_json::Error>) {
        let inner = e.path().to_string();
        let path = if inner == "." { prefix.to_string() } else { join(prefix, &inner) };
        self.error(path, e.into_inner().to_string());
    }

    fn secret(&mut self, path: &str, r: &RawSecretRef) -> Option<Secret> {
        let given = [r.secret_env.is_some(), r.secret_file.is_some(), r.secret.is_some()].iter().filter(|b| **b).count();
        if given > 1 {
            self.error(path, "give only one of secret_env, secret_file, secret");
            return None;
        }
        if let Some(var) = &r.secret_env {
            return match self.secret_var(var) {
                Some(v) if !v.is_empty() => Some(Secret::new(v.into_bytes())),
                _ => {
                    self.error(join(path, "secret_env"), format!("environment variable `{var}` is not set"));
                    None
                }
            };
        }
        if let Some(file) = &r.secret_file {
            let file = self.base_dir.join(file);
            return match std::fs::read(&file) {
                Ok(mut bytes) => {
                    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        bytes.pop();
                    }
                    if bytes.is_empty() {
                        self.error(join(path, "secret_file"), format!("`{}` is empty", file.display()));
                        None
                    } else {
                        Some(Secret::new(bytes))
                    }
                }
                Err(e) => {
                    self.error(join(path, "secret_file"), format!("cannot read `{}`: {e}", file.display()));
                    None
                }
            };
        }
        if let Some(s) = &r.secret {
            self.warn(join(path, "secret"), "inline secret in the config file; prefer secret_env or secret_file");
            if s.is_empty() {
                self.error(join(path, "secret"), "is empty");
                return None;
            }
            return Some(Secret::new(s.as_bytes().to_vec()));
        }
        None
    }

    /// The single form or the `secrets = [...]` rotation list; at least one required.
    fn secrets(&mut self, path: &str, single: &RawSecretRef, list: &Option<Vec<RawSecretRef>>) -> Vec<Secret> {
        let has_single = single.secret_env.is_some() || single.secret_file.is_some() || single.secret.is_some();
        match list {
            Some(list) => {
                if has_single {
                    self.error(path, "give either secrets = [...] or one secret_env/secret_file/secret, not both");
                }
                if list.is_empty() {
                    self.error(join(path, "secrets"), "is empty");
                }
                list.iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        let p = format!("{}[{i}]", join(path, "secrets"));
                        let s = self.secret(&p, r);
                        if s.is_none() && r.secret_env.is_none() && r.secret_file.is_none() && r.secret.is_none() {
                            self.error(p, "needs secret_env, secret_file or secret");
                        }
                        s
                    })
                    .collect()
            }
            None if has_single => self.secret(path, single).into_iter().collect(),
            None => {
                self.error(join(path, "secret_env"), "a secret is required (secret_env, secret_file, secret or secrets = [...])");
                Vec::new()
            }
        }
    }

    fn rate(&mut self, path: &str, r: &RawRate) -> Option<RateLimit> {
        let Some(per_second) = r.per_second else {
            self.error(join(path, "per_second"), "is required");
            return None;
        };
        if per_second == 0 {
            self.error(join(path, "per_second"), "must be at least 1");
            return None;
        }
        let burst = r.burst.unwrap_or(per_second);
        if burst == 0 {
            self.error(join(path, "burst"), "must be at least 1");
            return None;
        }
        Some(RateLimit { per_second, burst })
    }

    fn pointer(&mut self, path: &str, p: &str) -> bool {
        if !p.is_empty() && !p.starts_with('/') {
            self.error(path, format!("`{p}` is not a JSON pointer (it must start with `/`, e.g. \"/email\")"));
            return false;
        }
        true
    }

    fn cidrs(&mut self, path: &str, list: &[String]) -> Vec<IpNet> {
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| match parse_cidr(s) {
                Some(n) => Some(n),
                None => {
                    self.error(format!("{path}[{i}]"), format!("`{s}` is not an IP address or CIDR"));
                    None
                }
            })
            .collect()
    }
}

/// `10.0.0.0/8`, or a bare address meaning just that host.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else if key.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Which file to load: `--config`, else `$HOOKTRAIL_CONFIG`, else
/// `./config/hooktrail.toml`, else `/etc/hooktrail/hooktrail.toml`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("HOOKTRAIL_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("./config/hooktrail.toml");
    if local.exists() {
        return local;
    }
    PathBuf::from("/etc/hooktrail/hooktrail.toml")
}

/// Loads and validates the file at `path` with `HOOKTRAIL__…` overrides from the
/// process environment.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, env)
}

/// Like [`load`], with an explicit environment (used by tests and by `load`).
pub fn load_with_env(path: &Path, env: Vec<(String, String)>) -> Result<Loaded, ConfigErrors> {
    if !path.exists() {
        return Err(ConfigErrors::one(format!("config file `{}` not found", path.display())));
    }
    let env_map: std::collections::HashMap<String, String> = env.into_iter().collect();
    let overrides: std::collections::HashMap<String, String> =
        env_map.iter().filter(|(k, _)| k.starts_with("HOOKTRAIL__")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("HOOKTRAIL").prefix_separator("__").separator("__").try_parsing(true).source(Some(overrides)),
        )
        .build()
        .and_then(|c| c.try_deserialize::<Value>());
    let root = match built {
        Ok(v) => v,
        Err(e) => return Err(ConfigErrors::one(format!("cannot read `{}`: {e}", path.display()))),
    };
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut ck = Checker {
        problems: Vec::new(),
        warnings: Vec::new(),
        secret_vars: Default::default(),
        env: Box::new(move |k| env_map.get(k).cloned()),
        base_dir,
    };
    let config = build(&mut ck, root, path);
    if ck.problems.is_empty() {
        Ok(Loaded { config: Arc::new(config.expect("no problems means every section built")), warnings: ck.warnings })
    } else {
        Err(ConfigErrors(ck.problems, ck.warnings))
    }
}

/// Only the `[storage]` section, leniently: what the inspection commands need,
/// without requiring the daemon's secrets to be set in the operator's shell.
pub fn load_storage(path: &Path) -> Result<StorageConfig, ConfigErrors> {
    let fail = ConfigErrors::one;
    if !path.exists() {
        return Err(fail(format!("config file `{}` not found", path.display())));
    }
    let root = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(config::Environment::with_prefix("HOOKTRAIL").prefix_separator("__").separator("__").try_parsing(true))
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| fail(format!("cannot read `{}`: {e}", path.display())))?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut ck = Checker {
        problems: Vec::new(),
        warnings: Vec::new(),
        secret_vars: Default::default(),
        env: Box::new(|k| std::env::var(k).ok()),
        base_dir,
    };
    let storage = ck.section::<RawStorage>("storage", root.get("storage").cloned()).and_then(|r| storage_config(&mut ck, r));
    match storage {
        Some(s) if ck.problems.is_empty() => Ok(s),
        _ => Err(ConfigErrors(ck.problems, ck.warnings)),
    }
}

fn build(ck: &mut Checker, root: Value, path: &Path) -> Option<Config> {
    let Value::Object(mut top) = root else {
        ck.error("", "the config must be a TOML table");
        return None;
    };
    let known = ["server", "storage", "admin", "retry", "processor", "sources", "handlers", "routes"];
    for key in top.keys() {
        if !known.contains(&key.as_str()) {
            ck.error(key.clone(), "unknown key");
        }
    }
    let server = ck.section::<RawServer>("server", top.remove("server")).and_then(|r| server_config(ck, r));
    let storage = ck.section::<RawStorage>("storage", top.remove("storage")).and_then(|r| storage_config(ck, r));
    let admin = ck.section::<RawAdmin>("admin", top.remove("admin")).and_then(|r| admin_config(ck, r));
    let retry_raw = ck.section::<RawRetry>("retry", top.remove("retry"));
    let retry = retry_raw.as_ref().and_then(|r| retry_policy(ck, "retry", r, &RetryPolicy::default()));
    let processor = ck.section::<RawProcessor>("processor", top.remove("processor")).and_then(|r| processor_config(ck, r));

    let mut sources = Vec::new();
    match top.remove("sources") {
        None => ck.warn("sources", "no sources configured; every request will get 404"),
        Some(Value::Object(map)) => {
            for (name, v) in map {
                let p = format!("sources.{name}");
                if let Some(raw) = ck.section::<RawSource>(&p, Some(v)) {
                    if let Some(s) = source_config(ck, &name, raw) {
                        sources.push(Arc::new(s));
                    }
                }
            }
        }
        Some(_) => ck.error("sources", "must be a table of tables ([sources.NAME])"),
    }
    let mut seen_paths: BTreeMap<&str, &str> = BTreeMap::new();
    for s in &sources {
        if let Some(other) = seen_paths.insert(&s.path, &s.name) {
            ck.error(format!("sources.{}.path", s.name), format!("`{}` is also the path of source `{other}`", s.path));
        }
    }

    let default_retry = retry.unwrap_or_default();
    let mut handlers = BTreeMap::new();
    match top.remove("handlers") {
        None => {}
        Some(Value::Object(map)) => {
            for (name, v) in map {
                let p = format!("handlers.{name}");
                if let Some(raw) = ck.section::<RawHandler>(&p, Some(v)) {
                    if let Some(h) = handler_config(ck, &name, raw, &default_retry) {
                        handlers.insert(name, Arc::new(h));
                    }
                }
            }
        }
        Some(_) => ck.error("handlers", "must be a table of tables ([handlers.NAME])"),
    }

    let mut routes = Vec::new();
    match top.remove("routes") {
        None => {}
        Some(Value::Array(list)) => {
            for (i, v) in list.into_iter().enumerate() {
                let p = format!("routes[{i}]");
                if let Some(raw) = ck.section::<RawRoute>(&p, Some(v)) {
                    if let Some(r) = route_config(ck, &p, raw, &sources, &handlers) {
                        routes.push(r);
                    }
                }
            }
        }
        Some(_) => ck.error("routes", "must be an array of tables ([[routes]])"),
    }

    sources.sort_by(|a, b| a.name.cmp(&b.name));
    Some(Config {
        path: path.to_path_buf(),
        server: server?,
        storage: storage?,
        admin: admin?,
        retry: retry?,
        processor: processor?,
        sources,
        handlers,
        routes,
        secret_vars: ck.secret_vars.iter().cloned().collect(),
    })
}

fn parse_addr(ck: &mut Checker, path: &str, s: &str) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            ck.error(path, format!("`{s}` is not an address like \"127.0.0.1:8080\""));
            None
        }
    }
}

fn server_config(ck: &mut Checker, r: RawServer) -> Option<ServerConfig> {
    let listen = parse_addr(ck, "server.listen", r.listen.as_deref().unwrap_or("127.0.0.1:8080"));
    let max_body_bytes = r.max_body_bytes.unwrap_or(1024 * 1024);
    if max_body_bytes == 0 {
        ck.error("server.max_body_bytes", "must be at least 1");
    }
    let trusted_proxies = ck.cidrs("server.trusted_proxies", &r.trusted_proxies);
    let max_header_bytes = r.max_header_bytes.unwrap_or(64 * 1024);
    if max_header_bytes < 8192 {
        ck.error("server.max_header_bytes", "must be at least 8192");
    }
    Some(ServerConfig {
        listen: listen?,
        max_body_bytes,
        request_timeout: r.request_timeout.map_or(Duration::from_secs(30), |d| d.0),
        header_read_timeout: r.header_read_timeout.map_or(Duration::from_secs(10), |d| d.0),
        max_header_bytes,
        max_connections: r.max_connections.unwrap_or(4096).max(1),
        trusted_proxies,
        max_backlog: r.max_backlog.unwrap_or(1_000_000),
        ready_file: r.ready_file,
    })
}

fn storage_config(ck: &mut Checker, r: RawStorage) -> Option<StorageConfig> {
    let backend = match r.backend.as_deref().unwrap_or("sqlite") {
        "sqlite" => Backend::Sqlite,
        "postgres" => {
            ck.error("storage.backend", "postgres is not available in this build yet; use \"sqlite\"");
            return None;
        }
        other => {
            ck.error("storage.backend", format!("unknown backend `{other}`; expected \"sqlite\" or \"postgres\""));
            return None;
        }
    };
    if r.url.is_some() {
        ck.error("storage.url", "only used with backend = \"postgres\"");
    }
    let path = r.path.unwrap_or_else(|| PathBuf::from("./data/hooktrail.db"));
    let commit_timeout = r.commit_timeout.map_or(Duration::from_secs(10), |d| d.0);
    if commit_timeout.is_zero() {
        ck.error("storage.commit_timeout", "must be more than 0 (e.g. \"10s\")");
    }
    Some(StorageConfig {
        backend,
        path,
        retention: r.retention.map(|d| d.0),
        min_free_bytes: r.min_free_bytes.unwrap_or(DEFAULT_MIN_FREE_BYTES),
        commit_timeout,
    })
}

fn admin_config(ck: &mut Checker, r: RawAdmin) -> Option<AdminConfig> {
    let listen_s = r.listen.unwrap_or_else(|| "127.0.0.1:9090".to_string());
    let listen = if listen_s.is_empty() || listen_s == "off" { None } else { Some(parse_addr(ck, "admin.listen", &listen_s)?) };
    let token_env = r.token_env.unwrap_or_else(|| "HOOKTRAIL_ADMIN_TOKEN".to_string());
    let token = ck.secret_var(&token_env).filter(|t| !t.is_empty()).map(|t| Secret::new(t.into_bytes()));
    if let Some(addr) = listen {
        if token.is_none() && !addr.ip().is_loopback() {
            ck.error(
                "admin.listen",
                format!(
                    "`{addr}` is not a loopback address and admin.token_env `{token_env}` is not set; set the token or listen on 127.0.0.1"
                ),
            );
        }
    }
    Some(AdminConfig { listen, token, token_env })
}

fn retry_policy(ck: &mut Checker, path: &str, r: &RawRetry, base: &RetryPolicy) -> Option<RetryPolicy> {
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

fn processor_config(ck: &mut Checker, r: RawProcessor) -> Option<ProcessorConfig> {
    let lease = r.lease.map_or(Duration::from_secs(60), |d| d.0);
    if lease < Duration::from_secs(1) {
        ck.error("processor.lease", "must be at least 1s");
    }
    Some(ProcessorConfig {
        poll_interval: r.poll_interval.map_or(Duration::from_secs(1), |d| d.0).max(Duration::from_millis(10)),
        lease,
        max_concurrency: r.max_concurrency.unwrap_or(64).max(1),
        shutdown_grace: r.shutdown_grace.map_or(Duration::from_secs(10), |d| d.0),
    })
}

fn source_config(ck: &mut Checker, name: &str, r: RawSource) -> Option<SourceConfig> {
    let p = format!("sources.{name}");
    let before = ck.problems.len();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        ck.error(&p, "source names may contain only letters, digits, `_` and `-`");
    }
    let path = r.path.unwrap_or_else(|| format!("/hooks/{name}"));
    if !path.starts_with('/') || path.contains('?') || path.contains('#') {
        ck.error(join(&p, "path"), format!("`{path}` must start with `/` and hold no `?` or `#`"));
    }
    let auth = match &r.auth {
        None => {
            ck.error(join(&p, "auth"), "is required; write auth = { type = \"none\" } to accept unauthenticated requests");
            None
        }
        Some(a) => auth_spec(ck, &join(&p, "auth"), a),
    };
    let allow_ips = ck.cidrs(&join(&p, "allow_ips"), &r.allow_ips);
    let rate_limit = r.rate_limit.as_ref().and_then(|x| ck.rate(&join(&p, "rate_limit"), x));
    let per_ip_rate_limit = r.per_ip_rate_limit.as_ref().and_then(|x| ck.rate(&join(&p, "per_ip_rate_limit"), x));
    let dedup = r.dedup.as_ref().and_then(|d| {
        let dp = join(&p, "dedup");
        let key = match d.key.as_deref() {
            None => {
                ck.error(join(&dp, "key"), "is required (a JSON pointer like \"/id\" or \"header:NAME\")");
                return None;
            }
            Some(k) => match k.strip_prefix("header:") {
                Some(h) if !h.trim().is_empty() => DedupKey::Header(h.trim().to_ascii_lowercase()),
                Some(_) => {
                    ck.error(join(&dp, "key"), "header: needs a header name");
                    return None;
                }
                None => {
                    if k.is_empty() || !ck.pointer(&join(&dp, "key"), k) {
                        if k.is_empty() {
                            ck.error(join(&dp, "key"), "is empty");
                        }
                        return None;
                    }
                    DedupKey::Pointer(k.to_string())
                }
            },
        };
        Some(DedupSpec { key, window: d.window.map_or(Duration::from_secs(24 * 3600), |w| w.0) })
    });
    let response = r.response.as_ref().and_then(|x| {
        let status = x.status.unwrap_or(200);
        if !(200..300).contains(&status) {
            ck.error(join(&p, "response.status"), format!("{status} is not a 2xx status; the response replaces the success answer"));
            return None;
        }
        let spec = ResponseSpec {
            status,
            body: x.body.clone().unwrap_or_else(|| "{\"id\":\"{{id}}\",\"status\":\"accepted\"}".to_string()),
            content_type: x.content_type.clone().unwrap_or_else(|| "application/json".to_string()),
        };
        if let Err(e) = crate::template::check_json_template(&spec.body, &spec.content_type) {
            ck.error(join(&p, "response.body"), e);
            return None;
        }
        Some(spec)
    });
    if ck.problems.len() > before {
        return None;
    }
    Some(SourceConfig {
        name: name.to_string(),
        path,
        auth: auth?,
        allow_ips,
        rate_limit,
        per_ip_rate_limit,
        dedup,
        response,
        accept_any: r.accept_any,
    })
}

fn auth_spec(ck: &mut Checker, p: &str, a: &RawAuth) -> Option<AuthSpec> {
    let Some(kind) = a.kind.as_deref() else {
        ck.error(
            join(p, "type"),
            "is required: none, header_token, query_token, basic, hmac, standard_webhooks, github, stripe, shopify or slack",
        );
        return None;
    };
    let tolerance = a.tolerance.map_or(Duration::from_secs(300), |d| d.0);
    let require = |ck: &mut Checker, key: &str, v: &Option<String>| -> Option<String> {
        match v {
            Some(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            _ => {
                ck.error(join(p, key), format!("is required for type = \"{kind}\""));
                None
            }
        }
    };
    let spec = match kind {
        "none" => AuthSpec::None,
        "header_token" => {
            let header = require(ck, "header", &a.header).map(|h| h.to_ascii_lowercase());
            let secrets = ck.secrets(p, &a.secret, &a.secrets);
            AuthSpec::HeaderToken { header: header?, secrets }
        }
        "query_token" => {
            let param = require(ck, "param", &a.param);
            let secrets = ck.secrets(p, &a.secret, &a.secrets);
            AuthSpec::QueryToken { param: param?, secrets }
        }
        "basic" => {
            let username = require(ck, "username", &a.username);
            let secrets = ck.secrets(p, &a.secret, &a.secrets);
            AuthSpec::Basic { username: username?, secrets }
        }
        "hmac" => {
            let header = require(ck, "header", &a.header).map(|h| h.to_ascii_lowercase());
            let algorithm = match a.algorithm.as_deref().unwrap_or("sha256") {
                "sha1" => Some(HmacAlgorithm::Sha1),
                "sha256" => Some(HmacAlgorithm::Sha256),
                "sha512" => Some(HmacAlgorithm::Sha512),
                other => {
                    ck.error(join(p, "algorithm"), format!("`{other}` is not one of sha1, sha256, sha512"));
                    None
                }
            };
            let encoding = match a.encoding.as_deref().unwrap_or("hex") {
                "hex" => Some(SigEncoding::Hex),
                "base64" => Some(SigEncoding::Base64),
                other => {
                    ck.error(join(p, "encoding"), format!("`{other}` is not one of hex, base64"));
                    None
                }
            };
            let signed_content = match a.signed_content.as_deref().unwrap_or("body") {
                "body" => Some(SignedContent::Body),
                "timestamp.body" => Some(SignedContent::TimestampDotBody),
                other => {
                    ck.error(join(p, "signed_content"), format!("`{other}` is not one of \"body\", \"timestamp.body\""));
                    None
                }
            };
            let timestamp_header = a.timestamp_header.as_ref().map(|h| h.trim().to_ascii_lowercase());
            if signed_content == Some(SignedContent::TimestampDotBody) && timestamp_header.is_none() {
                ck.error(join(p, "timestamp_header"), "is required when signed_content = \"timestamp.body\"");
            }
            let secrets = ck.secrets(p, &a.secret, &a.secrets);
            AuthSpec::Hmac(HmacSpec {
                header: header?,
                algorithm: algorithm?,
                encoding: encoding?,
                prefix: a.prefix.clone().unwrap_or_default(),
                timestamp_header,
                signed_content: signed_content?,
                tolerance,
                secrets,
            })
        }
        "standard_webhooks" | "github" | "stripe" | "shopify" | "slack" => {
            let preset = match kind {
                "standard_webhooks" => Preset::StandardWebhooks,
                "github" => Preset::Github,
                "stripe" => Preset::Stripe,
                "shopify" => Preset::Shopify,
                _ => Preset::Slack,
            };
            let secrets = ck.secrets(p, &a.secret, &a.secrets);
            if preset == Preset::StandardWebhooks {
                for (i, s) in secrets.iter().enumerate() {
                    if crate::crypto::standard_webhooks_key(s).is_none() {
                        ck.error(join(p, "secrets"), format!("secret #{} is not a `whsec_<base64>` Standard Webhooks secret", i + 1));
                    }
                }
            }
            AuthSpec::Preset { preset, tolerance, secrets }
        }
        other => {
            ck.error(join(p, "type"), format!("unknown auth type `{other}`"));
            return None;
        }
    };
    Some(spec)
}

fn handler_config(ck: &mut Checker, name: &str, r: RawHandler, default_retry: &RetryPolicy) -> Option<HandlerConfig> {
    let p = format!("handlers.{name}");
    let before = ck.problems.len();
    let retry_raw =
        RawRetry { max_attempts: r.max_attempts, max_age: r.max_age, initial_backoff: r.initial_backoff, max_backoff: r.max_backoff };
    let retry = retry_policy(ck, &p, &retry_raw, default_retry);
    let concurrency = r.concurrency.unwrap_or(4);
    if concurrency == 0 {
        ck.error(join(&p, "concurrency"), "must be at least 1");
    }
    let kind = match r.kind.as_deref() {
        None => {
            ck.error(join(&p, "type"), "is required: shell, http or crm_upsert");
            None
        }
        Some("shell") => shell_spec(ck, &p, &r).map(HandlerKind::Shell),
        Some("http") => http_spec(ck, &p, &r).map(HandlerKind::Http),
        Some("crm_upsert") => crm_spec(ck, &p, &r).map(HandlerKind::Crm),
        Some(other) => {
            ck.error(join(&p, "type"), format!("unknown handler type `{other}`; expected shell, http or crm_upsert"));
            None
        }
    };
    if ck.problems.len() > before {
        return None;
    }
    let default_timeout = if matches!(kind, Some(HandlerKind::Shell(_))) { 30 } else { 10 };
    Some(HandlerConfig {
        name: name.to_string(),
        retry: retry?,
        timeout: r.timeout.map_or(Duration::from_secs(default_timeout), |d| d.0),
        concurrency,
        kind: kind?,
    })
}

fn shell_spec(ck: &mut Checker, p: &str, r: &RawHandler) -> Option<ShellSpec> {
    let command = match &r.command {
        Some(c) if !c.is_empty() && !c[0].is_empty() => c.clone(),
        _ => {
            ck.error(join(p, "command"), "is required: an array like [\"/usr/local/bin/on-form.sh\", \"--verbose\"]");
            return None;
        }
    };
    let stdin = match r.stdin.as_deref().unwrap_or("json") {
        "json" => StdinMode::Json,
        "raw" => StdinMode::Raw,
        "envelope" => StdinMode::Envelope,
        "none" => StdinMode::None,
        other => {
            ck.error(join(p, "stdin"), format!("`{other}` is not one of json, raw, envelope, none"));
            return None;
        }
    };
    for (var, ptr) in &r.env {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            ck.error(format!("{p}.env.{var}"), "is not a valid environment variable name");
        }
        if var.starts_with("HOOKTRAIL_") {
            ck.error(format!("{p}.env.{var}"), "names starting with HOOKTRAIL_ are reserved");
        }
        ck.pointer(&format!("{p}.env.{var}"), ptr);
    }
    Some(ShellSpec { command, stdin, env: r.env.clone(), permanent_exit_codes: r.permanent_exit_codes.clone(), workdir: r.workdir.clone() })
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

fn http_spec(ck: &mut Checker, p: &str, r: &RawHandler) -> Option<HttpSpec> {
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
    let body = match r.body.as_deref().unwrap_or("raw") {
        "raw" => BodyMode::Raw,
        "json" => BodyMode::Json,
        "envelope" => BodyMode::Envelope,
        other => {
            ck.error(join(p, "body"), format!("`{other}` is not one of raw, json, envelope"));
            return None;
        }
    };
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
            let secrets = ck.secrets(&sp, &s.secret, &s.secrets);
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

fn crm_spec(ck: &mut Checker, p: &str, r: &RawHandler) -> Option<CrmSpec> {
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
        (None, CrmProvider::Hubspot) => "https://api.hubapi.com".to_string(),
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
    let id_property = r.id_property.clone().unwrap_or_else(|| "email".into());
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
    let batch_size = r.batch_size.unwrap_or(100);
    if batch_size == 0 {
        ck.error(join(p, "batch_size"), "must be at least 1");
    }
    // HubSpot refuses batch requests of more than 100 inputs.
    if provider == CrmProvider::Hubspot && batch_size > 100 {
        ck.error(join(p, "batch_size"), format!("{batch_size} is more than HubSpot accepts in one batch (100)"));
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

fn route_config(
    ck: &mut Checker,
    p: &str,
    r: RawRoute,
    sources: &[Arc<SourceConfig>],
    handlers: &BTreeMap<String, Arc<HandlerConfig>>,
) -> Option<RouteConfig> {
    let before = ck.problems.len();
    let source = r.source.unwrap_or_default();
    let handler = r.handler.unwrap_or_default();
    if source.is_empty() {
        ck.error(join(p, "source"), "is required");
    } else if !sources.iter().any(|s| s.name == source) {
        ck.error(join(p, "source"), format!("no source named `{source}`"));
    }
    if handler.is_empty() {
        ck.error(join(p, "handler"), "is required");
    } else if !handlers.contains_key(&handler) {
        ck.error(join(p, "handler"), format!("no handler named `{handler}`"));
    }
    let mut conditions = Vec::new();
    for (i, c) in r.conditions.into_iter().enumerate() {
        let cp = format!("{p}.match[{i}]");
        let Some(pointer) = c.pointer else {
            ck.error(join(&cp, "pointer"), "is required");
            continue;
        };
        ck.pointer(&join(&cp, "pointer"), &pointer);
        let mut tests = Vec::new();
        if let Some(v) = c.equals {
            tests.push(ConditionTest::Equals(v));
        }
        if let Some(v) = c.exists {
            tests.push(ConditionTest::Exists(v));
        }
        if let Some(v) = c.one_of {
            tests.push(ConditionTest::In(v));
        }
        if let Some(v) = c.prefix {
            tests.push(ConditionTest::Prefix(v));
        }
        if let Some(v) = c.regex {
            match regex::Regex::new(&v) {
                Ok(re) => tests.push(ConditionTest::Regex(re)),
                Err(e) => ck.error(join(&cp, "regex"), format!("invalid regex: {e}")),
            }
        }
        if tests.len() != 1 && ck.problems.len() == before {
            ck.error(&cp, "needs exactly one of equals, exists, in, prefix, regex");
            continue;
        }
        if let Some(test) = tests.pop() {
            conditions.push(Condition { pointer, test });
        }
    }
    if ck.problems.len() > before {
        return None;
    }
    Some(RouteConfig { source, handler, conditions })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        load_with_env(&path, env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn problems(toml: &str, env: &[(&str, &str)]) -> Vec<String> {
        load_str(toml, env).unwrap_err().0.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let l = load_str("[sources.a]\nauth = { type = \"none\" }\n", &[]).unwrap();
        let c = &l.config;
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 1048576);
        assert_eq!(c.sources[0].path, "/hooks/a");
        assert_eq!(c.retry.max_attempts, 10);
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let p = problems(
            r#"
[server]
listen = "nope"
request_timeout = "5 parsecs"
bogus = 1
[sources.a]
path = "/a"
[sources.b]
auth = { type = "header_token", header = "X-T", secret_env = "MISSING_VAR" }
[sources.c]
auth = { type = "wat" }
[[routes]]
source = "zz"
handler = "h"
"#,
            &[],
        );
        let all = p.join("\n");
        assert!(all.contains("server.bogus: unknown key"), "{all}");
        assert!(all.contains("server.request_timeout: invalid duration `5 parsecs`"), "{all}");
        assert!(all.contains("sources.a.auth: is required"), "{all}");
        assert!(all.contains("sources.b.auth.secret_env: environment variable `MISSING_VAR` is not set"), "{all}");
        assert!(all.contains("sources.c.auth.type: unknown auth type `wat`"), "{all}");
        assert!(all.contains("routes[0].source: no source named `zz`"), "{all}");
        assert!(all.contains("routes[0].handler: no handler named `h`"), "{all}");
    }

    #[test]
    fn listen_error_reported_even_when_other_sections_are_bad() {
        let p = problems("[server]\nlisten = \"nope\"\n", &[]);
        assert!(p.iter().any(|l| l.starts_with("server.listen: `nope`")), "{p:?}");
    }

    #[test]
    fn env_overrides_nested_keys() {
        let l = load_str(
            "[sources.a]\nauth = { type = \"none\" }\n",
            &[("HOOKTRAIL__SERVER__LISTEN", "127.0.0.1:9999"), ("HOOKTRAIL__SERVER__MAX_BODY_BYTES", "77")],
        )
        .unwrap();
        assert_eq!(l.config.server.listen.port(), 9999);
        assert_eq!(l.config.server.max_body_bytes, 77);
    }

    #[test]
    fn handler_env_keys_keep_their_case() {
        let l = load_str(
            "[sources.a]\nauth = { type = \"none\" }\n[handlers.h]\ntype = \"shell\"\ncommand = [\"/bin/true\"]\nenv = { EMAIL = \"/email\" }\n",
            &[],
        )
        .unwrap();
        let HandlerKind::Shell(s) = &l.config.handlers["h"].kind else { panic!() };
        assert!(s.env.contains_key("EMAIL"));
    }

    #[test]
    fn inline_secret_warns() {
        let l = load_str("[sources.a]\nauth = { type = \"header_token\", header = \"X-T\", secret = \"s3\" }\n", &[]).unwrap();
        assert!(l.warnings.iter().any(|w| w.path == "sources.a.auth.secret"));
        assert!(!format!("{:?}", l.config).contains("s3\""));
    }

    #[test]
    fn condition_matching_is_loose_about_strings() {
        let c = Condition { pointer: "/n".into(), test: ConditionTest::Equals(serde_json::json!(5)) };
        assert!(c.holds(&serde_json::json!({"n": "5"})));
        assert!(!c.holds(&serde_json::json!({"n": "6"})));
        let c = Condition { pointer: "/n".into(), test: ConditionTest::Exists(false) };
        assert!(c.holds(&serde_json::json!({})));
    }
}
