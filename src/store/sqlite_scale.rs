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
//!   event's `seq`): [`search::event_text`] of each event, indexed in the
//!   insert's transaction. It finds candidates; [`search::contains`] (the
//!   SQL function `search_hit`) decides, so the index may over-find, never
//!   under-find. `--match` narrows by its value's words the same way before
//!   the pointer is checked.
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
    -- The queue-depth metrics' oldest waiting delivery per handler and state.
    CREATE INDEX deliveries_waiting ON deliveries(handler, status, queued_at)
        WHERE status IN ('pending', 'retrying', 'running');

    CREATE VIRTUAL TABLE event_search USING fts5(
        text, content = '', contentless_delete = 1, tokenize = 'unicode61 remove_diacritics 0'
    );
"#;

/// Work a migration needs beyond its SQL, in its transaction: migration 5
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

/// Indexes a new event (row `seq`) for search, in the insert's transaction.
pub(super) fn index_event(conn: &Connection, seq: i64, ev: &NewEvent) -> Result<(), Error> {
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
    if was == status {
        return Ok(());
    }
    conn.prepare_cached("UPDATE events SET status = ?1 WHERE seq = ?2")?.execute(params![status.as_str(), seq])?;
    count_event(st, &key, Some(was), Some(status));
    Ok(())
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
        conn.prepare_cached("DELETE FROM event_search WHERE rowid = ?1")?.execute([seq])?;
        conn.prepare_cached("DELETE FROM events WHERE seq = ?1")?.execute([seq])?;
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
    let mut hours: BTreeMap<i64, HourCounts> = BTreeMap::new();
    let mut q = stmt.query([rules::tally_hour(since)])?;
    while let Some(r) = q.next()? {
        let hour: i64 = r.get(0)?;
        let status: EventStatus = r.get(1)?;
        let n = u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0);
        let at = DateTime::from_timestamp(hour.saturating_mul(SECS_PER_HOUR), 0)
            .ok_or_else(|| Error::Store(StoreError::Corrupt(format!("counter hour {hour} is out of range"))))?;
        let h = hours.entry(hour).or_insert(HourCounts { hour: at, received: 0, done: 0, failed: 0 });
        h.received += n;
        match status {
            EventStatus::Done => h.done += n,
            EventStatus::Failed => h.failed += n,
            EventStatus::Pending | EventStatus::Processing | EventStatus::Retrying => {}
        }
    }
    Ok(hours.into_values().filter(|h| h.received > 0).collect())
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

/// The `FROM` of a listing and the column it is ordered by: with a search
/// (or a `--match` value), the search index leads, newest (or oldest)
/// candidate first, and every other filter is checked on its rows.
pub(super) fn listing_from(f: &EventFilter, where_sql: &mut String, args: &mut Vec<V>) -> (&'static str, &'static str) {
    let Some(phrase) = narrowing(f) else { return ("events e", "e.seq") };
    args.push(V::Text(phrase));
    where_sql.push_str(&format!(" AND event_search MATCH ?{}", args.len()));
    // FTS5 takes rowid bounds itself: a later page starts where the last ended.
    if let Some(b) = f.before {
        args.push(V::Text(b.to_string()));
        where_sql.push_str(&format!(
            " AND event_search.rowid < coalesce((SELECT seq FROM events WHERE id = ?{}), 9223372036854775807)",
            args.len()
        ));
    }
    if let Some(a) = f.after {
        args.push(V::Text(a.to_string()));
        where_sql.push_str(&format!(" AND event_search.rowid > coalesce((SELECT seq FROM events WHERE id = ?{}), 0)", args.len()));
    }
    ("event_search CROSS JOIN events e ON e.seq = event_search.rowid", "event_search.rowid")
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
pub(super) fn give_back_space(conn: &Connection) {
    let free = || -> rusqlite::Result<i64> {
        let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if mode != 2 {
            return Ok(0);
        }
        conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))
    };
    match free() {
        Ok(0) => {}
        Ok(_) => {
            if let Err(e) = conn.execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})")) {
                tracing::warn!(error = %e, "returning free space to the file system failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the free page count failed"),
    }
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
        conn.execute_batch("PRAGMA incremental_vacuum")?;
        "returned the free pages"
    } else {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
        "rewrote the file once (VACUUM) and turned on incremental vacuum"
    };
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let after = size(conn)? * page;
    Ok(format!("{how}: {before} bytes before, {after} bytes after"))
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

    /// The plan of a listing with `filter`, one line per step.
    fn plan(conn: &Connection, filter: &EventFilter) -> String {
        let (mut where_sql, mut args) = filter_sql(filter);
        let (from, by) = listing_from(filter, &mut where_sql, &mut args);
        let sql = format!("EXPLAIN QUERY PLAN SELECT {EVENT_COLS} FROM {from} {where_sql} ORDER BY {by} DESC LIMIT 20");
        let mut stmt = conn.prepare(&sql).expect("planning");
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3)).expect("planning");
        rows.collect::<Result<Vec<_>, _>>().expect("planning").join("\n")
    }

    #[tokio::test]
    async fn search_and_match_are_answered_from_the_search_index_not_a_scan_of_the_events() {
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
        ] {
            let plan = plan(&conn, &filter);
            assert!(plan.contains("VIRTUAL TABLE INDEX"), "{filter:?} uses the search index:\n{plan}");
            assert!(!plan.lines().any(|l| l == "SCAN e" || l.starts_with("SCAN e ")), "{filter:?} scans no events:\n{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{filter:?} comes newest first from the index, unsorted:\n{plan}");
        }
    }
}
