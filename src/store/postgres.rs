//! PostgreSQL backend: several nodes on one database (README "Several
//! nodes: PostgreSQL").
//!
//! - **Ingest** is group-committed like SQLite's: inserts wait on a channel,
//!   a few writer tasks each take whatever is waiting and store it in one
//!   transaction (multi-row `INSERT … SELECT FROM unnest(…)`), with
//!   `synchronous_commit = on`, and answer only after `COMMIT` returned.
//! - **Dedup** across nodes rests on the primary key of `dedup`: `INSERT …
//!   ON CONFLICT` makes a second node receiving the same key wait for the
//!   first's commit and then see its event, so exactly one is stored.
//! - **Claims** lock due rows with `FOR UPDATE SKIP LOCKED`, in batches,
//!   with times from the database's `now()`. A lease is the delivery's
//!   `lease_owner` (unique per process) plus its attempt number: a node that
//!   lost its lease matches neither after a takeover, so its late `finish`
//!   changes nothing (see `finish`).
//! - **Wake-ups**: after a commit that queued work, this process's
//!   processor is woken at once; other nodes learn of it by one
//!   `pg_notify` per [`NOTIFY_EVERY`] at most, sent as its own statement
//!   after the commit, never inside the ingest transaction (a NOTIFY in the
//!   commit serialises committing transactions). A processor LISTENs on one
//!   connection of its own and listens again after reconnecting; its
//!   `poll_interval` covers lost notifications.
//! - **The database away**: every call fails with
//!   [`StoreError::Unavailable`] (ingest answers 503 with `Retry-After`,
//!   `/readyz` fails, the processor retries), and the pool reconnects by
//!   itself when the database is back.

mod connect;
mod finish;
mod ordering;
pub use connect::check_url;
mod schema;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt as _;
use serde::Deserialize as _;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;

use super::*;

/// Connections in the pool: writers, claims, reads.
const POOL_SIZE: usize = 16;
/// Writer tasks committing ingest batches side by side: PostgreSQL commits
/// several transactions at once, and one writer would leave it idle while
/// it waits for its own fsync.
const WRITERS: usize = 4;
/// Most events in one ingest transaction.
const MAX_BATCH: usize = 512;
/// Inserts that may wait for a writer; beyond this, ingest answers 503.
const QUEUE_DEPTH: usize = 16 * 1024;
/// At most one `pg_notify` per this interval per node.
const NOTIFY_EVERY: Duration = Duration::from_millis(50);
/// The channel processors LISTEN on.
const CHANNEL: &str = "hooktrail_work";
/// How long a LISTEN connection waits before connecting again.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);
/// How often counted rejections are written when no ingest commit takes them along.
const COUNTS_EVERY: Duration = Duration::from_millis(250);
/// How often a daemon recounts the backlog (other nodes change it too) and
/// removes expired dedup keys.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);
/// Expired dedup keys removed per pass, so one pass never holds locks long.
const DEDUP_CLEANUP_BATCH: i64 = 1000;
/// Times a transaction is run again after a deadlock or serialization failure.
const RETRIES: usize = 3;
const SECS_PER_HOUR: i64 = 3600;

/// `payload_kind`: how an event's normalized view is stored (as on SQLite).
const PAYLOAD_NULL: i16 = 0;
const PAYLOAD_IS_BODY: i16 = 1;
const PAYLOAD_JSON: i16 = 2;

/// [`rules::unfinished`] as SQL, spelt as the partial index `deliveries_due`
/// spells it so the planner uses it (a test checks it agrees with the rule).
macro_rules! unfinished_sql {
    () => {
        "('pending', 'retrying', 'running')"
    };
}

/// The head rows of the keyed deliveries a statement just inserted (a CTE
/// `dl` returning `id, event_id, handler, order_key`), as `rules`
/// ("Ordered claims", insert) says: a key without a row gets one; a key
/// whose head has not begun and is younger (a batch of another node, or of
/// a writer that made its ids later, committed first) gets the older one.
/// `ON CONFLICT DO UPDATE` locks the existing row, so an insert racing a
/// claim that is deleting the row (the key ran dry) waits for it and then
/// inserts a fresh one: a key's new delivery is never left without a head.
/// One row per key (the oldest of the batch), in key order, so two batches
/// lock rows in one order.
macro_rules! new_heads_from_dl {
    () => {
        "INSERT INTO order_heads (handler, key, delivery_id, event_id, due)
         SELECT DISTINCT ON (handler, order_key) handler, order_key, id, event_id, now() FROM dl
         WHERE order_key IS NOT NULL ORDER BY handler, order_key, event_id
         ON CONFLICT (handler, key) DO UPDATE SET delivery_id = EXCLUDED.delivery_id, event_id = EXCLUDED.event_id, due = EXCLUDED.due
         WHERE order_heads.event_id > EXCLUDED.event_id AND NOT order_heads.blocked
           AND EXISTS (SELECT 1 FROM deliveries o WHERE o.id = order_heads.delivery_id AND o.status = 'pending')"
    };
}

/// The CTEs `dl` and `hd` and the final `SELECT` of a statement that stores
/// pending deliveries from arrays (the statement parameters named: event
/// ids, handlers, sources, hours, ordering keys) and gives their keys head
/// rows ([`new_heads_from_dl`]).
macro_rules! deliveries_with_heads {
    ($events:literal, $handlers:literal, $sources:literal, $hours:literal, $keys:literal) => {
        concat!(
            "dl AS (
                INSERT INTO deliveries (event_id, handler, status, next_at, queued_at, updated_at, source, hour, order_key)
                SELECT e, h, 'pending', now(), now(), now(), s, hr, k
                FROM unnest(",
            $events,
            "::text[], ",
            $handlers,
            "::text[], ",
            $sources,
            "::text[], ",
            $hours,
            "::int8[], ",
            $keys,
            "::text[]) AS u(e, h, s, hr, k)
                RETURNING id, event_id, handler, order_key
             ), hd AS (",
            new_heads_from_dl!(),
            ") SELECT 1"
        )
    };
}

/// Stores events' search words (`scale::index_words`, joined by spaces):
/// the event ids and the words are the statement parameters named. An
/// event without a word gets no row (a search always has one).
macro_rules! event_words_insert {
    ($ids:literal, $words:literal) => {
        concat!(
            "INSERT INTO event_words (event_id, words) SELECT i, string_to_array(w, ' ') FROM unnest(",
            $ids,
            "::text[], ",
            $words,
            "::text[]) AS u(i, w) WHERE w <> ''"
        )
    };
}

/// [`rules::prunable`] as SQL (a test checks it agrees with the rule).
macro_rules! prunable_sql {
    () => {
        "('done', 'failed')"
    };
}

// After the SQL spellings of the rules, which they use.
mod claim;
mod functions;
mod scale;

/// The smallest event id that can have been received at or after `t` (ids
/// are ULIDs made after receipt, and their text sorts by time).
fn id_floor(t: DateTime<Utc>) -> String {
    let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
    format!("evt_{}", ulid::Ulid::from_parts(ms, 0))
}

/// A duration as a count of microseconds for `$n * interval '1 microsecond'`.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2)
}

type Counts = HashMap<(String, RejectReason), u64>;

/// An insert waiting for a writer.
struct Waiting {
    ev: NewEvent,
    reply: oneshot::Sender<Result<Inserted, StoreError>>,
}

struct Shared {
    pool: Pool,
    backlog: AtomicI64,
    /// Bumped by every local change of `backlog`, so a recount that raced
    /// one is not stored over it (see [`maintenance`]).
    backlog_changes: std::sync::atomic::AtomicU64,
    work: Arc<Notify>,
    /// Asks the notifier task to tell other nodes (see [`notifier`]).
    tell_others: Notify,
    rejections: Mutex<Counts>,
    closing: AtomicBool,
    ids: Mutex<ulid::Generator>,
    /// Held by a writer storing a batch with ordering keys, from making its
    /// ids to its commit: keyed events of this node commit in id order, so a
    /// key's head is never younger than a delivery committed after it
    /// (see `ordering`).
    keyed: tokio::sync::Mutex<()>,
}

impl Shared {
    fn next_id(&self) -> EventId {
        let mut ids = self.ids.lock().expect("id generator lock poisoned");
        // The generator fails only if 2^80 ids were made in one millisecond.
        EventId(ids.generate().unwrap_or_else(|_| ulid::Ulid::new()))
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(StoreError::ShuttingDown);
        }
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.check_open()?;
        self.pool.get().await.map_err(connect::pool_error)
    }

    /// New work was committed: wake this process's processor now, and other nodes soon.
    fn new_work(&self) {
        self.work.notify_waiters();
        self.work.notify_one();
        self.tell_others.notify_one();
    }

    fn add_backlog(&self, delta: i64) {
        if delta != 0 {
            self.backlog_changes.fetch_add(1, Ordering::SeqCst);
            let _ = self.backlog.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some((n + delta).max(0)));
        }
    }

    fn take_counts(&self) -> Counts {
        std::mem::take(&mut *self.rejections.lock().expect("rejection counter lock poisoned"))
    }

    /// Counts that could not be stored go back, for the next commit.
    fn keep_counts(&self, counts: Counts) {
        let mut pending = self.rejections.lock().expect("rejection counter lock poisoned");
        for (k, n) in counts {
            *pending.entry(k).or_default() += n;
        }
    }
}

/// The PostgreSQL backend (`storage.backend = "postgres"`). Opened through
/// [`crate::store::open`].
pub struct PostgresStore {
    shared: Arc<Shared>,
    ingest: Mutex<Option<mpsc::Sender<Waiting>>>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    /// Finishes and begun marks waiting for a finisher (see `finish`).
    finishes: Mutex<Option<mpsc::UnboundedSender<finish::Queued>>>,
    finishers: Mutex<Vec<JoinHandle<()>>>,
    background: CancellationToken,
    commit_timeout: Duration,
}

impl PostgresStore {
    /// Connects, migrates (a daemon) or checks the schema (a command), and
    /// starts the writers and, for a daemon, the background tasks `role`
    /// needs. Must be called within a tokio runtime.
    pub fn open(cfg: &crate::config::PostgresConfig, role: Role, commit_timeout: Duration) -> Result<Self, StoreError> {
        let url = String::from_utf8_lossy(cfg.url.expose()).into_owned();
        let open_err = |message: String| StoreError::Open { path: format!("(the URL in `{}`)", cfg.url_env), message };
        let target = connect::target(&url, &cfg.url_env).map_err(open_err)?;
        tracing::debug!(tls = ?target.mode, "opening the PostgreSQL store");
        let rt = tokio::runtime::Handle::try_current().map_err(|_| open_err("the PostgreSQL backend needs a tokio runtime".into()))?;

        // Migrating (or checking) and the first count need the database now;
        // `open` is not async, so that runs on a thread of its own with a
        // runtime of its own, whatever runtime the caller has.
        let (config, tls) = (target.config.clone(), target.tls.clone());
        let backlog = std::thread::spawn(move || -> Result<i64, String> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let (mut client, conn) = config.connect(tls).await.map_err(|e| connect::neutral(e).to_string())?;
                let driver = tokio::spawn(conn);
                let result = async {
                    if role.is_daemon() {
                        schema::migrate(&mut client).await.map_err(|e| e.to_string())?;
                    } else {
                        schema::check(&client).await?;
                    }
                    let n: i64 = client
                        .query_one(concat!("SELECT count(*) FROM deliveries WHERE status IN ", unfinished_sql!()), &[])
                        .await
                        .map_err(|e| connect::neutral(e).to_string())?
                        .get(0);
                    Ok(n)
                }
                .await;
                drop(client);
                let _ = driver.await;
                result
            })
        })
        .join()
        .map_err(|_| open_err("the connecting thread panicked".into()))?
        .map_err(open_err)?;

        let manager =
            Manager::from_config(target.config.clone(), target.tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(commit_timeout))
            .create_timeout(Some(commit_timeout))
            .build()
            .map_err(|e| open_err(e.to_string()))?;
        let shared = Arc::new(Shared {
            pool,
            backlog: AtomicI64::new(backlog),
            backlog_changes: std::sync::atomic::AtomicU64::new(0),
            work: Arc::new(Notify::new()),
            tell_others: Notify::new(),
            rejections: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            ids: Mutex::new(ulid::Generator::new()),
            keyed: tokio::sync::Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel::<Waiting>(QUEUE_DEPTH);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let writers = (0..WRITERS).map(|_| rt.spawn(writer(shared.clone(), rx.clone()))).collect();
        let (finishes, finish_rx) = mpsc::unbounded_channel();
        let finish_rx = Arc::new(tokio::sync::Mutex::new(finish::Inbox::new(finish_rx)));
        let finishers = (0..finish::FINISHERS).map(|_| rt.spawn(finish::finisher(shared.clone(), finish_rx.clone()))).collect();
        let background = CancellationToken::new();
        let cancel = background.clone();
        rt.spawn(cancel.clone().run_until_cancelled_owned(notifier(shared.clone())));
        if role.is_daemon() {
            rt.spawn(cancel.clone().run_until_cancelled_owned(maintenance(shared.clone())));
            rt.spawn(cancel.clone().run_until_cancelled_owned(count_writer(shared.clone())));
            rt.spawn(cancel.clone().run_until_cancelled_owned(scale::folder(shared.clone())));
        }
        if role.processes() {
            rt.spawn(cancel.run_until_cancelled_owned(listener(target.config, target.tls, shared.work.clone())));
        }
        Ok(PostgresStore {
            shared,
            ingest: Mutex::new(Some(tx)),
            writers: Mutex::new(writers),
            finishes: Mutex::new(Some(finishes)),
            finishers: Mutex::new(finishers),
            background,
            commit_timeout,
        })
    }

    /// Runs `f` in a transaction, again after a deadlock or serialization
    /// failure between nodes (at most [`RETRIES`] times).
    async fn in_tx<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'a> Fn(&'a deadpool_postgres::Transaction<'a>) -> futures_util::future::BoxFuture<'a, Result<T, tokio_postgres::Error>>,
    {
        let mut client = self.shared.client().await?;
        let mut tries = 0;
        loop {
            let tx = client.transaction().await.map_err(connect::neutral)?;
            let result = match f(&tx).await {
                Ok(v) => tx.commit().await.map(|()| v),
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if connect::retryable(&e) && tries < RETRIES => tries += 1,
                Err(e) => return Err(connect::neutral(e)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Background tasks

/// A writer: takes every insert waiting (up to [`MAX_BATCH`]) and commits
/// them in one transaction; until the channel closes (`close`) and is drained.
async fn writer(shared: Arc<Shared>, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Waiting>>>) {
    loop {
        let mut batch = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(w) => batch.push(w),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
        }
        commit_batch(&shared, batch).await;
    }
}

/// Stores a batch in one transaction and answers everyone in it. If the
/// transaction fails for a reason other than the database being away, each
/// insert is tried alone so one bad event cannot refuse its neighbours.
async fn commit_batch(shared: &Shared, batch: Vec<Waiting>) {
    let keyed = batch.iter().any(|w| w.ev.order_keys.iter().any(Option::is_some));
    let _in_id_order = if keyed { Some(shared.keyed.lock().await) } else { None };
    let counts = shared.take_counts();
    let events: Vec<&NewEvent> = batch.iter().map(|w| &w.ev).collect();
    let result = store_events(shared, &events, &counts).await;
    let answers = match result {
        Ok(answers) => answers.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => {
            shared.keep_counts(counts);
            if batch.len() == 1 || matches!(e, StoreError::Unavailable(_) | StoreError::ShuttingDown) {
                tracing::error!(error = %e, events = batch.len(), "ingest commit failed; answering 503");
                let message = e.to_string();
                batch.iter().map(|_| Err(again(&e, &message))).collect()
            } else {
                let mut answers = Vec::with_capacity(batch.len());
                for w in &batch {
                    answers.push(store_events(shared, &[&w.ev], &Counts::new()).await.map(|mut a| a.remove(0)));
                }
                answers
            }
        }
    };
    for (w, answer) in batch.into_iter().zip(answers) {
        // The sender may have given up (request timeout); the write stands either way.
        let _ = w.reply.send(answer);
    }
}

/// The same error for each caller of a failed batch.
fn again(e: &StoreError, message: &str) -> StoreError {
    match e {
        StoreError::ShuttingDown => StoreError::ShuttingDown,
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        _ => StoreError::Backend(message.to_string()),
    }
}

/// One ingest transaction: dedup keys first (each may find a live twin),
/// then every new event and its deliveries in two multi-row statements,
/// then the counters. Answers in the order of `events`.
async fn store_events(shared: &Shared, events: &[&NewEvent], counts: &Counts) -> Result<Vec<Inserted>, StoreError> {
    let mut client = shared.pool.get().await.map_err(connect::pool_error)?;
    if counts.is_empty() && events.iter().all(|ev| ev.dedup.is_none()) {
        let (answers, queued) = insert_pipelined(shared, &client, events).await.map_err(connect::neutral)?;
        if queued > 0 {
            shared.add_backlog(queued);
            shared.new_work();
        }
        return Ok(answers);
    }
    let mut tries = 0;
    loop {
        let tx = client.transaction().await.map_err(connect::neutral)?;
        match insert_in(shared, &tx, events, counts).await {
            Ok((answers, queued)) => match tx.commit().await {
                Ok(()) => {
                    if queued > 0 {
                        shared.add_backlog(queued);
                        shared.new_work();
                    }
                    return Ok(answers);
                }
                Err(e) if connect::retryable(&e) && tries < RETRIES => tries += 1,
                Err(e) => return Err(connect::neutral(e)),
            },
            Err(e) if connect::retryable(&e) && tries < RETRIES => tries += 1,
            Err(e) => return Err(connect::neutral(e)),
        }
    }
}

/// The common batch (no dedup key, no counts to add) in one round trip:
/// `BEGIN`, one statement storing every event and delivery, and `COMMIT`,
/// sent together (tokio-postgres pipelines requests polled at once). The
/// server runs them in order; an error in the statement aborts the
/// transaction (the `COMMIT` then rolls back), and the batch succeeds only
/// when all three did.
async fn insert_pipelined(
    shared: &Shared,
    client: &deadpool_postgres::Object,
    events: &[&NewEvent],
) -> Result<(Vec<Inserted>, i64), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(concat!(
            "WITH ev AS (
                INSERT INTO events (id, source, status, received_at, method, content_type, query, headers, remote_addr, body, payload_kind, payload)
                SELECT c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12
                FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                            $8::text[], $9::text[], $10::bytea[], $11::int2[], $12::text[])
                     AS u(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12)
             ), wd AS (",
            event_words_insert!("$1", "$15"),
            "), ",
            deliveries_with_heads!("$13", "$14", "$16", "$17", "$18"),
        ))
        .await?;
    let mut cols = EventColumns::default();
    let mut answers = Vec::with_capacity(events.len());
    for ev in events {
        let id = shared.next_id();
        cols.push(id, ev);
        answers.push(Inserted { id, duplicate: false });
    }
    let mut params = cols.event_params();
    params.extend([&cols.d_event as &(dyn ToSql + Sync), &cols.d_handler, &cols.words, &cols.d_source, &cols.d_hour, &cols.d_key]);
    // The ack means durable, whatever the database's default is.
    let (begun, stored, committed) = tokio::join!(
        client.batch_execute("BEGIN; SET LOCAL synchronous_commit = on"),
        client.query(&stmt, &params),
        client.batch_execute("COMMIT"),
    );
    begun?;
    stored?;
    committed?;
    Ok((answers, cols.d_event.len() as i64))
}

/// Returns the answers and the number of deliveries queued.
async fn insert_in(
    shared: &Shared,
    tx: &deadpool_postgres::Transaction<'_>,
    events: &[&NewEvent],
    counts: &Counts,
) -> Result<(Vec<Inserted>, i64), tokio_postgres::Error> {
    // The ack means durable, whatever the database's default is.
    tx.batch_execute("SET LOCAL synchronous_commit = on").await?;
    let mut counts = counts.clone();
    let mut answers = Vec::with_capacity(events.len());
    let claim_key = tx
        .prepare_cached(
            "INSERT INTO dedup (source, key, event_id, expires_at) VALUES ($1, $2, $3, now() + $4::int8 * interval '1 microsecond')
             ON CONFLICT (source, key) DO UPDATE SET event_id = EXCLUDED.event_id, expires_at = EXCLUDED.expires_at
             WHERE dedup.expires_at <= now() RETURNING event_id",
        )
        .await?;
    let twin = tx.prepare_cached("SELECT event_id FROM dedup WHERE source = $1 AND key = $2").await?;
    for ev in events {
        let id = shared.next_id();
        let Some((key, window)) = &ev.dedup else {
            answers.push(Inserted { id, duplicate: false });
            continue;
        };
        let mine = tx.query_opt(&claim_key, &[&ev.source, key, &id.to_string(), &micros(*window)]).await?;
        if mine.is_some() {
            answers.push(Inserted { id, duplicate: false });
            continue;
        }
        // A live key: another event holds it (committed, or earlier in this batch).
        let first: String = tx.query_one(&twin, &[&ev.source, key]).await?.get(0);
        let first = first.parse::<EventId>().unwrap_or(id);
        *counts.entry((ev.source.clone(), RejectReason::Duplicate)).or_default() += 1;
        answers.push(Inserted { id: first, duplicate: true });
    }

    let mut cols = EventColumns::default();
    for (ev, a) in events.iter().zip(&answers) {
        if a.duplicate {
            continue;
        }
        cols.push(a.id, ev);
    }
    if !cols.id.is_empty() {
        let stmt = tx
            .prepare_cached(concat!(
                "WITH ev AS (
                    INSERT INTO events (id, source, status, received_at, method, content_type, query, headers, remote_addr, body, payload_kind,
                                        payload)
                    SELECT c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12
                    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                                $8::text[], $9::text[], $10::bytea[], $11::int2[], $12::text[])
                         AS u(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12)
                 ) ",
                event_words_insert!("$1", "$13"),
            ))
            .await?;
        let mut params = cols.event_params();
        params.push(&cols.words);
        tx.execute(&stmt, &params).await?;
    }
    if !cols.d_event.is_empty() {
        let stmt = tx.prepare_cached(concat!("WITH ", deliveries_with_heads!("$1", "$2", "$3", "$4", "$5"))).await?;
        tx.execute(&stmt, &[&cols.d_event, &cols.d_handler, &cols.d_source, &cols.d_hour, &cols.d_key]).await?;
    }
    add_counts(tx, &counts).await?;
    Ok((answers, cols.d_event.len() as i64))
}

/// The columns of a multi-row event insert.
#[derive(Default)]
struct EventColumns {
    id: Vec<String>,
    source: Vec<String>,
    status: Vec<&'static str>,
    received_at: Vec<DateTime<Utc>>,
    method: Vec<String>,
    content_type: Vec<String>,
    query: Vec<String>,
    headers: Vec<String>,
    remote_addr: Vec<String>,
    body: Vec<Vec<u8>>,
    payload_kind: Vec<i16>,
    payload: Vec<Option<String>>,
    /// Each event's search words, as [`scale::index_words`] joins them.
    words: Vec<String>,
    /// The deliveries: event, handler, and the event's source and receive hour.
    d_event: Vec<String>,
    d_handler: Vec<String>,
    d_source: Vec<String>,
    d_hour: Vec<i64>,
    /// Each delivery's ordering key (README "Ordered processing"), if any.
    d_key: Vec<Option<String>>,
}

impl EventColumns {
    /// The events' twelve columns as statement parameters `$1`..`$12`, in
    /// the order both event inserts (`insert_pipelined`, `insert_in`) name them.
    fn event_params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.source,
            &self.status,
            &self.received_at,
            &self.method,
            &self.content_type,
            &self.query,
            &self.headers,
            &self.remote_addr,
            &self.body,
            &self.payload_kind,
            &self.payload,
        ]
    }

    fn push(&mut self, id: EventId, ev: &NewEvent) {
        let (kind, payload) = match &ev.payload {
            Payload::Null => (PAYLOAD_NULL, None),
            Payload::Body => (PAYLOAD_IS_BODY, None),
            Payload::Json(s) => (PAYLOAD_JSON, Some(s.clone())),
        };
        self.id.push(id.to_string());
        self.source.push(ev.source.clone());
        self.status.push(rules::new_event_status(ev.handlers.len()).as_str());
        self.received_at.push(ev.received_at);
        self.method.push(ev.method.clone());
        self.content_type.push(ev.content_type.clone());
        self.query.push(ev.query.clone());
        self.headers.push(ev.headers.clone());
        self.remote_addr.push(ev.remote_addr.clone());
        self.body.push(ev.body.to_vec());
        self.payload_kind.push(kind);
        self.payload.push(payload);
        self.words.push(scale::new_index_words(&ev.payload, &ev.body));
        for (i, h) in ev.handlers.iter().enumerate() {
            self.d_event.push(id.to_string());
            self.d_handler.push(h.clone());
            self.d_source.push(ev.source.clone());
            self.d_hour.push(rules::tally_hour(ev.received_at));
            self.d_key.push(ev.order_keys.get(i).cloned().flatten());
        }
    }
}

async fn add_counts(tx: &deadpool_postgres::Transaction<'_>, counts: &Counts) -> Result<(), tokio_postgres::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let hour = Utc::now().timestamp() / SECS_PER_HOUR;
    // Sorted, so two nodes adding to the same rows lock them in one order.
    let sorted: BTreeMap<(&str, &str), i64> = counts.iter().map(|((s, r), n)| ((s.as_str(), r.as_str()), *n as i64)).collect();
    let sources: Vec<&str> = sorted.keys().map(|k| k.0).collect();
    let kinds: Vec<&str> = sorted.keys().map(|k| k.1).collect();
    let ns: Vec<i64> = sorted.values().copied().collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO counters (source, kind, hour, n) SELECT s, k, $3, n FROM unnest($1::text[], $2::text[], $4::int8[]) AS u(s, k, n)
             ON CONFLICT (source, kind, hour) DO UPDATE SET n = counters.n + EXCLUDED.n",
        )
        .await?;
    tx.execute(&stmt, &[&sources, &kinds, &hour, &ns]).await?;
    Ok(())
}

/// Tells other nodes that work was queued: at most one `pg_notify` per
/// [`NOTIFY_EVERY`], each its own statement after the commit that queued
/// the work. Requests while it waits fold into the next one.
async fn notifier(shared: Arc<Shared>) {
    loop {
        shared.tell_others.notified().await;
        match shared.pool.get().await {
            Ok(client) => {
                if let Err(e) = client.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await {
                    tracing::debug!(error = %e, "pg_notify failed; other nodes find the work by polling");
                }
            }
            Err(e) => tracing::debug!(error = %e, "pg_notify skipped: no connection"),
        }
        tokio::time::sleep(NOTIFY_EVERY).await;
    }
}

/// Holds one LISTEN connection and wakes the processor on each
/// notification; after losing the connection it connects and listens
/// again, and wakes the processor once (a notification may have been missed).
async fn listener(config: tokio_postgres::Config, tls: tokio_postgres_rustls::MakeRustlsConnect, work: Arc<Notify>) {
    loop {
        match listen_once(&config, tls.clone(), &work).await {
            Ok(()) => tracing::warn!("LISTEN connection closed; listening again"),
            Err(e) => tracing::warn!(error = %connect::neutral(e), "LISTEN connection failed; trying again"),
        }
        work.notify_one();
        tokio::time::sleep(RELISTEN_AFTER).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    work: &Notify,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut conn) = config.connect(tls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), tokio_postgres::Error>>();
    // Aborted however this ends (the store closing drops this future), so
    // the LISTEN connection never outlives it.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            let stop = m.is_err();
            if tx.send(m.map(|_| ())).is_err() || stop {
                return;
            }
        }
    }));
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Anything queued while no one listened.
    work.notify_one();
    let result = loop {
        match rx.recv().await {
            Some(Ok(())) => {
                work.notify_waiters();
                work.notify_one();
            }
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    result
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes counted rejections that no ingest commit took along (a flood of
/// refusals and nothing accepted), so `stats` shows them soon.
async fn count_writer(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(COUNTS_EVERY).await;
        let counts = shared.take_counts();
        if counts.is_empty() {
            continue;
        }
        if let Err(e) = write_counts(&shared, &counts).await {
            tracing::debug!(error = %e, "writing rejection counts failed; kept for the next try");
            shared.keep_counts(counts);
        }
    }
}

async fn write_counts(shared: &Shared, counts: &Counts) -> Result<(), StoreError> {
    let mut client = shared.pool.get().await.map_err(connect::pool_error)?;
    let tx = client.transaction().await.map_err(connect::neutral)?;
    add_counts(&tx, counts).await.map_err(connect::neutral)?;
    tx.commit().await.map_err(connect::neutral)
}

/// A daemon's housekeeping: recounts the backlog (other nodes change it)
/// and removes expired dedup keys in small batches.
async fn maintenance(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(MAINTENANCE_EVERY).await;
        let Ok(client) = shared.pool.get().await else { continue };
        // A count taken while this process changed the backlog is stale:
        // the next pass counts again.
        let changes = shared.backlog_changes.load(Ordering::SeqCst);
        if let Ok(row) = client.query_one(concat!("SELECT count(*) FROM deliveries WHERE status IN ", unfinished_sql!()), &[]).await {
            let n: i64 = row.get(0);
            let _ = shared.backlog.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                (shared.backlog_changes.load(Ordering::SeqCst) == changes).then_some(n).or(Some(old))
            });
        }
        let cleanup = client
            .execute(
                "DELETE FROM dedup WHERE ctid IN (SELECT ctid FROM dedup WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
                &[&DEDUP_CLEANUP_BATCH],
            )
            .await;
        if let Err(e) = cleanup {
            tracing::warn!(error = %e, "dedup cleanup failed");
        }
    }
}

// ---------------------------------------------------------------------------
// Reading rows back

/// Parses a stored JSON document without serde_json's depth guard (every
/// stored document passed ingest's depth check; see the SQLite backend).
fn json_doc(bytes: &[u8]) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let v = Value::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

fn payload_value(kind: i16, body: &[u8], payload: Option<&str>) -> Result<Value, String> {
    match (kind, payload) {
        (PAYLOAD_NULL, _) => Ok(Value::Null),
        (PAYLOAD_IS_BODY, _) => json_doc(body).map_err(|e| format!("the body, stored as its own JSON payload, is not JSON: {e}")),
        (PAYLOAD_JSON, Some(p)) => json_doc(p.as_bytes()).map_err(|e| format!("the normalized payload is not JSON: {e}")),
        (PAYLOAD_JSON, None) => Err("the normalized payload is missing".into()),
        (other, _) => Err(format!("unknown payload kind {other}")),
    }
}

fn headers_value(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("the stored headers are not JSON: {e}"))
}

/// A stored text that must parse as a domain type (a status, an id).
fn parsed<T: FromStr<Err = String>>(text: &str) -> Result<T, StoreError> {
    text.parse().map_err(StoreError::Corrupt)
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx).map_err(connect::neutral)
}

fn count(row: &Row, idx: usize) -> Result<u64, StoreError> {
    let n: i64 = get(row, idx)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

const EVENT_COLS: &str =
    "e.id, e.source, e.status, e.received_at, e.method, e.content_type, e.query, e.remote_addr, e.payload_kind, e.payload, e.body, e.headers";

fn event_from_row(r: &Row, detail: Detail) -> Result<EventRecord, StoreError> {
    let id: EventId = parsed(get::<&str>(r, 0)?)?;
    let kind: i16 = get(r, 8)?;
    let payload: Option<&str> = get(r, 9)?;
    let body: Vec<u8> = get(r, 10)?;
    let payload = payload_value(kind, &body, payload).map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
    let full = detail == Detail::Full;
    let headers =
        if full { Some(headers_value(get::<&str>(r, 11)?).map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?) } else { None };
    let len = body.len();
    let (text, b64) = match String::from_utf8(body) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))),
    };
    Ok(EventRecord {
        id,
        source: get(r, 1)?,
        status: parsed(get::<&str>(r, 2)?)?,
        received_at: get(r, 3)?,
        method: get(r, 4)?,
        content_type: get(r, 5)?,
        query: get(r, 6)?,
        headers,
        remote_addr: get(r, 7)?,
        body: if full { text } else { None },
        body_base64: if full { b64 } else { None },
        body_bytes: len,
        payload,
        deliveries: None,
    })
}

/// The deliveries (with every attempt) of the given events, by event id.
async fn load_deliveries<C: tokio_postgres::GenericClient>(
    client: &C,
    ids: &[String],
) -> Result<HashMap<String, Vec<DeliveryRecord>>, StoreError> {
    let rows = query_sql(
        client,
        "SELECT d.id, d.event_id, d.handler, d.status, d.attempts, d.next_at, h.event_id FROM deliveries d
             LEFT JOIN order_heads h ON h.handler = d.handler AND h.key = d.order_key AND h.blocked AND h.delivery_id <> d.id
             WHERE d.event_id = ANY($1) ORDER BY d.event_id, d.handler",
        &[&ids],
    )
    .await?;
    let delivery_ids: Vec<i64> = rows.iter().map(|r| get(r, 0)).collect::<Result<_, _>>()?;
    let attempt_rows = query_sql(
        client,
        "SELECT delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output
             FROM attempts WHERE delivery_id = ANY($1) ORDER BY delivery_id, number",
        &[&delivery_ids],
    )
    .await?;
    let mut attempts: HashMap<i64, Vec<AttemptRecord>> = HashMap::new();
    for r in &attempt_rows {
        let number: i32 = get(r, 1)?;
        let duration: i64 = get(r, 3)?;
        let http: Option<i32> = get(r, 6)?;
        attempts.entry(get(r, 0)?).or_default().push(AttemptRecord {
            number: number.max(0) as u32,
            started_at: get(r, 2)?,
            duration_ms: duration.max(0) as u64,
            outcome: parsed(get::<&str>(r, 4)?)?,
            exit_code: get(r, 5)?,
            http_status: http.and_then(|h| u16::try_from(h).ok()),
            error: get(r, 7)?,
            output: get(r, 8)?,
        });
    }
    let mut out: HashMap<String, Vec<DeliveryRecord>> = HashMap::new();
    for r in &rows {
        let id: i64 = get(r, 0)?;
        let status: DeliveryStatus = parsed(get::<&str>(r, 3)?)?;
        let count: i32 = get(r, 4)?;
        out.entry(get(r, 1)?).or_default().push(DeliveryRecord {
            handler: get(r, 2)?,
            status,
            attempt_count: count.max(0) as u32,
            next_attempt_at: if rules::waits_for_its_time(status) { Some(get(r, 5)?) } else { None },
            attempts: attempts.remove(&id).unwrap_or_default(),
            // The blocked head of its key, if another (README "Ordered processing").
            blocked_by: match get::<Option<&str>>(r, 6)? {
                Some(blocker) if rules::waits_for_its_time(status) => Some(parsed(blocker)?),
                _ => None,
            },
        });
    }
    Ok(out)
}

/// A read on a client or in a transaction, its error made neutral.
async fn query_sql<C: tokio_postgres::GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
    c.query(sql, params).await.map_err(connect::neutral)
}

/// The `WHERE` clause of a listing and its parameters (see [`EventFilter`]).
fn filter_sql(f: &EventFilter) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut sql = String::from(" WHERE true");
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let arg = |args: &mut Vec<Box<dyn ToSql + Sync + Send>>, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        format!("${}", args.len())
    };
    if let Some(s) = &f.source {
        let p = arg(&mut args, Box::new(s.clone()));
        sql.push_str(&format!(" AND e.source = {p}"));
    }
    if let Some(s) = f.status {
        let p = arg(&mut args, Box::new(s.as_str().to_string()));
        sql.push_str(&format!(" AND e.status = {p}"));
        if s != EventStatus::Done {
            // A literal the planner can match to the partial index `events_unfinished`.
            sql.push_str(" AND e.status <> 'done'");
        }
    }
    if let Some(t) = f.since {
        let p = arg(&mut args, Box::new(t));
        let q = arg(&mut args, Box::new(id_floor(t)));
        sql.push_str(&format!(" AND e.received_at >= {p} AND e.id >= {q}"));
    }
    if let Some(b) = f.before {
        let p = arg(&mut args, Box::new(b.to_string()));
        sql.push_str(&format!(" AND e.id < {p}"));
    }
    if let Some(a) = f.after {
        let p = arg(&mut args, Box::new(a.to_string()));
        sql.push_str(&format!(" AND e.id > {p}"));
    }
    if let Some(h) = &f.handler {
        let p = arg(&mut args, Box::new(h.clone()));
        sql.push_str(&format!(" AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.handler = {p})"));
    }
    if let Some(words) = scale::narrowing(f) {
        let p = arg(&mut args, Box::new(words));
        sql.push_str(&format!(" AND e.id IN (SELECT event_id FROM event_words WHERE words @> {p}::text[])"));
    }
    for (ptr, val) in &f.matches {
        let path = pointer_path(ptr);
        let p = arg(&mut args, Box::new(path));
        let v = arg(&mut args, Box::new(val.clone()));
        // The scalar at that pointer, as text (`null` for JSON null), as
        // the SQLite backend's json_pointer_is compares it.
        sql.push_str(&format!(
            " AND (SELECT json_typeof(x) IN ('string', 'number', 'boolean', 'null') AND coalesce(x #>> '{{}}', 'null') = {v}
                   FROM (SELECT (CASE e.payload_kind WHEN {PAYLOAD_IS_BODY} THEN convert_from(e.body, 'UTF8') WHEN {PAYLOAD_JSON} THEN e.payload END)::json #> {p} AS x) AS m)"
        ));
    }
    (sql, args)
}

/// A JSON pointer (`/a/b~1c/0`) as a PostgreSQL path array (`{a,b/c,0}`).
fn pointer_path(ptr: &str) -> Vec<String> {
    if ptr.is_empty() {
        return Vec::new();
    }
    ptr.strip_prefix('/').unwrap_or(ptr).split('/').map(|s| s.replace("~1", "/").replace("~0", "~")).collect()
}

fn arg_refs(args: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect()
}

// ---------------------------------------------------------------------------
// Processing

/// Sets an event's status from its deliveries' ([`rules::event_status`]).
/// The event row is locked first, so of two nodes finishing deliveries of
/// one event at once, the second reads the first's committed change.
async fn refresh_event_status(tx: &deadpool_postgres::Transaction<'_>, event_id: &str) -> Result<(), tokio_postgres::Error> {
    tx.execute(&tx.prepare_cached("SELECT 1 FROM events WHERE id = $1 FOR UPDATE").await?, &[&event_id]).await?;
    let rows = tx.query(&tx.prepare_cached("SELECT DISTINCT status FROM deliveries WHERE event_id = $1").await?, &[&event_id]).await?;
    let seen: Vec<DeliveryStatus> = rows.iter().filter_map(|r| r.get::<_, &str>(0).parse().ok()).collect();
    let status = rules::event_status(&seen);
    tx.execute(&tx.prepare_cached("UPDATE events SET status = $1 WHERE id = $2 AND status <> $1").await?, &[&status.as_str(), &event_id])
        .await?;
    Ok(())
}

/// A delivery a replay would take (`--dry-run`; the replay itself is `ordering::replay_in`).
struct Replayed {
    handler: String,
    status: DeliveryStatus,
    attempts: u32,
}

/// The deliveries of one event that a replay re-queues, in handler order.
async fn replay_takes<C: tokio_postgres::GenericClient>(
    client: &C,
    event_id: &str,
    handler: Option<&str>,
    only_failed: bool,
) -> Result<Vec<Replayed>, StoreError> {
    let rows = query_sql(
        client,
        "SELECT id, handler, status, attempts FROM deliveries WHERE event_id = $1 AND ($2::text IS NULL OR handler = $2) ORDER BY handler",
        &[&event_id, &handler],
    )
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        let status: DeliveryStatus = parsed(get::<&str>(r, 2)?)?;
        let attempts: i32 = get(r, 3)?;
        if rules::replay_takes(status, only_failed) {
            out.push(Replayed { handler: get(r, 1)?, status, attempts: attempts.max(0) as u32 });
        }
    }
    Ok(out)
}

/// One imported event with its deliveries and attempts (see
/// [`Store::import_event`]); false when its id is already stored.
async fn import_in(
    tx: &deadpool_postgres::Transaction<'_>,
    ev: &EventRecord,
    body: Vec<u8>,
    payload: &Payload,
    statuses: &[DeliveryStatus],
) -> Result<bool, tokio_postgres::Error> {
    let (kind, payload) = match payload {
        Payload::Null => (PAYLOAD_NULL, None),
        Payload::Body => (PAYLOAD_IS_BODY, None),
        Payload::Json(s) => (PAYLOAD_JSON, Some(s.as_str())),
    };
    let status = rules::event_status(statuses);
    let headers = ev.headers.as_ref().map_or_else(|| "{}".to_string(), Value::to_string);
    let words = scale::stored_index_words(kind, &body, payload);
    let inserted = tx
        .query_opt(
            &tx.prepare_cached(
                "INSERT INTO events (id, source, status, received_at, method, content_type, query, headers, remote_addr, body, payload_kind, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .await?,
            &[
                &ev.id.to_string(),
                &ev.source,
                &status.as_str(),
                &ev.received_at,
                &ev.method,
                &ev.content_type,
                &ev.query,
                &headers,
                &ev.remote_addr,
                &body,
                &kind,
                &payload,
            ],
        )
        .await?;
    if inserted.is_none() {
        return Ok(false);
    }
    let (ids, words) = (vec![ev.id.to_string()], vec![words]);
    tx.execute(&tx.prepare_cached(concat!(event_words_insert!("$1", "$2"), " ON CONFLICT (event_id) DO NOTHING")).await?, &[&ids, &words])
        .await?;
    for (d, status) in ev.deliveries.iter().flatten().zip(statuses) {
        // Waiting ones keep their time; the max_age clock starts at receipt.
        let next_at = d.next_attempt_at.filter(|_| rules::waits_for_its_time(*status)).unwrap_or_else(Utc::now);
        let id: i64 = tx
            .query_one(
                &tx.prepare_cached(
                    "INSERT INTO deliveries (event_id, handler, status, attempts, next_at, queued_at, updated_at, source, hour)
                 VALUES ($1, $2, $3, $4, $5, $6, now(), $7, $8) RETURNING id",
                )
                .await?,
                &[
                    &ev.id.to_string(),
                    &d.handler,
                    &status.as_str(),
                    &(d.attempt_count as i32),
                    &next_at,
                    &ev.received_at,
                    &ev.source,
                    &rules::tally_hour(ev.received_at),
                ],
            )
            .await?
            .get(0);
        for a in &d.attempts {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO attempts (delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                )
                .await?,
                &[
                    &id,
                    &(a.number as i32),
                    &a.started_at,
                    &i64::try_from(a.duration_ms).unwrap_or(i64::MAX),
                    &a.outcome.as_str(),
                    &a.exit_code,
                    &a.http_status.map(i32::from),
                    &a.error,
                    &a.output,
                ],
            )
            .await?;
        }
    }
    Ok(true)
}

impl PostgresStore {
    /// Queues a finish or a begun mark for this process's finishers (see
    /// `finish`); the answer comes after the commit of its batch.
    #[allow(clippy::type_complexity)]
    fn queue_write(&self, write: finish::Write) -> Result<oneshot::Receiver<Result<Option<DeliveryStatus>, StoreError>>, StoreError> {
        self.shared.check_open()?;
        let (reply, answer) = oneshot::channel();
        let finishes = self.finishes.lock().expect("finish sender lock poisoned");
        let Some(tx) = finishes.as_ref() else { return Err(StoreError::ShuttingDown) };
        tx.send(finish::Queued { write, reply }).map_err(|_| StoreError::ShuttingDown)?;
        Ok(answer)
    }
}

/// Boxes a future borrowing a transaction, for [`PostgresStore::in_tx`].
fn boxed<'a, T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a,
) -> futures_util::future::BoxFuture<'a, Result<T, tokio_postgres::Error>> {
    Box::pin(f)
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_event(&self, ev: NewEvent) -> Result<Inserted, StoreError> {
        self.shared.check_open()?;
        let (reply, answer) = oneshot::channel();
        {
            let ingest = self.ingest.lock().expect("ingest sender lock poisoned");
            let Some(tx) = ingest.as_ref() else { return Err(StoreError::ShuttingDown) };
            tx.try_send(Waiting { ev, reply }).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => StoreError::ShuttingDown,
            })?;
        }
        // The write stays queued and may still commit; the sender retries
        // on 503 and dedup catches the repeat (README "Storage faults").
        match tokio::time::timeout(self.commit_timeout, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreError::ShuttingDown),
            Err(_) => Err(StoreError::CommitTimeout(humantime::format_duration(self.commit_timeout).to_string())),
        }
    }

    fn admission(&self) -> Result<(), StoreError> {
        // The database server's disk is its operator's to watch.
        Ok(())
    }

    fn count_rejection(&self, source: &str, reason: RejectReason) {
        *self.shared.rejections.lock().expect("rejection counter lock poisoned").entry((source.to_string(), reason)).or_default() += 1;
    }

    fn backlog(&self) -> u64 {
        self.shared.backlog.load(Ordering::Relaxed).max(0) as u64
    }

    fn work_signal(&self) -> Arc<Notify> {
        self.shared.work.clone()
    }

    async fn list_events(&self, filter: EventFilter, detail: Detail) -> Result<Vec<EventRecord>, StoreError> {
        let client = self.shared.client().await?;
        let rows = match &filter.search {
            Some(needle) => scale::searched(&**client, &filter, needle).await?,
            None => {
                let (where_sql, args) = filter_sql(&filter);
                let order = if filter.ascending { "ASC" } else { "DESC" };
                let limit = filter.limit.map_or("ALL".to_string(), |l| l.to_string());
                let sql = format!("SELECT {EVENT_COLS} FROM events e {where_sql} ORDER BY e.id {order} LIMIT {limit}");
                client.query(&sql, &arg_refs(&args)).await.map_err(connect::neutral)?
            }
        };
        let mut out = rows.iter().map(|r| event_from_row(r, detail)).collect::<Result<Vec<_>, _>>()?;
        if detail == Detail::Full && !out.is_empty() {
            let ids: Vec<String> = out.iter().map(|e| e.id.to_string()).collect();
            let mut ds = load_deliveries(&**client, &ids).await?;
            for e in &mut out {
                e.deliveries = Some(ds.remove(&e.id.to_string()).unwrap_or_default());
            }
        }
        Ok(out)
    }

    async fn get_event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError> {
        let client = self.shared.client().await?;
        let sql = format!("SELECT {EVENT_COLS} FROM events e WHERE e.id = $1");
        let Some(row) = client.query_opt(&sql, &[&id.to_string()]).await.map_err(connect::neutral)? else { return Ok(None) };
        let mut ev = event_from_row(&row, Detail::Full)?;
        let key = id.to_string();
        ev.deliveries = Some(load_deliveries(&**client, std::slice::from_ref(&key)).await?.remove(&key).unwrap_or_default());
        Ok(Some(ev))
    }

    async fn stats(&self, source: Option<String>, since: Option<DateTime<Utc>>) -> Result<Vec<StatsRow>, StoreError> {
        scale::stats(&self.shared, source, since).await
    }

    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError> {
        scale::queue_depth(&self.shared).await
    }

    async fn hourly(&self, since: DateTime<Utc>) -> Result<Vec<HourCounts>, StoreError> {
        scale::hourly(&self.shared, since).await
    }

    async fn claim(&self, owner: &str, handler: &str, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
        // One statement, its own transaction, when the handler has no key
        // heads (see `claim`); deliveries stored with a key keep their order
        // after a reload took `ordering` off, through the ordered claim.
        let client = self.shared.client().await?;
        let (n, lease_us) = (i64::try_from(limit).unwrap_or(i64::MAX), micros(lease));
        let mut tries = 0;
        let found = loop {
            match claim::claim_unkeyed(&client, owner, handler, n, lease_us, true).await {
                Ok(found) => break found,
                Err(e) if connect::retryable(&e) && tries < RETRIES => tries += 1,
                Err(e) => return Err(connect::neutral(e)),
            }
        };
        drop(client);
        match found {
            claim::Unkeyed::Claimed(claimed) => Ok(claimed),
            claim::Unkeyed::HasHeads => self.claim_ordered(owner, handler, OnFailure::Continue, limit, lease).await,
        }
    }

    async fn claim_ordered(
        &self,
        owner: &str,
        handler: &str,
        on_failure: OnFailure,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease_us = micros(lease);
        let (owner, handler) = (owner.to_string(), handler.to_string());
        // One statement, its own transaction (`functions`): the head rows
        // it locks are held for no client round trip.
        let client = self.shared.client().await?;
        let mut tries = 0;
        loop {
            match functions::claim_ordered(&client, &owner, &handler, on_failure, limit, lease_us).await {
                Ok(claimed) => return Ok(claimed),
                Err(e) if connect::retryable(&e) && tries < RETRIES => tries += 1,
                Err(e) => return Err(connect::neutral(e)),
            }
        }
    }

    async fn skip(&self, id: EventId, handler: &str) -> Result<(), SkipError> {
        let handler = handler.to_string();
        let done = self
            .in_tx(|tx| {
                let handler = handler.clone();
                boxed(async move { ordering::skip_in(tx, id, &handler).await })
            })
            .await??;
        self.shared.new_work();
        Ok(done)
    }

    async fn blocked_keys(&self) -> Result<Vec<BlockedKeys>, StoreError> {
        let client = self.shared.client().await?;
        let rows =
            query_sql(&**client, "SELECT handler, count(*) FROM order_heads WHERE blocked GROUP BY handler ORDER BY handler", &[]).await?;
        rows.iter().map(|r| Ok(BlockedKeys { handler: get(r, 0)?, keys: count(r, 1)? })).collect()
    }

    async fn started(&self, owner: &str, delivery_id: i64) -> Result<(), StoreError> {
        // Queued at the first poll, so the mark is written even if the
        // caller stops waiting: within `finish::MARK_WITHIN`, with a batch
        // of this process's finishes, unless the attempt's own finish comes
        // first and clears it. It only shapes the history after a crash
        // (see the trait).
        let answer = self.queue_write(finish::Write::Started { owner: owner.to_string(), delivery_id })?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?.map(|_| ())
    }

    async fn finish(&self, f: Finished) -> Result<(), StoreError> {
        // Answered after the commit of the batch that holds it (see `finish`).
        let answer = self.queue_write(finish::Write::Finish(f))?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?.map(|_| ())
    }

    async fn renew(&self, owner: &str, delivery_id: i64, lease: Duration) -> Result<bool, StoreError> {
        let client = self.shared.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE deliveries SET next_at = now() + $3::int8 * interval '1 microsecond' WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            )
            .await
            .map_err(connect::neutral)?;
        let n = client.execute(&stmt, &[&delivery_id, &owner, &micros(lease)]).await.map_err(connect::neutral)?;
        Ok(n == 1)
    }

    async fn release(&self, owner: &str, ids: Vec<i64>) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        let n = self
            .in_tx(|tx| {
                let (owner, ids) = (owner.clone(), ids.clone());
                boxed(async move {
                    let mut n = 0u64;
                    for id in &ids {
                        let held = tx
                            .query_opt(
                                &tx.prepare_cached(
                                    "SELECT event_id, attempts, budget_from FROM deliveries
                                     WHERE id = $1 AND lease_owner = $2 AND status = 'running' FOR UPDATE",
                                )
                                .await?,
                                &[id, &owner],
                            )
                            .await?;
                        let Some(row) = held else { continue };
                        let (attempts, budget_from): (i32, i32) = (row.get(1), row.get(2));
                        let (status, attempts) = rules::after_release(attempts.max(0) as u32, budget_from.max(0) as u32);
                        tx.execute(
                            &tx.prepare_cached(
                                "UPDATE deliveries SET status = $2, attempts = $3, next_at = now(), lease_owner = NULL, held = false, updated_at = now()
                                 WHERE id = $1",
                            )
                            .await?,
                            &[id, &status.as_str(), &(attempts as i32)],
                        )
                        .await?;
                        ordering::head_follows(tx, *id).await?;
                        refresh_event_status(tx, row.get(0)).await?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .await?;
        if n > 0 {
            self.shared.new_work();
        }
        Ok(n)
    }

    async fn replay(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<u64, StoreError> {
        // Again after a deadlock with a node's claim or finish (`in_tx`).
        let (n, revived) = self
            .in_tx(|tx| {
                let (ids, handler) = (ids.clone(), handler.clone());
                boxed(async move { ordering::replay_in(tx, &ids, handler.as_deref(), only_failed).await })
            })
            .await?;
        self.shared.add_backlog(revived);
        if n > 0 {
            self.shared.new_work();
        }
        Ok(n)
    }

    async fn replay_plan(&self, ids: Vec<EventId>, handler: Option<String>, only_failed: bool) -> Result<Vec<Requeue>, StoreError> {
        let client = self.shared.client().await?;
        let mut plan = Vec::new();
        for id in ids {
            let taken = replay_takes(&**client, &id.to_string(), handler.as_deref(), only_failed).await?;
            plan.extend(taken.into_iter().map(|d| Requeue {
                event_id: id,
                handler: d.handler,
                status: d.status,
                attempt_count: d.attempts,
            }));
        }
        Ok(plan)
    }

    async fn find_ids(&self, filter: EventFilter) -> Result<Vec<EventId>, StoreError> {
        let client = self.shared.client().await?;
        if let Some(needle) = &filter.search {
            let filter = EventFilter { ascending: true, ..filter.clone() };
            let rows = scale::searched(&**client, &filter, needle).await?;
            return rows.iter().map(|r| parsed(get::<&str>(r, 0)?)).collect();
        }
        let (where_sql, args) = filter_sql(&filter);
        let limit = filter.limit.map_or("ALL".to_string(), |l| l.to_string());
        let sql = format!("SELECT e.id FROM events e {where_sql} ORDER BY e.id LIMIT {limit}");
        let rows = client.query(&sql, &arg_refs(&args)).await.map_err(connect::neutral)?;
        rows.iter().map(|r| parsed(get::<&str>(r, 0)?)).collect()
    }

    async fn prune(&self, before: DateTime<Utc>, batch: usize) -> Result<u64, StoreError> {
        let client = self.shared.client().await?;
        let stmt = client
            .prepare_cached(concat!(
                // One small transaction per batch: no long lock on the hot
                // tables. The events' search words go in the same statement.
                "WITH gone AS (DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id < $3 AND status IN ",
                prunable_sql!(),
                " AND received_at < $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id),
                 words AS (DELETE FROM event_words WHERE event_id IN (SELECT id FROM gone))
                 SELECT count(*) FROM gone"
            ))
            .await
            .map_err(connect::neutral)?;
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let row = client.query_one(&stmt, &[&before, &batch, &id_floor(before)]).await.map_err(connect::neutral)?;
            let n = count(&row, 0)?;
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    async fn compact(&self) -> Result<String, StoreError> {
        scale::compact(&self.shared).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut client = self.shared.client().await?;
        let counts = self.shared.take_counts();
        let result = async {
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('last_ping', now()::text) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[],
            )
            .await?;
            add_counts(&tx, &counts).await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = result {
            self.shared.keep_counts(counts);
            return Err(connect::neutral(e));
        }
        Ok(())
    }

    async fn import_event(&self, ev: EventRecord) -> Result<bool, StoreError> {
        let (body, payload, statuses) = import_parts(&ev)?;
        let queued = statuses.iter().filter(|s| rules::unfinished(**s)).count() as i64;
        let stored = self
            .in_tx(|tx| {
                let (ev, body, payload, statuses) = (ev.clone(), body.clone(), payload.clone(), statuses.clone());
                boxed(async move { import_in(tx, &ev, body, &payload, &statuses).await })
            })
            .await?;
        if stored && queued > 0 {
            self.shared.add_backlog(queued);
            self.shared.new_work();
        }
        Ok(stored)
    }

    async fn close(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        // Dropping the sender lets the writers drain what is queued and stop.
        self.ingest.lock().expect("ingest sender lock poisoned").take();
        let writers = std::mem::take(&mut *self.writers.lock().expect("writer list lock poisoned"));
        for w in writers {
            let _ = w.await;
        }
        // Finishes already queued are committed before the pool closes.
        self.finishes.lock().expect("finish sender lock poisoned").take();
        let finishers = std::mem::take(&mut *self.finishers.lock().expect("finisher list lock poisoned"));
        for f in finishers {
            let _ = f.await;
        }
        // Counts not yet written go with a last small transaction.
        let counts = self.shared.take_counts();
        if !counts.is_empty() {
            if let Err(e) = write_counts(&self.shared, &counts).await {
                tracing::warn!(error = %e, "rejection counts not written at close");
            }
        }
        // Deltas counted by this process's last writes (an import) are folded
        // now rather than left for a daemon.
        if let Err(e) = scale::fold(&self.shared).await {
            tracing::debug!(error = %e, "counters not folded at close");
        }
        self.background.cancel();
        self.shared.pool.close();
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.background.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql_list<T: FromStr<Err = String>>(sql: &str) -> Vec<T> {
        sql.trim_matches(|c| c == '(' || c == ')').split(',').map(|s| s.trim().trim_matches('\'').parse().expect("a known name")).collect()
    }

    #[test]
    fn the_sql_spellings_of_rules_agree_with_the_rules() {
        let unfinished: Vec<DeliveryStatus> = sql_list(unfinished_sql!());
        let mut want: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| rules::unfinished(*s)).collect();
        let mut got = unfinished.clone();
        got.sort_by_key(|s| s.as_str());
        want.sort_by_key(|s| s.as_str());
        assert_eq!(got, want);
        let prunable: Vec<EventStatus> = sql_list(prunable_sql!());
        let want: Vec<_> = EventStatus::ALL.iter().copied().filter(|s| rules::prunable(*s)).collect();
        assert_eq!(prunable, want);
    }

    #[test]
    fn json_pointers_become_path_arrays() {
        assert_eq!(pointer_path("/submission_values/email_address/0"), ["submission_values", "email_address", "0"]);
        assert_eq!(pointer_path("/a~1b/c~0d"), ["a/b", "c~d"]);
        assert_eq!(pointer_path(""), Vec::<String>::new());
        assert_eq!(pointer_path("/"), [""]);
    }
}
