//! The admin listener: its own socket (never the public one), routing, and
//! access control for health, metrics, the JSON API and the event-log page.
//!
//! Access rules, decided here once for every route:
//! - `/healthz` and `/readyz` are open (load balancers and systemd probes).
//! - When `admin.token_env` names a set variable, everything else needs
//!   `Authorization: Bearer <token>` or the session cookie the `/login` form
//!   sets (a browser cannot add a header to a plain link or form). The cookie
//!   holds a random session id, never the token; sessions live in this
//!   process's memory ([`Sessions`]), so logout ends one for good and a
//!   restart ends them all. It is `HttpOnly` and `SameSite=Strict`, and
//!   credentials are compared in constant time.
//! - Without a token the listener is loopback-only (config refuses anything
//!   else), and answers only requests whose `Host` is a loopback name or
//!   address, so a web page cannot reach it through DNS rebinding.
//! - Requests that change something (POST) must not come from another site
//!   (`Origin` / `Sec-Fetch-Site`), so a page on the internet cannot make a
//!   local browser press "replay".
//! - The listener has its own small connection budget and short timeouts, and
//!   when full it closes its oldest idle connection for a new one, so idle or
//!   slow clients cannot keep health probes out.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, SET_COOKIE, WWW_AUTHENTICATE};
use hyper::http::request::Parts;
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::respond::{form_value, json_error, redirect, text, Resp};
use super::session::{Sessions, SESSION_TTL};
use super::{api, page, Ops};
use crate::config::Config;
use crate::crypto;
use crate::fail_gate::FailGate;

/// Concurrent admin connections; ops tooling needs few, and a cap keeps a
/// misbehaving scraper from starving the daemon. When all are open, the
/// oldest idle one is closed for a newcomer, so probes always get in.
const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this (probes and tools send it at once).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head the admin listener reads.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest request body the admin listener reads (login and replay forms).
const MAX_FORM_BYTES: usize = 8 * 1024;
/// A form body must arrive within this, so a slow one cannot hold a
/// connection (which then counts as busy and is never closed for room).
const FORM_TIMEOUT: Duration = Duration::from_secs(5);
/// Name of the page's session cookie.
const COOKIE: &str = "hooktrail_admin";
/// Wrong admin tokens one client address may send in a burst…
const FAIL_BURST: NonZeroU32 = match NonZeroU32::new(10) {
    Some(n) => n,
    None => unreachable!(),
};
/// …after which it gets one more try per this period; until then every
/// credential it sends is answered 429 without being checked.
const FAIL_PERIOD: Duration = Duration::from_secs(6);

/// Slows down guessing the admin token: wrong tokens (login form or
/// `Authorization: Bearer`) are counted per client address by a [`FailGate`];
/// see there for why a blocked address gets 429 whatever it sends.
pub(super) fn admin_fail_gate() -> FailGate {
    FailGate::new(FAIL_BURST, FAIL_PERIOD)
}

/// Counts a wrong admin credential from `ip`, logging when it blocks the address.
fn wrong_token(gate: &FailGate, ip: IpAddr) {
    if let Some(wait) = gate.failed(ip) {
        tracing::warn!(client = %ip, wait_s = wait.as_secs(), "admin: too many wrong tokens from this address; refusing its credentials for a while");
    }
}

/// Accepts admin connections until `shutdown`, then lets open requests finish
/// for a few seconds.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>, shutdown: CancellationToken) {
    let limits = crate::http_server::Limits {
        name: "admin",
        max_connections: MAX_CONNECTIONS,
        when_full: crate::http_server::WhenFull::CloseOldestIdle,
        header_read_timeout: HEADER_TIMEOUT,
        max_header_bytes: MAX_HEADER_BYTES,
        header_limit_name: "the admin listener's limit",
        drain: Duration::from_secs(5),
        on_refusal: None,
    };
    let trim = (ops.clone(), shutdown.clone());
    tokio::spawn(async move {
        let (ops, shutdown) = trim;
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {
                    ops.fail_gate().trim();
                    ops.sessions().trim();
                }
            }
        }
    });
    crate::http_server::serve(listener, limits, shutdown, move |req, peer| {
        let ops = ops.clone();
        async move { handle(&ops, req, peer).await }
    })
    .await;
}

/// Where a request goes. Ids stay strings here; each endpoint parses its own.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    ApiEvents,
    ApiEvent(&'a str),
    ApiReplay(&'a str),
    ApiBulkReplay,
    ApiStats,
    PageList,
    PageEvent(&'a str),
    PageReplay(&'a str),
    PageBulkConfirm,
    PageBulkReplay,
    LoginForm,
    Login,
    Logout,
    NotFound,
    /// The path exists with other methods (the `Allow` value).
    WrongMethod(&'static str),
}

impl Route<'_> {
    /// Routes answered without credentials.
    fn is_open(&self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz | Route::LoginForm | Route::Login)
    }

    /// Routes for programs (JSON/text errors) rather than people (HTML).
    fn is_machine(&self) -> bool {
        matches!(
            self,
            Route::Metrics | Route::ApiEvents | Route::ApiEvent(_) | Route::ApiReplay(_) | Route::ApiBulkReplay | Route::ApiStats
        )
    }
}

fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let post = *method == Method::POST;
    let pick = |ok: bool, r: Route<'a>, allow: &'static str| if ok { r } else { Route::WrongMethod(allow) };
    let segs: Vec<&'a str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    match segs.as_slice() {
        ["healthz"] => pick(read, Route::Healthz, "GET, HEAD"),
        ["readyz"] => pick(read, Route::Readyz, "GET, HEAD"),
        ["metrics"] => pick(read, Route::Metrics, "GET, HEAD"),
        ["api", "events"] => pick(read, Route::ApiEvents, "GET, HEAD"),
        ["api", "events", id] if !id.is_empty() => pick(read, Route::ApiEvent(id), "GET, HEAD"),
        ["api", "events", id, "replay"] if !id.is_empty() => pick(post, Route::ApiReplay(id), "POST"),
        ["api", "replay"] => pick(post, Route::ApiBulkReplay, "POST"),
        ["api", "stats"] => pick(read, Route::ApiStats, "GET, HEAD"),
        [""] => pick(read, Route::PageList, "GET, HEAD"),
        ["events", id] if !id.is_empty() => pick(read, Route::PageEvent(id), "GET, HEAD"),
        ["events", id, "replay"] if !id.is_empty() => pick(post, Route::PageReplay(id), "POST"),
        ["replay"] if read => Route::PageBulkConfirm,
        ["replay"] => pick(post, Route::PageBulkReplay, "GET, HEAD, POST"),
        ["login"] if read => Route::LoginForm,
        ["login"] => pick(post, Route::Login, "GET, HEAD, POST"),
        ["logout"] => pick(post, Route::Logout, "POST"),
        _ => Route::NotFound,
    }
}

async fn handle(ops: &Ops, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let r = route(&parts.method, &path);
    tracing::debug!(method = %parts.method, path = %path, %peer, "admin request");
    let cfg = ops.config();
    if let Err(denied) = authorize(&cfg, &parts, &r, ops, peer.ip()) {
        return *denied;
    }
    let form = if parts.method == Method::POST {
        match read_form(body).await {
            Ok(f) => f,
            Err(resp) => return *resp,
        }
    } else {
        String::new()
    };
    let logged_in = cfg.admin.token.is_some();
    match r {
        Route::Healthz => text(StatusCode::OK, "ok\n"),
        Route::Readyz => api::readyz(ops).await,
        Route::Metrics => api::metrics(ops).await,
        Route::ApiEvents => api::events(ops, &query).await,
        Route::ApiEvent(id) => api::event(ops, id).await,
        Route::ApiReplay(id) => api::replay(ops, id, &query).await,
        Route::ApiBulkReplay => api::bulk(ops, &query).await,
        Route::ApiStats => api::stats(ops, &query).await,
        Route::PageList => page::list(ops, &query, logged_in).await,
        Route::PageEvent(id) => page::event(ops, id, &query, logged_in).await,
        Route::PageReplay(id) => page::replay(ops, id, &form).await,
        Route::PageBulkConfirm => page::bulk_confirm(ops, &query, logged_in).await,
        Route::PageBulkReplay => page::bulk_replay(ops, &form, logged_in).await,
        Route::LoginForm => login_form(&cfg, &query),
        Route::Login => login(&cfg, &form, ops, peer.ip()),
        Route::Logout => logout(&parts, ops.sessions()),
        Route::NotFound if path.starts_with("/api/") => json_error(StatusCode::NOT_FOUND, &format!("no admin endpoint `{path}`")),
        Route::NotFound => page::not_found(&format!("Nothing at {path}.")),
        Route::WrongMethod(allow) => {
            let mut resp = json_error(StatusCode::METHOD_NOT_ALLOWED, &format!("{} is not allowed on {path}; use {allow}", parts.method));
            resp.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
    }
}

/// Applies the access rules of the module doc; `Err` is the answer to send.
fn authorize(cfg: &Config, parts: &Parts, r: &Route<'_>, ops: &Ops, ip: IpAddr) -> Result<(), Box<Resp>> {
    let gate = ops.fail_gate();
    if matches!(r, Route::Healthz | Route::Readyz) {
        return Ok(());
    }
    if parts.method == Method::POST && !same_site(parts) {
        return Err(Box::new(json_error(StatusCode::FORBIDDEN, "cross-site requests may not change anything here")));
    }
    let Some(token) = &cfg.admin.token else {
        if !host_is_loopback(parts) {
            let msg = format!(
                "without a token ({} is not set) the admin listener answers only requests for localhost, 127.0.0.1 or [::1]",
                cfg.admin.token_env
            );
            return Err(Box::new(json_error(StatusCode::FORBIDDEN, &msg)));
        }
        return Ok(());
    };
    if r.is_open() || session_cookies(parts).any(|v| ops.sessions().valid(token.expose(), v)) {
        return Ok(());
    }
    if has_bearer(parts) {
        if let Err(wait) = gate.check(ip) {
            return Err(Box::new(too_many_tries(wait, true)));
        }
        if bearer_ok(parts, token.expose()) {
            return Ok(());
        }
        wrong_token(gate, ip);
    }
    if r.is_machine() {
        let mut resp = json_error(StatusCode::UNAUTHORIZED, "missing or wrong admin token: send Authorization: Bearer <token>");
        resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"hooktrail admin\""));
        return Err(Box::new(resp));
    }
    // A person: the login form, coming back here afterwards.
    let here = match parts.uri.query() {
        Some(q) => format!("{}?{q}", parts.uri.path()),
        None => parts.uri.path().to_string(),
    };
    let next = if parts.method == Method::GET { here } else { "/".into() };
    Err(Box::new(page::login(StatusCode::UNAUTHORIZED, &next, None)))
}

fn has_bearer(parts: &Parts) -> bool {
    parts.headers.get_all(hyper::header::AUTHORIZATION).iter().any(|v| v.len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer "))
}

/// 429 for an address that sent too many wrong tokens: JSON for programs, the
/// login page for people.
fn too_many_tries(wait: Duration, machine: bool) -> Resp {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let msg = format!("too many wrong admin tokens from this address; try again in {secs} s");
    let mut resp =
        if machine { json_error(StatusCode::TOO_MANY_REQUESTS, &msg) } else { page::login(StatusCode::TOO_MANY_REQUESTS, "/", Some(&msg)) };
    resp.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Exactly one `Authorization: Bearer` header with the token: a request
/// listing several is refused (and counted as one wrong try), so it cannot
/// test many guesses at once.
fn bearer_ok(parts: &Parts, token: &[u8]) -> bool {
    let mut all = parts.headers.get_all(hyper::header::AUTHORIZATION).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => {
            let v = v.as_bytes();
            v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") && crypto::secret_eq(v[7..].trim_ascii(), token)
        }
        _ => false,
    }
}

/// The values of every session cookie the request carries.
fn session_cookies(parts: &Parts) -> impl Iterator<Item = &str> {
    parts
        .headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Whether a state-changing request comes from this site (or from a program,
/// which sends neither header).
fn same_site(parts: &Parts) -> bool {
    let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match (header("origin"), header("host")) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            let o = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")).unwrap_or("");
            o.eq_ignore_ascii_case(host)
        }
        (Some(_), None) => false,
    }
}

/// Whether the `Host` header names this machine's loopback (or is absent, as
/// from an HTTP/1.0 tool). Anything else is a browser sent here by a foreign name.
fn host_is_loopback(parts: &Parts) -> bool {
    let Some(host) = parts.headers.get(hyper::header::HOST).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn read_form(body: Incoming) -> Result<String, Box<Resp>> {
    match tokio::time::timeout(FORM_TIMEOUT, Limited::new(body, MAX_FORM_BYTES).collect()).await {
        Ok(Ok(b)) => Ok(String::from_utf8_lossy(&b.to_bytes()).into_owned()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Box::new(json_error(StatusCode::PAYLOAD_TOO_LARGE, &format!("admin request bodies are at most {MAX_FORM_BYTES} bytes"))))
        }
        Ok(Err(e)) => Err(Box::new(json_error(StatusCode::BAD_REQUEST, &format!("could not read the request body: {e}")))),
        Err(_) => Err(Box::new(json_error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("request body not received within {}", humantime::format_duration(FORM_TIMEOUT)),
        ))),
    }
}

fn login_form(cfg: &Config, query: &str) -> Resp {
    if cfg.admin.token.is_none() {
        return redirect("/");
    }
    let next = form_value(query, "next").unwrap_or_default();
    page::login(StatusCode::OK, &safe_next(&next), None)
}

fn login(cfg: &Config, form: &str, ops: &Ops, ip: IpAddr) -> Resp {
    let Some(token) = &cfg.admin.token else { return redirect("/") };
    let gate = ops.fail_gate();
    let next = safe_next(&form_value(form, "next").unwrap_or_default());
    if let Err(wait) = gate.check(ip) {
        return too_many_tries(wait, false);
    }
    let given = form_value(form, "token").unwrap_or_default();
    if !crypto::secret_eq(given.as_bytes(), token.expose()) {
        tracing::warn!(client = %ip, "admin page: login with a wrong token");
        wrong_token(gate, ip);
        return page::login(StatusCode::UNAUTHORIZED, &next, Some("That is not the admin token."));
    }
    let cookie =
        format!("{COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict", ops.sessions().create(token.expose()), SESSION_TTL.as_secs());
    let mut resp = redirect(&next);
    resp.headers_mut().insert(SET_COOKIE, HeaderValue::from_str(&cookie).expect("cookie is ASCII: hex and fixed text"));
    resp
}

/// Ends the sessions the request carries (server-side: a copy of the cookie
/// stops working too) and tells the browser to forget the cookie.
fn logout(parts: &Parts, sessions: &Sessions) -> Resp {
    for value in session_cookies(parts) {
        sessions.revoke(value);
    }
    let mut resp = redirect("/login");
    resp.headers_mut().insert(SET_COOKIE, HeaderValue::from_static("hooktrail_admin=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"));
    resp
}

/// A local path to go back to after login; anything that could leave the site is `/`.
fn safe_next(next: &str) -> String {
    let local = next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') && !next.chars().any(char::is_control);
    if local {
        next.to_string()
    } else {
        "/".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn routes_map_paths_and_methods() {
        assert_eq!(route(&Method::GET, "/healthz"), Route::Healthz);
        assert_eq!(route(&Method::GET, "/api/events/evt_1"), Route::ApiEvent("evt_1"));
        assert_eq!(route(&Method::POST, "/api/events/evt_1/replay"), Route::ApiReplay("evt_1"));
        assert_eq!(route(&Method::GET, "/api/events/evt_1/replay"), Route::WrongMethod("POST"));
        assert_eq!(route(&Method::GET, "/"), Route::PageList);
        assert_eq!(route(&Method::POST, "/api/replay"), Route::ApiBulkReplay);
        assert_eq!(route(&Method::GET, "/api/replay"), Route::WrongMethod("POST"));
        assert_eq!(route(&Method::GET, "/replay"), Route::PageBulkConfirm);
        assert_eq!(route(&Method::POST, "/replay"), Route::PageBulkReplay);
        assert_eq!(route(&Method::GET, "/events/"), Route::NotFound);
        assert_eq!(route(&Method::DELETE, "/metrics"), Route::WrongMethod("GET, HEAD"));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        assert!(same_site(&parts(Method::POST, &[])));
        assert!(same_site(&parts(Method::POST, &[("host", "127.0.0.1:9090"), ("origin", "http://127.0.0.1:9090")])));
        assert!(!same_site(&parts(Method::POST, &[("host", "127.0.0.1:9090"), ("origin", "https://evil.example")])));
        assert!(!same_site(&parts(Method::POST, &[("sec-fetch-site", "cross-site")])));
        assert!(!same_site(&parts(Method::POST, &[("host", "127.0.0.1:9090"), ("origin", "null")])));
    }

    #[test]
    fn only_loopback_hosts_pass_without_a_token() {
        for ok in ["127.0.0.1:9090", "localhost:9090", "[::1]:9090", "LOCALHOST", "127.0.0.2"] {
            assert!(host_is_loopback(&parts(Method::GET, &[("host", ok)])), "{ok}");
        }
        for bad in ["rebind.evil.example:9090", "10.0.0.1:9090", "localhost.evil.example"] {
            assert!(!host_is_loopback(&parts(Method::GET, &[("host", bad)])), "{bad}");
        }
    }

    #[test]
    fn login_never_sends_you_elsewhere() {
        assert_eq!(safe_next("/events/evt_1?x=1"), "/events/evt_1?x=1");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(safe_next("/\\evil.example"), "/");
    }
}
