//! Retry policy, shared by every handler kind: what happens to a delivery
//! after an attempt. Exponential backoff from `initial_backoff`, capped at
//! `max_backoff`, with jitter; a peer's `Retry-After` is honoured up to
//! `max_age`; past `max_attempts` or `max_age` the delivery fails.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

use crate::config::RetryPolicy;
use crate::handlers::AttemptResult;
use crate::store::{checked_after, Next, Outcome};

/// The delay before retry number `attempt + 1`, before jitter.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let d = policy.initial_backoff.saturating_mul(1u32 << exp.min(31));
    d.min(policy.max_backoff)
}

/// "Equal jitter": half the delay fixed, half random, so retries of many
/// deliveries that failed together spread out but never come early.
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let extra = rand::thread_rng().gen_range(0.0..=1.0);
    half + half.mul_f64(extra)
}

/// The outcome an attempt is recorded with: a retryable failure after which
/// the delivery is given up (budget or max_age spent) is the delivery's last
/// attempt, so it reads `failure`, not `retry` (README, "Retries").
pub fn recorded_outcome(outcome: Outcome, next: &Next) -> Outcome {
    match (outcome, next) {
        (Outcome::Retry, Next::Failed) => Outcome::Failure,
        (o, _) => o,
    }
}

/// Decides the delivery's next state. `attempt_in_budget` counts attempts
/// since the last replay (1-based); `queued_at` starts the max_age clock.
/// Returns the next state and, when giving up, why.
pub fn decide(
    policy: &RetryPolicy,
    r: &AttemptResult,
    attempt_in_budget: u32,
    queued_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (Next, Option<String>) {
    match r.outcome {
        Outcome::Success => (Next::Succeeded, None),
        Outcome::Failure => (Next::Failed, None),
        Outcome::Retry => {
            if attempt_in_budget >= policy.max_attempts {
                return (
                    Next::Failed,
                    Some(format!("giving up after {attempt_in_budget} attempt(s) (max_attempts = {})", policy.max_attempts)),
                );
            }
            // Saturating: a delay or max_age past what a date can hold means "never".
            let deadline = checked_after(queued_at, policy.max_age).unwrap_or(DateTime::<Utc>::MAX_UTC);
            let delay = r.retry_after.unwrap_or_else(|| jitter(backoff(policy, attempt_in_budget)));
            let at = checked_after(now, delay).unwrap_or(DateTime::<Utc>::MAX_UTC);
            if at <= deadline {
                return (Next::RetryAt(at), None);
            }
            // A peer may ask for any wait (`Retry-After: 99999999999999`):
            // honoured up to max_age, so the delivery gets its last try when
            // max_age runs out instead of failing now or waiting for ever.
            if r.retry_after.is_some() && now < deadline {
                return (Next::RetryAt(deadline), None);
            }
            (
                Next::Failed,
                Some(format!("giving up: the next attempt would come after max_age ({})", humantime::format_duration(policy.max_age))),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_age: Duration::from_secs(3600),
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy();
        assert_eq!(backoff(&p, 1), Duration::from_secs(10));
        assert_eq!(backoff(&p, 2), Duration::from_secs(20));
        assert_eq!(backoff(&p, 3), Duration::from_secs(40));
        assert_eq!(backoff(&p, 4), Duration::from_secs(60));
        assert_eq!(backoff(&p, 40), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_whole() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(10));
            assert!(j >= Duration::from_secs(5) && j <= Duration::from_secs(10));
        }
    }

    #[test]
    fn retries_until_max_attempts_or_max_age() {
        let p = policy();
        let now = Utc::now();
        let retry = AttemptResult::retry("x");
        assert!(matches!(decide(&p, &retry, 1, now, now).0, Next::RetryAt(_)));
        assert_eq!(decide(&p, &retry, 5, now, now).0, Next::Failed);
        let old = now - chrono::Duration::seconds(3595);
        assert_eq!(decide(&p, &retry, 1, old, now).0, Next::Failed);
        assert_eq!(decide(&p, &AttemptResult::failure("no"), 1, now, now).0, Next::Failed);
    }

    #[test]
    fn a_retry_that_ends_the_delivery_is_recorded_as_a_failure() {
        let p = policy();
        let now = Utc::now();
        let retry = AttemptResult::retry("exit code 1");
        let (next, why) = decide(&p, &retry, 5, now, now);
        assert_eq!(recorded_outcome(retry.outcome, &next), Outcome::Failure);
        assert!(why.is_some_and(|w| w.contains("max_attempts = 5")));
        let (next, _) = decide(&p, &retry, 1, now, now);
        assert_eq!(recorded_outcome(retry.outcome, &next), Outcome::Retry);
        assert_eq!(recorded_outcome(Outcome::Retry, &Next::Released), Outcome::Retry, "an interrupted attempt is no failure");
        assert_eq!(recorded_outcome(Outcome::Success, &Next::Succeeded), Outcome::Success);
    }

    #[test]
    fn retry_after_is_honoured() {
        let p = policy();
        let now = Utc::now();
        let r = AttemptResult { retry_after: Some(Duration::from_secs(3)), ..AttemptResult::retry("429") };
        assert_eq!(decide(&p, &r, 1, now, now).0, Next::RetryAt(now + chrono::Duration::seconds(3)));
    }

    #[test]
    fn a_retry_after_beyond_max_age_or_any_date_moves_the_last_try_to_max_age() {
        let p = policy();
        let now = Utc::now();
        let deadline = now + chrono::Duration::seconds(3600);
        for secs in [7200, 99_999_999_999_999, u64::MAX] {
            let r = AttemptResult { retry_after: Some(Duration::from_secs(secs)), ..AttemptResult::retry("503") };
            assert_eq!(decide(&p, &r, 1, now, now), (Next::RetryAt(deadline), None), "Retry-After: {secs}");
            // Once max_age has run out, that last try ends the delivery.
            assert_eq!(decide(&p, &r, 2, now, deadline).0, Next::Failed, "Retry-After: {secs}");
        }
    }

    #[test]
    fn a_max_age_past_any_date_never_overflows() {
        let p = RetryPolicy { max_age: Duration::from_secs(u64::MAX), ..policy() };
        let now = Utc::now();
        let r = AttemptResult { retry_after: Some(Duration::from_secs(u64::MAX)), ..AttemptResult::retry("503") };
        assert_eq!(decide(&p, &r, 1, now, now).0, Next::RetryAt(DateTime::<Utc>::MAX_UTC));
        assert!(matches!(decide(&p, &AttemptResult::retry("x"), 1, now, now).0, Next::RetryAt(_)));
    }
}
