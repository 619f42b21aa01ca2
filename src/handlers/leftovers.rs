//! What a daemon killed with SIGKILL leaves behind, and how the next start
//! clears it: the shell handlers it was running (whose timeout nobody
//! enforces any more, and which would run beside their own re-run) and their
//! payload files (lead data).
//!
//! Both are marked with the daemon that made them, as `<pid>.<start>`:
//! `<start>` is the process's start time (`/proc/<pid>/stat` field 22, clock
//! ticks since boot), so the pair names one process, never a later one that
//! reuses the pid. Handlers get it as `HOOKTRAIL_DAEMON` in their environment
//! (inherited by whatever they start); payload files carry it in their name,
//! `hooktrail-payload-<pid>.<start>-….json`.
//!
//! Each daemon that runs handlers also leaves an empty file named by its id
//! in `<storage.path>.handlers/` (on PostgreSQL, where the database is not
//! on this host, in the directory [`marks_dir`] names). At start, [`clear`]
//! finds there the daemons of this database that are gone, kills the process group of every process
//! whose environment names one of them, and removes their files; then it
//! removes the payload files of any daemon that is gone. What a live daemon
//! made (another `serve --role process` on this database or this host) is
//! left alone, and so are payload files named by older versions (no owner in
//! the name: they may be in use).
//!
//! Marking costs nothing per attempt (one more environment variable, made
//! once); a record file per attempt would cost a file create and unlink and a
//! `/proc` read on every spawn, about 7% of a `/bin/true` delivery's CPU. The
//! scan reads `/proc/*/environ` once, at start. Under systemd the unit's
//! cgroup is killed whole when the daemon dies (`systemd/hooktrail.service`),
//! so this matters most elsewhere.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The handler environment variable naming the daemon that started it.
pub const DAEMON_VAR: &str = "HOOKTRAIL_DAEMON";

/// Start of every payload file's name.
const PAYLOAD_PREFIX: &str = "hooktrail-payload-";

/// The start time of process `pid` (`/proc/<pid>/stat` field 22), or `None`
/// when there is no such process.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// Field `n` (1-based, `n` ≥ 3) of `/proc/<pid>/stat`.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp …": the command may hold spaces and
    // parentheses, so count from the last `)`; field 3 is the first after it.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

/// Whether `pid` is still the process that had `start` as its start time.
fn same_process(pid: i32, start: u64) -> bool {
    pid > 0 && start_time(pid) == Some(start)
}

/// `<pid>.<start>` of this daemon.
pub fn daemon_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let pid = std::process::id() as i32;
        format!("{pid}.{}", start_time(pid).unwrap_or(0))
    })
}

/// Parses `<pid>.<start>`.
fn parse_id(s: &str) -> Option<(i32, u64)> {
    let (pid, start) = s.split_once('.')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Whether `id` names a daemon (not this one) that is gone.
fn gone(id: &str) -> bool {
    id != daemon_id() && parse_id(id).is_some_and(|(pid, start)| !same_process(pid, start))
}

/// Run once at start, before any attempt: kills what the daemons of the
/// database at `db_path` that died left running, and removes the payload
/// files in `payload_dirs` of any daemon that died.
pub fn clear(db_path: &Path, payload_dirs: &[&Path]) {
    let mut root = db_path.as_os_str().to_owned();
    root.push(".handlers");
    clear_in(Path::new(&root), payload_dirs);
}

/// [`clear`] for the daemons noted in `root`, whatever their database.
fn clear_in(root: &Path, payload_dirs: &[&Path]) {
    let dead: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .filter(|(id, _)| gone(id))
        .collect();
    if !dead.is_empty() {
        kill_orphans(&dead.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>());
        for (_, path) in &dead {
            let _ = std::fs::remove_file(path);
        }
    }
    let mine = root.join(daemon_id());
    if let Err(e) = std::fs::create_dir_all(root).and_then(|()| std::fs::File::create(&mine).map(drop)) {
        tracing::warn!(path = %mine.display(), error = %e, "cannot note this daemon on this host; if it is killed, the next start will not stop the handlers it leaves running");
    }
    remove_stale_payload_files(payload_dirs);
}

/// The config file `serve` was started with (see [`note_config_file`]).
static CONFIG_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Remembers the config file `serve` loaded: on PostgreSQL, nodes note
/// themselves beside it ([`marks_dir`]).
pub fn note_config_file(path: &Path) {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let _ = CONFIG_FILE.set(path);
}

/// Where the nodes of a database server on this host note themselves
/// (README "Several nodes: PostgreSQL"): `handlers/` in the directory
/// systemd gives the unit (`$RUNTIME_DIRECTORY`, else `$STATE_DIRECTORY`),
/// else `<config file>.handlers/` beside the config file, so the nodes
/// started with one config on one machine clear each other's leftovers.
fn marks_dir() -> Option<PathBuf> {
    for var in ["RUNTIME_DIRECTORY", "STATE_DIRECTORY"] {
        let dirs = std::env::var_os(var).filter(|v| !v.is_empty());
        if let Some(first) = dirs.as_ref().and_then(|v| std::env::split_paths(v).next()) {
            return Some(first.join("handlers"));
        }
    }
    let mut beside = CONFIG_FILE.get()?.as_os_str().to_owned();
    beside.push(".handlers");
    Some(PathBuf::from(beside))
}

/// Run once at start, before any attempt: [`clear`] for the daemons that
/// shared this host's note for `storage` (the SQLite file, or on a
/// database server [`marks_dir`]).
pub fn clear_for(storage: &crate::config::StorageConfig, payload_dirs: &[&Path]) {
    match (storage.sqlite(), marks_dir()) {
        (Some(db), _) => clear(&db.path, payload_dirs),
        (None, Some(root)) => clear_in(&root, payload_dirs),
        (None, None) => {
            tracing::warn!(
                "no place to note this node on this host; if it is killed, the next start will not stop the handlers it leaves running"
            );
            remove_stale_payload_files(payload_dirs);
        }
    }
}

/// SIGKILL to the process group of every process whose environment names one
/// of the `dead` daemons. Several processes of one group are one kill.
fn kill_orphans(dead: &[&str]) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    let me = std::process::id() as i32;
    // SAFETY: getpgrp(2) cannot fail.
    let my_group = unsafe { libc::getpgrp() };
    let mut killed = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        // Unreadable for other users' processes and for zombies: skipped.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        let Some(owner) = marked_by(&environ) else { continue };
        if !dead.contains(&owner.as_str()) {
            continue;
        }
        let Some(group) = stat_field(pid, 5).and_then(|g| g.parse::<i32>().ok()) else { continue };
        // Never this daemon's own group (a daemon started from a handler
        // inherits the mark), nor init's.
        if group <= 1 || group == my_group || killed.contains(&group) {
            continue;
        }
        // SAFETY: killpg only sends a signal; the group was read from a
        // process just found to carry the dead daemon's mark.
        if unsafe { libc::killpg(group, libc::SIGKILL) } == 0 {
            tracing::warn!(pgid = group, daemon = %owner, "killed a handler's process group left running by a daemon that died");
            killed.push(group);
        }
    }
}

/// The daemon id in a `/proc/<pid>/environ` (NUL-separated `K=V`), if any.
fn marked_by(environ: &[u8]) -> Option<String> {
    let key = format!("{DAEMON_VAR}=");
    environ.split(|b| *b == 0).find_map(|kv| kv.strip_prefix(key.as_bytes())).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// `hooktrail-payload-<pid>.<start>-`: the start of this daemon's payload file names.
pub fn payload_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| format!("{PAYLOAD_PREFIX}{}-", daemon_id()))
}

/// Removes the payload files in `dirs` whose daemon is gone.
fn remove_stale_payload_files(dirs: &[&Path]) {
    let mut removed = 0usize;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(owner) = name.strip_prefix(PAYLOAD_PREFIX).filter(|_| name.ends_with(".json")).and_then(|r| r.split_once('-')) else {
                continue;
            };
            // Older versions named no owner: those files are left alone.
            if parse_id(owner.0).is_some() && gone(owner.0) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::warn!(removed, "removed payload files left by a daemon that died");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_this_process_and_nothing_for_a_missing_one() {
        let pid = std::process::id() as i32;
        let start = start_time(pid).expect("this process has a start time");
        assert!(same_process(pid, start));
        assert!(!same_process(pid, start + 1));
        assert_eq!(start_time(i32::MAX), None);
        assert!(!gone(daemon_id()));
        assert!(gone(&format!("{pid}.{}", start + 1)) && gone(&format!("{}.5", i32::MAX)));
        assert!(!gone("nonsense"), "only what names a process can be gone");
    }

    #[test]
    fn the_mark_is_found_among_the_environment() {
        assert_eq!(marked_by(b"A=1\0HOOKTRAIL_DAEMON=12.34\0B=2\0"), Some("12.34".into()));
        assert_eq!(marked_by(b"A=1\0XHOOKTRAIL_DAEMON=12.34\0"), None);
        assert_eq!(marked_by(b""), None);
    }

    #[test]
    fn only_payload_files_of_dead_daemons_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        let start = start_time(pid as i32).unwrap();
        let names = [
            format!("{}abc.json", payload_prefix()),                 // this daemon's: in use
            format!("{PAYLOAD_PREFIX}{pid}.{}-abc.json", start + 1), // an earlier process with this pid
            format!("{PAYLOAD_PREFIX}{}.5-abc.json", i32::MAX),      // a process that is gone
            format!("{PAYLOAD_PREFIX}Xy12zq.json"),                  // an older version's name
            "unrelated.json".to_string(),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), "{}").unwrap();
        }
        remove_stale_payload_files(&[dir.path()]);
        let left: Vec<bool> = names.iter().map(|n| dir.path().join(n).exists()).collect();
        assert_eq!(left, [true, false, false, true, true]);
    }
}
