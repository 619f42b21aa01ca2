//! Claims on PostgreSQL in as few statements as a claim allows (README
//! "Several nodes: PostgreSQL", processing).
//!
//! A claim used to be about ten statements sent one after another in one
//! transaction, whatever its size, each with its own executor start-up,
//! counter trigger run and round trip (BENCHMARKS.md "pgclaim" measures
//! what that cost at full batches: little). Here:
//!
//! - A handler with no key heads (no `ordering`, and no keyed deliveries
//!   left from when it had one) is claimed by **one statement**, run as its
//!   own transaction: it locks the due deliveries (`FOR UPDATE SKIP
//!   LOCKED`), records the interrupted attempts a crash left, moves the
//!   deliveries to `running`, marks their events `processing` and returns
//!   the claimed events, all from the one snapshot. That snapshot is
//!   enough: every row it writes it has locked first (the deliveries in the
//!   due scan, the events in id order), and nothing it reads back is
//!   something it wrote (the events' payloads, which a claim never
//!   changes). If the handler has key heads the statement claims nothing
//!   and says so, and the claim goes the ordered way (`ordering`).
//! - The ordered claim is one statement too, `hooktrail_claim_ordered`
//!   (`functions`): it claims the heads' deliveries it locked with the same
//!   tail ([`claim_tail!`]) and the unkeyed ones with [`CLAIM_UNKEYED`]'s
//!   text, used there as is.
//!
//! Locks are taken in the order of every other writer: deliveries, then
//! their events in id order (see `finish` and `ordering`). Rows are found
//! by `= ANY (ARRAY(…))` and `LATERAL` probes, never a join the planner may
//! turn into a scan of a whole table (its cached plans did, once the table
//! held finished rows).
//!
//! A claim commits with `synchronous_commit = on` (the server's default)
//! like a finish: were a committed claim lost in a database crash, an
//! attempt that ran under it would leave no interrupted record.

use super::*;

/// The common tail of a claim (after a CTE `u` of `id, event_id, a, i`:
/// the delivery, its event, the attempt the claim is for and the attempt to
/// record as interrupted, NULL if none; see [`rules::claim_step`]).
/// Parameters: `$3` owner, `$4` lease in microseconds, `$5` and `$6` the
/// interrupted attempt's outcome and error, `$7` the event status while a
/// delivery runs. Returns the columns [`claimed_from`] reads.
macro_rules! claim_tail {
    () => {
        "intr AS (
            INSERT INTO attempts (delivery_id, number, started_at, duration_ms, outcome, error, output)
            SELECT id, i, now(), 0, $5, $6, '' FROM u WHERE i IS NOT NULL ON CONFLICT DO NOTHING
         ), upd AS (
            UPDATE deliveries d SET status = 'running', attempts = u.a, held = true, lease_owner = $3,
                   next_at = now() + $4::int8 * interval '1 microsecond', updated_at = now()
            FROM u WHERE d.id = ANY (ARRAY(SELECT id FROM u)) AND d.id = u.id
            RETURNING d.id, d.attempts, d.budget_from, d.queued_at, d.event_id
         ), ev AS (
            UPDATE events SET status = $7 WHERE id IN (
                SELECT id FROM events WHERE id = ANY (ARRAY(SELECT event_id FROM u)) AND status <> $7 ORDER BY id FOR UPDATE)
         ), claimed AS (
            SELECT d.id, d.attempts, d.budget_from, d.queued_at, e.*
            FROM upd d CROSS JOIN LATERAL (
                SELECT e.id AS event_id, e.source, e.received_at, e.content_type, e.query, e.headers, e.body, e.payload_kind, e.payload
                FROM events e WHERE e.id = d.event_id) e
         )"
    };
}
pub(super) use claim_tail;

/// [`CLAIM_UNKEYED`]'s text, for `functions` to use it as is.
macro_rules! claim_unkeyed_sql {
    () => {
        concat!(
            "WITH heads AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM order_heads WHERE handler = $1) AS has_heads
         ), due AS MATERIALIZED (
            SELECT id, event_id, status, attempts, held FROM deliveries
            WHERE handler = $1 AND status IN ",
            unfinished_sql!(),
            " AND order_key IS NULL AND next_at <= now() AND NOT ($8::bool AND (SELECT has_heads FROM heads))
            ORDER BY next_at LIMIT $2 FOR UPDATE SKIP LOCKED
         ), u AS (
            SELECT id, event_id,
                   CASE WHEN status = 'running' AND held THEN attempts ELSE attempts + 1 END AS a,
                   CASE WHEN status = 'running' AND NOT held THEN attempts END AS i
            FROM due
         ), ",
            $crate::store::postgres::claim::claim_tail!(),
            " SELECT h.has_heads, c.* FROM heads h LEFT JOIN claimed c ON true"
        )
    };
}
pub(super) use claim_unkeyed_sql;

/// The unkeyed due deliveries of handler `$1` (oldest due first, at most
/// `$2`), claimed; when `$8` is true, only if the handler has no key heads
/// (the first column says whether it has; then no row is claimed, and one
/// row of NULLs stands for none claimed, as when nothing is due).
///
/// "Due" is [`rules::unfinished`] with its time come, spelt as the partial
/// index `deliveries_unkeyed` spells it; the attempt arithmetic is
/// [`rules::claim_step`] in SQL (a `running` delivery is due only once its
/// lease expired: held, the attempt never began and keeps its number;
/// otherwise it was cut short, is recorded as interrupted, and the claim
/// runs the next number). `tests/store_contract.rs` holds it to the rule.
pub(super) const CLAIM_UNKEYED: &str = claim_unkeyed_sql!();

/// What [`claim_unkeyed`] found.
pub(super) enum Unkeyed {
    Claimed(Vec<Claimed>),
    /// The handler has key heads: nothing was claimed, the ordered claim must run.
    HasHeads,
}

/// Runs `sql`, a claim statement whose parameters are numbered as
/// [`CLAIM_UNKEYED`] numbers them (`$1` handler … `$8`
/// `only_without_heads`), with `more` after them (`$9`, …): the
/// interrupted attempt's outcome and error and the event status while a
/// delivery runs are the rules' own.
#[allow(clippy::too_many_arguments)]
pub(super) async fn query_claim<C: deadpool_postgres::GenericClient>(
    c: &C,
    sql: &str,
    owner: &str,
    handler: &str,
    limit: i64,
    lease_us: i64,
    only_without_heads: bool,
    more: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let stmt = c.prepare_cached(sql).await?;
    let (outcome, running) = (Outcome::Retry.as_str(), rules::event_status_while_running().as_str());
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&handler, &limit, &owner, &lease_us, &outcome, &rules::INTERRUPTED_ATTEMPT, &running, &only_without_heads];
    params.extend_from_slice(more);
    c.query(&stmt, &params).await
}

/// [`CLAIM_UNKEYED`]; `only_without_heads` false claims regardless of key
/// heads (the ordered claim's unkeyed part, in its transaction).
pub(super) async fn claim_unkeyed<C: deadpool_postgres::GenericClient>(
    c: &C,
    owner: &str,
    handler: &str,
    limit: i64,
    lease_us: i64,
    only_without_heads: bool,
) -> Result<Unkeyed, tokio_postgres::Error> {
    let rows = query_claim(c, CLAIM_UNKEYED, owner, handler, limit, lease_us, only_without_heads, &[]).await?;
    if only_without_heads && rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
        return Ok(Unkeyed::HasHeads);
    }
    Ok(Unkeyed::Claimed(claimed_from(&rows, handler)))
}

/// The claimed deliveries among rows of `heads, id, attempts, budget_from,
/// queued_at, event id, source, received_at, content_type, query, headers,
/// body, payload_kind, payload` (a NULL id: none).
pub(super) fn claimed_from(rows: &[Row], handler: &str) -> Vec<Claimed> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(id) = r.get::<_, Option<i64>>(1) else { continue };
        match claimed_row(r, id, handler) {
            Ok(c) => out.push(c),
            // An event this version cannot read: left claimed, it comes
            // back after the lease and is reported each time.
            Err(e) => tracing::error!(delivery = id, error = %e, "cannot hand over a stored event"),
        }
    }
    out
}

fn claimed_row(r: &Row, delivery_id: i64, handler: &str) -> Result<Claimed, StoreError> {
    let event_id: EventId = parsed(get::<&str>(r, 5)?)?;
    let attempt = get::<i32>(r, 2)?.max(0) as u32;
    let budget_from = get::<i32>(r, 3)?.max(0) as u32;
    let headers = headers_value(get::<&str>(r, 10)?).map_err(|e| StoreError::Corrupt(format!("event {event_id}: {e}")))?;
    let body: Vec<u8> = get(r, 11)?;
    let payload = payload_value(get(r, 12)?, &body, get(r, 13)?).map_err(|e| StoreError::Corrupt(format!("event {event_id}: {e}")))?;
    Ok(Claimed {
        delivery_id,
        event_id,
        source: get(r, 6)?,
        handler: handler.to_string(),
        attempt,
        attempt_in_budget: rules::attempt_in_budget(attempt, budget_from),
        received_at: get(r, 7)?,
        first_queued_at: get(r, 4)?,
        content_type: get(r, 8)?,
        query: get(r, 9)?,
        headers,
        body: Bytes::from(body),
        payload,
        payload_text: None,
    })
}
