//! The queue's rules, written once in plain Rust over domain types: what an
//! event's status is, what claiming a delivery does to its attempts (after a
//! crash too), which attempts spend the retry budget, what a release, a
//! finished attempt and a replay leave behind, and which `stats` column a
//! state is counted in (README "Processing", "Replay", "Command line").
//!
//! A backend only stores and fetches: it asks these functions and writes
//! down the answer. Where a backend must put a rule into its query language
//! (a `WHERE status IN (…)` that an index or a bulk statement needs), it says
//! so next to the query and names the function here. `tests/store_contract.rs`
//! holds every backend to the same answers.
//!
//! Every `match` on a status here lists each variant: a new state must be
//! placed by hand in every rule, never fall into a default arm.
//!
//! Nothing here does I/O or knows a database.

use serde_json::Value;

use super::{DeliveryStatus, EventStatus, HourCounts, Next, OnFailure, RejectReason};

/// An event's status from the statuses of its deliveries (README "States"):
/// `processing` while one runs, or while some finished and others still
/// wait; `retrying` while one waits for a retry; `pending` before any
/// started; `failed` once all finished and one failed; `done` once all
/// succeeded, or when nothing was routed to it.
pub fn event_status(deliveries: &[DeliveryStatus]) -> EventStatus {
    let (mut running, mut retrying, mut pending, mut finished, mut failed) = (false, false, false, false, false);
    for status in deliveries {
        match status {
            DeliveryStatus::Pending => pending = true,
            DeliveryStatus::Running => running = true,
            DeliveryStatus::Retrying => retrying = true,
            DeliveryStatus::Succeeded => finished = true,
            // A skipped delivery released its key but did not succeed.
            DeliveryStatus::Failed | DeliveryStatus::Skipped => {
                finished = true;
                failed = true;
            }
        }
    }
    if running {
        EventStatus::Processing
    } else if retrying {
        EventStatus::Retrying
    } else if pending && finished {
        EventStatus::Processing
    } else if pending {
        EventStatus::Pending
    } else if failed {
        EventStatus::Failed
    } else {
        EventStatus::Done
    }
}

/// The status of a new event routed to `handlers` deliveries (all pending).
pub fn new_event_status(handlers: usize) -> EventStatus {
    if handlers == 0 {
        event_status(&[])
    } else {
        event_status(&[DeliveryStatus::Pending])
    }
}

/// The status of an event one of whose deliveries is running: that alone
/// decides it (see [`event_status`]), so a claim need not read the others.
pub fn event_status_while_running() -> EventStatus {
    event_status(&[DeliveryStatus::Running])
}

/// Whether a delivery still has work ahead: it counts in the backlog
/// (`server.max_backlog`), in queue depth, and is what `claim` looks among.
pub fn unfinished(status: DeliveryStatus) -> bool {
    match status {
        DeliveryStatus::Pending | DeliveryStatus::Running | DeliveryStatus::Retrying => true,
        DeliveryStatus::Succeeded | DeliveryStatus::Failed | DeliveryStatus::Skipped => false,
    }
}

/// Whether a delivery waits for a time to run (and `events show` says when).
pub fn waits_for_its_time(status: DeliveryStatus) -> bool {
    match status {
        DeliveryStatus::Pending | DeliveryStatus::Retrying => true,
        DeliveryStatus::Running | DeliveryStatus::Succeeded | DeliveryStatus::Failed | DeliveryStatus::Skipped => false,
    }
}

/// Whether `prune` (and retention) may delete an event: only finished ones,
/// never pending, processing or retrying work (README "Command line").
pub fn prunable(status: EventStatus) -> bool {
    match status {
        EventStatus::Done | EventStatus::Failed => true,
        EventStatus::Pending | EventStatus::Processing | EventStatus::Retrying => false,
    }
}

/// What claiming a due delivery does to its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimStep {
    /// The 1-based number of the attempt the claim is for; the delivery's
    /// attempt count becomes this.
    pub attempt: u32,
    /// An attempt to record as interrupted first: its processor began it
    /// and then died (the lease expired), so it stays in the paper trail.
    pub interrupted: Option<u32>,
}

/// What a claim of a due delivery in `status` with `attempts` begun so far
/// does; `None` for a delivery that is not claimable (it finished).
///
/// A `running` delivery is due only once its lease expired: its processor
/// died. If it was still *held* (claimed ahead, waiting for a handler slot,
/// see `Store::started`) the attempt never began: it gets the same number
/// again and nothing is recorded. Otherwise the attempt was cut short: it is
/// recorded as interrupted, and the claim runs the next number.
pub fn claim_step(status: DeliveryStatus, held: bool, attempts: u32) -> Option<ClaimStep> {
    match status {
        DeliveryStatus::Pending | DeliveryStatus::Retrying => Some(ClaimStep { attempt: attempts + 1, interrupted: None }),
        DeliveryStatus::Running if held => Some(ClaimStep { attempt: attempts, interrupted: None }),
        DeliveryStatus::Running => Some(ClaimStep { attempt: attempts + 1, interrupted: Some(attempts) }),
        DeliveryStatus::Succeeded | DeliveryStatus::Failed | DeliveryStatus::Skipped => None,
    }
}

/// The error recorded for an attempt [`claim_step`] found interrupted.
pub const INTERRUPTED_ATTEMPT: &str = "the processor stopped before this attempt finished (lease expired); running it again";

/// Which of a delivery's attempts `max_attempts` counts: only those since
/// its last replay (a replay gives a fresh budget; attempt numbers go on).
/// `budget_from` is the attempt count at that replay (0 if never replayed);
/// the result is 1-based, as `attempt` is.
pub fn attempt_in_budget(attempt: u32, budget_from: u32) -> u32 {
    attempt.saturating_sub(budget_from).max(1)
}

/// A replay starts the budget over from the attempts made so far (see
/// [`attempt_in_budget`]): the new `budget_from`.
pub fn budget_after_replay(attempts: u32) -> u32 {
    attempts
}

/// A delivery given back unrun (`Store::release`, at shutdown): the attempt
/// it was claimed for did not happen, so the count goes back by one, and it
/// waits as it did before the claim: `retrying` if attempts of the current
/// budget were made, else `pending`. Returns (status, attempts).
pub fn after_release(attempts: u32, budget_from: u32) -> (DeliveryStatus, u32) {
    let attempts = attempts.saturating_sub(1);
    let status = if attempts > budget_from { DeliveryStatus::Retrying } else { DeliveryStatus::Pending };
    (status, attempts)
}

/// A delivery's status after an attempt, from what the processor decided.
pub fn after_attempt(next: Next) -> DeliveryStatus {
    match next {
        Next::Succeeded => DeliveryStatus::Succeeded,
        Next::RetryAt(_) => DeliveryStatus::Retrying,
        Next::Failed => DeliveryStatus::Failed,
        // Cut short by shutdown: due again at once, first in line at the next start.
        Next::Released => DeliveryStatus::Pending,
    }
}

/// Whether a replay re-queues a delivery in `status` (README "Replay"):
/// never one running right now (its attempt is under way), and only failed
/// ones when `only_failed`. A replayed delivery becomes `pending`, due at
/// once, with a fresh retry budget ([`budget_after_replay`]) and a fresh
/// `max_age` clock.
pub fn replay_takes(status: DeliveryStatus, only_failed: bool) -> bool {
    match status {
        DeliveryStatus::Running => false,
        // Skipped counts as failed (README "States").
        DeliveryStatus::Failed | DeliveryStatus::Skipped => true,
        DeliveryStatus::Pending | DeliveryStatus::Retrying | DeliveryStatus::Succeeded => !only_failed,
    }
}

// ---------------------------------------------------------------------------
// Ordered claims (README "Ordered processing")
//
// A handler with `ordering = { key = PTR }` runs the deliveries that share a
// key value one at a time, in event-id order. Checking "no earlier
// unfinished delivery with my key" for every candidate row collapses when
// few keys hold a large backlog (each candidate re-reads its key's queue),
// so every backend keeps the same two structures and the same steps:
//
// * Each delivery stores its key at insert ([`order_key`] of the normalized
//   payload; `NULL` when the handler is not ordered or the payload lacks
//   it), so a reload never changes a queued delivery's key.
// * A heads table, one row per (handler, key) that has work or is blocked:
//   `(handler, key, delivery, event, due, blocked)`. `delivery` is the key's
//   head, `due` when it may next be looked at (its `next_at` as last seen),
//   `blocked` set while a failed head holds the key ([`head_step`]).
//   Indexed by `(handler, blocked, due)`.
// * An index on keyed deliveries `(handler, key, event)`, to find a key's
//   next head in one probe, and one on unfinished *unkeyed* deliveries
//   `(handler, next_at)`, so the unordered part of a claim never walks the
//   keyed backlog. On PostgreSQL the keyed index holds the unfinished ones
//   only. On SQLite it holds every keyed delivery and names no column a
//   claim or a finish changes (SQLite rewrites an index entry whenever such
//   a column changes, and the entries of the keys' heads lie in random
//   places of the index); the head row then keeps a `floor`: no delivery of
//   the key below that event is unfinished, so the next head is the first
//   unfinished one from the floor on (usually the floor's next entry).
//
// Insert: a keyed delivery adds `(handler, key, itself, now)` to the heads
// unless the key has a row already (ids grow, so an existing head is older).
//
// Claim (`claim_ordered`, one transaction, `limit` deliveries at most):
// 1. With `Continue`, clear `blocked` on the handler's rows (a reload may
//    have turned `Block` off), due now. Rows blocked by a delivery that is
//    gone (pruned with its event) are cleared too.
// 2. Head rows with `blocked = 0 AND due <= now`, oldest `due` first, at
//    most `limit`, each read with its delivery (a LEFT JOIN: gone = NULL).
// 3. For each, [`head_step`] says what to do: `Claim` if its
//    `next_at <= now` (else copy its `next_at` into `due`: a renewed lease
//    or a retry time, and move on); `Advance`: the next head is the
//    unfinished delivery of the key with the smallest event id (one probe
//    of the keyed index, from the floor on and past a finished head that is
//    the floor; none: delete the row), and the next step claims it
//    or waits for it (2 steps per head at most); `Block`: set `blocked`,
//    leave `delivery` (it names the blocker).
// 4. Claiming is what [`claim_step`] says, as for any delivery; the head
//    row then points at it with `due` = the lease's end (a renewal moves
//    `next_at` only; step 3 catches up).
// 5. Room left: unkeyed deliveries due (`next_at <= now`, unfinished),
//    oldest first, as an unordered claim takes them. Heads go first: there
//    is at most one per key, so they cannot crowd the unkeyed out for long.
// A plain `claim` (a handler without `ordering`) is the same with
// `Continue`: deliveries stored with a key keep their order after a reload
// took `ordering` off.
//
// Finish, release, retry: set the head row's `due` to the delivery's new
// `next_at` (now, for a finished one, so the next claim advances or blocks).
// A backend may advance at once a head that succeeded (SQLite does): the
// key's next unfinished delivery becomes the head, due at its own
// `next_at` (for a pending one, when it was queued), or the row goes. Ready
// heads are then claimed in about event order rather than in the order
// their predecessors finished, so a claim's rows sit close together.
// Replay of a keyed delivery D: on SQLite the row's floor goes down to D
// if D is older (it is unfinished again). No row: D becomes the head. A row whose
// head is D (blocked): unblocked, due now. A row whose head is `pending`
// and younger than D: D becomes the head (it goes back in event-id order
// among deliveries not yet begun). Otherwise the row stays: D waits behind
// a head that is running, waiting for a retry or blocking, and runs when
// step 3 advances to it (it is then the oldest unfinished).
// Skip: the failed head becomes `skipped`; its row is unblocked, due now.
//
// On PostgreSQL, step 2's head rows are taken `FOR UPDATE SKIP LOCKED`, so
// nodes claim different keys; the rest is the same.
// ---------------------------------------------------------------------------

/// The ordering key of a delivery: the value at `pointer` in the normalized
/// payload, as text (a string as is, any other value as compact JSON);
/// `None` when it is absent or `null` (the delivery is not ordered).
pub fn order_key(payload: &Value, pointer: &str) -> Option<String> {
    match payload.pointer(pointer)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// What a claim does with the head of an ordering key, given its status
/// (`None`: the delivery is gone, pruned with its event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadStep {
    /// It still has work: claim it when its time has come.
    Claim,
    /// It let its key go: the next delivery of the key becomes the head.
    Advance,
    /// It failed for good and the handler blocks: the key waits for a
    /// replay that succeeds, or a skip.
    Block,
}

/// See [`HeadStep`]. A delivery waiting for a retry is unfinished, so it
/// holds its key.
pub fn head_step(status: Option<DeliveryStatus>, on_failure: OnFailure) -> HeadStep {
    let Some(status) = status else { return HeadStep::Advance };
    match status {
        DeliveryStatus::Pending | DeliveryStatus::Running | DeliveryStatus::Retrying => HeadStep::Claim,
        DeliveryStatus::Succeeded | DeliveryStatus::Skipped => HeadStep::Advance,
        DeliveryStatus::Failed => match on_failure {
            OnFailure::Continue => HeadStep::Advance,
            OnFailure::Block => HeadStep::Block,
        },
    }
}

/// Whether a replayed delivery (now pending) takes the place of its key's
/// current head: only a head that has not begun (`pending`) and is younger.
pub fn replay_takes_head(head_status: Option<DeliveryStatus>, head_is_younger: bool) -> bool {
    match head_status {
        None => true,
        Some(DeliveryStatus::Pending) => head_is_younger,
        Some(
            DeliveryStatus::Running
            | DeliveryStatus::Retrying
            | DeliveryStatus::Succeeded
            | DeliveryStatus::Failed
            | DeliveryStatus::Skipped,
        ) => false,
    }
}

/// Whether `events skip` may mark a delivery in `status` skipped: only a
/// failed one (README "Command line").
pub fn skippable(status: DeliveryStatus) -> bool {
    match status {
        DeliveryStatus::Failed => true,
        DeliveryStatus::Pending
        | DeliveryStatus::Running
        | DeliveryStatus::Retrying
        | DeliveryStatus::Succeeded
        | DeliveryStatus::Skipped => false,
    }
}

/// The status an imported delivery waits in (`hooktrail import`): one that
/// was running has no processor here, so it is due again at once, as a
/// release leaves it; every other status is kept.
pub fn after_import(status: DeliveryStatus) -> DeliveryStatus {
    match status {
        DeliveryStatus::Running => DeliveryStatus::Pending,
        DeliveryStatus::Pending
        | DeliveryStatus::Retrying
        | DeliveryStatus::Succeeded
        | DeliveryStatus::Failed
        | DeliveryStatus::Skipped => status,
    }
}

/// A column of `hooktrail stats` (besides `received`, which counts every
/// event or delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsColumn {
    /// Requests answered with the first event's id (dedup), not stored.
    Duplicates,
    /// Requests refused, not stored.
    Rejected,
    /// Waiting for a first attempt.
    Pending,
    /// Running (a delivery), or partly through (an event).
    Processing,
    /// Succeeded (a delivery), or done (an event).
    Succeeded,
    /// Waiting for a retry.
    Retrying,
    /// Given up.
    Failed,
}

/// The column an event is counted in on its source's row.
pub fn event_column(status: EventStatus) -> StatsColumn {
    match status {
        EventStatus::Pending => StatsColumn::Pending,
        EventStatus::Processing => StatsColumn::Processing,
        EventStatus::Retrying => StatsColumn::Retrying,
        EventStatus::Done => StatsColumn::Succeeded,
        EventStatus::Failed => StatsColumn::Failed,
    }
}

/// The column a delivery is counted in on its (source, handler) row.
pub fn delivery_column(status: DeliveryStatus) -> StatsColumn {
    match status {
        DeliveryStatus::Pending => StatsColumn::Pending,
        DeliveryStatus::Running => StatsColumn::Processing,
        DeliveryStatus::Retrying => StatsColumn::Retrying,
        DeliveryStatus::Succeeded => StatsColumn::Succeeded,
        DeliveryStatus::Failed | DeliveryStatus::Skipped => StatsColumn::Failed,
    }
}

/// The column a counted, unstored request is in: a duplicate, or a refusal.
pub fn counter_column(reason: RejectReason) -> StatsColumn {
    match reason {
        RejectReason::Duplicate => StatsColumn::Duplicates,
        RejectReason::Malformed
        | RejectReason::Unauthorized
        | RejectReason::Forbidden
        | RejectReason::Method
        | RejectReason::Timeout
        | RejectReason::TooLarge
        | RejectReason::ContentType
        | RejectReason::RateLimited
        | RejectReason::Unavailable
        | RejectReason::NotFound => StatsColumn::Rejected,
    }
}

/// How the counters behind `stats`, the queue-depth metrics and the page's
/// chart move when a row changes state (README "Counters"). Every backend
/// keeps, per (source, handler or the event itself, receive hour), how many
/// rows are in each state, and changes them in the same transaction as the
/// row: a new row adds one to its state (`from` = `None`), a deleted row
/// (prune, retention) takes one away (`to` = `None`), a change of state
/// moves one from the old state to the new one; no change moves nothing.
/// Which `stats` column a state is shown in is [`event_column`] and
/// [`delivery_column`]; a new state (say, a delivery `skipped`) is counted
/// under its own name and placed there.
pub fn tally_moves<S: Copy + PartialEq>(from: Option<S>, to: Option<S>) -> Vec<(S, i64)> {
    if from == to {
        return Vec::new();
    }
    from.map(|s| (s, -1)).into_iter().chain(to.map(|s| (s, 1))).collect()
}

/// The hour bucket a row is counted in: its event's receive time, in whole
/// hours since 1970 (UTC). `stats --since` and the chart read whole buckets
/// (README "Counters" says how the first, partial hour is counted exactly).
pub fn tally_hour(received_at: chrono::DateTime<chrono::Utc>) -> i64 {
    received_at.timestamp().div_euclid(3600)
}

/// The chart's rows from the events' hour counters `(hour, state, n)` (a
/// bucket of [`tally_hour`] may come in several rows): one per hour with
/// events, oldest first. `Err(hour)`: a bucket no time can be made of.
pub fn hourly_counts(rows: impl IntoIterator<Item = (i64, EventStatus, u64)>) -> Result<Vec<HourCounts>, i64> {
    let mut hours: std::collections::BTreeMap<i64, HourCounts> = std::collections::BTreeMap::new();
    for (hour, status, n) in rows {
        let at = chrono::DateTime::from_timestamp(hour.saturating_mul(3600), 0).ok_or(hour)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use DeliveryStatus::*;

    #[test]
    fn event_status_follows_the_readme_states() {
        assert_eq!(event_status(&[]), EventStatus::Done, "nothing routed: done");
        assert_eq!(event_status(&[Pending, Pending]), EventStatus::Pending);
        assert_eq!(event_status(&[Pending, Succeeded]), EventStatus::Processing, "some finished, some wait");
        assert_eq!(event_status(&[Pending, Failed]), EventStatus::Processing);
        assert_eq!(event_status(&[Retrying, Pending, Succeeded]), EventStatus::Retrying);
        assert_eq!(event_status(&[Retrying, Failed]), EventStatus::Retrying);
        assert_eq!(event_status(&[Succeeded, Succeeded]), EventStatus::Done);
        assert_eq!(event_status(&[Succeeded, Failed]), EventStatus::Failed, "finished, one failed");
        assert_eq!(event_status(&[Failed]), EventStatus::Failed);
        assert_eq!(event_status(&[Succeeded, Skipped]), EventStatus::Failed, "skipped counts as failed");
        assert_eq!(new_event_status(0), EventStatus::Done);
        assert_eq!(new_event_status(3), EventStatus::Pending);
    }

    #[test]
    fn a_running_delivery_makes_the_event_processing_whatever_the_others_are() {
        assert_eq!(event_status_while_running(), EventStatus::Processing);
        for &a in DeliveryStatus::ALL {
            for &b in DeliveryStatus::ALL {
                assert_eq!(event_status(&[a, Running, b]), EventStatus::Processing, "{a}, running, {b}");
            }
        }
    }

    #[test]
    fn the_event_status_does_not_depend_on_the_order_of_deliveries() {
        for &a in DeliveryStatus::ALL {
            for &b in DeliveryStatus::ALL {
                assert_eq!(event_status(&[a, b]), event_status(&[b, a]));
                assert_eq!(event_status(&[a, b, a]), event_status(&[a, b]), "repeats change nothing");
            }
        }
    }

    #[test]
    fn unfinished_waiting_and_prunable_states() {
        let unfinished_ones: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| unfinished(*s)).collect();
        assert_eq!(unfinished_ones, [Pending, Running, Retrying]);
        let waiting: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| waits_for_its_time(*s)).collect();
        assert_eq!(waiting, [Pending, Retrying]);
        let prunable_ones: Vec<_> = EventStatus::ALL.iter().copied().filter(|s| prunable(*s)).collect();
        assert_eq!(prunable_ones, [EventStatus::Done, EventStatus::Failed]);
    }

    #[test]
    fn claims_number_attempts_and_a_crash_mid_attempt_leaves_it_in_the_trail() {
        assert_eq!(claim_step(Pending, false, 0), Some(ClaimStep { attempt: 1, interrupted: None }), "first attempt");
        assert_eq!(claim_step(Retrying, false, 2), Some(ClaimStep { attempt: 3, interrupted: None }));
        assert_eq!(
            claim_step(Running, false, 2),
            Some(ClaimStep { attempt: 3, interrupted: Some(2) }),
            "attempt 2 began and its processor died: recorded, and 3 runs"
        );
        assert_eq!(
            claim_step(Running, true, 2),
            Some(ClaimStep { attempt: 2, interrupted: None }),
            "attempt 2 was claimed but never began: it runs as 2 again"
        );
        assert_eq!(claim_step(Succeeded, false, 1), None);
        assert_eq!(claim_step(Failed, true, 1), None);
    }

    #[test]
    fn max_attempts_counts_only_attempts_since_the_last_replay() {
        assert_eq!(attempt_in_budget(1, 0), 1);
        assert_eq!(attempt_in_budget(10, 0), 10);
        let budget_from = budget_after_replay(10);
        assert_eq!(attempt_in_budget(11, budget_from), 1, "the first attempt after a replay");
        assert_eq!(attempt_in_budget(13, budget_from), 3);
        assert_eq!(attempt_in_budget(10, budget_from), 1, "never below 1");
    }

    #[test]
    fn a_release_takes_back_the_attempt_and_waits_as_before_the_claim() {
        assert_eq!(after_release(1, 0), (Pending, 0), "the first attempt, given back");
        assert_eq!(after_release(3, 0), (Retrying, 2), "two attempts were made: waiting for a retry");
        assert_eq!(after_release(11, 10), (Pending, 10), "the first attempt since a replay");
        assert_eq!(after_release(0, 0), (Pending, 0));
    }

    #[test]
    fn an_attempts_outcome_moves_the_delivery_on() {
        assert_eq!(after_attempt(Next::Succeeded), Succeeded);
        assert_eq!(after_attempt(Next::Failed), Failed);
        assert_eq!(after_attempt(Next::RetryAt(chrono::Utc::now())), Retrying);
        assert_eq!(after_attempt(Next::Released), Pending);
    }

    #[test]
    fn replay_takes_everything_but_running_deliveries_or_only_failed_ones() {
        let all: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| replay_takes(*s, false)).collect();
        assert_eq!(all, [Pending, Succeeded, Retrying, Failed, Skipped]);
        let failed: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| replay_takes(*s, true)).collect();
        assert_eq!(failed, [Failed, Skipped], "skipped counts as failed");
    }

    #[test]
    fn a_change_of_state_moves_one_count_and_no_change_moves_nothing() {
        assert_eq!(tally_moves(None, Some(Pending)), [(Pending, 1)], "a new row");
        assert_eq!(tally_moves(Some(Running), Some(Failed)), [(Running, -1), (Failed, 1)]);
        assert_eq!(tally_moves(Some(Failed), None), [(Failed, -1)], "a deleted row");
        assert!(tally_moves(Some(Running), Some(Running)).is_empty(), "a lease taken over stays running");
        assert!(tally_moves::<DeliveryStatus>(None, None).is_empty());
        let t = chrono::DateTime::parse_from_rfc3339("1970-01-01T02:59:59Z").expect("a time").with_timezone(&chrono::Utc);
        assert_eq!(tally_hour(t), 2);
        let before = chrono::DateTime::parse_from_rfc3339("1969-12-31T23:59:59Z").expect("a time").with_timezone(&chrono::Utc);
        assert_eq!(tally_hour(before), -1, "whole hours, also before 1970");
    }

    #[test]
    fn an_imported_running_delivery_waits_again_and_every_other_status_is_kept() {
        let imported: Vec<_> = DeliveryStatus::ALL.iter().map(|s| after_import(*s)).collect();
        assert_eq!(imported, [Pending, Pending, Succeeded, Retrying, Failed, Skipped]);
    }

    #[test]
    fn every_state_has_its_stats_column() {
        use StatsColumn as C;
        let events: Vec<_> = EventStatus::ALL.iter().map(|s| event_column(*s)).collect();
        assert_eq!(events, [C::Pending, C::Processing, C::Retrying, C::Succeeded, C::Failed]);
        let deliveries: Vec<_> = DeliveryStatus::ALL.iter().map(|s| delivery_column(*s)).collect();
        assert_eq!(deliveries, [C::Pending, C::Processing, C::Succeeded, C::Retrying, C::Failed, C::Failed]);
        for &r in RejectReason::ALL {
            let want = if r == RejectReason::Duplicate { C::Duplicates } else { C::Rejected };
            assert_eq!(counter_column(r), want, "{r}");
        }
    }

    #[test]
    fn an_order_key_is_the_value_at_the_pointer_as_text() {
        let p = serde_json::json!({"contact": {"id": "c-1", "n": 42, "none": null}, "list": [1, 2]});
        assert_eq!(order_key(&p, "/contact/id").as_deref(), Some("c-1"));
        assert_eq!(order_key(&p, "/contact/n").as_deref(), Some("42"));
        assert_eq!(order_key(&p, "/list").as_deref(), Some("[1,2]"));
        assert_eq!(order_key(&p, "/contact/none"), None, "null: not ordered");
        assert_eq!(order_key(&p, "/missing"), None);
    }

    #[test]
    fn a_head_holds_its_key_until_it_finishes_and_a_failure_blocks_only_when_asked() {
        for on in [OnFailure::Continue, OnFailure::Block] {
            assert_eq!(head_step(Some(Pending), on), HeadStep::Claim);
            assert_eq!(head_step(Some(Retrying), on), HeadStep::Claim, "waiting for a retry holds the key");
            assert_eq!(head_step(Some(Running), on), HeadStep::Claim);
            assert_eq!(head_step(Some(Succeeded), on), HeadStep::Advance);
            assert_eq!(head_step(Some(Skipped), on), HeadStep::Advance, "a skip releases the key");
            assert_eq!(head_step(None, on), HeadStep::Advance, "pruned");
        }
        assert_eq!(head_step(Some(Failed), OnFailure::Continue), HeadStep::Advance);
        assert_eq!(head_step(Some(Failed), OnFailure::Block), HeadStep::Block);
    }

    #[test]
    fn a_replay_goes_back_in_line_only_before_heads_that_have_not_begun() {
        assert!(replay_takes_head(None, false), "no head: it is the head");
        assert!(replay_takes_head(Some(Pending), true));
        assert!(!replay_takes_head(Some(Pending), false));
        for s in [Running, Retrying, Failed] {
            assert!(!replay_takes_head(Some(s), true), "{s} holds its key");
        }
        let skippable_ones: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| skippable(*s)).collect();
        assert_eq!(skippable_ones, [Failed]);
    }
}
