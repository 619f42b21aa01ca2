//! The SQLite backend's free-space guard (`storage.min_free_bytes`): a
//! nearly full volume turns into a clear 503 at the door
//! ([`crate::store::Store::admission`]) instead of a failed COMMIT (or a
//! database that cannot even write its WAL) after the body was read.
//!
//! `statvfs` is cheap but can block on a network filesystem, so it never runs
//! per request: [`DiskGuard::sample_loop`] samples it every [`CHECK_EVERY`] on
//! a thread of its own, and requests read one atomic.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the free space is sampled.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often the sampling thread looks whether the store is closing, so
/// closing never waits a whole [`CHECK_EVERY`].
const CLOSING_POLL: Duration = Duration::from_millis(200);

/// Marks "not known" (never sampled, or statvfs failed): requests are let through
/// and the store reports its own write errors.
const UNKNOWN: u64 = u64::MAX;

/// The last sampled free space of the volume holding the database.
pub struct DiskGuard {
    /// A file or directory on the storage volume (the database's directory).
    path: PathBuf,
    free: AtomicU64,
}

impl DiskGuard {
    /// Samples once right away, so the very first request is already guarded.
    pub fn new(db_path: &Path) -> Self {
        let path = match db_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let g = DiskGuard { path, free: AtomicU64::new(UNKNOWN) };
        g.sample();
        g
    }

    /// Bytes available to the daemon on the storage volume, if known.
    pub fn free_bytes(&self) -> Option<u64> {
        Some(self.free.load(Ordering::Relaxed)).filter(|f| *f != UNKNOWN)
    }

    /// `Some(free)` when the volume has less than `min_free` bytes left.
    /// `min_free = 0` disables the check.
    pub fn below(&self, min_free: u64) -> Option<u64> {
        self.free_bytes().filter(|free| *free < min_free)
    }

    /// Says once, at start, which floor admission enforces: `0` really turns
    /// the check off (nothing else would show it, since no volume has less
    /// than 0 bytes free), any other value names the bound and today's free space.
    pub fn log_floor(&self, min_free: u64) {
        let path = self.path.display();
        match (min_free, self.free_bytes()) {
            (0, _) => tracing::info!(path = %path, "storage.min_free_bytes = 0: the free-disk check is off"),
            (n, Some(free)) => tracing::info!(path = %path, free, "storage.min_free_bytes: refusing new events below {n} bytes free"),
            (n, None) => {
                tracing::info!(path = %path, "storage.min_free_bytes: refusing new events below {n} bytes free (free space not known yet)")
            }
        }
    }

    fn sample(&self) {
        let v = match available_bytes(&self.path) {
            Ok(n) => n.min(UNKNOWN - 1),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read free space of the storage volume");
                UNKNOWN
            }
        };
        self.free.store(v, Ordering::Relaxed);
    }

    /// Re-samples every [`CHECK_EVERY`] until `closing` is set. Runs on its
    /// own thread: a sample that blocks (a hung network filesystem) holds up
    /// nothing but the next sample.
    pub fn sample_loop(&self, closing: &AtomicBool) {
        let mut last = Instant::now();
        while !closing.load(Ordering::Relaxed) {
            std::thread::sleep(CLOSING_POLL);
            if last.elapsed() >= CHECK_EVERY {
                last = Instant::now();
                self.sample();
            }
        }
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`
/// (`f_bavail × f_frsize`: the root reserve does not count).
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // points to writable memory of the size statvfs(3) fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialized the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_real_directory_is_known_and_compared() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(&dir.path().join("db.sqlite"));
        let free = g.free_bytes().expect("statvfs works on a temp dir");
        assert!(free > 0);
        assert_eq!(g.below(0), None, "0 disables the check");
        assert_eq!(g.below(free / 2), None);
        assert_eq!(g.below(u64::MAX - 1), Some(free));
    }

    #[test]
    fn an_unreadable_volume_is_unknown_and_lets_requests_through() {
        let g = DiskGuard::new(Path::new("/nonexistent-hooktrail-dir/db.sqlite"));
        assert_eq!(g.free_bytes(), None);
        assert_eq!(g.below(u64::MAX - 1), None);
    }
}
