//! The event queue and paper trail. Owns every durable byte: events, their
//! deliveries (event × handler) and every attempt. Backends sit behind the
//! [`Store`] trait so ingest and processing never know which database they use.
//!
//! Invariant: [`Store::insert_event`] resolves `Ok` only after the transaction
//! holding the event *and its deliveries* is durably committed, so a 2xx
//! implies the event and everything routed from it survive a crash.

pub mod postgres;
pub mod rules;
pub mod search;
pub mod sqlite;
mod sqlite_disk;
mod sqlite_sync;
mod sqlite_timeline;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
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

/// Read back from `export` (`hooktrail import`).
impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The name as stored and shown (`snake_case`).
            pub fn as_str(self) -> &'static str { match self { $($name::$variant => $text),+ } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.pad(self.as_str()) }
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
    DeliveryStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Retrying => "retrying",
        Failed => "failed",
        Skipped => "skipped",
    }
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
    /// The ordering key of each delivery, by the index of its handler in
    /// `handlers` ([`rules::order_key`]); shorter (or empty) when the
    /// handlers past its end are not ordered. `None`: not ordered.
    pub order_keys: Vec<Option<String>>,
}

/// What [`Store::insert_event`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// The new event's id, or the first event's for a duplicate.
    pub id: EventId,
    /// The first event's id is returned and nothing new was stored.
    pub duplicate: bool,
}

/// Why the store could not do what was asked, in terms any backend can
/// report. Each backend maps its driver's errors onto these variants, so no
/// driver type crosses the [`Store`] seam: ingest turns every one into a 503
/// with `Retry-After`, the CLI prints it, readiness names it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot write right now (disk full,
    /// an I/O error, locked for too long, the connection lost); a retry may
    /// succeed without anyone doing anything.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// More writes wait than the backend queues; retry shortly.
    #[error("storage is overloaded (write queue full)")]
    Overloaded,
    /// [`Store::close`] was called; nothing more is written.
    #[error("storage is shutting down")]
    ShuttingDown,
    /// Too little room is left for new events (`storage.min_free_bytes`):
    /// refused before a body is read rather than failing the commit later.
    /// Answered by [`Store::admission`].
    #[error("storage nearly full: {free} bytes free on the database volume, below storage.min_free_bytes ({min_free})")]
    NearlyFull {
        /// Bytes free where the database lives.
        free: u64,
        /// `storage.min_free_bytes`.
        min_free: u64,
    },
    /// Stored data this version cannot read back (an unknown status, a
    /// timestamp out of range, headers that are not JSON, a schema newer
    /// than this binary): a bug or a foreign write, never guessed around.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A write clashed with what is stored (a uniqueness rule).
    #[error("conflicting write: {0}")]
    Conflict(String),
    /// The database refused a statement for a reason none of the other
    /// variants names; the message is the database's own.
    #[error("database error: {0}")]
    Backend(String),
    /// The database could not be opened (at start, or for a command).
    #[error("cannot open database `{path}`: {message}")]
    Open {
        /// Where the database is (for SQLite, `storage.path`).
        path: String,
        /// What went wrong, and what to do about it when known.
        message: String,
    },
    /// The configured location no longer names the database this process
    /// has open (a file deleted, moved or replaced): nothing written since
    /// would be found there after a restart. Sticky until restart (README
    /// "Storage faults").
    #[error("database file `{0}` was deleted or replaced while open; restart hooktrail after restoring it")]
    Lost(String),
    /// The database reported itself damaged (a failed integrity check, or
    /// damage met on use). Sticky until restart.
    #[error(
        "database `{path}` is damaged ({detail}); new events are refused until it is repaired (README \"Recovering a damaged database\")"
    )]
    Damaged {
        /// Where the database is (for SQLite, `storage.path`).
        path: String,
        /// What the database said about the damage.
        detail: String,
    },
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

/// How records' times are written in JSON (`events show --json`, the admin
/// API, `export`): RFC 3339 in UTC with microseconds and `Z`, the same text
/// [`rfc3339`] gives the CLI and the page. `#[serde(with = "time_text")]`.
pub mod time_text {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize as _, Deserializer, Serializer};

    /// Writes `t` as [`super::rfc3339`] text.
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*t))
    }

    /// Reads any RFC 3339 time, in UTC.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }

    /// The same for an optional time (`#[serde(with = "time_text::option")]`).
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize as _, Deserializer, Serializer};

        /// Writes a time as [`super::serialize`] does, or `null`.
        pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        /// Reads a time as [`super::deserialize`] does, or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
            let text = Option::<std::borrow::Cow<str>>::deserialize(d)?;
            text.map(|t| DateTime::parse_from_rfc3339(&t).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)).transpose()
        }
    }
}

/// One attempt of one delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based; numbers go on across replays.
    pub number: u32,
    #[serde(with = "time_text")]
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    pub error: Option<String>,
    /// The first 64 KiB of what the handler wrote or the peer answered.
    pub output: String,
}

/// One delivery (event × handler) with its attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub handler: String,
    pub status: DeliveryStatus,
    /// Attempts begun so far (the last may be running).
    pub attempt_count: u32,
    /// When it is due, while it waits ([`rules::waits_for_its_time`]).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time_text::option")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The event whose failed delivery blocks this one's ordering key
    /// (`on_failure = "block"`, README "Ordered processing"): it waits,
    /// `pending`, until that one is replayed and succeeds or is skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<EventId>,
    pub attempts: Vec<AttemptRecord>,
}

/// An event as `events show --json`, the admin API and `export` show it;
/// its field names are that contract (and `import` reads them back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: EventId,
    pub source: String,
    pub status: EventStatus,
    #[serde(with = "time_text")]
    pub received_at: DateTime<Utc>,
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
    /// Text the event's payload (or raw body) must contain as whole words,
    /// ignoring case ([`search::contains`]; README "Search").
    pub search: Option<String>,
    pub limit: Option<usize>,
    /// Only events older (smaller id) than this, for paging newest-first.
    pub before: Option<EventId>,
    /// Only events newer (larger id) than this, for paging oldest-first.
    pub after: Option<EventId>,
    /// Oldest first (export) instead of newest first.
    pub ascending: bool,
}

/// One line of `stats`: a source total (`handler` None) or a (source, handler) pair.
/// Which column a state counts in is [`rules::event_column`] and its siblings.
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

impl StatsRow {
    /// Adds `n` to one column.
    pub fn add(&mut self, column: rules::StatsColumn, n: u64) {
        use rules::StatsColumn as C;
        let cell = match column {
            C::Duplicates => &mut self.duplicates,
            C::Rejected => &mut self.rejected,
            C::Pending => &mut self.pending,
            C::Processing => &mut self.processing,
            C::Succeeded => &mut self.succeeded,
            C::Retrying => &mut self.retrying,
            C::Failed => &mut self.failed,
        };
        *cell += n;
    }
}

/// One delivery a replay would re-queue (`events replay --dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeue {
    pub event_id: EventId,
    pub handler: String,
    /// Its status now.
    pub status: DeliveryStatus,
    /// Attempts made so far; numbers go on after the replay.
    pub attempt_count: u32,
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
    /// The backend's handle on the delivery, for `started`, `finish`, `renew`, `release`.
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
    /// `payload` as compact JSON text, byte for byte what printing it gives,
    /// when the store holds that text already (SQLite, for a payload it
    /// normalized at receive time): a handler sends it instead of printing
    /// `payload` again. `None`: print `payload`.
    pub payload_text: Option<String>,
}

/// What to do with a delivery after an attempt (its new status is
/// [`rules::after_attempt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Done; never runs again unless replayed.
    Succeeded,
    /// Runs again at that time.
    RetryAt(DateTime<Utc>),
    /// Given up (a permanent failure, or the budget spent); never runs again unless replayed.
    Failed,
    /// The attempt was cut short by shutdown: pending again, due at once.
    Released,
}

/// What a handler with `ordering` does when the head of a key fails for
/// good; config names it, the claim obeys it.
pub use crate::config::OnFailure;

/// Why [`Store::skip`] refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    #[error("no event `{0}` is stored")]
    UnknownEvent(EventId),
    #[error("event `{0}` has no delivery to handler `{1}`")]
    UnknownHandler(EventId, String),
    #[error("the delivery of event `{0}` to handler `{1}` is {2}, not failed; only a failed delivery can be skipped")]
    NotFailed(EventId, String, DeliveryStatus),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Keys of an ordered handler held by a failed delivery (`on_failure =
/// "block"`), for metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedKeys {
    pub handler: String,
    pub keys: u64,
}

/// The attempt a processor finished, to be recorded with the delivery's next state.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The processor that ran the attempt (its claim's `owner`): only the
    /// delivery's current lease holder moves it on.
    pub owner: String,
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
    /// Whether a new event may be taken now, asked before its body is read:
    /// [`StoreError::NearlyFull`] when the backend knows it is short of room
    /// (`storage.min_free_bytes`), so a sender gets a clear 503 rather than a
    /// failed commit. Cheap and never blocks (a backend samples in the
    /// background); `Ok` when it cannot tell.
    fn admission(&self) -> Result<(), StoreError>;
    /// Counts a refused request. Cheap and never blocks; flushed with the next commit.
    fn count_rejection(&self, source: &str, reason: RejectReason);
    /// Unfinished deliveries (pending, running, retrying), cached; for backpressure.
    fn backlog(&self) -> u64;
    /// Resolves when new work may be due (an insert with deliveries, a replay).
    fn work_signal(&self) -> Arc<tokio::sync::Notify>;

    /// Events matching `filter`, newest first unless `ascending`, loaded to `detail`.
    async fn list_events(&self, filter: EventFilter, detail: Detail) -> Result<Vec<EventRecord>, StoreError>;
    /// One event with its deliveries and every attempt; `None` if no such id is stored.
    async fn get_event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError>;
    /// The rows of `hooktrail stats`: per source, and per (source, handler),
    /// counting events received since `since`, columns as [`rules`] places them.
    async fn stats(&self, source: Option<String>, since: Option<DateTime<Utc>>) -> Result<Vec<StatsRow>, StoreError>;
    /// Unfinished deliveries (pending, running, retrying) per handler and status (metrics).
    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError>;
    /// Events received per hour since `since`, oldest hour first (the event-log page's chart).
    async fn hourly(&self, since: DateTime<Utc>) -> Result<Vec<HourCounts>, StoreError>;

    /// Claims up to `limit` due deliveries of `handler` for `owner`, leased for `lease`.
    /// Deliveries stored with an ordering key are still claimed one per key
    /// (as [`Store::claim_ordered`] with `Continue`): a reload that took
    /// `ordering` off never reorders what was queued under it.
    /// A claimed delivery is *held* until [`Store::started`]: if its lease
    /// expires while held (the processor died before running it), the next
    /// claim neither records an interrupted attempt nor spends one.
    async fn claim(&self, owner: &str, handler: &str, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError>;
    /// Marks a claimed delivery's attempt as begun. Recorded lazily (SQLite:
    /// with the next commit, within a few milliseconds; PostgreSQL: within
    /// 50 ms, or never if the attempt's finish comes first): it only shapes
    /// the history after a crash.
    async fn started(&self, owner: &str, delivery_id: i64) -> Result<(), StoreError>;
    /// Records an attempt and moves its delivery (and event) on.
    async fn finish(&self, f: Finished) -> Result<(), StoreError>;
    /// Extends `owner`'s lease on a running delivery; false if it is no longer ours.
    async fn renew(&self, owner: &str, delivery_id: i64, lease: Duration) -> Result<bool, StoreError>;
    /// [`Store::claim`] for a handler with `ordering` (README "Ordered
    /// processing"): deliveries without a key as `claim` does, and of each
    /// key only its head, as [`rules`] ("Ordered claims") describes; a
    /// failed head is passed (`Continue`) or holds its key (`Block`).
    async fn claim_ordered(
        &self,
        owner: &str,
        handler: &str,
        on_failure: OnFailure,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// Marks the failed delivery of event `id` to `handler` `skipped`,
    /// releasing the ordering key it blocks (`hooktrail events skip`).
    async fn skip(&self, id: EventId, handler: &str) -> Result<(), SkipError>;
    /// Ordering keys held by a failed delivery, per handler (metrics).
    async fn blocked_keys(&self) -> Result<Vec<BlockedKeys>, StoreError>;
    /// Gives back deliveries leased by `owner` without recording an attempt (shutdown).
    async fn release(&self, owner: &str, delivery_ids: Vec<i64>) -> Result<u64, StoreError>;
    /// Re-queues deliveries of the given events: those to `handler` (all
    /// when `None`) that [`rules::replay_takes`] (only failed ones when
    /// `only_failed`). Unknown ids are skipped. Returns how many were re-queued.
    async fn replay(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<u64, StoreError>;
    /// The deliveries [`Store::replay`] with the same arguments would
    /// re-queue now, in event order then handler order; changes nothing.
    async fn replay_plan(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<Vec<Requeue>, StoreError>;
    /// Ids of events matching a filter (for bulk replay).
    async fn find_ids(&self, filter: EventFilter) -> Result<Vec<EventId>, StoreError>;
    /// Deletes finished events ([`rules::prunable`]) received before
    /// `before`; at most `batch` per transaction.
    async fn prune(&self, before: DateTime<Utc>, batch: usize) -> Result<u64, StoreError>;
    /// Hands the space freed by `prune` back to the file system at once
    /// (`hooktrail compact`, README "Disk space"); says what it did.
    async fn compact(&self) -> Result<String, StoreError>;
    /// Checks the database accepts a write (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Stores an event as `export` wrote it (`hooktrail import`): its id,
    /// receive time, raw body, deliveries and attempts as they were; a
    /// delivery that was running waits again, due at once (its processor
    /// is not here). `Ok(false)`, changing nothing, when the id is already
    /// stored.
    async fn import_event(&self, ev: EventRecord) -> Result<bool, StoreError>;
    /// Flushes and stops background work; further writes fail with ShuttingDown.
    async fn close(&self);
}

/// What an imported event is stored as: its body bytes, its payload, and
/// each delivery's status as it will wait here (see [`Store::import_event`]).
pub fn import_parts(ev: &EventRecord) -> Result<(Vec<u8>, Payload, Vec<DeliveryStatus>), StoreError> {
    use base64::Engine as _;
    let body = match (&ev.body, &ev.body_base64) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| StoreError::Corrupt(format!("event {}: body_base64 is not base64: {e}", ev.id)))?,
        (None, None) => Vec::new(),
    };
    let payload = match &ev.payload {
        Value::Null => Payload::Null,
        v => Payload::Json(v.to_string()),
    };
    let statuses = ev.deliveries.iter().flatten().map(|d| rules::after_import(d.status)).collect();
    Ok((body, payload, statuses))
}

/// A time as every edge shows it (CLI, admin API, page, handler
/// environment): RFC 3339 in UTC with microseconds, `2026-11-23T10:42:00.123456Z`.
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

/// Opens the configured backend: the one place that names a backend's type.
pub fn open(cfg: &crate::config::StorageConfig, role: Role) -> Result<Arc<dyn Store>, StoreError> {
    match &cfg.backend {
        crate::config::Backend::Sqlite(db) => Ok(Arc::new(
            sqlite::SqliteStore::open(&db.path, role)?.with_commit_timeout(cfg.commit_timeout).with_min_free_bytes(db.min_free_bytes),
        )),
        crate::config::Backend::Postgres(pg) => Ok(Arc::new(postgres::PostgresStore::open(pg, role, cfg.commit_timeout)?)),
    }
}

/// Fills the configured database with `events` synthetic form events,
/// written directly (the hidden `hooktrail bench-fill` behind
/// `bench/scale.sh`); SQLite only.
pub fn bench_fill(cfg: &crate::config::StorageConfig, events: u64, old_schema: bool) -> Result<(), StoreError> {
    match &cfg.backend {
        crate::config::Backend::Sqlite(db) => sqlite::SqliteStore::bench_fill(&db.path, events, old_schema),
        crate::config::Backend::Postgres(_) => Err(StoreError::NotBuilt("postgres")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_times_serialize_as_rfc3339_with_micros_and_z() {
        let t = DateTime::parse_from_rfc3339("2026-11-23T10:42:00.5+01:00").expect("a time").with_timezone(&Utc);
        let d = DeliveryRecord {
            handler: "h".into(),
            status: DeliveryStatus::Retrying,
            attempt_count: 1,
            next_attempt_at: Some(t),
            blocked_by: None,
            attempts: vec![AttemptRecord {
                number: 1,
                started_at: t,
                duration_ms: 2,
                outcome: Outcome::Retry,
                exit_code: None,
                http_status: Some(503),
                error: None,
                output: String::new(),
            }],
        };
        let json = serde_json::to_value(&d).expect("serializing");
        assert_eq!(json["next_attempt_at"], "2026-11-23T09:42:00.500000Z");
        assert_eq!(json["attempts"][0]["started_at"], "2026-11-23T09:42:00.500000Z");
        assert_eq!(rfc3339(t), "2026-11-23T09:42:00.500000Z", "the same text at every edge");
        let waiting = serde_json::to_value(DeliveryRecord { next_attempt_at: None, ..d }).expect("serializing");
        assert!(waiting.get("next_attempt_at").is_none(), "omitted when not waiting");

        #[derive(Deserialize)]
        struct Back {
            #[serde(with = "time_text")]
            t: DateTime<Utc>,
            #[serde(with = "time_text::option", default)]
            n: Option<DateTime<Utc>>,
        }
        let back: Back = serde_json::from_str(r#"{"t":"2026-11-23T09:42:00.500000Z","n":null}"#).expect("reading back");
        assert_eq!((back.t, back.n), (t, None));
    }
}
