//! The systemd watchdog: when the unit sets `WatchdogSec=`, systemd passes
//! `WATCHDOG_USEC` and kills (then restarts) the daemon if `WATCHDOG=1` stops
//! arriving. A timer alone would prove only that the runtime ticks, so each
//! ping is earned: the store must commit a write through its writer thread and
//! the processor loop must have gone round recently (the readiness checks).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Check, Ops};
use crate::store::StoreError;

/// Pings at half the watchdog period until `shutdown`; does nothing when
/// systemd asked for no watchdog.
pub async fn run(ops: Arc<Ops>, shutdown: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match alive(&ops).await {
            Ok(()) => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            Err(why) => tracing::warn!(reason = %why, "withholding the systemd watchdog ping"),
        }
    }
}

/// Whether the writer and processor are alive. A full write queue counts as
/// alive: the writer is busy committing, and a restart would only slow it.
/// So does a lost or damaged database: a restart cannot mend it, and after a
/// deletion this process holds the only copy of the file (README "Storage faults").
async fn alive(ops: &Ops) -> Result<(), String> {
    let storage = match tokio::time::timeout(super::PING_TIMEOUT, ops.store.ping()).await {
        Ok(Ok(())) | Ok(Err(StoreError::Overloaded)) => Check::Ok,
        Ok(Err(e)) if e.needs_operator() => Check::Ok,
        Ok(Err(e)) => Check::Failed(format!("storage: {e}")),
        Err(_) => Check::Failed("storage: the writer did not commit a ping in time".into()),
    };
    for check in [storage, ops.processor_check()] {
        if let Check::Failed(why) = check {
            return Err(why);
        }
    }
    Ok(())
}
