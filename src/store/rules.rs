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

use super::{DeliveryStatus, EventStatus, Next, RejectReason};

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
            DeliveryStatus::Failed => {
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
        DeliveryStatus::Succeeded | DeliveryStatus::Failed => false,
    }
}

/// Whether a delivery waits for a time to run (and `events show` says when).
pub fn waits_for_its_time(status: DeliveryStatus) -> bool {
    match status {
        DeliveryStatus::Pending | DeliveryStatus::Retrying => true,
        DeliveryStatus::Running | DeliveryStatus::Succeeded | DeliveryStatus::Failed => false,
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
        DeliveryStatus::Succeeded | DeliveryStatus::Failed => None,
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
        DeliveryStatus::Failed => true,
        DeliveryStatus::Pending | DeliveryStatus::Retrying | DeliveryStatus::Succeeded => !only_failed,
    }
}

/// The status an imported delivery waits in (`hooktrail import`): one that
/// was running has no processor here, so it is due again at once, as a
/// release leaves it; every other status is kept.
pub fn after_import(status: DeliveryStatus) -> DeliveryStatus {
    match status {
        DeliveryStatus::Running => DeliveryStatus::Pending,
        DeliveryStatus::Pending | DeliveryStatus::Retrying | DeliveryStatus::Succeeded | DeliveryStatus::Failed => status,
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
        DeliveryStatus::Failed => StatsColumn::Failed,
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
        assert_eq!(all, [Pending, Succeeded, Retrying, Failed]);
        let failed: Vec<_> = DeliveryStatus::ALL.iter().copied().filter(|s| replay_takes(*s, true)).collect();
        assert_eq!(failed, [Failed]);
    }

    #[test]
    fn an_imported_running_delivery_waits_again_and_every_other_status_is_kept() {
        let imported: Vec<_> = DeliveryStatus::ALL.iter().map(|s| after_import(*s)).collect();
        assert_eq!(imported, [Pending, Pending, Succeeded, Retrying, Failed]);
    }

    #[test]
    fn every_state_has_its_stats_column() {
        use StatsColumn as C;
        let events: Vec<_> = EventStatus::ALL.iter().map(|s| event_column(*s)).collect();
        assert_eq!(events, [C::Pending, C::Processing, C::Retrying, C::Succeeded, C::Failed]);
        let deliveries: Vec<_> = DeliveryStatus::ALL.iter().map(|s| delivery_column(*s)).collect();
        assert_eq!(deliveries, [C::Pending, C::Processing, C::Succeeded, C::Retrying, C::Failed]);
        for &r in RejectReason::ALL {
            let want = if r == RejectReason::Duplicate { C::Duplicates } else { C::Rejected };
            assert_eq!(counter_column(r), want, "{r}");
        }
    }
}
