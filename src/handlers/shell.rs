//! The shell handler: runs `command` directly (no shell unless the user names
//! one) in its own process group, payload data only through stdin, environment
//! variables and a file — never spliced into the command line.
//!
//! On timeout (or shutdown past the grace period) the whole process group is
//! killed, so a script's children do not outlive the attempt. Leftover
//! background processes of a script that exited are killed too. What a
//! daemon killed mid-attempt leaves (processes, payload files) carries its
//! mark, and the next start clears it (`handlers::leftovers`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::leftovers::{self, DAEMON_VAR};
use super::{envelope, AttemptResult, Handler, Job, OutputBuf};
use crate::config::{HandlerKind, ShellSpec, StdinMode};
use crate::store::{rfc3339, Outcome};

/// The `shell` handler: runs `command` directly (no shell), in its own process
/// group, with the payload on stdin, in the environment and in a file.
pub struct Shell;

/// Where payload files go: `$TMPDIR` when the user set one; otherwise
/// `/dev/shm` (memory: no disk journal per attempt, and lead data never
/// reaches a disk) when it is a writable directory; otherwise the system
/// temp directory. Chosen once, by creating a probe file.
fn payload_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if std::env::var_os("TMPDIR").is_some_and(|v| !v.is_empty()) {
            return std::env::temp_dir();
        }
        let shm = Path::new("/dev/shm");
        if tempfile::Builder::new().prefix("hooktrail-probe-").tempfile_in(shm).is_ok() {
            return shm.to_path_buf();
        }
        std::env::temp_dir()
    })
}

/// Where payload files may be: the chosen directory and the fallback.
pub fn payload_dirs() -> Vec<&'static Path> {
    static FALLBACK: OnceLock<PathBuf> = OnceLock::new();
    let fallback = FALLBACK.get_or_init(std::env::temp_dir).as_path();
    let mut dirs = vec![payload_dir()];
    if fallback != payload_dir() {
        dirs.push(fallback);
    }
    dirs
}

/// Becomes readable when process `pid` has ended, without reaping it. `None`
/// where pidfds are unavailable (Linux before 5.3); the caller then reaps
/// first and kills the group after, as before.
fn exit_watch(pid: i32) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open(2) takes a pid and flags, returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until the
    // AsyncFd that owns it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// A pipe, both ends close-on-exec (the child gets its end through dup2).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds` on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The read end of the output pipe, registered with the runtime. Made
/// non-blocking here, where it is known to be a pipe's read end, so tokio's
/// checks (an `fstat` and a flags read per attempt) are not needed.
fn output_receiver(read: OwnedFd) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(read)
}

/// The child's stdin: a pipe already holding `bytes`. A payload fits in the
/// pipe's buffer (64 KiB) almost always, so it is written here, at once, and
/// no task or event registration is needed; what does not fit is returned
/// (write end, the rest) for a background writer.
#[allow(clippy::type_complexity)]
fn stdin_pipe(bytes: &[u8]) -> std::io::Result<(OwnedFd, Option<(OwnedFd, Vec<u8>)>)> {
    let (read, write) = pipe()?;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: writes from a live slice to a descriptor we own.
        let n = unsafe { libc::write(write.as_raw_fd(), bytes[off..].as_ptr().cast(), bytes.len() - off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok((read, Some((write, bytes[off..].to_vec())))),
                _ => return Err(e),
            }
        }
        off += n as usize;
    }
    Ok((read, None))
}

/// `v` as compact JSON, the bytes `Value::to_string` gives (the same
/// serializer), written straight into a buffer of about `hint` bytes rather
/// than through `fmt`, which checks every piece as UTF-8.
fn json_bytes(v: &serde_json::Value, hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(hint);
    serde_json::to_writer(&mut out, v).expect("a Value always prints, and writing to a Vec cannot fail");
    out
}

/// The attempt's `HOOKTRAIL_PAYLOAD_FILE`, removed when dropped.
fn payload_file(json: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write as _;
    let builder = || {
        let mut b = tempfile::Builder::new();
        // Named after this daemon, so a later start can tell a file whose
        // daemon died (and remove it) from one in use.
        b.prefix(leftovers::payload_prefix()).suffix(".json");
        b
    };
    // The chosen directory can go away (tmpfs unmounted); the system temp
    // directory is the fallback for this attempt.
    let mut f = builder().tempfile_in(payload_dir()).or_else(|_| builder().tempfile())?;
    f.write_all(json)?;
    Ok(f)
}

/// The attempt's child process, reaped by this attempt itself (no tokio
/// reaper, see `run_shell`). Dropped before it was reaped (the attempt's
/// future dropped mid-way), it kills the child's group and reaps the child,
/// so nothing of the attempt runs on and no zombie stays.
struct Spawned(Option<std::process::Child>);

impl Spawned {
    fn pid(&self) -> i32 {
        self.0.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Waits for the child to end and reaps it: when `watch` (its pidfd)
    /// says it ended, or, without one (Linux before 5.3), looking every few
    /// milliseconds.
    async fn reap(&mut self, watch: Option<&tokio::io::unix::AsyncFd<OwnedFd>>) -> std::io::Result<std::process::ExitStatus> {
        loop {
            let Some(child) = self.0.as_mut() else { return Err(std::io::Error::other("the process was already reaped")) };
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                return Ok(status);
            }
            match watch {
                // A pidfd stays readable once its process ended.
                Some(w) => w.readable().await?.retain_ready(),
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else { return };
        // Not reaped yet: the group id cannot belong to anyone else.
        kill_group(child.id() as i32);
        let _ = child.kill();
        if !matches!(child.try_wait(), Ok(Some(_))) {
            // SIGKILL was sent: the wait is short, but not for a runtime thread.
            std::thread::spawn(move || child.wait());
        }
    }
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: killpg only sends a signal; a stale pgid fails with ESRCH.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// The value a pointer mapping puts in the environment: strings as they are,
/// anything else as JSON text; `None` (unset) when the pointer does not resolve.
fn env_value(payload: &serde_json::Value, pointer: &str) -> Option<String> {
    let v = payload.pointer(pointer)?;
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => return None,
        other => other.to_string(),
    };
    // The OS cannot carry NUL in an environment value.
    Some(s.replace('\0', "\u{FFFD}"))
}

#[async_trait]
impl Handler for Shell {
    async fn run(&self, job: Job<'_>) -> AttemptResult {
        let HandlerKind::Shell(spec) = &job.config.kind else { unreachable!("built only for shell handlers") };
        run_shell(spec, &job).await
    }
}

async fn run_shell(spec: &ShellSpec, job: &Job<'_>) -> AttemptResult {
    let d = job.delivery;
    // The normalized JSON: as the store holds it when it can say that is
    // what printing the payload gives (README "Shell handler": the same
    // bytes either way), else printed here.
    let printed;
    let payload_json: &[u8] = match &d.payload_text {
        Some(text) => text.as_bytes(),
        None => {
            printed = json_bytes(&d.payload, d.body.len());
            &printed
        }
    };
    let payload_file = match payload_file(payload_json) {
        Ok(f) => f,
        Err(e) => return AttemptResult::retry(format!("cannot write the payload file: {e}")),
    };
    let envelope_json;
    let stdin_bytes: Option<&[u8]> = match spec.stdin {
        StdinMode::Json => Some(payload_json),
        StdinMode::Raw => Some(&d.body),
        StdinMode::Envelope => {
            envelope_json = envelope(d).to_string().into_bytes();
            Some(&envelope_json)
        }
        StdinMode::None => None,
    };

    // stdout and stderr share one pipe: the attempt keeps them as one text
    // anyway, and this way in the order the script wrote them.
    let (out_read, out_write) = match pipe() {
        Ok(p) => p,
        Err(e) => return AttemptResult::retry(format!("cannot create the output pipe: {e}")),
    };
    let out_write2 = match out_write.try_clone() {
        Ok(fd) => fd,
        Err(e) => return AttemptResult::retry(format!("cannot create the output pipe: {e}")),
    };
    // std's `Command`, not tokio's: tokio would open a pidfd of its own to
    // reap the child, beside the one this attempt needs anyway to kill the
    // group before the leader is reaped (`exit_watch`). One pidfd, one
    // registration, per attempt. `process_group` (and no `pre_exec`) keeps
    // the spawn on the standard library's `posix_spawn` path: no fork of
    // the whole daemon.
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.command[1..]).process_group(0).stdout(Stdio::from(out_write)).stderr(Stdio::from(out_write2));
    let mut feed = None;
    match stdin_bytes {
        None => {
            cmd.stdin(Stdio::null());
        }
        Some(bytes) => match stdin_pipe(bytes) {
            Ok((read, rest)) => {
                cmd.stdin(Stdio::from(read));
                feed = rest;
            }
            Err(e) => return AttemptResult::retry(format!("cannot create the stdin pipe: {e}")),
        },
    }
    for var in job.hidden_env {
        cmd.env_remove(var);
    }
    cmd.env("HOOKTRAIL_EVENT_ID", d.event_id.to_string())
        .env("HOOKTRAIL_SOURCE", &d.source)
        .env("HOOKTRAIL_HANDLER", &d.handler)
        .env("HOOKTRAIL_ATTEMPT", d.attempt.to_string())
        .env("HOOKTRAIL_RECEIVED_AT", rfc3339(d.received_at))
        .env("HOOKTRAIL_CONTENT_TYPE", &d.content_type)
        .env("HOOKTRAIL_PAYLOAD_FILE", payload_file.path());
    for (var, pointer) in &spec.env {
        match env_value(&d.payload, pointer) {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
    }
    // Last, so no mapping can drop it: how a later start finds this
    // attempt's processes if the daemon is killed.
    cmd.env(DAEMON_VAR, leftovers::daemon_id());
    if let Some(dir) = &spec.workdir {
        cmd.current_dir(dir);
    }

    let spawned = cmd.spawn();
    // The command holds our copies of the child's pipe ends: close them, so
    // the output pipe ends when the child's group is done with it and a
    // child that never reads its stdin cannot leave a writer blocked.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => Spawned(Some(c)),
        // Retried, not failed: a deploy may install or fix the script later.
        // The preflight's diagnosis says more than ENOENT does (that a
        // script's interpreter is missing, say); the OS error otherwise.
        Err(e) => {
            let why = spec.preflight().err().unwrap_or_else(|| format!("{}: {e}", spec.program.display()));
            return AttemptResult::retry(format!("cannot start the command: {why}"));
        }
    };
    let pgid = child.pid();
    if let Some((write, rest)) = feed {
        // More than the pipe holds: the rest goes in the background, and a
        // handler that stops reading (or exits) just ends the write.
        match tokio::net::unix::pipe::Sender::from_owned_fd(write) {
            Ok(mut w) => {
                tokio::spawn(async move {
                    let _ = w.write_all(&rest).await;
                });
            }
            Err(e) => {
                // The handler would read a cut payload: stop it and retry.
                kill_group(pgid);
                let _ = child.reap(None).await;
                return AttemptResult::retry(format!("cannot write the rest of the payload to stdin: {e}"));
            }
        }
    }

    let timeout = job.config.timeout;
    let mut out = OutputBuf::default();
    let (status, drained) = {
        let reading = async {
            let Ok(mut r) = output_receiver(out_read) else { return };
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.push(&buf[..n]);
            }
        };
        tokio::pin!(reading);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut drained = false;
        let watch = exit_watch(pgid);
        let ended = loop {
            tokio::select! {
                _ = async { watch.as_ref().expect("guarded").readable().await.map(|mut g| g.retain_ready()) }, if watch.is_some() => break Ok(None),
                s = child.reap(None), if watch.is_none() => break Ok(Some(s)),
                _ = &mut reading, if !drained => drained = true,
                _ = &mut deadline => break Err(false),
                _ = job.cancel.cancelled() => break Err(true),
            }
        };
        // Whatever happened, nothing of this attempt may keep running. The
        // group is killed before the leader is reaped (when pidfds allow):
        // until then its id cannot belong to anyone else.
        kill_group(pgid);
        let status = match ended {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Ok(child.reap(watch.as_ref()).await),
            Err(why) => {
                let _ = child.reap(watch.as_ref()).await;
                Err(why)
            }
        };
        // The pipe ends once every process of the group is gone; a process
        // that escaped the group (setsid) could hold it, so bound the drain.
        if !drained {
            drained = tokio::time::timeout(Duration::from_secs(2), &mut reading).await.is_ok();
        }
        (status, drained)
    };
    if !drained {
        out.push_line("\n[output pipe still open 2 s after the handler ended; stopped reading]");
    }
    let output = out.finish();
    drop(payload_file);

    match status {
        Err(true) => AttemptResult { output, ..AttemptResult::interrupted() },
        Err(false) => AttemptResult {
            output,
            ..AttemptResult::retry(format!("timed out after {}; process group killed", humantime::format_duration(timeout)))
        },
        Ok(Err(e)) => AttemptResult { output, ..AttemptResult::retry(format!("waiting for the process failed: {e}")) },
        Ok(Ok(st)) => {
            use std::os::unix::process::ExitStatusExt as _;
            match (st.code(), st.signal()) {
                (Some(0), _) => AttemptResult { output, exit_code: Some(0), ..AttemptResult::new(Outcome::Success) },
                (Some(code), _) if spec.permanent_exit_codes.contains(&code) => {
                    AttemptResult { output, exit_code: Some(code), ..AttemptResult::failure("in permanent_exit_codes; not retrying") }
                }
                // The exit code is recorded beside: no error text restates it.
                (Some(code), _) => AttemptResult { output, exit_code: Some(code), ..AttemptResult::new(Outcome::Retry) },
                (None, Some(sig)) => AttemptResult { output, ..AttemptResult::retry(format!("killed by signal {sig}")) },
                (None, None) => AttemptResult { output, ..AttemptResult::retry("ended without an exit code") },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processes of group `pgid` that have not ended (zombies waiting for a
    /// reaper do not count: they run nothing).
    fn live_members(pgid: i32) -> usize {
        let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
        dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                // pid (comm) state ppid pgrp …: comm may hold spaces, so split after its ')'.
                let Some((_, rest)) = stat.rsplit_once(')') else { return false };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields.len() > 3 && fields[0] != "Z" && fields[2].parse::<i32>() == Ok(pgid)
            })
            .count()
    }

    #[test]
    fn an_attempt_dropped_before_its_child_ended_kills_the_whole_group() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30"])
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .expect("/bin/sh starts");
        let spawned = Spawned(Some(child));
        let pgid = spawned.pid();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while live_members(pgid) < 2 {
            assert!(std::time::Instant::now() < deadline, "the script's background sleep never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(spawned);
        while live_members(pgid) > 0 {
            assert!(std::time::Instant::now() < deadline, "group {pgid} still runs after the attempt was dropped");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
