//! Diagnostic timeline of the durable-ingest pipeline, for the benchmark
//! (BENCHMARKS.md, "ingest6"), not a feature: with `HOOKTRAIL_TIMELINE=FILE`
//! the writer writes one line per batch, the sync loops one per sync and the
//! responder one per answered commit, with times in µs since the store
//! opened, and each urgent write adds its queued → resumed time to a sum
//! written at the end. Unset, every probe is one load of a `OnceLock` and a
//! branch. `bench/timeline.awk` reads the file.
//!
//! Lines (fields separated by spaces):
//! - `B seq first mean recv begin commit_end n0 n holds hold_us`: a batch;
//!   `seq` its commit's number if it waits for a sync (else 0), `first` when its oldest operation was queued, `mean` the mean of its
//!   operations' queued times, `recv` when the writer took it,
//!   `begin` BEGIN, `commit_end` COMMIT returned; `n0` operations taken at
//!   once, `n` in the commit; `holds` waits for a free sync loop and their
//!   total `hold_us`.
//! - `S covers commits take start end done`: a sync of the `commits`
//!   commits up to number `covers`; `take` when the loop took the
//!   commits waiting, `start`/`end` around `fdatasync`, `done` once every
//!   answer was handed to the responder.
//! - `R recv done n`: the responder task got a commit's answers at `recv`
//!   and had woken all `n` callers at `done`.
//! - `W n sum_us`, at the end: urgent writes and the sum of their time from
//!   queued to the caller's task running again.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

pub struct Timeline {
    t0: Instant,
    out: Mutex<BufWriter<File>>,
    waits: AtomicU64,
    wait_us: AtomicU64,
}

static TIMELINE: OnceLock<Option<Timeline>> = OnceLock::new();

/// The timeline, if `HOOKTRAIL_TIMELINE` names a file that could be created.
pub fn get() -> Option<&'static Timeline> {
    TIMELINE
        .get_or_init(|| {
            let path = std::env::var_os("HOOKTRAIL_TIMELINE")?;
            let file = File::create(path).ok()?;
            Some(Timeline {
                t0: Instant::now(),
                out: Mutex::new(BufWriter::new(file)),
                waits: AtomicU64::new(0),
                wait_us: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Now, only when the timeline is on.
pub fn stamp() -> Option<Instant> {
    get().map(|_| Instant::now())
}

impl Timeline {
    /// µs since the store opened.
    pub fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_micros() as u64
    }

    pub fn line(&self, args: std::fmt::Arguments<'_>) {
        let mut out = self.out.lock().expect("timeline lock poisoned");
        let _ = out.write_fmt(args);
        let _ = out.write_all(b"\n");
    }

    /// An urgent write's caller runs again, `queued` being when it was submitted.
    pub fn resumed(&self, queued: Instant) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_us.fetch_add(queued.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Writes the sums and flushes (the writer, on its way out).
    pub fn finish(&self) {
        let (n, us) = (self.waits.load(Ordering::Relaxed), self.wait_us.load(Ordering::Relaxed));
        self.line(format_args!("W {n} {us}"));
        let _ = self.out.lock().expect("timeline lock poisoned").flush();
    }
}

/// This thread's time spent waiting on a run queue so far, in µs
/// (`/proc/thread-self/schedstat`, second field).
pub fn runq_us() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |ns| ns / 1000)
}
