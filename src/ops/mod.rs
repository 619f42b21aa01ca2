//! Operations: everything ops look at or lean on while hooktrail runs for
//! years — the admin listener ([`admin`]: health, readiness, Prometheus
//! metrics, the JSON admin API and the event-log page), background retention
//! ([`retention`]) and the systemd watchdog ([`watchdog`]).
//!
//! `ops` reads the store and the in-process [`Metrics`]; the only
//! writes it makes are the ones the CLI can make too (replay, prune, the
//! readiness ping). It never sits on the public listener: the admin listener
//! is its own socket, loopback by default, and token-protected otherwise.

pub mod admin;
mod api;
mod page;
mod respond;
pub mod retention;
mod session;
pub mod watchdog;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::Utc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{HourCounts, QueueDepth, Role, Store, StoreError};

/// How long a readiness ping may wait for the writer before storage counts as down.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the page's hourly chart is reused before the store is asked again.
const CHART_TTL: Duration = Duration::from_secs(30);
/// How long `/metrics` waits for fresh queue figures before serving the last ones.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// The last queue-depth figures. One background read at a time refreshes
/// them, so `/metrics` never waits on storage longer than [`QUEUE_WAIT`]:
/// on a frozen filesystem a read can hang for as long as the freeze lasts,
/// and a scrape that hangs with it hides the very outage it should show.
#[derive(Default)]
struct QueueCache {
    latest: Mutex<Option<(Instant, Arc<Vec<QueueDepth>>)>>,
    refreshing: AtomicBool,
    refreshed: tokio::sync::Notify,
}

/// State shared by the admin listener and the ops background tasks.
pub struct Ops {
    config: ArcSwap<Config>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Which parts of the daemon this process runs; readiness checks only those.
    role: Role,
    /// Set once the public listener is bound (readiness).
    listener_bound: AtomicBool,
    chart: Mutex<Option<(Instant, Arc<Vec<HourCounts>>)>>,
    queue: Arc<QueueCache>,
    fail_gate: crate::fail_gate::FailGate,
    sessions: session::Sessions,
}

/// The outcome of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok,
    /// This process does not run that part (`--role`).
    NotRun,
    Failed(String),
}

impl Check {
    fn passed(&self) -> bool {
        !matches!(self, Check::Failed(_))
    }

    fn describe(&self) -> String {
        match self {
            Check::Ok => "ok".into(),
            Check::NotRun => "not run by this process".into(),
            Check::Failed(why) => why.clone(),
        }
    }
}

/// `/readyz` and the watchdog: storage writable, listener bound, processor alive.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub storage: Check,
    pub listener: Check,
    pub processor: Check,
}

impl Readiness {
    /// Ready when every part this process runs passed.
    pub fn ready(&self) -> bool {
        self.storage.passed() && self.listener.passed() && self.processor.passed()
    }
}

impl Ops {
    /// The admin side's shared state for a process running `role`.
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, metrics: Arc<Metrics>, role: Role) -> Arc<Self> {
        Arc::new(Ops {
            config: ArcSwap::new(config),
            store,
            metrics,
            role,
            listener_bound: AtomicBool::new(false),
            chart: Mutex::new(None),
            queue: Arc::default(),
            fail_gate: admin::admin_fail_gate(),
            sessions: session::Sessions::new(),
        })
    }

    fn fail_gate(&self) -> &crate::fail_gate::FailGate {
        &self.fail_gate
    }

    fn sessions(&self) -> &session::Sessions {
        &self.sessions
    }

    /// Takes a reloaded config: the admin token, retention and the handler
    /// list for metrics follow it; the admin listen address needs a restart.
    pub fn reload(&self, config: Arc<Config>) {
        if config.admin.listen != self.config.load().admin.listen {
            tracing::warn!("admin.listen changed; the admin listener moves only on restart");
        }
        self.config.store(config);
    }

    /// Records that the public listener is bound and accepting.
    pub fn set_listener_bound(&self) {
        self.listener_bound.store(true, Ordering::Relaxed);
    }

    fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Runs every readiness check; the storage check is a real write through
    /// the writer thread, bounded by [`PING_TIMEOUT`].
    pub async fn readiness(&self) -> Readiness {
        let storage = match tokio::time::timeout(PING_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => Check::Ok,
            Ok(Err(e)) => Check::Failed(e.to_string()),
            Err(_) => Check::Failed(format!("storage did not commit a ping within {}s", PING_TIMEOUT.as_secs())),
        };
        Readiness { storage, listener: self.listener_check(), processor: self.processor_check() }
    }

    /// Whether the processor loop went round recently. It goes round at least
    /// every `processor.poll_interval`, so silence well past that means it is
    /// stuck (for instance on a store that no longer answers).
    fn processor_check(&self) -> Check {
        if !self.role.processes() {
            return Check::NotRun;
        }
        let poll = self.config().processor.poll_interval;
        let stale_after = poll * 3 + Duration::from_secs(15);
        match self.metrics.since_processor_round() {
            None => Check::Failed("processor has not started".into()),
            Some(d) if d > stale_after => Check::Failed(format!("processor loop silent for {}s", d.as_secs())),
            Some(_) => Check::Ok,
        }
    }

    fn listener_check(&self) -> Check {
        if !self.role.ingests() {
            Check::NotRun
        } else if self.listener_bound.load(Ordering::Relaxed) {
            Check::Ok
        } else {
            Check::Failed("public listener not bound yet".into())
        }
    }

    /// Events per hour over the last 24 hours, cached for [`CHART_TTL`] so a
    /// page reload does not rescan a day of events.
    async fn hourly_chart(&self) -> Result<Arc<Vec<HourCounts>>, StoreError> {
        if let Some((at, rows)) = self.chart.lock().expect("chart cache lock poisoned").as_ref() {
            if at.elapsed() < CHART_TTL {
                return Ok(rows.clone());
            }
        }
        let since = Utc::now() - chrono::Duration::hours(23);
        let since = since - chrono::Duration::seconds(since.timestamp().rem_euclid(3600));
        let rows = Arc::new(self.store.hourly(since).await?);
        *self.chart.lock().expect("chart cache lock poisoned") = Some((Instant::now(), rows.clone()));
        Ok(rows)
    }

    /// Queue figures for `/metrics` and how old they are: fresh when the
    /// store answers within [`QUEUE_WAIT`], else the last ones read (`None`
    /// before any). Never waits longer, and never starts a second read while
    /// one is still out.
    async fn queue_depth(&self) -> Option<(Duration, Arc<Vec<QueueDepth>>)> {
        let cache = self.queue.clone();
        let refreshed = cache.refreshed.notified();
        tokio::pin!(refreshed);
        refreshed.as_mut().enable();
        if !cache.refreshing.swap(true, Ordering::AcqRel) {
            let store = self.store.clone();
            let c = cache.clone();
            // Not tracked for shutdown: a read, it has nothing to lose.
            tokio::spawn(async move {
                match store.queue_depth().await {
                    Ok(q) => *c.latest.lock().expect("queue cache lock poisoned") = Some((Instant::now(), Arc::new(q))),
                    Err(e) => tracing::warn!(error = %e, "reading the queue depth for metrics failed; serving the last figures"),
                }
                c.refreshing.store(false, Ordering::Release);
                c.refreshed.notify_waiters();
            });
        }
        let _ = tokio::time::timeout(QUEUE_WAIT, refreshed).await;
        let latest = cache.latest.lock().expect("queue cache lock poisoned");
        latest.as_ref().map(|(at, q)| (at.elapsed(), q.clone()))
    }

    /// Forgets the cached chart (after a replay the counts move).
    fn invalidate_chart(&self) {
        self.chart.lock().expect("chart cache lock poisoned").take();
    }
}
