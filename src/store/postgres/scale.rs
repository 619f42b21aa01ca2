//! What keeps every operator question fast on a large PostgreSQL database
//! (README "Counters", "Search", "Disk space"); the schema is migration 2
//! ([`super::schema::SCALE`]).
//!
//! - **Counters**: triggers append each statement's changes of state to
//!   `tally_deltas` in its transaction; [`fold`] moves them into
//!   `tally_hours` and `tally_totals`. `stats`, the queue depth and the
//!   chart read the folded counters plus the deltas not yet folded, in one
//!   snapshot, never the events (but for the first, partial hour of
//!   `stats --since`, read through `events_received`).
//! - **Search**: `event_words.words` (under a GIN index) finds candidate
//!   events; [`search::contains`] on each candidate's text decides, so the
//!   answer is exactly SQLite's.

use std::collections::BTreeMap;

use tokio_postgres::IsolationLevel;

use super::*;
use crate::store::search;

/// The advisory lock a fold holds, so one node folds at a time.
const FOLD_LOCK: i64 = 0x686f_6f6b_7461_6c6c; // "hooktall"
/// How often a daemon folds the counter deltas.
pub(super) const FOLD_EVERY: Duration = Duration::from_secs(1);
/// Candidates read per query of a search, at least.
const SEARCH_CHUNK: i64 = 200;

/// The words under which an event is indexed for search: [`search::words`]
/// of its searchable text, each once, joined by spaces (a word has none)
/// for `string_to_array(…, ' ')`.
pub(super) fn index_words(payload: Option<&Value>, body: &[u8]) -> String {
    let mut words = search::words(&search::event_text(payload, body));
    words.sort_unstable();
    words.dedup();
    words.join(" ")
}

/// [`index_words`] of an event about to be stored.
pub(super) fn new_index_words(payload: &Payload, body: &[u8]) -> String {
    let value = match payload {
        Payload::Null => None,
        Payload::Body => json_doc(body).ok(),
        Payload::Json(s) => json_doc(s.as_bytes()).ok(),
    };
    index_words(value.as_ref(), body)
}

/// [`index_words`] of a stored event (a payload that does not parse
/// searches as its body, as on SQLite).
pub(super) fn stored_index_words(kind: i16, body: &[u8], payload: Option<&str>) -> String {
    let value = payload_value(kind, body, payload).ok();
    index_words(value.as_ref(), body)
}

/// Whether a stored event's searchable text contains `needle` ([`search::contains`]).
pub(super) fn stored_hit(kind: i16, body: &[u8], payload: Option<&str>, needle: &str) -> bool {
    let value = payload_value(kind, body, payload).ok();
    search::contains(&search::event_text(value.as_ref(), body), needle)
}

/// The words a listing narrows by: the search text's, else those of the
/// `--match` value with the most to say (longest). A number is not used:
/// its text in the payload may be spelt differently (`1e3`, `1000.0`).
pub(super) fn narrowing(f: &EventFilter) -> Option<Vec<String>> {
    let text = match &f.search {
        Some(s) => s.as_str(),
        None => f
            .matches
            .iter()
            .map(|(_, v)| v.as_str())
            .filter(|v| !search::words(v).is_empty() && v.parse::<f64>().is_err())
            .max_by_key(|v| v.len())?,
    };
    let mut words = search::words(text);
    words.sort_unstable();
    words.dedup();
    (!words.is_empty()).then_some(words)
}

/// Folds the counter deltas into `tally_hours` and `tally_totals`, unless
/// another node is folding now. Deltas committed meanwhile wait for the next fold.
pub(super) async fn fold(shared: &Shared) -> Result<(), StoreError> {
    let mut client = shared.pool.get().await.map_err(connect::pool_error)?;
    let tx = client.transaction().await.map_err(connect::neutral)?;
    let mine: bool = tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&FOLD_LOCK]).await.map_err(connect::neutral)?.get(0);
    if !mine {
        return Ok(());
    }
    tx.execute(
        "WITH gone AS (DELETE FROM tally_deltas RETURNING hour, source, handler, state, n),
         hours AS (
            INSERT INTO tally_hours AS t SELECT hour, source, handler, state, sum(n) FROM gone GROUP BY 1, 2, 3, 4
            ON CONFLICT (hour, source, handler, state) DO UPDATE SET n = t.n + EXCLUDED.n
         )
         INSERT INTO tally_totals AS t SELECT source, handler, state, sum(n) FROM gone GROUP BY 1, 2, 3
         ON CONFLICT (source, handler, state) DO UPDATE SET n = t.n + EXCLUDED.n",
        &[],
    )
    .await
    .map_err(connect::neutral)?;
    tx.commit().await.map_err(connect::neutral)
}

/// A daemon's folder: [`fold`] every [`FOLD_EVERY`].
pub(super) async fn folder(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(FOLD_EVERY).await;
        if let Err(e) = fold(&shared).await {
            tracing::debug!(error = %e, "folding the counters failed; trying again");
        }
    }
}

type Rows = BTreeMap<(String, Option<String>), StatsRow>;

fn add_row(rows: &mut Rows, source: String, handler: String, state: &str, n: i64) -> Result<(), StoreError> {
    let n = u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("counter {source}/{handler}/{state} is {n}")))?;
    if n == 0 {
        return Ok(());
    }
    let column = if handler.is_empty() {
        rules::event_column(parsed::<EventStatus>(state)?)
    } else {
        rules::delivery_column(parsed::<DeliveryStatus>(state)?)
    };
    let handler = (!handler.is_empty()).then_some(handler);
    let row = rows.entry((source.clone(), handler.clone())).or_insert_with(|| StatsRow { source, handler, ..Default::default() });
    row.received += n;
    row.add(column, n);
    Ok(())
}

/// `hooktrail stats`: from the counters; with `since`, the whole hours from
/// the counters and the first, partial hour from its events, in one
/// snapshot, so the answer is exact.
pub(super) async fn stats(shared: &Shared, source: Option<String>, since: Option<DateTime<Utc>>) -> Result<Vec<StatsRow>, StoreError> {
    let mut client = shared.client().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(connect::neutral)?;
    let mut rows = Rows::new();
    let mut each = |found: Vec<Row>| -> Result<(), StoreError> {
        for r in &found {
            add_row(&mut rows, get(r, 0)?, get(r, 1)?, get::<&str>(r, 2)?, get(r, 3)?)?;
        }
        Ok(())
    };
    match since {
        None => each(
            query_sql(
                &*tx,
                "SELECT source, handler, state, sum(n)::int8 FROM
                    (SELECT source, handler, state, n FROM tally_totals UNION ALL SELECT source, handler, state, n FROM tally_deltas) AS t
                 WHERE $1::text IS NULL OR source = $1 GROUP BY 1, 2, 3",
                &[&source],
            )
            .await?,
        )?,
        Some(t) => {
            let hour = rules::tally_hour(t);
            let whole = t.timestamp_micros() == hour * SECS_PER_HOUR * 1_000_000;
            let from_hour = if whole { hour } else { hour + 1 };
            each(
                query_sql(
                    &*tx,
                    "SELECT source, handler, state, sum(n)::int8 FROM
                        (SELECT hour, source, handler, state, n FROM tally_hours WHERE hour >= $1
                         UNION ALL SELECT hour, source, handler, state, n FROM tally_deltas WHERE hour >= $1) AS t
                     WHERE $2::text IS NULL OR source = $2 GROUP BY 1, 2, 3",
                    &[&from_hour, &source],
                )
                .await?,
            )?;
            if !whole {
                let to = DateTime::from_timestamp(from_hour * SECS_PER_HOUR, 0).unwrap_or(t);
                each(
                    query_sql(
                        &*tx,
                        "SELECT source, '', status, count(*) FROM events
                         WHERE received_at >= $1 AND received_at < $2 AND ($3::text IS NULL OR source = $3) GROUP BY 1, 3",
                        &[&t, &to, &source],
                    )
                    .await?,
                )?;
                each(
                    query_sql(
                        &*tx,
                        "SELECT e.source, d.handler, d.status, count(*) FROM events e JOIN deliveries d ON d.event_id = e.id
                         WHERE e.received_at >= $1 AND e.received_at < $2 AND ($3::text IS NULL OR e.source = $3) GROUP BY 1, 2, 3",
                        &[&t, &to, &source],
                    )
                    .await?,
                )?;
            }
        }
    }
    let since_hour = since.map(|t| t.timestamp() / SECS_PER_HOUR);
    let cn = query_sql(
        &*tx,
        "SELECT source, kind, sum(n)::int8 FROM counters WHERE ($1::int8 IS NULL OR hour >= $1) AND ($2::text IS NULL OR source = $2)
             GROUP BY source, kind",
        &[&since_hour, &source],
    )
    .await?;
    for r in &cn {
        let src: String = get(r, 0)?;
        let kind: RejectReason = parsed(get::<&str>(r, 1)?)?;
        let n = count(r, 2)?;
        let row = rows.entry((src.clone(), None)).or_insert_with(|| StatsRow { source: src, ..Default::default() });
        row.add(rules::counter_column(kind), n);
    }
    tx.commit().await.map_err(connect::neutral)?;
    Ok(rows.into_values().collect())
}

/// The chart: events per receive hour from the hour `since` falls in.
pub(super) async fn hourly(shared: &Shared, since: DateTime<Utc>) -> Result<Vec<HourCounts>, StoreError> {
    let client = shared.client().await?;
    let found = query_sql(
        &**client,
        "SELECT hour, state, sum(n)::int8 FROM
            (SELECT hour, state, n FROM tally_hours WHERE hour >= $1 AND handler = ''
             UNION ALL SELECT hour, state, n FROM tally_deltas WHERE hour >= $1 AND handler = '') AS t
         GROUP BY 1, 2",
        &[&rules::tally_hour(since)],
    )
    .await?;
    let mut rows = Vec::with_capacity(found.len());
    for r in &found {
        let n = u64::try_from(get::<i64>(r, 2)?).unwrap_or(0);
        rows.push((get::<i64>(r, 0)?, parsed::<EventStatus>(get::<&str>(r, 1)?)?, n));
    }
    rules::hourly_counts(rows).map_err(|hour| StoreError::Corrupt(format!("counter hour {hour} is out of range")))
}

/// Queue depth from the counters; the oldest of each (handler, state) from
/// the `deliveries_waiting` index.
pub(super) async fn queue_depth(shared: &Shared) -> Result<Vec<QueueDepth>, StoreError> {
    let client = shared.client().await?;
    let found = query_sql(
        &**client,
        concat!(
            "SELECT handler, state, sum(n)::int8 FROM
                (SELECT handler, state, n FROM tally_totals UNION ALL SELECT handler, state, n FROM tally_deltas) AS t
             WHERE handler <> '' AND state IN ",
            unfinished_sql!(),
            " GROUP BY 1, 2"
        ),
        &[],
    )
    .await?;
    let oldest = client
        .prepare_cached(concat!(
            "SELECT min(queued_at) FROM deliveries WHERE handler = $1 AND status = $2 AND status IN ",
            unfinished_sql!()
        ))
        .await
        .map_err(connect::neutral)?;
    let mut out = Vec::new();
    for r in &found {
        let n: i64 = get(r, 2)?;
        if n <= 0 {
            continue;
        }
        let handler: String = get(r, 0)?;
        let state: &str = get(r, 1)?;
        let at = client.query_one(&oldest, &[&handler, &state]).await.map_err(connect::neutral)?;
        out.push(QueueDepth { handler, status: parsed(state)?, count: n as u64, oldest_queued_at: get(&at, 0)? });
    }
    Ok(out)
}

/// The rows (`EVENT_COLS`) of a listing with `--search`: candidates from
/// the index in list order, a chunk at a time, each checked with
/// [`search::contains`], until the limit is reached or none are left.
pub(super) async fn searched<C: tokio_postgres::GenericClient>(client: &C, f: &EventFilter, needle: &str) -> Result<Vec<Row>, StoreError> {
    let order = if f.ascending { "ASC" } else { "DESC" };
    let want = f.limit.unwrap_or(usize::MAX);
    let chunk = SEARCH_CHUNK.max(i64::try_from(want.saturating_mul(2)).unwrap_or(i64::MAX));
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (mut where_sql, mut args) = filter_sql(f);
        if let Some(c) = &cursor {
            args.push(Box::new(c.clone()));
            where_sql.push_str(&format!(" AND e.id {} ${}", if f.ascending { ">" } else { "<" }, args.len()));
        }
        let sql = format!("SELECT {EVENT_COLS} FROM events e {where_sql} ORDER BY e.id {order} LIMIT {chunk}");
        let rows = client.query(&sql, &arg_refs(&args)).await.map_err(connect::neutral)?;
        let full = (rows.len() as i64) == chunk;
        cursor = rows.last().map(|r| r.get::<_, String>(0));
        for r in rows {
            if stored_hit(get(&r, 8)?, get(&r, 10)?, get(&r, 9)?, needle) {
                out.push(r);
                if out.len() >= want {
                    return Ok(out);
                }
            }
        }
        if !full {
            return Ok(out);
        }
    }
}

/// `hooktrail compact` on PostgreSQL: `VACUUM (ANALYZE)` of the tables now,
/// which autovacuum does by itself later (README "Disk space").
pub(super) async fn compact(shared: &Shared) -> Result<String, StoreError> {
    let client = shared.client().await?;
    // VACUUM runs outside a transaction: a simple query of its own.
    client
        .batch_execute("VACUUM (ANALYZE) events, deliveries, attempts, dedup, tally_deltas, tally_hours, tally_totals")
        .await
        .map_err(connect::neutral)?;
    Ok("vacuumed the tables: the space of deleted rows is reused by new ones, and empty pages at the end of a table are given back".into())
}

/// Migration 2's work beyond its SQL, in its transaction: indexes every
/// stored event for search (in `events.search_words`, which migration 4
/// moves to `event_words`).
pub(super) async fn index_stored(tx: &tokio_postgres::Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
    let mut n = 0u64;
    loop {
        let rows =
            tx.query("SELECT id, payload_kind, body, payload FROM events WHERE search_words IS NULL ORDER BY id LIMIT 1000", &[]).await?;
        if rows.is_empty() {
            return Ok(n);
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.get(0)).collect();
        let words: Vec<String> = rows.iter().map(|r| stored_index_words(r.get(1), r.get(2), r.get(3))).collect();
        tx.execute(
            "UPDATE events e SET search_words = string_to_array(u.w, ' ') FROM unnest($1::text[], $2::text[]) AS u(id, w) WHERE e.id = u.id",
            &[&ids, &words],
        )
        .await?;
        n += rows.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_words_are_each_word_once() {
        let v = serde_json::json!({"a": "Dan Golden", "b": ["dgolden@Mid-Corp.com", 5]});
        assert_eq!(index_words(Some(&v), b""), "5 com corp dan dgolden golden mid");
        assert_eq!(index_words(None, b"raw raw body"), "body raw");
    }

    #[test]
    fn a_number_to_match_does_not_narrow() {
        let f = |v: &str| EventFilter { matches: vec![("/a".into(), v.into())], ..Default::default() };
        assert_eq!(narrowing(&f("1e3")), None);
        assert_eq!(narrowing(&f("A b")), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(narrowing(&EventFilter { search: Some("B a".into()), ..Default::default() }), Some(vec!["a".into(), "b".into()]));
    }
}
