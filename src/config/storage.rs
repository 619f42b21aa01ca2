//! `[storage]`: which database holds the queue. `backend` picks the kind, and
//! each kind takes only its own keys (a `path` means nothing to a database
//! server, a `url_env` nothing to a file), so a key of the other backend is
//! reported rather than silently ignored (README "Configuration").

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::check::{keys_of, Checker};
use super::values::Dur;
use crate::crypto::Secret;

/// The store's settings: the backend with its own keys, and what every
/// backend honours.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub backend: Backend,
    /// Finished events older than this are pruned in the background.
    pub retention: Option<Duration>,
    /// How long an insert waits for its commit before answering 503
    /// (README "Storage faults"); the commit may still land later.
    pub commit_timeout: Duration,
}

/// Which database, with the settings only that kind has.
#[derive(Debug, Clone)]
pub enum Backend {
    /// One file on this host (the default).
    Sqlite(SqliteConfig),
    /// A database server several nodes share (README "Several nodes: PostgreSQL").
    Postgres(PostgresConfig),
}

/// `backend = "sqlite"`: the database is a file on this host, so its
/// volume's free space is ours to watch.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub path: PathBuf,
    /// Free bytes on the database's volume below which ingest answers 503
    /// instead of accepting events it may not be able to commit; 0 disables.
    pub min_free_bytes: u64,
}

/// `backend = "postgres"`: a database server that several nodes share
/// (README "Configuration").
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The environment variable the URL was read from, for messages.
    pub url_env: String,
    /// The libpq-style URL. It carries the password, so it lives only in the
    /// environment and here, never in the config file, a log line or an error.
    pub url: Secret,
}

impl StorageConfig {
    /// The SQLite settings, when the database is a local file: what lives
    /// beside the file (the free-space check, handler marks) needs them.
    pub fn sqlite(&self) -> Option<&SqliteConfig> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s),
            Backend::Postgres(_) => None,
        }
    }
}

/// Default `storage.min_free_bytes`: room for SQLite's WAL and a few checkpoints.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;
const DEFAULT_PATH: &str = "./data/hooktrail.db";
const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BACKEND: &str = "sqlite";
/// URL schemes libpq accepts.
const POSTGRES_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// Keys every backend takes.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawShared {
    retention: Option<Dur>,
    commit_timeout: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSqlite {
    path: Option<PathBuf>,
    min_free_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPostgres {
    url_env: Option<String>,
}

/// Checks the `[storage]` table (absent: every default).
pub(super) fn storage_config(ck: &mut Checker, value: Option<Value>) -> Option<StorageConfig> {
    let t = ck.split_tagged::<RawShared>("storage", value.unwrap_or_else(|| Value::Object(Map::new())), "backend")?;
    let shared = ck.section::<RawShared>("storage", Some(Value::Object(t.shared)));
    let shared_keys = keys_of::<RawShared>();
    let backend = match t.kind.as_deref().unwrap_or(DEFAULT_BACKEND) {
        "sqlite" => {
            let what = "storage with backend = \"sqlite\"";
            ck.kind_section::<RawSqlite>("storage", t.own, what, "backend", shared_keys).map(|r| Backend::Sqlite(sqlite(r)))
        }
        "postgres" => {
            let what = "storage with backend = \"postgres\"";
            ck.kind_section::<RawPostgres>("storage", t.own, what, "backend", shared_keys)
                .and_then(|r| postgres(ck, r))
                .map(Backend::Postgres)
        }
        other => {
            ck.error("storage.backend", format!("unknown backend `{other}`; expected \"sqlite\" or \"postgres\""));
            None
        }
    };
    let shared = shared?;
    let commit_timeout = shared.commit_timeout.map_or(DEFAULT_COMMIT_TIMEOUT, |d| d.0);
    if commit_timeout.is_zero() {
        ck.error("storage.commit_timeout", "must be more than 0 (e.g. \"10s\")");
    }
    Some(StorageConfig { backend: backend?, retention: shared.retention.map(|d| d.0), commit_timeout })
}

fn sqlite(r: RawSqlite) -> SqliteConfig {
    SqliteConfig {
        path: r.path.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
        min_free_bytes: r.min_free_bytes.unwrap_or(DEFAULT_MIN_FREE_BYTES),
    }
}

/// Reads the URL from the variable `url_env` names. Messages name the
/// variable, never its value: the URL carries the password.
fn postgres(ck: &mut Checker, r: RawPostgres) -> Option<PostgresConfig> {
    let Some(url_env) = r.url_env.filter(|v| !v.trim().is_empty()) else {
        ck.error(
            "storage.url_env",
            "is required with backend = \"postgres\": the name of an environment variable holding the postgres:// URL",
        );
        return None;
    };
    match ck.secret_var(&url_env) {
        Some(url) if POSTGRES_SCHEMES.iter().any(|s| url.starts_with(s)) => {
            Some(PostgresConfig { url_env, url: Secret::new(url.into_bytes()) })
        }
        Some(url) if !url.is_empty() => {
            ck.error("storage.url_env", format!("environment variable `{url_env}` does not hold a postgres:// or postgresql:// URL"));
            None
        }
        _ => {
            ck.error("storage.url_env", format!("environment variable `{url_env}` is not set"));
            None
        }
    }
}
