//! In-process counters and histograms, rendered as Prometheus text. A leaf:
//! ingest and process count here without importing `ops`, and every label is
//! a typed value ([`Received`], [`RejectReason`], [`Outcome`]) or a configured
//! name, so no label can be misspelt at a call site.
//!
//! Counters are keyed by small label sets and guarded by one mutex each; the
//! hot path takes a lock for a hash-map increment, which is far below the cost
//! of the commit it accompanies.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::store::{Outcome, RejectReason};

/// Upper bounds (seconds) of histogram buckets.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// What a request answered 200 became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Stored as a new event.
    Accepted,
    /// A repeat within the source's dedup window; nothing new stored.
    Duplicate,
}

impl Received {
    fn as_str(self) -> &'static str {
        match self {
            Received::Accepted => "accepted",
            Received::Duplicate => "duplicate",
        }
    }
}

/// A latency histogram over [`BUCKETS`]: one count per bucket plus `+Inf`.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one observation in its bucket.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

type Labels = (String, String);

/// A gauge family: name, help text, and (rendered labels, value) samples.
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub values: Vec<(String, f64)>,
}

/// Every in-process counter and histogram of the daemon; `/metrics` renders
/// them with the gauges read from the store.
#[derive(Default)]
pub struct Metrics {
    received: Mutex<BTreeMap<Labels, u64>>,
    rejected: Mutex<BTreeMap<Labels, u64>>,
    deliveries: Mutex<BTreeMap<Labels, u64>>,
    commit: Histogram,
    delivery_duration: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    /// Unix milliseconds of the processor loop's last round; 0 = never.
    processor_round_ms: AtomicU64,
}

fn bump(m: &Mutex<BTreeMap<Labels, u64>>, a: &str, b: &str) {
    let mut g = m.lock().expect("metrics lock poisoned");
    match g.get_mut(&(a.to_string(), b.to_string())) {
        Some(n) => *n += 1,
        None => {
            g.insert((a.to_string(), b.to_string()), 1);
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One rendered label, `name="value"`, for a [`Gauge`] sample.
pub fn label(name: &str, value: &str) -> String {
    format!("{name}=\"{}\"", esc(value))
}

/// Escapes a label value for the Prometheus text format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// A request to `source` answered 200.
    pub fn received(&self, source: &str, outcome: Received) {
        bump(&self.received, source, outcome.as_str());
    }
    /// A refused request; `source` is `None` when no source was known (an
    /// unknown path, a head that did not parse), rendered as `source=""`.
    pub fn rejected(&self, source: Option<&str>, reason: RejectReason) {
        bump(&self.rejected, source.unwrap_or(""), reason.as_str());
    }
    /// One finished attempt of `handler`.
    pub fn delivery(&self, handler: &str, outcome: Outcome, took: Duration) {
        bump(&self.deliveries, handler, outcome.as_str());
        let h = self.delivery_duration.lock().expect("metrics lock poisoned").entry(handler.to_string()).or_default().clone();
        h.observe(took);
    }
    /// How long one event waited for its durable commit.
    pub fn commit_latency(&self, d: Duration) {
        self.commit.observe(d);
    }

    /// Called by the processor loop once per round (before it claims work), so
    /// readiness and the systemd watchdog can tell a live loop from a stuck one.
    pub fn processor_round(&self) {
        self.processor_round_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Time since the processor loop's last round; `None` before the first.
    pub fn since_processor_round(&self) -> Option<Duration> {
        match self.processor_round_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(unix_ms().saturating_sub(ms))),
        }
    }

    /// Prometheus text exposition, with gauges read from the store by the caller.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, l1: &str, l2: &str, m: &Mutex<BTreeMap<Labels, u64>>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((a, b), n) in m.lock().expect("metrics lock poisoned").iter() {
                let _ = writeln!(out, "{name}{{{l1}=\"{}\",{l2}=\"{}\"}} {n}", esc(a), esc(b));
            }
        };
        counter(
            &mut out,
            "hooktrail_events_received_total",
            "Requests answered 200, by source and outcome (accepted, duplicate).",
            "source",
            "outcome",
            &self.received,
        );
        counter(
            &mut out,
            "hooktrail_requests_rejected_total",
            "Requests refused, by source and reason.",
            "source",
            "reason",
            &self.rejected,
        );
        counter(
            &mut out,
            "hooktrail_delivery_attempts_total",
            "Delivery attempts, by handler and outcome.",
            "handler",
            "outcome",
            &self.deliveries,
        );
        let _ = writeln!(out, "# HELP hooktrail_commit_seconds Time from handing an event to the store to its durable commit.\n# TYPE hooktrail_commit_seconds histogram");
        self.commit.render(&mut out, "hooktrail_commit_seconds", "");
        let _ = writeln!(
            out,
            "# HELP hooktrail_delivery_seconds Duration of delivery attempts, by handler.\n# TYPE hooktrail_delivery_seconds histogram"
        );
        for (h, hist) in self.delivery_duration.lock().expect("metrics lock poisoned").iter() {
            hist.render(&mut out, "hooktrail_delivery_seconds", &format!("handler=\"{}\"", esc(h)));
        }
        for Gauge { name, help, values } in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in values {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}
