//! Ordered processing on PostgreSQL (README "Ordered processing"): the
//! steps of `rules` ("Ordered claims") in SQL, across several nodes.
//!
//! - A claim takes head rows `FOR UPDATE OF h SKIP LOCKED`, so two nodes
//!   claiming at once take different keys and never wait for each other.
//! - Whatever moves a key's head (a finish, a replay, a skip) locks the
//!   head row before the delivery and the event, as a claim does, so they
//!   never deadlock; a replay takes its events in id order, as claims do. A
//!   release locks its own delivery first: it holds that lease, so no claim
//!   waits for that row.
//! - An insert racing a claim that deletes a key's row waits for it (see
//!   `new_heads_from_dl!`); a writer storing keyed events holds
//!   `Shared::keyed` from making its ids to its commit, so one node's keyed
//!   events commit in id order. Two ingest nodes receiving one key within
//!   the same milliseconds: the older is put first unless the younger has
//!   begun already (README "Several nodes: PostgreSQL").

use tokio_postgres::Row;

use super::{claim_in, claim_rows, due_rows, refresh_event_status, Due};
use crate::store::{rules, DeliveryStatus, EventId, OnFailure, SkipError};

type Tx<'a> = deadpool_postgres::Transaction<'a>;
type PgResult<T> = Result<T, tokio_postgres::Error>;

/// The head row of delivery `id`, if it heads its key, is looked at again now
/// (a release: it is due again at once).
pub async fn head_follows(tx: &Tx<'_>, id: i64) -> PgResult<u64> {
    tx.execute(
        &tx.prepare_cached(
            "UPDATE order_heads h SET due = now() FROM deliveries d
             WHERE d.id = $1 AND h.handler = d.handler AND h.key = d.order_key AND h.delivery_id = $1",
        )
        .await?,
        &[&id],
    )
    .await
}

/// A keyed delivery was replayed (now pending): where it goes in its key's
/// line ([`rules::replay_takes_head`]).
pub async fn replay_head(tx: &Tx<'_>, id: i64) -> PgResult<()> {
    let Some(row) = tx.query_opt("SELECT handler, order_key, event_id FROM deliveries WHERE id = $1", &[&id]).await? else {
        return Ok(());
    };
    let (handler, key, event): (String, Option<String>, String) = (row.get(0), row.get(1), row.get(2));
    let Some(key) = key else { return Ok(()) };
    let head = tx
        .query_opt(
            "SELECT h.delivery_id, h.event_id, h.blocked, d.status FROM order_heads h LEFT JOIN deliveries d ON d.id = h.delivery_id
             WHERE h.handler = $1 AND h.key = $2 FOR UPDATE OF h",
            &[&handler, &key],
        )
        .await?;
    let take = match &head {
        None => {
            tx.execute(
                "INSERT INTO order_heads (handler, key, delivery_id, event_id, due) VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (handler, key) DO NOTHING",
                &[&handler, &key, &id, &event],
            )
            .await?;
            return Ok(());
        }
        // The blocker itself: the key is free to run it again.
        Some(h) if h.get::<_, i64>(0) == id => true,
        // Blocked by another: it waits behind the blocker.
        Some(h) if h.get::<_, bool>(2) => false,
        Some(h) => {
            let status = h.get::<_, Option<&str>>(3).and_then(|s| s.parse::<DeliveryStatus>().ok());
            rules::replay_takes_head(status, h.get::<_, &str>(1) > event.as_str())
        }
    };
    if take {
        tx.execute(
            "UPDATE order_heads SET delivery_id = $3, event_id = $4, due = now(), blocked = false WHERE handler = $1 AND key = $2",
            &[&handler, &key, &id, &event],
        )
        .await?;
    }
    Ok(())
}

/// A delivery as a head step reads it.
struct HeadDelivery {
    id: i64,
    event_id: String,
    status: DeliveryStatus,
    /// Its `next_at` has come (on the database's clock).
    due_now: bool,
    next_at: chrono::DateTime<chrono::Utc>,
}

/// Columns `id, event_id, status, attempts, budget_from, held, next_at <= now(), next_at`
/// from `at` on; `None` when the delivery is gone (NULL id) or unreadable.
fn head_delivery(r: &Row, at: usize) -> Option<HeadDelivery> {
    let id: i64 = r.get::<_, Option<i64>>(at)?;
    let status = r.get::<_, &str>(at + 2).parse().ok()?;
    Some(HeadDelivery { id, event_id: r.get(at + 1), status, due_now: r.get(at + 6), next_at: r.get(at + 7) })
}

/// What a claim writes back to one head row.
enum HeadWrite {
    /// Point at `delivery` (of `event`), unblocked, looked at again at `due`
    /// (`None`: the end of the lease just taken).
    Set {
        delivery: i64,
        event: String,
        due: Option<chrono::DateTime<chrono::Utc>>,
    },
    Block,
    Delete,
}

/// [`crate::store::Store::claim_ordered`]: due heads first (at most one per
/// key, so they cannot crowd out unkeyed work for long), then unkeyed
/// deliveries, in one transaction.
pub async fn claim_ordered_in(
    tx: &Tx<'_>,
    owner: &str,
    handler: &str,
    on_failure: OnFailure,
    limit: i64,
    lease_us: i64,
) -> PgResult<Vec<crate::store::Claimed>> {
    // A reload may have turned `block` off: what it blocked runs on. And a
    // blocker pruned with its event (README "Retention") no longer blocks.
    // One statement for both. It and the head scan after it are sent
    // together (pipelined, see [`prepare_rest`]): one round trip, not two.
    let unblock = tx
        .prepare_cached(
            "UPDATE order_heads h SET blocked = false, due = now() WHERE handler = $1 AND blocked
             AND ($2 OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = h.delivery_id))",
        )
        .await?;
    let scan = tx
        .prepare_cached(
            "SELECT h.key, d.id, d.event_id, d.status, d.attempts, d.budget_from, d.held, d.next_at <= now(), d.next_at
             FROM order_heads h LEFT JOIN deliveries d ON d.id = h.delivery_id
             WHERE h.handler = $1 AND NOT h.blocked AND h.due <= now() ORDER BY h.due LIMIT $2 FOR UPDATE OF h SKIP LOCKED",
        )
        .await?;
    let continue_on = on_failure == OnFailure::Continue;
    let (unblock_args, scan_args): ([&(dyn tokio_postgres::types::ToSql + Sync); 2], [&(dyn tokio_postgres::types::ToSql + Sync); 2]) =
        ([&handler, &continue_on], [&handler, &limit]);
    let (unblocked, heads) = tokio::join!(tx.execute(&unblock, &unblock_args), tx.query(&scan, &scan_args));
    unblocked?;
    let heads = heads?;
    let mut writes: Vec<(String, HeadWrite)> = Vec::with_capacity(heads.len());
    let mut claim_ids: Vec<i64> = Vec::new();
    let mut advance: Vec<String> = Vec::new();
    for r in &heads {
        let key: String = r.get(0);
        let head = head_delivery(r, 1);
        match step(head, on_failure) {
            Some(w) => {
                if let HeadWrite::Set { delivery, due: None, .. } = &w {
                    claim_ids.push(*delivery);
                }
                writes.push((key, w));
            }
            None => advance.push(key),
        }
    }
    if !advance.is_empty() {
        // Each key's next head: its oldest unfinished delivery, one probe of
        // `deliveries_keyed` per key, all in one statement.
        let next = tx
            .query(
                // `status IN` spelt as `deliveries_keyed` (and rules::unfinished) spells it.
                &tx.prepare_cached(
                    "SELECT k.key, n.* FROM unnest($2::text[]) AS k(key) LEFT JOIN LATERAL (
                        SELECT id, event_id, status, attempts, budget_from, held, next_at <= now(), next_at FROM deliveries
                        WHERE handler = $1 AND order_key = k.key AND status IN ('pending', 'retrying', 'running')
                        ORDER BY event_id LIMIT 1) n ON true",
                )
                .await?,
                &[&handler, &advance],
            )
            .await?;
        for r in &next {
            let key: String = r.get(0);
            let w = match head_delivery(r, 1) {
                None => HeadWrite::Delete,
                // An unfinished delivery: claim it or wait for it.
                Some(d) => step(Some(d), on_failure).unwrap_or(HeadWrite::Delete),
            };
            if let HeadWrite::Set { delivery, due: None, .. } = &w {
                claim_ids.push(*delivery);
            }
            writes.push((key, w));
        }
    }
    let mut due: Vec<Due> = Vec::new();
    if !claim_ids.is_empty() {
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT id, event_id, status, attempts, budget_from, held FROM deliveries WHERE id = ANY($1) FOR UPDATE",
                )
                .await?,
                &[&claim_ids],
            )
            .await?;
        due = due_rows(&rows);
    }
    // The rest depends on nothing it returns: the locked heads' deliveries
    // claimed, the head rows written, the unkeyed deliveries claimed, in
    // this order, pipelined. Every delivery in `due` is claimed, so the
    // unkeyed part has the room they leave.
    let room = limit - due.len() as i64;
    prepare_rest(tx).await?;
    let (locked, heads, unkeyed) =
        tokio::join!(claim_rows(tx, owner, handler, due, lease_us), write_heads(tx, handler, &writes, lease_us), async {
            if room > 0 {
                claim_in(tx, owner, handler, room, lease_us).await
            } else {
                Ok(Vec::new())
            }
        });
    let mut out = locked?;
    heads?;
    out.extend(unkeyed?);
    Ok(out)
}

/// Statements pipelined on one connection (`tokio::join!`) are sent, and
/// run, in the order they are first polled. Each is prepared (and cached)
/// before, so none waits inside the join for its own `Parse` round trip
/// and lets a later one go first.
async fn prepare_rest(tx: &Tx<'_>) -> PgResult<()> {
    for sql in [super::claim::CLAIM_LOCKED, HEADS_SET, HEADS_DELETE, super::claim::CLAIM_UNKEYED] {
        tx.prepare_cached(sql).await?;
    }
    Ok(())
}

/// [`write_heads`]' statements.
const HEADS_SET: &str = "UPDATE order_heads h SET
                    delivery_id = CASE WHEN u.b THEN h.delivery_id ELSE u.d END,
                    event_id = CASE WHEN u.b THEN h.event_id ELSE u.e END,
                    due = CASE WHEN u.b THEN h.due ELSE coalesce(u.t, now() + $7::int8 * interval '1 microsecond') END,
                    blocked = u.b
                 FROM unnest($2::text[], $3::int8[], $4::text[], $5::timestamptz[], $6::bool[]) AS u(k, d, e, t, b)
                 WHERE h.handler = $1 AND h.key = u.k";
const HEADS_DELETE: &str = "DELETE FROM order_heads WHERE handler = $1 AND key = ANY($2)";

/// One step of `rules` ("Ordered claims", step 3) on a head: what to write,
/// or `None` to advance to the key's next delivery.
fn step(head: Option<HeadDelivery>, on_failure: OnFailure) -> Option<HeadWrite> {
    match (rules::head_step(head.as_ref().map(|d| d.status), on_failure), head) {
        (rules::HeadStep::Claim, Some(d)) if d.due_now => Some(HeadWrite::Set { delivery: d.id, event: d.event_id, due: None }),
        // A renewed lease or a retry time: look again then.
        (rules::HeadStep::Claim, Some(d)) => Some(HeadWrite::Set { delivery: d.id, event: d.event_id, due: Some(d.next_at) }),
        (rules::HeadStep::Block, _) => Some(HeadWrite::Block),
        (rules::HeadStep::Advance, _) | (rules::HeadStep::Claim, None) => None,
    }
}

/// Writes a claim's decisions back to the head rows it holds, in two statements.
async fn write_heads(tx: &Tx<'_>, handler: &str, writes: &[(String, HeadWrite)], lease_us: i64) -> PgResult<()> {
    // Each key appears once: a claim writes each head row it holds once.
    let (mut keys, mut deliveries, mut events, mut dues, mut blocks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut gone: Vec<&str> = Vec::new();
    for (key, w) in writes {
        match w {
            HeadWrite::Set { delivery, event, due } => {
                keys.push(key.as_str());
                deliveries.push(*delivery);
                events.push(event.as_str());
                dues.push(*due);
                blocks.push(false);
            }
            HeadWrite::Block => {
                keys.push(key.as_str());
                deliveries.push(0);
                events.push("");
                dues.push(None);
                blocks.push(true);
            }
            HeadWrite::Delete => gone.push(key),
        }
    }
    if !keys.is_empty() {
        tx.execute(&tx.prepare_cached(HEADS_SET).await?, &[&handler, &keys, &deliveries, &events, &dues, &blocks, &lease_us]).await?;
    }
    if !gone.is_empty() {
        tx.execute(&tx.prepare_cached(HEADS_DELETE).await?, &[&handler, &gone]).await?;
    }
    Ok(())
}

/// [`crate::store::Store::skip`]: the one place a delivery becomes `skipped`.
///
/// Locks in the order claims and finishes take them (the key's head row,
/// then the delivery, then the event), so a skip beside processing nodes
/// does not deadlock with them; the status is checked on the locked row.
pub async fn skip_in(tx: &Tx<'_>, id: EventId, handler: &str) -> PgResult<Result<(), SkipError>> {
    let event = id.to_string();
    if tx.query_opt("SELECT 1 FROM events WHERE id = $1", &[&event]).await?.is_none() {
        return Ok(Err(SkipError::UnknownEvent(id)));
    }
    // The key is fixed at insert: read without a lock, to lock its head first.
    let Some(row) = tx.query_opt("SELECT id, order_key FROM deliveries WHERE event_id = $1 AND handler = $2", &[&event, &handler]).await?
    else {
        return Ok(Err(SkipError::UnknownHandler(id, handler.to_string())));
    };
    let (delivery, key): (i64, Option<String>) = (row.get(0), row.get(1));
    if let Some(key) = &key {
        tx.execute("SELECT 1 FROM order_heads WHERE handler = $1 AND key = $2 FOR UPDATE", &[&handler, key]).await?;
    }
    let Some(row) = tx.query_opt("SELECT status FROM deliveries WHERE id = $1 FOR UPDATE", &[&delivery]).await? else {
        // Pruned in between.
        return Ok(Err(SkipError::UnknownEvent(id)));
    };
    let Ok(status) = row.get::<_, &str>(0).parse::<DeliveryStatus>() else {
        return Ok(Err(SkipError::Store(crate::store::StoreError::Corrupt(format!("event {id}: unknown delivery status")))));
    };
    if !rules::skippable(status) {
        return Ok(Err(SkipError::NotFailed(id, handler.to_string(), status)));
    }
    // The key it blocked (if it heads one) is looked at again at once: it advances.
    if let Some(key) = &key {
        tx.execute(
            "UPDATE order_heads SET blocked = false, due = now() WHERE handler = $1 AND key = $2 AND delivery_id = $3",
            &[&handler, key, &delivery],
        )
        .await?;
    }
    tx.execute("UPDATE deliveries SET status = $2, updated_at = now() WHERE id = $1", &[&delivery, &DeliveryStatus::Skipped.as_str()])
        .await?;
    // The counters follow by themselves: the deliveries table's statement
    // trigger moves the count from failed to skipped in this transaction
    // (see `schema`, migration 3). The event row is locked last.
    refresh_event_status(tx, &event).await?;
    Ok(Ok(()))
}

/// [`crate::store::Store::replay`] in one transaction: re-queues the
/// deliveries of `ids` that [`rules::replay_takes`] takes; returns how many,
/// and how many of them had finished (they join the backlog again).
///
/// Locks in the order claims and finishes take them, so a replay running
/// beside processing nodes does not deadlock with them: events in id
/// order, and for each event its deliveries' key heads (sorted), then the
/// deliveries, then the event row. Statuses are read from the locked
/// delivery rows, so a delivery a claim just took (`running`) is left to
/// its attempt.
pub async fn replay_in(tx: &Tx<'_>, ids: &[EventId], handler: Option<&str>, only_failed: bool) -> PgResult<(u64, i64)> {
    let mut events: Vec<String> = ids.iter().map(EventId::to_string).collect();
    events.sort_unstable();
    events.dedup();
    let (mut n, mut revived) = (0u64, 0i64);
    for event in &events {
        // The keys are fixed at insert: read without a lock, to lock their heads first.
        let keys = tx
            .query(
                "SELECT DISTINCT handler, order_key FROM deliveries
                 WHERE event_id = $1 AND ($2::text IS NULL OR handler = $2) AND order_key IS NOT NULL ORDER BY handler, order_key",
                &[event, &handler],
            )
            .await?;
        for k in &keys {
            tx.execute(
                "SELECT 1 FROM order_heads WHERE handler = $1 AND key = $2 FOR UPDATE",
                &[&k.get::<_, &str>(0), &k.get::<_, &str>(1)],
            )
            .await?;
        }
        let rows = tx
            .query(
                "SELECT id, status, attempts FROM deliveries WHERE event_id = $1 AND ($2::text IS NULL OR handler = $2) ORDER BY id FOR UPDATE",
                &[event, &handler],
            )
            .await?;
        if tx.query_opt("SELECT 1 FROM events WHERE id = $1 FOR UPDATE", &[event]).await?.is_none() {
            continue;
        }
        let mut taken = 0u64;
        for r in &rows {
            // An unreadable status is not replayed (`events show` reports it).
            let Ok(status) = r.get::<_, &str>(1).parse::<DeliveryStatus>() else { continue };
            if !rules::replay_takes(status, only_failed) {
                continue;
            }
            let (id, attempts): (i64, i32) = (r.get(0), r.get(2));
            tx.execute(
                "UPDATE deliveries SET status = 'pending', budget_from = $2, next_at = now(), queued_at = now(), lease_owner = NULL,
                        held = false, updated_at = now() WHERE id = $1",
                &[&id, &(rules::budget_after_replay(attempts.max(0) as u32) as i32)],
            )
            .await?;
            replay_head(tx, id).await?;
            if !rules::unfinished(status) {
                revived += 1;
            }
            taken += 1;
        }
        if taken > 0 {
            refresh_event_status(tx, event).await?;
            n += taken;
        }
    }
    Ok((n, revived))
}
