//! The CRM upsert handler (README, "CRM upsert handler"): turns one event into contact records and
//! creates-or-updates each in HubSpot, Salesforce or any HTTP API, keyed by
//! `id_property`.
//!
//! One attempt: select the records (`records`), map `fields` into each, set
//! aside those without an id (listed in the output, never sent), merge records
//! that share an id, then send them in chunks of `batch_size`: a chunk is one
//! HubSpot batch request, or that many Salesforce/HTTP requests in flight at
//! once. The attempt succeeds when every request it sent succeeded and the CRM
//! reported no record as rejected.
//!
//! **A retry re-sends every record.** Each request is an upsert keyed by the
//! record's id, so sending a record twice leaves the CRM as sending it once.
//! The handler therefore remembers nothing between attempts: when a chunk must
//! be retried (408, 429, 5xx, connection errors) the attempt stops after that
//! chunk and the next attempt sends everything again — at-least-once, like
//! every delivery. That costs duplicate requests after a failure and buys the
//! certainty that no crash or lost bookkeeping can skip a record.
//!
//! Like every handler it never decides retries (`process::retry` does) and
//! never touches the store.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use async_trait::async_trait;
use governor::DefaultDirectRateLimiter;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::limiter;
use super::{send, AttemptResult, Handler, Job, OutputBuf};
use crate::config::{CrmProvider, CrmSpec};
use crate::store::Outcome;
use crate::template::{render, value_text, Escape};

/// Salesforce REST API version of the sObject upsert URL (README, "CRM upsert handler").
const SALESFORCE_API: &str = "v60.0";

/// How much of one CRM answer the attempt output keeps; the whole output is
/// capped at 64 KiB anyway, and one huge answer must not crowd out the rest.
const ANSWER_CLIP: usize = 1024;

/// The `crm_upsert` handler: one event becomes records, sent in batches to
/// the provider's upsert endpoint; the delivery succeeds when every record
/// that was sent succeeded.
pub struct Upsert {
    client: reqwest::Client,
    limiter: Option<DefaultDirectRateLimiter>,
    endpoint: Endpoint,
    records: RecordPath,
    fields: BTreeMap<String, String>,
    id_property: String,
    batch_size: usize,
    /// `Authorization` (from `token_env`) and the configured `headers`,
    /// built once: the hot path only clones them.
    headers: HeaderMap,
}

/// Where and how records go, precomputed from the config.
enum Endpoint {
    /// HubSpot: one `POST` per chunk to the batch upsert URL.
    Batch { url: reqwest::Url },
    /// One request per record; a chunk is that many requests in flight at once.
    PerRecord(Target),
}

enum Target {
    /// One `PATCH` per record to `prefix` + the URL-encoded id.
    Salesforce { prefix: String },
    /// One request per record to `url_template` with `{id}` URL-encoded.
    Http { method: Method, url_template: String, body: HttpBody },
}

enum HttpBody {
    /// The mapped record as a JSON object.
    Record,
    /// `body_template`, its values escaped for `content_type`.
    Template { text: String, content_type: String, escape: Escape },
}

impl Upsert {
    /// Builds the handler from its validated config, sharing the daemon's HTTP client.
    pub fn new(client: reqwest::Client, spec: &CrmSpec) -> Self {
        let headers = fixed_headers(spec);
        let endpoint = match spec.provider {
            CrmProvider::Hubspot => Endpoint::Batch {
                url: reqwest::Url::parse(&format!("{}/crm/v3/objects/contacts/batch/upsert", spec.base_url))
                    .expect("validated at load: base_url is a URL, and a path after it keeps it one"),
            },
            CrmProvider::Salesforce => Endpoint::PerRecord(Target::Salesforce {
                prefix: format!(
                    "{}/services/data/{SALESFORCE_API}/sobjects/Contact/{}/",
                    spec.base_url,
                    encode_component(&spec.id_property)
                ),
            }),
            CrmProvider::Http => {
                let method = Method::from_bytes(spec.method.as_bytes()).expect("validated at load: method is an HTTP method");
                let body = match &spec.body_template {
                    None => HttpBody::Record,
                    Some(text) => {
                        let content_type =
                            headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
                        HttpBody::Template { text: text.clone(), escape: Escape::for_content_type(&content_type), content_type }
                    }
                };
                Endpoint::PerRecord(Target::Http { method, url_template: spec.url_template.clone().unwrap_or_default(), body })
            }
        };
        Upsert {
            client,
            limiter: limiter(&spec.rate_limit),
            endpoint,
            records: RecordPath::parse(&spec.records),
            fields: spec.fields.clone(),
            id_property: spec.id_property.clone(),
            batch_size: spec.batch_size.max(1),
            headers,
        }
    }

    fn provider(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Batch { .. } => "hubspot",
            Endpoint::PerRecord(Target::Salesforce { .. }) => "salesforce",
            Endpoint::PerRecord(Target::Http { .. }) => "http",
        }
    }

    /// Waits for the rate limiter, then sends.
    async fn send_limited(&self, req: RequestBuilder, job: &Job<'_>) -> AttemptResult {
        if let Some(l) = &self.limiter {
            tokio::select! {
                _ = job.cancel.cancelled() => return AttemptResult::interrupted(),
                _ = l.until_ready() => {}
            }
        }
        send(req.timeout(job.config.timeout).headers(self.headers.clone()), job.cancel).await
    }

    /// One HubSpot batch upsert for a whole chunk. A `207 Multi-Status` answer
    /// with `errors` means some records were rejected: the chunk fails.
    async fn hubspot_batch(&self, url: &reqwest::Url, chunk: &[Record], what: String, job: &Job<'_>) -> Exchange {
        let inputs: Vec<Value> = chunk
            .iter()
            .map(|r| json!({ "idProperty": self.id_property, "id": r.id, "properties": hubspot_properties(&r.properties) }))
            .collect();
        let req = self.client.post(url.clone()).json(&json!({ "inputs": inputs }));
        let mut result = self.send_limited(req, job).await;
        let rejected = hubspot_errors(&result.output);
        if result.outcome == Outcome::Success && !rejected.is_empty() {
            result.outcome = Outcome::Failure;
            result.error = Some(format!("HubSpot rejected {} of {} record(s)", rejected.len(), chunk.len()));
        }
        Exchange { what, result, rejected }
    }

    /// One Salesforce or HTTP request for one record.
    async fn record_request(&self, target: &Target, r: &Record, job: &Job<'_>) -> Exchange {
        let mut what = format!("record `{}` = {}", self.id_property, r.id);
        let url = match record_url(target, &r.id) {
            Ok(url) => url,
            Err(e) => return Exchange { what, result: AttemptResult::failure(e.to_string()), rejected: Vec::new() },
        };
        let _ = write!(what, " to {} {}", target.method(), shown_url(&url));
        let req = self.record_builder(target, url, r, job);
        let mut result = self.send_limited(req, job).await;
        let rejected = match target {
            Target::Salesforce { .. } => salesforce_errors(&result.output),
            Target::Http { .. } => Vec::new(),
        };
        if result.outcome == Outcome::Success && !rejected.is_empty() {
            result.outcome = Outcome::Failure;
            result.error = Some("Salesforce answered with errors".into());
        }
        Exchange { what, result, rejected }
    }

    fn record_builder(&self, target: &Target, url: reqwest::Url, r: &Record, job: &Job<'_>) -> RequestBuilder {
        match target {
            Target::Salesforce { .. } => {
                // The external id travels in the URL, as Salesforce's upsert
                // expects, and not again in the body.
                let mut body = r.properties.clone();
                body.remove(&self.id_property);
                self.client.patch(url).json(&body)
            }
            Target::Http { method, body, .. } => {
                let req = self
                    .client
                    .request(method.clone(), url)
                    .header("x-hooktrail-event-id", job.delivery.event_id.to_string())
                    .header("x-hooktrail-attempt", job.delivery.attempt.to_string());
                match body {
                    HttpBody::Record => req.json(&r.properties),
                    HttpBody::Template { text, content_type, escape } => {
                        let event_id = job.delivery.event_id.to_string();
                        req.header(CONTENT_TYPE, content_type).body(render_body(text, *escape, r, &event_id))
                    }
                }
            }
        }
    }
}

impl Target {
    fn method(&self) -> &str {
        match self {
            Target::Salesforce { .. } => "PATCH",
            Target::Http { method, .. } => method.as_str(),
        }
    }
}

/// The URL one record goes to: its id percent-encoded as one path segment.
/// Ids that a URL would read as a path step (`.`, `..`) never get here
/// ([`record_id`] skips them), so the record cannot land on another path.
fn record_url(target: &Target, id: &str) -> Result<reqwest::Url, CrmError> {
    let url = match target {
        Target::Salesforce { prefix } => format!("{prefix}{}", encode_component(id)),
        Target::Http { url_template, .. } => url_template.replace("{id}", &encode_component(id)),
    };
    reqwest::Url::parse(&url).map_err(|e| CrmError::BadUrl(e.to_string()))
}

/// A URL as the attempt output shows it: scheme, host, port and path, without
/// the user and password and with the query left out (`?…`), where a
/// configured URL could carry a key.
fn shown_url(url: &reqwest::Url) -> String {
    let query = if url.query().is_some() { "?…" } else { "" };
    format!("{}{}{query}", url.origin().ascii_serialization(), url.path())
}

#[async_trait]
impl Handler for Upsert {
    async fn run(&self, job: Job<'_>) -> AttemptResult {
        let selection = select_records(&job.delivery.payload, &self.records, &self.fields, &self.id_property);
        if selection.selected == 0 {
            // Not a failure (there is nothing to send), but most likely a
            // `records` path that does not fit this sender's payloads.
            tracing::warn!(event_id = %job.delivery.event_id, handler = %job.delivery.handler, "crm_upsert: the `records` path selected no record");
        }
        let mut report = Report::new(self.provider(), &selection);
        let chunks: Vec<&[Record]> = selection.records.chunks(self.batch_size).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let exchanges = match &self.endpoint {
                Endpoint::Batch { url } => {
                    let what = format!(
                        "request {}/{} to POST {} ({} record(s): {})",
                        i + 1,
                        chunks.len(),
                        shown_url(url),
                        chunk.len(),
                        id_span(chunk)
                    );
                    vec![self.hubspot_batch(url, chunk, what, &job).await]
                }
                Endpoint::PerRecord(target) => {
                    futures_util::future::join_all(chunk.iter().map(|r| self.record_request(target, r, &job))).await
                }
            };
            if exchanges.iter().any(|e| e.result.interrupted) {
                return AttemptResult::interrupted();
            }
            report.exchanges.extend(exchanges);
            if report.must_retry() {
                report.not_sent = chunks[i + 1..].iter().map(|c| c.len()).sum();
                break;
            }
        }
        report.finish()
    }
}

/// Why a request could not even be built.
#[derive(Debug, thiserror::Error)]
pub enum CrmError {
    /// The URL is not shown: it may carry a user and password.
    #[error("url_template with this id is not a URL ({0})")]
    BadUrl(String),
}

fn fixed_headers(spec: &CrmSpec) -> HeaderMap {
    let mut h = HeaderMap::new();
    // Both were validated at load (`crm_spec`), so nothing is dropped here.
    if let Some(token) = &spec.token {
        if let Ok(mut v) = HeaderValue::from_bytes(&[b"Bearer ", token.expose()].concat()) {
            v.set_sensitive(true);
            h.insert(AUTHORIZATION, v);
        }
    }
    // Configured headers come second so they can replace the bearer token
    // (an API that wants `Authorization: Token …`).
    for (k, v) in &spec.headers {
        if let (Ok(name), Ok(mut value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v.expose())) {
            value.set_sensitive(true);
            h.insert(name, value);
        }
    }
    h
}

// ---------------------------------------------------------------------------
// Record selection and mapping: pure functions of the payload and the config.

/// A parsed `records` path: JSON-pointer segments where `*` fans out over
/// every item of an array or value of an object. `/` is the payload itself.
/// (A key literally named `*` cannot be selected; no sender uses one.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPath(Vec<Step>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// `/token`, still escaped, ready for [`Value::pointer`].
    Key(String),
    Each,
}

impl RecordPath {
    /// Parses a `records` path: JSON-pointer tokens, where `*` fans out over an array or object.
    pub fn parse(path: &str) -> Self {
        let rest = path.strip_prefix('/').unwrap_or(path);
        if rest.is_empty() {
            return RecordPath(Vec::new());
        }
        RecordPath(rest.split('/').map(|t| if t == "*" { Step::Each } else { Step::Key(format!("/{t}")) }).collect())
    }

    /// Every value the path reaches, with its JSON pointer in the payload, in
    /// document order (object values in key order). A step that finds nothing
    /// (missing key, `*` over a scalar) contributes no record.
    pub fn select<'a>(&self, root: &'a Value) -> Vec<(String, &'a Value)> {
        let mut found = vec![(String::new(), root)];
        for step in &self.0 {
            found = found
                .into_iter()
                .flat_map(|(at, v)| -> Vec<(String, &'a Value)> {
                    match (step, v) {
                        (Step::Key(token), v) => v.pointer(token).map(|c| (format!("{at}{token}"), c)).into_iter().collect(),
                        (Step::Each, Value::Array(items)) => items.iter().enumerate().map(|(i, c)| (format!("{at}/{i}"), c)).collect(),
                        (Step::Each, Value::Object(map)) => map.iter().map(|(k, c)| (format!("{at}/{}", escape_token(k)), c)).collect(),
                        (Step::Each, _) => Vec::new(),
                    }
                })
                .collect();
        }
        found
    }
}

fn escape_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The CRM properties of one record: each `fields` pointer resolved against
/// the record (`""` is the record itself). A pointer that does not resolve, or
/// resolves to null, leaves its property out, so a field the sender left off
/// never blanks a value already in the CRM. Values keep their JSON type here;
/// each provider decides how to send them (see [`hubspot_text`]).
pub fn map_fields(fields: &BTreeMap<String, String>, record: &Value) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|(property, pointer)| match record.pointer(pointer) {
            None | Some(Value::Null) => None,
            Some(v) => Some((property.clone(), v.clone())),
        })
        .collect()
}

/// One contact to upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// JSON pointer of the record in the payload (`""` = the payload), for the output.
    pub at: String,
    /// The `id_property` value as text: HubSpot ids and URL segments are strings.
    pub id: String,
    pub properties: Map<String, Value>,
    /// The record as selected, for `{{/pointer}}` in a body template.
    pub source: Value,
}

/// Why a selected record is not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("no `{0}`: its pointer does not resolve in this record")]
    MissingId(String),
    #[error("`{0}` is empty")]
    EmptyId(String),
    #[error("`{0}` is a list, not a string or number (a form field? add `/0` to its pointer)")]
    ListId(String),
    #[error("`{0}` is an object, not a string or number")]
    ObjectId(String),
    #[error("`{0}` is `{1}`, which a URL reads as a step along the path, not as an id")]
    DotId(String, String),
}

/// What an event yields: the records to send and the ones set aside.
#[derive(Debug, Default, PartialEq)]
pub struct Selection {
    pub selected: usize,
    pub records: Vec<Record>,
    /// (where, why) for each record not sent.
    pub skipped: Vec<(String, Skip)>,
    /// Records folded into an earlier one with the same id.
    pub merged: usize,
}

/// Selects, maps and checks the records of one payload. Records that share an
/// id are merged into the first (later values win), as sending them one after
/// the other would; HubSpot would reject the whole batch for a duplicate id.
pub fn select_records(payload: &Value, path: &RecordPath, fields: &BTreeMap<String, String>, id_property: &str) -> Selection {
    let mut out = Selection::default();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (at, record) in path.select(payload) {
        out.selected += 1;
        let properties = map_fields(fields, record);
        let id = match record_id(&properties, id_property) {
            Ok(id) => id,
            Err(why) => {
                out.skipped.push((at, why));
                continue;
            }
        };
        match by_id.get(&id) {
            Some(&i) => {
                out.records[i].properties.extend(properties);
                out.merged += 1;
            }
            None => {
                by_id.insert(id.clone(), out.records.len());
                out.records.push(Record { at, id, properties, source: record.clone() });
            }
        }
    }
    out
}

fn record_id(properties: &Map<String, Value>, id_property: &str) -> Result<String, Skip> {
    let id = match properties.get(id_property) {
        None => return Err(Skip::MissingId(id_property.to_string())),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
        Some(Value::Array(_)) => return Err(Skip::ListId(id_property.to_string())),
        Some(_) => return Err(Skip::ObjectId(id_property.to_string())),
    };
    if id.is_empty() {
        return Err(Skip::EmptyId(id_property.to_string()));
    }
    // `/contacts/..` would upsert into `/` with the token: refused for every
    // provider, so no id means something else to one of them.
    if id == "." || id == ".." {
        return Err(Skip::DotId(id_property.to_string(), id));
    }
    Ok(id)
}

/// HubSpot property values are strings: a string goes as is, a number or a
/// boolean as its JSON text (`1234567`, `true`, which HubSpot parses for
/// number and checkbox properties), a list of plain values joined with `;`
/// (HubSpot's multi-select format), anything else as JSON text. Salesforce
/// and `http` get the JSON value unchanged, since their fields are typed.
pub fn hubspot_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| !i.is_array() && !i.is_object()) => {
            items.iter().map(|i| value_text(Some(i))).collect::<Vec<_>>().join(";")
        }
        other => other.to_string(),
    }
}

fn hubspot_properties(properties: &Map<String, Value>) -> Map<String, Value> {
    properties.iter().map(|(k, v)| (k.clone(), Value::String(hubspot_text(v)))).collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so an id
/// like `a/b c@d` is one path segment or query value wherever `{id}` stands.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Renders an `http` provider's `body_template` for one record. Keys:
/// `{{id}}` the record's id, `{{event_id}}` the event's id, `{{NAME}}` the
/// mapped property NAME, `{{/pointer}}` a value of the record itself, each
/// escaped for the body's content type (put JSON strings in quotes yourself:
/// `"{{email}}"`); `{{properties}}` the mapped record as a JSON object, not
/// escaped. Unknown keys stay as written.
pub fn render_body(template: &str, escape: Escape, r: &Record, event_id: &str) -> String {
    render(template, |key| match key {
        "id" => Some(escape.apply(&r.id)),
        "event_id" => Some(escape.apply(event_id)),
        "properties" => Some(Value::Object(r.properties.clone()).to_string()),
        k if k.starts_with('/') => Some(escape.apply(&value_text(r.source.pointer(k)))),
        k => r.properties.get(k).map(|v| escape.apply(&value_text(Some(v)))),
    })
}

// ---------------------------------------------------------------------------
// CRM answers.

#[derive(Deserialize)]
struct HubspotAnswer {
    #[serde(default)]
    errors: Vec<HubspotError>,
}

#[derive(Deserialize)]
struct HubspotError {
    #[serde(default)]
    category: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    context: Option<Value>,
}

/// The per-record errors of a HubSpot batch answer (`207 Multi-Status`
/// `{"errors":[{"category","message","context"}]}`), one line each.
pub fn hubspot_errors(body: &str) -> Vec<String> {
    let Ok(answer) = serde_json::from_str::<HubspotAnswer>(body) else { return Vec::new() };
    answer
        .errors
        .into_iter()
        .map(|e| {
            let mut line = format!("{}: {}", e.category, e.message);
            if let Some(ctx) = e.context.filter(|c| !c.is_null()) {
                let _ = write!(line, " {ctx}");
            }
            line
        })
        .collect()
}

#[derive(Deserialize)]
struct SalesforceError {
    #[serde(default, rename = "errorCode")]
    error_code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    fields: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SalesforceAnswer {
    /// The error array of a failed request.
    Errors(Vec<SalesforceError>),
    /// `{"id","success","errors":[…],"created"}` of an upsert.
    Result {
        #[serde(default)]
        errors: Vec<SalesforceError>,
    },
}

/// Salesforce's errors (`[{"message","errorCode","fields"}]`, or the
/// `errors` of an upsert result), one line each.
pub fn salesforce_errors(body: &str) -> Vec<String> {
    let errors = match serde_json::from_str::<SalesforceAnswer>(body) {
        Ok(SalesforceAnswer::Errors(e)) | Ok(SalesforceAnswer::Result { errors: e }) => e,
        Err(_) => return Vec::new(),
    };
    errors
        .into_iter()
        .map(|e| {
            let mut line = format!("{}: {}", e.error_code, e.message);
            if !e.fields.is_empty() {
                let _ = write!(line, " (fields: {})", e.fields.join(", "));
            }
            line
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Turning many requests into one attempt result.

/// One request and what came of it.
struct Exchange {
    /// "request 2/3 (100 record(s): 1234567 … 7654321)" or "record `email` = a@b.c".
    what: String,
    result: AttemptResult,
    /// Per-record errors the CRM reported in its answer.
    rejected: Vec<String>,
}

/// Everything one attempt did, folded into its [`AttemptResult`].
struct Report {
    provider: &'static str,
    selected: usize,
    to_send: usize,
    skipped: Vec<(String, Skip)>,
    merged: usize,
    exchanges: Vec<Exchange>,
    /// Records left unsent because a chunk must be retried first.
    not_sent: usize,
}

impl Report {
    fn new(provider: &'static str, s: &Selection) -> Self {
        Report {
            provider,
            selected: s.selected,
            to_send: s.records.len(),
            skipped: s.skipped.clone(),
            merged: s.merged,
            exchanges: Vec::new(),
            not_sent: 0,
        }
    }

    fn must_retry(&self) -> bool {
        self.exchanges.iter().any(|e| e.result.outcome == Outcome::Retry)
    }

    /// Retry if any request may succeed later (the retry re-sends all, so
    /// records behind a 429 still get through even when another chunk was
    /// refused for good); else failure if any request failed; else success.
    /// The status shown is that of the first request with the attempt's
    /// outcome; the longest `Retry-After` asked for is honoured.
    fn finish(self) -> AttemptResult {
        let outcome = [Outcome::Retry, Outcome::Failure]
            .into_iter()
            .find(|o| self.exchanges.iter().any(|e| e.result.outcome == *o))
            .unwrap_or(Outcome::Success);
        let deciding: Vec<&Exchange> = self.exchanges.iter().filter(|e| e.result.outcome == outcome).collect();
        let mut result = AttemptResult::new(outcome);
        result.http_status = deciding.first().and_then(|e| e.result.http_status);
        result.retry_after =
            self.exchanges.iter().filter(|e| e.result.outcome == Outcome::Retry).filter_map(|e| e.result.retry_after).max();
        if outcome != Outcome::Success {
            if let Some(first) = deciding.first() {
                // The status is in `http_status`; the error names the request and adds only what the status does not say.
                let mut error = match first.result.error.as_deref() {
                    Some(e) => format!("{}: {e}", first.what),
                    None => first.what.clone(),
                };
                if deciding.len() > 1 {
                    let _ = write!(error, " (and {} more request(s) like it)", deciding.len() - 1);
                }
                result.error = Some(error);
            }
        }
        result.output = self.output();
        result
    }

    /// Summary first, then what went wrong, then what went right: when the
    /// 64 KiB cap cuts, it cuts the successes.
    fn output(&self) -> String {
        let mut out = OutputBuf::default();
        let mut head = format!(
            "{}: {} record(s) selected, {} to send, {} request(s) sent",
            self.provider,
            self.selected,
            self.to_send,
            self.exchanges.len()
        );
        if !self.skipped.is_empty() {
            let _ = write!(head, ", {} skipped", self.skipped.len());
        }
        if self.merged > 0 {
            let _ = write!(head, ", {} merged into records with the same id", self.merged);
        }
        out.push_line(&head);
        for e in self.exchanges.iter().filter(|e| e.result.outcome != Outcome::Success) {
            describe(&mut out, e);
        }
        if self.not_sent > 0 {
            out.push_line(&format!("not sent: {} record(s); the next attempt sends every record again", self.not_sent));
        }
        for (at, why) in &self.skipped {
            let at = if at.is_empty() { "the payload" } else { at.as_str() };
            out.push_line(&format!("skipped {at}: {why}"));
        }
        for e in self.exchanges.iter().filter(|e| e.result.outcome == Outcome::Success) {
            describe(&mut out, e);
        }
        out.finish()
    }
}

fn describe(out: &mut OutputBuf, e: &Exchange) {
    let r = &e.result;
    let mut line = format!("{} {}", r.outcome, e.what);
    match (r.http_status, &r.error) {
        (Some(s), _) => {
            let _ = write!(line, ": HTTP {s}");
        }
        (None, Some(err)) => {
            let _ = write!(line, ": {err}");
        }
        (None, None) => {}
    }
    if let Some(d) = r.retry_after {
        let _ = write!(line, " (Retry-After {})", humantime::format_duration(d));
    }
    out.push_line(&line);
    if e.rejected.is_empty() {
        if !r.output.is_empty() {
            out.push_line(&format!("  {}", clip(r.output.trim(), ANSWER_CLIP)));
        }
    } else {
        for msg in &e.rejected {
            out.push_line(&format!("  {msg}"));
        }
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} […]", &s[..end])
}

/// "1234567 … 7654321": the first and last id of a chunk, for the output.
fn id_span(chunk: &[Record]) -> String {
    match chunk {
        [] => String::new(),
        [only] => only.id.clone(),
        [first, .., last] => format!("{} … {}", first.id, last.id),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const CAMPAIGN: &str = r#"{"CampaignActionQualification":[{"Campaign":[{"campaign_id":12345,
        "CampaignAction":[{"campaign_action_id":"123456","Contacts":{
            "2019-08-02T15:45:22+00:00":[1234567,12345678,123456789],
            "2019-08-03T09:00:00+00:00":[42]}}]}]}]}"#;

    const FORM: &str = r#"{"contact_id":"749746728","submission_values":{"first_name":["Daniel"],"last_name":["Golden"],
        "email_address":["dgolden@mid-corp.com"],"company_name":["MidSize Corp"]}}"#;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn campaign_path_yields_every_contact_id_with_its_pointer() {
        let payload: Value = serde_json::from_str(CAMPAIGN).unwrap();
        let path = RecordPath::parse("/CampaignActionQualification/*/Campaign/*/CampaignAction/*/Contacts/*/*");
        let got: Vec<(String, Value)> = path.select(&payload).into_iter().map(|(at, v)| (at, v.clone())).collect();
        let base = "/CampaignActionQualification/0/Campaign/0/CampaignAction/0/Contacts";
        assert_eq!(
            got,
            vec![
                (format!("{base}/2019-08-02T15:45:22+00:00/0"), json!(1234567)),
                (format!("{base}/2019-08-02T15:45:22+00:00/1"), json!(12345678)),
                (format!("{base}/2019-08-02T15:45:22+00:00/2"), json!(123456789)),
                (format!("{base}/2019-08-03T09:00:00+00:00/0"), json!(42)),
            ]
        );
        // Every reported pointer leads back to the value it names.
        for (at, v) in &got {
            assert_eq!(payload.pointer(at), Some(v));
        }
    }

    #[test]
    fn slash_is_the_payload_and_missing_paths_yield_nothing() {
        let payload = json!({"a": [{"b": 1}, {"c": 2}], "s": "x", "k/~": {"z": 1}});
        assert_eq!(RecordPath::parse("/").select(&payload), vec![(String::new(), &payload)]);
        assert_eq!(RecordPath::parse("/a/*/b").select(&payload), vec![("/a/0/b".to_string(), &json!(1))]);
        assert_eq!(RecordPath::parse("/a/1").select(&payload), vec![("/a/1".to_string(), &json!({"c": 2}))]);
        assert!(RecordPath::parse("/nope/*").select(&payload).is_empty());
        assert!(RecordPath::parse("/s/*").select(&payload).is_empty(), "* over a string yields nothing");
        let escaped = RecordPath::parse("/*/z").select(&payload);
        assert_eq!(escaped, vec![("/k~1~0/z".to_string(), &json!(1))]);
        assert_eq!(payload.pointer(&escaped[0].0), Some(&json!(1)));
    }

    #[test]
    fn form_fields_unwrap_single_item_arrays_and_unresolved_ones_are_left_out() {
        let payload: Value = serde_json::from_str(FORM).unwrap();
        let f = fields(&[
            ("email", "/submission_values/email_address/0"),
            ("firstname", "/submission_values/first_name/0"),
            ("lastname", "/submission_values/last_name/0"),
            ("company", "/submission_values/company_name/0"),
            ("phone", "/submission_values/phone/0"),
            ("nr_id", "/contact_id"),
        ]);
        let props = map_fields(&f, &payload);
        assert_eq!(
            Value::Object(props),
            json!({"email": "dgolden@mid-corp.com", "firstname": "Daniel", "lastname": "Golden",
                   "company": "MidSize Corp", "nr_id": "749746728"})
        );
    }

    #[test]
    fn a_bare_contact_id_becomes_a_record_through_the_empty_pointer() {
        let payload: Value = serde_json::from_str(CAMPAIGN).unwrap();
        let path = RecordPath::parse("/CampaignActionQualification/*/Campaign/*/CampaignAction/*/Contacts/*/*");
        let s = select_records(&payload, &path, &fields(&[("contact_id", "")]), "contact_id");
        assert_eq!(s.selected, 4);
        assert_eq!(s.records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["1234567", "12345678", "123456789", "42"]);
        assert_eq!(s.records[0].properties, json!({"contact_id": 1234567}).as_object().unwrap().clone());
    }

    #[test]
    fn records_without_a_usable_id_are_skipped_with_the_reason() {
        let payload = json!({"people": [
            {"email": "a@x.io", "name": "A"},
            {"name": "no email"},
            {"email": "  ", "name": "blank"},
            {"email": ["b@x.io"], "name": "form field"},
            {"email": null},
            {"email": {"work": "c@x.io"}},
            {"email": ".."},
            {"email": " . "},
            {"email": "..."},
        ]});
        let s = select_records(&payload, &RecordPath::parse("/people/*"), &fields(&[("email", "/email"), ("name", "/name")]), "email");
        assert_eq!(s.records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a@x.io", "..."]);
        assert_eq!(
            s.skipped,
            vec![
                ("/people/1".to_string(), Skip::MissingId("email".into())),
                ("/people/2".to_string(), Skip::EmptyId("email".into())),
                ("/people/3".to_string(), Skip::ListId("email".into())),
                ("/people/4".to_string(), Skip::MissingId("email".into())),
                ("/people/5".to_string(), Skip::ObjectId("email".into())),
                ("/people/6".to_string(), Skip::DotId("email".into(), "..".into())),
                ("/people/7".to_string(), Skip::DotId("email".into(), ".".into())),
            ]
        );
    }

    #[test]
    fn records_sharing_an_id_are_merged_later_values_winning() {
        let payload = json!([{"e": "a@x.io", "n": "first", "c": "Acme"}, {"e": "b@x.io"}, {"e": "a@x.io", "n": "second"}]);
        let s = select_records(&payload, &RecordPath::parse("/*"), &fields(&[("email", "/e"), ("name", "/n"), ("company", "/c")]), "email");
        assert_eq!(s.merged, 1);
        assert_eq!(s.records.len(), 2);
        assert_eq!(Value::Object(s.records[0].properties.clone()), json!({"email": "a@x.io", "name": "second", "company": "Acme"}));
    }

    #[test]
    fn hubspot_gets_strings() {
        assert_eq!(hubspot_text(&json!("Daniel")), "Daniel");
        assert_eq!(hubspot_text(&json!(1234567)), "1234567");
        assert_eq!(hubspot_text(&json!(2.5)), "2.5");
        assert_eq!(hubspot_text(&json!(true)), "true");
        assert_eq!(hubspot_text(&json!(["a", "b", 3])), "a;b;3");
        assert_eq!(hubspot_text(&json!({"k": 1})), r#"{"k":1}"#);
    }

    #[test]
    fn ids_are_one_url_component() {
        assert_eq!(encode_component("dgolden@mid-corp.com"), "dgolden%40mid-corp.com");
        assert_eq!(encode_component("a/b c?d#é"), "a%2Fb%20c%3Fd%23%C3%A9");
        assert_eq!(encode_component("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn a_record_url_keeps_its_id_in_one_segment_and_is_shown_without_secrets() {
        let http = |t: &str| Target::Http { method: Method::PUT, url_template: t.into(), body: HttpBody::Record };
        let t = http("https://crm.example.com/api/contacts/{id}");
        for (id, path) in [("a/b", "/api/contacts/a%2Fb"), ("x?y#z", "/api/contacts/x%3Fy%23z"), ("%2e%2e", "/api/contacts/%252e%252e")] {
            assert_eq!(record_url(&t, id).unwrap().path(), path, "id {id}");
        }
        let sf = Target::Salesforce { prefix: "https://x.my.salesforce.com/services/data/v60.0/sobjects/Contact/Email/".into() };
        assert_eq!(record_url(&sf, "a/b").unwrap().path(), "/services/data/v60.0/sobjects/Contact/Email/a%2Fb");
        let secret = record_url(&http("https://user:pw@crm.example.com:8443/c/{id}?api_key=k"), "a@b").unwrap();
        assert_eq!(shown_url(&secret), "https://crm.example.com:8443/c/a%40b?…");
    }

    #[test]
    fn body_template_reads_id_properties_pointers_and_escapes() {
        let r = Record {
            at: String::new(),
            id: "a\"b@x.io".into(),
            properties: json!({"email": "a\"b@x.io", "n": 3}).as_object().unwrap().clone(),
            source: json!({"raw": {"x": "y"}}),
        };
        let t = r#"{"key":"{{id}}","n":{{n}},"x":"{{/raw/x}}","ev":"{{event_id}}","all":{{properties}},"keep":"{{nope}}"}"#;
        let body = render_body(t, Escape::Json, &r, "evt_1");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"key": "a\"b@x.io", "n": 3, "x": "y", "ev": "evt_1", "all": {"email": "a\"b@x.io", "n": 3}, "keep": "{{nope}}"})
        );
        assert_eq!(render_body("email={{email}}", Escape::Form, &r, "e"), "email=a%22b%40x.io");
    }

    #[test]
    fn hubspot_multi_status_errors_are_listed() {
        let body = r#"{"status":"COMPLETE","results":[],"numErrors":1,"errors":[{"status":"error","category":"VALIDATION_ERROR",
            "message":"Property values were not valid","context":{"ids":["bad@x"]}}]}"#;
        assert_eq!(hubspot_errors(body), vec![r#"VALIDATION_ERROR: Property values were not valid {"ids":["bad@x"]}"#]);
        assert!(hubspot_errors(r#"{"status":"COMPLETE","results":[{"id":"1"}]}"#).is_empty());
        assert!(hubspot_errors("not json").is_empty());
    }

    #[test]
    fn salesforce_error_arrays_are_listed() {
        let body = r#"[{"message":"Required fields are missing: [LastName]","errorCode":"REQUIRED_FIELD_MISSING","fields":["LastName"]}]"#;
        assert_eq!(salesforce_errors(body), vec!["REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)"]);
        assert!(salesforce_errors(r#"{"id":"003xx","success":true,"errors":[],"created":true}"#).is_empty());
        assert_eq!(salesforce_errors(r#"{"success":false,"errors":[{"errorCode":"X","message":"m"}]}"#), vec!["X: m"]);
    }

    fn exchange(what: &str, outcome: Outcome, status: u16, retry_after: Option<u64>) -> Exchange {
        let mut result = AttemptResult::new(outcome);
        result.http_status = Some(status);
        result.retry_after = retry_after.map(Duration::from_secs);
        Exchange { what: what.into(), result, rejected: Vec::new() }
    }

    fn report(exchanges: Vec<Exchange>) -> Report {
        let mut r = Report::new("hubspot", &Selection::default());
        r.exchanges = exchanges;
        r
    }

    #[test]
    fn a_retryable_chunk_makes_the_attempt_retry_even_beside_a_refused_one() {
        let r = report(vec![
            exchange("request 1/3", Outcome::Success, 200, None),
            exchange("request 2/3", Outcome::Failure, 400, None),
            exchange("request 3/3", Outcome::Retry, 429, Some(3)),
        ])
        .finish();
        assert_eq!(r.outcome, Outcome::Retry);
        assert_eq!(r.http_status, Some(429));
        assert_eq!(r.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(r.error.as_deref(), Some("request 3/3"), "the status is in http_status, said once");
        // Failures are listed before successes.
        let fail = r.output.find("retry request 3/3").unwrap();
        let ok = r.output.find("success request 1/3").unwrap();
        assert!(fail < ok, "{}", r.output);
    }

    #[test]
    fn a_refused_chunk_fails_the_attempt_and_all_ok_succeeds() {
        let r = report(vec![exchange("a", Outcome::Failure, 400, None), exchange("b", Outcome::Failure, 404, None)]).finish();
        assert_eq!((r.outcome, r.http_status), (Outcome::Failure, Some(400)));
        assert_eq!(r.error.as_deref(), Some("a (and 1 more request(s) like it)"));
        let r = report(vec![exchange("a", Outcome::Success, 200, None), exchange("b", Outcome::Success, 201, None)]).finish();
        assert_eq!((r.outcome, r.http_status, r.error), (Outcome::Success, Some(200), None));
        let r = report(Vec::new()).finish();
        assert_eq!((r.outcome, r.http_status), (Outcome::Success, None), "nothing to send is not a failure");
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    /// JSON trees whose keys include the characters a pointer must escape.
    fn json_tree() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from), "[a-z@.]{0,6}".prop_map(Value::from)];
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[ab/~*]{0,3}", inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    fn record_path() -> impl Strategy<Value = String> {
        let step = prop_oneof![Just("*".to_string()), Just("a".to_string()), Just("0".to_string()), Just("~1".to_string())];
        prop::collection::vec(step, 0..5).prop_map(|steps| format!("/{}", steps.join("/")))
    }

    fn percent_decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn every_selected_pointer_leads_back_to_its_value(root in json_tree(), path in record_path()) {
            for (at, v) in RecordPath::parse(&path).select(&root) {
                prop_assert_eq!(root.pointer(&at), Some(v), "pointer {} from path {}", at, path);
            }
        }

        #[test]
        fn a_star_selects_each_child_once(root in json_tree()) {
            let n = match &root {
                Value::Array(a) => a.len(),
                Value::Object(m) => m.len(),
                _ => 0,
            };
            prop_assert_eq!(RecordPath::parse("/*").select(&root).len(), n);
        }

        #[test]
        fn every_selected_record_is_sent_skipped_or_merged(root in json_tree(), path in record_path()) {
            let fields: BTreeMap<String, String> = [("id".to_string(), String::new())].into_iter().collect();
            let s = select_records(&root, &RecordPath::parse(&path), &fields, "id");
            prop_assert_eq!(s.selected, s.records.len() + s.skipped.len() + s.merged);
            let ids: std::collections::HashSet<&str> = s.records.iter().map(|r| r.id.as_str()).collect();
            prop_assert_eq!(ids.len(), s.records.len(), "ids are unique after merging");
        }

        #[test]
        fn an_encoded_id_is_one_safe_url_component(id in any::<String>()) {
            let enc = encode_component(&id);
            prop_assert!(enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            prop_assert_eq!(percent_decode(&enc), id.as_bytes());
        }
    }
}
