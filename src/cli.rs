//! Command line: clap definitions and the inspection commands. The inspection
//! commands open the same database as a running daemon (WAL lets them read
//! while it writes) and need only the `[storage]` section of the config, so
//! ops can run them without the daemon's secrets in their shell.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use crate::config;
use crate::store::{self, rfc3339, rules, Detail, EventFilter, EventId, EventRecord, EventStatus, Role, StatsRow, Store};

/// Events read, exported or pruned per store call by the CLI: large enough
/// that a call's overhead is small, small enough that memory stays flat and
/// a prune's write transactions stay short beside a running daemon.
const CLI_BATCH: usize = 500;

#[derive(Parser, Debug)]
#[command(
    name = "hooktrail",
    version,
    about = "Receive webhooks, store each one durably before answering, then process them with a paper trail",
    after_help = "Examples:\n  hooktrail --config /etc/hooktrail/hooktrail.toml check-config\n  hooktrail serve\n  hooktrail events list --status failed"
)]
/// The command line: a global `--config` and one subcommand (README, "Command line").
pub struct Cli {
    /// Config file (else $HOOKTRAIL_CONFIG, ./config/hooktrail.toml, /etc/hooktrail/hooktrail.toml)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do. The inspection commands need only the `[storage]` section.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon
    #[command(
        after_help = "Examples:\n  hooktrail serve\n  hooktrail serve --role ingest    # accept and store only; another node processes"
    )]
    Serve {
        /// What this process runs: all (listener and processor), ingest (listener only) or process (processor only)
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
    },
    /// Validate the config; print every problem with its key path; exit 1 if any
    #[command(after_help = "Examples:\n  hooktrail check-config\n  hooktrail --config ./staging.toml check-config")]
    CheckConfig,
    /// Inspect and replay events
    #[command(
        subcommand,
        after_help = "Examples:\n  hooktrail events list --status failed\n  hooktrail events show evt_01ARZ3NDEKTSV4RRFFQ69G5FAV"
    )]
    Events(EventsCommand),
    /// Counts per source and handler
    #[command(after_help = "Examples:\n  hooktrail stats\n  hooktrail stats --source netresults --since 24h --json")]
    Stats {
        /// Only this source (a [sources.NAME] of the config)
        #[arg(long)]
        source: Option<String>,
        /// Only events received since: a duration (`2h`) or an RFC 3339 time
        #[arg(long, value_parser = store::parse_since)]
        since: Option<DateTime<Utc>>,
        /// Print one JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Delete finished events (done/failed) older than DURATION
    #[command(after_help = "Examples:\n  hooktrail prune --older-than 30d --dry-run\n  hooktrail prune --older-than 30d")]
    Prune {
        /// Age of the oldest event kept, e.g. `30d`; pending, processing and retrying work is never deleted
        #[arg(long, value_name = "DURATION", value_parser = parse_age)]
        older_than: Duration,
        /// Count what would be deleted; delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Hand the space freed by prune back to the file system at once
    #[command(after_help = "Examples:\n  hooktrail prune --older-than 30d && hooktrail compact")]
    Compact,
    /// Fill the database with synthetic events for bench/scale.sh (not for production use)
    #[command(hide = true)]
    BenchFill {
        /// How many events
        #[arg(long)]
        events: u64,
        /// Leave the schema as before migration 4, so the next start back-fills counters and search
        #[arg(long)]
        old_schema: bool,
    },
    /// JSON Lines of events with their deliveries and attempts, oldest first
    #[command(after_help = "Examples:\n  hooktrail export > events.jsonl\n  hooktrail export --source netresults --since 7d")]
    Export {
        /// Only events received since: a duration (`2h`) or an RFC 3339 time
        #[arg(long, value_parser = store::parse_since)]
        since: Option<DateTime<Utc>>,
        /// Only this source (a [sources.NAME] of the config)
        #[arg(long)]
        source: Option<String>,
    },
    /// Read `export` JSON Lines into the configured store (same ids, times, bodies, deliveries, attempts)
    #[command(
        after_help = "Examples:\n  hooktrail import events.jsonl\n  hooktrail export --config old.toml | hooktrail import --config new.toml"
    )]
    Import {
        /// The JSON Lines `export` wrote; stdin when absent or `-`. An id already stored is skipped and counted
        file: Option<PathBuf>,
    },
}

/// The event filters shared by `events list`, bulk `events replay` and `export`.
#[derive(Args, Debug, Clone, Default)]
pub struct Filters {
    /// Only this source (a [sources.NAME] of the config)
    #[arg(long)]
    pub source: Option<String>,
    /// Only events in this status: pending, processing, retrying, done, failed
    #[arg(long)]
    pub status: Option<String>,
    /// Events with a delivery to this handler
    #[arg(long)]
    pub handler: Option<String>,
    /// Only events received since: a duration (`2h`) or an RFC 3339 time
    #[arg(long, value_parser = store::parse_since)]
    pub since: Option<DateTime<Utc>>,
}

/// `hooktrail events …`: look at stored events, re-queue or skip their deliveries.
#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Newest first; LEAD is the first email address in the payload
    #[command(
        after_help = "Examples:\n  hooktrail events list --source netresults --since 2h\n  hooktrail events list --match /submission_values/email_address/0=ann@example.com --json\n  hooktrail events list --search dgolden@mid-corp.com"
    )]
    List {
        #[command(flatten)]
        filters: Filters,
        /// Keep events whose normalized payload has VALUE at JSON pointer PTR (repeatable)
        #[arg(long = "match", value_name = "PTR=VALUE")]
        matches: Vec<String>,
        /// Keep events whose payload (or raw body) contains TEXT as whole words, ignoring case: an email, a name, an id
        #[arg(long, value_name = "TEXT")]
        search: Option<String>,
        /// At most this many events, newest first
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print one JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// One event: metadata, raw body, payload, deliveries and every attempt
    #[command(
        after_help = "Examples:\n  hooktrail events show evt_01ARZ3NDEKTSV4RRFFQ69G5FAV\n  hooktrail events show evt_01ARZ3NDEKTSV4RRFFQ69G5FAV --json"
    )]
    Show {
        /// The event id (`evt_…`), as `events list` and the 200 answer show it
        id: String,
        /// Print the event as one JSON document
        #[arg(long)]
        json: bool,
    },
    /// Re-queue deliveries (attempt count continues; history kept).
    /// By id, or in bulk with --status failed or --all (and optional filters)
    #[command(
        after_help = "Examples:\n  hooktrail events replay evt_01ARZ3NDEKTSV4RRFFQ69G5FAV evt_01ARZ3NDEKTSV4RRFFQ69G5FAW\n  hooktrail events replay --status failed --handler crm --since 2h --dry-run"
    )]
    Replay {
        /// Event ids to re-queue (every delivery of each); none when replaying in bulk
        ids: Vec<String>,
        #[command(flatten)]
        filters: Filters,
        /// Bulk: every delivery of the matching events, succeeded ones included
        #[arg(long, conflicts_with = "status")]
        all: bool,
        /// Print what would be re-queued; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Mark a failed delivery `skipped`, releasing the ordering key it blocks
    #[command(after_help = "Example:\n  hooktrail events skip evt_01ARZ3NDEKTSV4RRFFQ69G5FAV --handler crm")]
    Skip {
        /// The event id (`evt_…`)
        id: String,
        /// The handler whose failed delivery to skip
        #[arg(long)]
        handler: String,
    },
}

/// `--older-than`: a duration that still leaves a date when taken from now.
fn parse_age(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("expected a duration like 30d ({e})"))?;
    store::checked_before(Utc::now(), d).ok_or_else(|| format!("`{s}` reaches back further than a date can; nothing is that old"))?;
    Ok(d)
}

/// A usage error found after parsing: said on stderr, exit code 2 like clap's own.
fn usage(message: &str) -> Result<i32> {
    eprintln!("error: {message}");
    Ok(2)
}

impl Filters {
    /// The store's filter for these flags; a bad status or time is an error naming the flag.
    pub fn to_filter(&self) -> Result<EventFilter> {
        Ok(EventFilter {
            source: self.source.clone(),
            status: self.status.as_deref().map(str::parse::<EventStatus>).transpose().map_err(anyhow::Error::msg).context("--status")?,
            handler: self.handler.clone(),
            since: self.since,
            ..Default::default()
        })
    }
}

/// Parses `--match /pointer=value` arguments.
pub fn parse_matches(list: &[String]) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|m| {
            let (p, v) = m.split_once('=').with_context(|| format!("--match `{m}`: expected /json/pointer=value"))?;
            if !p.starts_with('/') {
                bail!("--match `{m}`: `{p}` is not a JSON pointer (it starts with `/`)");
            }
            Ok((p.to_string(), v.to_string()))
        })
        .collect()
}

/// Runs one parsed command; returns the process exit code (0 ok, 1 something
/// asked for was not there or failed, 2 usage).
pub async fn run(cli: Cli) -> Result<i32> {
    if let Some(message) = config::not_found(cli.config.as_deref()) {
        eprintln!("error: {message}");
        return Ok(1);
    }
    let path = config::resolve_path(cli.config.as_deref());
    match cli.command {
        Command::Serve { role } => {
            crate::daemon::run(&path, role).await?;
            Ok(0)
        }
        Command::CheckConfig => Ok(check_config(&path)),
        Command::Events(cmd) => {
            if let Some(problem) = cmd.usage_problem() {
                return usage(problem);
            }
            let store = open_store(&path)?;
            let code = events(store.as_ref(), cmd).await;
            store.close().await;
            code
        }
        Command::Stats { source, since, json } => {
            let store = open_store(&path)?;
            let rows = store.stats(source, since).await?;
            store.close().await;
            print_stats(&rows, json)?;
            Ok(0)
        }
        Command::Prune { older_than, dry_run } => {
            let store = open_store(&path)?;
            let before = store::checked_before(Utc::now(), older_than).context("--older-than reaches back further than a date can")?;
            if dry_run {
                let events = prunable(store.as_ref(), before).await?;
                store.close().await;
                for e in &events {
                    println!("would prune {} {} {} ({})", e.id, rfc3339(e.received_at), e.source, e.status);
                }
                println!("would prune {} finished event(s) received before {}; nothing deleted", events.len(), store::rfc3339(before));
                return Ok(0);
            }
            let n = store.prune(before, CLI_BATCH).await?;
            store.close().await;
            println!("pruned {n} finished event(s) received before {}", store::rfc3339(before));
            Ok(0)
        }
        Command::Compact => {
            let store = open_store(&path)?;
            let said = store.compact().await;
            store.close().await;
            println!("{}", said?);
            Ok(0)
        }
        Command::BenchFill { events, old_schema } => {
            let storage = config::load_storage(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            store::bench_fill(&storage, events, old_schema)?;
            Ok(0)
        }
        Command::Import { file } => import(&path, file).await,
        Command::Export { since, source } => {
            let store = open_store(&path)?;
            let mut filter = EventFilter { source, since, ascending: true, limit: Some(CLI_BATCH), ..Default::default() };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            // Page by id so memory stays flat however large the log is.
            loop {
                let page = store.list_events(filter.clone(), Detail::Full).await?;
                for ev in &page {
                    serde_json::to_writer(&mut out, ev)?;
                    out.write_all(b"\n")?;
                }
                match page.last() {
                    Some(last) if page.len() == CLI_BATCH => filter.after = Some(last.id),
                    _ => break,
                }
            }
            out.flush()?;
            store.close().await;
            Ok(0)
        }
    }
}

/// Lines of an import in flight at once. One at a time, every event waited
/// for its own commit (on PostgreSQL about 380 events/s on the benchmark
/// machine); with several in flight their commits are shared, as ingest's are.
const IMPORT_IN_FLIGHT: usize = 32;

/// `hooktrail import`: each line of `export` into the store. A line that is
/// not an event, or that the store refuses, stops the import there, naming
/// the line; what was imported before it stays, and so may up to
/// [`IMPORT_IN_FLIGHT`] lines after it that were already on their way
/// (README, `hooktrail import`: running the import again skips them).
async fn import(path: &std::path::Path, file: Option<PathBuf>) -> Result<i32> {
    use futures_util::stream::{FuturesOrdered, StreamExt as _};
    use std::io::BufRead as _;
    let input: Box<dyn std::io::BufRead> = match file.as_deref().filter(|f| f.as_os_str() != "-") {
        Some(f) => Box::new(std::io::BufReader::new(std::fs::File::open(f).with_context(|| format!("cannot read `{}`", f.display()))?)),
        None => Box::new(std::io::stdin().lock()),
    };
    // Like a daemon, the import may create (SQLite) or migrate (PostgreSQL)
    // an empty store: moving a store starts from an empty one.
    let storage = config::load_storage(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = store::open(&storage, Role::Ingest)?;
    let (mut imported, mut skipped) = (0u64, 0u64);
    // The first line that stopped the import: its number and why.
    let mut stop: Option<(usize, String)> = None;
    let mut take = |n: usize, r: Result<bool, store::StoreError>, stop: &mut Option<(usize, String)>| match r {
        Ok(true) => imported += 1,
        Ok(false) => skipped += 1,
        // A line still on its way when a later one stopped the import came
        // first: it is the one named.
        Err(e) if stop.as_ref().map_or(true, |(m, _)| n < *m) => *stop = Some((n, e.to_string())),
        Err(_) => {}
    };
    // Answers come back in line order.
    let mut in_flight = FuturesOrdered::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.context("reading the import")?;
        if line.trim().is_empty() {
            continue;
        }
        // Without serde_json's 127-level guard: a stored payload may be 128 deep.
        let mut de = serde_json::Deserializer::from_str(&line);
        de.disable_recursion_limit();
        let ev = match serde::Deserialize::deserialize(&mut de).and_then(|ev: EventRecord| de.end().map(|()| ev)) {
            Ok(ev) => ev,
            Err(e) => {
                stop = Some((n, format!("not an event as `export` writes it: {e}")));
                break;
            }
        };
        let store = store.clone();
        in_flight.push_back(async move { (n, store.import_event(ev).await) });
        if in_flight.len() >= IMPORT_IN_FLIGHT {
            if let Some((n, r)) = in_flight.next().await {
                take(n, r, &mut stop);
            }
        }
        if stop.is_some() {
            break;
        }
    }
    while let Some((n, r)) = in_flight.next().await {
        take(n, r, &mut stop);
    }
    store.close().await;
    println!("imported {imported} event(s); skipped {skipped} already stored");
    match stop {
        Some((n, why)) => Err(anyhow::anyhow!("line {}: {why}", n + 1)),
        None => Ok(0),
    }
}

fn check_config(path: &std::path::Path) -> i32 {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                println!("warning: {w}");
            }
            let c = &l.config;
            // Handlers that cannot run (README, "Shell handler"): errors here, though `serve` still starts.
            let mut unrunnable = c.preflight();
            // The database URL as `serve` would read it, without connecting.
            if let config::Backend::Postgres(pg) = &c.storage.backend {
                unrunnable.extend(store::postgres::check_url(pg).err());
            }
            for p in &unrunnable {
                println!("error: {p}");
            }
            if !unrunnable.is_empty() {
                println!("{}: {} problem(s)", path.display(), unrunnable.len());
                return 1;
            }
            println!(
                "{}: ok ({} source(s), {} handler(s), {} route(s))",
                path.display(),
                c.sources.len(),
                c.handlers.len(),
                c.routes.len()
            );
            0
        }
        Err(e) => {
            for w in e.warnings() {
                println!("warning: {w}");
            }
            for p in &e.0 {
                println!("error: {p}");
            }
            println!("{}: {} problem(s)", path.display(), e.0.len());
            1
        }
    }
}

fn open_store(path: &std::path::Path) -> Result<std::sync::Arc<dyn Store>> {
    let storage = config::load_storage(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(store::open(&storage, Role::Client)?)
}

async fn events(store: &dyn Store, cmd: EventsCommand) -> Result<i32> {
    match cmd {
        EventsCommand::List { filters, matches, search, limit, json } => {
            let mut f = filters.to_filter()?;
            f.matches = parse_matches(&matches)?;
            if let Some(problem) = search.as_deref().and_then(|t| store::search::check(t).err()) {
                return usage(&format!("--search {problem}"));
            }
            f.search = search;
            f.limit = Some(limit);
            let list = store.list_events(f, Detail::Summary).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_list(&list);
            }
            Ok(0)
        }
        EventsCommand::Show { id, json } => {
            let id: EventId = id.parse().map_err(anyhow::Error::msg)?;
            let Some(ev) = store.get_event(id).await? else {
                eprintln!("no event {id}");
                return Ok(1);
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&ev)?);
            } else {
                print_event(&ev);
            }
            Ok(0)
        }
        EventsCommand::Replay { ids, filters, all, dry_run } => {
            // (events, only to this handler, only failed deliveries)
            let (events, handler, only_failed) = if ids.is_empty() {
                (store.find_ids(filters.to_filter()?).await?, filters.handler.clone(), !all)
            } else {
                let parsed = ids.iter().map(|s| s.parse::<EventId>()).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
                let mut missing = Vec::new();
                for id in &parsed {
                    if store.get_event(*id).await?.is_none() {
                        missing.push(id.to_string());
                    }
                }
                if !missing.is_empty() {
                    // All or nothing: a typo in one id re-queues none of them.
                    eprintln!("error: no event {}; nothing re-queued", missing.join(", no event "));
                    return Ok(1);
                }
                (parsed, None, false)
            };
            let plural = |n: usize| if n == 1 { "y" } else { "ies" };
            if dry_run {
                let would = store.replay_plan(events.clone(), handler, only_failed).await?;
                for d in &would {
                    println!("would re-queue {} {} ({}, {} attempt(s))", d.event_id, d.handler, d.status, d.attempt_count);
                }
                println!("would re-queue {} deliver{} of {} event(s); nothing changed", would.len(), plural(would.len()), events.len());
                return Ok(0);
            }
            let n = store.replay(events.clone(), handler, only_failed).await?;
            println!("re-queued {n} deliver{} of {} event(s)", plural(n as usize), events.len());
            Ok(0)
        }
        EventsCommand::Skip { id, handler } => {
            let id: EventId = id.parse().map_err(anyhow::Error::msg)?;
            match store.skip(id, &handler).await {
                Ok(()) => {
                    println!("skipped the delivery of {id} to {handler}; its ordering key is released");
                    Ok(0)
                }
                Err(store::SkipError::Store(e)) => Err(e.into()),
                Err(e) => {
                    eprintln!("error: {e}; nothing changed");
                    Ok(1)
                }
            }
        }
    }
}

impl EventsCommand {
    /// What is wrong with how the command was asked, beyond what clap checks.
    fn usage_problem(&self) -> Option<&'static str> {
        let EventsCommand::Replay { ids, filters, all, .. } = self else { return None };
        let filtered = filters.status.is_some() || filters.source.is_some() || filters.handler.is_some() || filters.since.is_some();
        if !ids.is_empty() {
            return (filtered || *all).then_some("give event ids, or a bulk selection (--status failed or --all, with filters), not both");
        }
        // Bulk replay names what it re-queues: replaying every delivery of
        // every matching event would re-send what already succeeded (with a
        // CRM handler, every contact again).
        match filters.status.as_deref() {
            None if *all => None,
            None if !filtered => Some(
                "name event ids, or re-queue in bulk with --status failed (the failed deliveries) or --all (every delivery, succeeded ones included)",
            ),
            None => Some(
                "bulk replay must say what it re-queues: --status failed (the failed deliveries) or --all (every delivery, succeeded ones included)",
            ),
            Some("failed") => None,
            Some(_) => Some("bulk replay takes --status failed or --all (replay other events by id)"),
        }
    }
}

/// The events `prune` would delete, oldest first: finished and with an id below the first
/// one `before` can have (an id is made after its event was received, so
/// that alone places the receive time before `before`, as prune requires).
async fn prunable(store: &dyn Store, before: DateTime<Utc>) -> Result<Vec<EventRecord>> {
    let floor = EventId(ulid::Ulid::from_parts(u64::try_from(before.timestamp_millis()).unwrap_or(0), 0));
    let mut all = Vec::new();
    for &status in EventStatus::ALL.iter().filter(|s| rules::prunable(**s)) {
        let mut filter = EventFilter { status: Some(status), before: Some(floor), limit: Some(CLI_BATCH), ..Default::default() };
        loop {
            let page = store.list_events(filter.clone(), Detail::Summary).await?;
            let next = page.last().filter(|_| page.len() == CLI_BATCH).map(|last| last.id);
            all.extend(page);
            match next {
                Some(id) => filter.before = Some(id),
                None => break,
            }
        }
    }
    all.sort_by_key(|e| e.id);
    Ok(all)
}

/// The `events list` table. Every column but the last has a fixed width
/// (a longer value is cut with `…`) so each value starts under its header;
/// LEAD, last and never cut, is what an operator searches for (README
/// "Command line").
fn print_list(list: &[EventRecord]) {
    println!("{:<30}  {:<27}  {:<16}  {:<10}  {:>7}  {:<33}  LEAD", "ID", "RECEIVED", "SOURCE", "STATUS", "BYTES", "CONTENT-TYPE");
    for e in list {
        println!(
            "{:<30}  {:<27}  {:<16}  {:<10}  {:>7}  {:<33}  {}",
            e.id,
            rfc3339(e.received_at),
            cut(&e.source, 16),
            e.status,
            e.body_bytes,
            cut(&e.content_type, 33),
            lead(&e.payload).unwrap_or("-")
        );
    }
}

/// `s`, cut to `width` characters with `…` when longer, so a column keeps its width.
fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// The first email-looking string in the payload (depth first, keys in
/// order): a webhook about a person nearly always carries their address,
/// whatever the sender calls the field.
fn lead(payload: &serde_json::Value) -> Option<&str> {
    use serde_json::Value;
    match payload {
        Value::String(s) if looks_like_email(s) => Some(s.trim()),
        Value::Array(items) => items.iter().find_map(lead),
        Value::Object(map) => map.values().find_map(lead),
        _ => None,
    }
}

/// `local@domain.tld` with no spaces: a cue for the eye, not a validation.
fn looks_like_email(s: &str) -> bool {
    let s = s.trim();
    let Some((local, domain)) = s.split_once('@') else { return false };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.contains(char::is_whitespace)
        && s.len() <= 254
}

fn print_event(e: &EventRecord) {
    println!("id:           {}", e.id);
    println!("source:       {}", e.source);
    println!("status:       {}", e.status);
    println!("received_at:  {}", rfc3339(e.received_at));
    println!("method:       {}", e.method);
    println!("content_type: {}", e.content_type);
    println!("query:        {}", e.query);
    println!("remote_addr:  {}", e.remote_addr);
    if let Some(h) = &e.headers {
        println!("headers:      {h}");
    }
    match (&e.body, &e.body_base64) {
        (Some(b), _) => println!("body ({} bytes):\n{b}", e.body_bytes),
        (_, Some(b)) => println!("body ({} bytes, base64):\n{b}", e.body_bytes),
        _ => {}
    }
    println!("payload:\n{}", serde_json::to_string_pretty(&e.payload).unwrap_or_default());
    for d in e.deliveries.iter().flatten() {
        print!("delivery {}: {} after {} attempt(s)", d.handler, d.status, d.attempt_count);
        match (d.blocked_by, d.next_attempt_at) {
            (Some(b), _) => println!(", blocked by {b} (its failed delivery holds the ordering key; replay or skip it)"),
            (None, Some(t)) => println!(", next at {}", rfc3339(t)),
            (None, None) => println!(),
        }
        for a in &d.attempts {
            let code = a.exit_code.map(|c| format!("exit {c}")).or(a.http_status.map(|s| format!("HTTP {s}"))).unwrap_or_default();
            println!(
                "  #{} {} {} {}ms {} {}",
                a.number,
                rfc3339(a.started_at),
                a.outcome,
                a.duration_ms,
                code,
                a.error.as_deref().unwrap_or("")
            );
            for line in a.output.lines().take(20) {
                println!("     | {line}");
            }
        }
    }
}

fn print_stats(rows: &[StatsRow], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<16} {:>9} {:>10} {:>8} {:>8} {:>10} {:>9} {:>8} {:>7}",
        "SOURCE", "HANDLER", "RECEIVED", "DUPLICATES", "REJECTED", "PENDING", "PROCESSING", "SUCCEEDED", "RETRYING", "FAILED"
    );
    for r in rows {
        println!(
            "{:<16} {:<16} {:>9} {:>10} {:>8} {:>8} {:>10} {:>9} {:>8} {:>7}",
            r.source,
            r.handler.as_deref().unwrap_or("(all)"),
            r.received,
            r.duplicates,
            r.rejected,
            r.pending,
            r.processing,
            r.succeeded,
            r.retrying,
            r.failed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lead_is_the_first_email_looking_string_at_any_depth() {
        let p = serde_json::json!({"a": {"name": "Ann", "contact": ["x", " ann@example.com "]}, "z": "zed@example.com"});
        assert_eq!(lead(&p), Some("ann@example.com"));
        for not in ["@example.com", "ann@", "ann@localhost", "a b@example.com", "a@b@c.com", "ann@example."] {
            assert_eq!(lead(&serde_json::json!({ "e": not })), None, "{not}");
        }
    }

    #[test]
    fn cut_keeps_a_column_width_in_characters() {
        assert_eq!(cut("application/json", 33), "application/json");
        assert_eq!(cut("multipart/form-data; boundary=éééééé", 12).chars().count(), 12);
        assert!(cut("abcdef", 4).ends_with('…'));
    }
}
