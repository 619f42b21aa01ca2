//! Decode cost: no body up to `max_body_bytes` may cost more than a few
//! milliseconds of CPU per 100 KB, whatever it holds.
//!
//! A short fuzz input is blown up into a body as large as the listener takes
//! (1 MiB, the default `max_body_bytes`; 64 KiB for a query string, the
//! request head's limit): a head, then a unit repeated, then a tail. `{n}` in
//! the unit becomes the repeat's index, so repeated names can be distinct
//! (80,000 distinct attributes on one element was the quadratic case found
//! by hand). The body goes through the decoder the listener would use, and
//! the thread's CPU time for it, per 100 KB (bodies under 100 KB count as
//! 100 KB), must stay under the budget.
//!
//! The budget is `DECODE_COST_BUDGET_MS` per 100 KB, default 20: a release
//! build decodes the worst bodies known at under 2 ms per 100 KB
//! (BENCHMARKS.md "Decode cost"), and the fuzz build's coverage
//! instrumentation (and sanitizer, unless `-s none`) costs several times that.
//! A quadratic path costs seconds. Run it with:
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none decode_cost -- -max_total_time=60`
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use hooktrail::ingest::decode;
use libfuzzer_sys::fuzz_target;

const MAX_BODY: usize = 1 << 20;
const MAX_QUERY: usize = 64 << 10;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    /// `decode::json`: the value is built (a source with dedup, routes or a template).
    Json,
    /// `decode::json_validate`: checked, not built.
    JsonValidate,
    Form,
    Query,
    /// Boundary `B`.
    Multipart,
    Xml,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    kind: Kind,
    head: &'a str,
    unit: &'a str,
    tail: &'a str,
    /// Repeats of `unit`, capped by the body limit.
    repeats: u32,
}

fn budget() -> Duration {
    static BUDGET: OnceLock<Duration> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let ms = std::env::var("DECODE_COST_BUDGET_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(20.0);
        Duration::from_secs_f64(ms / 1000.0)
    })
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn body(input: &Input<'_>, max: usize) -> String {
    let mut s = String::with_capacity(max);
    s.push_str(input.head);
    for n in 0..input.repeats {
        let unit = input.unit.replace("{n}", &n.to_string());
        if unit.is_empty() || s.len() + unit.len() + input.tail.len() > max {
            break;
        }
        s.push_str(&unit);
    }
    s.push_str(input.tail);
    // Head and tail alone may be over the limit: cut at a character boundary.
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn decode(kind: Kind, body: &bytes::Bytes) {
    let _ = match kind {
        Kind::Json => decode::json(body).map(drop),
        Kind::JsonValidate => decode::json_validate(body),
        Kind::Form => decode::form(body).map(drop),
        Kind::Query => decode::query(std::str::from_utf8(body).expect("built from &str"), Some("token")).map(drop),
        Kind::Multipart => decode::multipart(body.clone(), "B").map(drop),
        Kind::Xml => decode::xml(body).map(drop),
    };
}

fuzz_target!(|input: Input| {
    let max = if matches!(input.kind, Kind::Query) { MAX_QUERY } else { MAX_BODY };
    let body = bytes::Bytes::from(body(&input, max));
    let allowed = budget().mul_f64(body.len().max(100_000) as f64 / 100_000.0);
    // The best of three, so one descheduling or page-fault storm is not a finding.
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = thread_cpu();
        decode(input.kind, &body);
        best = best.min(thread_cpu() - start);
        if best <= allowed {
            return;
        }
    }
    panic!(
        "{:?} decode of a {}-byte body took {best:?} of CPU, over {allowed:?} ({:?} per 100 KB); head {:?}, unit {:?} × {}, tail {:?}",
        input.kind,
        body.len(),
        budget(),
        input.head,
        input.unit,
        input.repeats,
        input.tail
    );
});
