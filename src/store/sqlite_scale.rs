//! What keeps every operator question fast on a large SQLite database
//! (README "Counters", "Search", "Disk space"):
//!
//! - **Counters** (`tally_totals`, and `tally_hours` per receive hour): how
//!   many events and deliveries are in each state, per source and handler.
//!   Every change of state adds its [`rules::tally_moves`] to the writer's
//!   batch ([`WriterState::tallies`]), and [`flush`] writes the sums just
//!   before the batch's COMMIT: the counters change in the same transaction
//!   as the rows they count, at one upsert per (key, batch) rather than per
//!   row. `stats`, the queue-depth metrics and the chart read them, never
//!   the events.
//! - **Search** (`event_search`, a contentless FTS5 table whose rowid is the
//!   event's `seq`): [`search::event_text`] of each event. It finds
//!   candidates; [`search::contains`] (the SQL function `search_hit`)
//!   decides, so the index may over-find, never under-find. `--match`
//!   narrows by its value's words the same way before the pointer is
//!   checked. Events are indexed a few hundred at a time, shortly after they
//!   are stored ([`index_loop`]), not in the insert's transaction: FTS5
//!   writes a segment per transaction, and the ingest's small group commits
//!   made that cost about a third more CPU per event. Events are indexed up
//!   to `meta.search_upto`; a search reads the index up to there and checks
//!   the newer events one by one ([`listing_parts`]), so it is complete at
//!   once. While ingest runs flat out, indexing waits.
//! - **Disk space**: new databases use `auto_vacuum = INCREMENTAL`; the
//!   daemon's writer hands free pages back to the file system a slice at a
//!   time ([`give_back_space`]); `hooktrail compact` does all of it at once
//!   (and converts an older database with one `VACUUM`).

use std::collections::BTreeMap;

use rusqlite::types::Value as V;

use super::*;
use crate::store::search;

/// Counter changes made by the current transaction, summed per
/// (source, handler or `""` for the event itself, hour, state).
pub(super) type Tallies = HashMap<(String, String, i64, &'static str), i64>;

/// Pages the daemon's writer returns to the file system per housekeeping
/// pass (4 MiB): a large prune's space comes back over minutes, without
/// holding up a commit for long.
const VACUUM_PAGES: i64 = 1024;

/// Migration 5 (see `MIGRATIONS`): counters back-filled from the events,
/// the indexes the filters need, and the search table (filled in Rust by
/// [`after_migration`]).
pub(super) const MIGRATION: &str = r#"
    CREATE TABLE tally_totals (
        source  TEXT NOT NULL,
        handler TEXT NOT NULL,          -- '' counts the events themselves
        state   TEXT NOT NULL,
        n       INTEGER NOT NULL,
        PRIMARY KEY (source, handler, state)
    ) WITHOUT ROWID;
    CREATE TABLE tally_hours (
        hour    INTEGER NOT NULL,       -- the event's receive time, unix seconds / 3600, rounded down
        source  TEXT NOT NULL,
        handler TEXT NOT NULL,
        state   TEXT NOT NULL,
        n       INTEGER NOT NULL,
        PRIMARY KEY (hour, source, handler, state)
    ) WITHOUT ROWID;
    INSERT INTO tally_hours
        SELECT CASE WHEN received_at >= 0 THEN received_at / 3600000000 ELSE (received_at + 1) / 3600000000 - 1 END AS h,
               source, '', status, count(*)
        FROM events GROUP BY h, source, status;
    INSERT INTO tally_hours
        SELECT CASE WHEN e.received_at >= 0 THEN e.received_at / 3600000000 ELSE (e.received_at + 1) / 3600000000 - 1 END AS h,
               e.source, d.handler, d.status, count(*)
        FROM deliveries d JOIN events e ON e.seq = d.event_seq GROUP BY h, e.source, d.handler, d.status;
    INSERT INTO tally_totals SELECT source, handler, state, sum(n) FROM tally_hours GROUP BY source, handler, state;

    -- stats --since: the first, partial hour is counted from the events.
    CREATE INDEX events_received ON events(received_at);
    -- --handler: the events with a delivery to a handler, newest first.
    CREATE INDEX deliveries_handler ON deliveries(handler, event_seq);
    -- The queue-depth metrics' oldest waiting delivery per handler and state.
    CREATE INDEX deliveries_waiting ON deliveries(handler, status, queued_at)
        WHERE status IN ('pending', 'retrying', 'running');

    CREATE VIRTUAL TABLE event_search USING fts5(
        text, content = '', contentless_delete = 1, tokenize = 'unicode61 remove_diacritics 0'
    );
    -- Deleted rows do not trigger merges of their own (they made prune about
    -- four times slower); ordinary merges and `hooktrail compact` drop them.
    INSERT INTO event_search(event_search, rank) VALUES ('deletemerge', 0);
"#;

/// How often the indexer looks for events to index.
const INDEX_TICK: Duration = Duration::from_millis(50);
/// Events indexed per write (one transaction, one FTS5 segment).
const INDEX_CHUNK: i64 = 500;
/// New events per [`INDEX_TICK`] above which ingest counts as flat out and
/// indexing waits (5,000 a second).
const INDEX_BURST: i64 = 250;

/// The `seq` up to which every event is in the search index.
fn indexed_upto(conn: &Connection) -> Result<i64, Error> {
    let v: Option<String> =
        conn.prepare_cached("SELECT value FROM meta WHERE key = 'search_upto'")?.query_row([], |r| r.get(0)).optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn set_indexed_upto(conn: &Connection, seq: i64) -> Result<(), Error> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES ('search_upto', ?1)")?.execute([seq.to_string()])?;
    Ok(())
}

/// Indexes up to `chunk` events after `meta.search_upto`, on the writer
/// (one transaction, so two daemons never index the same event twice).
fn index_pending(conn: &Connection, chunk: i64) -> Result<i64, Error> {
    let upto = indexed_upto(conn)?;
    let mut read = conn.prepare_cached("SELECT seq, payload_kind, body, payload FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let mut rows = read.query(params![upto, chunk])?;
    let (mut n, mut last) = (0, upto);
    while let Some(r) = rows.next()? {
        let (seq, body, payload): (i64, Vec<u8>, Option<String>) = (r.get(0)?, r.get(2)?, r.get(3)?);
        let text = stored_text(r.get(1)?, &body, payload.as_deref());
        conn.prepare_cached("INSERT INTO event_search(rowid, text) VALUES (?1, ?2)")?.execute(params![seq, text])?;
        (n, last) = (n + 1, seq);
    }
    if n > 0 {
        set_indexed_upto(conn, last)?;
    }
    Ok(n)
}

/// The daemon's indexer thread: every [`INDEX_TICK`], unless ingest is
/// running flat out, hands the writer one [`index_pending`] of
/// [`INDEX_CHUNK`] events, as a lazy write. Stops when the store closes.
pub(super) fn index_loop(tx: SyncSender<Box<dyn WriteOp>>, read: Connection, shared: Arc<Shared>) {
    let mut last_max: Option<i64> = None;
    while !shared.closing.load(Ordering::Relaxed) {
        std::thread::sleep(INDEX_TICK);
        if shared.fault.get().is_some() {
            continue;
        }
        let looked = (|| -> Result<(i64, i64), Error> {
            let max: i64 = read.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
            Ok((max, indexed_upto(&read)?))
        })();
        let Ok((max, upto)) = looked else { continue };
        let flat_out = last_max.is_some_and(|m| max - m > INDEX_BURST);
        last_max = Some(max);
        if flat_out || upto >= max {
            continue;
        }
        let (reply, rx) = oneshot::channel();
        let op: Box<dyn WriteOp> = Box::new(Op {
            f: |conn: &Connection, _: &mut WriterState| index_pending(conn, INDEX_CHUNK),
            out: None,
            reply,
            urgent: false,
            queued: None,
        });
        if tx.try_send(op).is_err() {
            continue;
        }
        match rx.blocking_recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "indexing events for search failed; will try again"),
            Err(_) => return,
        }
    }
}

/// Work a migration needs beyond its SQL, in its transaction: migration 4
/// indexes every stored event for search (README "Upgrading" says how long).
pub(super) fn after_migration(conn: &Connection, version: usize, sql: &str) -> Result<(), Error> {
    if sql != MIGRATION {
        return Ok(());
    }
    let started = Instant::now();
    let mut read = conn.prepare("SELECT seq, payload_kind, body, payload FROM events")?;
    let mut write = conn.prepare("INSERT INTO event_search(rowid, text) VALUES (?1, ?2)")?;
    let mut n = 0u64;
    let mut rows = read.query([])?;
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let (body, payload): (Vec<u8>, Option<String>) = (r.get(2)?, r.get(3)?);
        let text = stored_text(r.get(1)?, &body, payload.as_deref());
        write.execute(params![seq, text])?;
        n += 1;
    }
    let max: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
    set_indexed_upto(conn, max)?;
    if n > 0 {
        tracing::info!(version, events = n, took_ms = started.elapsed().as_millis() as u64, "indexed the stored events for search");
    }
    Ok(())
}

/// [`search::event_text`] of a stored event (a payload that does not parse
/// searches as its body).
fn stored_text(kind: i64, body: &[u8], payload: Option<&str>) -> String {
    let value = payload_value(kind, body, payload).ok();
    search::event_text(value.as_ref(), body)
}

/// The searchable text of an event about to be stored.
fn new_text(ev: &NewEvent) -> String {
    let value = match &ev.payload {
        Payload::Null => None,
        Payload::Body => json_doc(&ev.body).ok(),
        Payload::Json(s) => json_doc(s.as_bytes()).ok(),
    };
    search::event_text(value.as_ref(), &ev.body)
}

/// `search_hit(payload_kind, body, payload, text)`: [`search::contains`]
/// over the event's searchable text.
pub(super) fn register(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function("search_hit", 4, FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC, |ctx| {
        let kind: i64 = ctx.get(0)?;
        let body = match ctx.get_raw(1) {
            ValueRef::Blob(b) | ValueRef::Text(b) => b,
            _ => &[],
        };
        let payload = match ctx.get_raw(2) {
            ValueRef::Text(t) => std::str::from_utf8(t).ok(),
            _ => None,
        };
        let needle: String = ctx.get(3)?;
        Ok(search::contains(&stored_text(kind, body, payload), &needle))
    })
}

/// Indexes a new event (row `seq`) for search at once (`fill` only; ingest
/// leaves it to [`index_loop`]).
fn index_event(conn: &Connection, seq: i64, ev: &NewEvent) -> Result<(), Error> {
    conn.prepare_cached("INSERT INTO event_search(rowid, text) VALUES (?1, ?2)")?.execute(params![seq, new_text(ev)])?;
    Ok(())
}

/// Where an event is counted: its source and receive hour.
pub(super) struct EventKey {
    source: String,
    hour: i64,
}

impl EventKey {
    pub(super) fn new(source: &str, received_at: DateTime<Utc>) -> Self {
        EventKey { source: source.to_string(), hour: rules::tally_hour(received_at) }
    }
}

/// An event's key and status as stored.
fn event_row(conn: &Connection, seq: i64) -> Result<(EventKey, EventStatus), Error> {
    let (source, received_at, status): (String, Micros, EventStatus) = conn
        .prepare_cached("SELECT source, received_at, status FROM events WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok((EventKey::new(&source, received_at.0), status))
}

fn add(st: &mut WriterState, key: &EventKey, handler: &str, moves: Vec<(&'static str, i64)>) {
    for (state, n) in moves {
        *st.tallies.entry((key.source.clone(), handler.to_string(), key.hour, state)).or_default() += n;
    }
}

/// Counts an event's change of state ([`rules::tally_moves`]).
pub(super) fn count_event(st: &mut WriterState, key: &EventKey, from: Option<EventStatus>, to: Option<EventStatus>) {
    let moves = rules::tally_moves(from, to).into_iter().map(|(s, n)| (s.as_str(), n)).collect();
    add(st, key, "", moves);
}

/// Counts a delivery's change of state ([`rules::tally_moves`]).
pub(super) fn count_delivery(
    st: &mut WriterState,
    key: &EventKey,
    handler: &str,
    from: Option<DeliveryStatus>,
    to: Option<DeliveryStatus>,
) {
    let moves = rules::tally_moves(from, to).into_iter().map(|(s, n)| (s.as_str(), n)).collect();
    add(st, key, handler, moves);
}

/// Counts a change of state of a delivery of event `seq`.
pub(super) fn delivery_moved(
    conn: &Connection,
    st: &mut WriterState,
    seq: i64,
    handler: &str,
    from: DeliveryStatus,
    to: DeliveryStatus,
) -> Result<(), Error> {
    if from == to {
        return Ok(());
    }
    let (key, _) = event_row(conn, seq)?;
    count_delivery(st, &key, handler, Some(from), Some(to));
    Ok(())
}

/// Sets event `seq`'s status, counting the change.
pub(super) fn set_event_status(conn: &Connection, st: &mut WriterState, seq: i64, status: EventStatus) -> Result<(), Error> {
    let (key, was) = event_row(conn, seq)?;
    event_status_as_known(conn, st, (seq, &key, was), status)
}

/// [`set_event_status`] for a caller that read the event row already.
fn event_status_as_known(
    conn: &Connection,
    st: &mut WriterState,
    (seq, key, was): (i64, &EventKey, EventStatus),
    status: EventStatus,
) -> Result<(), Error> {
    if was != status {
        conn.prepare_cached("UPDATE events SET status = ?1 WHERE seq = ?2")?.execute(params![status.as_str(), seq])?;
        count_event(st, key, Some(was), Some(status));
    }
    Ok(())
}

/// [`delivery_moved`] and then [`set_event_status`], reading the event
/// row once: what a claim and an attempt record do for each delivery.
pub(super) fn delivery_and_event_moved(
    conn: &Connection,
    st: &mut WriterState,
    seq: i64,
    handler: &str,
    moved: (DeliveryStatus, DeliveryStatus),
    status: EventStatus,
) -> Result<(), Error> {
    let (key, was) = event_row(conn, seq)?;
    moved_as_known(conn, st, (seq, &key, was), handler, moved, status)
}

/// [`delivery_and_event_moved`] for a caller that read the event row
/// already: its key and the status it had.
pub(super) fn moved_as_known(
    conn: &Connection,
    st: &mut WriterState,
    (seq, key, was): (i64, &EventKey, EventStatus),
    handler: &str,
    (from, to): (DeliveryStatus, DeliveryStatus),
    status: EventStatus,
) -> Result<(), Error> {
    if from != to {
        count_delivery(st, key, handler, Some(from), Some(to));
    }
    event_status_as_known(conn, st, (seq, key, was), status)
}

/// Writes the transaction's counter changes; called just before COMMIT.
pub(super) fn flush(conn: &Connection, st: &mut WriterState) -> Result<(), Error> {
    if st.tallies.is_empty() {
        return Ok(());
    }
    let mut hours = conn.prepare_cached(
        "INSERT INTO tally_hours(hour, source, handler, state, n) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(hour, source, handler, state) DO UPDATE SET n = n + excluded.n",
    )?;
    let mut totals = conn.prepare_cached(
        "INSERT INTO tally_totals(source, handler, state, n) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(source, handler, state) DO UPDATE SET n = n + excluded.n",
    )?;
    for ((source, handler, hour, state), n) in st.tallies.drain() {
        if n == 0 {
            continue;
        }
        hours.execute(params![hour, source, handler, state, n])?;
        totals.execute(params![source, handler, state, n])?;
    }
    Ok(())
}

/// Deletes up to `batch` finished events received before `before`, with
/// their deliveries, attempts and search entries, counting each away.
pub(super) fn prune_batch(conn: &Connection, st: &mut WriterState, before: DateTime<Utc>, batch: usize) -> Result<u64, Error> {
    let victims: Vec<(i64, String, Micros, EventStatus)> = conn
        .prepare_cached(concat!(
            // The id bound keeps the scan to old events, never the whole table.
            "SELECT seq, source, received_at, status FROM events WHERE id < ?3 AND status IN ",
            prunable_sql!(),
            " AND received_at < ?1 LIMIT ?2"
        ))?
        .query_map(params![before.timestamp_micros(), batch as i64, id_floor(before)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let upto = indexed_upto(conn)?;
    for (seq, source, received_at, status) in &victims {
        let key = EventKey::new(source, received_at.0);
        let deliveries: Vec<(String, DeliveryStatus)> = conn
            .prepare_cached("SELECT handler, status FROM deliveries WHERE event_seq = ?1")?
            .query_map([seq], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (handler, d) in deliveries {
            count_delivery(st, &key, &handler, Some(d), None);
        }
        count_event(st, &key, Some(*status), None);
        if *seq <= upto {
            conn.prepare_cached("DELETE FROM event_search WHERE rowid = ?1")?.execute([seq])?;
        }
        conn.prepare_cached("DELETE FROM events WHERE seq = ?1")?.execute([seq])?;
    }
    // Deleting the newest events lets SQLite give their `seq` again: what
    // is indexed must not reach past the newest event left.
    let max: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
    if max < upto {
        set_indexed_upto(conn, max)?;
    }
    Ok(victims.len() as u64)
}

/// A counter's state as the stats read it.
enum State {
    Event(EventStatus),
    Delivery(DeliveryStatus),
}

fn state(handler: &str, text: &str) -> Result<State, Error> {
    let corrupt = |e: String| Error::Store(StoreError::Corrupt(format!("counter state: {e}")));
    if handler.is_empty() {
        text.parse().map(State::Event).map_err(corrupt)
    } else {
        text.parse().map(State::Delivery).map_err(corrupt)
    }
}

type Rows = BTreeMap<(String, Option<String>), StatsRow>;

fn add_row(rows: &mut Rows, source: String, handler: String, text: &str, n: i64) -> Result<(), Error> {
    let n = u64::try_from(n).map_err(|_| Error::Store(StoreError::Corrupt(format!("counter {source}/{handler}/{text} is {n}"))))?;
    if n == 0 {
        return Ok(());
    }
    let column = match state(&handler, text)? {
        State::Event(s) => rules::event_column(s),
        State::Delivery(s) => rules::delivery_column(s),
    };
    let handler = (!handler.is_empty()).then_some(handler);
    let row = rows.entry((source.clone(), handler.clone())).or_insert_with(|| StatsRow { source, handler, ..Default::default() });
    row.received += n;
    row.add(column, n);
    Ok(())
}

/// `hooktrail stats`: from the counters; with `since`, the whole hours from
/// the counters and the first, partial hour from its events (through
/// `events_received`), so the answer is exact.
pub(super) fn stats(conn: &Connection, source: Option<String>, since: Option<DateTime<Utc>>) -> Result<Vec<StatsRow>, Error> {
    let mut rows = Rows::new();
    let mut each = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> Result<(), Error> {
        let mut stmt = conn.prepare_cached(sql)?;
        let mut q = stmt.query(args)?;
        while let Some(r) = q.next()? {
            add_row(&mut rows, r.get(0)?, r.get(1)?, &r.get::<_, String>(2)?, r.get(3)?)?;
        }
        Ok(())
    };
    match since {
        None => each("SELECT source, handler, state, n FROM tally_totals WHERE (?1 IS NULL OR source = ?1)", &[&source])?,
        Some(t) => {
            let hour = rules::tally_hour(t);
            let whole = t.timestamp_micros() == hour * MICROS_PER_HOUR;
            let from_hour = if whole { hour } else { hour + 1 };
            each(
                "SELECT source, handler, state, sum(n) FROM tally_hours WHERE hour >= ?1 AND (?2 IS NULL OR source = ?2)
                 GROUP BY source, handler, state",
                &[&from_hour, &source],
            )?;
            if !whole {
                let (from, to) = (t.timestamp_micros(), from_hour * MICROS_PER_HOUR);
                each(
                    "SELECT source, '', status, count(*) FROM events INDEXED BY events_received
                     WHERE received_at >= ?1 AND received_at < ?2 AND (?3 IS NULL OR source = ?3) GROUP BY source, status",
                    &[&from, &to, &source],
                )?;
                each(
                    "SELECT e.source, d.handler, d.status, count(*) FROM events e INDEXED BY events_received JOIN deliveries d ON d.event_seq = e.seq
                     WHERE e.received_at >= ?1 AND e.received_at < ?2 AND (?3 IS NULL OR e.source = ?3) GROUP BY e.source, d.handler, d.status",
                    &[&from, &to, &source],
                )?;
            }
        }
    }
    let since_hour = since.map_or(i64::MIN, |t| t.timestamp() / SECS_PER_HOUR);
    let mut cn = conn.prepare_cached(
        "SELECT source, kind, sum(n) FROM counters WHERE hour >= ?1 AND (?2 IS NULL OR source = ?2) GROUP BY source, kind",
    )?;
    for r in
        cn.query_map(params![since_hour, source], |r| Ok((r.get::<_, String>(0)?, r.get::<_, RejectReason>(1)?, r.get::<_, u64>(2)?)))?
    {
        let (src, kind, n) = r?;
        let row = rows.entry((src.clone(), None)).or_insert_with(|| StatsRow { source: src, ..Default::default() });
        row.add(rules::counter_column(kind), n);
    }
    Ok(rows.into_values().collect())
}

/// The chart: events per receive hour from the hour `since` falls in.
pub(super) fn hourly(conn: &Connection, since: DateTime<Utc>) -> Result<Vec<HourCounts>, Error> {
    let mut stmt =
        conn.prepare_cached("SELECT hour, state, sum(n) FROM tally_hours WHERE hour >= ?1 AND handler = '' GROUP BY hour, state")?;
    let rows = stmt
        .query_map([rules::tally_hour(since)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, EventStatus>(1)?, u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0)))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rules::hourly_counts(rows).map_err(|hour| Error::Store(StoreError::Corrupt(format!("counter hour {hour} is out of range"))))
}

/// Queue depth from the counters; the oldest of each (handler, state) from
/// the `deliveries_waiting` index.
pub(super) fn queue_depth(conn: &Connection) -> Result<Vec<QueueDepth>, Error> {
    let counts: Vec<(String, DeliveryStatus, i64)> = conn
        .prepare_cached(concat!(
            "SELECT handler, state, sum(n) FROM tally_totals WHERE handler != '' AND state IN ",
            unfinished_sql!(),
            " GROUP BY handler, state"
        ))?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut oldest = conn.prepare_cached(concat!(
        "SELECT min(queued_at) FROM deliveries WHERE handler = ?1 AND status = ?2 AND status IN ",
        unfinished_sql!()
    ))?;
    let mut out = Vec::new();
    for (handler, status, n) in counts {
        if n <= 0 {
            continue;
        }
        let at: Option<Micros> = oldest.query_row(params![handler, status.as_str()], |r| r.get(0))?;
        out.push(QueueDepth { handler, status, count: n as u64, oldest_queued_at: at.map(|t| t.0) });
    }
    Ok(out)
}

/// The words `filter` lets the search index narrow by: the search text,
/// else the `--match` value with the most to say (longest), as an FTS5
/// phrase. `None` when nothing narrows (no search, no match value with a
/// letter or digit).
fn narrowing(f: &EventFilter) -> Option<String> {
    let text = match &f.search {
        Some(s) => s.as_str(),
        None => f.matches.iter().map(|(_, v)| v.as_str()).filter(|v| !search::words(v).is_empty()).max_by_key(|v| v.len())?,
    };
    if search::words(text).is_empty() {
        return None;
    }
    Some(format!("\"{}\"", text.replace('"', "\"\"")))
}

/// One query of a listing: `SELECT … FROM {from} {where_sql} ORDER BY {by}`.
pub(super) struct Part {
    pub from: &'static str,
    pub where_sql: String,
    pub args: Vec<V>,
    pub by: &'static str,
}

/// The queries of a listing, in list order, whose results are concatenated
/// up to the limit. Without a search (or a `--match` value) one scan in
/// `seq` order. With one: the events not yet indexed (checked one by one),
/// and the search index up to `meta.search_upto`, newest (or oldest)
/// candidate first, every other filter checked on its rows.
pub(super) fn listing_parts(conn: &Connection, f: &EventFilter) -> Result<Vec<Part>, Error> {
    let (where_sql, args) = filter_sql(f);
    let Some(phrase) = narrowing(f) else { return Ok(vec![by_handler(f, where_sql, args)]) };
    let upto = indexed_upto(conn)?;
    let mut tail = Part { from: "events e", where_sql: where_sql.clone(), args: args.clone(), by: "e.seq" };
    tail.args.push(V::Integer(upto));
    tail.where_sql.push_str(&format!(" AND e.seq > ?{}", tail.args.len()));
    let mut indexed =
        Part { from: "event_search CROSS JOIN events e ON e.seq = event_search.rowid", where_sql, args, by: "event_search.rowid" };
    let (w, a) = (&mut indexed.where_sql, &mut indexed.args);
    a.push(V::Text(phrase));
    w.push_str(&format!(" AND event_search MATCH ?{}", a.len()));
    a.push(V::Integer(upto));
    w.push_str(&format!(" AND event_search.rowid <= ?{}", a.len()));
    // FTS5 takes rowid bounds itself: a later page starts where the last ended.
    if let Some(b) = f.before {
        a.push(V::Text(b.to_string()));
        w.push_str(&format!(" AND event_search.rowid < coalesce((SELECT seq FROM events WHERE id = ?{}), 9223372036854775807)", a.len()));
    }
    if let Some(after) = f.after {
        a.push(V::Text(after.to_string()));
        w.push_str(&format!(" AND event_search.rowid > coalesce((SELECT seq FROM events WHERE id = ?{}), 0)", a.len()));
    }
    Ok(if f.ascending { vec![indexed, tail] } else { vec![tail, indexed] })
}

/// A listing without a search: a scan in `seq` order, which the planner
/// narrows by the source or status index. With `--handler` and neither of
/// those, the handler's deliveries lead (`deliveries_handler`, newest
/// first), so a handler with few events is not found by reading them all.
fn by_handler(f: &EventFilter, mut where_sql: String, mut args: Vec<V>) -> Part {
    let Some(h) = f.handler.as_ref().filter(|_| f.source.is_none() && f.status.is_none()) else {
        return Part { from: "events e", where_sql, args, by: "e.seq" };
    };
    args.push(V::Text(h.clone()));
    where_sql.push_str(&format!(" AND dh.handler = ?{}", args.len()));
    if let Some(b) = f.before {
        args.push(V::Text(b.to_string()));
        where_sql
            .push_str(&format!(" AND dh.event_seq < coalesce((SELECT seq FROM events WHERE id = ?{}), 9223372036854775807)", args.len()));
    }
    if let Some(a) = f.after {
        args.push(V::Text(a.to_string()));
        where_sql.push_str(&format!(" AND dh.event_seq > coalesce((SELECT seq FROM events WHERE id = ?{}), 0)", args.len()));
    }
    Part {
        from: "deliveries dh INDEXED BY deliveries_handler CROSS JOIN events e ON e.seq = dh.event_seq",
        where_sql,
        args,
        by: "dh.event_seq",
    }
}

/// `--search` checked on each candidate row ([`search::contains`]).
pub(super) fn search_sql(f: &EventFilter, sql: &mut String, args: &mut Vec<V>) {
    if let Some(text) = &f.search {
        args.push(V::Text(text.clone()));
        sql.push_str(&format!(" AND search_hit(e.payload_kind, e.body, e.payload, ?{})", args.len()));
    }
}

/// Hands up to [`VACUUM_PAGES`] free pages back to the file system, when
/// the database was made with `auto_vacuum = INCREMENTAL` (housekeeping).
/// Returns whether it wrote (the file shrinks at the next checkpoint).
pub(super) fn give_back_space(conn: &Connection) -> bool {
    let free = || -> rusqlite::Result<i64> {
        let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if mode != 2 {
            return Ok(0);
        }
        conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))
    };
    match free() {
        Ok(0) => false,
        Ok(_) => match incremental_vacuum(conn, VACUUM_PAGES) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "returning free space to the file system failed");
                false
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "reading the free page count failed");
            false
        }
    }
}

/// `PRAGMA incremental_vacuum(pages)` (0: all), stepped to its end: it
/// frees pages as it is stepped.
fn incremental_vacuum(conn: &Connection, pages: i64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// `hooktrail compact`: hands every free page back at once; a database made
/// before incremental vacuum is rewritten once (`VACUUM`) to turn it on.
/// Returns what it did, for the operator.
pub(super) fn compact(conn: &Connection) -> Result<String, Error> {
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let size = |conn: &Connection| -> rusqlite::Result<i64> { conn.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0)) };
    let before = size(conn)? * page;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    conn.execute_batch("INSERT INTO event_search(event_search) VALUES ('optimize')")?;
    let how = if mode == 2 {
        incremental_vacuum(conn, 0)?;
        "returned the free pages"
    } else {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
        "rewrote the file once (VACUUM) and turned on incremental vacuum"
    };
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let after = size(conn)? * page;
    Ok(format!("{how}: {before} bytes before, {after} bytes after"))
}

/// Events written per transaction by [`fill`].
const FILL_BATCH: u64 = 10_000;

/// `hooktrail bench-fill` (hidden; `bench/scale.sh` only): writes `events`
/// unique Net-Results-like form events straight into the database at
/// `path`, spread evenly over the past year, each with one succeeded
/// delivery to `crm` and its attempt, counted and indexed as ingest would.
/// Posting ten million events would take hours; this takes minutes.
/// `old_schema` leaves the file at schema version 4 (what migrations 5 and
/// 6 add is dropped after the fill, what 6 drops put back), so the next
/// start measures migration 5's back-fill of the counters and the search index.
pub(super) fn fill(path: &Path, events: u64, old_schema: bool) -> Result<(), Error> {
    let mut conn = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    migrate(&mut conn)?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -64000;")?;
    let mut st = WriterState {
        ids: ulid::Generator::new(),
        new_work: false,
        backlog_delta: 0,
        tallies: Tallies::new(),
        finishing: Default::default(),
    };
    let now = Utc::now();
    let span = chrono::Duration::days(365);
    let start = now - span;
    let step_us = span.num_microseconds().unwrap_or(0) / events.max(1) as i64;
    let started = Instant::now();
    let mut i = 0u64;
    while i < events {
        let tx = conn.transaction()?;
        let end = (i + FILL_BATCH).min(events);
        for n in i..end {
            let received_at = start + chrono::Duration::microseconds(step_us * n as i64);
            fill_one(&tx, &mut st, n, received_at)?;
        }
        flush(&tx, &mut st)?;
        tx.commit()?;
        i = end;
        if i % 1_000_000 == 0 || i == events {
            eprintln!("bench-fill: {i} events in {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    let max: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
    set_indexed_upto(&conn, max)?;
    if old_schema {
        conn.execute_batch(
            "DROP TABLE tally_totals; DROP TABLE tally_hours; DROP TABLE event_search;
             DROP INDEX events_received; DROP INDEX deliveries_waiting; DROP INDEX deliveries_handler;
             DROP INDEX deliveries_by_key; ALTER TABLE order_heads DROP COLUMN floor;
             CREATE INDEX deliveries_keyed ON deliveries(handler, order_key, event_seq)
                 WHERE order_key IS NOT NULL AND status IN ('pending', 'retrying', 'running');
             PRAGMA user_version = 4;",
        )?;
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

fn fill_one(conn: &Connection, st: &mut WriterState, n: u64, received_at: DateTime<Utc>) -> Result<(), Error> {
    let ms = u64::try_from(received_at.timestamp_millis()).unwrap_or(0);
    let id = EventId(ulid::Ulid::from_parts(ms, rand::random::<u128>()));
    let email = format!("lead{n}@example{}.com", n % 997);
    let body = format!(
        "form_id=1c051a75-f78c-4961-b8d5-b233229ae125&contact_id={}&email_address={}&first_name=First{}&last_name=Last{n}&company=Company+{}&form_completion_id={}",
        700_000_000 + n,
        email.replace('@', "%40"),
        n % 5000,
        n % 1000,
        4_000_000 + n
    );
    let payload = serde_json::json!({
        "form_id": "1c051a75-f78c-4961-b8d5-b233229ae125",
        "contact_id": (700_000_000 + n).to_string(),
        "email_address": [email],
        "first_name": [format!("First{}", n % 5000)],
        "last_name": [format!("Last{n}")],
        "company": format!("Company {}", n % 1000),
        "form_completion_id": (4_000_000 + n).to_string(),
    })
    .to_string();
    let t = received_at.timestamp_micros();
    conn.prepare_cached(
        "INSERT INTO events(id, source, status, received_at, method, content_type, query, headers, remote_addr, body, payload_kind, payload)
         VALUES (?1, 'netresults', 'done', ?2, 'POST', 'application/x-www-form-urlencoded', '',
                 '{\"content-type\":\"application/x-www-form-urlencoded\",\"user-agent\":\"Net-Results\"}', '203.0.113.7', ?3, ?4, ?5)",
    )?
    .execute(params![id.to_string(), t, body.as_bytes(), PAYLOAD_JSON, payload])?;
    let seq = conn.last_insert_rowid();
    conn.prepare_cached(
        "INSERT INTO deliveries(event_seq, handler, status, attempts, next_at, queued_at, updated_at) VALUES (?1, 'crm', 'succeeded', 1, ?2, ?2, ?2)",
    )?
    .execute(params![seq, t])?;
    let delivery = conn.last_insert_rowid();
    conn.prepare_cached(
        "INSERT INTO attempts(delivery_id, number, started_at, duration_ms, outcome, http_status, output) VALUES (?1, 1, ?2, 120, 'success', 200, 'ok')",
    )?
    .execute(params![delivery, t])?;
    let ev = NewEvent {
        source: "netresults".into(),
        received_at,
        method: "POST".into(),
        content_type: String::new(),
        query: String::new(),
        headers: String::new(),
        remote_addr: String::new(),
        body: Bytes::from(body),
        payload: Payload::Json(payload),
        dedup: None,
        handlers: Vec::new(),
        order_keys: Vec::new(),
    };
    index_event(conn, seq, &ev)?;
    let key = EventKey::new("netresults", received_at);
    count_event(st, &key, None, Some(EventStatus::Done));
    count_delivery(st, &key, "crm", None, Some(DeliveryStatus::Succeeded));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source: &str, handlers: &[&str], received_at: DateTime<Utc>) -> NewEvent {
        NewEvent {
            source: source.into(),
            received_at,
            method: "POST".into(),
            content_type: "application/json".into(),
            query: String::new(),
            headers: "{}".into(),
            remote_addr: "127.0.0.1".into(),
            body: Bytes::from_static(br#"{"email":"a@b.c"}"#),
            payload: Payload::Body,
            dedup: None,
            handlers: handlers.iter().map(|h| h.to_string()).collect(),
            order_keys: Vec::new(),
        }
    }

    #[tokio::test]
    async fn stats_queue_depth_and_the_chart_never_read_the_events_table() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        let store = SqliteStore::open(&path, Role::All).expect("creating");
        let now = Utc::now();
        for (i, source) in ["a", "b", "a"].into_iter().enumerate() {
            store.insert_event(event(source, &["h"], now - chrono::Duration::hours(i as i64))).await.expect("inserting");
        }
        store.close().await;
        drop(store);
        // With the events out of reach, only the counters can answer.
        Connection::open(&path).expect("opening by hand").execute_batch("ALTER TABLE events RENAME TO out_of_reach").expect("renaming");
        let store = SqliteStore::open(&path, Role::Client).expect("opening");
        let rows = store.stats(None, None).await.expect("stats from the counters alone");
        let a = rows.iter().find(|r| r.source == "a" && r.handler.is_none()).expect("source a");
        assert_eq!((a.received, a.pending), (2, 2));
        let whole_hour = DateTime::from_timestamp(rules::tally_hour(now - chrono::Duration::hours(1)) * SECS_PER_HOUR, 0).expect("a time");
        let since = store.stats(Some("a".into()), Some(whole_hour)).await.expect("stats --since a whole hour");
        assert_eq!(since.iter().find(|r| r.handler.is_none()).map(|r| r.received), Some(1));
        let hours = store.hourly(now - chrono::Duration::hours(3)).await.expect("hourly");
        assert_eq!(hours.iter().map(|h| h.received).sum::<u64>(), 3);
        let depth = store.queue_depth().await.expect("queue depth");
        assert_eq!(depth.iter().map(|q| q.count).sum::<u64>(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn a_bench_fill_left_at_the_old_schema_migrates_to_the_same_counters_and_search() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        fill(&path, 40, true).expect("filling at the old schema");
        let version: i64 = Connection::open(&path).expect("opening").query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(version, 4, "left before the counters and search migration");
        let store = SqliteStore::open(&path, Role::All).expect("migrating");
        let rows = store.stats(None, None).await.expect("stats");
        let events = rows.iter().find(|r| r.handler.is_none()).expect("the events' row");
        assert_eq!(events.received, 40, "{rows:?}");
        let crm = rows.iter().find(|r| r.handler.as_deref() == Some("crm")).expect("the crm row");
        assert_eq!(crm.succeeded, 40, "{rows:?}");
        let found = store
            .list_events(EventFilter { search: Some("lead7@example7.com".into()), ..Default::default() }, Detail::Summary)
            .await
            .expect("searching");
        assert_eq!(found.len(), 1, "one lead, one event");
        store.close().await;
    }

    /// The plan of a listing with `filter`, one line per step.
    fn plan(conn: &Connection, filter: &EventFilter) -> String {
        let mut lines = Vec::new();
        for Part { from, where_sql, args, by } in listing_parts(conn, filter).expect("listing") {
            let sql = format!("EXPLAIN QUERY PLAN SELECT {EVENT_COLS} FROM {from} {where_sql} ORDER BY {by} DESC LIMIT 20");
            let mut stmt = conn.prepare(&sql).expect("planning");
            let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3)).expect("planning");
            lines.extend(rows.collect::<Result<Vec<_>, _>>().expect("planning"));
        }
        lines.join("\n")
    }

    /// A page after (or before) a cursor starts at the cursor's position by
    /// the table's key, in both orders, instead of scanning from the end.
    #[tokio::test]
    async fn a_page_after_a_cursor_seeks_to_it_instead_of_scanning_up_to_it() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        let id = store.insert_event(event("web", &[], Utc::now())).await.expect("inserting").id;
        let conn = open_conn(&store.path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("opening");
        for filter in [
            EventFilter { after: Some(id), ascending: true, limit: Some(500), ..Default::default() },
            EventFilter { before: Some(id), limit: Some(20), ..Default::default() },
        ] {
            let p = plan(&conn, &filter);
            assert!(p.contains("USING INTEGER PRIMARY KEY (rowid"), "{p}");
            assert!(!p.lines().any(|l| l.starts_with("SCAN e")), "{p}");
        }
        store.close().await;
    }

    #[tokio::test]
    async fn search_reads_the_index_up_to_where_it_reaches_and_checks_newer_events_one_by_one() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("db.sqlite"), Role::All).expect("creating");
        let mut want = Vec::new();
        for n in 0..30 {
            let mut ev = event("web", &[], Utc::now());
            let email = if n % 3 == 0 { "dgolden@mid-corp.com" } else { "ann@example.com" };
            ev.body = Bytes::from(format!(r#"{{"email":"{email}","n":{n}}}"#));
            let id = store.insert_event(ev).await.expect("inserting").id;
            if n % 3 == 0 {
                want.push(id);
            }
        }
        let upto = || {
            let conn = open_conn(&store.path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("opening");
            indexed_upto(&conn).expect("reading")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while upto() < 30 {
            assert!(Instant::now() < deadline, "the indexer did not catch up: {}", upto());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Three more that the indexer has not reached yet (they may be, by now: both ways must agree).
        for _ in 0..3 {
            let mut ev = event("web", &[], Utc::now());
            ev.body = Bytes::from_static(br#"{"email":"dgolden@mid-corp.com"}"#);
            want.push(store.insert_event(ev).await.expect("inserting").id);
        }
        want.reverse();
        let search = |limit, before| EventFilter { search: Some("dgolden@mid-corp.com".into()), limit, before, ..Default::default() };
        let ids = |list: Vec<EventRecord>| list.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(store.list_events(search(None, None), Detail::Summary).await.expect("listing")), want);
        let mut paged = Vec::new();
        let mut before = None;
        while let Some(last) = ids(store.list_events(search(Some(4), before), Detail::Summary).await.expect("listing"))
            .into_iter()
            .inspect(|id| paged.push(*id))
            .last()
        {
            before = Some(last);
        }
        assert_eq!(paged, want, "pages of four across the indexed and the newer events");
        let matched = EventFilter { matches: vec![("/email".into(), "ann@example.com".into())], ..Default::default() };
        assert_eq!(store.list_events(matched, Detail::Summary).await.expect("listing").len(), 20);
        store.close().await;
    }

    #[tokio::test]
    async fn search_match_and_handler_are_answered_from_an_index_not_a_scan_of_the_events() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(&path, Role::All).expect("creating").close().await;
        let conn = open_conn(&path, OpenFlags::SQLITE_OPEN_READ_WRITE).expect("opening");
        for filter in [
            EventFilter { search: Some("dgolden@mid-corp.com".into()), ..Default::default() },
            EventFilter { matches: vec![("/email/0".into(), "dgolden@mid-corp.com".into())], ..Default::default() },
            EventFilter {
                search: Some("golden".into()),
                source: Some("web".into()),
                before: Some(EventId(ulid::Ulid::new())),
                ..Default::default()
            },
            EventFilter { handler: Some("crm".into()), before: Some(EventId(ulid::Ulid::new())), ..Default::default() },
        ] {
            let plan = plan(&conn, &filter);
            let index = if filter.handler.is_some() { "deliveries_handler" } else { "VIRTUAL TABLE INDEX" };
            assert!(plan.contains(index), "{filter:?} uses {index}:\n{plan}");
            assert!(!plan.lines().any(|l| l == "SCAN e" || l.starts_with("SCAN e ")), "{filter:?} scans no events:\n{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{filter:?} comes newest first from the index, unsorted:\n{plan}");
        }
    }
}
