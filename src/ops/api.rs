//! The machine-facing admin endpoints: readiness, Prometheus metrics and the
//! JSON API (`/api/events`, `/api/events/{id}`, `/api/events/{id}/replay`,
//! `/api/replay` (bulk), `/api/stats`). Field names are the CLI's `--json` ones (README, "Command line").
//! Query parameters mirror the CLI flags, and [`Params`]/[`event_filter`] are
//! shared with the page so both read filters the same way.

use std::collections::BTreeMap;

use chrono::Utc;
use hyper::StatusCode;
use serde_json::json;

use super::respond::{json, json_error, text, Resp};
use super::Ops;
use crate::metrics::{label, Gauge};
use crate::store::{self, DeliveryStatus, Detail, EventFilter, EventId, EventStatus, Requeue, StoreError};

/// Events per page when the request names no limit.
pub(super) const DEFAULT_LIMIT: usize = 50;
/// Most events one page may ask for.
const MAX_LIMIT: usize = 1000;
/// Query parameters `/api/events` and the page understand.
const EVENT_PARAMS: &[&str] = &["source", "status", "handler", "since", "match", "search", "limit", "cursor"];
/// The filters a bulk replay selects by: those of the list without paging,
/// since it takes every matching event, not one page of them.
pub(super) const BULK_PARAMS: &[&str] = &["source", "status", "handler", "since", "match", "search"];

/// Decoded query parameters, in order. Empty values count as absent, as an
/// untouched field of the page's filter form sends them.
#[derive(Debug, Default, Clone)]
pub(super) struct Params(pub Vec<(String, String)>);

impl Params {
    /// Parses a query string; a parameter that is not urlencoded is an error.
    pub fn parse(query: &str) -> Result<Self, String> {
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .map(|v| Params(v.into_iter().filter(|(_, val)| !val.is_empty()).collect()))
            .map_err(|e| format!("malformed query string: {e}"))
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every value given for `key` (e.g. several `match`), in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// These parameters without any named in `drop`.
    pub fn without(&self, drop: &[&str]) -> Params {
        Params(self.0.iter().filter(|(k, _)| !drop.contains(&k.as_str())).cloned().collect())
    }

    /// Sets `key` to `value` alone, replacing any values it had.
    pub fn with(&self, key: &str, value: &str) -> Params {
        let mut p = self.without(&[key]);
        p.0.push((key.to_string(), value.to_string()));
        p
    }

    /// As a query string (or form body).
    pub fn encode(&self) -> String {
        serde_urlencoded::to_string(&self.0).unwrap_or_default()
    }

    /// Refuses names outside `known`, so a typo (`sorce=`) is an error, not a silent no-op.
    pub fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(format!("unknown query parameter `{k}`; expected one of {}", known.join(", "))),
            None => Ok(()),
        }
    }
}

/// The CLI's `events list` filters from query parameters: `source`, `status`,
/// `handler`, `since` (`2h` or RFC 3339), `match` (repeatable `PTR=VALUE`),
/// `limit` and `cursor` (the `next` of the previous page).
pub(super) fn event_filter(p: &Params) -> Result<EventFilter, String> {
    p.only(EVENT_PARAMS)?;
    let status = p.get("status").map(str::parse::<EventStatus>).transpose().map_err(|e| format!("status: {e}"))?;
    let since = p.get("since").map(store::parse_since).transpose().map_err(|e| format!("since: {e}"))?;
    let matches = p.all("match").map(parse_match).collect::<Result<Vec<_>, _>>()?;
    let search =
        p.get("search").map(|t| store::search::check(t).map(|()| t.to_string())).transpose().map_err(|e| format!("search: {e}"))?;
    let limit = match p.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(format!("limit: `{l}` is not a number from 1 to {MAX_LIMIT}")),
        },
    };
    let before = p.get("cursor").map(str::parse::<EventId>).transpose().map_err(|e| format!("cursor: {e}"))?;
    Ok(EventFilter {
        source: p.get("source").map(str::to_string),
        status,
        handler: p.get("handler").map(str::to_string),
        since,
        matches,
        search,
        limit: Some(limit),
        before,
        ..Default::default()
    })
}

/// `PTR=VALUE`, split at the first `=`: a value may contain `=`, a pointer may not.
fn parse_match(m: &str) -> Result<(String, String), String> {
    let (ptr, val) = m.split_once('=').ok_or_else(|| format!("match `{m}`: expected /json/pointer=value"))?;
    if !ptr.starts_with('/') {
        return Err(format!("match `{m}`: `{ptr}` is not a JSON pointer (it starts with `/`)"));
    }
    Ok((ptr.to_string(), val.to_string()))
}

/// One page of events, newest first, and the cursor of the next page.
pub(super) async fn event_page(ops: &Ops, mut filter: EventFilter) -> Result<(Vec<store::EventRecord>, Option<EventId>), StoreError> {
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT);
    // One more than asked tells whether a next page exists without a second query.
    filter.limit = Some(limit + 1);
    let mut list = ops.store.list_events(filter, Detail::Summary).await?;
    let next = if list.len() > limit {
        list.truncate(limit);
        list.last().map(|e| e.id)
    } else {
        None
    };
    Ok((list, next))
}

pub(super) fn store_error(e: &StoreError) -> Resp {
    tracing::warn!(error = %e, "admin request failed in the store");
    json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
}

pub(super) async fn readyz(ops: &Ops) -> Resp {
    let r = ops.readiness().await;
    let status = if r.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    if !r.ready() {
        tracing::warn!(storage = %r.storage.describe(), listener = %r.listener.describe(), processor = %r.processor.describe(), "not ready");
    }
    json(
        status,
        &json!({
            "ready": r.ready(),
            "storage": r.storage.describe(),
            "listener": r.listener.describe(),
            "processor": r.processor.describe(),
        }),
    )
}

pub(super) async fn metrics(ops: &Ops) -> Resp {
    let cfg = ops.config();
    // Never waits on storage for long (see `Ops::queue_depth`); stale figures
    // say how stale they are, and none are made up before the first read.
    let (queue_age, queue) = match ops.queue_depth().await {
        Some((age, q)) => (age.as_secs_f64(), Some(q)),
        None => (-1.0, None),
    };
    // Every configured handler gets every unfinished state, zeros included, so
    // an alert on "pending > N" sees a series from the start.
    let waiting = [DeliveryStatus::Pending, DeliveryStatus::Retrying, DeliveryStatus::Running];
    let mut depth: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut oldest: BTreeMap<String, f64> = BTreeMap::new();
    if queue.is_some() {
        oldest = cfg.handlers.keys().map(|h| (h.clone(), 0.0)).collect();
        for h in cfg.handlers.keys() {
            for s in waiting {
                depth.insert((h.clone(), s.as_str()), 0);
            }
        }
    }
    let now = Utc::now();
    for q in queue.iter().flat_map(|q| q.iter()) {
        *depth.entry((q.handler.clone(), q.status.as_str())).or_default() += q.count;
        if q.status == DeliveryStatus::Running {
            continue;
        }
        if let Some(t) = q.oldest_queued_at {
            let age = (now - t).num_milliseconds().max(0) as f64 / 1000.0;
            let e = oldest.entry(q.handler.clone()).or_default();
            *e = e.max(age);
        }
    }
    let mut gauges = vec![
        Gauge {
            name: "hooktrail_queue_depth",
            help: "Unfinished deliveries, by handler and status (pending, retrying, running).",
            values: depth.into_iter().map(|((h, s), n)| (format!("{},{}", label("handler", &h), label("status", s)), n as f64)).collect(),
        },
        Gauge {
            name: "hooktrail_oldest_pending_seconds",
            help: "Age of the longest-waiting pending or retrying delivery, by handler (0 when none waits).",
            values: oldest.into_iter().map(|(h, age)| (label("handler", &h), age)).collect(),
        },
        Gauge {
            name: "hooktrail_queue_depth_age_seconds",
            help: "Age of the two gauges above: near 0 when read for this scrape; more when storage did not answer within 1s and the last figures are served; -1 before any.",
            values: vec![(String::new(), queue_age)],
        },
        Gauge {
            name: "hooktrail_backlog_deliveries",
            help: "Unfinished deliveries in total (what ingest compares with server.max_backlog).",
            values: vec![(String::new(), ops.store.backlog() as f64)],
        },
    ];
    // Ordering keys held by a failed delivery (`on_failure = "block"`): a
    // small indexed read; left out of this scrape when storage is slow.
    if let Ok(Ok(rows)) = tokio::time::timeout(std::time::Duration::from_secs(1), ops.store.blocked_keys()).await {
        let mut blocked: BTreeMap<String, u64> =
            cfg.handlers.values().filter(|h| h.ordering.is_some()).map(|h| (h.name.clone(), 0)).collect();
        for r in rows {
            blocked.insert(r.handler, r.keys);
        }
        gauges.push(Gauge {
            name: "hooktrail_blocked_keys",
            help: "Ordering keys held by a failed delivery (on_failure = \"block\") until it is replayed and succeeds or is skipped, by handler.",
            values: blocked.into_iter().map(|(h, n)| (label("handler", &h), n as f64)).collect(),
        });
    }
    if ops.role.processes() {
        let idle = ops.metrics.since_processor_round().map_or(-1.0, |d| d.as_secs_f64());
        gauges.push(Gauge {
            name: "hooktrail_processor_last_round_seconds",
            help: "Seconds since the processor loop last looked for work (-1 before its first round).",
            values: vec![(String::new(), idle)],
        });
    }
    gauges.push(Gauge {
        name: "hooktrail_build_info",
        help: "Always 1; the version label says which build runs.",
        values: vec![(label("version", env!("CARGO_PKG_VERSION")), 1.0)],
    });
    let mut resp = text(StatusCode::OK, ops.metrics.render(&gauges));
    resp.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}

pub(super) async fn events(ops: &Ops, query: &str) -> Resp {
    let filter = match Params::parse(query).and_then(|p| event_filter(&p)) {
        Ok(f) => f,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    match event_page(ops, filter).await {
        Ok((events, next)) => json(StatusCode::OK, &json!({ "events": events, "next": next.map(|id| id.to_string()) })),
        Err(e) => store_error(&e),
    }
}

pub(super) async fn event(ops: &Ops, id: &str) -> Resp {
    let id: EventId = match id.parse() {
        Ok(id) => id,
        Err(e) => return json_error(StatusCode::NOT_FOUND, &e),
    };
    match ops.store.get_event(id).await {
        Ok(Some(ev)) => json(StatusCode::OK, &ev),
        Ok(None) => json_error(StatusCode::NOT_FOUND, &format!("no event {id}")),
        Err(e) => store_error(&e),
    }
}

/// `POST /api/events/{id}/replay[?handler=H]`: re-queues the event's
/// deliveries (or the one to `H`); attempt numbers continue, history is kept.
pub(super) async fn replay(ops: &Ops, id: &str, query: &str) -> Resp {
    let handler = match Params::parse(query).and_then(|p| p.only(&["handler"]).map(|()| p.get("handler").map(str::to_string))) {
        Ok(h) => h,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    match replay_event(ops, id, handler).await {
        Ok((id, n)) => json(StatusCode::OK, &json!({ "id": id.to_string(), "requeued": n })),
        Err((status, msg)) => json_error(status, &msg),
    }
}

/// What a bulk replay takes (README, "Replay"): every event matching the
/// filter, and of those only the failed deliveries, the rules of `hooktrail
/// events replay --status failed`. From the admin listener there is no
/// `--all`: re-sending what already succeeded (with a CRM handler, every
/// contact again) is left to the CLI.
#[derive(Debug)]
pub(super) struct BulkPlan {
    /// The matching events, oldest first.
    pub events: Vec<EventId>,
    /// Only deliveries to this handler, when the filter names one.
    pub handler: Option<String>,
    /// The deliveries a replay would re-queue now, in event then handler order.
    pub deliveries: Vec<Requeue>,
}

impl BulkPlan {
    /// How many events have a delivery to re-queue.
    pub fn touched_events(&self) -> usize {
        let mut n = 0;
        let mut last = None;
        for d in &self.deliveries {
            if last != Some(d.event_id) {
                n += 1;
                last = Some(d.event_id);
            }
        }
        n
    }
}

/// The bulk selection from [`BULK_PARAMS`]: `status` must say `failed`, as
/// `events replay` must be told `--status failed`, and no paging applies.
pub(super) fn bulk_filter(p: &Params) -> Result<EventFilter, String> {
    p.only(BULK_PARAMS)?;
    if p.get("status") != Some(EventStatus::Failed.as_str()) {
        return Err("bulk replay re-queues the failed deliveries of failed events only: say status=failed".into());
    }
    let mut filter = event_filter(p)?;
    filter.limit = None;
    filter.before = None;
    Ok(filter)
}

/// Plans a bulk replay; changes nothing.
pub(super) async fn bulk_plan(ops: &Ops, filter: EventFilter) -> Result<BulkPlan, StoreError> {
    let handler = filter.handler.clone();
    let events = ops.store.find_ids(filter).await?;
    let deliveries = ops.store.replay_plan(events.clone(), handler.clone(), true).await?;
    Ok(BulkPlan { events, handler, deliveries })
}

/// Re-queues the failed deliveries of a planned bulk replay; returns how
/// many were re-queued (fewer than planned if some moved on meanwhile).
pub(super) async fn bulk_replay(ops: &Ops, plan: &BulkPlan) -> Result<u64, StoreError> {
    let n = ops.store.replay(plan.events.clone(), plan.handler.clone(), true).await?;
    ops.invalidate_chart();
    tracing::info!(
        events = plan.events.len(),
        handler = plan.handler.as_deref().unwrap_or("(all)"),
        requeued = n,
        "bulk replay of failed deliveries requested from the admin listener"
    );
    Ok(n)
}

/// `POST /api/replay?status=failed[&source=S][&handler=H][&since=T][&match=PTR=VALUE]…[&dry_run=true]`:
/// re-queues the failed deliveries of every matching failed event. With
/// `dry_run=true` it lists them and changes nothing.
pub(super) async fn bulk(ops: &Ops, query: &str) -> Resp {
    let parsed = Params::parse(query).and_then(|p| {
        let dry_run = match p.get("dry_run") {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(other) => return Err(format!("dry_run: `{other}` is not true or false")),
        };
        Ok((bulk_filter(&p.without(&["dry_run"]))?, dry_run))
    });
    let (filter, dry_run) = match parsed {
        Ok(x) => x,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let plan = match bulk_plan(ops, filter).await {
        Ok(p) => p,
        Err(e) => return store_error(&e),
    };
    if dry_run {
        let list: Vec<_> = plan
            .deliveries
            .iter()
            .map(|d| json!({ "event_id": d.event_id.to_string(), "handler": d.handler, "status": d.status, "attempt_count": d.attempt_count }))
            .collect();
        return json(
            StatusCode::OK,
            &json!({ "dry_run": true, "events": plan.touched_events(), "deliveries": list.len(), "would_requeue": list, "requeued": 0 }),
        );
    }
    match bulk_replay(ops, &plan).await {
        Ok(n) => json(
            StatusCode::OK,
            &json!({ "dry_run": false, "events": plan.touched_events(), "deliveries": plan.deliveries.len(), "requeued": n }),
        ),
        Err(e) => store_error(&e),
    }
}

/// Replays one event for the API and the page; `Err` is the status and message to answer.
pub(super) async fn replay_event(ops: &Ops, id: &str, handler: Option<String>) -> Result<(EventId, u64), (StatusCode, String)> {
    let unavailable = |e: StoreError| {
        tracing::warn!(error = %e, "admin replay failed in the store");
        (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    };
    let id: EventId = id.parse().map_err(|e| (StatusCode::NOT_FOUND, e))?;
    let ev = ops.store.get_event(id).await.map_err(unavailable)?.ok_or_else(|| (StatusCode::NOT_FOUND, format!("no event {id}")))?;
    if let Some(h) = &handler {
        if !ev.deliveries.iter().flatten().any(|d| &d.handler == h) {
            return Err((StatusCode::NOT_FOUND, format!("event {id} has no delivery to handler `{h}`")));
        }
    }
    let n = ops.store.replay(vec![id], handler.clone(), false).await.map_err(unavailable)?;
    ops.invalidate_chart();
    tracing::info!(event_id = %id, handler = handler.as_deref().unwrap_or("(all)"), requeued = n, "replay requested from the admin listener");
    Ok((id, n))
}

/// `GET /api/stats[?source=S][&since=T]`: the rows of `hooktrail stats --json`.
pub(super) async fn stats(ops: &Ops, query: &str) -> Resp {
    let parsed = Params::parse(query).and_then(|p| {
        p.only(&["source", "since"])?;
        let since = p.get("since").map(store::parse_since).transpose().map_err(|e| format!("since: {e}"))?;
        Ok((p.get("source").map(str::to_string), since))
    });
    let (source, since) = match parsed {
        Ok(x) => x,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    match ops.store.stats(source, since).await {
        Ok(rows) => json(StatusCode::OK, &rows),
        Err(e) => store_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_like_the_cli_flags() {
        let p = Params::parse("source=nr&status=failed&match=%2Fa%2F0%3Dx%3Dy&match=/b=1&limit=10&since=2h&handler=").unwrap();
        let f = event_filter(&p).unwrap();
        assert_eq!(f.source.as_deref(), Some("nr"));
        assert_eq!(f.status, Some(EventStatus::Failed));
        assert_eq!(f.matches, vec![("/a/0".to_string(), "x=y".to_string()), ("/b".to_string(), "1".to_string())]);
        assert_eq!(f.limit, Some(10));
        assert!(f.handler.is_none(), "an empty value is no filter");
        assert!(f.since.is_some());
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let err = |q: &str| event_filter(&Params::parse(q).unwrap()).unwrap_err();
        assert!(err("status=nope").contains("status"));
        assert!(err("match=email").contains("pointer=value"));
        assert!(err("match=email=x").contains("JSON pointer"));
        assert!(err("limit=0").contains("limit"));
        assert!(err("cursor=123").contains("cursor"));
        assert!(err("sorce=x").contains("unknown query parameter `sorce`"));
    }
}
