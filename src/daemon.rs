//! `hooktrail serve`: opens the store, binds the listeners, starts the
//! processor, and runs until SIGTERM/SIGINT. SIGHUP reloads sources, handlers
//! and routes; a config with errors is refused and the old one kept.
//!
//! Shutdown order matters for the guarantees: stop accepting, let in-flight
//! requests finish (their events commit), let running deliveries finish up to
//! the grace period and release the rest, then flush and close the store.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config;
use crate::ingest::{self, Ingest};
use crate::metrics::Metrics;
use crate::ops::{self, Ops};
use crate::process::Processor;
use crate::store::{self, Role};
use crate::tls;

/// `hooktrail serve`: opens the store, starts the parts `role` asks for, and
/// runs until SIGTERM/SIGINT (reloading on SIGHUP); returns once every task
/// has stopped and the store is closed, so nothing acknowledged is in flight.
pub async fn run(path: &Path, role: Role) -> Result<()> {
    let loaded = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::handlers::leftovers::note_config_file(path);
    for w in &loaded.warnings {
        tracing::warn!("config: {w}");
    }
    let cfg = loaded.config;
    if role.processes() {
        log_preflight(&cfg);
    }
    let store = store::open(&cfg.storage, role).context("opening storage")?;
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let ops = Ops::new(cfg.clone(), store.clone(), metrics.clone(), role);

    let mut ready = serde_json::Map::new();
    let tls = cfg.server.tls.clone().filter(|_| role.ingests()).map(tls::Reloadable::new);
    let ingest = if role.ingests() {
        let listener =
            TcpListener::bind(cfg.server.listen).await.with_context(|| format!("binding server.listen {}", cfg.server.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "listening for webhooks");
        ready.insert("listen".into(), addr.to_string().into());
        let ing = Ingest::new(cfg.clone(), store.clone(), metrics.clone());
        tasks.spawn(ingest::serve(listener, ing.clone(), tls.clone(), shutdown.clone()));
        ops.set_listener_bound();
        let trim = ing.clone();
        let sd = shutdown.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = every.tick() => trim.trim_limiters(),
                }
            }
        });
        Some(ing)
    } else {
        None
    };

    let processor = if role.processes() {
        let p = Processor::new(cfg.clone(), store.clone(), metrics.clone());
        tasks.spawn(p.clone().run(shutdown.clone()));
        Some(p)
    } else {
        None
    };

    if let Some(addr) = cfg.admin.listen {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding admin.listen {addr}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, token = cfg.admin.token.is_some(), "admin listener: health, metrics, API and event log");
        ready.insert("admin".into(), addr.to_string().into());
        tasks.spawn(ops::admin::serve(listener, ops.clone(), shutdown.clone()));
    }
    tasks.spawn(ops::retention::run(ops.clone(), shutdown.clone()));
    tasks.spawn(ops::watchdog::run(ops.clone(), shutdown.clone()));

    if let Some(file) = &cfg.server.ready_file {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::Value::Object(ready).to_string()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    }
    // systemd: READY once storage is open and the listener bound.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(role = ?role, config = %path.display(), "hooktrail started");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                // systemd shows the unit as reloading until READY=1 comes back.
                notify_reloading();
                match config::load(path) {
                    Ok(l) => {
                        for w in &l.warnings {
                            tracing::warn!("config: {w}");
                        }
                        if let Some(i) = &ingest {
                            i.reload(l.config.clone());
                            tls::reload(tls.as_deref(), l.config.server.tls.as_ref());
                        }
                        if let Some(p) = &processor {
                            log_preflight(&l.config);
                            p.reload(l.config.clone());
                        }
                        ops.reload(l.config.clone());
                        tracing::info!(sources = l.config.sources.len(), handlers = l.config.handlers.len(), "SIGHUP: configuration reloaded");
                    }
                    Err(e) => tracing::error!("SIGHUP: configuration refused, keeping the running one: {e}"),
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Handlers that cannot run as configured (a missing script, a bad
/// interpreter) do not stop a start or a reload, since a deploy may install
/// the script later; they are logged at ERROR so `journalctl -p err` shows
/// them before the first attempt fails (README, "Shell handler").
fn log_preflight(cfg: &config::Config) {
    for p in cfg.preflight() {
        tracing::error!(key = %p.path, "handler cannot run as configured: {p}; its attempts fail and are retried until this is fixed");
    }
}

/// `RELOADING=1`, with the `MONOTONIC_USEC=` systemd 253+ expects beside it.
fn notify_reloading() {
    let _ = match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(stamp) => sd_notify::notify(false, &[sd_notify::NotifyState::Reloading, stamp]),
        Err(_) => sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]),
    };
}
