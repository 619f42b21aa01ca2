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

use super::refresh_event_status;
use crate::store::{rules, DeliveryStatus, EventId, SkipError};

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
