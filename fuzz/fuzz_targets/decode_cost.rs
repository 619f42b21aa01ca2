//! Decode cost: no body up to `max_body_bytes` may cost more than a few
//! milliseconds of CPU per 100 KB, whatever it holds.
//!
//! A short fuzz input is blown up into a body as large as the listener takes
//! (1 MiB, the default `max_body_bytes`; 64 KiB for a query string, the
//! request head's limit). The input is a kind byte, then a head, a unit and a
//! tail separated by `0xFF` bytes (never part of UTF-8 text): the body is the
//! head, the unit repeated for as long as it fits, and the tail. `{n}` in the
//! unit becomes the repeat's index, so repeated names can be distinct (80,000
//! distinct attributes on one element was the quadratic case found by hand).
//! The body goes through the decoder the listener would use, and the
//! thread's CPU time for it, per 100 KB (bodies under 100 KB count as
//! 100 KB), must stay under the budget.
//!
//! The budget is `DECODE_COST_BUDGET_MS` per 100 KB, default 20: a release
//! build decodes the worst bodies known at under 5 ms per 100 KB
//! (BENCHMARKS.md "Decode cost"), and the fuzz build's instrumentation costs
//! more (run it with `-s none`: AddressSanitizer alone doubles the cost). A
//! quadratic path costs seconds. `fuzz/seeds/decode_cost/` holds the worst
//! bodies known as inputs, and `decode_cost.dict` the formats' tokens:
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none decode_cost corpus/decode_cost seeds/decode_cost -- -dict=decode_cost.dict -max_len=512 -max_total_time=60`
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use hooktrail::ingest::decode;
use libfuzzer_sys::fuzz_target;

const MAX_BODY: usize = 1 << 20;
const MAX_QUERY: usize = 64 << 10;

#[derive(Debug, Clone, Copy)]
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

const KINDS: [Kind; 6] = [Kind::Json, Kind::JsonValidate, Kind::Form, Kind::Query, Kind::Multipart, Kind::Xml];

/// `kind byte, head 0xFF unit 0xFF tail`; missing parts are empty.
struct Input<'a> {
    kind: Kind,
    head: &'a str,
    unit: &'a str,
    tail: &'a str,
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (&kind, rest) = data.split_first()?;
        let mut parts = rest.splitn(3, |&b| b == 0xFF).map(std::str::from_utf8);
        let mut next = || parts.next().unwrap_or(Ok("")).ok();
        Some(Input { kind: KINDS[usize::from(kind) % KINDS.len()], head: next()?, unit: next()?, tail: next()? })
    }
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
    let room = max.saturating_sub(input.head.len() + input.tail.len());
    if input.unit.contains("{n}") {
        for n in 0.. {
            let unit = input.unit.replace("{n}", &n.to_string());
            if s.len() + unit.len() > input.head.len() + room {
                break;
            }
            s.push_str(&unit);
        }
    } else if !input.unit.is_empty() {
        s.push_str(&input.unit.repeat(room / input.unit.len()));
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

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else { return };
    let max = if matches!(input.kind, Kind::Query) { MAX_QUERY } else { MAX_BODY };
    let body = bytes::Bytes::from(body(&input, max));
    let allowed = budget().mul_f64(body.len().max(100_000) as f64 / 100_000.0);
    // The best of three, so one descheduling or page-fault storm is not a
    // finding; far over the budget is one at once.
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = thread_cpu();
        decode(input.kind, &body);
        best = best.min(thread_cpu() - start);
        if best <= allowed || best > allowed * 3 {
            break;
        }
    }
    if best <= allowed {
        return;
    }
    panic!(
        "{:?} decode of a {}-byte body took {best:?} of CPU, over {allowed:?} ({:?} per 100 KB); head {:?}, unit {:?}, tail {:?}",
        input.kind,
        body.len(),
        budget(),
        input.head,
        input.unit,
        input.tail
    );
});
