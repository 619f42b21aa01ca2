//! Handler kinds: one file each. A handler runs one attempt of one delivery
//! and says what happened; it never decides about retries (that is
//! `process::retry`) and never touches the store.
//!
//! Shared here so no handler repeats it: the envelope, output capture capped
//! at 64 KiB, HTTP status classification and `Retry-After` parsing.

pub mod crm;
pub mod http;
pub mod leftovers;
pub mod shell;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{HandlerConfig, HandlerKind};
use crate::store::{rfc3339, Claimed, Outcome};

/// Stored output is capped at this many bytes (README, "Shell handler").
pub const OUTPUT_CAP: usize = 64 * 1024;

/// What one attempt concluded. `error` says what `exit_code` and
/// `http_status` do not (a timeout, a transport error, why not retried), so
/// no error text restates them.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub output: String,
    /// The peer asked for this delay before the next attempt (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The daemon is stopping and cut the attempt short: give the delivery back
    /// instead of recording a result.
    pub interrupted: bool,
}

impl AttemptResult {
    /// A result with this outcome and nothing else recorded yet.
    pub fn new(outcome: Outcome) -> Self {
        AttemptResult {
            outcome,
            exit_code: None,
            http_status: None,
            error: None,
            output: String::new(),
            retry_after: None,
            interrupted: false,
        }
    }
    /// A failure worth trying again (timeouts, 5xx, a missing script that a deploy may install).
    pub fn retry(error: impl Into<String>) -> Self {
        AttemptResult { error: Some(error.into()), ..Self::new(Outcome::Retry) }
    }
    /// A failure that retrying cannot fix (a permanent exit code, a 4xx).
    pub fn failure(error: impl Into<String>) -> Self {
        AttemptResult { error: Some(error.into()), ..Self::new(Outcome::Failure) }
    }
    /// Cut short by shutdown: released for the next start, not counted as a failure.
    pub fn interrupted() -> Self {
        AttemptResult { interrupted: true, ..Self::retry("interrupted by shutdown") }
    }
}

/// One attempt's inputs.
pub struct Job<'a> {
    pub delivery: &'a Claimed,
    pub config: &'a HandlerConfig,
    /// Cancelled when the shutdown grace period is over.
    pub cancel: &'a CancellationToken,
    /// Environment variables holding the daemon's secrets: never passed to child processes.
    pub hidden_env: &'a [String],
}

/// One handler kind (shell, http, crm_upsert). `run` performs one attempt and
/// reports its outcome; it never panics on bad input and never outlives
/// `job.cancel` by more than it takes to kill what it started.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn run(&self, job: Job<'_>) -> AttemptResult;
}

/// Builds the runnable handler for a configured one.
pub fn build(cfg: &HandlerConfig, client: &reqwest::Client) -> Arc<dyn Handler> {
    match &cfg.kind {
        HandlerKind::Shell(_) => Arc::new(shell::Shell),
        HandlerKind::Http(spec) => Arc::new(http::Forward::new(client.clone(), spec)),
        HandlerKind::Crm(spec) => Arc::new(crm::Upsert::new(client.clone(), spec)),
    }
}

/// The HTTP client every outbound handler shares: rustls, no redirects.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("hooktrail/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .expect("a client with rustls and no custom roots always builds")
}

/// `{"id","source","received_at","content_type","headers","query","payload"}`.
pub fn envelope(d: &Claimed) -> Value {
    serde_json::json!({
        "id": d.event_id.to_string(),
        "source": d.source,
        "received_at": rfc3339(d.received_at),
        "content_type": d.content_type,
        "headers": d.headers,
        "query": d.query,
        "payload": d.payload,
    })
}

/// Collects output up to [`OUTPUT_CAP`] bytes, counting what it had to drop.
#[derive(Debug, Default)]
pub struct OutputBuf {
    bytes: Vec<u8>,
    dropped: usize,
}

impl OutputBuf {
    /// Appends what fits under the cap and counts the rest as dropped.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = OUTPUT_CAP.saturating_sub(self.bytes.len());
        let take = room.min(chunk.len());
        self.bytes.extend_from_slice(&chunk[..take]);
        self.dropped += chunk.len() - take;
    }
    /// Whether the cap is reached (readers may stop reading into it).
    pub fn is_full(&self) -> bool {
        self.bytes.len() >= OUTPUT_CAP
    }
    /// Appends one line of the handler's own report (e.g. a CRM record's result).
    pub fn push_line(&mut self, line: &str) {
        self.push(line.as_bytes());
        self.push(b"\n");
    }
    /// The captured text (lossy UTF-8), with a note when output was cut.
    pub fn finish(self) -> String {
        let mut s = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!("\n[… {} more bytes not kept]", self.dropped));
        }
        s
    }
}

/// README, "HTTP forward handler": 2xx success; 408, 429, 5xx retry; anything else fails for good
/// (including 3xx: redirects are not followed).
pub fn classify_status(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Success,
        408 | 429 | 500..=599 => Outcome::Retry,
        _ => Outcome::Failure,
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let d = t.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(d.to_std().unwrap_or(Duration::ZERO))
}

/// Runs an outbound request and turns the answer into an attempt result:
/// status classification, `Retry-After`, body captured up to the cap.
pub async fn send(req: reqwest::RequestBuilder, cancel: &CancellationToken) -> AttemptResult {
    let resp = tokio::select! {
        _ = cancel.cancelled() => return AttemptResult::interrupted(),
        r = req.send() => r,
    };
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            // The URL is the handler's own (and may carry a key): not repeated in the error.
            let e = e.without_url();
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            return AttemptResult::retry(format!("{what}: {}", error_chain(&e)));
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let mut out = OutputBuf::default();
    let mut read_error = None;
    loop {
        let chunk = tokio::select! {
            _ = cancel.cancelled() => return AttemptResult::interrupted(),
            c = resp.chunk() => c,
        };
        match chunk {
            Ok(Some(c)) => {
                out.push(&c);
                if out.is_full() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                read_error = Some(format!("reading the response body: {}", error_chain(&e)));
                break;
            }
        }
    }
    let outcome = classify_status(status);
    // The status is recorded in `http_status`; `error` holds only what it
    // does not say, so no view shows "HTTP 503 HTTP 503".
    let error = read_error.filter(|_| outcome != Outcome::Success);
    AttemptResult { outcome, http_status: Some(status), error, output: out.finish(), retry_after, ..AttemptResult::new(outcome) }
}

/// An error with its sources, so "connection refused" is not hidden behind
/// "error sending request".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_per_spec() {
        assert_eq!(classify_status(204), Outcome::Success);
        assert_eq!(classify_status(408), Outcome::Retry);
        assert_eq!(classify_status(429), Outcome::Retry);
        assert_eq!(classify_status(503), Outcome::Retry);
        assert_eq!(classify_status(400), Outcome::Failure);
        assert_eq!(classify_status(301), Outcome::Failure);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn output_is_capped() {
        let mut o = OutputBuf::default();
        o.push(&vec![b'a'; OUTPUT_CAP + 10]);
        let s = o.finish();
        assert!(s.starts_with("aaa"));
        assert!(s.ends_with("[… 10 more bytes not kept]"));
    }
}
