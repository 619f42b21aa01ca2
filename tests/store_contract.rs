//! The `Store` contract: the rules README promises about events, deliveries,
//! attempts, leases, replay, prune, listing and counting, checked through
//! `Arc<dyn Store>` alone, so every backend runs the same cases.
//!
//! Each test's name is one rule; its case (same name, in [`cases`]) quotes the
//! README section it comes from and fails if a backend breaks that rule. A
//! test runs its case once per backend from [`backends`], each on a fresh,
//! empty database.
//!
//! Waiting: `started` and `finish` are committed lazily but resolve only after
//! their commit, so a case reads back right after awaiting them. Leases and
//! retry times are real durations; a case that needs one to pass polls
//! `claim` with a deadline ([`claim_when_due`]), never sleeps and hopes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Timelike, Utc};
use hooktrail::store::Role;
use hooktrail::store::{
    self, Claimed, DeliveryRecord, DeliveryStatus, Detail, EventFilter, EventId, EventRecord, EventStatus, Finished, NewEvent, Next,
    Outcome, Payload, RejectReason, StatsRow, Store, StoreError,
};
use serde_json::{json, Value};

#[path = "common/pg.rs"]
#[allow(dead_code)] // the multi-node tests use more of it
mod pg;

// ---------------------------------------------------------------------------
// Backends

/// One database of one backend, empty when created. It can be opened more
/// than once: a second handle is what a second process on the same database
/// (`--role ingest` next to `--role process`, a CLI command) would have.
trait TestDb {
    fn open(&self) -> Arc<dyn Store>;
}

/// A backend the suite can run against.
#[derive(Clone, Copy)]
struct Backend {
    name: &'static str,
    /// A fresh, empty database.
    create: fn() -> Box<dyn TestDb>,
}

/// The backends to run: `$HOOKTRAIL_TEST_BACKEND` (comma-separated names),
/// else those that need no outside service (SQLite).
fn backends() -> Vec<Backend> {
    let all = [
        Backend { name: "sqlite", create: SqliteDb::create },
        // A fresh database on `$HOOKTRAIL_TEST_PG_URL`; run with
        // `HOOKTRAIL_TEST_BACKEND=postgres` (or `sqlite,postgres`).
        Backend { name: "postgres", create: PostgresDb::create },
    ];
    let wanted = std::env::var("HOOKTRAIL_TEST_BACKEND").unwrap_or_else(|_| "sqlite".to_string());
    wanted
        .split(',')
        .map(str::trim)
        .map(|name| {
            *all.iter().find(|b| b.name == name).unwrap_or_else(|| {
                let names: Vec<_> = all.iter().map(|b| b.name).collect();
                panic!("HOOKTRAIL_TEST_BACKEND names `{name}`; the backends are {}", names.join(", "))
            })
        })
        .collect()
}

/// A SQLite database in a temp dir, opened the way the daemon opens it: from
/// a config file's `[storage]` section, with the daemon's role.
struct SqliteDb {
    /// Holds the config and the database; removed when the case is over.
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl SqliteDb {
    fn create() -> Box<dyn TestDb> {
        let dir = tempfile::Builder::new().prefix("hooktrail-contract-").tempdir().expect("creating a temp dir");
        let db = dir.path().join("hooktrail.db");
        // A JSON string is a TOML basic string.
        let db = serde_json::to_string(&db.to_string_lossy()).expect("a path serializes");
        let config = dir.path().join("hooktrail.toml");
        std::fs::write(&config, format!("[storage]\npath = {db}\n")).expect("writing the config");
        Box::new(SqliteDb { _dir: dir, config })
    }
}

impl TestDb for SqliteDb {
    fn open(&self) -> Arc<dyn Store> {
        let cfg = hooktrail::config::load_storage(&self.config).expect("the [storage] section is valid");
        store::open(&cfg, Role::All).expect("opening the SQLite store")
    }
}

/// A fresh PostgreSQL database, opened the way the daemon opens it: from a
/// config whose `url_env` names a variable holding its URL.
struct PostgresDb {
    _db: pg::PgDatabase,
    _dir: tempfile::TempDir,
    config: PathBuf,
    /// The variable the config names (one per database: tests run in parallel).
    var: String,
    url: String,
}

impl PostgresDb {
    fn create() -> Box<dyn TestDb> {
        Box::new(Self::create_one())
    }

    fn create_one() -> PostgresDb {
        let db = pg::PgDatabase::create();
        let dir = tempfile::Builder::new().prefix("hooktrail-contract-pg-").tempdir().expect("creating a temp dir");
        let var = format!("HOOKTRAIL_CONTRACT_PG_{}", ulid::Ulid::new());
        let config = dir.path().join("hooktrail.toml");
        std::fs::write(&config, format!("[storage]\nbackend = \"postgres\"\nurl_env = \"{var}\"\n")).expect("writing the config");
        let url = db.url();
        PostgresDb { _db: db, _dir: dir, config, var, url }
    }
}

impl TestDb for PostgresDb {
    fn open(&self) -> Arc<dyn Store> {
        // The config is read from the environment, as the daemon reads it.
        std::env::set_var(&self.var, &self.url);
        let cfg = hooktrail::config::load_storage(&self.config).expect("the [storage] section is valid");
        store::open(&cfg, Role::All).expect("opening the PostgreSQL store")
    }
}

/// Runs `case` on a fresh store of every backend, closing it afterwards.
async fn on_a_store<F, Fut>(case: F)
where
    F: Fn(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in backends() {
        // Shown with the failure: which backend broke the rule.
        eprintln!("store contract on backend `{}`", backend.name);
        let db = (backend.create)();
        let store = db.open();
        within_case_timeout(case(store.clone())).await;
        store.close().await;
    }
}

/// Runs `case` on a fresh database of every backend; the case opens (and
/// closes) its own handles.
async fn on_a_database<F, Fut>(case: F)
where
    F: Fn(Arc<dyn TestDb>) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in backends() {
        eprintln!("store contract on backend `{}`", backend.name);
        within_case_timeout(case(Arc::from((backend.create)()))).await;
    }
}

/// A backend that hangs fails its case instead of the whole run.
async fn within_case_timeout(case: impl Future<Output = ()>) {
    let limit = Duration::from_secs(120);
    tokio::time::timeout(limit, case).await.unwrap_or_else(|_| panic!("the case did not finish within {limit:?}"));
}

/// One `#[tokio::test]` per rule, running the case of the same name.
macro_rules! contract {
    ($runner:ident: $($rule:ident),+ $(,)?) => {$(
        #[tokio::test]
        async fn $rule() {
            $runner(cases::$rule).await;
        }
    )+};
}

contract!(on_a_store:
    an_event_is_stored_exactly_as_received,
    an_event_with_no_handlers_is_done_and_queues_nothing,
    each_routed_handler_gets_one_pending_delivery,
    a_duplicate_within_the_window_returns_the_first_id_and_stores_nothing,
    the_dedup_window_is_per_source,
    after_the_dedup_window_the_same_key_is_a_new_event,
    claim_takes_due_deliveries_of_its_handler_up_to_the_limit_and_marks_them_running,
    a_claim_hands_over_the_event_as_stored,
    a_leased_delivery_cannot_be_claimed_by_another_owner,
    only_the_owner_can_renew_a_lease_and_renewing_extends_it,
    a_successful_attempt_is_recorded_and_makes_the_delivery_succeeded_and_the_event_done,
    a_failed_attempt_makes_the_delivery_failed_and_it_is_never_claimed_again,
    a_retrying_delivery_is_not_claimed_before_its_next_attempt_time,
    a_late_finish_of_a_taken_over_attempt_does_not_overwrite_the_new_one,
    a_late_finish_of_a_held_delivery_taken_over_with_the_same_number_does_not_decide_it,
    finishes_recorded_together_each_decide_only_what_their_holder_still_holds,
    release_makes_a_delivery_pending_with_no_attempt_and_the_same_number_next,
    a_delivery_held_by_a_crashed_processor_runs_again_as_if_never_claimed,
    an_attempt_interrupted_by_a_crash_is_recorded_and_the_next_claim_gets_the_next_number,
    an_attempt_released_at_shutdown_is_recorded_and_due_again_at_once,
    replay_gives_a_fresh_retry_budget_while_attempt_numbers_continue,
    replay_of_failed_deliveries_leaves_the_others_alone,
    replay_of_one_handler_requeues_only_that_delivery,
    replay_leaves_a_running_delivery_alone,
    the_event_status_follows_its_deliveries,
    prune_deletes_finished_events_and_never_unfinished_ones,
    prune_keeps_events_received_after_the_cutoff,
    list_is_newest_first_and_a_limit_keeps_the_newest,
    list_filters_select_exactly_the_matching_events,
    paging_newest_first_with_before_visits_every_event_once,
    paging_oldest_first_with_after_visits_every_event_once,
    find_ids_selects_the_events_list_selects,
    stats_count_events_duplicates_rejections_and_outcomes_per_source_and_handler,
    stats_since_count_only_events_received_since,
    queue_depth_counts_unfinished_deliveries_per_handler_and_status,
    hourly_counts_received_done_and_failed_events_per_hour,
    backlog_counts_unfinished_deliveries,
    inserts_with_deliveries_and_replays_signal_new_work,
    after_close_writes_fail_with_shutting_down,
    ordered_claims_hand_out_one_delivery_per_key_in_event_order,
    a_head_waiting_for_a_retry_holds_only_its_key,
    with_continue_a_head_that_failed_for_good_lets_the_next_run,
    with_block_a_failed_head_holds_its_key_until_replayed_and_succeeded,
    with_block_a_skipped_head_releases_its_key,
    a_replayed_old_delivery_runs_after_the_running_head_and_before_the_waiting_ones,
    a_head_whose_lease_expired_runs_again_before_anything_later_of_its_key,
    skip_refuses_unknown_events_unknown_handlers_and_unfailed_deliveries_and_changes_nothing,
    a_plain_claim_still_hands_out_keyed_deliveries_one_per_key,
    a_blocker_pruned_with_its_event_no_longer_blocks_its_key,
    counters_equal_a_full_recount_after_random_inserts_claims_retries_releases_replays_and_prunes,
    search_finds_exactly_the_events_whose_payload_or_body_contains_the_words,
);

contract!(on_a_database:
    a_second_handle_sees_every_acknowledged_write_at_once,
    two_processors_on_one_database_never_hold_the_same_delivery,
    two_processors_finishing_deliveries_of_the_same_events_at_once_leave_each_event_its_status,
    closing_and_reopening_keeps_events_deliveries_and_attempts,
);

// ---------------------------------------------------------------------------
// Helpers

/// Long enough never to expire during a test.
const LONG_LEASE: Duration = Duration::from_secs(60);
/// Expires at once: the processor holding it "crashed".
const TINY_LEASE: Duration = Duration::from_millis(1);
/// Long enough for `started` to commit before it expires; then the holder "crashes".
const SHORT_LEASE: Duration = Duration::from_millis(200);
/// How long a case waits for a lease to expire or a retry to come due.
const DEADLINE: Duration = Duration::from_secs(10);

const OWNER: &str = "processor-a";
const OTHER: &str = "processor-b";
const THIRD: &str = "processor-c";

/// An event from `source` routed to `handlers`, with a small JSON body that is its own payload.
fn event(source: &str, handlers: &[&str]) -> NewEvent {
    NewEvent {
        source: source.to_string(),
        received_at: Utc::now(),
        method: "POST".to_string(),
        content_type: "application/json".to_string(),
        query: String::new(),
        headers: r#"{"content-type":"application/json"}"#.to_string(),
        remote_addr: "127.0.0.1:40000".to_string(),
        body: Bytes::from_static(br#"{"n":1}"#),
        payload: Payload::Body,
        dedup: None,
        handlers: handlers.iter().map(|h| h.to_string()).collect(),
        order_keys: Vec::new(),
    }
}

/// `ev` with a JSON body that is its payload.
fn with_body(mut ev: NewEvent, body: Value) -> NewEvent {
    ev.body = Bytes::from(body.to_string());
    ev.payload = Payload::Body;
    ev
}

/// `ev` with a dedup key and window.
fn deduped(mut ev: NewEvent, key: &str, window: Duration) -> NewEvent {
    ev.dedup = Some((key.to_string(), window));
    ev
}

/// Stores a new event (not a duplicate) and returns its id.
async fn insert(store: &dyn Store, ev: NewEvent) -> EventId {
    let ins = store.insert_event(ev).await.expect("insert_event");
    assert!(!ins.duplicate, "a new event was answered as a duplicate of {}", ins.id);
    ins.id
}

async fn show(store: &dyn Store, id: EventId) -> EventRecord {
    store.get_event(id).await.expect("get_event").unwrap_or_else(|| panic!("{id} is not stored"))
}

async fn deliveries(store: &dyn Store, id: EventId) -> Vec<DeliveryRecord> {
    let mut ds = show(store, id).await.deliveries.expect("get_event loads deliveries");
    ds.sort_by(|a, b| a.handler.cmp(&b.handler));
    ds
}

async fn delivery(store: &dyn Store, id: EventId, handler: &str) -> DeliveryRecord {
    let ds = deliveries(store, id).await;
    ds.into_iter().find(|d| d.handler == handler).unwrap_or_else(|| panic!("{id} has no delivery to `{handler}`"))
}

async fn status(store: &dyn Store, id: EventId) -> EventStatus {
    show(store, id).await.status
}

/// Claims exactly one due delivery of `handler`.
async fn claim_one(store: &dyn Store, owner: &str, handler: &str, lease: Duration) -> Claimed {
    let mut got = store.claim(owner, handler, 1, lease).await.expect("claim");
    assert_eq!(got.len(), 1, "expected a due delivery of `{handler}` for {owner}");
    got.remove(0)
}

/// Whatever of `handler` is due now (at most 100), for `owner`.
async fn claim_due(store: &dyn Store, owner: &str, handler: &str) -> Vec<Claimed> {
    store.claim(owner, handler, 100, LONG_LEASE).await.expect("claim")
}

/// Claims for `owner` until a delivery of `handler` comes due (a lease
/// expiring, a retry time passing); fails the case after [`DEADLINE`].
async fn claim_when_due(store: &dyn Store, owner: &str, handler: &str, lease: Duration) -> Claimed {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(c) = store.claim(owner, handler, 1, lease).await.expect("claim").pop() {
            return c;
        }
        assert!(Instant::now() < deadline, "no delivery of `{handler}` came due within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What processor `owner` records after running attempt `c`.
fn finished(owner: &str, c: &Claimed, outcome: Outcome, next: Next) -> Finished {
    Finished {
        owner: owner.into(),
        delivery_id: c.delivery_id,
        attempt: c.attempt,
        started_at: Utc::now(),
        duration_ms: 7,
        outcome,
        exit_code: Some(if outcome == Outcome::Success { 0 } else { 1 }),
        http_status: None,
        error: (outcome != Outcome::Success).then(|| format!("attempt {} did not succeed", c.attempt)),
        output: format!("output of attempt {}", c.attempt),
        next,
    }
}

/// `ev` whose deliveries carry these ordering keys (by handler index).
fn keyed(mut ev: NewEvent, keys: &[Option<&str>]) -> NewEvent {
    ev.order_keys = keys.iter().map(|k| k.map(str::to_string)).collect();
    ev
}

/// An event to ordered handler `h` with key `key` (`None`: no key).
fn to_key(h: &str, key: Option<&str>) -> NewEvent {
    keyed(event("s", &[h]), &[key])
}

/// What an ordered claim of `handler` for [`OWNER`] hands out now.
async fn claim_ordered(store: &dyn Store, handler: &str, on: store::OnFailure) -> Vec<Claimed> {
    store.claim_ordered(OWNER, handler, on, 100, LONG_LEASE).await.expect("claim_ordered")
}

/// The events of claimed deliveries.
fn ids(cs: &[Claimed]) -> BTreeSet<EventId> {
    cs.iter().map(|c| c.event_id).collect()
}

/// Runs claimed `c` to its end with `outcome`, moving it to `next`.
async fn end(store: &dyn Store, c: &Claimed, outcome: Outcome, next: Next) {
    store.started(OWNER, c.delivery_id).await.expect("started");
    store.finish(finished(OWNER, c, outcome, next)).await.expect("finish");
}

/// One attempt of `handler`'s next due delivery, run to its end the way the
/// processor does: claim, `started`, `finish`.
async fn attempt(store: &dyn Store, handler: &str, outcome: Outcome, next: Next) -> Claimed {
    let c = claim_one(store, OWNER, handler, LONG_LEASE).await;
    store.started(OWNER, c.delivery_id).await.expect("started");
    store.finish(finished(OWNER, &c, outcome, next)).await.expect("finish");
    c
}

/// Runs `handler`'s next due delivery, if any, to `next`.
async fn succeed_if_due(store: &dyn Store, handler: &str, outcome: Outcome, next: Next) {
    let Some(c) = store.claim(OWNER, handler, 1, LONG_LEASE).await.expect("claim").pop() else { return };
    store.started(OWNER, c.delivery_id).await.expect("started");
    store.finish(finished(OWNER, &c, outcome, next)).await.expect("finish");
}

async fn succeed(store: &dyn Store, handler: &str) -> Claimed {
    attempt(store, handler, Outcome::Success, Next::Succeeded).await
}

async fn fail(store: &dyn Store, handler: &str) -> Claimed {
    attempt(store, handler, Outcome::Failure, Next::Failed).await
}

/// An attempt that asks to be retried in an hour: the delivery stays `retrying`.
async fn retry_later(store: &dyn Store, handler: &str) -> Claimed {
    attempt(store, handler, Outcome::Retry, Next::RetryAt(Utc::now() + chrono::Duration::hours(1))).await
}

/// Waits until the clock is in a later millisecond than `t` (event ids and
/// time cut-offs are millisecond-precise).
async fn after_millisecond_of(t: DateTime<Utc>) {
    while Utc::now().timestamp_millis() <= t.timestamp_millis() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs `write` and tells whether `signal` fired for it. A wake-up stored
/// before (a `Notify` keeps one for a processor not yet waiting) is dropped
/// first, so only `write` can count.
async fn wakes<T>(signal: &tokio::sync::Notify, write: impl Future<Output = T>) -> (T, bool) {
    let _ = tokio::time::timeout(Duration::ZERO, signal.notified()).await;
    let woken = signal.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let out = write.await;
    (out, tokio::time::timeout(DEADLINE, woken).await.is_ok())
}

async fn list(store: &dyn Store, filter: EventFilter) -> Vec<EventId> {
    store.list_events(filter, Detail::Summary).await.expect("list_events").into_iter().map(|e| e.id).collect()
}

/// A stats row as comparable numbers:
/// (source, handler, received, duplicates, rejected, pending, processing, succeeded, retrying, failed).
type Counts = (String, Option<String>, [u64; 8]);

fn counts(r: &StatsRow) -> Counts {
    (
        r.source.clone(),
        r.handler.clone(),
        [r.received, r.duplicates, r.rejected, r.pending, r.processing, r.succeeded, r.retrying, r.failed],
    )
}

fn row(source: &str, handler: Option<&str>, n: [u64; 8]) -> Counts {
    (source.to_string(), handler.map(str::to_string), n)
}

async fn stats(store: &dyn Store, source: Option<&str>) -> Vec<Counts> {
    let mut rows: Vec<Counts> = store.stats(source.map(str::to_string), None).await.expect("stats").iter().map(counts).collect();
    rows.sort();
    rows
}

/// `stats`, the queue depth and the chart as a full recount from every
/// stored event computes them (README "Counters"): what the counters must
/// say. `since` as `stats --since` takes it; the chart from `chart_since`.
struct Recount {
    stats: Vec<Counts>,
    depth: BTreeMap<(String, String), u64>,
    hours: Vec<(DateTime<Utc>, u64, u64, u64)>,
}

async fn recount(store: &dyn Store, source: Option<&str>, since: Option<DateTime<Utc>>, chart_since: DateTime<Utc>) -> Recount {
    use hooktrail::store::rules;
    let all = store.list_events(EventFilter { ascending: true, ..Default::default() }, Detail::Full).await.expect("list_events");
    let mut rows: BTreeMap<(String, Option<String>), StatsRow> = BTreeMap::new();
    let mut depth = BTreeMap::new();
    let mut hours: BTreeMap<DateTime<Utc>, (u64, u64, u64)> = BTreeMap::new();
    let hour_of = |t: DateTime<Utc>| t.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0)).unwrap();
    for e in &all {
        for d in e.deliveries.as_ref().expect("full") {
            if rules::unfinished(d.status) {
                *depth.entry((d.handler.clone(), d.status.to_string())).or_default() += 1;
            }
        }
        if hour_of(e.received_at) >= hour_of(chart_since) {
            let h = hours.entry(hour_of(e.received_at)).or_default();
            h.0 += 1;
            h.1 += u64::from(e.status == EventStatus::Done);
            h.2 += u64::from(e.status == EventStatus::Failed);
        }
        if source.is_some_and(|s| s != e.source) || since.is_some_and(|t| e.received_at < t) {
            continue;
        }
        let row = rows.entry((e.source.clone(), None)).or_insert_with(|| StatsRow { source: e.source.clone(), ..Default::default() });
        row.received += 1;
        row.add(rules::event_column(e.status), 1);
        for d in e.deliveries.as_ref().expect("full") {
            let key = (e.source.clone(), Some(d.handler.clone()));
            let row = rows.entry(key).or_insert_with(|| StatsRow {
                source: e.source.clone(),
                handler: Some(d.handler.clone()),
                ..Default::default()
            });
            row.received += 1;
            row.add(rules::delivery_column(d.status), 1);
        }
    }
    let mut stats: Vec<Counts> = rows.values().map(counts).collect();
    stats.sort();
    Recount { stats, depth, hours: hours.into_iter().map(|(h, (r, d, f))| (h, r, d, f)).collect() }
}

/// What the counters say, in [`Recount`]'s shape.
async fn counted(store: &dyn Store, source: Option<&str>, since: Option<DateTime<Utc>>, chart_since: DateTime<Utc>) -> Recount {
    let mut stats: Vec<Counts> = store.stats(source.map(str::to_string), since).await.expect("stats").iter().map(counts).collect();
    stats.sort();
    let depth = store
        .queue_depth()
        .await
        .expect("queue_depth")
        .into_iter()
        .filter(|q| q.count > 0)
        .map(|q| ((q.handler, q.status.to_string()), q.count))
        .collect();
    let hours = store.hourly(chart_since).await.expect("hourly").iter().map(|h| (h.hour, h.received, h.done, h.failed)).collect();
    Recount { stats, depth, hours }
}

async fn assert_counters_agree(store: &dyn Store, step: &str) {
    let now = Utc::now();
    let chart_since = now - chrono::Duration::hours(3);
    // Whole hours, a partial first hour, and a source of its own.
    let cases = [
        (None, None),
        (Some("s1"), None),
        (None, Some(now - chrono::Duration::minutes(150))),
        (None, Some(now - chrono::Duration::hours(5))),
        (Some("s2"), Some(now - chrono::Duration::minutes(70))),
    ];
    for (source, since) in cases {
        let want = recount(store, source, since, chart_since).await;
        let got = counted(store, source, since, chart_since).await;
        assert_eq!(got.stats, want.stats, "{step}: stats --source {source:?} --since {since:?}");
        assert_eq!(got.depth, want.depth, "{step}: queue depth");
        assert_eq!(got.hours, want.hours, "{step}: hourly chart");
    }
}

// ---------------------------------------------------------------------------
// Cases

mod cases {
    use super::*;

    /// README "What you get": a paper trail of the raw body bytes, content
    /// type, query string, headers, remote address, source and receive time,
    /// plus a normalized JSON view. A body that is not UTF-8 stays byte-exact.
    pub async fn an_event_is_stored_exactly_as_received(store: Arc<dyn Store>) {
        let raw: &[u8] = b"\x00\xff\xfe{\"a\":1}\r\n\x80 tail";
        let mut binary = event("exact", &[]);
        binary.method = "PUT".into();
        binary.content_type = "application/octet-stream".into();
        binary.query = "x=1;token=[redacted]&y=%C3%A9".into();
        binary.headers = r#"{"user-agent":"curl/8","x-many":["1","2"],"authorization":"[redacted]"}"#.into();
        binary.remote_addr = "[::1]:51234".into();
        binary.body = Bytes::from_static(raw);
        binary.payload = Payload::Null;
        let json_body = with_body(event("exact", &[]), json!({"form": {"id": "x1"}, "list": [1, 2.5, null]}));
        let mut form = event("exact", &[]);
        form.content_type = "application/x-www-form-urlencoded".into();
        form.body = Bytes::from_static(b"email=a%40b.c&tag=1&tag=2");
        form.payload = Payload::Json(r#"{"email":"a@b.c","tag":["1","2"]}"#.into());

        for (ev, body_text, payload) in [
            (binary, None, Value::Null),
            (json_body, Some(r#"{"form":{"id":"x1"},"list":[1,2.5,null]}"#), json!({"form": {"id": "x1"}, "list": [1, 2.5, null]})),
            (form, Some("email=a%40b.c&tag=1&tag=2"), json!({"email": "a@b.c", "tag": ["1", "2"]})),
        ] {
            let id = insert(&*store, ev.clone()).await;
            let got = show(&*store, id).await;
            let what = format!("event with content type {}", ev.content_type);
            assert_eq!(got.id, id, "{what}: id");
            assert_eq!(got.source, ev.source, "{what}: source");
            assert_eq!(store::rfc3339(got.received_at), store::rfc3339(ev.received_at), "{what}: received_at");
            assert_eq!(got.method, ev.method, "{what}: method");
            assert_eq!(got.content_type, ev.content_type, "{what}: content_type");
            assert_eq!(got.query, ev.query, "{what}: query");
            assert_eq!(got.headers, Some(serde_json::from_str::<Value>(&ev.headers).unwrap()), "{what}: headers");
            assert_eq!(got.remote_addr, ev.remote_addr, "{what}: remote_addr");
            assert_eq!(got.body_bytes, ev.body.len(), "{what}: body_bytes");
            assert_eq!(got.body.as_deref(), body_text, "{what}: body as text");
            let bytes = match (&got.body, &got.body_base64) {
                (Some(text), None) => text.as_bytes().to_vec(),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD.decode(b64).expect("body_base64 is base64"),
                other => panic!("{what}: exactly one of body and body_base64 must be set, got {other:?}"),
            };
            assert_eq!(bytes, ev.body.to_vec(), "{what}: raw body bytes");
            assert_eq!(got.payload, payload, "{what}: payload");
        }

        // Lists carry metadata and payload, not the heavy parts.
        let summary = store.list_events(EventFilter::default(), Detail::Summary).await.expect("list_events");
        assert_eq!(summary.len(), 3);
        for e in &summary {
            assert!(e.headers.is_none() && e.body.is_none() && e.body_base64.is_none() && e.deliveries.is_none(), "summary of {}", e.id);
        }
        assert!(summary.iter().any(|e| e.payload == json!({"email": "a@b.c", "tag": ["1", "2"]})), "summary keeps the payload");
        // `export` lists in full: what `events show` has.
        for e in store.list_events(EventFilter::default(), Detail::Full).await.expect("list_events") {
            let one = show(&*store, e.id).await;
            assert_eq!(serde_json::to_value(&e).unwrap(), serde_json::to_value(&one).unwrap(), "full listing of {}", e.id);
        }

        let unknown = EventId(ulid::Ulid::new());
        assert!(store.get_event(unknown).await.expect("get_event").is_none(), "an unknown id is not found");
    }

    /// README "Retries" (states): an event is `done` when all deliveries
    /// succeeded, or nothing was routed to it.
    pub async fn an_event_with_no_handlers_is_done_and_queues_nothing(store: Arc<dyn Store>) {
        let id = insert(&*store, event("quiet", &[])).await;
        let got = show(&*store, id).await;
        assert_eq!(got.status, EventStatus::Done);
        assert_eq!(got.deliveries.map(|d| d.len()), Some(0), "no deliveries");
        assert_eq!(store.backlog(), 0, "nothing unfinished");
        assert!(store.queue_depth().await.expect("queue_depth").iter().all(|q| q.count == 0), "nothing queued");
    }

    /// README "Routes": one delivery per (event, handler) is stored in the
    /// same transaction as the event, so nothing routed can be forgotten.
    pub async fn each_routed_handler_gets_one_pending_delivery(store: Arc<dyn Store>) {
        let id = insert(&*store, event("routed", &["crm", "forward"])).await;
        let got = show(&*store, id).await;
        assert_eq!(got.status, EventStatus::Pending);
        let ds = deliveries(&*store, id).await;
        assert_eq!(ds.iter().map(|d| d.handler.as_str()).collect::<Vec<_>>(), ["crm", "forward"]);
        for d in &ds {
            assert_eq!(d.status, DeliveryStatus::Pending, "{}", d.handler);
            assert_eq!(d.attempt_count, 0, "{}", d.handler);
            assert!(d.attempts.is_empty(), "{}", d.handler);
            assert!(d.next_attempt_at.is_some(), "{}: a pending delivery shows when it is due", d.handler);
        }
        assert_eq!(store.backlog(), 2);
        assert_eq!(claim_due(&*store, OWNER, "crm").await.len(), 1);
        assert_eq!(claim_due(&*store, OWNER, "forward").await.len(), 1);
    }

    /// README "Receiving": a duplicate within the dedup window is answered
    /// with the first event's id, and nothing is stored or queued.
    pub async fn a_duplicate_within_the_window_returns_the_first_id_and_stores_nothing(store: Arc<dyn Store>) {
        let window = Duration::from_secs(3600);
        let first = insert(&*store, deduped(event("shop", &["crm"]), "order-1", window)).await;
        let again = store.insert_event(deduped(event("shop", &["crm"]), "order-1", window)).await.expect("insert_event");
        assert!(again.duplicate, "the same key within the window is a duplicate");
        assert_eq!(again.id, first, "a duplicate is answered with the first event's id");
        assert_eq!(list(&*store, EventFilter::default()).await, [first], "nothing new stored");
        assert_eq!(store.backlog(), 1, "nothing new queued");
        assert_eq!(claim_due(&*store, OWNER, "crm").await.len(), 1, "only the first event's delivery exists");
        let other_key = insert(&*store, deduped(event("shop", &["crm"]), "order-2", window)).await;
        assert_ne!(other_key, first, "another key is another event");
    }

    /// README "Receiving": dedup keys belong to a source; the same key sent
    /// to another source is a new event.
    pub async fn the_dedup_window_is_per_source(store: Arc<dyn Store>) {
        let window = Duration::from_secs(3600);
        let a = insert(&*store, deduped(event("shop-a", &["crm"]), "order-1", window)).await;
        let b = insert(&*store, deduped(event("shop-b", &["crm"]), "order-1", window)).await;
        assert_ne!(a, b);
        assert_eq!(claim_due(&*store, OWNER, "crm").await.len(), 2, "both events are queued");
    }

    /// README "Receiving": dedup holds only within the window; after it, the
    /// same key is a new event, which opens a window of its own.
    pub async fn after_the_dedup_window_the_same_key_is_a_new_event(store: Arc<dyn Store>) {
        let window = Duration::from_millis(50);
        let first = insert(&*store, deduped(event("shop", &["crm"]), "order-1", window)).await;
        // Waiting out a window is exact: no condition to poll for.
        tokio::time::sleep(window * 2).await;
        let second = insert(&*store, deduped(event("shop", &["crm"]), "order-1", Duration::from_secs(3600))).await;
        assert_ne!(second, first, "after the window the same key is a new event");
        let third = store.insert_event(deduped(event("shop", &["crm"]), "order-1", Duration::from_secs(3600))).await.expect("insert_event");
        assert!(third.duplicate && third.id == second, "the new event's window holds: {third:?}");
        assert_eq!(list(&*store, EventFilter::default()).await.len(), 2);
    }

    /// README "Leases, crashes and stopping": a processor claims due
    /// deliveries of a handler with a lease; claimed ones show `running` and
    /// their event `processing`.
    pub async fn claim_takes_due_deliveries_of_its_handler_up_to_the_limit_and_marks_them_running(store: Arc<dyn Store>) {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(insert(&*store, event("s", &["a"])).await);
        }
        let other = insert(&*store, event("s", &["b"])).await;
        let first = store.claim(OWNER, "a", 2, LONG_LEASE).await.expect("claim");
        assert_eq!(first.len(), 2, "at most `limit`");
        let rest = store.claim(OWNER, "a", 10, LONG_LEASE).await.expect("claim");
        assert_eq!(rest.len(), 1, "the one left");
        assert!(claim_due(&*store, OWNER, "a").await.is_empty(), "nothing left of `a`");
        let claimed: BTreeSet<EventId> = first.iter().chain(&rest).map(|c| c.event_id).collect();
        assert_eq!(claimed, ids.iter().copied().collect(), "every `a` delivery, each once");
        for c in first.iter().chain(&rest) {
            assert_eq!(c.handler, "a");
            assert_eq!((c.attempt, c.attempt_in_budget), (1, 1), "a first attempt");
            let d = delivery(&*store, c.event_id, "a").await;
            assert_eq!(d.status, DeliveryStatus::Running);
            assert!(d.attempts.is_empty(), "no attempt recorded before one finishes");
            assert_eq!(status(&*store, c.event_id).await, EventStatus::Processing);
        }
        assert_eq!(delivery(&*store, other, "b").await.status, DeliveryStatus::Pending, "another handler's delivery is untouched");
        assert_eq!(status(&*store, other).await, EventStatus::Pending);
    }

    /// README "Processing": the handler gets the event as stored (raw body,
    /// headers, query, payload) with its attempt number.
    pub async fn a_claim_hands_over_the_event_as_stored(store: Arc<dyn Store>) {
        let mut ev = with_body(event("hand", &["a"]), json!({"email": "a@b.c"}));
        ev.query = "id=7".into();
        ev.headers = r#"{"x-one":"1"}"#.into();
        let id = insert(&*store, ev.clone()).await;
        let before_claim = Utc::now();
        let c = claim_one(&*store, OWNER, "a", LONG_LEASE).await;
        assert_eq!(c.event_id, id);
        assert_eq!(c.source, "hand");
        assert_eq!(c.handler, "a");
        assert_eq!(c.content_type, ev.content_type);
        assert_eq!(c.query, "id=7");
        assert_eq!(c.headers, json!({"x-one": "1"}));
        assert_eq!(c.body, ev.body);
        assert_eq!(c.payload, json!({"email": "a@b.c"}));
        assert_eq!(store::rfc3339(c.received_at), store::rfc3339(ev.received_at));
        assert!(c.first_queued_at >= ev.received_at && c.first_queued_at <= before_claim, "queued when stored: {:?}", c.first_queued_at);
        assert_eq!((c.attempt, c.attempt_in_budget), (1, 1));
    }

    /// README "Leases, crashes and stopping": a claimed delivery is leased;
    /// another processor cannot take it while the lease holds, held or running.
    pub async fn a_leased_delivery_cannot_be_claimed_by_another_owner(store: Arc<dyn Store>) {
        insert(&*store, event("s", &["a"])).await;
        let c = claim_one(&*store, OWNER, "a", LONG_LEASE).await;
        assert!(claim_due(&*store, OTHER, "a").await.is_empty(), "held for a slot: not claimable");
        store.started(OWNER, c.delivery_id).await.expect("started");
        assert!(claim_due(&*store, OTHER, "a").await.is_empty(), "running: not claimable");
        assert!(claim_due(&*store, OWNER, "a").await.is_empty(), "not claimable twice by its owner either");
    }

    /// README "Leases, crashes and stopping": the processor renews its lease
    /// while the attempt runs; a lease is renewed only by its holder.
    pub async fn only_the_owner_can_renew_a_lease_and_renewing_extends_it(store: Arc<dyn Store>) {
        insert(&*store, event("s", &["a"])).await;
        let claimed_at = Instant::now();
        let c = claim_one(&*store, OWNER, "a", SHORT_LEASE).await;
        store.started(OWNER, c.delivery_id).await.expect("started");
        assert!(!store.renew(OTHER, c.delivery_id, LONG_LEASE).await.expect("renew"), "another owner cannot renew");
        assert!(store.renew(OWNER, c.delivery_id, LONG_LEASE).await.expect("renew"), "the owner renews");
        // Past the first lease: only the renewal keeps others out now.
        tokio::time::sleep((claimed_at + SHORT_LEASE * 2).saturating_duration_since(Instant::now())).await;
        assert!(claim_due(&*store, OTHER, "a").await.is_empty(), "a renewed lease still holds after the first one ran out");
        store.finish(finished(OWNER, &c, Outcome::Success, Next::Succeeded)).await.expect("finish");
        assert!(!store.renew(OWNER, c.delivery_id, LONG_LEASE).await.expect("renew"), "a finished delivery is no longer ours");
    }

    /// README "Retries" (states): `running` → `succeeded`; the event is
    /// `done` when all its deliveries succeeded. Every attempt is recorded.
    pub async fn a_successful_attempt_is_recorded_and_makes_the_delivery_succeeded_and_the_event_done(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let c = claim_one(&*store, OWNER, "a", LONG_LEASE).await;
        store.started(OWNER, c.delivery_id).await.expect("started");
        let started_at = Utc::now();
        let f = Finished {
            owner: OWNER.into(),
            delivery_id: c.delivery_id,
            attempt: c.attempt,
            started_at,
            duration_ms: 42,
            outcome: Outcome::Success,
            exit_code: None,
            http_status: Some(204),
            error: None,
            output: "ok\n".into(),
            next: Next::Succeeded,
        };
        store.finish(f).await.expect("finish");
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Succeeded);
        assert_eq!(d.attempt_count, 1);
        assert!(d.next_attempt_at.is_none(), "nothing more is due");
        assert_eq!(d.attempts.len(), 1);
        let a = &d.attempts[0];
        assert_eq!((a.number, a.outcome, a.duration_ms, a.exit_code, a.http_status), (1, Outcome::Success, 42, None, Some(204)));
        assert_eq!(
            (a.error.as_deref(), a.output.as_str(), store::rfc3339(a.started_at).as_str()),
            (None, "ok\n", store::rfc3339(started_at).as_str())
        );
        assert_eq!(status(&*store, id).await, EventStatus::Done);
        assert_eq!(store.backlog(), 0);
        assert!(claim_due(&*store, OTHER, "a").await.is_empty(), "a succeeded delivery is never claimed again");
    }

    /// README "Retries" (states): … → `failed`; the event is `failed`.
    pub async fn a_failed_attempt_makes_the_delivery_failed_and_it_is_never_claimed_again(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        fail(&*store, "a").await;
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(d.attempts.iter().map(|a| (a.number, a.outcome)).collect::<Vec<_>>(), [(1, Outcome::Failure)]);
        assert_eq!(d.attempts[0].error.as_deref(), Some("attempt 1 did not succeed"));
        assert_eq!(status(&*store, id).await, EventStatus::Failed);
        assert_eq!(store.backlog(), 0);
        assert!(claim_due(&*store, OTHER, "a").await.is_empty(), "a failed delivery is never claimed again");
    }

    /// README "Retries": `retrying` waits for its next attempt, whose time
    /// the retry policy (or `Retry-After`) set.
    pub async fn a_retrying_delivery_is_not_claimed_before_its_next_attempt_time(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let due = Utc::now() + chrono::Duration::seconds(2);
        attempt(&*store, "a", Outcome::Retry, Next::RetryAt(due)).await;
        // Asked at once; a claim that returns something is early unless the
        // clock (on a very busy machine) has really passed `due` meanwhile.
        let c = match claim_due(&*store, OTHER, "a").await.pop() {
            Some(early) => {
                assert!(Utc::now() >= due, "claimed before its next attempt time");
                early
            }
            None => {
                let d = delivery(&*store, id, "a").await;
                assert_eq!(d.status, DeliveryStatus::Retrying);
                assert_eq!(d.next_attempt_at.map(store::rfc3339), Some(store::rfc3339(due)), "shows when it is due");
                assert_eq!(status(&*store, id).await, EventStatus::Retrying);
                let c = claim_when_due(&*store, OTHER, "a", LONG_LEASE).await;
                assert!(Utc::now() >= due, "claimed only once due");
                c
            }
        };
        assert_eq!((c.attempt, c.attempt_in_budget), (2, 2), "the second attempt, the second of its budget");
    }

    /// README "Leases, crashes and stopping": a processor that lost its lease
    /// (another took the delivery over) does not decide the delivery's fate;
    /// the new holder's attempt does.
    pub async fn a_late_finish_of_a_taken_over_attempt_does_not_overwrite_the_new_one(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let old = claim_one(&*store, OWNER, "a", SHORT_LEASE).await;
        store.started(OWNER, old.delivery_id).await.expect("started");
        let new = claim_when_due(&*store, OTHER, "a", LONG_LEASE).await;
        assert_eq!(new.attempt, 2, "taken over after the lease expired");
        assert!(!store.renew(OWNER, old.delivery_id, LONG_LEASE).await.expect("renew"), "the old holder's lease is gone");
        store.finish(finished(OWNER, &old, Outcome::Success, Next::Succeeded)).await.expect("finish");
        assert_eq!(delivery(&*store, id, "a").await.status, DeliveryStatus::Running, "still the new holder's");
        assert_eq!(status(&*store, id).await, EventStatus::Processing);
        assert!(store.renew(OTHER, new.delivery_id, LONG_LEASE).await.expect("renew"), "the new holder keeps its lease");
        store.finish(finished(OTHER, &new, Outcome::Failure, Next::Failed)).await.expect("finish");
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Failed, "the new holder's result decides");
        assert_eq!(d.attempts.iter().map(|a| a.number).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(d.attempts[1].outcome, Outcome::Failure);
    }

    /// README "Leases, crashes and stopping": only the delivery's current
    /// lease holder moves it on, even when a takeover of a held delivery gave
    /// the new holder the same attempt number; the stale holder's record never
    /// replaces the new holder's.
    pub async fn a_late_finish_of_a_held_delivery_taken_over_with_the_same_number_does_not_decide_it(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let held = claim_one(&*store, OWNER, "a", TINY_LEASE).await;
        let new = claim_when_due(&*store, OTHER, "a", LONG_LEASE).await;
        assert_eq!(new.attempt, held.attempt, "a held delivery is taken over with the same number");
        store.started(OTHER, new.delivery_id).await.expect("started");
        store.finish(finished(OWNER, &held, Outcome::Success, Next::Succeeded)).await.expect("finish");
        assert_eq!(delivery(&*store, id, "a").await.status, DeliveryStatus::Running, "still the new holder's");
        assert!(store.renew(OTHER, new.delivery_id, LONG_LEASE).await.expect("renew"), "the new holder keeps its lease");
        store.finish(finished(OTHER, &new, Outcome::Failure, Next::Failed)).await.expect("finish");
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Failed, "the new holder's result decides");
        assert_eq!(d.attempts.len(), 1);
        assert_eq!(d.attempts[0].outcome, Outcome::Failure, "the new holder's record stands");
        store.finish(finished(OWNER, &held, Outcome::Success, Next::Succeeded)).await.expect("finish");
        let d = delivery(&*store, id, "a").await;
        assert_eq!((d.status, d.attempts[0].outcome), (DeliveryStatus::Failed, Outcome::Failure), "a stale record never replaces it");
    }

    /// README "Leases, crashes and stopping", "Several nodes: PostgreSQL":
    /// finishes sent at once are recorded together (one transaction on
    /// PostgreSQL, the writer's next on SQLite); a stale holder's finish
    /// among them still decides nothing, and the others each move their own
    /// delivery and event.
    pub async fn finishes_recorded_together_each_decide_only_what_their_holder_still_holds(store: Arc<dyn Store>) {
        let taken = insert(&*store, event("s", &["a"])).await;
        let ok = insert(&*store, event("s", &["a"])).await;
        let bad = insert(&*store, event("s", &["a"])).await;
        let stale = claim_one(&*store, OWNER, "a", SHORT_LEASE).await;
        assert_eq!(stale.event_id, taken, "the oldest first");
        let fresh = store.claim(OWNER, "a", 10, LONG_LEASE).await.expect("claim");
        assert_eq!(fresh.iter().map(|c| c.event_id).collect::<Vec<_>>(), [ok, bad]);
        store.started(OWNER, stale.delivery_id).await.expect("started");
        let new = claim_when_due(&*store, OTHER, "a", LONG_LEASE).await;
        assert_eq!((new.delivery_id, new.attempt), (stale.delivery_id, 2), "taken over after the lease expired");
        let (a, b, c) = tokio::join!(
            store.finish(finished(OWNER, &stale, Outcome::Success, Next::Succeeded)),
            store.finish(finished(OWNER, &fresh[0], Outcome::Success, Next::Succeeded)),
            store.finish(finished(OWNER, &fresh[1], Outcome::Failure, Next::Failed)),
        );
        for r in [a, b, c] {
            r.expect("finish");
        }
        let d = delivery(&*store, taken, "a").await;
        assert_eq!(d.status, DeliveryStatus::Running, "still the new holder's");
        assert_eq!(d.attempts.len(), 1, "only the interrupted attempt: {:?}", d.attempts);
        assert_eq!(d.attempts[0].outcome, Outcome::Retry, "the takeover's note stands, not the stale record");
        assert_eq!(status(&*store, taken).await, EventStatus::Processing);
        let d = delivery(&*store, ok, "a").await;
        assert_eq!((d.status, d.attempts.len(), d.attempts[0].outcome), (DeliveryStatus::Succeeded, 1, Outcome::Success));
        assert_eq!(status(&*store, ok).await, EventStatus::Done);
        let d = delivery(&*store, bad, "a").await;
        assert_eq!((d.status, d.attempts.len(), d.attempts[0].outcome), (DeliveryStatus::Failed, 1, Outcome::Failure));
        assert_eq!(status(&*store, bad).await, EventStatus::Failed);
        assert_eq!(store.backlog(), 1, "the taken-over delivery alone is unfinished");
        store.finish(finished(OTHER, &new, Outcome::Success, Next::Succeeded)).await.expect("finish");
        let d = delivery(&*store, taken, "a").await;
        assert_eq!(d.status, DeliveryStatus::Succeeded, "the new holder's result decides");
        assert_eq!(d.attempts.iter().map(|a| (a.number, a.outcome)).collect::<Vec<_>>(), [(1, Outcome::Retry), (2, Outcome::Success)]);
        assert_eq!(status(&*store, taken).await, EventStatus::Done);
    }

    /// README "Leases, crashes and stopping": deliveries held for a slot that
    /// never started go back to waiting with no attempt recorded.
    pub async fn release_makes_a_delivery_pending_with_no_attempt_and_the_same_number_next(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let c = claim_one(&*store, OWNER, "a", LONG_LEASE).await;
        assert_eq!(store.release(OTHER, vec![c.delivery_id]).await.expect("release"), 0, "only the owner releases");
        assert_eq!(delivery(&*store, id, "a").await.status, DeliveryStatus::Running);
        assert_eq!(store.release(OWNER, vec![c.delivery_id]).await.expect("release"), 1);
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Pending);
        assert_eq!(d.attempt_count, 0, "no attempt spent");
        assert!(d.attempts.is_empty(), "no attempt recorded");
        assert_eq!(status(&*store, id).await, EventStatus::Pending);
        let again = claim_one(&*store, OTHER, "a", LONG_LEASE).await;
        assert_eq!((again.attempt, again.attempt_in_budget), (1, 1), "the same attempt number, at once");
    }

    /// README "Leases, crashes and stopping": deliveries held (claimed ahead,
    /// never started) by a daemon that died run after their lease expires as
    /// if never claimed: no interrupted attempt, no retry budget spent.
    pub async fn a_delivery_held_by_a_crashed_processor_runs_again_as_if_never_claimed(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let held = claim_one(&*store, OWNER, "a", TINY_LEASE).await;
        let next = claim_when_due(&*store, OTHER, "a", TINY_LEASE).await;
        assert_eq!((next.delivery_id, next.attempt, next.attempt_in_budget), (held.delivery_id, 1, 1), "the same first attempt");
        // The first holder wakes up late: its mark must not count for the new holder.
        store.started(OWNER, held.delivery_id).await.expect("started");
        let third = claim_when_due(&*store, THIRD, "a", LONG_LEASE).await;
        assert_eq!((third.attempt, third.attempt_in_budget), (1, 1), "still never run");
        let d = delivery(&*store, id, "a").await;
        assert!(d.attempts.is_empty(), "no interrupted attempt in the history: {:?}", d.attempts);
        store.started(THIRD, third.delivery_id).await.expect("started");
        store.finish(finished(THIRD, &third, Outcome::Success, Next::Succeeded)).await.expect("finish");
        let d = delivery(&*store, id, "a").await;
        assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Succeeded, 1));
        assert_eq!(d.attempts.iter().map(|a| a.number).collect::<Vec<_>>(), [1]);
    }

    /// README "Leases, crashes and stopping": if the daemon is killed
    /// mid-attempt, the lease expires and the delivery runs again; the history
    /// shows the interrupted attempt.
    pub async fn an_attempt_interrupted_by_a_crash_is_recorded_and_the_next_claim_gets_the_next_number(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let first = claim_one(&*store, OWNER, "a", SHORT_LEASE).await;
        store.started(OWNER, first.delivery_id).await.expect("started");
        let next = claim_when_due(&*store, OTHER, "a", LONG_LEASE).await;
        assert_eq!(next.delivery_id, first.delivery_id);
        assert_eq!((next.attempt, next.attempt_in_budget), (2, 2), "the interrupted attempt counts");
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Running);
        assert_eq!(d.attempts.len(), 1, "the interrupted attempt is in the history");
        let a = &d.attempts[0];
        assert_eq!((a.number, a.outcome), (1, Outcome::Retry));
        let error = a.error.as_deref().unwrap_or_default();
        assert!(error.contains("lease"), "the error says the lease expired: {error:?}");
    }

    /// README "Leases, crashes and stopping": on SIGTERM an unfinished
    /// attempt is recorded ("released for the next start") and set `pending`,
    /// so the next start runs it at once.
    pub async fn an_attempt_released_at_shutdown_is_recorded_and_due_again_at_once(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let c = attempt(&*store, "a", Outcome::Retry, Next::Released).await;
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Pending);
        assert_eq!(d.attempts.iter().map(|a| (a.number, a.outcome)).collect::<Vec<_>>(), [(1, Outcome::Retry)], "recorded");
        let next = claim_one(&*store, OTHER, "a", LONG_LEASE).await;
        assert_eq!((next.delivery_id, next.attempt), (c.delivery_id, 2), "due at once, with the next number");
    }

    /// README "Replay": attempt numbers continue and the history is kept; the
    /// replayed delivery gets a fresh `max_attempts`/`max_age` budget.
    pub async fn replay_gives_a_fresh_retry_budget_while_attempt_numbers_continue(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a"])).await;
        let first = attempt(&*store, "a", Outcome::Retry, Next::RetryAt(Utc::now())).await;
        let second = fail(&*store, "a").await;
        assert_eq!((second.attempt, second.attempt_in_budget), (2, 2));
        assert_eq!(store.replay(vec![id], None, false).await.expect("replay"), 1);
        let d = delivery(&*store, id, "a").await;
        assert_eq!(d.status, DeliveryStatus::Pending);
        assert_eq!(status(&*store, id).await, EventStatus::Pending);
        assert_eq!(d.attempts.iter().map(|a| a.number).collect::<Vec<_>>(), [1, 2], "history kept");
        let third = attempt(&*store, "a", Outcome::Retry, Next::RetryAt(Utc::now())).await;
        assert_eq!((third.attempt, third.attempt_in_budget), (3, 1), "numbers continue; the budget starts again");
        assert!(third.first_queued_at > first.first_queued_at, "the max_age clock starts again at the replay");
        let fourth = claim_one(&*store, OWNER, "a", LONG_LEASE).await;
        assert_eq!((fourth.attempt, fourth.attempt_in_budget), (4, 2));
        assert_eq!(fourth.first_queued_at, third.first_queued_at, "a retry does not reset the max_age clock");
    }

    /// README "Replay": `--status failed` re-queues the failed deliveries;
    /// the others keep their state.
    pub async fn replay_of_failed_deliveries_leaves_the_others_alone(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a", "b", "c"])).await;
        fail(&*store, "a").await;
        succeed(&*store, "b").await;
        retry_later(&*store, "c").await;
        assert_eq!(status(&*store, id).await, EventStatus::Retrying);
        assert_eq!(store.replay(vec![id], None, true).await.expect("replay"), 1, "only the failed delivery");
        let ds = deliveries(&*store, id).await;
        let states: Vec<_> = ds.iter().map(|d| (d.handler.as_str(), d.status, d.attempts.len())).collect();
        assert_eq!(
            states,
            [("a", DeliveryStatus::Pending, 1), ("b", DeliveryStatus::Succeeded, 1), ("c", DeliveryStatus::Retrying, 1)],
            "only the failed one is re-queued, history kept"
        );
        assert!(claim_due(&*store, OWNER, "b").await.is_empty(), "the succeeded delivery does not run again");
    }

    /// README "Replay": the event-log page's "Replay this delivery"
    /// re-queues one handler's delivery only.
    pub async fn replay_of_one_handler_requeues_only_that_delivery(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a", "b"])).await;
        succeed(&*store, "a").await;
        succeed(&*store, "b").await;
        assert_eq!(store.replay(vec![id], Some("b".into()), false).await.expect("replay"), 1);
        assert_eq!(delivery(&*store, id, "a").await.status, DeliveryStatus::Succeeded);
        assert_eq!(delivery(&*store, id, "b").await.status, DeliveryStatus::Pending);
        assert_eq!(status(&*store, id).await, EventStatus::Processing, "one finished while another waits");
        assert!(claim_due(&*store, OWNER, "a").await.is_empty());
        assert_eq!(claim_due(&*store, OWNER, "b").await.len(), 1);
    }

    /// README "Replay": replay re-queues every delivery of the events except
    /// one running right now.
    pub async fn replay_leaves_a_running_delivery_alone(store: Arc<dyn Store>) {
        let id = insert(&*store, event("s", &["a", "b"])).await;
        succeed(&*store, "a").await;
        let running = claim_one(&*store, OWNER, "b", LONG_LEASE).await;
        store.started(OWNER, running.delivery_id).await.expect("started");
        assert_eq!(store.replay(vec![id], None, false).await.expect("replay"), 1, "only the finished delivery");
        assert_eq!(delivery(&*store, id, "b").await.status, DeliveryStatus::Running);
        assert!(store.renew(OWNER, running.delivery_id, LONG_LEASE).await.expect("renew"), "the running attempt keeps its lease");
        assert!(claim_due(&*store, OTHER, "b").await.is_empty(), "and nobody else may start it");
        store.finish(finished(OWNER, &running, Outcome::Success, Next::Succeeded)).await.expect("finish");
        assert_eq!(delivery(&*store, id, "b").await.status, DeliveryStatus::Succeeded, "its attempt still counts");
    }

    /// README "Retries" (states): the event is `pending`, `processing` (some
    /// delivery running, or some finished while others wait), `retrying`,
    /// `done` (all succeeded) or `failed` (some failed and none still going).
    pub async fn the_event_status_follows_its_deliveries(store: Arc<dyn Store>) {
        use DeliveryStatus as D;
        use EventStatus as E;
        let cases: &[(&[D], E)] = &[
            (&[D::Pending, D::Pending], E::Pending),
            (&[D::Running, D::Pending], E::Processing),
            (&[D::Succeeded, D::Pending], E::Processing),
            (&[D::Failed, D::Pending], E::Processing),
            (&[D::Succeeded, D::Running], E::Processing),
            (&[D::Retrying, D::Running], E::Processing),
            (&[D::Retrying, D::Pending], E::Retrying),
            (&[D::Succeeded, D::Retrying], E::Retrying),
            (&[D::Failed, D::Retrying], E::Retrying),
            (&[D::Succeeded, D::Succeeded], E::Done),
            (&[D::Failed, D::Succeeded], E::Failed),
            (&[D::Failed, D::Failed], E::Failed),
            (&[D::Skipped, D::Succeeded], E::Failed),
            (&[D::Skipped, D::Pending], E::Processing),
        ];
        for (n, (states, want)) in cases.iter().enumerate() {
            // Handlers of their own, so each event's deliveries are the only due ones.
            let handlers: Vec<String> = (0..states.len()).map(|i| format!("case{n}-{i}")).collect();
            let names: Vec<&str> = handlers.iter().map(String::as_str).collect();
            let id = insert(&*store, event("s", &names)).await;
            for (h, st) in names.iter().zip(states.iter()) {
                match st {
                    D::Pending => {}
                    D::Running => {
                        claim_one(&*store, OWNER, h, LONG_LEASE).await;
                    }
                    D::Succeeded => {
                        succeed(&*store, h).await;
                    }
                    D::Retrying => {
                        retry_later(&*store, h).await;
                    }
                    D::Failed => {
                        fail(&*store, h).await;
                    }
                    D::Skipped => {
                        let c = fail(&*store, h).await;
                        let ev = show(&*store, id).await;
                        assert_eq!(c.event_id, ev.id);
                        store.skip(id, h).await.expect("skip a failed delivery");
                    }
                }
            }
            let got: Vec<D> = deliveries(&*store, id).await.iter().map(|d| d.status).collect();
            assert_eq!(got, *states, "deliveries set up for {states:?}");
            assert_eq!(status(&*store, id).await, *want, "event status with deliveries {states:?}");
        }
    }

    /// README "Retention": prune deletes finished events (`done` or
    /// `failed`), with their deliveries and attempts; pending, processing and
    /// retrying events are never deleted, whatever their age.
    pub async fn prune_deletes_finished_events_and_never_unfinished_ones(store: Arc<dyn Store>) {
        let done_unrouted = insert(&*store, event("s", &[])).await;
        let done = insert(&*store, event("s", &["a"])).await;
        succeed(&*store, "a").await;
        let failed = insert(&*store, event("s", &["b"])).await;
        fail(&*store, "b").await;
        let pending = insert(&*store, event("s", &["c"])).await;
        let running = insert(&*store, event("s", &["d"])).await;
        let lease = claim_one(&*store, OWNER, "d", LONG_LEASE).await;
        let retrying = insert(&*store, event("s", &["e"])).await;
        retry_later(&*store, "e").await;
        let partly_done = insert(&*store, event("s", &["f", "g"])).await;
        succeed(&*store, "f").await;

        // A cut-off after every event: only the status decides. A batch of 1
        // shows that prune goes on until nothing is left to delete.
        let deleted = store.prune(Utc::now() + chrono::Duration::days(1), 1).await.expect("prune");
        assert_eq!(deleted, 3, "the three finished events");
        for id in [done_unrouted, done, failed] {
            assert!(store.get_event(id).await.expect("get_event").is_none(), "finished {id} is deleted");
        }
        for (id, want) in [
            (pending, EventStatus::Pending),
            (running, EventStatus::Processing),
            (retrying, EventStatus::Retrying),
            (partly_done, EventStatus::Processing),
        ] {
            assert_eq!(status(&*store, id).await, want, "unfinished {id} is kept as it was");
        }
        assert_eq!(deliveries(&*store, retrying).await[0].attempts.len(), 1, "a kept event keeps its attempts");
        assert!(store.renew(OWNER, lease.delivery_id, LONG_LEASE).await.expect("renew"), "a running delivery is untouched");
        assert_eq!(store.prune(Utc::now() + chrono::Duration::days(1), 200).await.expect("prune"), 0, "nothing more to delete");
    }

    /// README "Retention": only events received longer ago than the cut-off
    /// are deleted.
    pub async fn prune_keeps_events_received_after_the_cutoff(store: Arc<dyn Store>) {
        let old = insert(&*store, event("s", &[])).await;
        after_millisecond_of(Utc::now()).await;
        let cutoff = Utc::now();
        after_millisecond_of(cutoff).await;
        let young = insert(&*store, event("s", &[])).await;
        assert_eq!(store.prune(cutoff, 200).await.expect("prune"), 1);
        assert!(store.get_event(old).await.expect("get_event").is_none(), "received before the cut-off: deleted");
        assert_eq!(status(&*store, young).await, EventStatus::Done, "received after the cut-off: kept");
    }

    /// README "Command line": `events list` is newest first; `--limit N`
    /// shows the N newest.
    pub async fn list_is_newest_first_and_a_limit_keeps_the_newest(store: Arc<dyn Store>) {
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(insert(&*store, event("s", &[])).await);
        }
        let newest_first: Vec<EventId> = ids.iter().rev().copied().collect();
        assert_eq!(list(&*store, EventFilter::default()).await, newest_first);
        assert_eq!(list(&*store, EventFilter { limit: Some(2), ..Default::default() }).await, newest_first[..2]);
        assert_eq!(list(&*store, EventFilter { ascending: true, ..Default::default() }).await, ids, "export: oldest first");
    }

    /// README "Command line": `events list [--source S] [--status ST]
    /// [--handler H] [--since T] [--match PTR=VALUE]...`: each filter keeps
    /// exactly the events it names, and they combine.
    pub async fn list_filters_select_exactly_the_matching_events(store: Arc<dyn Store>) {
        let mut old = with_body(event("web", &["crm"]), json!({"form": {"id": "f1"}}));
        old.received_at = Utc::now() - chrono::Duration::hours(2);
        let old = insert(&*store, old).await;
        succeed(&*store, "crm").await;
        let web_crm = insert(&*store, with_body(event("web", &["crm"]), json!({"form": {"id": "f1"}, "n": 5, "ok": true}))).await;
        fail(&*store, "crm").await;
        let web_mail = insert(&*store, with_body(event("web", &["mail"]), json!({"form": {"id": "f2"}, "n": 5}))).await;
        let mut form = event("shop", &["crm", "mail"]);
        form.payload = Payload::Json(r#"{"form":{"id":"f1"},"email":["a@b.c"]}"#.into());
        let shop = insert(&*store, form).await;
        let mut raw = event("shop", &[]);
        raw.body = Bytes::from_static(b"\xff not json");
        raw.payload = Payload::Null;
        let shop_raw = insert(&*store, raw).await;

        let set = |ids: &[EventId]| ids.iter().copied().collect::<BTreeSet<_>>();
        let cases: Vec<(&str, EventFilter, BTreeSet<EventId>)> = vec![
            ("no filter", EventFilter::default(), set(&[old, web_crm, web_mail, shop, shop_raw])),
            ("source", EventFilter { source: Some("shop".into()), ..Default::default() }, set(&[shop, shop_raw])),
            ("source nobody used", EventFilter { source: Some("nobody".into()), ..Default::default() }, set(&[])),
            ("status done", EventFilter { status: Some(EventStatus::Done), ..Default::default() }, set(&[old, shop_raw])),
            ("status failed", EventFilter { status: Some(EventStatus::Failed), ..Default::default() }, set(&[web_crm])),
            ("status pending", EventFilter { status: Some(EventStatus::Pending), ..Default::default() }, set(&[web_mail, shop])),
            ("handler", EventFilter { handler: Some("mail".into()), ..Default::default() }, set(&[web_mail, shop])),
            (
                "since",
                EventFilter { since: Some(Utc::now() - chrono::Duration::hours(1)), ..Default::default() },
                set(&[web_crm, web_mail, shop, shop_raw]),
            ),
            (
                "match a string",
                EventFilter { matches: vec![("/form/id".into(), "f1".into())], ..Default::default() },
                set(&[old, web_crm, shop]),
            ),
            ("match a number", EventFilter { matches: vec![("/n".into(), "5".into())], ..Default::default() }, set(&[web_crm, web_mail])),
            ("match a boolean", EventFilter { matches: vec![("/ok".into(), "true".into())], ..Default::default() }, set(&[web_crm])),
            ("match an array item", EventFilter { matches: vec![("/email/0".into(), "a@b.c".into())], ..Default::default() }, set(&[shop])),
            ("match a missing pointer", EventFilter { matches: vec![("/nope".into(), "f1".into())], ..Default::default() }, set(&[])),
            (
                "two matches",
                EventFilter { matches: vec![("/form/id".into(), "f1".into()), ("/n".into(), "5".into())], ..Default::default() },
                set(&[web_crm]),
            ),
            (
                "everything at once",
                EventFilter {
                    source: Some("web".into()),
                    status: Some(EventStatus::Failed),
                    handler: Some("crm".into()),
                    since: Some(Utc::now() - chrono::Duration::hours(1)),
                    matches: vec![("/form/id".into(), "f1".into())],
                    ..Default::default()
                },
                set(&[web_crm]),
            ),
        ];
        for (what, filter, want) in cases {
            let got = list(&*store, filter.clone()).await;
            assert_eq!(got.len(), want.len(), "{what}: each event once: {got:?}");
            assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want, "{what}");
            // The limit applies after filtering.
            let limited = list(&*store, EventFilter { limit: Some(1), ..filter }).await;
            assert_eq!(limited.len(), want.len().min(1), "{what} with limit 1");
            assert!(limited.iter().all(|id| want.contains(id)), "{what} with limit 1");
        }
    }

    /// README "The event-log page": "Older events →" pages newest first with a
    /// `before` cursor; every event shows up on exactly one page.
    pub async fn paging_newest_first_with_before_visits_every_event_once(store: Arc<dyn Store>) {
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(insert(&*store, event(if i % 3 == 0 { "a" } else { "b" }, &[])).await);
        }
        let mut seen = Vec::new();
        let mut before = None;
        for pages in 0.. {
            assert!(pages <= ids.len(), "paging did not end: the `before` cursor does not move ({seen:?})");
            let page = list(&*store, EventFilter { limit: Some(3), before, ..Default::default() }).await;
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 3);
            before = page.last().copied();
            seen.extend(page);
        }
        assert_eq!(seen, ids.iter().rev().copied().collect::<Vec<_>>(), "every event once, newest first");
    }

    /// README "Command line": `export` is oldest first; paging it with an
    /// `after` cursor (within a filter) visits every event exactly once.
    pub async fn paging_oldest_first_with_after_visits_every_event_once(store: Arc<dyn Store>) {
        let mut want = Vec::new();
        for i in 0..10 {
            let source = if i % 3 == 0 { "other" } else { "mine" };
            let id = insert(&*store, event(source, &[])).await;
            if source == "mine" {
                want.push(id);
            }
        }
        let mut seen = Vec::new();
        let mut after = None;
        for pages in 0.. {
            assert!(pages <= want.len(), "paging did not end: the `after` cursor does not move ({seen:?})");
            let filter = EventFilter { source: Some("mine".into()), limit: Some(2), after, ascending: true, ..Default::default() };
            let page = list(&*store, filter).await;
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            seen.extend(page);
        }
        assert_eq!(seen, want, "every matching event once, oldest first");
    }

    /// README "Replay": `events replay --status failed [--source S]
    /// [--handler H] [--since T]` acts on the events the same filter lists.
    pub async fn find_ids_selects_the_events_list_selects(store: Arc<dyn Store>) {
        let a = insert(&*store, event("web", &["crm"])).await;
        fail(&*store, "crm").await;
        let b = insert(&*store, event("web", &["crm"])).await;
        succeed(&*store, "crm").await;
        let c = insert(&*store, event("shop", &["crm"])).await;
        fail(&*store, "crm").await;
        let d = insert(&*store, event("web", &["mail"])).await;
        fail(&*store, "mail").await;
        for (filter, want) in [
            (EventFilter { status: Some(EventStatus::Failed), ..Default::default() }, vec![a, c, d]),
            (EventFilter { status: Some(EventStatus::Failed), source: Some("web".into()), ..Default::default() }, vec![a, d]),
            (EventFilter { status: Some(EventStatus::Failed), handler: Some("crm".into()), ..Default::default() }, vec![a, c]),
            (EventFilter { source: Some("web".into()), ..Default::default() }, vec![a, b, d]),
        ] {
            let mut found = store.find_ids(filter.clone()).await.expect("find_ids");
            found.sort();
            let mut listed = list(&*store, filter).await;
            listed.sort();
            assert_eq!(found, want);
            assert_eq!(listed, want);
        }
    }

    /// README "Command line" (`stats`: counts per source and handler) and
    /// "What you get": every refusal is counted per source, never queued; a
    /// duplicate is counted, not stored. Rejections are flushed with the next
    /// commit.
    pub async fn stats_count_events_duplicates_rejections_and_outcomes_per_source_and_handler(store: Arc<dyn Store>) {
        let window = Duration::from_secs(3600);
        insert(&*store, event("s1", &["a", "b"])).await;
        succeed(&*store, "a").await;
        fail(&*store, "b").await;
        insert(&*store, deduped(event("s1", &["a"]), "k", window)).await;
        assert!(store.insert_event(deduped(event("s1", &["a"]), "k", window)).await.expect("insert_event").duplicate);
        insert(&*store, event("s1", &[])).await;
        insert(&*store, event("s2", &["c"])).await;
        claim_one(&*store, OWNER, "c", LONG_LEASE).await;
        insert(&*store, event("s2", &["d"])).await;
        retry_later(&*store, "d").await;
        store.count_rejection("s1", RejectReason::Unauthorized);
        store.count_rejection("s1", RejectReason::Unauthorized);
        store.count_rejection("s1", RejectReason::Malformed);
        store.count_rejection("s2", RejectReason::RateLimited);
        store.count_rejection("s3", RejectReason::Forbidden);
        // Rejections are counted in memory and written with the next commit.
        store.ping().await.expect("ping");

        //                         received dup rej pend proc succ retr fail
        let mut want = vec![
            row("s1", None, [3, 1, 3, 1, 0, 1, 0, 1]),
            row("s1", Some("a"), [2, 0, 0, 1, 0, 1, 0, 0]),
            row("s1", Some("b"), [1, 0, 0, 0, 0, 0, 0, 1]),
            row("s2", None, [2, 0, 1, 0, 1, 0, 1, 0]),
            row("s2", Some("c"), [1, 0, 0, 0, 1, 0, 0, 0]),
            row("s2", Some("d"), [1, 0, 0, 0, 0, 0, 1, 0]),
            row("s3", None, [0, 0, 1, 0, 0, 0, 0, 0]),
        ];
        want.sort();
        assert_eq!(stats(&*store, None).await, want, "every source and (source, handler)");
        let s2: Vec<Counts> = want.iter().filter(|r| r.0 == "s2").cloned().collect();
        assert_eq!(stats(&*store, Some("s2")).await, s2, "--source s2");
    }

    /// README "Command line": `stats --since T` counts the events received
    /// since T.
    pub async fn stats_since_count_only_events_received_since(store: Arc<dyn Store>) {
        let mut old = event("s", &[]);
        old.received_at = Utc::now() - chrono::Duration::hours(3);
        insert(&*store, old).await;
        insert(&*store, event("s", &["a"])).await;
        let since = store.stats(None, Some(Utc::now() - chrono::Duration::hours(1))).await.expect("stats");
        let mut since: Vec<Counts> = since.iter().map(counts).collect();
        since.sort();
        //                                      received dup rej pend proc succ retr fail
        assert_eq!(since, [row("s", None, [1, 0, 0, 1, 0, 0, 0, 0]), row("s", Some("a"), [1, 0, 0, 1, 0, 0, 0, 0])]);
        let all = stats(&*store, None).await;
        assert_eq!(all[0], row("s", None, [2, 0, 0, 1, 0, 1, 0, 0]), "without --since: both");
    }

    /// README "Metrics": `hooktrail_queue_depth` counts unfinished deliveries
    /// (pending, retrying, running) per handler; `oldest_pending_seconds`
    /// is the age of the longest-waiting one since it was queued.
    pub async fn queue_depth_counts_unfinished_deliveries_per_handler_and_status(store: Arc<dyn Store>) {
        let t0 = Utc::now();
        for _ in 0..3 {
            insert(&*store, event("s", &["qa"])).await;
        }
        let after_inserts = Utc::now();
        claim_one(&*store, OWNER, "qa", LONG_LEASE).await;
        insert(&*store, event("s", &["qb"])).await;
        retry_later(&*store, "qb").await;
        insert(&*store, event("s", &["qc", "qd"])).await;
        succeed(&*store, "qc").await;
        fail(&*store, "qd").await;

        let depth = store.queue_depth().await.expect("queue_depth");
        for q in &depth {
            assert!(
                matches!(q.status, DeliveryStatus::Pending | DeliveryStatus::Retrying | DeliveryStatus::Running),
                "only unfinished deliveries: {q:?}"
            );
        }
        let counts: BTreeMap<(String, String), u64> =
            depth.iter().filter(|q| q.count > 0).map(|q| ((q.handler.clone(), q.status.to_string()), q.count)).collect();
        let want: BTreeMap<(String, String), u64> = [(("qa", "pending"), 2), (("qa", "running"), 1), (("qb", "retrying"), 1)]
            .into_iter()
            .map(|((h, s), n)| ((h.to_string(), s.to_string()), n))
            .collect();
        assert_eq!(counts, want);
        let pending = depth.iter().find(|q| q.handler == "qa" && q.status == DeliveryStatus::Pending).expect("qa pending");
        let oldest = pending.oldest_queued_at.expect("pending deliveries have a queue time");
        assert!(oldest >= t0 && oldest <= after_inserts, "queued when stored: {oldest} not within [{t0}, {after_inserts}]");
    }

    /// README "The event-log page": a chart of events received, succeeded
    /// and failed per hour (UTC), oldest hour first.
    pub async fn hourly_counts_received_done_and_failed_events_per_hour(store: Arc<dyn Store>) {
        let now = Utc::now();
        let mut early = event("s", &[]);
        early.received_at = now - chrono::Duration::hours(2);
        insert(&*store, early).await;
        insert(&*store, event("s", &["a"])).await;
        succeed(&*store, "a").await;
        insert(&*store, event("s", &["b"])).await;
        fail(&*store, "b").await;
        insert(&*store, event("s", &["c"])).await;
        let hour_of = |t: DateTime<Utc>| t.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0)).unwrap();

        let hours = store.hourly(now - chrono::Duration::hours(3)).await.expect("hourly");
        let got: Vec<_> = hours.iter().map(|h| (h.hour, h.received, h.done, h.failed)).collect();
        let this_hour = hour_of(Utc::now());
        // The three recent events may straddle an hour boundary; count them wherever they fell.
        let recent: (u64, u64, u64) =
            got.iter().filter(|h| h.0 >= hour_of(now)).fold((0, 0, 0), |acc, h| (acc.0 + h.1, acc.1 + h.2, acc.2 + h.3));
        assert_eq!(got.first().copied(), Some((hour_of(now - chrono::Duration::hours(2)), 1, 1, 0)), "{got:?}");
        assert_eq!(recent, (3, 1, 1), "received, done, failed in the last hour(s): {got:?}");
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "oldest hour first, each once: {got:?}");
        assert!(got.last().is_some_and(|h| h.0 <= this_hour));
    }

    /// README "Configuration" (`server.max_backlog`) and "Metrics"
    /// (`hooktrail_backlog_deliveries`): the backlog is the number of
    /// unfinished deliveries.
    pub async fn backlog_counts_unfinished_deliveries(store: Arc<dyn Store>) {
        assert_eq!(store.backlog(), 0);
        let ids = vec![insert(&*store, event("s", &["a", "b"])).await, insert(&*store, event("s", &["a", "b"])).await];
        insert(&*store, event("s", &[])).await;
        assert_eq!(store.backlog(), 4, "two events with two deliveries each");
        let c = claim_one(&*store, OWNER, "a", LONG_LEASE).await;
        assert_eq!(store.backlog(), 4, "a running delivery is unfinished");
        store.release(OWNER, vec![c.delivery_id]).await.expect("release");
        assert_eq!(store.backlog(), 4, "released: unfinished");
        succeed(&*store, "a").await;
        assert_eq!(store.backlog(), 3, "succeeded: finished");
        fail(&*store, "b").await;
        assert_eq!(store.backlog(), 2, "failed: finished");
        retry_later(&*store, "a").await;
        assert_eq!(store.backlog(), 2, "retrying: unfinished");
        assert_eq!(store.replay(ids, None, true).await.expect("replay"), 1);
        assert_eq!(store.backlog(), 3, "replayed: unfinished again");
    }

    /// README "Processing": the processor wakes at once when this process
    /// stores an event (or replays one).
    pub async fn inserts_with_deliveries_and_replays_signal_new_work(store: Arc<dyn Store>) {
        let signal = store.work_signal();
        let (id, woken) = wakes(&signal, insert(&*store, event("s", &["a"]))).await;
        assert!(woken, "an insert with deliveries signals new work");
        fail(&*store, "a").await;
        let (replayed, woken) = wakes(&signal, store.replay(vec![id], None, false)).await;
        assert_eq!(replayed.expect("replay"), 1);
        assert!(woken, "a replay signals new work");
    }

    /// The `Store` trait: `close` flushes and stops; further writes fail with
    /// `ShuttingDown` (ingest answers 503), never hang or pretend to succeed.
    pub async fn after_close_writes_fail_with_shutting_down(store: Arc<dyn Store>) {
        store.ping().await.expect("an open store accepts a write");
        store.close().await;
        let refused = store.insert_event(event("s", &["a"])).await;
        assert!(matches!(refused, Err(StoreError::ShuttingDown)), "insert after close: {refused:?}");
        let refused = store.ping().await;
        assert!(matches!(refused, Err(StoreError::ShuttingDown)), "ping after close: {refused:?}");
    }

    /// README "Counters": `stats` (with `--source` and `--since`), the
    /// queue-depth metrics and the chart are kept in the transaction of every
    /// change (insert, claim, finish, retry, release, lease expiry, replay,
    /// import, skip, prune), and always equal a full recount of the stored events.
    pub async fn counters_equal_a_full_recount_after_random_inserts_claims_retries_releases_replays_and_prunes(store: Arc<dyn Store>) {
        use rand::{Rng, SeedableRng};
        let seed = rand::random::<u64>();
        eprintln!("random operations from seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let handlers = ["a", "b", "c"];
        let mut ids = Vec::new();
        let mut cutoffs = Vec::new();
        for step in 0..240 {
            let what = rng.gen_range(0..100);
            let handler = handlers[rng.gen_range(0..handlers.len())];
            match what {
                0..=34 => {
                    let source = ["s1", "s2", "s3"][rng.gen_range(0..3)];
                    let routed: Vec<&str> = handlers.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
                    let mut ev = event(source, &routed);
                    // Spread over the last five hours: whole hours and partial ones.
                    ev.received_at = Utc::now() - chrono::Duration::seconds(rng.gen_range(0..5 * 3600));
                    ids.push(insert(&*store, ev).await);
                }
                35..=49 => {
                    succeed_if_due(&*store, handler, Outcome::Success, Next::Succeeded).await;
                }
                50..=59 => {
                    succeed_if_due(&*store, handler, Outcome::Failure, Next::Failed).await;
                }
                60..=69 => {
                    // A retry due at once, so it is claimed again later.
                    succeed_if_due(&*store, handler, Outcome::Retry, Next::RetryAt(Utc::now())).await;
                }
                70..=74 => {
                    if let Some(c) = store.claim(OWNER, handler, 1, LONG_LEASE).await.expect("claim").pop() {
                        store.release(OWNER, vec![c.delivery_id]).await.expect("release");
                    }
                }
                75..=79 => {
                    // A processor that dies holding it: the lease expires and another takes over.
                    let held = store.claim(THIRD, handler, 1, TINY_LEASE).await.expect("claim").pop();
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    if held.is_some() {
                        store.claim(OTHER, handler, 1, LONG_LEASE).await.expect("claim after the lease expired");
                    }
                }
                80..=87 if !ids.is_empty() => {
                    let id = ids[rng.gen_range(0..ids.len())];
                    let only = rng.gen_bool(0.5).then(|| handler.to_string());
                    store.replay(vec![id], only, rng.gen_bool(0.5)).await.expect("replay");
                }
                88..=91 if !ids.is_empty() => {
                    // `import` of an exported event under a new id, with its
                    // deliveries and attempts as they stand.
                    let id = ids[rng.gen_range(0..ids.len())];
                    if let Some(mut e) = store.get_event(id).await.expect("get_event") {
                        let ms = u64::try_from(e.received_at.timestamp_millis()).expect("after 1970");
                        e.id = EventId(ulid::Ulid::from_parts(ms, rng.gen()));
                        assert!(store.import_event(e.clone()).await.expect("import"), "a new id is imported");
                        ids.push(e.id);
                    }
                }
                92..=93 if !ids.is_empty() => {
                    // `events skip` of a failed delivery: failed -> skipped.
                    let id = ids[rng.gen_range(0..ids.len())];
                    let failed = store
                        .get_event(id)
                        .await
                        .expect("get_event")
                        .and_then(|e| e.deliveries?.into_iter().find(|d| d.status == DeliveryStatus::Failed).map(|d| d.handler));
                    if let Some(h) = failed {
                        store.skip(id, &h).await.expect("skip a failed delivery");
                    }
                }
                94..=95 => {
                    after_millisecond_of(Utc::now()).await;
                    cutoffs.push(Utc::now());
                }
                _ if !cutoffs.is_empty() => {
                    let before = cutoffs[rng.gen_range(0..cutoffs.len())];
                    store.prune(before, rng.gen_range(1..5)).await.expect("prune");
                }
                _ => {}
            }
            if step % 40 == 39 {
                assert_counters_agree(&*store, &format!("after step {step} (seed {seed})")).await;
            }
        }
        store.prune(Utc::now() + chrono::Duration::days(1), 7).await.expect("prune");
        assert_counters_agree(&*store, &format!("after pruning everything finished (seed {seed})")).await;
    }

    /// README "Search": `--search TEXT` finds exactly the events whose
    /// normalized payload (a form's decoded values too) or, without one, raw
    /// body contains TEXT as whole words, ignoring case; newest first, and
    /// with the other filters and paging.
    pub async fn search_finds_exactly_the_events_whose_payload_or_body_contains_the_words(store: Arc<dyn Store>) {
        let json =
            insert(&*store, with_body(event("web", &[]), json!({"lead": {"email": "DGolden@Mid-Corp.com", "name": "Dan Golden"}}))).await;
        let mut form = event("forms", &[]);
        form.content_type = "application/x-www-form-urlencoded".into();
        form.body = Bytes::from_static(b"email_address%5B0%5D=dgolden%40mid-corp.com&first=Ann&contact_id=48213");
        form.payload = Payload::Json(r#"{"email_address":["dgolden@mid-corp.com"],"first":"Ann","contact_id":"48213"}"#.into());
        let form = insert(&*store, form).await;
        let mut raw = event("raw", &[]);
        raw.content_type = "text/plain".into();
        raw.body = Bytes::from_static(b"ticket 48213 from golden.retriever@example.org");
        raw.payload = Payload::Null;
        let raw = insert(&*store, raw).await;
        let other = insert(&*store, with_body(event("web", &[]), json!({"email": "xdgolden@mid-corp.company", "n": 482130}))).await;

        let set = |ids: &[EventId]| ids.iter().copied().collect::<BTreeSet<_>>();
        for (text, want) in [
            ("dgolden@mid-corp.com", set(&[json, form])),
            ("DGOLDEN@MID-CORP.COM", set(&[json, form])),
            ("Dan Golden", set(&[json])),
            ("golden", set(&[json, raw])),
            ("48213", set(&[form, raw])),
            ("mid-corp", set(&[json, form, other])),
            ("ann", set(&[form])),
            ("olden", set(&[])),
            ("email_address", set(&[])),
            ("nobody@example.org", set(&[])),
            // Search syntax of any index is plain text here, never an operator.
            ("golden\" OR \"ann", set(&[])),
            ("ann*", set(&[])),
            ("NEAR(dgolden mid)", set(&[])),
        ] {
            let got = list(&*store, EventFilter { search: Some(text.into()), ..Default::default() }).await;
            assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), want, "search {text:?}");
            assert_eq!(got.len(), want.len(), "search {text:?}: each once");
            let mut newest_first = got.clone();
            newest_first.sort_by(|a, b| b.cmp(a));
            assert_eq!(got, newest_first, "search {text:?}: newest first");
        }
        let web = EventFilter { search: Some("mid-corp".into()), source: Some("web".into()), ..Default::default() };
        assert_eq!(list(&*store, web.clone()).await, [other, json], "with --source");
        let mut found = store.find_ids(web).await.expect("find_ids");
        found.sort();
        assert_eq!(found, [json, other], "bulk replay selects the same");
        // One at a time, following the cursor, as the page does.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = list(&*store, EventFilter { search: Some("mid-corp".into()), limit: Some(1), before, ..Default::default() }).await;
            let Some(last) = page.last().copied() else { break };
            assert!(seen.len() < 3, "paging did not end: {seen:?}");
            seen.push(last);
            before = Some(last);
        }
        assert_eq!(seen, [other, form, json], "every match once, newest first");
        let oldest_first = list(&*store, EventFilter { search: Some("golden".into()), ascending: true, ..Default::default() }).await;
        assert_eq!(oldest_first, [json, raw], "export order");
        // --match narrows by the same index and still checks the pointer.
        let m = EventFilter { matches: vec![("/email_address/0".into(), "dgolden@mid-corp.com".into())], ..Default::default() };
        assert_eq!(list(&*store, m).await, [form]);
        // A pruned event is no longer found.
        store.prune(Utc::now() + chrono::Duration::days(1), 10).await.expect("prune");
        assert!(list(&*store, EventFilter { search: Some("golden".into()), ..Default::default() }).await.is_empty(), "pruned");
    }

    /// README "What you get": an acknowledged event is committed, so another
    /// process on the same database (a CLI command, `--role process`) sees it
    /// at once, and so every recorded attempt.
    pub async fn a_second_handle_sees_every_acknowledged_write_at_once(db: Arc<dyn TestDb>) {
        let ingest = db.open();
        let cli = db.open();
        let id = insert(&*ingest, event("s", &["a"])).await;
        assert_eq!(status(&*cli, id).await, EventStatus::Pending, "seen by another handle");
        succeed(&*ingest, "a").await;
        let d = delivery(&*cli, id, "a").await;
        assert_eq!((d.status, d.attempts.len()), (DeliveryStatus::Succeeded, 1), "the attempt is seen too");
        assert_eq!(cli.replay(vec![id], None, false).await.expect("replay"), 1);
        assert_eq!(claim_due(&*ingest, OWNER, "a").await.len(), 1, "a replay by another handle is due here");
        ingest.close().await;
        cli.close().await;
    }

    /// README "Processing": a processor may run as its own process on the
    /// same database; two processors claiming at once never hold the same
    /// delivery.
    pub async fn two_processors_on_one_database_never_hold_the_same_delivery(db: Arc<dyn TestDb>) {
        let one = db.open();
        let two = db.open();
        let mut ids = BTreeSet::new();
        for _ in 0..20 {
            ids.insert(insert(&*one, event("s", &["a"])).await);
        }
        async fn drain(store: &dyn Store, owner: &str) -> Vec<Claimed> {
            let mut all = Vec::new();
            for _ in 0..=20 {
                let got = store.claim(owner, "a", 3, LONG_LEASE).await.expect("claim");
                if got.is_empty() {
                    return all;
                }
                all.extend(got);
                tokio::task::yield_now().await;
            }
            panic!("{owner}: claims never ran dry: {} deliveries claimed of 20", all.len())
        }
        let (a, b) = tokio::join!(drain(&*one, OWNER), drain(&*two, OTHER));
        let mut seen = BTreeSet::new();
        for c in a.iter().chain(&b) {
            assert!(seen.insert(c.delivery_id), "delivery {} claimed twice", c.delivery_id);
        }
        assert_eq!(a.iter().chain(&b).map(|c| c.event_id).collect::<BTreeSet<_>>(), ids, "every delivery claimed");
        one.close().await;
        two.close().await;
    }

    /// README "Several nodes: PostgreSQL": two processors finishing the
    /// deliveries of the same events at the same moment (each its own
    /// handler, its finishes recorded together) never deadlock for good and
    /// never leave an event with a status its deliveries do not give it; the
    /// counters agree.
    pub async fn two_processors_finishing_deliveries_of_the_same_events_at_once_leave_each_event_its_status(db: Arc<dyn TestDb>) {
        const EVENTS: usize = 40;
        let one = db.open();
        let two = db.open();
        let mut ids = Vec::new();
        for _ in 0..EVENTS {
            ids.push(insert(&*one, event("s", &["a", "b"])).await);
        }
        let a = one.claim(OWNER, "a", EVENTS, LONG_LEASE).await.expect("claim");
        let b = two.claim(OTHER, "b", EVENTS, LONG_LEASE).await.expect("claim");
        assert_eq!((a.len(), b.len()), (EVENTS, EVENTS));
        // Every other event's delivery to `b` fails: that event ends failed, the rest done.
        let fails = |c: &Claimed| ids.iter().position(|id| *id == c.event_id).expect("a claimed event") % 2 == 1;
        let finish_all = |store: Arc<dyn Store>, owner: &'static str, claimed: Vec<Claimed>, fail: bool| {
            let finishes: Vec<Finished> = claimed
                .iter()
                .map(|c| match fail && fails(c) {
                    true => finished(owner, c, Outcome::Failure, Next::Failed),
                    false => finished(owner, c, Outcome::Success, Next::Succeeded),
                })
                .collect();
            async move {
                let all = finishes.into_iter().map(|f| {
                    let store = store.clone();
                    async move { store.finish(f).await }
                });
                futures_util::future::join_all(all).await
            }
        };
        let (done_a, done_b) = tokio::join!(finish_all(one.clone(), OWNER, a, false), finish_all(two.clone(), OTHER, b, true));
        for r in done_a.into_iter().chain(done_b) {
            r.expect("finish");
        }
        for (i, id) in ids.iter().enumerate() {
            let want = if i % 2 == 1 { EventStatus::Failed } else { EventStatus::Done };
            for store in [&one, &two] {
                assert_eq!(status(&**store, *id).await, want, "event {i} ({id})");
            }
            let ds = deliveries(&*one, *id).await;
            assert!(ds.iter().all(|d| d.attempts.len() == 1), "one attempt each: {ds:?}");
        }
        let stats = one.stats(Some("s".into()), None).await.expect("stats");
        let events = stats.iter().find(|r| r.handler.is_none()).expect("the source's row");
        assert_eq!((events.succeeded, events.failed), (EVENTS as u64 / 2, EVENTS as u64 / 2), "{events:?}");
        one.close().await;
        two.close().await;
    }

    /// README "What you get": no acknowledged event is ever lost; after a
    /// restart every event, delivery and recorded attempt is there, and work
    /// left pending runs.
    pub async fn closing_and_reopening_keeps_events_deliveries_and_attempts(db: Arc<dyn TestDb>) {
        let before = db.open();
        let done = insert(&*before, event("s", &["a"])).await;
        succeed(&*before, "a").await;
        let waiting = insert(&*before, event("s", &["a", "b"])).await;
        before.close().await;

        let after = db.open();
        let d = delivery(&*after, done, "a").await;
        assert_eq!((d.status, d.attempts.len()), (DeliveryStatus::Succeeded, 1));
        assert_eq!(status(&*after, done).await, EventStatus::Done);
        assert_eq!(status(&*after, waiting).await, EventStatus::Pending);
        assert_eq!(after.backlog(), 2, "the backlog is counted from the database");
        let c = claim_one(&*after, OWNER, "a", LONG_LEASE).await;
        assert_eq!((c.event_id, c.attempt), (waiting, 1));
        assert_eq!(claim_due(&*after, OWNER, "b").await.len(), 1);
        after.close().await;
    }

    // -----------------------------------------------------------------------
    // Ordered processing (README "Ordered processing")

    use store::OnFailure::{Block, Continue};

    /// Same key: one at a time, in event-id order; different keys and
    /// deliveries without a key: in parallel.
    pub async fn ordered_claims_hand_out_one_delivery_per_key_in_event_order(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let b1 = insert(&*store, to_key("o", Some("b"))).await;
        let u1 = insert(&*store, to_key("o", None)).await;
        let u2 = insert(&*store, to_key("o", None)).await;
        let first = claim_ordered(&*store, "o", Continue).await;
        assert_eq!(ids(&first), BTreeSet::from([a1, b1, u1, u2]), "the heads of a and b, and both unkeyed");
        assert!(claim_ordered(&*store, "o", Continue).await.is_empty(), "a2 waits while a1 runs");
        let c_a1 = first.iter().find(|c| c.event_id == a1).expect("a1");
        end(&*store, c_a1, Outcome::Success, Next::Succeeded).await;
        let next = claim_ordered(&*store, "o", Continue).await;
        assert_eq!(ids(&next), BTreeSet::from([a2]), "a1 done: a2 is next");
        assert_eq!(delivery(&*store, a2, "o").await.status, DeliveryStatus::Running);
        assert_eq!(delivery(&*store, b1, "o").await.blocked_by, None);
    }

    /// A delivery waiting for a retry holds its key, and only its key.
    pub async fn a_head_waiting_for_a_retry_holds_only_its_key(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let b1 = insert(&*store, to_key("o", Some("b"))).await;
        let b2 = insert(&*store, to_key("o", Some("b"))).await;
        let first = claim_ordered(&*store, "o", Continue).await;
        assert_eq!(ids(&first), BTreeSet::from([a1, b1]));
        for c in &first {
            if c.event_id == a1 {
                end(&*store, c, Outcome::Retry, Next::RetryAt(Utc::now() + chrono::Duration::hours(1))).await;
            } else {
                end(&*store, c, Outcome::Success, Next::Succeeded).await;
            }
        }
        assert_eq!(ids(&claim_ordered(&*store, "o", Continue).await), BTreeSet::from([b2]), "b goes on; a2 waits behind retrying a1");
        assert_eq!(delivery(&*store, a2, "o").await.status, DeliveryStatus::Pending);
        assert_eq!(delivery(&*store, a1, "o").await.status, DeliveryStatus::Retrying);
    }

    /// `on_failure = "continue"`: once the head failed for good, the next runs.
    pub async fn with_continue_a_head_that_failed_for_good_lets_the_next_run(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let c = claim_ordered(&*store, "o", Continue).await;
        assert_eq!(ids(&c), BTreeSet::from([a1]));
        end(&*store, &c[0], Outcome::Failure, Next::Failed).await;
        assert_eq!(ids(&claim_ordered(&*store, "o", Continue).await), BTreeSet::from([a2]));
        assert_eq!(store.blocked_keys().await.expect("blocked_keys"), vec![]);
    }

    /// `on_failure = "block"`: the key waits, its deliveries show
    /// `blocked_by`, until the failed one is replayed and succeeds.
    pub async fn with_block_a_failed_head_holds_its_key_until_replayed_and_succeeded(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let b1 = insert(&*store, to_key("o", Some("b"))).await;
        let c = claim_ordered(&*store, "o", Block).await;
        let c_a1 = c.iter().find(|c| c.event_id == a1).expect("a1 claimed");
        end(&*store, c_a1, Outcome::Failure, Next::Failed).await;
        assert!(claim_ordered(&*store, "o", Block).await.is_empty(), "a is blocked; b1 runs already");
        assert_eq!(delivery(&*store, a2, "o").await.status, DeliveryStatus::Pending);
        assert_eq!(delivery(&*store, a2, "o").await.blocked_by, Some(a1));
        assert_eq!(delivery(&*store, b1, "o").await.blocked_by, None);
        assert_eq!(delivery(&*store, a1, "o").await.blocked_by, None, "the blocker is not blocked by itself");
        assert_eq!(store.blocked_keys().await.expect("blocked_keys"), vec![store::BlockedKeys { handler: "o".into(), keys: 1 }]);
        // A replay that fails again keeps the key blocked.
        assert_eq!(store.replay(vec![a1], None, false).await.expect("replay"), 1);
        let again = claim_ordered(&*store, "o", Block).await;
        assert_eq!(ids(&again), BTreeSet::from([a1]), "the replayed head runs first");
        end(&*store, &again[0], Outcome::Failure, Next::Failed).await;
        assert!(claim_ordered(&*store, "o", Block).await.is_empty());
        assert_eq!(delivery(&*store, a2, "o").await.blocked_by, Some(a1));
        // Replayed and succeeded: the key runs on.
        store.replay(vec![a1], None, false).await.expect("replay");
        let again = claim_ordered(&*store, "o", Block).await;
        assert_eq!(ids(&again), BTreeSet::from([a1]));
        end(&*store, &again[0], Outcome::Success, Next::Succeeded).await;
        assert_eq!(ids(&claim_ordered(&*store, "o", Block).await), BTreeSet::from([a2]));
        assert_eq!(store.blocked_keys().await.expect("blocked_keys"), vec![]);
    }

    /// `hooktrail events skip`: the failed head becomes `skipped` (its event
    /// counts as failed) and the key runs on.
    pub async fn with_block_a_skipped_head_releases_its_key(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let c = claim_ordered(&*store, "o", Block).await;
        end(&*store, &c[0], Outcome::Failure, Next::Failed).await;
        assert!(claim_ordered(&*store, "o", Block).await.is_empty());
        store.skip(a1, "o").await.expect("skip");
        assert_eq!(delivery(&*store, a1, "o").await.status, DeliveryStatus::Skipped);
        assert_eq!(status(&*store, a1).await, EventStatus::Failed, "skipped counts as failed");
        assert_eq!(ids(&claim_ordered(&*store, "o", Block).await), BTreeSet::from([a2]));
        assert_eq!(delivery(&*store, a2, "o").await.blocked_by, None);
    }

    /// README "Ordered processing", replay: a replayed delivery goes back in
    /// line by event id among those not begun; it never overtakes the one
    /// running now.
    pub async fn a_replayed_old_delivery_runs_after_the_running_head_and_before_the_waiting_ones(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let a3 = insert(&*store, to_key("o", Some("a"))).await;
        let c1 = claim_ordered(&*store, "o", Continue).await;
        end(&*store, &c1[0], Outcome::Success, Next::Succeeded).await;
        let c2 = claim_ordered(&*store, "o", Continue).await;
        assert_eq!(ids(&c2), BTreeSet::from([a2]));
        store.replay(vec![a1], None, false).await.expect("replay");
        assert!(claim_ordered(&*store, "o", Continue).await.is_empty(), "a2 still runs: a1 waits");
        end(&*store, &c2[0], Outcome::Success, Next::Succeeded).await;
        assert_eq!(ids(&claim_ordered(&*store, "o", Continue).await), BTreeSet::from([a1]), "a1 is older than a3");
        let _ = a3;
    }

    /// README "Ordered processing", crashes: a head whose processor died
    /// runs again, before anything later of its key.
    pub async fn a_head_whose_lease_expired_runs_again_before_anything_later_of_its_key(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let _a2 = insert(&*store, to_key("o", Some("a"))).await;
        let c = store.claim_ordered(OTHER, "o", Continue, 10, SHORT_LEASE).await.expect("claim");
        assert_eq!(ids(&c), BTreeSet::from([a1]));
        store.started(OTHER, c[0].delivery_id).await.expect("started");
        // OTHER "crashes"; after its lease the same head comes back first.
        let deadline = Instant::now() + DEADLINE;
        let again = loop {
            let got = store.claim_ordered(OWNER, "o", Continue, 10, LONG_LEASE).await.expect("claim");
            if !got.is_empty() {
                break got;
            }
            assert!(Instant::now() < deadline, "the head did not come back within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(ids(&again), BTreeSet::from([a1]), "only a1, nothing later of its key");
        assert_eq!(again[0].attempt, 2, "the interrupted attempt stays in the trail");
    }

    /// `hooktrail events skip` refuses what it cannot skip, naming why, and changes nothing.
    pub async fn skip_refuses_unknown_events_unknown_handlers_and_unfailed_deliveries_and_changes_nothing(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let unknown: EventId = "evt_01ARZ3NDEKTSV4RRFFQ69G5FAV".parse().expect("an id");
        let e = store.skip(unknown, "o").await.expect_err("unknown event");
        assert!(matches!(e, store::SkipError::UnknownEvent(id) if id == unknown), "{e}");
        let e = store.skip(a1, "nope").await.expect_err("unknown handler");
        assert!(matches!(e, store::SkipError::UnknownHandler(..)), "{e}");
        let e = store.skip(a1, "o").await.expect_err("pending is not failed");
        assert!(matches!(e, store::SkipError::NotFailed(_, _, DeliveryStatus::Pending)), "{e}");
        assert_eq!(delivery(&*store, a1, "o").await.status, DeliveryStatus::Pending, "nothing changed");
        assert_eq!(ids(&claim_ordered(&*store, "o", Block).await), BTreeSet::from([a1]), "and it still runs");
    }

    /// README "Ordered processing", reload: a handler whose `ordering` was
    /// taken off claims with `claim`; what was stored with a key still runs
    /// one per key, in order.
    pub async fn a_plain_claim_still_hands_out_keyed_deliveries_one_per_key(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let u = insert(&*store, to_key("o", None)).await;
        let first = claim_due(&*store, OWNER, "o").await;
        assert_eq!(ids(&first), BTreeSet::from([a1, u]));
        let c_a1 = first.iter().find(|c| c.event_id == a1).expect("a1");
        end(&*store, c_a1, Outcome::Success, Next::Succeeded).await;
        assert_eq!(ids(&claim_due(&*store, OWNER, "o").await), BTreeSet::from([a2]));
    }

    /// README "Retention": prune deletes a failed event; if its delivery
    /// blocked a key, the key runs on (nothing is left to replay or skip).
    pub async fn a_blocker_pruned_with_its_event_no_longer_blocks_its_key(store: Arc<dyn Store>) {
        let a1 = insert(&*store, to_key("o", Some("a"))).await;
        let a2 = insert(&*store, to_key("o", Some("a"))).await;
        let c = claim_ordered(&*store, "o", Block).await;
        end(&*store, &c[0], Outcome::Failure, Next::Failed).await;
        assert!(claim_ordered(&*store, "o", Block).await.is_empty());
        assert_eq!(delivery(&*store, a2, "o").await.blocked_by, Some(a1));
        assert_eq!(store.prune(Utc::now() + chrono::Duration::hours(1), 100).await.expect("prune"), 1, "only the failed event");
        assert_eq!(ids(&claim_ordered(&*store, "o", Block).await), BTreeSet::from([a2]));
    }
}

/// README "Counters" (PostgreSQL): `stats`, the chart and the queue depth
/// are answered by the counters, never the events: with the events table
/// out of reach they still answer. Runs when the suites run on PostgreSQL
/// (SQLite's twin is the unit test of the same name in `sqlite_scale.rs`).
#[tokio::test]
async fn on_postgres_stats_queue_depth_and_the_chart_never_read_the_events_table() {
    if !backends().iter().any(|b| b.name == "postgres") {
        eprintln!("skipped: the suites do not run on PostgreSQL (HOOKTRAIL_TEST_BACKEND)");
        return;
    }
    let db = PostgresDb::create_one();
    let store = db.open();
    let now = Utc::now();
    for (i, source) in ["a", "b", "a"].into_iter().enumerate() {
        let mut ev = event(source, &["h"]);
        ev.received_at = now - chrono::Duration::hours(i as i64);
        insert(&*store, ev).await;
    }
    store.close().await;
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connecting by hand");
    let driver = tokio::spawn(conn);
    client.batch_execute("ALTER TABLE events RENAME TO out_of_reach").await.expect("renaming");
    let store = db.open();
    let rows = store.stats(None, None).await.expect("stats from the counters alone");
    let a = rows.iter().find(|r| r.source == "a" && r.handler.is_none()).expect("source a");
    assert_eq!((a.received, a.pending), (2, 2));
    let whole_hour =
        now.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0)).expect("a time") - chrono::Duration::hours(1);
    let since = store.stats(Some("a".into()), Some(whole_hour)).await.expect("stats --since a whole hour");
    assert_eq!(since.iter().find(|r| r.handler.is_none()).map(|r| r.received), Some(1));
    let hours = store.hourly(now - chrono::Duration::hours(3)).await.expect("hourly");
    assert_eq!(hours.iter().map(|h| h.received).sum::<u64>(), 3);
    let depth = store.queue_depth().await.expect("queue depth");
    assert_eq!(depth.iter().map(|q| q.count).sum::<u64>(), 3);
    store.close().await;
    client.batch_execute("ALTER TABLE out_of_reach RENAME TO events").await.expect("renaming back");
    drop(client);
    let _ = driver.await;
}
