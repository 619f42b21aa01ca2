//! The ordered claim and the finish batch as server-side functions (README
//! "Several nodes: PostgreSQL"): each is **one round trip**, one statement
//! run as its own transaction, so no transaction stays open while the
//! client waits for a CPU between its statements.
//!
//! Before (BENCHMARKS.md "pgone"), backends were sampled `idle in
//! transaction` (`ClientRead`): the head rows a claim had locked stayed
//! locked across the five round trips of the claim, and a finish batch's
//! across its two, while the daemon's threads waited for the shared CPUs.
//! What the functions changed is measured in BENCHMARKS.md "pgfn".
//!
//! The functions are the statements the claim and the finish sent before
//! (pipelined, with the steps between them in Rust), in the same order and
//! taking the same locks in the same order: head rows, then deliveries (by
//! id in a finish), then events by id. The rules they spell in SQL are
//! those of `rules` (each spot names its rule). They are
//! created by the schema setup at every daemon start (`CREATE OR REPLACE`,
//! under the migration lock, so nodes starting together do not race and an
//! upgraded daemon replaces an older body). Nodes of the previous version
//! may still run beside it and call them: a version that needs other
//! parameters or results gives the function a new name, never a new
//! signature under the old one.
//!
//! Inside a function every statement takes a fresh snapshot (they are
//! `VOLATILE`), as the statements of a `READ COMMITTED` transaction do, so
//! each sees what committed before it, as the Rust steps did.

use tokio_postgres::types::ToSql;

use super::*;

/// What the ordered claim does with an unfinished head `l_head` (the key's
/// current head, or the next one it advanced to): the head row points at
/// it, unblocked; a due one is claimed now and looked at again when the
/// lease just taken ends, any other (a renewed lease, a retry time) at its
/// `next_at`. One spelling for both places the function meets such a head.
macro_rules! keep_head_sql {
    () => {
        "
                l_keys := array_append(l_keys, l_head.k);
                l_heads := array_append(l_heads, l_head.d_id);
                l_events := array_append(l_events, l_head.d_event);
                l_blocks := array_append(l_blocks, false);
                IF l_head.d_due_now THEN
                    l_dues := array_append(l_dues, NULL::timestamptz);
                    l_claim := array_append(l_claim, l_head.d_id);
                ELSE
                    l_dues := array_append(l_dues, l_head.d_next_at);
                END IF;"
    };
}

/// The ordered claim (`SELECT * FROM hooktrail_claim_ordered(…)`).
///
/// Parameters, numbered as [`super::claim::CLAIM_UNKEYED`] numbers them so
/// its text (and the claim tail) is used here as is: `$1` handler, `$2` at
/// most this many deliveries, `$3` owner, `$4` lease in microseconds, `$5`
/// and `$6` an interrupted attempt's outcome and error, `$7` the event
/// status while a delivery runs, `$8` false (the unkeyed part claims
/// whatever key heads there are), `$9` true for `on_failure = "continue"`.
/// Returns the columns `claim::claimed_from` reads: the claimed due heads,
/// then the unkeyed deliveries (with a row of NULLs when none).
const CLAIM_ORDERED_FN: &str = concat!(
    "CREATE OR REPLACE FUNCTION hooktrail_claim_ordered(
        p_handler text, p_limit bigint, p_owner text, p_lease_us bigint, p_outcome text, p_error text, p_running text,
        p_only_without_heads boolean, p_continue boolean)
    RETURNS TABLE (o_heads boolean, o_id bigint, o_attempts integer, o_budget_from integer, o_queued_at timestamptz,
                   o_event_id text, o_source text, o_received_at timestamptz, o_content_type text, o_query text,
                   o_headers text, o_body bytea, o_payload_kind smallint, o_payload text)
    LANGUAGE plpgsql VOLATILE AS $fn$
    #variable_conflict use_column
    DECLARE
        l_head record;
        -- What the claim writes back to the head rows it holds: set (unblocked or blocked), or deleted.
        l_keys text[] := '{}';
        l_heads bigint[] := '{}';
        l_events text[] := '{}';
        l_dues timestamptz[] := '{}';
        l_blocks boolean[] := '{}';
        l_gone text[] := '{}';
        -- Keys whose head let them go: their next delivery is looked up.
        l_advance text[] := '{}';
        -- Deliveries to claim, and what the claim does to each (rules::claim_step).
        l_claim bigint[] := '{}';
        l_ids bigint[];
        l_claim_events text[];
        l_attempts integer[];
        l_interrupted integer[];
    BEGIN
        -- A reload may have turned `block` off: what it blocked runs on. And a
        -- blocker pruned with its event (README \"Retention\") no longer blocks.
        UPDATE order_heads h SET blocked = false, due = now() WHERE h.handler = p_handler AND h.blocked
            AND (p_continue OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = h.delivery_id));
        -- Due heads first (at most one per key, so they cannot crowd out
        -- unkeyed work for long); rows other nodes hold are skipped, so two
        -- nodes claiming at once take different keys. The heads are taken
        -- (limited and locked) first, then each looks up its delivery by id:
        -- joined before the limit, the plan ANALYZE led to merged every due
        -- head with a walk of `deliveries_pkey` across their id range, at
        -- every claim (BENCHMARKS.md, \"Quiet-machine runs at the end of stop 15\").
        -- The lookup's `LIMIT 1` keeps the planner from pulling it up into
        -- that join again: one probe of `deliveries_pkey` per head.
        FOR l_head IN
            SELECT h.key AS k, d.id AS d_id, d.event_id AS d_event, d.status AS d_status,
                   d.next_at <= now() AS d_due_now, d.next_at AS d_next_at
            FROM (SELECT key, delivery_id, due FROM order_heads
                  WHERE handler = p_handler AND NOT blocked AND due <= now() ORDER BY due LIMIT p_limit FOR UPDATE SKIP LOCKED) h
            LEFT JOIN LATERAL (SELECT * FROM deliveries d WHERE d.id = h.delivery_id LIMIT 1) d ON true
            ORDER BY h.due
        LOOP
            -- rules::head_step: an unfinished head (a retry-waiting one too)
            -- holds its key; a failed one blocks it under `block`; anything
            -- else (finished, gone, unreadable) lets it go.
            IF l_head.d_status IN ",
    unfinished_sql!(),
    " THEN ",
    keep_head_sql!(),
    "
            ELSIF l_head.d_status = 'failed' AND NOT p_continue THEN
                l_keys := array_append(l_keys, l_head.k);
                l_heads := array_append(l_heads, 0::bigint);
                l_events := array_append(l_events, ''::text);
                l_dues := array_append(l_dues, NULL::timestamptz);
                l_blocks := array_append(l_blocks, true);
            ELSE
                l_advance := array_append(l_advance, l_head.k);
            END IF;
        END LOOP;
        IF cardinality(l_advance) > 0 THEN
            -- Each key's next head: its oldest unfinished delivery, one probe of
            -- `deliveries_keyed` per key, all in one statement (`status IN`
            -- spelt as the index spells it). None left: the row goes.
            FOR l_head IN
                SELECT k.key AS k, n.id AS d_id, n.event_id AS d_event, n.status AS d_status,
                       n.due_now AS d_due_now, n.next_at AS d_next_at
                FROM unnest(l_advance) AS k(key) LEFT JOIN LATERAL (
                    SELECT id, event_id, status, next_at <= now() AS due_now, next_at FROM deliveries
                    WHERE handler = p_handler AND order_key = k.key AND status IN ",
    unfinished_sql!(),
    "               ORDER BY event_id LIMIT 1) n ON true
            LOOP
                IF l_head.d_status IN ",
    unfinished_sql!(),
    " THEN ",
    keep_head_sql!(),
    "
                ELSE
                    l_gone := array_append(l_gone, l_head.k);
                END IF;
            END LOOP;
        END IF;
        IF cardinality(l_claim) > 0 THEN
            -- The heads' deliveries, locked; rules::claim_step in SQL, as in
            -- `CLAIM_UNKEYED` (a finished one is not claimed).
            SELECT array_agg(id), array_agg(event_id),
                   array_agg(CASE WHEN status = 'running' AND held THEN attempts ELSE attempts + 1 END),
                   array_agg(CASE WHEN status = 'running' AND NOT held THEN attempts END)
            INTO l_ids, l_claim_events, l_attempts, l_interrupted
            FROM (SELECT id, event_id, status, attempts, held FROM deliveries WHERE id = ANY (l_claim) FOR UPDATE) d
            WHERE status IN ",
    unfinished_sql!(),
    ";
        END IF;
        -- Then, in this order: the locked heads' deliveries claimed, the head
        -- rows written, the unkeyed deliveries claimed in the room left.
        IF l_ids IS NOT NULL THEN
            RETURN QUERY WITH u AS (SELECT * FROM unnest(l_ids, l_claim_events, l_attempts, l_interrupted) AS u(id, event_id, a, i)), ",
    super::claim::claim_tail!(),
    "           SELECT true, c.* FROM claimed c;
        END IF;
        IF cardinality(l_keys) > 0 THEN
            -- Each key appears once: a claim writes each head row it holds once.
            UPDATE order_heads h SET
                delivery_id = CASE WHEN u.b THEN h.delivery_id ELSE u.d END,
                event_id = CASE WHEN u.b THEN h.event_id ELSE u.e END,
                due = CASE WHEN u.b THEN h.due ELSE coalesce(u.t, now() + p_lease_us * interval '1 microsecond') END,
                blocked = u.b
            FROM unnest(l_keys, l_heads, l_events, l_dues, l_blocks) AS u(k, d, e, t, b)
            WHERE h.handler = p_handler AND h.key = u.k;
        END IF;
        IF cardinality(l_gone) > 0 THEN
            DELETE FROM order_heads WHERE handler = p_handler AND key = ANY (l_gone);
        END IF;
        p_limit := p_limit - coalesce(cardinality(l_ids), 0);
        -- Only when one is due: run on nothing, the claim's two UPDATEs would
        -- still fire the counter triggers of `deliveries` and `events`, at
        -- every claim of a handler whose deliveries all have a key. One probe
        -- of `deliveries_unkeyed`, spelt as it is: its first entry for the
        -- handler, `min(next_at)`, which the planner always answers from
        -- that index. Spelt as `EXISTS (… AND next_at <= now())`, the cached
        -- plan became a sequential scan of all `deliveries` once ANALYZE had
        -- seen other handlers' unkeyed rows (it expected a match at once;
        -- an all-keyed handler has none): 10 ms a claim, and a third of the
        -- 50-key rate (BENCHMARKS.md, \"Quiet-machine runs at the end of stop 15\").
        IF p_limit > 0 AND (
            SELECT min(next_at) FROM deliveries WHERE handler = p_handler AND status IN ",
    unfinished_sql!(),
    " AND order_key IS NULL) <= now() THEN
            RETURN QUERY ",
    super::claim::claim_unkeyed_sql!(),
    ";
        END IF;
    END $fn$"
);

/// The finish batch (`SELECT * FROM hooktrail_finish(…)`): `$1`–`$12` the
/// finishes' columns (`finish::Batch`, sorted by delivery id), `$13`, `$14`
/// the begun marks (delivery, owner), `$15` and `$16` [`rules::event_status`]
/// as a table ([`event_status_table`]). Returns `id, attempt, status` of
/// each delivery moved on, and one more row with NULLs there and, in the
/// last column, how many key heads it moved on.
const FINISH_FN: &str = "CREATE OR REPLACE FUNCTION hooktrail_finish(
        p_id bigint[], p_attempt integer[], p_owner text[], p_status text[], p_retry_at timestamptz[], p_started_at timestamptz[],
        p_duration_ms bigint[], p_outcome text[], p_exit_code integer[], p_http_status integer[], p_error text[], p_output text[],
        p_mark_id bigint[], p_mark_owner text[], p_delivery_statuses text[], p_event_statuses text[])
    RETURNS TABLE (o_id bigint, o_attempt integer, o_status text, o_heads bigint)
    LANGUAGE plpgsql VOLATILE AS $fn$
    #variable_conflict use_column
    DECLARE
        l_heads bigint := 0;
        l_moved_ids bigint[];
        l_moved_attempts integer[];
        l_moved_events text[];
        l_moved_statuses text[];
        l_event_ids text[];
        l_event_statuses text[];
    BEGIN
        -- What a finish waits for must survive a crash; marks alone need not.
        PERFORM set_config('synchronous_commit', CASE WHEN cardinality(p_id) > 0 THEN 'on' ELSE 'off' END, true);
        IF cardinality(p_id) > 0 THEN
            -- The head row of each delivery this batch moves on (its lease
            -- holder's attempt), if it heads its key, is looked at again at
            -- the delivery's new `next_at` (a retry time, or now for a
            -- finished one so the next claim advances or blocks the key).
            -- Head rows are locked in key order, before the deliveries, as a
            -- claim locks them.
            WITH h AS (
                SELECT h.handler, h.key, u.t FROM unnest(p_id, p_retry_at, p_attempt, p_owner) AS u(id, t, a, o)
                JOIN deliveries d ON d.id = u.id AND d.status = 'running' AND d.attempts = u.a AND d.lease_owner = u.o
                JOIN order_heads h ON h.handler = d.handler AND h.key = d.order_key AND h.delivery_id = u.id
                ORDER BY h.handler, h.key FOR UPDATE OF h
            ) UPDATE order_heads o SET due = coalesce(h.t, now()) FROM h WHERE o.handler = h.handler AND o.key = h.key;
            GET DIAGNOSTICS l_heads = ROW_COUNT;
        END IF;
        IF cardinality(p_mark_id) > 0 THEN
            -- Begun marks: only while the owner still holds the delivery's lease.
            UPDATE deliveries d SET held = false FROM unnest(p_mark_id, p_mark_owner) AS u(id, o)
            WHERE d.id = u.id AND d.lease_owner = u.o AND d.status = 'running' AND d.held;
        END IF;
        IF cardinality(p_id) > 0 THEN
            -- Moves on each delivery whose lease holder's attempt this is and
            -- records the attempts (`finish` says whose record stands).
            -- Deliveries are locked in id order.
            WITH u AS (
                SELECT * FROM unnest(p_id, p_attempt, p_owner, p_status, p_retry_at, p_started_at, p_duration_ms,
                                     p_outcome, p_exit_code, p_http_status, p_error, p_output)
                    AS u(id, attempt, owner, status, retry_at, started_at, duration_ms, outcome, exit_code, http_status, error, output)
            ), held AS (
                SELECT d.id FROM deliveries d JOIN u ON d.id = u.id AND d.status = 'running' AND d.attempts = u.attempt AND d.lease_owner = u.owner
                ORDER BY d.id FOR UPDATE OF d
            ), moved AS (
                UPDATE deliveries d SET status = u.status, next_at = coalesce(u.retry_at, now()), lease_owner = NULL, held = false, updated_at = now()
                FROM u WHERE d.id = u.id AND d.id IN (SELECT id FROM held)
                  AND d.status = 'running' AND d.attempts = u.attempt AND d.lease_owner = u.owner
                RETURNING d.id, d.attempts, d.event_id, d.status
            ), mine AS (
                INSERT INTO attempts (delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output)
                SELECT u.id, u.attempt, u.started_at, u.duration_ms, u.outcome, u.exit_code, u.http_status, u.error, u.output
                FROM u JOIN moved m ON m.id = u.id AND m.attempts = u.attempt
                ON CONFLICT (delivery_id, number) DO UPDATE SET started_at = EXCLUDED.started_at, duration_ms = EXCLUDED.duration_ms,
                   outcome = EXCLUDED.outcome, exit_code = EXCLUDED.exit_code, http_status = EXCLUDED.http_status,
                   error = EXCLUDED.error, output = EXCLUDED.output
            ), stale AS (
                INSERT INTO attempts (delivery_id, number, started_at, duration_ms, outcome, exit_code, http_status, error, output)
                SELECT u.id, u.attempt, u.started_at, u.duration_ms, u.outcome, u.exit_code, u.http_status, u.error, u.output
                FROM u WHERE NOT EXISTS (SELECT 1 FROM moved m WHERE m.id = u.id AND m.attempts = u.attempt)
                  AND EXISTS (SELECT 1 FROM deliveries d WHERE d.id = u.id)
                ON CONFLICT (delivery_id, number) DO NOTHING
            ) SELECT array_agg(id), array_agg(attempts), array_agg(event_id), array_agg(status)
              INTO l_moved_ids, l_moved_attempts, l_moved_events, l_moved_statuses FROM moved;
            -- The events of the batch's deliveries, locked in id order after
            -- the deliveries: of two nodes finishing deliveries of one event at
            -- once, the second reads the first's committed change. `= ANY
            -- (ARRAY(…))` here and below, never `IN (SELECT …)`: with that,
            -- the cached generic plan joined by hash over a sequential scan
            -- of all `deliveries`, finished ones included, in every batch
            -- (BENCHMARKS.md, \"pgclaim\"); an array is one index probe per event.
            PERFORM 1 FROM events WHERE id = ANY (ARRAY(SELECT event_id FROM deliveries WHERE id = ANY (p_id))) ORDER BY id FOR UPDATE;
        END IF;
        IF l_moved_ids IS NOT NULL THEN
            -- Each moved delivery's event, from the statuses of all its
            -- deliveries: rules::event_status, looked up by the set of
            -- statuses seen (one bit each; one this version does not know is
            -- passed over, as the Rust reads it).
            SELECT array_agg(event_id), array_agg(s) INTO l_event_ids, l_event_statuses FROM (
                SELECT event_id, p_event_statuses[1 + coalesce(bit_or(1 << (array_position(p_delivery_statuses, status) - 1)), 0)]
                    AS s FROM deliveries WHERE event_id = ANY (ARRAY(SELECT DISTINCT e FROM unnest(l_moved_events) AS e)) GROUP BY event_id) st;
            UPDATE events e SET status = u.s FROM unnest(l_event_ids, l_event_statuses) AS u(id, s)
            WHERE e.id = u.id AND e.status <> u.s;
            RETURN QUERY SELECT m.id, m.a, m.s, NULL::bigint FROM unnest(l_moved_ids, l_moved_attempts, l_moved_statuses) AS m(id, a, s);
        END IF;
        RETURN QUERY SELECT NULL::bigint, NULL::integer, NULL::text, l_heads;
    END $fn$";

/// Creates (or replaces) the functions; the caller holds the migration lock.
pub(super) async fn install(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(CLAIM_ORDERED_FN).await?;
    client.batch_execute(FINISH_FN).await
}

/// [`crate::store::Store::claim_ordered`] in one statement.
pub(super) async fn claim_ordered<C: deadpool_postgres::GenericClient>(
    c: &C,
    owner: &str,
    handler: &str,
    on_failure: OnFailure,
    limit: i64,
    lease_us: i64,
) -> Result<Vec<Claimed>, tokio_postgres::Error> {
    let continue_on = on_failure == OnFailure::Continue;
    let rows = super::claim::query_claim(
        c,
        "SELECT * FROM hooktrail_claim_ordered($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        owner,
        handler,
        limit,
        lease_us,
        false,
        &[&continue_on],
    )
    .await?;
    Ok(super::claim::claimed_from(&rows, handler))
}

/// The finish batch's columns, as [`finish_batch`] sends them.
pub(super) struct FinishArgs<'a> {
    pub finishes: [&'a (dyn ToSql + Sync); 12],
    pub mark_id: &'a Vec<i64>,
    pub mark_owner: &'a Vec<String>,
}

/// A finish batch in one statement: the new status of each (delivery,
/// attempt) moved on, and how many key heads it moved on.
pub(super) async fn finish_batch(
    client: &deadpool_postgres::Object,
    args: FinishArgs<'_>,
) -> Result<(HashMap<(i64, i32), DeliveryStatus>, u64), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT * FROM hooktrail_finish($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)")
        .await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = args.finishes.to_vec();
    params.push(args.mark_id);
    params.push(args.mark_owner);
    let (names, table) = event_status_table();
    params.push(names);
    params.push(table);
    let rows = client.query(&stmt, &params).await?;
    let mut moved = HashMap::with_capacity(rows.len());
    let mut heads = 0u64;
    for r in &rows {
        match r.get::<_, Option<i64>>(0) {
            Some(id) => {
                if let Ok(status) = r.get::<_, &str>(2).parse::<DeliveryStatus>() {
                    moved.insert((id, r.get::<_, i32>(1)), status);
                }
            }
            None => heads = r.get::<_, Option<i64>>(3).unwrap_or(0).max(0) as u64,
        }
    }
    Ok((moved, heads))
}

/// [`rules::event_status`] as the finish function looks it up: the
/// delivery statuses' names, and for each set of them (bit `i` for the
/// `i`-th name) the event's status, at index `1 + set`.
fn event_status_table() -> &'static (Vec<&'static str>, Vec<&'static str>) {
    static TABLE: std::sync::OnceLock<(Vec<&'static str>, Vec<&'static str>)> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let all = DeliveryStatus::ALL;
        let names = all.iter().map(|s| s.as_str()).collect();
        let table = (0u32..1 << all.len())
            .map(|set| {
                let seen: Vec<DeliveryStatus> = all.iter().enumerate().filter(|(i, _)| set >> i & 1 == 1).map(|(_, s)| *s).collect();
                rules::event_status(&seen).as_str()
            })
            .collect();
        (names, table)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_status_table_is_the_rule_for_every_set_of_delivery_statuses() {
        let (names, table) = event_status_table();
        assert_eq!(names.len(), DeliveryStatus::ALL.len());
        assert_eq!(table.len(), 1 << names.len());
        assert_eq!(table[0], rules::event_status(&[]).as_str());
        let bit = |s: DeliveryStatus| 1usize << names.iter().position(|n| *n == s.as_str()).expect("every status is named");
        for &a in DeliveryStatus::ALL {
            for &b in DeliveryStatus::ALL {
                assert_eq!(table[bit(a) | bit(b)], rules::event_status(&[a, b]).as_str(), "{a}, {b}");
            }
        }
    }
}
