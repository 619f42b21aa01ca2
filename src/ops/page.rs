//! The event-log page: plain server-rendered HTML on the admin listener, for
//! answering "what happened to this lead?" from a browser. No build step, no
//! external assets, no JavaScript: inline CSS, GET forms for filters, POST
//! forms for replay (one event, or every failed event matching the filters
//! after a confirmation page), and an inline SVG chart drawn here.
//!
//! Everything shown comes from webhook senders, so every string that reaches
//! the HTML goes through [`esc`] (text and attribute context alike), and the
//! Content-Security-Policy forbids scripts outright: even a missed escape
//! could not run code.

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, Timelike, Utc};
use hyper::header::HeaderValue;
use hyper::StatusCode;

use super::api::{self, Params};
use super::respond::{form_value, redirect, respond, Resp};
use super::Ops;
use crate::store::{rfc3339, DeliveryRecord, EventId, EventRecord, EventStatus, HourCounts};

const CSS: &str = r#"
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2937;background:#f8fafc}
header{background:#0f172a;color:#e2e8f0;padding:.6rem 1.2rem;display:flex;gap:1rem;align-items:center}
header a{color:#e2e8f0;text-decoration:none;font-weight:600}
header form{margin-left:auto}
main{padding:1rem 1.2rem;max-width:1400px}
h1{font-size:1.3rem;margin:.2rem 0 1rem}
h2{font-size:1.05rem;margin:1.4rem 0 .5rem}
h3{font-size:.95rem;margin:1rem 0 .4rem}
a{color:#1d4ed8}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{background:#f1f5f9;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#fff;border:1px solid #e5e7eb;padding:.6rem;overflow:auto;max-height:28rem;white-space:pre-wrap;word-break:break-all}
.badge{display:inline-block;padding:0 .45rem;border-radius:.6rem;font-size:12px;font-weight:600;color:#fff}
.s-pending{background:#6b7280}.s-processing,.s-running{background:#2563eb}
.s-retrying,.s-retry{background:#d97706}.s-done,.s-succeeded,.s-success{background:#16a34a}
.s-failed,.s-failure{background:#dc2626}
.s-skipped{background:#6b7280}
form.filters{display:flex;flex-wrap:wrap;gap:.6rem;align-items:end;margin:.8rem 0;background:#fff;padding:.6rem;border:1px solid #e5e7eb}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#475569}
input,select,button{font:inherit;padding:.25rem .4rem}
button{cursor:pointer}
.notice{background:#ecfdf5;border:1px solid #86efac;padding:.5rem .7rem;margin:.6rem 0}
.error{background:#fef2f2;border:1px solid #fca5a5;padding:.5rem .7rem;margin:.6rem 0}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;background:#fff;padding:.6rem;border:1px solid #e5e7eb}
dl.meta dt{color:#475569}dl.meta dd{margin:0;word-break:break-all}
.delivery{background:#fff;border:1px solid #e5e7eb;padding:.4rem .7rem;margin:.6rem 0}
.actions{display:flex;gap:.5rem;margin:.6rem 0}
.chart{background:#fff;border:1px solid #e5e7eb;padding:.4rem}
.chart svg{width:100%;max-width:760px;height:auto}
.c-recv{fill:#94a3b8}.c-ok{fill:#16a34a}.c-fail{fill:#dc2626}
.legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .25rem 0 .8rem;vertical-align:middle}
.legend .c-recv{background:#94a3b8}.legend .c-ok{background:#16a34a}.legend .c-fail{background:#dc2626}
.axis{font-size:10px;fill:#64748b}
.muted{color:#64748b}
"#;

/// Escapes text for HTML text and (quoted) attribute context.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole HTML page with the hardening headers; `logged_in` shows "log out".
fn html(status: StatusCode, title: &str, body: &str, logged_in: bool) -> Resp {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let logout = if logged_in { r#"<form method="post" action="/logout"><button type="submit">Log out</button></form>"# } else { "" };
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · hooktrail</title><style nonce=\"{nonce}\">{CSS}</style></head>\
         <body><header><a href=\"/\">hooktrail · event log</a><span class=\"muted\">v{version}</span>{logout}</header>\
         <main>{body}</main></body></html>\n",
        title = esc(title),
        version = env!("CARGO_PKG_VERSION"),
    );
    let mut resp = respond(status, "text/html; charset=utf-8", page);
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    resp.headers_mut().insert("content-security-policy", HeaderValue::from_str(&csp).expect("nonce is hex"));
    resp
}

fn error_page(status: StatusCode, message: &str, logged_in: bool) -> Resp {
    let body = format!("<h1>{}</h1><div class=\"error\">{}</div><p><a href=\"/\">Back to the event log</a></p>", status, esc(message));
    html(status, status.canonical_reason().unwrap_or("Error"), &body, logged_in)
}

pub(super) fn not_found(message: &str) -> Resp {
    error_page(StatusCode::NOT_FOUND, message, false)
}

/// The login form (the admin token in a password field; see `admin` for the cookie).
pub(super) fn login(status: StatusCode, next: &str, error: Option<&str>) -> Resp {
    let error = error.map(|e| format!("<div class=\"error\">{}</div>", esc(e))).unwrap_or_default();
    let body = format!(
        "<h1>Log in</h1>{error}<p>This admin listener is protected by the token in its <code>admin.token_env</code> variable.</p>\
         <form method=\"post\" action=\"/login\" class=\"filters\">\
         <input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required autofocus></label>\
         <button type=\"submit\" id=\"login\">Log in</button></form>",
        next = esc(next),
    );
    html(status, "Log in", &body, false)
}

fn badge(status: &str) -> String {
    format!("<span class=\"badge s-{0}\">{0}</span>", esc(status))
}

/// Up to `max` characters of `s`, with an ellipsis when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The list's query parameter that carries the outcome of a bulk replay back
/// to the list (post/redirect/get); not a filter.
const FLASH: &str = "requeued";

/// The list's filters as a bulk replay carries them: without paging (it takes
/// every matching event, not one page) and without the flash.
fn bulk_filters(list: &Params) -> Params {
    list.without(&["limit", "cursor", FLASH])
}

/// The bulk-replay selection for the list's filters: the same filters
/// narrowed to failed events, as `events replay --status failed` takes them.
/// `None` when the list is filtered to another status, so nothing it shows
/// is failed.
fn failed_selection(filters: &Params) -> Option<Params> {
    match filters.get("status") {
        None => Some(filters.with("status", EventStatus::Failed.as_str())),
        Some(s) if s == EventStatus::Failed.as_str() => Some(filters.clone()),
        Some(_) => None,
    }
}

/// Hidden form fields carrying `p` unchanged.
fn hidden(p: &Params) -> String {
    p.0.iter().map(|(k, v)| format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", esc(k), esc(v))).collect()
}

fn deliveries_word(n: u64) -> &'static str {
    if n == 1 {
        "delivery"
    } else {
        "deliveries"
    }
}

/// The "Replay failed (N)" button for the list's filters, or nothing when no
/// failed delivery matches them.
async fn bulk_button(ops: &Ops, filters: &Params) -> String {
    let Some(filter) = failed_selection(filters).and_then(|sel| api::bulk_filter(&sel).ok()) else {
        return String::new();
    };
    let plan = match api::bulk_plan(ops, filter).await {
        Ok(plan) if !plan.deliveries.is_empty() => plan,
        Ok(_) => return String::new(),
        Err(e) => return format!("<div class=\"error\">failed deliveries unavailable: {}</div>", esc(&e.to_string())),
    };
    format!(
        "<form method=\"get\" action=\"/replay\" class=\"actions\" id=\"bulk\">{}<button type=\"submit\" id=\"bulk-replay\">Replay failed ({})</button>\
         <span class=\"muted\">every failed delivery of the failed events matching these filters, not only this page; asks first</span></form>",
        hidden(filters),
        plan.deliveries.len(),
    )
}

/// `GET /`: the filter form, the chart, and one page of events.
pub(super) async fn list(ops: &Ops, query: &str, logged_in: bool) -> Resp {
    let all = Params::parse(query).unwrap_or_default();
    let params = plain_matches_search(&all.without(&[FLASH]));
    let mut body = String::new();
    body.push_str("<h1>Events</h1>");
    if let Some(n) = all.get(FLASH).and_then(|n| n.parse::<u64>().ok()) {
        let _ = write!(
            body,
            "<div class=\"notice\" id=\"requeued\">Re-queued {n} failed {}. Reload to follow the new attempts.</div>",
            deliveries_word(n)
        );
    }
    match ops.hourly_chart().await {
        Ok(rows) => body.push_str(&chart(&rows, Utc::now())),
        Err(e) => {
            let _ = write!(body, "<div class=\"error\">chart unavailable: {}</div>", esc(&e.to_string()));
        }
    }
    body.push_str(&filter_form(ops, &params));
    let filter = match Params::parse(query).and_then(|p| api::event_filter(&plain_matches_search(&p.without(&[FLASH])))) {
        Ok(f) => f,
        Err(e) => {
            let _ = write!(body, "<div class=\"error\" id=\"filter-error\">{}</div>", esc(&e));
            return html(StatusCode::BAD_REQUEST, "Events", &body, logged_in);
        }
    };
    body.push_str(&bulk_button(ops, &bulk_filters(&params)).await);
    let (events, next) = match api::event_page(ops, filter).await {
        Ok(x) => x,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), logged_in),
    };
    body.push_str(&event_table(&events));
    if let Some(cursor) = next {
        let _ = write!(body, "<p><a id=\"older\" href=\"/?{}\">Older events →</a></p>", esc(&with_cursor(&params, cursor)));
    }
    html(StatusCode::OK, "Events", &body, logged_in)
}

/// Plain text typed into "Payload match" (no `/pointer=`) is a search
/// (README "The event-log page"): it becomes the `search` filter, unless
/// the search box already has one, rather than an error that hides the list.
fn plain_matches_search(p: &Params) -> Params {
    let plain: Vec<&str> = p.all("match").filter(|m| !m.starts_with('/')).collect();
    let Some(first) = plain.first() else { return p.clone() };
    let mut out = Params(p.0.iter().filter(|(k, v)| k != "match" || v.starts_with('/')).cloned().collect());
    if out.get("search").is_none() {
        out.0.push(("search".to_string(), first.to_string()));
    }
    out
}

/// The current filters with `cursor` replaced, as a query string.
fn with_cursor(params: &Params, cursor: EventId) -> String {
    let c = cursor.to_string();
    let mut pairs: Vec<(&str, &str)> = params.0.iter().filter(|(k, _)| k != "cursor").map(|(k, v)| (k.as_str(), v.as_str())).collect();
    pairs.push(("cursor", &c));
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn filter_form(ops: &Ops, p: &Params) -> String {
    let cfg = ops.config();
    let v = |k: &str| esc(p.get(k).unwrap_or(""));
    let mut f = String::from("<form method=\"get\" action=\"/\" class=\"filters\" id=\"filters\">");
    let _ = write!(f, "<label>Source <input name=\"source\" list=\"sources\" value=\"{}\" size=\"14\"></label>", v("source"));
    f.push_str("<datalist id=\"sources\">");
    for s in &cfg.sources {
        let _ = write!(f, "<option value=\"{}\">", esc(&s.name));
    }
    f.push_str("</datalist><label>Status <select name=\"status\"><option value=\"\">any</option>");
    for s in EventStatus::ALL {
        let sel = if p.get("status") == Some(s.as_str()) { " selected" } else { "" };
        let _ = write!(f, "<option value=\"{0}\"{sel}>{0}</option>", s.as_str());
    }
    let _ = write!(
        f,
        "</select></label><label>Handler <input name=\"handler\" list=\"handlers\" value=\"{}\" size=\"14\"></label>",
        v("handler")
    );
    f.push_str("<datalist id=\"handlers\">");
    for h in cfg.handlers.keys() {
        let _ = write!(f, "<option value=\"{}\">", esc(h));
    }
    let _ = write!(
        f,
        "</datalist><label>Since <input name=\"since\" value=\"{}\" placeholder=\"2h or 2026-01-31T10:00:00Z\" size=\"20\"></label>",
        v("since")
    );
    let _ = write!(
        f,
        "<label>Search <input name=\"search\" id=\"search\" value=\"{}\" placeholder=\"dgolden@mid-corp.com, a name, an id\" size=\"28\"></label>",
        v("search")
    );
    // One field per match already applied, plus an empty one to add another.
    for m in p.all("match").chain(std::iter::once("")) {
        let _ = write!(
            f,
            "<label>Payload match <input name=\"match\" value=\"{}\" placeholder=\"/submission_values/email_address/0=a@b.c\" size=\"36\"></label>",
            esc(m)
        );
    }
    if let Some(l) = p.get("limit") {
        let _ = write!(f, "<input type=\"hidden\" name=\"limit\" value=\"{}\">", esc(l));
    }
    f.push_str("<button type=\"submit\" id=\"apply\">Filter</button><a href=\"/\">Reset</a></form>");
    f
}

fn event_table(events: &[EventRecord]) -> String {
    if events.is_empty() {
        return "<p class=\"muted\" id=\"no-events\">No events match.</p>".into();
    }
    let mut t = String::from(
        "<table id=\"events\"><thead><tr><th>Received (UTC)</th><th>Event</th><th>Source</th><th>Status</th>\
         <th>Type</th><th class=\"num\">Bytes</th><th>Payload</th></tr></thead><tbody>",
    );
    for e in events {
        let payload = clip(&serde_json::to_string(&e.payload).unwrap_or_default(), 120);
        let _ = write!(
            t,
            "<tr class=\"event\" data-status=\"{status}\"><td>{received}</td><td><a href=\"/events/{id}\"><code>{id}</code></a></td>\
             <td>{source}</td><td>{badge}</td><td>{ct}</td><td class=\"num\">{bytes}</td><td><code>{payload}</code></td></tr>",
            status = e.status,
            received = rfc3339(e.received_at),
            id = e.id,
            source = esc(&e.source),
            badge = badge(e.status.as_str()),
            ct = esc(&e.content_type),
            bytes = e.body_bytes,
            payload = esc(&payload),
        );
    }
    t.push_str("</tbody></table>");
    t
}

/// Received, succeeded (done) and failed events per hour over the last 24
/// hours, as grouped bars in an inline SVG.
fn chart(rows: &[HourCounts], now: DateTime<Utc>) -> String {
    const SLOT: i64 = 30;
    const LEFT: i64 = 40;
    const TOP: i64 = 8;
    const PLOT: i64 = 110;
    let by_hour: HashMap<i64, &HourCounts> = rows.iter().map(|r| (r.hour.timestamp() / 3600, r)).collect();
    let this_hour = now.timestamp().div_euclid(3600);
    let max = rows.iter().map(|r| r.received).max().unwrap_or(0).max(1);
    let width = LEFT + 24 * SLOT + 10;
    let mut s = format!(
        "<div class=\"chart\"><svg id=\"chart\" viewBox=\"0 0 {width} 150\" role=\"img\" aria-label=\"Events per hour over the last 24 hours\">\
         <text class=\"axis\" x=\"{x}\" y=\"{y0}\" text-anchor=\"end\">{max}</text><text class=\"axis\" x=\"{x}\" y=\"{y1}\" text-anchor=\"end\">0</text>\
         <line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{width}\" y2=\"{base}\" stroke=\"#cbd5e1\"/>",
        x = LEFT - 6,
        y0 = TOP + 8,
        y1 = TOP + PLOT,
        base = TOP + PLOT,
    );
    for i in 0..24 {
        let hour = this_hour - 23 + i;
        let c = by_hour.get(&hour);
        let label = DateTime::from_timestamp(hour * 3600, 0).map(|t| format!("{:02}:00", t.hour())).unwrap_or_default();
        let x0 = LEFT + i * SLOT;
        for (k, (class, what, n)) in [
            ("c-recv", "received", c.map_or(0, |c| c.received)),
            ("c-ok", "succeeded", c.map_or(0, |c| c.done)),
            ("c-fail", "failed", c.map_or(0, |c| c.failed)),
        ]
        .into_iter()
        .enumerate()
        {
            let h = (n as f64 / max as f64 * PLOT as f64).round() as i64;
            let h = if n > 0 { h.max(1) } else { 0 };
            let _ = write!(
                s,
                "<rect class=\"{class}\" x=\"{x}\" y=\"{y}\" width=\"8\" height=\"{h}\"><title>{label} UTC: {n} {what}</title></rect>",
                x = x0 + 3 + k as i64 * 8,
                y = TOP + PLOT - h,
            );
        }
        if i % 3 == 0 {
            let _ = write!(s, "<text class=\"axis\" x=\"{}\" y=\"{}\">{label}</text>", x0 + 1, TOP + PLOT + 16);
        }
    }
    s.push_str(
        "</svg><div class=\"legend muted\">per hour, UTC:<span class=\"c-recv\"></span>received<span class=\"c-ok\"></span>succeeded\
         <span class=\"c-fail\"></span>failed</div></div>",
    );
    s
}

/// `GET /events/{id}`: metadata, replay buttons, deliveries with every
/// attempt and its output, normalized payload, raw body and headers.
pub(super) async fn event(ops: &Ops, id: &str, query: &str, logged_in: bool) -> Resp {
    let Ok(id) = id.parse::<EventId>() else {
        return error_page(StatusCode::NOT_FOUND, &format!("`{id}` is not an event id."), logged_in);
    };
    let ev = match ops.store.get_event(id).await {
        Ok(Some(ev)) => ev,
        Ok(None) => return error_page(StatusCode::NOT_FOUND, &format!("No event {id}."), logged_in),
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), logged_in),
    };
    let mut b = String::new();
    let _ = write!(b, "<p><a href=\"/\">← all events</a></p><h1><code>{}</code> {}</h1>", ev.id, badge(ev.status.as_str()));
    if let Some(n) = form_value(query, "replayed") {
        let n: u64 = n.parse().unwrap_or(0);
        let _ = write!(
            b,
            "<div class=\"notice\" id=\"replayed\">Re-queued {n} deliver{}. Reload to follow the new attempts.</div>",
            if n == 1 { "y" } else { "ies" }
        );
    }
    let _ = write!(
        b,
        "<dl class=\"meta\"><dt>Source</dt><dd>{}</dd><dt>Received</dt><dd>{}</dd><dt>Method</dt><dd>{}</dd>\
         <dt>Content type</dt><dd>{}</dd><dt>Query</dt><dd><code>{}</code></dd><dt>Remote address</dt><dd>{}</dd>\
         <dt>Body</dt><dd>{} bytes</dd></dl>",
        esc(&ev.source),
        rfc3339(ev.received_at),
        esc(&ev.method),
        esc(&ev.content_type),
        esc(&ev.query),
        esc(&ev.remote_addr),
        ev.body_bytes,
    );
    let deliveries = ev.deliveries.as_deref().unwrap_or_default();
    b.push_str("<h2>Deliveries</h2>");
    if deliveries.is_empty() {
        b.push_str("<p class=\"muted\">No handler is routed to this event.</p>");
    } else {
        let _ = write!(
            b,
            "<div class=\"actions\"><form method=\"post\" action=\"/events/{}/replay\"><button type=\"submit\" id=\"replay\">Replay all deliveries</button></form></div>",
            ev.id
        );
        for d in deliveries {
            b.push_str(&delivery(&ev, d));
        }
    }
    let _ = write!(b, "<h2>Normalized payload</h2><pre id=\"payload\">{}</pre>", esc(&pretty(&ev.payload)));
    match (&ev.body, &ev.body_base64) {
        (Some(body), _) => {
            let _ = write!(b, "<h2>Raw body</h2><pre id=\"body\">{}</pre>", esc(body));
        }
        (None, Some(b64)) => {
            let _ = write!(b, "<h2>Raw body <span class=\"muted\">(not UTF-8; base64)</span></h2><pre id=\"body\">{}</pre>", esc(b64));
        }
        (None, None) => {}
    }
    if let Some(h) = &ev.headers {
        let _ = write!(b, "<h2>Headers <span class=\"muted\">(secrets redacted)</span></h2><pre id=\"headers\">{}</pre>", esc(&pretty(h)));
    }
    html(StatusCode::OK, &ev.id.to_string(), &b, logged_in)
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn delivery(ev: &EventRecord, d: &DeliveryRecord) -> String {
    let mut s = format!(
        "<section class=\"delivery\" data-handler=\"{h}\"><h3>{h} {badge} <span class=\"muted\">{n} attempt{plural}</span></h3>",
        h = esc(&d.handler),
        badge = badge(d.status.as_str()),
        n = d.attempt_count,
        plural = if d.attempt_count == 1 { "" } else { "s" },
    );
    if let Some(blocker) = &d.blocked_by {
        let _ = write!(
            s,
            "<p class=\"blocked-by\">Blocked by <a href=\"/events/{blocker}\">{blocker}</a>: its delivery failed and holds this ordering key \
             until it is replayed and succeeds, or is skipped (<code>hooktrail events skip {blocker} --handler {h}</code>).</p>",
            h = esc(&d.handler),
        );
    } else if let Some(next) = &d.next_attempt_at {
        let _ = write!(s, "<p class=\"muted\">Next attempt at {}</p>", rfc3339(*next));
    }
    let _ = write!(
        s,
        "<form method=\"post\" action=\"/events/{}/replay\"><input type=\"hidden\" name=\"handler\" value=\"{}\">\
         <button type=\"submit\" class=\"replay-one\">Replay this delivery</button></form>",
        ev.id,
        esc(&d.handler)
    );
    if d.attempts.is_empty() {
        s.push_str("<p class=\"muted\">No attempt yet.</p></section>");
        return s;
    }
    s.push_str(
        "<table class=\"attempts\"><thead><tr><th>#</th><th>Started (UTC)</th><th class=\"num\">ms</th><th>Outcome</th>\
         <th>Result</th><th>Error</th><th>Output</th></tr></thead><tbody>",
    );
    for a in &d.attempts {
        let result = match (a.exit_code, a.http_status) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(st)) => format!("HTTP {st}"),
            (None, None) => String::new(),
        };
        let output = if a.output.is_empty() {
            "<span class=\"muted\">—</span>".to_string()
        } else {
            format!("<details><summary>{} bytes</summary><pre>{}</pre></details>", a.output.len(), esc(&a.output))
        };
        let _ = write!(
            s,
            "<tr class=\"attempt\"><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a.number,
            rfc3339(a.started_at),
            a.duration_ms,
            badge(a.outcome.as_str()),
            esc(&result),
            esc(a.error.as_deref().unwrap_or("")),
            output,
        );
    }
    s.push_str("</tbody></table></section>");
    s
}

/// `POST /events/{id}/replay` (form field `handler` optional): re-queues,
/// then sends the browser back to the event (post/redirect/get).
pub(super) async fn replay(ops: &Ops, id: &str, form: &str) -> Resp {
    let handler = form_value(form, "handler").filter(|h| !h.is_empty());
    match api::replay_event(ops, id, handler).await {
        Ok((id, n)) => redirect(&format!("/events/{id}?replayed={n}")),
        Err((status, msg)) => error_page(status, &msg, ops.config().admin.token.is_some()),
    }
}

/// `GET /replay?FILTERS`: what a bulk replay of the list's filters would
/// re-queue, and a form to confirm it; changes nothing.
pub(super) async fn bulk_confirm(ops: &Ops, query: &str, logged_in: bool) -> Resp {
    match Params::parse(query) {
        Ok(p) => confirm_page(ops, &bulk_filters(&p), None, logged_in).await,
        Err(e) => error_page(StatusCode::BAD_REQUEST, &e, logged_in),
    }
}

/// Most deliveries the confirmation page lists one by one.
const CONFIRM_LIST: usize = 50;

/// The confirmation page for `filters`; `changed` is the count the user had
/// confirmed when it no longer holds (answered 409, to confirm again).
async fn confirm_page(ops: &Ops, filters: &Params, changed: Option<usize>, logged_in: bool) -> Resp {
    let Some(selection) = failed_selection(filters) else {
        let msg =
            "Bulk replay re-queues failed events only, and these filters ask for another status. Set the status filter to failed or any.";
        return error_page(StatusCode::BAD_REQUEST, msg, logged_in);
    };
    let filter = match api::bulk_filter(&selection) {
        Ok(f) => f,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e, logged_in),
    };
    let plan = match api::bulk_plan(ops, filter).await {
        Ok(plan) => plan,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), logged_in),
    };
    let back = format!("/?{}", filters.encode());
    let mut b = String::from("<h1>Replay failed deliveries</h1>");
    let _ = write!(b, "<p class=\"muted\" id=\"bulk-filters\">Filters:");
    for (k, v) in &selection.0 {
        let _ = write!(b, " <code>{}={}</code>", esc(k), esc(v));
    }
    b.push_str("</p>");
    let status = match changed {
        Some(was) => {
            let _ = write!(
                b,
                "<div class=\"error\" id=\"count-changed\">The selection changed since you looked ({was} then, {} now); nothing was re-queued. Confirm again.</div>",
                plan.deliveries.len()
            );
            StatusCode::CONFLICT
        }
        None => StatusCode::OK,
    };
    let n = plan.deliveries.len();
    if n == 0 {
        let _ = write!(
            b,
            "<p id=\"no-failed\">No failed delivery matches these filters; nothing to re-queue.</p><p><a href=\"{}\">Back</a></p>",
            esc(&back)
        );
        return html(status, "Replay failed", &b, logged_in);
    }
    let m = plan.touched_events();
    let _ = write!(
        b,
        "<p id=\"bulk-count\">Re-queue <strong id=\"bulk-deliveries\">{n}</strong> failed {} of <strong id=\"bulk-events\">{m}</strong> event{}? \
         Attempt numbers continue and the history is kept.</p>\
         <form method=\"post\" action=\"/replay\" class=\"actions\">{}<input type=\"hidden\" name=\"expect\" value=\"{n}\">\
         <button type=\"submit\" id=\"confirm\">Confirm</button><a id=\"cancel\" href=\"{}\">Cancel</a></form>",
        deliveries_word(n as u64),
        if m == 1 { "" } else { "s" },
        hidden(filters),
        esc(&back),
    );
    b.push_str("<table id=\"bulk-list\"><thead><tr><th>Event</th><th>Handler</th><th class=\"num\">Attempts</th></tr></thead><tbody>");
    for d in plan.deliveries.iter().take(CONFIRM_LIST) {
        let _ = write!(
            b,
            "<tr><td><a href=\"/events/{0}\"><code>{0}</code></a></td><td>{1}</td><td class=\"num\">{2}</td></tr>",
            d.event_id,
            esc(&d.handler),
            d.attempt_count
        );
    }
    b.push_str("</tbody></table>");
    if n > CONFIRM_LIST {
        let _ = write!(b, "<p class=\"muted\">…and {} more.</p>", n - CONFIRM_LIST);
    }
    html(status, "Replay failed", &b, logged_in)
}

/// `POST /replay` (the confirmation form: the list's filters and `expect`,
/// the count the user saw): counts again, re-queues only if the count still
/// holds (else asks again), then sends the browser back to the list with
/// how many were re-queued (post/redirect/get).
pub(super) async fn bulk_replay(ops: &Ops, form: &str, logged_in: bool) -> Resp {
    let p = match Params::parse(form) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e, logged_in),
    };
    let Some(expect) = p.get("expect").and_then(|n| n.parse::<usize>().ok()) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "The confirmation lacks the count it confirmed; start the bulk replay from the event list again.",
            logged_in,
        );
    };
    let filters = bulk_filters(&p.without(&["expect"]));
    let Some(filter) = failed_selection(&filters).and_then(|sel| api::bulk_filter(&sel).ok()) else {
        // Says what is wrong with the filters.
        return confirm_page(ops, &filters, None, logged_in).await;
    };
    let plan = match api::bulk_plan(ops, filter).await {
        Ok(plan) => plan,
        Err(e) => return error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), logged_in),
    };
    if plan.deliveries.len() != expect {
        return confirm_page(ops, &filters, Some(expect), logged_in).await;
    }
    match api::bulk_replay(ops, &plan).await {
        Ok(n) => redirect(&format!("/?{}", filters.with(FLASH, &n.to_string()).encode())),
        Err(e) => error_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), logged_in),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(esc(r#"<script>alert("x")</script>&'"#), "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;");
    }

    #[test]
    fn bulk_replay_takes_the_list_filters_narrowed_to_failed_without_paging() {
        let p = |q: &str| Params::parse(q).unwrap();
        let filters = bulk_filters(&p("source=nr&limit=10&cursor=evt_x&requeued=3&match=/a=b"));
        assert_eq!(filters.encode(), "source=nr&match=%2Fa%3Db");
        assert_eq!(failed_selection(&filters).unwrap().encode(), "source=nr&match=%2Fa%3Db&status=failed");
        assert_eq!(failed_selection(&p("status=failed&source=nr")).unwrap().encode(), "status=failed&source=nr");
        assert!(failed_selection(&p("status=done")).is_none(), "a list of done events has nothing failed to replay");
        assert_eq!(hidden(&p("source=%22%3E")), "<input type=\"hidden\" name=\"source\" value=\"&quot;&gt;\">");
    }

    #[test]
    fn clip_cuts_on_character_boundaries() {
        assert_eq!(clip("ééééé", 3), "ééé…");
        assert_eq!(clip("abc", 3), "abc");
    }

    #[test]
    fn chart_draws_24_hours_with_counts_in_titles() {
        let now = DateTime::parse_from_rfc3339("2026-01-31T10:30:00Z").unwrap().with_timezone(&Utc);
        let hour = DateTime::parse_from_rfc3339("2026-01-31T09:00:00Z").unwrap().with_timezone(&Utc);
        let svg = chart(&[HourCounts { hour, received: 4, done: 3, failed: 1 }], now);
        assert_eq!(svg.matches("<rect").count(), 72);
        assert!(svg.contains("09:00 UTC: 4 received"));
        assert!(svg.contains("09:00 UTC: 1 failed"));
        assert!(svg.contains("10:00 UTC: 0 received"));
    }
}
