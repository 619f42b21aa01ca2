//! Background retention: with `[storage] retention = "30d"`, finished events
//! (done or failed) received longer ago than that are deleted, a small batch
//! per transaction, so the writer interleaves ingest commits between batches
//! and a large first prune never stalls a sender. Unfinished work (pending,
//! processing, retrying) is never touched, whatever its age.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Ops;

/// Events deleted per transaction.
const BATCH: usize = 200;
/// Longest pause between two passes.
const MAX_EVERY: Duration = Duration::from_secs(60);

/// How often to look: half the retention (so nothing outlives it by more than
/// half again), between one second and a minute.
fn period(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_secs(1), MAX_EVERY)
}

/// Prunes until `shutdown`. Reads the retention from the current config on
/// every pass, so a SIGHUP that sets or changes it takes effect.
pub async fn run(ops: Arc<Ops>, shutdown: CancellationToken) {
    loop {
        let retention = ops.config().storage.retention;
        let wait = retention.map_or(MAX_EVERY, period);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(retention) = retention else { continue };
        // A retention reaching back before any date prunes nothing.
        let Some(before) = crate::store::checked_before(chrono::Utc::now(), retention) else { continue };
        let pass = ops.store.prune(before, BATCH);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pass => match r {
                Ok(0) => {}
                Ok(n) => {
                    ops.invalidate_chart();
                    tracing::info!(pruned = n, before = %crate::store::rfc3339(before), "retention: deleted finished events");
                }
                Err(e) => tracing::warn!(error = %e, "retention: prune failed; will try again"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_half_the_retention_within_bounds() {
        assert_eq!(period(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(10)), Duration::from_secs(5));
        assert_eq!(period(Duration::from_secs(30 * 86400)), MAX_EVERY);
    }
}
