//! The HTTP forward handler: sends the event on to another service, optionally
//! signed with Standard Webhooks, at most `rate_limit` requests per second.

use async_trait::async_trait;
use base64::Engine as _;
use governor::DefaultDirectRateLimiter;

use super::{envelope, send, AttemptResult, Handler, Job};
use crate::config::{BodyMode, HandlerKind, HttpSpec, RateLimit};
use crate::crypto::Secret;
use crate::crypto::{hmac_sha256, standard_webhooks_key};

/// The `http` handler: forwards the event to one URL, optionally signed.
pub struct Forward {
    client: reqwest::Client,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// An outbound limiter for a handler's `rate_limit`.
pub fn limiter(r: &Option<RateLimit>) -> Option<DefaultDirectRateLimiter> {
    r.as_ref().map(|r| governor::RateLimiter::direct(r.quota()))
}

impl Forward {
    /// Builds the handler from its validated config, sharing the daemon's HTTP client.
    pub fn new(client: reqwest::Client, spec: &HttpSpec) -> Self {
        Forward { client, limiter: limiter(&spec.rate_limit) }
    }
}

/// `webhook-id`, `webhook-timestamp`, `webhook-signature` per Standard Webhooks,
/// one `v1,` signature per secret so receivers can rotate.
pub fn standard_webhooks_headers(msg_id: &str, body: &[u8], secrets: &[Secret]) -> Vec<(&'static str, String)> {
    let ts = chrono::Utc::now().timestamp().to_string();
    let prefix = format!("{msg_id}.{ts}.");
    let sigs: Vec<String> = secrets
        .iter()
        .filter_map(standard_webhooks_key)
        .map(|k| format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(hmac_sha256(&k, &[prefix.as_bytes(), body]))))
        .collect();
    vec![("webhook-id", msg_id.to_string()), ("webhook-timestamp", ts), ("webhook-signature", sigs.join(" "))]
}

#[async_trait]
impl Handler for Forward {
    async fn run(&self, job: Job<'_>) -> AttemptResult {
        let HandlerKind::Http(spec) = &job.config.kind else { unreachable!("built only for http handlers") };
        let d = job.delivery;
        if let Some(l) = &self.limiter {
            tokio::select! {
                _ = job.cancel.cancelled() => return AttemptResult::interrupted(),
                _ = l.until_ready() => {}
            }
        }
        let (body, content_type): (Vec<u8>, String) = match spec.body {
            BodyMode::Raw => (d.body.to_vec(), d.content_type.clone()),
            BodyMode::Json => (d.payload.to_string().into_bytes(), "application/json".into()),
            BodyMode::Envelope => (envelope(d).to_string().into_bytes(), "application/json".into()),
        };
        let method = reqwest::Method::from_bytes(spec.method.as_bytes()).expect("validated at load");
        let mut req = self
            .client
            .request(method, &spec.url)
            .timeout(job.config.timeout)
            .header("x-hooktrail-event-id", d.event_id.to_string())
            .header("x-hooktrail-source", &d.source)
            .header("x-hooktrail-attempt", d.attempt.to_string());
        if !content_type.is_empty() {
            req = req.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        for (k, v) in &spec.headers {
            req = req.header(k.as_str(), v.expose());
        }
        if !spec.sign_secrets.is_empty() {
            // The event id is stable across retries, so receivers can dedup on it.
            for (k, v) in standard_webhooks_headers(&d.event_id.to_string(), &body, &spec.sign_secrets) {
                req = req.header(k, v);
            }
        }
        send(req.body(body), job.cancel).await
    }
}
