//! The processor: claims due deliveries with a lease, runs them on their
//! handler within per-handler and global concurrency limits, and records each
//! attempt with the delivery's next state. Separate from the listener; runs in
//! the same process (`serve --role all`) or its own (`--role process`).
//!
//! It wakes at once when the store commits new work in this process and also
//! polls every `processor.poll_interval`, which covers work another process
//! stored, retries coming due and leases that expired because their holder
//! died. A crash mid-attempt therefore means the attempt runs again after the
//! lease expires (at-least-once). Idle, it sleeps: no busy loop.
//!
//! A crash also leaves the handler processes that were running, and their
//! payload files: a processor starting on the same database kills and removes
//! those first (`handlers::leftovers`), so no handler runs on beside its own
//! re-run, free of the timeout that bounded it.

pub mod retry;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::Utc;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, HandlerConfig};
use crate::handlers::{self, AttemptResult, Handler, Job};
use crate::metrics::Metrics;
use crate::store::{Claimed, Finished, Next, Store};

/// Most deliveries claimed in one store round trip per handler.
const CLAIM_BATCH: usize = 64;

struct HandlerRt {
    cfg: Arc<HandlerConfig>,
    run: Arc<dyn Handler>,
    permits: Arc<Semaphore>,
    /// Deliveries this process holds for the handler: claimed and waiting for
    /// a slot, or running (not those whose attempt is being recorded).
    held: Arc<AtomicUsize>,
    /// Of those, the ones running (holding both the handler's and the global
    /// slot). The others wait; up to [`AHEAD`] × `concurrency` of them, so a
    /// slot that frees up starts its next delivery at once instead of after a
    /// claim round trip, whatever the global limit lets run.
    running: Arc<AtomicUsize>,
    lease: Duration,
}

impl HandlerRt {
    /// Deliveries to claim now: up to (1 + [`AHEAD`]) × `concurrency` held
    /// in all, so [`AHEAD`] × `concurrency` wait behind the running ones.
    /// Nothing until at least [`BATCH`] × `concurrency` places are free, so
    /// claims come in batches rather than one per finished delivery: each
    /// claim is a write transaction whose answer waits for a sync of the
    /// log, and the syncs are a good part of what a short delivery costs.
    /// A claim still begins while `concurrency` deliveries wait, so the
    /// slots that free up during its round trip start those at once instead
    /// of sitting idle until it returns. While the global limit is what
    /// holds them back, no more than it could start plus [`AHEAD`] ×
    /// `concurrency` are claimed (so one process does not hoard work that
    /// another `--role process` could run).
    fn room(&self, global_free: usize) -> usize {
        claim_room(self.held.load(Ordering::Relaxed), self.running.load(Ordering::Relaxed), self.cfg.concurrency, global_free)
    }
}

/// Waiting places per handler slot, claimed ahead (README "Leases, crashes
/// and stopping").
const AHEAD: usize = 3;

/// A claim waits until this many places per slot are free (of the
/// [`AHEAD`] + 1 per slot); what stays waiting then covers the claim's own
/// round trip.
const BATCH: usize = 2;

/// The arithmetic of [`HandlerRt::room`], apart so it can be tested: `held`
/// deliveries of a handler with `concurrency` are claimed, `running` of them
/// are running, and the global limit could start `global_free` more.
fn claim_room(held: usize, running: usize, concurrency: usize, global_free: usize) -> usize {
    let waiting = held.saturating_sub(running);
    let most = (1 + AHEAD) * concurrency;
    if held + BATCH * concurrency > most {
        return 0;
    }
    (most - held).min((AHEAD * concurrency + global_free).saturating_sub(waiting)).min(CLAIM_BATCH)
}

/// Counts one in `n` (a held or a running delivery) for as long as it lives,
/// however its task ends.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What this task knows of its lease on one delivery.
struct Lease {
    /// Until when the lease surely holds: measured from an instant taken
    /// before the claim or renewal that set it, so never later than the
    /// store's own expiry.
    until: Instant,
    /// A renewal found the delivery taken over (or released).
    lost: bool,
}

impl Lease {
    /// Whether an attempt may begin: the lease is ours, with at least a third
    /// of it left (the attempt renews it every third).
    fn usable(&self, length: Duration) -> bool {
        !self.lost && Instant::now() + length / 3 < self.until
    }
}

struct State {
    config: Arc<Config>,
    handlers: Vec<Arc<HandlerRt>>,
}

/// Claims due deliveries with a lease and runs them with their handlers,
/// per handler up to its `concurrency` and in all up to
/// `processor.max_concurrency`; records every attempt and the next state.
pub struct Processor {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Identifies this process's leases.
    owner: String,
    client: reqwest::Client,
    state: ArcSwap<State>,
    slot_freed: Notify,
}

impl Processor {
    /// Builds the processor; first clears what handlers of a daemon that died left behind.
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        // Before any attempt runs: what daemons that died left behind goes.
        // Daemons note themselves beside a SQLite file, or on a database
        // server beside the config file (README "Several nodes: PostgreSQL").
        handlers::leftovers::clear_for(&config.storage, &handlers::shell::payload_dirs());
        let client = handlers::http_client();
        let owner = format!("{}-{}", std::process::id(), ulid::Ulid::new());
        let state = ArcSwap::from_pointee(build_state(config, &client, None));
        Arc::new(Processor { store, metrics, owner, client, state, slot_freed: Notify::new() })
    }

    /// Swaps in reloaded handlers; attempts already running finish with the old ones.
    pub fn reload(&self, config: Arc<Config>) {
        let old = self.state.load_full();
        self.state.store(Arc::new(build_state(config, &self.client, Some(&old))));
    }

    /// Runs until `shutdown`; then lets running attempts finish for
    /// `processor.shutdown_grace`, interrupts the rest and gives their
    /// deliveries back so the next start picks them up at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let work = self.store.work_signal();
        let tasks = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let global = Arc::new(Semaphore::new(self.state.load().config.processor.max_concurrency));
        tracing::info!(owner = %self.owner, "processor started");
        loop {
            // Register interest before looking, so a commit between the look
            // and the wait is not missed.
            let notified = work.notified();
            let freed = self.slot_freed.notified();
            tokio::pin!(notified, freed);
            notified.as_mut().enable();
            freed.as_mut().enable();
            self.metrics.processor_round();
            let poll = self.state.load().config.processor.poll_interval;
            let more = match self.dispatch_round(&global, &tasks, &shutdown, &hard_stop).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming deliveries failed; will try again");
                    false
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if more {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = &mut notified => {}
                _ = &mut freed => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        tasks.close();
        let grace = self.state.load().config.processor.shutdown_grace;
        if !tasks.is_empty() {
            tracing::info!(running = tasks.len(), grace = %humantime::format_duration(grace), "waiting for running deliveries");
        }
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(running = tasks.len(), "grace period over; interrupting the remaining deliveries and releasing them");
            hard_stop.cancel();
            tasks.wait().await;
        }
        tracing::info!("processor stopped");
    }

    /// Claims what each handler has room for. Returns whether some handler
    /// filled a whole batch (there may be more due right away).
    async fn dispatch_round(
        self: &Arc<Self>,
        global: &Arc<Semaphore>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<bool, crate::store::StoreError> {
        let state = self.state.load_full();
        let mut more = false;
        for h in &state.handlers {
            let room = h.room(global.available_permits());
            if room == 0 {
                continue;
            }
            let claimed_at = Instant::now();
            // An ordered handler claims through its keys' heads (README
            // "Ordered processing"): at most one delivery per key is held.
            let claimed = match &h.cfg.ordering {
                Some(o) => self.store.claim_ordered(&self.owner, &h.cfg.name, o.on_failure, room, h.lease).await?,
                None => self.store.claim(&self.owner, &h.cfg.name, room, h.lease).await?,
            };
            more |= claimed.len() == room && room == CLAIM_BATCH;
            for c in claimed {
                let held = Counted::new(&h.held);
                let me = self.clone();
                let h = h.clone();
                let global = global.clone();
                let stops = (shutdown.clone(), hard_stop.clone());
                let hidden = state.config.secret_vars.clone();
                let lease = Lease { until: claimed_at + h.lease, lost: false };
                tasks.spawn(async move { me.execute(&h, c, (lease, held), &global, &stops, &hidden).await });
            }
        }
        Ok(more)
    }

    /// Wakes the dispatch loop when a finished attempt's slot lets it claim
    /// something: when `h` has room now, or when other handlers (or a
    /// reload's new ones) may be waiting for the global slot it gave back.
    /// A lone handler whose claimed-ahead queue is still deep has nothing to
    /// claim, and is not woken for every delivery.
    fn slot_given_back(&self, h: &HandlerRt, global: &Semaphore) {
        let state = self.state.load();
        let alone = matches!(state.handlers.as_slice(), [only] if Arc::ptr_eq(&only.held, &h.held));
        if !alone || h.room(global.available_permits()) > 0 {
            self.slot_freed.notify_one();
        }
    }

    /// Renews the lease of a delivery this process holds every lease/3 until
    /// `fut` is done: another processor may take the delivery over only when
    /// this one stopped renewing (it died).
    async fn keeping_lease<F: std::future::Future>(&self, h: &HandlerRt, c: &Claimed, lease: &mut Lease, fut: F) -> F::Output {
        tokio::pin!(fut);
        let renew_every = h.lease / 3;
        loop {
            tokio::select! {
                r = &mut fut => return r,
                _ = tokio::time::sleep(renew_every) => {
                    let asked = Instant::now();
                    match self.store.renew(&self.owner, c.delivery_id, h.lease).await {
                        Ok(true) => lease.until = asked + h.lease,
                        Ok(false) => {
                            lease.lost = true;
                            tracing::warn!(event_id = %c.event_id, handler = %c.handler, "lease lost; another processor took this delivery over");
                        }
                        Err(e) => tracing::warn!(event_id = %c.event_id, error = %e, "could not renew the lease"),
                    }
                }
            }
        }
    }

    /// Waits for a slot (the handler's and the global limit), runs one
    /// attempt and records it. The slot is given back as soon as the handler
    /// returns: recording the result is bookkeeping, and the slot can already
    /// run the next delivery while it commits. A delivery still waiting for a
    /// slot when shutdown begins is released, not run.
    async fn execute(
        &self,
        h: &HandlerRt,
        c: Claimed,
        (mut lease, held): (Lease, Counted),
        global: &Arc<Semaphore>,
        (shutdown, stop): &(CancellationToken, CancellationToken),
        hidden_env: &[String],
    ) {
        let slot = async {
            let hp = h.permits.clone().acquire_owned().await.ok()?;
            let gp = global.clone().acquire_owned().await.ok()?;
            Some((hp, gp))
        };
        let permits = self
            .keeping_lease(h, &c, &mut lease, async {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => None,
                    p = slot => p,
                }
            })
            .await;
        let Some(permits) = permits else {
            if let Err(e) = self.store.release(&self.owner, vec![c.delivery_id]).await {
                tracing::warn!(event_id = %c.event_id, error = %e, "could not release a delivery that had not started; it runs when its lease expires");
            }
            drop(held);
            self.slot_freed.notify_one();
            return;
        };
        if !lease.usable(h.lease) {
            // Renewals failed (or found it taken) while it waited: it may be
            // someone else's by now, so it is neither run nor released here;
            // whoever holds it, or the next claim after the lease, runs it.
            tracing::warn!(event_id = %c.event_id, handler = %c.handler, "not starting a delivery whose lease may have run out while it waited for a slot");
            drop(permits);
            drop(held);
            self.slot_freed.notify_one();
            return;
        }
        let running = Counted::new(&h.running);
        let started = Utc::now();
        let t0 = Instant::now();
        let attempt = async {
            // The mark is queued on its first poll and committed lazily; the
            // attempt never waits for it (a finished attempt drops it, and the
            // write still happens, before the attempt's own record).
            let begun = self.store.started(&self.owner, c.delivery_id);
            let run = h.run.run(Job { delivery: &c, config: &h.cfg, cancel: stop, hidden_env });
            tokio::pin!(begun, run);
            let mut marked = false;
            loop {
                tokio::select! {
                    biased;
                    r = &mut begun, if !marked => {
                        marked = true;
                        if let Err(e) = r {
                            tracing::warn!(event_id = %c.event_id, error = %e, "could not mark the attempt as begun");
                        }
                    }
                    r = &mut run => break r,
                }
            }
        };
        let result: AttemptResult = self.keeping_lease(h, &c, &mut lease, attempt).await;
        let took = t0.elapsed();
        // The slot and the place in the handler's queue are free now; the
        // dispatch loop may claim more while this attempt is recorded.
        drop(running);
        drop(permits);
        drop(held);
        self.slot_given_back(h, global);
        // The delivery waiting for this slot was woken on this thread: let it
        // start its process now, before this attempt's log line and record.
        tokio::task::yield_now().await;
        let (next, give_up) = if result.interrupted {
            // Kept in the paper trail like any attempt; the delivery is due
            // again at once, so the next start runs it first.
            (Next::Released, Some("released for the next start".to_string()))
        } else {
            retry::decide(&h.cfg.retry, &result, c.attempt_in_budget, c.first_queued_at, Utc::now())
        };
        let error = match (result.error, give_up) {
            (Some(e), Some(g)) => Some(format!("{e}; {g}")),
            (e, g) => e.or(g),
        };
        let outcome = retry::recorded_outcome(result.outcome, &next);
        self.metrics.delivery(&c.handler, outcome, took);
        log_attempt(&c, c.attempt, outcome, took, (result.exit_code, result.http_status), error.as_deref(), &next);
        let finished = Finished {
            owner: self.owner.clone(),
            delivery_id: c.delivery_id,
            attempt: c.attempt,
            started_at: started,
            duration_ms: took.as_millis() as u64,
            outcome,
            exit_code: result.exit_code,
            http_status: result.http_status,
            error: error.map(storable),
            output: storable(result.output),
            next,
        };
        // The store may be briefly unavailable; if it stays so, the lease
        // expires and the delivery runs again (at-least-once).
        for wait in [0u64, 1, 2, 4] {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match self.store.finish(finished.clone()).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(event_id = %c.event_id, error = %e, "could not record the attempt; retrying"),
            }
        }
        tracing::error!(event_id = %c.event_id, handler = %c.handler, "could not record the attempt; it will run again when its lease expires");
    }
}

/// A handler's text as every store can keep it: a NUL character (a script
/// may print one) becomes U+FFFD, as bytes that are not UTF-8 already do.
/// PostgreSQL's `text` refuses NUL, and a record it refuses would make the
/// delivery run again after every lease.
fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// The `attempt finished` line, at a level `journalctl -p warning` can find
/// (README, "Logs"): INFO for a success or a release, WARN when the delivery
/// will be retried, ERROR when it ended `failed`, with the reason in `error`.
fn log_attempt(
    c: &Claimed,
    attempt: u32,
    outcome: crate::store::Outcome,
    took: Duration,
    (exit_code, http_status): (Option<i32>, Option<u16>),
    error: Option<&str>,
    next: &Next,
) {
    let next_text = match next {
        Next::Succeeded => "succeeded".to_string(),
        Next::Failed => "failed".to_string(),
        Next::RetryAt(t) => format!("retry at {}", crate::store::rfc3339(*t)),
        Next::Released => "released".to_string(),
    };
    macro_rules! line {
        ($level:expr) => {
            tracing::event!(
                $level,
                event_id = %c.event_id,
                source = %c.source,
                handler = %c.handler,
                attempt,
                outcome = %outcome,
                duration_ms = took.as_millis() as u64,
                exit_code,
                http_status,
                error = error.unwrap_or(""),
                next = %next_text,
                "attempt finished"
            )
        };
    }
    match next {
        Next::Succeeded | Next::Released => line!(tracing::Level::INFO),
        Next::RetryAt(_) => line!(tracing::Level::WARN),
        Next::Failed => line!(tracing::Level::ERROR),
    }
}

fn build_state(config: Arc<Config>, client: &reqwest::Client, old: Option<&State>) -> State {
    let handlers = config
        .handlers
        .values()
        .map(|cfg| {
            // Keep the running permits when the limit did not change, so a
            // reload never lets a handler exceed its concurrency.
            let same = old.and_then(|o| o.handlers.iter().find(|h| h.cfg.name == cfg.name));
            let permits = same
                .filter(|h| h.cfg.concurrency == cfg.concurrency)
                .map(|h| h.permits.clone())
                .unwrap_or_else(|| Arc::new(Semaphore::new(cfg.concurrency)));
            // Deliveries claimed before the reload are still held (and running).
            let held = same.map(|h| h.held.clone()).unwrap_or_default();
            let running = same.map(|h| h.running.clone()).unwrap_or_default();
            // Renewed while an attempt runs (see `execute`), so it need not
            // cover a whole attempt; it bounds how long a crashed processor's
            // work waits before running again.
            let lease = config.processor.lease;
            Arc::new(HandlerRt { cfg: cfg.clone(), run: handlers::build(cfg, client), permits, held, running, lease })
        })
        .collect();
    State { config, handlers }
}

#[cfg(test)]
mod tests {
    use super::{claim_room, CLAIM_BATCH};

    #[test]
    fn an_idle_handler_claims_four_times_its_concurrency() {
        assert_eq!(claim_room(0, 0, 4, 64), 16, "four to run and twelve waiting behind them");
        assert_eq!(claim_room(0, 0, 1, 64), 4);
    }

    #[test]
    fn claims_come_in_batches_once_at_least_twice_concurrency_places_are_free() {
        assert_eq!(claim_room(9, 4, 4, 64), 0, "five waiting: fewer than eight places free, no claim yet");
        assert_eq!(claim_room(8, 4, 4, 64), 8, "eight places free: claimed while four still wait");
        assert_eq!(claim_room(2, 2, 4, 64), 14);
    }

    #[test]
    fn a_claim_begins_while_a_whole_round_of_slots_still_waits() {
        // Every slot busy and one round waiting: the claim for the next two
        // rounds starts now, so slots freeing during its round trip do not sit idle.
        assert_eq!(claim_room(16, 8, 8, 64), 16);
        assert_eq!(claim_room(17, 8, 8, 64), 0);
    }

    #[test]
    fn the_global_limit_caps_what_is_held_beyond_what_could_start() {
        // Nothing can start anywhere: at most AHEAD × concurrency wait, minus those already waiting.
        assert_eq!(claim_room(0, 0, 4, 0), 12);
        assert_eq!(claim_room(3, 0, 4, 0), 9, "three already wait for the global limit");
        assert_eq!(claim_room(8, 0, 4, 0), 4);
        assert_eq!(claim_room(12, 0, 4, 0), 0);
        assert_eq!(claim_room(2, 0, 4, 1), 11, "one could start, plus three times concurrency, minus two waiting");
    }

    #[test]
    fn a_nul_in_handler_text_is_stored_as_the_replacement_character() {
        assert_eq!(super::storable("a\0b\0".into()), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(super::storable("plain".into()), "plain");
    }

    #[test]
    fn one_claim_never_exceeds_the_batch_size() {
        assert_eq!(claim_room(0, 0, 1000, 10_000), CLAIM_BATCH);
        assert_eq!(claim_room(1000, 1000, 1000, 10_000), CLAIM_BATCH);
    }
}
