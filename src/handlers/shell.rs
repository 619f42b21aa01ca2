//! The shell handler: runs `command` directly (no shell unless the user names
//! one) in its own process group, payload data only through stdin, environment
//! variables and a file — never spliced into the command line.
//!
//! On timeout (or shutdown past the grace period) the whole process group is
//! killed, so a script's children do not outlive the attempt. Leftover
//! background processes of a script that exited are killed too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{envelope, AttemptResult, Handler, Job, OutputBuf};
use crate::config::{HandlerKind, ShellSpec, StdinMode};
use crate::store::{rfc3339, Outcome};

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

/// The attempt's `HOOKTRAIL_PAYLOAD_FILE`, removed when dropped.
fn payload_file(json: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write as _;
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("hooktrail-payload-").suffix(".json");
        b
    };
    // The chosen directory can go away (tmpfs unmounted); the system temp
    // directory is the fallback for this attempt.
    let mut f = builder().tempfile_in(payload_dir()).or_else(|_| builder().tempfile())?;
    f.write_all(json)?;
    Ok(f)
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
    let payload_json = d.payload.to_string();
    let payload_file = match payload_file(payload_json.as_bytes()) {
        Ok(f) => f,
        Err(e) => return AttemptResult::retry(format!("cannot write the payload file: {e}")),
    };
    let stdin_bytes: Option<Vec<u8>> = match spec.stdin {
        StdinMode::Json => Some(payload_json.into_bytes()),
        StdinMode::Raw => Some(d.body.to_vec()),
        StdinMode::Envelope => Some(envelope(d).to_string().into_bytes()),
        StdinMode::None => None,
    };

    let mut cmd = Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .process_group(0)
        .stdin(if stdin_bytes.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
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
    if let Some(dir) = &spec.workdir {
        cmd.current_dir(dir);
    }

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return AttemptResult::retry(format!("cannot start `{}`: {e}", spec.command[0])),
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);

    if let (Some(bytes), Some(mut stdin)) = (stdin_bytes, child.stdin.take()) {
        // A handler that does not read its stdin must not block us: write in
        // the background and ignore a closed pipe.
        tokio::spawn(async move {
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let timeout = job.config.timeout;
    let mut out = OutputBuf::default();
    let status = tokio::select! {
        s = child.wait() => Ok(s),
        _ = tokio::time::sleep(timeout) => Err(false),
        _ = job.cancel.cancelled() => Err(true),
    };
    // Whatever happened, nothing of this attempt may keep running.
    kill_group(pgid);
    if status.is_err() {
        let _ = child.wait().await;
    }
    // Pipes close once every process of the group is gone; a process that
    // escaped the group (setsid) could hold them, so bound the drain.
    let drain = async {
        while let Some(chunk) = rx.recv().await {
            out.push(&chunk);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
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
                (Some(code), _) if spec.permanent_exit_codes.contains(&code) => AttemptResult {
                    output,
                    exit_code: Some(code),
                    ..AttemptResult::failure(format!("exit code {code} is in permanent_exit_codes; not retrying"))
                },
                (Some(code), _) => AttemptResult { output, exit_code: Some(code), ..AttemptResult::retry(format!("exit code {code}")) },
                (None, Some(sig)) => AttemptResult { output, ..AttemptResult::retry(format!("killed by signal {sig}")) },
                (None, None) => AttemptResult { output, ..AttemptResult::retry("ended without an exit code") },
            }
        }
    }
}
