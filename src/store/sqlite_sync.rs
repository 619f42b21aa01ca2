//! The SQLite writer's WAL syncer: commits run with `synchronous=NORMAL`,
//! and a batch is answered only after an `fdatasync` of the write-ahead log
//! that *began after* its COMMIT returned (README "Durability"). The syncs
//! run back to back on threads of their own, so the writer goes on with the
//! next batch while the disk is busy: ingest is bound by the CPU, not by the
//! disk's latency. This module owns the queue of commits waiting for a sync
//! and the sync loop; what is answered, and the checks before answering,
//! stay with the writer (`sqlite.rs`).
//!
//! Two sync loops share the queue, each with its own descriptor of the log:
//! while one waits for the disk, the other can already begin a sync for the
//! commits made since. With one loop, a request answered at the end of a
//! sync sends its next one, which commits just after the next sync began
//! and so waits for that one *and* the one after: about two sync latencies
//! per request, which bounds the rate at (connections) / (2 × latency). With
//! two, a commit waits for about one. Nothing in the argument below needs
//! syncs one at a time: each commit is still answered only by a sync that
//! began after it returned. Each loop has its own descriptor because the
//! kernel reports a writeback error once per open file: two loops on one
//! descriptor could let one of them see success after the other consumed
//! the error.
//!
//! # Why NORMAL plus this sync is as durable as FULL
//!
//! (SQLite 3.46, the version `libsqlite3-sys` bundles; functions of `wal.c`.)
//!
//! - **A commit writes the same bytes in both modes.** `walFrames` writes the
//!   transaction's frames to the `-wal` file with plain `write`s, the last
//!   one carrying the commit mark. With FULL it then calls `sqlite3OsSync` on
//!   the WAL file and returns; with NORMAL it returns without that sync. The
//!   one other difference, padding the commit out to a sector boundary, is
//!   off in both modes on Unix (`SQLITE_IOCAP_POWERSAFE_OVERWRITE`, the
//!   default). So "COMMIT returned, then an fdatasync of the WAL completed"
//!   leaves the disk exactly as a FULL commit does.
//! - **Our own file descriptor covers SQLite's writes.** `fdatasync` flushes
//!   the file's dirty pages and the metadata needed to read them back (its
//!   size, its blocks), whichever descriptor wrote them: it works on the
//!   inode. [`WalFile`] opens the `-wal` file once, after SQLite created it,
//!   and the writer checks after each sync that the path still names that
//!   inode (the file being replaced, below). The bundled SQLite syncs with
//!   `fsync` (it is built without `HAVE_FDATASYNC`); `fdatasync` writes the
//!   same data and size, leaving out only timestamps.
//! - **A WAL restart never overwrites frames that are not on disk.** After a
//!   checkpoint, the next writer may start the WAL over from its beginning
//!   (`walRestartLog`), writing over old frames. It does so only when the
//!   checkpoint copied *every* frame into the database (`nBackfill ==
//!   mxFrame`, checked through read lock 0). And `walCheckpoint`, with
//!   NORMAL as with FULL, first syncs the WAL, copies the frames, then syncs
//!   the database file, and only then records them as copied (`nBackfill`);
//!   a pass that copies only part of the WAL records less than all of it, so
//!   it allows no restart. So a frame a restart overwrites is already synced
//!   into the database file, and a commit whose frames were overwritten
//!   before our sync ran is durable there. The restarted WAL's new header
//!   is synced by SQLite itself before any frame follows it (`syncHeader`),
//!   so recovery never reads the new frames against the old header. Hence
//!   checkpoints (the checkpointer thread's and the writer's own) need no
//!   ordering against this thread.
//! - **The file being replaced or deleted.** The writer's FileId check still
//!   runs after each COMMIT (as before), and again after the sync that covers
//!   it, for the database file and for the `-wal` file, before anything is
//!   answered: a sync of a file that no longer sits at the configured path
//!   makes nothing durable there, so its commits get 503.
//! - **A failed sync.** After a failed `fdatasync` the kernel may have
//!   dropped the dirty pages, and a retry can report success without writing
//!   them (PostgreSQL's "fsyncgate"). So a failure is never retried: the
//!   commits it covered get 503 and the store takes a sticky fault, refusing
//!   writes until a restart, when SQLite recovers from what is on disk.
//!
//! The `-wal` file is never locked by SQLite (WAL locks live in `-shm`), so
//! opening and closing our own descriptor on it cannot drop a POSIX lock of
//! SQLite's; the database file itself is only ever `stat`ed.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The `-wal` file of a database, opened for syncing.
pub struct WalFile {
    path: PathBuf,
    file: File,
    /// (device, inode) of the file opened.
    id: (u64, u64),
}

impl WalFile {
    /// Opens the write-ahead log beside `db` (it must exist: SQLite creates it
    /// when a connection in WAL mode first reads) and syncs the directory
    /// once, so the log's directory entry is on disk before any commit
    /// counts on it (SQLite syncs it too, at the log's first sync).
    pub fn open(db: &Path) -> std::io::Result<WalFile> {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        let path = PathBuf::from(path);
        let file = File::open(&path)?;
        let m = file.metadata()?;
        let dir = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok(WalFile { path, file, id: (m.dev(), m.ino()) })
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the file opened (`Ok(false)`: deleted,
    /// moved or replaced); an error says nothing either way.
    pub fn in_place(&self) -> std::io::Result<bool> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok((m.dev(), m.ino()) == self.id),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Commits waiting for a sync, in commit order, each with what to release
/// once a sync covers it.
pub struct SyncQueue<T> {
    state: Mutex<Waiting<T>>,
    wake: Condvar,
    /// Tells the writer that a sync loop is free (see [`SyncQueue::hold`]).
    free: Condvar,
}

struct Waiting<T> {
    commits: Vec<(u64, T)>,
    closed: bool,
    /// Sync loops waiting for a commit.
    idle: usize,
    /// The writer holds its transaction open until a loop is free.
    armed: bool,
}

impl<T> Default for SyncQueue<T> {
    fn default() -> Self {
        SyncQueue {
            state: Mutex::new(Waiting { commits: Vec::new(), closed: false, idle: 0, armed: false }),
            wake: Condvar::new(),
            free: Condvar::new(),
        }
    }
}

impl<T> SyncQueue<T> {
    /// Hands over commit `seq`, whose COMMIT has returned: the next sync to
    /// begin covers it.
    pub fn push(&self, seq: u64, item: T) {
        self.state.lock().expect("sync queue lock poisoned").commits.push((seq, item));
        self.wake.notify_one();
    }

    /// No more commits come: the sync loops cover what waits, then end.
    pub fn close(&self) {
        self.state.lock().expect("sync queue lock poisoned").closed = true;
        self.wake.notify_all();
        self.free.notify_all();
    }

    /// Whether a commit made now would wait for a sync loop: every loop is
    /// syncing (or about to take commits already waiting). Then the writer
    /// keeps its transaction open, waits in [`SyncQueue::wait_free`] and
    /// adds to it what arrived meanwhile. A commit
    /// made while every loop is busy would only wait in this queue; made
    /// when a loop is free it is synced at once and carries everything that
    /// arrived meanwhile: fewer, larger commits (each commit rewrites the
    /// index and counter pages it touches), the same waits.
    pub fn hold(&self) -> bool {
        let mut st = self.state.lock().expect("sync queue lock poisoned");
        if st.closed || (st.idle > 0 && st.commits.is_empty()) {
            return false;
        }
        st.armed = true;
        true
    }

    /// After [`SyncQueue::hold`] said yes: waits until a sync loop is free,
    /// at most `timeout`.
    pub fn wait_free(&self, timeout: Duration) {
        let st = self.state.lock().expect("sync queue lock poisoned");
        let _ = self.free.wait_timeout_while(st, timeout, |st| st.armed && !st.closed).expect("sync queue lock poisoned");
    }

    /// Wakes the writer if it holds a transaction for a free loop.
    fn wake_writer(&self, st: &mut Waiting<T>) {
        if std::mem::take(&mut st.armed) {
            self.free.notify_one();
        }
    }

    /// Every commit waiting now (never none), or `None` once closed and drained.
    fn take(&self) -> Option<Vec<(u64, T)>> {
        let mut st = self.state.lock().expect("sync queue lock poisoned");
        st.idle += 1;
        while st.commits.is_empty() {
            if st.closed {
                st.idle -= 1;
                return None;
            }
            // Free, and nothing to sync: the writer may commit now.
            self.wake_writer(&mut st);
            st = self.wake.wait(st).expect("sync queue lock poisoned");
        }
        st.idle -= 1;
        let commits = std::mem::take(&mut st.commits);
        if st.idle > 0 {
            // Another loop is free for the writer's next commit.
            self.wake_writer(&mut st);
        }
        Some(commits)
    }
}

/// Test hook (`HOOKTRAIL_TEST_SYNC_TRACE=FILE`): appends `commit N`,
/// `sync begin N`, `sync end N` and `ack N` lines, one `write` each, so a
/// test through the real binary can check the order (`tests/durability.rs`).
/// Unset, the only case outside that test, it costs a branch.
#[derive(Default)]
pub struct SyncTrace(Option<File>);

impl SyncTrace {
    pub fn from_env() -> Self {
        let file =
            std::env::var_os("HOOKTRAIL_TEST_SYNC_TRACE").and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
        SyncTrace(file)
    }

    pub fn note(&self, what: &str, seq: u64) {
        if let Some(mut f) = self.0.as_ref() {
            let _ = f.write_all(format!("{what} {seq}\n").as_bytes());
        }
    }
}

/// The syncer thread: takes every commit waiting, syncs the log once for
/// all of them, and hands them to `release` with the sync's outcome; again
/// at once while commits keep coming. `delay` is the test hook's injected
/// disk latency, before each sync.
pub fn sync_loop<T>(
    queue: &SyncQueue<T>,
    wal: &WalFile,
    delay: Duration,
    trace: &SyncTrace,
    mut release: impl FnMut(std::io::Result<()>, Vec<(u64, T)>),
) {
    while let Some(commits) = queue.take() {
        let took = super::sqlite_timeline::stamp();
        let covers = commits.last().map_or(0, |(seq, _)| *seq);
        let n = commits.len();
        trace.note("sync begin", covers);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let q0 = took.map(|_| super::sqlite_timeline::runq_us());
        let start = took.map(|_| std::time::Instant::now());
        let synced = wal.file.sync_data();
        let end = took.map(|_| std::time::Instant::now());
        let q1 = took.map(|_| super::sqlite_timeline::runq_us());
        trace.note("sync end", covers);
        release(synced, commits);
        if let (Some(tl), Some(took), Some(start), Some(end)) = (super::sqlite_timeline::get(), took, start, end) {
            let done = tl.us(std::time::Instant::now());
            let runq = q1.unwrap_or(0).saturating_sub(q0.unwrap_or(0));
            tl.line(format_args!("S {covers} {n} {} {} {} {done} {runq}", tl.us(took), tl.us(start), tl.us(end)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_sync_covers_every_commit_handed_over_before_it_began_and_close_drains() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        std::fs::write(dir.path().join("db.sqlite-wal"), b"").unwrap();
        let wal = WalFile::open(&db).unwrap();
        assert!(wal.in_place().unwrap());
        let queue = Arc::new(SyncQueue::<u64>::default());
        for seq in 1..=3 {
            queue.push(seq, seq * 10);
        }
        queue.close();
        let mut released = Vec::new();
        sync_loop(&queue, &wal, Duration::ZERO, &SyncTrace::default(), |r, commits| {
            assert!(r.is_ok());
            released.push(commits);
        });
        assert_eq!(released, vec![vec![(1, 10), (2, 20), (3, 30)]], "one sync for everything waiting, then the loop ends");
    }

    #[test]
    fn the_writer_holds_its_commit_while_every_loop_syncs_and_is_woken_when_one_comes_free() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        std::fs::write(dir.path().join("db.sqlite-wal"), b"").unwrap();
        let wal = WalFile::open(&db).unwrap();
        let queue = Arc::new(SyncQueue::<u64>::default());
        assert!(queue.hold(), "no loop running: a commit now would wait");
        let (released_tx, released) = std::sync::mpsc::channel();
        let (gate_tx, gate) = std::sync::mpsc::channel::<()>();
        let q = queue.clone();
        let syncer = std::thread::spawn(move || {
            sync_loop(&q, &wal, Duration::ZERO, &SyncTrace::default(), |r, commits| {
                assert!(r.is_ok());
                released_tx.send(commits).unwrap();
                // The loop stays busy (as in a slow sync) until the test opens the gate.
                let _ = gate.recv();
            })
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while queue.hold() {
            assert!(std::time::Instant::now() < deadline, "the loop never came free");
            std::thread::yield_now();
        }
        queue.push(1, 10);
        assert_eq!(released.recv_timeout(Duration::from_secs(10)).unwrap(), vec![(1, 10)]);
        assert!(queue.hold(), "the only loop is busy: the writer holds its transaction");
        let (freed_tx, freed) = std::sync::mpsc::channel();
        let q = queue.clone();
        let writer = std::thread::spawn(move || {
            q.wait_free(Duration::from_secs(60));
            freed_tx.send(()).unwrap();
        });
        gate_tx.send(()).unwrap();
        freed.recv_timeout(Duration::from_secs(10)).expect("the loop that came free woke the writer");
        assert!(!queue.hold(), "a loop is free: commit now");
        writer.join().unwrap();
        queue.close();
        drop(gate_tx);
        syncer.join().unwrap();
    }

    #[test]
    fn a_replaced_or_deleted_log_is_not_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let path = dir.path().join("db.sqlite-wal");
        std::fs::write(&path, b"").unwrap();
        let wal = WalFile::open(&db).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!wal.in_place().unwrap());
        std::fs::write(&path, b"").unwrap();
        assert!(!wal.in_place().unwrap(), "a new file at the path is not the one synced");
    }
}
