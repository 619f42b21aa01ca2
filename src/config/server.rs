//! `[server]` (the public listener) and `[admin]` (the ops listener): where
//! hooktrail listens and the limits that protect each door.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::check::Checker;
use super::values::Dur;
use crate::crypto::Secret;
use crate::tls::{self, TlsFiles};

/// The public listener, where senders post webhooks.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: u64,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpNet>,
    /// Unprocessed deliveries above which new events get 503.
    pub max_backlog: u64,
    /// Written once storage is open and listeners are bound: `{"listen":…,"admin":…}`
    /// (for scripts and tests that bind port 0).
    pub ready_file: Option<PathBuf>,
    /// `server.tls`: serve HTTPS with this certificate (README "HTTPS"). Read
    /// and checked with the rest of the config, so a reload with a bad
    /// certificate is refused like any bad config and the old one kept.
    pub tls: Option<tls::Loaded>,
}

/// The admin listener: health, metrics, the API and the event-log page.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `None` when `listen = "off"` (or empty).
    pub listen: Option<SocketAddr>,
    pub token: Option<Secret>,
    /// The variable `token` is read from, named in messages (never its value).
    pub token_env: String,
}

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Below this, ordinary requests (a few cookies, a long signature) stop fitting.
const MIN_MAX_HEADER_BYTES: usize = 8192;
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const DEFAULT_MAX_BACKLOG: u64 = 1_000_000;
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_ADMIN_TOKEN_ENV: &str = "HOOKTRAIL_ADMIN_TOKEN";

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    request_timeout: Option<Dur>,
    header_read_timeout: Option<Dur>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    trusted_proxies: Vec<String>,
    max_backlog: Option<u64>,
    ready_file: Option<PathBuf>,
    tls: Option<RawTls>,
}

/// `server.tls = { cert_file, key_file }`; both required.
#[derive(Deserialize)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawAdmin {
    listen: Option<String>,
    token_env: Option<String>,
}

fn parse_addr(ck: &mut Checker, path: &str, s: &str) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            ck.error(path, format!("`{s}` is not an address like \"127.0.0.1:8080\""));
            None
        }
    }
}

pub(super) fn server_config(ck: &mut Checker, r: RawServer) -> Option<ServerConfig> {
    let listen = parse_addr(ck, "server.listen", r.listen.as_deref().unwrap_or(DEFAULT_LISTEN));
    let max_body_bytes = r.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        ck.error("server.max_body_bytes", "must be at least 1");
    }
    let trusted_proxies = ck.cidrs("server.trusted_proxies", &r.trusted_proxies);
    let max_header_bytes = r.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if max_header_bytes < MIN_MAX_HEADER_BYTES {
        ck.error("server.max_header_bytes", format!("must be at least {MIN_MAX_HEADER_BYTES}"));
    }
    let tls = r.tls.and_then(|t| server_tls(ck, t));
    Some(ServerConfig {
        listen: listen?,
        max_body_bytes,
        request_timeout: r.request_timeout.map_or(DEFAULT_REQUEST_TIMEOUT, |d| d.0),
        header_read_timeout: r.header_read_timeout.map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0),
        max_header_bytes,
        max_connections: r.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS).max(1),
        trusted_proxies,
        max_backlog: r.max_backlog.unwrap_or(DEFAULT_MAX_BACKLOG),
        ready_file: r.ready_file,
        tls,
    })
}

/// Loads `server.tls` now, so `check-config`, the start and a reload all
/// refuse a certificate that could not be served. Relative paths are read
/// from the working directory, like `storage.path`.
fn server_tls(ck: &mut Checker, t: RawTls) -> Option<tls::Loaded> {
    if t.cert_file.is_none() {
        ck.error("server.tls.cert_file", "is required");
    }
    if t.key_file.is_none() {
        ck.error("server.tls.key_file", "is required");
    }
    let files = TlsFiles { cert_file: t.cert_file?, key_file: t.key_file? };
    match tls::load(files) {
        Ok(loaded) => Some(loaded),
        Err(e) => {
            ck.error(format!("server.tls.{}", e.file.key()), e.message);
            None
        }
    }
}

pub(super) fn admin_config(ck: &mut Checker, r: RawAdmin) -> Option<AdminConfig> {
    let listen_s = r.listen.unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
    let listen = if listen_s.is_empty() || listen_s == "off" { None } else { Some(parse_addr(ck, "admin.listen", &listen_s)?) };
    let token_env = r.token_env.unwrap_or_else(|| DEFAULT_ADMIN_TOKEN_ENV.to_string());
    let token = ck.secret_var(&token_env).filter(|t| !t.is_empty()).map(|t| Secret::new(t.into_bytes()));
    if let Some(addr) = listen {
        if token.is_none() && !addr.ip().is_loopback() {
            ck.error(
                "admin.listen",
                format!(
                    "`{addr}` is not a loopback address and admin.token_env `{token_env}` is not set; set the token or listen on 127.0.0.1"
                ),
            );
        }
    }
    Some(AdminConfig { listen, token, token_env })
}
