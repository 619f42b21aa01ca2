//! Command line: clap definitions and the inspection commands. The inspection
//! commands open the same database as a running daemon (WAL lets them read
//! while it writes) and need only the `[storage]` section of the config, so
//! ops can run them without the daemon's secrets in their shell.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config;
use crate::store::{self, sqlite::Role, Detail, EventFilter, EventId, EventRecord, EventStatus, StatsRow, Store};

#[derive(Parser, Debug)]
#[command(
    name = "hooktrail",
    version,
    about = "Receive webhooks, store each one durably before answering, then process them with a paper trail"
)]
pub struct Cli {
    /// Config file (else $HOOKTRAIL_CONFIG, ./config/hooktrail.toml, /etc/hooktrail/hooktrail.toml)
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        role: ServeRole,
    },
    /// Validate the config; print every problem with its key path; exit 1 if any
    CheckConfig,
    /// Inspect and replay events
    #[command(subcommand)]
    Events(EventsCommand),
    /// Counts per source and handler
    Stats {
        #[arg(long)]
        source: Option<String>,
        /// A duration (`2h`) or an RFC 3339 time
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete finished events (done/failed) older than DURATION
    Prune {
        #[arg(long, value_name = "DURATION")]
        older_than: String,
    },
    /// JSON Lines of events with their deliveries and attempts, oldest first
    Export {
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeRole {
    /// Listener and processor
    All,
    /// Only receive and store
    Ingest,
    /// Only process stored events
    Process,
}

#[derive(Args, Debug, Clone, Default)]
pub struct Filters {
    #[arg(long)]
    pub source: Option<String>,
    /// pending, processing, retrying, done, failed
    #[arg(long)]
    pub status: Option<String>,
    /// Events with a delivery to this handler
    #[arg(long)]
    pub handler: Option<String>,
    /// A duration (`2h`) or an RFC 3339 time
    #[arg(long)]
    pub since: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Newest first
    List {
        #[command(flatten)]
        filters: Filters,
        /// Keep events whose normalized payload has VALUE at JSON pointer PTR (repeatable)
        #[arg(long = "match", value_name = "PTR=VALUE")]
        matches: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One event: metadata, raw body, payload, deliveries and every attempt
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Re-queue deliveries (attempt count continues; history kept)
    Replay {
        ids: Vec<String>,
        #[command(flatten)]
        filters: Filters,
    },
}

impl Filters {
    pub fn to_filter(&self) -> Result<EventFilter> {
        Ok(EventFilter {
            source: self.source.clone(),
            status: self.status.as_deref().map(str::parse::<EventStatus>).transpose().map_err(anyhow::Error::msg).context("--status")?,
            handler: self.handler.clone(),
            since: self.since.as_deref().map(store::parse_since).transpose().map_err(anyhow::Error::msg).context("--since")?,
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

pub async fn run(cli: Cli) -> Result<i32> {
    let path = config::resolve_path(cli.config.as_deref());
    match cli.command {
        Command::Serve { role } => {
            crate::daemon::run(&path, role).await?;
            Ok(0)
        }
        Command::CheckConfig => Ok(check_config(&path)),
        Command::Events(cmd) => {
            let store = open_store(&path)?;
            let code = events(store.as_ref(), cmd).await;
            store.close().await;
            code
        }
        Command::Stats { source, since, json } => {
            let store = open_store(&path)?;
            let since = since.as_deref().map(store::parse_since).transpose().map_err(anyhow::Error::msg).context("--since")?;
            let rows = store.stats(source, since).await?;
            store.close().await;
            print_stats(&rows, json)?;
            Ok(0)
        }
        Command::Prune { older_than } => {
            let d = humantime::parse_duration(&older_than)
                .with_context(|| format!("--older-than `{older_than}`: expected a duration like 30d"))?;
            let store = open_store(&path)?;
            let before = chrono::Utc::now() - chrono::Duration::from_std(d).context("--older-than is too long")?;
            let n = store.prune(before, 500).await?;
            store.close().await;
            println!("pruned {n} finished event(s) received before {}", store::rfc3339(before));
            Ok(0)
        }
        Command::Export { since, source } => {
            let store = open_store(&path)?;
            let mut filter = EventFilter {
                source,
                since: since.as_deref().map(store::parse_since).transpose().map_err(anyhow::Error::msg).context("--since")?,
                ascending: true,
                limit: Some(500),
                ..Default::default()
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            // Page by id so memory stays flat however large the log is.
            loop {
                let page = store.list_events(filter.clone(), Detail::Full).await?;
                for ev in &page {
                    serde_json::to_writer(&mut out, ev)?;
                    out.write_all(b"\n")?;
                }
                match page.last() {
                    Some(last) if page.len() == 500 => filter.after = Some(last.id),
                    _ => break,
                }
            }
            out.flush()?;
            store.close().await;
            Ok(0)
        }
    }
}

fn check_config(path: &std::path::Path) -> i32 {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                println!("warning: {w}");
            }
            let c = &l.config;
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

fn open_store(path: &std::path::Path) -> Result<Box<dyn Store>> {
    let storage = config::load_storage(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !storage.path.exists() {
        bail!("no database at `{}` (storage.path); start `hooktrail serve` first", storage.path.display());
    }
    Ok(Box::new(store::sqlite::SqliteStore::open(&storage.path, Role::Client)?))
}

async fn events(store: &dyn Store, cmd: EventsCommand) -> Result<i32> {
    match cmd {
        EventsCommand::List { filters, matches, limit, json } => {
            let mut f = filters.to_filter()?;
            f.matches = parse_matches(&matches)?;
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
        EventsCommand::Replay { ids, filters } => {
            let bulk = filters.status.is_some() || filters.source.is_some() || filters.handler.is_some() || filters.since.is_some();
            if ids.is_empty() && !bulk {
                bail!("name event ids, or select with --status failed [--source S] [--handler H] [--since T]");
            }
            if !ids.is_empty() && bulk {
                bail!("give event ids or filters, not both");
            }
            let (ids, only_failed) = if ids.is_empty() {
                let f = filters.to_filter()?;
                if f.status.is_some_and(|s| s != EventStatus::Failed) {
                    bail!("bulk replay takes --status failed (replay other events by id)");
                }
                let only_failed = f.status == Some(EventStatus::Failed);
                (store.find_ids(f).await?, only_failed)
            } else {
                (ids.iter().map(|s| s.parse::<EventId>()).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?, false)
            };
            let n = store.replay(ids.clone(), filters.handler.clone(), only_failed).await?;
            println!("re-queued {n} deliver{} of {} event(s)", if n == 1 { "y" } else { "ies" }, ids.len());
            Ok(0)
        }
    }
}

fn print_list(list: &[EventRecord]) {
    println!("{:<30}  {:<27}  {:<16}  {:<10}  {:>7}  CONTENT-TYPE", "ID", "RECEIVED", "SOURCE", "STATUS", "BYTES");
    for e in list {
        println!("{:<30}  {:<27}  {:<16}  {:<10}  {:>7}  {}", e.id, e.received_at, e.source, e.status, e.body_bytes, e.content_type);
    }
}

fn print_event(e: &EventRecord) {
    println!("id:           {}", e.id);
    println!("source:       {}", e.source);
    println!("status:       {}", e.status);
    println!("received_at:  {}", e.received_at);
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
        match &d.next_attempt_at {
            Some(t) => println!(", next at {t}"),
            None => println!(),
        }
        for a in &d.attempts {
            let code = a.exit_code.map(|c| format!("exit {c}")).or(a.http_status.map(|s| format!("HTTP {s}"))).unwrap_or_default();
            println!("  #{} {} {} {}ms {} {}", a.number, a.started_at, a.outcome, a.duration_ms, code, a.error.as_deref().unwrap_or(""));
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
