//! Helpers for `bench/process.sh`, the processor benchmark of issue 4.
//!
//! ```text
//! process-bench spawn-rate N CONCURRENCY [bare|piped|group|pdeathsig]
//!     fork/exec + wait of /bin/true N times with tokio::process, CONCURRENCY at
//!     once (the shell handler's `concurrency`). `bare`: stdio to /dev/null;
//!     `piped`: what the shell handler sets up per attempt (own process group,
//!     stdin/stdout/stderr pipes read to the end); `group`: bare in its own
//!     process group (still `posix_spawn`); `pdeathsig`: that plus a `pre_exec`
//!     setting PR_SET_PDEATHSIG, which makes the standard library fork the
//!     whole process instead (the experiment behind README "Leases, crashes
//!     and stopping"). With BALLAST_MB=M in the environment, M MiB are
//!     allocated and touched first, so a fork copies page tables of a
//!     daemon-sized process. Prints `spawn_rate <per s>`.
//! process-bench target [ADDR]
//!     A loopback forward target (hyper 1.x, keep-alive): answers every POST 200;
//!     when the body is a hooktrail envelope it records now - received_at.
//!     GET /count, GET /wait/K (returns once K POSTs arrived), GET /latencies
//!     (microseconds, JSON). Prints `listening on ADDR`.
//! process-bench post URL N CONCURRENCY
//!     Posts N webhook events over CONCURRENCY keep-alive connections; every
//!     answer must be 200. Prints `post_rate <per s>`.
//! process-bench post-keyed URL N CONCURRENCY
//!     The same, with `"key_1000":"k<i % 1000>","key_50":"k<i % 50>"` added
//!     to event i: ordering keys for `bench/ordering.sh`.
//! process-bench wait-indexed DB TIMEOUT_S
//!     Waits until the daemon running on DB has put every stored event in the
//!     search index (`meta.search_upto` reached `max(seq)`; at once on a
//!     database without one), so a dispatch run that follows measures
//!     dispatch, not the indexing of the events just posted (an ingest cost).
//! process-bench dispatch DB HANDLER N TIMEOUT_S -- CMD...
//!     Starts CMD (`hooktrail serve --role process`) and polls the database every
//!     5 ms until N deliveries of HANDLER finished; prints the rate, then SIGTERMs
//!     CMD and waits for it. Any failed delivery makes it exit 1.
//!     Both spawn-rate and dispatch also print the CPU time (user + system, child
//!     processes included) per spawn / delivery: unlike a rate, it hardly moves
//!     when other work shares the machine.
//! process-bench latency URL TARGET N GAP_MS
//!     Posts N events one at a time to an idle daemon; after each, waits until
//!     TARGET received it, then stays idle GAP_MS. Prints p50/p90/p99/max of
//!     receive-to-dispatch latency as the target stamped it.
//! ```

use std::convert::Infallible;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A Net-Results form webhook, as the ingest benchmark posts (about 600 bytes).
fn event_body(i: usize) -> String {
    format!(
        r#"{{"contact_id":"749746728","form_id":"1c051a75-f78c-4961-b8d5-b233229ae125","form_completion_id":"{i}","referrer":"https://www.example.com/pricing?utm_source=newsletter&utm_medium=email","ip":"73.158.92.120","submission_time":"2020-12-04T20:58:01+00:00","submission_values":{{"first_name":["Daniel"],"last_name":["Golden"],"email_address":["dgolden@mid-corp.com"],"company_name":["MidSize Corp"],"phone":["+1 805 555 0100"],"comments":["Please call me about the enterprise plan for our marketing team."]}},"landing_page_url":"https://www.example.com/lp/enterprise"}}"#
    )
}

/// [`event_body`] with two ordering keys: 1,000 and 50 distinct values.
fn keyed_event_body(i: usize) -> String {
    let body = event_body(i);
    format!(r#"{{"key_1000":"k{}","key_50":"k{}",{}"#, i % 1000, i % 50, &body[1..])
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match argv.as_slice() {
        ["spawn-rate", n, c] => spawn_rate(n.parse().expect("N"), c.parse().expect("CONCURRENCY"), SpawnMode::Bare).await,
        ["spawn-rate", n, c, mode] => match SpawnMode::parse(mode) {
            Some(m) => spawn_rate(n.parse().expect("N"), c.parse().expect("CONCURRENCY"), m).await,
            None => Err(format!("unknown spawn mode `{mode}`").into()),
        },
        ["target"] => target("127.0.0.1:0").await,
        ["target", addr] => target(addr).await,
        ["post", url, n, c] => post(url, n.parse().expect("N"), c.parse().expect("CONCURRENCY"), event_body).await,
        ["post-keyed", url, n, c] => post(url, n.parse().expect("N"), c.parse().expect("CONCURRENCY"), keyed_event_body).await,
        ["wait-indexed", db, timeout] => wait_indexed(db, Duration::from_secs(timeout.parse().expect("TIMEOUT_S"))).await,
        ["dispatch", db, handler, n, timeout, "--", cmd @ ..] if !cmd.is_empty() => {
            dispatch(db, handler, n.parse().expect("N"), Duration::from_secs(timeout.parse().expect("TIMEOUT_S")), cmd).await
        }
        ["latency", url, tgt, n, gap] => {
            latency(url, tgt, n.parse().expect("N"), Duration::from_millis(gap.parse().expect("GAP_MS"))).await
        }
        _ => {
            eprintln!("usage: see the module doc of bench/process/src/main.rs");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("process-bench: {e}");
        std::process::exit(1);
    }
}

// ------------------------------------------------------------------ spawn

/// CPU seconds (user + system) used so far by this process (`libc::RUSAGE_SELF`)
/// or by its waited-for descendants (`libc::RUSAGE_CHILDREN`, grandchildren
/// included once their parent reaped them).
fn cpu_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// CPU seconds (user + system, all threads) used so far by process `pid`
/// itself, from `/proc/<pid>/stat` (its reaped children not included).
fn own_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …: comm may hold spaces, so count from its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// On-CPU seconds of each of process `pid`'s live threads, summed by thread
/// name (`/proc/<pid>/task/*/schedstat`: nanoseconds, not 10 ms ticks, so
/// a thread's share of a few µs per delivery shows). Threads that already
/// ended are not in it.
fn thread_cpu_secs(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return by_name };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(name), Ok(stat)) = (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("schedstat"))) else { continue };
        let Some(ns) = stat.split_whitespace().next().and_then(|f| f.parse::<f64>().ok()) else { continue };
        *by_name.entry(name.trim().to_string()).or_insert(0.0) += ns / 1e9;
    }
    by_name
}

/// How `spawn-rate` starts each /bin/true.
#[derive(Clone, Copy, Debug)]
enum SpawnMode {
    Bare,
    Piped,
    Group,
    Pdeathsig,
}

impl SpawnMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bare" => SpawnMode::Bare,
            "piped" => SpawnMode::Piped,
            "group" => SpawnMode::Group,
            "pdeathsig" => SpawnMode::Pdeathsig,
            _ => return None,
        })
    }
}

/// BALLAST_MB MiB allocated and touched, kept for the life of the process.
fn ballast() -> Vec<u8> {
    let mb: usize = std::env::var("BALLAST_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut v = vec![0u8; mb << 20];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    v
}

async fn spawn_rate(n: usize, concurrency: usize, mode: SpawnMode) -> Result<(), Error> {
    let kept = ballast();
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_secs(libc::RUSAGE_SELF) + cpu_secs(libc::RUSAGE_CHILDREN);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let ok = match mode {
                    SpawnMode::Bare => run_bare().await?,
                    SpawnMode::Piped => run_piped().await?,
                    SpawnMode::Group | SpawnMode::Pdeathsig => run_grouped(matches!(mode, SpawnMode::Pdeathsig)).await?,
                };
                if !ok {
                    return Err::<(), Error>("/bin/true failed".into());
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(libc::RUSAGE_SELF) + cpu_secs(libc::RUSAGE_CHILDREN) - cpu0;
    println!("spawn_rate {:.0}", n as f64 / secs);
    println!("cpu_ms_per_spawn {:.3}", cpu * 1000.0 / n as f64);
    eprintln!("{n} spawns of /bin/true ({mode:?}, {} MiB ballast) at concurrency {concurrency} in {secs:.3}s", kept.len() >> 20);
    Ok(())
}

/// /bin/true in its own process group, stdio to /dev/null; with `pdeathsig`,
/// killed when this process dies (a `pre_exec`: fork instead of `posix_spawn`).
async fn run_grouped(pdeathsig: bool) -> Result<bool, Error> {
    let mut cmd = tokio::process::Command::new("/bin/true");
    cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    if pdeathsig {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(cmd.status().await?.success())
}

async fn run_bare() -> Result<bool, Error> {
    let st = tokio::process::Command::new("/bin/true").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().await?;
    Ok(st.success())
}

/// What the shell handler sets up around each attempt, minus the payload file.
async fn run_piped() -> Result<bool, Error> {
    let mut child = tokio::process::Command::new("/bin/true")
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    drop(child.stdin.take());
    let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (st, _, _) = tokio::join!(child.wait(), out.read_to_end(&mut a), err.read_to_end(&mut b));
    Ok(st?.success())
}

// ------------------------------------------------------------------ target

struct TargetState {
    count: AtomicU64,
    arrived: tokio::sync::watch::Sender<u64>,
    latencies_us: Mutex<Vec<i64>>,
}

async fn target(addr: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let (arrived, _) = tokio::sync::watch::channel(0);
    let state = Arc::new(TargetState { count: AtomicU64::new(0), arrived, latencies_us: Mutex::new(Vec::new()) });
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let conn = builder.serve_connection(TokioIo::new(stream), hyper::service::service_fn(move |req| serve_target(req, st.clone())));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn serve_target(req: Request<Incoming>, st: Arc<TargetState>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if req.method() == Method::GET {
        let body = match path.as_str() {
            "/count" => st.count.load(Ordering::SeqCst).to_string(),
            "/latencies" => serde_json::to_string(&*st.latencies_us.lock().expect("latency lock")).expect("numbers serialize"),
            p if p.starts_with("/wait/") => {
                let want: u64 = p["/wait/".len()..].parse().unwrap_or(0);
                let mut rx = st.arrived.subscribe();
                let got = rx.wait_for(|c| *c >= want).await.map(|c| *c).unwrap_or(0);
                got.to_string()
            }
            _ => return Ok(Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::new())).expect("valid response")),
        };
        return Ok(Response::new(Full::new(Bytes::from(body))));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let now = chrono::Utc::now();
    // Only the latency phase sends envelopes; skip parsing the bulk phase's raw bodies.
    const KEY: &[u8] = b"\"received_at\"";
    if body.windows(KEY.len()).any(|w| w == KEY) {
        let received = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["received_at"].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()));
        if let Some(t) = received {
            let us = (now - t.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(i64::MAX);
            st.latencies_us.lock().expect("latency lock").push(us);
        }
    }
    let n = st.count.fetch_add(1, Ordering::SeqCst) + 1;
    st.arrived.send_replace(n);
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

// ------------------------------------------------------------------ client

struct Url {
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, Error> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok(Url { host: host.to_string(), path: path.to_string() })
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(host: &str) -> Result<Sender, Error> {
    let stream = TcpStream::connect(host).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(s: &mut Sender, method: Method, host: &str, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), Error> {
    s.ready().await?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let resp = s.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn post(url: &str, n: usize, concurrency: usize, make_body: fn(usize) -> String) -> Result<(), Error> {
    let u = Arc::new(parse_url(url)?);
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (u, next) = (u.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&u.host).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), Error>(());
                }
                let (status, body) = send(&mut s, Method::POST, &u.host, &u.path, Bytes::from(make_body(i))).await?;
                if status != StatusCode::OK {
                    return Err(format!("event {i}: {status} {}", String::from_utf8_lossy(&body)).into());
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("post_rate {:.0}", n as f64 / secs);
    eprintln!("posted {n} events over {concurrency} connections in {secs:.3}s");
    Ok(())
}

// ------------------------------------------------------------------ dispatch

async fn wait_indexed(db: &str, timeout: Duration) -> Result<(), Error> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let has_meta: bool = conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE name = 'meta'", [], |r| r.get(0))?;
    if !has_meta {
        return Ok(());
    }
    let t0 = Instant::now();
    loop {
        let (upto, max): (i64, i64) = conn.query_row(
            "SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'search_upto'), 0), coalesce((SELECT max(seq) FROM events), 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if upto >= max {
            println!("indexed_after_s {:.3}", t0.elapsed().as_secs_f64());
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(format!("search index at {upto} of {max} events after {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dispatch(db: &str, handler: &str, n: u64, timeout: Duration, cmd: &[&str]) -> Result<(), Error> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Polled every 5 ms while the daemon works, so it must stay cheap: one
    // probe of the daemon's partial index `deliveries_due` for any unfinished
    // delivery (a scan of every delivery would take a tenth of a core away
    // from the daemon being measured). Finished ones are counted once, at the end.
    // Since ordered processing, unfinished deliveries sit in two partial
    // indexes, unkeyed (`deliveries_due`) and keyed (`deliveries_keyed`);
    // a database of an older build has only the first.
    // Since schema 6 the keyed index holds finished deliveries too, so both
    // parts are read from `deliveries_waiting` (every unfinished delivery,
    // schema 5 on), as the plain form below does.
    let keyed: bool =
        conn.query_row("SELECT count(*) > 0 FROM pragma_table_info('deliveries') WHERE name = 'order_key'", [], |r| r.get(0))?;
    let waiting: bool =
        conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'deliveries_waiting'", [], |r| r.get(0))?;
    let (unfinished_sql, any_sql) = if keyed && !waiting {
        (
            "SELECT (SELECT count(*) FROM deliveries WHERE handler = ?1 AND status IN ('pending', 'retrying', 'running') AND order_key IS NULL)
                  + (SELECT count(*) FROM deliveries WHERE handler = ?1 AND status IN ('pending', 'retrying', 'running') AND order_key IS NOT NULL)",
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE handler = ?1 AND status IN ('pending', 'retrying', 'running') AND order_key IS NULL)
                 OR EXISTS (SELECT 1 FROM deliveries WHERE handler = ?1 AND status IN ('pending', 'retrying', 'running') AND order_key IS NOT NULL)",
        )
    } else {
        (
            "SELECT count(*) FROM deliveries WHERE handler = ?1 AND status IN ('pending', 'retrying', 'running')",
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE handler = ?1 AND status IN ('pending', 'retrying', 'running'))",
        )
    };
    let unfinished = |conn: &rusqlite::Connection| -> rusqlite::Result<u64> {
        conn.query_row(unfinished_sql, [handler], |r| r.get::<_, i64>(0).map(|n| n as u64))
    };
    let any_unfinished = |conn: &rusqlite::Connection| -> rusqlite::Result<bool> { conn.query_row(any_sql, [handler], |r| r.get(0)) };
    let finished = |conn: &rusqlite::Connection| -> rusqlite::Result<(u64, u64)> {
        conn.query_row(
            "SELECT coalesce(sum(status = 'succeeded'), 0), coalesce(sum(status = 'failed'), 0) FROM deliveries WHERE handler = ?1",
            [handler],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
    };
    let (done0, failed0) = finished(&conn)?;
    if done0 + failed0 != 0 {
        return Err(format!("{} deliveries of `{handler}` already finished before the run", done0 + failed0).into());
    }
    let total = unfinished(&conn)?;
    if total != n {
        return Err(format!("{total} deliveries of `{handler}` are queued, expected {n}").into());
    }
    let spawned_at = chrono::Utc::now().timestamp_micros();
    let t0 = Instant::now();
    let mut child = std::process::Command::new(cmd[0]).args(&cmd[1..]).spawn()?;
    let (ok, failed) = loop {
        if !any_unfinished(&conn)? {
            break finished(&conn)?;
        }
        if let Some(st) = child.try_wait()? {
            let (ok, _) = finished(&conn)?;
            return Err(format!("the daemon exited ({st}) after {ok} deliveries").into());
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let (ok, _) = finished(&conn)?;
            return Err(format!("only {ok} of {n} deliveries finished within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let secs = t0.elapsed().as_secs_f64();
    let first: Option<i64> = conn.query_row(
        "SELECT min(a.started_at) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.handler = ?1",
        [handler],
        |r| r.get(0),
    )?;
    // The daemon's own CPU (all its threads, not the handler processes it
    // reaped): what the deliveries cost beyond their spawns. Read before the
    // stop, so the shutdown is not counted.
    let own = own_cpu_secs(child.id());
    let threads = thread_cpu_secs(child.id());
    // SAFETY: kill(2) on the child we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let st = child.wait()?;
    // The daemon and every handler process it reaped (the helper's own polling is not counted).
    let cpu = cpu_secs(libc::RUSAGE_CHILDREN);
    let startup = first.map_or(0.0, |f| (f - spawned_at) as f64 / 1e6);
    println!("dispatch_rate {:.0}", n as f64 / secs);
    println!("dispatch_rate_after_start {:.0}", n as f64 / (secs - startup).max(1e-6));
    println!("cpu_ms_per_delivery {:.3}", cpu * 1000.0 / n as f64);
    if let Some(own) = own {
        println!("daemon_cpu_ms_per_delivery {:.3}", own * 1000.0 / n as f64);
    }
    // Per thread name, in µs per delivery: where the daemon's own share goes.
    let per = |secs: f64| secs * 1e6 / n as f64;
    let threads: Vec<String> = threads.iter().map(|(name, secs)| format!("{name}={:.1}", per(*secs))).collect();
    println!("daemon_thread_us_per_delivery {}", threads.join(" "));
    eprintln!(
        "{ok} succeeded, {failed} failed in {secs:.3}s from spawning the daemon ({startup:.3}s until its first attempt); daemon exit {st}"
    );
    if failed > 0 {
        return Err(format!("{failed} deliveries failed").into());
    }
    Ok(())
}

// ------------------------------------------------------------------ latency

async fn latency(url: &str, tgt: &str, n: usize, gap: Duration) -> Result<(), Error> {
    let u = parse_url(url)?;
    let t = parse_url(tgt)?;
    let mut daemon = connect(&u.host).await?;
    let mut peer = connect(&t.host).await?;
    let count = |b: Bytes| String::from_utf8_lossy(&b).trim().parse::<u64>().unwrap_or(0);
    let base = count(send(&mut peer, Method::GET, &t.host, "/count", Bytes::new()).await?.1);
    let base_lat = serde_json::from_slice::<Vec<i64>>(&send(&mut peer, Method::GET, &t.host, "/latencies", Bytes::new()).await?.1)?.len();
    for i in 0..n {
        let (status, body) = send(&mut daemon, Method::POST, &u.host, &u.path, Bytes::from(event_body(i))).await?;
        if status != StatusCode::OK {
            return Err(format!("event {i}: {status} {}", String::from_utf8_lossy(&body)).into());
        }
        let want = base + i as u64 + 1;
        let path = format!("/wait/{want}");
        let wait = send(&mut peer, Method::GET, &t.host, &path, Bytes::new());
        tokio::time::timeout(Duration::from_secs(10), wait).await.map_err(|_| format!("event {i} never reached the target"))??;
        tokio::time::sleep(gap).await;
    }
    let all: Vec<i64> = serde_json::from_slice(&send(&mut peer, Method::GET, &t.host, "/latencies", Bytes::new()).await?.1)?;
    let mut lat: Vec<i64> = all[base_lat..].to_vec();
    if lat.len() != n {
        return Err(format!("the target stamped {} envelopes, expected {n}", lat.len()).into());
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    println!("latency_p50_ms {:.2}", pct(0.50));
    println!("latency_p90_ms {:.2}", pct(0.90));
    println!("latency_p99_ms {:.2}", pct(0.99));
    println!("latency_max_ms {:.2}", pct(1.0));
    Ok(())
}
