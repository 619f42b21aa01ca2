//! The accept loop both listeners share (public ingest and admin), in the
//! shape of mini-redis's `Listener`: a semaphore caps open connections, accept
//! errors (EMFILE and friends) back off instead of spinning, and on shutdown
//! the loop stops accepting and lets open requests finish for `drain`.
//!
//! Three things hyper does not do on its own are done here, once for both
//! listeners:
//! - **Every refusal is JSON.** hyper answers a request head it cannot parse
//!   (400), a target over its 65534-byte limit (414) and a head over
//!   `max_header_bytes` (431) itself, with an empty body, and offers no hook
//!   for it. [`Socket`] wraps the connection and replaces exactly those answers
//!   with JSON ones naming the problem (see [`hyper_refusal`] for how they are
//!   told apart from ours).
//! - **The head limit is exact**: hyper's `max_header_size` counts the request
//!   line, every header line and the final CRLF; `max_buf_size` alone is only a
//!   read-buffer size, and one read could carry a larger head past it.
//! - **Idle connections can be told from busy ones** ([`ConnState`]), so a
//!   full listener that must stay reachable (admin: health probes) closes its
//!   oldest idle connection for a new one instead of queueing it.
//!
//! Both hold over HTTPS too (public listener with `server.tls`): [`Socket`]
//! wraps the TLS stream, so it sees hyper's plaintext writes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::tls::Reloadable;

/// hyper's longest request target; longer ones get 414 from hyper itself.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// hyper's default cap on header fields per request; more get 431. Setting
/// it explicitly would move hyper's header array to the heap for every
/// request, so it stays the default and is only named in the message.
const MAX_HEADERS: usize = 100;

/// Called with the status of each refusal hyper made itself (the request
/// never reached the handler, so only the listener knows it happened).
pub type OnRefusal = Arc<dyn Fn(StatusCode) + Send + Sync>;

/// Limits of one listener.
#[derive(Clone)]
pub struct Limits {
    /// For log lines: "webhook", "admin".
    pub name: &'static str,
    pub max_connections: usize,
    /// What a new connection meets when `max_connections` are open.
    pub when_full: WhenFull,
    /// The whole request head must arrive within this, counted from when the
    /// connection starts waiting for it (an idle keep-alive connection too).
    pub header_read_timeout: Duration,
    /// Exact limit on a request head: request line, header lines, final CRLF.
    pub max_header_bytes: usize,
    /// How the head limit is named in the 431 message (the config key).
    pub header_limit_name: &'static str,
    /// How long open requests may finish after shutdown began.
    pub drain: Duration,
    /// Counts hyper's own refusals (see the module doc); `None`: only logged.
    pub on_refusal: Option<OnRefusal>,
}

/// What happens to a connection that arrives while `max_connections` are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Not accepted until one closes; the kernel's backlog holds it meanwhile.
    /// Right for the public listener: nothing already accepted is cut.
    Wait,
    /// Accepted, and the oldest connection with no request in progress is
    /// closed to make room (it waits only if every one is mid-request). Right
    /// for the admin listener, where idle connections must not starve probes.
    CloseOldestIdle,
}

/// Serves HTTP/1.1 on `listener` with `handle` until `shutdown`.
pub async fn serve<H, F>(listener: TcpListener, limits: Limits, shutdown: CancellationToken, handle: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_with_tls(listener, limits, None, shutdown, handle).await
}

/// Like [`serve`]; with `tls`, every connection is first a TLS handshake
/// (within `header_read_timeout`) with the certificate `tls` holds when the
/// connection is accepted.
pub async fn serve_with_tls<H, F>(
    listener: TcpListener,
    limits: Limits,
    tls: Option<Arc<Reloadable>>,
    shutdown: CancellationToken,
    handle: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(Open::default());
    let refusals = Arc::new(Refusals::new(&limits));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let builder = Arc::new(builder);
    let mut backoff = Duration::from_millis(5);
    let mut next_id: u64 = 0;
    loop {
        // Waiting listeners take a permit before accepting, so the kernel
        // queues the rest; the others accept first and make room after.
        let early = match limits.when_full {
            WhenFull::Wait => tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => Some(p.expect("semaphore is never closed")),
            },
            WhenFull::CloseOldestIdle => None,
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(5); x }
                Err(e) => {
                    tracing::warn!(listener = limits.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let permit = match early {
            Some(p) => p,
            None => match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    if open.close_oldest_idle() {
                        tracing::info!(
                            listener = limits.name,
                            max = limits.max_connections,
                            "all connections open; closed the oldest idle one"
                        );
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let state = Arc::new(ConnState::default());
        let registered = (limits.when_full == WhenFull::CloseOldestIdle).then(|| open.register(next_id, state.clone()));
        let handle = handle.clone();
        let svc_state = state.clone();
        let svc = hyper::service::service_fn(move |req| {
            let fut = svc_state.begin().then(|| handle(req, peer));
            let state = svc_state.clone();
            async move {
                let resp = match fut {
                    Some(fut) => fut.await,
                    None => closed_for_room(),
                };
                Ok::<_, Infallible>(resp.map(|body| ResponseBody { body, state }))
            }
        });
        let conn = Conn {
            name: limits.name,
            peer,
            state,
            refusals: refusals.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            _permit: permit,
            _registered: registered,
        };
        // Two spawns rather than one boxed stream: plain HTTP keeps its
        // unwrapped TcpStream, and pays nothing for HTTPS being possible.
        match &tls {
            None => {
                tokio::spawn(conn.serve(stream, svc));
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    // The handshake gets the head's time limit, on its own:
                    // a client stalling in it is cut off like a slowloris.
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => conn.serve(stream, svc).await,
                        Ok(Err(e)) => tracing::debug!(listener = conn.name, %peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(listener = conn.name, %peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain) => {
            tracing::warn!(listener = limits.name, "connections still open after the drain period; closing them");
        }
    }
}

/// One accepted connection and what it holds until it ends: its permit, its
/// place among the open connections, and a watch on graceful shutdown.
struct Conn {
    name: &'static str,
    peer: SocketAddr,
    state: Arc<ConnState>,
    refusals: Arc<Refusals>,
    builder: Arc<hyper::server::conn::http1::Builder>,
    watcher: hyper_util::server::graceful::Watcher,
    _permit: OwnedSemaphorePermit,
    _registered: Option<Registered>,
}

impl Conn {
    /// Serves HTTP/1.1 on `io` (a TCP stream, or the TLS stream over one)
    /// until the peer leaves, shutdown drains it, or it is closed for room.
    async fn serve<I, S>(self, io: I, svc: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = ResponseBody, Error = Infallible>,
    {
        // The permit and the registration are held until this returns.
        let Conn { name, peer, state, refusals, builder, watcher, _permit, _registered } = self;
        let io = Socket { io: TokioIo::new(io), state: state.clone(), refusals, peer, replacement: None };
        let conn = watcher.watch(builder.serve_connection(io, svc));
        if _registered.is_none() {
            // Never closed for room (public listener): no second future to
            // poll (a lock of the token's node) at every wake-up of the
            // connection, several per request.
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, error = %e, %peer, "connection ended with an error");
            }
            return;
        }
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(listener = name, error = %e, %peer, "connection ended with an error");
            },
            _ = state.closed.cancelled() => {
                tracing::debug!(listener = name, %peer, "idle connection closed to make room");
            }
        }
    }
}

/// The answer to a request that arrived on a connection just chosen to be
/// closed for room (a race between its first byte and the accept loop).
fn closed_for_room() -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": "this connection was closed to make room for another; retry" }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    h.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    h.insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
    r
}

/// No request in progress: waiting for a head (or for the first byte).
const IDLE: u8 = 0;
/// From the handler's call until its whole answer is written.
const BUSY: u8 = 1;
/// Chosen to be closed for room; never busy again.
const CLOSING: u8 = 2;

/// What one connection is doing, shared by its handler calls, its response
/// bodies, its [`Socket`] and (admin) the accept loop.
#[derive(Default)]
struct ConnState {
    phase: AtomicU8,
    /// hyper dropped the current answer's body: all of it is in hyper's write
    /// buffer or on the wire, so the next completed flush ends the request.
    body_done: AtomicBool,
    /// Cancelled to close the connection for room.
    closed: CancellationToken,
}

impl ConnState {
    /// A request reached the handler. `false` if the connection is being closed.
    fn begin(&self) -> bool {
        self.body_done.store(false, Ordering::SeqCst);
        self.phase.compare_exchange(IDLE, BUSY, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// A flush completed: hyper flushes its own buffer before the socket's, so
    /// once the body is done every byte of the answer has been written.
    fn flushed(&self) {
        if self.body_done.load(Ordering::SeqCst) {
            let _ = self.phase.compare_exchange(BUSY, IDLE, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    fn is_idle(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == IDLE
    }

    /// Closes the connection if no request is in progress; whether it did.
    fn close_if_idle(&self) -> bool {
        let won = self.phase.compare_exchange(IDLE, CLOSING, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if won {
            self.closed.cancel();
        }
        won
    }
}

/// Open connections in accept order (admin listener only).
#[derive(Default)]
struct Open {
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
}

impl Open {
    fn register(self: &Arc<Self>, id: u64, state: Arc<ConnState>) -> Registered {
        self.conns.lock().expect("open connections lock poisoned").insert(id, state);
        Registered { open: self.clone(), id }
    }

    /// Closes the oldest connection with no request in progress; whether there was one.
    fn close_oldest_idle(&self) -> bool {
        self.conns.lock().expect("open connections lock poisoned").values().any(|c| c.close_if_idle())
    }
}

/// Removes a connection from [`Open`] when its task ends.
struct Registered {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open.conns.lock().expect("open connections lock poisoned").remove(&self.id);
    }
}

/// A handler's answer body, marking the request done for [`ConnState`] when
/// hyper drops it.
pub struct ResponseBody {
    body: Full<Bytes>,
    state: Arc<ConnState>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.state.body_done.store(true, Ordering::SeqCst);
    }
}

/// The JSON answers that replace hyper's empty ones, built once per listener.
struct Refusals {
    listener: &'static str,
    malformed: String,
    uri_too_long: String,
    head_too_large: String,
    on_refusal: Option<OnRefusal>,
}

impl Refusals {
    fn new(limits: &Limits) -> Self {
        Refusals {
            listener: limits.name,
            malformed: "request head is malformed: the request line or a header field is not valid HTTP/1.1, \
                        or Content-Length / Transfer-Encoding are invalid or conflicting"
                .into(),
            uri_too_long: format!("request target is longer than {MAX_URI_LEN} bytes"),
            head_too_large: format!(
                "request head exceeds {} ({} bytes) or has more than {MAX_HEADERS} header fields",
                limits.header_limit_name, limits.max_header_bytes
            ),
            on_refusal: limits.on_refusal.clone(),
        }
    }

    fn message(&self, status: StatusCode) -> &str {
        match status {
            StatusCode::URI_TOO_LONG => &self.uri_too_long,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => &self.head_too_large,
            _ => &self.malformed,
        }
    }

    /// The whole JSON answer (head and body) for one of hyper's refusals;
    /// counts and logs it.
    fn answer(&self, minor_version: u8, status: StatusCode, peer: SocketAddr) -> Vec<u8> {
        let message = self.message(status);
        tracing::info!(listener = self.listener, %peer, status = status.as_u16(), error = %message, "request rejected");
        if let Some(count) = &self.on_refusal {
            count(status);
        }
        let body = serde_json::json!({ "error": message }).to_string();
        let head = format!(
            "HTTP/1.{minor_version} {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        [head.into_bytes(), body.into_bytes()].concat()
    }
}

/// If `bytes` are exactly one of hyper's own refusals, its HTTP minor version
/// and status.
///
/// Why this cannot catch one of our answers: it is only asked while no
/// request is in progress on the connection ([`ConnState`]: from the
/// handler's call until its answer is flushed), when hyper writes nothing but
/// these refusals; and the bytes must also parse (with `httparse`, hyper's
/// own parser) as one complete response head of status 400, 414 or 431 whose
/// only fields are `connection: close`, `content-length: 0` and `date` — our
/// answers always carry a `content-type`.
fn hyper_refusal(bytes: &[u8]) -> Option<(u8, StatusCode)> {
    let mut fields = [httparse::EMPTY_HEADER; 4];
    let mut head = httparse::Response::new(&mut fields);
    match head.parse(bytes) {
        Ok(httparse::Status::Complete(n)) if n == bytes.len() => {}
        _ => return None,
    }
    let status = StatusCode::from_u16(head.code?).ok()?;
    let ours_to_replace =
        matches!(status, StatusCode::BAD_REQUEST | StatusCode::URI_TOO_LONG | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let empty = head.headers.iter().all(|f| {
        (f.name.eq_ignore_ascii_case("content-length") && f.value == b"0")
            || (f.name.eq_ignore_ascii_case("connection") && f.value == b"close")
            || f.name.eq_ignore_ascii_case("date")
    });
    let has_length = head.headers.iter().any(|f| f.name.eq_ignore_ascii_case("content-length"));
    (ours_to_replace && empty && has_length).then_some((head.version?, status))
}

/// The connection as hyper sees it: reads pass through; a write of one of
/// hyper's own refusals while no request is in progress is swallowed and our
/// JSON answer written instead (before any later write, flush or shutdown).
struct Socket<I> {
    io: TokioIo<I>,
    state: Arc<ConnState>,
    refusals: Arc<Refusals>,
    peer: SocketAddr,
    /// Our answer replacing hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

/// hyper's refusals are a status line and three short fields; anything longer is not one.
const MAX_REFUSAL_HEAD: usize = 256;

impl<I: AsyncRead + AsyncWrite + Unpin> Socket<I> {
    /// Replaces `bufs` if, together, they are one of hyper's refusals.
    fn replace(&mut self, bufs: &[&[u8]]) -> Option<usize> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.replacement.is_some() || !self.state.is_idle() || len > MAX_REFUSAL_HEAD {
            return None;
        }
        let (minor, status) = hyper_refusal(&bufs.concat())?;
        self.replacement = Some((self.refusals.answer(minor, status, self.peer), 0));
        Some(len)
    }

    /// Writes out the pending replacement, if any.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            let n = ready!(hyper::rt::Write::poll_write(Pin::new(&mut self.io), cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> hyper::rt::Read for Socket<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> hyper::rt::Write for Socket<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_replacement(cx))?;
        if let Some(n) = self.replace(&[buf]) {
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        ready!(self.poll_replacement(cx))?;
        // Answers to requests (the hot path) are written while busy: no copy for them.
        if self.state.is_idle() {
            let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
            if let Some(n) = self.replace(&slices) {
                return Poll::Ready(Ok(n));
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.state.flushed();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_own_empty_refusals_are_recognised() {
        let date = "date: Tue, 01 Dec 2026 10:00:00 GMT\r\n";
        for (code, status) in
            [(400, StatusCode::BAD_REQUEST), (414, StatusCode::URI_TOO_LONG), (431, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)]
        {
            let reason = status.canonical_reason().unwrap();
            let canned = format!("HTTP/1.1 {code} {reason}\r\nconnection: close\r\ncontent-length: 0\r\n{date}\r\n");
            assert_eq!(hyper_refusal(canned.as_bytes()), Some((1, status)), "{canned}");
            let canned10 = format!("HTTP/1.0 {code} {reason}\r\ncontent-length: 0\r\n\r\n");
            assert_eq!(hyper_refusal(canned10.as_bytes()), Some((0, status)));
        }
        // Ours carry a content-type and a body; other statuses are never replaced.
        let ours = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_refusal(ours.as_bytes()), None);
        assert_eq!(hyper_refusal(format!("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n{date}\r\n").as_bytes()), None);
        assert_eq!(hyper_refusal(b"HTTP/1.1 100 Continue\r\n\r\n"), None);
        assert_eq!(hyper_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n"), None);
        assert_eq!(hyper_refusal(b"HTTP/1.1 400 Bad Request\r\n\r\n"), None, "no length: not hyper's");
        // A head followed by anything, or cut short, is not one.
        assert_eq!(hyper_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}"), None);
        assert_eq!(hyper_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"), None);
        assert_eq!(hyper_refusal(b"{\"error\":\"x\"}"), None);
    }

    #[test]
    fn a_busy_connection_is_never_closed_for_room_and_idles_after_its_flush() {
        let s = ConnState::default();
        assert!(s.begin());
        assert!(!s.close_if_idle(), "mid-request");
        s.flushed();
        assert!(!s.is_idle(), "a flush before the body is done ends nothing");
        s.body_done.store(true, Ordering::SeqCst);
        s.flushed();
        assert!(s.is_idle());
        assert!(s.close_if_idle());
        assert!(s.closed.is_cancelled());
        assert!(!s.begin(), "a closing connection takes no request");
    }

    #[test]
    fn the_oldest_idle_connection_is_the_one_closed() {
        let open = Arc::new(Open::default());
        let states: Vec<Arc<ConnState>> = (0..3).map(|_| Arc::new(ConnState::default())).collect();
        let _regs: Vec<Registered> = states.iter().enumerate().map(|(i, s)| open.register(i as u64, s.clone())).collect();
        assert!(states[0].begin(), "the oldest is busy");
        assert!(open.close_oldest_idle());
        assert!(!states[0].closed.is_cancelled() && states[1].closed.is_cancelled() && !states[2].closed.is_cancelled());
    }
}
