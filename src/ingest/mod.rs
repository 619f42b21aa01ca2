//! The public listener: routing by path, the checks every request passes
//! (method, address, rate, backlog, auth, type, size, body), decoding, and the
//! durable insert. Owns the answer a sender gets; never answers 2xx before
//! [`Store::insert_event`] returned, which happens only after COMMIT.
//!
//! Checks run cheapest and most-refusing first, and everything that can be
//! decided from the head is decided before a byte of body is read.

pub mod auth;
pub mod decode;
pub mod routing;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use ipnet::IpNet;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthSpec, Config, DedupKey, ResponseSpec, SourceConfig};
use crate::fail_gate::FailGate;
use crate::metrics::{Metrics, Received};
use crate::store::{rules, NewEvent, Payload, RejectReason, Store, StoreError};
use crate::template::{render_values, Escape};
use decode::BodyKind;

/// A refused request: status, counted reason, message for the JSON body.
#[derive(Debug)]
pub struct Reject {
    pub status: StatusCode,
    pub reason: RejectReason,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl Reject {
    fn new(status: StatusCode, reason: RejectReason, message: impl Into<String>) -> Self {
        Reject { status, reason, message: message.into(), retry_after: None }
    }
    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut r = error_response(self.status, &self.message);
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, POST, PUT"));
        }
        r
    }
}

/// `Retry-After` (seconds) for a store fault that passes by itself (a full
/// write queue, a slow commit, a restart).
const RETRY_SOON: u64 = 5;
/// `Retry-After` for one that needs an operator (a full disk, a lost or
/// damaged database): asking every few seconds would only add load.
const RETRY_LATER: u64 = 60;

impl Reject {
    /// The 503 for a store that cannot take an event. The sender learns what
    /// kind of fault it is, never a file path or a database's own message.
    fn storage(e: &StoreError) -> Self {
        let (msg, retry) = match e {
            StoreError::Overloaded => ("overloaded: the write queue is full, retry shortly".to_string(), RETRY_SOON),
            StoreError::ShuttingDown => ("shutting down, retry shortly".to_string(), RETRY_SOON),
            StoreError::NearlyFull { free, min_free } => (
                format!("storage nearly full: {free} bytes free on the database volume, below storage.min_free_bytes ({min_free})"),
                RETRY_LATER,
            ),
            StoreError::Lost(_) => (
                "storage unavailable: the database file was deleted or replaced while hooktrail runs; retry later".to_string(),
                RETRY_LATER,
            ),
            StoreError::Damaged { .. } => ("storage unavailable: the database is damaged; retry later".to_string(), RETRY_LATER),
            StoreError::CommitTimeout(t) => {
                (format!("storage unavailable: the commit did not finish within {t}; retry shortly"), RETRY_SOON)
            }
            StoreError::Unavailable(_)
            | StoreError::Corrupt(_)
            | StoreError::Conflict(_)
            | StoreError::Backend(_)
            | StoreError::Open { .. }
            | StoreError::NotBuilt(_) => ("storage unavailable, retry shortly".to_string(), RETRY_SOON),
        };
        Reject::new(StatusCode::SERVICE_UNAVAILABLE, RejectReason::Unavailable, msg).retry_after(retry)
    }
}

impl From<StoreError> for Reject {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "store refused an event");
        Reject::storage(&e)
    }
}

/// A refusal as every sender gets it: the status and `{"error": message}`.
pub fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    json_response(status, body)
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// One source with its runtime state (rate limiters).
pub struct SourceRt {
    pub cfg: Arc<SourceConfig>,
    /// The source's `rate_limit`: charged only by requests that authenticated,
    /// so nobody without the secret can use up the real sender's share.
    limiter: Option<DefaultDirectRateLimiter>,
    ip_limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Failed authentications per address (sources with auth only): an
    /// address that keeps failing is refused before its credentials are
    /// checked again, which bounds what a guesser can spend (an HMAC over a
    /// 1 MiB body each) without touching any other address's requests.
    auth_failures: Option<FailGate>,
    /// Routes of this source: (handler, conditions).
    routes: Vec<crate::config::RouteConfig>,
    /// The `ordering.key` pointer of each ordered handler a route of this
    /// source names: the key is computed once, at receipt, and stored
    /// with the delivery (README "Ordered processing").
    order_keys: HashMap<String, String>,
    /// Lower-case header names whose values are redacted before storing.
    secret_headers: Vec<String>,
    /// Whether anything reads the normalized view of a JSON body at receive
    /// time (dedup pointer, route conditions, response template). When not,
    /// JSON is validated without building it: a third less CPU per request.
    needs_view: bool,
}

/// Failed authentications an address may make in a burst, and how often one
/// more is checked after that: a sender misconfigured for a while keeps
/// getting its 401s (one per 3 s once past the burst), a guesser gets one
/// check per 3 s.
const AUTH_FAILURE_BURST: NonZeroU32 = match NonZeroU32::new(20) {
    Some(n) => n,
    None => unreachable!(),
};
const AUTH_FAILURE_PERIOD: Duration = Duration::from_secs(3);

impl SourceRt {
    /// The 401 for a failed authentication, counted against the address.
    fn auth_failed(&self, remote: IpAddr, e: auth::AuthError) -> Reject {
        if let Some(wait) = self.auth_failures.as_ref().and_then(|g| g.failed(remote)) {
            tracing::warn!(source = %self.cfg.name, client = %remote, wait_s = wait.as_secs(), "too many failed authentications from this address; refusing it for a while");
        }
        Reject::new(StatusCode::UNAUTHORIZED, RejectReason::Unauthorized, e.to_string())
    }

    /// Charges the source's `rate_limit`; called once the request authenticated.
    fn charge_rate_limit(&self) -> Result<(), Reject> {
        match self.limiter.as_ref().map(|l| l.check()) {
            Some(Err(not_until)) => Err(rate_limited(not_until, format!("rate limit of source `{}` exceeded", self.cfg.name))),
            _ => Ok(()),
        }
    }
}

/// A 429 whose `Retry-After` is when the limiter next has a token.
fn rate_limited(not_until: governor::NotUntil<governor::clock::QuantaInstant>, message: String) -> Reject {
    let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
    Reject::new(StatusCode::TOO_MANY_REQUESTS, RejectReason::RateLimited, message).retry_after(wait.as_secs_f64().ceil() as u64)
}

/// Everything a request needs to know, swapped atomically on reload.
pub struct Routing {
    pub config: Arc<Config>,
    by_path: HashMap<String, Arc<SourceRt>>,
}

impl Routing {
    /// Indexes the sources by path with fresh limiters (a reload starts them anew).
    pub fn new(config: Arc<Config>) -> Self {
        let by_path = config
            .sources
            .iter()
            .map(|s| {
                let rt = SourceRt {
                    cfg: s.clone(),
                    limiter: s.rate_limit.as_ref().map(|r| governor::RateLimiter::direct(r.quota())),
                    ip_limiter: s.per_ip_rate_limit.as_ref().map(|r| governor::RateLimiter::keyed(r.quota())),
                    auth_failures: (!matches!(s.auth, AuthSpec::None)).then(|| FailGate::new(AUTH_FAILURE_BURST, AUTH_FAILURE_PERIOD)),
                    routes: config.routes.iter().filter(|r| r.source == s.name).cloned().collect(),
                    order_keys: config
                        .routes
                        .iter()
                        .filter(|r| r.source == s.name)
                        .filter_map(|r| Some((r.handler.clone(), config.handlers.get(&r.handler)?.ordering.as_ref()?.key.clone())))
                        .collect(),
                    secret_headers: s.auth.secret_headers(),
                    needs_view: matches!(s.dedup.as_ref().map(|d| &d.key), Some(DedupKey::Pointer(_)))
                        || config.routes.iter().any(|r| r.source == s.name && !r.conditions.is_empty())
                        || s.response.as_ref().is_some_and(|r| r.body.contains("{{/"))
                        || config
                            .routes
                            .iter()
                            .any(|r| r.source == s.name && config.handlers.get(&r.handler).is_some_and(|h| h.ordering.is_some())),
                };
                (s.path.clone(), Arc::new(rt))
            })
            .collect();
        Routing { config, by_path }
    }
}

/// State shared by every connection of the public listener.
pub struct Ingest {
    routing: ArcSwap<Routing>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Ingest {
    /// The listener's shared state for `config`, writing to `store`.
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Ingest { routing: ArcSwap::from_pointee(Routing::new(config)), store, metrics })
    }

    /// Swaps in a new configuration; requests in flight finish with the old one.
    pub fn reload(&self, config: Arc<Config>) {
        self.routing.store(Arc::new(Routing::new(config)));
    }

    /// Forgets idle per-address limiter state so memory stays bounded.
    pub fn trim_limiters(&self) {
        for s in self.routing.load().by_path.values() {
            if let Some(l) = &s.ip_limiter {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if let Some(g) = &s.auth_failures {
                g.trim();
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let received_at = Utc::now();
        let routing = self.routing.load_full();
        let Some(src) = routing.by_path.get(req.uri().path()).cloned() else {
            self.metrics.rejected(None, RejectReason::NotFound);
            let msg = format!("no source is configured at {}", req.uri().path());
            return error_response(StatusCode::NOT_FOUND, &msg);
        };
        match self.accept(&routing, &src, req, peer, received_at).await {
            Ok(resp) => resp,
            Err(rej) => {
                let name = &src.cfg.name;
                self.store.count_rejection(name, rej.reason);
                self.metrics.rejected(Some(name), rej.reason);
                tracing::info!(source = %name, status = rej.status.as_u16(), reason = %rej.reason, error = %rej.message, "request rejected");
                rej.into_response()
            }
        }
    }

    async fn accept(
        &self,
        routing: &Routing,
        src: &SourceRt,
        req: Request<Incoming>,
        peer: SocketAddr,
        received_at: DateTime<Utc>,
    ) -> Result<Response<Full<Bytes>>, Reject> {
        let cfg = &src.cfg;
        let server = &routing.config.server;
        let method = req.method().clone();
        if !matches!(method, Method::POST | Method::PUT | Method::GET) {
            return Err(Reject::new(
                StatusCode::METHOD_NOT_ALLOWED,
                RejectReason::Method,
                format!("method {method} is not accepted; use POST, PUT or GET"),
            ));
        }
        let remote = client_addr(peer.ip(), req.headers(), &server.trusted_proxies);
        if !cfg.allow_ips.is_empty() && !cfg.allow_ips.iter().any(|n| n.contains(&remote)) {
            return Err(Reject::new(
                StatusCode::FORBIDDEN,
                RejectReason::Forbidden,
                format!("address {remote} is not allowed to post to source `{}`", cfg.name),
            ));
        }
        if let Some(Err(not_until)) = src.ip_limiter.as_ref().map(|l| l.check_key(&remote)) {
            return Err(rate_limited(not_until, format!("rate limit for address {remote} exceeded")));
        }
        if let Some(Err(wait)) = src.auth_failures.as_ref().map(|g| g.check(remote)) {
            let msg = format!("too many failed authentications from address {remote} for source `{}`; retry later", cfg.name);
            return Err(
                Reject::new(StatusCode::TOO_MANY_REQUESTS, RejectReason::RateLimited, msg).retry_after(wait.as_secs_f64().ceil() as u64)
            );
        }
        let backlog = self.store.backlog();
        if backlog > server.max_backlog {
            return Err(Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RejectReason::Unavailable,
                format!("overloaded: {backlog} deliveries wait to be processed (server.max_backlog = {})", server.max_backlog),
            )
            .retry_after(30));
        }
        // A store short of room (a nearly full disk): refuse here, before
        // reading the body, rather than fail the commit later.
        self.store.admission().map_err(|e| Reject::storage(&e))?;
        let query = req.uri().query().unwrap_or("").to_string();
        auth::check_head(&cfg.auth, req.headers(), &query).map_err(|e| src.auth_failed(remote, e))?;
        if !auth::needs_body(&cfg.auth) {
            src.charge_rate_limit()?;
        }

        if let Some(message) = unsupported_coding(req.headers()) {
            return Err(Reject::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, RejectReason::ContentType, message));
        }
        let content_type = req.headers().get(CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let kind = match (&method, &content_type) {
            (&Method::GET, _) => None,
            (_, Some(ct)) => match decode::classify(ct) {
                BodyKind::Other if !cfg.accept_any => {
                    return Err(Reject::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        RejectReason::ContentType,
                        format!("content type `{ct}` is not accepted; send application/json, application/x-www-form-urlencoded, multipart/form-data or application/xml"),
                    ))
                }
                k => Some(k),
            },
            (_, None) => None,
        };

        if let Some(len) = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
            if len > server.max_body_bytes {
                return Err(too_large(server.max_body_bytes));
            }
        }
        let (parts, body) = req.into_parts();
        let limit = usize::try_from(server.max_body_bytes).unwrap_or(usize::MAX);
        let body = match tokio::time::timeout(server.request_timeout, Limited::new(body, limit).collect()).await {
            Err(_) => {
                return Err(Reject::new(
                    StatusCode::REQUEST_TIMEOUT,
                    RejectReason::Timeout,
                    format!("request body not received within {}", humantime::format_duration(server.request_timeout)),
                ))
            }
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Err(too_large(server.max_body_bytes)),
            Ok(Err(e)) => {
                return Err(Reject::new(StatusCode::BAD_REQUEST, RejectReason::Malformed, format!("could not read the request body: {e}")))
            }
            Ok(Ok(c)) => c.to_bytes(),
        };

        auth::check_body(&cfg.auth, &parts.headers, &body, received_at.timestamp()).map_err(|e| src.auth_failed(remote, e))?;
        if auth::needs_body(&cfg.auth) {
            src.charge_rate_limit()?;
        }

        let secret_param = cfg.auth.secret_param();
        let malformed = |m: String| Reject::new(StatusCode::BAD_REQUEST, RejectReason::Malformed, m);
        // A ping carries its data in the query string: a GET, or a POST with
        // an empty body (whatever Content-Type the sender put on it).
        let kind = if body.is_empty() && !query.is_empty() { None } else { kind };
        let (payload, view): (Payload, Value) = match kind {
            Some(BodyKind::Other) => (Payload::Null, Value::Null),
            Some(kind) => {
                let (body, needs_view) = (body.clone(), src.needs_view);
                decode::off_workers(body.len(), move || decode_body(&kind, body, needs_view)).await.map_err(refused)?
            }
            None if !body.is_empty() && method != Method::GET => {
                if cfg.accept_any {
                    (Payload::Null, Value::Null)
                } else {
                    return Err(Reject::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        RejectReason::ContentType,
                        "missing Content-Type header; send application/json, application/x-www-form-urlencoded, multipart/form-data or application/xml",
                    ));
                }
            }
            None => {
                // A ping: GET (or an empty POST) whose data is the query string.
                if query.is_empty() {
                    return Err(malformed(format!("{method} without a body needs a query string (a ping URL like ?email=…)")));
                }
                let (q, skip) = (query.clone(), secret_param.map(str::to_owned));
                decode::off_workers(q.len(), move || decode::query(&q, skip.as_deref()).map(json_payload)).await.map_err(refused)?
            }
        };

        let dedup = cfg.dedup.as_ref().and_then(|d| {
            let key = match &d.key {
                DedupKey::Pointer(p) => view.pointer(p).and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    other => Some(other.to_string()),
                }),
                DedupKey::Header(h) => parts.headers.get(h.as_str()).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            };
            key.filter(|k| !k.is_empty()).map(|k| (k, d.window))
        });
        let mut handlers: Vec<String> = Vec::new();
        for r in &src.routes {
            if !handlers.contains(&r.handler) && r.conditions.iter().all(|c| routing::holds(c, &view)) {
                handlers.push(r.handler.clone());
            }
        }

        let order_keys = handlers.iter().map(|h| src.order_keys.get(h).and_then(|ptr| rules::order_key(&view, ptr))).collect();
        let ev = NewEvent {
            source: cfg.name.clone(),
            received_at,
            method: method.as_str().to_owned(),
            content_type: content_type.unwrap_or_default(),
            query: redact_query(&query, secret_param),
            headers: stored_headers(&parts.headers, &src.secret_headers),
            remote_addr: remote.to_string(),
            body: body.clone(),
            payload,
            dedup,
            handlers,
            order_keys,
        };
        let started = std::time::Instant::now();
        let inserted = self.store.insert_event(ev).await?;
        self.metrics.commit_latency(started.elapsed());
        if inserted.duplicate {
            self.metrics.received(&cfg.name, Received::Duplicate);
            tracing::info!(event_id = %inserted.id, source = %cfg.name, "duplicate within the dedup window; nothing queued");
            return Ok(json_response(StatusCode::OK, answer_body(inserted.id, "duplicate")));
        }
        self.metrics.received(&cfg.name, Received::Accepted);
        tracing::info!(event_id = %inserted.id, source = %cfg.name, bytes = body.len(), remote = %remote, "event stored");
        Ok(match &cfg.response {
            None => json_response(StatusCode::OK, answer_body(inserted.id, "accepted")),
            Some(spec) => templated_response(spec, &inserted.id.to_string(), &view),
        })
    }
}

/// `{"id":"evt_…","status":…}`, the answer to a stored event, written
/// straight into one buffer (every accepted request builds one).
fn answer_body(id: crate::store::EventId, status: &str) -> String {
    let mut ulid = [0u8; ulid::ULID_LEN];
    let mut out = String::with_capacity(40 + ulid::ULID_LEN + status.len());
    out.push_str(r#"{"id":"evt_"#);
    out.push_str(id.0.array_to_str(&mut ulid));
    out.push_str(r#"","status":""#);
    out.push_str(status);
    out.push_str(r#""}"#);
    out
}

fn json_payload(v: Value) -> (Payload, Value) {
    (Payload::Json(v.to_string()), v)
}

/// A compressed body (`Content-Encoding: gzip`, or a transfer coding besides
/// `chunked`, which hyper leaves in place) would be stored as compressed bytes
/// under a JSON or form content type; it is refused instead (README "Receiving").
fn unsupported_coding(headers: &HeaderMap) -> Option<String> {
    let codings = |name| headers.get_all(name).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).map(<[u8]>::trim_ascii);
    if let Some(c) = codings(hyper::header::CONTENT_ENCODING).find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity")) {
        return Some(format!("content coding `{}` is not supported; send the body uncompressed", String::from_utf8_lossy(c)));
    }
    let c = codings(hyper::header::TRANSFER_ENCODING).find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"))?;
    Some(format!("transfer coding `{}` is not supported; send the body uncompressed (chunked is fine)", String::from_utf8_lossy(c)))
}

/// What is stored and what routes read, for a body of a decodable kind. A
/// JSON body is stored as sent; its value is built only when something reads
/// it at receive time (`needs_view`).
fn decode_body(kind: &BodyKind, body: Bytes, needs_view: bool) -> Result<(Payload, Value), decode::DecodeError> {
    Ok(match kind {
        BodyKind::Json if needs_view => (Payload::Body, decode::json(&body)?),
        BodyKind::Json => {
            decode::json_validate(&body)?;
            (Payload::Body, Value::Null)
        }
        BodyKind::Form => json_payload(decode::form(&body)?),
        BodyKind::Multipart { boundary } => json_payload(decode::multipart(body, boundary)?),
        BodyKind::Xml => json_payload(decode::xml(&body)?),
        BodyKind::Other => (Payload::Null, Value::Null),
    })
}

/// A body the decoders refused: 413 when it holds more than a limit allows
/// (README "Receiving"), 503 when shutdown interrupted the decode, else 400.
fn refused(e: decode::DecodeError) -> Reject {
    if e.is_too_large() {
        return Reject::new(StatusCode::PAYLOAD_TOO_LARGE, RejectReason::TooLarge, e.to_string());
    }
    if e == decode::DecodeError::Interrupted {
        return Reject::new(StatusCode::SERVICE_UNAVAILABLE, RejectReason::Unavailable, "shutting down, retry shortly")
            .retry_after(RETRY_SOON);
    }
    Reject::new(StatusCode::BAD_REQUEST, RejectReason::Malformed, e.to_string())
}

fn too_large(max: u64) -> Reject {
    Reject::new(StatusCode::PAYLOAD_TOO_LARGE, RejectReason::TooLarge, format!("request body exceeds server.max_body_bytes ({max} bytes)"))
}

/// The sender's address: the peer, unless the peer is a trusted proxy, in which
/// case the right-most `X-Forwarded-For` entry that is not itself trusted.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut current = peer;
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_ip(entry) else { return current };
        current = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    current
}

fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip())).map(|ip| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    })
}

const REDACTED: &str = "[redacted]";

/// Header or parameter names that carry credentials, whatever the source's auth.
fn is_sensitive_name(name: &str) -> bool {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return is_sensitive_lower(&name.to_ascii_lowercase());
    }
    is_sensitive_lower(name)
}

/// [`is_sensitive_name`] of a name already in lower case (a header name as
/// hyper gives it): no copy for every header of every request.
fn is_sensitive_lower(n: &str) -> bool {
    matches!(n, "authorization" | "proxy-authorization" | "cookie" | "set-cookie" | "key")
        || ["token", "secret", "password", "passwd", "api-key", "api_key", "apikey", "auth", "session", "signature", "hmac"]
            .iter()
            .any(|p| n.contains(p))
}

/// Headers as a JSON object (repeated headers become arrays), secrets redacted.
pub fn stored_headers(headers: &HeaderMap, secret_headers: &[String]) -> String {
    // Written straight out (this runs for every request): a JSON object with
    // the names sorted, a repeated header as an array of its values in order.
    let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    let mut out = Vec::with_capacity(64 * names.len() + 2);
    json_seq(&mut out, b'{', b'}', names.iter(), |out, n| {
        write_json_str(out, n);
        out.push(b':');
        // Header names are lower case (hyper's `HeaderName`).
        let secret = is_sensitive_lower(n) || secret_headers.iter().any(|s| s == n);
        let value = |out: &mut Vec<u8>, v: &HeaderValue| {
            if secret {
                write_json_str(out, REDACTED)
            } else {
                write_json_str(out, &String::from_utf8_lossy(v.as_bytes()))
            }
        };
        let all = headers.get_all(*n);
        if all.iter().nth(1).is_none() {
            all.iter().for_each(|v| value(out, v));
        } else {
            json_seq(out, b'[', b']', all.iter(), value);
        }
    });
    String::from_utf8(out).expect("JSON written from UTF-8 strings")
}

/// Writes `open`, the items separated by commas, `close`.
fn json_seq<T>(out: &mut Vec<u8>, open: u8, close: u8, items: impl Iterator<Item = T>, mut each: impl FnMut(&mut Vec<u8>, T)) {
    out.push(open);
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(close);
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a string to a Vec cannot fail");
}

/// The query string as received, except the values of credential parameters.
/// Pairs are split at `&` and also at `;`, the separator older HTML and some
/// senders use: a value hidden behind a `;` is redacted too.
pub fn redact_query(query: &str, secret_param: Option<&str>) -> String {
    if query.is_empty() {
        return String::new();
    }
    query
        .split_inclusive(['&', ';'])
        .map(|piece| {
            let (pair, sep) = match piece.strip_suffix(['&', ';']) {
                Some(p) => (p, &piece[p.len()..]),
                None => (piece, ""),
            };
            let (raw_name, _) = pair.split_once('=').unwrap_or((pair, ""));
            let name = serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("{raw_name}="))
                .ok()
                .and_then(|v| v.into_iter().next())
                .map(|(k, _)| k)
                .unwrap_or_default();
            if Some(name.as_str()) == secret_param || is_sensitive_name(&name) {
                format!("{raw_name}={REDACTED}{sep}")
            } else {
                piece.to_string()
            }
        })
        .collect()
}

/// Renders a source's `response` template: `{{id}}` and `{{/json/pointer}}`,
/// escaped for the response's content type so a payload value cannot break it.
pub fn templated_response(spec: &ResponseSpec, id: &str, payload: &Value) -> Response<Full<Bytes>> {
    let escape = Escape::for_content_type(&spec.content_type);
    let body = render_values(&spec.body, escape, |key| {
        if key == "id" {
            Some(Value::String(id.to_string()))
        } else if key.starts_with('/') {
            Some(payload.pointer(key).cloned().unwrap_or(Value::Null))
        } else {
            None
        }
    });
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(spec.status).unwrap_or(StatusCode::OK);
    if let Ok(v) = HeaderValue::from_str(&spec.content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

/// Accepts connections until `shutdown`, then lets in-flight requests finish
/// (at most `request_timeout`) before returning. With `tls`, serves HTTPS
/// with the certificate it holds (README "HTTPS").
pub async fn serve(listener: TcpListener, ingest: Arc<Ingest>, tls: Option<Arc<crate::tls::Reloadable>>, shutdown: CancellationToken) {
    let server = ingest.routing.load().config.server.clone();
    let metrics = ingest.metrics.clone();
    let limits = crate::http_server::Limits {
        name: "webhook",
        max_connections: server.max_connections,
        when_full: crate::http_server::WhenFull::Wait,
        // `request_timeout` bounds the whole request, so the head too
        // (README "Configuration"): whichever of the two is shorter.
        header_read_timeout: server.header_read_timeout.min(server.request_timeout),
        max_header_bytes: server.max_header_bytes,
        header_limit_name: "server.max_header_bytes",
        drain: server.request_timeout + Duration::from_secs(1),
        // A head hyper refused never reached routing: its source is unknown.
        on_refusal: Some(Arc::new(move |status| {
            let reason = if status == StatusCode::BAD_REQUEST { RejectReason::Malformed } else { RejectReason::TooLarge };
            metrics.rejected(None, reason);
        })),
    };
    crate::http_server::serve_with_tls(listener, limits, tls, shutdown, move |req, peer| {
        let ing = ingest.clone();
        async move { ing.handle(req, peer).await }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.2".parse().unwrap());
        assert_eq!(client_addr("10.0.0.1".parse().unwrap(), &h, &trusted), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(client_addr("9.9.9.9".parse().unwrap(), &h, &trusted), "9.9.9.9".parse::<IpAddr>().unwrap());
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_addr("10.0.0.1".parse().unwrap(), &h, &trusted), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn secrets_are_redacted_from_headers_and_query() {
        let mut h = HeaderMap::new();
        h.insert("x-webhook-token", "s3cret".parse().unwrap());
        h.insert("authorization", "Bearer x".parse().unwrap());
        h.insert("x-custom", "keep".parse().unwrap());
        h.append("x-tag", "a".parse().unwrap());
        h.append("x-tag", "b\"c".parse().unwrap());
        h.append("x-tag", "d".parse().unwrap());
        h.insert("x-custom-secret", "hide".parse().unwrap());
        h.append("cookie", "c1".parse().unwrap());
        h.append("cookie", "c2".parse().unwrap());
        let s = stored_headers(&h, &["x-custom-secret".into()]);
        assert!(!s.contains("s3cret") && !s.contains("Bearer") && !s.contains("hide"), "{s}");
        let v: Value = serde_json::from_str(&s).expect("stored headers are JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "authorization": "[redacted]",
                "cookie": ["[redacted]", "[redacted]"],
                "x-custom": "keep",
                "x-custom-secret": "[redacted]",
                "x-tag": ["a", "b\"c", "d"],
                "x-webhook-token": "[redacted]",
            })
        );
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "names sorted: {s}");
        assert_eq!(stored_headers(&HeaderMap::new(), &[]), "{}");
        assert_eq!(redact_query("a=1&t=zz&api_key=k", Some("t")), "a=1&t=[redacted]&api_key=[redacted]");
        assert_eq!(redact_query("x=1;token=S&y=2;", None), "x=1;token=[redacted]&y=2;");
        assert_eq!(redact_query("sig=1&b", Some("sig")), "sig=[redacted]&b");
        let mut h = HeaderMap::new();
        h.insert("x-signature", "abc".parse().unwrap());
        h.insert("x-hub-signature-256", "sha256=abc".parse().unwrap());
        h.insert("x-shopify-hmac-sha256", "abc".parse().unwrap());
        assert!(!stored_headers(&h, &[]).contains("abc"), "signature headers are redacted: {}", stored_headers(&h, &[]));
    }

    #[test]
    fn the_answer_is_the_json_it_always_was_and_upper_case_parameters_are_still_redacted() {
        let id = crate::store::EventId(ulid::Ulid::new());
        for status in ["accepted", "duplicate"] {
            assert_eq!(answer_body(id, status), format!(r#"{{"id":"{id}","status":"{status}"}}"#));
        }
        assert_eq!(redact_query("Api_Key=k&X-Token=t&a=1", None), "Api_Key=[redacted]&X-Token=[redacted]&a=1");
    }

    #[test]
    fn templates_escape_for_their_content_type() {
        let spec = ResponseSpec {
            status: 200,
            body: r#"{"id":"{{id}}","e":"{{/e}}","m":"{{/missing}}"}"#.into(),
            content_type: "application/json".into(),
        };
        let r = templated_response(&spec, "evt_1", &serde_json::json!({"e": "a\"b"}));
        let body = futures_util::FutureExt::now_or_never(r.into_body().collect()).unwrap().unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"id":"evt_1","e":"a\"b","m":""}"#);
    }
}
