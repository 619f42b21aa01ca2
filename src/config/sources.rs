//! `[sources.NAME]`: the senders hooktrail accepts webhooks from, each with
//! its URL path, auth, address and rate limits, dedup key and answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::check::{join, keys_of, Checker};
use super::values::{Dur, RateLimit, RawRate, RawSecrets};
use crate::crypto::{HmacAlgorithm, Secret};

/// One sender: everything ingest needs to accept, refuse and answer its requests.
#[derive(Debug)]
pub struct SourceConfig {
    pub name: String,
    pub path: String,
    pub auth: AuthSpec,
    pub allow_ips: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    pub per_ip_rate_limit: Option<RateLimit>,
    pub dedup: Option<DedupSpec>,
    pub response: Option<ResponseSpec>,
    pub accept_any: bool,
}

/// `dedup`: a repeated key within `window` is answered with the first event's id.
#[derive(Debug, Clone)]
pub struct DedupSpec {
    pub key: DedupKey,
    pub window: Duration,
}

/// Where the dedup key is read: senders that retry resend the same id in
/// the body, or only in a delivery header.
#[derive(Debug, Clone)]
pub enum DedupKey {
    Pointer(String),
    /// Lower-cased header name.
    Header(String),
}

/// The answer that replaces the default 200 body, for senders that expect
/// a particular reply (README "Response templates").
#[derive(Debug, Clone)]
pub struct ResponseSpec {
    pub status: u16,
    /// A template: `{{id}}`, `{{/json/pointer}}`.
    pub body: String,
    pub content_type: String,
}

/// How a sender writes its HMAC signature in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigEncoding {
    Hex,
    Base64,
}

/// What a sender's HMAC covers; signing the timestamp too stops replays of
/// an old, captured request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedContent {
    Body,
    TimestampDotBody,
}

/// `auth.type = "hmac"`: a signature scheme described key by key, for
/// senders without a preset.
#[derive(Debug, Clone)]
pub struct HmacSpec {
    /// Lower-cased header name.
    pub header: String,
    pub algorithm: HmacAlgorithm,
    pub encoding: SigEncoding,
    pub prefix: String,
    pub timestamp_header: Option<String>,
    pub signed_content: SignedContent,
    pub tolerance: Duration,
    pub secrets: Vec<Secret>,
}

/// Signature schemes computed exactly as each provider documents them, so
/// nobody has to describe them key by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    StandardWebhooks,
    Github,
    Stripe,
    Shopify,
    Slack,
}

/// How a source proves a request is its sender's. Every secret is a list,
/// so one can be rotated while the old one still verifies.
#[derive(Debug, Clone)]
pub enum AuthSpec {
    None,
    /// `header` is lower-cased.
    HeaderToken {
        header: String,
        secrets: Vec<Secret>,
    },
    QueryToken {
        param: String,
        secrets: Vec<Secret>,
    },
    Basic {
        username: String,
        secrets: Vec<Secret>,
    },
    Hmac(HmacSpec),
    Preset {
        preset: Preset,
        tolerance: Duration,
        secrets: Vec<Secret>,
    },
}

impl AuthSpec {
    /// Header names (lower-case) whose values are secrets or signatures and must be
    /// redacted before storing.
    pub fn secret_headers(&self) -> Vec<String> {
        // Signatures are redacted like tokens: with the stored body, a kept
        // signature would let anyone who can read events or an export replay
        // the delivery (forever, for schemes without a timestamp).
        let preset_header = |p: &Preset| match p {
            Preset::StandardWebhooks => "webhook-signature",
            Preset::Github => "x-hub-signature-256",
            Preset::Stripe => "stripe-signature",
            Preset::Shopify => "x-shopify-hmac-sha256",
            Preset::Slack => "x-slack-signature",
        };
        match self {
            AuthSpec::HeaderToken { header, .. } => vec![header.clone()],
            AuthSpec::Hmac(h) => vec![h.header.clone()],
            AuthSpec::Preset { preset, .. } => vec![preset_header(preset).to_string()],
            // Basic's `Authorization` is redacted for every source anyway.
            AuthSpec::None | AuthSpec::QueryToken { .. } | AuthSpec::Basic { .. } => Vec::new(),
        }
    }
    /// Query parameter whose value is a secret.
    pub fn secret_param(&self) -> Option<&str> {
        match self {
            AuthSpec::QueryToken { param, .. } => Some(param),
            _ => None,
        }
    }
}

/// Timestamped schemes refuse signatures older (or newer) than this by default.
const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_RESPONSE_STATUS: u16 = 200;
/// The answer of README "Receiving", kept when a source overrides only the status.
const DEFAULT_RESPONSE_BODY: &str = "{\"id\":\"{{id}}\",\"status\":\"accepted\"}";
const DEFAULT_RESPONSE_CONTENT_TYPE: &str = "application/json";

/// `auth` of `type = "none"`: no keys but the type.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNoAuth {}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawHeaderToken {
    header: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawQueryToken {
    param: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawBasic {
    username: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawHmac {
    header: Option<String>,
    algorithm: Option<String>,
    encoding: Option<String>,
    prefix: Option<String>,
    timestamp_header: Option<String>,
    signed_content: Option<String>,
    tolerance: Option<Dur>,
}

/// `auth` of a preset type (standard_webhooks, github, …).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPreset {
    tolerance: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawDedup {
    key: Option<String>,
    window: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawResponse {
    status: Option<u16>,
    body: Option<String>,
    content_type: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSource {
    path: Option<String>,
    /// Tagged by `type`: checked by [`auth_spec`].
    auth: Option<Value>,
    allow_ips: Vec<String>,
    rate_limit: Option<RawRate>,
    per_ip_rate_limit: Option<RawRate>,
    dedup: Option<RawDedup>,
    response: Option<RawResponse>,
    accept_any: bool,
}

/// Checks every `[sources.NAME]` table; sorted by name, paths unique.
pub(super) fn sources(ck: &mut Checker, value: Option<Value>) -> Vec<Arc<SourceConfig>> {
    let mut sources = Vec::new();
    match value {
        None => ck.warn("sources", "no sources configured; every request will get 404"),
        Some(Value::Object(map)) => {
            for (name, v) in map {
                let p = format!("sources.{name}");
                if let Some(raw) = ck.section::<RawSource>(&p, Some(v)) {
                    if let Some(s) = source_config(ck, &name, raw) {
                        sources.push(Arc::new(s));
                    }
                }
            }
        }
        Some(_) => ck.error("sources", "must be a table of tables ([sources.NAME])"),
    }
    let mut seen_paths: BTreeMap<&str, &str> = BTreeMap::new();
    for s in &sources {
        if let Some(other) = seen_paths.insert(&s.path, &s.name) {
            ck.error(format!("sources.{}.path", s.name), format!("`{}` is also the path of source `{other}`", s.path));
        }
    }
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    sources
}

fn source_config(ck: &mut Checker, name: &str, r: RawSource) -> Option<SourceConfig> {
    let p = format!("sources.{name}");
    let before = ck.problems.len();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        ck.error(&p, "source names may contain only letters, digits, `_` and `-`");
    }
    let path = r.path.unwrap_or_else(|| format!("/hooks/{name}"));
    if !path.starts_with('/') || path.contains('?') || path.contains('#') {
        ck.error(join(&p, "path"), format!("`{path}` must start with `/` and hold no `?` or `#`"));
    }
    let auth = match r.auth {
        None => {
            ck.error(join(&p, "auth"), "is required; write auth = { type = \"none\" } to accept unauthenticated requests");
            None
        }
        Some(a) => auth_spec(ck, &join(&p, "auth"), a),
    };
    let allow_ips = ck.cidrs(&join(&p, "allow_ips"), &r.allow_ips);
    let rate_limit = r.rate_limit.as_ref().and_then(|x| ck.rate(&join(&p, "rate_limit"), x));
    let per_ip_rate_limit = r.per_ip_rate_limit.as_ref().and_then(|x| ck.rate(&join(&p, "per_ip_rate_limit"), x));
    let dedup = r.dedup.as_ref().and_then(|d| {
        let dp = join(&p, "dedup");
        let key = match d.key.as_deref() {
            None => {
                ck.error(join(&dp, "key"), "is required (a JSON pointer like \"/id\" or \"header:NAME\")");
                return None;
            }
            Some(k) => match k.strip_prefix("header:") {
                Some(h) if !h.trim().is_empty() => DedupKey::Header(h.trim().to_ascii_lowercase()),
                Some(_) => {
                    ck.error(join(&dp, "key"), "header: needs a header name");
                    return None;
                }
                None => {
                    if k.is_empty() || !ck.pointer(&join(&dp, "key"), k) {
                        if k.is_empty() {
                            ck.error(join(&dp, "key"), "is empty");
                        }
                        return None;
                    }
                    DedupKey::Pointer(k.to_string())
                }
            },
        };
        Some(DedupSpec { key, window: d.window.map_or(DEFAULT_DEDUP_WINDOW, |w| w.0) })
    });
    let response = r.response.as_ref().and_then(|x| {
        let status = x.status.unwrap_or(DEFAULT_RESPONSE_STATUS);
        if !(200..300).contains(&status) {
            ck.error(join(&p, "response.status"), format!("{status} is not a 2xx status; the response replaces the success answer"));
            return None;
        }
        let spec = ResponseSpec {
            status,
            body: x.body.clone().unwrap_or_else(|| DEFAULT_RESPONSE_BODY.to_string()),
            content_type: x.content_type.clone().unwrap_or_else(|| DEFAULT_RESPONSE_CONTENT_TYPE.to_string()),
        };
        if let Err(e) = crate::template::check_json_template(&spec.body, &spec.content_type) {
            ck.error(join(&p, "response.body"), e);
            return None;
        }
        Some(spec)
    });
    if ck.problems.len() > before {
        return None;
    }
    Some(SourceConfig {
        name: name.to_string(),
        path,
        auth: auth?,
        allow_ips,
        rate_limit,
        per_ip_rate_limit,
        dedup,
        response,
        accept_any: r.accept_any,
    })
}

/// Every `auth.type`, in the order README "Configuration" lists them.
const AUTH_TYPES: [&str; 10] =
    ["none", "header_token", "query_token", "basic", "hmac", "standard_webhooks", "github", "stripe", "shopify", "slack"];
const AUTH_TYPES_TEXT: &str = "none, header_token, query_token, basic, hmac, standard_webhooks, github, stripe, shopify or slack";

/// `auth` is tagged by `type`: each type takes its own keys, and every type
/// but `none` the secret keys (`secret_env`, `secret_file`, `secret`,
/// `secrets`); a key of another type is reported.
fn auth_spec(ck: &mut Checker, p: &str, value: Value) -> Option<AuthSpec> {
    let t = ck.split_tagged::<RawSecrets>(p, value, "type")?;
    let Some(kind) = t.kind.as_deref() else {
        ck.error(join(p, "type"), format!("is required: {AUTH_TYPES_TEXT}"));
        return None;
    };
    let what = format!("{kind} auth");
    let require = |ck: &mut Checker, key: &str, v: &Option<String>| -> Option<String> {
        match v {
            Some(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            _ => {
                ck.error(join(p, key), format!("is required for type = \"{kind}\""));
                None
            }
        }
    };
    let spec = match kind {
        "none" => {
            let mut all = t.own;
            all.extend(t.shared);
            ck.kind_section::<RawNoAuth>(p, all, &what, "type", &[])?;
            AuthSpec::None
        }
        "header_token" => {
            let r: RawHeaderToken = own_keys(ck, p, t.own, &what)?;
            let header = require(ck, "header", &r.header).map(|h| h.to_ascii_lowercase());
            let secrets = secrets(ck, p, t.shared);
            AuthSpec::HeaderToken { header: header?, secrets }
        }
        "query_token" => {
            let r: RawQueryToken = own_keys(ck, p, t.own, &what)?;
            let param = require(ck, "param", &r.param);
            let secrets = secrets(ck, p, t.shared);
            AuthSpec::QueryToken { param: param?, secrets }
        }
        "basic" => {
            let r: RawBasic = own_keys(ck, p, t.own, &what)?;
            let username = require(ck, "username", &r.username);
            let secrets = secrets(ck, p, t.shared);
            AuthSpec::Basic { username: username?, secrets }
        }
        "hmac" => {
            let a: RawHmac = own_keys(ck, p, t.own, &what)?;
            let header = require(ck, "header", &a.header).map(|h| h.to_ascii_lowercase());
            let algorithm = ck.one_of(
                join(p, "algorithm"),
                a.algorithm.as_deref().unwrap_or("sha256"),
                &[("sha1", HmacAlgorithm::Sha1), ("sha256", HmacAlgorithm::Sha256), ("sha512", HmacAlgorithm::Sha512)],
                "sha1, sha256, sha512",
            );
            let encoding = ck.one_of(
                join(p, "encoding"),
                a.encoding.as_deref().unwrap_or("hex"),
                &[("hex", SigEncoding::Hex), ("base64", SigEncoding::Base64)],
                "hex, base64",
            );
            let signed_content = ck.one_of(
                join(p, "signed_content"),
                a.signed_content.as_deref().unwrap_or("body"),
                &[("body", SignedContent::Body), ("timestamp.body", SignedContent::TimestampDotBody)],
                "\"body\", \"timestamp.body\"",
            );
            let timestamp_header = a.timestamp_header.as_ref().map(|h| h.trim().to_ascii_lowercase());
            if signed_content == Some(SignedContent::TimestampDotBody) && timestamp_header.is_none() {
                ck.error(join(p, "timestamp_header"), "is required when signed_content = \"timestamp.body\"");
            }
            let secrets = secrets(ck, p, t.shared);
            AuthSpec::Hmac(HmacSpec {
                header: header?,
                algorithm: algorithm?,
                encoding: encoding?,
                prefix: a.prefix.clone().unwrap_or_default(),
                timestamp_header,
                signed_content: signed_content?,
                tolerance: a.tolerance.map_or(DEFAULT_TOLERANCE, |d| d.0),
                secrets,
            })
        }
        "standard_webhooks" | "github" | "stripe" | "shopify" | "slack" => {
            let preset = match kind {
                "standard_webhooks" => Preset::StandardWebhooks,
                "github" => Preset::Github,
                "stripe" => Preset::Stripe,
                "shopify" => Preset::Shopify,
                _ => Preset::Slack,
            };
            let r: RawPreset = own_keys(ck, p, t.own, &what)?;
            let secrets = secrets(ck, p, t.shared);
            if preset == Preset::StandardWebhooks {
                for (i, s) in secrets.iter().enumerate() {
                    if crate::crypto::standard_webhooks_key(s).is_none() {
                        ck.error(join(p, "secrets"), format!("secret #{} is not a `whsec_<base64>` Standard Webhooks secret", i + 1));
                    }
                }
            }
            AuthSpec::Preset { preset, tolerance: r.tolerance.map_or(DEFAULT_TOLERANCE, |d| d.0), secrets }
        }
        other => {
            let near = super::check::closest(other, &AUTH_TYPES).map(|t| format!("did you mean `{t}`? ")).unwrap_or_default();
            ck.error(join(p, "type"), format!("unknown auth type `{other}`; {near}expected {AUTH_TYPES_TEXT}"));
            return None;
        }
    };
    Some(spec)
}

/// The keys of one auth type besides the secret keys; a key of another type is reported.
fn own_keys<T: DeserializeOwned + Default>(ck: &mut Checker, p: &str, own: Map<String, Value>, what: &str) -> Option<T> {
    ck.kind_section(p, own, what, "type", keys_of::<RawSecrets>())
}

/// The secret keys of an auth table: at least one secret.
fn secrets(ck: &mut Checker, p: &str, shared: Map<String, Value>) -> Vec<Secret> {
    let raw = ck.section::<RawSecrets>(p, Some(Value::Object(shared))).unwrap_or_default();
    ck.secrets(p, &raw)
}
