//! The event queue and paper trail. Owns every durable byte: events, their
//! deliveries (event × handler) and every attempt. Backends sit behind the
//! [`Store`] trait so ingest and processing never know which database they use.
//!
//! Invariant: [`Store::insert_event`] resolves `Ok` only after the transaction
//! holding the event *and its deliveries* is durably committed, so a 2xx
//! implies the event and everything routed from it survive a crash.

pub mod sqlite;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `evt_` followed by a ULID: unique, URL-safe, sorts by receive time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub ulid::Ulid);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "evt_{}", self.0)
    }
}

impl FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("evt_").ok_or_else(|| format!("`{s}` is not an event id (they look like evt_01JD…)"))?;
        ulid::Ulid::from_string(rest).map(EventId).map_err(|_| format!("`{s}` is not an event id (they look like evt_01JD…)"))
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str { match self { $($name::$variant => $text),+ } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($text => Ok($name::$variant),)+
                    _ => Err(format!("`{s}` is not one of {}", [$($text),+].join(", "))) }
            }
        }
    };
}

string_enum!(
    /// Event status, derived from its deliveries.
    EventStatus { Pending => "pending", Processing => "processing", Retrying => "retrying", Done => "done", Failed => "failed" }
);
string_enum!(
    /// Delivery (event × handler) status.
    DeliveryStatus { Pending => "pending", Running => "running", Succeeded => "succeeded", Retrying => "retrying", Failed => "failed" }
);
string_enum!(
    /// What one attempt concluded.
    Outcome { Success => "success", Retry => "retry", Failure => "failure" }
);

string_enum!(
    /// Why a request was refused (or, for `Duplicate`, not stored); counted per source, never queued.
    RejectReason {
        Malformed => "malformed",
        Unauthorized => "unauthorized",
        Forbidden => "forbidden",
        Method => "method",
        Timeout => "timeout",
        TooLarge => "too_large",
        ContentType => "content_type",
        RateLimited => "rate_limited",
        Unavailable => "unavailable",
        Duplicate => "duplicate",
        NotFound => "not_found",
    }
);

/// The normalized view as stored.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Not decodable (accept_any with an unknown type): `null`.
    Null,
    /// The body is itself the JSON document; storing it twice would waste the disk.
    Body,
    /// Serialized JSON.
    Json(String),
}

/// An event as received, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub received_at: DateTime<Utc>,
    pub method: String,
    pub content_type: String,
    pub query: String,
    /// JSON object, secrets already redacted.
    pub headers: String,
    pub remote_addr: String,
    pub body: Bytes,
    pub payload: Payload,
    pub dedup: Option<(String, Duration)>,
    /// Handlers routed to this event; one delivery each, in the same transaction.
    pub handlers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub id: EventId,
    /// The first event's id is returned and nothing new was stored.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage is overloaded (write queue full)")]
    Overloaded,
    #[error("storage is shutting down")]
    ShuttingDown,
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot open database `{path}`: {message}")]
    Open { path: String, message: String },
    /// The configured path no longer names the file this process has open
    /// (deleted, moved or replaced): nothing written since would be found
    /// there after a restart. Sticky until restart (README "Storage faults").
    #[error("database file `{0}` was deleted or replaced while open; restart hooktrail after restoring it")]
    Lost(String),
    /// SQLite reported the file damaged (a failed integrity check, or
    /// `SQLITE_CORRUPT`/`SQLITE_NOTADB` on use). Sticky until restart.
    #[error(
        "database `{path}` is damaged ({detail}); new events are refused until it is repaired (README \"Recovering a damaged database\")"
    )]
    Damaged { path: String, detail: String },
    /// The commit did not finish within `storage.commit_timeout`; it may
    /// still finish later (the caller was told 503, and retries).
    #[error("storage did not commit within storage.commit_timeout ({0}); the write may still land later")]
    CommitTimeout(String),
    /// The config names a backend this build cannot open yet.
    #[error("storage: backend = \"{0}\" is not built yet; use backend = \"sqlite\"")]
    NotBuilt(&'static str),
}

impl StoreError {
    /// A fault a retry cannot cure and a restart alone does not either: an
    /// operator must restore or repair the database (README "Storage faults").
    pub fn needs_operator(&self) -> bool {
        matches!(self, StoreError::Lost(_) | StoreError::Damaged { .. })
    }
}

/// One attempt of one delivery.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub started_at: String,
    pub duration_ms: u64,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRecord {
    pub handler: String,
    pub status: DeliveryStatus,
    pub attempt_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<AttemptRecord>,
}

/// An event as the CLI, the admin API and `export` show it (SPEC §5).
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub id: EventId,
    pub source: String,
    pub status: EventStatus,
    pub received_at: String,
    pub method: String,
    pub content_type: String,
    pub query: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Value>,
    pub remote_addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    pub body_bytes: usize,
    pub payload: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Vec<DeliveryRecord>>,
}

/// How much of an event to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Metadata and payload only (lists).
    Summary,
    /// Everything: headers, body, deliveries, attempts.
    Full,
}

/// Filters shared by `events list`, `/api/events`, `export` and bulk replay.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub source: Option<String>,
    pub status: Option<EventStatus>,
    /// Events with a delivery to this handler.
    pub handler: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// (JSON pointer, value) pairs the normalized payload must hold.
    pub matches: Vec<(String, String)>,
    pub limit: Option<usize>,
    /// Only events older (smaller id) than this, for paging newest-first.
    pub before: Option<EventId>,
    /// Only events newer (larger id) than this, for paging oldest-first.
    pub after: Option<EventId>,
    /// Oldest first (export) instead of newest first.
    pub ascending: bool,
}

/// One line of `stats`: a source total (`handler` None) or a (source, handler) pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsRow {
    pub source: String,
    pub handler: Option<String>,
    pub received: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub pending: u64,
    pub processing: u64,
    pub succeeded: u64,
    pub retrying: u64,
    pub failed: u64,
}

/// Unfinished deliveries of one handler in one status (queue-depth metrics).
#[derive(Debug, Clone, Serialize)]
pub struct QueueDepth {
    pub handler: String,
    pub status: DeliveryStatus,
    pub count: u64,
    /// When the longest-waiting of them was queued (received or replayed).
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

/// Events received in one hour and how many of them ended done or failed (the page's chart).
#[derive(Debug, Clone, Serialize)]
pub struct HourCounts {
    pub hour: DateTime<Utc>,
    pub received: u64,
    pub done: u64,
    pub failed: u64,
}

/// A delivery claimed by a processor, with what a handler needs to run it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery_id: i64,
    pub event_id: EventId,
    pub source: String,
    pub handler: String,
    /// 1-based number of the attempt about to run.
    pub attempt: u32,
    /// 1-based number of this attempt since the last replay (what max_attempts counts).
    pub attempt_in_budget: u32,
    pub received_at: DateTime<Utc>,
    /// When the delivery was created (replay resets the max_age clock).
    pub first_queued_at: DateTime<Utc>,
    pub content_type: String,
    pub query: String,
    pub headers: Value,
    pub body: Bytes,
    pub payload: Value,
}

/// What to do with a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Succeeded,
    RetryAt(DateTime<Utc>),
    Failed,
    /// The attempt was cut short by shutdown: pending again, due at once.
    Released,
}

/// The attempt a processor finished, to be recorded with the delivery's next state.
#[derive(Debug, Clone)]
pub struct Finished {
    pub delivery_id: i64,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub output: String,
    pub next: Next,
}

/// The queue and paper trail, whatever database holds them.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Durably stores an event and its deliveries (or finds the dedup twin).
    async fn insert_event(&self, ev: NewEvent) -> Result<Inserted, StoreError>;
    /// Counts a refused request. Cheap and never blocks; flushed with the next commit.
    fn count_rejection(&self, source: &str, reason: RejectReason);
    /// Unfinished deliveries (pending, running, retrying), cached; for backpressure.
    fn backlog(&self) -> u64;
    /// Resolves when new work may be due (an insert with deliveries, a replay).
    fn work_signal(&self) -> Arc<tokio::sync::Notify>;

    async fn list_events(&self, filter: EventFilter, detail: Detail) -> Result<Vec<EventRecord>, StoreError>;
    async fn get_event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError>;
    async fn stats(&self, source: Option<String>, since: Option<DateTime<Utc>>) -> Result<Vec<StatsRow>, StoreError>;
    /// Unfinished deliveries (pending, running, retrying) per handler and status (metrics).
    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError>;
    /// Events received per hour since `since`, oldest hour first (the event-log page's chart).
    async fn hourly(&self, since: DateTime<Utc>) -> Result<Vec<HourCounts>, StoreError>;

    /// Claims up to `limit` due deliveries of `handler` for `owner`, leased for `lease`.
    /// A claimed delivery is *held* until [`Store::started`]: if its lease
    /// expires while held (the processor died before running it), the next
    /// claim neither records an interrupted attempt nor spends one.
    async fn claim(&self, owner: &str, handler: &str, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError>;
    /// Marks a claimed delivery's attempt as begun. Recorded lazily (with the
    /// next commit, within a few milliseconds): it only shapes the history
    /// after a crash.
    async fn started(&self, owner: &str, delivery_id: i64) -> Result<(), StoreError>;
    /// Records an attempt and moves its delivery (and event) on.
    async fn finish(&self, f: Finished) -> Result<(), StoreError>;
    /// Extends `owner`'s lease on a running delivery; false if it is no longer ours.
    async fn renew(&self, owner: &str, delivery_id: i64, lease: Duration) -> Result<bool, StoreError>;
    /// Gives back deliveries leased by `owner` without recording an attempt (shutdown).
    async fn release(&self, owner: &str, delivery_ids: Vec<i64>) -> Result<u64, StoreError>;
    /// Re-queues deliveries of the given events (all of them, or only those to `handler`, or only failed ones).
    async fn replay(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<u64, StoreError>;
    /// Ids of events matching a filter (for bulk replay).
    async fn find_ids(&self, filter: EventFilter) -> Result<Vec<EventId>, StoreError>;
    /// Deletes finished events received before `before`; at most `batch` per transaction.
    async fn prune(&self, before: DateTime<Utc>, batch: usize) -> Result<u64, StoreError>;
    /// Checks the database accepts a write (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Flushes and stops background work; further writes fail with ShuttingDown.
    async fn close(&self);
}

pub fn micros_to_time(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `t + d`, or `None` past the last time chrono can represent. Durations from
/// outside (a peer's `Retry-After`, a `--since`, a config key) can be absurd;
/// plain `+` on a `DateTime` panics on them.
pub fn checked_after(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_add_signed(d))
}

/// `t - d`, or `None` before the first time chrono can represent.
pub fn checked_before(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_sub_signed(d))
}

/// `2h` (ago) or an RFC 3339 time. A duration reaching back further than a
/// time can (`99999999999h`) is an error, not a panic.
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return checked_before(Utc::now(), d)
            .ok_or_else(|| format!("`{s}` reaches back further than a date can (give a shorter duration or an RFC 3339 time)"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("`{s}` is neither a duration like `2h` nor an RFC 3339 time like `2026-11-23T10:42:00Z`"))
}

/// What a process opening the store will do with it: which parts of the
/// daemon it runs (`serve --role`), or a short-lived CLI command. Backends
/// use it to decide what background work is theirs (checkpoints, integrity
/// checks, maintenance); readiness checks only the parts a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Listener and processor
    All,
    /// Only receive and store
    Ingest,
    /// Only process stored events
    Process,
    /// A CLI command reading or changing the store (`events`, `stats`, …)
    #[value(skip)]
    Client,
}

impl Role {
    /// A long-running `serve` process (background upkeep is its job).
    pub fn is_daemon(self) -> bool {
        !matches!(self, Role::Client)
    }
    /// Runs the public listener.
    pub fn ingests(self) -> bool {
        matches!(self, Role::All | Role::Ingest)
    }
    /// Runs the processor.
    pub fn processes(self) -> bool {
        matches!(self, Role::All | Role::Process)
    }
}

/// Opens the configured backend.
pub fn open(cfg: &crate::config::StorageConfig, role: Role) -> Result<Arc<dyn Store>, StoreError> {
    match &cfg.backend {
        crate::config::Backend::Sqlite(db) => {
            Ok(Arc::new(sqlite::SqliteStore::open(&db.path, role)?.with_commit_timeout(cfg.commit_timeout)))
        }
        crate::config::Backend::Postgres(_) => Err(StoreError::NotBuilt("postgres")),
    }
}
