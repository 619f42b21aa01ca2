//! SQLite backend: WAL, one writer thread doing group commit, one syncer
//! thread making commits durable.
//!
//! Every write is an operation sent to the writer thread. The writer takes
//! whatever operations are waiting, runs them in *one* transaction and commits
//! once (`synchronous=NORMAL`), then hands the batch to the syncer, which
//! answers each caller only after an `fdatasync` of the write-ahead log that
//! began after that COMMIT returned; meanwhile the writer goes on with the
//! next batch. While every sync loop is busy the writer keeps its
//! transaction open and adds to it what arrives, committing once a loop is
//! free ([`gather`]). So an acknowledged write survives `kill -9` and power loss
//! exactly as with `synchronous=FULL` (the argument is in `sqlite_sync.rs`),
//! each sync is shared by every commit that waited for it, and the rate
//! follows the CPU rather than the disk's latency. Checkpoints run on a
//! separate thread and connection (`wal_autocheckpoint=0` on the writer) so
//! the writer never stalls copying pages into the main file.
//!
//! Reads use a small pool of read connections on the blocking thread pool; the
//! async runtime never touches rusqlite directly.
//!
//! Storage faults (README "Storage faults") are sticky: once the configured
//! path no longer names the file this process has open (deleted, moved,
//! replaced), or SQLite finds the file damaged, every write is refused until
//! a restart, and nothing more is written to the file. A batch is
//! acknowledged only if, after its COMMIT, the path still names the file it
//! committed into; a commit into a file that is gone from its path is not
//! durable at that path, so it gets 503, never 200.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rusqlite::functions::FunctionFlags;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Deserialize as _;
use serde_json::Value;
use tokio::sync::{oneshot, Notify};

use super::sqlite_disk::DiskGuard;
use super::sqlite_sync::{sync_loop, SyncQueue, SyncTrace, WalFile};
use super::sqlite_timeline as timeline;
use super::*;

/// Most operations taken into one transaction. Bounded so one commit's
/// latency stays small even under a flood.
const MAX_BATCH: usize = 1024;

/// How long attempt records alone wait for more to share a commit, and how
/// many end that wait early. At most this much later in the paper trail; an
/// attempt whose record is lost to a crash meanwhile runs again (at-least-once).
const LAZY_WAIT: Duration = Duration::from_millis(5);
const LAZY_BATCH: usize = 64;
/// Operations that may wait for the writer; beyond this, ingest answers 503.
const QUEUE_DEPTH: usize = 16 * 1024;
/// How often the daemon's writer does its housekeeping between batches
/// (expired dedup keys, recounting the backlog).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);
/// Expired dedup keys removed per housekeeping pass, so a large backlog of
/// them never stalls the writer.
const DEDUP_CLEANUP_BATCH: i64 = 1000;
/// How long the idle writer waits for an operation before it looks whether
/// the database file is still in place.
const WRITER_IDLE_CHECK: Duration = Duration::from_millis(500);
/// How long a connection waits for another process's lock (a CLI command,
/// a second `serve`) before the statement fails as unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Read connections kept for reuse; more are opened under load and closed after.
const READ_POOL: usize = 8;
/// How long an insert waits for its commit unless `storage.commit_timeout` says otherwise.
const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon's page cache per connection, in KiB (SQLite's negative `cache_size`).
const CACHE_KIB: i64 = 8000;
/// The size a restarted WAL is cut back to (64 MiB).
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// The checkpointer's pause after a pass, so it copies in chunks rather than
/// chasing every single commit.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(100);
/// How often the checkpointer looks whether the store is closing while idle.
const CHECKPOINT_IDLE_CHECK: Duration = Duration::from_secs(1);
/// How often an integrity check's timer looks whether its budget ran out or the store is closing.
const CHECK_TIMER_TICK: Duration = Duration::from_millis(200);
/// How often the background check thread wakes to see whether a check is due or the store closes.
const CHECK_LOOP_TICK: Duration = Duration::from_millis(500);
const SECS_PER_HOUR: i64 = 3600;
const MICROS_PER_HOUR: i64 = SECS_PER_HOUR * 1_000_000;

/// `payload_kind`: how an event's normalized view is stored.
const PAYLOAD_NULL: i64 = 0;
/// The body is itself the JSON document (not stored twice).
const PAYLOAD_IS_BODY: i64 = 1;
/// Serialized JSON in the `payload` column.
const PAYLOAD_JSON: i64 = 2;

/// [`rules::unfinished`] as SQL: queries spell it literally so the planner
/// can match the partial index `deliveries_due` (a test checks it agrees
/// with the rule).
macro_rules! unfinished_sql {
    () => {
        "('pending', 'retrying', 'running')"
    };
}

/// How many deliveries are unfinished, read from the partial index that
/// holds them all (`deliveries_waiting`; see migrations 5 and 6).
macro_rules! unfinished_count_sql {
    () => {
        concat!("SELECT count(*) FROM deliveries WHERE status IN ", unfinished_sql!())
    };
}

/// [`rules::prunable`] as SQL (a test checks it agrees with the rule).
macro_rules! prunable_sql {
    () => {
        "('done', 'failed')"
    };
}

// After the SQL spellings above, which it uses.
#[path = "sqlite_scale.rs"]
mod scale;
/// WAL frames above which the writer finishes a checkpoint itself (see
/// [`writer_loop`]); 1024 frames of 4 KiB = 4 MiB. Below it a quiet WAL
/// restarts on its own.
const WAL_FINISH_FRAMES: u64 = 1024;
/// How long the daemon's start-up integrity check may run before the daemon
/// starts anyway, so start-up stays under a second at any size (README
/// "Storage faults"). A database of a few hundred MB in the page cache is
/// checked whole; a larger one only in part, and the hourly background
/// check reads all of it later. Not at once: on a large database the check
/// competes with ingest for the CPUs and the disk, and its read transaction
/// keeps the WAL from starting over while it runs (measured at ten million
/// events: ingest fell to a third during the check, BENCHMARKS.md "Scale").
const START_CHECK_BUDGET: Duration = Duration::from_millis(500);
/// How often the daemon checks the whole database in the background, on a
/// read connection of its own (it never holds up a write).
const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Longest background check: a check is one read transaction, and while it
/// lasts the WAL cannot start over, so it is bounded.
const CHECK_BUDGET: Duration = Duration::from_secs(600);
/// Problems `PRAGMA quick_check` lists at most; the first names the damage.
const CHECK_MAX_ERRORS: u32 = 10;

const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE events (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        source       TEXT NOT NULL,
        status       TEXT NOT NULL,
        received_at  INTEGER NOT NULL,          -- unix microseconds
        method       TEXT NOT NULL,
        content_type TEXT NOT NULL,
        query        TEXT NOT NULL,
        headers      TEXT NOT NULL,             -- JSON object, secrets redacted
        remote_addr  TEXT NOT NULL,
        body         BLOB NOT NULL,             -- exactly as received
        payload_kind INTEGER NOT NULL,          -- 0 null, 1 the body is the JSON, 2 in payload
        payload      TEXT
    );
    CREATE INDEX events_source ON events(source, seq);
    CREATE INDEX events_status ON events(status, seq);
    CREATE INDEX events_received ON events(received_at);

    CREATE TABLE deliveries (
        id           INTEGER PRIMARY KEY,
        event_seq    INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
        handler      TEXT NOT NULL,
        status       TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        budget_from  INTEGER NOT NULL DEFAULT 0, -- attempts before the last replay
        next_at      INTEGER NOT NULL,          -- due time; lease expiry while running
        lease_owner  TEXT,
        queued_at    INTEGER NOT NULL,          -- start of the max_age clock
        updated_at   INTEGER NOT NULL,
        UNIQUE (event_seq, handler)
    );
    CREATE INDEX deliveries_due ON deliveries(handler, next_at)
        WHERE status IN ('pending', 'retrying', 'running');
    CREATE INDEX deliveries_handler ON deliveries(handler, status);

    CREATE TABLE attempts (
        delivery_id  INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
        number       INTEGER NOT NULL,
        started_at   INTEGER NOT NULL,
        duration_ms  INTEGER NOT NULL,
        outcome      TEXT NOT NULL,
        exit_code    INTEGER,
        http_status  INTEGER,
        error        TEXT,
        output       TEXT NOT NULL,
        PRIMARY KEY (delivery_id, number)
    ) WITHOUT ROWID;

    CREATE TABLE dedup (
        source       TEXT NOT NULL,
        key          TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        expires_at   INTEGER NOT NULL,
        PRIMARY KEY (source, key)
    ) WITHOUT ROWID;

    -- Requests counted but not stored (rejections, duplicates), per hour.
    CREATE TABLE counters (
        source       TEXT NOT NULL,
        kind         TEXT NOT NULL,
        hour         INTEGER NOT NULL,          -- unix seconds / 3600
        n            INTEGER NOT NULL,
        PRIMARY KEY (source, kind, hour)
    ) WITHOUT ROWID;

    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    "#,
    // 2: fewer indexes to maintain on the insert path. Time ranges use the id
    // (a ULID starts with its time), so received_at needs no index of its own;
    // status lookups need only the unfinished events ("done" is the common
    // final state and is found by scanning newest-first).
    r#"
    DROP INDEX events_received;
    DROP INDEX events_status;
    CREATE INDEX events_unfinished ON events(status, seq) WHERE status != 'done';
    DROP INDEX deliveries_handler;
    "#,
    // 3: a claimed delivery is held (claimed ahead, waiting for a handler
    // slot) until its attempt begins; see `claim`.
    r#"
    ALTER TABLE deliveries ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: ordered processing (README "Ordered processing"; the claim is
    // described in `rules`, "Ordered claims"). A delivery's ordering key.
    // The unfinished deliveries are split between two partial indexes: the
    // due index holds the unkeyed ones (so a claim never walks the keyed
    // backlog, and a keyed delivery maintains one index, not two), the keyed
    // index the keyed ones, by key then event (a key's next head in one
    // probe). A count of unfinished deliveries sums the two
    // (`unfinished_count_sql!`). `order_heads` holds one row per key with
    // work or blocked.
    r#"
    ALTER TABLE deliveries ADD COLUMN order_key TEXT;
    DROP INDEX deliveries_due;
    CREATE INDEX deliveries_due ON deliveries(handler, next_at)
        WHERE status IN ('pending', 'retrying', 'running') AND order_key IS NULL;
    CREATE INDEX deliveries_keyed ON deliveries(handler, order_key, event_seq)
        WHERE order_key IS NOT NULL AND status IN ('pending', 'retrying', 'running');
    CREATE TABLE order_heads (
        handler      TEXT NOT NULL,
        key          TEXT NOT NULL,
        delivery_id  INTEGER NOT NULL,          -- the head: the key's next to run, or its blocker
        event_seq    INTEGER NOT NULL,          -- the head's event
        due          INTEGER NOT NULL,          -- when to look at it again (its next_at as last seen)
        blocked      INTEGER NOT NULL DEFAULT 0, -- 1: the head failed and the handler blocks
        PRIMARY KEY (handler, key)
    ) WITHOUT ROWID;
    CREATE INDEX order_heads_due ON order_heads(handler, blocked, due);
    "#,
    // 5: counters, the indexes filters need, and search (see `scale`).
    scale::MIGRATION,
    // 6: the keyed index holds every keyed delivery, finished or not, and
    // names no column a claim or a finish changes: SQLite rewrites an index
    // entry whenever a column it names (or its WHERE names) changes, so with
    // `status` in its WHERE each ordered delivery rewrote its entry at claim
    // and removed it at finish, two pages in random places of the index (one
    // per key) where an unordered delivery's claim and finish touch the two
    // ends of `deliveries_due`. A key's next head is then found from the
    // head row's `floor`, below which none of the key's deliveries is
    // unfinished (`rules`, "Ordered claims"); set here to the head or the
    // key's oldest unfinished delivery, whichever is older. Unfinished
    // deliveries are counted through `deliveries_waiting` (`unfinished_count_sql!`).
    r#"
    ALTER TABLE order_heads ADD COLUMN floor INTEGER NOT NULL DEFAULT 0;
    UPDATE order_heads SET floor = min(event_seq, coalesce((SELECT min(d.event_seq) FROM deliveries d
        WHERE d.handler = order_heads.handler AND d.order_key = order_heads.key
          AND d.status IN ('pending', 'retrying', 'running')), event_seq));
    DROP INDEX deliveries_keyed;
    CREATE INDEX deliveries_by_key ON deliveries(handler, order_key, event_seq) WHERE order_key IS NOT NULL;
    "#,
];

/// The smallest event id that can have been received at or after `t`: ids are
/// made at commit, after receipt, and a ULID's text sorts by its time. Lets
/// time ranges use the id index.
fn id_floor(t: DateTime<Utc>) -> String {
    let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
    format!("evt_{}", ulid::Ulid::from_parts(ms, 0))
}

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// An error inside the backend. SQLite's errors keep their code until they
/// leave through [`neutral`] (or [`Shared::note`], which also notices a
/// damaged file), so the writer can tell a full disk from one bad row.
#[derive(Debug)]
enum Error {
    Sqlite(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Sqlite(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Sqlite(e) => e.fmt(f),
            Error::Store(e) => e.fmt(f),
        }
    }
}

/// What an error means to callers, with SQLite left behind. `path` names
/// the database for [`StoreError::Damaged`].
fn neutral(e: Error, path: &Path) -> StoreError {
    let e = match e {
        Error::Store(e) => return e,
        Error::Sqlite(e) => e,
    };
    let message = e.to_string();
    match &e {
        // A stored value that does not read back as its type (see the
        // `FromSql` impls below and `unreadable`).
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(message),
        _ if is_damage_code(&e) => StoreError::Damaged { path: path.display().to_string(), detail: message },
        _ if is_unavailable(&e) => StoreError::Unavailable(message),
        _ if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::Conflict(message),
        _ => StoreError::Backend(message),
    }
}

/// A stored value this version cannot read back (column `col`): leaves the
/// backend as [`StoreError::Corrupt`], never as a guess.
fn unreadable(col: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, what.into())
}

/// Domain enums and ids are stored as their text; a text this version does
/// not know is corrupt data.
macro_rules! from_text {
    ($($t:ty),+) => {$(
        impl FromSql for $t {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                v.as_str()?.parse().map_err(|e: String| FromSqlError::Other(e.into()))
            }
        }
    )+};
}
from_text!(EventId, EventStatus, DeliveryStatus, Outcome, RejectReason);

/// A time as stored: unix microseconds in an INTEGER column. One outside
/// what a date can hold is corrupt data, not 1970.
struct Micros(DateTime<Utc>);

impl FromSql for Micros {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let us = v.as_i64()?;
        DateTime::from_timestamp_micros(us).map(Micros).ok_or(FromSqlError::OutOfRange(us))
    }
}

/// Parses a stored JSON document. serde_json's own depth guard stops at 127
/// levels, yet ingest accepts JSON 128 deep (and XML nested 128 deep
/// normalizes deeper still); every stored document passed ingest's depth
/// check, so its depth is bounded and lifting the guard here is safe.
fn json_doc(bytes: &[u8]) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// State only the writer thread touches.
struct WriterState {
    ids: ulid::Generator,
    /// Deliveries created or re-queued in this batch: wake the processor after commit.
    new_work: bool,
    /// Change in unfinished deliveries made by this batch.
    backlog_delta: i64,
    /// Counter changes of the open transaction, written just before COMMIT.
    tallies: scale::Tallies,
    /// Attempt records in the open transaction, by delivery (see
    /// [`FinishAhead`]). Empty while operations run one per transaction.
    finishing: HashMap<i64, FinishAhead>,
}

/// An attempt record ([`Store::finish`]) further on in the open
/// transaction. A start mark of the same delivery and owner met before it
/// is left to it: the record sets `held = 0` itself, in the same COMMIT, so
/// the mark would change nothing a reader or a crash could see (README
/// "Leases, crashes and stopping"). Should the record find the delivery no
/// longer its own (and so leave `held` alone), it writes the mark itself.
struct FinishAhead {
    owner: String,
    /// A start mark was left to this record.
    mark_left: bool,
}

impl WriterState {
    fn next_id(&mut self) -> EventId {
        // The generator fails only if 2^80 ids were made in one millisecond.
        EventId(self.ids.generate().unwrap_or_else(|_| ulid::Ulid::new()))
    }
}

/// One unit of work for the writer. `apply` may run twice (if a batch
/// neighbour failed, each op is retried in its own transaction), so it must not
/// consume its inputs; `finish` answers the caller after the outcome is known.
trait WriteOp: Send {
    fn apply(&mut self, conn: &Connection, st: &mut WriterState) -> Result<(), Error>;
    fn finish(self: Box<Self>, result: Result<(), StoreError>);
    /// Whether something waits on this write to go on: a request's answer, a
    /// claim that starts work. The others (attempt records) may wait up to
    /// [`LAZY_WAIT`] to share a commit.
    fn urgent(&self) -> bool;
    /// Only wakes the writer for the lazy writes waiting in [`Shared::lazy`].
    fn is_nudge(&self) -> bool {
        false
    }
    /// The delivery and owner whose attempt this records, if it is an
    /// attempt record ([`FinishAhead`]).
    fn finishes(&self) -> Option<(i64, &str)> {
        None
    }
    /// When it was submitted, only with the diagnostic timeline on (`sqlite_timeline.rs`).
    fn queued(&self) -> Option<Instant> {
        None
    }
}

/// An attempt record: `op`, known to its batch by delivery and owner.
struct Finishing<O> {
    delivery_id: i64,
    owner: String,
    op: O,
}

impl<O: WriteOp> WriteOp for Finishing<O> {
    fn apply(&mut self, conn: &Connection, st: &mut WriterState) -> Result<(), Error> {
        self.op.apply(conn, st)
    }
    fn finish(self: Box<Self>, result: Result<(), StoreError>) {
        Box::new(self.op).finish(result)
    }
    fn urgent(&self) -> bool {
        self.op.urgent()
    }
    fn finishes(&self) -> Option<(i64, &str)> {
        Some((self.delivery_id, &self.owner))
    }
}

/// Notes the attempt records among `ops`, about to run in the open
/// transaction (see [`FinishAhead`]).
fn note_finishes(st: &mut WriterState, ops: &[Box<dyn WriteOp>]) {
    for (id, owner) in ops.iter().filter_map(|op| op.finishes()) {
        st.finishing.entry(id).or_insert_with(|| FinishAhead { owner: owner.to_string(), mark_left: false });
    }
}

/// Wakes the writer for the lazy writes waiting in [`Shared::lazy`].
struct Nudge;

impl WriteOp for Nudge {
    fn apply(&mut self, _: &Connection, _: &mut WriterState) -> Result<(), Error> {
        Ok(())
    }
    fn finish(self: Box<Self>, _: Result<(), StoreError>) {}
    fn urgent(&self) -> bool {
        false
    }
    fn is_nudge(&self) -> bool {
        true
    }
}

struct Op<T, F> {
    f: F,
    out: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
    urgent: bool,
    queued: Option<Instant>,
}

impl<T, F> WriteOp for Op<T, F>
where
    T: Send,
    F: FnMut(&Connection, &mut WriterState) -> Result<T, Error> + Send,
{
    fn apply(&mut self, conn: &Connection, st: &mut WriterState) -> Result<(), Error> {
        self.out = Some((self.f)(conn, st)?);
        Ok(())
    }
    fn urgent(&self) -> bool {
        self.urgent
    }
    fn queued(&self) -> Option<Instant> {
        self.queued
    }
    fn finish(self: Box<Self>, result: Result<(), StoreError>) {
        let Op { out, reply, .. } = *self;
        let answer = result.map(|()| out.expect("apply succeeded before finish(Ok)"));
        // The caller may have given up (request timeout); the write stands either way.
        let _ = reply.send(answer);
    }
}

type Counts = HashMap<(String, RejectReason), u64>;

/// Fault injection for the integration tests (`tests/storage_faults.rs`,
/// `tests/durability.rs`) and the benchmark's slow-disk run only, not a
/// feature: `HOOKTRAIL_TEST_COMMIT_DELAY_MS` makes the writer sleep before
/// each COMMIT and `HOOKTRAIL_TEST_READ_DELAY_MS` each read before it runs,
/// as a frozen filesystem (`fsfreeze`) would; `HOOKTRAIL_TEST_SYNC_DELAY_MS`
/// makes the syncer sleep before each `fdatasync` of the log, as a slow disk
/// would. Read once at open; unset (the only case outside those tests) they
/// cost nothing.
#[derive(Debug, Clone, Copy, Default)]
struct TestHooks {
    commit_delay: Duration,
    read_delay: Duration,
    sync_delay: Duration,
}

impl TestHooks {
    fn from_env() -> Self {
        let ms = |var: &str| Duration::from_millis(std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(0));
        TestHooks {
            commit_delay: ms("HOOKTRAIL_TEST_COMMIT_DELAY_MS"),
            read_delay: ms("HOOKTRAIL_TEST_READ_DELAY_MS"),
            sync_delay: ms("HOOKTRAIL_TEST_SYNC_DELAY_MS"),
        }
    }
}

/// Why the store refuses every write until a restart.
#[derive(Debug, Clone)]
enum Fault {
    /// The configured path no longer names the file this process has open.
    Lost,
    /// SQLite found the file damaged; what it said.
    Damaged(String),
}

/// Which file a path named when it was opened: (device, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId { dev: m.dev(), ino: m.ino() })
    }
}

/// The database file: the configured path and the file opened there.
struct DbFile {
    path: PathBuf,
    /// Absolute, to find the file among this process's open descriptors once deleted.
    abs: PathBuf,
    id: FileId,
}

struct Shared {
    backlog: AtomicU64,
    work: Arc<Notify>,
    rejections: Mutex<Counts>,
    closing: AtomicBool,
    /// Signals the checkpointer that commits happened.
    wal_dirty: (Mutex<bool>, Condvar),
    /// Frames in the WAL, as the checkpointer last saw.
    wal_frames: AtomicU64,
    /// The checkpointer finished a pass: the writer may complete it.
    pass_done: AtomicBool,
    file: DbFile,
    /// Set once, when the file is found lost or damaged; from then on every
    /// write is refused and nothing touches the file (see the module doc).
    fault: OnceLock<Fault>,
    hooks: TestHooks,
    /// The daemon refuses writes on a fault; a CLI command only reports it.
    role: Role,
    /// Lazy writes (attempt records) waiting for the writer. They wait here
    /// rather than in the channel so that each does not wake the writer
    /// thread: only the first of a [`LAZY_WAIT`] window sends a [`Nudge`].
    lazy: Mutex<Vec<Box<dyn WriteOp>>>,
}

impl Shared {
    /// The error every write gets once a fault is known.
    fn fault_error(&self) -> Option<StoreError> {
        // Asked before every write: the path is only formatted for a fault.
        let fault = self.fault.get()?;
        let path = self.file.path.display().to_string();
        Some(match fault {
            Fault::Lost => StoreError::Lost(path),
            Fault::Damaged(detail) => StoreError::Damaged { path, detail: detail.clone() },
        })
    }

    fn lost(&self) -> bool {
        matches!(self.fault.get(), Some(Fault::Lost))
    }

    /// Records a fault; the first one is logged at ERROR, with what to do.
    fn set_fault(&self, fault: Fault) {
        if self.fault.set(fault).is_err() {
            return;
        }
        let error = self.fault_error().expect("just set").to_string();
        let then = if self.role.is_daemon() { "; refusing every write from now on" } else { "" };
        match self.fault.get() {
            Some(Fault::Lost) => tracing::error!(recover = %self.lost_hint(), "{error}{then}"),
            _ => tracing::error!("{error}{then}"),
        }
    }

    /// How to get the lost file back: while this process runs, a deleted
    /// file is still readable through its open descriptor.
    fn lost_hint(&self) -> String {
        let deleted = format!("{} (deleted)", self.file.abs.display());
        let fd = std::fs::read_dir("/proc/self/fd").ok().and_then(|dir| {
            dir.flatten().find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == deleted.as_str())).map(|e| e.file_name())
        });
        let path = self.file.path.display();
        match fd {
            Some(fd) => format!(
                "the deleted file is still open here: before stopping hooktrail, copy it back with `cp /proc/{}/fd/{} {path}` (its -wal and -shm files are kept as they are), then restart",
                std::process::id(),
                fd.to_string_lossy()
            ),
            None => format!("if the file was moved, move it back to `{path}` (its -wal and -shm files beside that name are kept), then restart"),
        }
    }

    /// Whether the configured path still names the file opened there. Once
    /// it does not, the store is lost for good (see the module doc); a
    /// failure to look says nothing either way and fails only this call.
    fn verify_file(&self) -> Result<(), String> {
        match FileId::of(&self.file.path) {
            Ok(id) if id == self.file.id => Ok(()),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("cannot check that database file `{}` is still in place: {e}", self.file.path.display()))
            }
            _ => {
                self.set_fault(Fault::Lost);
                Err(self.fault_error().expect("just set").to_string())
            }
        }
    }

    /// Passes an error on as callers see it; when SQLite says the file is
    /// damaged, notes the sticky fault first and answers
    /// [`StoreError::Damaged`].
    fn note(&self, e: Error) -> StoreError {
        if is_damage(&e) {
            self.set_fault(Fault::Damaged(e.to_string()));
            return self.fault_error().expect("just set");
        }
        neutral(e, &self.file.path)
    }
}

/// The embedded backend (`storage.backend = "sqlite"`): one database file
/// in WAL mode, written by one group-commit writer thread and read through
/// a small pool of connections (see the module doc). Several processes may
/// open the same file (`serve --role ingest` beside `--role process`, the
/// CLI). Opened through [`crate::store::open`].
pub struct SqliteStore {
    path: PathBuf,
    tx: Mutex<Option<SyncSender<Box<dyn WriteOp>>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// How long an insert waits for its commit (`storage.commit_timeout`).
    commit_timeout: Duration,
    /// Free space of the database's volume, sampled in the background; only
    /// in a process that ingests.
    disk: Option<Arc<DiskGuard>>,
    /// `storage.min_free_bytes`; 0 disables the check.
    min_free_bytes: u64,
}

fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection, Error> {
    memstatus_off();
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;")?;
    register_functions(&conn)?;
    Ok(conn)
}

/// Turns off SQLite's allocation statistics (`SQLITE_CONFIG_MEMSTATUS`, on
/// in the bundled build), which nothing here reads: with them every
/// allocation SQLite makes, on every connection, takes one process-wide
/// mutex. Possible only before SQLite initializes, so done once, before the
/// process's first connection; later it is refused (`SQLITE_MISUSE`) and
/// changes nothing.
fn memstatus_off() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config takes this option's one int argument. It
        // must not run while another thread is inside SQLite: the daemon and
        // the CLI open every connection through `open_conn`, which waits for
        // this to return (as do the unit tests, which open a connection by
        // hand only after their store's).
        unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int);
        }
    });
}

/// `json_pointer_is(doc, pointer, text)`: whether the JSON document has, at that
/// JSON pointer, a scalar whose text is `text`. Lets `--match` filter in SQL so
/// LIMIT applies after filtering.
fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    scale::register(conn)?;
    conn.create_scalar_function("json_pointer_is", 3, FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC, |ctx| {
        // No document (a payload kind without one) holds no value. Nor does
        // one that does not parse: it cannot match, and reading that event
        // (a listing without `--match`, `events show`) reports it corrupt.
        let doc = match ctx.get_raw(0) {
            ValueRef::Text(b) | ValueRef::Blob(b) => b,
            _ => return Ok(false),
        };
        let pointer: String = ctx.get(1)?;
        let want: String = ctx.get(2)?;
        let Ok(v) = json_doc(doc) else { return Ok(false) };
        Ok(match v.pointer(&pointer) {
            Some(Value::String(s)) => *s == want,
            Some(Value::Number(n)) => n.to_string() == want,
            Some(Value::Bool(b)) => b.to_string() == want,
            Some(Value::Null) => want == "null",
            _ => false,
        })
    })
}

fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this hooktrail understands ({known}); upgrade hooktrail"
        ))
        .into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        scale::after_migration(&tx, i + 1, sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (or, for a daemon, creates) the database at `path` and starts
    /// the threads `role` needs: the writer always; the checkpointer and the
    /// integrity check for a daemon; the free-space sampler for a process
    /// that ingests. A command never creates a database.
    pub fn open(path: &Path, role: Role) -> Result<Self, StoreError> {
        Self::open_at(path, role).map_err(|e| neutral(e, path))
    }

    fn open_at(path: &Path, role: Role) -> Result<Self, Error> {
        let open_err = |message: String| StoreError::Open { path: path.display().to_string(), message };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create directory: {e}")))?;
        }
        refuse_orphan_wal(path)?;
        // A command never creates the database: an operator with a wrong
        // `storage.path` should learn that, not read an empty new file.
        if !role.is_daemon() && !path.exists() {
            return Err(open_err("there is no database file here (storage.path); start `hooktrail serve` first".into()).into());
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut writer = open_conn(path, flags).map_err(|e| damaged_at_open(path, e))?;
        // Takes effect only on a new, empty file (before WAL mode writes its
        // first page): freed pages can go back to the file system (README
        // "Disk space"). An older file keeps its mode until `hooktrail compact`.
        writer.execute_batch("PRAGMA auto_vacuum = INCREMENTAL").map_err(|e| damaged_at_open(path, e))?;
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| damaged_at_open(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(format!("cannot use WAL journal (got {mode})")).into());
        }
        migrate(&mut writer).map_err(|e| damaged_at_open(path, e))?;
        if role.is_daemon() {
            // Checkpoints are the checkpointer thread's job; see the module doc.
            // After a WAL restart the file is cut back to this size.
            writer.execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -{CACHE_KIB}; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
            ))?;
        }
        // The file the connection has open now sits at `path`: remember
        // which it is, to notice when the path stops naming it.
        let id = FileId::of(path).map_err(|e| open_err(format!("cannot stat the database file: {e}")))?;
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let shared = Arc::new(Shared {
            backlog: AtomicU64::new(0),
            work: Arc::new(Notify::new()),
            rejections: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            wal_dirty: (Mutex::new(false), Condvar::new()),
            wal_frames: AtomicU64::new(0),
            pass_done: AtomicBool::new(false),
            file: DbFile { path: path.to_path_buf(), abs, id },
            fault: OnceLock::new(),
            hooks: TestHooks::from_env(),
            role,
            lazy: Mutex::new(Vec::new()),
        });
        if role.is_daemon() {
            start_check(&writer, &shared);
        }
        // A damaged deliveries table must not keep `export` from reading what is readable.
        match writer.query_row(unfinished_count_sql!(), [], |r| r.get::<_, u64>(0)) {
            Ok(n) => shared.backlog.store(n, Ordering::Relaxed),
            Err(e) => {
                let e = shared.note(e.into());
                if !e.needs_operator() {
                    return Err(e.into());
                }
            }
        }
        let (tx, rx) = mpsc::sync_channel::<Box<dyn WriteOp>>(QUEUE_DEPTH);
        let responder = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answers>();
            rt.spawn(async move {
                while let Some(answers) = rx.recv().await {
                    let (recv, n) = (timeline::stamp(), answers.len());
                    for (op, r) in answers {
                        op.finish(r);
                    }
                    if let (Some(tl), Some(recv)) = (timeline::get(), recv) {
                        tl.line(format_args!("R {} {} {n}", tl.us(recv), tl.us(Instant::now())));
                    }
                }
            });
            tx
        });
        let spawn_err = |e: std::io::Error| open_err(e.to_string());
        let syncer = start_syncer(&writer, &shared, responder.clone())?;
        let mut threads = Vec::new();
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("hooktrail-writer".into())
                .spawn(move || writer_loop(writer, rx, sh, role, responder, syncer))
                .map_err(spawn_err)?,
        );
        if role.is_daemon() {
            let ck = open_conn(path, flags)?;
            let sh = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("hooktrail-checkpoint".into())
                    .spawn(move || checkpoint_loop(ck, sh))
                    .map_err(spawn_err)?,
            );
            let check = open_conn(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
            let sh = shared.clone();
            threads
                .push(std::thread::Builder::new().name("hooktrail-check".into()).spawn(move || check_loop(check, sh)).map_err(spawn_err)?);
            // Search indexing, shortly after the insert (see `scale`).
            let (index, sh, tx) =
                (open_conn(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?, shared.clone(), tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("hooktrail-index".into())
                    .spawn(move || scale::index_loop(tx, index, sh))
                    .map_err(spawn_err)?,
            );
        }
        // Samples once here, so the very first request is already guarded.
        let disk = role.ingests().then(|| Arc::new(DiskGuard::new(path)));
        if let Some(d) = &disk {
            let (d, sh) = (d.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new().name("hooktrail-disk".into()).spawn(move || d.sample_loop(&sh.closing)).map_err(spawn_err)?,
            );
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            readers: Arc::new(Mutex::new(Vec::new())),
            shared,
            threads: Mutex::new(threads),
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            disk,
            min_free_bytes: 0,
        })
    }

    /// Writes `events` synthetic form events straight into the database
    /// (the hidden `hooktrail bench-fill`, for `bench/scale.sh`; see `scale::fill`).
    pub fn bench_fill(path: &Path, events: u64, old_schema: bool) -> Result<(), StoreError> {
        scale::fill(path, events, old_schema).map_err(|e| neutral(e, path))
    }

    /// How long [`Store::insert_event`] waits for its commit before it fails
    /// with [`StoreError::CommitTimeout`] (`storage.commit_timeout`).
    pub fn with_commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self
    }

    /// Free bytes on the database's volume below which [`Store::admission`]
    /// refuses new events (`storage.min_free_bytes`); 0, the default, disables it.
    pub fn with_min_free_bytes(mut self, min_free: u64) -> Self {
        self.min_free_bytes = min_free;
        if let Some(disk) = &self.disk {
            disk.log_floor(min_free);
        }
        self
    }

    /// Runs `f` on the writer thread inside the current group transaction.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut WriterState) -> Result<T, Error> + Send + 'static,
    {
        self.write_op(f, true, |op| Box::new(op)).await
    }

    /// Queues a lazy write nobody waits for; only a refusal to queue it is
    /// returned (the write's own failure is not reported).
    fn enqueue_lazy<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnMut(&Connection, &mut WriterState) -> Result<(), Error> + Send + 'static,
    {
        if let Some(e) = self.shared.fault_error() {
            return Err(e);
        }
        let (reply, _) = oneshot::channel();
        self.submit(Box::new(Op { f, out: None, reply, urgent: false, queued: None }))
    }

    /// Hands `op` to the writer: an urgent one through the channel (which
    /// wakes it), a lazy one into [`Shared::lazy`], with a [`Nudge`] only
    /// when it is the first waiting there.
    fn submit(&self, op: Box<dyn WriteOp>) -> Result<(), StoreError> {
        let guard = self.tx.lock().expect("writer sender lock poisoned");
        let Some(tx) = guard.as_ref() else { return Err(StoreError::ShuttingDown) };
        if !op.urgent() {
            let mut lazy = self.shared.lazy.lock().expect("lazy write list lock poisoned");
            if lazy.len() >= QUEUE_DEPTH {
                return Err(StoreError::Overloaded);
            }
            let first = lazy.is_empty();
            lazy.push(op);
            drop(lazy);
            // A full channel means the writer has work and takes the list
            // with its next batch anyway.
            if first {
                if let Err(TrySendError::Disconnected(_)) = tx.try_send(Box::new(Nudge)) {
                    return Err(StoreError::ShuttingDown);
                }
            }
            return Ok(());
        }
        tx.try_send(op).map_err(|e| match e {
            TrySendError::Full(_) => StoreError::Overloaded,
            TrySendError::Disconnected(_) => StoreError::ShuttingDown,
        })
    }

    /// Runs `f` on the writer thread and waits for its answer; `wrap` boxes
    /// the operation (an attempt record goes in as [`Finishing`]).
    async fn write_op<T, F>(&self, f: F, urgent: bool, wrap: impl FnOnce(Op<T, F>) -> Box<dyn WriteOp>) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut WriterState) -> Result<T, Error> + Send + 'static,
    {
        if let Some(e) = self.shared.fault_error() {
            return Err(e);
        }
        let (reply, rx) = oneshot::channel();
        let queued = timeline::stamp();
        self.submit(wrap(Op { f, out: None, reply, urgent, queued }))?;
        let out = rx.await.unwrap_or(Err(StoreError::ShuttingDown));
        if let (Some(tl), Some(queued), true) = (timeline::get(), queued, urgent) {
            tl.resumed(queued);
        }
        out
    }

    /// Runs `f` with a read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    {
        let readers = self.readers.clone();
        let path = self.path.clone();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().expect("reader pool lock poisoned").pop();
            let conn = match conn {
                Some(c) => c,
                None => {
                    open_conn(&path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(|e| shared.note(e))?
                }
            };
            if !shared.hooks.read_delay.is_zero() {
                std::thread::sleep(shared.hooks.read_delay);
            }
            let out = f(&conn).map_err(|e| shared.note(e));
            let mut pool = readers.lock().expect("reader pool lock poisoned");
            if pool.len() < READ_POOL {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

fn is_unavailable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DiskFull
                | ReadOnly
                | SystemIoFailure
                | CannotOpen
                | DatabaseBusy
                | DatabaseLocked
                | OutOfMemory
                | PermissionDenied
                | DatabaseCorrupt
                | NotADatabase
        )
    )
}

/// Whether SQLite says the file is damaged (`SQLITE_CORRUPT`, `SQLITE_NOTADB`).
fn is_damage(e: &Error) -> bool {
    match e {
        Error::Sqlite(e) => is_damage_code(e),
        Error::Store(_) => false,
    }
}

fn is_damage_code(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// A damaged file found while opening: the daemon cannot start on it; say
/// where the way out is documented.
fn damaged_at_open(path: &Path, e: impl Into<Error>) -> Error {
    let e = e.into();
    if !is_damage(&e) {
        return e;
    }
    StoreError::Open {
        path: path.display().to_string(),
        message: format!("the file is damaged ({e}); see README \"Recovering a damaged database\""),
    }
    .into()
}

/// Refuses a database path whose file is missing while its write-ahead log
/// is there: the file was deleted or moved while in use, and opening would
/// create an empty database beside a log of someone else's pages, silently
/// starting from nothing.
fn refuse_orphan_wal(path: &Path) -> Result<(), StoreError> {
    let side = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let (wal, shm) = (side("-wal"), side("-shm"));
    if path.symlink_metadata().is_ok() || wal.symlink_metadata().is_err() {
        return Ok(());
    }
    Err(StoreError::Open {
        path: path.display().to_string(),
        message: format!(
            "the database file is missing but its write-ahead log `{}` is there: the database was deleted or moved while in use, \
             and starting now would create an empty database and lose every event. Put the database file back (move it back, \
             or restore it from a backup) and start again; to start with an empty database instead, move `{}` and `{}` aside first",
            wal.display(),
            wal.display(),
            shm.display()
        ),
    })
}

/// What an integrity check found.
#[derive(Debug)]
enum Integrity {
    Clean,
    Damaged(String),
    /// The budget ran out first; what was read was clean.
    Unfinished,
}

/// `PRAGMA quick_check` (every b-tree page's structure, every record's
/// format; not the match between tables and their indexes), stopped after
/// `budget` or when the store closes.
fn quick_check(conn: &Connection, budget: Duration, shared: &Arc<Shared>) -> Result<Integrity, rusqlite::Error> {
    let handle = conn.get_interrupt_handle();
    let (done, wait) = mpsc::channel::<()>();
    let sh = shared.clone();
    let timer = std::thread::Builder::new().name("hooktrail-check-timer".into()).spawn(move || {
        let until = Instant::now() + budget;
        while !sh.closing.load(Ordering::Relaxed) {
            let Some(left) = until.checked_duration_since(Instant::now()) else { break };
            match wait.recv_timeout(left.min(CHECK_TIMER_TICK)) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
        handle.interrupt();
    });
    let Ok(timer) = timer else { return Ok(Integrity::Unfinished) };
    let rows = (|| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("PRAGMA quick_check({CHECK_MAX_ERRORS})"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?.collect();
        rows
    })();
    drop(done);
    let _ = timer.join();
    match rows {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(Integrity::Clean),
        Ok(rows) => Ok(Integrity::Damaged(format!("quick_check: {}", rows.join("; ")))),
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => Ok(Integrity::Unfinished),
        Err(e) if is_damage_code(&e) => Ok(Integrity::Damaged(format!("quick_check: {e}"))),
        Err(e) => Err(e),
    }
}

/// The daemon's start-up check, before the first write is accepted.
fn start_check(conn: &Connection, shared: &Arc<Shared>) {
    let started = Instant::now();
    match quick_check(conn, START_CHECK_BUDGET, shared) {
        Ok(Integrity::Clean) => tracing::info!(took_ms = started.elapsed().as_millis() as u64, "start-up integrity check: clean"),
        Ok(Integrity::Unfinished) => tracing::warn!(
            budget_ms = START_CHECK_BUDGET.as_millis() as u64,
            "start-up integrity check stopped at its time budget (large database); the background check reads all of it within the hour"
        ),
        Ok(Integrity::Damaged(detail)) => shared.set_fault(Fault::Damaged(detail)),
        Err(e) => tracing::warn!(error = %e, "start-up integrity check could not run"),
    }
}

/// The daemon's periodic integrity check, on its own read connection.
fn check_loop(conn: Connection, shared: Arc<Shared>) {
    let mut last = Instant::now();
    while !shared.closing.load(Ordering::Relaxed) {
        std::thread::sleep(CHECK_LOOP_TICK);
        if last.elapsed() < CHECK_EVERY || shared.fault.get().is_some() {
            continue;
        }
        last = Instant::now();
        match quick_check(&conn, CHECK_BUDGET, &shared) {
            Ok(Integrity::Clean) => tracing::info!(took_s = last.elapsed().as_secs(), "integrity check: clean"),
            // Stopped because the store closes: nothing to say.
            Ok(Integrity::Unfinished) if shared.closing.load(Ordering::Relaxed) => {}
            Ok(Integrity::Unfinished) => {
                tracing::warn!(budget_s = CHECK_BUDGET.as_secs(), "integrity check stopped at its time budget; what it read was clean")
            }
            Ok(Integrity::Damaged(detail)) => shared.set_fault(Fault::Damaged(detail)),
            Err(e) => tracing::warn!(error = %e, "integrity check could not run"),
        }
    }
}

/// Sync loops (threads) sharing the syncer's queue; why two, in `sqlite_sync.rs`.
const SYNC_LOOPS: usize = 2;

/// The writer's end of the syncer thread (see `sqlite_sync.rs`): committed
/// batches wait in `queue` until a sync that began after their COMMIT
/// completed; the syncer thread then answers them.
struct Syncer {
    queue: Arc<SyncQueue<Answers>>,
    trace: Arc<SyncTrace>,
    threads: Vec<JoinHandle<()>>,
    /// Commits handed over so far (the test trace's sequence numbers).
    seq: u64,
}

impl Syncer {
    /// Answers `answers` once a sync covers their commit; now when there is
    /// no syncer, or when no urgent operation succeeded. Attempt records
    /// alone (lazy, see [`WriteOp::urgent`]) are answered at commit: nobody
    /// waits on them, the next sync (or the checkpointer's next pass) covers
    /// them, and one lost to a power cut meanwhile only makes its attempt
    /// run again (at-least-once), as [`LAZY_WAIT`] already accepts. Claims
    /// stay urgent, so a claim is answered only after a sync that also
    /// covers every attempt record committed before it: work that follows a
    /// finished attempt never starts on a record a power cut could take
    /// back. Skipping the hand-over saves a thread wake-up per attempt record.
    fn hand_over(syncer: &mut Option<Syncer>, answers: Answers, responder: &Option<tokio::sync::mpsc::UnboundedSender<Answers>>) {
        match syncer {
            Some(s) if answers.iter().any(|(op, r)| r.is_ok() && op.urgent()) => {
                s.seq += 1;
                s.trace.note("commit", s.seq);
                s.queue.push(s.seq, answers);
            }
            _ => answer(answers, responder),
        }
    }

    /// Lets the syncer cover what waits, answer it and stop.
    fn finish(self) {
        self.queue.close();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Switches the writer to `synchronous=NORMAL` and starts the syncer thread
/// that makes its commits durable before they are answered. Should the
/// `-wal` file not open (it always exists once WAL mode is on), the writer
/// keeps `synchronous=FULL` and answers itself, as durable and slower.
fn start_syncer(
    writer: &Connection,
    shared: &Arc<Shared>,
    responder: Option<tokio::sync::mpsc::UnboundedSender<Answers>>,
) -> Result<Option<Syncer>, Error> {
    let mut wals = Vec::with_capacity(SYNC_LOOPS);
    for _ in 0..SYNC_LOOPS {
        match WalFile::open(&shared.file.path) {
            Ok(w) => wals.push(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the write-ahead log to sync it; committing with synchronous=FULL instead");
                return Ok(None);
            }
        }
    }
    let queue = Arc::new(SyncQueue::<Answers>::default());
    let trace = Arc::new(SyncTrace::from_env());
    let mut threads = Vec::with_capacity(SYNC_LOOPS);
    for wal in wals {
        let (q, tr, sh, responder) = (queue.clone(), trace.clone(), shared.clone(), responder.clone());
        let spawned = std::thread::Builder::new().name("hooktrail-sync".into()).spawn(move || {
            sync_loop(&q, &wal, sh.hooks.sync_delay, &tr, |synced, commits| {
                let verdict = after_sync(&sh, &wal, synced);
                for (seq, answers) in commits {
                    let answers = match &verdict {
                        Ok(()) => answers,
                        Err(why) => answers
                            .into_iter()
                            .map(|(op, r)| {
                                (op, r.and_then(|()| Err(sh.fault_error().unwrap_or_else(|| StoreError::Unavailable(why.clone())))))
                            })
                            .collect(),
                    };
                    tr.note("ack", seq);
                    answer(answers, &responder);
                }
            })
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The loops already started end once the queue is closed.
                queue.close();
                return Err(StoreError::Open { path: shared.file.path.display().to_string(), message: e.to_string() }.into());
            }
        }
    }
    // Only now: until the syncer runs, commits must sync themselves.
    writer.execute_batch("PRAGMA synchronous = NORMAL")?;
    Ok(Some(Syncer { queue, trace, threads, seq: 0 }))
}

/// Whether the commits a sync covered may be answered 200: the sync
/// succeeded, and the configured path still names both the database file
/// and the log that was synced (README "Storage faults"). A failed sync is
/// a sticky fault, never retried (see `sqlite_sync.rs`).
fn after_sync(shared: &Shared, wal: &WalFile, synced: std::io::Result<()>) -> Result<(), String> {
    if let Err(e) = synced {
        shared.set_fault(Fault::Damaged(format!(
            "fdatasync of the write-ahead log `{}` failed ({e}): what was committed since the last sync may not be on disk; restart hooktrail",
            wal.path().display()
        )));
        return Err(e.to_string());
    }
    // Another loop's sync may have failed meanwhile: nothing more is answered 200.
    if let Some(e) = shared.fault_error() {
        return Err(e.to_string());
    }
    shared.verify_file()?;
    match wal.in_place() {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::error!(wal = %wal.path().display(), "the write-ahead log was deleted or replaced while open");
            shared.set_fault(Fault::Lost);
            Err(shared.fault_error().expect("just set").to_string())
        }
        Err(e) => Err(format!("cannot check that the write-ahead log `{}` is still in place: {e}", wal.path().display())),
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: Receiver<Box<dyn WriteOp>>,
    shared: Arc<Shared>,
    role: Role,
    responder: Option<tokio::sync::mpsc::UnboundedSender<Answers>>,
    mut syncer: Option<Syncer>,
) {
    let mut st = WriterState {
        ids: ulid::Generator::new(),
        new_work: false,
        backlog_delta: 0,
        tallies: Default::default(),
        finishing: HashMap::new(),
    };
    let mut last_maintenance = Instant::now();
    let mut disconnected = false;
    while !disconnected {
        let mut batch: Vec<Box<dyn WriteOp>> = Vec::new();
        let recv_result = rx.recv_timeout(WRITER_IDLE_CHECK);
        let recv = timeline::stamp();
        match recv_result {
            Ok(op) => batch.push(op),
            Err(RecvTimeoutError::Timeout) => {
                // Idle: notice a lost file now rather than at the next write.
                if shared.fault.get().is_none() {
                    let _ = shared.verify_file();
                }
            }
            Err(RecvTimeoutError::Disconnected) => disconnected = true,
        }
        take_waiting(&rx, &mut batch);
        // Only attempt records waiting: give more of them a moment to share
        // the commit (and its fsync). Anything urgent ends the wait.
        if !batch.is_empty() && !batch.iter().any(|op| op.urgent()) {
            let until = Instant::now() + LAZY_WAIT;
            while batch.len() < LAZY_BATCH {
                let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
                match rx.recv_timeout(left) {
                    Ok(op) => {
                        let urgent = op.urgent();
                        batch.push(op);
                        if urgent {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            take_waiting(&rx, &mut batch);
        }
        take_lazy(&shared, &mut batch);
        let counts = std::mem::take(&mut *shared.rejections.lock().expect("rejection counter lock poisoned"));
        if !batch.is_empty() || !counts.is_empty() {
            let (urgent, until) = (batch.iter().any(|op| op.urgent()), Instant::now() + HOLD_MAX);
            let (n0, begin) = (batch.len(), timeline::stamp());
            let mut holds = (0u32, Duration::ZERO);
            let answers = {
                let mut more =
                    |len: usize| gather(&rx, &shared, syncer.as_ref().filter(|_| urgent), len, until, &mut disconnected, &mut holds);
                run_batch(&mut conn, &mut st, batch, &counts, &shared, &mut more)
            };
            let probe = timeline::get().zip(recv).zip(begin).map(|((tl, recv), begin)| {
                let queued: Vec<u64> = answers.iter().filter_map(|(op, _)| op.queued()).map(|t| tl.us(t)).collect();
                let first = queued.iter().min().copied().unwrap_or(0);
                let mean = queued.iter().sum::<u64>() / (queued.len().max(1) as u64);
                let (n, end) = (answers.len(), tl.us(Instant::now()));
                (tl, format!("{first} {mean} {} {} {end} {n0} {n} {} {}", tl.us(recv), tl.us(begin), holds.0, holds.1.as_micros()))
            });
            let seq = syncer.as_ref().map_or(0, |s| s.seq);
            Syncer::hand_over(&mut syncer, answers, &responder);
            if let Some((tl, line)) = probe {
                // The commit's sequence number if it waits for a sync, else 0.
                let handed = syncer.as_ref().map_or(0, |s| if s.seq > seq { s.seq } else { 0 });
                tl.line(format_args!("B {handed} {line}"));
            }
        }
        if shared.fault.get().is_some() {
            // Nothing more is written to a lost or damaged file.
            continue;
        }
        // Under sustained load the checkpointer copies frames while new ones
        // keep arriving, so the WAL could never restart and would grow without
        // bound. Right after each checkpointer pass, the writer finishes the
        // checkpoint itself between two batches: only the frames committed
        // during that pass remain to copy, so the stall is short, and the next
        // commit restarts the WAL from its beginning.
        if role.is_daemon()
            && shared.pass_done.swap(false, Ordering::Relaxed)
            && shared.wal_frames.load(Ordering::Relaxed) > WAL_FINISH_FRAMES
        {
            let t = timeline::stamp();
            let pass = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
            if let (Some(tl), Some(t), Ok((log, done))) = (timeline::get(), t, &pass) {
                tl.line(format_args!("F {} {} {log} {done}", tl.us(t), tl.us(Instant::now())));
            }
            match pass {
                Ok((log, done)) if log == done => shared.wal_frames.store(0, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "writer checkpoint failed"),
            }
        }
        if role.is_daemon() && last_maintenance.elapsed() >= MAINTENANCE_EVERY {
            last_maintenance = Instant::now();
            maintenance(&conn, &shared);
        }
    }
    // Every commit made is answered before the connection closes.
    if let Some(s) = syncer {
        s.finish();
    }
    if let Some(tl) = timeline::get() {
        tl.finish();
    }
    if shared.lost() {
        // A checkpoint now would fold the log into the lost file and empty
        // the `-wal` at the path: the log a moved file needs when it is put
        // back, and the sign that makes a restart refuse to start empty.
        // (Closing the connection leaves it: SQLite does not checkpoint on
        // close once its file has moved.)
        return;
    }
    // Leave the WAL folded into the main file on a clean stop.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// Longest the writer holds a transaction open for a sync loop to come free
/// before it commits anyway (a backstop: the loop's wake-up ends the wait),
/// so that a slow disk never keeps the write lock from other processes (a
/// CLI command) for longer than this.
const HOLD_MAX: Duration = Duration::from_millis(50);

/// More operations for the open transaction of `len` operations, while
/// every sync loop is busy ([`SyncQueue::hold`]); none when it is time to
/// commit: a loop is free (or there is no syncer, or the batch holds no
/// urgent operation, which is answered at commit), the batch is full, or
/// the channel closed, or the transaction has been open until `until`
/// ([`HOLD_MAX`]). Holding costs an answer little: a commit made now
/// would wait in the sync queue until a loop comes free anyway; holding
/// adds only the COMMIT's own time before that loop's sync begins. What is
/// acknowledged still waits for a sync that began after its COMMIT
/// (`sqlite_sync.rs`).
fn gather(
    rx: &Receiver<Box<dyn WriteOp>>,
    shared: &Shared,
    syncer: Option<&Syncer>,
    len: usize,
    until: Instant,
    disconnected: &mut bool,
    holds: &mut (u32, Duration),
) -> Vec<Box<dyn WriteOp>> {
    let mut more: Vec<Box<dyn WriteOp>> = Vec::new();
    let Some(syncer) = syncer else { return more };
    let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { return more };
    if *disconnected || len >= MAX_BATCH || !syncer.queue.hold() {
        return more;
    }
    // Waiting here rather than in the channel, the writer is not woken by
    // each arriving operation, only by the free loop; it then takes every
    // operation that arrived meanwhile.
    let held = Instant::now();
    syncer.queue.wait_free(left);
    holds.0 += 1;
    holds.1 += held.elapsed();
    while len + more.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => more.push(op),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => {
                *disconnected = true;
                break;
            }
        }
    }
    if more.iter().any(|op| op.is_nudge()) {
        // Lazy writes are waiting (see `Shared::lazy`).
        more.retain(|op| !op.is_nudge());
        more.append(&mut shared.lazy.lock().expect("lazy write list lock poisoned"));
    }
    more
}

/// Adds the operations already waiting to `batch`, up to [`MAX_BATCH`].
fn take_waiting(rx: &Receiver<Box<dyn WriteOp>>, batch: &mut Vec<Box<dyn WriteOp>>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Puts the lazy writes waiting in [`Shared::lazy`] at the head of `batch`
/// (they were mostly queued before what woke the writer) and drops the
/// nudges that only woke it.
fn take_lazy(shared: &Shared, batch: &mut Vec<Box<dyn WriteOp>>) {
    let mut lazy = std::mem::take(&mut *shared.lazy.lock().expect("lazy write list lock poisoned"));
    batch.retain(|op| !op.is_nudge());
    if !lazy.is_empty() {
        lazy.append(batch);
        *batch = lazy;
    }
}

/// Operations with their outcome, to be answered once the batch is over.
type Answers = Vec<(Box<dyn WriteOp>, Result<(), StoreError>)>;

/// Answers a finished batch. Waking hundreds of tasks one by one from this
/// (non-runtime) thread costs a cross-thread wake-up each; handing the whole
/// batch to one task on the runtime costs one, and that task's wake-ups stay
/// on the runtime's own queues. Without a runtime, answers here.
fn answer(answers: Answers, responder: &Option<tokio::sync::mpsc::UnboundedSender<Answers>>) {
    let answers = match responder {
        Some(tx) => match tx.send(answers) {
            Ok(()) => return,
            Err(tokio::sync::mpsc::error::SendError(back)) => back,
        },
        None => answers,
    };
    for (op, r) in answers {
        op.finish(r);
    }
}

/// Answers every operation of a batch with the same refusal.
fn refuse_all(batch: Vec<Box<dyn WriteOp>>, error: impl Fn() -> StoreError) -> Answers {
    batch.into_iter().map(|op| (op, Err(error()))).collect()
}

/// COMMIT, after the test hook's delay (see [`TestHooks`]).
fn commit(conn: &Connection, shared: &Shared) -> rusqlite::Result<()> {
    if !shared.hooks.commit_delay.is_zero() {
        std::thread::sleep(shared.hooks.commit_delay);
    }
    conn.execute_batch("COMMIT")
}

/// Runs `batch` in one transaction, with whatever `more` adds while it is
/// open (see [`gather`]), and commits it; each operation's outcome, to be
/// answered once a sync covers the commit.
fn run_batch(
    conn: &mut Connection,
    st: &mut WriterState,
    mut batch: Vec<Box<dyn WriteOp>>,
    counts: &Counts,
    shared: &Shared,
    more: &mut dyn FnMut(usize) -> Vec<Box<dyn WriteOp>>,
) -> Answers {
    st.new_work = false;
    st.backlog_delta = 0;
    if shared.fault.get().is_some() {
        // Queued before the fault was found; refused like everything after it.
        return refuse_all(batch, || shared.fault_error().expect("checked above"));
    }
    st.tallies.clear();
    st.finishing.clear();
    let whole = (|| -> Result<(), Error> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut applied = 0;
        loop {
            note_finishes(st, &batch[applied..]);
            for op in batch[applied..].iter_mut() {
                if let Err(e) = op.apply(conn, st) {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
            applied = batch.len();
            let extra = more(applied);
            if extra.is_empty() {
                break;
            }
            batch.extend(extra);
        }
        scale::flush(conn, st)?;
        add_counts(conn, counts)?;
        if let Err(e) = commit(conn, shared) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        Ok(())
    })();
    match whole {
        Ok(()) => {
            // Acknowledge only what is durable *at the configured path*.
            if let Err(why) = shared.verify_file() {
                return match shared.fault_error() {
                    Some(_) => refuse_all(batch, || shared.fault_error().expect("checked above")),
                    None => refuse_all(batch, || StoreError::Unavailable(why.clone())),
                };
            }
            after_commit(st, shared);
            batch.into_iter().map(|op| (op, Ok(()))).collect()
        }
        Err(e) if is_damage(&e) => {
            shared.set_fault(Fault::Damaged(e.to_string()));
            refuse_all(batch, || shared.fault_error().expect("just set"))
        }
        Err(e) if is_store_down(&e) => {
            tracing::error!(error = %e, ops = batch.len(), "commit failed; answering 503 to everyone in the batch");
            // The counts were not stored; keep them for the next commit.
            let mut pending = shared.rejections.lock().expect("rejection counter lock poisoned");
            for (k, n) in counts {
                *pending.entry(k.clone()).or_default() += n;
            }
            batch.into_iter().map(|op| (op, Err(StoreError::Unavailable(e.to_string())))).collect()
        }
        Err(_) => {
            // One operation failed on its own (e.g. a constraint); isolate it so
            // its neighbours still commit.
            st.new_work = false;
            st.backlog_delta = 0;
            // One per transaction now: every start mark is written.
            st.finishing.clear();
            let mut counts_done = false;
            let mut answers = Vec::with_capacity(batch.len());
            for mut op in batch {
                if let Some(e) = shared.fault_error() {
                    answers.push((op, Err(e)));
                    continue;
                }
                st.tallies.clear();
                let r = (|| -> Result<(), Error> {
                    conn.execute_batch("BEGIN IMMEDIATE")?;
                    if let Err(e) = op.apply(conn, st) {
                        let _ = conn.execute_batch("ROLLBACK");
                        return Err(e);
                    }
                    scale::flush(conn, st)?;
                    if !counts_done {
                        add_counts(conn, counts)?;
                    }
                    commit(conn, shared).inspect_err(|_| {
                        let _ = conn.execute_batch("ROLLBACK");
                    })?;
                    shared.verify_file().map_err(|why| StoreError::Unavailable(why).into())
                })()
                .map_err(|e| shared.note(e));
                if r.is_ok() {
                    counts_done = true;
                }
                answers.push((op, r));
            }
            if shared.lost() {
                // The file went while this batch committed: nothing in it is acknowledged.
                return answers.into_iter().map(|(op, _)| (op, Err(shared.fault_error().expect("checked above")))).collect();
            }
            after_commit(st, shared);
            answers
        }
    }
}

/// Whether an error says the database as a whole cannot commit now (not
/// that one operation was wrong): every operation of the batch gets it.
fn is_store_down(e: &Error) -> bool {
    match e {
        Error::Sqlite(e) => is_unavailable(e),
        Error::Store(e) => matches!(e, StoreError::Unavailable(_)),
    }
}

fn after_commit(st: &mut WriterState, shared: &Shared) {
    if st.backlog_delta != 0 {
        let cur = shared.backlog.load(Ordering::Relaxed) as i64;
        shared.backlog.store((cur + st.backlog_delta).max(0) as u64, Ordering::Relaxed);
    }
    if st.new_work {
        shared.work.notify_waiters();
        shared.work.notify_one();
    }
    let (lock, cv) = &shared.wal_dirty;
    *lock.lock().expect("checkpoint flag lock poisoned") = true;
    cv.notify_one();
}

fn add_counts(conn: &Connection, counts: &Counts) -> Result<(), Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let hour = Utc::now().timestamp() / SECS_PER_HOUR;
    let mut stmt = conn.prepare_cached(
        "INSERT INTO counters(source, kind, hour, n) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(source, kind, hour) DO UPDATE SET n = n + excluded.n",
    )?;
    for ((source, reason), n) in counts {
        stmt.execute(params![source, reason.as_str(), hour, *n as i64])?;
    }
    Ok(())
}

/// Housekeeping done by the daemon's writer between batches.
fn maintenance(conn: &Connection, shared: &Shared) {
    let now = now_us();
    if let Err(e) = conn.execute(
        "DELETE FROM dedup WHERE (source, key) IN (SELECT source, key FROM dedup WHERE expires_at < ?1 LIMIT ?2)",
        params![now, DEDUP_CLEANUP_BATCH],
    ) {
        tracing::warn!(error = %e, "dedup cleanup failed");
    }
    // Other processes (a separate --role ingest/process) change the backlog too.
    if let Ok(n) = conn.query_row::<u64, _, _>(unfinished_count_sql!(), [], |r| r.get(0)) {
        shared.backlog.store(n, Ordering::Relaxed);
    }
    if scale::give_back_space(conn) {
        // The file is cut back when the checkpointer copies the freed tail.
        let (lock, cv) = &shared.wal_dirty;
        *lock.lock().expect("checkpoint flag lock poisoned") = true;
        cv.notify_one();
    }
}

fn checkpoint_loop(conn: Connection, shared: Arc<Shared>) {
    let (lock, cv) = &shared.wal_dirty;
    loop {
        {
            let mut dirty = lock.lock().expect("checkpoint flag lock poisoned");
            while !*dirty && !shared.closing.load(Ordering::Relaxed) {
                dirty = cv.wait_timeout(dirty, CHECKPOINT_IDLE_CHECK).expect("checkpoint flag lock poisoned").0;
            }
            *dirty = false;
        }
        if shared.closing.load(Ordering::Relaxed) {
            return;
        }
        if shared.fault.get().is_some() {
            // A lost or damaged file is left exactly as it is.
            continue;
        }
        // PASSIVE never blocks the writer; it copies what it can. Once a pass
        // catches up, the writer's next commit restarts the WAL from the start,
        // so the file stays small without ever making a request wait.
        let t = timeline::stamp();
        let pass = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
        if let (Some(tl), Some(t), Ok((log, done))) = (timeline::get(), t, &pass) {
            tl.line(format_args!("C {} {} {log} {done}", tl.us(t), tl.us(Instant::now())));
        }
        match pass {
            Ok((log, _)) => {
                shared.wal_frames.store(log.max(0) as u64, Ordering::Relaxed);
                shared.pass_done.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
        }
        std::thread::sleep(CHECKPOINT_PAUSE);
    }
}

/// The event's status from its deliveries' ([`rules::event_status`]).
fn event_status_of(conn: &Connection, seq: i64) -> Result<EventStatus, Error> {
    // Not DISTINCT: that builds a temporary b-tree per call (on every
    // finished attempt), and an event has only a few deliveries.
    let mut stmt = conn.prepare_cached("SELECT status FROM deliveries WHERE event_seq = ?1")?;
    let seen = stmt.query_map([seq], |r| r.get::<_, DeliveryStatus>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(rules::event_status(&seen))
}

fn refresh_event_status(conn: &Connection, st: &mut WriterState, seq: i64) -> Result<(), Error> {
    let status = event_status_of(conn, seq)?;
    scale::set_event_status(conn, st, seq, status)
}

/// A delivery of event `seq` moved (`from`, `to`): counts it, and sets and
/// counts the event's status as its deliveries now give it, reading the
/// event row once (release, skip and an attempt record).
fn delivery_moved_refreshing_event(
    conn: &Connection,
    st: &mut WriterState,
    seq: i64,
    handler: &str,
    moved: (DeliveryStatus, DeliveryStatus),
) -> Result<(), Error> {
    let status = event_status_of(conn, seq)?;
    scale::delivery_and_event_moved(conn, st, seq, handler, moved, status)
}

fn insert_event(conn: &Connection, st: &mut WriterState, ev: &NewEvent) -> Result<Inserted, Error> {
    let now = now_us();
    if let Some((key, _)) = &ev.dedup {
        let found: Option<EventId> = conn
            .prepare_cached("SELECT event_id FROM dedup WHERE source = ?1 AND key = ?2 AND expires_at > ?3")?
            .query_row(params![ev.source, key, now], |r| r.get(0))
            .optional()?;
        if let Some(id) = found {
            add_counts(conn, &HashMap::from([((ev.source.clone(), RejectReason::Duplicate), 1)]))?;
            return Ok(Inserted { id, duplicate: true });
        }
    }
    let id = st.next_id();
    let status = rules::new_event_status(ev.handlers.len());
    let (kind, payload) = match &ev.payload {
        Payload::Null => (PAYLOAD_NULL, None),
        Payload::Body => (PAYLOAD_IS_BODY, None),
        Payload::Json(s) => (PAYLOAD_JSON, Some(s.as_str())),
    };
    conn.prepare_cached(
        "INSERT INTO events(id, source, status, received_at, method, content_type, query, headers, remote_addr, body, payload_kind, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        id.to_string(),
        ev.source,
        status.as_str(),
        ev.received_at.timestamp_micros(),
        ev.method,
        ev.content_type,
        ev.query,
        ev.headers,
        ev.remote_addr,
        &ev.body[..],
        kind,
        payload
    ])?;
    let seq = conn.last_insert_rowid();
    let key = scale::EventKey::new(&ev.source, ev.received_at);
    scale::count_event(st, &key, None, Some(status));
    if !ev.handlers.is_empty() {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO deliveries(event_seq, handler, status, next_at, queued_at, updated_at, order_key) VALUES (?1, ?2, 'pending', ?3, ?3, ?3, ?4)",
        )?;
        for (i, h) in ev.handlers.iter().enumerate() {
            let order_key = ev.order_keys.get(i).and_then(Option::as_deref);
            stmt.execute(params![seq, h, now, order_key])?;
            if let Some(order_key) = order_key {
                new_keyed_delivery(conn, h, order_key, conn.last_insert_rowid(), seq, now)?;
            }
            scale::count_delivery(st, &key, h, None, Some(DeliveryStatus::Pending));
        }
        st.new_work = true;
        st.backlog_delta += ev.handlers.len() as i64;
    }
    if let Some((key, window)) = &ev.dedup {
        conn.prepare_cached("INSERT OR REPLACE INTO dedup(source, key, event_id, expires_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![ev.source, key, id.to_string(), now.saturating_add(micros(*window))])?;
    }
    Ok(Inserted { id, duplicate: false })
}

fn body_fields(body: Vec<u8>) -> (Option<String>, Option<String>, usize) {
    let len = body.len();
    match String::from_utf8(body) {
        Ok(s) => (Some(s), None, len),
        Err(e) => (None, Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())), len),
    }
}

/// The normalized view as stored (see the `PAYLOAD_*` kinds). A view that
/// does not read back is corrupt data, never shown as `null`: ingest stored
/// only JSON it had validated.
fn payload_value(kind: i64, body: &[u8], payload: Option<&str>) -> Result<Value, String> {
    match (kind, payload) {
        (PAYLOAD_NULL, _) => Ok(Value::Null),
        (PAYLOAD_IS_BODY, _) => json_doc(body).map_err(|e| format!("the body, stored as its own JSON payload, is not JSON: {e}")),
        (PAYLOAD_JSON, Some(p)) => json_doc(p.as_bytes()).map_err(|e| format!("the normalized payload is not JSON: {e}")),
        (PAYLOAD_JSON, None) => Err("the normalized payload is missing".into()),
        (other, _) => Err(format!("unknown payload kind {other}")),
    }
}

/// Whether a normalized payload's stored text (`PAYLOAD_JSON`) is what
/// printing its parsed `v` gives again, so the handler may be handed that
/// text ([`Claimed::payload_text`]). Ingest and import store the printed
/// value (`Value::to_string`), and printing what serde_json parsed from its
/// own print gives the same bytes: keys in the same (sorted) order, strings
/// escaped alike, integers exact; but a float may parse to a neighbouring
/// value, so a payload holding one is printed again, as before.
fn prints_as_stored(v: &Value) -> bool {
    match v {
        Value::Number(n) => !n.is_f64(),
        Value::Array(a) => a.iter().all(prints_as_stored),
        Value::Object(o) => o.values().all(prints_as_stored),
        Value::Null | Value::Bool(_) | Value::String(_) => true,
    }
}

/// Stored headers: the JSON object ingest wrote. Anything else is corrupt.
fn headers_value(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("the stored headers are not JSON: {e}"))
}

/// A duration as stored: whole microseconds, saturating (a lease or dedup
/// window of 292 000 years is as good as forever).
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

const EVENT_COLS: &str = "e.seq, e.id, e.source, e.status, e.received_at, e.method, e.content_type, e.query, e.remote_addr, e.payload_kind, e.payload, e.body, e.headers";

/// Builds an [`EventRecord`] from a row of [`EVENT_COLS`].
fn event_from_row(r: &rusqlite::Row<'_>, detail: Detail) -> rusqlite::Result<(i64, EventRecord)> {
    let seq: i64 = r.get(0)?;
    let id: EventId = r.get(1)?;
    let kind: i64 = r.get(9)?;
    let payload: Option<String> = r.get(10)?;
    let body: Vec<u8> = r.get(11)?;
    let payload = payload_value(kind, &body, payload.as_deref()).map_err(|e| unreadable(10, format!("event {id}: {e}")))?;
    let full = detail == Detail::Full;
    let headers = if full {
        let text = r.get_ref(12)?.as_str()?;
        Some(headers_value(text).map_err(|e| unreadable(12, format!("event {id}: {e}")))?)
    } else {
        None
    };
    let (body_s, body_b64, body_len) = body_fields(body);
    Ok((
        seq,
        EventRecord {
            id,
            source: r.get(2)?,
            status: r.get(3)?,
            received_at: r.get::<_, Micros>(4)?.0,
            method: r.get(5)?,
            content_type: r.get(6)?,
            query: r.get(7)?,
            headers,
            remote_addr: r.get(8)?,
            body: if full { body_s } else { None },
            body_base64: if full { body_b64 } else { None },
            body_bytes: body_len,
            payload,
            deliveries: None,
        },
    ))
}

fn load_deliveries(conn: &Connection, seq: i64) -> Result<Vec<DeliveryRecord>, Error> {
    let mut stmt = conn
        .prepare_cached("SELECT id, handler, status, attempts, next_at, order_key FROM deliveries WHERE event_seq = ?1 ORDER BY handler")?;
    let rows: Vec<(i64, String, DeliveryStatus, u32, Micros, Option<String>)> =
        stmt.query_map([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?.collect::<Result<_, _>>()?;
    let mut att = conn.prepare_cached(
        "SELECT number, started_at, duration_ms, outcome, exit_code, http_status, error, output FROM attempts WHERE delivery_id = ?1 ORDER BY number",
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, handler, status, attempts, next_at, key) in rows {
        let blocked_by = match key {
            Some(key) if rules::waits_for_its_time(status) => blocked_by(conn, &handler, &key, id)?,
            _ => None,
        };
        let list = att
            .query_map([id], |r| {
                Ok(AttemptRecord {
                    number: r.get(0)?,
                    started_at: r.get::<_, Micros>(1)?.0,
                    duration_ms: r.get(2)?,
                    outcome: r.get(3)?,
                    exit_code: r.get(4)?,
                    http_status: r.get(5)?,
                    error: r.get(6)?,
                    output: r.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        out.push(DeliveryRecord {
            handler,
            status,
            attempt_count: attempts,
            next_attempt_at: rules::waits_for_its_time(status).then_some(next_at.0),
            blocked_by,
            attempts: list,
        });
    }
    Ok(out)
}

/// One page of a listing, the fast way: a scan in `seq` order.
fn list_page(conn: &Connection, filter: &EventFilter, detail: Detail) -> Result<Vec<EventRecord>, Error> {
    let order = if filter.ascending { "ASC" } else { "DESC" };
    let mut out = Vec::new();
    for scale::Part { from, where_sql, args, by } in scale::listing_parts(conn, filter)? {
        let left = filter.limit.map(|l| l.saturating_sub(out.len()));
        if left == Some(0) {
            break;
        }
        let limit = left.map_or(-1, |l| l as i64);
        let sql = format!("SELECT {EVENT_COLS} FROM {from} {where_sql} ORDER BY {by} {order} LIMIT {limit}");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| event_from_row(r, detail))?.collect::<Result<Vec<_>, _>>()?;
        for (seq, mut ev) in rows {
            if detail == Detail::Full {
                ev.deliveries = Some(load_deliveries(conn, seq)?);
            }
            out.push(ev);
        }
    }
    Ok(out)
}

/// One page of a listing over a damaged events table: the positions (`seq`)
/// come from the `events_source` index, then each row is read on its own, so
/// a damaged table page costs only the events on it. Returns the readable
/// events and how many were skipped. Slow (a few index seeks per event), and
/// used only once a scan has met damage; a damaged index fails it too.
fn list_readable(conn: &Connection, filter: &EventFilter, detail: Detail) -> Result<(Vec<EventRecord>, u64), Error> {
    let asc = filter.ascending;
    let seq_of = |id: EventId| -> rusqlite::Result<Option<i64>> {
        // Answered from the id index alone (it holds the rowid).
        conn.prepare_cached("SELECT seq FROM events WHERE id = ?1")?.query_row([id.to_string()], |r| r.get(0)).optional()
    };
    let start = match (asc, filter.after, filter.before) {
        (true, Some(id), _) => seq_of(id)?.unwrap_or(0),
        (true, None, _) => 0,
        (false, _, Some(id)) => seq_of(id)?.unwrap_or(i64::MAX),
        (false, _, None) => i64::MAX,
    };
    let next_sql = if asc {
        "SELECT seq FROM events INDEXED BY events_source WHERE source = ?1 AND seq > ?2 ORDER BY seq LIMIT 1"
    } else {
        "SELECT seq FROM events INDEXED BY events_source WHERE source = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT 1"
    };
    let next_of = |source: &str, after: i64| -> rusqlite::Result<Option<i64>> {
        conn.prepare_cached(next_sql)?.query_row(params![source, after], |r| r.get(0)).optional()
    };
    let sources = match &filter.source {
        Some(s) => vec![s.clone()],
        None => {
            let mut all = Vec::new();
            let mut stmt = conn.prepare("SELECT source FROM events INDEXED BY events_source WHERE source > ?1 ORDER BY source LIMIT 1")?;
            while let Some(s) = stmt.query_row([all.last().cloned().unwrap_or_default()], |r| r.get::<_, String>(0)).optional()? {
                all.push(s);
            }
            all
        }
    };
    // The next position of each source, merged in list order.
    let mut heads = Vec::with_capacity(sources.len());
    for s in sources {
        let next = next_of(&s, start)?;
        heads.push((s, next));
    }
    let (where_sql, mut args) = filter_sql(filter);
    args.push(rusqlite::types::Value::Integer(0));
    let row_sql = format!("SELECT {EVENT_COLS} FROM events e {where_sql} AND e.seq = ?{}", args.len());
    let limit = filter.limit.unwrap_or(usize::MAX);
    let (mut out, mut unreadable) = (Vec::new(), 0u64);
    while out.len() < limit {
        let pick = heads.iter().enumerate().filter_map(|(i, (_, n))| n.map(|n| (i, n)));
        let Some((i, seq)) = (if asc { pick.min_by_key(|&(_, n)| n) } else { pick.max_by_key(|&(_, n)| n) }) else { break };
        heads[i].1 = next_of(&heads[i].0, seq)?;
        *args.last_mut().expect("pushed above") = rusqlite::types::Value::Integer(seq);
        let row =
            conn.prepare_cached(&row_sql)?.query_row(rusqlite::params_from_iter(args.iter()), |r| event_from_row(r, detail)).optional();
        let mut ev = match row {
            Ok(Some((_, ev))) => ev,
            Ok(None) => continue,
            Err(e) if is_damage_code(&e) => {
                unreadable += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if detail == Detail::Full {
            match load_deliveries(conn, seq) {
                Ok(d) => ev.deliveries = Some(d),
                Err(e) if is_damage(&e) => {
                    unreadable += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        out.push(ev);
    }
    Ok((out, unreadable))
}

/// WHERE clause and parameters for an [`EventFilter`].
fn filter_sql(f: &EventFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut sql = String::from(" WHERE 1=1");
    let mut args: Vec<V> = Vec::new();
    if let Some(s) = &f.source {
        args.push(V::Text(s.clone()));
        sql.push_str(&format!(" AND e.source = ?{}", args.len()));
    }
    if let Some(s) = f.status {
        args.push(V::Text(s.as_str().into()));
        sql.push_str(&format!(" AND e.status = ?{}", args.len()));
        if s != EventStatus::Done {
            // A literal the planner can see, so it uses the partial index
            // `events_unfinished` (a bound parameter alone would not).
            sql.push_str(" AND e.status != 'done'");
        }
    }
    if let Some(t) = f.since {
        args.push(V::Integer(t.timestamp_micros()));
        sql.push_str(&format!(" AND e.received_at >= ?{}", args.len()));
        args.push(V::Text(id_floor(t)));
        sql.push_str(&format!(" AND e.id >= ?{}", args.len()));
    }
    // A page cursor is the previous page's last event: the listing goes on
    // from its position (`seq`, the table's own key), so a page is one seek,
    // not a scan from the first event up to the cursor (`export` of a large
    // store was quadratic). A cursor event pruned meanwhile leaves the id
    // comparison to do the work, as before.
    if let Some(b) = f.before {
        args.push(V::Text(b.to_string()));
        let n = args.len();
        sql.push_str(&format!(" AND e.seq < coalesce((SELECT seq FROM events WHERE id = ?{n}), 9223372036854775807) AND e.id < ?{n}"));
    }
    if let Some(a) = f.after {
        args.push(V::Text(a.to_string()));
        let n = args.len();
        sql.push_str(&format!(" AND e.seq > coalesce((SELECT seq FROM events WHERE id = ?{n}), 0) AND e.id > ?{n}"));
    }
    if let Some(h) = &f.handler {
        args.push(V::Text(h.clone()));
        sql.push_str(&format!(" AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.handler = ?{})", args.len()));
    }
    scale::search_sql(f, &mut sql, &mut args);
    for (ptr, val) in &f.matches {
        args.push(V::Text(ptr.clone()));
        args.push(V::Text(val.clone()));
        sql.push_str(&format!(
            " AND json_pointer_is(CASE e.payload_kind WHEN {PAYLOAD_IS_BODY} THEN e.body WHEN {PAYLOAD_JSON} THEN e.payload END, ?{}, ?{})",
            args.len() - 1,
            args.len()
        ));
    }
    (sql, args)
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_event(&self, ev: NewEvent) -> Result<Inserted, StoreError> {
        let write = self.write(move |conn, st| insert_event(conn, st, &ev));
        // A stalled filesystem must not hold the request forever. The write
        // stays queued and may still commit; the sender retries on 503 and
        // dedup catches the repeat (README "Storage faults").
        match tokio::time::timeout(self.commit_timeout, write).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::CommitTimeout(humantime::format_duration(self.commit_timeout).to_string())),
        }
    }

    fn admission(&self) -> Result<(), StoreError> {
        let Some(disk) = &self.disk else { return Ok(()) };
        match disk.below(self.min_free_bytes) {
            Some(free) => Err(StoreError::NearlyFull { free, min_free: self.min_free_bytes }),
            None => Ok(()),
        }
    }

    fn count_rejection(&self, source: &str, reason: RejectReason) {
        *self.shared.rejections.lock().expect("rejection counter lock poisoned").entry((source.to_string(), reason)).or_default() += 1;
    }

    fn backlog(&self) -> u64 {
        self.shared.backlog.load(Ordering::Relaxed)
    }

    fn work_signal(&self) -> Arc<Notify> {
        self.shared.work.clone()
    }

    async fn list_events(&self, filter: EventFilter, detail: Detail) -> Result<Vec<EventRecord>, StoreError> {
        let shared = self.shared.clone();
        self.read(move |conn| {
            let damage = match list_page(conn, &filter, detail) {
                Err(e) if is_damage(&e) => e.to_string(),
                other => return other,
            };
            // A damaged page: list what can still be read around it, so
            // `export` saves everything readable (README "Recovering a
            // damaged database"), and say what could not be.
            shared.set_fault(Fault::Damaged(damage));
            let (out, unreadable) = list_readable(conn, &filter, detail)?;
            if unreadable > 0 {
                tracing::error!(unreadable, "{unreadable} event(s) in this listing could not be read (damaged pages); skipped");
            }
            Ok(out)
        })
        .await
    }

    async fn get_event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError> {
        self.read(move |conn| {
            let sql = format!("SELECT {EVENT_COLS} FROM events e WHERE e.id = ?1");
            let found = conn.query_row(&sql, [id.to_string()], |r| event_from_row(r, Detail::Full)).optional()?;
            let Some((seq, mut ev)) = found else { return Ok(None) };
            ev.deliveries = Some(load_deliveries(conn, seq)?);
            Ok(Some(ev))
        })
        .await
    }

    async fn stats(&self, source: Option<String>, since: Option<DateTime<Utc>>) -> Result<Vec<StatsRow>, StoreError> {
        self.read(move |conn| scale::stats(conn, source, since)).await
    }

    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError> {
        self.read(scale::queue_depth).await
    }

    async fn hourly(&self, since: DateTime<Utc>) -> Result<Vec<HourCounts>, StoreError> {
        self.read(move |conn| scale::hourly(conn, since)).await
    }

    async fn claim(&self, owner: &str, handler: &str, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
        if self.shared.fault.get().is_some() {
            // A lost or damaged store hands out no work. The processor keeps
            // polling (so its loop counts as alive) but claims nothing; the
            // fault was logged at ERROR once and /readyz names it.
            return Ok(Vec::new());
        }
        let owner = owner.to_string();
        let handler = handler.to_string();
        self.write(move |conn, st| claim_ordered(conn, st, &owner, &handler, OnFailure::Continue, limit, lease)).await
    }

    async fn claim_ordered(
        &self,
        owner: &str,
        handler: &str,
        on_failure: OnFailure,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        if self.shared.fault.get().is_some() {
            // As in `claim`: a lost or damaged store hands out no work.
            return Ok(Vec::new());
        }
        let owner = owner.to_string();
        let handler = handler.to_string();
        self.write(move |conn, st| claim_ordered(conn, st, &owner, &handler, on_failure, limit, lease)).await
    }

    async fn skip(&self, id: EventId, handler: &str) -> Result<(), SkipError> {
        let handler = handler.to_string();
        self.write(move |conn, st| skip(conn, st, id, &handler)).await?
    }

    async fn blocked_keys(&self) -> Result<Vec<BlockedKeys>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT handler, count(*) FROM order_heads WHERE blocked = 1 GROUP BY handler ORDER BY handler")?;
            let rows = stmt.query_map([], |r| Ok(BlockedKeys { handler: r.get(0)?, keys: r.get(1)? }))?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn finish(&self, f: Finished) -> Result<(), StoreError> {
        let (delivery_id, owner) = (f.delivery_id, f.owner.clone());
        let record = move |conn: &Connection, st: &mut WriterState| finish(conn, st, &f);
        self.write_op(record, false, |op| Box::new(Finishing { delivery_id, owner, op })).await
    }

    async fn started(&self, owner: &str, delivery_id: i64) -> Result<(), StoreError> {
        let owner = owner.to_string();
        // Queued, not waited on: the mark rides with the next commit, and
        // nothing of the attempt depends on when (README "Processing": it
        // only decides what a crash leaves in the history). Not answering it
        // saves a reply and a wake-up of the attempt's task per delivery.
        // An attempt that ended in time for its record to share that commit
        // needs no mark (see `FinishAhead`): a short handler's usual case.
        self.enqueue_lazy(move |conn, st| {
            if let Some(ahead) = st.finishing.get_mut(&delivery_id).filter(|a| a.owner == owner) {
                ahead.mark_left = true;
                return Ok(());
            }
            mark_begun(conn, delivery_id, &owner)
        })
    }

    async fn renew(&self, owner: &str, delivery_id: i64, lease: Duration) -> Result<bool, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn, _| {
            let until = now_us().saturating_add(micros(lease));
            let n = conn
                .prepare_cached("UPDATE deliveries SET next_at = ?1 WHERE id = ?2 AND lease_owner = ?3 AND status = 'running'")?
                .execute(params![until, delivery_id, owner])?;
            Ok(n == 1)
        })
        .await
    }

    async fn release(&self, owner: &str, ids: Vec<i64>) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn, st| {
            let now = now_us();
            let mut n = 0;
            for id in &ids {
                let held: Option<(i64, u32, u32, String)> = conn
                    .prepare_cached(
                        "SELECT event_seq, attempts, budget_from, handler FROM deliveries WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
                    )?
                    .query_row(params![id, owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .optional()?;
                let Some((seq, attempts, budget_from, handler)) = held else { continue };
                let (status, attempts) = rules::after_release(attempts, budget_from);
                conn.prepare_cached(
                    "UPDATE deliveries SET status = ?2, attempts = ?3, next_at = ?4, lease_owner = NULL, held = 0, updated_at = ?4 WHERE id = ?1",
                )?
                .execute(params![id, status.as_str(), attempts, now])?;
                head_follows(conn, *id, now)?;
                delivery_moved_refreshing_event(conn, st, seq, &handler, (DeliveryStatus::Running, status))?;
                n += 1;
            }
            st.new_work |= n > 0;
            Ok(n)
        })
        .await
    }

    async fn replay(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<u64, StoreError> {
        self.write(move |conn, st| {
            let now = now_us();
            let mut n = 0u64;
            for id in &ids {
                let Some(seq) = seq_of(conn, *id)? else { continue };
                let taken = replay_takes(conn, seq, handler.as_deref(), only_failed)?;
                for d in &taken {
                    conn.prepare_cached(
                        "UPDATE deliveries SET status = 'pending', budget_from = ?2, next_at = ?3, queued_at = ?3, lease_owner = NULL, updated_at = ?3
                         WHERE id = ?1",
                    )?
                    .execute(params![d.id, rules::budget_after_replay(d.attempts), now])?;
                    replay_head(conn, d.id, seq, now)?;
                    scale::delivery_moved(conn, st, seq, &d.handler, d.status, DeliveryStatus::Pending)?;
                    if !rules::unfinished(d.status) {
                        st.backlog_delta += 1;
                    }
                }
                if !taken.is_empty() {
                    refresh_event_status(conn, st, seq)?;
                    n += taken.len() as u64;
                }
            }
            st.new_work |= n > 0;
            Ok(n)
        })
        .await
    }

    async fn replay_plan(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<Vec<Requeue>, StoreError> {
        self.read(move |conn| {
            let mut plan = Vec::new();
            for id in ids {
                let Some(seq) = seq_of(conn, id)? else { continue };
                plan.extend(replay_takes(conn, seq, handler.as_deref(), only_failed)?.into_iter().map(|d| Requeue {
                    event_id: id,
                    handler: d.handler,
                    status: d.status,
                    attempt_count: d.attempts,
                }));
            }
            Ok(plan)
        })
        .await
    }

    async fn find_ids(&self, filter: EventFilter) -> Result<Vec<EventId>, StoreError> {
        self.read(move |conn| {
            let mut ids: Vec<EventId> = Vec::new();
            for scale::Part { from, where_sql, args, by } in scale::listing_parts(conn, &EventFilter { ascending: true, ..filter.clone() })?
            {
                let left = filter.limit.map(|l| l.saturating_sub(ids.len()));
                if left == Some(0) {
                    break;
                }
                let limit = left.map_or(-1, |l| l as i64);
                let sql = format!("SELECT e.id FROM {from} {where_sql} ORDER BY {by} LIMIT {limit}");
                let mut stmt = conn.prepare(&sql)?;
                for id in stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, EventId>(0))? {
                    ids.push(id?);
                }
            }
            Ok(ids)
        })
        .await
    }

    async fn prune(&self, before: DateTime<Utc>, batch: usize) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self.write(move |conn, st| scale::prune_batch(conn, st, before, batch)).await?;
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    async fn compact(&self) -> Result<String, StoreError> {
        // VACUUM cannot run inside the writer's batch transaction: on a connection of its own.
        self.read(scale::compact).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.write(|conn, _| {
            conn.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_ping', ?1)")?.execute([now_us().to_string()])?;
            Ok(())
        })
        .await
    }

    async fn import_event(&self, ev: EventRecord) -> Result<bool, StoreError> {
        let parts = import_parts(&ev)?;
        self.write(move |conn, st| import_event(conn, st, &ev, &parts)).await
    }

    async fn close(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        // Dropping the sender lets the writer drain what is queued and stop.
        self.tx.lock().expect("writer sender lock poisoned").take();
        self.shared.wal_dirty.1.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().expect("thread list lock poisoned"));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        self.shared.wal_dirty.1.notify_all();
    }
}

/// The event's row number, if it is stored.
fn seq_of(conn: &Connection, id: EventId) -> Result<Option<i64>, Error> {
    Ok(conn.prepare_cached("SELECT seq FROM events WHERE id = ?1")?.query_row([id.to_string()], |r| r.get(0)).optional()?)
}

/// A delivery a replay takes.
struct Replayed {
    id: i64,
    handler: String,
    status: DeliveryStatus,
    attempts: u32,
}

/// The deliveries of one event that a replay re-queues, in handler order:
/// those to `handler` (all when `None`) that [`rules::replay_takes`].
fn replay_takes(conn: &Connection, seq: i64, handler: Option<&str>, only_failed: bool) -> Result<Vec<Replayed>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, handler, status, attempts FROM deliveries WHERE event_seq = ?1 AND (?2 IS NULL OR handler = ?2) ORDER BY handler",
    )?;
    let all = stmt
        .query_map(params![seq, handler], |r| Ok(Replayed { id: r.get(0)?, handler: r.get(1)?, status: r.get(2)?, attempts: r.get(3)? }))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(all.into_iter().filter(|d| rules::replay_takes(d.status, only_failed)).collect())
}

/// Claims up to `limit` due deliveries of `handler` that have no ordering
/// key (those with one are claimed through their key's head,
/// [`claim_ordered`]).
fn claim(
    conn: &Connection,
    st: &mut WriterState,
    owner: &str,
    handler: &str,
    limit: usize,
    lease: Duration,
) -> Result<Vec<Claimed>, Error> {
    let now = now_us();
    let lease_until = now.saturating_add(micros(lease));
    // Due means unfinished (rules::unfinished) with its time come; for a
    // running delivery that time is its lease's end (see rules::claim_step).
    let due: Vec<DueRow> = conn
        .prepare_cached(concat!(
            "SELECT id, event_seq, status, attempts, budget_from, held FROM deliveries
             WHERE handler = ?1 AND order_key IS NULL AND status IN ",
            unfinished_sql!(),
            " AND next_at <= ?2 ORDER BY next_at LIMIT ?3"
        ))?
        .query_map(params![handler, now, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(due.len());
    for row in due {
        if let Some(c) = claim_due(conn, st, owner, handler, (now, lease_until), row)? {
            out.push(c);
        }
    }
    Ok(out)
}

/// A due delivery as a claim reads it: id, event seq, status, attempts, budget_from, held.
type DueRow = (i64, i64, DeliveryStatus, u32, u32, bool);

/// Claims one due delivery for `owner` until `lease_until` ([`rules::claim_step`]);
/// `None` if it is not claimable (finished).
fn claim_due(
    conn: &Connection,
    st: &mut WriterState,
    owner: &str,
    handler: &str,
    (now, lease_until): (i64, i64),
    (id, seq, status, attempts, budget_from, held): DueRow,
) -> Result<Option<Claimed>, Error> {
    {
        // Every unfinished status is claimable; a finished one cannot be here.
        let Some(step) = rules::claim_step(status, held, attempts) else { return Ok(None) };
        if let Some(number) = step.interrupted {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO attempts(delivery_id, number, started_at, duration_ms, outcome, error, output)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, '')",
            )?
            .execute(params![id, number, now, Outcome::Retry.as_str(), rules::INTERRUPTED_ATTEMPT])?;
        }
        conn.prepare_cached(
            "UPDATE deliveries SET status = 'running', attempts = ?5, held = 1, lease_owner = ?2, next_at = ?3, updated_at = ?4 WHERE id = ?1",
        )?
        .execute(params![id, owner, lease_until, now, step.attempt])?;
        // The event row is read once, for the handler and for the counters.
        let (c, was) = conn
            .prepare_cached(
                "SELECT e.id, e.source, e.received_at, e.content_type, e.query, e.headers, e.body, e.payload_kind, e.payload, d.queued_at, e.status
             FROM events e JOIN deliveries d ON d.event_seq = e.seq WHERE d.id = ?1",
            )?
            .query_row([id], |r| {
                let event_id: EventId = r.get(0)?;
                let headers = headers_value(r.get_ref(5)?.as_str()?).map_err(|e| unreadable(5, format!("event {event_id}: {e}")))?;
                let body: Vec<u8> = r.get(6)?;
                let kind: i64 = r.get(7)?;
                let text: Option<String> = r.get(8)?;
                let payload = payload_value(kind, &body, text.as_deref()).map_err(|e| unreadable(8, format!("event {event_id}: {e}")))?;
                let payload_text = text.filter(|_| kind == PAYLOAD_JSON && prints_as_stored(&payload));
                let c = Claimed {
                    delivery_id: id,
                    event_id,
                    source: r.get(1)?,
                    handler: handler.to_string(),
                    attempt: step.attempt,
                    attempt_in_budget: rules::attempt_in_budget(step.attempt, budget_from),
                    received_at: r.get::<_, Micros>(2)?.0,
                    first_queued_at: r.get::<_, Micros>(9)?.0,
                    content_type: r.get(3)?,
                    query: r.get(4)?,
                    headers,
                    body: Bytes::from(body),
                    payload,
                    payload_text,
                };
                Ok((c, r.get::<_, EventStatus>(10)?))
            })?;
        let key = scale::EventKey::new(&c.source, c.received_at);
        // A running delivery decides its event's status alone: no need to read the others.
        let moved = (status, DeliveryStatus::Running);
        scale::moved_as_known(conn, st, (seq, &key, was), handler, moved, rules::event_status_while_running())?;
        Ok(Some(c))
    }
}

/// The start mark: the held delivery's attempt began (README "Leases,
/// crashes and stopping": a crash now counts it as an interrupted attempt).
fn mark_begun(conn: &Connection, delivery_id: i64, owner: &str) -> Result<(), Error> {
    conn.prepare_cached("UPDATE deliveries SET held = 0 WHERE id = ?1 AND lease_owner = ?2 AND status = 'running' AND held = 1")?
        .execute(params![delivery_id, owner])?;
    Ok(())
}

fn finish(conn: &Connection, st: &mut WriterState, f: &Finished) -> Result<(), Error> {
    let ahead = match st.finishing.get(&f.delivery_id) {
        Some(a) if a.owner == f.owner => st.finishing.remove(&f.delivery_id),
        _ => None,
    };
    let now = now_us();
    let status = rules::after_attempt(f.next);
    let next_at = match f.next {
        Next::RetryAt(t) => t.timestamp_micros(),
        Next::Succeeded | Next::Failed | Next::Released => now,
    };
    // Only the holder of this attempt moves the delivery on: the same owner
    // and the same attempt number. If the lease was lost and another
    // processor took the delivery over (with the same number, when it was
    // only held), its own result will count.
    let seq: Option<(i64, String, Option<String>)> = conn
        .prepare_cached(
            "UPDATE deliveries SET status = ?1, next_at = ?2, lease_owner = NULL, held = 0, updated_at = ?3
             WHERE id = ?4 AND status = 'running' AND attempts = ?5 AND lease_owner = ?6 RETURNING event_seq, handler, order_key",
        )?
        .query_row(params![status.as_str(), next_at, now, f.delivery_id, f.attempt, f.owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if seq.is_none() && ahead.is_some_and(|a| a.mark_left) {
        // The delivery is no longer this attempt's: its start mark, left
        // to this record, is written as it would have been (see `FinishAhead`).
        mark_begun(conn, f.delivery_id, &f.owner)?;
    }
    // The holder's record replaces whatever stands for this attempt (the
    // "interrupted" note of a takeover it outlived); a stale holder's record
    // is kept only where the trail has none, never over the new owner's.
    let record = if seq.is_some() {
        "INSERT OR REPLACE INTO attempts(delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    } else {
        "INSERT OR IGNORE INTO attempts(delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    };
    conn.prepare_cached(record)?.execute(params![
        f.delivery_id,
        f.attempt,
        f.started_at.timestamp_micros(),
        i64::try_from(f.duration_ms).unwrap_or(i64::MAX),
        f.outcome.as_str(),
        f.exit_code,
        f.http_status,
        f.error,
        f.output
    ])?;
    if let Some((seq, handler, key)) = seq {
        st.new_work |= match key {
            Some(key) if status == DeliveryStatus::Succeeded => head_passes_on(conn, &handler, &key, f.delivery_id)?,
            _ => head_follows(conn, f.delivery_id, next_at)? && next_at <= now,
        };
        delivery_moved_refreshing_event(conn, st, seq, &handler, (DeliveryStatus::Running, status))?;
        if !rules::unfinished(status) {
            st.backlog_delta -= 1;
        }
    }
    Ok(())
}

// Ordered processing: the steps of `rules` ("Ordered claims"), in SQL.

/// Steps per head in one claim: an advance lands on an unfinished
/// delivery, so the second step claims it or waits for it.
const HEAD_STEPS: usize = 2;

/// A keyed delivery was inserted: it heads its key unless the key has a
/// head already (ids grow, so that one is older). A new row's `floor` is
/// the delivery itself: the key had nothing unfinished.
fn new_keyed_delivery(conn: &Connection, handler: &str, key: &str, delivery_id: i64, seq: i64, now: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO order_heads(handler, key, delivery_id, event_seq, due, blocked, floor) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?4)",
    )?
    .execute(params![handler, key, delivery_id, seq, now])?;
    Ok(())
}

/// The head row of a delivery's key, if it is that key's head, looks at it
/// again at `due` (its new `next_at`: a retry time, a lease's end, or now
/// for one that finished, so the next claim advances or blocks the key).
/// Returns whether it heads a key: then the key's next delivery may be due
/// now, and the writer wakes the processor (`new_work`) rather than leave it
/// to the next poll.
fn head_follows(conn: &Connection, delivery_id: i64, due: i64) -> Result<bool, Error> {
    let n = conn
        .prepare_cached(
            "UPDATE order_heads SET due = ?2
             WHERE (handler, key) = (SELECT handler, order_key FROM deliveries WHERE id = ?1) AND delivery_id = ?1",
        )?
        .execute(params![delivery_id, due])?;
    Ok(n > 0)
}

/// A keyed delivery that heads its key succeeded: the key's next unfinished
/// delivery (one probe of `deliveries_by_key`) becomes the head at once, due
/// at its own `next_at`, or the row goes when there is none (`rules`,
/// "Ordered claims", finish). Since a pending delivery's `next_at` is when
/// it was queued, claims (oldest `due` first) then take ready heads in
/// about event order, as an unordered claim takes its deliveries, instead
/// of in the order their predecessors finished: a claim's rows and events
/// sit close together, and a commit writes far fewer pages. Returns whether
/// the key's next delivery is due now (the writer wakes the processor).
fn head_passes_on(conn: &Connection, handler: &str, key: &str, delivery_id: i64) -> Result<bool, Error> {
    let head: Option<(i64, i64, i64)> = conn
        .prepare_cached("SELECT delivery_id, event_seq, floor FROM order_heads WHERE handler = ?1 AND key = ?2")?
        .query_row(params![handler, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((_, seq, floor)) = head.filter(|h| h.0 == delivery_id) else {
        // Not the head (a replayed delivery waiting behind it): the head moves on its own.
        return Ok(false);
    };
    match next_head(conn, handler, key, search_from(floor, seq))? {
        Some(((id, seq, ..), due)) => {
            set_head(conn, handler, key, (id, seq), due, seq)?;
            Ok(due <= now_us())
        }
        None => Ok(false),
    }
}

/// Where to look for the next head of a key whose head (of event
/// `head_seq`) is finished: from the row's `floor` (nothing of the key
/// below it is unfinished), past the head itself when it is the floor.
fn search_from(floor: i64, head_seq: i64) -> i64 {
    if floor == head_seq {
        head_seq.saturating_add(1)
    } else {
        floor
    }
}

/// A key's next head: its oldest unfinished delivery, looked for from
/// event `from` on (the row's `floor`, or past it) in `deliveries_by_key`:
/// usually its first entry there; none left, and its head row goes. The
/// caller writes the head it found with `floor` = its event.
fn next_head(conn: &Connection, handler: &str, key: &str, from: i64) -> Result<Option<HeadRow>, Error> {
    let next = conn
        .prepare_cached(concat!(
            "SELECT id, event_seq, status, attempts, budget_from, held, next_at FROM deliveries INDEXED BY deliveries_by_key
             WHERE handler = ?1 AND order_key = ?2 AND event_seq >= ?3 AND status IN ",
            unfinished_sql!(),
            " ORDER BY event_seq LIMIT 1"
        ))?
        .query_row(params![handler, key, from], head_row)
        .optional()?;
    if next.is_none() {
        conn.prepare_cached("DELETE FROM order_heads WHERE handler = ?1 AND key = ?2")?.execute(params![handler, key])?;
    }
    Ok(next)
}

/// A keyed delivery was replayed (now pending): where it goes in its key's
/// line ([`rules::replay_takes_head`]).
fn replay_head(conn: &Connection, delivery_id: i64, seq: i64, now: i64) -> Result<(), Error> {
    let keyed: Option<(String, Option<String>)> = conn
        .prepare_cached("SELECT handler, order_key FROM deliveries WHERE id = ?1")?
        .query_row([delivery_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((handler, Some(key))) = keyed else { return Ok(()) };
    let head: Option<(i64, i64, bool)> = conn
        .prepare_cached("SELECT delivery_id, event_seq, blocked FROM order_heads WHERE handler = ?1 AND key = ?2")?
        .query_row(params![handler, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let take = match head {
        None => {
            return new_keyed_delivery(conn, &handler, &key, delivery_id, seq, now);
        }
        // The blocker itself: the key is free to run it again.
        Some((head, _, _)) if head == delivery_id => true,
        // Blocked by another: it waits behind the blocker.
        Some((_, _, true)) => false,
        Some((head, head_seq, false)) => {
            let status: Option<DeliveryStatus> =
                conn.prepare_cached("SELECT status FROM deliveries WHERE id = ?1")?.query_row([head], |r| r.get(0)).optional()?;
            rules::replay_takes_head(status, head_seq > seq)
        }
    };
    // Either way nothing of the key older than it is unfinished: the
    // `floor` goes down to it, so the key's next head is looked for from it.
    if take {
        conn.prepare_cached(
            "UPDATE order_heads SET delivery_id = ?3, event_seq = ?4, due = ?5, blocked = 0, floor = min(floor, ?4)
             WHERE handler = ?1 AND key = ?2",
        )?
        .execute(params![handler, key, delivery_id, seq, now])?;
    } else {
        conn.prepare_cached("UPDATE order_heads SET floor = min(floor, ?3) WHERE handler = ?1 AND key = ?2")?
            .execute(params![handler, key, seq])?;
    }
    Ok(())
}

/// [`Store::claim_ordered`]: heads first (at most one per key, so they
/// cannot crowd out unkeyed work for long), then unkeyed deliveries.
fn claim_ordered(
    conn: &Connection,
    st: &mut WriterState,
    owner: &str,
    handler: &str,
    on_failure: OnFailure,
    limit: usize,
    lease: Duration,
) -> Result<Vec<Claimed>, Error> {
    let now = now_us();
    if on_failure == OnFailure::Continue {
        // A reload may have turned `block` off: what it blocked runs on.
        conn.prepare_cached("UPDATE order_heads SET blocked = 0, due = ?2 WHERE handler = ?1 AND blocked = 1")?
            .execute(params![handler, now])?;
    }
    // A blocker pruned with its event (README "Retention") no longer blocks.
    conn.prepare_cached(
        "UPDATE order_heads SET blocked = 0, due = ?2 WHERE handler = ?1 AND blocked = 1
         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = order_heads.delivery_id)",
    )?
    .execute(params![handler, now])?;
    let mut out = claim_heads(conn, st, owner, handler, on_failure, limit, (now, now.saturating_add(micros(lease))))?;
    if out.len() < limit {
        out.extend(claim(conn, st, owner, handler, limit - out.len(), lease)?);
    }
    Ok(out)
}

/// Claims the due heads of `handler`'s keys (`rules`, "Ordered claims", step 3).
fn claim_heads(
    conn: &Connection,
    st: &mut WriterState,
    owner: &str,
    handler: &str,
    on_failure: OnFailure,
    limit: usize,
    (now, lease_until): (i64, i64),
) -> Result<Vec<Claimed>, Error> {
    // Each due head with its delivery (NULLs when it is gone: pruned), the
    // head's event and the row's `floor`.
    let heads: Vec<(String, Option<HeadRow>, (i64, i64))> = conn
        .prepare_cached(
            "SELECT h.key, d.id, d.event_seq, d.status, d.attempts, d.budget_from, d.held, d.next_at, h.event_seq, h.floor
             FROM order_heads h LEFT JOIN deliveries d ON d.id = h.delivery_id
             WHERE h.handler = ?1 AND h.blocked = 0 AND h.due <= ?2 ORDER BY h.due LIMIT ?3",
        )?
        .query_map(params![handler, now, limit as i64], |r| {
            let head = match r.get::<_, Option<i64>>(1)? {
                Some(id) => Some(((id, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?), r.get(7)?)),
                None => None,
            };
            Ok((r.get(0)?, head, (r.get(8)?, r.get(9)?)))
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(heads.len());
    for (key, mut head, (head_seq, mut floor)) in heads {
        for _ in 0..HEAD_STEPS {
            match (rules::head_step(head.map(|(d, _)| d.2), on_failure), head) {
                (rules::HeadStep::Claim, Some((due, next_at))) => {
                    let (id, seq) = (due.0, due.1);
                    if next_at > now {
                        // A renewed lease or a retry time: look again then.
                        set_head(conn, handler, &key, (id, seq), next_at, floor)?;
                    } else if let Some(c) = claim_due(conn, st, owner, handler, (now, lease_until), due)? {
                        set_head(conn, handler, &key, (id, seq), lease_until, floor)?;
                        out.push(c);
                    }
                    break;
                }
                (rules::HeadStep::Block, _) => {
                    conn.prepare_cached("UPDATE order_heads SET blocked = 1 WHERE handler = ?1 AND key = ?2")?
                        .execute(params![handler, key])?;
                    break;
                }
                (rules::HeadStep::Advance, _) | (rules::HeadStep::Claim, None) => {
                    // The key's next head, looked at in the next step.
                    head = next_head(conn, handler, &key, search_from(floor, head_seq))?;
                    let Some(((_, seq, ..), _)) = head else { break };
                    // An unfinished delivery, the key's oldest: the next
                    // step claims it or waits for it, and writes the row
                    // (with it as the floor) either way.
                    floor = seq;
                }
            }
        }
    }
    Ok(out)
}

/// A delivery as a head step reads it: its [`DueRow`] and its `next_at`.
type HeadRow = (DueRow, i64);

fn head_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HeadRow> {
    Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?), r.get(6)?))
}

/// Points a key's head row at delivery `id` (of event `seq`), unblocked,
/// looked at again at `due`, with nothing of the key unfinished below event `floor`.
fn set_head(conn: &Connection, handler: &str, key: &str, (id, seq): (i64, i64), due: i64, floor: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "UPDATE order_heads SET delivery_id = ?3, event_seq = ?4, due = ?5, blocked = 0, floor = ?6 WHERE handler = ?1 AND key = ?2",
    )?
    .execute(params![handler, key, id, seq, due, floor])?;
    Ok(())
}

/// [`Store::skip`]: the one place a delivery becomes `skipped`.
fn skip(conn: &Connection, st: &mut WriterState, id: EventId, handler: &str) -> Result<Result<(), SkipError>, Error> {
    let Some(seq) = seq_of(conn, id)? else { return Ok(Err(SkipError::UnknownEvent(id))) };
    let found: Option<(i64, DeliveryStatus)> = conn
        .prepare_cached("SELECT id, status FROM deliveries WHERE event_seq = ?1 AND handler = ?2")?
        .query_row(params![seq, handler], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((delivery_id, status)) = found else { return Ok(Err(SkipError::UnknownHandler(id, handler.to_string()))) };
    if !rules::skippable(status) {
        return Ok(Err(SkipError::NotFailed(id, handler.to_string(), status)));
    }
    let now = now_us();
    conn.prepare_cached("UPDATE deliveries SET status = ?2, updated_at = ?3 WHERE id = ?1")?.execute(params![
        delivery_id,
        DeliveryStatus::Skipped.as_str(),
        now
    ])?;
    // The key it blocked (if it heads one) is looked at again at once: it advances.
    conn.prepare_cached(
        "UPDATE order_heads SET blocked = 0, due = ?2
         WHERE (handler, key) = (SELECT handler, order_key FROM deliveries WHERE id = ?1) AND delivery_id = ?1",
    )?
    .execute(params![delivery_id, now])?;
    delivery_moved_refreshing_event(conn, st, seq, handler, (status, DeliveryStatus::Skipped))?;
    st.new_work = true;
    Ok(Ok(()))
}

/// The event whose failed delivery blocks `handler`'s key `key`, unless it
/// is delivery `delivery_id` itself.
fn blocked_by(conn: &Connection, handler: &str, key: &str, delivery_id: i64) -> Result<Option<EventId>, Error> {
    Ok(conn
        .prepare_cached(
            "SELECT e.id FROM order_heads h JOIN events e ON e.seq = h.event_seq
             WHERE h.handler = ?1 AND h.key = ?2 AND h.blocked = 1 AND h.delivery_id != ?3",
        )?
        .query_row(params![handler, key, delivery_id], |r| r.get(0))
        .optional()?)
}

/// One imported event with its deliveries and attempts (see
/// [`Store::import_event`]); false when its id is already stored.
fn import_event(
    conn: &Connection,
    st: &mut WriterState,
    ev: &EventRecord,
    (body, payload, statuses): &(Vec<u8>, Payload, Vec<DeliveryStatus>),
) -> Result<bool, Error> {
    if seq_of(conn, ev.id)?.is_some() {
        return Ok(false);
    }
    let (kind, payload) = match payload {
        Payload::Null => (PAYLOAD_NULL, None),
        Payload::Body => (PAYLOAD_IS_BODY, None),
        Payload::Json(s) => (PAYLOAD_JSON, Some(s.as_str())),
    };
    let headers = ev.headers.as_ref().map_or_else(|| "{}".to_string(), Value::to_string);
    conn.prepare_cached(
        "INSERT INTO events(id, source, status, received_at, method, content_type, query, headers, remote_addr, body, payload_kind, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        ev.id.to_string(),
        ev.source,
        rules::event_status(statuses).as_str(),
        ev.received_at.timestamp_micros(),
        ev.method,
        ev.content_type,
        ev.query,
        headers,
        ev.remote_addr,
        body,
        kind,
        payload
    ])?;
    let seq = conn.last_insert_rowid();
    let now = now_us();
    let key = scale::EventKey::new(&ev.source, ev.received_at);
    scale::count_event(st, &key, None, Some(rules::event_status(statuses)));
    for (d, status) in ev.deliveries.iter().flatten().zip(statuses) {
        scale::count_delivery(st, &key, &d.handler, None, Some(*status));
        // Waiting ones keep their time; the max_age clock starts at receipt.
        let next_at = d.next_attempt_at.filter(|_| rules::waits_for_its_time(*status)).map_or(now, |t| t.timestamp_micros());
        conn.prepare_cached(
            "INSERT INTO deliveries(event_seq, handler, status, attempts, next_at, queued_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![seq, d.handler, status.as_str(), d.attempt_count, next_at, ev.received_at.timestamp_micros(), now])?;
        let id = conn.last_insert_rowid();
        for a in &d.attempts {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO attempts(delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                id,
                a.number,
                a.started_at.timestamp_micros(),
                i64::try_from(a.duration_ms).unwrap_or(i64::MAX),
                a.outcome.as_str(),
                a.exit_code,
                a.http_status,
                a.error,
                a.output
            ])?;
        }
        if rules::unfinished(*status) {
            st.backlog_delta += 1;
            st.new_work = true;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source: &str, n: usize) -> NewEvent {
        NewEvent {
            source: source.into(),
            received_at: Utc::now(),
            method: "POST".into(),
            content_type: "application/json".into(),
            query: String::new(),
            headers: "{}".into(),
            remote_addr: "127.0.0.1".into(),
            // About 1.2 KB: three events to a 4 KiB page.
            body: Bytes::from(format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(1200))),
            payload: Payload::Body,
            dedup: None,
            handlers: Vec::new(),
            order_keys: Vec::new(),
        }
    }

    #[test]
    fn ordered_claims_use_the_indexes_not_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("q.db"), Role::All).expect("open");
        let conn = open_conn(&dir.path().join("q.db"), OpenFlags::SQLITE_OPEN_READ_WRITE).expect("conn");
        drop(store);
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("plan");
            let rows: Vec<String> = stmt.query_map([], |r| r.get::<_, String>(3)).expect("rows").collect::<Result<_, _>>().expect("rows");
            rows.join("; ")
        };
        let unkeyed = plan(concat!(
            "SELECT id FROM deliveries WHERE handler = 'h' AND order_key IS NULL AND status IN ",
            unfinished_sql!(),
            " AND next_at <= 5 ORDER BY next_at LIMIT 9"
        ));
        assert!(unkeyed.contains("deliveries_due (handler=? AND next_at<?)"), "{unkeyed}");
        let count = plan(unfinished_count_sql!());
        // Either split index, or deliveries_waiting (every unfinished delivery): never the table.
        assert!(count.matches("SCAN deliveries").count() == count.matches("SCAN deliveries USING").count(), "{count}");
        assert!(count.contains("USING INDEX deliveries_") || count.contains("USING COVERING INDEX deliveries_"), "{count}");
        assert!(!unkeyed.contains("TEMP B-TREE"), "{unkeyed}");
        // A key's next head (`next_head`): the planner's own choice, without the hint.
        let next = plan(concat!(
            "SELECT id FROM deliveries WHERE handler = 'h' AND order_key = 'k' AND event_seq >= 3 AND status IN ",
            unfinished_sql!(),
            " ORDER BY event_seq LIMIT 1"
        ));
        assert!(next.contains("deliveries_by_key (handler=? AND order_key=? AND event_seq>?)"), "{next}");
        assert!(!next.contains("TEMP B-TREE"), "{next}");
        let heads = plan(
            "SELECT h.key, d.status FROM order_heads h LEFT JOIN deliveries d ON d.id = h.delivery_id
             WHERE h.handler = 'h' AND h.blocked = 0 AND h.due <= 5 ORDER BY h.due LIMIT 9",
        );
        assert!(heads.contains("order_heads_due"), "{heads}");
        assert!(!heads.contains("TEMP B-TREE"), "{heads}");
    }

    /// Overwrites the first table leaf page in the second half of the file.
    fn damage_a_table_page(path: &Path) {
        // Everything into the main file first: a page still in the WAL would
        // be read from there, and damaging the main file would miss it.
        let conn = Connection::open(path).expect("opening to checkpoint");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)).expect("checkpointing");
        // A leaf of `events` itself, from the middle of its tree: the first
        // table leaf in the file's second half was sometimes one of the search
        // index's (its batches interleave with the inserts), which held no event.
        let leaves: Vec<i64> = conn
            .prepare("SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' ORDER BY path")
            .and_then(|mut st| st.query_map([], |r| r.get::<_, i64>(0)).and_then(|rows| rows.collect()))
            .expect("reading the events table's leaves");
        drop(conn);
        let mut bytes = std::fs::read(path).expect("reading the database");
        let size = 4096;
        let i = leaves[leaves.len() / 2] as usize - 1;
        assert_eq!(bytes[i * size], 0x0D, "page {} is a table leaf", i + 1);
        bytes[i * size..(i + 1) * size].fill(0xA5);
        std::fs::write(path, bytes).expect("writing the database");
    }

    /// Every page of a listing, following its cursor as `export` and the page do.
    async fn all_pages(store: &SqliteStore, mut filter: EventFilter) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let page = store.list_events(filter.clone(), Detail::Full).await.expect("listing around the damage");
            ids.extend(page.iter().map(|e| e.id.to_string()));
            match page.last() {
                Some(last) if page.len() == filter.limit.expect("paged") => {
                    if filter.ascending {
                        filter.after = Some(last.id);
                    } else {
                        filter.before = Some(last.id);
                    }
                }
                _ => return ids,
            }
        }
    }

    #[tokio::test]
    async fn a_head_that_succeeds_passes_its_key_on_so_ready_heads_are_claimed_in_event_order() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        // Key a: events 1 and 3; key b: events 2 and 4.
        let mut ids = Vec::new();
        for key in ["a", "b", "a", "b"] {
            let mut ev = event("s", ids.len());
            ev.handlers = vec!["h".into()];
            ev.order_keys = vec![Some(key.into())];
            ids.push(store.insert_event(ev).await.expect("inserting").id);
        }
        let lease = Duration::from_secs(60);
        let first = store.claim_ordered("me", "h", OnFailure::Continue, 2, lease).await.expect("claiming");
        assert_eq!(first.iter().map(|c| c.event_id).collect::<Vec<_>>(), vec![ids[0], ids[1]], "one head per key");
        // b's head finishes first, then a's.
        for c in [&first[1], &first[0]] {
            store.finish(succeeded(c)).await.expect("finishing");
        }
        // Each key's next delivery heads it at once, due when it was queued:
        // event 3 comes before event 4, although b's key was free first.
        let next = store.claim_ordered("me", "h", OnFailure::Continue, 1, lease).await.expect("claiming");
        assert_eq!(next.iter().map(|c| c.event_id).collect::<Vec<_>>(), vec![ids[2]]);
        let last = store.claim_ordered("me", "h", OnFailure::Continue, 1, lease).await.expect("claiming");
        assert_eq!(last.iter().map(|c| c.event_id).collect::<Vec<_>>(), vec![ids[3]]);
        store.close().await;
    }

    fn succeeded(c: &Claimed) -> Finished {
        Finished {
            owner: "me".into(),
            delivery_id: c.delivery_id,
            attempt: c.attempt,
            started_at: Utc::now(),
            duration_ms: 1,
            outcome: Outcome::Success,
            exit_code: Some(0),
            http_status: None,
            error: None,
            output: String::new(),
            next: Next::Succeeded,
        }
    }

    /// Holds the writer inside a write (a transaction of its own) until the
    /// returned sender is used or dropped: what is queued meanwhile goes into
    /// the writer's next transaction together. The write also sets up a
    /// temporary table `marks` that a trigger fills with every delivery whose
    /// start mark was written (`held` cleared while it is still running).
    async fn hold_writer(store: &SqliteStore) -> (std::sync::mpsc::Sender<()>, impl std::future::Future<Output = ()> + '_) {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let hold = store.write(move |conn, _| {
            conn.execute_batch(
                "CREATE TEMP TABLE IF NOT EXISTS marks(delivery_id INTEGER);
                 CREATE TEMP TRIGGER IF NOT EXISTS mark_seen AFTER UPDATE OF held ON main.deliveries
                 WHEN OLD.held = 1 AND NEW.held = 0 AND NEW.status = 'running'
                 BEGIN INSERT INTO marks VALUES (NEW.id); END",
            )?;
            let _ = entered_tx.send(());
            let _ = released.recv();
            Ok(())
        });
        let mut hold = Box::pin(hold);
        // Queued by its first poll; then the writer runs it and waits.
        tokio::select! { biased; r = &mut hold => panic!("the holding write ended early: {r:?}"), _ = std::future::ready(()) => {} }
        entered.recv().expect("the writer runs the holding write");
        (release, async move { hold.await.expect("the holding write") })
    }

    /// Start marks written (see [`hold_writer`]), and `held` of `delivery_id`.
    async fn marks_and_held(store: &SqliteStore, delivery_id: i64) -> (Vec<i64>, bool) {
        store
            .write(move |conn, _| {
                let marks = conn.prepare("SELECT delivery_id FROM marks")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                let held = conn.query_row("SELECT held FROM deliveries WHERE id = ?1", [delivery_id], |r| r.get(0))?;
                Ok((marks, held))
            })
            .await
            .expect("reading the marks")
    }

    async fn one_claimed(store: &SqliteStore, n: usize) -> Claimed {
        let mut ev = event("s", n);
        ev.handlers = vec!["h".into()];
        store.insert_event(ev).await.expect("inserting");
        let mut c = store.claim("me", "h", 1, Duration::from_secs(60)).await.expect("claiming");
        c.pop().expect("one due delivery")
    }

    #[tokio::test]
    async fn a_start_mark_whose_attempt_record_shares_its_commit_is_left_to_the_record_which_is_complete() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        let c = one_claimed(&store, 1).await;
        let (release, held) = hold_writer(&store).await;
        // A short attempt: begun and finished while the writer was busy, so
        // both wait for its next commit together.
        store.started("me", c.delivery_id).await.expect("queueing the start mark");
        let started_at = Utc::now() - chrono::Duration::milliseconds(3);
        let record = Finished { started_at, duration_ms: 3, output: "ok\n".into(), ..succeeded(&c) };
        let mut finishing = Box::pin(store.finish(record));
        tokio::select! { biased; r = &mut finishing => panic!("the record committed while the writer was held: {r:?}"), _ = std::future::ready(()) => {} }
        release.send(()).expect("releasing the writer");
        held.await;
        finishing.await.expect("recording the attempt");
        let (marks, held) = marks_and_held(&store, c.delivery_id).await;
        assert_eq!(marks, Vec::<i64>::new(), "the start mark was left to the attempt record that shares its commit");
        assert!(!held, "the record itself clears `held`");
        let ev = store.get_event(c.event_id).await.expect("reading").expect("stored");
        assert_eq!(ev.status, EventStatus::Done);
        let d = &ev.deliveries.as_ref().expect("full detail")[0];
        assert_eq!(d.status, DeliveryStatus::Succeeded);
        let a = &d.attempts[0];
        assert_eq!(d.attempts.len(), 1);
        assert_eq!((a.number, a.outcome, a.exit_code, a.duration_ms), (1, Outcome::Success, Some(0), 3));
        assert_eq!((a.error.as_deref(), a.output.as_str()), (None, "ok\n"));
        assert_eq!(rfc3339(a.started_at), rfc3339(started_at));
        store.close().await;
    }

    #[tokio::test]
    async fn a_start_mark_is_written_when_its_record_is_not_in_the_commit_or_finds_the_delivery_gone() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        // Still running at the next commit: the mark goes in, so a crash now
        // counts the attempt as begun (README "Leases, crashes and stopping").
        let running = one_claimed(&store, 1).await;
        let (release, held) = hold_writer(&store).await;
        store.started("me", running.delivery_id).await.expect("queueing the start mark");
        release.send(()).expect("releasing the writer");
        held.await;
        assert_eq!(marks_and_held(&store, running.delivery_id).await, (vec![running.delivery_id], false));
        // A record in the same commit that no longer holds the delivery (not
        // this attempt's number) leaves `held` alone: the mark is written.
        let other = one_claimed(&store, 2).await;
        let (release, held) = hold_writer(&store).await;
        store.started("me", other.delivery_id).await.expect("queueing the start mark");
        let stale = Finished { attempt: other.attempt + 1, ..succeeded(&other) };
        let mut finishing = Box::pin(store.finish(stale));
        tokio::select! { biased; r = &mut finishing => panic!("the record committed while the writer was held: {r:?}"), _ = std::future::ready(()) => {} }
        release.send(()).expect("releasing the writer");
        held.await;
        finishing.await.expect("recording the stale attempt");
        assert_eq!(marks_and_held(&store, other.delivery_id).await, (vec![running.delivery_id, other.delivery_id], false));
        store.close().await;
    }

    #[tokio::test]
    async fn a_claim_hands_over_a_normalized_payload_as_stored_when_printing_it_gives_the_same_bytes() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        let normalized =
            serde_json::json!({"b": ["caf\u{e9} \u{1F600}", "\"q\" \\ \n \u{1} \u{7f}"], "a": {"z": 18446744073709551615u64, "y": -1}});
        let with_float = serde_json::json!({"n": 0.30000000000000004, "s": "x"});
        for (n, payload) in [normalized.to_string(), with_float.to_string()].into_iter().enumerate() {
            let mut ev = event("s", n);
            ev.handlers = vec!["h".into()];
            ev.payload = Payload::Json(payload);
            store.insert_event(ev).await.expect("inserting");
        }
        let mut body_ev = event("s", 3);
        body_ev.handlers = vec!["h".into()];
        store.insert_event(body_ev).await.expect("inserting");
        let c = store.claim("me", "h", 3, Duration::from_secs(60)).await.expect("claiming");
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].payload, normalized);
        assert_eq!(c[0].payload_text.as_deref(), Some(c[0].payload.to_string().as_str()), "the stored text is what printing gives");
        assert_eq!(c[1].payload_text, None, "a float may not print back as stored: printed again");
        assert_eq!(c[2].payload_text, None, "a JSON body is stored as sent: printed again");
        assert!(prints_as_stored(&normalized) && !prints_as_stored(&with_float));
        store.close().await;
    }

    #[tokio::test]
    async fn a_file_from_before_the_key_floor_upgrades_and_a_replayed_delivery_still_runs_before_later_ones() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, Role::All).expect("creating");
        let mut ids = Vec::new();
        for n in 0..3 {
            let mut ev = event("s", n);
            ev.handlers = vec!["h".into()];
            ev.order_keys = vec![Some("a".into())];
            ids.push(store.insert_event(ev).await.expect("inserting").id);
        }
        let lease = Duration::from_secs(60);
        let claim_one = || store.claim_ordered("me", "h", OnFailure::Continue, 1, lease);
        let first = claim_one().await.expect("claiming");
        assert_eq!(first.iter().map(|c| c.event_id).collect::<Vec<_>>(), vec![ids[0]]);
        store.finish(succeeded(&first[0])).await.expect("finishing");
        let second = claim_one().await.expect("claiming");
        assert_eq!(second.iter().map(|c| c.event_id).collect::<Vec<_>>(), vec![ids[1]]);
        // The first event is replayed while the second runs: it waits behind it.
        assert_eq!(store.replay(vec![ids[0]], Some("h".into()), false).await.expect("replaying"), 1);
        store.close().await;

        // The file as schema 5 left it: the keyed index of unfinished
        // deliveries, no floor (the head row still names the second event).
        let conn = Connection::open(&path).expect("opening");
        conn.execute_batch(
            "DROP INDEX deliveries_by_key; ALTER TABLE order_heads DROP COLUMN floor;
             CREATE INDEX deliveries_keyed ON deliveries(handler, order_key, event_seq)
                 WHERE order_key IS NOT NULL AND status IN ('pending', 'retrying', 'running');
             PRAGMA user_version = 5;",
        )
        .expect("going back to schema 5");
        drop(conn);

        let store = SqliteStore::open(&path, Role::All).expect("upgrading");
        let claim_one = || store.claim_ordered("me", "h", OnFailure::Continue, 1, lease);
        let conn = Connection::open(&path).expect("opening");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        // The replayed first event, not the head's, is where the key's next head is looked for.
        let (floor, first_seq): (i64, i64) = conn
            .query_row(
                "SELECT h.floor, (SELECT seq FROM events WHERE id = ?1) FROM order_heads h WHERE h.handler = 'h' AND h.key = 'a'",
                [ids[0].to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("the head row");
        assert_eq!(floor, first_seq);
        assert!(claim_one().await.expect("claiming").is_empty(), "the second event still runs");
        store.finish(succeeded(&second[0])).await.expect("finishing");
        let mut order = Vec::new();
        while let Some(c) = claim_one().await.expect("claiming").pop() {
            order.push(c.event_id);
            store.finish(succeeded(&c)).await.expect("finishing");
        }
        assert_eq!(order, vec![ids[0], ids[2]], "the replayed event, then the third");
        let heads: i64 = conn.query_row("SELECT count(*) FROM order_heads", [], |r| r.get(0)).expect("counting");
        assert_eq!(heads, 0, "a key with nothing left has no head row");
        store.close().await;
    }

    #[tokio::test]
    async fn listings_over_a_damaged_table_read_around_the_damage_in_both_orders_and_mark_the_store_damaged() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, Role::All).expect("creating");
        let mut stored = Vec::new();
        for n in 0..300 {
            let source = if n % 3 == 0 { "a" } else { "b" };
            stored.push((source, store.insert_event(event(source, n)).await.expect("inserting").id.to_string()));
        }
        store.close().await;
        drop(store);
        damage_a_table_page(&path);

        let store = SqliteStore::open(&path, Role::Client).expect("opening a damaged file still works");
        let asc = all_pages(&store, EventFilter { ascending: true, limit: Some(40), ..Default::default() }).await;
        let missing = stored.len() - asc.len();
        assert!((1..=4).contains(&missing), "only the events on the damaged page are skipped: {missing}");
        let in_order: Vec<&String> = stored.iter().map(|(_, id)| id).filter(|id| asc.contains(id)).collect();
        assert_eq!(asc.iter().collect::<Vec<_>>(), in_order, "oldest first, as stored");

        let mut desc = all_pages(&store, EventFilter { limit: Some(25), ..Default::default() }).await;
        desc.reverse();
        assert_eq!(desc, asc, "newest first reads the same events");

        let only_a =
            all_pages(&store, EventFilter { source: Some("a".into()), ascending: true, limit: Some(7), ..Default::default() }).await;
        let want: Vec<String> = stored.iter().filter(|(s, id)| *s == "a" && asc.contains(id)).map(|(_, id)| id.clone()).collect();
        assert_eq!(only_a, want, "filters still apply");

        assert!(
            matches!(store.insert_event(event("a", 999)).await, Err(StoreError::Damaged { .. })),
            "writes are refused once damage is seen"
        );
        store.close().await;
    }

    #[test]
    fn a_wal_without_its_database_is_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        std::fs::write(dir.path().join("db.sqlite-wal"), b"log").expect("writing a stray log");
        let err = SqliteStore::open(&path, Role::Client).err().expect("refused").to_string();
        assert!(err.contains("the database file is missing but its write-ahead log"), "{err}");
        assert!(!path.exists(), "no empty database was created");
    }

    /// The statuses an SQL list spells, e.g. `('done', 'failed')`.
    fn sql_list<T: std::str::FromStr<Err = String>>(sql: &str) -> Vec<T> {
        sql.trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(|s| s.trim().trim_matches('\'').parse().expect("a known status"))
            .collect()
    }

    #[test]
    fn the_sql_spellings_of_rules_agree_with_the_rules() {
        let mut unfinished: Vec<DeliveryStatus> = sql_list(unfinished_sql!());
        let mut want: Vec<DeliveryStatus> = DeliveryStatus::ALL.iter().copied().filter(|s| rules::unfinished(*s)).collect();
        unfinished.sort_by_key(|s| s.as_str());
        want.sort_by_key(|s| s.as_str());
        assert_eq!(unfinished, want);
        let prunable: Vec<EventStatus> = sql_list(prunable_sql!());
        let want: Vec<EventStatus> = EventStatus::ALL.iter().copied().filter(|s| rules::prunable(*s)).collect();
        assert_eq!(prunable, want);
    }

    /// A database with one event routed to `a` and `b`: `a` succeeded, `b` failed.
    async fn one_finished_event(path: &Path) -> EventId {
        let store = SqliteStore::open(path, Role::All).expect("creating");
        let mut ev = event("s", 1);
        ev.handlers = vec!["a".into(), "b".into()];
        let id = store.insert_event(ev).await.expect("inserting").id;
        for (handler, next) in [("a", Next::Succeeded), ("b", Next::Failed)] {
            let c = store.claim("me", handler, 1, Duration::from_secs(60)).await.expect("claiming").pop().expect("due");
            let outcome = if next == Next::Succeeded { Outcome::Success } else { Outcome::Failure };
            let f = Finished {
                owner: "me".into(),
                delivery_id: c.delivery_id,
                attempt: c.attempt,
                started_at: Utc::now(),
                duration_ms: 3,
                outcome,
                exit_code: Some(0),
                http_status: None,
                error: None,
                output: String::new(),
                next,
            };
            store.finish(f).await.expect("finishing");
        }
        store.close().await;
        id
    }

    #[tokio::test]
    async fn a_stored_value_this_version_cannot_read_is_corrupt_never_a_guess() {
        let cases = [
            ("UPDATE attempts SET outcome = 'maybe'", "`maybe` is not one of"),
            ("UPDATE events SET headers = 'not json'", "the stored headers are not JSON"),
            ("UPDATE events SET received_at = 9223372036854775807", "out of range"),
            ("UPDATE attempts SET started_at = -9223372036854775807", "out of range"),
            ("UPDATE events SET payload_kind = 7", "unknown payload kind 7"),
            ("UPDATE events SET body = CAST('{' AS BLOB)", "is not JSON"),
            ("UPDATE deliveries SET status = 'lost' WHERE handler = 'a'", "`lost` is not one of"),
            ("UPDATE attempts SET duration_ms = -1", "out of range"),
        ];
        for (damage, says) in cases {
            let dir = tempfile::tempdir().expect("a temp dir");
            let path = dir.path().join("db.sqlite");
            let id = one_finished_event(&path).await;
            Connection::open(&path).expect("opening by hand").execute_batch(damage).expect(damage);
            let store = SqliteStore::open(&path, Role::Client).expect("opening");
            match store.get_event(id).await {
                Err(StoreError::Corrupt(message)) => assert!(message.contains(says), "{damage}: {message}"),
                other => panic!("{damage}: expected Corrupt, got {other:?}"),
            }
            assert!(store.shared.fault.get().is_none(), "{damage}: one bad value does not mark the file damaged");
            store.close().await;
        }
    }

    #[tokio::test]
    async fn an_unknown_status_or_counter_kind_makes_stats_fail_rather_than_count_it_as_failed() {
        // `stats` reads the counters (README "Counters"), so a state is damaged there.
        for damage in ["INSERT INTO tally_totals VALUES ('s', '', 'limbo', 1)", "INSERT INTO counters VALUES ('s', 'gremlins', 0, 1)"] {
            let dir = tempfile::tempdir().expect("a temp dir");
            let path = dir.path().join("db.sqlite");
            one_finished_event(&path).await;
            Connection::open(&path).expect("opening by hand").execute_batch(damage).expect(damage);
            let store = SqliteStore::open(&path, Role::Client).expect("opening");
            assert!(matches!(store.stats(None, None).await, Err(StoreError::Corrupt(_))), "{damage}");
            store.close().await;
        }
    }

    #[tokio::test]
    async fn a_json_body_nested_128_deep_reads_back_as_its_payload_and_can_be_matched() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        let mut ev = event("s", 0);
        ev.body = Bytes::from(format!("{}{}", "[".repeat(128), "]".repeat(128)));
        ev.handlers = vec!["a".into()];
        let id = store.insert_event(ev).await.expect("inserting").id;
        let depth = |mut v: &Value| {
            let mut n = 0;
            while let Some(inner) = v.as_array() {
                n += 1;
                match inner.first() {
                    Some(next) => v = next,
                    None => break,
                }
            }
            n
        };
        assert_eq!(depth(&store.get_event(id).await.expect("reading").expect("stored").payload), 128);
        let c = store.claim("me", "a", 1, Duration::from_secs(60)).await.expect("claiming").pop().expect("due");
        assert_eq!(depth(&c.payload), 128, "the handler gets it too");

        let mut ev = event("s", 0);
        ev.body = Bytes::from(format!(r#"{{"k":"v","deep":{}{}}}"#, "[".repeat(127), "]".repeat(127)));
        let deep = store.insert_event(ev).await.expect("inserting").id;
        let filter = EventFilter { matches: vec![("/k".into(), "v".into())], ..Default::default() };
        let found: Vec<EventId> = store.list_events(filter, Detail::Summary).await.expect("listing").iter().map(|e| e.id).collect();
        assert_eq!(found, [deep], "--match reads it too");
        store.close().await;
    }

    #[tokio::test]
    async fn replay_plan_lists_exactly_what_replay_requeues() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        let id = one_finished_event(&path).await;
        let store = SqliteStore::open(&path, Role::All).expect("opening");
        let mut ev = event("s", 2);
        ev.handlers = vec!["a".into()];
        let running = store.insert_event(ev).await.expect("inserting").id;
        store.claim("me", "a", 1, Duration::from_secs(60)).await.expect("claiming").pop().expect("due");
        let plan = |handler: Option<&str>, only_failed| {
            let store = &store;
            let handler = handler.map(str::to_string);
            async move {
                let plan = store.replay_plan(vec![id, running], handler, only_failed).await.expect("planning");
                plan.into_iter().map(|r| (r.event_id, r.handler, r.status, r.attempt_count)).collect::<Vec<_>>()
            }
        };
        assert_eq!(
            plan(None, false).await,
            [(id, "a".into(), DeliveryStatus::Succeeded, 1), (id, "b".into(), DeliveryStatus::Failed, 1)],
            "never the running delivery"
        );
        assert_eq!(plan(None, true).await, [(id, "b".into(), DeliveryStatus::Failed, 1)]);
        assert_eq!(plan(Some("a"), false).await, [(id, "a".into(), DeliveryStatus::Succeeded, 1)]);
        assert_eq!(store.backlog(), 1, "the running delivery");
        assert_eq!(store.replay(vec![id, running], None, false).await.expect("replaying"), 2, "as planned");
        assert_eq!(store.backlog(), 3, "both replayed deliveries are unfinished again, counted once each");
        assert_eq!(store.replay(vec![id], None, false).await.expect("replaying again"), 2);
        assert_eq!(store.backlog(), 3, "replaying pending deliveries adds nothing to the backlog");
        store.close().await;
    }

    #[tokio::test]
    async fn admission_refuses_below_min_free_bytes_in_a_process_that_ingests() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, Role::Ingest).expect("creating").with_min_free_bytes(u64::MAX - 1);
        match store.admission() {
            Err(StoreError::NearlyFull { free, min_free }) => assert!(free > 0 && min_free == u64::MAX - 1),
            other => panic!("expected NearlyFull, got {other:?}"),
        }
        store.close().await;
        let store = SqliteStore::open(&path, Role::All).expect("opening");
        assert!(store.admission().is_ok(), "0 (the default) disables the check");
        store.close().await;
        let store = SqliteStore::open(&path, Role::Process).expect("opening").with_min_free_bytes(u64::MAX - 1);
        assert!(store.admission().is_ok(), "a process that does not ingest admits nothing and checks nothing");
        store.close().await;
    }
}
